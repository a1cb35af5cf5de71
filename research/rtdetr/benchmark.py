"""RT-DETR's part of the benchmark harness (`research/benchmark.py`): its `BenchSpec`, built from the real task
(loss with denoising and host Hungarian matching, AdamW groups, EMA as training uses them), the matcher's own
measurement (`extra_stages`) and the official figures from the issue.

    python launch.py --config=configs/rtdetr.py --workdir=workdirs/bench --mode=benchmark
    # + --config.benchmark.torch_repo=/path/to/RT-DETR to time the official model in the same run
    #   (research/rtdetr/official_torch.py; it needs torchvision, see there)

Stages: `infer` (JAX deploy graph: model + post-processor, `images` [B, S, S, 3] 0-1 and `orig_target_sizes`),
`onnx_infer` (the same exported as `--mode=export` writes `model.onnx`), `train_step` (the trainer's step), and
`extra`: `matcher` (one jitted matcher call: cost matrix in XLA, `scipy.optimize.linear_sum_assignment` on the
host through `jax.pure_callback`, on train-step-shaped outputs: [B, Q, C] logits, the synthetic batch's boxes),
`matcher_host` (the host part alone) and `matcher_per_train_step` (a call's time times the calls one train step
makes: the last decoder layer, each auxiliary layer and the encoder top-k, num_decoder_layers + 1). Its share of
the train step is the ratio `matcher_per_train_step_over_train_step_measured`.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
from absl import logging

from research.benchmark import BenchSpec, host_init, record, time_calls

# The official R18vd on this kind of 2-core CPU (issue 13): eager PyTorch 420-510 ms per 640x640 image, its
# ONNX export ~300 ms in ONNX Runtime; no train-step figure was given. 60 GFLOPs: the official README's R18 row.
REFERENCE = {
    "setting": {"variant": "r18vd", "image_size": 640, "infer_batch": 1, "train_batch": 2},
    "infer_ms": (420.0, 510.0),
    "train_step_ms": None,
    "onnx_infer_ms": 300.0,
    "gflops": 60.0,
    "source": "issue 13: the official R18vd on the same 2-core CPU, eager PyTorch 420-510 ms / image at 640, its "
              "ONNX export ~300 ms in ONNX Runtime; GFLOPs from the official README (rtdetr_pytorch)",
}


def official_importable(repo: str, python: str = "") -> str | None:
    """None when the official modules import from `repo` in `python` (default: this interpreter), else why not
    (`official_torch.py --check`, in a subprocess so that torch stays out of this process)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p))
    proc = subprocess.run([python or sys.executable, "-m", "research.rtdetr.official_torch", f"--repo={repo}",
                           "--check"], cwd=root, capture_output=True, text=True, env=env)
    return None if proc.returncode == 0 else (proc.stderr.strip()[-3000:] or f"exit code {proc.returncode}")


