"""Tests of research/data: tfds builders, YOLOv5 transforms, grain pipeline."""

import itertools
import json
import logging as py_logging
import os

import cv2
import numpy as np
import pytest
import tensorflow_datasets as tfds

from research.data import _tfds_compat
from research.data import coco
from research.data import pipeline
from research.data import shapes
from research.data import transforms as T

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


# --------------------------------------------------------------------- shapes


def test_shapes_generation_is_deterministic(tmp_path, shapes_builder):
    again = pipeline.prepare('shapes_detection', str(tmp_path),
                             config=_tiny_config())
    for split in ('train', 'validation'):
        name = f'shapes_detection-{split}.array_record-00000-of-00001'
        a = (shapes_builder.data_path / name).read_bytes()
        b = (again.data_path / name).read_bytes()
        assert a == b
    r1 = shapes.render_example(_tiny_config(), 'train', 7)
    r2 = shapes.render_example(_tiny_config(), 'train', 7)
    assert np.array_equal(r1['image'], r2['image'])
    assert np.array_equal(r1['boxes'], r2['boxes'])
    other = shapes.render_example(_tiny_config(), 'validation', 7)
    assert not np.array_equal(r1['image'], other['image'])


def test_shapes_boxes_tightly_enclose_shape_pixels(shapes_builder):
    cfg = _tiny_config()
    s = cfg.image_size
    assert shapes_builder.info.splits['train'].num_examples == TINY['num_train']
    assert shapes_builder.info.splits['validation'].num_examples == 20
    seen_labels, counts, kinds = set(), [], set()
    for split in ('train', 'validation'):
        recs = _records(shapes_builder, split)
        assert sorted(recs) == list(range(TINY[f'num_{split}']))
        for i, rec in recs.items():
            ref = shapes.render_example(cfg, split, i)
            kinds.add(ref['background'])
            img = rec['image']
            assert img.shape == (s, s, 3) and img.dtype == np.uint8
            assert np.array_equal(img, ref['image'])  # PNG round trip is lossless
            boxes = _xyxy_px(rec['objects']['bbox'], s, s)
            labels = np.asarray(rec['objects']['label'])
            assert 1 <= len(labels) <= 6
            counts.append(len(labels))
            np.testing.assert_array_equal(labels, ref['labels'])
            for k, (box, color) in enumerate(zip(boxes, ref['colors'])):
                x1, y1, x2, y2 = np.round(box).astype(int)
                np.testing.assert_allclose(box, [x1, y1, x2, y2], atol=1e-4)
                owned = ref['instance_map'] == k
                ys, xs = np.nonzero(owned)
                # every pixel of the object has its colour and lies inside the box ...
                assert (img[owned] == color).all()
                assert xs.min() >= x1 and xs.max() < x2
                assert ys.min() >= y1 and ys.max() < y2
                # ... and the box is tight: each edge row / column touches the object
                assert xs.min() == x1 and xs.max() == x2 - 1
                assert ys.min() == y1 and ys.max() == y2 - 1
                # size roughly within 8..60 % of the side (visible part may shrink)
                assert max(x2 - x1, y2 - y1) <= 0.62 * s
                seen_labels.add(int(labels[k]))
    assert seen_labels == set(range(len(shapes.CLASS_NAMES)))
    assert len(set(counts)) >= 4
    assert kinds == set(shapes.BACKGROUNDS)


# ----------------------------------------------------------------------- coco


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


