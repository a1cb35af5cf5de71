"""Runs a few YOLOv5 `smoke` train steps in its own process and saves the final params.

Used by tests/test_parallel.py for the data-parallel paths that need a fresh JAX process:
N fake CPU devices in one process (`--devices N`), or one of several processes joined through
`jax.distributed.initialize` on 127.0.0.1 (`--process_id i --num_processes n --port p`).
"""

import argparse
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--devices", type=int, default=1)
parser.add_argument("--process_id", type=int, default=-1)
parser.add_argument("--num_processes", type=int, default=0)
parser.add_argument("--port", type=int, default=0)
parser.add_argument("--data_dir", required=True)
parser.add_argument("--workdir", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--steps", type=int, default=3)
args = parser.parse_args()

os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ.get(
    "RESEARCH_JAX_CACHE", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "jax")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")

from configs.yolov5 import get_config  # noqa: E402
from research import parallel, trainer  # noqa: E402
from research.yolov5.task import Task  # noqa: E402

parallel.initialize_distributed(f"127.0.0.1:{args.port}" if args.port else "", args.num_processes,
                                args.process_id)
c = get_config("smoke")
c.data.data_dir = args.data_dir
c.total_steps = args.steps
c.checkpoint_every_steps = args.steps
c.eval_every_steps = 0  # no evaluation
c.hyp.mosaic = 0.0  # cheaper; the data path is not what this checks
out = trainer.train_and_evaluate(c, args.workdir, Task(c))
state = out["state"]
assert len(jax.devices()) == args.devices * max(args.num_processes, 1)
flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(parallel.fetch(v))
        for path, v in jax.tree_util.tree_leaves_with_path(
            {"params": state.params, "batch_stats": state.batch_stats})}
np.savez(args.out, **flat)
print("worker done", jax.process_index(), jax.device_count())
