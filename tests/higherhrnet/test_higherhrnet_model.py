"""HigherHRNet model and bridge: official W32 outputs through the bridge (../shared/reference), parameter count,
state_dict keys / shapes / order, round trip, transposed-conv semantics, tiny-variant behaviour."""

import functools
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REFERENCE
from research.bridge.torch_bridge import BridgeError
from research.higherhrnet import bridge
from research.higherhrnet.loss import LossConfig, multi_loss
from research.higherhrnet.model import (W48, DeconvConfig, HigherHRNetConfig, PhaseConvTranspose, build_model,
                                        count_params, deconv_cfg, phase_conv_transpose, torch_deconv_padding)

FOLDER = os.path.join(REFERENCE, "higherhrnet_w32_512")
W48_PARAM_COUNT = 63_827_139  # official get_pose_net with w48_640_adam_lr1e-3.yaml, sum(p.numel())


@pytest.fixture(scope="module")
def official():
    """W32 with the reference weights and its outputs on the golden `input` and `loss_input` stacked (batch 3: the
    one W32 forward of this file)."""
    if not os.path.isdir(FOLDER):
        pytest.skip(f"golden data not found at {FOLDER}")
    sys.path.insert(0, REFERENCE)
    from make_weights import make_weights
    manifest = json.load(open(os.path.join(FOLDER, "manifest.json")))
    golden = dict(np.load(os.path.join(FOLDER, "golden.npz")))
    sd = make_weights(manifest, golden=golden)
    model = build_model("w32")
    x = jnp.asarray(np.concatenate([golden["input"], golden["loss_input"]]).transpose(0, 2, 3, 1))
    template = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x[:1, :64, :64]))
    variables = bridge.from_torch(model, sd, template)
    out = jax.jit(functools.partial(model.apply, train=False))(variables, x)
    # the task's inference path: BatchNorm folded into the convolutions, phase-split transposed conv
    folded = build_model("w32", conv_transpose=PhaseConvTranspose, fold_bn=True, fold_impl="lax")
    out_folded = jax.jit(functools.partial(folded.apply, train=False))(variables, x)
    paths = dict(out=jax.device_get(out), out_folded=jax.device_get(out_folded))
    from research.cpu.kernels import onednn
    if jax.default_backend() == "cpu" and onednn.available()[0]:  # the CPU task's path: oneDNN conv+bias+add+ReLU
        fused = build_model("w32", conv_transpose=PhaseConvTranspose, fold_bn=True, fold_impl="onednn_fused")
        paths["out_fused"] = jax.device_get(jax.jit(functools.partial(fused.apply, train=False))(variables, x))
    return dict(manifest=manifest, golden=golden, sd=sd, model=model, template=template, variables=variables,
                **paths)


@pytest.mark.parametrize("name,batch", [("out", slice(0, 1)), ("loss_out", slice(1, 3))])
@pytest.mark.parametrize("path", ["out", "out_folded", "out_fused"])
def test_golden_outputs(official, name, batch, path):
    """Both outputs equal the official ones within the README tolerance 3e-4 * max|golden|, for the inference input
    and the two loss-case images (measured max errors are the size of float32 rounding noise, ~3e-5..7e-5 of max),
    with plain layers, with the folded BatchNorm / phase transposed-conv inference path, and with that path's
    convolutions, biases, residuals and ReLUs fused into oneDNN calls (what the task runs on CPU)."""
    if path not in official:
        pytest.skip("oneDNN kernels unavailable here")
    g, out = official["golden"], official[path]
    for i in range(2):
        ref = g[f"{name}{i}"].transpose(0, 2, 3, 1)
        got = out["outputs"][i][batch]
        assert got.shape == ref.shape and got.dtype == np.float32
        err = np.abs(got - ref).max()
        assert err <= 3e-4 * np.abs(ref).max(), (name, i, err)
    # heatmaps / tags are the official channel split: output 0 = 17 heatmaps + 17 tags, output 1 = 17 heatmaps
    np.testing.assert_array_equal(out["heatmaps"][0], out["outputs"][0][..., :17])
    np.testing.assert_array_equal(out["tags"][0], out["outputs"][0][..., 17:])
    np.testing.assert_array_equal(out["heatmaps"][1], out["outputs"][1])
    assert len(out["tags"]) == 1


