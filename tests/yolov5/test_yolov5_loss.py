"""Tests of research/yolov5/loss.py: golden values of the official loss, a torch re-statement of
the official algorithm on crowded random cases (duplicate cells, cell borders, image edges),
and value properties (perfect prediction, empty batch, finite jit gradients)."""

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REFERENCE
from research.yolov5 import loss as yloss

REF_DIR = os.path.join(REFERENCE, "yolov5s")
ANCHORS_PX = np.array([[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]],
                      np.float32).reshape(3, 3, 2)
STRIDES = np.array([8, 16, 32], np.float32)
ANCHORS = ANCHORS_PX / STRIDES[:, None, None]


def test_hyp_scratch_low_and_scaling():
    h = yloss.HYP_SCRATCH_LOW
    assert len(h) == 28
    assert (h["lr0"], h["lrf"], h["momentum"], h["weight_decay"]) == (0.01, 0.01, 0.937, 0.0005)
    assert (h["box"], h["cls"], h["obj"], h["anchor_t"], h["fl_gamma"]) == (0.05, 0.5, 1.0, 4.0, 0.0)
    s = yloss.scale_hyp(h, nl=3, nc=80, imgsz=640)
    assert s == h  # nl=3, nc=80, 640 px is the identity
    s = yloss.scale_hyp(h, nl=4, nc=20, imgsz=320)
    assert s["box"] == pytest.approx(0.05 * 3 / 4)
    assert s["cls"] == pytest.approx(0.5 * 20 / 80 * 3 / 4)
    assert s["obj"] == pytest.approx(1.0 * 0.25 * 3 / 4)
    assert h["box"] == 0.05  # input untouched


def test_targets_to_padded():
    t = np.array([[1, 3, .1, .2, .3, .4], [0, 5, .5, .5, .2, .2], [1, 7, .6, .7, .1, .1]], np.float32)
    boxes, classes, valid = yloss.targets_to_padded(t, batch_size=3, max_labels=4)
    assert boxes.shape == (3, 4, 4) and classes.shape == (3, 4) and valid.shape == (3, 4)
    np.testing.assert_array_equal(valid.sum(1), [1, 2, 0])
    np.testing.assert_array_equal(classes[1, :2], [3, 7])  # order within the image kept
    np.testing.assert_allclose(boxes[1, 1], [.6, .7, .1, .1])
    with pytest.raises(ValueError):
        yloss.targets_to_padded(t, batch_size=3, max_labels=1)


def test_golden_yolov5s():
    path = os.path.join(REF_DIR, "golden.npz")
    if not os.path.exists(path):
        pytest.skip(f"reference data not found at {path}")
    g = np.load(path)
    manifest = json.load(open(os.path.join(REF_DIR, "manifest.json")))
    entry = next(e for e in manifest["entries"] if e["key"] == "model.24.anchors")
    anchors = np.asarray(entry["value"], np.float32).reshape(entry["shape"])
    np.testing.assert_allclose(anchors, ANCHORS, rtol=0, atol=0)
    heads = [g[f"loss_head{i}"] for i in range(3)]
    boxes, classes, valid = yloss.targets_to_padded(g["loss_targets"], batch_size=2, max_labels=8)
    hyp = {k: yloss.HYP_SCRATCH_LOW[k] for k in ("box", "cls", "cls_pw", "obj", "obj_pw", "anchor_t", "fl_gamma")}
    hyp["label_smoothing"] = 0.0
    fn = jax.jit(functools.partial(yloss.compute_loss, anchors=anchors, hyp=hyp))
    total, items = fn(heads, boxes, classes, valid)
    ours = {"loss_lbox": items["lbox"], "loss_lobj": items["lobj"], "loss_lcls": items["lcls"], "loss_total": total}
    for key, value in ours.items():
        gold = float(g[key])
        assert value.dtype == jnp.float32
        assert abs(float(value) - gold) <= 1e-5 * abs(gold) + 1e-7, (key, float(value), gold)


# One compiled loss-and-gradient per hyp, shared by the tests below (same shapes: B=2, M=20,
# GRID levels, NC classes), so the file compiles few programs. _TRACES counts retraces.
GRID, NC, M_LABELS = [(8, 10), (4, 5), (2, 3)], 4, 20
PLAIN_HYP = {"box": 0.05, "cls": 0.5, "obj": 1.0, "cls_pw": 1.0, "obj_pw": 1.0, "anchor_t": 4.0,
             "fl_gamma": 0.0, "label_smoothing": 0.0}
