"""YOLOv5 `smoke` through the shared train step: the loss falls when fitting one batch.

The trainer's own behaviour (resume, NaN stop, checkpoints of another model) is tested on the toy
task (tests/test_toy_task.py)."""


import jax
import numpy as np
import pytest

from configs.yolov5 import get_config
from research import trainer
from research.yolov5.task import Task


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def smoke_config(data_dir, **overrides):
    c = get_config("smoke")
    c.data.data_dir = data_dir
    for k, v in overrides.items():
        node = c
        *path, leaf = k.split(".")
        for p in path:
            node = node[p]
        node[leaf] = v
    return c


def _params(state):
    return jax.tree_util.tree_map(np.asarray, state.params)


def test_loss_falls_when_fitting_one_batch(data_dir):
    import functools
    c = smoke_config(data_dir, total_steps=2000, **{"hyp.lr0": 0.05})  # long schedule: lr ~ lr0 at step 100
    task = Task(c)
    variables = task.init_variables(jax.random.PRNGKey(0))
    tx = task.make_optimizer(variables["params"], trainer.compute_steps(c, task.num_train_examples()))
    state = trainer.create_train_state(variables, tx, use_ema=True, accumulates=True)
    batch = task.to_device(next(iter(task.train_loader())))
    step = jax.jit(functools.partial(trainer.train_step, loss_fn=task.loss_fn, tx=tx, ema_decay=task.ema_decay))
    losses = []
    for i in range(12):
        # just past warmup (nw = 100 iterations): full lr0 and momentum from the first step
        state = state.replace(step=state.step * 0 + 100 + i)
        state, m = step(state, batch, np.bool_(True), jax.random.PRNGKey(0))
        losses.append(float(m["train/loss"]))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses
