"""SiamFC network, bridge and loss against the official PyTorch goldens (../shared/reference/siamfc)."""

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
from research.siamfc import bridge
from research.siamfc.loss import balanced_loss, create_labels
from research.siamfc.model import (HighestPrecisionSiamFC, SiamFC, SplitGroupConv, TinySiamFC, init_variables,
                                   max_pool_slices, onednn_conv_all_grads, param_count, split_groups_conv, xcorr,
                                   xcorr_matmul, xcorr_single)

FOLDER = os.path.join(REFERENCE, "siamfc")
NHWC = (0, 2, 3, 1)


@pytest.fixture(scope="module")
def ref():
    if not os.path.isdir(FOLDER):
        pytest.skip(f"golden data not found at {FOLDER}")
    sys.path.insert(0, REFERENCE)
    from make_weights import make_weights
    manifest = json.load(open(os.path.join(FOLDER, "manifest.json")))
    golden = dict(np.load(os.path.join(FOLDER, "golden.npz")))
    return manifest, golden, make_weights(manifest, golden=golden)


@pytest.fixture(scope="module")
def real(ref):
    """The official-width model and its variables loaded from the official state_dict."""
    _, _, sd = ref
    model = SiamFC()
    # Parameter shapes do not depend on the input size: init on the smallest valid crop (87 px).
    template = jax.eval_shape(lambda: init_variables(model, jax.random.PRNGKey(0), 87, 87))
    return model, template, bridge.from_torch(model, sd, template)


@pytest.fixture(scope="module")
def real_apply(real):
    model, _, variables = real
    fn = jax.jit(lambda v, z, x: model.apply(v, z, x)["response"])
    return lambda z, x: np.asarray(fn(variables, jnp.asarray(z.transpose(NHWC)), jnp.asarray(x.transpose(NHWC))))


def _rel_err(ours, golden):
    return float(np.abs(ours - golden).max() / np.abs(golden).max())


def test_param_count_matches_official(ref, real):
    manifest, _, _ = ref
    _, template, _ = real
    assert param_count(template) == manifest["param_count"] == 2336320


def test_exported_keys_and_shapes_are_the_official_state_dict(ref):
    manifest, _, _ = ref
    model = SiamFC()
    variables = jax.jit(lambda: init_variables(model, jax.random.PRNGKey(1), 87, 87))()
    ours = bridge.to_torch(model, variables)
    # Same keys in the same order (torch's module order), same shapes, as strict load_state_dict checks.
    official = [(e["key"], tuple(e["shape"])) for e in manifest["entries"]]
    assert [(k, tuple(v.shape)) for k, v in ours.items()] == official
    # Official ops.init_weights: BatchNorm weight 1 / bias 0, conv biases 0.
    assert np.all(ours["backbone.conv3.1.weight"] == 1) and np.all(ours["backbone.conv5.0.bias"] == 0)


def test_round_trip_is_bit_exact(ref, real):
    _, _, sd = ref
    model, _, variables = real
    back = bridge.to_torch(model, variables)
    assert set(back) == set(sd) | {k for k in back if k.endswith("num_batches_tracked")}
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k


def test_bridge_is_strict(ref, real):
    _, _, sd = ref
    model, template, _ = real
    missing = {k: v for k, v in sd.items() if k != "backbone.conv4.0.bias"}
    with pytest.raises(BridgeError, match="missing keys.*backbone.conv4.0.bias"):
        bridge.from_torch(model, missing, template)
    with pytest.raises(BridgeError, match="unexpected keys.*head.weight"):
        bridge.from_torch(model, {**sd, "head.weight": np.zeros(1, np.float32)}, template)
    bad = dict(sd, **{"backbone.conv2.0.weight": np.zeros((256, 96, 5, 5), np.float32)})  # ungrouped layout
    with pytest.raises(BridgeError, match="backbone.conv2.0.weight"):
        bridge.from_torch(model, bad, template)
    tiny = TinySiamFC()
    tiny_template = jax.eval_shape(lambda: init_variables(tiny, jax.random.PRNGKey(0), 87, 87))
    with pytest.raises(BridgeError, match="shape"):
        bridge.from_torch(tiny, sd, tiny_template)


