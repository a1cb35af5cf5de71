"""Helpers shared by the data tests (tests/test_data.py, tests/yolov5/test_yolov5_data.py)."""

import json
import os

import cv2
import numpy as np
import pytest
import tensorflow_datasets as tfds

from research.data import _tfds_compat
from research.data import pipeline
from research.data import shapes


TINY = dict(image_size=64, num_train=48, num_validation=20, seed=1)


def _tiny_config(name='t64'):
    return shapes.ShapesConfig(name=name, **TINY)


@pytest.fixture(scope='module')
def shapes_builder(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp('tfds')
    return pipeline.prepare('shapes_detection', str(data_dir),
                            config=_tiny_config())


def _records(builder, split):
    ds = builder.as_data_source(split)
    return {int(r['image_id']): r for r in (ds[i] for i in range(len(ds)))}


def _xyxy_px(bbox_norm, h, w):
    b = np.asarray(bbox_norm, np.float64).reshape(-1, 4)
    return np.stack([b[:, 1] * w, b[:, 0] * h, b[:, 3] * w, b[:, 2] * h], 1)


def _write_coco(root):
    """Small COCO folder; returns expected train examples by image id."""
    os.makedirs(root / 'annotations')
    os.makedirs(root / 'train2017')
    os.makedirs(root / 'val2017')
    a = np.full((60, 80, 3), 40, np.uint8)
    a[10:30, 20:50] = (230, 30, 30)
    cv2.imwrite(str(root / 'train2017' / 'a.jpg'), a[..., ::-1],
                [cv2.IMWRITE_JPEG_QUALITY, 95])
    b = np.full((40, 50), 90, np.uint8)  # grayscale PNG
    cv2.imwrite(str(root / 'train2017' / 'b.png'), b)
    (root / 'train2017' / 'bad.jpg').write_bytes(b'\xff\xd8\xff not a jpeg')
    cv2.imwrite(str(root / 'val2017' / 'c.png'), np.zeros((32, 48, 3), np.uint8))
    train = {
        'images': [
            {'id': 1, 'file_name': 'a.jpg', 'height': 60, 'width': 80},
            {'id': 2, 'file_name': 'b.png', 'height': 40, 'width': 50},
            {'id': 3, 'file_name': 'bad.jpg', 'height': 10, 'width': 10},
            {'id': 4, 'file_name': 'missing.jpg', 'height': 10, 'width': 10},
        ],
        'annotations': [
            {'id': 10, 'image_id': 1, 'category_id': 18,
             'bbox': [20, 10, 30, 20], 'iscrowd': 0},
            {'id': 11, 'image_id': 1, 'category_id': 1,
             'bbox': [0, 0, 10, 10], 'iscrowd': 1},
            {'id': 20, 'image_id': 2, 'category_id': 3,
             'bbox': [5, 5, 0, 10], 'iscrowd': 0},  # zero width
            {'id': 21, 'image_id': 2, 'category_id': 3,
             'bbox': [30, 20, 40, 40], 'iscrowd': 0},  # partly outside
            {'id': 22, 'image_id': 2, 'category_id': 3,
             'bbox': [100, 100, 5, 5], 'iscrowd': 0},  # fully outside
            {'id': 23, 'image_id': 2, 'category_id': 90,
             'bbox': [1, 2, 10, 10], 'iscrowd': 0},
            {'id': 24, 'image_id': 2, 'category_id': 12,
             'bbox': [1, 2, 10, 10], 'iscrowd': 0},  # not a COCO-80 id
            {'id': 25, 'image_id': 2, 'category_id': 3},  # no bbox
            {'id': 26, 'category_id': 3, 'bbox': [1, 1, 2, 2]},  # no image
        ],
        'categories': [{'id': 1, 'name': 'person'}],
    }
    val = {'images': [{'id': 7, 'file_name': 'c.png', 'height': 32,
                       'width': 48}], 'annotations': []}
    (root / 'annotations' / 'instances_train2017.json').write_text(
        json.dumps(train))
    (root / 'annotations' / 'instances_val2017.json').write_text(json.dumps(val))


RED = (250, 20, 20)


def _rect_image(h, w, box, color=RED, bg=30):
    img = np.full((h, w, 3), bg, np.uint8)
    x1, y1, x2, y2 = box
    img[y1:y2, x1:x2] = color
    return img


def _pixel_box(img, channel=0, thr=140):
    ys, xs = np.nonzero(img[..., channel] > thr)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float)


