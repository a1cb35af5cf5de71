"""The shared layer on a toy network registered like a real one: registry, trainer, modes, export.

Nothing here knows YOLOv5: if these pass, a network that implements `research.tasks.Task` gets
training, resuming, evaluation (JAX and ONNX), prediction and export without touching shared code.
"""

import json
import os

import jax
import numpy as np
import pytest

import toy_task
from research import modes, tasks, trainer
from research.bridge import torch_bridge


def _config(**overrides):
    c = toy_task.get_config()
    for k, v in overrides.items():
        node = c
        *path, leaf = k.split(".")
        for p in path:
            node = node[p]
        node[leaf] = v
    return c


def test_registry_selects_the_toy_and_names_the_known_networks():
    assert tasks.task_class("toy") is toy_task.ToyTask
    assert isinstance(tasks.get_task(_config(), "eval"), toy_task.ToyTask)
    with pytest.raises(ValueError, match="unknown network.*'nope'.*toy"):
        tasks.task_class("nope")
    with pytest.raises(TypeError, match="must subclass"):
        tasks.register("bad")(object)


def test_contract_requires_the_abstract_members():
    class Incomplete(tasks.Task):
        def num_train_examples(self):
            return 1

    with pytest.raises(TypeError, match="abstract"):
        Incomplete(_config())


@pytest.mark.parametrize("epochs,total,n,batch,expected", [
    (3, 0, 64, 8, (8, 24, 3)), (0, 10, 64, 8, (8, 10, 2)), (2, 0, 5, 8, (1, 2, 2)), (0, 7, 100, 32, (3, 7, 3))])
def test_trainer_derives_step_counts(epochs, total, n, batch, expected):
    s = trainer.compute_steps(_config(num_epochs=epochs, total_steps=total, batch_size=batch), n)
    assert (s.steps_per_epoch, s.total_steps, s.num_epochs) == expected
    with pytest.raises(ValueError, match="num_epochs or config.total_steps"):
        trainer.compute_steps(_config(num_epochs=0, total_steps=0), n)


def test_all_mode_learns_evaluates_predicts_exports(tmp_path):
    wd = str(tmp_path)
    c = _config()
    res = modes.run(c, wd, "all")
    records = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    mse = [r["train/mse"] for r in records if "train/mse" in r]
    assert mse[-1] < 0.5 * mse[0], mse  # it learns
    assert res["perf/train_step_compiles"] == 1
    # evaluators from config.evals, each at its own cadence and after the last step
    assert [r["step"] for r in records if "eval/mse" in r] == [12, 24]
    assert [r["step"] for r in records if "often/mse" in r] == [8, 16, 24]
    for f in ("config.json", "parameters.txt", "curves.png", "export/model.pt", "export/model.safetensors",
              "export/model.onnx", "predictions/predictions.txt", "eval_onnx_mse.txt", "results_all.json"):
        assert os.path.exists(os.path.join(wd, f)), f
    # the exported ONNX model scores what the JAX model scores (same EMA variables)
    assert res["eval_onnx/mse"] == pytest.approx(res["eval/mse"], rel=1e-4)
    # no accumulator for a task that does not ask for one
    task = tasks.get_task(c, "eval")
    variables = task.init_variables(jax.random.PRNGKey(0))
    state = trainer.create_train_state(variables, task.make_optimizer(variables["params"], trainer.compute_steps(
        c, 64)), task.use_ema, task.accumulates)
    assert state.grad_accum is None and state.ema_params is not None
    # --mode=eval writes its results into the workdir
    again = modes.run(c, wd, "eval")
    assert again["eval/mse"] == pytest.approx(res["eval/mse"], rel=1e-6)
    assert os.path.exists(os.path.join(wd, "eval_mse.txt"))


def test_modes_run_from_official_weights_without_a_checkpoint(tmp_path):
    """`--mode=export/eval/predict --config.model.init_from=<state_dict>` on an empty workdir."""
    c = _config()
    task = tasks.get_task(c, "export")
    variables = jax.tree_util.tree_map(np.asarray, task.init_variables(jax.random.PRNGKey(3)))
    weights = torch_bridge.save_state_dict_file(task.to_torch(variables), str(tmp_path / "weights.pt"))
    c.model.init_from = weights
    wd = str(tmp_path / "wd")
    out = modes.run(c, wd, "export")
    from research.bridge.onnx_export import OnnxRunner
    x = toy_task.make_data(5, seed=9)["image"]
    onnx_out = OnnxRunner(out["onnx"])(images=x)[0]
    jax_out = np.asarray(task.model.apply(variables, x))
    np.testing.assert_allclose(onnx_out, jax_out, rtol=1e-5, atol=1e-6)
    reread = torch_bridge.load_state_dict_file(out["torch_pt"])
    for k, v in task.to_torch(variables).items():
        np.testing.assert_array_equal(reread[k], v, err_msg=k)
    assert "eval/mse" in modes.run(c, wd, "eval")
    assert modes.run(c, wd, "predict")["predictions"]
    assert not os.path.exists(os.path.join(wd, "checkpoints")) or not os.listdir(os.path.join(wd, "checkpoints"))


def test_a_network_mode_runs_from_weights_and_unknown_modes_are_named(tmp_path):
    """`Task.extra_modes` (SiamFC's `track`) go through `modes.run` like the shared ones."""
    c = _config()
    task = tasks.get_task(c, "export")
    variables = jax.tree_util.tree_map(np.asarray, task.init_variables(jax.random.PRNGKey(4)))
    c.model.init_from = torch_bridge.save_state_dict_file(task.to_torch(variables), str(tmp_path / "w.pt"))
    out = modes.run(c, str(tmp_path / "wd"), "brightness")
    expected = float(np.mean(task.model.apply(variables, toy_task.make_data(4, seed=2)["image"])))
    assert out["brightness/mean"] == pytest.approx(expected, rel=1e-6)
    assert float(open(out["brightness_file"]).read()) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match=r"unknown --mode='track' for network 'toy'; modes: train, .*brightness"):
        modes.run(c, str(tmp_path / "wd"), "track")


def test_unknown_evaluator_type_is_a_clear_error():
    c = _config()
    c.evals.mse.type = "msee"
    with pytest.raises(ValueError, match=r"config.evals.mse.type='msee': unknown evaluator type; known: .*toy_mse"):
        toy_task.ToyTask(c).evaluators()


def test_modes_without_checkpoint_or_weights_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint in .* and no config.model.init_from"):
        modes.run(_config(), str(tmp_path), "export")


class _Interrupt(Exception):
    pass


class _KilledToy(toy_task.ToyTask):
    """Stops feeding data after `kill_after` batches, as if the process were killed."""

    kill_after = 10**9

    def train_loader(self, iterator_state=None):
        loader, outer = super().train_loader(iterator_state), self

        class Loader:
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
        return Loader()


def _leaves(state):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves((state.params, state.batch_stats, state.ema_params))]


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    c = _config(eval_every_steps=0)
    full = trainer.train_and_evaluate(c, str(tmp_path / "full"), toy_task.ToyTask(c))["state"]
    killed = _KilledToy(c)
    killed.kill_after = 13  # dies during step 14; the last checkpoint is step 8
    with pytest.raises(_Interrupt):
        trainer.train_and_evaluate(c, str(tmp_path / "resumed"), killed)
    assert trainer.Checkpointer(str(tmp_path / "resumed")).latest_step() == 8
    resumed = trainer.train_and_evaluate(c, str(tmp_path / "resumed"), toy_task.ToyTask(c))["state"]
    assert int(resumed.step) == 24
    for a, b in zip(_leaves(full), _leaves(resumed)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


class _NanAfter(toy_task.ToyTask):
    """Feeds NaN targets from batch `nan_from` on (a corrupt input that slipped through)."""

    nan_from = 10**9
    fed = 0

    def to_device(self, local):
        self.fed += 1
        if self.fed >= self.nan_from:
            local = dict(local, target=np.full_like(local["target"], np.nan))
        return local


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path):
    c = _config(eval_every_steps=0)
    task = _NanAfter(c)
    task.nan_from = 11
    with pytest.raises(trainer.NonFiniteLossError, match="loss is nan at step 11"):
        trainer.train_and_evaluate(c, str(tmp_path), task)
    ck = trainer.Checkpointer(str(tmp_path))
    assert ck.latest_step() == 8
    variables = task.init_variables(jax.random.PRNGKey(1))
    template = trainer.create_train_state(variables, task.make_optimizer(
        variables["params"], trainer.compute_steps(c, 64)), True)
    state, _ = ck.restore(template)
    assert int(state.step) == 8
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state.params))


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    c = _config(total_steps=8, eval_every_steps=0)
    trainer.train_and_evaluate(c, str(tmp_path), toy_task.ToyTask(c))
    other = _config(total_steps=16, resume_changes=True, **{"model.width": 6})
    with pytest.raises(ValueError, match="does not fit this model"):
        trainer.train_and_evaluate(other, str(tmp_path), toy_task.ToyTask(other))
    with pytest.raises(ValueError, match="does not fit this model"):
        modes.run(other, str(tmp_path), "export")
    assert trainer.Checkpointer(str(tmp_path)).latest_step() == 8  # nothing lost


def test_resume_with_a_changed_config_is_refused_and_the_record_kept(tmp_path):
    c = _config(total_steps=8, eval_every_steps=0)
    trainer.train_and_evaluate(c, str(tmp_path), toy_task.ToyTask(c))
    recorded = open(tmp_path / "config.json").read()
    changed = _config(total_steps=16, batch_size=4, eval_every_steps=4)  # eval cadence alone would be fine
    with pytest.raises(ValueError, match=r"(?s)batch_size: 8 -> 4.*total_steps: 8 -> 16.*resume_changes=True"):
        trainer.train_and_evaluate(changed, str(tmp_path), toy_task.ToyTask(changed))
    assert open(tmp_path / "config.json").read() == recorded
    assert trainer.Checkpointer(str(tmp_path)).latest_step() == 8
    cadence_only = _config(total_steps=8, eval_every_steps=4, log_every_steps=2)
    trainer.train_and_evaluate(cadence_only, str(tmp_path), toy_task.ToyTask(cadence_only))  # not refused
    accepted = _config(total_steps=16, batch_size=4, eval_every_steps=0, resume_changes=True)
    state = trainer.train_and_evaluate(accepted, str(tmp_path), toy_task.ToyTask(accepted))["state"]
    assert int(state.step) == 16
