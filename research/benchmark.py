r"""Speed and memory benchmark: `--mode=benchmark`, and an XLA:CPU flags study.

    python launch.py --config=configs/yolov5.py --workdir=workdirs/bench --mode=benchmark
    python -m research.benchmark --xla_flags_study [--variant=s --image_size=640 --out=...]

`run(config, workdir)` builds the network's model at `config.benchmark.variant` /
`config.benchmark.image_size` (random init, 80 classes) and measures, each with warmup and
`config.benchmark.repeats` timed calls (`block_until_ready`; median and min):

  1. `infer`: the JAX inference forward (train=False) at `benchmark.batch_size`;
  2. `train_step`: the shared `trainer.train_step` (the task's loss, optimiser and EMA, the
     same jit/donation as the trainer) on a synthetic batch at `benchmark.train_batch_size`,
     with an optimiser update every call; `train_step_accumulate` is the same compiled step
     without the update (gradient accumulation only);
  3. `onnx_infer`: ONNX Runtime on the model exported into `workdir/benchmark/`.

Each record also has the lower+compile time, XLA's FLOP count (`cost_analysis`), achieved
FLOP/s, images/s, XLA's buffer sizes (`memory_analysis`) and the process RSS (peak sampled
during the stage, including compilation). A recompilation check (jit cache size and XLA
backend compiles counted after the first call) is recorded as well. Everything goes to
`workdir/benchmark.json` and a table on the console.

Networks plug in with a `BenchSpec` (model variables, inference function, loss/optimiser/EMA,
a synthetic batch): `research.<network>.task.benchmark_spec(config, variant=, image_size=)`
when the task module defines it, else a builder registered in `SPEC_BUILDERS` here.

The official PyTorch model can be timed in the same run, before and after ours, so that the
ratios are measured on one machine at one time: `--config.benchmark.torch_repo=PATH` (a clone of
ultralytics/yolov5 whose requirements import; `research/yolov5/official_torch.py`). Without it,
the issue's figures for that model on the same 2-core CPU (the `REFERENCE_*` constants) give the
`*_over_torch_reference` ratios when the benchmark is at their setting (yolov5s, 640, b1 / b2).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import importlib
import json
import math
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from research.cpu import hostenv

# ---------------------------------------------------------------------------------------------
# Reference figures from the issue (official PyTorch YOLOv5s on the same 2-core CPU).

REFERENCE_TORCH_YOLOV5S_INFER_MS = (130.0, 140.0)  # 640x640, batch 1, forward only
REFERENCE_TORCH_YOLOV5S_TRAIN_STEP_MS = (800.0, 900.0)  # 640x640, batch 2, forward+backward+step
REFERENCE_YOLOV5S_GFLOPS_640 = 16.5  # ultralytics README / model summary (2 x MACs), batch 1
REFERENCE_SETTING = {"network": "yolov5", "variant": "s", "image_size": 640, "infer_batch": 1,
                     "train_batch": 2}

MB = 1024.0 * 1024.0


# ---------------------------------------------------------------------------------------------
# What a network provides


@dataclasses.dataclass
class BenchSpec:
    """The network-specific part of the benchmark.

    variables: model variables ({'params', 'batch_stats'?}), numpy or jax arrays.
    infer_fn: (variables, images float32 [B, H, W, 3] in 0..1) -> output pytree; jit-able and
      exportable to ONNX with the variables closed over.
    make_batch: batch size -> dict of numpy arrays fed to `train_step` (synthetic).
    loss_fn, tx, ema_decay, use_ema, accumulates: as the task gives them to
      `trainer.train_step` / `trainer.create_train_state`.
    """

    name: str
    variant: str
    image_size: int
    variables: dict
    infer_fn: Callable[[dict, Any], Any]
    make_batch: Callable[[int], dict]
    loss_fn: Callable
    tx: Any
    ema_decay: Callable | None
    use_ema: bool
    accumulates: bool = False
    onnx_output_names: Sequence[str] | None = None
    export_fn: Callable[[dict, Any], Any] | None = None  # what the ONNX export traces (default infer_fn)
    # module with a `main(argv)` that times the official PyTorch model from a local checkout
    # (--repo --variant --image_size --infer_batch --train_batch --repeats --out json)
    torch_reference_module: str | None = None
    info: dict = dataclasses.field(default_factory=dict)


def yolov5_spec(config, *, variant: str, image_size: int, nc: int = 80) -> BenchSpec:
    """YOLOv5 through the real task's loss_fn / make_optimizer / ema_decay, without its data."""
    import jax
    import jax.numpy as jnp

    from research import tasks
    from research.yolov5 import task as task_lib

    cfg = config.copy_and_resolve_references()
    cfg.model.variant = variant
    cfg.model.num_classes = nc  # fixed here, so the task reads no dataset
    cfg.data.image_size = image_size
    task = task_lib.Task(cfg, mode="benchmark")
    steps = tasks.Steps(steps_per_epoch=1000, total_steps=300_000, num_epochs=300)

    model = task.model
    init_size = 64  # parameters do not depend on the input size
    shapes = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, init_size, init_size, 3)), train=False),
                            jax.random.PRNGKey(0))
    variables = host_init(shapes)
    max_labels = int(config.data.max_labels)

    def infer_fn(v, images):
        return model.apply(v, images, train=False)["pred"]

    onnx_model = model.for_export()  # as `--mode=export` writes it

    def export_fn(v, images):
        return onnx_model.apply(v, images, train=False)["pred"]

    def make_batch(batch_size: int) -> dict:
        rs = np.random.RandomState(0)
        n_boxes = min(4, max_labels)
        boxes = np.zeros((batch_size, max_labels, 4), np.float32)
        boxes[:, :n_boxes, :2] = rs.uniform(0.2, 0.8, (batch_size, n_boxes, 2))
        boxes[:, :n_boxes, 2:] = rs.uniform(0.05, 0.3, (batch_size, n_boxes, 2))
        valid = np.zeros((batch_size, max_labels), bool)
        valid[:, :n_boxes] = True
        classes = np.where(valid, rs.randint(0, nc, (batch_size, max_labels)), 0).astype(np.int32)
        image = rs.randint(0, 256, (batch_size, image_size, image_size, 3)).astype(np.uint8)
        return {"image": image, "boxes": boxes, "classes": classes, "valid": valid}

    from research.yolov5.model import count_params
    return BenchSpec(
        name="yolov5", variant=variant, image_size=image_size, variables=variables, infer_fn=infer_fn,
        export_fn=export_fn, torch_reference_module="research.yolov5.official_torch",
        make_batch=make_batch, loss_fn=task.loss_fn, tx=task.make_optimizer(variables["params"], steps),
        ema_decay=task.ema_decay if task.use_ema else None, use_ema=task.use_ema, accumulates=task.accumulates,
        onnx_output_names=["pred"],
        info={"nc": nc, "params": count_params(variables["params"]), "max_labels": max_labels,
              "boxes_per_image": min(4, max_labels), "dtype": config.model.dtype})


