"""Official RT-DETR checkpoints in every mode without training (`--config.model.init_from=<file>`).

An official-layout checkpoint at the `smoke` (tiny) width is built from our variables through the bridge and
saved as the official training code saves it (`src/solver/solver.py` `state_dict`: `ema.module`, `model`,
the optimizer and lr-scheduler states, `last_epoch`), and as a `model`-only file; `research.modes.run` then
exports, evaluates and predicts from each. Files that hold other pickled objects are refused, naming the file.
"""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

import research.rtdetr.task  # noqa: F401  (registers "rtdetr")
from configs.rtdetr import get_config
from research import modes, tasks
from research.bridge import torch_bridge
from research.rtdetr import bridge

torch = pytest.importorskip("torch")


class NotAWeight:  # a pickled class: what weights_only=True must refuse
    def __init__(self):
        self.value = 3


def _tensors(sd):
    return {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}


def _config(data_dir, init_from=""):
    c = get_config("smoke")
    c.data.data_dir = data_dir
    c.model.init_from = init_from
    c.eval.batch_size = 32  # one evaluation batch
    return c


def _assert_same_detections(got, want, score_tol=1e-5, box_tol=1e-2):
    """(labels [B, K], boxes [B, K, 4], scores [B, K]) equal up to the order of tied scores: an untrained
    model gives many equal scores, which top-k may order differently in ONNX Runtime and XLA."""
    for b in range(want[0].shape[0]):
        np.testing.assert_allclose(np.sort(got[2][b]), np.sort(want[2][b]), rtol=1e-4, atol=score_tol)
        unused = np.ones(want[0].shape[1], bool)
        for k in range(got[0].shape[1]):
            same = (unused & (want[0][b] == got[0][b, k]) & (np.abs(want[2][b] - got[2][b, k]) <= score_tol)
                    & (np.abs(want[1][b] - got[1][b, k]).max(-1) <= box_tol))
            assert same.any(), f"image {b}: detection {k} of ONNX {got[0][b, k]} {got[1][b, k]} not in JAX's"
            unused[np.flatnonzero(same)[0]] = False


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(data dir, {name: (path, expected state_dict)}): the EMA weights differ from the raw model's, so the
    test sees which one a mode used."""
    root = tmp_path_factory.mktemp("rtdetr_weights")
    data_dir = str(root / "data")
    task = tasks.get_task(_config(data_dir), "train")
    ema = jax.tree_util.tree_map(np.asarray, task.init_variables(jax.random.PRNGKey(3)))
    raw = jax.tree_util.tree_map(lambda a: (a + np.float32(0.01)) if a.dtype == np.float32 else a, ema)
    sd_ema, sd_raw = bridge.to_torch(task.model, ema), bridge.to_torch(task.model, raw)
    # an official training checkpoint: optimizer state (tensors, ints, floats, tuples, bools), the
    # MultiStepLR state (a collections.Counter of milestones), the EMA counters, the epoch
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([{"params": [p], "lr": 1e-5}], lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4)
    p.grad = torch.ones(3)
    opt.step()
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[1000], gamma=0.1)
    full = {"model": _tensors(sd_raw), "ema": {"module": _tensors(sd_ema), "updates": 1234, "warmups": 2000},
            "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(), "last_epoch": 71}
    paths = {"ema": str(root / "checkpoint0071.pth"), "model": str(root / "model_only.pth")}
    torch.save(full, paths["ema"])
    torch.save({"model": _tensors(sd_raw)}, paths["model"])
    return data_dir, {"ema": (paths["ema"], sd_ema), "model": (paths["model"], sd_raw)}, root


def test_reads_ema_module_else_model(files):
    _, by_name, _ = files
    for name, where in (("ema", "ema.module"), ("model", "model")):
        path, expected = by_name[name]
        sd, found = bridge.read_official_checkpoint(path)
        assert found == where and set(sd) == set(expected)
        for k in expected:
            np.testing.assert_array_equal(sd[k], expected[k], err_msg=k)


def test_export_eval_predict_from_ema_checkpoint(files):
    """--mode=export, eval, predict from the full training checkpoint: the EMA weights are the ones used (the
    export's state_dict is the file's `ema.module` exactly), the ONNX deploy graph gives the JAX outputs, the
    JAX evaluation of the file's weights scores what the exported ONNX model scores, with the same detections."""
    data_dir, by_name, root = files
    path, expected = by_name["ema"]
    c = _config(data_dir, path)
    wd = str(root / "wd_ema")
    res = modes.run(c, wd, "export")
    exported = torch_bridge.load_state_dict_file(res["torch_pt"])
    assert set(exported) == set(expected)
    for k in expected:
        np.testing.assert_array_equal(exported[k], expected[k], err_msg=k)
    # ONNX = JAX on the file's weights (the deploy graph: labels, boxes in pixels, scores)
    task = tasks.get_task(c, "eval")
    variables, source = modes.restore_variables(task, wd)
    assert source == path
    from research.bridge.onnx_export import OnnxRunner
    x = np.random.default_rng(0).uniform(0, 1, (2, 64, 64, 3)).astype(np.float32)
    sizes = np.array([[64, 64], [200, 100]], np.float32)
    onnx_out = OnnxRunner(res["onnx_deploy"])(images=x, orig_target_sizes=sizes)
    jax_out = jax.jit(task.deploy_fn(variables))(x, sizes)
    _assert_same_detections(onnx_out, [np.asarray(a) for a in jax_out])
    # eval (JAX) and eval of the exported ONNX model: same mAP, same detections
    res_eval = modes.run(c, wd, "eval")
    c.eval.onnx = True
    res_onnx = modes.run(c, wd, "eval")
    assert 0.0 <= res_eval["eval/mAP50"] <= 1.0
    assert res_onnx["eval_onnx/mAP50"] == pytest.approx(res_eval["eval/mAP50"], abs=1e-3)
    dets = {n: json.load(open(os.path.join(wd, f"{n}_validation.json"))) for n in ("detections", "detections_onnx")}
    assert len(dets["detections"]) == len(dets["detections_onnx"]) == 32 * c.eval.num_top_queries
    score = lambda ds: np.sort([d["score"] for d in ds])  # noqa: E731  (written with 5 decimals)
    np.testing.assert_allclose(score(dets["detections"]), score(dets["detections_onnx"]), atol=1.5e-5)
    # predict: one PNG per image, boxes drawn (score_thres 0 in smoke: every top-k box)
    c.eval.onnx = False
    res_pred = modes.run(c, wd, "predict")
    assert len(res_pred["predictions"]) == c.predict.num_images
    from research.data import pipeline
    source = pipeline.DetectionSource(tasks.get_task(c, "predict").dataset.builder.data_dir, "validation")
    drawn = np.asarray(Image.open(res_pred["predictions"][0]).convert("RGB"))
    assert drawn.shape == source[0]["image"].shape and not np.array_equal(drawn, source[0]["image"])


