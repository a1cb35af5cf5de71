"""YOLOv5's data (research/yolov5/data.py, transforms.py, image_cache.py): augmentation, loaders, rect batches, image cache."""

import itertools
import json
import logging as py_logging
import os

import numpy as np
import pytest

from research.data import pipeline
from research.yolov5 import data as y5data
from research.yolov5 import image_cache  # noqa: F401  (monkeypatched by name below)
from research.yolov5 import transforms as T
from data_helpers import (TINY, _tiny_config, shapes_builder, _records, _xyxy_px, _write_coco, _rect_image, _pixel_box, PALETTE, _palette_item, _colour_box, _check_batch, BrokenImagesForTest)  # noqa: F401  (shapes_builder is a fixture)


def test_coco_loader_drops_crowd_and_maps_back(tmp_path):
    root = tmp_path / 'coco'
    _write_coco(root)
    builder = pipeline.prepare('coco_detection_local', str(tmp_path / 'tfds'),
                               manual_dir=str(root))
    loader = y5data.make_detection_loader(
        builder, 'train', image_size=64, batch_size=2, train=False,
        process_index=0, process_count=1, num_epochs=1, max_labels=4)
    (batch,) = list(loader)
    order = list(batch['image_id'])
    k = order.index(1)
    assert batch['valid'][k].sum() == 1  # crowd box removed from targets
    np.testing.assert_array_equal(batch['orig_hw'][k], [60, 80])
    cx, cy, w, h = batch['boxes'][k, 0] * 64
    net = np.array([[cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]])
    back = y5data.boxes_to_original(net, batch['ratio'][k], batch['pad'][k],
                                      batch['orig_hw'][k])
    np.testing.assert_allclose(back[0], [20, 10, 50, 30], atol=0.1)


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