def host_init(shapes: Any, seed: int = 0) -> dict:
    """Random variables for a Flax variable-shape tree, made with numpy on the host.

    Timing does not depend on the values, and `jax.jit(model.init)` is slow to compile (the
    threefry random bits of every parameter: ~35 s for the tiny YOLOv5 on 2 busy cores, against
    ~2 s for its forward). Kernels get torch's default U(+-1/sqrt(fan_in)), norm scales and
    variances 1, biases and means 0, anything else N(0, 0.02).
    """
    import jax

    rs = np.random.RandomState(seed)

    def leaf(path, sd):
        name = str(getattr(path[-1], "key", getattr(path[-1], "name", path[-1])))
        shape, dtype = tuple(sd.shape), np.dtype(sd.dtype)
        if name == "kernel" and len(shape) >= 2:
            bound = 1.0 / math.sqrt(max(int(np.prod(shape[:-1])), 1))
            v = rs.uniform(-bound, bound, shape)
        elif name in ("scale", "var"):
            v = np.ones(shape)
        elif name in ("bias", "mean"):
            v = np.zeros(shape)
        else:
            v = rs.normal(0.0, 0.02, shape)
        return np.asarray(v, dtype=dtype)

    tree = jax.tree_util.tree_map_with_path(leaf, shapes)
    return {k: v for k, v in dict(tree).items()}


SPEC_BUILDERS: dict[str, Callable[..., BenchSpec]] = {"yolov5": yolov5_spec}


def make_spec(config, *, variant: str | None = None, image_size: int | None = None) -> BenchSpec:
    variant = variant or config.benchmark.variant
    image_size = int(image_size or config.benchmark.image_size)
    name = config.network
    try:
        module = importlib.import_module(f"research.{name}.task")
    except ModuleNotFoundError:
        module = None
    hook = getattr(module, "benchmark_spec", None)
    if hook is not None:
        return hook(config, variant=variant, image_size=image_size)
    if name not in SPEC_BUILDERS:
        raise ValueError(f"no benchmark for network {name!r}: define benchmark_spec in research/{name}/task.py "
                         f"or register a builder in research.benchmark.SPEC_BUILDERS ({sorted(SPEC_BUILDERS)})")
    return SPEC_BUILDERS[name](config, variant=variant, image_size=image_size)


# ---------------------------------------------------------------------------------------------
# Measuring


class RssSampler:
    """Peak resident memory of this process over a block (psutil sampling every `interval` s)."""

    def __init__(self, interval: float = 0.005):
        import psutil
        self.proc = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _rss(self) -> int:
        return int(self.proc.memory_info().rss)

    def __enter__(self):
        self.before = self._rss()
        self.peak = self.before
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.after = self._rss()
        self.peak = max(self.peak, self.after)
        return False

    def record(self) -> dict:
        return {"peak_rss_mb": self.peak / MB, "rss_before_mb": self.before / MB, "rss_after_mb": self.after / MB,
                "max_rss_mb": max_rss_mb()}


def max_rss_mb() -> float:
    """The process's RSS high-water mark so far (getrusage; kB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (MB if sys.platform == "darwin" else 1024.0)


class CompileCounter:
    """Counts XLA backend compilations (jax.monitoring events) while active."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        import jax
        self.count = 0
        self.seconds = 0.0
        self._active = False
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event: str, duration: float, **kwargs) -> None:
        if self._active and event == self.EVENT:
            self.count += 1
            self.seconds += duration

    def start(self):
        self.count, self.seconds, self._active = 0, 0.0, True

    def stop(self) -> int:
        self._active = False
        return self.count

    def close(self):
        from jax._src import monitoring
        try:
            monitoring.unregister_event_duration_listener(self._listen)
        except Exception:  # older/newer jax: the listener stays, inactive
            pass


def _block(out):
    import jax
    for leaf in jax.tree_util.tree_leaves(out):
        if hasattr(leaf, "block_until_ready"):
            leaf.block_until_ready()
    return out


def time_calls(call: Callable[[int], Any], repeats: int, warmup: int) -> tuple[list[float], float]:
    """Wall milliseconds of `repeats` calls of call(i) (outputs blocked on), after `warmup` calls,
    and the process CPU milliseconds per call (all threads; less sensitive to other processes)."""
    for i in range(warmup):
        _block(call(i))
    times = []
    c0 = os.times()
    for i in range(repeats):
        t0 = time.perf_counter()
        _block(call(warmup + i))
        times.append((time.perf_counter() - t0) * 1000.0)
    c1 = os.times()
    cpu_ms = ((c1.user - c0.user) + (c1.system - c0.system)) * 1000.0 / max(repeats, 1)
    return times, cpu_ms


_ONEDNN_CALL = re.compile(r'= f32\[([\d,]*)\]\S* custom-call\(.*?custom_call_target="(OnednnConv\w+)", '
                          r'operand_layout_constraints=\{((?:[^{}]|\{[^{}]*\})*)\}')


