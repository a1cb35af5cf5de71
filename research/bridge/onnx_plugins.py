"""jax2onnx plugins that fix the export gaps a YOLOv5-style Flax model runs into.

jax2onnx (0.17.x) keys its lowerings by JAX primitive name in
`jax2onnx.plugins.plugin_system.PLUGIN_REGISTRY`; some plugins also monkey-patch a
framework function during tracing so that it emits a custom primitive. This module loads
the stock plugin tree first and then *replaces* the faulty registry entries with the
plugins below, so models stay untouched and the fixes live in the bridge.

Replaced entries (each plugin's docstring says what the stock one did wrong):

* ``linen.max_pool``       -> `LinenMaxPoolPlugin`  (explicit padding was dropped silently)
* ``reduce_window_max``    -> `ReduceWindowMaxPlugin`  (N-d MaxPool over every axis)
* ``reduce_window_min``    -> `ReduceWindowMinPlugin`  (same defect as max)
* ``reduce_window``        -> `ReduceWindowPlugin`  (max/min: init value and N-d pooling)
* ``jax.image.resize``     -> `ImageResizePlugin`  (symbolic batch, antialias, nearest ties)
* ``linen.layer_norm``     -> `LinenLayerNormPlugin`  (two-pass LayerNorms written as ~20 unfused nodes)

Everything else a YOLOv5 needs (conv with explicit symmetric padding and stride 2,
BatchNorm inference, SiLU, concat, reshape/transpose with a symbolic batch, sigmoid,
power, broadcast arithmetic with constant grids, `jnp.repeat` upsampling, meshgrid/arange
constants) converts correctly with the stock plugins; `tests/test_onnx_export.py` checks it.

`install()` (idempotent; run at import of `research.bridge.onnx_export`) puts these
plugins into the registry. `stock_plugins()` temporarily puts the original jax2onnx
entries back, which the tests use to reproduce the stock behaviour.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import onnx_ir as ir
from jax import lax

from jax2onnx._compat.jax import Primitive, ShapedArray
from jax2onnx.converter.ir_builder import _dtype_to_ir
from jax2onnx.plugins._ir_shapes import _ensure_value_metadata, _stamp_type_and_shape
from jax2onnx.plugins._patching import MonkeyPatchSpec
from jax2onnx.plugins.jax.lax._index_utils import _const_i64
from jax2onnx.plugins.plugin_system import (
    PLUGIN_REGISTRY,
    PrimitiveLeafPlugin,
    import_all_plugins,
)


# Plugin subtrees not needed for Flax/JAX image models. jax2onnx's equinox plugins build
# example modules at import time (~18 s of eager JAX on a 2-core CPU) and `examples` only
# registers demo models. Set RESEARCH_ONNX_ALL_PLUGINS=1 to load everything anyway.
_SKIPPED_PLUGIN_TREES = ("equinox", "examples")


def _import_stock_plugins() -> None:
    """Imports (and so registers) jax2onnx's plugin tree.

    This must happen *before* our entries go in: jax2onnx imports its tree lazily at the
    first conversion and that import would overwrite them. `import_all_plugins` is marked
    done afterwards so the skipped subtrees are not pulled in later either.
    """
    import importlib
    import os
    from pathlib import Path

    from jax2onnx.plugins import plugin_system as ps

    if os.environ.get("RESEARCH_ONNX_ALL_PLUGINS", "0") not in ("", "0") or not hasattr(
            ps, "_already_imported_plugins") or not hasattr(ps, "_import_tree"):
        import_all_plugins()
        return
    if ps._already_imported_plugins:
        return
    root = Path(ps.__file__).parent
    for child in sorted(root.iterdir()):
        if child.is_dir() and not child.name.startswith("_") and child.name not in _SKIPPED_PLUGIN_TREES:
            ps._import_tree(child, f"jax2onnx.plugins.{child.name}")
        elif child.suffix == ".py" and child.name not in ("__init__.py", "plugin_system.py"):
            importlib.import_module(f"jax2onnx.plugins.{child.stem}")
    ps._already_imported_plugins = True


_import_stock_plugins()

from jax2onnx.plugins.jax.lax import reduce_window as _stock_reduce_window  # noqa: E402

__all__ = [
    "ImageResizePlugin",
    "LinenMaxPoolPlugin",
    "ReduceWindowMaxPlugin",
    "ReduceWindowMinPlugin",
    "ReduceWindowPlugin",
    "install",
    "installed",
    "stock_plugins",
    "PLUGINS",
]

_FLOAT_DTYPES = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)}
if hasattr(jnp, "bfloat16"):
    _FLOAT_DTYPES.add(np.dtype(jnp.bfloat16))


# --------------------------------------------------------------------------------------
# small IR helpers
# --------------------------------------------------------------------------------------


def _aval_shape(var: Any) -> tuple:
    return tuple(getattr(getattr(var, "aval", None), "shape", ()))


def _aval_dtype(var: Any) -> np.dtype:
    return np.dtype(getattr(getattr(var, "aval", None), "dtype"))


def _ir_dtype(ctx: Any, np_dtype: np.dtype) -> ir.DataType:
    return _dtype_to_ir(np_dtype, ctx.builder.enable_double_precision)


def _emit(ctx: Any, op: str, inputs: Sequence[Any], dims: Sequence[Any], dtype: ir.DataType,
          name: str, **attrs: Any) -> ir.Value:
    """Adds one node, stamps dtype and (possibly symbolic) shape on its output."""
    out = getattr(ctx.builder, op)(*inputs, _outputs=[name], **attrs)
    out.type = ir.TensorType(dtype)
    _stamp_type_and_shape(out, tuple(dims))
    _ensure_value_metadata(ctx, out)
    return out


def _finalize(ctx: Any, result: ir.Value, x_val: ir.Value, dims: Sequence[Any], dtype: ir.DataType,
              name: str) -> ir.Value:
    """Names the lowering's last value as the eqn output (an Identity only if it is the input)."""
    if result is x_val:
        return _emit(ctx, "Identity", [x_val], dims, dtype, name)
    result.name = name
    return result


