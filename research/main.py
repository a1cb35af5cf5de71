"""What each `--mode` does; `launch.py` only parses flags and calls `run`."""

from __future__ import annotations

import json
import os

import jax
from absl import logging

from research import hostenv, parallel, tasks


def run(config, workdir: str, mode: str) -> dict:
    parallel.initialize_distributed(config.distributed.coordinator_address, config.distributed.num_processes,
                                    config.distributed.process_id)
    os.makedirs(workdir, exist_ok=True)
    logging.info("mode=%s workdir=%s devices=%s", mode, workdir, jax.devices())
    logging.info("malloc tunables: %s", hostenv.active())
    if mode == "benchmark":
        from research import benchmark
        return benchmark.run(config, workdir)
    task = tasks.get_task(config)
    if hasattr(task, "prepare"):  # workdir-specific set-up (YOLOv5: the anchors this run uses)
        task.prepare(workdir, mode)
    results: dict = {}
    if mode in ("train", "all"):
        from research import trainer
        results.update(trainer.train_and_evaluate(config, workdir, task)["final_metrics"])
        task.after_training(workdir)
    if mode == "eval":
        results.update(task.evaluate(workdir))
    if mode in ("predict", "all"):
        results["predictions"] = task.predict(workdir)
    if mode in ("export", "all"):
        results.update(task.export(workdir))
    if mode == "all" and config.export.onnx:
        results.update(task.evaluate(workdir, onnx=True))
    if mode in ("train", "all"):
        results["checkpoints"] = os.path.join(workdir, "checkpoints")
        results["curves"] = os.path.join(workdir, "curves.png")
        results["metrics"] = os.path.join(workdir, "metrics.jsonl")
    if jax.process_index() == 0:
        with open(os.path.join(workdir, f"results_{mode}.json"), "w") as f:
            json.dump(results, f, indent=2, default=str)
        print(summary(mode, workdir, results))
    return results


def summary(mode: str, workdir: str, results: dict) -> str:
    lines = [f"== {mode} finished; workdir {os.path.abspath(workdir)}"]
    for k, v in results.items():
        if isinstance(v, float):
            lines.append(f"  {k:28s} {v:.4f}")
        elif isinstance(v, (list, tuple)):
            lines.append(f"  {k:28s} {len(v)} files, e.g. {v[0] if v else '-'}")
        else:
            lines.append(f"  {k:28s} {v}")
    return "\n".join(lines)
