"""Loader workers and their shared memory are released when a loader stops early (issue 10 case 9).

grain's worker processes hand batches over in POSIX shared memory (/dev/shm/psm_*). A run that
stopped reading its training loader (training ends mid-epoch) used to leave the blocks the
workers had prepared, and Python's `resource_tracker` reported "leaked shared_memory objects" at
exit; rectangular evaluation batches with workers crashed (each worker batched its own share of
the images, mixing shapes). The trainer and the evaluators now close their iterators
(`research.data.pipeline.close_iterator`), and rectangular batches are read in-process.
"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("mode", ["close", "keep_open"])
def test_stopped_loader_leaves_no_shared_memory(tmp_path, mode):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "loader_cleanup_worker.py"),
                           str(tmp_path / "tfds"), mode], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = re.search(r"TRAIN (.*) VAL (\d+) LEFT (\d+)", proc.stdout)
    assert m, proc.stdout[-2000:]
    assert m.group(1) == "[(4, 64, 64, 3), (4, 64, 64, 3), (4, 64, 64, 3)]"
    assert int(m.group(2)) == 20  # every validation image once, in rectangular batches
    assert "leaked shared_memory" not in proc.stderr, proc.stderr[-2000:]
    if mode == "close":
        assert int(m.group(3)) == 0
    else:  # the control: an open iterator's workers hold blocks, so the check above can fail
        assert int(m.group(3)) > 0
