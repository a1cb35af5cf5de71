"""Data parallelism: same result on 1 and 2 devices, and on 2 processes (same global batches)."""

import os
import sys

import numpy as np
import pytest

import parallel_testlib

HERE = os.path.dirname(os.path.abspath(__file__))
# YOLOv5 smoke without mosaic: cheaper; the data path is not what this checks
YOLOV5 = ["--network", "yolov5", "--set", "hyp.mosaic=0.0"]


def _run(args):
    return parallel_testlib.start(YOLOV5, args)


def _wait(p):
    return parallel_testlib.wait(p)


_load = parallel_testlib.load


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tfds"))
    sys.path.insert(0, os.path.dirname(HERE))
    from research.data import pipeline
    pipeline.prepare("shapes_detection", d, config="tiny")
    return d


def test_one_and_two_devices_agree(data_dir, tmp_path):
    for n in (1, 2):
        _wait(_run(["--devices", str(n), "--data_dir", data_dir, "--workdir", str(tmp_path / f"w{n}"),
                    "--out", str(tmp_path / f"p{n}.npz"), "--steps", "3"]))
    a, b = _load(tmp_path / "p1.npz"), _load(tmp_path / "p2.npz")
    assert a.keys() == b.keys()
    for k in a:
        # global-batch BatchNorm and gradients: the sharded run is the same computation
        np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=2e-5, err_msg=k)
    assert any("mean" in k for k in a)


def test_two_processes_train_like_one_process_with_two_devices(data_dir, tmp_path):
    """Each process reads its slots of the same global batches (research/data/pipeline.py
    GlobalBatchSampler), so 2 processes x 1 device end where 1 process x 2 devices ends."""
    a, _ = parallel_testlib.two_processes(YOLOV5 + ["--steps", "2"], data_dir, tmp_path)
    # afterwards, not beside them: a third busy process on 2 cores can delay one of the pair past
    # gloo's 30 s rendezvous
    _wait(_run(["--devices", "2", "--data_dir", data_dir, "--workdir", str(tmp_path / "s"),
                "--out", str(tmp_path / "single.npz"), "--steps", "2"]))
    c = _load(tmp_path / "single.npz")
    assert a.keys() == c.keys()
    for k in a:
        np.testing.assert_allclose(a[k], c[k], rtol=2e-4, atol=2e-5, err_msg=k)
