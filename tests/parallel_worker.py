"""Trains a network's `smoke` config for a few steps in its own process and saves the final variables.

Used by the data-parallel tests (tests/test_parallel.py, tests/higherhrnet/test_higherhrnet_parallel.py,
tests/rtdetr/test_rtdetr_parallel.py) for the paths that need a fresh JAX process (XLA's device count is fixed
when JAX starts): N fake CPU devices in one process (`--devices N`), or one of several processes joined through
`jax.distributed.initialize` on 127.0.0.1 (`--process_id i --num_processes n --port p`).

Writes `--out` (npz): every `params/...` and `batch_stats/...` leaf, and `losses` (the logged `train/loss` of each
step; process 0 only). `--set key=value` (repeatable) overrides a config field with a Python literal, e.g. `--set optim.lr=1e-5`.
"""

import argparse
import ast
import importlib
import json
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--network", default="yolov5")
parser.add_argument("--devices", type=int, default=1)
parser.add_argument("--process_id", type=int, default=-1)
parser.add_argument("--num_processes", type=int, default=0)
parser.add_argument("--port", type=int, default=0)
parser.add_argument("--data_dir", required=True)
parser.add_argument("--workdir", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--steps", type=int, default=2)
parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
args = parser.parse_args()

os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ.get("RESEARCH_JAX_CACHE", os.path.join(ROOT, ".cache", "jax")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")

from research import parallel, tasks, trainer  # noqa: E402

parallel.initialize_distributed(f"127.0.0.1:{args.port}" if args.port else "", args.num_processes, args.process_id)
c = importlib.import_module(f"configs.{args.network}").get_config("smoke")
c.data.data_dir = args.data_dir
c.total_steps = args.steps
c.log_every_steps = 1
c.checkpoint_every_steps = args.steps
c.eval_every_steps = 0  # no evaluation
for item in args.set:
    key, value = item.split("=", 1)
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
        node = node[p]
    node[leaf] = ast.literal_eval(value)
out = trainer.train_and_evaluate(c, args.workdir, tasks.get_task(c, "train"))
assert len(jax.devices()) == args.devices * max(args.num_processes, 1)
state = out["state"]
flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(parallel.fetch(v))
        for path, v in jax.tree_util.tree_leaves_with_path({"params": state.params, "batch_stats": state.batch_stats})}
if jax.process_index() == 0:  # the process that writes metrics.jsonl
    with open(os.path.join(args.workdir, "metrics.jsonl")) as f:
        losses = [json.loads(line).get("train/loss") for line in f]
    flat["losses"] = np.asarray([v for v in losses if v is not None], np.float64)
np.savez(args.out, **flat)
print("worker done", jax.process_index(), jax.device_count())
