"""One tracker for JAX and ONNX, and `--mode=track` on generated videos (tiny widths).

The tiny network with its official random init already follows a high-contrast textured square
(IoU >= 0.8 on every frame, measured 0.89..0.98); the square moves 75 px over the video, so a box
that stays where it started scores IoU 0 by the end: the IoU checks can fail.
"""

import os

import cv2
import jax
import numpy as np
import onnx as onnx_lib
import pytest

from configs import siamfc as siamfc_config
from research import modes, trainer, tasks
from research.bridge import torch_bridge
from research.siamfc import bridge, evaluation, export
from research.siamfc import task as siamfc_task
from research.siamfc import track as track_lib
from research.siamfc import tracker as T
from research.siamfc.model import TinySiamFC, init_variables
from siamfc_testlib import moving_square, tiny_data

N_FRAMES = 16


@pytest.fixture(scope="module")
def square():
    return moving_square(N_FRAMES)


@pytest.fixture(scope="module")
def tiny():
    model = TinySiamFC()
    variables = jax.tree_util.tree_map(np.asarray, jax.jit(lambda r: init_variables(model, r, 87, 87))(
        jax.random.PRNGKey(1)))
    return model, variables


def _run_track(tracker, frames, box):
    boxes, peaks, scales, responses = [np.asarray(box, np.float64)], [], [], []
    tracker.init(frames[0], box)
    kernel = np.asarray(tracker.kernel)
    for f in frames[1:]:
        boxes.append(tracker.update(f))
        peaks.append(tracker.last["peak"])
        scales.append(tracker.last["scale_id"])
        responses.append(tracker.last["responses"])
    return np.stack(boxes), peaks, scales, np.stack(responses), kernel


def test_onnx_backend_gives_the_jax_boxes(tiny, square, tmp_path):
    """The same `TrackerSiamFC` on `JaxBackend` and on the exported template/search graphs: every peak
    and scale equal, boxes within 1e-3 px, responses within 1e-4 of their magnitude."""
    model, variables = tiny
    frames, truth = square
    paths = export.export_graphs(model, variables, str(tmp_path))
    assert paths["onnx_template_rel_err"] < 1e-5 and paths["onnx_search_rel_err"] < 1e-5
    onnx = T.OnnxBackend.from_dir(str(tmp_path))
    ours = _run_track(T.TrackerSiamFC(T.JaxBackend(model, variables)), frames, truth[0])
    theirs = _run_track(T.TrackerSiamFC(onnx), frames, truth[0])
    assert theirs[4].shape == (1, 16, 6, 6) and ours[4].shape == (1, 6, 6, 16)  # NCHW, the official kernel
    np.testing.assert_allclose(theirs[4].transpose(0, 2, 3, 1), ours[4], rtol=0, atol=1e-5 * np.abs(ours[4]).max())
    assert theirs[1] == ours[1] and theirs[2] == ours[2]
    np.testing.assert_allclose(theirs[0], ours[0], atol=1e-3)
    np.testing.assert_allclose(theirs[3], ours[3], rtol=0, atol=1e-4 * np.abs(ours[3]).max())
    assert np.all(evaluation.rect_iou(ours[0], truth) >= 0.8)
    # search.onnx: any number of NCHW crops against one template, official NCHW responses
    x = np.random.default_rng(0).integers(0, 256, (5, 255, 255, 3)).astype(np.float32)
    r = onnx.search_runner(template=theirs[4], search=x.transpose(0, 3, 1, 2).copy())[0]
    assert r.shape == (5, 1, 17, 17) and onnx.template_nchw and onnx.search_nchw
    np.testing.assert_allclose(r[:, 0], np.asarray(T.search_responses(model, variables, ours[4], x)),
                               rtol=0, atol=1e-4 * np.abs(r).max())
    # the graphs have no layout Transpose on the images, and the correlation is the two-convolution form
    graph = onnx_lib.load(str(tmp_path / "search.onnx")).graph
    transposed = {i for n in graph.node if n.op_type == "Transpose" for i in n.input}
    assert "search" not in transposed and [n.op_type for n in graph.node].count("Conv") == 7
    assert [d.dim_value for d in graph.input[1].type.tensor_type.shape.dim][1:] == [3, 255, 255]
    with pytest.raises(FileNotFoundError, match="run --mode=export"):
        T.OnnxBackend.from_dir(str(tmp_path / "nothing"))