def test_golden_response_three_scales(ref, real_apply):
    """README tolerance for network outputs: |flax - golden| <= 3e-4 max|golden| (measured ~1.4e-6)."""
    _, golden, _ = ref
    r = real_apply(golden["z"], golden["x"]).transpose(0, 3, 1, 2)
    assert r.shape == golden["response"].shape == (3, 1, 17, 17)
    err = _rel_err(r, golden["response"])
    print(f"response rel err {err:.2e}")
    assert err <= 3e-4
    # The spatial variation (what locates the target) is ~10 % of the rms: check it on its own too.
    centred = r - r.mean(axis=(2, 3), keepdims=True)
    g_centred = golden["response"] - golden["response"].mean(axis=(2, 3), keepdims=True)
    assert _rel_err(centred, g_centred) <= 3e-4


def test_golden_loss_response(ref, real_apply):
    _, golden, _ = ref
    r = real_apply(golden["z"], golden["loss_x"]).transpose(0, 3, 1, 2)
    assert r.shape == golden["loss_response"].shape == (1, 1, 15, 15)
    err = _rel_err(r, golden["loss_response"])
    print(f"loss_response rel err {err:.2e}")
    assert err <= 3e-4


def test_train_mode_batchnorm_reproduces_calibrated_statistics(ref, real):
    """README step 5: train-mode BatchNorm on the calibration batch gives the official running stats.

    Official recipe: each BatchNorm averaged its batch statistics over the z call and the x call
    (`momentum=None`), storing torch's unbiased variance. Starting from zero statistics, one flax
    train-mode call leaves 0.05 * (batch mean) and 0.05 * (biased batch variance).
    """
    manifest, golden, _ = ref
    model, _, variables = real
    rng = np.random.default_rng(99)
    z_cal = rng.uniform(0, 255, (4, 3, 127, 127)).astype(np.float32).transpose(NHWC)
    x_cal = rng.uniform(0, 255, (4, 3, 255, 255)).astype(np.float32).transpose(NHWC)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, variables["batch_stats"])
    run = jax.jit(lambda v, imgs: model.apply(v, imgs, train=True, method=SiamFC.embed, mutable=["batch_stats"])[1])
    stats = [run({"params": variables["params"], "batch_stats": zeros}, imgs)["batch_stats"]["backbone"]
             for imgs in (z_cal, x_cal)]
    sizes = {"conv1": (59, 123), "conv2": (25, 57), "conv3": (10, 26), "conv4": (8, 24)}  # BN input side, z / x
    worst_mean = worst_var = 0.0
    for layer, (hz, hx) in sizes.items():
        mean = [np.asarray(s[layer]["1"]["mean"], np.float64) / 0.05 for s in stats]
        var = [np.asarray(s[layer]["1"]["var"], np.float64) / 0.05 * n / (n - 1)
               for s, n in zip(stats, (4 * hz * hz, 4 * hx * hx))]
        ref_mean = golden[f"state/backbone.{layer}.1.running_mean"]
        ref_var = golden[f"state/backbone.{layer}.1.running_var"]
        worst_mean = max(worst_mean, np.max(np.abs((mean[0] + mean[1]) / 2 - ref_mean) / np.sqrt(ref_var)))
        worst_var = max(worst_var, np.max(np.abs((var[0] + var[1]) / 2 / ref_var - 1)))
    print(f"calibration: max |mean - running_mean| / std {worst_mean:.1e}, max |var / running_var - 1| {worst_var:.1e}")
    assert worst_mean <= 1e-4 and worst_var <= 1e-4


