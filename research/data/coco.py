"""`coco_detection_local`: tfds builder for a local COCO-format detection folder.

Nothing is downloaded.  The folder is given as tfds ``manual_dir`` (or as
``CocoConfig.root``) and must hold, by default::

  <root>/annotations/instances_train2017.json   -> split 'train'
  <root>/annotations/instances_val2017.json     -> split 'validation'
  <root>/train2017/<file_name>, <root>/val2017/<file_name>

Paths are configurable through `CocoConfig`.  Category ids are mapped to
contiguous labels through ``config.category_ids`` (label ``i`` <->
category id ``category_ids[i]``); the default is the standard 80-class table
`COCO80_TO_91` so ``COCO80_TO_91[label]`` recovers the original id for
evaluation.  Each object also keeps its ``category_id`` and an ``is_crowd``
flag (crowd boxes are stored, flagged, and dropped by the training pipeline).

Robustness: an unreadable/corrupt image is logged (absl warning naming the
file) and skipped; a box with non-positive width/height is logged and dropped;
a box reaching outside the image is logged and clipped (dropped if nothing is
left); annotations of unknown categories are logged and dropped.

EXIF orientation: an image whose EXIF tag rotates or flips it is stored in the frame its
boxes use, with the orientation applied (as ``cv2.imread`` in the official loader shows it),
unless the tag turns it by 90 degrees and the annotation file's width/height are those of the
unrotated pixels: then the boxes are taken in the stored frame.  Either way is logged with the
file name, and the stored image decodes to exactly the frame of its boxes.  A missing
root folder, annotation file or image folder raises ``FileNotFoundError``
naming the path.

Example::

  pipeline.prepare('coco_detection_local', data_dir, manual_dir='/data/coco')
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os

from absl import logging
import cv2
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from research.data import _tfds_compat
from research.data import validation

from research.vision.coco_classes import COCO80_NAMES, COCO80_TO_91  # noqa: E402,F401  (one table)

COCO91_TO_80 = {cid: i for i, cid in enumerate(COCO80_TO_91)}

# boxes exceeding the image by at most this many pixels are clipped silently
# (COCO has many float round-off overshoots); larger overshoots are logged
_CLIP_TOLERANCE_PX = 1.0

__all__ = ['COCO80_TO_91', 'COCO80_NAMES', 'COCO91_TO_80', 'CocoConfig',
           'CocoDetectionLocal', 'label_to_category_id']


def lists_images(ann_path) -> bool:
    """Whether an annotation json lists at least one image (raises a named error if unreadable)."""
    try:
        with open(ann_path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f'{os.fspath(ann_path)}: not a readable COCO annotation json: {e}') from None
    return bool(isinstance(data, dict) and data.get('images'))


@dataclasses.dataclass(eq=False)
class CocoConfig(tfds.core.BuilderConfig):
    """Where the COCO-format files are and how categories map to labels.

    Attributes:
      root: dataset folder; when None the tfds ``manual_dir`` is used.
      train_annotations / validation_annotations: json paths relative to root.
      train_images / validation_images: image folders relative to root.
      splits: which splits to generate.
      category_ids: contiguous label -> category id table.
      class_names: names for the labels (same length as ``category_ids``).
    """
    root: str | None = None
    train_annotations: str = 'annotations/instances_train2017.json'
    validation_annotations: str = 'annotations/instances_val2017.json'
    train_images: str = 'train2017'
    validation_images: str = 'val2017'
    splits: tuple[str, ...] = ('train', 'validation')
    category_ids: tuple[int, ...] = COCO80_TO_91
    class_names: tuple[str, ...] = COCO80_NAMES


def label_to_category_id(labels, category_ids=COCO80_TO_91) -> np.ndarray:
    """Maps contiguous labels back to dataset category ids."""
    return np.asarray(category_ids, np.int64)[np.asarray(labels, np.int64)]


_EXIF_ORIENTATION = 0x0112


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation tag (1..8) of encoded image bytes; 1 when absent or unreadable."""
    import io
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as im:
            o = int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # pylint: disable=broad-except
        return 1
    return o if 1 <= o <= 8 else 1