PALETTE = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0),
                    (255, 0, 255), (0, 255, 255), (255, 255, 255),
                    (255, 128, 0)], np.uint8)


def _palette_item(i, size=64):
    rng = np.random.default_rng(100 + i)
    h, w = (size, size - 16) if i % 2 else (size - 20, size)
    x1, y1 = rng.integers(0, w // 2), rng.integers(0, h // 2)
    x2, y2 = x1 + rng.integers(12, w // 2), y1 + rng.integers(12, h // 2)
    img = np.zeros((h, w, 3), np.uint8)
    img[y1:y2, x1:x2] = PALETTE[i]
    return img, np.array([[i, x1, y1, x2, y2]], np.float32)


def _colour_box(img, color):
    close = np.abs(img.astype(int) - color.astype(int)).sum(-1) < 200
    ys, xs = np.nonzero(close)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float)


def _check_batch(batch, b, s, m, train):
    keys = {'image', 'boxes', 'classes', 'valid', 'image_id'}
    if not train:
        keys |= {'orig_hw', 'ratio', 'pad'}
    assert set(batch) == keys
    assert batch['image'].shape == (b, s, s, 3) and batch['image'].dtype == np.uint8
    assert batch['boxes'].shape == (b, m, 4) and batch['boxes'].dtype == np.float32
    assert batch['classes'].shape == (b, m) and batch['classes'].dtype == np.int32
    assert batch['valid'].shape == (b, m) and batch['valid'].dtype == bool
    assert batch['image_id'].shape == (b,) and batch['image_id'].dtype == np.int64
    if not train:
        assert batch['orig_hw'].dtype == np.int32 and batch['orig_hw'].shape == (b, 2)
        assert batch['ratio'].dtype == np.float32 and batch['ratio'].shape == (b,)
        assert batch['pad'].dtype == np.float32 and batch['pad'].shape == (b, 2)
    v = batch['valid']
    boxes = batch['boxes']
    assert (boxes[v] >= 0).all() and (boxes[v] <= 1).all()
    assert (boxes[v][:, 2:] > 0).all()
    assert (boxes[~v] == 0).all() and (batch['classes'][~v] == 0).all()
    assert (batch['classes'][v] < len(shapes.CLASS_NAMES)).all()


class BrokenImagesForTest(_tfds_compat.SourceFileCodePath,
                          tfds.core.GeneratorBasedBuilder,
                          skip_registration=True):
    """6 images of 32x32; record 2 holds undecodable image bytes."""
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(None, None, 3)),
                'image_id': np.int64,
                'objects': tfds.features.Sequence({
                    'bbox': tfds.features.BBoxFeature(),
                    'label': tfds.features.ClassLabel(num_classes=2)}),
            }))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {'train': self._generate_examples()}

    def _generate_examples(self):
        for i in range(6):
            img = shapes.encode_png(np.full((32, 32, 3), 10 * i, np.uint8))
            yield i, {'image': b'corrupt!' if i == 2 else img, 'image_id': 100 + i,
                      'objects': {'bbox': np.array([[0.1, 0.1, 0.5, 0.5]],
                                                   np.float32),
                                  'label': np.array([1])}}


def _jpeg_with_orientation(raw_bgr, orientation):
    import io
    from PIL import Image
    im = Image.fromarray(cv2.cvtColor(raw_bgr, cv2.COLOR_BGR2RGB))
    exif = im.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, 'JPEG', quality=95, exif=exif.tobytes())
    return buf.getvalue()