def test_export_eval_predict_from_model_only_checkpoint(files):
    """A file with only `model`: every mode runs from it, and the export is the file's weights exactly."""
    data_dir, by_name, root = files
    path, expected = by_name["model"]
    c = _config(data_dir, path)
    c.export.onnx = False  # the ONNX path is checked above; here which weights each mode reads
    wd = str(root / "wd_model")
    res = modes.run(c, wd, "export")
    exported = torch_bridge.load_state_dict_file(res["torch_pt"])
    for k in expected:
        np.testing.assert_array_equal(exported[k], expected[k], err_msg=k)
    res_eval = modes.run(c, wd, "eval")
    assert 0.0 <= res_eval["eval/mAP50_95"] <= res_eval["eval/mAP50"] <= 1.0
    res_pred = modes.run(c, wd, "predict")
    assert len(res_pred["predictions"]) == c.predict.num_images
    # the evaluated detections are those of the file's `model` weights: the first image's scores equal the
    # deploy forward of those weights (bridged here independently of the mode), not of the EMA weights
    task = tasks.get_task(c, "eval")
    template = jax.tree_util.tree_map(np.asarray, task.init_variables(jax.random.PRNGKey(0)))
    first = next(iter(task.detections(bridge.from_torch(task.model, expected, template), None, "validation")))
    written = [d for d in json.load(open(os.path.join(wd, "detections_validation.json")))
               if d["image_id"] == first["image"]["id"]]
    np.testing.assert_allclose(sorted(d["score"] for d in written), np.sort(first["dets"][:, 4]), atol=1.5e-5)
    ema_first = next(iter(task.detections(bridge.from_torch(task.model, by_name["ema"][1], template), None,
                                          "validation")))
    assert np.abs(np.sort(ema_first["dets"][:, 4]) - np.sort(first["dets"][:, 4])).max() > 1e-4