def apply_orientation(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Pixels as displayed: EXIF orientation 2..8 applied to an [H, W, ...] array (PIL's
    `ImageOps.exif_transpose` convention)."""
    ops = {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: np.swapaxes(a, 0, 1),
        6: lambda a: np.swapaxes(a, 0, 1)[:, ::-1],
        7: lambda a: np.swapaxes(a, 0, 1)[::-1, ::-1],
        8: lambda a: np.swapaxes(a, 0, 1)[::-1],
    }
    return np.ascontiguousarray(ops[int(orientation)](arr))


def _log_note(fname: str, what: str, action: str) -> None:
    logging.warning('coco: %s: %s; %s', fname, what, action)


def _orientation_frame(orientation: int, raw_hw, json_hw, fname: str, note=_log_note) -> bool:
    """Whether the annotations are in the displayed (EXIF-oriented) frame.

    A 90-degree orientation (5..8) swaps height and width, so the annotation file's image size
    tells which frame its boxes use; otherwise (flips, 180 degrees, no size in the file) the
    official loader's choice holds: `cv2.imread` shows the image as oriented.
    """
    h, w = raw_hw
    if orientation >= 5 and json_hw != (None, None):
        if tuple(json_hw) == (h, w) and h != w:
            note(fname, f'EXIF orientation {orientation}, but the annotation file gives the stored size '
                 f'{h}x{w}', 'boxes taken in the stored (unrotated) frame')
            return False
    note(fname, f'EXIF orientation {orientation}', 'applied to the pixels (as the image is shown and '
         'cv2.imread loads it); boxes taken in that frame')
    return True


def decode_check(data: bytes, json_hw=(None, None), fname: str = '', note=_log_note):
    """Decodes image bytes; returns (bytes to store, height, width) or None.

    `note(fname, what, action)` receives what was changed (default: logged).

    The stored bytes decode (ignoring any EXIF orientation, as the loader does) to the pixel frame
    the annotations use: an image whose EXIF orientation applies is stored re-encoded (PNG,
    lossless) with the orientation applied.
    """
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)  # stored frame
    if arr is None and data[:3] == b'\xff\xd8\xff' and data[-2:] != b'\xff\xd9':
        # a JPEG cut before its end marker: the official loader restores such files (utils/
        # dataloaders.py verify_image_label) and trains on them; with the marker back, libjpeg
        # decodes what is there
        arr = cv2.imdecode(np.frombuffer(data + b'\xff\xd9', np.uint8), cv2.IMREAD_UNCHANGED)
        if arr is not None:
            note(fname, 'JPEG without its end marker', 'restored and kept')
            data = data + b'\xff\xd9'
    if arr is None or arr.ndim not in (2, 3) or arr.size == 0:
        return None
    is_jpeg = data[:3] == b'\xff\xd8\xff'
    is_png = data[:8] == b'\x89PNG\r\n\x1a\n'
    orientation = exif_orientation(data)
    oriented = orientation != 1 and _orientation_frame(orientation, arr.shape[:2], json_hw, fname, note)
    if oriented:
        arr = apply_orientation(arr, orientation)
    if not oriented and arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype == np.uint8 and (
        is_jpeg or is_png):
        return data, arr.shape[0], arr.shape[1]
    # normalise anything else (grey, alpha, 16 bit, other formats, re-oriented) to RGB PNG
    if arr.dtype != np.uint8:
        arr = cv2.convertScaleAbs(arr, alpha=255.0 / max(float(arr.max()), 1.0))
    if arr.ndim == 2 or arr.shape[2] == 1:
        arr = cv2.cvtColor(arr, cv2.COLOR_GRAY2BGR)
    elif arr.shape[2] == 4:
        arr = cv2.cvtColor(arr, cv2.COLOR_BGRA2BGR)
    ok, buf = cv2.imencode('.png', arr)
    if not ok:
        return None
    return buf.tobytes(), arr.shape[0], arr.shape[1]


class CocoDetectionLocal(_tfds_compat.SourceFileCodePath,
                         tfds.core.GeneratorBasedBuilder):
    """COCO-format detection data read from a local folder."""

    VERSION = tfds.core.Version('1.1.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release.',
                     '1.1.0': 'EXIF orientation: images stored in the frame of their boxes.'}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        'Put a COCO-format folder (annotations/instances_{train,val}2017.json, '
        'train2017/, val2017/) in manual_dir, or set CocoConfig.root.')
    BUILDER_CONFIGS = [CocoConfig(name='default', description='COCO 2017 layout')]
    DEFAULT_CONFIG_NAME = 'default'

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        if len(cfg.class_names) != len(cfg.category_ids):
            raise ValueError('class_names and category_ids differ in length')
        return self.dataset_info_from_configs(
            description='Local COCO-format object detection data.',
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(None, None, 3)),
                'image/filename': tfds.features.Text(),
                'image_id': np.int64,
                'objects': tfds.features.Sequence({
                    'bbox': tfds.features.BBoxFeature(),
                    'label': tfds.features.ClassLabel(names=cfg.class_names),
                    'category_id': np.int64,
                    'is_crowd': np.bool_,
                }),
            }),
            supervised_keys=None,
            # label i <-> category id category_ids[i]; kept in metadata.json
            metadata=tfds.core.MetadataDict(
                category_ids=[int(c) for c in cfg.category_ids]),
        )

    def _root(self, dl_manager) -> epath.Path:
        cfg = self.builder_config
        if cfg.root is not None:
            root = epath.Path(cfg.root)
        else:
            root = getattr(dl_manager, '_manual_dir', None)
            if root is None:
                raise FileNotFoundError('No COCO folder: pass manual_dir or '
                                        'CocoConfig(root=...)')
            root = epath.Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f'COCO folder not found: {os.fspath(root)}')
        return root

    @property
    def validation(self) -> validation.Collector:
        """The problems found while preparing (written next to the data by `pipeline.prepare`)."""
        if '_validation' not in self.__dict__:
            self._validation = validation.Collector()
        return self._validation

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        root = self._root(dl_manager)
        paths = {}
        for split in cfg.splits:  # every file and folder first, so a missing one is named before anything
            if split not in ('train', 'validation'):
                raise ValueError(f'unknown split {split!r}')
            ann = root / getattr(cfg, f'{split}_annotations')
            img_dir = root / getattr(cfg, f'{split}_images')
            if not ann.is_file():
                raise FileNotFoundError(
                    f'COCO annotations file not found: {os.fspath(ann)}')
            if not img_dir.is_dir():
                raise FileNotFoundError(
                    f'COCO images folder not found: {os.fspath(img_dir)}')
            paths[split] = (ann, img_dir)
        out = {}
        for split, (ann, img_dir) in paths.items():
            if not lists_images(ann):
                # tfds cannot finalize a split without examples; an empty validation
                # split is left out (training without evaluation still works), an
                # empty training split is an error naming the file
                if split == 'train':
                    raise ValueError(f'{os.fspath(ann)}: "images" is empty: nothing to train on')
                self.validation.add(ann, '"images" is empty', f'no {split!r} split (evaluation on it will '
                                    'say so)')
                continue
            out[split] = self._generate_examples(ann, img_dir)
        return out

    def _generate_examples(self, ann_path: epath.Path, img_dir: epath.Path):
        cfg = self.builder_config
        cat_to_label = {int(c): i for i, c in enumerate(cfg.category_ids)}
        with ann_path.open('r') as f:
            data = json.load(f)
        # the same normalisation the evaluator reads the file with (string ids, boxes from polygons)
        from research.data import coco_annotations  # pylint: disable=g-import-not-at-top
        data, problems = coco_annotations.normalize(data, os.fspath(ann_path))
        report = self.validation
        report.extend(problems)
        by_image = collections.defaultdict(list)
        for a in data.get('annotations', []):
            by_image[int(a['image_id'])].append(a)  # normalize() kept only integer image ids
        images = []
        for info in data.get('images', []):
            if 'file_name' not in info:
                report.add(ann_path, 'image entry without file_name', 'skipped', info.get('id'))
                continue
            images.append((int(info['id']), str(info['file_name']), info))
        known_ids = {image_id for image_id, _, _ in images}
        for image_id in sorted(set(by_image) - known_ids):
            for a in by_image[image_id]:
                report.add(ann_path, f'annotation of image id {image_id}, which "images" does not list', 'dropped',
                           image_id, a.get('id'))
        unknown_cats: dict[int, list] = collections.defaultdict(list)
        for image_id, fname, info in sorted(images, key=lambda x: x[0]):
            path = img_dir / fname
            note = lambda f, what, action, _id=image_id: report.add(f, what, action, _id)  # noqa: E731
            try:
                checked = decode_check(path.read_bytes(), (info.get('height'), info.get('width')),
                                        os.fspath(path), note)
            except Exception as e:  # pylint: disable=broad-except
                report.add(path, f'cannot read the image ({e})', 'image skipped with its annotations', image_id)
                continue
            if checked is None:
                report.add(path, 'cannot decode the image', 'image skipped with its annotations', image_id)
                continue
            encoded, h, w = checked
            if (info.get('height'), info.get('width')) not in ((h, w), (None, None)):
                report.add(ann_path, f'json size {info.get("height")}x{info.get("width")} differs from the '
                           f'decoded {h}x{w} of {fname}', 'decoded size used', image_id)
            bboxes, labels, cats, crowd = [], [], [], []
            for a in by_image.get(image_id, []):
                cid = int(a['category_id'])  # normalize() kept only integer category ids
                if cid not in cat_to_label:
                    unknown_cats[cid].append((image_id, a.get('id')))
                    continue
                box = self._check_box(a.get('bbox'), w, h, ann_path, image_id, a.get('id'), report)
                if box is None:
                    continue
                x1, y1, x2, y2 = box
                bboxes.append([y1 / h, x1 / w, y2 / h, x2 / w])
                labels.append(cat_to_label[cid])
                cats.append(cid)
                crowd.append(bool(a.get('iscrowd', 0)))
            yield image_id, {
                'image': encoded,
                'image/filename': fname,
                'image_id': image_id,
                'objects': {
                    'bbox': np.asarray(bboxes, np.float32).reshape(-1, 4),
                    'label': np.asarray(labels, np.int64),
                    'category_id': np.asarray(cats, np.int64),
                    'is_crowd': np.asarray(crowd, np.bool_),
                },
            }
        for cid, where in sorted(unknown_cats.items()):  # one entry per category, not per box
            report.add(ann_path, f'category id {cid} is not among the dataset\'s categories '
                       f'({len(where)} annotations, e.g. annotation {where[0][1]} of image {where[0][0]})',
                       'its boxes dropped')

    @staticmethod
    def _check_box(bbox, w: int, h: int, ann_path, image_id, ann_id, report: validation.Collector):
        """Validated, clipped pixel box (x1, y1, x2, y2), or None; problems go to `report`."""
        x, y, bw, bh = (float(v) for v in bbox)  # normalize() kept only 4-number boxes
        if not all(np.isfinite([x, y, bw, bh])) or bw <= 0 or bh <= 0:
            report.add(ann_path, f'bbox {bbox!r} has no positive size', 'dropped', image_id, ann_id)
            return None
        x1, y1, x2, y2 = x, y, x + bw, y + bh
        cx1, cy1 = min(max(x1, 0.0), w), min(max(y1, 0.0), h)
        cx2, cy2 = min(max(x2, 0.0), w), min(max(y2, 0.0), h)
        if cx2 - cx1 <= 0 or cy2 - cy1 <= 0:
            report.add(ann_path, f'bbox {bbox!r} lies outside the {w}x{h} image', 'dropped', image_id, ann_id)
            return None
        overshoot = max(cx1 - x1, cy1 - y1, x2 - cx2, y2 - cy2)
        if overshoot > _CLIP_TOLERANCE_PX:
            report.add(ann_path, f'bbox {bbox!r} extends outside the {w}x{h} image', 'clipped to the image',
                       image_id, ann_id)
        return cx1, cy1, cx2, cy2
