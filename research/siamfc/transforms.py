"""SiamFC training pairs: official `datasets.Pair` sampling and `transforms.SiamFCTransforms`, through grain.

Pair (official `siamfc/datasets.py`):
  * `filter_frames`: a frame is usable when its box has area >= 20, both sides in [20, 500] px,
    both sides in [1 %, 50 %] of the image side, aspect w / max(1, h) in [0.25, 4], and, with
    GOT-10k cover levels, cover > max(1, 0.3 * max cover) (absent frames have cover 0; an explicit
    `absent` flag is honoured as well, which changes nothing where cover is given).
  * `sample_pair`: two distinct usable frames, sorted (exemplar first), less than 100 frames
    apart: up to 100 draws, else one frame twice; a sequence with 2 usable frames gives those two.
  * A sequence with fewer than 2 usable frames is replaced by a random one (as the official
    recursion), at most `MAX_RESAMPLE` times.

Transforms (official `siamfc/transforms.py`), each of z and x:
  `crop_instance`: square crop of side `sqrt((w + p)(h + p)) * 255 / 127`, p = 0.5 (w + h), around
  the box centre (0-based centre `x - 1 + (w - 1) / 2`), padded with the image's mean colour,
  resized to 255 px with a random OpenCV interpolation (`research.siamfc.ops.crop_and_resize`);
  then `RandomStretch(0.05)` (random interpolation, side `round(255 * s)`), `CenterCrop(247)`
  (mean-colour padding if smaller), `RandomCrop(239)`; the exemplar also `CenterCrop(127)`.
  So exemplars are 127 px and searches 239 px (a 15 x 15 response).

Random draws come from a `numpy.random.Generator` in the official order (z crop interpolation,
x crop interpolation, then per image: stretch interpolation, stretch factor, crop row, crop
column), so a pair is a pure function of (sequence, seed); `LegacyRandom` adapts
`numpy.random.RandomState` to the same interface (the official code draws from the global one).
"""

from __future__ import annotations

from typing import Sequence

import cv2
import grain
import numpy as np

from research.siamfc import ops

# The official RandomStretch / crop choose among these (same order).
INTERPOLATIONS = (cv2.INTER_LINEAR, cv2.INTER_CUBIC, cv2.INTER_AREA, cv2.INTER_NEAREST, cv2.INTER_LANCZOS4)
MAX_PAIR_GAP = 100
MAX_RESAMPLE = 100


class LegacyRandom:
    """`numpy.random.RandomState` behind the `Generator` methods used here (`choice`, `uniform`, `integers`)."""

    def __init__(self, state: np.random.RandomState):
        self.state = state

    def choice(self, a, size=None, replace=True):
        return self.state.choice(a, size, replace=replace)

    def uniform(self, low=0.0, high=1.0, size=None):
        return self.state.uniform(low, high, size)

    def integers(self, low, high=None, size=None):
        return self.state.randint(low, high, size)


def filter_frames(image_wh: Sequence[int], anno: np.ndarray, cover: np.ndarray | None = None,
                  absent: np.ndarray | None = None) -> np.ndarray:
    """Indices of the usable frames of a sequence (official `Pair._filter`).

    Args:
      image_wh: `(width, height)` of the sequence's frames (the official code reads frame 0).
      anno: `[T, 4]` boxes `[x, y, w, h]` in pixels.
      cover: `[T]` GOT-10k visible-ratio levels (0..8) or None.
      absent: `[T]` bool, frames without the target, or None.

    Returns:
      int64 `[K]` ascending frame indices.
    """
    anno = np.asarray(anno, np.float64).reshape(-1, 4)
    size = np.asarray(image_wh, np.float64)[None, :]
    wh = anno[:, 2:]
    areas = wh[:, 0] * wh[:, 1]
    aspect = wh[:, 0] / np.maximum(1, wh[:, 1])
    keep = ((areas >= 20) & np.all(wh >= 20, axis=1) & np.all(wh <= 500, axis=1)
            & np.all(wh / size >= 0.01, axis=1) & np.all(wh / size <= 0.5, axis=1)
            & (aspect >= 0.25) & (aspect <= 4))
    if cover is not None:
        cover = np.asarray(cover, np.float64)
        keep &= cover > max(1, cover.max() * 0.3)
    if absent is not None:
        keep &= ~np.asarray(absent, bool)
    return np.nonzero(keep)[0]


