"""HigherHRNet data-parallel: the `smoke` config trained 2 steps on 1 and on 2 (fake CPU) devices gives the same losses,
params and BatchNorm statistics (global-batch BatchNorm and gradients: XLA all-reduces over the `data` mesh); and
2 processes x 1 device joined by `jax.distributed.initialize` (the multi-host form) end where 1 process x 2
devices ends."""

import numpy as np

import parallel_testlib

# Adam moves every weight by ~lr per step whatever its gradient; at the smoke lr (2e-3, twice the official init's
# weight scale 1e-3) the first step remakes the network and the float-rounding difference of a sharded reduction
# grows into lr-sized differences by step 2 (gradients change sign); at 1e-5 the two steps stay comparable
SETTINGS = ["--network", "higherhrnet", "--set", "optim.lr=1e-5", "--steps", "2"]


def _run(args):
    return parallel_testlib.wait(parallel_testlib.start(SETTINGS, args))


def _assert_same_training(a, b):
    """Same logged losses and variables, up to the float summation order of the sharded reductions."""
    assert a.keys() == b.keys() and len(a["losses"]) == 2 and np.all(np.isfinite(a["losses"]))
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-5)
    for k in a:
        if k.startswith("params/"):
            # the worker's Adam lr 1e-5 moves each weight by ~1e-5 per step: agree to 5% of the 2-step movement
            np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=k)
        elif k != "losses":
            np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=2e-5, err_msg=k)


def test_one_and_two_devices_agree(tmp_path):
    data_dir = str(tmp_path / "tfds")
    for n in (1, 2):  # one after the other: the first prepares the data
        _run(["--devices", str(n), "--data_dir", data_dir, "--workdir", str(tmp_path / f"w{n}"),
              "--out", str(tmp_path / f"p{n}.npz")])
    a, b = (parallel_testlib.load(tmp_path / f"p{n}.npz") for n in (1, 2))
    _assert_same_training(a, b)
    assert any(k.endswith("mean") and np.abs(a[k]).max() > 0 for k in a)  # the BatchNorm running means were updated from the (global) batch


def test_two_processes_train_like_one_process_with_two_devices(tmp_path):
    """Each process reads its rows of the same global batches (`train_loader(process_index=...)`) and feeds its
    shard; gradients and BatchNorm statistics are reduced across the processes (gloo): the 2 processes end with
    identical variables, and where 1 process x 2 devices ends."""
    data_dir = str(tmp_path / "tfds")
    _run(["--devices", "2", "--data_dir", data_dir, "--workdir", str(tmp_path / "s"),  # also prepares the data
          "--out", str(tmp_path / "single.npz")])
    a, _ = parallel_testlib.two_processes(SETTINGS, data_dir, tmp_path)
    _assert_same_training(a, parallel_testlib.load(tmp_path / "single.npz"))