def test_coco_builder_examples_and_warnings(tmp_path, caplog):
    root = tmp_path / 'coco'
    _write_coco(root)
    with caplog.at_level(py_logging.WARNING):
        builder = pipeline.prepare('coco_detection_local', str(tmp_path / 'tfds'),
                                   manual_dir=str(root))
    recs = _records(builder, 'train')
    assert sorted(recs) == [1, 2]
    assert sorted(_records(builder, 'validation')) == [7]

    a = recs[1]
    assert a['image'].shape == (60, 80, 3)
    assert a['image/filename'] in (b'a.jpg', 'a.jpg')
    assert np.abs(a['image'][20, 35].astype(int) - [230, 30, 30]).max() < 20
    np.testing.assert_allclose(_xyxy_px(a['objects']['bbox'], 60, 80),
                               [[20, 10, 50, 30], [0, 0, 10, 10]], atol=1e-4)
    np.testing.assert_array_equal(a['objects']['label'],
                                  [coco.COCO91_TO_80[18], 0])
    assert coco.COCO80_TO_91[int(a['objects']['label'][0])] == 18
    np.testing.assert_array_equal(a['objects']['category_id'], [18, 1])
    np.testing.assert_array_equal(a['objects']['is_crowd'], [False, True])

    b = recs[2]
    assert b['image'].shape == (40, 50, 3)  # grey converted to RGB
    np.testing.assert_allclose(_xyxy_px(b['objects']['bbox'], 40, 50),
                               [[30, 20, 50, 40], [1, 2, 11, 12]], atol=1e-4)
    np.testing.assert_array_equal(b['objects']['label'], [2, 79])
    assert pipeline.label_to_category_id(builder) == list(coco.COCO80_TO_91)
    np.testing.assert_array_equal(coco.label_to_category_id([2, 79]), [3, 90])

    msgs = [r.getMessage() for r in caplog.records
            if r.levelno >= py_logging.WARNING]
    def has(*parts):
        return any(all(p in m for p in parts) for m in msgs)
    assert has('bad.jpg', 'skipping')
    assert has('missing.jpg', 'skipping')
    assert has('b.png', 'non-positive')
    assert has('b.png', 'clipped')
    assert has('b.png', 'outside', 'dropped')
    assert has('b.png', 'unknown category id 12')
    assert has('b.png', 'annotation 25', 'malformed')
    assert has('instances_train2017.json', 'without a valid image_id')
    assert not has('a.jpg')


def test_coco_loader_drops_crowd_and_maps_back(tmp_path):
    root = tmp_path / 'coco'
    _write_coco(root)
    builder = pipeline.prepare('coco_detection_local', str(tmp_path / 'tfds'),
                               manual_dir=str(root))
    loader = pipeline.make_detection_loader(
        builder, 'train', image_size=64, batch_size=2, train=False,
        process_index=0, process_count=1, num_epochs=1, max_labels=4)
    (batch,) = list(loader)
    order = list(batch['image_id'])
    k = order.index(1)
    assert batch['valid'][k].sum() == 1  # crowd box removed from targets
    np.testing.assert_array_equal(batch['orig_hw'][k], [60, 80])
    cx, cy, w, h = batch['boxes'][k, 0] * 64
    net = np.array([[cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]])
    back = pipeline.boxes_to_original(net, batch['ratio'][k], batch['pad'][k],
                                      batch['orig_hw'][k])
    np.testing.assert_allclose(back[0], [20, 10, 50, 30], atol=0.1)


def test_coco_custom_layout_via_config(tmp_path):
    root = tmp_path / 'custom'
    os.makedirs(root / 'imgs')
    img = np.zeros((20, 30, 3), np.uint8)
    cv2.imwrite(str(root / 'imgs' / 'x.png'), img)
    (root / 'train.json').write_text(json.dumps({
        'images': [{'id': 5, 'file_name': 'x.png'}],
        'annotations': [{'id': 1, 'image_id': 5, 'category_id': 7,
                         'bbox': [3, 4, 5, 6]}]}))
    cfg = coco.CocoConfig(name='custom', root=str(root),
                          train_annotations='train.json', train_images='imgs',
                          splits=('train',), category_ids=(7, 9),
                          class_names=('a', 'b'))
    builder = pipeline.prepare('coco_detection_local', str(tmp_path / 'tfds'),
                               config=cfg)
    (rec,) = _records(builder, 'train').values()
    assert list(rec['objects']['label']) == [0]
    assert pipeline.label_to_category_id(builder.data_dir) == [7, 9]


def test_coco_missing_paths_raise_file_not_found(tmp_path):
    missing = tmp_path / 'no_such_coco'
    with pytest.raises(FileNotFoundError, match='no_such_coco'):
        pipeline.prepare('coco_detection_local', str(tmp_path / 'd1'),
                         manual_dir=str(missing))
    root = tmp_path / 'partial'
    os.makedirs(root / 'train2017')
    (root / 'readme.txt').write_text('x')
    with pytest.raises(FileNotFoundError, match='instances_train2017.json'):
        pipeline.prepare('coco_detection_local', str(tmp_path / 'd2'),
                         manual_dir=str(root))
    os.makedirs(root / 'annotations')
    (root / 'annotations' / 'instances_train2017.json').write_text('{}')
    (root / 'annotations' / 'instances_val2017.json').write_text('{}')
    with pytest.raises(FileNotFoundError, match='val2017'):
        pipeline.prepare('coco_detection_local', str(tmp_path / 'd3'),
                         manual_dir=str(root))