def test_labels_match_official():
    ref_path = os.path.join(FOLDER, "golden.npz")
    if not os.path.exists(ref_path):
        pytest.skip("golden data not found")
    golden = np.load(ref_path)
    labels = create_labels(1, 15, 15)
    assert np.array_equal(labels.transpose(0, 3, 1, 2), golden["loss_labels"])
    # 17 x 17: the 13 cells within block distance 2 of the centre are positive.
    l17 = create_labels(2, 17, 17)[..., 0]
    assert l17.shape == (2, 17, 17) and l17.sum() == 2 * 13 and l17[0, 8, 8] == 1 and l17[0, 8, 11] == 0
    # r_neg > r_pos gives an ignored (0.5) ring.
    ring = create_labels(1, 17, 17, r_pos=8, r_neg=24)[0, ..., 0]
    assert ring[8, 8] == 1 and ring[8, 10] == 0.5 and ring[8, 11] == 0


@pytest.mark.parametrize("case", ["loss", "synth_loss"])
def test_balanced_loss_golden(ref, case):
    """README loss tolerance: <= 1e-5 |golden| + 1e-7, from the saved responses and labels."""
    _, golden, _ = ref
    logits = golden["loss_response" if case == "loss" else "synth_response"].transpose(NHWC)
    labels = golden["loss_labels"].transpose(NHWC)
    loss = float(jax.jit(balanced_loss)(logits, labels))
    err = abs(loss - float(golden[case]))
    print(f"{case} {loss:.8f} vs {float(golden[case]):.8f}, abs err {err:.1e}")
    assert err <= 1e-5 * abs(float(golden[case])) + 1e-7


def _balanced_loss_reference(x, t, neg_weight=1.0):
    """The official algorithm literally, in float64: per-cell weights, normalised, weighted BCE summed."""
    x, t = np.asarray(x, np.float64), np.asarray(t, np.float64)
    w = np.zeros_like(t)
    w[t == 1] = 1 / max((t == 1).sum(), 1)  # (an empty class assigns nothing, as torch's masked write)
    w[t == 0] = neg_weight / max((t == 0).sum(), 1)
    w /= w.sum()
    return np.sum(w * (np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))))


def test_balanced_loss_weights():
    """Positives and negatives carry their balanced weight, ignored (0.5) cells none, also with
    `neg_weight`, a batch of maps, and labels without positives."""
    rng = np.random.default_rng(0)
    labels = create_labels(2, 17, 17, r_pos=8, r_neg=24)  # has 1, 0.5 and 0 cells
    x = rng.normal(size=labels.shape).astype(np.float32) * 3
    x_ignored = np.where(labels == 0.5, 1e3, x).astype(np.float32)  # ignored cells must not count
    for logits, t, nw in ((x, labels, 1.0), (x_ignored, labels, 1.0), (x, labels, 3.0),
                          (x, np.zeros_like(labels), 1.0), (x, create_labels(2, 17, 17), 0.5)):
        want = _balanced_loss_reference(logits, t, nw)
        np.testing.assert_allclose(float(balanced_loss(logits, t, nw)), want, rtol=2e-6)
    np.testing.assert_allclose(_balanced_loss_reference(x_ignored, labels), _balanced_loss_reference(x, labels))


def _xcorr_reference(z, x, out_scale):
    """Direct numpy cross-correlation of one exemplar [h, w, C] over one search [H, W, C]."""
    h, w, _ = z.shape
    H, W, _ = x.shape
    out = np.zeros((H - h + 1, W - w + 1), np.float64)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = np.sum(x[i:i + h, j:j + w].astype(np.float64) * z)
    return out * out_scale


