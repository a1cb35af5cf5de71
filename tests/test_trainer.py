"""The shared trainer on YOLOv5 `smoke`: learning, resume, NaN stop, checkpoints of another model."""

import json
import os

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
    tx = task.make_optimizer(variables["params"])
    state = trainer.create_train_state(variables, tx, use_ema=True)
    batch = task.to_device(next(iter(task.train_loader())))
    step = jax.jit(functools.partial(trainer.train_step, loss_fn=task.loss_fn, tx=tx, ema_decay=task.ema_decay,
                                     optimizer_kwargs=task.optimizer_kwargs))
    losses = []
    for i in range(12):
        # just past warmup (nw = 100 iterations): full lr0 and momentum from the first step
        state = state.replace(step=state.step * 0 + 100 + i)
        state, m = step(state, batch, {}, np.bool_(True), jax.random.PRNGKey(0))
        losses.append(float(m["train/loss"]))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses


class _Interrupt(Exception):
    pass


class _KilledTask(Task):
    """Stops feeding data after `kill_after` batches, as if the process were killed."""

    kill_after = 10**9

    def train_loader(self, iterator_state=None):
        loader = super().train_loader(iterator_state)
        outer = self

        class Wrapped:
            def __iter__(self):
                it = iter(loader)

                class It:
                    n = 0

                    def __next__(self):
                        if self.n >= outer.kill_after:
                            raise _Interrupt()
                        self.n += 1
                        return next(it)

                    def get_state(self):
                        return it.get_state()
                return It()
        return Wrapped()


def test_resume_after_kill_matches_uninterrupted_run(data_dir, tmp_path):
    kw = dict(total_steps=8, checkpoint_every_steps=2, eval_every_steps=0, log_every_steps=4)
    full = trainer.train_and_evaluate(smoke_config(data_dir, **kw), str(tmp_path / "full"),
                                      Task(smoke_config(data_dir, **kw)))["state"]
    c = smoke_config(data_dir, **kw)
    killed = _KilledTask(c)
    killed.kill_after = 5  # dies after step 5; last checkpoint at step 4
    with pytest.raises(_Interrupt):
        trainer.train_and_evaluate(c, str(tmp_path / "resumed"), killed)
    assert trainer.Checkpointer(str(tmp_path / "resumed")).latest_step() == 4
    resumed = trainer.train_and_evaluate(c, str(tmp_path / "resumed"), Task(c))["state"]
    assert int(resumed.step) == 8
    a, b = _params(full), _params(resumed)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    logged = [json.loads(line) for line in open(tmp_path / "resumed" / "metrics.jsonl")]
    assert any(r["step"] == 8 for r in logged)


    def loss_fn(self, params, batch_stats, batch, rng):
        loss, aux = super().loss_fn(params, batch_stats, batch, rng)


class _NanAfter(Task):
    """Feeds NaN boxes from batch `nan_from` on (a corrupt input that slipped through)."""

    nan_from = 10**9
    fed = 0

    def to_device(self, local):
        out = super().to_device(local)
        self.fed += 1
        if self.fed >= self.nan_from:
            out = dict(out, boxes=np.full_like(out["boxes"], np.nan))
        return out


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(data_dir, tmp_path):
    c = smoke_config(data_dir, total_steps=8, checkpoint_every_steps=2, eval_every_steps=0)
    task = _NanAfter(c)
    task.nan_from = 5
    # NaN boxes match no anchor, so the loss turns NaN through the update of step 5 at the latest
    with pytest.raises(trainer.NonFiniteLossError, match="loss is nan at step [56]"):
        trainer.train_and_evaluate(c, str(tmp_path), task)
    ck = trainer.Checkpointer(str(tmp_path))
    assert ck.latest_step() == 4
    variables = task.init_variables(jax.random.PRNGKey(1))
    template = trainer.create_train_state(variables, task.make_optimizer(variables["params"]), True)
    state, _ = ck.restore(template)
    assert int(state.step) == 4
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state.params))


def test_checkpoint_of_another_model_is_a_clear_error(data_dir, tmp_path):
    c = smoke_config(data_dir, total_steps=2, checkpoint_every_steps=2, eval_every_steps=0)
    trainer.train_and_evaluate(c, str(tmp_path), Task(c))
    other = smoke_config(data_dir, total_steps=4)
    other.model.variant = "n"
    with pytest.raises(ValueError, match="does not fit this model"):
        trainer.train_and_evaluate(other, str(tmp_path), Task(other))
    assert trainer.Checkpointer(str(tmp_path)).latest_step() == 2  # nothing lost