# ----------------------------------------------------------------- transforms

RED = (250, 20, 20)


def _rect_image(h, w, box, color=RED, bg=30):
    img = np.full((h, w, 3), bg, np.uint8)
    x1, y1, x2, y2 = box
    img[y1:y2, x1:x2] = color
    return img


def _pixel_box(img, channel=0, thr=140):
    ys, xs = np.nonzero(img[..., channel] > thr)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float)


def test_letterbox_keeps_labels_on_the_object():
    img = _rect_image(60, 100, (10, 20, 40, 50))
    labels = np.array([[3, 10, 20, 40, 50]], np.float32)
    out, ratio, (dw, dh) = T.letterbox(img, 64, auto=False)
    assert out.shape == (64, 64, 3)
    assert ratio == (0.64, 0.64)
    assert (dw, dh) == (0.0, 13.0)  # 60 * 0.64 = 38.4 -> 38 rows, 26 padded
    assert (out[:13] == 114).all() and (out[-13:] == 114).all()
    new = T.letterbox_labels(labels, ratio, (dw, dh))
    np.testing.assert_allclose(new[0, 1:], _pixel_box(out), atol=1.0)
    assert new[0, 0] == 3
    # scaleup=False never enlarges a small image
    small, r2, pad2 = T.letterbox(img[:30, :40], 64, scaleup=False)
    assert r2 == (1.0, 1.0) and pad2 == (12.0, 17.0)
    assert np.array_equal(small[17:47, 12:52], img[:30, :40])


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_random_perspective_box_tight_without_rotation(seed):
    img = _rect_image(64, 64, (12, 20, 40, 44))
    labels = np.array([[1, 12, 20, 40, 44]], np.float32)
    rng = np.random.default_rng(seed)
    out, new = T.random_perspective(img, labels, rng, degrees=0, translate=0.1,
                                    scale=0.4, shear=0, perspective=0)
    assert out.shape == (64, 64, 3)
    assert len(new) == 1 and new[0, 0] == 1
    np.testing.assert_allclose(new[0, 1:], _pixel_box(out), atol=1.5)


def test_random_perspective_rotated_box_encloses_object():
    img = _rect_image(96, 96, (30, 35, 66, 60))
    labels = np.array([[0, 30, 35, 66, 60]], np.float32)
    for seed in range(4):
        out, new = T.random_perspective(img, labels, np.random.default_rng(seed),
                                        degrees=30, translate=0.05, scale=0.2,
                                        shear=5, perspective=0.0005)
        assert len(new) == 1
        x1, y1, x2, y2 = _pixel_box(out)
        bx1, by1, bx2, by2 = new[0, 1:]
        assert bx1 <= x1 + 1 and by1 <= y1 + 1 and bx2 >= x2 - 1 and by2 >= y2 - 1
        assert 0 <= bx1 < bx2 <= 96 and 0 <= by1 < by2 <= 96


def test_random_perspective_is_seeded_and_uses_no_global_rng():
    img = _rect_image(64, 64, (10, 10, 30, 30))
    labels = np.array([[0, 10, 10, 30, 30]], np.float32)
    np.random.seed(0)
    state = np.random.get_state()[1].copy()
    kw = dict(degrees=10, translate=0.1, scale=0.5, shear=2)
    a = T.random_perspective(img, labels, np.random.default_rng(5), **kw)
    b = T.random_perspective(img, labels, np.random.default_rng(5), **kw)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert np.array_equal(np.random.get_state()[1], state)


def test_box_candidates_thresholds():
    before = np.array([[0, 0, 10, 10], [0, 0, 100, 100], [0, 0, 10, 10],
                       [0, 0, 400, 400], [0, 0, 10, 10]], float).T
    after = np.array([[0, 0, 10, 10], [0, 0, 3, 3], [0, 0, 1.9, 10],
                      [0, 0, 300, 2.5], [0, 0, 6, 6]], float).T
    np.testing.assert_array_equal(T.box_candidates(before, after),
                                  [True, False, False, False, True])


