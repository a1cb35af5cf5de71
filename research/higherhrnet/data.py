"""HigherHRNet data: a synthetic multi-person keypoint dataset and a local COCO-keypoints folder, as tfds builders.

Both builders write array_record records of one layout (what `research/higherhrnet/task.py` reads through grain):

  image          uint8 [H, W, 3] RGB (PNG for the synthetic data, the file's own bytes for COCO)
  ignore         uint8 [H, W, 1]: 1 where the official `CocoKeypoints.get_mask` is False (crowd regions and people
                 annotated without keypoints), 0 elsewhere; the loss mask is `ignore == 0`
  image_id       int64; image/filename text
  keypoints      float32 [N, J, 3]: (x, y, v) per annotation, original-image pixels, v as in COCO (0 not labelled,
                 1 labelled but occluded, 2 visible)
  bbox           float32 [N, 4] (x, y, w, h) pixels; area float32 [N]; is_crowd int32 [N]; num_keypoints int32 [N];
  ann_id         int64 [N]

Every annotation of an image is kept (crowd ones and those without keypoints too), so the COCO ground truth of the
evaluation can be rebuilt from the records (`coco_ground_truth`); the training loader drops what the official
`CocoKeypoints.__getitem__` drops (crowd annotations without keypoints).

`higherhrnet_synthetic` renders 1-3 stick figures per image with the COCO 17-joint layout (head with eyes and ears,
limbs of the person's left drawn warm, of the right cool, so left and right are visible even after a mirror),
random pose, size, rotation and position, some joints occluded by grey boxes (v = 1) or outside the image (v = 0),
and sometimes one extra figure annotated without keypoints (its box is then an ignore region, like COCO's
unannotated people). Generated deterministically from (seed, split, index) with numpy + OpenCV.

`higherhrnet_coco_local` reads `<root>/annotations/person_keypoints_<set>.json` and `<root>/images/<set>/<file>`
(the official `DATASET.ROOT` layout, `lib/dataset/COCODataset.py`), or CrowdPose's own `<root>/json/crowdpose_<set>.json`
and `<root>/images/<file>` (`CrowdPoseDataset.py`; `folder_paths`). A missing folder or annotation file is a
FileNotFoundError naming the path, an empty training `images` list a ValueError naming the json. Everything else
is validated entry by entry, the way the detection builder does it (`research/data/coco.py`), and each problem is
recorded (`research.data.validation`: listed once before the run and in the workdir), not raised:

  json entries            read through `research.data.coco_annotations.normalize` (string ids, missing
                          iscrowd / area, boxes from polygons); a person without a box takes the extent of its
                          labelled keypoints
  duplicate image id      the later entry dropped
  unknown image id        the annotation dropped
  missing / corrupt image the image skipped; a JPEG missing only its end marker restored and kept; EXIF
                          orientation and json sizes handled as for detection
  keypoints               the wrong count or non-finite values: the person kept as unannotated (num_keypoints 0,
                          so its region is masked out like COCO's unannotated people); a labelled joint outside
                          the image or a visibility flag other than 0/1/2: that joint set to unlabelled
  empty validation json   no validation split (evaluating says so)

The prepared data is keyed to the annotation files' bytes (SHA-1 in the builder config name): an edited json or
another folder is prepared anew.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import cv2
import numpy as np
import tensorflow_datasets as tfds

from research.data import _tfds_compat
from research.data import validation

SPLIT_CODES = {"train": 0, "validation": 1}

# COCO keypoints (person_keypoints_*.json `categories[0]`), 0-based.
COCO_KEYPOINT_NAMES = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
                       "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
                       "right_knee", "left_ankle", "right_ankle")
COCO_SKELETON = ((15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8), (7, 9),
                 (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6))
COCO_FLIP_INDEX = (0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15)  # FLIP_CONFIG['COCO']
# CrowdPose (14 joints: l/r shoulder, elbow, wrist, hip, knee, ankle, head, neck).
CROWDPOSE_FLIP_INDEX = (1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 12, 13)  # FLIP_CONFIG['CROWDPOSE']
CROWDPOSE_SKELETON = ((12, 13), (13, 0), (13, 1), (0, 2), (2, 4), (1, 3), (3, 5), (13, 7), (13, 6), (7, 9), (9, 11),
                      (6, 8), (8, 10))

__all__ = ["SyntheticConfig", "HigherhrnetSynthetic", "CocoKeypointsConfig", "HigherhrnetCocoLocal", "render_example",
           "coco_ground_truth", "COCO_SKELETON", "COCO_FLIP_INDEX", "CROWDPOSE_FLIP_INDEX", "CROWDPOSE_SKELETON"]


def _features(num_joints: int, fixed_size: int | None, encoding: str | None):
    shape = (fixed_size, fixed_size) if fixed_size else (None, None)
    img_kwargs = {"encoding_format": encoding} if encoding else {}
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=shape + (3,), **img_kwargs),
        "ignore": tfds.features.Image(shape=shape + (1,), encoding_format="png"),
        "image_id": np.int64,
        "image/filename": tfds.features.Text(),
        "keypoints": tfds.features.Tensor(shape=(None, num_joints, 3), dtype=np.float32),
        "bbox": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
        "area": tfds.features.Tensor(shape=(None,), dtype=np.float32),
        "is_crowd": tfds.features.Tensor(shape=(None,), dtype=np.int32),
        "num_keypoints": tfds.features.Tensor(shape=(None,), dtype=np.int32),
        "ann_id": tfds.features.Tensor(shape=(None,), dtype=np.int64),
    })


def _png(img: np.ndarray) -> bytes:
    if img.ndim == 3 and img.shape[2] == 3:
        img = img[..., ::-1]  # RGB -> BGR for OpenCV
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(img))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


# ------------------------------------------------------------------------------------------------ synthetic


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
    """A `higherhrnet_synthetic` variant.

    Attributes:
      image_size: square image side (pixels).
      num_train, num_validation: images per split.
      seed: image i of split s is rendered from (seed, s, i).
      max_people: annotated figures per image are 1..max_people.
      min_height, max_height: figure height as a fraction of the image side.
    """

    image_size: int = 128
    num_train: int = 1024
    num_validation: int = 128
    seed: int = 0
    max_people: int = 3
    min_height: float = 0.45
    max_height: float = 0.85


def _figure(height: float, rng: np.random.Generator) -> np.ndarray:
    """[17, 2] joints of one stick figure, origin at the hip centre, y down, in pixels (COCO order; the person's
    left is at +x, i.e. the figure faces the viewer)."""
    h = height
    j = np.zeros((17, 2))
    neck = np.array([0.0, -0.36 * h])
    head = neck + [0.0, -0.10 * h]
    j[0] = head + [0.0, 0.02 * h]                       # nose
    j[1], j[2] = head + [0.03 * h, -0.005 * h], head + [-0.03 * h, -0.005 * h]   # eyes
    j[3], j[4] = head + [0.06 * h, 0.01 * h], head + [-0.06 * h, 0.01 * h]      # ears
    half_sh, half_hip = 0.11 * h * rng.uniform(0.85, 1.15), 0.07 * h * rng.uniform(0.85, 1.15)
    j[5], j[6] = neck + [half_sh, 0.02 * h], neck + [-half_sh, 0.02 * h]
    j[11], j[12] = np.array([half_hip, 0.0]), np.array([-half_hip, 0.0])
    for side, sign in ((0, 1.0), (1, -1.0)):
        # arm: shoulder angle from straight down, outward positive; elbow bend relative to it
        a1 = math.radians(rng.uniform(-20, 160))
        a2 = a1 + math.radians(rng.uniform(-100, 60))
        d1 = np.array([sign * math.sin(a1), math.cos(a1)]) * 0.17 * h
        d2 = np.array([sign * math.sin(a2), math.cos(a2)]) * 0.15 * h
        j[7 + side] = j[5 + side] + d1
        j[9 + side] = j[7 + side] + d2
        b1 = math.radians(rng.uniform(-10, 45))
        b2 = b1 + math.radians(rng.uniform(-45, 20))
        e1 = np.array([sign * math.sin(b1), math.cos(b1)]) * 0.24 * h
        e2 = np.array([sign * math.sin(b2), math.cos(b2)]) * 0.23 * h
        j[13 + side] = j[11 + side] + e1
        j[15 + side] = j[13 + side] + e2
    return j


def _draw_figure(img: np.ndarray, pts: np.ndarray, height: float, rng: np.random.Generator) -> None:
    """Draws a figure (joints [17, 2] pixels) into img in place: limbs of the left side warm, right side cool."""
    t = max(2, int(round(height * 0.035)))
    jit = lambda c: tuple(int(np.clip(v + rng.integers(-30, 31), 0, 255)) for v in c)  # noqa: E731
    left, right, mid = jit((235, 90, 40)), jit((40, 110, 235)), jit((60, 200, 80))
    p = lambda k: (int(round(pts[k, 0] * 16)), int(round(pts[k, 1] * 16)))  # noqa: E731  (4 fractional bits)
    line = lambda a, b, c: cv2.line(img, p(a), p(b), c, t, cv2.LINE_AA, 4)  # noqa: E731
    line(5, 11, mid), line(6, 12, mid), line(5, 6, mid), line(11, 12, mid)
    for a, b in ((5, 7), (7, 9), (11, 13), (13, 15)):
        line(a, b, left)
    for a, b in ((6, 8), (8, 10), (12, 14), (14, 16)):
        line(a, b, right)
    head_r = int(round(height * 0.075 * 16))
    head_c = (pts[1] + pts[2]) / 2
    cv2.circle(img, (int(round(head_c[0] * 16)), int(round(head_c[1] * 16))), head_r, jit((225, 190, 150)), -1,
               cv2.LINE_AA, 4)
    dot = max(1, t // 2)
    for k, c in ((0, (90, 30, 30)), (1, left), (2, right), (3, left), (4, right)):
        cv2.circle(img, p(k), dot * 16, c, -1, cv2.LINE_AA, 4)
    for k in range(5, 17):
        cv2.circle(img, p(k), (t + 1) * 16 // 2 + 8, (245, 245, 245), -1, cv2.LINE_AA, 4)


def render_example(config: SyntheticConfig, split: str, index: int) -> dict:
    """Renders image `index` of `split` deterministically.

    Returns:
      dict: `image` uint8 [S, S, 3] RGB; `ignore` uint8 [S, S] (1 = ignore region); `keypoints` float32 [N, 17, 3];
      `bbox` float32 [N, 4] (x, y, w, h); `area` float32 [N] (half the box: a filled silhouette's share);
      `num_keypoints` int32 [N]; `is_crowd` int32 [N] (0). Annotations without keypoints come last.
    """
    s = int(config.image_size)
    rng = np.random.default_rng([int(config.seed), SPLIT_CODES.get(split, 7), int(index)])
    c0, c1 = rng.integers(0, 200, 3), rng.integers(0, 200, 3)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    theta = rng.uniform(0, 2 * np.pi)
    t = (xx * math.cos(theta) + yy * math.sin(theta) + 1.5) / 3.0
    img = c0 * (1 - t[..., None]) + c1 * t[..., None] + rng.normal(0, rng.uniform(2, 12), (s, s, 3))
    img = np.ascontiguousarray(np.clip(np.rint(img), 0, 255).astype(np.uint8))
    n_people = int(rng.integers(1, config.max_people + 1))
    people = []
    for _ in range(n_people + 1 + 30):  # a few tries per figure (figures mostly outside the image are redrawn)
        if len(people) >= n_people:
            break
        height = s * rng.uniform(config.min_height, config.max_height)
        pts = _figure(height, rng)
        ang = math.radians(rng.uniform(-25, 25))
        rot = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
        pts = pts @ rot.T + [rng.uniform(0.1, 0.9) * s, rng.uniform(0.2, 0.9) * s]
        inside = (pts[:, 0] >= 0) & (pts[:, 0] < s) & (pts[:, 1] >= 0) & (pts[:, 1] < s)
        if inside.sum() < 8:
            continue
        people.append((pts, height, inside))
    for pts, height, _ in people:
        _draw_figure(img, pts, height, rng)
    kps = []
    for pts, _, inside in people:
        k = np.zeros((17, 3), np.float32)
        k[inside, :2] = pts[inside]
        k[inside, 2] = 2
        kps.append(k)
    # occluders: grey boxes over parts of the image; labelled joints under them become v = 1
    for _ in range(int(rng.integers(0, 3))):
        w, h = rng.uniform(0.12, 0.3, 2) * s
        x0, y0 = rng.uniform(0, s - w), rng.uniform(0, s - h)
        g = int(rng.integers(90, 170))
        img[int(y0):int(y0 + h), int(x0):int(x0 + w)] = (g, g, g)
        for k in kps:
            under = (k[:, 2] > 0) & (k[:, 0] >= int(x0)) & (k[:, 0] < int(x0 + w)) & (k[:, 1] >= int(y0)) & (
                k[:, 1] < int(y0 + h))
            k[under, 2] = 1
    ignore = np.zeros((s, s), np.uint8)
    boxes = []
    for k, (pts, height, _) in zip(kps, people):
        lab = k[k[:, 2] > 0, :2]
        pad = 0.08 * height
        x0, y0 = np.maximum(lab.min(0) - pad, 0)
        x1, y1 = np.minimum(lab.max(0) + pad, s)
        boxes.append([x0, y0, x1 - x0, y1 - y0])
    # sometimes a small figure without keypoint annotation: its box is an ignore region (official get_mask)
    if rng.random() < 0.2:
        height = s * rng.uniform(0.25, 0.4)
        pts = _figure(height, rng) + [rng.uniform(0.15, 0.85) * s, rng.uniform(0.3, 0.85) * s]
        _draw_figure(img, pts, height, rng)
        x0, y0 = np.clip(pts.min(0) - 0.1 * height, 0, s)
        x1, y1 = np.clip(pts.max(0) + 0.1 * height, 0, s)
        if x1 > x0 + 1 and y1 > y0 + 1:
            ignore[int(y0):int(math.ceil(y1)), int(x0):int(math.ceil(x1))] = 1
            kps.append(np.zeros((17, 3), np.float32))
            boxes.append([x0, y0, x1 - x0, y1 - y0])
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    keypoints = np.asarray(kps, np.float32).reshape(-1, 17, 3)
    return {"image": img, "ignore": ignore, "keypoints": keypoints, "bbox": boxes,
            "area": (0.5 * boxes[:, 2] * boxes[:, 3]).astype(np.float32),
            "num_keypoints": (keypoints[..., 2] > 0).sum(1).astype(np.int32),
            "is_crowd": np.zeros(len(boxes), np.int32)}


class HigherhrnetSynthetic(_tfds_compat.SourceFileCodePath, tfds.core.GeneratorBasedBuilder):
    """Synthetic stick-figure people with COCO keypoints (generated, no download)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        SyntheticConfig(name="default", description="128 px, 1024 train / 128 validation"),
        SyntheticConfig(name="tiny", image_size=64, num_train=32, num_validation=8, description="64 px, smoke tests"),
    ]
    DEFAULT_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        s = int(self.builder_config.image_size)
        return self.dataset_info_from_configs(description="Synthetic stick-figure people, COCO 17 keypoints.",
                                              features=_features(17, s, "png"), supervised_keys=None)

    def _split_generators(self, dl_manager):
        del dl_manager
        cfg = self.builder_config
        return {"train": self._generate_examples("train", cfg.num_train),
                "validation": self._generate_examples("validation", cfg.num_validation)}

    def _generate_examples(self, split: str, num: int):
        cfg = self.builder_config
        for i in range(int(num)):
            ex = render_example(cfg, split, i)
            n = len(ex["bbox"])
            yield i, {"image": _png(ex["image"]), "ignore": _png(ex["ignore"][..., None]), "image_id": i + 1,
                      "image/filename": f"{split}_{i:06d}.png", "keypoints": ex["keypoints"], "bbox": ex["bbox"],
                      "area": ex["area"], "is_crowd": ex["is_crowd"], "num_keypoints": ex["num_keypoints"],
                      "ann_id": np.arange(1, n + 1, dtype=np.int64) + 100 * (i + 1)}


