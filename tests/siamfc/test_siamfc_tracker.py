"""SiamFC tracker against the official TrackerSiamFC golden (../shared/reference/siamfc/golden_tracker.npz).

Tolerances are the README's "Recommended checks and tolerance": crops exactly equal; kernel and
responses within 5e-5 max|golden|; upsampled maps 1e-5; final map 1e-6; end to end every scale
id and peak equal and |box - golden| <= 1e-3 px.

The two 23-update tracks run the network as `--mode=track` and the benchmark build it
(`task.build_model` of `alexnet_v1`, `conv_impl=auto`: on CPU oneDNN's convolutions, grouped
layers as one grouped primitive, and strided-slice pooling; same variables);
`test_network_pieces` checks that it and `SplitGroupConv` give the default model's responses.
"""

import json
import os
import sys

import jax
import numpy as np
import pytest

from configs import siamfc as siamfc_config
from conftest import REFERENCE
from research.siamfc import bridge, ops
from research.siamfc import task as siamfc_task
from research.siamfc import tracker as T
from research.siamfc.model import SiamFC, SplitGroupConv, TinySiamFC, init_variables

FOLDER = os.path.join(REFERENCE, "siamfc")
DETAIL = [("", "f1/", 1), ("", "f2/", 2), ("p1/", "p1/f4/", 4)]  # track prefix, intermediates prefix, frame
TRACKS = {"": T.TrackerSettings(), "p1/": T.TrackerSettings(scale_penalty=1.0)}


@pytest.fixture(scope="module")
def gold():
    path = os.path.join(FOLDER, "golden_tracker.npz")
    if not os.path.exists(path):
        pytest.skip(f"golden data not found at {path}")
    return dict(np.load(path))


@pytest.fixture(scope="module")
def real():
    sys.path.insert(0, REFERENCE)
    from make_weights import make_weights
    manifest = json.load(open(os.path.join(FOLDER, "manifest.json")))
    sd = make_weights(manifest, golden=np.load(os.path.join(FOLDER, "golden.npz")))
    model = SiamFC()
    template = jax.eval_shape(lambda: init_variables(model, jax.random.PRNGKey(0), 87, 87))
    return model, bridge.from_torch(model, sd, template)


def production_model() -> SiamFC:
    """The tracker's network as `--mode=track` builds it (alexnet_v1, conv_impl auto)."""
    return siamfc_task.build_model(siamfc_config.get_config("variant=alexnet_v1"))


@pytest.fixture(scope="module")
def tracks(gold, real):
    """Both official tracks end to end, with what each update produced and the trace counts."""
    _, variables = real
    model = production_model()
    key = ("search_responses", model)
    out = {}
    for prefix, settings in TRACKS.items():
        tr = T.TrackerSiamFC(T.JaxBackend(model, variables), settings)
        tr.init(gold["frames"][0], gold["init_box"])
        rec = {"init": dict(center=tr.center.copy(), target_sz=tr.target_sz.copy(), z_sz=tr.z_sz, x_sz=tr.x_sz,
                            avg_color=tr.avg_color, z_crop=tr.last["z_crop"], z_corners=tr.last["z_corners"],
                            kernel=np.asarray(tr.kernel)),
               "traces": [T.TRACE_COUNTS[key]]}
        for name in ("boxes", "scale_ids", "peaks", "centers", "target_szs", "x_szs", "z_szs", "responses",
                     "crop_sizes", "crop_corners"):
            rec[name] = []
        for i in range(1, len(gold["frames"])):
            rec["boxes"].append(tr.update(gold["frames"][i]))
            rec["traces"].append(T.TRACE_COUNTS[key])
            last = tr.last
            for name, v in (("scale_ids", last["scale_id"]), ("peaks", last["peak"]), ("centers", tr.center.copy()),
                            ("target_szs", tr.target_sz.copy()), ("x_szs", tr.x_sz), ("z_szs", tr.z_sz),
                            ("responses", last["responses"]), ("crop_sizes", last["crop_sizes"]),
                            ("crop_corners", last["crop_corners"])):
                rec[name].append(v)
        out[prefix] = {k: (np.array(v) if isinstance(v, list) else v) for k, v in rec.items()}
    return out


