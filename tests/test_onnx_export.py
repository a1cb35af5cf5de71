"""ONNX export bridge: a YOLOv5-op-set Flax model end to end, plus one test per plugin.

Each plugin test first reproduces what stock jax2onnx 0.17 does (inside
`onnx_plugins.stock_plugins()`), then checks the bridge's mapping against JAX.
"""

from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from research.bridge import onnx_plugins
from research.bridge.onnx_export import ACCEPT_RTOL, OnnxRunner, check_onnx, export_onnx, to_graph_layout

# --------------------------------------------------------------------------------------
# a small YOLOv5-like model
# --------------------------------------------------------------------------------------

ANCHORS = ((10.0, 13.0, 16.0, 30.0, 33.0, 23.0), (30.0, 61.0, 62.0, 45.0, 59.0, 119.0))
STRIDES = (4, 8)
NC = 2
IMG = 64


class ConvBnSiLU(nn.Module):
    features: int
    k: int = 1
    s: int = 1
    p: int | None = None

    @nn.compact
    def __call__(self, x):
        p = self.k // 2 if self.p is None else self.p
        x = nn.Conv(self.features, (self.k, self.k), strides=(self.s, self.s),
                    padding=((p, p), (p, p)), use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.silu(x)


class TinyYolo(nn.Module):
    upsample: str = "repeat"  # or "resize" (jax.image.resize), "shared" (research.vision.upsample)

    @nn.compact
    def __call__(self, x):
        x = ConvBnSiLU(8, k=6, s=2, p=2, name="stem")(x)          # 32x32
        p2 = ConvBnSiLU(16, k=3, s=2, name="down1")(x)            # 16x16
        p3 = ConvBnSiLU(32, k=3, s=2, name="down2")(p2)           # 8x8
        # SPPF: three chained 5x5 / stride 1 / pad 2 max pools + concat
        y = ConvBnSiLU(16, name="sppf_cv1")(p3)
        y1 = nn.max_pool(y, (5, 5), strides=(1, 1), padding=((2, 2), (2, 2)))
        y2 = nn.max_pool(y1, (5, 5), strides=(1, 1), padding=((2, 2), (2, 2)))
        y3 = nn.max_pool(y2, (5, 5), strides=(1, 1), padding=((2, 2), (2, 2)))
        p3 = ConvBnSiLU(32, name="sppf_cv2")(jnp.concatenate([y, y1, y2, y3], -1))
        # nearest 2x upsample + concat
        if self.upsample == "repeat":
            u = jnp.repeat(jnp.repeat(p3, 2, axis=1), 2, axis=2)
        elif self.upsample == "shared":
            from research.vision.upsample import upsample_nearest
            u = upsample_nearest(p3, 2)
        else:
            b, h, w, c = p3.shape
            u = jax.image.resize(p3, (b, 2 * h, 2 * w, c), "nearest")
        p2 = ConvBnSiLU(16, name="head")(jnp.concatenate([u, p2], -1))
        # detect
        na, no = len(ANCHORS[0]) // 2, NC + 5
        heads, decoded = [], []
        for i, f in enumerate((p2, p3)):
            y = nn.Conv(na * no, (1, 1), use_bias=True, name=f"detect_{i}")(f)
            b, ny, nx, _ = y.shape
            y = y.reshape(b, ny, nx, na, no).transpose(0, 3, 1, 2, 4)  # [B, na, ny, nx, no]
            heads.append(y)
            gx, gy = jnp.meshgrid(jnp.arange(nx, dtype=jnp.float32), jnp.arange(ny, dtype=jnp.float32))
            grid = jnp.stack([gx, gy], -1)[None, None]                 # [1, 1, ny, nx, 2]
            anchor = jnp.asarray(ANCHORS[i], jnp.float32).reshape(1, na, 1, 1, 2)
            s = jax.nn.sigmoid(y)
            xy = (s[..., 0:2] * 2 - 0.5 + grid) * STRIDES[i]
            wh = (s[..., 2:4] * 2) ** 2 * anchor
            decoded.append(jnp.concatenate([xy, wh, s[..., 4:]], -1).reshape(b, -1, no))
        return heads[0], heads[1], jnp.concatenate(decoded, 1)


def _init_variables(model, seed=0, expect_bn=6):
    """Random weights and non-trivial BatchNorm running stats / affine params.

    Drawn with numpy on `jax.eval_shape(model.init)` shapes: `model.init` itself spends
    ~15 s compiling threefry RNG on a 2-core CPU.
    """
    rng = np.random.RandomState(seed)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, IMG, IMG, 3)))

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        n = s.shape
        if name.endswith("['kernel']"):
            return rng.normal(0, 1 / np.sqrt(np.prod(n[:-1])), n).astype(np.float32)
        if name.endswith("['mean']"):
            return (0.5 * rng.normal(size=n)).astype(np.float32)
        if name.endswith("['var']"):
            return rng.uniform(0.3, 2.0, n).astype(np.float32)
        if name.endswith("['scale']"):
            return (1.0 + 0.3 * rng.normal(size=n)).astype(np.float32)
        return (0.3 * rng.normal(size=n)).astype(np.float32)  # BN / conv biases

    variables = jax.tree_util.tree_map_with_path(draw, shapes)
    assert set(variables) == {"params", "batch_stats"} and len(variables["batch_stats"]) == expect_bn
    return variables


