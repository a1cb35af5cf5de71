"""SiamFC video data: a synthetic tfds builder, a local GOT-10k folder builder, and a random-access reader.

Both builders write one record per frame, in sequence order (`disable_shuffling`), and keep the
per-sequence annotations in the dataset's `metadata.json`, so the pair sampler knows every box
without reading a single image:

  record  image     encoded frame (PNG synthetic, the original JPEG bytes for GOT-10k)
          sequence  int64 sequence index within the split
          frame     int64 frame index within the sequence
  metadata[split] = {"names": [...], "starts": [...], "lengths": [...], "heights": [...],
                     "widths": [...], "boxes": [[x, y, w, h] per frame], "absent": [0/1 per frame],
                     "cover": [0..8 per frame]}

Boxes are `[x, y, w, h]` pixels as GOT-10k's `groundtruth.txt` holds them and as the got10k
toolkit hands them to the official tracker (which reads x, y as 1-based: the centre is
`x - 1 + (w - 1) / 2`). The synthetic data follow that convention exactly: an object covering
the 0-based pixel columns `[x0, x0 + w)` has `x = x0 + 1`.

`cover` is GOT-10k's visible-ratio level (0 = fully occluded or absent ... 8 = fully visible);
the official `Pair._filter` keeps frames whose cover exceeds `max(1, 0.3 * max cover)`.

Builders (import this module, then `research.data.pipeline.prepare(name, data_dir, ...)`):
  `siamfc_synthetic_videos` (configs `default`, `tiny`): textured objects moving and scaling over
    textured backgrounds with distractors; generated deterministically from `(seed, split, index)`.
  `got10k_local`: a local GOT-10k folder (`train/<seq>/00000001.jpg ... groundtruth.txt
    absence.label cover.label`, `val/<seq>/...`, `test/<seq>/...` whose `groundtruth.txt` holds the
    first frame's box only), validated while preparing.
  `otb_local` (configs `all`, `otb2015`, `otb2013`, `tb50`): a local OTB folder
    (`<Seq>/img/0001.jpg ...`, `<Seq>/groundtruth_rect.txt`), one `test` split.

A sequence that cannot be used (a missing frame, a ground-truth line that is not four numbers, a
box of zero or negative size on a visible frame, an unreadable image) is left out with its reason
recorded as a `research.data.validation.Problem` (written next to the prepared data, listed once
by `--mode=...` and in `<workdir>/data_problems.json`); the other sequences are prepared.
"""

from __future__ import annotations

import dataclasses
import math
import os

from absl import logging
import cv2
import numpy as np
import tensorflow_datasets as tfds

from research.data import _tfds_compat
from research.data import validation

SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}
MAX_COVER = 8


class DataError(ValueError):
    """A GOT-10k / OTB folder entry that cannot be used; the message names the file (and line)."""


# ------------------------------------------------------------------------------------------------
# Synthetic videos


@dataclasses.dataclass(eq=False)
class SyntheticVideosConfig(tfds.core.BuilderConfig):
    """Parameters of a `siamfc_synthetic_videos` variant.

    Attributes:
      frame_size: square frame side in pixels.
      num_frames: frames per sequence.
      num_train / num_validation: sequences per split.
      min_size / max_size: object side at the first frame, pixels (the official `Pair._filter`
        keeps 20..0.5 * frame_size).
      absent_prob: train split: chance that a sequence has one interval where the object is hidden
        (absent flag set, cover 0); the validation split never hides it (OTB-style evaluation).
      num_distractors: textured patches moving in the background.
      seed: base seed; sequence `i` of split `s` uses `(seed, s, i)`.
    """

    frame_size: int = 128
    num_frames: int = 32
    num_train: int = 96
    num_validation: int = 8
    min_size: int = 22
    max_size: int = 44
    absent_prob: float = 0.2
    num_distractors: int = 2
    seed: int = 0