_TRACES = []


@functools.lru_cache(maxsize=None)
def _loss_fn(hyp_items, with_grad=True):
    hyp = dict(hyp_items)

    def f(heads, boxes, classes, valid):
        _TRACES.append(hyp_items)
        return yloss.compute_loss(heads, boxes, classes, valid, ANCHORS, hyp)

    return jax.jit(jax.value_and_grad(f, has_aux=True) if with_grad else f)


# ------------------------------------------------------------------ torch re-statement

def _torch_reference(heads, targets, anchors, hyp):
    """The official ComputeLoss restated with torch (candidate lists built in the official
    order, objectness targets written one candidate at a time so the last one wins)."""
    import torch

    def ciou(p, t, eps=1e-7):
        px1, px2, py1, py2 = p[:, 0] - p[:, 2] / 2, p[:, 0] + p[:, 2] / 2, p[:, 1] - p[:, 3] / 2, p[:, 1] + p[:, 3] / 2
        tx1, tx2, ty1, ty2 = t[:, 0] - t[:, 2] / 2, t[:, 0] + t[:, 2] / 2, t[:, 1] - t[:, 3] / 2, t[:, 1] + t[:, 3] / 2
        iw = (torch.minimum(px2, tx2) - torch.maximum(px1, tx1)).clamp(min=0)
        ih = (torch.minimum(py2, ty2) - torch.maximum(py1, ty1)).clamp(min=0)
        inter = iw * ih
        iou = inter / (p[:, 2] * p[:, 3] + t[:, 2] * t[:, 3] - inter + eps)
        diag2 = (torch.maximum(px2, tx2) - torch.minimum(px1, tx1)) ** 2 + \
                (torch.maximum(py2, ty2) - torch.minimum(py1, ty1)) ** 2 + eps
        dist2 = ((tx1 + tx2 - px1 - px2) ** 2 + (ty1 + ty2 - py1 - py2) ** 2) / 4
        v = 4 / math.pi ** 2 * (torch.atan(t[:, 2] / t[:, 3]) - torch.atan(p[:, 2] / p[:, 3])) ** 2
        with torch.no_grad():
            alpha = v / (v - iou + (1 + eps))
        return iou - (dist2 / diag2 + v * alpha)

    def bce(x, y, pw):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            x, y, pos_weight=torch.tensor([pw]), reduction="none")
        gamma = hyp.get("fl_gamma", 0.0)
        if gamma > 0:
            prob = torch.sigmoid(x)
            p_t = y * prob + (1 - y) * (1 - prob)
            loss = loss * (y * 0.25 + (1 - y) * 0.75) * (1 - p_t) ** gamma
        return loss.mean()

    stats = {"overwritten": 0}
    ls = hyp.get("label_smoothing", 0.0)
    pos, neg = 1.0 - 0.5 * ls, 0.5 * ls
    balance = [4.0, 1.0, 0.4]
    lbox, lobj, lcls = torch.zeros(()), torch.zeros(()), torch.zeros(())
    steps = [(0.0, 0.0), (0.5, 0.0), (0.0, 0.5), (-0.5, 0.0), (0.0, -0.5)]
    for i, p in enumerate(heads):
        bsz, na, ny, nx, no = p.shape
        nc = no - 5
        size = torch.tensor([nx, ny], dtype=torch.float32)
        cxy = targets[:, 2:4] * size
        cwh = targets[:, 4:6] * size
        inv = size - cxy
        sel_step = [torch.ones(len(targets), dtype=torch.bool),
                    (cxy[:, 0] % 1 < 0.5) & (cxy[:, 0] > 1), (cxy[:, 1] % 1 < 0.5) & (cxy[:, 1] > 1),
                    (inv[:, 0] % 1 < 0.5) & (inv[:, 0] > 1), (inv[:, 1] % 1 < 0.5) & (inv[:, 1] > 1)]
        cand = []  # (image, anchor, gy, gx, txy, twh, cls) in the official order
        for s, (dx, dy) in enumerate(steps):
            for a in range(na):
                ratio = cwh / anchors[i, a]
                ok = (torch.maximum(ratio, 1 / ratio).max(1).values < hyp["anchor_t"]) & sel_step[s]
                for k in torch.nonzero(ok).flatten().tolist():
                    cell = (cxy[k] - torch.tensor([dx, dy])).long()
                    gx, gy = int(cell[0].clamp(0, nx - 1)), int(cell[1].clamp(0, ny - 1))
                    cand.append((int(targets[k, 0]), a, gy, gx, cxy[k] - cell, cwh[k], int(targets[k, 1])))
        tobj = torch.zeros(p.shape[:4])
        written = {}
        if cand:
            b = torch.tensor([c[0] for c in cand])
            a = torch.tensor([c[1] for c in cand])
            gy = torch.tensor([c[2] for c in cand])
            gx = torch.tensor([c[3] for c in cand])
            sel = p[b, a, gy, gx]
            pxy = sel[:, :2].sigmoid() * 2 - 0.5
            pwh = (sel[:, 2:4].sigmoid() * 2) ** 2 * anchors[i][a]
            tbox = torch.stack([torch.cat([c[4], c[5]]) for c in cand])
            iou = ciou(torch.cat([pxy, pwh], 1), tbox)
            lbox = lbox + (1.0 - iou).mean()
            for n, c in enumerate(cand):  # sequential writes: the last candidate of a cell stays
                value = iou[n].detach().clamp(min=0)
                cell = c[:4]
                if cell in written and float(written[cell]) != float(value):
                    stats["overwritten"] += 1
                written[cell] = value
                tobj[cell] = value
            if nc > 1:
                y = torch.full((len(cand), nc), neg)
                y[torch.arange(len(cand)), torch.tensor([c[6] for c in cand])] = pos
                lcls = lcls + bce(sel[:, 5:], y, hyp["cls_pw"])
        lobj = lobj + bce(p[..., 4], tobj, hyp["obj_pw"]) * balance[i]
    lbox, lobj, lcls = lbox * hyp["box"], lobj * hyp["obj"], lcls * hyp["cls"]
    return ((lbox + lobj + lcls) * heads[0].shape[0], lbox, lobj, lcls), stats