def sample_pair(indices: np.ndarray, rng) -> tuple[int, int]:
    """(exemplar frame, search frame) from usable `indices` (official `Pair._sample_pair`).

    Raises:
      ValueError: `indices` is empty.
    """
    n = len(indices)
    if n == 0:
        raise ValueError("sample_pair: no usable frame")
    if n == 1:
        return int(indices[0]), int(indices[0])
    if n == 2:
        return int(indices[0]), int(indices[1])
    for _ in range(100):
        z, x = np.sort(rng.choice(indices, 2, replace=False))
        if x - z < MAX_PAIR_GAP:
            return int(z), int(x)
    z = int(rng.choice(indices))
    return z, z


def crop_instance(img: np.ndarray, box: Sequence[float], out_size: int, exemplar_sz: int, context: float,
                  interp: int) -> np.ndarray:
    """Official `SiamFCTransforms._crop`: the context region of `box` resized to `out_size` px.

    Args:
      img: `[H, W, 3]` uint8 RGB.
      box: `[x, y, w, h]`, x / y 1-based (got10k convention).
      out_size: output side (the instance size, 255, for exemplar and search alike).
      exemplar_sz: 127: the region is `out_size / exemplar_sz` times the exemplar context side.
      context: 0.5.
      interp: OpenCV interpolation flag.

    Returns:
      `[out_size, out_size, 3]` uint8; pixels outside the image take the image's mean colour.
    """
    b = np.asarray(box, np.float64)
    # float32 centre and size, as the official array
    state = np.array([b[1] - 1 + (b[3] - 1) / 2, b[0] - 1 + (b[2] - 1) / 2, b[3], b[2]], np.float32)
    center, target_sz = state[:2], state[2:]
    ctx = context * np.sum(target_sz)
    size = np.sqrt(np.prod(target_sz + ctx))
    size *= out_size / exemplar_sz
    avg = np.mean(img, axis=(0, 1), dtype=float)
    return ops.crop_and_resize(img, center, size, out_size, border_value=avg, interp=int(interp))


def random_stretch(img: np.ndarray, scale: float, interp: int) -> np.ndarray:
    """Official `RandomStretch` with its draws given: both sides times `scale`, Python-rounded."""
    out = (round(img.shape[1] * scale), round(img.shape[0] * scale))
    return cv2.resize(img, out, interpolation=int(interp))


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """Official `CenterCrop(size)`: offsets `round((h - size) / 2)` (half to even); a smaller image is
    first padded on all sides by the overhang with its mean colour (the result may then be one
    pixel short of `size`, as in the official code, which the following crop absorbs)."""
    h, w = img.shape[:2]
    i, j = round((h - size) / 2.0), round((w - size) / 2.0)
    npad = max(0, -i, -j)
    if npad > 0:
        avg = np.mean(img, axis=(0, 1))
        img = cv2.copyMakeBorder(img, npad, npad, npad, npad, cv2.BORDER_CONSTANT, value=tuple(float(v) for v in avg))
        i, j = i + npad, j + npad
    return img[i:i + size, j:j + size]


def random_crop(img: np.ndarray, size: int, rng) -> np.ndarray:
    """Official `RandomCrop(size)`: row then column offset uniform in [0, side - size]."""
    h, w = img.shape[:2]
    i = int(rng.integers(0, h - size + 1))
    j = int(rng.integers(0, w - size + 1))
    return img[i:i + size, j:j + size]


class SiamFCTransforms:
    """Official `SiamFCTransforms(exemplar_sz, instance_sz, context)` on one (z, x) frame pair.

    `__call__(z, x, box_z, box_x, rng)` returns `(z_crop, x_crop)` uint8: `[exemplar_sz]^2 x 3` and
    `[instance_sz - 16]^2 x 3` (127 and 239 px by default). The official `ToTensor` makes floats
    0..255; the values are integers either way, so they stay uint8 here (4x less host memory).
    """

    def __init__(self, exemplar_sz: int = 127, instance_sz: int = 255, context: float = 0.5,
                 max_stretch: float = 0.05):
        self.exemplar_sz, self.instance_sz = int(exemplar_sz), int(instance_sz)
        self.context, self.max_stretch = float(context), float(max_stretch)

    @property
    def search_sz(self) -> int:
        return self.instance_sz - 2 * 8

    def _augment(self, img: np.ndarray, rng) -> np.ndarray:
        interp = rng.choice(INTERPOLATIONS)
        scale = 1.0 + rng.uniform(-self.max_stretch, self.max_stretch)
        img = random_stretch(img, scale, interp)
        img = center_crop(img, self.instance_sz - 8)
        return random_crop(img, self.instance_sz - 2 * 8, rng)

    def __call__(self, z: np.ndarray, x: np.ndarray, box_z, box_x, rng) -> tuple[np.ndarray, np.ndarray]:
        z = crop_instance(z, box_z, self.instance_sz, self.exemplar_sz, self.context, rng.choice(INTERPOLATIONS))
        x = crop_instance(x, box_x, self.instance_sz, self.exemplar_sz, self.context, rng.choice(INTERPOLATIONS))
        z = center_crop(self._augment(z, rng), self.exemplar_sz)
        x = self._augment(x, rng)
        return np.ascontiguousarray(z), np.ascontiguousarray(x)