def _texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """`[size, size, 3]` float32 texture 0..255: checkerboard, stripes or blurred colour noise."""
    kind = int(rng.integers(3))
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == 0:
        period = rng.uniform(4, 10)
        on = ((np.floor(xx / period) + np.floor(yy / period)) % 2)[..., None]
    elif kind == 1:
        theta, period = rng.uniform(0, np.pi), rng.uniform(4, 12)
        on = (np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * 2 * np.pi / period) > 0)[..., None]
    else:
        noise = rng.uniform(0, 1, (max(size // 6, 2), max(size // 6, 2), 1)).astype(np.float32)
        on = cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC)[..., None]
    return (c0 * (1 - on) + c1 * on).astype(np.float32)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """`[size, size, 3]` float32: smooth colour noise plus faint stripes (texture, no flat areas)."""
    coarse = rng.uniform(0, 255, (6, 6, 3)).astype(np.float32)
    bg = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    theta, period = rng.uniform(0, np.pi), rng.uniform(6, 20)
    bg += 25 * np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * 2 * np.pi / period)[..., None]
    return bg + rng.normal(0, 6, bg.shape).astype(np.float32)


def _trajectory(n: int, frame: int, size0: float, rng: np.random.Generator, max_size: float):
    """Per-frame (x0, y0, w, h) floats of an object bouncing inside the frame while scaling."""
    aspect = rng.uniform(0.6, 1.6)
    w, h = size0 * math.sqrt(aspect), size0 / math.sqrt(aspect)
    x, y = rng.uniform(0, frame - w), rng.uniform(0, frame - h)
    speed, angle = rng.uniform(1.0, 4.0), rng.uniform(0, 2 * np.pi)
    vx, vy = speed * math.cos(angle), speed * math.sin(angle)
    growth = rng.uniform(-0.015, 0.015)
    out = []
    for _ in range(n):
        out.append((x, y, w, h))
        s = math.exp(growth)
        if not (16 <= w * s <= max_size and 16 <= h * s <= max_size):
            growth, s = -growth, 1.0
        cx, cy = x + w / 2, y + h / 2
        w, h = w * s, h * s
        x, y = cx - w / 2 + vx, cy - h / 2 + vy
        if x < 0 or x + w > frame:
            vx = -vx
            x = min(max(x, 0.0), frame - w)
        if y < 0 or y + h > frame:
            vy = -vy
            y = min(max(y, 0.0), frame - h)
    return out


def render_sequence(config: SyntheticVideosConfig, split: str, index: int) -> dict:
    """Renders sequence `index` of `split` deterministically.

    Returns:
      dict with `frames` uint8 `[T, S, S, 3]` RGB, `boxes` float32 `[T, 4]` `[x, y, w, h]`
      (1-based x, y: the object covers 0-based pixels `[x - 1, x - 1 + w)`), `absent` bool `[T]`
      and `cover` int32 `[T]` (8 visible, 0 absent).
    """
    s, n = int(config.frame_size), int(config.num_frames)
    rng = np.random.default_rng([int(config.seed), SPLIT_CODES.get(split, 7), int(index)])
    bg = _background(s, rng)
    tex = _texture(2 * int(config.max_size), rng)
    size0 = rng.uniform(config.min_size, config.max_size)
    traj = _trajectory(n, s, size0, rng, float(config.max_size))
    distractors = []
    for _ in range(int(config.num_distractors)):
        d0 = rng.uniform(config.min_size * 0.7, config.max_size)
        distractors.append((_texture(2 * int(config.max_size), rng),
                            _trajectory(n, s, d0, rng, float(config.max_size))))
    ellipse = bool(rng.integers(2))
    absent = np.zeros(n, bool)
    if split == "train" and rng.uniform() < config.absent_prob and n > 8:
        a = int(rng.integers(2, n - 4))
        absent[a:a + int(rng.integers(1, 4))] = True
    frames = np.zeros((n, s, s, 3), np.uint8)
    boxes = np.zeros((n, 4), np.float32)
    for t in range(n):
        img = bg.copy()
        for dtex, dtraj in distractors:  # behind the target
            _paste(img, dtex, dtraj[t], ellipse=False)
        x0, y0, w, h = traj[t]
        xi, yi = int(round(x0)), int(round(y0))
        wi, hi = max(int(round(w)), 1), max(int(round(h)), 1)
        wi, hi = min(wi, s - xi), min(hi, s - yi)
        if not absent[t]:
            _paste(img, tex, (xi, yi, wi, hi), ellipse=ellipse)
        frames[t] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        boxes[t] = [xi + 1, yi + 1, wi, hi]
    return {"frames": frames, "boxes": boxes, "absent": absent,
            "cover": np.where(absent, 0, MAX_COVER).astype(np.int32)}


def _paste(img: np.ndarray, tex: np.ndarray, box, ellipse: bool) -> None:
    """Pastes `tex` resized to the integer box `(x0, y0, w, h)` into `img` (in place, float32)."""
    x0, y0, w, h = (int(round(v)) for v in box)
    x0, y0 = max(x0, 0), max(y0, 0)
    w, h = min(w, img.shape[1] - x0), min(h, img.shape[0] - y0)
    if w <= 0 or h <= 0:
        return
    patch = cv2.resize(tex, (w, h), interpolation=cv2.INTER_LINEAR)
    region = img[y0:y0 + h, x0:x0 + w]
    if ellipse:
        # inscribed ellipse: the middle row and column reach the box edges, so the box stays tight
        yy, xx = np.mgrid[0:h, 0:w]
        mask = ((xx - (w - 1) / 2) / (w / 2)) ** 2 + ((yy - (h - 1) / 2) / (h / 2)) ** 2 <= 1
        region[mask] = patch[mask]
    else:
        region[:] = patch


def encode_png(img_rgb: np.ndarray) -> bytes:
    """PNG bytes of an RGB uint8 image (OpenCV, no TensorFlow)."""
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(img_rgb[..., ::-1]))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def _features() -> tfds.features.FeaturesDict:
    # Encoded bytes as they are (PNG or the original JPEG): decoded with OpenCV by `VideoSource`.
    return tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(), dtype=np.object_),
        "sequence": np.int64,
        "frame": np.int64,
    })