def test_loss_on_our_outputs_matches_official_loss(official):
    """The official loss case end to end: our network on `loss_input`, then our loss, against the official losses.
    The outputs carry float32 noise of a few 1e-5 of their max, so allow 1e-4 relative (+1e-7) here; the loss alone
    is checked at the README tolerance in test_higherhrnet_loss.py."""
    g, out = official["golden"], official["out"]
    r = multi_loss([o[1:3] for o in out["outputs"]], [g["loss_heatmaps0"].transpose(0, 2, 3, 1),
                                                       g["loss_heatmaps1"].transpose(0, 2, 3, 1)],
                   [g["loss_masks0"], g["loss_masks1"]], [g["loss_joints0"], g["loss_joints1"]])
    got = {"heatmaps_loss0": r["heatmaps_loss"][0], "heatmaps_loss1": r["heatmaps_loss"][1],
           "push_loss0": r["push_loss"][0], "pull_loss0": r["pull_loss"][0]}
    for key, value in got.items():
        ref = g[key]
        assert np.all(np.abs(np.asarray(value) - ref) <= 1e-4 * np.abs(ref) + 1e-7), (key, value, ref)


def test_param_counts(official):
    assert count_params(official["template"]["params"]) == official["manifest"]["param_count"] == 28_645_331
    w48 = build_model(W48)
    shapes = jax.eval_shape(lambda: w48.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
    assert count_params(shapes["params"]) == W48_PARAM_COUNT
    # the CPU variants (not official): the counts docs/higherhrnet.md lists
    for name, count in (("small", 715_683), ("tiny", 182_379)):
        m = build_model(name)
        shapes = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
        assert count_params(shapes["params"]) == count, name


def test_state_dict_keys_shapes_order_match_official(official):
    ours = bridge.to_torch(official["model"], official["variables"])
    entries = official["manifest"]["entries"]
    assert list(ours) == [e["key"] for e in entries]  # same keys, in the official state_dict() order
    for e in entries:
        assert ours[e["key"]].shape == tuple(e["shape"]), e["key"]
        if e["kind"] == "skip":  # num_batches_tracked: what a strict load_state_dict expects
            assert e["key"].endswith("num_batches_tracked") and ours[e["key"]].dtype == np.int64


def test_round_trip_is_bit_exact(official):
    sd, model = official["sd"], official["model"]
    back = bridge.to_torch(model, official["variables"])
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    again = bridge.from_torch(model, back, official["template"])
    for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(official["variables"])):
        np.testing.assert_array_equal(a, b)


def test_bridge_is_strict(official):
    sd, model, template = official["sd"], official["model"], official["template"]
    broken = dict(sd)
    del broken["stage4.1.fuse_layers.2.0.1.1.running_var"]
    broken["extra.weight"] = np.zeros(3, np.float32)
    broken["deconv_layers.0.0.0.weight"] = np.zeros((32, 66, 4, 4), np.float32)  # (out, in): wrong layout
    with pytest.raises(BridgeError) as e:
        bridge.from_torch(model, broken, template)
    msg = str(e.value)
    for key in ("stage4.1.fuse_layers.2.0.1.1.running_var", "extra.weight", "deconv_layers.0.0.0.weight"):
        assert key in msg


@pytest.mark.parametrize("kernel", [4, 3, 2])
def test_transposed_conv_matches_torch(kernel):
    """The head's transposed conv with the bridge's kernel conversion equals torch ConvTranspose2d for every
    official kernel size (padding / output_padding of `_get_deconv_cfg`), on a non-square map."""
    torch = pytest.importorskip("torch")
    padding, output_padding = deconv_cfg(kernel)
    rng = np.random.default_rng(kernel)
    w = rng.standard_normal((5, 3, kernel, kernel)).astype(np.float32)  # torch (in, out, kh, kw)
    x = rng.standard_normal((2, 5, 6, 7)).astype(np.float32)
    ref = torch.nn.functional.conv_transpose2d(torch.from_numpy(x), torch.from_numpy(w), stride=2,
                                               padding=padding, output_padding=output_padding).numpy()
    for cls in (nn.ConvTranspose, PhaseConvTranspose):
        layer = cls(3, (kernel, kernel), (2, 2), use_bias=False,
                    padding=(torch_deconv_padding(kernel, padding, output_padding),) * 2)
        got = layer.apply({"params": {"kernel": bridge._deconv_from_torch(w)}}, jnp.asarray(x.transpose(0, 2, 3, 1)))
        assert got.shape == (2, 12, 14, 3)
        np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), ref, atol=1e-5, err_msg=cls.__name__)
    np.testing.assert_array_equal(bridge._deconv_to_torch(bridge._deconv_from_torch(w)), w)