def test_onnx_backend_reads_each_graphs_image_layout(tiny, tmp_path):
    """Graphs exported with NHWC images (as before the switch to NCHW) still run: `OnnxBackend`
    feeds each graph the layout its input shape says, with the same responses."""
    from research.bridge.onnx_export import export_onnx
    model, variables = tiny
    new = export.export_graphs(model, variables, str(tmp_path / "nchw"), check=False)
    nhwc = lambda fn: lambda **kw: fn(**{k: (np.transpose(v, (0, 3, 1, 2)) if k != "template" else v)  # noqa: E731
                                          for k, v in kw.items()})
    t_in, s_in = export.example_inputs(model, variables)
    old = tmp_path / "nhwc"
    export_onnx(nhwc(export.template_fn(model, variables)), {"exemplar": t_in["exemplar"].transpose(0, 2, 3, 1)},
                str(old / "template.onnx"), dynamic_batch=("exemplar",), output_names=("template",))
    export_onnx(nhwc(export.search_fn(model, variables)),
                {"template": s_in["template"], "search": s_in["search"].transpose(0, 2, 3, 1)},
                str(old / "search.onnx"), dynamic_batch=("search",), output_names=("response",))
    a, b = T.OnnxBackend.from_dir(os.path.dirname(new["onnx_search"])), T.OnnxBackend.from_dir(str(old))
    assert (a.template_nchw, a.search_nchw, b.template_nchw, b.search_nchw) == (True, True, False, False)
    rng = np.random.default_rng(3)
    z = rng.integers(0, 256, (1, 127, 127, 3), dtype=np.uint8)
    x = rng.integers(0, 256, (3, 255, 255, 3), dtype=np.uint8)
    ra, rb = a.responses(a.template(z), x), b.responses(b.template(z), x)
    assert ra.shape == rb.shape == (3, 17, 17)
    np.testing.assert_allclose(rb, ra, rtol=0, atol=1e-5 * np.abs(ra).max())


# ------------------------------------------------------------------------------------------ --mode=track
@pytest.fixture(scope="module")
def inputs(square, tmp_path_factory):
    """The square video as an mp4 file and as a folder of PNG frames."""
    frames, truth = square
    d = tmp_path_factory.mktemp("track_inputs")
    video = str(d / "square.mp4")
    w = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"mp4v"), 10.0, frames.shape[2:0:-1])
    for f in frames:
        w.write(np.ascontiguousarray(f[..., ::-1]))
    w.release()
    folder = d / "frames"
    folder.mkdir()
    for i, f in enumerate(frames):
        cv2.imwrite(str(folder / f"{i:04d}.png"), f[..., ::-1])
    return video, str(folder)


def _config(box="", input_="", init_from="", **track):
    c = siamfc_config.get_config("smoke")
    c.data.data_dir = tiny_data()[0]
    c.model.init_from = init_from
    c.track.input, c.track.box = input_, box
    for k, v in track.items():
        c.track[k] = v
    return c


def _box_text(box):
    return ",".join(f"{v:g}" for v in box)


def _read_boxes(path):
    lines = open(path).read().splitlines()
    return np.array([[float(v) for v in ln.split(",")] for ln in lines])


def _video_frames(path):
    cap = cv2.VideoCapture(path)
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n