def _crowded_case(rng, bsz, per_image, nc, grid):
    """Labels piled on a few cells: repeated boxes, centres on cell borders (k/n and k/n +- 1e-3,
    exact half cells) and at the image edges, sizes spanning all anchors and none."""
    rows = []
    for b in range(bsz):
        for _ in range(per_image):
            kind = rng.integers(0, 5)
            if kind == 0:  # centre on / next to a cell border of one of the levels
                n = grid[rng.integers(0, 3)]
                x = (rng.integers(0, n[1] + 1) + rng.choice([0.0, 0.5, 1e-3, -1e-3, 0.499, 0.501])) / n[1]
                y = (rng.integers(0, n[0] + 1) + rng.choice([0.0, 0.5, 1e-3, -1e-3, 0.499, 0.501])) / n[0]
            elif kind == 1:  # image edges
                x, y = rng.choice([0.0, 0.002, 0.998, 1.0, 0.5], size=2)
            w, h = np.exp(rng.uniform(np.log(0.01), np.log(0.9), size=2))
            if kind >= 2:  # alike labels in a small region -> many cells shared by candidates
                x, y = 0.4 + 0.08 * rng.random(2)
                w, h = rng.uniform(0.08, 0.2, size=2)
            rows.append([b, rng.integers(0, nc), np.clip(x, 0, 1), np.clip(y, 0, 1), w, h])
        rows.append(list(rows[-1]))  # an exact duplicate label
    rows = np.asarray(rows, np.float32)
    return rows[rng.permutation(len(rows))]  # images interleaved, as a global list may be


@pytest.mark.parametrize("variant", ["plain", "smooth_focal_pw"])
def test_against_torch_reference_crowded(variant):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0 if variant == "plain" else 1)
    bsz, nc, grid = 2, NC, GRID
    hyp = dict(PLAIN_HYP)
    if variant != "plain":
        hyp.update(cls_pw=1.7, obj_pw=0.8, fl_gamma=1.5, label_smoothing=0.1, anchor_t=2.9)
    with_grad = variant == "plain"  # gradients once (each compiled gradient costs seconds on CPU)
    fn = _loss_fn(tuple(sorted(hyp.items())), with_grad)
    for trial in range(2):
        heads = [rng.normal(0, 1.5, (bsz, 3, ny, nx, 5 + nc)).astype(np.float32) for ny, nx in grid]
        targets = _crowded_case(rng, bsz, 14, nc, grid)
        boxes, classes, valid = yloss.targets_to_padded(targets, bsz, M_LABELS)
        if with_grad:
            (total, items), grads = fn(heads, boxes, classes, valid)
        else:
            (total, items), grads = fn(heads, boxes, classes, valid), ()

        th = [torch.tensor(h, requires_grad=True) for h in heads]
        ref, stats = _torch_reference(th, torch.tensor(targets), torch.tensor(ANCHORS), hyp)
        assert stats["overwritten"] >= 10  # the case really has cells shared by different candidates
        ref[0].backward()
        for ours, theirs in zip([total, items["lbox"], items["lobj"], items["lcls"]], ref):
            theirs = float(theirs.detach())
            assert abs(float(ours) - theirs) <= 2e-5 * abs(theirs) + 1e-7, (variant, trial, float(ours), theirs)
        for g, t in zip(grads, th):
            np.testing.assert_allclose(np.asarray(g), t.grad.numpy(), rtol=1e-3, atol=1e-5 * float(t.grad.abs().max()))