def _annotation_table(names, sizes, boxes, absent, cover, first_frame_only: bool = False) -> dict:
    lengths = [len(b) for b in boxes]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int).tolist() if lengths else []
    return {"names": list(names), "starts": starts, "lengths": lengths,
            "heights": [int(h) for h, _ in sizes], "widths": [int(w) for _, w in sizes],
            "boxes": np.concatenate(boxes).astype(float).round(4).tolist() if boxes else [],
            "absent": np.concatenate(absent).astype(int).tolist() if absent else [],
            "cover": np.concatenate(cover).astype(int).tolist() if cover else [],
            "first_frame_only": bool(first_frame_only)}


class SiamfcSyntheticVideos(_tfds_compat.SourceFileCodePath, tfds.core.GeneratorBasedBuilder):
    """Synthetic single-object tracking videos (generated, no download)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        SyntheticVideosConfig(name="default", description="128 px, 96 train / 8 validation videos of 32 frames"),
        SyntheticVideosConfig(name="tiny", num_train=12, num_validation=2, num_frames=12,
                              description="12 + 2 videos of 12 frames, for tests"),
    ]
    DEFAULT_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Textured objects moving and scaling over textured backgrounds, with distractors.",
            features=_features(), supervised_keys=None, disable_shuffling=True,
            metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        del dl_manager
        cfg = self.builder_config
        rendered = {}
        for split, num in (("train", cfg.num_train), ("validation", cfg.num_validation)):
            seqs = [render_sequence(cfg, split, i) for i in range(int(num))]
            rendered[split] = seqs
            self.info.metadata[split] = _annotation_table(
                [f"{split}_{i:05d}" for i in range(len(seqs))], [(cfg.frame_size, cfg.frame_size)] * len(seqs),
                [q["boxes"] for q in seqs], [q["absent"] for q in seqs], [q["cover"] for q in seqs])
        return {split: self._generate_examples(seqs) for split, seqs in rendered.items()}

    def _generate_examples(self, seqs):
        k = 0
        for i, q in enumerate(seqs):
            for t, frame in enumerate(q["frames"]):
                yield k, {"image": encode_png(frame), "sequence": i, "frame": t}
                k += 1


# ------------------------------------------------------------------------------------------------
# GOT-10k from a local folder


@dataclasses.dataclass(eq=False)
class Got10kConfig(tfds.core.BuilderConfig):
    """Where a GOT-10k folder is and what to read from it.

    Attributes:
      root: the folder holding `train/`, `val/` (and `test/`); None = the tfds `manual_dir`.
      splits: tfds split -> sub-folder; a sub-folder that is not there is left out (recorded as a
        problem), at least one must be.
      max_sequences: read at most this many sequences per split (0 = all; list.txt order).
      decode_check: decode every frame while preparing (a corrupt file is then a named problem);
        False only checks that each file exists and is not empty.
    """

    root: str | None = None
    splits: tuple[tuple[str, str], ...] = (("train", "train"), ("validation", "val"), ("test", "test"))
    max_sequences: int = 0
    decode_check: bool = True


def _read_numbers(path: str, columns: int | None, what: str) -> np.ndarray:
    """Rows of comma/tab/space-separated numbers; DataError naming `path:line` for a bad row."""
    if not os.path.exists(path):
        raise DataError(f"{path}: missing ({what})")
    rows = []
    with open(path) as f:
        for ln, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                vals = [float(v) for v in line.replace(",", " ").replace("\t", " ").split()]
            except ValueError:
                raise DataError(f"{path}:{ln}: not numbers: {line!r} ({what})") from None
            if columns is not None and len(vals) != columns:
                raise DataError(f"{path}:{ln}: {len(vals)} values, {columns} expected ({what})")
            if not all(math.isfinite(v) for v in vals):
                raise DataError(f"{path}:{ln}: non-finite value {line!r} ({what})")
            rows.append(vals if columns is not None else vals[0])
    return np.asarray(rows, np.float64)


def _check_boxes(boxes: np.ndarray, absent: np.ndarray, w: int, h: int, gt_path: str,
                 frame_numbers=None) -> None:
    """DataError naming `gt_path:line` for a negative size, or an empty or out-of-image box on a
    visible frame."""
    for t, (bx, by, bw, bh) in enumerate(boxes):
        where = f"{gt_path}:{t + 1}" + (f" (frame {frame_numbers[t]})" if frame_numbers is not None else "")
        if bw < 0 or bh < 0:
            raise DataError(f"{where}: negative box size {boxes[t].tolist()}")
        if not absent[t]:
            if bw == 0 or bh == 0:
                raise DataError(f"{where}: empty box {boxes[t].tolist()} on a frame not marked absent")
            if bx - 1 >= w or by - 1 >= h or bx - 1 + bw <= 0 or by - 1 + bh <= 0:
                raise DataError(f"{where}: box {boxes[t].tolist()} lies outside the {w}x{h} image")


def _check_frames(files: list[str], decode_check: bool) -> tuple[int, int]:
    """(height, width) of the first frame; DataError naming a frame that is empty, unreadable
    (with `decode_check`) or of another size."""
    first = _decode(files[0])
    h, w = first.shape[:2]
    for path in files[1:] if decode_check else []:
        img = _decode(path)
        if img.shape[:2] != (h, w):
            raise DataError(f"{path}: {img.shape[1]}x{img.shape[0]} frame in a {w}x{h} sequence")
    if not decode_check:
        for path in files:
            if os.path.getsize(path) == 0:
                raise DataError(f"{path}: empty file")
    return h, w


def read_got10k_sequence(seq_dir: str, decode_check: bool = True, first_frame_only: bool = False) -> dict:
    """Reads and validates one GOT-10k sequence folder.

    Args:
      seq_dir: `<split>/<GOT-10k_Train_000001>` with `00000001.jpg ...`, `groundtruth.txt`,
        `absence.label`, `cover.label` (the last two optional).
      decode_check: decode every frame (else only check that none is empty).
      first_frame_only: accept a `groundtruth.txt` with only the first frame's box (the test
        subset): the other frames then carry that box, marked absent with cover 0.

    Returns:
      dict with `files` (sorted frame paths), `boxes` float32 `[T, 4]` `[x, y, w, h]`, `absent`
      bool `[T]`, `cover` int32 `[T]` (8 where `cover.label` is missing), `height`, `width`,
      `first_frame_only` (True when only frame 0 is annotated).

    Raises:
      DataError naming the file (and line): no frames; a missing `groundtruth.txt`; a row that is
      not 4 finite numbers; a negative width/height; a visible box (not absent) with a zero side
      or lying entirely outside the image; label files whose length differs from the frame count;
      an empty, unreadable or differently sized frame.
    """
    if not os.path.isdir(seq_dir):
        raise DataError(f"{seq_dir}: sequence folder not found")
    files = sorted(os.path.join(seq_dir, f) for f in os.listdir(seq_dir)
                   if f.lower().endswith((".jpg", ".jpeg", ".png")))
    if not files:
        raise DataError(f"{seq_dir}: no frames (*.jpg)")
    gt_path = os.path.join(seq_dir, "groundtruth.txt")
    boxes = _read_numbers(gt_path, 4, "x,y,w,h per frame").reshape(-1, 4)
    n = len(files)
    only_first = bool(first_frame_only and len(boxes) == 1 and n > 1)
    if only_first:
        boxes = np.repeat(boxes, n, 0)
    if len(boxes) != n:
        raise DataError(f"{gt_path}: {len(boxes)} boxes for {n} frames")
    absent = np.zeros(n, bool)
    cover = np.full(n, MAX_COVER, np.int32)
    for name in ("absence", "cover"):
        path = os.path.join(seq_dir, f"{name}.label")
        if not os.path.exists(path) or only_first:
            continue
        vals = _read_numbers(path, 1, f"{name} flag per frame").reshape(-1)
        if len(vals) != n:
            raise DataError(f"{path}: {len(vals)} values for {n} frames")
        if name == "absence":
            if not np.isin(vals, (0, 1)).all():
                raise DataError(f"{path}:{int(np.argmin(np.isin(vals, (0, 1)))) + 1}: absence must be 0 or 1")
            absent = vals.astype(bool)
        else:
            if ((vals < 0) | (vals > MAX_COVER) | (vals != np.round(vals))).any():
                bad = int(np.argmax((vals < 0) | (vals > MAX_COVER) | (vals != np.round(vals))))
                raise DataError(f"{path}:{bad + 1}: cover must be an integer 0..{MAX_COVER}")
            cover = vals.astype(np.int32)
    if only_first:
        absent[1:], cover[1:] = True, 0
    h, w = _check_frames(files, decode_check)
    _check_boxes(boxes[:1] if only_first else boxes, absent, w, h, gt_path)
    return {"files": files, "boxes": boxes.astype(np.float32), "absent": absent, "cover": cover,
            "height": h, "width": w, "first_frame_only": only_first}


def _decode(path: str) -> np.ndarray:
    data = np.fromfile(path, np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        raise DataError(f"{path}: unreadable or corrupt image")
    return img


class _LocalVideos(_tfds_compat.SourceFileCodePath, tfds.core.GeneratorBasedBuilder):
    """Shared parts of the local-folder video builders: the info, the validation collector, the records."""

    DESCRIPTION = ""

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=self.DESCRIPTION, features=_features(), supervised_keys=None, disable_shuffling=True,
            metadata=tfds.core.MetadataDict())

    @property
    def validation(self) -> validation.Collector:
        """The problems found while preparing (written next to the data by `pipeline.prepare`)."""
        if "_validation" not in self.__dict__:
            self._validation = validation.Collector()
        return self._validation

    def _read_split(self, split: str, entries, read) -> list[dict] | None:
        """`read(arg)` for each `(name, path, arg)` entry; a DataError leaves that sequence out (a
        problem recorded against `path`). Stores the split's annotation table; None when nothing is
        left."""
        names, seqs = [], []
        for name, path, arg in entries:
            try:
                seqs.append(read(arg))
                names.append(name)
            except DataError as e:
                self.validation.add(path, str(e), f"sequence {name} left out of split {split!r}")
        if not seqs:  # tfds cannot write an empty split
            self.validation.add(self._root_dir, f"no usable sequence for split {split!r}", "split left out")
            return None
        self.info.metadata[split] = _annotation_table(
            names, [(q["height"], q["width"]) for q in seqs], [q["boxes"] for q in seqs],
            [q["absent"] for q in seqs], [q["cover"] for q in seqs],
            first_frame_only=all(q.get("first_frame_only", False) for q in seqs))
        return seqs

    def _generate_examples(self, seqs):
        k = 0
        for i, q in enumerate(seqs):
            for t, path in enumerate(q["files"]):
                with open(path, "rb") as f:
                    yield k, {"image": f.read(), "sequence": i, "frame": t}
                k += 1

    def _root(self, dl_manager, what: str) -> str:
        root = self.builder_config.root or getattr(dl_manager, "_manual_dir", None)
        if not root or not os.path.isdir(str(root)):
            raise FileNotFoundError(f"{what} folder {root!r} not found: pass manual_dir (or the config's root)")
        self._root_dir = str(root)
        return str(root)


class Got10kLocal(_LocalVideos):
    """GOT-10k (`train/`, `val/`, `test/`) from a local folder; nothing is downloaded.

    Splits `train`, `validation` (`val/`) and `test` (`test/`: only the first frame's box is known,
    so it can be tracked but not scored here; `first_frame_only` in its metadata).
    """

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Initial release.", "1.1.0": "test/ split; unusable sequences left out and reported."}
    BUILDER_CONFIGS = [Got10kConfig(name="default", description="train + val + test of a local GOT-10k folder")]
    DEFAULT_CONFIG_NAME = "default"
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass manual_dir=<GOT-10k folder with train/ and val/> (or Got10kConfig.root)."
    DESCRIPTION = "GOT-10k single-object tracking videos (local folder)."

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        root = self._root(dl_manager, "GOT-10k")
        out, found = {}, 0
        for split, sub in cfg.splits:
            folder = os.path.join(root, sub)
            if not os.path.isdir(folder):
                self.validation.add(folder, f"GOT-10k split folder not found (split {split!r})", "split left out")
                continue
            found += 1
            list_file = os.path.join(folder, "list.txt")
            if os.path.exists(list_file):
                names = [ln.strip() for ln in open(list_file) if ln.strip()]
            else:
                names = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
            if cfg.max_sequences:
                names = names[:cfg.max_sequences]
            seqs = self._read_split(
                split, [(nm, os.path.join(folder, nm), os.path.join(folder, nm)) for nm in names],
                lambda path, test=(split == "test"): read_got10k_sequence(path, cfg.decode_check, test))
            if seqs is not None:
                out[split] = self._generate_examples(seqs)
        if not found:
            raise FileNotFoundError(f"{root}: none of the GOT-10k split folders {[s for _, s in cfg.splits]} is there")
        if not out:
            raise DataError(f"{root}: no usable GOT-10k sequence: "
                            + "; ".join(p.what for p in self.validation.problems[:5]))
        return out


# ------------------------------------------------------------------------------------------------
# OTB from a local folder

# The sequence lists of the benchmark (Wu, Lim, Yang: OTB-2013 = CVPR 2013's 50 folders, whose
# Jogging holds 2 targets, 51 in all; TB-50 = the harder half of OTB-2015; OTB-2015 = TB-100).
OTB2013 = (
    "Basketball Bolt Boy Car4 CarDark CarScale Coke Couple Crossing David David2 David3 Deer Dog1 Doll Dudek "
    "FaceOcc1 FaceOcc2 Fish FleetFace Football Football1 Freeman1 Freeman3 Freeman4 Girl Ironman Jogging Jumping "
    "Lemming Liquor Matrix Mhyang MotorRolling MountainBike Shaking Singer1 Singer2 Skating1 Skiing Soccer Subway "
    "Suv Sylvester Tiger1 Tiger2 Trellis Walking Walking2 Woman").split()
TB50 = (
    "Basketball Biker Bird1 BlurBody BlurCar2 BlurFace BlurOwl Bolt Box Car1 Car4 CarDark CarScale ClifBar Couple "
    "Crowds David Deer Diving DragonBaby Dudek Football Freeman4 Girl Human3 Human4 Human6 Human9 Ironman Jump "
    "Jumping Liquor Matrix MotorRolling Panda RedTeam Shaking Singer2 Skating1 Skating2 Skiing Soccer Surfer "
    "Sylvester Tiger2 Trellis Walking Walking2 Woman").split()
OTB2015 = TB50 + (
    "Bird2 BlurCar1 BlurCar3 BlurCar4 Board Bolt2 Boy Car2 Car24 Coke Coupon Crossing Dancer Dancer2 David2 "
    "David3 Dog Dog1 Doll FaceOcc1 FaceOcc2 Fish FleetFace Football1 Freeman1 Freeman3 Girl2 Gym Human2 Human5 "
    "Human7 Human8 Jogging KiteSurf Lemming Man Mhyang MountainBike Rubik Singer1 Skater Skater2 Subway Suv "
    "Tiger1 Toy Trans Twinnings Vase").split()
# Sequences the benchmark evaluates on part of their frames (its sequence configuration: first and
# last frame number, as the image files are numbered).
OTB_FRAME_RANGES = (("David", 300, 770), ("Football1", 1, 74), ("Freeman3", 1, 460), ("Freeman4", 1, 283),
                    ("Diving", 1, 215), ("Tiger1", 6, 354), ("BlurCar1", 247, 988), ("BlurCar3", 3, 359),
                    ("BlurCar4", 18, 397))


@dataclasses.dataclass(eq=False)
class OtbConfig(tfds.core.BuilderConfig):
    """Which sequences of a local OTB folder to read, and how.

    Attributes:
      root: the folder holding the sequence folders; None = the tfds `manual_dir`.
      sequences: folder names to read (empty = every folder with a `groundtruth_rect*.txt`).
      frame_ranges: `(folder, first, last)` frame numbers to keep (inclusive, matched against the
        image file numbers) for sequences the benchmark evaluates on part of their frames.
      decode_check: decode every frame while preparing.
    """

    root: str | None = None
    sequences: tuple[str, ...] = ()
    frame_ranges: tuple[tuple[str, int, int], ...] = OTB_FRAME_RANGES
    decode_check: bool = True


def otb_targets(seq_dir: str) -> list[tuple[str, str]]:
    """`(name, ground-truth file)` of each target annotated in an OTB sequence folder.

    A folder with one target has `groundtruth_rect.txt` (name = the folder's); a folder with several
    has `groundtruth_rect.1.txt`, `groundtruth_rect.2.txt`, ... (names `<folder>.1`, `<folder>.2`, as
    the got10k toolkit names them). Empty files (Human4's `groundtruth_rect.1.txt`) are skipped;
    a folder left with one target keeps the folder's name.
    """
    folder = os.path.basename(os.path.normpath(seq_dir))
    files = sorted(f for f in os.listdir(seq_dir) if f.startswith("groundtruth") and f.endswith(".txt"))
    files = [f for f in files if _has_text(os.path.join(seq_dir, f))]
    if len(files) == 1:
        return [(folder, os.path.join(seq_dir, files[0]))]
    return [(f"{folder}.{i}", os.path.join(seq_dir, f)) for i, f in enumerate(files, 1)]


def _has_text(path: str) -> bool:
    with open(path) as f:
        return bool(f.read().strip())


def read_otb_sequence(seq_dir: str, gt_path: str, frame_range: tuple[int, int] | None = None,
                      decode_check: bool = True) -> dict:
    """Reads and validates one target of an OTB sequence folder.

    Args:
      seq_dir: the sequence folder (frames in `img/`, numbered `0001.jpg ...`).
      gt_path: its ground-truth file: one `x,y,w,h` per frame, separated by commas, tabs or spaces.
      frame_range: `(first, last)` frame numbers to keep, or None for all. The ground truth either
        has one line per kept frame or one per image file (then the kept frames' lines are used).
      decode_check: decode every kept frame.

    Returns:
      dict as `read_got10k_sequence` (no frame absent, cover 8).

    Raises:
      DataError naming the file (and line): no frames, file names that are not frame numbers, a
      frame missing from the numbering, a bad ground-truth line, a box of zero or negative size,
      line count not matching the frames, an unreadable frame.
    """
    img_dir = os.path.join(seq_dir, "img")
    if not os.path.isdir(img_dir):
        raise DataError(f"{img_dir}: no frame folder")
    names = sorted(f for f in os.listdir(img_dir) if f.lower().endswith((".jpg", ".jpeg", ".png")))
    if not names:
        raise DataError(f"{img_dir}: no frames (*.jpg)")
    try:
        numbers = np.asarray([int(os.path.splitext(f)[0]) for f in names])
    except ValueError:
        raise DataError(f"{img_dir}: frame file names must be frame numbers (0001.jpg ...)") from None
    order = np.argsort(numbers, kind="stable")
    names, numbers = [names[i] for i in order], numbers[order]
    gaps = np.nonzero(np.diff(numbers) != 1)[0]
    first, last = (frame_range if frame_range is not None else (int(numbers[0]), int(numbers[-1])))
    keep = (numbers >= first) & (numbers <= last)
    for g in gaps:  # a hole inside the evaluated frames
        if numbers[g] >= first and numbers[g] < last:
            raise DataError(f"{img_dir}: frame {numbers[g] + 1} missing (after {names[g]})")
    if not keep.any() or (frame_range is not None and (numbers[keep][0] != first or numbers[keep][-1] != last)):
        raise DataError(f"{img_dir}: frames {first}..{last} expected, files number "
                        f"{int(numbers[0])}..{int(numbers[-1])}")
    boxes = _read_numbers(gt_path, 4, "x,y,w,h per frame").reshape(-1, 4)
    if len(boxes) == int(keep.sum()):
        pass
    elif len(boxes) == len(names):
        boxes = boxes[keep]
    else:
        raise DataError(f"{gt_path}: {len(boxes)} boxes for frames {first}..{last} ({int(keep.sum())} frames)")
    files = [os.path.join(img_dir, f) for f, k in zip(names, keep) if k]
    n = len(files)
    absent = np.zeros(n, bool)
    h, w = _check_frames(files, decode_check)
    _check_boxes(boxes, absent, w, h, gt_path, frame_numbers=numbers[keep])
    return {"files": files, "boxes": boxes.astype(np.float32), "absent": absent,
            "cover": np.full(n, MAX_COVER, np.int32), "height": h, "width": w}


class OtbLocal(_LocalVideos):
    """OTB (OTB-2013 / OTB-2015 sequence folders) from a local folder, one `test` split; nothing is
    downloaded. Config `all` reads every sequence folder found; `otb2015`, `otb2013`, `tb50` the
    benchmark's lists (a listed folder that is not there is a recorded problem)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [OtbConfig(name="all", description="every sequence folder of a local OTB folder"),
                       OtbConfig(name="otb2015", sequences=tuple(OTB2015), description="OTB-2015 (TB-100)"),
                       OtbConfig(name="otb2013", sequences=tuple(OTB2013), description="OTB-2013 (51 targets)"),
                       OtbConfig(name="tb50", sequences=tuple(TB50), description="TB-50")]
    DEFAULT_CONFIG_NAME = "all"
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass manual_dir=<OTB folder with one folder per sequence> (or OtbConfig.root)."
    DESCRIPTION = "OTB single-object tracking benchmark videos (local folder)."

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        root = self._root(dl_manager, "OTB")
        folders = list(cfg.sequences) or sorted(
            d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))
            and any(f.startswith("groundtruth") for f in os.listdir(os.path.join(root, d))))
        ranges = {name: (int(a), int(b)) for name, a, b in cfg.frame_ranges}
        entries = []
        for folder in folders:
            seq_dir = os.path.join(root, folder)
            if not os.path.isdir(seq_dir):
                self.validation.add(seq_dir, "sequence folder not found", f"sequence {folder} left out")
                continue
            targets = otb_targets(seq_dir)
            if not targets:
                self.validation.add(seq_dir, "no groundtruth_rect*.txt (or only empty ones)",
                                    f"sequence {folder} left out")
            entries += [(name, gt, (seq_dir, gt, ranges.get(folder))) for name, gt in targets]
        seqs = self._read_split("test", entries, lambda e: read_otb_sequence(*e, decode_check=cfg.decode_check))
        if seqs is None:
            raise DataError(f"{root}: no usable OTB sequence: " + "; ".join(p.what for p in self.validation.problems[:5]))
        return {"test": self._generate_examples(seqs)}


