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
    absence.label cover.label`, `val/<seq>/...`), validated while preparing.
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

SPLIT_CODES = {"train": 0, "validation": 1}
MAX_COVER = 8


class DataError(ValueError):
    """A GOT-10k folder entry that cannot be used; the message names the file (and line)."""


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


def _annotation_table(names, sizes, boxes, absent, cover) -> dict:
    lengths = [len(b) for b in boxes]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int).tolist() if lengths else []
    return {"names": list(names), "starts": starts, "lengths": lengths,
            "heights": [int(h) for h, _ in sizes], "widths": [int(w) for _, w in sizes],
            "boxes": np.concatenate(boxes).astype(float).round(4).tolist() if boxes else [],
            "absent": np.concatenate(absent).astype(int).tolist() if absent else [],
            "cover": np.concatenate(cover).astype(int).tolist() if cover else []}


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
      root: the folder holding `train/` and `val/`; None = the tfds `manual_dir`.
      splits: tfds split -> sub-folder.
      max_sequences: read at most this many sequences per split (0 = all; list.txt order).
      decode_check: decode every frame while preparing (a corrupt file is then a named error);
        False only checks that each file exists and is not empty.
    """

    root: str | None = None
    splits: tuple[tuple[str, str], ...] = (("train", "train"), ("validation", "val"))
    max_sequences: int = 0
    decode_check: bool = True


def _read_numbers(path: str, columns: int | None, what: str) -> np.ndarray:
    """Rows of comma/whitespace-separated numbers; DataError naming `path:line` for a bad row."""
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


def read_got10k_sequence(seq_dir: str, decode_check: bool = True) -> dict:
    """Reads and validates one GOT-10k sequence folder.

    Returns:
      dict with `files` (sorted frame paths), `boxes` float32 `[T, 4]` `[x, y, w, h]`, `absent`
      bool `[T]`, `cover` int32 `[T]` (8 where `cover.label` is missing), `height`, `width`.

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
    if len(boxes) != len(files):
        raise DataError(f"{gt_path}: {len(boxes)} boxes for {len(files)} frames")
    n = len(files)
    absent = np.zeros(n, bool)
    cover = np.full(n, MAX_COVER, np.int32)
    for name in ("absence", "cover"):
        path = os.path.join(seq_dir, f"{name}.label")
        if not os.path.exists(path):
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
    first = _decode(files[0])
    h, w = first.shape[:2]
    for t, (bx, by, bw, bh) in enumerate(boxes):
        where = f"{gt_path}:{t + 1}"
        if bw < 0 or bh < 0:
            raise DataError(f"{where}: negative box size {boxes[t].tolist()}")
        if not absent[t]:
            if bw == 0 or bh == 0:
                raise DataError(f"{where}: empty box {boxes[t].tolist()} on a frame not marked absent")
            if bx - 1 >= w or by - 1 >= h or bx - 1 + bw <= 0 or by - 1 + bh <= 0:
                raise DataError(f"{where}: box {boxes[t].tolist()} lies outside the {w}x{h} image")
    for path in files[1:] if decode_check else []:
        img = _decode(path)
        if img.shape[:2] != (h, w):
            raise DataError(f"{path}: {img.shape[1]}x{img.shape[0]} frame in a {w}x{h} sequence")
    if not decode_check:
        for path in files:
            if os.path.getsize(path) == 0:
                raise DataError(f"{path}: empty file")
    return {"files": files, "boxes": boxes.astype(np.float32), "absent": absent, "cover": cover,
            "height": h, "width": w}


def _decode(path: str) -> np.ndarray:
    data = np.fromfile(path, np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        raise DataError(f"{path}: unreadable or corrupt image")
    return img


class Got10kLocal(_tfds_compat.SourceFileCodePath, tfds.core.GeneratorBasedBuilder):
    """GOT-10k (`train/`, `val/`) from a local folder; nothing is downloaded."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [Got10kConfig(name="default", description="train + val of a local GOT-10k folder")]
    DEFAULT_CONFIG_NAME = "default"
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass manual_dir=<GOT-10k folder with train/ and val/> (or Got10kConfig.root)."

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="GOT-10k single-object tracking videos (local folder).",
            features=_features(), supervised_keys=None, disable_shuffling=True,
            metadata=tfds.core.MetadataDict())

    def _root(self, dl_manager) -> str:
        root = self.builder_config.root or getattr(dl_manager, "_manual_dir", None)
        if not root or not os.path.isdir(str(root)):
            raise FileNotFoundError(f"GOT-10k folder {root!r} not found: pass manual_dir or Got10kConfig.root")
        return str(root)

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        root = self._root(dl_manager)
        out = {}
        for split, sub in cfg.splits:
            folder = os.path.join(root, sub)
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"{folder}: GOT-10k split folder not found (split {split!r})")
            list_file = os.path.join(folder, "list.txt")
            if os.path.exists(list_file):
                names = [ln.strip() for ln in open(list_file) if ln.strip()]
            else:
                names = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
            if cfg.max_sequences:
                names = names[:cfg.max_sequences]
            if not names:  # tfds cannot write an empty split
                logging.warning("%s: no sequences; split %r is left out", folder, split)
                continue
            seqs = [read_got10k_sequence(os.path.join(folder, nm), cfg.decode_check) for nm in names]
            self.info.metadata[split] = _annotation_table(
                names, [(q["height"], q["width"]) for q in seqs], [q["boxes"] for q in seqs],
                [q["absent"] for q in seqs], [q["cover"] for q in seqs])
            out[split] = self._generate_examples(seqs)
        return out

    def _generate_examples(self, seqs):
        k = 0
        for i, q in enumerate(seqs):
            for t, path in enumerate(q["files"]):
                with open(path, "rb") as f:
                    yield k, {"image": f.read(), "sequence": i, "frame": t}
                k += 1


BUILDERS = {"synthetic": "siamfc_synthetic_videos", "got10k": "got10k_local"}


def prepare(name: str, data_dir: str, config: str = "", manual_dir: str | None = None):
    """Prepares `synthetic` (`config` `default` / `tiny`) or `got10k` (from `manual_dir`) on first use."""
    from research.data import pipeline
    if name not in BUILDERS:
        raise ValueError(f"unknown SiamFC dataset {name!r}; known: {sorted(BUILDERS)}")
    builder_name = BUILDERS[name] + (f"/{config}" if config else "")
    return pipeline.prepare(builder_name, data_dir, manual_dir=manual_dir or None)


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