def test_nhwc_layout_equals_official_layout():
    """The training loss reads the Detect conv's own layout [B, ny, nx, na, no]: same values and
    (transposed) gradients as the official [B, na, ny, nx, no], on the crowded case."""
    rng = np.random.default_rng(3)
    heads = [rng.normal(0, 1.5, (2, 3, ny, nx, 5 + NC)).astype(np.float32) for ny, nx in GRID]
    boxes, classes, valid = yloss.targets_to_padded(_crowded_case(rng, 2, 14, NC, GRID), 2, M_LABELS)

    def f(layout):
        def loss(hs):
            if layout == "nhwc":
                hs = [h.transpose(0, 2, 3, 1, 4) for h in hs]
            total, items = yloss.compute_loss(hs, boxes, classes, valid, ANCHORS, PLAIN_HYP, layout=layout)
            return total, items
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(heads)

    (t_off, i_off), g_off = f("official")
    (t_nhwc, i_nhwc), g_nhwc = f("nhwc")
    assert float(t_off) > 0
    np.testing.assert_allclose(float(t_nhwc), float(t_off), rtol=1e-6)
    for k in i_off:
        np.testing.assert_allclose(float(i_nhwc[k]), float(i_off[k]), rtol=1e-6)
    for a, b in zip(g_nhwc, g_off):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="layout 'nchw'"):
        yloss.compute_loss(heads, boxes, classes, valid, ANCHORS, PLAIN_HYP, layout="nchw")


def test_duplicate_cells_last_candidate_wins():
    """Two labels with the same centre share every cell; the later row sets the objectness target,
    so lobj(A, B) == lobj(B alone) and lobj(B, A) == lobj(A alone)."""
    rng = np.random.default_rng(7)
    grid = [(8, 8), (4, 4), (2, 2)]
    heads = [rng.normal(0, 1, (1, 3, ny, nx, 6)).astype(np.float32) for ny, nx in grid]
    anchors = ANCHORS.copy()
    anchors[1:] *= 8.0  # only P3 matches
    a0 = anchors[0, 0]
    cx, cy = 3.5 / 8, 4.5 / 8  # a P3 cell centre: no neighbour cells
    lab_a = [cx, cy, a0[0] / 8, a0[1] / 8]
    lab_b = [cx, cy, 1.2 * a0[0] / 8, 1.4 * a0[1] / 8]
    for lab in (lab_a, lab_b):  # both labels pass the ratio test for all three P3 anchors
        r = np.array(lab[2:]) * 8 / anchors[0]
        assert np.all(np.maximum(r, 1 / r).max(1) < 4.0)
    hyp = dict(box=1.0, obj=1.0, cls=1.0, cls_pw=1.0, obj_pw=1.0, anchor_t=4.0)
    fn = jax.jit(lambda b, v: yloss.compute_loss(heads, b, np.zeros((1, 2), np.int32), v, anchors, hyp)[1])

    def lobj(*labels):
        boxes = np.zeros((1, 2, 4), np.float32)
        boxes[0, :len(labels)] = labels
        return float(fn(boxes, np.arange(2)[None] < len(labels))["lobj"])

    assert lobj(lab_a, lab_b) == lobj(lab_b)
    assert lobj(lab_b, lab_a) == lobj(lab_a)
    assert lobj(lab_a) != lobj(lab_b)


