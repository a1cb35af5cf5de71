"""A toy network on the shared system, registered exactly as a network is (`@tasks.register`).

It regresses the mean brightness of 8x8 noise images with a conv + BatchNorm + dense model; its
data is numpy arrays through grain (resumable, sliced per process), its evaluator reports the
validation MSE, its prediction writes a text file, its export is the model on `images`, and its
torch mapping is the generic rule. The shared-layer tests use it instead of YOLOv5, so they check
the trainer, the modes and the export without any network's specifics.
"""

from __future__ import annotations

import os

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from research import tasks
from research.bridge import torch_bridge
from research.evaluation import base as evaluation_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The toy's config: the fields every network's config has, and a few of its own."""
    del arg
    c = ml_collections.ConfigDict()
    c.network = "toy"
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(width=4, init_from="", lr=0.05))
    c.data = ml_collections.ConfigDict(dict(num_train=64, num_eval=16))
    c.batch_size = 8
    c.num_epochs = 0
    c.total_steps = 24
    c.log_every_steps = 4
    c.eval_every_steps = 12
    c.checkpoint_every_steps = 8
    c.keep_checkpoints = 3
    c.async_checkpoints = False
    c.resume_changes = False  # resume a workdir whose config changed in a field that matters
    c.evals = ml_collections.ConfigDict()
    c.evals.mse = ml_collections.ConfigDict(dict(type="toy_mse", every_steps=0))  # 0: eval_every_steps
    c.evals.often = ml_collections.ConfigDict(dict(type="toy_mse", every_steps=8, prefix="often"))
    c.eval = ml_collections.ConfigDict(dict(use_ema=True, onnx=False))
    c.export = ml_collections.ConfigDict(dict(onnx=True, torch=True))
    c.distributed = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=0, process_id=-1))
    return c


class ToyNet(nn.Module):
    """images [B, 8, 8, 1] -> brightness [B]."""

    width: int = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.width, (3, 3), name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
        x = nn.relu(x).mean(axis=(1, 2))
        return nn.Dense(1, name="fc")(x)[:, 0]


def make_data(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 1, (n, 8, 8, 1)).astype(np.float32) * rng.uniform(0.2, 1.0, (n, 1, 1, 1))
    return {"image": images.astype(np.float32), "target": (images.mean(axis=(1, 2, 3)) * 4).astype(np.float32)}


@evaluation_base.register("toy_mse")
class MseEvaluator(evaluation_base.Evaluator):
    """Validation MSE (an evaluator type registered like the shared ones)."""

    def run(self, variables):
        data = make_data(self.task.config.data.num_eval, seed=1)
        if self.onnx_path:
            from research.bridge.onnx_export import OnnxRunner
            pred = OnnxRunner(self.onnx_path)(images=data["image"])[0]
        else:
            from research import parallel
            pred = np.asarray(self.task.model.apply(parallel.local_copy(variables), data["image"]))
        prefix = self.prefix
        mse = float(np.mean((pred - data["target"]) ** 2))
        if self.out_dir:
            with open(os.path.join(self.out_dir, f"{prefix}_mse.txt"), "w") as f:
                f.write(f"{mse}\n")
        yield f"{prefix}/mse", mse


@tasks.register("toy")
class ToyTask(tasks.Task):
    use_ema = True
    extra_modes = ("brightness",)

    def __init__(self, config, mode: str = "train"):
        super().__init__(config, mode)
        self.model = ToyNet(width=config.model.width)

    def num_train_examples(self) -> int:
        return int(self.config.data.num_train)

    def init_variables(self, rng) -> dict:
        variables = dict(jax.jit(lambda r: self.model.init(r, jnp.zeros((1, 8, 8, 1))))(rng))
        if self.config.model.init_from:
            sd = self.init_state_dict()
            variables = torch_bridge.torch_to_flax(sd, variables, what="ToyNet")
        return variables

    def make_optimizer(self, params, steps: tasks.Steps):
        self.steps = steps
        return optax.sgd(optax.cosine_decay_schedule(self.config.model.lr, steps.total_steps), momentum=0.9)

    def loss_fn(self, params, batch_stats, batch, rng):
        pred, mutated = self.model.apply({"params": params, "batch_stats": batch_stats}, batch["image"], train=True,
                                         mutable=["batch_stats"])
        loss = jnp.mean((pred - batch["target"]) ** 2)
        return loss, ({"train/mse": loss}, mutated["batch_stats"])

    def ema_decay(self, opt_step):
        return jnp.minimum(0.9, (1.0 + opt_step) / (10.0 + opt_step))

    def train_loader(self, iterator_state=None):
        """Shuffled epochs of the global batch; this process's rows of each one."""
        c = self.config
        per_process = c.batch_size // jax.process_count()
        data = make_data(c.data.num_train, seed=0)
        rows = [{k: v[i] for k, v in data.items()} for i in range(c.data.num_train)]
        ds = (grain.MapDataset.source(rows).shuffle(seed=c.seed).repeat().batch(c.batch_size, drop_remainder=True)
              .map(lambda b: {k: v[jax.process_index() * per_process:(jax.process_index() + 1) * per_process]
                              for k, v in b.items()}))

        class Loader:
            def __iter__(self):
                it = iter(ds.to_iter_dataset())
                if iterator_state:
                    it.set_state(iterator_state)
                return it
        return Loader()

    def predict(self, variables, out_dir):
        data = make_data(4, seed=2)
        pred = np.asarray(self.model.apply(variables, data["image"]))
        path = os.path.join(out_dir, "predictions.txt")
        np.savetxt(path, np.stack([pred, data["target"]], 1))
        return [path]

    def run_mode(self, mode, workdir):
        """The toy's own mode: mean predicted brightness of 4 fixed images, written to a file."""
        from research import modes
        variables, _ = modes.restore_variables(self, workdir)
        value = float(np.mean(self.model.apply(variables, make_data(4, seed=2)["image"])))
        path = os.path.join(workdir, "brightness.txt")
        with open(path, "w") as f:
            f.write(f"{value}\n")
        return {"brightness/mean": value, "brightness_file": path}

    def export_spec(self, variables):
        return tasks.ExportSpec(lambda images: self.model.apply(variables, images),
                                {"images": np.zeros((1, 8, 8, 1), np.float32)}, ("brightness",),
                                dynamic_batch=("images",))

    def to_torch(self, variables):
        return torch_bridge.flax_to_torch(variables)