# --- tiny variant -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    model = build_model("tiny")
    x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (2, 64, 96, 3)).astype(np.float32))
    template = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
    # weights drawn like the reference ones (official init would make every output ~1e-3), without compiling init
    rng = np.random.default_rng(1)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, leaf.shape)
        return rng.standard_normal(leaf.shape) * 0.05  # bias, mean

    variables = jax.tree_util.tree_map_with_path(lambda p, l: jnp.asarray(draw(p, l), jnp.float32), template)
    return model, x, variables


@functools.partial(jax.jit, static_argnums=0, static_argnames="train")
def _apply(model, variables, x, train=False):
    if train:
        return model.apply(variables, x, train=True, mutable=["batch_stats"])
    return model.apply(variables, x)


def test_tiny_shapes_and_train_mode_batchnorm(tiny):
    model, x, variables = tiny
    out = _apply(model, variables, x)
    assert [o.shape for o in out["outputs"]] == [(2, 16, 24, 34), (2, 32, 48, 17)]
    assert out["tags"][0].shape == (2, 16, 24, 17)
    out_t, upd = _apply(model, variables, x, train=True)
    # train mode normalises with batch statistics: outputs change, running stats move by torch momentum 0.1
    assert np.abs(np.asarray(out_t["outputs"][0]) - np.asarray(out["outputs"][0])).max() > 1e-2
    p = variables["params"]
    conv1 = jax.lax.conv_general_dilated(x, p["conv1"]["kernel"], (2, 2), ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         precision=jax.lax.Precision.HIGHEST)
    old, new = variables["batch_stats"]["bn1"], upd["batch_stats"]["bn1"]
    np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * conv1.mean((0, 1, 2)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * conv1.var((0, 1, 2)), rtol=1e-4, atol=1e-5)
    # every BatchNorm was updated, none of them left at its old value
    moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), upd["batch_stats"],
                                   dict(variables["batch_stats"]))
    assert min(jax.tree_util.tree_leaves(moved)) > 0


def test_tiny_bfloat16_compute_follows_float32(tiny):
    model, x, variables = tiny
    ref = _apply(model, variables, x)["outputs"]
    half = build_model("tiny", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    v16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), variables)
    shapes = jax.eval_shape(lambda: half.init(jax.random.PRNGKey(0), x))
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree_util.tree_leaves(shapes["params"]))
    got = _apply(half, v16, x)["outputs"]
    for r, o in zip(ref, got):
        assert o.dtype == jnp.float32
        err = float(jnp.abs(o - r).max())
        assert 0 < err < 0.1 * float(jnp.abs(r).max()), err


def test_tiny_train_step_reaches_every_parameter(tiny):
    """Model + loss in train mode: every parameter gets a finite, nonzero gradient, and a small gradient step on the
    same batch lowers the loss (one compiled value-and-grad, called twice)."""
    model, x, variables = tiny
    rng = np.random.default_rng(2)
    targets = [rng.uniform(0, 1, (2, 16, 24, 17)).astype(np.float32), rng.uniform(0, 1, (2, 32, 48, 17))]
    masks = [np.ones((2, 16, 24), np.float32), np.ones((2, 32, 48), np.float32)]
    joints = np.zeros((2, 30, 17, 2), np.int32)
    for person in range(3):  # image 0: three people, image 1: none
        for k in range(5):
            joints[0, person, k] = ((k * 16 + 4 * person + 2) * 24 + 3 * k + 1, 1)
    joints = [joints, np.zeros_like(joints)]

    @jax.jit
    def value_and_grad(params):
        def f(p):
            out, _ = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x, train=True,
                                   mutable=["batch_stats"])
            return multi_loss(out["outputs"], targets, masks, joints)["loss"]
        return jax.value_and_grad(f)(params)

    loss, grads = value_and_grad(variables["params"])
    norms = jax.tree_util.tree_map(lambda g: float(jnp.linalg.norm(g)), grads)
    flat = {"/".join(k.key for k in path): v for path, v in jax.tree_util.tree_leaves_with_path(norms)}
    assert all(np.isfinite(v) and v > 0 for v in flat.values()), [k for k, v in flat.items() if not v > 0]
    stepped = jax.tree_util.tree_map(lambda p, g: p - 1e-3 * g, variables["params"], grads)
    assert float(value_and_grad(stepped)[0]) < float(loss)


