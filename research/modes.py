"""The modes beyond training, written once for every network: restore, evaluate, predict, export.

Each mode works from the workdir's latest checkpoint, or, when the workdir has none, from the
official weights named by `config.model.init_from` (a PyTorch state_dict read with
`torch.load(..., weights_only=True)`, or `.safetensors`), as the official `val.py --weights` and
`export.py --weights` do. The network-specific parts come from the task (`research/tasks.py`):
its evaluators, its prediction drawing, its torch mapping and its `ExportSpec`.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import logging

from research import parallel
from research.tasks import Task


def restore_variables(task: Task, workdir: str) -> tuple[dict, str]:
    """The variables the non-training modes use, and where they came from.

    Returns:
      (variables, source): the EMA (or raw, per `config.eval.use_ema`) variables of the latest
      checkpoint in `workdir/checkpoints`, else the task's `init_variables` from
      `config.model.init_from`; `source` names the checkpoint step or the weights file.

    Raises:
      FileNotFoundError: no checkpoint and no `config.model.init_from`.
      ValueError: the checkpoint belongs to another network, variant or class count.
    """
    from research import trainer
    config = task.config
    ckpt = trainer.Checkpointer(workdir, async_save=False)
    try:
        latest = ckpt.latest_step()
        if latest is None:
            if not config.model.init_from:
                raise FileNotFoundError(
                    f"no checkpoint in {ckpt.directory} and no config.model.init_from: run --mode=train first, "
                    "or name official weights with --config.model.init_from=<state_dict .pt/.safetensors>")
            variables = task.init_variables(jax.random.PRNGKey(0))
            return jax.tree_util.tree_map(np.asarray, variables), config.model.init_from
        variables = task.init_variables(jax.random.PRNGKey(0))
        steps = trainer.compute_steps(config, task.num_train_examples())
        template = trainer.create_train_state(variables, task.make_optimizer(variables["params"], steps),
                                              task.use_ema, task.accumulates)
        state, _ = ckpt.restore(template)
    finally:
        ckpt.close()
    variables = jax.tree_util.tree_map(np.asarray, state.eval_variables(config.eval.use_ema))
    return variables, f"{ckpt.directory}/{latest}"


def evaluate(task: Task, workdir: str, onnx: bool = False) -> dict:
    """Runs the task's evaluators on the restored variables, or on `workdir/export/model.onnx`.

    Each evaluator may write its own files into `workdir` (the COCO detection evaluator writes
    its detections in the COCO results format).

    Raises:
      FileNotFoundError: `onnx` (or `config.eval.onnx`) and no exported model.
    """
    results: dict = {}
    if onnx or task.config.eval.onnx:
        path = os.path.join(workdir, "export", "model.onnx")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: run --mode=export first")
        evaluators, variables = task.evaluators(onnx_path=path, out_dir=workdir), None
    else:
        variables, source = restore_variables(task, workdir)
        logging.info("evaluating %s", source)
        evaluators = task.evaluators(out_dir=workdir)
    for ev in evaluators:
        results.update({k: float(v) for k, v in ev.run(variables)})
    return results


def predict(task: Task, workdir: str) -> list[str]:
    """Draws the task's predictions into `workdir/predictions`; returns the written paths."""
    variables, source = restore_variables(task, workdir)
    logging.info("predicting with %s", source)
    out_dir = os.path.join(workdir, "predictions")
    os.makedirs(out_dir, exist_ok=True)
    return task.predict(variables, out_dir)


def export(task: Task, workdir: str) -> dict:
    """Writes `workdir/export/model.{pt,safetensors,onnx}` (per `config.export`); returns the paths.

    Every file is written to a temporary name and moved into place once complete, so an earlier
    good export is never left half-written.
    """
    from research.bridge import torch_bridge
    config = task.config
    variables, source = restore_variables(task, workdir)
    logging.info("exporting %s", source)
    out_dir = os.path.join(workdir, "export")
    os.makedirs(out_dir, exist_ok=True)
    results = {}
    if config.export.torch:
        sd = task.to_torch(variables)
        results["torch_pt"] = torch_bridge.save_state_dict_file(sd, os.path.join(out_dir, "model.pt"))
        results["safetensors"] = torch_bridge.save_state_dict_file(sd, os.path.join(out_dir, "model.safetensors"))
    if config.export.onnx:
        from research.bridge.onnx_export import export_onnx
        spec = task.export_spec(variables)
        results["onnx"] = export_onnx(spec.apply_fn, spec.inputs, os.path.join(out_dir, "model.onnx"),
                                      dynamic_batch=spec.dynamic_batch, output_names=spec.output_names,
                                      channels_first=bool(config.export.get("channels_first", False)))
        results.update(task.extra_exports(variables, out_dir))
    return results


SHARED_MODES = ("train", "eval", "predict", "export", "all", "benchmark")


def run(config, workdir: str, mode: str) -> dict:
    """What `launch.py --mode=<mode>` does: train | eval | predict | export | all | benchmark, or
    one of the network's own `Task.extra_modes` (SiamFC: track).

    Raises:
      ValueError: `mode` is neither a shared mode nor one of the network's (the message lists both).
    """
    from research import tasks
    if mode not in SHARED_MODES:
        extra = tasks.task_class(config.network).extra_modes
        if mode not in extra:
            raise ValueError(f"unknown --mode={mode!r} for network {config.network!r}; modes: "
                             f"{', '.join(SHARED_MODES + tuple(extra))}")
    from research.cpu import hostenv
    parallel.initialize_distributed(config.distributed.coordinator_address, config.distributed.num_processes,
                                    config.distributed.process_id)
    os.makedirs(workdir, exist_ok=True)
    logging.info("mode=%s workdir=%s devices=%s", mode, workdir, jax.devices())
    logging.info("malloc tunables: %s", hostenv.active())
    if mode == "benchmark":
        from research import benchmark
        return benchmark.run(config, workdir)
    task = tasks.get_task(config, mode)
    if mode in ("train", "eval", "all") and jax.process_index() == 0:
        # one list of everything the data validation found, before any step (also in the workdir)
        from research.data import validation
        validation.publish(task.data_problems(), workdir, what=f"{config.network} data")
    task.prepare(workdir, mode)
    results: dict = {}
    if mode in ("train", "all"):
        from research import trainer
        results.update(trainer.train_and_evaluate(config, workdir, task)["final_metrics"])
        task.after_training(workdir)
    if mode == "eval":
        results.update(evaluate(task, workdir))
    if mode in ("predict", "all"):
        results["predictions"] = predict(task, workdir)
    if mode in ("export", "all"):
        results.update(export(task, workdir))
    if mode in task.extra_modes:
        results.update(task.run_mode(mode, workdir))
    if mode == "all" and config.export.onnx:
        results.update(evaluate(task, workdir, onnx=True))
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
    """The lines printed at the end of a mode: every result, files by path."""
    lines = [f"== {mode} finished; workdir {os.path.abspath(workdir)}"]
    for k, v in results.items():
        if isinstance(v, float):
            lines.append(f"  {k:28s} {v:.4f}")
        elif isinstance(v, (list, tuple)):
            lines.append(f"  {k:28s} {len(v)} files, e.g. {v[0] if v else '-'}")
        else:
            lines.append(f"  {k:28s} {v}")
    return "\n".join(lines)
