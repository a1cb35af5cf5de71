"""`--mode=track`: the SiamFC tracker on a user's video (a folder of frames or a video file).

    python launch.py --config=configs/siamfc.py --workdir=W --mode=track \
        --config.track.input=clip.mp4 --config.track.box=120,80,40,60 [--config.track.onnx=True]

`config.track.box` is the target in the first frame as `x,y,w,h` pixels, with the convention of
the OTB / GOT-10k ground-truth files and the got10k toolkit (x, y of the top-left pixel, 1-based:
a target covering 0-based columns 10..49 has x = 11, w = 40). The run writes

  W/track/boxes.txt   one `x,y,w,h` line per input frame (`%.3f`, comma-separated, the toolkit's
                      record format); line 1 is the given box
  W/track/track.mp4   the frames with the tracked box drawn (red), cv2.VideoWriter `mp4v`, or
  W/track/frames/     PNG frames `00000.png ...` instead, with `config.track.save_frames`

and returns {'fps' (frames per second of the tracker's init/update, as the toolkit times it),
'fps_with_io', 'frames', 'boxes', 'video' or 'frames_dir', 'skipped'}. The network is the workdir's
latest checkpoint, else `config.model.init_from` (`research.modes.restore_variables`), or with
`config.track.onnx` the exported `W/export/template.onnx` + `search.onnx` (`--mode=export` first).

Bad input is named: a missing input, a folder without frames, a video OpenCV cannot open or
without frames, a box that is not 4 finite numbers, has a non-positive size or lies entirely
outside the first frame, an unreadable first frame (errors, before any network is loaded);
a later frame that cannot be read or has another size than the first (skipped with a warning
naming it: the tracker is not updated and its line repeats the previous box, so the lines stay
one per input frame).
"""

from __future__ import annotations

import math
import os
import time
from typing import Iterator

import cv2
import numpy as np
from absl import logging

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class TrackInputError(ValueError):
    """A `--mode=track` input that cannot be used; the message names it."""


def parse_box(text: str) -> np.ndarray:
    """`"x,y,w,h"` (commas and/or whitespace) -> float64 `[4]`.

    Raises:
      TrackInputError: not exactly 4 finite numbers, or a width / height <= 0.
    """
    parts = str(text).replace(",", " ").split()
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        vals = []
    if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
        raise TrackInputError(f"config.track.box={text!r}: expected x,y,w,h (4 finite numbers, pixels of the "
                              "first frame, 1-based x, y as in OTB/GOT-10k ground truth)")
    if vals[2] <= 0 or vals[3] <= 0:
        raise TrackInputError(f"config.track.box={text!r}: width and height must be positive")
    return np.asarray(vals, np.float64)


def check_box_in_frame(box: np.ndarray, height: int, width: int, text: str = "") -> None:
    """Raises TrackInputError when the 1-based `[x, y, w, h]` box does not overlap a `height` x
    `width` frame (a box partly outside is accepted: the crops pad with the mean colour)."""
    x0, y0 = box[0] - 1, box[1] - 1
    if x0 >= width or y0 >= height or x0 + box[2] <= 0 or y0 + box[3] <= 0:
        raise TrackInputError(f"config.track.box={text or box.tolist()!r} lies outside the first frame "
                              f"({width} x {height} px; x, y are 1-based)")


class FrameSource:
    """The frames of a folder (sorted file names with an image extension) or of a video file.

    Iterating yields `(name, frame)`: `name` the file path (folder) or `"<video>#<index>"`, `frame`
    an `[H, W, 3]` uint8 RGB array, or None when that file cannot be decoded.

    Raises (on construction):
      TrackInputError: the path does not exist, the folder holds no image files, or OpenCV
        cannot open the video.
    """

    def __init__(self, path: str):
        if not path:
            raise TrackInputError("config.track.input is empty: name a folder of frames or a video file")
        self.path = path
        if not os.path.exists(path):
            raise TrackInputError(f"config.track.input={path!r}: no such file or folder")
        self.is_folder = os.path.isdir(path)
        self.fps = 0.0
        if self.is_folder:
            self.files = sorted(os.path.join(path, f) for f in os.listdir(path)
                                if f.lower().endswith(FRAME_EXTENSIONS))
            if not self.files:
                raise TrackInputError(f"config.track.input={path!r}: the folder has no frames "
                                      f"({', '.join(FRAME_EXTENSIONS)})")
        else:
            cap = cv2.VideoCapture(path)
            ok = cap.isOpened()
            if ok:
                self.fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
            cap.release()
            if not ok:
                raise TrackInputError(f"config.track.input={path!r}: OpenCV cannot open it as a video")

    def __iter__(self) -> Iterator[tuple[str, np.ndarray | None]]:
        if self.is_folder:
            for f in self.files:
                data = np.fromfile(f, np.uint8)
                img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
                yield f, (cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if img is not None else None)
            return
        cap = cv2.VideoCapture(self.path)
        try:
            i = 0
            while True:
                ok, img = cap.read()
                if not ok:
                    break
                yield f"{self.path}#{i}", cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
                i += 1
        finally:
            cap.release()