def _images(b, seed):
    return np.random.RandomState(seed).rand(b, IMG, IMG, 3).astype(np.float32)


@pytest.fixture(scope="module", params=["repeat", "resize", "shared"])
def exported(request, tmp_path_factory):
    model = TinyYolo(upsample=request.param)
    variables = _init_variables(model)
    apply_fn = functools.partial(model.apply, variables)
    path = str(tmp_path_factory.mktemp("onnx") / f"tiny_yolo_{request.param}.onnx")
    export_onnx(apply_fn, _images(1, 0), path, output_names=["heads_0", "heads_1", "pred"])
    return request.param, apply_fn, path


def test_yolo_like_model_matches_jax_at_batch_1_and_3(exported):
    upsample, apply_fn, path = exported
    runner = OnnxRunner(path)
    assert runner.input_name == "images" and runner.input_shape[0] == "B"
    assert runner.output_names == ["heads_0", "heads_1", "pred"]
    report = check_onnx(apply_fn, path, [_images(1, 1), _images(3, 2)], runner=runner)
    for name, r in report["outputs"].items():
        assert r["max_abs_err"] <= ACCEPT_RTOL * r["max_abs_out"], (upsample, name, r)
        assert r["max_abs_out"] > 0
    assert report["ok"]
    outs = runner(_images(3, 2))
    assert [o.shape for o in outs] == [(3, 3, 16, 16, 7), (3, 3, 8, 8, 7), (3, 3 * (256 + 64), 7)]


def test_export_is_float32_with_embedded_weights(exported):
    upsample, apply_fn, path = exported
    m = onnx.load(path)
    onnx.checker.check_model(m)
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".data")]
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in m.graph.output)
    n_weights = sum(int(np.prod(onnx.numpy_helper.to_array(t).shape)) for t in m.graph.initializer)
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(apply_fn.args[0]["params"]))
    assert n_weights >= n_params * 0.9  # weights live in the file (BN may be folded into Conv)
    ops = {n.op_type for n in m.graph.node}
    assert "MaxPool" in ops and "Conv" in ops
    if upsample == "resize":
        assert "Resize" in ops


# --------------------------------------------------------------------------------------
# helpers for the per-plugin tests
# --------------------------------------------------------------------------------------


def _to_session(fn, spec, **kw):
    from jax2onnx import to_onnx

    model = to_onnx(fn, [spec], **kw)
    return model, ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _run(sess, x):
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _bridge_check(fn, tmp_path, shape=(8, 8, 4), batches=(1, 3), exact=False, name="m.onnx"):
    path = str(tmp_path / name)
    x0 = np.random.RandomState(0).randn(1, *shape).astype(np.float32)
    export_onnx(fn, x0, path)
    xs = [np.random.RandomState(b).randn(b, *shape).astype(np.float32) for b in batches]
    report = check_onnx(fn, path, xs)
    r = report["outputs"]["output"]
    if exact:
        assert r["max_abs_err"] == 0.0, r
    assert report["ok"], r
    return onnx.load(path)


def SPPF_POOL(v):  # looks nn.max_pool up at call time, so conversion-time patches apply
    return nn.max_pool(v, window_shape=(5, 5), strides=(1, 1), padding=((2, 2), (2, 2)))


# --------------------------------------------------------------------------------------
# max_pool / reduce_window
# --------------------------------------------------------------------------------------


def test_stock_linen_max_pool_drops_explicit_padding():
    """Stock jax2onnx: explicit padding becomes str(padding) and is lowered as VALID."""
    x = np.random.RandomState(0).randn(2, 8, 8, 4).astype(np.float32)
    ref = np.asarray(SPPF_POOL(x))
    with onnx_plugins.stock_plugins():
        model, sess = _to_session(SPPF_POOL, ("B", 8, 8, 4))
        got = _run(sess, x)
        # the positional form YOLOv5 code uses is rejected outright
        with pytest.raises(TypeError):
            _to_session(lambda v: nn.max_pool(v, (5, 5), strides=(1, 1), padding=((2, 2), (2, 2))),
                        ("B", 8, 8, 4))
    assert ref.shape == (2, 8, 8, 4)
    assert got.shape == (2, 4, 4, 4)  # silently wrong: a VALID 5x5 pool
    pads = [a for n in model.graph.node if n.op_type == "MaxPool" for a in n.attribute
            if a.name in ("pads", "auto_pad")]
    assert [a.s for a in pads if a.name == "auto_pad"] == [b"VALID"]