def _float_const(ctx: Any, value: Any, np_dtype: np.dtype, hint: str) -> ir.Value:
    if not ctx.builder.enable_double_precision and np_dtype == np.float64:
        np_dtype = np.dtype(np.float32)
    return ctx.builder.add_initializer_from_array(
        name=ctx.fresh_name(hint), array=np.asarray(value, dtype=np_dtype))


def _int_tuple(v: Any, n: int, default: int) -> tuple[int, ...]:
    return tuple(int(x) for x in v) if v is not None else (default,) * n


def _same_dim(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # symbolic dims that cannot be compared
        return False


# --------------------------------------------------------------------------------------
# pooling: reduce_window max / min
# --------------------------------------------------------------------------------------


def _lower_window_extremum(ctx: Any, eqn: Any, *, reducer: str, init_var: Any = None,
                           init_literal: np.ndarray | None = None) -> None:
    """Lowers a max/min reduce_window to MaxPool over only the windowed axes.

    Axes whose window is trivial (size 1, stride 1, no padding, no dilation: the batch and
    channel axes of an NHWC pool) are moved in front as ONNX's N and C (with Unsqueeze when
    there are fewer than two), the windowed axes (at most 3, what onnxruntime's MaxPool
    supports) become the spatial axes, and lax's explicit (lo, hi) padding becomes MaxPool
    `pads` (padded cells never win a MaxPool, the same as lax padding with the identity
    -inf). `min` is `-MaxPool(-x)`. A non-identity init value `c` of a generic reduce_window
    (lax pads with `c` and folds it into every window) is applied as `Max(pool, c)` /
    `Min(pool, c)` afterwards.
    """
    params = dict(getattr(eqn, "params", {}) or {})
    window = tuple(int(v) for v in params["window_dimensions"])
    rank = len(window)
    strides = _int_tuple(params.get("window_strides"), rank, 1)
    base_dil = _int_tuple(params.get("base_dilation"), rank, 1)
    win_dil = _int_tuple(params.get("window_dilation"), rank, 1)
    padding = params.get("padding", ((0, 0),) * rank)
    if isinstance(padding, str):  # lax has already resolved string padding in the eqn
        raise ValueError(f"reduce_window: unresolved padding {padding!r}")
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    if any(d != 1 for d in base_dil):
        raise NotImplementedError("reduce_window max/min with base_dilation != 1")
    if any(lo < 0 or hi < 0 for lo, hi in pads):
        raise NotImplementedError(f"reduce_window max/min with negative padding {pads}")

    x_var, out_var = eqn.invars[0], eqn.outvars[0]
    np_dtype = _aval_dtype(x_var)
    if np_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"reduce_window {reducer}: floating operands only, got {np_dtype}")
    dt = _ir_dtype(ctx, np_dtype)
    in_shape, out_shape = _aval_shape(x_var), _aval_shape(out_var)

    active = [i for i in range(rank)
              if not (window[i] == 1 and strides[i] == 1 and pads[i] == (0, 0) and win_dil[i] == 1)]
    trivial = [i for i in range(rank) if i not in active]
    if len(active) > 3:
        raise NotImplementedError(f"reduce_window {reducer} over {len(active)} axes (MaxPool: <= 3)")
    if len(trivial) > 2:
        raise NotImplementedError(
            f"reduce_window {reducer} with {len(trivial)} un-windowed axes (supported: <= 2)")

    x_val = ctx.get_value_for_var(x_var, name_hint=ctx.fresh_name("rw_in"))
    out_spec = ctx.get_value_for_var(out_var, name_hint=ctx.fresh_name("rw_out"))
    final_name = getattr(out_spec, "name", None) or ctx.fresh_name("reduce_window")

    if not active:  # every window is trivial: identity (plus init)
        result = x_val
    else:
        perm = trivial + active
        cur = x_val
        cur_dims = [in_shape[i] for i in perm]
        if perm != list(range(rank)):
            cur = _emit(ctx, "Transpose", [cur], cur_dims, dt, ctx.fresh_name("rw_t"), perm=perm)
        n_lead = 2 - len(trivial)
        if n_lead:
            axes = _const_i64(ctx, np.arange(n_lead, dtype=np.int64), "rw_unsq_axes")
            cur_dims = [1] * n_lead + cur_dims
            cur = _emit(ctx, "Unsqueeze", [cur, axes], cur_dims, dt, ctx.fresh_name("rw_unsq"))
        if reducer == "min":
            cur = _emit(ctx, "Neg", [cur], cur_dims, dt, ctx.fresh_name("rw_neg"))
        pooled_dims = [1] * n_lead + [out_shape[i] for i in perm]
        attrs: dict[str, Any] = dict(
            kernel_shape=[window[i] for i in active],
            strides=[strides[i] for i in active],
            pads=[pads[i][0] for i in active] + [pads[i][1] for i in active],
        )
        if any(win_dil[i] != 1 for i in active):
            attrs["dilations"] = [win_dil[i] for i in active]
        cur = _emit(ctx, "MaxPool", [cur], pooled_dims, dt, ctx.fresh_name("rw_maxpool"), **attrs)
        if reducer == "min":
            cur = _emit(ctx, "Neg", [cur], pooled_dims, dt, ctx.fresh_name("rw_neg"))
        if n_lead:
            axes = _const_i64(ctx, np.arange(n_lead, dtype=np.int64), "rw_sq_axes")
            pooled_dims = pooled_dims[n_lead:]
            cur = _emit(ctx, "Squeeze", [cur, axes], pooled_dims, dt, ctx.fresh_name("rw_sq"))
        if perm != list(range(rank)):
            inv = [perm.index(i) for i in range(rank)]
            cur = _emit(ctx, "Transpose", [cur], out_shape, dt, ctx.fresh_name("rw_tb"), perm=inv)
        result = cur

    clamp = None
    if init_literal is not None:
        c = np.asarray(init_literal).item()
        identity = np.isneginf(c) if reducer == "max" else np.isposinf(c)
        if not identity:
            clamp = _float_const(ctx, c, np_dtype, "rw_init")
    elif init_var is not None:
        clamp = ctx.get_value_for_var(init_var, name_hint=ctx.fresh_name("rw_init"))
    if clamp is not None:
        result = _emit(ctx, "Max" if reducer == "max" else "Min", [result, clamp], out_shape, dt,
                       ctx.fresh_name("rw_init_clamp"))
    ctx.bind_value_for_var(out_var, _finalize(ctx, result, x_val, out_shape, dt, final_name))