class _Writer:
    """The annotated output: an mp4 (`cv2.VideoWriter`, `mp4v`) or numbered PNG frames."""

    def __init__(self, out_dir: str, save_frames: bool, fps: float):
        self.save_frames, self.fps, self.video, self.n = save_frames, fps, None, 0
        if save_frames:
            self.path = os.path.join(out_dir, "frames")
            os.makedirs(self.path, exist_ok=True)
        else:
            self.path = os.path.join(out_dir, "track.mp4")

    def write(self, rgb: np.ndarray) -> None:
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        if self.save_frames:
            cv2.imwrite(os.path.join(self.path, f"{self.n:05d}.png"), bgr)
        else:
            if self.video is None:
                h, w = bgr.shape[:2]
                self.video = cv2.VideoWriter(self.path, cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (w, h))
                if not self.video.isOpened():
                    raise RuntimeError(f"cv2.VideoWriter cannot write {self.path} (mp4v): set "
                                       "--config.track.save_frames=True for PNG frames")
            self.video.write(bgr)
        self.n += 1

    def close(self) -> None:
        if self.video is not None:
            self.video.release()


def draw_box(frame: np.ndarray, box, color=(230, 0, 0), thickness: int = 2) -> np.ndarray:
    """A copy of the RGB `frame` with the 1-based `[x, y, w, h]` box drawn (`color` RGB)."""
    img = frame.copy()
    x, y, w, h = (float(v) for v in box)
    if all(math.isfinite(v) for v in (x, y, w, h)):
        cv2.rectangle(img, (int(round(x - 1)), int(round(y - 1))), (int(round(x - 1 + w)) - 1,
                      int(round(y - 1 + h)) - 1), color, thickness)
    return img


def track_video(tracker, source: FrameSource, box: np.ndarray, out_dir: str, *, box_text: str = "",
                save_frames: bool = False, fps: float = 0.0, max_frames: int = 0) -> dict:
    """Runs `tracker` (`TrackerSiamFC`) over `source` from `box` and writes the outputs into `out_dir`.

    Returns the mode's results (module docstring).

    Raises:
      TrackInputError: the first frame is unreadable, the box lies outside it, or there are no frames.
    """
    os.makedirs(out_dir, exist_ok=True)
    writer = _Writer(out_dir, save_frames, fps or source.fps or 25.0)
    boxes, skipped, shape = [], [], None
    track_s, t_start = 0.0, time.perf_counter()
    try:
        for i, (name, frame) in enumerate(source):
            if max_frames and i >= max_frames:
                break
            if i == 0:
                if frame is None:
                    raise TrackInputError(f"{name}: the first frame cannot be read (it holds the target box)")
                shape = frame.shape
                check_box_in_frame(box, shape[0], shape[1], box_text)
                t0 = time.perf_counter()
                tracker.init(frame, box)
                track_s += time.perf_counter() - t0
                boxes.append(np.asarray(box, np.float64))
            elif frame is None or frame.shape != shape:
                why = "cannot be read" if frame is None else f"has size {frame.shape[1]} x {frame.shape[0]}, " \
                                                             f"the first frame {shape[1]} x {shape[0]}"
                logging.warning("track: skipping frame %d (%s): it %s; its line repeats the previous box", i, name,
                                why)
                skipped.append(name)
                boxes.append(boxes[-1])
                continue
            else:
                t0 = time.perf_counter()
                boxes.append(np.asarray(tracker.update(frame), np.float64))
                track_s += time.perf_counter() - t0
            writer.write(draw_box(frame, boxes[-1]))
    finally:
        writer.close()
    if not boxes:
        raise TrackInputError(f"config.track.input={source.path!r}: no frames could be read")
    path = os.path.join(out_dir, "boxes.txt")
    np.savetxt(path + ".tmp", np.stack(boxes), fmt="%.3f", delimiter=",")
    os.replace(path + ".tmp", path)
    tracked = len(boxes) - len(skipped)
    out = {"fps": tracked / max(track_s, 1e-9), "fps_with_io": len(boxes) / max(time.perf_counter() - t_start, 1e-9),
           "frames": len(boxes), "boxes": path, "skipped": skipped}
    out["frames_dir" if save_frames else "video"] = writer.path
    return out


def run(task, workdir: str) -> dict:
    """`--mode=track` for a SiamFC `task` (validates `config.track` before loading any network)."""
    from research import modes, parallel
    from research.siamfc import tracker as tracker_lib
    t = task.config.track
    box = parse_box(t.box)
    source = FrameSource(t.input)
    name, first = next(iter(source), (t.input, None))
    if first is None:
        raise TrackInputError(f"{name}: the first frame cannot be read (it holds the target box)")
    check_box_in_frame(box, first.shape[0], first.shape[1], t.box)
    if t.onnx:
        backend = tracker_lib.OnnxBackend.from_dir(os.path.join(workdir, "export"))
        what = os.path.join(workdir, "export", "{template,search}.onnx")
    else:
        variables, what = modes.restore_variables(task, workdir)
        backend = tracker_lib.JaxBackend(task.model, parallel.local_copy(variables))
    logging.info("tracking %s from box %s with %s", t.input, box.tolist(), what)
    tracker = tracker_lib.TrackerSiamFC(backend, task.tracker_settings())
    out = track_video(tracker, source, box, os.path.join(workdir, "track"), box_text=t.box,
                      save_frames=bool(t.save_frames), fps=float(t.fps), max_frames=int(t.max_frames))
    out["network"] = what
    return out
