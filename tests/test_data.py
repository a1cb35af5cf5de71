"""The shared data layer: tfds builders (shapes, local COCO), records, preparation on first use."""

import json
import logging as py_logging
import os

import cv2
import numpy as np
import pytest
import tensorflow_datasets as tfds

from research.data import coco
from research.data import pipeline
from research.data import shapes
from data_helpers import (TINY, _tiny_config, shapes_builder, _records, _xyxy_px, _write_coco, _jpeg_with_orientation)  # noqa: F401  (shapes_builder is a fixture)


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

    # every problem is in the one validation list kept next to the data (not logged piecemeal)
    from research.data import validation
    msgs = [p.line() for p in validation.read(builder.data_dir)]
    assert not [r for r in caplog.records if r.getMessage().startswith('coco:')]
    def has(*parts):
        return any(all(p in m for p in parts) for m in msgs)
    assert has('bad.jpg', 'cannot decode', 'skipped')
    assert has('missing.jpg', 'cannot read', 'skipped')
    assert has('instances_train2017.json', '[image 2', 'no positive size', 'dropped')
    assert has('instances_train2017.json', '[image 2', 'clipped')
    assert has('instances_train2017.json', '[image 2', 'outside', 'dropped')
    assert has('instances_train2017.json', 'category id 12', 'image 2', 'dropped')
    assert has('instances_train2017.json', 'annotation 25', 'no bbox and no polygon')
    assert has('instances_train2017.json', 'without a valid image_id')
    assert not has('a.jpg')


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


def test_data_path_never_imports_tensorflow():
    import sys  # pylint: disable=g-import-not-at-top
    assert 'tensorflow' not in sys.modules


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
    from research.data import validation
    log = '\n'.join(p.line() for p in validation.read(builder.data_dir))
    assert 'a.jpg [image 1]: EXIF orientation 6; applied to the pixels' in log
    assert 'b.jpg [image 2]: EXIF orientation 6, but the annotation file gives the stored size' in log
    assert 'c.jpg [image 3]: EXIF orientation 3; applied' in log
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


def test_builders_leave_no_temp_directories(tmp_path, monkeypatch):
    import tempfile  # pylint: disable=g-import-not-at-top
    scratch = tmp_path / 'scratch'
    scratch.mkdir()
    monkeypatch.setattr(tempfile, 'tempdir', str(scratch))
    pipeline.register_builders()
    builder = tfds.builder('shapes_detection/tiny', data_dir=str(tmp_path / 'tfds'))
    assert not builder.is_prepared()  # tfds would look the metadata up on its bucket here
    assert os.listdir(scratch) == []


def test_jpeg_without_end_marker_is_kept(tmp_path):
    """A JPEG cut before its end marker still decodes (as the official loader restores it)."""
    from PIL import Image
    root = tmp_path / 'coco'
    (root / 'annotations').mkdir(parents=True)
    for split in ('train2017', 'val2017'):
        (root / split).mkdir()
        im = Image.new('RGB', (80, 60), (30, 160, 90))
        path = root / split / 'cut.jpg'
        im.save(path, quality=95)
        data = path.read_bytes()
        assert data[-2:] == b'\xff\xd9'
        path.write_bytes(data[:-2])
        json.dump({'images': [{'id': 1, 'file_name': 'cut.jpg', 'width': 80, 'height': 60}],
                   'annotations': [{'id': 1, 'image_id': 1, 'category_id': 1, 'bbox': [10, 10, 20, 20],
                                    'area': 400, 'iscrowd': 0}],
                   'categories': [{'id': 1, 'name': 'person'}]},
                  open(root / 'annotations' / f'instances_{split}.json', 'w'))
    builder = pipeline.prepare('coco_detection_local', str(tmp_path / 'tfds'), manual_dir=str(root))
    source = pipeline.DetectionSource(builder.data_dir, 'train')
    assert source.num_records == 1
    ex = source[0]
    assert ex['image'].shape == (60, 80, 3) and int(ex['image_id']) == 1
    assert abs(int(ex['image'][30, 40, 1]) - 160) <= 3  # the pixels, not a substitute