def test_flips():
    img = _rect_image(40, 60, (5, 8, 20, 30))
    labels = np.array([[2, 5, 8, 20, 30]], np.float32)
    f_img, f_lab = T.hflip(img, labels)
    np.testing.assert_allclose(f_lab[0, 1:], [40, 8, 55, 30])
    np.testing.assert_allclose(f_lab[0, 1:], _pixel_box(f_img))
    back_img, back_lab = T.hflip(f_img, f_lab)
    assert np.array_equal(back_img, img) and np.array_equal(back_lab, labels)
    v_img, v_lab = T.vflip(img, labels)
    np.testing.assert_allclose(v_lab[0, 1:], _pixel_box(v_img))
    vv_img, vv_lab = T.vflip(v_img, v_lab)
    assert np.array_equal(vv_img, img) and np.array_equal(vv_lab, labels)


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


def test_mosaic4_places_tiles_and_labels():
    s = 64
    samples = [_palette_item(i) for i in range(4)]
    canvas, labels = T.mosaic4(samples, s, center=(70, 80))  # (yc, xc)
    assert canvas.shape == (128, 128, 3)
    assert labels.shape == (4, 5)
    for lab in labels:
        box = _colour_box(canvas, PALETTE[int(lab[0])])
        np.testing.assert_allclose(lab[1:], box)
    # tile 0 (44x64) ends at the centre, tile 1 (64x48) starts right of it
    assert np.array_equal(canvas[26:70, 16:80], samples[0][0])
    assert np.array_equal(canvas[6:70, 80:128], samples[1][0])
    assert (canvas[:6] == 114).all() and (canvas[6:26, :80] == 114).all()
    # cropped at the canvas edge: tile 2 (44x64) keeps its right 64 - 0 columns
    assert np.array_equal(canvas[70:114, 16:80], samples[2][0])


def test_load_mosaic_labels_follow_objects():
    s = 64
    hyp = dict(degrees=0.0, translate=0.1, scale=0.3, shear=0.0,
               perspective=0.0)
    checked = 0
    for seed in range(6):
        img, labels = T.load_mosaic(_palette_item, seed % 8, 8, s,
                                    np.random.default_rng(seed), hyp)
        assert img.shape == (s, s, 3) and img.dtype == np.uint8
        assert ((labels[:, 1:] >= 0) & (labels[:, 1:] <= s)).all()
        cls, counts = np.unique(labels[:, 0].astype(int), return_counts=True)
        for c in cls[counts == 1]:
            lab = labels[labels[:, 0] == c][0]
            np.testing.assert_allclose(lab[1:], _colour_box(img, PALETTE[c]),
                                       atol=1.5)
            checked += 1
    assert checked >= 6


def test_augment_hsv_value_gain_matches_lut_and_is_seeded():
    img = np.full((8, 8, 3), 100, np.uint8)  # grey: hue 0, sat 0
    out = T.augment_hsv(img.copy(), np.random.default_rng(3), 0.0, 0.0, 0.5)
    r = np.random.default_rng(3).uniform(-1, 1, 3) * [0, 0, 0.5] + 1
    expected = np.clip(np.arange(256) * r[2], 0, 255).astype(np.uint8)[100]
    assert (out == expected).all()
    colour = _rect_image(16, 16, (2, 2, 10, 10), color=(200, 60, 30))
    a = T.augment_hsv(colour.copy(), np.random.default_rng(9), 0.015, 0.7, 0.4)
    b = T.augment_hsv(colour.copy(), np.random.default_rng(9), 0.015, 0.7, 0.4)
    assert np.array_equal(a, b) and not np.array_equal(a, colour)
    same = T.augment_hsv(colour.copy(), np.random.default_rng(9), 0, 0, 0)
    assert np.array_equal(same, colour)


def test_xyxy_to_cxcywhn_clips_like_reference():
    out = T.xyxy_to_cxcywhn([[10, 20, 30, 60], [-5, 0, 200, 10]], 100, 80)
    np.testing.assert_allclose(out[0], [0.2, 0.5, 0.2, 0.5])
    np.testing.assert_allclose(out[1], [(100 - 1e-3) / 200, 5 / 80,
                                        (100 - 1e-3) / 100, 10 / 80], rtol=1e-6)


# ------------------------------------------------------------------- pipeline


def _loader(builder, split='train', **kw):
    args = dict(image_size=64, batch_size=8, train=True, process_index=0,
                process_count=1, seed=0, max_labels=12)
    args.update(kw)
    return pipeline.make_detection_loader(builder, split, **args)


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