class _LoweringOnly(PrimitiveLeafPlugin):
    """A plugin for a JAX primitive that needs no tracing-time patch."""

    def lower(self, ctx: Any, eqn: Any) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class ReduceWindowMaxPlugin(_LoweringOnly):
    """`lax.reduce_window_max_p` -> MaxPool over the windowed axes only.

    What jax2onnx 0.17 did: it unsqueezed the operand to [1, 1, *shape] and emitted a MaxPool
    whose kernel spans *every* operand axis (kernel (1, 5, 5, 1) for an NHWC pool), i.e. a
    4-d spatial MaxPool, which onnxruntime rejects at run time ("Unsupported pooling size").
    This is the primitive that `flax.linen.max_pool`, `jax.lax.reduce_window(x, -inf,
    lax.max, ...)` and YOLOv5's SPPF produce. The mapping (see `_lower_window_extremum`)
    transposes NHWC -> NCHW, pools H, W with `pads` = the explicit lax padding and
    transposes back.
    """

    def lower(self, ctx: Any, eqn: Any) -> None:
        _lower_window_extremum(ctx, eqn, reducer="max")


class ReduceWindowMinPlugin(_LoweringOnly):
    """`lax.reduce_window_min_p` -> -MaxPool(-x) over the windowed axes only.

    jax2onnx 0.17 had the same all-axes MaxPool defect as for `reduce_window_max`.
    """

    def lower(self, ctx: Any, eqn: Any) -> None:
        _lower_window_extremum(ctx, eqn, reducer="min")


class ReduceWindowPlugin(_LoweringOnly):
    """Generic `lax.reduce_window_p` (a reducer jaxpr plus an init operand).

    JAX emits it instead of `reduce_window_max_p` when the init value is not the identity
    (e.g. `reduce_window(x, 0., lax.max, ...)`, which clamps at 0 and pads with 0) or the
    reducer is not literally `lax.max` (e.g. `jnp.maximum`). jax2onnx 0.17 raised
    NotImplementedError for any non-identity init and, for identity inits, emitted the
    same all-axes MaxPool that onnxruntime rejects. Here max/min reducers go through
    `_lower_window_extremum`, which folds the init in as `Max(pool, init)` (exactly lax's
    semantics: padding cells hold `init` and `init` joins every window); `add` keeps the
    stock lowering.
    """

    def lower(self, ctx: Any, eqn: Any) -> None:
        params = dict(getattr(eqn, "params", {}) or {})
        reducer = _stock_reduce_window._extract_reducer_primitive_name(params.get("jaxpr"))
        if reducer not in ("max", "min") or tuple(params.get("consts", ()) or ()):
            return _STOCK["reduce_window"].lower(ctx, eqn)
        lit = _stock_reduce_window._extract_scalar_literal(eqn.invars[1])
        if lit is not None:
            _lower_window_extremum(ctx, eqn, reducer=reducer, init_literal=lit)
        else:
            _lower_window_extremum(ctx, eqn, reducer=reducer, init_var=eqn.invars[1])