def benchmark_spec(config, *, variant: str, image_size: int, nc: int = 80) -> BenchSpec:
    """RT-DETR at `variant` / `image_size` (random weights, `nc` classes) through the real task's loss_fn /
    make_optimizer / ema_decay, without data. Inputs: `images` [B, S, S, 3] 0-1, `orig_target_sizes` [B, 2] (w, h).
    A variant other than the config's takes its own official structure (not this config's model overrides).

    With `config.benchmark.torch_repo` set, the official modules are import-checked first: when they cannot be
    imported (torchvision missing), the reason is logged and kept in `info['official_torch']` (the runner then
    writes no timings and the run continues without them)."""
    import jax
    import jax.numpy as jnp
    import ml_collections

    from research import tasks
    from research.rtdetr import task as task_lib
    from research.rtdetr.matcher import linear_assignment_host
    from research.rtdetr.model import count_params

    cfg = config.copy_and_resolve_references()
    if variant != cfg.model.variant:
        cfg.model.variant = variant
        for part in ("backbone", "encoder", "decoder"):
            cfg.model[part] = ml_collections.ConfigDict()
    cfg.model.num_classes = nc  # fixed here, so the task reads no dataset
    cfg.data.image_size = image_size
    task = task_lib.Task(cfg, mode="benchmark")
    model = task.model
    shapes = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, image_size, image_size, 3)), train=False),
                            jax.random.PRNGKey(0))
    variables = host_init(shapes)
    steps = tasks.Steps(steps_per_epoch=1000, total_steps=72_000, num_epochs=72)
    max_labels = int(cfg.data.max_labels)
    boxes_per_image = min(4, max_labels)
    deploy = task.deploy_fn
    train_batch = int(cfg.benchmark.train_batch_size)
    num_layers = int(model.decoder.keywords.get("num_decoder_layers", 6))
    matcher_calls = num_layers + 1  # last layer + (num_layers - 1) auxiliary + encoder top-k

    def make_inputs(batch_size: int) -> dict:
        rs = np.random.RandomState(1)
        return {"images": rs.rand(batch_size, image_size, image_size, 3).astype(np.float32),
                "orig_target_sizes": np.full((batch_size, 2), image_size, np.float32)}

    def infer_fn(v, images, orig_target_sizes):
        return deploy(v)(images, orig_target_sizes)

    def export_fn(v, images, orig_target_sizes):  # flax's own layers, as --mode=export traces them
        return deploy(v, for_export=True)(images, orig_target_sizes)

    def make_batch(batch_size: int) -> dict:
        rs = np.random.RandomState(0)
        boxes = np.zeros((batch_size, max_labels, 4), np.float32)
        boxes[:, :boxes_per_image, :2] = rs.uniform(0.2, 0.8, (batch_size, boxes_per_image, 2))
        boxes[:, :boxes_per_image, 2:] = rs.uniform(0.05, 0.3, (batch_size, boxes_per_image, 2))
        valid = np.zeros((batch_size, max_labels), bool)
        valid[:, :boxes_per_image] = True
        classes = np.where(valid, rs.randint(0, nc, (batch_size, max_labels)), 0).astype(np.int32)
        image = rs.randint(0, 256, (batch_size, image_size, image_size, 3)).astype(np.uint8)
        return {"image": image, "boxes": boxes, "classes": classes, "valid": valid}

    def matcher_stages(repeats: int, warmup: int) -> list[dict]:
        """The Hungarian matcher on the train step's shapes: per call (jitted as in the step, and its host part
        alone) and per train step."""
        matcher = task.criterion.matcher
        rs = np.random.RandomState(2)
        q = task.num_queries
        batch = make_batch(train_batch)
        logits = rs.normal(0.0, 2.0, (train_batch, q, nc)).astype(np.float32)
        pred = np.concatenate([rs.uniform(0.1, 0.9, (train_batch, q, 2)), rs.uniform(0.02, 0.5, (train_batch, q, 2))],
                              -1).astype(np.float32)
        args = [jnp.asarray(a) for a in (logits, pred, batch["classes"], batch["boxes"], batch["valid"])]
        fn = jax.jit(matcher.__call__)
        compiled = fn.lower(*args).compile()
        times, cpu = time_calls(lambda i: compiled(*args), repeats, warmup)
        note = (f"[B={train_batch}, Q={q}, C={nc}] outputs, {boxes_per_image} of {max_labels} target slots valid per "
                "image; cost matrix in XLA, linear_sum_assignment on the host (jax.pure_callback)")
        per_call = record("matcher", train_batch, image_size, times, cpu, note=note)
        cost = np.asarray(jax.jit(matcher.cost_matrix)(*args))
        valid = np.asarray(batch["valid"])
        h_times, h_cpu = time_calls(lambda i: linear_assignment_host(cost, valid), repeats, warmup)
        host = record("matcher_host", train_batch, image_size, h_times, h_cpu,
                      note="scipy linear_sum_assignment per image on a precomputed cost matrix (the callback's work)")
        per_step = record("matcher_per_train_step", train_batch, image_size, [t * matcher_calls for t in times],
                          cpu * matcher_calls, matcher_calls=matcher_calls,
                          note=f"{matcher_calls} matcher calls per train step (last decoder layer, {num_layers - 1} "
                               "auxiliary layers, encoder top-k) x the per-call time; the calls run one after "
                               "another in the step (each needs its layer's outputs)")
        return [per_call, host, per_step]

    info = {"nc": nc, "params": count_params(variables["params"]), "max_labels": max_labels,
            "boxes_per_image": boxes_per_image, "num_queries": task.num_queries, "dtype": cfg.model.dtype,
            "matcher_calls_per_step": matcher_calls, "official_onnx_infer_ms": REFERENCE["onnx_infer_ms"],
            "conv_impl": cfg.model.conv_impl}
    if cfg.benchmark.torch_repo:
        why = official_importable(cfg.benchmark.torch_repo, cfg.benchmark.torch_python)
        if why:
            logging.warning("%s", why)
            print(f"WARNING: {why}", file=sys.stderr)
            info["official_torch"] = why
    return BenchSpec(
        name="rtdetr", variant=variant, image_size=image_size, variables=variables, make_inputs=make_inputs,
        infer_fn=infer_fn, export_fn=export_fn, make_batch=make_batch, loss_fn=task.loss_fn,
        tx=task.make_optimizer(variables["params"], steps), ema_decay=task.ema_decay if task.use_ema else None,
        use_ema=task.use_ema, onnx_output_names=["labels", "boxes", "scores"],
        torch_reference_module="research.rtdetr.official_torch", torch_serves=("train_step",), reference=REFERENCE,
        info=info,
        extra_stages=matcher_stages,
        measured_pairs=(("matcher_per_train_step", "train_step"), ("matcher", "torch_matcher")))


def conv_impl_ab(config, impls=("lax", "auto"), repeats: int = 6) -> dict:
    """Same-run A/B of `config.model.conv_impl` (flax's layers vs the CPU speed layer): JAX inference
    (`config.benchmark.batch_size`) and the train step (`config.benchmark.train_batch_size`) for each, one after
    the other in this process. Returns {impl: {stage: {median_ms, min_ms, cpu_ms_per_call, compile_s}}}."""
    from research import benchmark
    out = {}
    for impl in impls:
        cfg = config.copy_and_resolve_references()
        cfg.model.conv_impl = impl
        res = benchmark.benchmark(benchmark.make_spec(cfg), infer_batch=int(cfg.benchmark.batch_size),
                                  train_batch=int(cfg.benchmark.train_batch_size), repeats=repeats, warmup=1,
                                  stages=("infer", "train"))
        out[impl] = {r["what"]: {k: r.get(k) for k in ("median_ms", "min_ms", "cpu_ms_per_call", "compile_s")}
                     for r in res["records"]}
        out[impl]["load_average"] = res["load_average"]
    return out


if __name__ == "__main__":  # python -m research.rtdetr.benchmark [repeats]: the conv_impl A/B at R18vd 640
    import json

    from configs.rtdetr import get_config
    print(json.dumps(conv_impl_ab(get_config("variant=r18vd,data=coco"),
                                  repeats=int(sys.argv[1]) if len(sys.argv) > 1 else 6), indent=1))