def _dims(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def custom_call_flops(hlo_text: str) -> float:
    """FLOPs of the oneDNN convolution custom calls in compiled HLO (XLA counts them as 0).

    2 * (output-gradient or output elements) * k * k * Cin per call: forward (x, w -> y), input
    gradient (dy, w -> dx) and kernel gradient (x, dy -> dw); calls XLA removed are not counted.
    Taps on the zero padding count too (XLA's own count of the same convolution leaves them out:
    YOLOv5s 640 inference 16.62 vs 16.37 GFLOP).
    """
    total = 0.0
    for line in hlo_text.splitlines():
        m = _ONEDNN_CALL.search(line)
        if not m:
            continue
        result, target = _dims(m.group(1)), m.group(2)
        ops = [_dims(o) for o in re.findall(r"f32\[([\d,]*)\]", m.group(3))]
        if target == "OnednnConvFwd":
            out, w = result, ops[1]
        elif target == "OnednnConvBwdData":
            out, w = ops[0], ops[1]
        elif target == "OnednnConvBwdW":
            out, w = ops[1], result
        else:
            continue
        total += 2.0 * float(np.prod(out)) * w[0] * w[1] * w[2]
    return total


def _cost_flops(compiled) -> float | None:
    try:
        ca = compiled.cost_analysis()
    except Exception:
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    if not ca or "flops" not in ca:
        return None
    f = max(float(ca["flops"]), 0.0)
    try:
        f += custom_call_flops(compiled.as_text())
    except Exception:  # no HLO text from this backend: XLA's own count only
        pass
    return f if f > 0 else None


def _memory_analysis(compiled) -> dict | None:
    try:
        m = compiled.memory_analysis()
    except Exception:
        return None
    if m is None:
        return None
    out = {}
    for k in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "generated_code_size_in_bytes"):
        if hasattr(m, k):
            out[k.replace("_size_in_bytes", "_bytes")] = int(getattr(m, k))
    return out or None


def _record(what: str, batch: int, image_size: int, times_ms: list[float], cpu_ms: float | None = None,
            **extra) -> dict:
    med = float(statistics.median(times_ms))
    rec = {"what": what, "batch": int(batch), "image_size": int(image_size), "median_ms": med,
           "min_ms": float(min(times_ms)), "max_ms": float(max(times_ms)), "repeats": len(times_ms),
           "times_ms": [round(t, 3) for t in times_ms], "images_per_s": batch / (med / 1000.0),
           "compile_s": None, "lower_s": None, "flops": None, "flops_per_s": None, "peak_rss_mb": None,
           "cpu_ms_per_call": cpu_ms}
    rec.update(extra)
    if rec.get("flops"):
        rec["flops_per_s"] = rec["flops"] / (med / 1000.0)
    return rec


_CACHE_HITS = {"n": 0, "listening": False}


def _count_cache_hit(event: str, **kwargs) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _CACHE_HITS["n"] += 1


def _aot(jitted, *args) -> tuple[Any, float, float, bool]:
    """Lowers and compiles; returns (compiled, lower_s, lower_plus_compile_s, persistent_cache_hit).

    The jit's own call later reuses this executable (same in-process caches), so the first
    real call does not compile again; the recompilation check confirms it. With a persistent
    compilation cache (`jax_compilation_cache_dir`, as tests/conftest.py sets) compile_s is the
    time to read the executable back, which the records flag.
    """
    import jax
    if not _CACHE_HITS["listening"]:
        jax.monitoring.register_event_listener(_count_cache_hit)
        _CACHE_HITS["listening"] = True
    hits = _CACHE_HITS["n"]
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return compiled, t1 - t0, t2 - t0, _CACHE_HITS["n"] > hits


def measure_infer(spec: BenchSpec, batch: int, repeats: int, warmup: int, counter: CompileCounter) -> dict:
    import jax
    import jax.numpy as jnp

    s = spec.image_size
    images = jnp.asarray(np.random.RandomState(1).rand(batch, s, s, 3).astype(np.float32))
    variables = jax.tree_util.tree_map(jnp.asarray, spec.variables)
    fwd = jax.jit(spec.infer_fn)
    with RssSampler() as rss:
        compiled, lower_s, compile_s, hit = _aot(fwd, variables, images)
        _block(fwd(variables, images))  # first call
        size_first = fwd._cache_size()
        counter.start()
        times, cpu_ms = time_calls(lambda i: fwd(variables, images), repeats, max(warmup - 1, 0))
        n_compiles = counter.stop()
    size_end = fwd._cache_size()
    rec = _record("infer", batch, s, times, cpu_ms, compile_s=compile_s, lower_s=lower_s, compile_cache_hit=hit,
                  flops=_cost_flops(compiled),
                  xla_memory=_memory_analysis(compiled), **rss.record())
    rec["recompilation"] = {"jit_cache_size_after_first_call": size_first, "jit_cache_size_end": size_end,
                            "backend_compiles_after_first_call": n_compiles,
                            "ok": size_end == size_first == 1 and n_compiles == 0}
    rec["_output"] = np.asarray(fwd(variables, images))  # for the ONNX check, dropped from the json
    return rec