def test_injected_conv_factory_is_used(tiny):
    """A `conv` factory passed in builds every convolution but the transposed one (parameters unchanged, so the
    same checkpoint fits and the outputs are identical)."""
    model, x, variables = tiny
    built = []

    def recording_conv(*args, **kwargs):
        built.append(kwargs["name"])
        return nn.Conv(*args, **kwargs)

    out = jax.jit(build_model("tiny", conv=recording_conv).apply)(variables, x)["outputs"]
    for a, b in zip(out, _apply(model, variables, x)["outputs"]):
        np.testing.assert_array_equal(a, b)
    sd = bridge.to_torch(model, variables)
    convs = [k for k, v in sd.items() if v.ndim == 4 and not k.startswith("deconv_layers.0.0.0")]
    assert len(built) == len(convs)  # one trace builds each layer once


def _stage(modules, channels):
    return {"NUM_MODULES": modules, "NUM_BRANCHES": len(channels), "BLOCK": "BASIC", "NUM_BLOCKS": [4] * len(channels),
            "NUM_CHANNELS": list(channels), "FUSE_METHOD": "SUM"}


def test_config_from_official_yaml():
    """The MODEL / LOSS sections of experiments/coco/higher_hrnet/w{32,48}_*.yaml give W32 / W48 and the loss cfg."""
    cfg = {"MODEL": {"NUM_JOINTS": 17, "TAG_PER_JOINT": True, "EXTRA": {
        "FINAL_CONV_KERNEL": 1, "STEM_INPLANES": 64, "STAGE2": _stage(1, (32, 64)),
        "STAGE3": _stage(4, (32, 64, 128)), "STAGE4": _stage(3, (32, 64, 128, 256)),
        "DECONV": {"NUM_DECONVS": 1, "NUM_CHANNELS": [32], "KERNEL_SIZE": [4], "NUM_BASIC_BLOCKS": 4,
                   "CAT_OUTPUT": [True]}}},
        "LOSS": {"NUM_STAGES": 2, "AE_LOSS_TYPE": "exp", "WITH_AE_LOSS": [True, False],
                 "PUSH_LOSS_FACTOR": [0.001, 0.001], "PULL_LOSS_FACTOR": [0.001, 0.001],
                 "WITH_HEATMAPS_LOSS": [True, True], "HEATMAPS_LOSS_FACTOR": [1.0, 1.0]}}
    assert HigherHRNetConfig.from_official(cfg) == build_model("w32").config
    assert LossConfig.from_official(cfg) == LossConfig()
    extra = cfg["MODEL"]["EXTRA"]
    extra.update(STAGE2=_stage(1, (48, 96)), STAGE3=_stage(4, (48, 96, 192)), STAGE4=_stage(3, (48, 96, 192, 384)))
    extra["DECONV"]["NUM_CHANNELS"] = [48]
    assert HigherHRNetConfig.from_official(cfg) == W48
    extra["STAGE3"]["NUM_BRANCHES"] = 2
    with pytest.raises(ValueError, match="NUM_BRANCHES"):
        HigherHRNetConfig.from_official(cfg)


def test_config_errors():
    with pytest.raises(ValueError, match="unknown HigherHRNet variant"):
        build_model("w64")
    with pytest.raises(ValueError, match="KERNEL_SIZE"):
        build_model(HigherHRNetConfig(deconv=DeconvConfig(kernel_size=(5,))))
    with pytest.raises(ValueError, match="NHWC"):
        build_model("tiny").init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 64, 64)))