def test_xcorr_pairs_and_scales():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
    x = rng.normal(size=(6, 7, 8, 4)).astype(np.float32)
    out = np.asarray(xcorr(jnp.asarray(z), jnp.asarray(x), 0.5))
    assert out.shape == (6, 5, 6, 1)
    for i in range(6):  # official pairing: search i with exemplar i % Bz
        np.testing.assert_allclose(out[i, ..., 0], _xcorr_reference(z[i % 2], x[i], 0.5), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiple"):
        xcorr(jnp.asarray(z), jnp.asarray(x[:3]))


@pytest.fixture(scope="module")
def tiny():
    """Tiny model with random parameters and non-trivial BatchNorm statistics (drawn in numpy: no
    init compile)."""
    model = TinySiamFC()
    template = jax.eval_shape(lambda: init_variables(model, jax.random.PRNGKey(0), 87, 87))
    rng = np.random.default_rng(5)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        if name in ("scale", "var"):
            return rng.uniform(0.5, 2.0, leaf.shape)
        return rng.normal(size=leaf.shape) * 0.05

    variables = jax.tree_util.tree_map_with_path(lambda p, l: jnp.asarray(draw(p, l), l.dtype), template)
    return model, variables


def test_tiny_cached_exemplar_equals_pairs(tiny):
    """The tracker path (embed once, then respond) equals the pair forward, for 3 scales and batches."""
    model, v = tiny
    rng = np.random.default_rng(1)
    # Small crops keep it fast: 95 px -> 2 x 2 exemplar embedding, 135 px -> 7 x 7 search, 6 x 6 response.
    z = jnp.asarray(rng.uniform(0, 255, (2, 95, 95, 3)).astype(np.float32))
    x = jnp.asarray(rng.uniform(0, 255, (6, 135, 135, 3)).astype(np.float32))
    out = jax.jit(model.apply)(v, z, x)
    assert out["response"].shape == (6, 6, 6, 1) and out["exemplar"].shape == (2, 2, 2, 16)
    kernel = jax.jit(lambda v, z: model.apply(v, z, method=SiamFC.embed))(v, z[:1])
    np.testing.assert_allclose(kernel, out["exemplar"][:1], rtol=1e-6)
    scales = jax.jit(lambda v, k, x: model.apply(v, k, x, method=SiamFC.respond))(v, kernel, x[0::2])["response"]
    np.testing.assert_allclose(scales, out["response"][0::2], rtol=1e-5, atol=1e-6)
    # ...and each pair response is the correlation of the two embeddings.
    xf = np.asarray(out["search"])
    want = _xcorr_reference(np.asarray(out["exemplar"][1]), xf[3], 0.001)
    np.testing.assert_allclose(out["response"][3, ..., 0], want, rtol=1e-4, atol=1e-6)


def test_tiny_dtype_threads_through(tiny):
    _, v = tiny
    model = TinySiamFC(dtype=jnp.bfloat16)
    z = jnp.ones((1, 87, 87, 3)) * 100
    x = jnp.ones((1, 95, 95, 3)) * 100
    out = jax.jit(model.apply)(v, z, x)
    assert out["response"].dtype == jnp.bfloat16 and out["exemplar"].dtype == jnp.bfloat16


def test_tiny_train_step_updates_batch_stats_and_lowers_loss(tiny):
    """Train mode: BatchNorm uses batch statistics and updates the running ones for z and x (two
    official backbone calls), and one SGD step on the balanced loss lowers it."""
    model, v = tiny
    rng = np.random.default_rng(2)
    z = jnp.asarray(rng.uniform(0, 255, (2, 87, 87, 3)).astype(np.float32))
    x = jnp.asarray(rng.uniform(0, 255, (2, 135, 135, 3)).astype(np.float32))
    labels = jnp.asarray(create_labels(2, 7, 7))  # 7 x 7 responses: 13 positives, 36 negatives each

    def loss_fn(params, stats):
        out, new = model.apply({"params": params, "batch_stats": stats}, z, x, train=True, mutable=["batch_stats"])
        return balanced_loss(out["response"], labels), new["batch_stats"]

    @jax.jit
    def step(params, stats):
        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats)
        return loss, new_stats, jax.tree_util.tree_map(lambda p, g: p - 0.05 * g, params, grads)

    loss0, stats1, params1 = step(v["params"], v["batch_stats"])
    loss1, _, _ = step(params1, v["batch_stats"])
    assert np.isfinite(loss0) and float(loss1) < float(loss0)
    # Running mean after the z call then the x call: m <- 0.95 m + 0.05 batch_mean, twice.
    feats = {}
    conv1 = jax.jit(lambda v, imgs: model.apply(v, imgs, train=True, method=SiamFC.embed, capture_intermediates=True,
                                                mutable=["intermediates", "batch_stats"])[1]["intermediates"]
                    ["backbone"]["conv1"]["0"]["__call__"][0])
    for name, imgs in (("z", z), ("x", x)):
        feats[name] = np.asarray(conv1(v, imgs))
    m0 = np.asarray(v["batch_stats"]["backbone"]["conv1"]["1"]["mean"])
    want = 0.95 * (0.95 * m0 + 0.05 * feats["z"].mean((0, 1, 2))) + 0.05 * feats["x"].mean((0, 1, 2))
    np.testing.assert_allclose(stats1["backbone"]["conv1"]["1"]["mean"], want, rtol=1e-4, atol=1e-4)