def measure_train_step(spec: BenchSpec, batch: int, repeats: int, warmup: int,
                       counter: CompileCounter) -> list[dict]:
    """The trainer's step (same jit, donation and sharding as `trainer.train_and_evaluate`)."""
    import jax

    from research import parallel, trainer

    mesh = parallel.make_mesh()
    s = spec.image_size
    # one jit instead of ~a hundred small eager compiles of zeros_like / copy / tx.init
    state = jax.jit(functools.partial(trainer.create_train_state, tx=spec.tx, use_ema=spec.use_ema,
                                      accumulates=spec.accumulates))(
        jax.tree_util.tree_map(np.asarray, spec.variables))
    state = parallel.replicate(state, mesh)
    data = parallel.global_batch(spec.make_batch(batch), mesh)
    rng = jax.random.PRNGKey(0)
    step_fn = jax.jit(functools.partial(trainer.train_step, loss_fn=spec.loss_fn, tx=spec.tx,
                                        ema_decay=spec.ema_decay),
                      donate_argnums=(0,))
    holder = {"state": state}

    def call(i, update=True):
        holder["state"], metrics = step_fn(holder["state"], data, np.bool_(update), rng)
        return holder["state"].step, metrics

    with RssSampler() as rss:
        compiled, lower_s, compile_s, hit = _aot(step_fn, state, data, np.bool_(True), rng)
        out = _block(call(0))
        size_first = step_fn._cache_size()
        counter.start()
        times, cpu_ms = time_calls(call, repeats, max(warmup - 1, 0))
        n_compiles = counter.stop()
    metrics = jax.tree_util.tree_map(np.asarray, out[1])
    loss_first = float(metrics["train/loss"])
    counter.start()
    times_acc, cpu_acc = time_calls(lambda i: call(repeats + warmup + i, update=False), repeats, 1)
    n_compiles_acc = counter.stop()
    size_end = step_fn._cache_size()
    flops = _cost_flops(compiled)
    common = dict(compile_s=compile_s, lower_s=lower_s, compile_cache_hit=hit, flops=flops,
                  xla_memory=_memory_analysis(compiled))
    rec = _record("train_step", batch, s, times, cpu_ms, **common, **rss.record())
    rec["loss_first_step"] = loss_first
    rec["note"] = "forward + backward + optimiser update + EMA every call (trainer.train_step, do_update=True)"
    rec["recompilation"] = {"jit_cache_size_after_first_call": size_first, "jit_cache_size_end": size_end,
                            "backend_compiles_after_first_call": n_compiles + n_compiles_acc,
                            "ok": size_end == size_first == 1 and n_compiles + n_compiles_acc == 0,
                            "checked": "hyper-parameters change every call; do_update True then False"}
    acc = _record("train_step_accumulate", batch, s, times_acc, cpu_acc, **common)
    acc["note"] = ("same compiled step with do_update=False (gradient accumulation only); flops are the "
                   "whole step's (XLA counts both cond branches), so no flops_per_s")
    acc["flops_per_s"] = None
    acc["recompilation"] = rec["recompilation"]
    return [rec, acc]


def measure_onnx(spec: BenchSpec, batch: int, repeats: int, warmup: int, out_dir: str,
                 reference: np.ndarray | None, flops: float | None) -> dict:
    """Exports `export_fn` (dynamic batch, as `--mode=export`) and times ONNX Runtime's CPU session."""
    import jax

    from research.bridge.onnx_export import OnnxRunner, export_onnx
    s = spec.image_size
    variables = jax.tree_util.tree_map(np.asarray, spec.variables)
    path = os.path.join(out_dir, f"{spec.name}_{spec.variant}_{s}.onnx")
    with RssSampler() as rss:
        t0 = time.perf_counter()
        fn = spec.export_fn or spec.infer_fn
        export_onnx(lambda x: fn(variables, x), np.zeros((1, s, s, 3), np.float32), path,
                    dynamic_batch=True, output_names=spec.onnx_output_names)
        export_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        runner = OnnxRunner(path)
        session_s = time.perf_counter() - t0
        images = np.random.RandomState(1).rand(batch, s, s, 3).astype(np.float32)
        times, cpu_ms = time_calls(lambda i: runner(images), repeats, warmup)
    rec = _record("onnx_infer", batch, s, times, cpu_ms, compile_s=session_s, flops=flops, **rss.record())
    rec["export_s"] = export_s
    rec["onnx_path"] = os.path.abspath(path)
    rec["onnx_mb"] = os.path.getsize(path) / MB
    rec["note"] = ("compile_s = ONNX Runtime session creation (graph optimisation); flops are XLA's count "
                   "of the same JAX function")
    try:
        import onnxruntime as ort
        rec["onnxruntime"] = ort.__version__
    except Exception:
        pass
    if reference is not None:  # the same images as measure_infer's (same seed)
        got = runner(images)[0]
        ref = np.asarray(reference)
        err = float(np.max(np.abs(got.astype(np.float64) - ref)))
        rec["max_abs_err_vs_jax"] = err
        rec["rel_err_vs_jax"] = err / max(float(np.max(np.abs(ref))), 1e-12)
    return rec