def test_train_loader_shapes_and_determinism(shapes_builder):
    it = iter(_loader(shapes_builder, hyp={'mosaic': 0.5, 'degrees': 5}))
    first = next(it)
    _check_batch(first, 8, 64, 12, train=True)
    assert first['valid'].any()
    again = next(iter(_loader(shapes_builder, hyp={'mosaic': 0.5,
                                                   'degrees': 5})))
    for k in first:
        assert np.array_equal(first[k], again[k]), k
    other = next(iter(_loader(shapes_builder, seed=1)))
    assert not np.array_equal(first['image'], other['image'])


def test_eval_loader_pads_and_maps_back_to_original(shapes_builder):
    loader = _loader(shapes_builder, 'validation', train=False, image_size=96,
                     num_epochs=1)
    batches = list(loader)
    assert len(batches) == 3  # 20 examples -> 24 with padding
    for b in batches:
        _check_batch(b, 8, 96, 12, train=False)
    ids = np.concatenate([b['image_id'] for b in batches])
    assert sorted(ids[ids >= 0]) == list(range(20)) and (ids < 0).sum() == 4
    recs = _records(shapes_builder, 'validation')
    for b in batches:
        for k, image_id in enumerate(b['image_id']):
            if image_id < 0:
                assert not b['valid'][k].any()
                continue
            np.testing.assert_array_equal(b['orig_hw'][k], [64, 64])
            assert b['ratio'][k] == pytest.approx(1.5)
            cx, cy, w, h = (b['boxes'][k][b['valid'][k]] * 96).T
            net = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
            back = pipeline.boxes_to_original(net, b['ratio'][k], b['pad'][k],
                                              b['orig_hw'][k])
            expected = _xyxy_px(recs[int(image_id)]['objects']['bbox'], 64, 64)
            np.testing.assert_allclose(back, expected, atol=0.01)
            np.testing.assert_array_equal(b['classes'][k][b['valid'][k]],
                                          recs[int(image_id)]['objects']['label'])


@pytest.mark.parametrize('train', [True, False])
def test_two_processes_get_disjoint_halves(shapes_builder, train):
    kw = dict(batch_size=8, process_count=2, train=train, num_epochs=1,
              drop_remainder=True)
    split = 'train' if train else 'validation'
    per_proc = []
    for p in range(2):
        per_proc.append(list(_loader(shapes_builder, split, process_index=p,
                                     **kw)))
    n = TINY[f'num_{split}']
    assert len(per_proc[0]) == len(per_proc[1]) == n // 8
    all_ids = []
    for b0, b1 in zip(*per_proc):
        assert b0['image'].shape[0] == b1['image'].shape[0] == 4
        assert not set(b0['image_id']) & set(b1['image_id'])
        all_ids += list(b0['image_id']) + list(b1['image_id'])
    assert len(set(all_ids)) == len(all_ids)
    ids0 = {int(i) for b in per_proc[0] for i in b['image_id']}
    ids1 = {int(i) for b in per_proc[1] for i in b['image_id']}
    assert not ids0 & ids1


def test_iterator_state_resumes_at_same_batch(shapes_builder):
    it = iter(_loader(shapes_builder))
    next(it)
    next(it)
    state = it.get_state()
    json.loads(state)  # plain JSON bytes, storable next to a checkpoint
    expected = next(it)
    fresh = iter(_loader(shapes_builder))
    fresh.set_state(state)
    got = next(fresh)
    for k in expected:
        assert np.array_equal(expected[k], got[k]), k


def test_label_truncation_warns_once(shapes_builder, caplog, monkeypatch):
    monkeypatch.setattr(pipeline, '_warned_truncation', False)
    with caplog.at_level(py_logging.WARNING):
        batches = list(_loader(shapes_builder, 'validation', train=False,
                               max_labels=1, num_epochs=1))
    assert all(b['valid'].sum(1).max() <= 1 for b in batches)
    msgs = [r.getMessage() for r in caplog.records if 'max_labels' in
            r.getMessage()]
    assert len(msgs) == 1


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


def test_corrupt_image_is_logged_and_substituted(tmp_path, caplog):
    builder = BrokenImagesForTest(data_dir=str(tmp_path),
                                  file_format='array_record')
    builder.download_and_prepare()
    with caplog.at_level(py_logging.WARNING):
        for train in (False, True):
            batches = list(pipeline.make_detection_loader(
                builder, 'train', image_size=32, batch_size=3, train=train,
                process_index=0, process_count=1, num_epochs=1, max_labels=4,
                hyp={'mosaic': 1.0}))
            assert len(batches) == 2
            ids = np.concatenate([b['image_id'] for b in batches])
            assert 102 not in ids and len(ids) == 6
            assert all(b['valid'][:, 0].all() for b in batches)
    assert any('image_id 102' in r.getMessage() and 'substituting' in
               r.getMessage() for r in caplog.records)


