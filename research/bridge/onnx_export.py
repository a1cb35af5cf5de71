"""Export a pure JAX function to ONNX (jax2onnx) and check it with onnxruntime.

    fn = lambda x: model.apply(variables, x, train=False)
    export_onnx(fn, np.zeros((1, 640, 640, 3), np.float32), "yolov5s.onnx")
    runner = OnnxRunner("yolov5s.onnx")
    outs = runner(images)                      # list of np.ndarray, one per output leaf
    report = check_onnx(fn, "yolov5s.onnx", [images_b1, images_b4])
    assert report["ok"]

Several named inputs of any rank (SiamFC's exemplar and search crops, RT-DETR's images and
`orig_target_sizes`): pass a mapping, and `apply_fn` is called with them as keyword arguments:

    export_onnx(lambda exemplar, search: ..., {"exemplar": z, "search": x}, "siamfc.onnx",
                dynamic_batch=("exemplar", "search"), output_names=["response"])
    OnnxRunner("siamfc.onnx")(exemplar=z, search=x)

The graph's inputs have the example arrays' dtypes, with a symbolic batch dimension 'B' on the
inputs `dynamic_batch` names (True: all of them), embeds all weights as initializers, and has one
ONNX output per leaf of the function's output pytree (an array, a tuple/list of arrays, or a
dict, in `jax.tree_util` order). Importing this module installs the bridge's jax2onnx plugins
(`research.bridge.onnx_plugins`), which fix known converter gaps.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import numpy as np
import onnx
from absl import logging

from research.bridge import onnx_graph, onnx_plugins
from research.vision import upsample

onnx_plugins.install()

__all__ = ["export_onnx", "OnnxRunner", "check_onnx", "output_leaf_names", "ACCEPT_RTOL"]

ACCEPT_RTOL = 1e-4  # acceptance: max |onnx - jax| <= 1e-4 * max |jax output|, per output
_PROTOBUF_LIMIT = 2**31 - 1


class _SymbolicSpec(NamedTuple):
    """An input spec with a symbolic batch dimension ('B', ...) and a dtype, for jax2onnx."""

    shape: tuple
    dtype: Any


def _leaves(out: Any) -> list:
    return jax.tree_util.tree_leaves(out)


def output_leaf_names(apply_fn: Callable[..., Any], *example_inputs: np.ndarray) -> list[str]:
    """Default output names: 'output' for a single array, else the pytree key paths
    ('heads_0', 'pred', 'output_1', ...), in `jax.tree_util` leaf order. `apply_fn` takes the
    example inputs positionally (float inputs are traced as float32)."""
    def spec(x):
        x = np.asarray(x)
        return jax.ShapeDtypeStruct(x.shape, np.float32 if x.dtype.kind == "f" else x.dtype)
    shapes = jax.eval_shape(apply_fn, *[spec(x) for x in example_inputs])
    flat, _ = jax.tree_util.tree_flatten_with_path(shapes)
    if len(flat) == 1 and not flat[0][0]:
        return ["output"]
    names = []
    for i, (path, _) in enumerate(flat):
        parts = []
        for k in path:
            for attr in ("key", "idx", "name"):
                if hasattr(k, attr):
                    parts.append(str(getattr(k, attr)))
                    break
        name = re.sub(r"[^0-9A-Za-z_]+", "_", "_".join(parts)).strip("_")
        if not name or name[0].isdigit():
            name = f"output_{name}" if name else f"output_{i}"
        names.append(name)
    seen: dict[str, int] = {}
    for i, n in enumerate(names):  # make unique
        if n in seen:
            names[i] = f"{n}_{i}"
        seen[n] = i
    return names


def _named_inputs(example_inputs: Mapping[str, Any] | np.ndarray, input_name: str) -> tuple[dict, bool]:
    """({name: array}, called_with_keywords) for one array or a mapping of named arrays."""
    if isinstance(example_inputs, Mapping):
        named = {str(k): np.asarray(v) for k, v in example_inputs.items()}
        if not named:
            raise ValueError("export needs at least one example input")
        return named, True
    return {input_name: np.asarray(example_inputs, dtype=np.float32)}, False


def export_onnx(apply_fn: Callable[..., Any], example_inputs: Mapping[str, Any] | np.ndarray, path: str, *,
                dynamic_batch: bool | Sequence[str] = True, input_name: str = "images",
                output_names: Sequence[str] | None = None, opset: int | None = None,
                simplify: bool = True, channels_first: bool = False) -> str:
    """Exports `apply_fn` to the ONNX file `path`, atomically; returns `path`.

    Args:
      apply_fn: `fn(x)` for one input array (e.g. images [B, H, W, C] float32), or
        `fn(**inputs)` when `example_inputs` is a mapping; returns an array, tuple or pytree.
      example_inputs: one array (the ONNX input is then named `input_name`) or name -> array;
        they fix each input's shape and dtype (arrays of Python floats become float32).
      path: the .onnx file. It is written to a temporary file in the same directory and moved
        over `path` only once complete, so an existing good model is never left half-written.
      dynamic_batch: True (every input), False (none) or the names of the inputs whose first
        dimension becomes the symbol 'B'.
      output_names: one per output leaf (default: from the pytree paths).
      simplify: run onnxslim over the converted graph (`simplify_graph`), as the official YOLOv5 exporter
        does (constant folding, dead nodes removed), then fold BatchNorm arithmetic into the convolutions. The
        function is traced inside `research.vision.upsample.export_forms()` either way (nearest upsampling
        as one `Resize`).
      channels_first: the graph takes every 4-D input (our NHWC images, `[B, H, W, C]`) as NCHW `[B, C, H, W]`,
        as the official PyTorch exports do: the traced function transposes it back first, a transpose that
        cancels against the NCHW convolution jax2onnx writes for the first layer, so ONNX Runtime runs no input
        transpose (`OnnxRunner` still accepts NHWC arrays for such a graph: `to_graph_layout`).

    Raises:
      ValueError: a name in `dynamic_batch` is not an input, the output count differs from
        `output_names`, or the model exceeds protobuf's 2 GiB limit.
    """
    onnx_plugins.install()
    from jax2onnx import to_onnx

    named, keywords = _named_inputs(example_inputs, input_name)
    if dynamic_batch is True:
        dyn = set(named)
    elif dynamic_batch is False:
        dyn = set()
    else:
        dyn = set(dynamic_batch)
        if dyn - set(named):
            raise ValueError(f"dynamic_batch names {sorted(dyn - set(named))}, not inputs {sorted(named)}")
    names = list(named)
    nchw = {n for n in names if channels_first and named[n].ndim == 4}
    for n in nchw:
        named[n] = named[n].transpose(0, 3, 1, 2)
    specs = []
    for n in names:
        x = named[n]
        if x.dtype == np.float64:
            x = named[n] = x.astype(np.float32)
        shape = tuple(int(d) for d in x.shape)
        if n in dyn:
            if not shape:
                raise ValueError(f"input {n!r} is a scalar: it has no batch dimension")
            shape = ("B",) + shape[1:]
        specs.append(jax.ShapeDtypeStruct(shape, x.dtype) if n not in dyn else _SymbolicSpec(shape, x.dtype))

    def call(*xs):
        xs = [x.transpose(0, 2, 3, 1) if n in nchw else x for n, x in zip(names, xs)]
        return apply_fn(**dict(zip(names, xs))) if keywords else apply_fn(xs[0])

    if output_names is None:
        output_names = output_leaf_names(call, *[named[n] for n in names])
    output_names = list(output_names)

    def flat_fn(*xs):
        leaves = _leaves(call(*xs))
        if len(leaves) != len(output_names):
            raise ValueError(f"{len(output_names)} output_names for {len(leaves)} outputs")
        return tuple(leaves)

    kwargs: dict[str, Any] = dict(model_name=os.path.splitext(os.path.basename(path))[0] or "model",
                                  input_names=names, output_names=output_names,
                                  return_mode="proto")
    if opset is not None:
        kwargs["opset"] = int(opset)
    with upsample.export_forms(), _quiet_serde():
        model = to_onnx(flat_fn, specs, **kwargs)
        if simplify:
            model = simplify_graph(model)
    _refresh_value_info(model)
    if model.ByteSize() > _PROTOBUF_LIMIT:
        raise ValueError(f"ONNX model is {model.ByteSize()} bytes, over protobuf's 2 GiB limit")
    data = model.SerializeToString()
    _atomic_write(path, data)
    return path


@contextlib.contextmanager
def _quiet_serde():
    """onnx_ir logs a warning for every shape-only value it serialises without a dtype ("The value type for
    shape [3] is not known ... Skipping serialization": ~100 lines for RT-DETR); they are value_info hints that
    `_refresh_value_info` recomputes, so they are hidden while exporting (errors still show)."""
    import logging as py_logging
    logger = py_logging.getLogger("onnx_ir.serde")
    level = logger.level
    logger.setLevel(py_logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def simplify_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph simplified by onnxslim (the tool the official YOLOv5 `export.py --simplify` uses), or the graph
    unchanged, with a logged warning, when onnxslim fails on it: simplification is an optimisation, never a
    reason to lose an export.

    jax2onnx writes BatchNorm in inference as Sub/Mul/Add arithmetic on the NHWC side of the NCHW<->NHWC
    transposes it puts around every convolution, and keeps shape-computation chains; ONNX Runtime's own
    optimiser fuses neither, so every BatchNorm costs three passes over its activation. onnxslim folds the
    constants and drops the dead nodes; `onnx_graph.fold_affine_into_conv` then moves the per-channel
    arithmetic into the convolution weights (what the official exports get from folding BatchNorm), and
    `onnx_graph.einsum_to_matmul` writes jax2onnx's `Einsum` products as `MatMul` (as torch.onnx does). Inputs, outputs,
    their names and the symbolic batch dimension are kept (tests/test_onnx_export.py).
    """
    try:
        import onnxslim
        slim = onnxslim.slim(model)
    except Exception as e:  # noqa: BLE001 (a failed optimisation keeps the correct graph)
        logging.warning("onnxslim could not simplify the exported graph (%s: %s); keeping it as converted",
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return model
    if slim is None or [i.name for i in slim.graph.input] != [i.name for i in model.graph.input] or \
            [o.name for o in slim.graph.output] != [o.name for o in model.graph.output]:
        logging.warning("onnxslim changed the graph's inputs or outputs; keeping it as converted")
        return model
    onnx_graph.fold_affine_into_conv(slim)
    onnx_graph.einsum_to_matmul(slim)
    return slim


def _refresh_value_info(model: onnx.ModelProto) -> None:
    """Recomputes the intermediate shape annotations, keeping the symbolic batch dimension.

    jax2onnx's graph optimiser moves elementwise ops (SiLU's Sigmoid/Mul) across the NHWC<->NCHW transposes
    around Conv but keeps their old NHWC value_info (onnxruntime then logs shape-merge warnings), so the
    annotations are dropped and inferred again, by onnxruntime's own symbolic shape inference
    (`onnxruntime.tools.symbolic_shape_infer`). ONNX's `infer_shapes` would do, except that it gives the output
    of every Resize and of every Reshape with a -1 a fresh unknown batch dimension ('unk__N' instead of 'B'):
    onnxruntime's NCHWc optimiser then cannot show that the two inputs of an Add have the same shape and
    adds them through a Reshape to 5-D each (157 extra nodes in HigherHRNet W32, the convolution + sum fusion
    lost). The symbolic inference keeps 'B' through them. When it fails on a graph, ONNX's inference is used;
    when both fail the model is left without intermediate annotations (they are hints: inputs, outputs and
    initializers are untouched either way).
    """
    del model.graph.value_info[:]
    inferred = None
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception as e:  # noqa: BLE001 (an optimisation hint: fall back to ONNX's inference)
        logging.info("symbolic shape inference failed (%s: %s); using ONNX's", type(e).__name__, e)
    if inferred is None:
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:  # inference is optional: the cleared model is valid as is
            return
    model.graph.value_info.extend(inferred.graph.value_info)


def _atomic_write(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64,
               "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
               "tensor(float16)": np.float16}


def to_graph_layout(x: np.ndarray, graph_shape: Sequence[Any]) -> np.ndarray:
    """`x` as a graph input of `graph_shape` takes it: a 4-D NHWC array `[B, H, W, C]` for an NCHW input
    `[B, C, H, W]` (a channels-first export, `export_onnx(channels_first=True)`, or an official graph) is
    transposed; anything else is returned as is. Symbolic dimensions (strings, None) match anything.
    """
    x = np.asarray(x)
    if x.ndim != 4 or len(graph_shape) != 4:
        return x

    def fits(shape):
        return all(not isinstance(g, int) or g == d for g, d in zip(graph_shape, shape))

    if not fits(x.shape) and fits((x.shape[0], x.shape[3], x.shape[1], x.shape[2])):
        return x.transpose(0, 3, 1, 2)
    return x


class OnnxRunner:
    """onnxruntime CPU session over an exported model: `runner(x) -> list[np.ndarray]`."""

    def __init__(self, path: str, num_threads: int | None = None):
        import onnxruntime as ort

        self.path = path
        opts = ort.SessionOptions()
        if num_threads is not None:
            opts.intra_op_num_threads = int(num_threads)
            opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        inputs = self.session.get_inputs()
        self.input_names = [i.name for i in inputs]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_name = self.input_names[0]
        self.input_shape = list(inputs[0].shape)
        self._shapes = {i.name: list(i.shape) for i in inputs}
        self._dtypes = {i.name: _ORT_DTYPES.get(i.type, np.float32) for i in inputs}

    def __call__(self, x: np.ndarray | None = None, **named: np.ndarray) -> list[np.ndarray]:
        """Outputs (one array per ONNX output) for one positional input or inputs by name. Images may be
        given NHWC `[B, H, W, C]` to a graph that takes NCHW (`to_graph_layout`).

        Raises:
          ValueError: the inputs given are not exactly the model's.
        """
        if x is not None:
            if named or len(self.input_names) != 1:
                raise ValueError(f"the model takes inputs {self.input_names}: pass them by name")
            named = {self.input_name: x}
        if set(named) != set(self.input_names):
            raise ValueError(f"the model takes inputs {self.input_names}, got {sorted(named)}")
        feed = {k: np.ascontiguousarray(to_graph_layout(v, self._shapes[k]), dtype=self._dtypes[k])
                for k, v in named.items()}
        return self.session.run(None, feed)

    def __repr__(self) -> str:
        return f"OnnxRunner({self.path!r}, inputs={self.input_names}, outputs={self.output_names})"


def check_onnx(apply_fn: Callable[[jax.Array], Any], path: str, inputs: Sequence[np.ndarray],
               *, rtol: float = ACCEPT_RTOL, runner: OnnxRunner | None = None) -> dict:
    """Runs JAX and onnxruntime on each input batch and compares every output.

    Returns {'ok': bool, 'rtol': rtol, 'outputs': {name: {'max_abs_err', 'max_abs_out', 'ratio',
    'ok'}}, 'per_input': [...same per batch...]}; `ratio` = max_abs_err / max_abs_out, taken
    over all inputs, and an output is ok when ratio <= rtol (the project's acceptance rule).
    """
    runner = runner or OnnxRunner(path)
    jitted = jax.jit(apply_fn)  # one compile per batch size instead of op-by-op dispatch
    names = runner.output_names
    agg = {n: {"max_abs_err": 0.0, "max_abs_out": 0.0} for n in names}
    per_input = []
    for x in inputs:
        x = np.asarray(x, dtype=np.float32)
        ref = [np.asarray(a) for a in _leaves(jitted(x))]
        got = runner(x)
        if len(ref) != len(got):
            raise ValueError(f"JAX gives {len(ref)} outputs, ONNX {len(got)}")
        rec = {}
        for n, r, g in zip(names, ref, got):
            if r.shape != g.shape:
                raise ValueError(f"output {n}: JAX shape {r.shape} != ONNX shape {g.shape}")
            r64, g64 = r.astype(np.float64), g.astype(np.float64)
            same = (r64 == g64) | (np.isnan(r64) & np.isnan(g64))
            diff = np.where(same, 0.0, np.abs(r64 - g64))
            err = float(np.nan_to_num(diff, nan=np.inf).max()) if r.size else 0.0
            fin = np.abs(r64[np.isfinite(r64)])
            mag = float(fin.max()) if fin.size else 0.0
            rec[n] = {"max_abs_err": err, "max_abs_out": mag, "batch": int(x.shape[0])}
            agg[n]["max_abs_err"] = max(agg[n]["max_abs_err"], err)
            agg[n]["max_abs_out"] = max(agg[n]["max_abs_out"], mag)
        per_input.append(rec)
    for n, a in agg.items():
        a["ratio"] = a["max_abs_err"] / a["max_abs_out"] if a["max_abs_out"] > 0 else (
            0.0 if a["max_abs_err"] == 0 else float("inf"))
        a["ok"] = bool(a["max_abs_err"] <= rtol * a["max_abs_out"])
    return {"ok": all(a["ok"] for a in agg.values()), "rtol": rtol, "outputs": agg, "per_input": per_input}


def timed_export(*args: Any, **kwargs: Any) -> tuple[str, float]:
    """`export_onnx` plus its wall time in seconds."""
    t0 = time.perf_counter()
    p = export_onnx(*args, **kwargs)
    return p, time.perf_counter() - t0