def environment() -> dict:
    import jax

    env = {"jax": jax.__version__, "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
           "cpu_count": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
           "machine": platform.machine(), "devices": [str(d) for d in jax.devices()],
           "backend": jax.default_backend(), "malloc": hostenv.active()}
    try:
        env["cpus_available"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        import jaxlib
        env["jaxlib"] = jaxlib.__version__
    except Exception:
        pass
    for mod in ("flax", "optax", "onnxruntime", "jax2onnx"):
        try:
            env[mod] = importlib.import_module(mod).__version__
        except Exception:
            pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    env["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import psutil
        env["memory_gb"] = psutil.virtual_memory().total / 1024**3
    except Exception:
        pass
    env["compilation_cache_dir"] = jax.config.jax_compilation_cache_dir or None
    for k in ("JAX_COMPILATION_CACHE_DIR", "OMP_NUM_THREADS", "JAX_PLATFORMS"):
        if os.environ.get(k):
            env[k] = os.environ[k]
    return env


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def time_torch_reference(spec: BenchSpec, repo: str, infer_batch: int, train_batch: int,
                         repeats: int) -> dict:
    """Times the official PyTorch model (from the checkout `repo`) in a subprocess, so its
    thread pool and imports stay out of this process: {'infer', 'infer_fused', 'train_step': ms}."""
    if not spec.torch_reference_module:
        raise ValueError(f"{spec.name}: no official PyTorch reference runner")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "torch.json")
        cmd = [sys.executable, "-m", spec.torch_reference_module, f"--repo={repo}", f"--variant={spec.variant}",
               f"--image_size={spec.image_size}", f"--infer_batch={infer_batch}",
               f"--train_batch={train_batch}", f"--repeats={repeats}", f"--out={out}"]
        # as users run the official code: without the malloc tunables launch.py gives our process
        env = dict(os.environ)
        env["GLIBC_TUNABLES"] = hostenv.without_ours(env.get("GLIBC_TUNABLES", ""))
        if not env["GLIBC_TUNABLES"]:
            del env["GLIBC_TUNABLES"]
        proc = subprocess.run(cmd, cwd=_root(), capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"official PyTorch benchmark from {repo} failed:\n{proc.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


def torch_records(spec: BenchSpec, repo: str, before: dict, after: dict, infer_batch: int,
                  train_batch: int) -> list[dict]:
    """Records like ours (what='torch_*') from timings taken before and after ours."""
    recs = []
    for key, batch in (("infer", infer_batch), ("infer_fused", infer_batch), ("train_step", train_batch)):
        r = _record(f"torch_{key}", batch, spec.image_size, before[key] + after[key])
        r["note"] = (f"official PyTorch {before['torch_version']} ({before['threads']} threads) from {repo}; "
                     "timed before and after ours")
        r["median_ms_before"] = float(statistics.median(before[key]))
        r["median_ms_after"] = float(statistics.median(after[key]))
        recs.append(r)
    return recs


def _comparable_to_reference(spec: BenchSpec, infer_batch: int, train_batch: int) -> dict[str, bool]:
    same_model = (spec.name == REFERENCE_SETTING["network"] and spec.variant == REFERENCE_SETTING["variant"]
                  and spec.image_size == REFERENCE_SETTING["image_size"])
    return {"infer": same_model and infer_batch == REFERENCE_SETTING["infer_batch"],
            "train": same_model and train_batch == REFERENCE_SETTING["train_batch"]}


def ratios(records: list[dict], spec: BenchSpec, infer_batch: int, train_batch: int) -> dict:
    by = {r["what"]: r for r in records}
    comp = _comparable_to_reference(spec, infer_batch, train_batch)
    out: dict[str, Any] = {}
    if "infer" in by and "onnx_infer" in by:
        out["onnx_over_jax_infer_time"] = by["onnx_infer"]["median_ms"] / by["infer"]["median_ms"]
        out["onnx_over_jax_infer_time_min"] = by["onnx_infer"]["min_ms"] / by["infer"]["min_ms"]
        out["onnx_faster_than_jax"] = by["onnx_infer"]["median_ms"] < by["infer"]["median_ms"]
    if "train_step" in by and "infer" in by and by["train_step"]["batch"]:
        per_img = lambda r: r["median_ms"] / r["batch"]  # noqa: E731
        out["train_over_infer_time_per_image"] = per_img(by["train_step"]) / per_img(by["infer"])
    lo, hi = REFERENCE_TORCH_YOLOV5S_INFER_MS
    tlo, thi = REFERENCE_TORCH_YOLOV5S_TRAIN_STEP_MS
    for what, key, (a, b), ok in (("infer", "jax_infer", (lo, hi), comp["infer"]),
                                  ("onnx_infer", "onnx_infer", (lo, hi), comp["infer"]),
                                  ("train_step", "jax_train_step", (tlo, thi), comp["train"])):
        r = by.get(what)
        if r is None:
            continue
        if ok:
            out[f"{key}_over_torch_reference"] = r["median_ms"] / ((a + b) / 2)
            out[f"{key}_over_torch_reference_upper"] = r["median_ms"] / b
            out[f"{key}_meets_target"] = r["median_ms"] <= b
        else:
            out[f"{key}_over_torch_reference"] = None
    for ours, theirs in (("infer", "torch_infer_fused"), ("onnx_infer", "torch_infer_fused"),
                         ("infer", "torch_infer"), ("train_step", "torch_train_step")):
        if ours in by and theirs in by:  # measured in this run: the figures to quote
            out[f"{ours}_over_{theirs}_measured"] = by[ours]["median_ms"] / by[theirs]["median_ms"]
    if comp["infer"] and by.get("infer", {}).get("flops"):
        out["xla_flops_over_official_gflops"] = by["infer"]["flops"] / (REFERENCE_YOLOV5S_GFLOPS_640 * 1e9)
    out["comparable_to_reference"] = comp
    return out


def _fmt(v, scale=1.0, digits=1):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v / scale:.{digits}f}"


def table(records: list[dict]) -> str:
    head = (f"{'what':24s} {'batch':>5s} {'size':>5s} {'median ms':>10s} {'min ms':>9s} {'img/s':>7s} "
            f"{'compile s':>9s} {'GFLOP':>7s} {'GFLOP/s':>8s} {'peak RSS MB':>11s}")
    lines = [head, "-" * len(head)]
    for r in records:
        lines.append(f"{r['what']:24s} {r['batch']:5d} {r['image_size']:5d} {_fmt(r['median_ms']):>10s} "
                     f"{_fmt(r['min_ms']):>9s} {_fmt(r['images_per_s'], digits=2):>7s} "
                     f"{_fmt(r['compile_s'], digits=2):>9s} {_fmt(r['flops'], 1e9, 2):>7s} "
                     f"{_fmt(r['flops_per_s'], 1e9, 1):>8s} {_fmt(r['peak_rss_mb'], digits=0):>11s}")
    return "\n".join(lines)


def benchmark(spec: BenchSpec, *, infer_batch: int, train_batch: int, repeats: int, warmup: int = 2,
              stages: Sequence[str] = ("infer", "onnx", "train"), out_dir: str | None = None,
              torch_repo: str = "") -> dict:
    """Measures the given stages of `spec`; returns {'records', 'ratios', 'recompilation', ...}."""
    counter = CompileCounter()
    records: list[dict] = []
    load_before = _load()
    t_start = time.perf_counter()
    torch_before = None
    if torch_repo:  # timed before and after ours: a slow drift of a shared machine cancels in the ratio
        torch_before = time_torch_reference(spec, torch_repo, infer_batch, train_batch, repeats)
    try:
        ref_out, infer_flops = None, None
        if "infer" in stages:
            rec = measure_infer(spec, infer_batch, repeats, warmup, counter)
            ref_out = rec.pop("_output")
            infer_flops = rec["flops"]
            records.append(rec)
        if "onnx" in stages:
            if out_dir is None:
                raise ValueError("the onnx stage needs out_dir")
            os.makedirs(out_dir, exist_ok=True)
            records.append(measure_onnx(spec, infer_batch, repeats, warmup, out_dir, ref_out, infer_flops))
        if "train" in stages:
            records.extend(measure_train_step(spec, train_batch, repeats, warmup, counter))
        if torch_repo:
            after = time_torch_reference(spec, torch_repo, infer_batch, train_batch, repeats)
            records.extend(torch_records(spec, torch_repo, torch_before, after, infer_batch, train_batch))
    finally:
        counter.close()
    recomp = {r["what"]: r["recompilation"] for r in records if "recompilation" in r}
    return {
        "records": records,
        "ratios": ratios(records, spec, infer_batch, train_batch),
        "recompilation": {"ok": all(v["ok"] for v in recomp.values()), **recomp},
        "reference": {
            "REFERENCE_TORCH_YOLOV5S_INFER_MS": list(REFERENCE_TORCH_YOLOV5S_INFER_MS),
            "REFERENCE_TORCH_YOLOV5S_TRAIN_STEP_MS": list(REFERENCE_TORCH_YOLOV5S_TRAIN_STEP_MS),
            "REFERENCE_YOLOV5S_GFLOPS_640": REFERENCE_YOLOV5S_GFLOPS_640,
            "REFERENCE_SETTING": REFERENCE_SETTING,
            "source": "issue figures for the official ultralytics PyTorch YOLOv5s on the same 2-core CPU "
                      "(benchmark.torch_repo measures it in this run instead); GFLOPs from the ultralytics README",
        },
        "model": {"network": spec.name, "variant": spec.variant, "image_size": spec.image_size, **spec.info},
        "settings": {"infer_batch": infer_batch, "train_batch": train_batch, "repeats": repeats,
                     "warmup": warmup, "stages": list(stages)},
        "environment": environment(),
        "load_average": {"before": load_before, "after": _load()},
        "wall_s": time.perf_counter() - t_start,
    }


def run(config, workdir: str) -> dict:
    """`--mode=benchmark`: measures, prints a table, writes `workdir/benchmark.json`."""
    b = config.benchmark
    spec = make_spec(config)
    result = benchmark(spec, infer_batch=int(b.batch_size), train_batch=int(b.train_batch_size),
                       repeats=max(int(b.repeats), 1), out_dir=os.path.join(workdir, "benchmark"),
                       torch_repo=b.get("torch_repo", ""))
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "benchmark.json")
    with open(path, "w") as f:
        json.dump(_jsonable(result), f, indent=2)
    print(f"== benchmark {spec.name} {spec.variant} @ {spec.image_size}px "
          f"(XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, {os.cpu_count()} CPUs)")
    print(table(result["records"]))
    if any(r.get("compile_cache_hit") for r in result["records"]):
        print(f"  (compile_s read from the persistent compilation cache {jax_cache_dir()})")
    r = result["ratios"]
    for k, v in r.items():
        if k != "comparable_to_reference" and v is not None:
            print(f"  {k:40s} {v:.3f}" if isinstance(v, float) else f"  {k:40s} {v}")
    print(f"  recompilation ok: {result['recompilation']['ok']}; written {path}")
    result["path"] = path
    return result