def test_data_path_never_imports_tensorflow():
    import sys  # pylint: disable=g-import-not-at-top
    assert 'tensorflow' not in sys.modules


# --------------------------------------------------------------------- mixup


def test_mixup_blends_and_keeps_both_label_sets():
    rng = np.random.default_rng(0)
    a, b = np.full((8, 8, 3), 200, np.uint8), np.full((8, 8, 3), 0, np.uint8)
    la, lb = np.array([[1, 0, 0, 4, 4]], np.float32), np.array([[2, 4, 4, 8, 8]], np.float32)
    img, lab = T.mixup(a, la, b, lb, rng)
    assert img.dtype == np.uint8 and 60 < img[0, 0, 0] < 140  # r ~ Beta(32, 32), near 0.5
    np.testing.assert_array_equal(lab, np.concatenate([la, lb]))


def test_train_transform_mixup(shapes_builder):
    source = pipeline.DetectionSource(shapes_builder.data_dir, 'train')
    base = {**T.DEFAULT_HYP, 'mosaic': 1.0}

    def run(hyp, seed):
        op = pipeline.TrainTransform(source, 64, hyp, max_labels=64)
        return op.random_map(source[3], np.random.default_rng(seed))

    n_plain = n_mix = 0
    for seed in range(6):
        plain = run({**base, 'mixup': 0.0}, seed)
        # mixup 0 draws nothing from the generator: same example as a hyp without the key
        no_key = run({k: v for k, v in base.items() if k != 'mixup'}, seed)
        np.testing.assert_array_equal(plain['image'], no_key['image'])
        mixed = run({**base, 'mixup': 1.0}, seed)
        n_plain += int(plain['valid'].sum())
        n_mix += int(mixed['valid'].sum())
    assert n_mix > 1.5 * n_plain  # two mosaics' labels
    with pytest.raises(ValueError, match='copy_paste'):
        pipeline.TrainTransform(source, 64, {**base, 'copy_paste': 0.1}, max_labels=8)


# ------------------------------------------------------------- rect eval


def test_rect_batch_shapes_as_val_py():
    sizes = np.array([[640, 480], [480, 640], [640, 640], [1000, 200]])  # (w, h)
    order, shapes = pipeline.rect_batch_shapes(sizes, 2, 640, 32)
    np.testing.assert_array_equal(order, [3, 0, 2, 1])  # by h / w
    # batch 0: ratios 0.2 and 0.75 -> (0.75 * 640, 640) + half a stride, rounded up to strides
    np.testing.assert_array_equal(shapes, [[512, 672], [672, 672]])
    _, sq = pipeline.rect_batch_shapes(np.array([[640, 640]]), 1, 640, 32)
    np.testing.assert_array_equal(sq, [[672, 672]])


def test_rect_eval_loader_shapes_and_boxes_back(tmp_path):
    root = tmp_path / 'coco'
    _write_coco(root)
    builder = pipeline.prepare('coco_detection_local', str(tmp_path / 'tfds'), manual_dir=str(root))
    loader = pipeline.make_detection_loader(
        builder, 'train', image_size=64, batch_size=1, train=False, process_index=0,
        process_count=1, num_epochs=1, max_labels=4, rect_stride=32)
    batches = list(loader)
    # h/w 0.75 (60x80) and 0.8 (40x50): ceil(r * 64 / 32 + 0.5) strides high, ceil(2.5) wide
    assert [b['image'].shape[1:3] for b in batches] == [(64, 96), (96, 96)]
    b = next(b for b in batches if b['image_id'][0] == 1)
    h, w = b['image'].shape[1:3]
    cx, cy, bw, bh = b['boxes'][0, 0] * np.array([w, h, w, h])
    back = pipeline.boxes_to_original(np.array([[cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]]),
                                      b['ratio'][0], b['pad'][0], b['orig_hw'][0])
    np.testing.assert_allclose(back[0], [20, 10, 50, 30], atol=0.1)
    with pytest.raises(ValueError, match='single-process evaluation'):
        pipeline.make_detection_loader(builder, 'train', image_size=64, batch_size=1, train=True,
                                       process_index=0, process_count=1, rect_stride=32)


# ----------------------------------------------------------------------------- EXIF orientation