def test_conv_and_norm_are_injected(tiny):
    """Drop-in conv and norm factories reach every layer and keep nn.Conv's / nn.BatchNorm's variables."""
    calls = []

    class CountingConv(nn.Conv):
        def __call__(self, x):
            calls.append(("conv", self.features))
            return super().__call__(x)

    class CountingNorm(nn.BatchNorm):
        def __call__(self, x, use_running_average=None):
            calls.append(("norm", x.shape[-1], self.epsilon, self.momentum))
            return super().__call__(x, use_running_average)

    model, v = tiny
    counted = TinySiamFC(conv=CountingConv, norm=CountingNorm)
    z = jnp.ones((1, 87, 87, 3))
    np.testing.assert_array_equal(counted.apply(v, z, z)["response"], model.apply(v, z, z)["response"])
    branch = [("conv", 8), ("norm", 8, 1e-6, 0.95), ("conv", 16), ("norm", 16, 1e-6, 0.95), ("conv", 16),
              ("norm", 16, 1e-6, 0.95), ("conv", 16), ("norm", 16, 1e-6, 0.95), ("conv", 16)]
    assert calls == branch * 2


def test_highest_precision_reaches_every_convolution(tiny):
    """`HighestPrecisionSiamFC` (for GPUs, where float32 convolutions may otherwise use TF32) sets
    HIGHEST on the 5 backbone convolutions of both branches and on the correlation."""
    _, v = tiny
    z = jnp.ones((1, 87, 87, 3))

    def precisions(model):
        text = str(jax.make_jaxpr(lambda v, z: model.apply(v, z, z)["response"])(v, z))
        return text.count("conv_general_dilated["), text.count("precision=(Precision.HIGHEST, Precision.HIGHEST)")

    assert precisions(HighestPrecisionSiamFC(widths=(8, 16, 16, 16, 16))) == (11, 11)
    assert precisions(TinySiamFC()) == (11, 0)


@pytest.mark.parametrize("bz,bx", [(2, 6), (1, 3), (4, 4)])
def test_xcorr_matmul_equals_xcorr_values_and_gradients(bz, bx):
    """The training correlation (batched product + shifted sums) gives `xcorr`'s responses and
    gradients for both inputs, with the official pairing (search i <-> exemplar i % Bz)."""
    rng = np.random.default_rng(bz * 10 + bx)
    z = jnp.asarray(rng.normal(size=(bz, 3, 4, 5)).astype(np.float32))
    x = jnp.asarray(rng.normal(size=(bx, 9, 8, 5)).astype(np.float32))
    out = np.asarray(xcorr_matmul(z, x, 0.5))
    assert out.shape == (bx, 7, 5, 1)
    np.testing.assert_allclose(out, xcorr(z, x, 0.5), rtol=1e-5, atol=1e-5)
    for i in range(bx):
        np.testing.assert_allclose(out[i, ..., 0], _xcorr_reference(np.asarray(z[i % bz]), np.asarray(x[i]), 0.5),
                                   rtol=1e-5, atol=1e-5)
    weights = jnp.asarray(rng.normal(size=out.shape).astype(np.float32))  # a loss that weighs every cell differently
    grads = [jax.grad(lambda z, x: jnp.sum(jnp.tanh(f(z, x, 0.5)) * weights), argnums=(0, 1))(z, x)
             for f in (xcorr_matmul, xcorr)]
    for a, b in zip(*grads):
        assert float(jnp.abs(b).max()) > 0
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))
    with pytest.raises(ValueError, match="multiple"):
        xcorr_matmul(z, x[:bx - 1]) if bz > 1 else xcorr_matmul(jnp.concatenate([z, z]), x)
    with pytest.raises(ValueError, match="channels"):
        xcorr_matmul(z, x[..., :4])


