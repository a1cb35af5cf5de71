r"""XLA:CPU flags study: which XLA_FLAGS make YOLOv5 train/infer faster on this CPU.

    python tools/xla_flags_study.py --xla_flags_study [--variant=s --image_size=640 --out=...]

Each candidate runs in its own process (XLA reads XLA_FLAGS once, at backend start) through the
shared benchmark harness (`research/benchmark.py`); the findings are in docs/yolov5.md
("Benchmark"). A research script, not part of the library.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from research.benchmark import _jsonable, benchmark, environment, make_spec  # noqa: E402


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
    return ROOT


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
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"--out={out}", f"--variant={variant}",
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
    main()