def test_coco_folder_with_its_own_categories_keeps_them(tmp_path):
    """Issue 10 case 5: categories 0 cat, 1 dog, 2 bird are three classes of their own, not COCO's."""
    import ml_collections
    from PIL import Image
    from research.data import detection
    root = tmp_path / 'pets'
    (root / 'annotations').mkdir(parents=True)
    cats = [{'id': 2, 'name': 'bird'}, {'id': 0, 'name': 'cat'}, {'id': 1, 'name': 'dog'}]
    for split in ('train2017', 'val2017'):
        (root / split).mkdir()
        Image.new('RGB', (80, 60), (30, 160, 90)).save(root / split / 'a.png')
        anns = [{'id': k + 1, 'image_id': 1, 'category_id': cid, 'bbox': [10 + 20 * k, 10, 15, 15], 'area': 225,
                 'iscrowd': 0} for k, cid in enumerate((0, 1, 2))]
        json.dump({'images': [{'id': 1, 'file_name': 'a.png', 'width': 80, 'height': 60}], 'annotations': anns,
                   'categories': cats}, open(root / 'annotations' / f'instances_{split}.json', 'w'))
    cfg = ml_collections.ConfigDict(dict(name='coco', manual_dir=str(root), data_dir=str(tmp_path / 'tfds')))
    ds = detection.DetectionData(cfg)
    assert ds.class_names == ('cat', 'dog', 'bird') and ds.label_to_category_id == [0, 1, 2]
    ex = pipeline.DetectionSource(ds.builder.data_dir, 'train')[0]
    np.testing.assert_array_equal(ex['labels'][:, 0], [0, 1, 2])  # every box kept, each its own class
    # a folder whose categories are COCO's own (a subset) keeps the 80-class table
    for split in ('train2017', 'val2017'):
        path = root / 'annotations' / f'instances_{split}.json'
        d = json.load(open(path))
        d['categories'] = [{'id': 1, 'name': 'person'}, {'id': 3, 'name': 'car'}]
        for a in d['annotations']:
            a['category_id'] = 3
        json.dump(d, open(path, 'w'))
    cfg.data_dir = str(tmp_path / 'tfds2')
    ds = detection.DetectionData(cfg)
    assert len(ds.class_names) == 80 and ds.label_to_category_id[2] == 3
    assert set(pipeline.DetectionSource(ds.builder.data_dir, 'train')[0]['labels'][:, 0]) == {2}


def test_prepared_coco_data_is_keyed_to_its_source(tmp_path):
    """Issue 10 case 3: an edited annotation json (or another folder) is prepared anew, not reused."""
    import ml_collections
    from PIL import Image
    from research.data import detection
    root = tmp_path / 'coco'
    (root / 'annotations').mkdir(parents=True)
    for split in ('train2017', 'val2017'):
        (root / split).mkdir()
        Image.new('RGB', (80, 60), (30, 160, 90)).save(root / split / 'a.png')
        json.dump({'images': [{'id': 1, 'file_name': 'a.png', 'width': 80, 'height': 60}],
                   'annotations': [{'id': 1, 'image_id': 1, 'category_id': 1, 'bbox': [10, 10, 15, 15],
                                    'area': 225, 'iscrowd': 0}],
                   'categories': [{'id': 1, 'name': 'person'}]},
                  open(root / 'annotations' / f'instances_{split}.json', 'w'))
    cfg = ml_collections.ConfigDict(dict(name='coco', manual_dir=str(root), data_dir=str(tmp_path / 'tfds')))
    first = detection.DetectionData(cfg)
    assert len(pipeline.DetectionSource(first.builder.data_dir, 'train')[0]['labels']) == 1
    assert detection.DetectionData(cfg).builder.data_dir == first.builder.data_dir  # unchanged: reused
    path = root / 'annotations' / 'instances_train2017.json'
    d = json.load(open(path))
    d['annotations'].append({'id': 2, 'image_id': 1, 'category_id': 1, 'bbox': [40, 20, 10, 10], 'area': 100,
                             'iscrowd': 0})
    json.dump(d, open(path, 'w'))
    second = detection.DetectionData(cfg)
    assert second.builder.data_dir != first.builder.data_dir
    assert len(pipeline.DetectionSource(second.builder.data_dir, 'train')[0]['labels']) == 2