def jax_cache_dir() -> str | None:
    import jax
    return jax.config.jax_compilation_cache_dir or None


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


# ---------------------------------------------------------------------------------------------
# XLA:CPU flags study (separate processes: XLA reads XLA_FLAGS once, at backend start)

# Candidate settings, each tried alone first (an unknown flag makes XLA abort the process).
XLA_CANDIDATES: dict[str, str] = {
    "default": "",
    "eigen_single_thread": "--xla_cpu_multi_thread_eigen=false",
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "no_xnnpack": "--xla_cpu_use_xnnpack=false",
    "xnn_graph_greedy": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "xnn_fusion_dot_eltwise_reduce": "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce",
    "xnn_individual_conv": "--xla_cpu_experimental_xnn_fusion_type=individual_convolution",
    "ynn_individual_conv": "--xla_cpu_experimental_ynn_fusion_type=individual_convolution",
    "ynn_individual_conv_dot": "--xla_cpu_experimental_ynn_fusion_type=individual_convolution,individual_dot",
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn_fusion_dot_eltwise": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot,eltwise",
    "opt_preset_fast_runtime": "--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME",
    "opt_preset_fast_compile": "--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_COMPILE",
    "backend_opt_level_0": "--xla_backend_optimization_level=0",
    "llvm_no_expensive_passes": "--xla_llvm_disable_expensive_passes=true",
    "scheduler_memory": "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
    "scheduler_concurrency": "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED",
    "thunk_runtime_false": "--xla_cpu_use_thunk_runtime=false",
    "not_a_flag_intra_op": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
}
# Probed only, to record what this jaxlib rejects (each aborts the process when used).
PROBE_ONLY: dict[str, str] = {
    "intra_op_alone": "intra_op_parallelism_threads=1",
    "intra_op_dashed": "--intra_op_parallelism_threads=1",
    "disable_new_fusion_emitters": "--xla_cpu_disable_new_fusion_emitters=true",
    "use_multi_output_fusion": "--xla_cpu_use_multi_output_fusion=true",
    "bad_xnn_fusion_type_value": "--xla_cpu_experimental_xnn_fusion_type=bogus",
}
# Options aimed at compile time (tests compile the tiny model at 64 px over and over).
COMPILE_CANDIDATES: dict[str, str] = {
    "default": "",
    "backend_opt_level_0": "--xla_backend_optimization_level=0",
    "backend_opt_level_1": "--xla_backend_optimization_level=1",
    "llvm_no_expensive_passes": "--xla_llvm_disable_expensive_passes=true",
    "opt_preset_fast_compile": "--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_COMPILE",
    "opt0_and_no_expensive": "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
    "parallel_codegen_split_1": "--xla_cpu_parallel_codegen_split_count=1",
    "parallel_codegen_split_2": "--xla_cpu_parallel_codegen_split_count=2",
    "no_xnnpack": "--xla_cpu_use_xnnpack=false",
}

_PROBE = r"""
import numpy as np, jax, jax.numpy as jnp
def f(w, x):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = jax.nn.silu(y)
    return (y.reshape(2, -1) @ jnp.ones((y.size // 2, 4))).sum() + jax.nn.sigmoid(y).max()
x = jnp.asarray(np.random.RandomState(0).rand(2, 16, 16, 8), jnp.float32)
w = jnp.asarray(np.random.RandomState(1).rand(3, 3, 8, 16) * 0.1, jnp.float32)
v, g = jax.jit(jax.value_and_grad(f))(w, x)
print("PROBE_OK", float(v), float(jnp.abs(g).sum()))
"""


