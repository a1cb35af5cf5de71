"""Our weights in the official PyTorch YOLOv5 (`models/yolo.py` `Model`), loaded strict.

Runs when `YOLOV5_REPO` names a local clone of ultralytics/yolov5 whose requirements are
importable (torchvision among them); skipped otherwise, e.g. in CI, which has neither (the
official code is never copied into this project, and nothing downloads at run time). Without
it, `test_bridge.py` / `test_yolov5_golden.py` check the same keys, shapes and outputs against
the golden data the official code produced.

    YOLOV5_REPO=~/src/yolov5 .venv/bin/python -m pytest tests/test_official_torch.py
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.yolov5 import bridge
from research.yolov5.model import build_model, load_yaml_cfg

REPO = os.environ.get("YOLOV5_REPO", "")
pytestmark = pytest.mark.skipif(not REPO, reason="YOLOV5_REPO (a clone of ultralytics/yolov5) is not set")


@pytest.fixture(scope="module")
def official():
    from research.yolov5 import official_torch
    official_torch.import_official(REPO)  # fails the tests with the reason if the clone does not import
    return official_torch


def _random_variables(model, size=64, seed=0):
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))
    rs = np.random.RandomState(seed)
    v = jax.tree_util.tree_map(lambda s: rs.randn(*s.shape).astype(np.float32) * 0.1, shapes)
    bs = v["batch_stats"]  # positive running variances
    v["batch_stats"] = jax.tree_util.tree_map_with_path(
        lambda p, a: np.abs(a) + 0.5 if "var" in str(p[-1]) else a, bs)
    return v


@pytest.mark.parametrize("variant", ["n", "s"])
def test_exported_state_dict_loads_strict_and_matches(official, variant):
    import torch
    model = build_model(variant=variant)
    variables = _random_variables(model)
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in bridge.to_torch(model, variables).items()}
    tm = official.official_model(REPO, load_yaml_cfg(None, variant=variant, nc=80))
    tm.load_state_dict(sd, strict=True)  # raises on any missing / unexpected key or shape
    tm.eval()
    x = np.random.RandomState(1).rand(2, 96, 128, 3).astype(np.float32)
    with torch.no_grad():
        pred_t, heads_t = tm(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    out = model.apply(variables, jnp.asarray(x), train=False)
    scale = float(np.abs(pred_t.numpy()).max())
    np.testing.assert_allclose(np.asarray(out["pred"]), pred_t.numpy(), atol=1e-4 * scale, rtol=0)
    for ours, theirs in zip(out["heads"], heads_t):
        np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=1e-4 * float(theirs.abs().max()), rtol=0)


def test_official_state_dict_imports(official):
    import torch
    torch.manual_seed(0)
    tm = official.official_model(REPO, load_yaml_cfg(None, variant="n", nc=80)).eval()
    model = build_model(variant="n")
    template = _random_variables(model)
    variables = bridge.from_torch(model, tm.state_dict(), template)
    x = np.random.RandomState(2).rand(1, 64, 64, 3).astype(np.float32)
    with torch.no_grad():
        pred_t = tm(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))[0].numpy()
    pred = np.asarray(model.apply(variables, jnp.asarray(x), train=False)["pred"])
    np.testing.assert_allclose(pred, pred_t, atol=1e-4 * float(np.abs(pred_t).max()), rtol=0)