def _rel(ours, golden):
    return float(np.abs(np.asarray(ours, np.float64) - golden).max() / np.abs(golden).max())


def test_settings_are_the_official_defaults(gold):
    cfg = json.loads(str(gold["meta"]))["cfg"]
    assert T.TrackerSettings().__dict__ == cfg
    np.testing.assert_array_equal(T.TrackerSettings().scale_factors, gold["scale_factors"])
    assert T.TrackerSettings().upscale_sz == 272


def test_init_state_template_crop_and_kernel(gold, tracks):
    init = tracks[""]["init"]
    assert init["center"].dtype == np.float32 and np.array_equal(init["center"], gold["init_center"])
    assert np.array_equal(init["target_sz"], gold["init_target_sz"])
    assert init["z_sz"] == gold["init_z_sz"][()] and init["x_sz"] == gold["init_x_sz"][()]
    assert np.array_equal(init["avg_color"], gold["avg_color"])
    assert np.array_equal(init["z_crop"].astype(np.float32), gold["z_crop"])  # exact: uint8 crop
    assert np.array_equal(init["z_corners"], gold["z_corners"])
    err = _rel(init["kernel"].transpose(0, 3, 1, 2), gold["kernel"])
    print(f"kernel rel err {err:.2e} (tol 5e-5)")
    assert err <= 5e-5


@pytest.mark.parametrize("track,pre,frame", DETAIL)
def test_search_crops_exact(gold, real, track, pre, frame):
    """Crops from the frame and the saved state equal the official ones exactly (uint8 values)."""
    model, variables = real
    tr = T.TrackerSiamFC(T.JaxBackend(model, variables), TRACKS[track])
    tr.center, tr.x_sz = gold[pre + "center_before"].copy(), gold[pre + "x_sz_before"][()]
    tr.avg_color = gold["avg_color"]
    crops, sizes, corners = tr.search_crops(gold["frames"][frame])
    assert crops.dtype == np.uint8 and np.array_equal(crops.astype(np.float32), gold[pre + "x_crops"])
    assert np.array_equal(sizes, gold[pre + "crop_sizes"]) and np.array_equal(corners, gold[pre + "crop_corners"])


def test_padding_value_is_opencv_rounded_mean(gold):
    """A crop entirely outside the image is the mean colour rounded to uint8 (`pad_value`)."""
    patch = ops.crop_and_resize(gold["frames"][0], np.array([-100.0, -100.0], np.float32), 20, 8, gold["avg_color"])
    assert np.all(patch == gold["pad_value"])


@pytest.mark.parametrize("track,pre", [d[:2] for d in DETAIL])
def test_network_pieces(gold, real, track, pre):
    """Responses from the saved kernel and crops within 5e-5 max|golden| (float32 vs float64 is 3.5e-6),
    for the default model, `SplitGroupConv` and the production model the tracks use (which must
    agree to rounding)."""
    model, variables = real
    kernel = gold["kernel"].transpose(0, 2, 3, 1)
    crops = gold[pre + "x_crops"].astype(np.uint8)
    r = np.asarray(T.search_responses(model, variables, kernel, crops))
    for name, other in (("SplitGroupConv", SiamFC(conv=SplitGroupConv)), ("production", production_model())):
        r_other = np.asarray(T.search_responses(other, variables, kernel, crops))
        err, err_other = _rel(r, gold[pre + "responses"]), _rel(r_other, gold[pre + "responses"])
        print(f"{pre}responses rel err {err:.2e}, {name} {err_other:.2e} (tol 5e-5), "
              f"{name} vs default {_rel(r_other, r):.1e}")
        assert err <= 5e-5 and err_other <= 5e-5 and _rel(r_other, r) <= 1e-6