def _root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def probe_flags(flags: str, timeout: float = 300) -> dict:
    """Runs a small conv + grad under XLA_FLAGS=flags in a subprocess; accepted flags exit 0."""
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=timeout)
    ok = p.returncode == 0 and "PROBE_OK" in p.stdout
    msg = ""
    for line in (p.stderr or "").splitlines():
        if any(s in line for s in ("Unknown flag", "Illegal value", "no longer supported", "Could not open",
                                   "Check failed", "rror")):
            msg = line.split("] ", 1)[-1][:300]
            break
    value = p.stdout.split("PROBE_OK", 1)[1].split() if ok else None
    return {"flags": flags, "accepted": ok, "returncode": p.returncode, "message": msg,
            "probe_values": [float(v) for v in value] if value else None}


def _worker_main(args) -> None:
    """One measurement under this process's XLA_FLAGS (called in a subprocess)."""
    from configs.yolov5 import get_config

    config = get_config(args.config_arg or None)
    config.benchmark.variant = args.variant
    config.benchmark.image_size = args.image_size
    config.benchmark.train_batch_size = args.train_batch
    config.benchmark.batch_size = args.infer_batch
    t0 = time.perf_counter()
    spec = make_spec(config)
    spec_s = time.perf_counter() - t0
    stages = [s for s in args.stages.split(",") if s]
    res = benchmark(spec, infer_batch=args.infer_batch, train_batch=args.train_batch, repeats=args.repeats,
                    warmup=args.warmup, stages=stages, out_dir=args.out_dir or None)
    res["spec_build_s"] = spec_s
    with open(args.out, "w") as f:
        json.dump(_jsonable(res), f, indent=2)


def _run_worker(flags: str, *, variant: str, image_size: int, stages: str, repeats: int, infer_batch: int,
                train_batch: int, warmup: int = 2, extra_env: dict | None = None, timeout: float = 3600) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "res.json")
        env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
        env.pop("JAX_COMPILATION_CACHE_DIR", None)  # compile times are cold unless extra_env says otherwise
        env.update(extra_env or {})
        cmd = [sys.executable, "-m", "research.benchmark", "--worker", f"--out={out}", f"--variant={variant}",
               f"--image_size={image_size}", f"--stages={stages}", f"--repeats={repeats}",
               f"--infer_batch={infer_batch}", f"--train_batch={train_batch}", f"--warmup={warmup}"]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, env=env, cwd=_root(), capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - t0
        if p.returncode != 0 or not os.path.exists(out):
            return {"flags": flags, "error": (p.stderr or p.stdout)[-2000:], "returncode": p.returncode,
                    "process_wall_s": wall}
        with open(out) as f:
            res = json.load(f)
    res["process_wall_s"] = wall
    return res


def _summary(res: dict) -> dict:
    if "error" in res:
        return {"error": res["error"][-400:]}
    s = {}
    for r in res["records"]:
        s[r["what"]] = {k: r.get(k) for k in ("median_ms", "min_ms", "cpu_ms_per_call", "compile_s", "flops_per_s",
                                              "peak_rss_mb")}
    s["load_average"] = res.get("load_average")
    s["process_wall_s"] = res.get("process_wall_s")
    s["recompilation_ok"] = res["recompilation"]["ok"]
    return s