BUILDERS = {"synthetic": "siamfc_synthetic_videos", "got10k": "got10k_local", "otb": "otb_local"}


def prepare(name: str, data_dir: str, config: str = "", manual_dir: str | None = None):
    """Prepares a dataset of `BUILDERS` on first use: `synthetic` (`config` `default` / `tiny`),
    `got10k` or `otb` (`config` `all` / `otb2015` / `otb2013` / `tb50`) from `manual_dir`.

    Raises:
      ValueError: an unknown name; FileNotFoundError: `manual_dir` missing; DataError: no usable
      sequence in it.
    """
    from research.data import pipeline
    if name not in BUILDERS:
        raise ValueError(f"unknown SiamFC dataset {name!r}; known: {sorted(BUILDERS)}")
    builder_name = BUILDERS[name] + (f"/{config}" if config else "")
    return pipeline.prepare(builder_name, data_dir, manual_dir=manual_dir or None)


def default_eval_split(builder) -> str:
    """The split a dataset is evaluated on: `validation` where there is one, else `test` (OTB)."""
    splits = set(builder.info.splits.keys())
    for name in ("validation", "test"):
        if name in splits:
            return name
    raise ValueError(f"{builder.data_dir}: no validation or test split (has {sorted(splits)})")


class VideoSource:
    """Random access to the sequences of one split of a prepared video dataset.

    Opened lazily (pickles cheaply into grain workers). `sequence(i)` gives the annotations
    (`boxes` `[T, 4]` float32, `absent` `[T]` bool, `cover` `[T]` int32, `name`, `height`,
    `width`) without reading images; `frame(i, t)` decodes frame `t` (uint8 `[H, W, 3]` RGB).
    """

    def __init__(self, dataset_dir: str, split: str):
        self.dataset_dir, self.split = str(dataset_dir), split
        self._ds = None
        meta = tfds.builder_from_directory(self.dataset_dir).info.metadata
        if split not in meta:
            raise ValueError(f"{self.dataset_dir}: no split {split!r} (has {sorted(meta)})")
        table = meta[split]
        self.names = list(table["names"])
        self.starts = np.asarray(table["starts"], np.int64)
        self.lengths = np.asarray(table["lengths"], np.int64)
        self.heights = np.asarray(table["heights"], np.int64)
        self.widths = np.asarray(table["widths"], np.int64)
        self._boxes = np.asarray(table["boxes"], np.float32).reshape(-1, 4)
        self._absent = np.asarray(table["absent"], bool)
        self._cover = np.asarray(table["cover"], np.int32)
        # GOT-10k test: only frame 0 is annotated (the rest carries its box, absent)
        self.first_frame_only = bool(table.get("first_frame_only", False))

    def __getstate__(self):
        return dict(self.__dict__, _ds=None)

    def __len__(self) -> int:
        return len(self.names)

    def sequence(self, i: int) -> dict:
        a, n = int(self.starts[i]), int(self.lengths[i])
        return {"name": self.names[i], "boxes": self._boxes[a:a + n], "absent": self._absent[a:a + n],
                "cover": self._cover[a:a + n], "height": int(self.heights[i]), "width": int(self.widths[i])}

    def frame(self, i: int, t: int) -> np.ndarray:
        if self._ds is None:
            self._ds = tfds.builder_from_directory(self.dataset_dir).as_data_source(self.split)
        if not 0 <= t < int(self.lengths[i]):
            raise IndexError(f"frame {t} of sequence {self.names[i]} ({int(self.lengths[i])} frames)")
        rec = self._ds[int(self.starts[i]) + int(t)]
        if int(rec["sequence"]) != int(i) or int(rec["frame"]) != int(t):
            raise ValueError(f"{self.dataset_dir}: record order broken at sequence {i} frame {t}")
        data = rec["image"]
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if len(data) else None
        if arr is None:
            raise ValueError(f"{self.dataset_dir}: sequence {self.names[i]} frame {t}: image cannot be decoded")
        return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)

    def frames(self, i: int, count: int | None = None) -> "LazyFrames":
        """The first `count` (None: all) frames of sequence `i`, decoded one at a time on access
        (a GOT-10k video of 1,000 full-HD frames would need 6 GB at once)."""
        n = int(self.lengths[i]) if count is None else min(int(count), int(self.lengths[i]))
        return LazyFrames(self, i, n)


class LazyFrames:
    """A sequence of `n` frames of one video that decodes frame `t` when it is accessed."""

    def __init__(self, source: VideoSource, seq: int, n: int):
        self.source, self.seq, self.n = source, int(seq), int(n)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, t: int) -> np.ndarray:
        if not -self.n <= t < self.n:
            raise IndexError(t)
        return self.source.frame(self.seq, t % self.n)

    def __iter__(self):
        return (self.source.frame(self.seq, t) for t in range(self.n))