class PairSampler:
    """One training pair of a sequence: usable frames, a pair, decoded frames, transforms.

    Args:
      source: a `research.siamfc.data.VideoSource` (annotations without images, frames on demand).
      transforms: `SiamFCTransforms`.
    """

    def __init__(self, source, transforms: SiamFCTransforms):
        self.source, self.transforms = source, transforms
        self._valid: dict[int, np.ndarray] = {}

    def valid_frames(self, seq: int) -> np.ndarray:
        if seq not in self._valid:
            s = self.source.sequence(seq)
            self._valid[seq] = filter_frames((s["width"], s["height"]), s["boxes"], s["cover"], s["absent"])
        return self._valid[seq]

    def __call__(self, seq: int, rng) -> dict[str, np.ndarray]:
        """`{'exemplar': uint8 [127, 127, 3], 'search': uint8 [239, 239, 3], 'sequence', 'frames'}`.

        Raises:
          ValueError: `MAX_RESAMPLE` sequences in a row had fewer than 2 usable frames.
        """
        for _ in range(MAX_RESAMPLE):
            valid = self.valid_frames(seq)
            if len(valid) >= 2:
                break
            seq = int(rng.integers(0, len(self.source)))
        else:
            raise ValueError(f"{MAX_RESAMPLE} sampled sequences had < 2 usable frames (Pair._filter): "
                             f"check the boxes of {self.source.dataset_dir} split {self.source.split}")
        fz, fx = sample_pair(valid, rng)
        boxes = self.source.sequence(seq)["boxes"]
        z, x = self.transforms(self.source.frame(seq, fz), self.source.frame(seq, fx), boxes[fz], boxes[fx], rng)
        return {"exemplar": z, "search": x, "sequence": np.int64(seq), "frames": np.array([fz, fx], np.int64)}


def pair_dataset(sampler: PairSampler, *, batch_size: int, seed: int, pairs_per_seq: int = 1,
                 process_index: int = 0, process_count: int = 1, start_batch: int = 0) -> grain.MapDataset:
    """An endless grain `MapDataset` of this process's slices of the global batches.

    Epochs are shuffled passes over `len(source) * pairs_per_seq` items (item k is sequence
    `k % len(source)`, as the official `Pair.__len__`); global batch b holds positions
    `b * batch_size ... + batch_size - 1` and process p takes its contiguous `batch_size //
    process_count` of them. Each pair's randomness is seeded by `(seed, global position)`, so the
    data do not depend on the number of processes or threads, and grain's iterator state (the
    batch position) resumes exactly. With `start_batch` the dataset starts at global batch
    `start_batch` (item i is global batch `start_batch + i`): a run resumed on any number of
    processes reads the batches the interrupted run would have read next.

    Raises:
      ValueError: `batch_size` not divisible by `process_count`, or fewer items than a batch.
    """
    if batch_size % process_count:
        raise ValueError(f"global batch_size {batch_size} is not divisible by process_count {process_count}")
    num = len(sampler.source) * int(pairs_per_seq)
    if num < batch_size:
        raise ValueError(f"{num} training items (sequences x pairs_per_seq) < global batch {batch_size}")
    local = batch_size // process_count
    n_seq = len(sampler.source)
    items = grain.MapDataset.range(num).shuffle(seed=int(seed)).repeat().batch(batch_size, drop_remainder=True)

    def make(b: int, ids: np.ndarray) -> dict[str, np.ndarray]:
        out = []
        for j in range(process_index * local, (process_index + 1) * local):
            rng = np.random.default_rng([int(seed), int(b) * batch_size + j, 0x51A3])
            out.append(sampler(int(ids[j]) % n_seq, rng))
        return {k: np.stack([o[k] for o in out]) for k in out[0]}

    ds = items.map_with_index(make)  # the index is the global batch number
    return ds[int(start_batch):] if start_batch else ds