def test_fast_train_grads_equal_plain_training(tiny):
    """`fast_train_grads` (the default: `research.cpu.pool.max_pool`'s gradient and `xcorr_matmul` in
    training) gives the plain path's loss, every parameter gradient and the running statistics
    (float rounding); inference is the same computation (no correlation replaced)."""
    model, v = tiny
    plain = TinySiamFC(fast_train_grads=False)
    rng = np.random.default_rng(8)
    z = jnp.asarray(rng.uniform(0, 255, (2, 87, 87, 3)).astype(np.float32))
    x = jnp.asarray(rng.uniform(0, 255, (2, 135, 135, 3)).astype(np.float32))
    labels = jnp.asarray(create_labels(2, 7, 7))

    def loss_fn(m, params):
        out, new = m.apply({"params": params, "batch_stats": v["batch_stats"]}, z, x, train=True,
                           mutable=["batch_stats"])
        return balanced_loss(out["response"], labels), new["batch_stats"]

    def convs(m, train):
        text = str(jax.make_jaxpr(lambda p: m.apply({"params": p, "batch_stats": v["batch_stats"]}, z, x, train=train,
                                                    mutable=["batch_stats"])[0]["response"])(v["params"]))
        return text.count("conv_general_dilated["), text.count("custom_vjp_call")

    assert convs(model, True) == (10, 4) and convs(plain, True) == (11, 0)  # 2 pools x 2 branches
    assert convs(model, False) == convs(plain, False) == (11, 0)
    (l_fast, s_fast), g_fast = jax.jit(jax.value_and_grad(lambda p: loss_fn(model, p), has_aux=True))(v["params"])
    (l_ref, s_ref), g_ref = jax.jit(jax.value_and_grad(lambda p: loss_fn(plain, p), has_aux=True))(v["params"])
    assert float(l_fast) == pytest.approx(float(l_ref), rel=1e-6)
    for fast_tree, ref_tree, n in ((g_fast, g_ref, 18), (s_fast, s_ref, 8)):
        leaves_ref = jax.tree_util.tree_leaves(ref_tree)
        # the biases of convolutions followed by BatchNorm have zero gradient up to rounding: tolerances
        # relative to the largest gradient of the tree
        scale = max(float(np.abs(b).max()) for b in leaves_ref)
        assert len(leaves_ref) == n and scale > 0
        for a, b in zip(jax.tree_util.tree_leaves(fast_tree), leaves_ref):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("stride,groups", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_onednn_conv_all_grads_equals_lax(stride, groups):
    """The oneDNN convolution with both oneDNN gradients (conv_impl "onednn" in SiamFC), grouped
    layers as one grouped primitive, gives `lax.conv_general_dilated`'s output, input gradient and
    kernel gradient."""
    from research.cpu.kernels import onednn
    if not onednn.available()[0]:
        pytest.skip(f"oneDNN kernels unavailable: {onednn.available()[1]}")
    rng = np.random.default_rng(stride)
    cin = 70 * groups  # > 64 input channels per group: the case changed
    x = jnp.asarray(rng.normal(size=(2, 13, 12, cin)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(3, 3, 70, 6)).astype(np.float32))

    def lax_conv(x, w, stride, groups):
        return jax.lax.conv_general_dilated(x, w, (stride, stride), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=groups)

    ref = lax_conv(x, w, stride, groups)
    np.testing.assert_allclose(onednn_conv_all_grads(x, w, stride, groups), ref, rtol=1e-5, atol=1e-4)
    if groups > 1:  # each output group sees only its input group: zeroing group 0's input leaves group 1's output
        cut = onednn_conv_all_grads(x.at[..., :70].set(0), w, stride, groups)
        np.testing.assert_allclose(cut[..., 3:], ref[..., 3:], rtol=1e-5, atol=1e-4)
        assert float(jnp.abs(cut[..., :3] - ref[..., :3]).max()) > 1.0
    weights = jnp.asarray(rng.normal(size=ref.shape).astype(np.float32))
    got, want = [jax.grad(lambda x, w: jnp.sum(f(x, w, stride, groups) * weights), argnums=(0, 1))(x, w)
                 for f in (jax.jit(onednn_conv_all_grads, static_argnums=(2, 3)), lax_conv)]
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))