def test_bridge_linen_max_pool_explicit_padding(tmp_path):
    m = _bridge_check(lambda v: nn.max_pool(v, (5, 5), strides=(1, 1), padding=((2, 2), (2, 2))),
                      tmp_path, exact=True)
    (mp,) = [n for n in m.graph.node if n.op_type == "MaxPool"]
    attrs = {a.name: list(a.ints) for a in mp.attribute}
    assert attrs["kernel_shape"] == [5, 5] and attrs["pads"] == [2, 2, 2, 2] and attrs["strides"] == [1, 1]
    # other argument forms, incl. stride 2 / asymmetric / string padding
    for fn in (lambda v: nn.max_pool(v, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1))),
               lambda v: nn.max_pool(v, (2, 3), strides=(2, 1), padding=((0, 1), (1, 1))),
               lambda v: nn.max_pool(v, (3, 3), strides=(2, 2), padding="SAME"),
               lambda v: nn.max_pool(v, (2, 2), strides=(2, 2))):
        _bridge_check(fn, tmp_path, shape=(9, 8, 4), exact=True, name="var.onnx")


def test_stock_reduce_window_max_fails_in_onnxruntime():
    """Stock jax2onnx: reduce_window_max -> MaxPool over all 4 axes, rejected by onnxruntime."""
    fn = lambda v: jax.lax.reduce_window(v, -jnp.inf, jax.lax.max, (1, 5, 5, 1), (1, 1, 1, 1),  # noqa: E731
                                         ((0, 0), (2, 2), (2, 2), (0, 0)))
    x = np.random.RandomState(0).randn(2, 8, 8, 4).astype(np.float32)
    with onnx_plugins.stock_plugins():
        model, sess = _to_session(fn, ("B", 8, 8, 4))
    (mp,) = [n for n in model.graph.node if n.op_type == "MaxPool"]
    assert [list(a.ints) for a in mp.attribute if a.name == "kernel_shape"] == [[1, 5, 5, 1]]
    with pytest.raises(Exception, match="(?i)pool"):
        _run(sess, x)


def test_bridge_reduce_window_max_min_and_init_value(tmp_path):
    pads = ((0, 0), (2, 2), (2, 2), (0, 0))
    _bridge_check(lambda v: jax.lax.reduce_window(v, -jnp.inf, jax.lax.max, (1, 5, 5, 1), (1,) * 4, pads),
                  tmp_path, exact=True)
    _bridge_check(lambda v: jax.lax.reduce_window(v, jnp.inf, jax.lax.min, (1, 3, 3, 1), (1, 2, 2, 1),
                                                  ((0, 0), (1, 1), (1, 1), (0, 0))), tmp_path, exact=True)
    # generic reduce_window: a reducer that is not lax.max, and a non-identity init value
    _bridge_check(lambda v: jax.lax.reduce_window(v, -jnp.inf, jnp.maximum, (1, 3, 3, 1), (1,) * 4,
                                                  ((0, 0), (1, 1), (1, 1), (0, 0))), tmp_path, exact=True)
    init0 = lambda v: jax.lax.reduce_window(v, 0.0, jax.lax.max, (1, 5, 5, 1), (1,) * 4, pads)  # noqa: E731
    with onnx_plugins.stock_plugins(), pytest.raises(NotImplementedError, match="identity init"):
        _to_session(init0, ("B", 8, 8, 4))
    _bridge_check(init0, tmp_path, exact=True)


# --------------------------------------------------------------------------------------
# jax.image.resize / nearest upsampling
# --------------------------------------------------------------------------------------


def _resize(shape_hw, method, **kw):
    return lambda v: jax.image.resize(v, (v.shape[0], *shape_hw, v.shape[3]), method, **kw)


def test_stock_resize_fails_with_symbolic_batch_and_antialias():
    from jax._src.export.shape_poly import InconclusiveDimensionOperation

    with onnx_plugins.stock_plugins():
        with pytest.raises(InconclusiveDimensionOperation):
            _to_session(_resize((16, 16), "nearest"), ("B", 8, 8, 4))
        with pytest.raises(NotImplementedError, match="antialias"):
            _to_session(_resize((3, 5), "linear"), (2, 8, 8, 4))  # antialias=True is the default


