"""HigherHRNet data-parallel: the `smoke` config trained 2 steps on 1 and on 2 (fake CPU) devices gives the same losses,
params and BatchNorm statistics (global-batch BatchNorm and gradients: XLA all-reduces over the `data` mesh)."""

import os
import subprocess
import sys

import numpy as np

WORKER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "parallel_worker.py")
# Adam moves every weight by ~lr per step whatever its gradient; at the smoke lr (2e-3, twice the official init's
# weight scale 1e-3) the first step remakes the network and the float-rounding difference of a sharded reduction
# grows into lr-sized differences by step 2 (gradients change sign); at 1e-5 the two steps stay comparable
SETTINGS = ["--network", "higherhrnet", "--set", "optim.lr=1e-5", "--steps", "2"]


def _run(args):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    p = subprocess.run([sys.executable, WORKER] + SETTINGS + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:]


def test_one_and_two_devices_agree(tmp_path):
    data_dir = str(tmp_path / "tfds")
    for n in (1, 2):  # one after the other: the first prepares the data
        _run(["--devices", str(n), "--data_dir", data_dir, "--workdir", str(tmp_path / f"w{n}"),
              "--out", str(tmp_path / f"p{n}.npz")])
    a, b = (dict(np.load(tmp_path / f"p{n}.npz")) for n in (1, 2))
    assert a.keys() == b.keys() and len(a["losses"]) == 2 and np.all(np.isfinite(a["losses"]))
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-5)
    moved = 0
    for k in a:
        if k.startswith("params/"):
            # the worker's Adam lr 1e-5 moves each weight by ~1e-5 per step: agree to 5% of the 2-step movement
            np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=k)
        else:
            np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=2e-5, err_msg=k)
        moved += k.endswith("mean") and np.abs(a[k]).max() > 0
    assert moved > 0  # the BatchNorm running means were updated from the (global) batch
