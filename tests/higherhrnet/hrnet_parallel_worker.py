"""Trains HigherHRNet's `smoke` config for a few steps in its own process on N fake CPU devices and saves the final
params, BatchNorm statistics and per-step losses (for test_higherhrnet_parallel.py; XLA's device count must be set
before JAX starts, hence a fresh process)."""

import argparse
import json
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--devices", type=int, default=1)
parser.add_argument("--data_dir", required=True)
parser.add_argument("--workdir", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--steps", type=int, default=2)
parser.add_argument("--lr", type=float, default=1e-5)
args = parser.parse_args()

os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ.get("RESEARCH_JAX_CACHE", os.path.join(ROOT, ".cache", "jax")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

from configs.higherhrnet import get_config  # noqa: E402
from research import parallel, trainer  # noqa: E402
from research.higherhrnet.task import Task  # noqa: E402

c = get_config("smoke")
c.data.data_dir = args.data_dir
c.total_steps = args.steps
c.log_every_steps = 1
c.checkpoint_every_steps = args.steps
c.eval_every_steps = 0  # no evaluation
# Adam moves every weight by ~lr per step whatever its gradient; at the smoke lr (2e-3, twice the official init's
# weight scale 1e-3) the first step remakes the network and the float-rounding difference of a sharded reduction
# grows into lr-sized differences by step 2 (gradients change sign); at 1e-5 the two steps stay comparable
c.optim.lr = args.lr
out = trainer.train_and_evaluate(c, args.workdir, Task(c))
assert len(jax.devices()) == args.devices
state = out["state"]
flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(parallel.fetch(v))
        for path, v in jax.tree_util.tree_leaves_with_path({"params": state.params, "batch_stats": state.batch_stats})}
losses = [json.loads(line).get("train/loss") for line in open(os.path.join(args.workdir, "metrics.jsonl"))]
flat["losses"] = np.asarray([v for v in losses if v is not None], np.float64)
np.savez(args.out, **flat)
print("worker done", jax.device_count())