def test_stock_resize_nearest_downsample_picks_wrong_rows():
    fn = _resize((4, 4), "nearest")
    x = np.random.RandomState(0).randn(2, 8, 8, 4).astype(np.float32)
    with onnx_plugins.stock_plugins():
        _, sess = _to_session(fn, (2, 8, 8, 4))
    got, ref = _run(sess, x), np.asarray(fn(x))
    np.testing.assert_array_equal(ref, x[:, 1::2, 1::2])  # JAX: floor((o + .5) * 2)
    np.testing.assert_array_equal(got, x[:, 0::2, 0::2])  # stock ONNX: round_prefer_floor ties


def test_bridge_nearest_upsample_2x_resize_and_repeat(tmp_path):
    m = _bridge_check(_resize((16, 16), "nearest"), tmp_path, exact=True)
    (rs,) = [n for n in m.graph.node if n.op_type == "Resize"]
    attrs = {a.name: (a.s or list(a.ints)) for a in rs.attribute}
    assert attrs["mode"] == b"nearest"
    assert (attrs["coordinate_transformation_mode"], attrs["nearest_mode"]) == (b"asymmetric", b"floor")
    _bridge_check(lambda v: jnp.repeat(jnp.repeat(v, 2, axis=1), 2, axis=2), tmp_path, exact=True)
    for hw in ((24, 24), (32, 16), (8, 24)):  # factors 3, 4 x 2, 1 x 3: same pixels as JAX
        _bridge_check(_resize(hw, "nearest"), tmp_path, exact=True)


class _FuseBlock(nn.Module):
    """An HRNet fuse step: the high-resolution branch plus the upsampled low-resolution one, then ReLU."""

    @nn.compact
    def __call__(self, x):
        from research.vision.upsample import upsample_nearest
        hi = nn.relu(nn.Conv(32, (3, 3), padding=1, name="hi")(x))
        lo = nn.relu(nn.Conv(32, (3, 3), strides=2, padding=1, name="lo")(x))
        lo = nn.Conv(32, (1, 1), name="lo_proj")(lo)
        y = nn.relu(hi + upsample_nearest(lo, 2))
        return nn.Conv(32, (3, 3), padding=1, name="out")(y) + y


def test_dynamic_batch_graph_keeps_onnxruntime_nchwc_fusions(tmp_path):
    """With a symbolic batch, every intermediate annotation keeps 'B' (onnxruntime's symbolic inference), so
    onnxruntime's NCHWc optimiser proves the Add inputs equal: the Resize runs as its blocked Upsample and the
    adds stay 4-D or fuse into the convolutions. With ONNX's own inference the Resize output got an unknown
    batch ('unk__N'), and each such Add went through two Reshapes to 5-D and one back."""
    x = np.random.RandomState(0).randn(1, 16, 16, 16).astype(np.float32)
    model = _FuseBlock()
    variables = model.init(jax.random.PRNGKey(0), x)
    fn = functools.partial(model.apply, variables)
    path = export_onnx(fn, x, str(tmp_path / "fuse.onnx"))
    m = onnx.load(path)
    batch_dims = {v.name: v.type.tensor_type.shape.dim[0] for v in m.graph.value_info
                  if len(v.type.tensor_type.shape.dim) == 4}
    assert batch_dims and all(d.dim_param == "B" for d in batch_dims.values()), batch_dims
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "fuse.opt.onnx")
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    assert "Upsample" in ops and "Resize" not in ops and "Reshape" not in ops, ops
    assert check_onnx(fn, path, [np.random.RandomState(1).randn(3, 16, 16, 16).astype(np.float32)])["ok"]


def test_bridge_resize_nearest_non_integer_scales(tmp_path):
    for hw in ((4, 4), (5, 11), (3, 8)):
        m = _bridge_check(_resize(hw, "nearest"), tmp_path, exact=True, batches=(1, 2))
        assert "Gather" in {n.op_type for n in m.graph.node}


def test_bridge_resize_antialias(tmp_path):
    for method in ("linear", "cubic"):
        m = _bridge_check(_resize((3, 5), method, antialias=True), tmp_path)
        (rs,) = [n for n in m.graph.node if n.op_type == "Resize"]
        assert {a.name: a.i for a in rs.attribute}["antialias"] == 1
    _bridge_check(_resize((5, 13), "linear", antialias=False), tmp_path, batches=(2,))
    _bridge_check(_resize((16, 12), "cubic", antialias=True), tmp_path, batches=(2,))  # upsampling


def test_bridge_resize_matmul_fallback(tmp_path):
    """Methods/cases onnxruntime's Resize cannot reproduce go through exact per-axis MatMuls."""
    for fn in (_resize((5, 3), "cubic", antialias=False), _resize((5, 13), "lanczos3"),
               _resize((5, 13), "cubic-pytorch", antialias=False)):
        m = _bridge_check(fn, tmp_path, batches=(2,))
        assert "MatMul" in {n.op_type for n in m.graph.node}