def _jpeg_with_orientation(raw_bgr, orientation):
    import io
    from PIL import Image
    im = Image.fromarray(cv2.cvtColor(raw_bgr, cv2.COLOR_BGR2RGB))
    exif = im.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, 'JPEG', quality=95, exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize('orientation', range(1, 9))
def test_apply_orientation_matches_pil_exif_transpose(orientation):
    import io
    from PIL import Image, ImageOps
    rng = np.random.default_rng(orientation)
    raw = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    im = Image.fromarray(raw)
    exif = im.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, 'PNG', exif=exif.tobytes())
    pil = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))))
    np.testing.assert_array_equal(coco.apply_orientation(raw, orientation), pil)
    assert coco.exif_orientation(buf.getvalue()) == orientation


def test_coco_exif_orientation_keeps_boxes_on_their_objects(tmp_path, caplog):
    """Three ways a tagged JPEG can be annotated; each loads in the frame of its boxes."""
    root = tmp_path / 'coco'
    os.makedirs(root / 'annotations')
    os.makedirs(root / 'train2017')
    box = [8, 10, 20, 16]  # x, y, w, h in the annotated frame
    def drawn(h, w):
        img = np.full((h, w, 3), 40, np.uint8)
        x, y, bw, bh = box
        img[y:y + bh, x:x + bw] = 230
        return img
    images, anns = [], []
    # 1: turned 90 degrees (tag 6), annotated as displayed (json size = displayed 64 x 40)
    shown = drawn(64, 40)
    raw = np.ascontiguousarray(np.swapaxes(shown[:, ::-1], 0, 1))  # stored 40 x 64
    np.testing.assert_array_equal(coco.apply_orientation(raw, 6), shown)
    (root / 'train2017' / 'a.jpg').write_bytes(_jpeg_with_orientation(raw, 6))
    images.append({'id': 1, 'file_name': 'a.jpg', 'height': 64, 'width': 40})
    # 2: tag 6 too, but annotated on the stored pixels (json size = stored 40 x 64)
    (root / 'train2017' / 'b.jpg').write_bytes(_jpeg_with_orientation(drawn(40, 64), 6))
    images.append({'id': 2, 'file_name': 'b.jpg', 'height': 40, 'width': 64})
    # 3: upside down (tag 3), no size in the json: displayed frame, as cv2.imread shows it
    (root / 'train2017' / 'c.jpg').write_bytes(
        _jpeg_with_orientation(np.ascontiguousarray(drawn(64, 48)[::-1, ::-1]), 3))
    images.append({'id': 3, 'file_name': 'c.jpg'})
    for i in (1, 2, 3):
        anns.append({'id': i, 'image_id': i, 'category_id': 1, 'bbox': box, 'iscrowd': 0})
    (root / 'annotations' / 'instances_train2017.json').write_text(json.dumps(
        {'images': images, 'annotations': anns, 'categories': [{'id': 1, 'name': 'person'}]}))
    with caplog.at_level(py_logging.WARNING):
        builder = pipeline.prepare('coco_detection_local', str(tmp_path / 'tfds'),
                                   manual_dir=str(root), config=coco.CocoConfig(
                                       name='exif', splits=('train',)))
    log = caplog.text
    assert 'a.jpg: EXIF orientation 6 applied' in log
    assert 'b.jpg: EXIF orientation 6, but the annotation file gives the stored size' in log
    assert 'c.jpg: EXIF orientation 3 applied' in log
    source = pipeline.DetectionSource(builder.data_dir, 'train')
    sizes = pipeline.image_sizes(builder.data_dir, 'train')
    expect_hw = {1: (64, 40), 2: (40, 64), 3: (64, 48)}
    for i in range(source.num_records):
        ex = source[i]
        img, (_, x1, y1, x2, y2) = ex['image'], ex['labels'][0]
        assert img.shape[:2] == expect_hw[ex['image_id']]
        assert tuple(sizes[i][::-1]) == img.shape[:2]  # header size = decoded size
        np.testing.assert_allclose([x1, y1, x2 - x1, y2 - y1], box, atol=1e-3)
        inside = img[int(y1) + 1:int(y2) - 1, int(x1) + 1:int(x2) - 1].mean()
        mask = np.ones(img.shape[:2], bool)
        mask[int(y1) - 1:int(y2) + 1, int(x1) - 1:int(x2) + 1] = False
        assert inside > 200 and img[mask].mean() < 60, (ex['image_id'], inside, img[mask].mean())


# ----------------------------------------------------------------------------- image cache


