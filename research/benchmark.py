r"""The benchmark harness (`--mode=benchmark`), the same for every network.

    python launch.py --config=configs/yolov5.py --workdir=workdirs/bench --mode=benchmark

`run(config, workdir)` asks the network's task for its `BenchSpec` (`Task.benchmark_spec`, built
in the network's package from the real task: `research/yolov5/benchmark.py`) at
`config.benchmark.variant` / `config.benchmark.image_size` and measures, each with warmup and
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

A `BenchSpec` gives the model variables, named example inputs (any number and rank: SiamFC's
exemplar and search crops, RT-DETR's images and sizes), the inference and export functions, the
loss/optimiser/EMA of the real task and a synthetic training batch.

The official PyTorch model can be timed in the same run, before and after ours, so that the
ratios are measured on one machine at one time: `--config.benchmark.torch_repo=PATH` (a clone of
the official repository) runs the spec's `torch_reference_module` in the interpreter
`--config.benchmark.torch_python` (default: this one), so the official code's own requirements
need not be installed into this environment. Without it, a spec's `reference` figures (measured
once for that model on the same 2-core CPU) give the `*_over_torch_reference` ratios when the
benchmark is at their setting. A runner that keeps its ONNX exports (`official_runner.onnx_times_ms(keep_as=)`)
also gets them timed in turn with our exported graph in one ONNX Runtime process (`alternate_onnx`; records
`alternated_*`, ratios `onnx_infer_over_torch_<name>_alternated`): the ONNX comparison least moved by the
machine's drift. A spec whose runner serves its train step (`torch_serves`, `official_runner.serve`; and its
inference, where it serves `infer`) also gets our step and the official one called in turn, each process idle
while the other runs (`TorchServer`, `alternate_with_official`; records `alternated_train_step` /
`alternated_torch_train_step`, ratio `train_step_over_torch_train_step_alternated`, and `alternated_infer` /
`alternated_torch_infer` alike): the comparison to quote, where the before / after
timings of two processes minutes apart moved by +-10% on a shared 2-core machine. Each alternated ratio also comes
as `..._alternated_paired`, the median over rounds of that round's ours / official (a slow drift cancels within a
round). The XLA:CPU flags study that chose our defaults is `tools/xla_flags_study.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from research import official_runner
from research.cpu import hostenv

MB = 1024.0 * 1024.0


# ---------------------------------------------------------------------------------------------
# What a network provides


@dataclasses.dataclass
class BenchSpec:
    """The network-specific part of the benchmark (built in the network's package).

    variables: model variables ({'params', 'batch_stats'?}), numpy or jax arrays.
    make_inputs: batch size -> {name: array} of example model inputs (deterministic).
    infer_fn: (variables, **inputs) -> output pytree; jit-able.
    export_fn: what the ONNX export traces (same signature; default infer_fn).
    make_batch: batch size -> dict of numpy arrays fed to `train_step` (synthetic).
    loss_fn, tx, ema_decay, use_ema, accumulates: as the task gives them to
      `trainer.train_step` / `trainer.create_train_state`.
    reference: figures of the official PyTorch model measured once on the reference machine:
      {'setting': {'variant', 'image_size', 'infer_batch', 'train_batch'}, 'infer_ms': (lo, hi),
      'train_step_ms': (lo, hi), 'gflops': float, 'source': str}; None when there are none.
    torch_reference_module: module with a `main(argv)` that times the official PyTorch model from
      a local checkout (--repo --variant --image_size --infer_batch --train_batch --repeats --out).
      Its json maps each measurement to a list of ms per call: `infer`, `infer_fused`,
      `train_step`, and any of the network's own (e.g. `tracker_frame`); `batches` may give
      the batch of a measurement other than infer*/train* (default 1).
    extra_stages: the network's own measurements (stage `extra`): `(repeats, warmup) -> list of
      records` made with `record(...)` (SiamFC's template/search branches and tracker frames,
      HigherHRNet's grouping, RT-DETR's matcher).
    torch_args: more arguments for the official runner (e.g. `--tracker_frames=24`, so both sides
      time the same work).
    measured_pairs: more (ours, theirs) record names whose same-run time ratio is reported as
      `<ours>_over_<theirs>_measured` (e.g. ('tracker_frame', 'torch_tracker_frame')).
    onnx_channels_first: the ONNX stage exports NCHW images (`config.export.channels_first`, set by `make_spec`).
    torch_serves: the steps the official runner also serves with `--serve` (`official_runner.serve`), timed in turn
      with ours (`alternate_with_official`): 'train_step' (our trainer step), 'infer' (our jitted `infer_fn`, the
      runner's eval forward at `infer_batch`; records `alternated_infer` / `alternated_torch_infer`).
    """

    name: str
    variant: str
    image_size: int
    variables: dict
    make_inputs: Callable[[int], dict]
    infer_fn: Callable[..., Any]
    make_batch: Callable[[int], dict]
    loss_fn: Callable
    tx: Any
    ema_decay: Callable | None
    use_ema: bool
    accumulates: bool = False
    onnx_output_names: Sequence[str] | None = None
    export_fn: Callable[..., Any] | None = None
    torch_reference_module: str | None = None
    reference: dict | None = None
    info: dict = dataclasses.field(default_factory=dict)
    extra_stages: Callable[[int, int], list[dict]] | None = None
    measured_pairs: tuple[tuple[str, str], ...] = ()
    torch_args: tuple[str, ...] = ()
    torch_serves: tuple[str, ...] = ()
    onnx_channels_first: bool = False


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


def make_spec(config, *, variant: str | None = None, image_size: int | None = None) -> BenchSpec:
    """The `BenchSpec` of `config.network` from its task class (`Task.benchmark_spec`)."""
    from research import tasks
    variant = variant or config.benchmark.variant
    image_size = int(image_size or config.benchmark.image_size)
    spec = tasks.task_class(config.network).benchmark_spec(config, variant=variant, image_size=image_size)
    return dataclasses.replace(spec, onnx_channels_first=bool(config.export.get("channels_first", False)))


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


def record(what: str, batch: int, image_size: int, times_ms: list[float], cpu_ms: float | None = None,
           **extra) -> dict:
    """One benchmark record: `what`, batch, image size (pixels) and the per-call times (ms, with
    median/min/max and images per second); `extra` adds fields (flops, notes, shares)."""
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


def measure_infer(spec: BenchSpec, batch: int, repeats: int, warmup: int, counter: CompileCounter,
                  keep: dict | None = None) -> dict:
    """Our jitted `infer_fn`; `keep`, when given, receives it as `keep['call'](i)` for later timings."""
    import jax
    import jax.numpy as jnp

    s = spec.image_size
    inputs = {k: jnp.asarray(v) for k, v in spec.make_inputs(batch).items()}
    variables = jax.tree_util.tree_map(jnp.asarray, spec.variables)
    fwd = jax.jit(lambda v, inputs: spec.infer_fn(v, **inputs))
    with RssSampler() as rss:
        compiled, lower_s, compile_s, hit = _aot(fwd, variables, inputs)
        _block(fwd(variables, inputs))  # first call
        size_first = fwd._cache_size()
        counter.start()
        times, cpu_ms = time_calls(lambda i: fwd(variables, inputs), repeats, max(warmup - 1, 0))
        n_compiles = counter.stop()
    size_end = fwd._cache_size()
    rec = record("infer", batch, s, times, cpu_ms, compile_s=compile_s, lower_s=lower_s, compile_cache_hit=hit,
                  flops=_cost_flops(compiled),
                  xla_memory=_memory_analysis(compiled), **rss.record())
    rec["recompilation"] = {"jit_cache_size_after_first_call": size_first, "jit_cache_size_end": size_end,
                            "backend_compiles_after_first_call": n_compiles,
                            "ok": size_end == size_first == 1 and n_compiles == 0}
    out = jax.tree_util.tree_leaves(fwd(variables, inputs))
    rec["_output"] = np.asarray(out[0])  # for the ONNX check, dropped from the json
    if keep is not None:
        keep["call"] = lambda i: fwd(variables, inputs)
    return rec


def measure_train_step(spec: BenchSpec, batch: int, repeats: int, warmup: int,
                       counter: CompileCounter, keep: dict | None = None) -> list[dict]:
    """The trainer's step (same jit, donation and sharding as `trainer.train_and_evaluate`); `keep`, when given,
    receives the step as `keep['call'](i)` (an update every call) for later timings."""
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
    rec = record("train_step", batch, s, times, cpu_ms, **common, **rss.record())
    rec["loss_first_step"] = loss_first
    rec["note"] = "forward + backward + optimiser update + EMA every call (trainer.train_step, do_update=True)"
    rec["recompilation"] = {"jit_cache_size_after_first_call": size_first, "jit_cache_size_end": size_end,
                            "backend_compiles_after_first_call": n_compiles + n_compiles_acc,
                            "ok": size_end == size_first == 1 and n_compiles + n_compiles_acc == 0,
                            "checked": "hyper-parameters change every call; do_update True then False"}
    acc = record("train_step_accumulate", batch, s, times_acc, cpu_acc, **common)
    acc["note"] = ("same compiled step with do_update=False (gradient accumulation only); flops are the "
                   "whole step's (XLA counts both cond branches), so no flops_per_s")
    acc["flops_per_s"] = None
    acc["recompilation"] = rec["recompilation"]
    if keep is not None:
        keep["call"] = call
    return [rec, acc]


def measure_onnx(spec: BenchSpec, batch: int, repeats: int, warmup: int, out_dir: str,
                 reference: np.ndarray | None, flops: float | None) -> dict:
    """Exports `export_fn` (dynamic batch and, with `spec.onnx_channels_first`, NCHW images, as `--mode=export`)
    and times ONNX Runtime's CPU session (inputs put in the graph's layout before the timed calls)."""
    import jax

    from research.bridge.onnx_export import OnnxRunner, export_onnx
    s = spec.image_size
    variables = jax.tree_util.tree_map(np.asarray, spec.variables)
    path = os.path.join(out_dir, f"{spec.name}_{spec.variant}_{s}.onnx")
    with RssSampler() as rss:
        t0 = time.perf_counter()
        fn = spec.export_fn or spec.infer_fn
        inputs = spec.make_inputs(batch)
        export_onnx(lambda **kw: fn(variables, **kw), {k: np.zeros((1,) + v.shape[1:], v.dtype) for k, v in inputs.items()},
                    path, dynamic_batch=True, output_names=spec.onnx_output_names,
                    channels_first=spec.onnx_channels_first)
        export_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        runner = OnnxRunner(path)
        session_s = time.perf_counter() - t0
        inputs = _feed(runner.session, inputs)
        times, cpu_ms = time_calls(lambda i: runner(**inputs), repeats, warmup)
    rec = record("onnx_infer", batch, s, times, cpu_ms, compile_s=session_s, flops=flops, **rss.record())
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
        got = runner(**inputs)[0]
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
                         repeats: int, python: str = "", onnx_dir: str = "") -> dict:
    """Times the official PyTorch model (from the checkout `repo`) in a subprocess of the
    interpreter `python` (default: this one; an environment with the official requirements), so
    its thread pool and imports stay out of this process: {'infer', 'infer_fused', 'train_step': ms}.
    With `onnx_dir`, the runner leaves its ONNX exports there (`official_runner.ONNX_DIR_ENV`).

    Raises:
      ValueError: the spec has no official runner; RuntimeError: the official run failed.
    """
    if not spec.torch_reference_module:
        raise ValueError(f"{spec.name}: no official PyTorch reference runner")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "torch.json")
        cmd, env = _torch_command(spec, repo, infer_batch, train_batch, repeats, python, out)
        if onnx_dir:
            env[official_runner.ONNX_DIR_ENV] = onnx_dir
        proc = subprocess.run(cmd, cwd=_root(), capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"official PyTorch benchmark from {repo} failed:\n{proc.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


def _torch_command(spec: BenchSpec, repo: str, infer_batch: int, train_batch: int, repeats: int, python: str,
                   out: str, serve: bool = False) -> tuple[list[str], dict]:
    """(command, environment) of the spec's official runner (see `time_torch_reference`)."""
    cmd = [python or sys.executable, "-m", spec.torch_reference_module, f"--repo={repo}", f"--variant={spec.variant}",
           f"--image_size={spec.image_size}", f"--infer_batch={infer_batch}",
           f"--train_batch={train_batch}", f"--repeats={repeats}", f"--out={out}", *spec.torch_args]
    if serve:
        cmd.append("--serve")
    # as users run the official code: without the malloc tunables launch.py gives our process
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = hostenv.without_ours(env.get("GLIBC_TUNABLES", ""))
    if not env["GLIBC_TUNABLES"]:
        del env["GLIBC_TUNABLES"]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_root(), env.get("PYTHONPATH", "")) if p)
    return cmd, env


class TorchServer:
    """The spec's official runner kept running with `--serve` (`official_runner.serve`): `time(name, n)` has it
    call its `name` step n times and returns the wall times (ms). The process is idle between requests, so its
    timings and ours, taken in turn, never share the cores.

    Raises (on entry or `time`):
      RuntimeError: the runner exited, or answered with an error (its stderr's tail in the message).
    """

    def __init__(self, cmd: Sequence[str], env: dict):
        self.cmd, self.env = list(cmd), env
        self.proc: subprocess.Popen | None = None
        self.ready: dict = {}
        self._err = tempfile.TemporaryFile(mode="w+")

    def __enter__(self) -> "TorchServer":
        self.proc = subprocess.Popen(self.cmd, cwd=_root(), env=self.env, text=True, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._err)
        try:
            self.ready = self._answer()
            if "ready" not in self.ready:
                raise RuntimeError(f"official runner did not start serving: {self.ready}")
        except BaseException:
            self.__exit__()
            raise
        return self

    def _answer(self) -> dict:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:  # the official code's own prints are skipped
            if line.startswith(official_runner.SERVE_PREFIX):
                msg = json.loads(line[len(official_runner.SERVE_PREFIX):])
                if "error" in msg:
                    raise RuntimeError(f"official runner: {msg['error']}")
                return msg
        self.proc.wait()
        self._err.seek(0)
        raise RuntimeError(f"official runner {' '.join(self.cmd[:3])} exited ({self.proc.returncode}):\n"
                           f"{self._err.read()[-3000:]}")

    def time(self, name: str, n: int = 1) -> list[float]:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(f"{name} {int(n)}\n")
        self.proc.stdin.flush()
        return [float(t) for t in self._answer()["times_ms"]]

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            try:
                if self.proc.poll() is None and self.proc.stdin is not None:
                    self.proc.stdin.write("quit\n")
                    self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._err.close()


def alternate_with_official(server: TorchServer, ours: dict[str, Callable[[int], Any]], rounds: int,
                            warmup: int = 1) -> dict:
    """Each named step of ours and the official runner's step of the same name (`server`) called in turn, one call
    each per round, the order alternating every round: the train-step analogue of `alternate_onnx` (two processes,
    one of them idle at any time, so a drift of a shared machine touches both alike).

    Args:
      ours: name -> our call (given the call index; its result is blocked on), e.g. {'train_step': ...}.
      rounds: timed calls of each; warmup: untimed calls of each first.

    Returns:
      {name: {'ours': [ms], 'official': [ms]}, 'rounds', 'note'}.
    """
    out: dict[str, Any] = {}
    for name, call in ours.items():
        for i in range(warmup):
            _block(call(i))
            server.time(name, 1)
        mine, theirs = [], []
        for r in range(rounds):
            for side in (("ours", "official") if r % 2 == 0 else ("official", "ours")):
                if side == "ours":
                    t0 = time.perf_counter()
                    _block(call(warmup + r))
                    mine.append((time.perf_counter() - t0) * 1000.0)
                else:
                    theirs.extend(server.time(name, 1))
        out[name] = {"ours": mine, "official": theirs}
    out["rounds"] = rounds
    out["note"] = ("ours and the official runner's step (a served subprocess, idle meanwhile) called in turn, "
                   "one call each per round, order alternating")
    return out


def _alternated_official(spec: BenchSpec, repo: str, python: str, calls: dict[str, tuple[Callable[[int], Any], int]],
                      infer_batch: int, train_batch: int) -> list[dict]:
    """Records `alternated_<name>` / `alternated_torch_<name>` for each served name in `calls` (name -> (our call,
    rounds); `train_step`, and `infer` where the runner serves it): ours and the official runner's served call in
    turn (`alternate_with_official`), one runner process for all of them."""
    cmd, env = _torch_command(spec, repo, infer_batch, train_batch, 1, python, out="", serve=True)
    recs = []
    with TorchServer(cmd, env) as server:
        version = server.ready.get("torch_version", "?")
        for name, (call, rounds) in calls.items():
            alt = alternate_with_official(server, {name: call}, rounds)
            batch = infer_batch if name.startswith("infer") else train_batch
            for side, what in (("ours", f"alternated_{name}"), ("official", f"alternated_torch_{name}")):
                r = record(what, batch, spec.image_size, alt[name][side])
                r["note"] = alt["note"] + ("" if side == "ours" else f"; official PyTorch {version} from {repo}")
                recs.append(r)
    return recs


def torch_records(spec: BenchSpec, repo: str, before: dict, after: dict, infer_batch: int,
                  train_batch: int) -> list[dict]:
    """Records like ours (what='torch_*') from timings taken before and after ours."""
    recs = []
    batches = dict(before.get("batches", {}))
    for key in before:
        timings = (before[key], after.get(key))
        if not all(isinstance(t, list) and t and all(isinstance(v, (int, float)) for v in t) for t in timings):
            continue  # not a timing (a version, a note, a list of names)
        batch = batches.get(key, infer_batch if key.startswith("infer") else
                            train_batch if key.startswith("train") else 1)
        r = record(f"torch_{key}", batch, spec.image_size, before[key] + after[key])
        r["note"] = (f"official PyTorch {before['torch_version']} ({before['threads']} threads) from {repo}; "
                     "timed before and after ours")
        r["median_ms_before"] = float(statistics.median(before[key]))
        r["median_ms_after"] = float(statistics.median(after[key]))
        recs.append(r)
    return recs


def _feed(session, inputs: dict) -> dict:
    """`inputs` (ours: NHWC images and the like) for an ONNX session, by input name; a 4-D NHWC array is
    transposed where the graph takes NCHW (the official graphs, a channels-first export: `to_graph_layout`)."""
    from research.bridge.onnx_export import to_graph_layout
    feed = {}
    for i in session.get_inputs():
        if i.name not in inputs:
            raise ValueError(f"the graph's input {i.name!r} is not among ours ({sorted(inputs)})")
        x = to_graph_layout(np.asarray(inputs[i.name]), list(i.shape))
        feed[i.name] = np.ascontiguousarray(x, dtype=np.float32 if x.dtype == np.float64 else x.dtype)
    return feed


def alternation_session_options():
    """ONNX Runtime session options for graphs called in turn in one process: the defaults, but intra-op threads
    that do not spin once a call ends.

    Each session has its own intra-op thread pool, whose threads spin for a while after a call by default: the
    graph called next then shares the cores with the previous graph's spinning threads. On the 2-core machine this
    put both graphs' medians ~50% above their timed-apart figures, the fastest calls unchanged, and the ratio
    swung 1.00-1.13x between three runs of the same two YOLOv5s graphs; without spinning each call had the cores to
    itself (medians within 5% of the fastest calls, the ratio 1.02-1.04x in three runs).
    """
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def alternate_onnx(ours: str, theirs: dict[str, str], inputs: dict, rounds: int, warmup: int = 2) -> dict:
    """Our exported graph and the official exports timed in turn in one ONNX Runtime process (default session
    settings for all, except that idle intra-op threads do not spin: `alternation_session_options`), the order
    rotating every round: a drift of a shared machine then touches each graph alike, which timing them minutes
    apart in two processes does not guarantee (same graph, +-10% between such runs here).

    Args:
      ours: our .onnx; theirs: name -> an official .onnx (e.g. 'onnx_infer', 'onnx_infer_dynamic').
      inputs: our example inputs, name -> array (`BenchSpec.make_inputs`); see `_feed` for the official layout.
      rounds: calls of each graph; warmup: untimed calls of each first.

    Returns:
      {'ours': {median_ms, min_ms, times_ms}, '<name>': {...}, 'rounds', 'note'}.
    """
    import onnxruntime as ort
    paths = {"ours": ours, **theirs}
    options = alternation_session_options()
    sessions = {k: ort.InferenceSession(p, sess_options=options, providers=["CPUExecutionProvider"])
                for k, p in paths.items()}
    feeds = {k: _feed(s, inputs) for k, s in sessions.items()}
    for k, s in sessions.items():
        for _ in range(warmup):
            s.run(None, feeds[k])
    names = list(paths)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            sessions[k].run(None, feeds[k])
            times[k].append((time.perf_counter() - t0) * 1000.0)
    out: dict[str, Any] = {k: {"median_ms": float(statistics.median(v)), "min_ms": float(min(v)), "times_ms": v}
                           for k, v in times.items()}
    out["rounds"] = rounds
    out["note"] = ("one ONNX Runtime process, default session options but intra-op threads not spinning between "
                   "calls, graphs called in turn (rotating order)")
    return out


def _comparable_to_reference(spec: BenchSpec, infer_batch: int, train_batch: int) -> dict[str, bool]:
    ref = (spec.reference or {}).get("setting")
    if not ref:
        return {"infer": False, "train": False}
    same_model = spec.variant == ref["variant"] and spec.image_size == ref["image_size"]
    return {"infer": same_model and infer_batch == ref["infer_batch"],
            "train": same_model and train_batch == ref["train_batch"]}


def ratios(records: list[dict], spec: BenchSpec, infer_batch: int, train_batch: int) -> dict:
    """Same-run ratios (ONNX vs JAX, ours vs official torch when timed) and, at the spec's
    reference setting, ratios to its reference figures."""
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
    ref = spec.reference or {}
    for what, key, span, ok in (("infer", "jax_infer", ref.get("infer_ms"), comp["infer"]),
                                ("onnx_infer", "onnx_infer", ref.get("infer_ms"), comp["infer"]),
                                ("train_step", "jax_train_step", ref.get("train_step_ms"), comp["train"])):
        r = by.get(what)
        if r is None:
            continue
        if ok and span:
            a, b = span
            out[f"{key}_over_torch_reference"] = r["median_ms"] / ((a + b) / 2)
            out[f"{key}_over_torch_reference_upper"] = r["median_ms"] / b
            out[f"{key}_meets_target"] = r["median_ms"] <= b
        else:
            out[f"{key}_over_torch_reference"] = None
    for ours, theirs in (("infer", "torch_infer_fused"), ("onnx_infer", "torch_infer_fused"),
                         ("onnx_infer", "torch_onnx_infer"),
                         ("infer", "torch_infer"), ("train_step", "torch_train_step"), *spec.measured_pairs):
        if ours in by and theirs in by:  # measured in this run: the figures to quote
            out[f"{ours}_over_{theirs}_measured"] = by[ours]["median_ms"] / by[theirs]["median_ms"]
    for r in records:  # ours and the official code called in turn (`alternate_onnx`, `alternate_with_official`)
        if r["what"].startswith("alternated_torch_"):
            key = r["what"][len("alternated_torch_"):]
            mine = "onnx_infer" if key.startswith("onnx") else key
            if f"alternated_{mine}" in by:
                ours = by[f"alternated_{mine}"]
                out[f"{mine}_over_torch_{key}_alternated"] = ours["median_ms"] / r["median_ms"]
                if len(ours["times_ms"]) == len(r["times_ms"]):  # the median of the rounds' own ratios
                    out[f"{mine}_over_torch_{key}_alternated_paired"] = float(statistics.median(
                        a / b for a, b in zip(ours["times_ms"], r["times_ms"])))
    if comp["infer"] and ref.get("gflops") and by.get("infer", {}).get("flops"):
        out["xla_flops_over_official_gflops"] = by["infer"]["flops"] / (ref["gflops"] * 1e9)
    out["comparable_to_reference"] = comp
    return out


def _fmt(v, scale=1.0, digits=1):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v / scale:.{digits}f}"


def table(records: list[dict]) -> str:
    w = max([24] + [len(r["what"]) for r in records])
    head = (f"{'what':{w}s} {'batch':>5s} {'size':>5s} {'median ms':>10s} {'min ms':>9s} {'img/s':>7s} "
            f"{'compile s':>9s} {'GFLOP':>7s} {'GFLOP/s':>8s} {'peak RSS MB':>11s}")
    lines = [head, "-" * len(head)]
    for r in records:
        lines.append(f"{r['what']:{w}s} {r['batch']:5d} {r['image_size']:5d} {_fmt(r['median_ms']):>10s} "
                     f"{_fmt(r['min_ms']):>9s} {_fmt(r['images_per_s'], digits=2):>7s} "
                     f"{_fmt(r['compile_s'], digits=2):>9s} {_fmt(r['flops'], 1e9, 2):>7s} "
                     f"{_fmt(r['flops_per_s'], 1e9, 1):>8s} {_fmt(r['peak_rss_mb'], digits=0):>11s}")
    return "\n".join(lines)


def benchmark(spec: BenchSpec, *, infer_batch: int, train_batch: int, repeats: int, warmup: int = 2,
              stages: Sequence[str] = ("infer", "onnx", "train", "extra"), out_dir: str | None = None,
              torch_repo: str = "", torch_python: str = "") -> dict:
    """Measures the given stages of `spec`; returns {'records', 'ratios', 'recompilation', ...}."""
    counter = CompileCounter()
    records: list[dict] = []
    load_before = _load()
    t_start = time.perf_counter()
    torch_before = None
    onnx_tmp = tempfile.TemporaryDirectory(prefix="official_onnx_") if torch_repo and "onnx" in stages else None
    onnx_dir = onnx_tmp.name if onnx_tmp else ""
    if torch_repo:  # timed before and after ours: a slow drift of a shared machine cancels in the ratio
        torch_before = time_torch_reference(spec, torch_repo, infer_batch, train_batch, repeats, torch_python,
                                            onnx_dir)
        if torch_before.get("skipped"):  # the runner could not build the official model here: say why
            print(f"  official PyTorch not timed: {torch_before['skipped']}", file=sys.stderr)
    try:
        ref_out, infer_flops = None, None
        infer_keep: dict = {}
        serving = bool(torch_repo) and not (torch_before or {}).get("skipped")
        if "infer" in stages:
            rec = measure_infer(spec, infer_batch, repeats, warmup, counter,
                                infer_keep if serving and "infer" in spec.torch_serves else None)
            ref_out = rec.pop("_output")
            infer_flops = rec["flops"]
            records.append(rec)
        if "onnx" in stages:
            if out_dir is None:
                raise ValueError("the onnx stage needs out_dir")
            os.makedirs(out_dir, exist_ok=True)
            records.append(measure_onnx(spec, infer_batch, repeats, warmup, out_dir, ref_out, infer_flops))
        if "train" in stages:
            keep: dict = {}
            records.extend(measure_train_step(spec, train_batch, repeats, warmup, counter, keep))
            calls = {}
            if serving and "train_step" in spec.torch_serves:
                calls["train_step"] = (keep["call"], max(2 * repeats, 8))
            if "call" in infer_keep:  # the runner serves its eval forward too
                calls["infer"] = (infer_keep["call"], max(4 * repeats, 20))
            if calls:
                records.extend(_alternated_official(spec, torch_repo, torch_python, calls, infer_batch, train_batch))
            keep.clear()
            infer_keep.clear()
        if "extra" in stages and spec.extra_stages is not None:
            records.extend(spec.extra_stages(repeats, warmup))
        if torch_repo and not torch_before.get("skipped"):
            after = time_torch_reference(spec, torch_repo, infer_batch, train_batch, repeats, torch_python)
            records.extend(torch_records(spec, torch_repo, torch_before, after, infer_batch, train_batch))
        ours_onnx = next((r.get("onnx_path") for r in records if r["what"] == "onnx_infer"), None)
        theirs = {f[:-5]: os.path.join(onnx_dir, f) for f in sorted(os.listdir(onnx_dir)) if f.endswith(".onnx")} \
            if onnx_dir else {}
        if ours_onnx and theirs:
            # 40 rounds at least: with 20, a W32-512 comparison of two graphs 2-3% apart moved from 0.97x to 1.03x
            # between runs on a shared 2-core machine (docs/higherhrnet.md, Export)
            alt = alternate_onnx(ours_onnx, theirs, spec.make_inputs(infer_batch), rounds=max(8 * repeats, 40))
            for key in ("ours", *theirs):
                what = "alternated_onnx_infer" if key == "ours" else f"alternated_torch_{key}"
                r = record(what, infer_batch, spec.image_size, alt[key]["times_ms"])
                r["note"] = alt["note"] + ("" if key == "ours" else f"; the official runner's '{key}' export")
                records.append(r)
    finally:
        counter.close()
        if onnx_tmp is not None:
            onnx_tmp.cleanup()
    recomp = {r["what"]: r["recompilation"] for r in records if "recompilation" in r}
    return {
        "records": records,
        "ratios": ratios(records, spec, infer_batch, train_batch),
        "recompilation": {"ok": all(v["ok"] for v in recomp.values()), **recomp},
        "reference": spec.reference,
        "official_torch": ({"repo": torch_repo, **{k: v for k, v in torch_before.items() if not isinstance(v, list)}}
                           if torch_before else None),
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
                       torch_repo=b.torch_repo, torch_python=b.torch_python)
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


def _root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
