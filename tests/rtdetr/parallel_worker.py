"""Trains RT-DETR `smoke` for a few steps in its own process on N fake CPU devices; saves the final variables.

Used by tests/rtdetr/test_rtdetr_parallel.py: the device count must be set (XLA_FLAGS) before JAX starts.
"""

import argparse
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--devices", type=int, default=1)
parser.add_argument("--data_dir", required=True)
parser.add_argument("--workdir", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--steps", type=int, default=2)
args = parser.parse_args()

os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ.get("RESEARCH_JAX_CACHE", os.path.join(ROOT, ".cache", "jax")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

from configs.rtdetr import get_config  # noqa: E402
from research import parallel, trainer  # noqa: E402
from research.rtdetr.task import Task  # noqa: E402

c = get_config("smoke")
c.data.data_dir = args.data_dir
c.total_steps = args.steps
c.checkpoint_every_steps = args.steps
c.eval_every_steps = 0  # no evaluation
c.log_every_steps = 1
c.aug.photometric_p = 0.0  # cheaper; the data path is not what this checks
# Adam's first steps move every parameter by ~lr * sign(gradient): a gradient that is ~0 up to float noise can
# flip sign between the 1- and 2-device summation orders and move by 2 * lr. A small lr bounds that noise
# (2 steps: <= 4e-5) below the test's tolerance, while real differences (a wrong all-reduce) stay visible.
c.optim.lr = 1e-5
out = trainer.train_and_evaluate(c, args.workdir, Task(c))
assert len(jax.devices()) == args.devices
state = out["state"]
flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(parallel.fetch(v))
        for path, v in jax.tree_util.tree_leaves_with_path({"params": state.params, "batch_stats": state.batch_stats})}
np.savez(args.out, **flat)
print("worker done", jax.device_count())
