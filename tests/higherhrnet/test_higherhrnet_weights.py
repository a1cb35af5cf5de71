"""Official-layout weights run in every mode without training: a state_dict with the official keys (built at tiny
width from our own variables through the bridge, the W32 keys being checked against the official manifest in
test_higherhrnet_model.py) saved as a torch `.pth`, plain and with DataParallel's `module.` prefix, drives
`--mode=export`, `--mode=eval` and `--mode=predict` through `research.modes.run` with
`--config.model.init_from=<file>`; every output is checked against the JAX model on the original variables."""

import json
import os

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import research.higherhrnet.task as task_lib
from conftest import REFERENCE
from configs.higherhrnet import get_config
from research import modes
from research.benchmark import host_init
from research.bridge.torch_bridge import BridgeError
from research.higherhrnet import bridge, evaluation


def _config(tmp_path, init_from: str):
    c = get_config("smoke")
    c.data.data_dir = str(tmp_path / "data")
    c.model.init_from = init_from
    c.predict.score_threshold = 0.0  # draw every grouped person of the random weights
    return c


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Variables with O(1) outputs (torch-default kernel ranges, BatchNorm statistics not 0 / 1), their official
    state_dict as `.pth` files (plain and `module.`-prefixed) and the JAX outputs on a fixed batch."""
    import torch
    tmp = tmp_path_factory.mktemp("weights")
    task = task_lib.Task(_config(tmp, ""), "export")
    shapes = jax.eval_shape(lambda: task.model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
    variables = host_init(shapes, seed=3)
    # torch-default kernel ranges x 1.7 keep the activations O(1) through the ReLUs (x 1: outputs ~0.05)
    variables["params"] = jax.tree_util.tree_map_with_path(
        lambda p, a: a * 1.7 if "kernel" in str(p[-1]) else a, variables["params"])
    rs = np.random.RandomState(4)
    variables["batch_stats"] = jax.tree_util.tree_map(
        lambda v: (v + rs.uniform(-0.1, 0.1, v.shape)).astype(v.dtype), variables["batch_stats"])
    sd = task.to_torch(variables)
    plain, prefixed = str(tmp / "official.pth"), str(tmp / "official_dp.pth")
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, plain)
    torch.save({"module." + k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, prefixed)
    x = np.random.default_rng(0).random((2, 64, 64, 3), dtype=np.float32)
    ref = [np.asarray(o) for o in task.forward_fn(variables)(x)]
    return dict(variables=variables, sd=sd, plain=plain, prefixed=prefixed, x=x, ref=ref)


def test_module_prefix_is_stripped_and_strict(weights):
    sd = weights["sd"]
    manifest = os.path.join(REFERENCE, "higherhrnet_w32_512", "manifest.json")
    if os.path.exists(manifest):  # the tiny model's keys are official W32 keys (fewer blocks and modules)
        official = {e["key"]: e for e in json.load(open(manifest))["entries"]}
        assert set(sd) <= set(official)
        assert all(len(v.shape) == len(official[k]["shape"]) for k, v in sd.items())
    assert bridge.strip_module_prefix({"module." + k: v for k, v in sd.items()}).keys() == sd.keys()
    mixed = dict(sd, **{"module.extra": np.zeros(1)})
    assert bridge.strip_module_prefix(mixed).keys() == mixed.keys()  # only a prefix on every key is removed
    model = task_lib.Task(get_config("smoke"), "export").model
    with pytest.raises(BridgeError, match="unexpected keys"):
        bridge.from_torch(model, mixed, weights["variables"])


@pytest.mark.parametrize("channels_first", [False, True])
def test_export_from_official_weights(weights, tmp_path, channels_first):
    """--mode=export with init_from: ONNX outputs = JAX outputs of the original variables; model.pt = the file.
    With `export.channels_first` the graph takes NCHW images (as the official export), NHWC still accepted."""
    import onnx

    from research.bridge.onnx_export import OnnxRunner
    from research.bridge.torch_bridge import load_state_dict_file
    wd = str(tmp_path / "export")
    c = _config(tmp_path, weights["plain"])
    c.export.channels_first = channels_first
    results = modes.run(c, wd, "export")
    dims = [d.dim_param or d.dim_value for d in onnx.load(results["onnx"]).graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] == "B" and (dims[1] == 3) == channels_first and (dims[3] == 3) != channels_first
    assert not os.path.exists(os.path.join(wd, "checkpoints")) or not os.listdir(os.path.join(wd, "checkpoints"))
    got = OnnxRunner(results["onnx"])(images=weights["x"])
    for r, g in zip(weights["ref"], got):
        assert g.shape == r.shape and np.abs(r).max() > 0.1  # O(1) outputs, so the check has teeth
        assert np.abs(r - g).max() <= 1e-4 * np.abs(r).max()
    back = load_state_dict_file(results["torch_pt"])
    assert list(back) == list(weights["sd"])
    for k, v in weights["sd"].items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_eval_and_predict_from_official_weights(weights, tmp_path):
    """--mode=eval (plain and `module.` files give the same results file) and --mode=predict: the people equal those
    grouped from the JAX model on the original variables; each drawn PNG differs from the bare image exactly when
    people were found."""
    c = _config(tmp_path, weights["plain"])
    task = task_lib.Task(c, "eval")
    expected = []
    people = list(evaluation.predict_people(task.forward_fn(weights["variables"]), task.eval_images(),
                                            task.postprocess_settings(), c.eval.batch_size))
    for r, p in zip(task.eval_records(), people):
        expected += evaluation.people_to_results(r["image_id"], p["keypoints"], p["scores"])
    assert len(expected) > 0
    stats = evaluation.oks_ap(task.ground_truth(), expected)

    for name in ("plain", "prefixed"):
        wd = str(tmp_path / f"eval_{name}")
        res = modes.run(_config(tmp_path, weights[name]), wd, "eval")
        assert res["eval/num_people"] == len(expected)
        assert res["eval/AP"] == pytest.approx(stats["AP"], abs=1e-12)
        got = json.load(open(os.path.join(wd, "keypoints_validation_results.json")))
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            assert a["image_id"] == b["image_id"]
            np.testing.assert_allclose(a["keypoints"], b["keypoints"], rtol=1e-5, atol=1e-3)
            assert a["score"] == pytest.approx(b["score"], rel=1e-5)

    wd = str(tmp_path / "predict")
    res = modes.run(c, wd, "predict")
    paths = res["predictions"]
    assert len(paths) == c.predict.num_images
    u = c.predict.upscale
    for path, image, p in zip(paths, task.eval_images(c.predict.num_images), people):
        drawn = cv2.imread(path)
        bare = cv2.resize(np.ascontiguousarray(image[..., ::-1]), None, fx=u, fy=u, interpolation=cv2.INTER_NEAREST)
        assert drawn.shape == bare.shape
        assert (not np.array_equal(drawn, bare)) == (len(p["scores"]) > 0 and (p["keypoints"][..., 2] >= 0.1).any())