def test_xcorr_single_equals_xcorr():
    """The tracker's one-exemplar correlation as two convolutions: `xcorr`'s responses to float
    rounding, for any number of searches and a non-square exemplar; channel mismatch refused."""
    rng = np.random.default_rng(10)
    for bx, (hz, wz) in ((3, (6, 6)), (1, (3, 5)), (5, (4, 2))):
        z = jnp.asarray(rng.normal(size=(1, hz, wz, 7)).astype(np.float32))
        x = jnp.asarray(rng.normal(size=(bx, 12, 11, 7)).astype(np.float32))
        ref = xcorr(z, x, 0.01, precision=jax.lax.Precision.HIGHEST)
        got = jax.jit(xcorr_single, static_argnums=2)(z, x, 0.01)
        assert got.shape == ref.shape == (bx, 13 - hz, 12 - wz, 1)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * float(jnp.abs(ref).max()))
    with pytest.raises(ValueError, match="exemplar has 7 channels, search 6"):
        xcorr_single(jnp.zeros((1, 2, 2, 7)), jnp.zeros((1, 4, 4, 6)))


def test_max_pool_slices_is_nn_max_pool():
    """Strided-slice pooling (the CPU inference path) equals `nn.max_pool` bit for bit, ties and
    odd sizes included, and refuses a map smaller than its window."""
    rng = np.random.default_rng(8)
    for shape in ((2, 11, 10, 5), (1, 123, 123, 4), (3, 4, 7, 2), (1, 3, 3, 1)):
        x = jnp.asarray(rng.integers(-3, 4, shape).astype(np.float32))  # few values: many ties
        ref = nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
        got = jax.jit(max_pool_slices)(x)
        assert got.shape == ref.shape and np.array_equal(got, ref), shape
    x = jnp.asarray(rng.normal(size=(2, 13, 9, 3)).astype(np.float32))
    assert np.array_equal(max_pool_slices(x, 2, 3), nn.max_pool(x, (2, 2), strides=(3, 3), padding="VALID"))
    with pytest.raises(ValueError, match="2 x 5 map is smaller than the 3 x 3 window"):
        max_pool_slices(jnp.zeros((1, 2, 5, 1)))


def test_slice_pool_and_fast_xcorr_change_inference_only(tiny):
    """`slice_pool` gives the plain model's responses exactly (same pooling values), `fast_xcorr`
    to float rounding (pairs and one exemplar against 3 scales); both keep training as it was and
    `reduce_window` out of inference."""
    model, v = tiny
    fast = TinySiamFC(slice_pool=True)
    rng = np.random.default_rng(9)
    z = jnp.asarray(rng.uniform(0, 255, (2, 87, 87, 3)).astype(np.float32))
    x = jnp.asarray(rng.uniform(0, 255, (2, 103, 103, 3)).astype(np.float32))
    assert np.array_equal(jax.jit(fast.apply)(v, z, x)["response"], jax.jit(model.apply)(v, z, x)["response"])
    both = TinySiamFC(slice_pool=True, fast_xcorr=True)
    for zz, xx in ((z, x), (z[:1], jnp.concatenate([x, x[:1] * 0.5]))):  # pairs; one exemplar, 3 searches
        ref = model.apply(v, zz, xx)["response"]
        got = jax.jit(both.apply)(v, zz, xx)["response"]
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * float(jnp.abs(ref).max()))
    convs = [str(jax.make_jaxpr(lambda v: m.apply(v, z[:1], x))(v)).count("conv_general_dilated[") for m in (model, both)]
    assert convs == [5 + 5 + 1, 5 + 5 + 2]  # two backbones, then xcorr's one convolution or xcorr_single's two

    def jaxpr(m, train):
        fn = lambda v: m.apply(v, z, x, train=train, mutable=["batch_stats"])[0]["response"]  # noqa: E731
        return str(jax.make_jaxpr(fn)(v))

    assert jaxpr(fast, False).count("reduce_window_max") == 0
    assert jaxpr(model, False).count("reduce_window_max") == 4  # 2 pools x 2 branches
    assert jaxpr(fast, True) == jaxpr(model, True) == jaxpr(both, True)  # training computes as before


