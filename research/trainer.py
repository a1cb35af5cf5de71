"""The shared trainer: one jitted data-parallel step, checkpoints, logging, evaluation.

A network plugs in through a `Task` (`research/tasks.py`): it supplies its model, loss,
optimiser, data and evaluators; this module owns everything they have in common, including the
step counts (`compute_steps`: from `config.num_epochs` / `config.total_steps` and the size of the
training split, so overriding `--config.batch_size` keeps schedules right).

Step semantics:
  * every call of `train_step` is one *iteration* on one global batch;
  * the optimiser's `update` receives `step=` (the iteration): the one channel through which
    step-dependent hyper-parameters (warmup, per-group learning rates, momentum) reach it, so
    nothing recompiles when they change;
  * a task with `accumulates = True` gets a gradient accumulator: gradients add into it and the
    optimiser applies them when the host says so (`do_update`), which is how a nominal batch
    (YOLOv5's 64) or a warmup-varying accumulation is reached; other tasks carry no such state;
  * an EMA of params and batch statistics follows every optimiser update when the task asks.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any, Callable, Iterator

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging

from research import parallel
from research.tasks import Steps
from research.metric_writers import MetricWriter


class NonFiniteLossError(FloatingPointError):
    """Raised when the training loss is NaN or inf; the last good checkpoint stays on disk."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # iterations done (batches consumed)
    opt_step: jax.Array  # optimiser updates done
    last_update: jax.Array  # iteration of the last optimiser update (-1: none yet)
    params: Any
    batch_stats: Any
    opt_state: Any
    grad_accum: Any
    ema_params: Any
    ema_batch_stats: Any

    def eval_variables(self, use_ema: bool = True) -> dict:
        params = self.ema_params if use_ema and self.ema_params is not None else self.params
        stats = self.ema_batch_stats if use_ema and self.ema_params is not None else self.batch_stats
        out = {"params": params}
        if stats is not None and jax.tree_util.tree_leaves(stats):
            out["batch_stats"] = stats
        return out


