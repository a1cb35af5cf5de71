"""YOLOv5 modes from official weights, without training (as val.py / export.py --weights)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.yolov5 import get_config
from research import modes
from research.bridge import torch_bridge
from research.bridge.onnx_export import OnnxRunner
from research.yolov5 import bridge
from research.yolov5.model import build_model


@pytest.fixture(scope="module")
def official_80_class_weights(tmp_path_factory):
    """An 80-class state_dict in the official key layout (`model.<layer>...`), as a .pt file."""
    model = build_model(variant="tiny", nc=80)
    variables = jax.jit(lambda r: model.init(r, jnp.zeros((1, 64, 64, 3))))(jax.random.PRNGKey(7))
    sd = bridge.to_torch(model, jax.tree_util.tree_map(np.asarray, variables))
    assert "model.24.m.0.weight" in sd and sd["model.24.m.0.weight"].shape[0] == 3 * 85
    path = str(tmp_path_factory.mktemp("weights") / "yolov5tiny_coco.pt")
    return model, variables, torch_bridge.save_state_dict_file(sd, path)


def _config(tmp_path, weights):
    c = get_config("smoke")  # 6-class `shapes` data
    c.data.data_dir = str(tmp_path / "data")
    c.model.init_from = weights
    return c


def test_export_from_official_weights_takes_their_class_count(official_80_class_weights, tmp_path):
    model, variables, weights = official_80_class_weights
    out = modes.run(_config(tmp_path, weights), str(tmp_path / "wd"), "export")
    x = np.random.default_rng(0).uniform(0, 1, (2, 64, 64, 3)).astype(np.float32)
    pred_onnx = OnnxRunner(out["onnx"])(x)[0]
    pred_jax = np.asarray(model.for_export().apply(variables, x, train=False)["pred"])
    assert pred_onnx.shape == (2, 3 * (8 * 8 + 4 * 4 + 2 * 2), 85)
    assert np.abs(pred_onnx - pred_jax).max() <= 1e-4 * np.abs(pred_jax).max()
    # the exported state_dict is the official one, unchanged
    src, back = torch_bridge.load_state_dict_file(weights), torch_bridge.load_state_dict_file(out["torch_pt"])
    assert set(src) == set(back)
    for k in src:
        np.testing.assert_array_equal(src[k], back[k], err_msg=k)


def test_predict_from_official_weights_uses_coco_names(official_80_class_weights, tmp_path):
    _, _, weights = official_80_class_weights
    c = _config(tmp_path, weights)
    c.predict.num_images = 1
    from research import tasks
    task = tasks.get_task(c, "predict")
    assert len(task.class_names) == 80 and task.class_names[0] == "person"
    assert len(modes.run(c, str(tmp_path / "wd"), "predict")["predictions"]) == 1


def test_eval_with_weights_of_another_class_count_is_a_clear_error(official_80_class_weights, tmp_path):
    _, _, weights = official_80_class_weights
    with pytest.raises(ValueError, match=r"has 80 classes but the 'shapes' data has 6"):
        modes.run(_config(tmp_path, weights), str(tmp_path / "wd"), "eval")


def test_channels_first_export_is_the_official_graph_layout(official_80_class_weights, tmp_path):
    """`export.channels_first`: NCHW images as the official export.py takes them, no input transpose left in the
    graph; the Detect head reads the convolution's output channels-first with the full-size anchor grid (as the
    official graph: no 5-D channels-last transpose, no broadcast anchor multiply); the same predictions, and
    `OnnxRunner` still takes NHWC arrays for it."""
    import onnx
    model, variables, weights = official_80_class_weights
    c = _config(tmp_path, weights)
    c.export.channels_first = True
    c.export.torch = False
    out = modes.run(c, str(tmp_path / "wd"), "export")
    g = onnx.load(out["onnx"]).graph
    assert [d.dim_param or d.dim_value for d in g.input[0].type.tensor_type.shape.dim] == ["B", 3, 64, 64]
    assert [n.op_type for n in g.node if "images" in n.input] == ["Conv"]
    perms = [tuple(a.ints) for n in g.node if n.op_type == "Transpose" for a in n.attribute if a.name == "perm"]
    # the 5-D ones: one per level, as the official Detect's permute (the 4-D pairs jax2onnx leaves around each
    # convolution cancel in ONNX Runtime's optimiser)
    assert [p for p in perms if len(p) == 5] == [(0, 1, 3, 4, 2)] * 3
    shapes = {tuple(onnx.numpy_helper.to_array(t).shape) for t in g.initializer}
    assert (1, 3, 1, 1, 2) not in shapes and {(1, 3, 8, 8, 2), (1, 3, 4, 4, 2), (1, 3, 2, 2, 2)} <= shapes
    x = np.random.default_rng(1).uniform(0, 1, (2, 64, 64, 3)).astype(np.float32)
    pred_jax = np.asarray(model.for_export().apply(variables, x, train=False)["pred"])
    runner = OnnxRunner(out["onnx"])
    for feed in (x, x.transpose(0, 3, 1, 2)):
        pred_onnx = runner(feed)[0]
        assert np.abs(pred_onnx - pred_jax).max() <= 1e-4 * np.abs(pred_jax).max()