def xla_flags_study(args) -> dict:
    """Probes candidate XLA_FLAGS, times yolov5 inference / train step and tiny compile times."""
    report: dict[str, Any] = {"environment": environment(), "settings": vars(args).copy(), "probe": {},
                              "runtime": {}, "compile_tiny": {}}
    names = [n for n in (args.candidates.split(",") if args.candidates else XLA_CANDIDATES)]
    cnames = [n for n in (args.compile_candidates.split(",") if args.compile_candidates else COMPILE_CANDIDATES)]
    out = args.out or os.path.join(_root(), "workdirs", "benchmark", "xla_flags_study.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    def save():
        with open(out, "w") as f:
            json.dump(_jsonable(report), f, indent=2)

    allflags = {**XLA_CANDIDATES, **COMPILE_CANDIDATES, **PROBE_ONLY}
    to_probe = ([] if args.skip_runtime else names) + ([] if args.skip_compile else cnames)
    for name in dict.fromkeys(to_probe + ([] if args.skip_probe_only else list(PROBE_ONLY))):
        flags = allflags[name]
        if name in report["probe"] or not flags:
            report["probe"][name] = {"flags": flags, "accepted": True}
            continue
        report["probe"][name] = probe_flags(flags)
        print(f"probe {name:32s} accepted={report['probe'][name]['accepted']} "
              f"{report['probe'][name]['message']}", flush=True)
    save()
    if not args.skip_runtime:
        for rnd in range(args.rounds):
            for name in names:
                if not report["probe"][name]["accepted"]:
                    continue
                res = _run_worker(XLA_CANDIDATES[name], variant=args.variant, image_size=args.image_size,
                                  stages=args.study_stages, repeats=args.repeats, infer_batch=args.infer_batch,
                                  train_batch=args.train_batch)
                s = _summary(res)
                report["runtime"].setdefault(name, {"flags": XLA_CANDIDATES[name], "rounds": []})["rounds"].append(s)
                print(f"[round {rnd}] {name:32s} " + ("  ".join(
                    f"{w} {s[w]['median_ms']:.1f} ms (cpu {s[w]['cpu_ms_per_call'] or 0:.0f} ms, compile "
                    f"{s[w]['compile_s']:.1f} s)" for w in ("infer", "train_step") if w in s)
                    if "error" not in s else f"ERROR {s['error'][-200:]}") + f"  load {s.get('load_average')}",
                    flush=True)
                save()
        whats = tuple(w for w, st in (("infer", "infer"), ("train_step", "train")) if st in args.study_stages)
        report["runtime_summary"] = _aggregate(report["runtime"], whats)
    if not args.skip_compile:
        for rnd in range(args.rounds):
            for name in cnames:
                if not report["probe"][name]["accepted"]:
                    continue
                res = _run_worker(COMPILE_CANDIDATES[name], variant="tiny", image_size=64, stages="infer,train",
                                  repeats=3, infer_batch=1, train_batch=2, warmup=1)
                s = _summary(res)
                report["compile_tiny"].setdefault(name, {"flags": COMPILE_CANDIDATES[name], "rounds": []})[
                    "rounds"].append(s)
                print(f"[round {rnd}] tiny64 {name:26s} " + (
                    f"compile infer {s['infer']['compile_s']:.2f} s train {s['train_step']['compile_s']:.2f} s; "
                    f"run infer {s['infer']['median_ms']:.1f} ms train {s['train_step']['median_ms']:.1f} ms; "
                    f"process {s['process_wall_s']:.1f} s" if "error" not in s else f"ERROR {s['error'][-200:]}"),
                    flush=True)
                save()
            # the persistent compilation cache: a cold run fills it, a second process reads it
            cache = tempfile.mkdtemp(prefix="jax_cc_")
            try:
                extra = {"JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
                for phase in ("persistent_cache_cold", "persistent_cache_warm"):
                    res = _run_worker("", variant="tiny", image_size=64, stages="infer,train", repeats=3,
                                      infer_batch=1, train_batch=2, warmup=1, extra_env=extra)
                    s = _summary(res)
                    report["compile_tiny"].setdefault(phase, {"flags": "", "env": extra, "rounds": []})[
                        "rounds"].append(s)
                    print(f"[round {rnd}] tiny64 {phase:26s} " + (
                        f"compile infer {s['infer']['compile_s']:.2f} s train {s['train_step']['compile_s']:.2f} s; "
                        f"process {s['process_wall_s']:.1f} s" if "error" not in s else f"ERROR {s['error'][-200:]}"),
                        flush=True)
                    save()
            finally:
                shutil.rmtree(cache, ignore_errors=True)
        report["compile_summary"] = _aggregate(report["compile_tiny"], ("infer", "train_step"))
    save()
    print_study(report)
    print(f"written {out}")
    return report


def _aggregate(runs: dict, whats: Sequence[str]) -> dict:
    """Per candidate: min over rounds of each round's median (noise from other processes only adds)."""
    out = {}
    for name, v in runs.items():
        rounds = [r for r in v["rounds"] if "error" not in r]
        if not rounds:
            out[name] = {"error": True}
            continue
        agg = {"flags": v["flags"]}
        for w in whats:
            agg[f"{w}_ms"] = min(r[w]["median_ms"] for r in rounds)
            agg[f"{w}_min_ms"] = min(r[w]["min_ms"] for r in rounds)
            cpu = [r[w]["cpu_ms_per_call"] for r in rounds if r[w].get("cpu_ms_per_call")]
            agg[f"{w}_cpu_ms"] = min(cpu) if cpu else None  # os.times ticks are 10 ms: tiny calls read 0
            agg[f"{w}_compile_s"] = min(r[w]["compile_s"] for r in rounds)
        agg["process_wall_s"] = min(r["process_wall_s"] for r in rounds)
        out[name] = agg
    base = out.get("default")
    if base and "error" not in base:
        for name, agg in out.items():
            if "error" in agg:
                continue
            for w in whats:
                for key, suffix in (("ms", "ms"), ("cpu_ms", "cpu"), ("compile_s", "compile")):
                    num, den = agg[f"{w}_{key}"], base[f"{w}_{key}"]
                    agg[f"{w}_{suffix}_over_default"] = num / den if num is not None and den else None
    return out


def print_study(report: dict) -> None:
    def f(v, w=6, d=2):
        return f"{v:{w}.{d}f}" if isinstance(v, (int, float)) else f"{'-':>{w}s}"

    for key, title in (("runtime_summary", "yolov5 runtime"), ("compile_summary", "tiny 64px compile")):
        summ = report.get(key)
        if not summ:
            continue
        print(f"== {title} (min over rounds of medians; x = ratio to default)")
        print(f"{'candidate':32s} {'infer ms':>9s} {'x':>6s} {'cpu x':>6s} {'train ms':>9s} {'x':>6s} {'cpu x':>6s} "
              f"{'infer comp s':>12s} {'train comp s':>12s} {'x':>6s}")
        for name, a in summ.items():
            if "error" in a:
                print(f"{name:32s} error")
                continue
            a = collections.defaultdict(lambda: None, a)
            print(f"{name:32s} {f(a['infer_ms'], 9, 1)} {f(a.get('infer_ms_over_default'))} "
                  f"{f(a.get('infer_cpu_over_default'))} {f(a['train_step_ms'], 9, 1)} "
                  f"{f(a.get('train_step_ms_over_default'))} {f(a.get('train_step_cpu_over_default'))} "
                  f"{f(a['infer_compile_s'], 12)} {f(a['train_step_compile_s'], 12)} "
                  f"{f(a.get('train_step_compile_over_default'))}")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--xla_flags_study", action="store_true", help="probe and time candidate XLA_FLAGS")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="s")
    p.add_argument("--image_size", type=int, default=640)
    p.add_argument("--infer_batch", type=int, default=1)
    p.add_argument("--train_batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="study: repeat every candidate this many times")
    p.add_argument("--candidates", default="", help=f"study: comma list of {sorted(XLA_CANDIDATES)}")
    p.add_argument("--compile_candidates", default="", help=f"study: comma list of {sorted(COMPILE_CANDIDATES)}")
    p.add_argument("--skip_runtime", action="store_true")
    p.add_argument("--skip_compile", action="store_true")
    p.add_argument("--skip_probe_only", action="store_true", help="study: do not probe the known-bad flags")
    p.add_argument("--stages", default="infer,train", help="worker: stages to measure")
    p.add_argument("--study_stages", default="infer,train", help="study: 'infer' screens flags fast")
    p.add_argument("--config_arg", default="", help="worker: configs/yolov5.py argument, e.g. 'smoke'")
    p.add_argument("--out", default="")
    p.add_argument("--out_dir", default="")
    args = p.parse_args(argv)
    if args.worker:
        _worker_main(args)
    elif args.xla_flags_study:
        xla_flags_study(args)
    else:
        p.error("use --xla_flags_study (the benchmark itself is --mode=benchmark of launch.py)")


if __name__ == "__main__":
    if _root() not in sys.path:
        sys.path.insert(0, _root())
    main()