def compute_steps(config, num_train_examples: int) -> Steps:
    """Step counts from the config and the training split's size.

    `config.total_steps > 0` fixes the iterations (the schedule then spans that many steps rounded
    up to whole epochs); otherwise `config.num_epochs` epochs of `num_train_examples //
    config.batch_size` global batches (at least one per epoch).

    Raises:
      ValueError: neither `total_steps` nor `num_epochs` is positive.
    """
    steps_per_epoch = max(int(num_train_examples) // int(config.batch_size), 1)
    if config.total_steps > 0:
        total = int(config.total_steps)
        return Steps(steps_per_epoch, total, max(math.ceil(total / steps_per_epoch), 1))
    if config.num_epochs <= 0:
        raise ValueError("set config.num_epochs or config.total_steps to a positive number")
    epochs = int(config.num_epochs)
    return Steps(steps_per_epoch, epochs * steps_per_epoch, epochs)


def create_train_state(variables: dict, tx: optax.GradientTransformation, use_ema: bool,
                       accumulates: bool = False) -> TrainState:
    """A fresh state at step 0; `grad_accum` and the EMA copies are None unless asked for."""
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    return TrainState(
        step=jnp.zeros((), jnp.int32), opt_step=jnp.zeros((), jnp.int32),
        last_update=-jnp.ones((), jnp.int32),
        params=params, batch_stats=batch_stats, opt_state=tx.init(params),
        grad_accum=jax.tree_util.tree_map(jnp.zeros_like, params) if accumulates else None,
        ema_params=jax.tree_util.tree_map(jnp.copy, params) if use_ema else None,
        ema_batch_stats=jax.tree_util.tree_map(jnp.copy, batch_stats) if use_ema else None)


def train_step(state: TrainState, batch: dict, do_update: jax.Array, rng: jax.Array, *,
               loss_fn: Callable, tx: optax.GradientTransformation,
               ema_decay: Callable[[jax.Array], jax.Array] | None) -> tuple[TrainState, dict]:
    """One iteration on the global batch: loss, gradients and (if `do_update`) an optimiser update.

    Without an accumulator (`state.grad_accum is None`) every call updates and `do_update` is
    ignored. `tx.update` gets `step=state.step`; `rng` is folded with the step.
    """
    step_rng = jax.random.fold_in(rng, state.step)
    tx = optax.with_extra_args_support(tx)

    def loss_of(params):
        return loss_fn(params, state.batch_stats, batch, step_rng)

    (loss, (metrics, new_batch_stats)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    accumulating = state.grad_accum is not None
    accum = jax.tree_util.tree_map(jnp.add, state.grad_accum, grads) if accumulating else grads

    def apply(_):
        updates, opt_state = tx.update(accum, state.opt_state, state.params, step=state.step)
        params = optax.apply_updates(state.params, updates)
        ema_p, ema_s = state.ema_params, state.ema_batch_stats
        if ema_decay is not None and ema_p is not None:
            d = ema_decay(state.opt_step + 1)
            mix = lambda e, v: d * e + (1.0 - d) * v  # noqa: E731
            ema_p = jax.tree_util.tree_map(mix, ema_p, params)
            ema_s = jax.tree_util.tree_map(mix, ema_s, new_batch_stats)
        zero = jax.tree_util.tree_map(jnp.zeros_like, accum) if accumulating else None
        return params, opt_state, zero, ema_p, ema_s, state.opt_step + 1, state.step

    def skip(_):
        return (state.params, state.opt_state, accum, state.ema_params, state.ema_batch_stats,
                state.opt_step, state.last_update)

    if accumulating:
        params, opt_state, accum, ema_p, ema_s, opt_step, last_update = jax.lax.cond(do_update, apply, skip, None)
    else:
        params, opt_state, accum, ema_p, ema_s, opt_step, last_update = apply(None)
    metrics = dict(metrics)
    metrics["train/loss"] = loss
    metrics["train/grad_norm"] = optax.tree.norm(grads)
    metrics["train/param_norm"] = optax.tree.norm(params)
    new_state = state.replace(step=state.step + 1, opt_step=opt_step, last_update=last_update, params=params,
                              batch_stats=new_batch_stats, opt_state=opt_state, grad_accum=accum,
                              ema_params=ema_p, ema_batch_stats=ema_s)
    return new_state, metrics


# ----------------------------------------------------------------------------------------------
# Checkpoints


class Checkpointer:
    """orbax CheckpointManager holding the train state and the data-iterator state."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=async_save))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_state: dict | None) -> None:
        data_json = {"process_%d" % jax.process_index(): data_state} if data_state is not None else {}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_json)))

    def restore(self, template: TrainState, step: int | None = None) -> tuple[TrainState, dict | None]:
        step = self.latest_step() if step is None else step
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"checkpoint {self.directory}/{step} does not fit this model/config "
                             f"(a checkpoint of another network or variant?): {e}") from None
        data = restored.data or {}
        return restored.state, data.get("process_%d" % jax.process_index())

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# ----------------------------------------------------------------------------------------------
# The loop


def write_config(config, workdir: str) -> None:
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def parameter_overview(params: Any) -> str:
    rows = []
    for path, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(params)).items():
        rows.append(f"{'/'.join(path):70s} {str(tuple(v.shape)):22s} {int(np.prod(v.shape)):>10,d}")
    total = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(params))
    return "\n".join(rows + [f"{'total':70s} {'':22s} {total:>10,d}"])


# Config fields that do not change what a resumed run computes (cadence, evaluation, outputs).
_RESUME_NEUTRAL = ("log_every_steps", "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                   "async_checkpoints", "resume_changes", "eval.", "evals.", "predict.", "export.", "benchmark.",
                   "distributed.", "data.num_workers", "data.data_dir", "data.cache_images")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_changes(recorded: dict, config) -> list[str]:
    """`field: recorded -> now` for each field that changes what a resumed run computes."""
    old = _flat(recorded)
    new = _flat(json.loads(config.to_json_best_effort()))
    lines = []
    for key in sorted(set(old) | set(new)):
        if key.startswith(_RESUME_NEUTRAL) or old.get(key, "<absent>") == new.get(key, "<absent>"):
            continue
        lines.append(f"{key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}")
    return lines


def check_resume(config, workdir: str) -> None:
    """Refuses to resume a run whose config changed in a field that matters (batch size,
    schedule, model, data, hyper-parameters), unless `config.resume_changes` accepts it.

    Raises:
      ValueError: listing each changed field (recorded -> now); `config.json` is left as it was.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        recorded = json.load(f)
    changes = resume_changes(recorded, config)
    if changes and not config.resume_changes:
        raise ValueError(f"{workdir} holds a run with another config; resuming it would change:\n  "
                         + "\n  ".join(changes) + "\nUse a new --workdir, or --config.resume_changes=True to "
                         "continue this run with the new values.")
    if changes:
        logging.warning("resuming %s with changed config (config.resume_changes): %s", workdir, "; ".join(changes))


def train_and_evaluate(config, workdir: str, task) -> dict:
    """Trains `task` per `config` in `workdir` (resuming if a checkpoint is there).

    Raises:
      ValueError: resuming with a changed config (`check_resume`), or a checkpoint of another model.
      NonFiniteLossError: the loss became NaN or inf (the last good checkpoint is kept).
    """
    probe = Checkpointer(workdir, keep=config.keep_checkpoints, async_save=False)
    try:
        if probe.latest_step() is not None:
            check_resume(config, workdir)
    finally:
        probe.close()
    write_config(config, workdir)
    mesh = parallel.make_mesh()
    parallel.check_batch_size(config.batch_size)
    rng = jax.random.PRNGKey(config.seed)
    init_rng, step_rng = jax.random.split(rng)

    steps = compute_steps(config, task.num_train_examples())
    variables = task.init_variables(init_rng)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "parameters.txt"), "w") as f:
            f.write(parameter_overview(variables["params"]) + "\n")
    tx = task.make_optimizer(variables["params"], steps)
    state = create_train_state(variables, tx, use_ema=task.use_ema, accumulates=task.accumulates)
    state = parallel.replicate(state, mesh)

    ckpt = Checkpointer(workdir, keep=config.keep_checkpoints, async_save=config.get("async_checkpoints", True))
    data_state = None
    if ckpt.latest_step() is not None:
        state, data_state = ckpt.restore(state)
        state = parallel.replicate(state, mesh)
        logging.info("resumed from %s at step %d", ckpt.directory, int(state.step))

    total_steps = steps.total_steps
    logging.info("%d steps (%d epochs of %d global batches of %d)", total_steps, steps.num_epochs,
                 steps.steps_per_epoch, config.batch_size)
    loader = task.train_loader(data_state)
    writer = MetricWriter(workdir, total_steps)
    step_fn = jax.jit(functools.partial(train_step, loss_fn=task.loss_fn, tx=tx,
                                        ema_decay=task.ema_decay if task.use_ema else None),
                      donate_argnums=(0,))
    evaluators = task.evaluators()

    step = int(state.step)
    last_opt_iter = int(state.last_update)
    it = iter(loader)
    compiled: dict = {}
    try:
        state, step = _loop(config, task, state, step, total_steps, it, mesh, step_fn, step_rng,
                            writer, ckpt, evaluators, last_opt_iter, compiled)
    finally:
        from research.data import pipeline  # (tfds/grain only where a loader was made)
        pipeline.close_iterator(it)  # the loader's workers and their shared memory, also on failure
        ckpt.close()  # waits for an async save in flight, so the last good checkpoint is whole
    final = {}
    # The loop runs one ahead-of-time executable per batch shape; jit's own cache must not have
    # compiled more.
    final["perf/train_step_compiles"] = len(compiled) + step_fn._cache_size()
    if evaluators:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            for line in f:
                rec = json.loads(line)
                final.update({k: v for k, v in rec.items() if k.startswith("eval")})
    writer.close()
    return {"state": state, "final_metrics": final, "workdir": workdir, "steps": steps}


