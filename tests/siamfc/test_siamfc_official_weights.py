"""Official weights in every mode without training: `--config.model.init_from=<official .pth>`.

The state_dict has the official layout, keys and values of ../shared/reference/siamfc (the
manifest's weights via make_weights, BatchNorm statistics from golden.npz, `num_batches_tracked`
as torch writes them), saved with `torch.save` as the released `siamfc_alexnet_e50.pth` is.
`--mode=export`, `eval` (JAX and ONNX) and `track` (JAX and ONNX) run from it; checked by value:
the exported state_dict is the file's, the exported graphs reproduce the official golden
responses, the ONNX evaluation and tracks equal the JAX ones.
"""

import json
import os
import sys

import numpy as np
import pytest

from conftest import REFERENCE
from configs import siamfc as siamfc_config
from research import modes, tasks
from research.bridge import torch_bridge
from research.bridge.onnx_export import OnnxRunner
from siamfc_testlib import moving_square, tiny_data

FOLDER = os.path.join(REFERENCE, "siamfc")
NHWC = (0, 2, 3, 1)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    torch = pytest.importorskip("torch")
    if not os.path.isdir(FOLDER):
        pytest.skip(f"golden data not found at {FOLDER}")
    sys.path.insert(0, REFERENCE)
    from make_weights import make_weights
    manifest = json.load(open(os.path.join(FOLDER, "manifest.json")))
    golden = dict(np.load(os.path.join(FOLDER, "golden.npz")))
    sd = make_weights(manifest, golden=golden)
    full = {e["key"]: (torch.from_numpy(sd[e["key"]]) if e["key"] in sd else torch.tensor(0))  # num_batches_tracked
            for e in manifest["entries"]}
    path = str(tmp_path_factory.mktemp("weights") / "siamfc_alexnet_e50.pth")
    torch.save(full, path)
    return path, sd, golden


def _config(weights):
    c = siamfc_config.get_config("smoke")
    c.model.variant = "alexnet_v1"
    c.model.init_from = weights
    c.data.data_dir = tiny_data()[0]
    return c


def test_export_eval_and_track_from_official_weights(official, tmp_path):
    weights, sd, golden = official
    c = _config(weights)
    wd = str(tmp_path / "wd")

    # export: the state_dict back bit-exactly, three ONNX graphs
    res = modes.run(c, wd, "export")
    back = torch_bridge.load_state_dict_file(res["torch_pt"])
    assert set(sd) <= set(back)
    for k, v in sd.items():
        assert np.array_equal(back[k], v), k
    ex = os.path.join(wd, "export")
    assert res["onnx_template"] == os.path.join(ex, "template.onnx")  # in the export mode's results
    assert res["onnx_search"] == os.path.join(ex, "search.onnx") and res["onnx_search_rel_err"] < 1e-4
    # the tracker graphs reproduce the official responses for 3 scales (README: 3e-4 of max|golden|)
    # (both graphs take the official NCHW tensors: the golden z / x and the official kernel layout)
    feats = OnnxRunner(os.path.join(ex, "template.onnx"))(exemplar=golden["z"])[0]
    assert feats.shape == (1, 256, 6, 6)
    resp = OnnxRunner(os.path.join(ex, "search.onnx"))(template=feats, search=golden["x"])[0]
    assert resp.shape == golden["response"].shape == (3, 1, 17, 17)
    err = np.abs(resp - golden["response"]).max() / np.abs(golden["response"]).max()
    print(f"search.onnx vs official golden responses: rel err {err:.2e}")
    assert err <= 3e-4
    # the shared pair graph too (exemplar i against search i)
    pair = OnnxRunner(res["onnx"])(exemplar=np.repeat(golden["z"].transpose(NHWC), 3, 0),
                                   search=golden["x"].transpose(NHWC))[0]
    np.testing.assert_allclose(pair.transpose(0, 3, 1, 2), resp, rtol=0, atol=1e-4 * np.abs(resp).max())

    # eval: the tracker over the (smoke) eval videos, JAX then the exported graphs
    ev = modes.run(c, wd, "eval")
    task = tasks.get_task(c, "eval")
    ev_onnx = modes.evaluate(task, wd, onnx=True)
    assert 0 < ev["eval/success_auc"] <= 20 / 21 and ev["eval/fps"] > 0
    for k in ("success_auc", "precision_20px", "success_rate_50"):
        assert ev_onnx[f"eval_onnx/{k}"] == pytest.approx(ev[f"eval/{k}"], abs=1e-6), k

    # track: a generated video, JAX and ONNX give the same boxes
    frames, truth = moving_square(8)
    folder = tmp_path / "frames"
    folder.mkdir()
    import cv2
    for i, f in enumerate(frames):
        cv2.imwrite(str(folder / f"{i:03d}.png"), f[..., ::-1])
    c.track.input, c.track.box, c.track.save_frames = str(folder), ",".join(str(int(v)) for v in truth[0]), True
    tr = modes.run(c, wd, "track")
    assert tr["network"] == weights and tr["frames"] == 8
    boxes = np.loadtxt(tr["boxes"], delimiter=",")
    c.track.onnx = True
    boxes_onnx = np.loadtxt(modes.run(c, wd, "track")["boxes"], delimiter=",")
    assert boxes.shape == (8, 4)
    np.testing.assert_allclose(boxes_onnx, boxes, atol=2e-3)