@pytest.mark.parametrize("kernel", [4, 3, 2])
def test_phase_conv_transpose_gradients_match_dilated_form(kernel):
    """phase_conv_transpose (used in training) has nn.ConvTranspose's input and kernel gradients; an odd output
    size is refused."""
    padding = (torch_deconv_padding(kernel, *deconv_cfg(kernel)),) * 2
    rng = np.random.default_rng(10 + kernel)
    x = jnp.asarray(rng.standard_normal((2, 5, 7, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((kernel, kernel, 4, 3)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((2, 10, 14, 3)), jnp.float32)

    def plain(x, w):
        return jnp.sum(nn.ConvTranspose(3, (kernel, kernel), (2, 2), padding=padding, use_bias=False).apply(
            {"params": {"kernel": w}}, x) * g)

    def phase(x, w):
        return jnp.sum(phase_conv_transpose(x, w, padding) * g)

    np.testing.assert_allclose(phase(x, w), plain(x, w), rtol=1e-5)
    for a, b in zip(jax.grad(phase, (0, 1))(x, w), jax.grad(plain, (0, 1))(x, w)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="odd"):
        phase_conv_transpose(x, w, ((padding[0][0], padding[0][1] + 1),) * 2)


@pytest.mark.parametrize("fold_impl", ["lax", "dot", "onednn_wide", "onednn_fused"])
def test_fold_bn_and_phase_deconv_match_plain(tiny, fold_impl):
    """The task's model (BatchNorm folded into the convolutions in inference, phase-split transposed conv; with
    "onednn_fused" each convolution's bias, residual and ReLU in the same oneDNN call) gives the plain model's
    outputs (inference and train mode) and gradients to float rounding, on the same variables; init builds the same
    variable tree."""
    if fold_impl.startswith("onednn"):
        from research.cpu.kernels import onednn
        if jax.default_backend() != "cpu" or not onednn.available()[0]:
            pytest.skip("oneDNN kernels unavailable here")
    model, x, variables = tiny
    fast = build_model("tiny", conv_transpose=PhaseConvTranspose, fold_bn=True, fold_impl=fold_impl)
    shapes = jax.eval_shape(lambda: fast.init(jax.random.PRNGKey(0), x))
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(variables)
    want, got = _apply(model, variables, x), _apply(fast, variables, x)
    for a, b in zip(got["outputs"], want["outputs"]):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5 * np.abs(np.asarray(b)).max()
        assert np.abs(np.asarray(b)).max() > 0.1  # not a vacuous comparison

    def loss(m, params):
        out, _ = m.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                         mutable=["batch_stats"])
        return sum(jnp.mean(o ** 2) for o in out["outputs"])

    if fold_impl == "lax":  # train mode does not fold: one gradient comparison is enough
        ga = jax.jit(jax.grad(functools.partial(loss, fast)))(variables["params"])
        gb = jax.jit(jax.grad(functools.partial(loss, model)))(variables["params"])
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ga), jax.tree_util.tree_leaves(gb)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()) + 1e-12,
                                       err_msg=jax.tree_util.keystr(path))


def test_onnx_form_matches_plain(tiny):
    """The head in its ONNX form (`onnx_form`: final layer 0 padded with zero channels so that the deconv input is
    whole 16-channel blocks, the deconv BatchNorm folded into the phase convolutions with bias and ReLU before the
    interleave, an identity 1x1 convolution before the BasicBlocks) gives the plain model's outputs on the same
    variables (random BatchNorm statistics), and training mode is untouched."""
    model, x, variables = tiny
    form = build_model("tiny", conv_transpose=PhaseConvTranspose, onnx_form=True)
    want, got = _apply(model, variables, x), _apply(form, variables, x)
    for a, b in zip(got["outputs"], want["outputs"]):
        assert a.shape == b.shape
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5 * np.abs(np.asarray(b)).max()
        assert np.abs(np.asarray(b)).max() > 0.1
    # the form itself: TINY's deconv input is 8 features + 34 output channels, padded to 48; one identity conv
    def convs_of(m):
        return [e for e in jax.make_jaxpr(lambda v: m.apply(v, x))(variables).jaxpr.eqns
                if e.primitive.name == "conv_general_dilated"]

    convs = convs_of(form)
    lhs = [(e.invars[0].aval.shape, e.params["dimension_numbers"].lhs_spec) for e in convs]
    phase_in = [s[spec[1]] for s, spec in lhs if s[spec[2]] == x.shape[1] // 4 and s[spec[1]] > 34]
    assert phase_in == [48] * 4, lhs
    ones = [[e.invars[1].aval.shape for e in c].count((1, 1, 8, 8)) for c in (convs, convs_of(model))]
    assert ones[0] == ones[1] + 1
    # train mode ignores the form (no folded statistics in training)
    a, _ = _apply(form, variables, x, train=True)
    b, _ = _apply(model, variables, x, train=True)
    for p, q in zip(a["outputs"], b["outputs"]):
        np.testing.assert_allclose(p, q, rtol=0, atol=1e-5 * float(np.abs(q).max()))