def test_track_mode_from_weights_file_checkpoint_and_onnx(tiny, square, inputs, tmp_path):
    model, variables = tiny
    frames, truth = square
    video, folder = inputs
    weights = str(tmp_path / "tiny.pth")  # an official-layout state_dict, as torch.save writes it
    torch_bridge.save_state_dict_file(bridge.to_torch(model, variables), weights)
    # the tracker on the decoded frames the mode reads (mp4v is lossy), for the expected boxes
    decoded = np.stack([f for _, f in track_lib.FrameSource(video)])
    expected = _run_track(T.TrackerSiamFC(T.JaxBackend(TinySiamFC(), variables)), decoded, truth[0])[0]

    # 1. weights from config.model.init_from, the mp4 file in, an mp4 out
    wd = str(tmp_path / "from_file")
    res = modes.run(_config(_box_text(truth[0]), video, weights), wd, "track")
    boxes = _read_boxes(res["boxes"])
    assert res["boxes"] == os.path.join(wd, "track", "boxes.txt") and res["frames"] == N_FRAMES == len(boxes)
    np.testing.assert_allclose(boxes, expected, atol=6e-4)  # %.3f lines
    assert np.all(evaluation.rect_iou(boxes, truth) >= 0.8), evaluation.rect_iou(boxes, truth)
    assert _video_frames(res["video"]) == N_FRAMES and res["fps"] > 0 and res["skipped"] == []

    # 2. the same weights from a checkpoint (no init_from), the PNG folder in, PNG frames out
    wd2 = str(tmp_path / "from_ckpt")
    c = _config(_box_text(truth[0]), folder, save_frames=True)
    task = siamfc_task.Task(c)
    steps = trainer.compute_steps(c, task.num_train_examples())
    state = trainer.create_train_state(variables, task.make_optimizer(variables["params"], steps), False, False)
    ckpt = trainer.Checkpointer(wd2, async_save=False)
    ckpt.save(3, state, {"global_batches": 3})
    ckpt.close()
    res2 = modes.run(c, wd2, "track")
    assert res2["network"].endswith("/3")
    boxes2 = _read_boxes(res2["boxes"])
    direct = _run_track(T.TrackerSiamFC(T.JaxBackend(TinySiamFC(), variables)), frames, truth[0])[0]
    np.testing.assert_allclose(boxes2, direct, atol=6e-4)
    assert sorted(os.listdir(res2["frames_dir"])) == [f"{i:05d}.png" for i in range(N_FRAMES)]
    drawn = cv2.imread(os.path.join(res2["frames_dir"], "00005.png"))[..., ::-1]
    x, y = (int(round(v)) - 1 for v in boxes2[5, :2])
    assert tuple(drawn[y + 5, x]) == (230, 0, 0)  # the box's left edge in red

    # 3. the exported graphs (--mode=export writes template.onnx / search.onnx), --config.track.onnx
    modes.run(c, wd2, "export")
    for f in ("model.onnx", "template.onnx", "search.onnx", "model.pt"):
        assert os.path.exists(os.path.join(wd2, "export", f)), f
    c.track.onnx = True
    res3 = modes.run(c, wd2, "track")
    np.testing.assert_allclose(_read_boxes(res3["boxes"]), boxes2, atol=2e-3)
    assert "template,search" in res3["network"]


def test_track_input_errors_are_named(tiny, square, inputs, tmp_path):
    frames, truth = square
    video, folder = inputs
    for text in ("1,2,3", "a,b,c,d", "1,2,nan,4", "1,2,0,4", "1,2,5,-3"):
        with pytest.raises(track_lib.TrackInputError, match="config.track.box"):
            track_lib.parse_box(text)
    np.testing.assert_array_equal(track_lib.parse_box("10, 20 30\t40"), [10, 20, 30, 40])
    wd = str(tmp_path / "wd")  # no checkpoint and no init_from: these fail before any network is loaded
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    not_video = tmp_path / "clip.mp4"
    not_video.write_text("not a video")
    for box, input_, match in (("31,41,28,28", str(tmp_path / "missing"), "no such file"),
                               ("31,41,28,28", "", "input is empty"),
                               ("31,41,28,28", str(empty), "has no frames"),
                               ("31,41,28,28", str(not_video), "cannot open it as a video"),
                               ("200,41,28,28", folder, "outside the first frame"),
                               ("-40,41,28,28", video, "outside the first frame"),
                               ("31,41,28", folder, "4 finite numbers")):
        with pytest.raises(track_lib.TrackInputError, match=match):
            modes.run(_config(box, input_), wd, "track")
    # an unreadable first frame is refused; a later unreadable or resized frame is skipped by name
    bad = tmp_path / "bad"
    bad.mkdir()
    for i, f in enumerate(frames[:6]):
        cv2.imwrite(str(bad / f"{i:04d}.png"), f[..., ::-1])
    (bad / "0002.png").write_bytes(b"broken")
    cv2.imwrite(str(bad / "0004.png"), frames[4][:100, :120, ::-1])
    model, variables = tiny
    tr = T.TrackerSiamFC(T.JaxBackend(model, variables))
    res = track_lib.track_video(tr, track_lib.FrameSource(str(bad)), truth[0], str(tmp_path / "out"), save_frames=True)
    assert res["skipped"] == [str(bad / "0002.png"), str(bad / "0004.png")] and res["frames"] == 6
    boxes = _read_boxes(res["boxes"])
    np.testing.assert_array_equal(boxes[2], boxes[1])
    np.testing.assert_array_equal(boxes[4], boxes[3])
    assert len(os.listdir(res["frames_dir"])) == 4  # drawn frames: the ones tracked
    (bad / "0000.png").write_bytes(b"")
    with pytest.raises(track_lib.TrackInputError, match="0000.png: the first frame cannot be read"):
        modes.run(_config("31,41,28,28", str(bad)), wd, "track")
    with pytest.raises(ValueError, match="unknown --mode='trak'.*track"):
        modes.run(_config(), wd, "trak")
    assert tasks.task_class("siamfc").extra_modes == ("track",)