def _lax_max_pool(inputs: Any, window_shape: Sequence[int], strides: Sequence[int] | None = None,
                  padding: Any = "VALID") -> Any:
    """`flax.linen.max_pool` semantics, written straight onto `lax.reduce_window`."""
    window_shape = tuple(int(w) for w in window_shape)
    n = len(window_shape)
    strides = tuple(int(s) for s in strides) if strides else (1,) * n
    if len(strides) != n:
        raise ValueError(f"len({window_shape}) must equal len({strides})")
    nbatch = inputs.ndim - (n + 1)
    single = nbatch == 0
    if single:
        inputs, nbatch = inputs[None], 1
    dims = (1,) * nbatch + window_shape + (1,)
    strd = (1,) * nbatch + strides + (1,)
    if not isinstance(padding, str):
        padding = tuple(tuple(int(v) for v in p) for p in padding)
        if len(padding) != n or any(len(p) != 2 for p in padding):
            raise ValueError(f"padding {padding} must be {n} (low, high) pairs")
        padding = ((0, 0),) * nbatch + padding + ((0, 0),)
    y = lax.reduce_window(inputs, -jnp.inf, lax.max, dims, strd, padding)
    return y[0] if single else y


class LinenMaxPoolPlugin(_LoweringOnly):
    """`flax.linen.max_pool`: trace it as plain `lax.reduce_window` max.

    What jax2onnx 0.17 did: it patched `flax.linen.max_pool` with a keyword-only shim that
    binds a custom `linen.max_pool` primitive carrying `padding=str(padding)` and lowers it
    with `auto_pad = "SAME_UPPER" if padding == "SAME" else "VALID"`. Explicit padding such
    as YOLOv5 SPPF's ((2, 2), (2, 2)) (window 5, stride 1, pad value -inf) became the
    string "((2, 2), (2, 2))" and was treated as VALID: the pool silently shrank H, W by 4
    (8x8 -> 4x4) with no error when the pool is an output, and a shape error surfaced only
    if a later op (SPPF's concat) happened to need the original size. The shim also
    rejected the positional call `nn.max_pool(x, (5, 5), ...)` with a TypeError. The init
    value was not the problem (-inf is MaxPool's own padding semantics).

    The mapping: the patch replaces the shim by flax's own semantics on
    `lax.reduce_window(x, -inf, lax.max, ...)` (all argument forms, string or explicit
    padding), which traces to `reduce_window_max` with concrete (lo, hi) pairs and lowers
    via `ReduceWindowMaxPlugin` to Transpose -> MaxPool(pads=...) -> Transpose.
    """

    @classmethod
    def binding_specs(cls) -> list:
        return [
            MonkeyPatchSpec(target="flax.linen.pooling", attr="max_pool",
                            make_value=lambda orig: _lax_max_pool, delete_if_missing=False),
            MonkeyPatchSpec(target="flax.linen", attr="max_pool",
                            make_value=lambda orig: _lax_max_pool, delete_if_missing=False),
        ]

    def lower(self, ctx: Any, eqn: Any) -> None:  # never bound while this plugin is active
        raise NotImplementedError("linen.max_pool is traced as lax.reduce_window by the bridge")


# --------------------------------------------------------------------------------------
# jax.image.resize
# --------------------------------------------------------------------------------------

try:  # the unpatched implementation (jax.image.resize is the attribute jax2onnx patches)
    from jax._src.image.scale import resize as _jax_resize
except Exception:  # pragma: no cover
    _jax_resize = jax.image.resize

_RESIZE_PRIM = Primitive("jax.image.resize")  # same name as the stock primitive
_RESIZE_PRIM.multiple_results = False

_METHOD_ALIASES = {
    "bilinear": "linear", "trilinear": "linear", "triangle": "linear",
    "bicubic": "cubic", "tricubic": "cubic", "cubic-pytorch": "cubic_pytorch",
    "bicubic-pytorch": "cubic_pytorch", "bicubic_pytorch": "cubic_pytorch",
}


def _canonical_method(method: Any) -> str:
    if isinstance(method, jax.image.ResizeMethod):
        method = method.name
    m = str(method).lower()
    return _METHOD_ALIASES.get(m, _METHOD_ALIASES.get(m.replace("_", "-"), m))


def _jax_method(method: str) -> str:
    return "cubic-pytorch" if method == "cubic_pytorch" else method


def _resize_abstract_eval(image: Any, *, shape: tuple, method: str, antialias: bool,
                          precision: Any) -> ShapedArray:
    dtype = np.dtype(image.dtype)
    if method != "nearest" and not np.issubdtype(dtype, np.inexact):
        dtype = np.dtype(np.float32)
    return ShapedArray(tuple(shape), dtype)


def _resize_impl(image: Any, *, shape: tuple, method: str, antialias: bool, precision: Any) -> Any:
    return _jax_resize(image, shape, _jax_method(method), antialias=antialias, precision=precision)


def _resize_batch(args: Any, dims: Any, *, shape: tuple, method: str, antialias: bool,
                  precision: Any) -> tuple:
    (x,), (bd,) = args, dims
    x = jnp.moveaxis(x, bd, 0)
    out = _RESIZE_PRIM.bind(x, shape=(x.shape[0],) + tuple(shape), method=method,
                            antialias=antialias, precision=precision)
    return out, 0


_RESIZE_PRIM.def_abstract_eval(_resize_abstract_eval)
_RESIZE_PRIM.def_impl(_resize_impl)
try:
    from jax.interpreters import batching as _batching

    _batching.primitive_batchers[_RESIZE_PRIM] = _resize_batch
except Exception:  # pragma: no cover
    pass


