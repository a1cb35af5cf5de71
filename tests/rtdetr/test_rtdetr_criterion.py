"""Tests of the RT-DETR training criterion: research/rtdetr/{matcher,denoising,criterion}.py (box operations: research/vision/boxes.py, tests/test_boxes.py).

Golden data: ../shared/reference/rtdetr_r18vd/golden_loss.npz (section "Loss golden" of its
README), the official criterion run on saved model outputs. Checked against it, at the README's
tolerances: every Hungarian matching (main and auxiliary outputs) and cost matrix, every loss term
by its official name (float32: rtol 1e-5, atol 1e-6; float64: rtol 1e-10), the gradient of the
summed loss w.r.t. every output array (|diff| <= 1e-4 max|grad|), for the batch with an image
without boxes and for the batch without any box, and the N averaging over a mapped axis.

The denoising randomness cannot be reproduced (JAX PRNG, not torch's), so the generator is held to
the official layout (an independent re-statement of its loops) and to invariants that the official
noised queries stored in the golden file satisfy too: group layout, padding queries, label-noise
rate, positive / negative box-noise ranges, attention-mask blocks, and the batch without boxes.
"""

import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REFERENCE

from research.rtdetr.criterion import SetCriterion
from research.rtdetr.denoising import (denoising_attention_mask, dn_meta_from_official,
                                       get_contrastive_denoising_training_group, inverse_sigmoid,
                                       num_denoising_slots)
from research.rtdetr.matcher import (HungarianMatcher, assignment_pairs, linear_assignment_host,
                                     query_target_index)
from research.vision import boxes as box_lib

GOLDEN = os.path.join(REFERENCE, "rtdetr_r18vd", "golden_loss.npz")
LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-6   # README: float32 port on the saved outputs
GRAD_REL = 1e-4                     # README: |diff| <= 1e-4 * max|grad| per array
F64_RTOL = 1e-10                    # README: float64 port against loss_f64/
COST_ATOL = 2e-5                    # 10x the README's largest float32-vs-float64 cost difference (2.0e-6)
NUM_CLASSES = 80
PAD_LOGIT = float(np.log(np.float32(1e-5)))  # inverse_sigmoid(0): the padding queries' box
M_PAD = 4                           # target slots per image: one more than the largest count (3)


# ----------------------------------------------------------------------------- golden helpers


@pytest.fixture(scope="module")
def golden():
    if not os.path.exists(GOLDEN):
        pytest.skip(f"reference data not found at {GOLDEN}")
    with np.load(GOLDEN) as z:
        return {k: z[k] for k in z.files}


def _pair(g, prefix):
    return {"pred_logits": g[prefix + "/pred_logits"], "pred_boxes": g[prefix + "/pred_boxes"]}


def golden_case(g, prefix):
    """(outputs without dn_meta, padded targets, dn_meta or None) of one golden case."""
    outputs = _pair(g, prefix + "outputs")
    outputs["aux_outputs"] = [_pair(g, f"{prefix}outputs/aux_outputs/{i}") for i in range(3)]
    labels = np.zeros((2, M_PAD), np.int32)
    boxes = np.zeros((2, M_PAD, 4), np.float32)
    valid = np.zeros((2, M_PAD), bool)
    for b in range(2):
        n = len(g[f"{prefix}targets/{b}/labels"])
        labels[b, :n] = g[f"{prefix}targets/{b}/labels"]
        boxes[b, :n] = g[f"{prefix}targets/{b}/boxes"]
        valid[b, :n] = True
    targets = {"labels": labels, "boxes": boxes, "valid": valid}
    meta = None
    if prefix + "outputs/dn_aux_outputs/0/pred_logits" in g:
        outputs["dn_aux_outputs"] = [_pair(g, f"{prefix}outputs/dn_aux_outputs/{i}") for i in range(3)]
        meta = dn_meta_from_official([g["dn_meta/dn_positive_idx/0"], g["dn_meta/dn_positive_idx/1"]],
                                     valid.sum(1), int(g["dn_meta/dn_num_group"]), g["dn_meta/dn_num_split"])
    return outputs, targets, meta


