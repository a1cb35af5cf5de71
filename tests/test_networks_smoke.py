"""Every registered network trains its `smoke` config end to end and compiles its step once.

Keeps each network runnable at head (a network that breaks on a shared change fails here), and
catches recompilation after the first step (a dtype or shape that drifts between steps).
"""

import importlib
import json
import os

import numpy as np
import pytest

from research import modes, tasks


@pytest.mark.parametrize("network", tasks.NETWORKS)
def test_smoke_config_trains_without_recompiling(network, tmp_path):
    config = importlib.import_module(f"configs.{network}").get_config("smoke")
    assert config.network == network
    config.data.data_dir = str(tmp_path / "data")
    config.eval_every_steps = 0  # training only: evaluation has its own tests per network
    results = modes.run(config, str(tmp_path / "wd"), "train")
    assert results["perf/train_step_compiles"] == 1
    records = [json.loads(line) for line in open(os.path.join(tmp_path, "wd", "metrics.jsonl"))]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert losses and np.all(np.isfinite(losses))
    assert records[-1]["step"] == config.total_steps
