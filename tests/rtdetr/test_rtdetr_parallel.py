"""RT-DETR data-parallel: the `smoke` config trained on 1 and on 2 (fake CPU) devices ends at the same variables.

The global batch is sharded over the `data` mesh; gradients, BatchNorm statistics, the Hungarian matching (host
callback on the global outputs) and the number-of-boxes normaliser are those of the global batch, so the two
runs are the same computation up to float summation order (as tests/test_parallel.py for the toy/YOLOv5 path).
"""

import json

import numpy as np
import pytest

import parallel_testlib

# Adam's first steps move every parameter by ~lr * sign(gradient): a gradient that is ~0 up to float noise can
# flip sign between the 1- and 2-device summation orders and move by 2 * lr. A small lr bounds that noise
# (2 steps: <= 4e-5) below the test's tolerance, while real differences (a wrong all-reduce) stay visible.
# No photometric distortion: cheaper; the data path is not what this checks.
SETTINGS = ["--network", "rtdetr", "--set", "optim.lr=1e-5", "--set", "aug.photometric_p=0.0", "--steps", "2"]


def _start(args):
    return parallel_testlib.start(SETTINGS, args)


def test_one_and_two_devices_agree(tmp_path):
    from research.data import pipeline
    data_dir = str(tmp_path / "tfds")
    pipeline.prepare("shapes_detection", data_dir, config="tiny")
    procs = {n: _start(["--devices", str(n), "--data_dir", data_dir, "--workdir", str(tmp_path / f"w{n}"),
                        "--out", str(tmp_path / f"p{n}.npz")]) for n in (1, 2)}
    for n, p in procs.items():  # both at once: each is mostly a single-threaded XLA compile
        parallel_testlib.wait(p, f"{n} device(s)")
    a, b = (parallel_testlib.load(tmp_path / f"p{n}.npz") for n in (1, 2))
    assert a.keys() == b.keys() and any("mean" in k for k in a)
    for k in a:  # atol: Adam's sign noise on ~0 gradients (SETTINGS above) is <= 2 steps x 2 x lr 1e-5
        np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=5e-5, err_msg=k)
    # the logged losses (every term), gradient and parameter norms of each step agree and are finite: with Adam
    # the parameters hide a gradient scale error (a missing all-reduce), the logged gradient norm does not
    logs = []
    for n in (1, 2):
        with open(tmp_path / f"w{n}" / "metrics.jsonl") as f:
            logs.append([json.loads(line) for line in f if "train/loss" in line])
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]] and logs[0]
    for r1, r2 in zip(*logs):
        for key in (k for k in r1 if k.startswith("train/")):
            assert np.isfinite(r1[key]) and r1[key] == pytest.approx(r2[key], rel=1e-4, abs=1e-6), key


def test_two_processes_train_like_one_process_with_two_devices(tmp_path):
    """Multi-host form: 2 processes x 1 device joined by `jax.distributed.initialize` (each reads its slots of the
    global batches; the Hungarian matching's host callback sees the global outputs) end where 1 process x 2
    devices ends: same variables, same logged losses; both processes hold the same variables."""
    from research.data import pipeline
    data_dir = str(tmp_path / "tfds")
    pipeline.prepare("shapes_detection", data_dir, config="tiny")
    a, _ = parallel_testlib.two_processes(SETTINGS, data_dir, tmp_path)
    # afterwards, not beside them: a third busy process on 2 cores can delay one of the pair past gloo's rendezvous
    parallel_testlib.wait(_start(["--devices", "2", "--data_dir", data_dir, "--workdir", str(tmp_path / "s"),
                                  "--out", str(tmp_path / "single.npz")]), "1 process x 2 devices")
    c = parallel_testlib.load(tmp_path / "single.npz")
    assert a.keys() == c.keys() and len(a["losses"]) == 2
    for k in a:
        np.testing.assert_allclose(a[k], c[k], rtol=2e-4, atol=5e-5, err_msg=k)
