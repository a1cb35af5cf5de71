"""YOLOv5 multi-scale training (train.py --multi-scale): sizes, resize, train steps per shape."""

import json
import os
import random

import jax
import numpy as np
import pytest
import torch

from configs.yolov5 import get_config
from research import trainer
from research.yolov5 import task as task_lib


@pytest.mark.parametrize("size", [(64, 64), (96, 96), (192, 192), (96, 160)])
def test_resize_matches_torch_interpolate(size):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 128, 128, 3), dtype=np.uint8)
    ours = np.asarray(task_lib._resize_bilinear(images, size)) / 255.0
    t = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    ref = torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)
    ref = ref.permute(0, 2, 3, 1).numpy()
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=2e-6)


def _official_sizes(imgsz, gs, hw, n, seed):
    """train.py's formula with Python's random, for the set of reachable shapes."""
    r = random.Random(seed)
    out = set()
    for _ in range(n):
        sz = r.randrange(int(imgsz * 0.5), int(imgsz * 1.5) + gs) // gs * gs
        sf = sz / max(hw)
        out.add(tuple(hw) if sf == 1 else tuple(int(np.ceil(x * sf / gs)) * gs for x in hw))
    return out


@pytest.mark.parametrize("imgsz,hw", [(640, (640, 640)), (128, (128, 128)), (640, (384, 640))])
def test_multi_scale_shapes_as_official(imgsz, hw):
    ours = [task_lib.multi_scale_shape(hw, imgsz, 32, seed=0, step=s) for s in range(2000)]
    assert set(ours) == _official_sizes(imgsz, 32, hw, 2000, seed=0)  # same support, every size reached
    # deterministic per (seed, iteration): a resumed run draws the same sizes
    assert ours[:50] == [task_lib.multi_scale_shape(hw, imgsz, 32, seed=0, step=s) for s in range(50)]
    assert ours[:50] != [task_lib.multi_scale_shape(hw, imgsz, 32, seed=1, step=s) for s in range(50)]


def test_multi_scale_training_compiles_once_per_size(tmp_path):
    c = get_config("smoke")
    c.data.data_dir = str(tmp_path / "tfds")
    c.multi_scale = True
    c.total_steps = 6
    c.eval_every_steps = 0
    task = task_lib.Task(c)
    sizes = {task_lib.multi_scale_shape((64, 64), 64, 32, seed=c.seed, step=s) for s in range(6)}
    assert len(sizes) > 1
    seen = []
    transform = task.transform_batch
    task.transform_batch = lambda b, s: seen.append(transform(b, s)["image"].shape) or transform(b, s)
    out = trainer.train_and_evaluate(c, str(tmp_path / "wd"), task)
    assert {tuple(s[1:3]) for s in seen} == sizes
    assert all(s[0] == c.batch_size for s in seen)
    assert out["final_metrics"]["perf/train_step_compiles"] == len(sizes)
    losses = [json.loads(line).get("train/loss") for line in open(os.path.join(tmp_path, "wd", "metrics.jsonl"))]
    assert all(np.isfinite(v) for v in losses if v is not None)


def test_multi_scale_off_leaves_batch_alone(tmp_path):
    c = get_config("smoke")
    c.data.data_dir = str(tmp_path / "tfds")
    task = task_lib.Task(c)
    batch = {"image": jax.numpy.zeros((2, 64, 64, 3), jax.numpy.uint8)}
    assert task.transform_batch(batch, 3) is batch