def _loader(builder, split='train', **kw):
    args = dict(image_size=64, batch_size=8, train=True, process_index=0,
                process_count=1, seed=0, max_labels=12)
    args.update(kw)
    return y5data.make_detection_loader(builder, split, **args)


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
            back = y5data.boxes_to_original(net, b['ratio'][k], b['pad'][k],
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
    monkeypatch.setattr(y5data, '_warned_truncation', False)
    with caplog.at_level(py_logging.WARNING):
        batches = list(_loader(shapes_builder, 'validation', train=False,
                               max_labels=1, num_epochs=1))
    assert all(b['valid'].sum(1).max() <= 1 for b in batches)
    msgs = [r.getMessage() for r in caplog.records if 'max_labels' in
            r.getMessage()]
    assert len(msgs) == 1


def test_corrupt_image_is_logged_and_substituted(tmp_path, caplog):
    builder = BrokenImagesForTest(data_dir=str(tmp_path),
                                  file_format='array_record')
    builder.download_and_prepare()
    with caplog.at_level(py_logging.WARNING):
        for train in (False, True):
            batches = list(y5data.make_detection_loader(
                builder, 'train', image_size=32, batch_size=3, train=train,
                process_index=0, process_count=1, num_epochs=1, max_labels=4,
                hyp={'mosaic': 1.0}))
            assert len(batches) == 2
            ids = np.concatenate([b['image_id'] for b in batches])
            assert 102 not in ids and len(ids) == 6
            assert all(b['valid'][:, 0].all() for b in batches)
    assert any('image_id 102' in r.getMessage() and 'substituting' in
               r.getMessage() for r in caplog.records)


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
        op = y5data.TrainTransform(source, 64, hyp, max_labels=64)
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
        y5data.TrainTransform(source, 64, {**base, 'copy_paste': 0.1}, max_labels=8)


def test_rect_batch_shapes_as_val_py():
    sizes = np.array([[640, 480], [480, 640], [640, 640], [1000, 200]])  # (w, h)
    order, shapes = y5data.rect_batch_shapes(sizes, 2, 640, 32)
    np.testing.assert_array_equal(order, [3, 0, 2, 1])  # by h / w
    # batch 0: ratios 0.2 and 0.75 -> (0.75 * 640, 640) + half a stride, rounded up to strides
    np.testing.assert_array_equal(shapes, [[512, 672], [672, 672]])
    _, sq = y5data.rect_batch_shapes(np.array([[640, 640]]), 1, 640, 32)
    np.testing.assert_array_equal(sq, [[672, 672]])


def test_rect_eval_loader_shapes_and_boxes_back(tmp_path):
    root = tmp_path / 'coco'
    _write_coco(root)
    builder = pipeline.prepare('coco_detection_local', str(tmp_path / 'tfds'), manual_dir=str(root))
    loader = y5data.make_detection_loader(
        builder, 'train', image_size=64, batch_size=1, train=False, process_index=0,
        process_count=1, num_epochs=1, max_labels=4, rect_stride=32)
    batches = list(loader)
    # h/w 0.75 (60x80) and 0.8 (40x50): ceil(r * 64 / 32 + 0.5) strides high, ceil(2.5) wide
    assert [b['image'].shape[1:3] for b in batches] == [(64, 96), (96, 96)]
    b = next(b for b in batches if b['image_id'][0] == 1)
    h, w = b['image'].shape[1:3]
    cx, cy, bw, bh = b['boxes'][0, 0] * np.array([w, h, w, h])
    back = y5data.boxes_to_original(np.array([[cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]]),
                                      b['ratio'][0], b['pad'][0], b['orig_hw'][0])
    np.testing.assert_allclose(back[0], [20, 10, 50, 30], atol=0.1)
    with pytest.raises(ValueError, match='single-process evaluation'):
        y5data.make_detection_loader(builder, 'train', image_size=64, batch_size=1, train=True,
                                       process_index=0, process_count=1, rect_stride=32)


def test_image_cache_gives_the_same_batches(tmp_path, monkeypatch):
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
        batches = list(y5data.make_detection_loader(
            builder, 'train', image_size=32, batch_size=3, train=True, process_index=0,
            process_count=1, num_epochs=1, max_labels=4, hyp={'mosaic': 1.0}, cache_images=True))
    ids = np.concatenate([b['image_id'] for b in batches])
    assert 102 not in ids and len(ids) == 6
    msgs = [r.getMessage() for r in caplog.records]
    assert any('not cached' in m and 'image_id 102' in m for m in msgs)
    assert any('image_id 102' in m and 'substituting' in m for m in msgs)


def test_extreme_aspect_ratio_resizes_to_at_least_one_pixel():
    """A 2000 x 10 image at 64 px: v7.0's int() gives 0 px and cv2.resize fails; here 1 px."""
    img = np.full((10, 2000, 3), 200, np.uint8)
    out, (h0, w0), (h, w) = T.load_image(img, 64, augment=True)
    assert (h0, w0) == (10, 2000) and (h, w) == (1, 64) and out.shape == (1, 64, 3)
    lb, ratio, pad = T.letterbox(img, (64, 64), auto=False)
    assert lb.shape == (64, 64, 3) and ratio[0] == pytest.approx(64 / 2000)
    rows = [r for r in range(64) if (lb[r, :, 0] == 200).all()]
    assert len(rows) == 1 and 30 <= rows[0] <= 33  # the 1-px image row, centred in the padding



def test_resume_on_another_process_count_continues_the_same_global_batches(shapes_builder, tmp_path):
    """The loader's state is the count of global batches consumed: 2 processes stop after 3 batches,
    1 process resumes and gets global batch 4, which is the two processes' 4th slices joined."""
    import ml_collections
    from research.data import detection
    cfg = ml_collections.ConfigDict(dict(name='shapes', data_dir=os.path.dirname(os.path.dirname(
        os.path.dirname(str(shapes_builder.data_dir)))), image_size=48, num_train_examples=0,
        num_eval_examples=0, max_labels=8, num_workers=0, cache_images=False))
    ds = detection.DetectionData.__new__(detection.DetectionData)  # the prepared tiny builder as it is
    ds.config, ds.builder = cfg, shapes_builder
    ds.spec = detection.DatasetSpec(shapes_builder, ('a',))
    hyp = {**T.DEFAULT_HYP, 'mosaic': 0.0}

    def loader(p, n, state=None):
        return y5data.loader(ds, 'train', train=True, batch_size=4, hyp=hyp, seed=3, iterator_state=state,
                             process_index=p, process_count=n)

    halves = [iter(loader(p, 2)) for p in (0, 1)]
    for _ in range(3):
        for it in halves:
            next(it)
    states = [it.get_state() for it in halves]
    assert states == [{'global_batches': 3}] * 2
    fourth = [next(it) for it in halves]
    resumed = next(iter(loader(0, 1, states[0])))
    for k in ('image', 'boxes', 'classes', 'valid', 'image_id'):
        np.testing.assert_array_equal(resumed[k], np.concatenate([fourth[0][k], fourth[1][k]]), err_msg=k)
    # and the uninterrupted single-process run has the same 4th batch
    single = iter(loader(0, 1))
    for _ in range(3):
        next(single)
    np.testing.assert_array_equal(next(single)['image'], resumed['image'])