def _loop(config, task, state, step, total_steps, it, mesh, step_fn, step_rng, writer, ckpt,
          evaluators, last_opt_iter, compiled):
    pending: list[tuple[int, dict]] = []
    t_last, step_last = time.time(), step
    examples_per_step = config.batch_size
    while step < total_steps:
        local = next(it)
        batch = parallel.global_batch(task.to_device(local), mesh)
        batch = task.transform_batch(batch, step)  # e.g. YOLOv5's multi-scale resize, on the sharded batch
        do_update = not task.accumulates or (step - last_opt_iter) >= task.accumulate(step)
        if do_update:
            last_opt_iter = step
        args = (state, batch, np.bool_(do_update), step_rng)
        key = tuple((k, v.shape, str(v.dtype)) for k, v in sorted(batch.items()))
        if key not in compiled:
            # Compiled ahead of time, once per batch shape (one shape unless the task varies it,
            # as multi-scale training does): a dtype change of the state is an error, not a silent
            # recompile, and all processes meet after compiling, before the first collective.
            t0 = time.time()
            compiled[key] = step_fn.lower(*args).compile()
            logging.info("train step compiled in %.1f s for batch %s (%d shape%s so far)", time.time() - t0,
                         {k: tuple(s) for k, s, _ in key}, len(compiled), "s" * (len(compiled) > 1))
            parallel.barrier(f"train_step_compiled_{len(compiled)}")
        state, metrics = compiled[key](*args)
        step += 1
        pending.append((step, metrics))
        # Check the previous step's loss while this one runs (no stall of the device queue).
        if len(pending) > 1 or step >= total_steps:
            _check_finite(pending, keep_last=step < total_steps)
        if step % config.log_every_steps == 0 or step == total_steps:
            _check_finite(pending, keep_last=False)
            m = {k: float(v) for k, v in parallel.fetch(metrics).items()}
            now = time.time()
            rate = (step - step_last) / max(now - t_last, 1e-9)
            t_last, step_last = now, step
            m.update({f"hyper/{k}": float(v) for k, v in task.log_hyperparams(step - 1).items()})
            m["perf/steps_per_sec"] = rate
            m["perf/examples_per_sec"] = rate * examples_per_step
            writer.write(step, m)
        if step % config.checkpoint_every_steps == 0 or step == total_steps:
            _check_finite(pending, keep_last=False)
            ckpt.save(step, state, _iterator_state(it))
        due = [ev for ev in evaluators if ev.every_steps > 0 and (step % ev.every_steps == 0 or step == total_steps)]
        if due:  # each evaluator at its own cadence, and all of them after the last step
            variables = state.eval_variables(config.eval.use_ema)
            for ev in due:
                writer.write(step, dict(ev.run(variables)))
    return state, step


def _iterator_state(it: Iterator) -> dict | None:
    """The loader iterator's position (grain's `get_state()`), JSON-safe, for the checkpoint."""
    s = it.get_state()
    if isinstance(s, bytes):
        s = {"bytes": s.decode("latin-1")}
    return s


def _check_finite(pending: list, keep_last: bool) -> None:
    """Raises NonFiniteLossError for the first NaN/inf loss among the pending steps."""
    upto = len(pending) - 1 if keep_last else len(pending)
    for step, metrics in pending[:upto]:
        loss = float(np.asarray(metrics["train/loss"]))
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss is {loss} at step {step}; stopped. The last good checkpoint is kept; "
                "lower the learning rate or check the data (try --config.hyp.lr0).")
    del pending[:upto]