def _flat(tree):
    """{'pred_logits': ..., 'aux_outputs/0/pred_boxes': ...} like the golden keys."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): np.asarray(v)
            for path, v in leaves}


def _loss_fn(criterion, targets, meta):
    def total(arrays):
        outputs = dict(arrays)
        if meta is not None:
            outputs["dn_meta"] = meta
        terms = criterion(outputs, targets)
        return sum(terms.values()), terms
    return jax.jit(jax.value_and_grad(total, has_aux=True))


def _check_terms(terms, g, prefix, kind="loss", rtol=LOSS_RTOL, atol=LOSS_ATOL):
    names = [k[len(prefix) + len(kind) + 1:] for k in g if k.startswith(f"{prefix}{kind}/")]
    assert names and set(names) <= set(terms)
    worst = 0.0
    for name in names:
        ref, got = float(g[f"{prefix}{kind}/{name}"]), float(terms[name])
        assert abs(got - ref) <= atol + rtol * abs(ref), (name, got, ref)
        worst = max(worst, abs(got - ref) / max(abs(ref), 1e-30))
    return names, worst


def _check_grads(grads, g, prefix):
    flat = _flat(grads)
    refs = {k[len(prefix) + len("grad/outputs/"):]: v for k, v in g.items() if k.startswith(prefix + "grad/outputs/")}
    assert set(refs) <= set(flat)
    worst = 0.0
    for key, ref in refs.items():
        diff = np.abs(flat[key] - ref).max()
        assert diff <= GRAD_REL * np.abs(ref).max(), (key, diff, np.abs(ref).max())
        if np.abs(ref).max() > 0:
            worst = max(worst, diff / np.abs(ref).max())
    return refs, flat, worst


# ----------------------------------------------------------------------------- golden: matching


def test_golden_matching(golden):
    """Cost matrices and matched pairs of every matched output, host (NumPy) and jit (pure_callback) paths."""
    matcher = HungarianMatcher()
    jit_match = jax.jit(matcher.__call__)
    for prefix in ("", "empty_batch/"):
        outputs, t, _ = golden_case(golden, prefix)
        named = [("main", outputs)] + [(f"aux_outputs/{i}", a) for i, a in enumerate(outputs["aux_outputs"])]
        for name, out in named:
            args = (out["pred_logits"], out["pred_boxes"], t["labels"], t["boxes"], t["valid"])
            cost = matcher.cost_matrix(*args)
            assert isinstance(cost, np.ndarray) and cost.dtype == np.float32
            on_host = matcher.host(*args)
            on_device = np.asarray(jit_match(*args))
            np.testing.assert_array_equal(on_device, on_host)
            pairs = assignment_pairs(on_host, t["valid"])
            for b in range(2):
                ref = golden[f"{prefix}match/{name}/{b}/cost"]
                n = ref.shape[1]
                np.testing.assert_allclose(cost[b, :, :n], ref, rtol=0, atol=COST_ATOL)
                assert not cost[b, :, n:].any()  # padding columns
                np.testing.assert_array_equal(pairs[b][0], golden[f"{prefix}match/{name}/{b}/query"])
                np.testing.assert_array_equal(pairs[b][1], golden[f"{prefix}match/{name}/{b}/target"])
    # The auxiliary outputs are matched on their own: their pairs differ from the main output's.
    assert not np.array_equal(golden["match/aux_outputs/0/0/query"], golden["match/main/0/query"])


# ----------------------------------------------------------------------------- golden: losses, gradients


def test_golden_losses_and_gradients(golden):
    """21 terms and 14 gradient arrays of the batch whose image 1 has no box (official dn queries fed in)."""
    outputs, targets, meta = golden_case(golden, "")
    (_, terms), grads = _loss_fn(SetCriterion(), targets, meta)(outputs)
    names, worst = _check_terms(terms, golden, "")
    assert len(names) == 21 and sorted(terms) == sorted(names)  # exactly the official names
    refs, _, gworst = _check_grads(grads, golden, "")
    assert len(refs) == 14
    print(f"\n[main] 21 terms max rel err {worst:.1e} (tol {LOSS_RTOL:g}); 14 grads max err/max {gworst:.1e} "
          f"(tol {GRAD_REL:g})")


def test_golden_empty_batch_with_inactive_denoising(golden):
    """The batch without boxes (12 terms, 8 gradients); our dn outputs (all slots inactive) add exact zeros."""
    outputs, targets, _ = golden_case(golden, "empty_batch/")
    _, _, _, meta = get_contrastive_denoising_training_group(
        jax.random.PRNGKey(0), targets["labels"], targets["boxes"], targets["valid"], NUM_CLASSES, 300)
    d = meta["dn_num_split"][0]
    assert d == 200 and not np.asarray(meta["dn_valid"]).any()
    rng = np.random.default_rng(0)
    outputs["dn_aux_outputs"] = [{"pred_logits": rng.normal(-4.6, 2, (2, d, NUM_CLASSES)).astype(np.float32),
                                  "pred_boxes": rng.uniform(0.1, 0.9, (2, d, 4)).astype(np.float32)}
                                 for _ in range(3)]
    (total, terms), grads = _loss_fn(SetCriterion(), targets, meta)(outputs)
    names, worst = _check_terms(terms, golden, "empty_batch/")
    assert len(names) == 12  # the README's prose says 9; the file (and its verify line) hold 12
    dn_terms = {k: float(v) for k, v in terms.items() if "_dn_" in k}
    assert len(dn_terms) == 9 and all(v == 0.0 for v in dn_terms.values())
    ref_total = sum(float(golden[f"empty_batch/loss/{k}"]) for k in names)
    assert abs(float(total) - ref_total) <= LOSS_RTOL * ref_total
    refs, flat, gworst = _check_grads(grads, golden, "empty_batch/")
    assert len(refs) == 8
    for key in refs:  # no box term: box gradients exactly 0, as officially
        if key.endswith("pred_boxes"):
            assert not flat[key].any()
    assert all(not v.any() for k, v in flat.items() if k.startswith("dn_aux_outputs"))
    print(f"\n[empty batch] 12 terms max rel err {worst:.1e}; 8 grads max err/max {gworst:.1e}; dn terms exactly 0")


def test_golden_float64(golden):
    """The same criterion in float64 against the official float64 recomputation (loss_f64/)."""
    worst = 0.0
    with jax.enable_x64(True):
        for prefix in ("", "empty_batch/"):
            outputs, targets, meta = golden_case(golden, prefix)
            outputs = jax.tree.map(lambda a: np.asarray(a, np.float64), outputs)
            targets["boxes"] = targets["boxes"].astype(np.float64)
            if meta is not None:
                outputs["dn_meta"] = meta
            terms = jax.jit(SetCriterion().__call__)(outputs, targets)
            assert terms["loss_vfl"].dtype == jnp.float64
            _, w = _check_terms(terms, golden, prefix, kind="loss_f64", rtol=F64_RTOL, atol=1e-300)
            worst = max(worst, w)
    print(f"\n[float64] 33 terms max rel err {worst:.1e} (tol {F64_RTOL:g})")


def test_golden_num_boxes_averaged_over_devices(golden):
    """axis_name: one image per device; N is averaged over devices (official all_reduce / world size).

    Device 0 holds 3 boxes, device 1 none, so N = 1.5 on both, and the mean over devices of each
    term equals the single-device batch value.
    """
    outputs, targets, meta = golden_case(golden, "")
    per_device_meta = {"dn_target_idx": meta["dn_target_idx"][:, None], "dn_valid": np.stack([meta["dn_valid"]] * 2),
                       "dn_num_group": np.stack([meta["dn_num_group"]] * 2)}
    split = jax.tree.map(lambda a: a[:, None], (outputs, targets))
    crit = SetCriterion(axis_name="device")

    def per_device(out, tgt, dn_meta):
        return crit(dict(out, dn_meta=dn_meta), tgt)

    terms = jax.jit(jax.vmap(per_device, axis_name="device"))(split[0], split[1], per_device_meta)
    for name in ("loss_vfl", "loss_giou", "loss_bbox_aux_1", "loss_vfl_dn_2", "loss_giou_dn_0"):
        ref = float(golden[f"loss/{name}"])
        np.testing.assert_allclose(float(jnp.mean(terms[name])), ref, rtol=LOSS_RTOL, atol=LOSS_ATOL)
    assert float(terms["loss_bbox"][1]) == 0.0 and float(terms["loss_bbox"][0]) > 0


# ----------------------------------------------------------------------------- matcher, box ops


def test_linear_assignment_host_brute_force():
    """Optimal total cost (all permutations) with padding slots anywhere and more targets than queries."""
    rng = np.random.default_rng(3)
    for q, m in [(5, 4), (2, 4), (6, 6)]:
        cost = rng.normal(size=(3, q, m)).astype(np.float32)
        valid = rng.random((3, m)) < 0.7
        valid[0] = False
        out = linear_assignment_host(cost, valid)
        for b in range(3):
            cols = np.flatnonzero(valid[b])
            assert (out[b, ~valid[b]] == -1).all()
            used = out[b, cols]
            assert len(set(used[used >= 0])) == (used >= 0).sum() == min(q, len(cols))
            got = sum(cost[b, used[i], c] for i, c in enumerate(cols) if used[i] >= 0)
            k = min(q, len(cols))
            best = min((sum(cost[b, r, c] for r, c in zip(rows, cset))
                        for cset in itertools.combinations(cols, k) for rows in itertools.permutations(range(q), k)),
                       default=0.0)
            assert got == pytest.approx(best, abs=1e-5)
    # Class cost alone: focal form (official formula, 1e-8 inside the logs) and, without focal loss, -softmax.
    logits = rng.normal(size=(1, 3, 5)).astype(np.float32)
    labels = np.array([[4, 0]])
    boxes, pred_boxes = np.full((1, 2, 4), 0.5, np.float32), np.full((1, 3, 4), 0.5, np.float32)
    p = 1 / (1 + np.exp(-logits[0][:, [4, 0]].astype(np.float64)))
    focal = 0.25 * (1 - p) ** 2 * -np.log(p + 1e-8) - 0.75 * p ** 2 * -np.log(1 - p + 1e-8)
    cost = HungarianMatcher(cost_class=1, cost_bbox=0, cost_giou=0).cost_matrix(logits, pred_boxes, labels, boxes)
    np.testing.assert_allclose(cost[0], focal, rtol=1e-5)
    soft = np.exp(logits[0]) / np.exp(logits[0]).sum(-1, keepdims=True)
    cost = HungarianMatcher(cost_class=1, cost_bbox=0, cost_giou=0, use_focal_loss=False).cost_matrix(
        logits, pred_boxes, labels, boxes)
    np.testing.assert_allclose(cost[0], -soft[:, [4, 0]], rtol=1e-5)
    with pytest.raises(ValueError):
        HungarianMatcher(cost_class=0, cost_bbox=0, cost_giou=0)
    per_query = np.asarray(query_target_index(jnp.asarray([[2, -1, 0]]), 4))
    np.testing.assert_array_equal(per_query, [[2, -1, 0, -1]])


# ----------------------------------------------------------------------------- denoising


def official_layout(num_targets, num_denoising=100):
    """Independent re-statement of the official loops: per official query, (group, j, negative, real per image)."""
    g = max(num_targets)
    groups = max(num_denoising // g, 1)
    rows = []
    for grp in range(groups):
        for half in (False, True):
            for j in range(g):
                rows.append((grp, j, half, [j < n for n in num_targets]))
    return g, groups, rows


def check_noised_queries(cls, unact, clean_labels, clean_boxes, real, negative):
    """Invariants of the official noise on queries `[B, D]`; returns (label flips, positive / negative ratios).

    clean_*: the un-noised label / cxcywh box of each slot; real `[B, D]`, negative `[D]`.
    The ratio is |corner shift| / (half box size) of corners that were not clipped to the image.
    """
    cls, unact = np.asarray(cls), np.asarray(unact, np.float64)
    assert (cls[~real] == NUM_CLASSES).all()
    np.testing.assert_allclose(unact[~real], PAD_LOGIT, atol=1e-5)
    assert ((cls[real] >= 0) & (cls[real] < NUM_CLASSES)).all()
    decoded = 1 / (1 + np.exp(-unact))
    noisy = box_lib.cxcywh_to_xyxy(decoded)[real]
    clean = box_lib.cxcywh_to_xyxy(clean_boxes.astype(np.float64))[real]
    half = np.tile(clean_boxes[..., 2:].astype(np.float64) / 2, 2)[real]
    neg = np.broadcast_to(negative[None, :, None], real.shape + (4,))[real]
    tol = 3e-5
    # Corners that crossed (x1 < x0) give a negative size, which the logit clips to 1e-5: their
    # positions are lost. Only a negative query's noise (>= half the size per corner) can do that.
    collapsed = np.tile(decoded[..., 2:] < tol, 2)[real]
    assert not (collapsed & ~neg).any()
    lo, hi = np.where(neg, half, 0.0), np.where(neg, 2 * half, half)
    inside = (noisy > tol) & (noisy < 1 - tol) & ~collapsed
    shift = np.abs(noisy - clean)
    assert (shift[inside] >= lo[inside] - tol).all() and (shift[inside] <= hi[inside] + tol).all()
    # Clipped corners: the edge must lie within reach of the corner's noise range.
    reach = np.where(noisy <= tol, clean, np.where(noisy >= 1 - tol, 1 - clean, 0))
    assert (reach[~collapsed] <= hi[~collapsed] + tol).all()
    ratio = shift / half
    return cls[real] != clean_labels[real], ratio[inside & ~neg], ratio[inside & neg], np.sign(noisy - clean)[inside]


def test_golden_official_denoising_layout_and_noise(golden):
    """Our layout on the golden targets equals the official one; the official noised queries pass our invariants."""
    _, targets, meta = golden_case(golden, "")
    qc, qb, mask, ours = get_contrastive_denoising_training_group(
        jax.random.PRNGKey(1), targets["labels"], targets["boxes"], targets["valid"], NUM_CLASSES, 300)
    d_off = int(golden["dn_meta/dn_num_split"][0])
    assert d_off == 198 and ours["dn_num_split"] == (num_denoising_slots(M_PAD), 300) == (200, 300)
    assert int(ours["dn_num_group"]) == int(golden["dn_meta/dn_num_group"]) == 33
    np.testing.assert_array_equal(np.asarray(ours["dn_valid"]), np.arange(200) < d_off)
    np.testing.assert_array_equal(np.asarray(ours["dn_target_idx"])[:, :d_off], meta["dn_target_idx"])
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(ours["dn_target_idx"])[0] >= 0),
                                  golden["dn_meta/dn_positive_idx/0"])
    off_cls, off_unact = golden["dn_input/class"], golden["dn_input/bbox_unact"]
    np.testing.assert_array_equal(np.asarray(qc)[:, :d_off] == NUM_CLASSES, off_cls == NUM_CLASSES)

    _, _, rows = official_layout([3, 0])
    j = np.array([r[1] for r in rows])
    negative = np.array([r[2] for r in rows])
    real = np.array([r[3] for r in rows]).T
    clean_labels = targets["labels"][:, j]
    clean_boxes = targets["boxes"][:, j]
    for cls, unact in ((off_cls, off_unact), (np.asarray(qc)[:, :d_off], np.asarray(qb)[:, :d_off])):
        flips, pos, neg, _ = check_noised_queries(cls, unact, clean_labels, clean_boxes, real, negative)
        assert 0 < flips.sum() < 0.5 * flips.size and pos.size > 300 and neg.size > 150
        assert pos.max() > 0.8 and neg.min() < 1.2 and neg.max() > 1.8  # the ranges are used, not just respected


def test_denoising_generator_layout_mask_and_noise():
    """Random targets (padding slots between real ones, an image without boxes): layout, mask, noise statistics."""
    rng = np.random.default_rng(5)
    counts, m, nq = [5, 0, 2, 7], 9, 6
    labels = rng.integers(0, NUM_CLASSES, (4, m)).astype(np.int32)
    boxes = np.concatenate([rng.uniform(0.35, 0.65, (4, m, 2)), rng.uniform(0.04, 0.2, (4, m, 2))], -1)
    boxes = boxes.astype(np.float32)
    valid = np.zeros((4, m), bool)
    for b, n in enumerate(counts):
        valid[b, np.sort(rng.choice(m, n, replace=False))] = True
    build = jax.jit(lambda k, l, bx, v: get_contrastive_denoising_training_group(k, l, bx, v, NUM_CLASSES, nq))
    qc, qb, mask, meta = build(jax.random.PRNGKey(2), labels, boxes, valid)
    d = num_denoising_slots(m)
    assert qc.shape == (4, d) and qb.shape == (4, d, 4) and mask.shape == (d + nq, d + nq) == (206, 206)

    g, groups, rows = official_layout(counts)
    assert (g, groups, len(rows), int(meta["dn_num_group"])) == (7, 14, 196, 14)
    active = np.asarray(meta["dn_valid"])
    np.testing.assert_array_equal(active, np.arange(d) < len(rows))
    target_idx = np.asarray(meta["dn_target_idx"])
    slots = [np.flatnonzero(valid[b]) for b in range(4)]
    for s, (grp, j, neg, real) in enumerate(rows):
        for b in range(4):
            assert target_idx[b, s] == (slots[b][j] if real[b] and not neg else -1)
    assert (target_idx[:, len(rows):] == -1).all()

    # Attention mask: official blocks, re-stated with loops; inactive slots hidden from everyone else.
    mask = np.asarray(mask)
    for r in range(d + nq):
        for c in range(d + nq):
            if r >= d:
                want = c < d
            elif c >= d:
                want = False
            elif r < len(rows) and c < len(rows):
                want = rows[r][0] != rows[c][0]
            else:
                want = r != c
            assert mask[r, c] == want, (r, c)

    order = np.argsort(~valid, axis=1, kind="stable")
    j = np.array([r[1] for r in rows])
    clean_labels = np.take_along_axis(labels, order, 1)[:, j]
    clean_boxes = np.take_along_axis(boxes, order[..., None], 1)[:, j]
    real = np.array([r[3] for r in rows]).T
    negative = np.array([r[2] for r in rows])
    check_noised_queries(np.asarray(qc)[:, :len(rows)], np.asarray(qb)[:, :len(rows)], clean_labels, clean_boxes,
                         real, negative)
    assert (np.asarray(qc)[:, len(rows):] == NUM_CLASSES).all()
    np.testing.assert_allclose(np.asarray(qb)[:, len(rows):], PAD_LOGIT, atol=1e-5)

    # Statistics on a larger batch (2 boxes per image: 50 groups, no clipping by construction).
    big_l = rng.integers(0, NUM_CLASSES, (16, 2)).astype(np.int32)
    big_b = np.concatenate([rng.uniform(0.35, 0.65, (16, 2, 2)), rng.uniform(0.04, 0.2, (16, 2, 2))], -1)
    big_b = big_b.astype(np.float32)
    qc, qb, _, meta = build(jax.random.PRNGKey(3), big_l, big_b, np.ones((16, 2), bool))
    _, _, rows = official_layout([2] * 16)
    j = np.array([r[1] for r in rows])
    flips, pos, neg, sign = check_noised_queries(qc, qb, big_l[:, j], big_b[:, j], np.ones((16, 200), bool),
                                                 np.array([r[2] for r in rows]))
    assert abs(flips.mean() - 0.25 * 79 / 80) < 0.04      # 0.5 / 2 flipped, 1/80 of them to the same class
    assert abs(pos.mean() - 0.5) < 0.03 and abs(neg.mean() - 1.5) < 0.03 and abs((sign > 0).mean() - 0.5) < 0.03
    # Every positive corner is kept; a negative axis collapses when both corners move inwards (1 in 4).
    assert pos.size == 16 * 100 * 4 and abs(neg.size / pos.size - 0.75) < 0.05


def test_denoising_no_boxes_static_shapes_and_options():
    """No box anywhere: all slots inactive; one trace for every box count; embed, no-noise and off switches."""
    traces = []

    def build(labels, boxes, valid):
        traces.append(1)
        return get_contrastive_denoising_training_group(jax.random.PRNGKey(0), labels, boxes, valid, NUM_CLASSES, 5)

    build = jax.jit(build)
    labels = np.zeros((2, 3), np.int32)
    boxes = np.full((2, 3, 4), 0.3, np.float32)
    for valid in ([[1, 1, 0], [0, 0, 0]], [[1, 1, 1], [1, 0, 1]], [[0, 0, 0], [0, 0, 0]]):
        qc, qb, mask, meta = build(labels, boxes, np.asarray(valid, bool))
    assert len(traces) == 1  # static shapes: the box counts never retrace
    mask = np.asarray(mask)
    assert not np.asarray(meta["dn_valid"]).any() and (np.asarray(meta["dn_target_idx"]) == -1).all()
    assert int(meta["dn_num_group"]) == 1 and (np.asarray(qc) == NUM_CLASSES).all()
    np.testing.assert_allclose(np.asarray(qb), PAD_LOGIT, atol=1e-5)
    d = 200
    assert mask[d:, :d].all() and not mask[d:, d:].any()              # matching queries: only each other
    np.testing.assert_array_equal(mask[:d, :d], ~np.eye(d, dtype=bool))  # each slot sees itself only
    assert not mask[:d, d:].any()

    table = np.random.default_rng(0).normal(size=(NUM_CLASSES + 1, 8)).astype(np.float32)
    valid = np.array([[1, 0, 1], [0, 0, 0]], bool)
    ids, _, _, _ = get_contrastive_denoising_training_group(jax.random.PRNGKey(4), labels, boxes, valid,
                                                            NUM_CLASSES, 5)
    emb, _, _, _ = get_contrastive_denoising_training_group(jax.random.PRNGKey(4), labels, boxes, valid,
                                                            NUM_CLASSES, 5, class_embed=lambda i: jnp.asarray(table)[i])
    np.testing.assert_array_equal(np.asarray(emb), table[np.asarray(ids)])
    # No noise: labels kept; and (official quirk) no logit transform without box noise.
    qc, qb, _, _ = get_contrastive_denoising_training_group(jax.random.PRNGKey(4), labels, boxes, valid, NUM_CLASSES,
                                                            5, label_noise_ratio=0.0, box_noise_scale=0.0)
    assert (np.asarray(qc)[0, :2] == 0).all() and np.allclose(np.asarray(qb)[0, :2], 0.3)
    assert get_contrastive_denoising_training_group(jax.random.PRNGKey(0), labels, boxes, valid, NUM_CLASSES, 5,
                                                    num_denoising=0) == (None, None, None, None)
    np.testing.assert_allclose(np.asarray(inverse_sigmoid(jnp.asarray([0.0, 0.25, 1.0, 2.0]))),
                               [PAD_LOGIT, np.log(1 / 3), -PAD_LOGIT, -PAD_LOGIT], rtol=1e-6)
    gid = jnp.asarray([0, 0, 1, 1, -5], jnp.int32)
    m = np.asarray(denoising_attention_mask(gid, 2))
    assert not m[0, 1] and m[0, 2] and m[4, 0] and not m[4, 4] and m[5, :5].all() and not m[5, 5:].any()