@pytest.mark.parametrize("track,pre", [d[:2] for d in DETAIL])
def test_upsampling_and_peak_pieces(gold, track, pre):
    settings = TRACKS[track]
    up = T.upsample_and_penalize(gold[pre + "responses"], settings)
    err_up = _rel(up, gold[pre + "responses_up"])
    scale_id, peak, final = T.locate_peak(gold[pre + "responses_up"], ops.hann_window(272), settings)
    err_final = _rel(final, gold[pre + "response_final"])
    print(f"{pre}responses_up rel err {err_up:.2e} (tol 1e-5), response_final {err_final:.2e} (tol 1e-6)")
    assert err_up <= 1e-5 and err_final <= 1e-6
    assert scale_id == gold[pre + "scale_id"] and peak == tuple(gold[pre + "peak"])


@pytest.mark.parametrize("track", list(TRACKS))
def test_end_to_end_track(gold, tracks, track):
    """From `frames` and `init_box`: every scale id and peak equal, boxes within 1e-3 px."""
    ours = tracks[track]
    assert np.array_equal(ours["scale_ids"], gold[track + "scale_ids"])
    assert np.array_equal(ours["peaks"], gold[track + "peaks"])
    box_err = np.abs(ours["boxes"] - gold[track + "boxes"]).max()
    resp_err = _rel(ours["responses"], gold[track + "responses"])
    print(f"track {track or 'default'}: max |box - golden| {box_err:.1e} px (tol 1e-3), responses rel {resp_err:.2e}")
    assert box_err <= 1e-3
    assert resp_err <= 5e-5
    for name in ("centers", "target_szs", "x_szs", "z_szs"):
        np.testing.assert_allclose(ours[name], gold[track + name], rtol=1e-6, atol=1e-5, err_msg=name)
    if track == "":  # crop placement (rounded sizes and corners) of all 23 updates
        assert np.array_equal(ours["crop_sizes"], gold["crop_sizes"])
        assert np.array_equal(ours["crop_corners"], gold["crop_corners"])


def test_network_compiles_once_per_model(tracks):
    """46 updates on two trackers of the same model: one trace of the network (at most the first update)."""
    for track in TRACKS:
        traces = tracks[track]["traces"]
        assert traces[1] - traces[0] <= 1 and traces[-1] == traces[1], traces  # nothing traced after update 1
    assert tracks["p1/"]["traces"][0] == tracks[""]["traces"][-1]  # a new tracker reuses the compiled network


def test_tiny_tracker_static_shapes_and_errors():
    """Frames of other sizes and boxes of other shapes give the same crop shapes: no retrace; and
    the tracker refuses float frames and an update before init."""
    model = TinySiamFC()
    template = jax.eval_shape(lambda: init_variables(model, jax.random.PRNGKey(0), 87, 87))
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map(lambda l: rng.normal(size=l.shape).astype(np.float32) * 0.1 + 1, template)
    tr = T.TrackerSiamFC(T.JaxBackend(model, variables))
    with pytest.raises(RuntimeError, match="before init"):
        tr.update(np.zeros((50, 60, 3), np.uint8))
    key = ("search_responses", model)
    counts = []
    for h, w, box in ((90, 120, [10, 20, 30, 24]), (200, 150, [50.5, 60.25, 12, 40]), (60, 80, [1, 1, 70, 50])):
        frames = rng.integers(0, 256, (3, h, w, 3), dtype=np.uint8)
        boxes = tr.track(frames, box)
        assert boxes.shape == (3, 4) and np.all(np.isfinite(boxes)) and np.array_equal(boxes[0], box)
        counts.append(T.TRACE_COUNTS[key])
    assert counts[0] >= 1 and counts[-1] == counts[0]
    with pytest.raises(ValueError, match="uint8"):
        tr.update(np.zeros((50, 60, 3), np.float32))
    # the variables went to the device once (numpy leaves would be copied into every update)
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree_util.tree_leaves(tr.backend.variables))
    with pytest.raises(ValueError, match="out_scale"):
        T.TrackerSiamFC(T.JaxBackend(model, variables), T.TrackerSettings(out_scale=0.01))
