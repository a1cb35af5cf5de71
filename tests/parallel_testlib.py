"""Runs `tests/parallel_worker.py` for the data-parallel tests of every network: N fake CPU devices in one
process, or 2 processes x 1 device joined through `jax.distributed.initialize` on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "parallel_worker.py")


def start(settings: list[str], args: list[str]) -> subprocess.Popen:
    """Starts the worker with `settings + args` (its own XLA device count: XLA_FLAGS is not inherited)."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen([sys.executable, WORKER] + settings + args, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait(p: subprocess.Popen, what: str = "worker", timeout: int = 600) -> str:
    """The worker's output; fails the test (with the output's tail) unless it ended well."""
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0 and "worker done" in out, f"{what}:\n{out[-4000:]}"
    return out


def load(path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(settings: list[str], data_dir: str, tmp_path) -> tuple[dict, dict]:
    """Trains with 2 processes x 1 device (workdir `tmp_path/w`); returns both processes' variables after checking
    that they are identical (process 1 logs no losses)."""
    port = free_port()
    procs = [start(settings, ["--process_id", str(i), "--num_processes", "2", "--port", str(port),
                              "--data_dir", data_dir, "--workdir", str(tmp_path / "w"),
                              "--out", str(tmp_path / f"p{i}.npz")]) for i in range(2)]
    for i, p in enumerate(procs):
        wait(p, f"process {i}")
    a, b = load(tmp_path / "p0.npz"), load(tmp_path / "p1.npz")
    assert b.keys() == a.keys() - {"losses"}  # process 1 does not log
    for k in b:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert np.isfinite(a["losses"]).all()
    return a, b