def _perfect_heads(boxes, classes, anchors, grid, nc, hi=12.0):
    """Logits reproducing each label exactly: labels sit on cell centres (no neighbour cells),
    every anchor that passes the ratio test predicts the label's box, obj and class logits high."""
    heads = []
    for i, (ny, nx) in enumerate(grid):
        h = np.zeros((boxes.shape[0], 3, ny, nx, 5 + nc), np.float32)
        h[..., 4:] = -hi
        for b in range(boxes.shape[0]):
            for (x, y, w, hh), c in zip(boxes[b], classes[b]):
                gx, gy = int(x * nx), int(y * ny)
                for a in range(3):
                    r = np.array([w * nx, hh * ny]) / anchors[i, a]
                    if np.max(np.maximum(r, 1 / r)) < 4.0:
                        s = np.sqrt(r) / 2  # sigmoid value giving (2 s)^2 anchor = wh
                        h[b, a, gy, gx, 0:2] = 0.0  # 2 * 0.5 - 0.5 = 0.5, the cell centre
                        h[b, a, gy, gx, 2:4] = np.log(s / (1 - s))
                        h[b, a, gy, gx, 4] = hi
                        h[b, a, gy, gx, 5 + c] = hi
        heads.append(h)
    return heads


def test_perfect_prediction_is_minimal():
    grid, nc = [(8, 8), (4, 4), (2, 2)], 3
    # Centres on P3 cell centres (no neighbour cells); P4/P5 anchors are made too large to
    # match, so only the P3 candidates exist and all of them can be predicted exactly.
    boxes = np.array([[[2.5 / 8, 5.5 / 8, 12 / 64, 15 / 64], [6.5 / 8, 1.5 / 8, 20 / 64, 28 / 64]]], np.float32)
    classes = np.array([[1, 2]], np.int32)
    valid = np.ones((1, 2), bool)
    anchors = ANCHORS.copy()
    anchors[1:] *= 8.0  # P4/P5 anchors far too large for these labels: no match there
    hyp = dict(box=0.05, obj=1.0, cls=0.5, cls_pw=1.0, obj_pw=1.0, anchor_t=4.0)
    heads = _perfect_heads(boxes, classes, anchors, grid, nc)
    fn = jax.jit(lambda h: yloss.compute_loss(h, boxes, classes, valid, anchors, hyp))
    total, items = fn(heads)
    assert float(items["lbox"]) < 1e-5
    assert float(items["lcls"]) < 1e-4
    assert float(items["lobj"]) < 1e-3
    rng = np.random.default_rng(0)
    for _ in range(3):
        noisy = [h + rng.normal(0, 0.3, h.shape).astype(np.float32) for h in heads]
        total_n, items_n = fn(noisy)
        assert float(total_n) > float(total)
        assert float(items_n["lbox"]) > float(items["lbox"])


def test_no_labels():
    rng = np.random.default_rng(3)
    heads = [rng.normal(0, 1, (2, 3, ny, nx, 5 + NC)).astype(np.float32) for ny, nx in GRID]
    boxes = rng.random((2, M_LABELS, 4)).astype(np.float32)
    boxes[0, 0] = np.nan  # garbage in padding must not leak
    valid = np.zeros((2, M_LABELS), bool)
    fn = _loss_fn(tuple(sorted(PLAIN_HYP.items())), True)
    (total, items), grads = fn(heads, boxes, np.zeros((2, M_LABELS), np.int32), valid)
    assert float(items["lbox"]) == 0.0 and float(items["lcls"]) == 0.0
    expected = PLAIN_HYP["obj"] * sum(bal * np.mean(np.logaddexp(0, h[..., 4].astype(np.float64)))
                                      for bal, h in zip([4.0, 1.0, 0.4], heads))
    np.testing.assert_allclose(float(items["lobj"]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(total), 2 * expected, rtol=1e-5)
    for g in grads:
        assert np.all(np.isfinite(g))
        assert np.all(np.asarray(g)[..., :4] == 0) and np.all(np.asarray(g)[..., 5:] == 0)


def test_jit_grad_finite_and_single_trace():
    rng = np.random.default_rng(5)
    heads = [rng.normal(0, 2, (2, 3, ny, nx, 5 + NC)).astype(np.float32) for ny, nx in GRID]
    fn = _loss_fn(tuple(sorted(PLAIN_HYP.items())), True)
    traces = None
    for k in range(4):
        valid = rng.random((2, M_LABELS)) < 0.5
        boxes = rng.uniform(0.02, 0.98, (2, M_LABELS, 4)).astype(np.float32)
        (total, _), grads = fn(heads, boxes, rng.integers(0, NC, (2, M_LABELS)).astype(np.int32), valid)
        assert np.isfinite(float(total))
        assert all(np.all(np.isfinite(x)) for x in grads)
        assert any(np.any(np.asarray(x)[..., :4] != 0) for x in grads)
        if traces is None:
            traces = len(_TRACES)
    assert len(_TRACES) == traces  # new label contents do not retrace
