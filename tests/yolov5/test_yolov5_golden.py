"""YOLOv5 n/s reproduce the official PyTorch outputs (../shared/reference) through the bridge."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REFERENCE
from research.yolov5 import bridge
from research.yolov5.model import build_model, count_params

sys.path.insert(0, REFERENCE)


def _load(name):
    folder = os.path.join(REFERENCE, name)
    if not os.path.isdir(folder):
        pytest.skip(f"golden data not found at {folder}")
    from make_weights import make_weights
    manifest = json.load(open(os.path.join(folder, "manifest.json")))
    golden = dict(np.load(os.path.join(folder, "golden.npz")))
    return manifest, golden, make_weights(manifest, golden=golden)


@pytest.mark.parametrize("variant", ["n", "s"])
def test_golden_outputs(variant):
    manifest, golden, sd = _load(f"yolov5{variant}")
    model = build_model(variant=variant)
    x = jnp.asarray(golden["input"].transpose(0, 2, 3, 1))
    template = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x[:, :64, :64]))
    assert count_params(template["params"]) == manifest["param_count"]
    variables = bridge.from_torch(model, sd, template)
    out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    for i in range(3):
        ref = golden[f"head{i}"]
        err = np.abs(np.asarray(out["heads"][i]) - ref).max()
        assert err <= 3e-4 * np.abs(ref).max(), (i, err)
    ref = golden["pred"]
    err = np.abs(np.asarray(out["pred"]) - ref).max()
    assert err <= 3e-4 * np.abs(ref).max(), err


@pytest.mark.parametrize("variant", ["n", "s"])
def test_state_dict_keys_shapes_match_official(variant):
    manifest, golden, sd = _load(f"yolov5{variant}")
    model = build_model(variant=variant)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    ours = bridge.to_torch(model, variables)
    official = {e["key"]: tuple(e["shape"]) for e in manifest["entries"]}
    assert set(ours) == set(official)
    for k, shape in official.items():
        assert tuple(ours[k].shape) == shape, k
    anchors = next(e for e in manifest["entries"] if e["key"] == "model.24.anchors")
    np.testing.assert_allclose(ours["model.24.anchors"].ravel(), np.asarray(anchors["value"]).ravel(), rtol=1e-6)
    # round trip: torch -> flax -> torch is the identity on every tensor
    back = bridge.to_torch(model, bridge.from_torch(model, sd, variables))
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