# --------------------------------------------------------------------------------------
# export API behaviour
# --------------------------------------------------------------------------------------


def test_atomic_write_keeps_existing_file(tmp_path, monkeypatch):
    path = str(tmp_path / "model.onnx")
    good = lambda v: v * 2.0 + 1.0  # noqa: E731
    x = np.ones((1, 4, 4, 3), np.float32)
    export_onnx(good, x, path)
    before = open(path, "rb").read()

    def broken(v):
        raise RuntimeError("boom while tracing")

    with pytest.raises(RuntimeError, match="boom"):
        export_onnx(broken, x, path)
    assert open(path, "rb").read() == before

    import research.bridge.onnx_export as ox

    def failing_fsync(fd):  # the converter finished, the write itself fails midway
        raise OSError("disk full")

    monkeypatch.setattr(ox.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        export_onnx(lambda v: v * 3.0, x, path)
    monkeypatch.undo()
    assert open(path, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]  # no temp files left behind
    np.testing.assert_allclose(OnnxRunner(path)(x)[0], 3.0)


def test_static_batch_and_pytree_outputs(tmp_path):
    path = str(tmp_path / "tree.onnx")
    fn = lambda v: {"b": v.sum(axis=(1, 2)), "a": [jax.nn.sigmoid(v), v ** 2]}  # noqa: E731
    x = np.random.RandomState(0).randn(2, 4, 4, 3).astype(np.float32)
    export_onnx(fn, x, path, dynamic_batch=False, input_name="x")
    runner = OnnxRunner(path, num_threads=1)
    assert runner.input_name == "x" and runner.input_shape == [2, 4, 4, 3]
    assert runner.output_names == ["a_0", "a_1", "b"]
    report = check_onnx(fn, path, [x])
    assert report["ok"] and set(report["outputs"]) == {"a_0", "a_1", "b"}
    # check_onnx flags a mismatch
    bad = check_onnx(lambda v: {"b": v.sum(axis=(1, 2)) + 1.0, "a": [jax.nn.sigmoid(v), v ** 2]}, path, [x])
    assert not bad["ok"] and not bad["outputs"]["b"]["ok"] and bad["outputs"]["a_0"]["ok"]


def test_channels_first_export_takes_nchw_images_and_the_runner_takes_either(tmp_path):
    model = TinyYolo(upsample="resize")
    apply_fn = functools.partial(model.apply, _init_variables(model))
    nhwc, nchw = str(tmp_path / "nhwc.onnx"), str(tmp_path / "nchw.onnx")
    export_onnx(apply_fn, _images(1, 0), nhwc, output_names=["heads_0", "heads_1", "pred"])
    export_onnx(apply_fn, _images(1, 0), nchw, output_names=["heads_0", "heads_1", "pred"], channels_first=True)
    assert OnnxRunner(nchw).input_shape == ["B", 3, IMG, IMG] and OnnxRunner(nhwc).input_shape == ["B", IMG, IMG, 3]
    g = onnx.load(nchw).graph
    assert [n.op_type for n in g.node if "images" in n.input] == ["Conv"]  # no transpose in front of it
    x = _images(2, 3)
    ref = [np.asarray(a) for a in jax.jit(apply_fn)(x)]
    for feed in (x, x.transpose(0, 3, 1, 2)):  # NHWC arrays are transposed for an NCHW graph, NCHW ones kept
        for r, o in zip(ref, OnnxRunner(nchw)(feed)):
            assert np.abs(r - o).max() <= ACCEPT_RTOL * np.abs(r).max()
    # a 2-D input is not touched; the other inputs of a mapping keep their layout
    two = str(tmp_path / "two.onnx")
    export_onnx(lambda images, sizes: images.mean(axis=(1, 2)) * sizes, {"images": x[:1], "sizes": np.ones((1, 3))},
                two, channels_first=True)
    r = OnnxRunner(two)
    assert r._shapes == {"images": ["B", 3, IMG, IMG], "sizes": ["B", 3]}
    np.testing.assert_allclose(r(images=x, sizes=np.full((2, 3), 2.0))[0], 2 * x.mean(axis=(1, 2)), rtol=1e-5)


def test_to_graph_layout():
    x = np.arange(2 * 5 * 6 * 3, dtype=np.float32).reshape(2, 5, 6, 3)
    np.testing.assert_array_equal(to_graph_layout(x, ["B", 3, 5, 6]), x.transpose(0, 3, 1, 2))
    assert to_graph_layout(x, ["B", 5, 6, 3]) is not None and to_graph_layout(x, ["B", 5, 6, 3]).shape == x.shape
    assert to_graph_layout(x, [None, None, None, None]).shape == x.shape  # fully symbolic: as given
    assert to_graph_layout(x, [2, 3, 6, 5]).shape == x.shape  # fits neither layout: left to ONNX Runtime's error
    assert to_graph_layout(x[0], [3, 5, 6]).shape == (5, 6, 3)


# --------------------------------------------------------------------------------------
# graph quality: BatchNorm folded into the convolutions, one Resize per upsampling
# --------------------------------------------------------------------------------------


def _optimized_ops(path: str) -> dict[str, int]:
    """Op counts of the graph as onnxruntime runs it (its own fusions and transpose optimisation applied)."""
    import collections
    opt = path + ".ort.onnx"
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = opt
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return dict(collections.Counter(n.op_type for n in onnx.load(opt).graph.node))


def test_simplified_graph_folds_batchnorm_and_runs_like_the_official_layout(exported):
    """The default export (onnxslim + `onnx_graph.fold_affine_into_conv`) leaves no BatchNorm (non-trivial
    running statistics: mean, var, scale, bias all drawn) and, once onnxruntime has optimised it, none of the
    NHWC<->NCHW transposes between convolutions: what a torch export of the same network gives."""
    upsample, _, path = exported
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert not ops & {"Sqrt", "BatchNormalization"}, ops
    optimized = _optimized_ops(path)
    assert optimized["Conv"] + optimized.get("FusedConv", 0) == 8
    if upsample == "repeat":  # jnp.repeat's Shape/Gather/Expand chain pins the transposes around it
        assert optimized.get("Transpose", 0) > 5, optimized
    else:  # one Resize: the input layout and the detect heads' reshapes only
        assert optimized.get("Transpose", 0) <= 5, optimized


class CpuLayersNet(nn.Module):
    """Convolutions and BatchNorm+SiLU through the CPU speed layer's plain layers (YOLOv5's modules): BatchNorm
    traces as arithmetic, not as flax's BatchNorm, so jax2onnx writes Sub/Mul/Add after each convolution."""

    @nn.compact
    def __call__(self, x):
        from research.cpu.layers import PLAIN
        for i, (c, s) in enumerate(((8, 2), (16, 1), (16, 2))):
            x = PLAIN.conv(c, 3, stride=s, padding=1, name=f"conv{i}")(x)
            x = PLAIN.norm_act("silu", momentum=0.97, epsilon=1e-3, name=f"bn{i}")(x, False)
        return x


def test_batchnorm_arithmetic_is_folded_into_the_convolutions(tmp_path):
    model = CpuLayersNet()
    variables = _init_variables(model, expect_bn=3)
    fn = functools.partial(model.apply, variables)
    raw = export_onnx(fn, _images(1, 0), str(tmp_path / "raw.onnx"), simplify=False)
    raw_ops = [n.op_type for n in onnx.load(raw).graph.node]
    assert raw_ops.count("Sub") == 3 and "Sqrt" in raw_ops  # BatchNorm arithmetic as traced
    path = export_onnx(fn, _images(1, 0), str(tmp_path / "folded.onnx"))
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert not {"Sub", "Sqrt", "Div", "Add"} & set(ops), ops
    assert ops.count("Mul") == 3 and ops.count("Sigmoid") == 3  # SiLU only
    assert check_onnx(fn, path, [_images(2, 1)])["ok"]
    assert check_onnx(fn, raw, [_images(2, 1)])["ok"]


def test_fold_affine_into_conv_only_where_nothing_else_reads(tmp_path):
    """A per-channel Sub/Mul/Add chain after Conv (+ NCHW->NHWC transpose) becomes the conv's weights; a chain
    whose intermediate has a second reader, or whose constant is not per channel, stays."""
    from onnx import TensorProto, helper, numpy_helper

    from research.bridge.onnx_graph import fold_affine_into_conv
    rs = np.random.RandomState(0)
    w = rs.randn(4, 3, 3, 3).astype(np.float32)
    consts = {"w": w, "b": rs.randn(4).astype(np.float32), "m": rs.randn(1, 1, 1, 4).astype(np.float32),
              "s": rs.rand(1, 1, 1, 4).astype(np.float32) + 0.5, "t": rs.randn(4).astype(np.float32),
              "full": rs.randn(1, 6, 6, 4).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Transpose", ["c"], ["ct"], perm=[0, 2, 3, 1]),
             helper.make_node("Sub", ["ct", "m"], ["c1"]),
             helper.make_node("Mul", ["s", "c1"], ["c2"]),
             helper.make_node("Add", ["c2", "t"], ["y"]),
             # second branch: the Mul's input is also an output -> not folded
             helper.make_node("Conv", ["x", "w"], ["d"], pads=[1, 1, 1, 1]),
             helper.make_node("Transpose", ["d"], ["dt"], perm=[0, 2, 3, 1]),
             helper.make_node("Mul", ["dt", "s"], ["z"]),
             # third branch: a constant that varies over space is not a per-channel affine
             helper.make_node("Conv", ["x", "w"], ["e"], pads=[1, 1, 1, 1]),
             helper.make_node("Transpose", ["e"], ["et"], perm=[0, 2, 3, 1]),
             helper.make_node("Add", ["et", "full"], ["u"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 6, 6])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "dt", "z", "u")],
        [numpy_helper.from_array(v, k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rs.randn(2, 3, 6, 6).astype(np.float32)

    def run(m):
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, {"x": x})

    before = run(model)
    assert fold_affine_into_conv(model) == 3
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Sub") == 0 and ops.count("Mul") == 1 and ops.count("Add") == 1, ops
    for a, b in zip(run(model), before):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("equation, shapes", [
    ("abc,cd->abd", [(2, 5, 6), (6, 7)]),                    # dense layer on [B, N, C] (weight initializer)
    ("bqhd,bkhd->bhqk", [(2, 5, 3, 4), (2, 6, 3, 4)]),       # attention scores
    ("bhqk,bkhd->bqhd", [(2, 3, 5, 6), (2, 6, 3, 4)]),       # attention-weighted values
    ("bhqk,bhqkd->bqhd", [(2, 3, 5, 6), (2, 3, 5, 6, 4)]),   # deformable attention's weighted sum
    ("bij,bj->bi", [(2, 3, 4), (2, 4)]),                     # matrix-vector: right side unsqueezed
    ("ij,jk->ik", [(3, 4), (4, 5)]),                         # plain product, no transpose at all
    ("bk,bkd->bd", [(2, 4), (2, 4, 3)]),                     # vector-matrix: left side unsqueezed
])
def test_einsum_to_matmul_same_values(equation, shapes):
    """Each two-operand Einsum jax2onnx writes becomes MatMul (+ Transpose/Unsqueeze/Squeeze) with the same
    values in ONNX Runtime; the first operand may be a graph input and the second an initializer."""
    from onnx import TensorProto, helper, numpy_helper

    from research.bridge.onnx_graph import einsum_to_matmul
    rs = np.random.RandomState(0)
    a, b = (rs.randn(*s).astype(np.float32) for s in shapes)
    out_shape = np.einsum(equation, a, b).shape
    graph = helper.make_graph(
        [helper.make_node("Einsum", ["a", "b"], ["y"], equation=equation)], "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, list(a.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))], [numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert einsum_to_matmul(model) == 1
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert "Einsum" not in ops and ops.count("MatMul") == 1, ops
    if equation == "ij,jk->ik":
        assert ops == ["MatMul"]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"a": a})[0]
    np.testing.assert_allclose(got, np.einsum(equation, a.astype(np.float64), b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("equation", ["ij,jk,kl->il", "ii->i", "ij,ij->", "abcd,cd->ab", "bij,bjk->bik...",
                                      "ab,cd->abcd", "i,i->i"])
def test_einsum_to_matmul_leaves_other_equations(equation):
    """Equations that are not one matrix product (three operands, traces, two contracted letters, outer products,
    elementwise products, ellipsis) stay Einsum."""
    from onnx import helper

    from research.bridge.onnx_graph import einsum_to_matmul
    n_in = equation.split("->")[0].count(",") + 1
    node = helper.make_node("Einsum", [f"x{i}" for i in range(n_in)], ["y"], equation=equation)
    graph = helper.make_graph([node], "g", [], [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert einsum_to_matmul(model) == 0
    assert [n.op_type for n in model.graph.node] == ["Einsum"]


def test_simplify_failure_keeps_the_converted_graph(tmp_path, monkeypatch):
    import onnxslim

    def broken(*args, **kwargs):
        raise RuntimeError("simulated onnxslim failure")

    monkeypatch.setattr(onnxslim, "slim", broken)
    model = TinyYolo()
    fn = functools.partial(model.apply, _init_variables(model))
    path = export_onnx(fn, _images(1, 0), str(tmp_path / "kept.onnx"))
    assert check_onnx(fn, path, [_images(1, 2)])["ok"]


def test_shared_upsample_nearest_trains_cheaply_and_exports_as_one_resize(tmp_path):
    """`research.vision.upsample.upsample_nearest`: torch's nearest upsampling (each pixel f x f times), its
    gradient the f x f block sums, and in an export one Resize with constant scales (no shape arithmetic)."""
    from research.vision.upsample import upsample_nearest
    x = jnp.asarray(np.random.RandomState(0).randn(2, 5, 7, 3).astype(np.float32))
    for f in (1, 2, 4):
        y = upsample_nearest(x, f)
        np.testing.assert_array_equal(y, jnp.repeat(jnp.repeat(x, f, axis=1), f, axis=2))
    g = jax.grad(lambda v: jnp.sum(upsample_nearest(v, 2) * jnp.arange(10 * 14 * 3.0).reshape(1, 10, 14, 3)))(x)
    ref = jnp.arange(10 * 14 * 3.0).reshape(5, 2, 7, 2, 3).sum(axis=(1, 3))
    np.testing.assert_allclose(g, jnp.broadcast_to(ref, g.shape), rtol=1e-6)
    with pytest.raises(ValueError, match="positive integer"):
        upsample_nearest(x, 1.5)
    fn = lambda v: upsample_nearest(v, 2) + 1.0  # noqa: E731
    path = export_onnx(fn, np.asarray(x[:1]), str(tmp_path / "up.onnx"))
    m = onnx.load(path)
    assert [n.op_type for n in m.graph.node if n.op_type in ("Resize", "Shape", "Gather", "Expand")] == ["Resize"]
    assert check_onnx(fn, path, [np.asarray(x)])["ok"]


@pytest.mark.parametrize("opset, native", [(None, True), (16, False)])
def test_layer_norm_exports_as_one_layernormalization(tmp_path, opset, native):
    """flax LayerNorms over the last axis, two-pass (torch semantics) and fast-variance, export as one
    `LayerNormalization` each from opset 17 (jax2onnx 0.17 wrote the two-pass form as ~20 unfused nodes), or as
    two-pass arithmetic below it; ONNX Runtime gives flax's values either way."""

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            y = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name="two_pass")(x)
            y = nn.Dense(8)(y)
            return nn.LayerNorm(use_fast_variance=True, use_bias=False, name="fast")(y * 3 + 1)

    m = M()
    x = np.random.RandomState(0).randn(2, 5, 8).astype(np.float32) * 4 + 2
    variables = m.init(jax.random.PRNGKey(0), x)
    rs = np.random.RandomState(1)
    variables = jax.tree_util.tree_map(lambda a: a + 0.3 * rs.randn(*a.shape).astype(np.float32), variables)
    path = export_onnx(lambda x: m.apply(variables, x), x, str(tmp_path / "ln.onnx"), opset=opset)
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert ops.count("LayerNormalization") == (2 if native else 0), ops
    if native:
        assert "ReduceSum" not in ops and "ReduceSumSquare" not in ops and "Sqrt" not in ops, ops
    got = OnnxRunner(path)(images=np.concatenate([x, x[:1] * 2]))[0]
    ref = m.apply(variables, np.concatenate([x, x[:1] * 2]))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-5 * float(np.abs(ref).max()))


def test_fast_optimizer_lookups_give_the_original_answers_and_graph(tmp_path):
    """The bridge's producer / consumer lookups in jax2onnx's graph optimiser (which made exporting W32 take 6 min:
    a full node-id set rebuilt per lookup) answer as the originals on every value of a graph, and an export with
    the originals restored is byte-identical."""
    import importlib

    import onnx_ir as ir

    from research.bridge import onnx_plugins as P
    ogu = importlib.import_module("jax2onnx.converter.optimizer_graph_utils")
    assert all(getattr(importlib.import_module(m), "_producer_node") is P._producer_node
               for m in P._GRAPH_UTIL_MODULES)
    x = np.random.RandomState(0).randn(1, 16, 16, 16).astype(np.float32)
    model = _FuseBlock()
    fn = functools.partial(model.apply, model.init(jax.random.PRNGKey(0), x))
    (tmp_path / "fast").mkdir()
    (tmp_path / "slow").mkdir()
    fast = export_onnx(fn, x, str(tmp_path / "fast" / "fuse.onnx"))
    graph = ir.load(fast).graph
    nodes = list(graph)
    values = [v for n in nodes for v in (*n.inputs, *n.outputs) if v is not None]
    assert len(values) > 20
    for v in values:
        assert P._producer_node(nodes, v) is P._ORIGINAL_LOOKUPS["_producer_node"](nodes, v)
        assert P._consumer_nodes(nodes, v) == P._ORIGINAL_LOOKUPS["_consumer_nodes"](nodes, v)
    saved = {m: {k: getattr(importlib.import_module(m), k) for k in P._ORIGINAL_LOOKUPS
                 if hasattr(importlib.import_module(m), k)} for m in P._GRAPH_UTIL_MODULES}
    try:
        for m, fs in saved.items():
            for k in fs:
                setattr(importlib.import_module(m), k, P._ORIGINAL_LOOKUPS[k])
        assert ogu._producer_node is P._ORIGINAL_LOOKUPS["_producer_node"]
        slow = export_onnx(fn, x, str(tmp_path / "slow" / "fuse.onnx"))
    finally:
        for m, fs in saved.items():
            for k, f in fs.items():
                setattr(importlib.import_module(m), k, f)
    assert onnx.load(fast).graph.SerializeToString() == onnx.load(slow).graph.SerializeToString()
