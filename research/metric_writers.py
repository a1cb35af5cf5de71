"""Metrics to the console, a JSON-lines file and TensorBoard event files in the workdir."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Mapping

import jax
from absl import logging


class MetricWriter:
    """Writes scalars; only process 0 writes files (every process may call it)."""

    def __init__(self, workdir: str, total_steps: int | None = None):
        self.workdir = workdir
        self.total_steps = total_steps
        self.active = jax.process_index() == 0
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.active:
            os.makedirs(workdir, exist_ok=True)
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # pragma: no cover
                logging.warning("tensorboardX not installed: no TensorBoard event files")
        self._t0 = time.time()
        self._last = (time.time(), None)

    def write(self, step: int, scalars: Mapping[str, float], console: bool = True) -> None:
        scalars = {k: float(v) for k, v in scalars.items()}
        if not self.active:
            return
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps({"step": int(step), "time": round(time.time() - self._t0, 3), **scalars}) + "\n")
        if self._tb is not None:
            for k, v in scalars.items():
                if math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if console:
            parts = [f"{k}={v:.4g}" for k, v in scalars.items()]
            eta = ""
            if self.total_steps and "perf/steps_per_sec" in scalars and scalars["perf/steps_per_sec"] > 0:
                left = (self.total_steps - step) / scalars["perf/steps_per_sec"]
                eta = f" eta {int(left // 60)}m{int(left % 60):02d}s"
            total = f"/{self.total_steps}" if self.total_steps else ""
            logging.info("[step %d%s%s] %s", step, total, eta, " ".join(parts))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
