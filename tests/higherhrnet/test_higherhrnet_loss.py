"""HigherHRNet loss: the official MultiLossFactory goldens (network outputs and synthetic outputs), hand-computed
push / pull, and invariants (perfect prediction, padding, masks)."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REFERENCE
from research.higherhrnet.loss import LossConfig, ae_loss, heatmap_loss, multi_loss

FOLDER = os.path.join(REFERENCE, "higherhrnet_w32_512")
_multi_loss = jax.jit(multi_loss, static_argnames="config")
_ae_loss = jax.jit(ae_loss, static_argnames="loss_type")
_heatmap_loss = jax.jit(heatmap_loss)


@pytest.fixture(scope="module")
def golden():
    path = os.path.join(FOLDER, "golden.npz")
    if not os.path.exists(path):
        pytest.skip(f"golden data not found at {path}")
    return dict(np.load(path))


def _nhwc(a):
    return jnp.asarray(a.transpose(0, 2, 3, 1))


@pytest.mark.parametrize("case", ["", "synth_"])
def test_official_loss_golden(golden, case):
    """Network-output case (`loss_out*`) and synthetic-output case (`synth_out*`), README tolerance
    1e-5 * |golden| + 1e-7 (measured: heatmaps_loss0 3.8e-6 vs 4.3e-4, heatmaps_loss1 2.4e-7 vs 3.1e-5, push 8.7e-11,
    pull 0; synthetic: <= 6e-8 on the heatmap losses, <= 3e-11 on push / pull)."""
    g = golden
    outs = ("loss_out0", "loss_out1") if case == "" else ("synth_out0", "synth_out1")
    r = _multi_loss([_nhwc(g[o]) for o in outs], [_nhwc(g["loss_heatmaps0"]), _nhwc(g["loss_heatmaps1"])],
                    [jnp.asarray(g["loss_masks0"]), jnp.asarray(g["loss_masks1"])],
                    [jnp.asarray(g["loss_joints0"]), jnp.asarray(g["loss_joints1"])])
    got = {"heatmaps_loss0": r["heatmaps_loss"][0], "heatmaps_loss1": r["heatmaps_loss"][1],
           "push_loss0": r["push_loss"][0], "pull_loss0": r["pull_loss"][0]}
    for name, value in got.items():
        ref = g[case + name]
        assert value.shape == ref.shape == (2,)
        err = np.abs(np.asarray(value) - ref)
        assert np.all(err <= 1e-5 * np.abs(ref) + 1e-7), (name, err, ref)
    # image 1 has one person: no push; the official AE loss is off for output 1
    assert float(r["push_loss"][0][1]) == 0.0 and r["push_loss"][0][0] > 0
    assert r["push_loss"][1] is None and r["pull_loss"][1] is None
    total = sum(float(np.mean(g[case + k])) for k in got)  # do_train's sum of batch means
    np.testing.assert_allclose(float(r["loss"]), total, rtol=1e-6)


def _official_example():
    """The tiny example of the official `test_ae_loss`: tags arange(32) * 0.1 as (1, 2, 4, 4), two people."""
    tags_nchw = (np.arange(32, dtype=np.float32) * 0.1).reshape(1, 2, 4, 4)
    joints = np.zeros((1, 3, 2, 2), np.int32)  # one padding row (all zero) beyond the two people
    joints[0, 0] = [(3, 1), (22, 1)]
    joints[0, 1] = [(10, 1), (30, 1)]
    return jnp.asarray(tags_nchw.transpose(0, 2, 3, 1)), jnp.asarray(joints)


def test_push_pull_hand_computed():
    tags, joints = _official_example()
    push, pull = _ae_loss(tags, joints)
    # person 0 tags 0.3, 2.2 (mean 1.25), person 1 tags 1.0, 3.0 (mean 2.0)
    pull_ref = ((0.95 ** 2 + 0.95 ** 2) / 2 + (1.0 + 1.0) / 2) / 2
    push_ref = 2 * math.exp(-0.75 ** 2) / (1 * 2) * 0.5
    np.testing.assert_allclose(pull, [pull_ref], rtol=1e-6)
    np.testing.assert_allclose(push, [push_ref], rtol=1e-6)
    push_max, _ = _ae_loss(tags, joints, "max")
    np.testing.assert_allclose(push_max, [2 * (1 - 0.75) / 2 * 0.5], rtol=1e-6)
    # a single tag map (TAG_PER_JOINT False): the index is y * W + x
    one = tags[..., :1]
    j1 = jnp.asarray([[[(3, 1), (9, 1)], [(0, 0), (0, 0)]]], jnp.int32)  # values 0.3, 0.9; second row empty
    push1, pull1 = _ae_loss(one, j1)
    np.testing.assert_allclose(pull1, [(0.3 ** 2 + 0.3 ** 2) / 2], rtol=1e-6)
    assert float(push1[0]) == 0.0


def test_people_without_visible_joints_do_not_count():
    tags, joints = _official_example()
    push, pull = _ae_loss(tags, joints)
    # a row of invisible joints between the people, and invisible entries (garbage index) inside a person
    padded = np.zeros((1, 4, 3, 2), np.int32)
    padded[0, 0, :2] = np.asarray(joints[0, 0])
    padded[0, 1] = [(31, 0), (5, 0), (0, 0)]
    padded[0, 2, :2] = np.asarray(joints[0, 1])
    padded[0, 2, 2] = (17, 0)
    push2, pull2 = _ae_loss(tags, jnp.asarray(padded))
    np.testing.assert_allclose(push2, push, rtol=1e-6)
    np.testing.assert_allclose(pull2, pull, rtol=1e-6)
    none_push, none_pull = _ae_loss(tags, jnp.zeros((1, 30, 17, 2), jnp.int32))
    assert float(none_push[0]) == 0.0 and float(none_pull[0]) == 0.0


def test_perfect_prediction_gives_zero_heatmap_loss():
    rng = np.random.default_rng(0)
    target = jnp.asarray(rng.uniform(0, 1, (2, 8, 8, 3)).astype(np.float32))
    mask = jnp.ones((2, 8, 8))
    np.testing.assert_array_equal(_heatmap_loss(target, target, mask), [0.0, 0.0])
    wrong = target.at[:, 2:4].add(1.0)
    assert np.all(np.asarray(_heatmap_loss(wrong, target, mask)) > 0)
    # masked pixels never count
    np.testing.assert_array_equal(_heatmap_loss(wrong, target, mask.at[:, 2:4].set(0)), [0.0, 0.0])
    # mean over pixels and joints: one wrong pixel of one joint by 2 -> 4 / (8 * 8 * 3)
    one = target.at[0, 5, 6, 1].add(2.0)
    np.testing.assert_allclose(_heatmap_loss(one, target, mask), [4.0 / 192, 0.0], rtol=1e-5)


def test_perfect_prediction_total_is_push_only_and_gradients_flow():
    """Outputs equal to the targets and each person's tags equal: heatmap and pull losses vanish, the total is the
    push term, and the gradient reaches exactly the tags of the annotated joints."""
    cfg = LossConfig(num_joints=2)
    rng = np.random.default_rng(1)
    hm0 = rng.uniform(0, 1, (1, 4, 4, 2)).astype(np.float32)
    hm1 = rng.uniform(0, 1, (1, 8, 8, 2)).astype(np.float32)
    tag = np.zeros((1, 4, 4, 2), np.float32)
    joints0 = np.zeros((1, 30, 2, 2), np.int32)
    joints0[0, 0] = [(1 * 16 + 5, 1), (0 * 16 + 6, 1)]  # person 0: joint 1 at (y1, x1), joint 0 at (y1, x2)
    joints0[0, 1] = [(0 * 16 + 15, 1), (0, 0)]  # person 1: joint 0 at (y3, x3)
    tag[0, 1, 1, 1] = tag[0, 1, 2, 0] = 0.5
    tag[0, 3, 3, 0] = -0.5
    outputs = [jnp.asarray(np.concatenate([hm0, tag], -1)), jnp.asarray(hm1)]
    args = ([jnp.asarray(hm0), jnp.asarray(hm1)], [jnp.ones((1, 4, 4)), jnp.ones((1, 8, 8))],
            [jnp.asarray(joints0), jnp.zeros((1, 30, 2, 2), jnp.int32)])
    r = _multi_loss(outputs, *args, config=cfg)
    assert float(r["heatmaps_loss"][0][0]) == 0.0 and float(r["heatmaps_loss"][1][0]) == 0.0
    assert float(r["pull_loss"][0][0]) == 0.0
    np.testing.assert_allclose(float(r["loss"]), 0.001 * math.exp(-1.0) * 0.5, rtol=1e-6)
    grad = jax.jit(jax.grad(lambda o: multi_loss([o, outputs[1]], *args, config=cfg)["loss"]))(outputs[0])
    nonzero = sorted(map(tuple, np.argwhere(np.asarray(grad) != 0)))
    assert nonzero == [(0, 1, 1, 3), (0, 1, 2, 2), (0, 3, 3, 2)]


def test_config_errors():
    with pytest.raises(ValueError, match="push_loss_factor"):
        multi_loss([], [], [], [], LossConfig(push_loss_factor=(0.001,)))
    with pytest.raises(ValueError, match="outputs has 1 entries"):
        multi_loss([jnp.zeros((1, 4, 4, 34))], [], [], [])
    with pytest.raises(ValueError, match="AE loss type"):
        LossConfig(ae_loss_type="huber").validate()