def _patched_resize(image: Any, shape: Sequence[Any], method: Any,
                    antialias: bool = True, precision: Any = lax.Precision.HIGHEST) -> Any:
    return _RESIZE_PRIM.bind(image, shape=tuple(shape), method=_canonical_method(method),
                             antialias=bool(antialias), precision=precision)


def _nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """JAX's nearest source indices: floor((o + 0.5) * in / out), computed in float32."""
    offsets = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * np.float32(n_in) / np.float32(n_out)
    return np.floor(offsets.astype(np.float32)).astype(np.int64)


def _resize_weight_matrix(n_in: int, n_out: int, method: str, antialias: bool,
                          np_dtype: np.dtype) -> np.ndarray:
    """[n_in, n_out] matrix W with resize_1d(v) == v @ W, taken from JAX itself.

    Every non-nearest JAX resize is separable and linear per axis, so resizing the identity
    basis along one axis gives the exact per-axis operator (edge padding of cubic_pytorch,
    kernel widening of antialias included).
    """
    eye = np.eye(n_in, dtype=np.float64 if np_dtype == np.float64 else np.float32)
    w = _jax_resize(eye, (n_in, n_out), _jax_method(method), antialias=antialias,
                    precision=lax.Precision.HIGHEST)
    return np.asarray(w, dtype=np_dtype)


