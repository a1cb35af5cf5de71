"""What every official-PyTorch benchmark runner (`research/<network>/official_torch.py`) shares.

The runners execute in the interpreter of the official code (`config.benchmark.torch_python`), so
this module needs nothing beyond the standard library: no jax, no numpy. The harness
(`research.benchmark.time_torch_reference`) starts a runner as
`python -m research.<network>.official_torch --repo=... --variant=... --image_size=...
--infer_batch=... --train_batch=... --repeats=... --out=<json>` plus the spec's `torch_args`, and
reads a json of named lists of milliseconds per call (or `skipped` with the reason).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable


def times_ms(fn: Callable[[], Any], repeats: int, warmup: int) -> list[float]:
    """`warmup` untimed calls of `fn`, then the wall time of each of `repeats` calls, in ms."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def parser(description: str, *, variant: str, image_size: int, infer_batch: int, train_batch: int,
           repeats: int = 10, out_required: bool = True, **extra_ints: int) -> argparse.ArgumentParser:
    """The runners' command line: the harness's flags with this network's defaults, and `--<name>`
    int flags for `extra_ints` (e.g. SiamFC's `tracker_frames=24`)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--repo", required=True, help="a local clone of the official repository")
    p.add_argument("--variant", default=variant)
    p.add_argument("--image_size", type=int, default=image_size)
    p.add_argument("--infer_batch", type=int, default=infer_batch)
    p.add_argument("--train_batch", type=int, default=train_batch)
    p.add_argument("--repeats", type=int, default=repeats)
    for name, default in extra_ints.items():
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--out", required=out_required, default="", help="where to write the json of timings")
    return p


def write(path: str, result: dict) -> None:
    """Writes the runner's result json for the harness."""
    with open(path, "w") as f:
        json.dump(result, f)