def test_split_group_conv_is_nn_conv_computed_per_group(tiny):
    """The CPU speed layer has nn.Conv's variables and gives its results (forward and gradient)."""
    model, v = tiny
    fast = TinySiamFC(conv=SplitGroupConv)
    z = jnp.asarray(np.random.default_rng(4).uniform(0, 255, (2, 87, 95, 3)).astype(np.float32))
    np.testing.assert_allclose(fast.apply(v, z, z)["response"], model.apply(v, z, z)["response"], rtol=1e-5, atol=1e-6)
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(2, 9, 8, 6)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(3, 3, 2, 9)).astype(np.float32))
    kw = dict(window_strides=(2, 1), padding=((1, 1), (0, 2)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
              feature_group_count=3)
    ref = jax.lax.conv_general_dilated(x, w, **kw)
    np.testing.assert_allclose(split_groups_conv(x, w, **kw), ref, rtol=1e-5, atol=1e-5)
    grad = jax.grad(lambda w: jnp.sum(split_groups_conv(x, w, **kw) ** 2))(w)
    np.testing.assert_allclose(grad, jax.grad(lambda w: jnp.sum(jax.lax.conv_general_dilated(x, w, **kw) ** 2))(w),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["dot", "onednn"])
def test_cpu_speed_layer_keeps_parameters_and_values(tiny, impl):
    """`SiamFC(layers=select(impl), slice_pool=True)` (oneDNN's grouped convolutions or the shared CPU
    convolutions per group, the lean BatchNorm, strided-slice inference pooling): the
    same variable tree, the same responses and, in training, the same loss gradients and running
    statistics as the plain model (float rounding)."""
    from research.cpu import layers as layers_lib
    from research.cpu.kernels import onednn
    if impl == "onednn" and not onednn.available()[0]:
        pytest.skip(f"oneDNN kernels unavailable: {onednn.available()[1]}")
    model, v = tiny
    fast = TinySiamFC(layers=layers_lib.select(impl), slice_pool=True, fast_xcorr=True)  # as task.build_model
    shapes = jax.eval_shape(lambda: init_variables(fast, jax.random.PRNGKey(0), 87, 87))
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(v)
    assert jax.tree_util.tree_map(lambda a: a.shape, shapes) == jax.tree_util.tree_map(lambda a: a.shape, v)
    rng = np.random.default_rng(5)
    z = jnp.asarray(rng.uniform(0, 255, (2, 87, 87, 3)).astype(np.float32))
    x = jnp.asarray(rng.uniform(0, 255, (2, 135, 135, 3)).astype(np.float32))
    ref = model.apply(v, z, x)["response"]
    np.testing.assert_allclose(jax.jit(fast.apply)(v, z, x)["response"], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    labels = jnp.asarray(create_labels(2, 7, 7))

    def loss_and_grads(m):
        def loss_fn(params):
            out, new = m.apply({"params": params, "batch_stats": v["batch_stats"]}, z, x, train=True,
                               mutable=["batch_stats"])
            return balanced_loss(out["response"], labels), new["batch_stats"]
        return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(v["params"])

    (l_ref, s_ref), g_ref = loss_and_grads(model)
    (l_fast, s_fast), g_fast = loss_and_grads(fast)
    assert float(l_fast) == pytest.approx(float(l_ref), rel=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves((g_fast, s_fast)), jax.tree_util.tree_leaves((g_ref, s_ref))):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * float(np.abs(b).max()) + 1e-8)