class ImageResizePlugin(PrimitiveLeafPlugin):
    """`jax.image.resize` -> ONNX Resize (one-to-one) or per-axis Gather / MatMul (one-to-many).

    What jax2onnx 0.17 did wrong:
      * its abstract eval ran `int()` on every target dim, so any resize under a symbolic
        batch ('B') failed at trace time (InconclusiveDimensionOperation), and it emitted
        Resize with a static full-rank `sizes`;
      * `antialias=True` (jax.image.resize's *default*) raised NotImplementedError for
        linear/cubic;
      * nearest used `half_pixel` + `round_prefer_floor`, which is silently wrong whenever
        the source coordinate is a tie, e.g. a 2x nearest downsample: JAX takes
        floor((o + 0.5) * in / out) = rows 1, 3, 5, ..., ONNX took rows 0, 2, 4, ...

    The mapping (Resize needs opset >= 13, >= 18 with antialias, else the fallbacks below;
    full-rank `sizes`, computed from Shape(x) when the batch is symbolic; un-resized axes
    keep scale 1):
      * nearest, integer upsampling factor on every resized axis (YOLOv5's 2x): Resize
        mode=nearest, asymmetric, floor, full-rank constant `scales` (exact for integer factors, and
        the form onnxruntime's NCHWc optimiser turns into its blocked Upsample);
        any other nearest: one Gather per axis with JAX's own float32 indices;
      * linear (with or without antialias): Resize mode=linear, half_pixel,
        antialias=aa, exclude_outside=aa (JAX renormalises weights at the border);
      * cubic (Keys a=-0.5) on a rank-4 NHWC tensor resizing H/W, when onnxruntime's CPU
        kernel accepts it (antialias, or pure upsampling): Resize mode=cubic,
        exclude_outside=1, antialias=aa;
      * every other case (cubic downsampling without antialias, cubic_pytorch, lanczos3/5,
        other ranks): per resized axis, MatMul with the exact [in, out] weight matrix that
        JAX's resize applies (from resizing the identity basis), between Transposes.
    """

    _PRIM = _RESIZE_PRIM

    @classmethod
    def binding_specs(cls) -> list:
        return [MonkeyPatchSpec(target="jax.image", attr="resize",
                                make_value=lambda orig: _patched_resize, delete_if_missing=False)]

    @classmethod
    def ensure_abstract_eval_bound(cls) -> None:  # bound at import
        return None

    def lower(self, ctx: Any, eqn: Any) -> None:
        params = dict(eqn.params)
        method = params["method"]
        antialias = bool(params["antialias"])
        x_var, out_var = eqn.invars[0], eqn.outvars[0]
        in_shape, out_shape = _aval_shape(x_var), tuple(params["shape"])
        rank = len(in_shape)
        if len(out_shape) != rank:
            raise ValueError(f"resize: target rank {len(out_shape)} != input rank {rank}")
        in_dtype, out_dtype = _aval_dtype(x_var), _aval_dtype(out_var)
        axes = [i for i in range(rank) if not _same_dim(in_shape[i], out_shape[i])]
        for i in axes:
            if not isinstance(in_shape[i], (int, np.integer)) or not isinstance(out_shape[i], (int, np.integer)):
                raise NotImplementedError(f"resize: resized axis {i} must be static, got "
                                          f"{in_shape[i]} -> {out_shape[i]}")
        opset = int(getattr(ctx.builder, "opset", 23))
        dt = _ir_dtype(ctx, out_dtype)
        x_val = ctx.get_value_for_var(x_var, name_hint=ctx.fresh_name("resize_in"))
        out_spec = ctx.get_value_for_var(out_var, name_hint=ctx.fresh_name("resize_out"))
        final_name = getattr(out_spec, "name", None) or ctx.fresh_name("resize")

        if in_dtype != out_dtype:  # integer image with an interpolating method
            x_val = _emit(ctx, "Cast", [x_val], in_shape, dt, ctx.fresh_name("resize_cast"), to=int(dt.value))
        if not axes:
            result = x_val
        elif method == "nearest":
            result = self._nearest(ctx, x_val, in_shape, out_shape, axes, dt, opset)
        elif method not in ("linear", "cubic", "cubic_pytorch", "lanczos3", "lanczos5"):
            raise NotImplementedError(f"resize method {method!r}")
        else:
            downs = any(out_shape[i] < in_shape[i] for i in axes)
            native = opset >= (18 if antialias and downs else 13) and (
                method == "linear"
                or (method == "cubic" and rank == 4 and set(axes) <= {1, 2} and (antialias or not downs)))
            if native:
                aa = int(antialias and downs)
                attrs: dict[str, Any] = dict(mode=method, coordinate_transformation_mode="half_pixel",
                                             antialias=aa, exclude_outside=aa)
                if method == "cubic":
                    attrs.update(cubic_coeff_a=-0.5, exclude_outside=1)
                result = self._resize_node(ctx, x_val, in_shape, out_shape, axes, dt, **attrs)
            else:
                result = self._matmul(ctx, x_val, in_shape, out_shape, axes, dt, method, antialias,
                                      np.dtype(np.float64) if dt == ir.DataType.DOUBLE else out_dtype)
        ctx.bind_value_for_var(out_var, _finalize(ctx, result, x_val, out_shape, dt, final_name))

    # -- pieces ----------------------------------------------------------------------
    @staticmethod
    def _resize_node(ctx: Any, x_val: ir.Value, in_shape: tuple, out_shape: tuple, axes: list[int],
                     dt: ir.DataType, **attrs: Any) -> ir.Value:
        """Resize with a full-rank `sizes` input.

        Not the opset-18 `axes` attribute: onnxruntime's transpose optimiser, when it pushes
        the Conv layout Transposes through a Resize, permutes `sizes` with the 4-d perm and
        breaks a 2-element `sizes` ("Number of elements of input 'sizes' (0) does not match
        the number of axes (2)"). Integer upsampling factors on every resized axis go in as constant
        full-rank `scales` (exact: output size = input size x factor), which the optimiser permutes at load
        time; otherwise, with a symbolic batch, `sizes` is built at run time as Shape(x) * keep + target
        (and the optimiser adds a Gather per Resize to permute it).
        """
        rank = len(in_shape)
        empty = np.asarray([], dtype=np.float32)
        roi = ctx.builder.add_initializer_from_array(name=ctx.fresh_name("resize_roi"), array=empty)
        if all(int(out_shape[i]) >= int(in_shape[i]) and int(out_shape[i]) % int(in_shape[i]) == 0 for i in axes):
            factors = np.asarray([float(int(out_shape[i]) // int(in_shape[i])) if i in axes else 1.0
                                  for i in range(rank)], np.float32)
            scales = ctx.builder.add_initializer_from_array(name=ctx.fresh_name("resize_scales"), array=factors)
            return _emit(ctx, "Resize", [x_val, roi, scales], out_shape, dt, ctx.fresh_name("resize"), **attrs)
        scales = ctx.builder.add_initializer_from_array(name=ctx.fresh_name("resize_scales"), array=empty)
        if all(isinstance(d, (int, np.integer)) for d in out_shape):
            sizes = _const_i64(ctx, np.asarray(out_shape, np.int64), "resize_sizes")
        else:
            keep = np.asarray([0 if i in axes else 1 for i in range(rank)], np.int64)
            target = np.asarray([int(out_shape[i]) if i in axes else 0 for i in range(rank)], np.int64)
            shp = _emit(ctx, "Shape", [x_val], [rank], ir.DataType.INT64, ctx.fresh_name("resize_shape"))
            kept = _emit(ctx, "Mul", [shp, _const_i64(ctx, keep, "resize_keep")], [rank],
                         ir.DataType.INT64, ctx.fresh_name("resize_kept"))
            sizes = _emit(ctx, "Add", [kept, _const_i64(ctx, target, "resize_target")], [rank],
                          ir.DataType.INT64, ctx.fresh_name("resize_sizes"))
        return _emit(ctx, "Resize", [x_val, roi, scales, sizes], out_shape, dt,
                     ctx.fresh_name("resize"), **attrs)

    def _nearest(self, ctx: Any, x_val: ir.Value, in_shape: tuple, out_shape: tuple, axes: list[int],
                 dt: ir.DataType, opset: int) -> ir.Value:
        if opset >= 13 and all(out_shape[i] % in_shape[i] == 0 for i in axes):
            # asymmetric + floor picks source floor(o / f) for an integer factor f, which is JAX's
            # floor((o + 0.5) / f) (r + 0.5 < f for every remainder r); it is also the only nearest form
            # onnxruntime's NCHWc optimiser runs as its blocked Upsample (any other keeps the tensor in
            # NCHW, with a reorder before and after every upsampling)
            return self._resize_node(ctx, x_val, in_shape, out_shape, axes, dt, mode="nearest",
                                     coordinate_transformation_mode="asymmetric", nearest_mode="floor")
        cur, dims = x_val, list(in_shape)
        for i in axes:
            idx = _const_i64(ctx, _nearest_indices(int(in_shape[i]), int(out_shape[i])), "resize_nn_idx")
            dims[i] = out_shape[i]
            cur = _emit(ctx, "Gather", [cur, idx], dims, dt, ctx.fresh_name("resize_nn"), axis=i)
        return cur

    @staticmethod
    def _matmul(ctx: Any, x_val: ir.Value, in_shape: tuple, out_shape: tuple, axes: list[int],
                dt: ir.DataType, method: str, antialias: bool, w_dtype: np.dtype) -> ir.Value:
        rank = len(in_shape)
        cur, dims = x_val, list(in_shape)
        for i in axes:
            w = _resize_weight_matrix(int(in_shape[i]), int(out_shape[i]), method, antialias, w_dtype)
            w_val = ctx.builder.add_initializer_from_array(name=ctx.fresh_name("resize_w"), array=w)
            perm = [d for d in range(rank) if d != i] + [i]
            moved = perm != list(range(rank))
            if moved:
                cur = _emit(ctx, "Transpose", [cur], [dims[d] for d in perm], dt,
                            ctx.fresh_name("resize_t"), perm=perm)
            dims[i] = out_shape[i]
            cur = _emit(ctx, "MatMul", [cur, w_val], [dims[d] for d in perm], dt, ctx.fresh_name("resize_mm"))
            if moved:
                inv = [perm.index(d) for d in range(rank)]
                cur = _emit(ctx, "Transpose", [cur], dims, dt, ctx.fresh_name("resize_tb"), perm=inv)
        return cur


# --------------------------------------------------------------------------------------
# flax.linen.LayerNorm
# --------------------------------------------------------------------------------------

from jax2onnx.plugins.flax.linen.layer_norm import LAYER_NORM_PRIM as _LN_PRIM  # noqa: E402
from jax2onnx.plugins.flax.linen.layer_norm import LayerNormPlugin as _StockLinenLayerNorm  # noqa: E402

_LN_ORIGINAL_CALL: list[Any] = [None]


def _layer_norm_call(self: Any, x: Any, *, mask: Any = None) -> Any:
    """`flax.linen.LayerNorm.__call__` while exporting: the common form (last axis, no mask, no cross-device axis)
    binds the `linen.layer_norm` primitive with the module's parameters; anything else runs flax's own code."""
    orig = _LN_ORIGINAL_CALL[0]
    last = (-1, x.ndim - 1)
    plain = (mask is None and getattr(self, "axis_name", None) is None
             and getattr(self, "axis_index_groups", None) is None
             and getattr(self, "reduction_axes", -1) in last and getattr(self, "feature_axes", -1) in last)
    if not plain or getattr(self, "scope", None) is None:
        return orig(self, x, mask=mask)
    params = self.scope.variables().get("params", {})
    features = x.shape[-1]
    if self.use_scale and "scale" not in params or self.use_bias and "bias" not in params:
        return orig(self, x, mask=mask)  # not initialised: let flax create the parameters
    dtype = self.dtype or x.dtype
    scale = params["scale"].astype(dtype) if self.use_scale else jnp.ones((features,), dtype)
    bias = params["bias"].astype(dtype) if self.use_bias else jnp.zeros((features,), dtype)
    return _LN_PRIM.bind(x.astype(dtype), scale, bias, epsilon=float(self.epsilon), axis=x.ndim - 1)


class LinenLayerNormPlugin(_StockLinenLayerNorm):
    """`flax.linen.LayerNorm` over the last axis -> one ONNX `LayerNormalization` (opset >= 17).

    What jax2onnx 0.17 did: a LayerNorm with `use_fast_variance=False` (torch's two-pass statistics, which
    RT-DETR's transformer layers use for fidelity) was traced as JAX arithmetic: ReduceSum, Div, Sub,
    ReduceSumSquare, Sqrt and a Shape/Gather/Concat/Expand broadcast chain per statistic, ~20 nodes per
    LayerNorm that ONNX Runtime does not fuse (the official torch.onnx exports write LayerNormalization, which ONNX
    Runtime fuses with the residual Add); fast-variance LayerNorms became the same kind of graph unless the
    export asked for `normalization_mode="prefer_native"`.

    The mapping: ONNX defines `LayerNormalization` as the two-pass computation (mean, then the mean of squared
    deviations, then (x - mean) / sqrt(var + epsilon) * scale + bias), torch's `nn.LayerNorm`, so every flax
    LayerNorm over the last axis becomes that one node; flax's fast variance (E[x^2] - E[x]^2) differs from it
    by float rounding only. Below opset 17 the two-pass arithmetic is written out instead.
    """

    @classmethod
    def binding_specs(cls) -> list:
        def make(orig: Any) -> Any:
            _LN_ORIGINAL_CALL[0] = orig
            return _layer_norm_call

        return [MonkeyPatchSpec(target="flax.linen.LayerNorm", attr="__call__", make_value=make,
                                delete_if_missing=False)]

    def lower(self, ctx: Any, eqn: Any) -> None:
        from jax2onnx.plugins._normalization_utils import lower_explicit_layer_norm
        from jax2onnx.plugins._utils import cast_param_like

        x_val, scale_val, bias_val = (ctx.get_value_for_var(v) for v in eqn.invars)
        shape = _aval_shape(eqn.invars[0])
        dtype = _ir_dtype(ctx, _aval_dtype(eqn.invars[0]))
        axis, eps = int(eqn.params["axis"]), float(eqn.params["epsilon"])
        name = ctx.fresh_name("LayerNorm")
        if int(ctx.opset) >= 17:
            scale_val = cast_param_like(ctx, scale_val, x_val, name_hint="ln_scale_cast")
            bias_val = cast_param_like(ctx, bias_val, x_val, name_hint="ln_bias_cast")
            y = _emit(ctx, "LayerNormalization", [x_val, scale_val, bias_val], shape, dtype, name, axis=axis,
                      epsilon=eps)
        else:
            y = lower_explicit_layer_norm(ctx, x_val, scale_val, bias_val, x_shape=shape, axis=axis, epsilon=eps,
                                          use_fast_variance=False, clamp_negative_variance=False)
        ctx.bind_value_for_var(eqn.outvars[0], y)


# --------------------------------------------------------------------------------------
# registry management
# --------------------------------------------------------------------------------------

PLUGINS: dict[str, type[PrimitiveLeafPlugin]] = {
    "linen.max_pool": LinenMaxPoolPlugin,
    lax.reduce_window_max_p.name: ReduceWindowMaxPlugin,
    lax.reduce_window_min_p.name: ReduceWindowMinPlugin,
    lax.reduce_window_p.name: ReduceWindowPlugin,
    _RESIZE_PRIM.name: ImageResizePlugin,
    _LN_PRIM.name: LinenLayerNormPlugin,
}

_STOCK: dict[str, Any] = {name: PLUGIN_REGISTRY.get(name) for name in PLUGINS}
_OURS: dict[str, PrimitiveLeafPlugin] = {}
for _name, _cls in PLUGINS.items():
    _inst = _cls()
    _inst.primitive = _name
    _inst.metadata = {"jaxpr_primitive": _name, "context": "research.bridge", "component": _name}
    _OURS[_name] = _inst


# --------------------------------------------------------------------------------------
# graph optimiser: producer / consumer lookups without a full rescan per call
# --------------------------------------------------------------------------------------

_GRAPH_UTIL_MODULES = ("jax2onnx.converter.optimizer_graph_utils", "jax2onnx.converter.ir_optimizations",
                       "jax2onnx.converter.conv_transpose_bias_folding")
_ORIGINAL_LOOKUPS: dict[str, Any] = {}
_ID_CACHE: list = [None, -1, frozenset()]  # [the node list (kept alive, so its id is not reused), its length, ids]


def _node_ids(nodes: Sequence[Any]) -> Any:
    """{id(node)} of `nodes`, computed once per node list while its length holds (the optimiser passes build a new
    `list(graph)` after every change)."""
    if _ID_CACHE[0] is not nodes or _ID_CACHE[1] != len(nodes):
        _ID_CACHE[:] = [nodes, len(nodes), frozenset(id(n) for n in nodes)]
    return _ID_CACHE[2]


def _producer_node(nodes: Sequence[Any], value_or_name: Any) -> Any:
    """jax2onnx's `_producer_node` with its common case answered from the IR: the value's producer when it is one of
    `nodes` (the original builds the set of every node id on each call, which made its transpose-pair pass
    quadratic: 6 of the 6.5 minutes of exporting HigherHRNet-W32); anything else goes to the original scan."""
    if isinstance(value_or_name, ir.Value):
        prod = value_or_name.producer()
        if isinstance(prod, ir.Node) and id(prod) in _node_ids(nodes):
            return prod
    return _ORIGINAL_LOOKUPS["_producer_node"](nodes, value_or_name)


def _consumer_nodes(nodes: Sequence[Any], value_or_name: Any) -> list:
    """jax2onnx's `_consumer_nodes` with its common case (the IR's consumers that are among `nodes`) answered
    without rebuilding the node-id set per call; anything else goes to the original."""
    if isinstance(value_or_name, ir.Value):
        consumers = value_or_name.consumers()
        if consumers and all(isinstance(c, ir.Node) for c in consumers):
            ids = _node_ids(nodes)
            found = [c for c in consumers if id(c) in ids]
            if found:
                return found
    return _ORIGINAL_LOOKUPS["_consumer_nodes"](nodes, value_or_name)


def _install_fast_lookups() -> None:
    import importlib
    for module_name in _GRAPH_UTIL_MODULES:
        mod = importlib.import_module(module_name)
        for name, fast in (("_producer_node", _producer_node), ("_consumer_nodes", _consumer_nodes)):
            current = getattr(mod, name, None)
            if current is None or current is fast:
                continue
            _ORIGINAL_LOOKUPS.setdefault(name, current)
            setattr(mod, name, fast)


def install() -> None:
    """Puts the bridge plugins into jax2onnx's registry and the fast node lookups into its graph optimiser
    (idempotent)."""
    PLUGIN_REGISTRY.update(_OURS)
    _install_fast_lookups()


def installed() -> bool:
    return all(PLUGIN_REGISTRY.get(k) is v for k, v in _OURS.items())


@contextlib.contextmanager
def stock_plugins(*names: str) -> Iterator[None]:
    """Temporarily restores jax2onnx's own plugins (all replaced ones, or `names`)."""
    names = names or tuple(PLUGINS)
    saved = {n: PLUGIN_REGISTRY.get(n) for n in names}
    try:
        for n in names:
            if _STOCK.get(n) is None:
                PLUGIN_REGISTRY.pop(n, None)
            else:
                PLUGIN_REGISTRY[n] = _STOCK[n]
        yield
    finally:
        for n, p in saved.items():
            if p is None:
                PLUGIN_REGISTRY.pop(n, None)
            else:
                PLUGIN_REGISTRY[n] = p


install()