# ------------------------------------------------------------------------------------------------ COCO folder




def folder_paths(root: str, set_name: str, layout: str = "coco") -> tuple[str, str]:
    """(annotation json, image folder) of one set of a local keypoints folder.

    Layouts (the official `DATASET.ROOT` ones):
      "coco"      `<root>/annotations/person_keypoints_<set>.json`, `<root>/images/<set>/` (`COCODataset.py`)
      "crowdpose" `<root>/json/crowdpose_<set>.json`, `<root>/images/` (`CrowdPoseDataset.py`)
    """
    if layout == "crowdpose":
        return os.path.join(root, "json", f"crowdpose_{set_name}.json"), os.path.join(root, "images")
    return os.path.join(root, "annotations", f"person_keypoints_{set_name}.json"), os.path.join(root, "images", set_name)


def folder_layout(data_cfg) -> str:
    """The layout of `config.data`'s folder: CrowdPose's own (`json/crowdpose_<set>.json`) when `data.name` is
    crowdpose and that file exists, else COCO's (also accepted for CrowdPose converted to COCO names)."""
    root = data_cfg.manual_dir or ""
    if data_cfg.name == "crowdpose" and os.path.isfile(folder_paths(root, data_cfg.train_set, "crowdpose")[0]):
        return "crowdpose"
    return "coco"