def test_image_cache_gives_the_same_batches(tmp_path, monkeypatch):
    from research.data import image_cache
    data_dir = tmp_path / 'tfds'
    builder = pipeline.prepare('shapes_detection', str(data_dir), config=_tiny_config('cache'))
    hyp = {'mosaic': 0.5, 'degrees': 5}
    # 48 px: the 64 px images are resized, so the cache holds what load_image makes of them
    plain = list(itertools.islice(iter(_loader(builder, image_size=48, hyp=hyp)), 3))
    cached_loader = _loader(builder, image_size=48, hyp=hyp, cache_images=True)
    data_path, index_path = image_cache.cache_paths(builder.data_dir, 'train', 48)
    assert os.path.getsize(data_path) == TINY['num_train'] * 48 * 48 * 3
    cached = list(itertools.islice(iter(cached_loader), 3))
    for a, b in zip(plain, cached):
        np.testing.assert_array_equal(a['image'], b['image'])
        np.testing.assert_allclose(a['boxes'], b['boxes'], atol=1e-6)
        np.testing.assert_array_equal(a['image_id'], b['image_id'])
    # a later loader maps the existing cache (no rebuild), and only training loaders take one
    mtime = os.path.getmtime(data_path)
    monkeypatch.setattr(image_cache, '_load_resized', None)  # would fail if it rebuilt
    next(iter(_loader(builder, image_size=48, cache_images=True)))
    assert os.path.getmtime(data_path) == mtime
    with pytest.raises(ValueError, match='cache_images is for training'):
        _loader(builder, 'validation', image_size=48, train=False, cache_images=True)
    # a truncated data file is noticed and the cache rebuilt, whole
    with open(data_path, 'r+b') as f:
        f.truncate(100)
    monkeypatch.undo()
    rebuilt = next(iter(_loader(builder, image_size=48, hyp=hyp, cache_images=True)))
    assert os.path.getsize(data_path) == TINY['num_train'] * 48 * 48 * 3
    np.testing.assert_array_equal(rebuilt['image'], plain[0]['image'])
    # the pixels do come from the cache file
    with open(data_path, 'r+b') as f:
        f.write(bytes(os.path.getsize(data_path)))
    blank = next(iter(_loader(builder, image_size=48, hyp=hyp, cache_images=True)))
    assert not np.array_equal(blank['image'], plain[0]['image'])
    assert blank['image'].mean() < 0.8 * plain[0]['image'].mean()


def test_image_cache_reports_too_little_disk(tmp_path, monkeypatch, shapes_builder):
    from research.data import image_cache
    import collections  # pylint: disable=g-import-not-at-top
    usage = collections.namedtuple('usage', 'total used free')
    monkeypatch.setattr(image_cache.shutil, 'disk_usage', lambda p: usage(10, 9, 1))
    with pytest.raises(OSError, match='image cache for split .train. needs up to .* GiB in .*image_cache'):
        _loader(shapes_builder, image_size=40, cache_images=True)
    assert not os.path.exists(image_cache.cache_paths(shapes_builder.data_dir, 'train', 40)[1])


def test_image_cache_keeps_corrupt_images_reported(tmp_path, caplog):
    builder = BrokenImagesForTest(data_dir=str(tmp_path), file_format='array_record')
    builder.download_and_prepare()
    with caplog.at_level(py_logging.WARNING):
        batches = list(pipeline.make_detection_loader(
            builder, 'train', image_size=32, batch_size=3, train=True, process_index=0,
            process_count=1, num_epochs=1, max_labels=4, hyp={'mosaic': 1.0}, cache_images=True))
    ids = np.concatenate([b['image_id'] for b in batches])
    assert 102 not in ids and len(ids) == 6
    msgs = [r.getMessage() for r in caplog.records]
    assert any('not cached' in m and 'image_id 102' in m for m in msgs)
    assert any('image_id 102' in m and 'substituting' in m for m in msgs)


def test_builders_leave_no_temp_directories(tmp_path, monkeypatch):
    import tempfile  # pylint: disable=g-import-not-at-top
    scratch = tmp_path / 'scratch'
    scratch.mkdir()
    monkeypatch.setattr(tempfile, 'tempdir', str(scratch))
    pipeline._register_builders()
    builder = tfds.builder('shapes_detection/tiny', data_dir=str(tmp_path / 'tfds'))
    assert not builder.is_prepared()  # tfds would look the metadata up on its bucket here
    assert os.listdir(scratch) == []