def test_channels_first_export_and_its_onnx_evaluation(files):
    """`export.channels_first`: both graphs (model.onnx, deploy.onnx) take NCHW images as the official
    tools/export_onnx.py graph does, pass the export's own check against JAX, and evaluate (fed NHWC images by the
    shared runner) to the JAX evaluation's mAP."""
    import onnx
    data_dir, by_name, root = files
    c = _config(data_dir, by_name["ema"][0])
    c.export.channels_first = True
    c.export.torch = False
    wd = str(root / "wd_nchw")
    res = modes.run(c, wd, "export")
    assert max(v for k, v in res.items() if k.startswith("onnx_check/")) <= 1e-4
    for f in (res["onnx"], res["onnx_deploy"]):
        images = onnx.load(f).graph.input[0]
        assert images.name == "images"
        assert [d.dim_param or d.dim_value for d in images.type.tensor_type.shape.dim] == ["B", 3, 64, 64]
    res_eval = modes.run(c, wd, "eval")
    c.eval.onnx = True
    res_onnx = modes.run(c, wd, "eval")
    assert res_onnx["eval_onnx/mAP50"] == pytest.approx(res_eval["eval/mAP50"], abs=1e-3)


def test_unsafe_or_foreign_files_are_refused_naming_the_file(files, tmp_path):
    data_dir, by_name, _ = files
    _, sd = by_name["model"]
    pickled = str(tmp_path / "with_object.pth")
    torch.save({"model": _tensors(sd), "extra": NotAWeight()}, pickled)
    with pytest.raises(torch_bridge.BridgeError, match=r"with_object\.pth: refused to unpickle.*NotAWeight"):
        bridge.read_official_checkpoint(pickled)
    # through the task, as --config.model.init_from reaches it
    with pytest.raises(torch_bridge.BridgeError, match=r"with_object\.pth"):
        tasks.get_task(_config(data_dir, pickled), "export")
    no_weights = str(tmp_path / "optimizer_only.pth")
    torch.save({"optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}, "last_epoch": 3}, no_weights)
    with pytest.raises(torch_bridge.BridgeError, match=r"optimizer_only\.pth: no RT-DETR state_dict.*last_epoch"):
        bridge.read_official_checkpoint(no_weights)
    mixed = str(tmp_path / "mixed.pth")
    torch.save({"model": {"a.weight": torch.ones(2), "note": "hello"}}, mixed)
    with pytest.raises(torch_bridge.BridgeError, match=r"mixed\.pth: \['model'\] is not a state_dict.*note"):
        bridge.read_official_checkpoint(mixed)
    garbage = str(tmp_path / "garbage.pth")
    open(garbage, "wb").write(b"not a torch file")
    with pytest.raises(torch_bridge.BridgeError, match=r"garbage\.pth"):
        bridge.read_official_checkpoint(garbage)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        bridge.read_official_checkpoint(str(tmp_path / "missing.pth"))
