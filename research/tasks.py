"""Networks by name: `config.network` selects `research.<name>.task.Task`.

A task is what a network adds to the shared trainer (`research/trainer.py`):

  model, use_ema, total_steps, steps_per_epoch
  prepare(workdir, mode)   [optional] set-up that depends on the workdir, before any mode runs
  init_variables(rng) -> {'params', 'batch_stats'?}
  make_optimizer(params) -> optax transform (its `update` may take `step=` the iteration)
  loss_fn(params, batch_stats, batch, rng) -> (loss, (metrics, new_batch_stats))   [jit-able]
  hyperparams(step) -> dict of host floats to log; accumulate(step) -> batches per update
  ema_decay(opt_step) -> decay (jit-able) or None
  train_loader(iterator_state) -> iterable of this process's batch slices (get_state/set_state)
  to_device(local_batch) -> dict of numpy arrays fed to the step
  transform_batch(global_batch, step) -> batch   [optional] device-side change before the step
                           (e.g. multi-scale resize; each new batch shape compiles the step once)
  evaluators() -> objects with run(state) yielding (name, value)
  predict(state, workdir) / export(state, workdir) / benchmark(workdir)
"""

from __future__ import annotations

import importlib

NETWORKS = ("yolov5",)


def get_task(config):
    name = config.network
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; available: {', '.join(NETWORKS)}")
    module = importlib.import_module(f"research.{name}.task")
    return module.Task(config)