@dataclasses.dataclass(eq=False)
class CocoKeypointsConfig(tfds.core.BuilderConfig):
    """Where a COCO-keypoints folder is (official layout) and what it holds.

    Attributes:
      root: the folder (else the tfds manual_dir), laid out as `layout` says (`folder_paths`).
      layout: "coco" (`annotations/person_keypoints_<set>.json`, `images/<set>/`) or "crowdpose"
        (`json/crowdpose_<set>.json`, `images/`).
      train_set, validation_set: `DATASET.TRAIN` / `DATASET.TEST` (train2017 / val2017).
      num_joints: keypoints per annotation (17 COCO, 14 CrowdPose).
      remove_images_without_annotations: the training split keeps only images with an annotation (official
        `CocoKeypoints(..., remove_images_without_annotations=True)` for training).
    """

    root: str | None = None
    train_set: str = "train2017"
    validation_set: str = "val2017"
    layout: str = "coco"
    num_joints: int = 17
    remove_images_without_annotations: bool = True


class HigherhrnetCocoLocal(_tfds_compat.SourceFileCodePath, tfds.core.GeneratorBasedBuilder):
    """COCO keypoints from a local folder (nothing downloaded); see the module docstring for the checks."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [CocoKeypointsConfig(name="default")]
    DEFAULT_CONFIG_NAME = "default"
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Place annotations/person_keypoints_<set>.json and images/<set>/ in manual_dir."

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(description="COCO person keypoints from a local folder.",
                                              features=_features(self.builder_config.num_joints, None, None),
                                              supervised_keys=None)

    def _root(self, dl_manager) -> str:
        root = self.builder_config.root or getattr(dl_manager, "_manual_dir", None)
        if not root:
            raise FileNotFoundError("no COCO keypoints folder: pass manual_dir or CocoKeypointsConfig.root")
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"COCO keypoints folder not found: {root}")
        return root

    @property
    def validation(self) -> validation.Collector:
        """The problems found while preparing (written next to the data by `pipeline.prepare`)."""
        if "_validation" not in self.__dict__:
            self._validation = validation.Collector()
        return self._validation

    def _split_generators(self, dl_manager):
        from research.data import coco as coco_data
        root, cfg = self._root(dl_manager), self.builder_config
        paths = {}
        for split, name in (("train", cfg.train_set), ("validation", cfg.validation_set)):
            ann, img_dir = folder_paths(root, name, cfg.layout)
            if not os.path.isfile(ann):
                raise FileNotFoundError(f"annotation file not found: {ann}")
            if not os.path.isdir(img_dir):
                raise FileNotFoundError(f"image folder not found: {img_dir}")
            paths[split] = (ann, img_dir)
        out = {}
        for split, (ann, img_dir) in paths.items():
            if not coco_data.lists_images(ann):  # tfds cannot write a split without examples
                if split == "train":
                    raise ValueError(f'{ann}: "images" is empty: nothing to train on')
                self.validation.add(ann, '"images" is empty', f"no {split!r} split (evaluation on it will say so)")
                continue
            out[split] = self._generate_examples(ann, img_dir, split)
        return out

    def _generate_examples(self, ann_path: str, img_dir: str, split: str):
        cfg = self.builder_config
        return generate_coco_examples(ann_path, img_dir, cfg.num_joints,
                                      cfg.remove_images_without_annotations and split == "train", self.validation)


def _ignore_mask(anns: list, h: int, w: int) -> np.ndarray:
    """The official `get_mask` inverted: 1 where crowd regions or people without keypoints are."""
    from pycocotools import mask as mask_utils
    m = np.zeros((h, w), np.float64)
    for obj in anns:
        if not (obj.get("iscrowd", 0) or obj.get("num_keypoints", 0) == 0):
            continue
        seg = obj.get("segmentation")
        if not seg:
            continue
        rles = mask_utils.frPyObjects(seg, h, w)
        for rle in (rles if isinstance(rles, list) else [rles]):
            m += mask_utils.decode(rle)
    return (m >= 0.5).astype(np.uint8)


def _keypoint_box(keypoints) -> list[float] | None:
    """(x, y, w, h) extent of the labelled keypoints of a flat COCO keypoint list, or None."""
    try:
        k = np.asarray(keypoints, np.float64).reshape(-1, 3)
    except (TypeError, ValueError):
        return None
    k = k[(k[:, 2] > 0) & np.all(np.isfinite(k), axis=1)]
    if not len(k):
        return None
    x0, y0 = k[:, :2].min(0)
    x1, y1 = k[:, :2].max(0)
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def generate_coco_examples(ann_path: str, img_dir: str, num_joints: int = 17,
                           remove_images_without_annotations: bool = False,
                           report: validation.Collector | None = None):
    """Yields (key, record) for every usable image of a person_keypoints json, validating it entry by entry (see
    the module doc); each problem goes to `report` (a fresh collector when None)."""
    from research.data import coco as coco_data
    from research.data import coco_annotations
    report = report if report is not None else validation.Collector()
    with open(ann_path) as f:
        data = json.load(f)
    for a in data.get("annotations", []) or []:  # people annotated by keypoints only: their extent as the box
        if isinstance(a, dict) and a.get("bbox") is None and not a.get("segmentation"):
            box = _keypoint_box(a.get("keypoints"))
            if box is not None:
                a["bbox"] = box
                report.add(ann_path, "no bbox", "box taken from its labelled keypoints", a.get("image_id"), a.get("id"))
    data, problems = coco_annotations.normalize(data, ann_path)
    report.extend(problems)
    images = {}
    for im in data["images"]:
        if "file_name" not in im:
            report.add(ann_path, "image entry without file_name", "skipped", im["id"])
        elif im["id"] in images:
            report.add(ann_path, "duplicate image id", "the later entry dropped", im["id"])
        else:
            images[im["id"]] = im
    anns: dict = {i: [] for i in images}
    for a in data["annotations"]:
        if a["image_id"] not in images:
            report.add(ann_path, f'annotation of image id {a["image_id"]}, which "images" does not list', "dropped",
                       a["image_id"], a["id"])
            continue
        anns[a["image_id"]].append(a)
    for image_id in sorted(images):
        im, objs = images[image_id], anns[image_id]
        if remove_images_without_annotations and not objs:
            continue
        path = os.path.join(img_dir, im["file_name"])
        note = lambda f, what, action, _id=image_id: report.add(f, what, action, _id)  # noqa: E731
        try:
            with open(path, "rb") as f:
                raw = f.read()
            checked = coco_data.decode_check(raw, (im.get("height"), im.get("width")), path, note)
        except OSError as e:
            report.add(path, f"cannot read the image ({e.strerror or e})", "image skipped with its annotations",
                       image_id)
            continue
        if checked is None:
            report.add(path, "cannot decode the image", "image skipped with its annotations", image_id)
            continue
        encoded, h, w = checked
        if (im.get("height"), im.get("width")) not in ((h, w), (None, None)):
            report.add(ann_path, f"json size {im.get('height')}x{im.get('width')} differs from the decoded {h}x{w} "
                       f"of {im['file_name']}", "decoded size used", image_id)
        kps = np.zeros((len(objs), num_joints, 3), np.float32)
        num_kps = np.zeros((len(objs),), np.int32)
        for n, a in enumerate(objs):
            given = a.get("keypoints")
            try:
                k = np.asarray(given if given is not None else [0] * (3 * num_joints), np.float64).reshape(-1)
            except (TypeError, ValueError):
                k = np.zeros((0,), np.float64)
            if k.size != 3 * num_joints or not np.all(np.isfinite(k)):
                report.add(ann_path, f"keypoints must be {3 * num_joints} finite numbers, got {k.size}",
                           "the person kept as unannotated (masked out)", image_id, a["id"])
                k = np.zeros((3 * num_joints,), np.float64)
            k = k.reshape(num_joints, 3)
            bad_flag = ~np.isin(k[:, 2], (0, 1, 2))
            if bad_flag.any():
                report.add(ann_path, f"visibility flags {k[bad_flag, 2].tolist()} of joints "
                           f"{np.nonzero(bad_flag)[0].tolist()} are not 0, 1 or 2", "those joints set to unlabelled",
                           image_id, a["id"])
                k[bad_flag] = 0.0
            lab = k[:, 2] > 0
            outside = lab & ((k[:, 0] < 0) | (k[:, 0] > w) | (k[:, 1] < 0) | (k[:, 1] > h))
            if outside.any():
                js = np.nonzero(outside)[0]
                report.add(ann_path, f"labelled joints {js.tolist()} lie outside the {w}x{h} image (e.g. joint "
                           f"{int(js[0])} at ({k[js[0], 0]:g}, {k[js[0], 1]:g}))", "those joints set to unlabelled",
                           image_id, a["id"])
                k[outside] = 0.0
            kps[n] = k
            counted = int((k[:, 2] > 0).sum())
            num_kps[n] = counted if (bad_flag.any() or outside.any() or "num_keypoints" not in a) else min(
                int(a["num_keypoints"]), counted)
        for n, a in enumerate(objs):  # people left without keypoints are masked like COCO's unannotated ones
            a["num_keypoints"] = int(num_kps[n])
        yield image_id, {
            "image": encoded,
            "ignore": _png(_ignore_mask(objs, h, w)[..., None]), "image_id": int(image_id),
            "image/filename": im["file_name"], "keypoints": kps,
            "bbox": np.asarray([a["bbox"] for a in objs], np.float32).reshape(-1, 4),
            "area": np.asarray([a["area"] for a in objs], np.float32),
            "is_crowd": np.asarray([a["iscrowd"] for a in objs], np.int32),
            "num_keypoints": num_kps,
            "ann_id": np.asarray([a["id"] for a in objs], np.int64)}


# ------------------------------------------------------------------------------------------------ reading


def builder_name(data_cfg) -> tuple[str, dict]:
    """(tfds name, prepare() kwargs) of `config.data`."""
    if data_cfg.name == "synthetic":
        cfg = SyntheticConfig(name=f"s{data_cfg.image_size}_{data_cfg.num_train_examples}_"
                                   f"{data_cfg.num_eval_examples}", image_size=int(data_cfg.image_size),
                              num_train=int(data_cfg.num_train_examples),
                              num_validation=int(data_cfg.num_eval_examples))
        return "higherhrnet_synthetic", {"config": cfg}
    if data_cfg.name in ("coco", "crowdpose"):
        from research.data import detection
        root = data_cfg.manual_dir or ""
        layout = folder_layout(data_cfg)
        digest = detection.annotations_digest(
            [folder_paths(root, s, layout)[0] for s in (data_cfg.train_set, data_cfg.validation_set)])
        # keyed to the annotation files' bytes: an edited json or another folder is prepared anew
        cfg = CocoKeypointsConfig(name=f"j{data_cfg.num_joints}_{digest}", num_joints=int(data_cfg.num_joints),
                                  train_set=data_cfg.train_set, validation_set=data_cfg.validation_set,
                                  layout=layout)
        return "higherhrnet_coco_local", {"config": cfg, "manual_dir": data_cfg.manual_dir or None}
    raise ValueError(f"unknown config.data.name {data_cfg.name!r}: synthetic, coco or crowdpose")


def prepare(data_cfg):
    """The prepared builder of `config.data` (generated / converted on first use under a file lock)."""
    from research.data import pipeline
    name, kwargs = builder_name(data_cfg)
    return pipeline.prepare(name, data_cfg.data_dir, **kwargs)


def decode_record(rec) -> dict:
    """A record as numpy: image uint8 [H, W, 3] RGB, ignore uint8 [H, W], and the annotation arrays."""
    def dec(data, flags):
        if isinstance(data, np.ndarray) and data.ndim == 3:
            return data
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
        if arr is None:
            raise ValueError(f"image {rec.get('image/filename', b'')!r} could not be decoded")
        return arr
    img = dec(rec["image"], cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if img.shape[-1] == 3 and not isinstance(rec["image"], np.ndarray):
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    ignore = dec(rec["ignore"], cv2.IMREAD_GRAYSCALE)
    ignore = ignore.reshape(ignore.shape[:2])
    fn = rec.get("image/filename", b"")
    return {"image": img, "ignore": ignore, "image_id": int(rec["image_id"]),
            "filename": fn.decode() if isinstance(fn, bytes) else str(fn),
            **{k: np.asarray(rec[k]) for k in ("keypoints", "bbox", "area", "is_crowd", "num_keypoints", "ann_id")}}


def open_split(builder, split: str):
    """Random-access records of a split (images left encoded; `decode_record` decodes)."""
    return builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding(),
                                                   "ignore": tfds.decode.SkipDecoding()})


def coco_ground_truth(records, num_joints: int = 17, skeleton=COCO_SKELETON) -> dict:
    """A COCO keypoints ground-truth dict (images, annotations, the person category) from decoded records."""
    images, anns = [], []
    for r in records:
        h, w = r["image"].shape[:2] if "image" in r else r["hw"]
        images.append({"id": int(r["image_id"]), "height": int(h), "width": int(w), "file_name": r.get("filename", "")})
        for n in range(len(r["keypoints"])):
            anns.append({"id": int(r["ann_id"][n]), "image_id": int(r["image_id"]), "category_id": 1,
                         "keypoints": [float(v) for v in r["keypoints"][n].reshape(-1)],
                         "num_keypoints": int(r["num_keypoints"][n]), "area": float(r["area"][n]),
                         "bbox": [float(v) for v in r["bbox"][n]], "iscrowd": int(r["is_crowd"][n])})
    cat = {"id": 1, "name": "person", "supercategory": "person",
           "keypoints": list(COCO_KEYPOINT_NAMES) if num_joints == 17 else [f"j{i}" for i in range(num_joints)],
           "skeleton": [[a + 1, b + 1] for a, b in skeleton]}
    return {"images": images, "annotations": anns, "categories": [cat]}
