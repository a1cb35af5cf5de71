"""HigherHRNet post-processing (research/higherhrnet/inference.py, group.py) against the official chain's golden.

golden_grouping.npz (README section "Post-processing golden") holds four cases of synthetic network outputs run
through the official `get_multi_stage_outputs` / `aggregate_results` / `HeatmapParser.parse` / `get_final_preds`,
with every intermediate. Its arithmetic is exact in float32 (README "Exact arithmetic"), so every array is checked
for equality (tolerance zero), step by step:

  * the chain (`multi_scale_inference` with a stand-in network returning the stored outputs, then
    `people_from_maps`) is compared at every stage: per-scale maps, aggregated maps, NMS, top-k, each Munkres call
    (cost, distances, pairs, keys, sizes), grouped, adjusted, refined, scores, final keypoints and tags;
  * the grouping steps are also run alone from the golden's own inputs, so a failure points at one step;
  * case D has ties between optimal assignments: scipy agrees with munkres there (README), and a solver on the
    reversed matrix gives the golden's alternative result.
Unit tests cover what the golden cannot reach: resize against torch on non-exact data, the true division by the
number of scales, NMS plateaus and top-k tie order, adjust at the border, the affine round trip, settings checks.
"""

import os

import jax
import numpy as np
import pytest

from conftest import REFERENCE
from research.higherhrnet import group, inference
from research.higherhrnet.group import PostprocessSettings

GOLDEN = os.path.join(REFERENCE, "higherhrnet_w32_512", "golden_grouping.npz")
CASES = ("A", "B", "C", "D")
MATCH_KEYS = ("joint", "cost", "dist", "pairs", "keys", "num_added", "num_grouped")


def assert_exact(name, mine, gold):
    """Equality of values and shapes (tolerance zero), with the max error and count in the message."""
    mine, gold = np.asarray(mine), np.asarray(gold)
    assert mine.shape == gold.shape, f"{name}: shape {mine.shape} != golden {gold.shape}"
    if not np.array_equal(mine, gold):
        diff = np.abs(mine.astype(np.float64) - gold.astype(np.float64))
        pytest.fail(f"{name}: {np.count_nonzero(diff)} of {diff.size} entries differ, max |error| {diff.max():.3g}")


def to_nchw(x):
    """[B, H, W, J(, T)] -> the official [B, J, H, W(, T)]."""
    return np.moveaxis(np.asarray(x), 3, 1)


def to_nhwc(x):
    return np.moveaxis(np.asarray(x), 1, -1)


class StandInNetwork:
    """Returns the stored outputs of one case, like the golden's generator: for each scale (descending) the first
    call gets the image, the second must get its mirror (checked)."""

    def __init__(self, outputs_by_scale):
        self.outputs_by_scale = outputs_by_scale  # [(orig, flip, input)] per scale
        self.calls = 0

    def __call__(self, x):
        orig, flip, image = self.outputs_by_scale[self.calls // 2]
        if self.calls % 2 == 0:
            assert np.array_equal(np.asarray(x), image), "first call of a scale must get that scale's input"
            out = orig
        else:
            assert np.array_equal(np.asarray(x), image[:, :, ::-1]), "second call must get the mirrored input"
            out = flip
        self.calls += 1
        return out


class Case:
    """One golden case: settings, geometry and the whole chain run once on the stored network outputs."""

    def __init__(self, name, z):
        self.name = name
        self.z = z
        self._cache = {}
        scales = [float(s) for s in z[f"{name}/scales"]]
        self.multi = len(scales) > 1
        self.settings = PostprocessSettings(scale_factors=tuple(scales))
        self.geometry = inference.multi_scale_geometry(z[f"{name}/image_shape"][:2], self.settings)

        rng = np.random.default_rng(0)
        per_scale = []
        for s, (w, h) in zip(self.geometry["scales"], self.geometry["input_sizes"]):
            pre = self.out_prefix(s)
            orig = tuple(to_nhwc(z[f"{pre}orig/{i}"]) for i in range(2))
            flip = tuple(to_nhwc(z[f"{pre}flip/{i}"]) for i in range(2))
            per_scale.append((orig, flip, rng.uniform(0, 1, (1, h, w, 3)).astype(np.float32)))
        network = StandInNetwork(per_scale)
        agg = inference.multi_scale_inference(network, [x for _, _, x in per_scale], self.settings,
                                              self.geometry["base_size"])
        assert network.calls == 2 * len(scales)
        self.per_scale = [(o, f) for o, f, _ in per_scale]
        self.heatmaps = np.asarray(agg["heatmaps"])
        self.tags = np.asarray(agg["tags"])
        self.trace = []
        self.result = inference.people_from_maps(self.heatmaps, self.tags, self.geometry["center"],
                                                 self.geometry["scale"], self.settings, trace=self.trace)[0]
        self.trace = self.trace[0]

    def out_prefix(self, s):
        return f"{self.name}/outputs/" + (f"s{s}/" if self.multi else "")

    def stage_prefix(self, s):
        return f"{self.name}/stage/" + (f"s{s}/" if self.multi else "")

    def g(self, key):
        key = f"{self.name}/{key}"
        if key not in self._cache:  # NpzFile decompresses on every access
            self._cache[key] = self.z[key]
        return self._cache[key]


@pytest.fixture(scope="module")
def golden():
    if not os.path.exists(GOLDEN):
        pytest.skip(f"golden data not found: {GOLDEN}")
    with np.load(GOLDEN) as z:
        yield z


@pytest.fixture(scope="module", params=CASES)
def case(request, golden):
    # Module scope with params: pytest runs all tests of one case before building the next.
    return Case(request.param, golden)


# ---------------------------------------------------------------------------------------- golden, chain


def test_geometry(case):
    """Input size per scale, base size, centre and scale (get_multi_scale_size) and the back-projection matrix."""
    geo = case.geometry
    assert geo["scales"] == [float(s) for s in case.g("scales")]
    for s, (w, h) in zip(geo["scales"], geo["input_sizes"]):
        assert (h, w) == tuple(case.z[case.stage_prefix(s) + "input_hw"])
    assert tuple(geo["base_size"]) == tuple(case.g("base_size"))
    assert_exact("center", geo["center"], case.g("center"))
    assert_exact("scale", geo["scale"], case.g("scale"))
    assert (case.heatmaps.shape[2], case.heatmaps.shape[1]) == tuple(case.g("heatmap_size"))
    trans = group.affine_transform_matrix(geo["center"], geo["scale"], case.g("heatmap_size"), inv=True)
    assert_exact("trans_inv", trans, case.g("trans_inv"))


@pytest.mark.parametrize("case", ["A", "B"], indirect=True)  # the golden stores per-stage maps for A and B only
def test_stage_maps(case):
    """Per-scale maps: A's image and mirror heatmaps at base size, B's per-scale flip average (heatmaps_avg)."""
    stage = jax.jit(inference.stage_outputs, static_argnames=("settings", "size_projected"))
    for s, (orig, flip) in zip(case.geometry["scales"], case.per_scale):
        heatmaps, tags = stage(orig, flip, settings=case.settings, size_projected=case.geometry["base_size"])
        assert len(heatmaps) == 2 and len(tags) == 2
        pre = case.stage_prefix(s)
        if case.name == "A":
            assert_exact("heatmaps_orig", to_nchw(heatmaps[0]), case.z[pre + "heatmaps_orig"])
            assert_exact("heatmaps_flip", to_nchw(heatmaps[1]), case.z[pre + "heatmaps_flip"])
        else:
            assert_exact(f"s{s} heatmaps_avg", to_nchw((heatmaps[0] + heatmaps[1]) / 2.0), case.z[pre + "heatmaps_avg"])


def test_aggregated_maps(case):
    """final_heatmaps / number of scales and the stacked (image, mirror) tags given to parse."""
    assert_exact("aggregated/heatmaps", to_nchw(case.heatmaps), case.g("aggregated/heatmaps"))
    assert_exact("aggregated/tags", to_nchw(case.tags), case.g("aggregated/tags"))


def test_nms(case):
    det = group.nms(case.g("aggregated/heatmaps").transpose(0, 2, 3, 1), 5, 2)
    assert_exact("nms", to_nchw(det), case.g("nms"))


def test_top_k(case):
    """Chain's candidates and top_k run alone on the golden maps."""
    alone = jax.jit(group.top_k, static_argnames="settings")(
        to_nhwc(case.g("aggregated/heatmaps")), np.moveaxis(case.g("aggregated/tags"), 1, 3), settings=case.settings)
    for key in ("val", "tag", "loc"):
        assert_exact(f"topk/{key}", case.result["candidates"][key], case.g(f"topk/{key}")[0])
        assert_exact(f"topk/{key} (alone)", alone[key], case.g(f"topk/{key}"))


def check_steps(case, trace, label):
    assert len(trace) == int(case.g("match/count")), f"{label}: number of matching calls"
    for k, step in enumerate(trace):
        for key in MATCH_KEYS:
            assert_exact(f"{label} match/{k}/{key}", step[key], case.g(f"match/{k}/{key}"))


def test_matching_steps(case):
    """Every Munkres call of the chain: joint type, cost matrix, distances, pairs, group keys, sizes."""
    check_steps(case, case.trace, "chain")
    assert_exact("grouped_raw", case.result["grouped_raw"], case.g("grouped_raw"))


def test_match_by_tag_alone(case):
    """match_by_tag from the golden's top-k output."""
    trace = []
    grouped = group.match_by_tag(case.g("topk/val")[0], case.g("topk/tag")[0], case.g("topk/loc")[0],
                                 case.settings, trace=trace)
    check_steps(case, trace, "alone")
    assert_exact("grouped_raw (alone)", grouped, case.g("grouped_raw"))


def test_adjust_scores_refine(case):
    """Chain's adjusted / refined / scores, and adjust, person_scores, refine run alone on the golden inputs."""
    assert_exact("adjusted", case.result["adjusted"], case.g("adjusted"))
    assert_exact("refined", case.result["people"], case.g("refined"))
    assert_exact("scores", case.result["scores"], case.g("final/scores"))

    det = to_nhwc(case.g("aggregated/heatmaps"))[0]
    tags = np.moveaxis(case.g("aggregated/tags")[0], 0, 2)
    assert_exact("adjusted (alone)", group.adjust(case.g("grouped_raw"), det), case.g("adjusted"))
    assert_exact("scores (alone)", group.person_scores(case.g("adjusted")), case.g("final/scores"))
    refined = np.stack([group.refine(p, det, tags) for p in case.g("adjusted")])
    assert_exact("refined (alone)", refined, case.g("refined"))


def test_final_people(case):
    """get_final_preds: keypoints in original pixels and tags, from the chain and alone from golden refined."""
    assert_exact("final/keypoints", case.result["keypoints"][..., :3], case.g("final/keypoints"))
    assert_exact("final/tags", case.result["keypoints"][..., 3:], case.g("final/tags"))
    alone = group.final_preds(case.g("refined"), case.g("center"), case.g("scale"), case.g("heatmap_size"))
    assert_exact("final/keypoints (alone)", alone[..., :3], case.g("final/keypoints"))
    assert_exact("final/tags (alone)", alone[..., 3:], case.g("final/tags"))


def test_groups_are_the_planted_people(case):
    """Not official, a sanity check of the data: each group found is the planted person the golden says."""
    pk, amp = case.g("planted/keypoints"), case.g("planted/amp")
    for n, p in enumerate(case.g("reference/planted_person_of_group")):
        if p < 0:
            continue
        # Grouped joints the person really has (C's stray ankle peak SA joins P1, who has no right ankle).
        present = (case.result["grouped_raw"][n, :, 2] > 0) & (amp[p] > 0)
        assert present.sum() >= 5
        err = np.abs(case.result["keypoints"][n, present, :2] - pk[p, present])
        assert err.max() < 4.0, f"group {n}: {err.max():.2f} px from planted person {p}"


@pytest.mark.parametrize("case", ["D"], indirect=True)  # only D has ties between optimal assignments
def test_alternative_optimum_d(case):
    """D's ties: scipy on the row- and column-reversed cost matrix finds another optimum (golden D/alt)."""

    def reversed_solver(cost):
        pairs = group.hungarian(cost[::-1, ::-1])
        pairs = np.stack((cost.shape[0] - 1 - pairs[:, 0], cost.shape[1] - 1 - pairs[:, 1]), axis=1)
        return pairs[np.argsort(pairs[:, 0])]

    cand = {k: case.g(f"topk/{k}")[0] for k in ("val", "tag", "loc")}
    det = to_nhwc(case.g("aggregated/heatmaps"))[0]
    tags = np.moveaxis(case.g("aggregated/tags")[0], 0, 2)
    out = group.parse(det, tags, cand, case.settings, solver=reversed_solver)
    final = group.final_preds(out["people"], case.g("center"), case.g("scale"), case.g("heatmap_size"))
    alt = "alt/scipy_reversed/"
    assert_exact("alt grouped_raw", out["grouped_raw"], case.g(alt + "grouped_raw"))
    assert_exact("alt refined", out["people"], case.g(alt + "refined"))
    assert_exact("alt scores", out["scores"], case.g(alt + "final/scores"))
    assert_exact("alt keypoints", final[..., :3], case.g(alt + "final/keypoints"))
    assert_exact("alt tags", final[..., 3:], case.g(alt + "final/tags"))
    assert len(out["people"]) != len(case.g("grouped_raw")), "the alternative optimum must change the outcome"


# ---------------------------------------------------------------------------------------- units


def test_resize_matches_torch():
    """Source taps bit-identical to torch's interpolate (bilinear, align_corners=False); on non-exact data the
    values agree within torch's fused multiply-add rounding (a few 1e-7 on N(0, 1) data)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    resize = jax.jit(inference.resize_bilinear, static_argnames="size_hw")
    for (h, w, oh, ow) in [(16, 24, 64, 96), (7, 9, 20, 13), (33, 17, 64, 64), (40, 30, 17, 11), (10, 10, 10, 25)]:
        # Channels 0-3: unit impulses two pixels apart (four phases). Each output touches at most one impulse, so
        # it is one product of a row and a column weight, rounded once in both implementations: torch's taps
        # themselves. Channels 4-6: N(0, 1) data.
        x = np.zeros((1, h, w, 7), np.float32)
        for c, (dy, dx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
            x[0, dy::2, dx::2, c] = 1
        x[..., 4:] = rng.standard_normal((1, h, w, 3))
        mine = np.asarray(resize(x, size_hw=(oh, ow)))
        ref = torch.nn.functional.interpolate(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
                                              size=(oh, ow), mode="bilinear", align_corners=False).numpy()
        ref = ref.transpose(0, 2, 3, 1)
        assert_exact(f"resize taps {(h, w, oh, ow)}", mine[..., :4], ref[..., :4])
        assert np.abs(mine[..., 4:] - ref[..., 4:]).max() <= 4 * np.finfo(np.float32).eps * np.abs(x).max()


def test_true_division_by_number_of_scales():
    """x / 3 correctly rounded under jit (XLA would otherwise multiply by float32(1/3), 1 ulp off in ~1/3)."""
    x = np.random.default_rng(1).uniform(0, 3, (1, 64, 96, 17)).astype(np.float32)
    tags = [np.zeros((1, 64, 96, 17), np.float32)] * 2
    got = jax.jit(lambda a, t: inference.finish_aggregation(a, t, 3))(x, tags)
    assert_exact("x / 3", got["heatmaps"], x / np.float32(3))
    assert got["tags"].shape == (1, 64, 96, 17, 2)
    naive = np.asarray(jax.jit(lambda a: a / 3)(x))
    assert not np.array_equal(naive, x / np.float32(3)), "XLA now divides exactly: the barrier may be dropped"


def test_nms_plateau_and_top_k_ties():
    """Equal maxima in one window all survive NMS; top-k orders equal values by row-major index."""
    det = np.zeros((1, 8, 8, 1), np.float32)
    det[0, 2, 2, 0] = det[0, 2, 3, 0] = 0.5  # plateau
    det[0, 6, 6, 0] = 0.5
    det[0, 5, 6, 0] = 0.25  # suppressed by its neighbour
    det[0, 0, 7, 0] = -0.1  # negative pixels never survive as candidates above zero
    kept = np.asarray(group.nms(det))[0, :, :, 0]
    assert kept[2, 2] == kept[2, 3] == kept[6, 6] == 0.5 and kept[5, 6] == 0
    tags = np.arange(64, dtype=np.float32).reshape(1, 8, 8, 1, 1)
    out = group.top_k(det, tags, PostprocessSettings(num_joints=1, max_num_people=4, joint_order=(0,),
                                                     flip_index=(0,)))
    np.testing.assert_array_equal(np.asarray(out["loc"])[0, 0, :3], [[2, 2], [3, 2], [6, 6]])
    np.testing.assert_array_equal(np.asarray(out["tag"])[0, 0, :3, 0], [18, 19, 54])
    np.testing.assert_array_equal(np.asarray(out["val"])[0, 0, :3], [0.5, 0.5, 0.5])


def test_adjust_border_and_equal_neighbours():
    """Pixel centre plus a quarter towards the larger neighbour; the clamped border neighbour is the pixel itself."""
    det = np.zeros((5, 6, 1), np.float32)
    det[2, 5, 0] = 1.0
    det[2, 4, 0] = 0.5  # last column: the right 'neighbour' is the pixel itself (1.0 > 0.5): +0.25
    det[1, 5, 0] = 0.2  # above > below: -0.25
    grouped = np.zeros((2, 1, 5), np.float32)
    grouped[0, 0, :3] = (5, 2, 1.0)
    grouped[1, 0, :3] = (0, 0, 0.3)  # flat corner: ties give -0.25 on both axes
    out = group.adjust(grouped, det)
    np.testing.assert_array_equal(out[0, 0, :2], [5.75, 2.25])
    np.testing.assert_array_equal(out[1, 0, :2], [0.25, 0.25])
    np.testing.assert_array_equal(grouped[0, 0, :2], [5, 2])  # input untouched


def test_affine_round_trip():
    """Forward and inverse maps compose to the identity; the inverse scales by scale[0] * 200 / W."""
    for center, scale, size in [((320, 240), (3.3, 2.4), (704, 512)), ((214, 320), (2.135, 3.2025), (512, 768)),
                                ((320, 240), (3.6, 2.4), (192, 128)), ((101, 57), (1.37, 0.81), (256, 256))]:
        fwd = group.affine_transform_matrix(center, scale, size)
        inv = group.affine_transform_matrix(center, scale, size, inv=True)
        compose = np.vstack([fwd, [0, 0, 1]]) @ np.vstack([inv, [0, 0, 1]])
        np.testing.assert_allclose(compose, np.eye(3), atol=1e-12)
        assert inv[0, 0] == pytest.approx(np.float32(scale[0] * 200) / size[0], rel=1e-12)
        np.testing.assert_allclose(inv @ [size[0] / 2, size[1] / 2, 1], center, atol=1e-9)


def test_empty_and_invalid():
    settings = PostprocessSettings()
    val = np.full((17, 30), 0.05, np.float32)  # nothing above the detection threshold
    out = group.parse(np.zeros((8, 8, 17), np.float32), np.zeros((8, 8, 17, 2), np.float32),
                      {"val": val, "tag": np.zeros((17, 30, 2), np.float32), "loc": np.zeros((17, 30, 2), np.int32)},
                      settings)
    assert out["people"].shape == (0, 17, 5) and out["scores"].shape == (0,)
    assert group.final_preds(out["people"], (10, 10), (1, 1), (8, 8)).shape == (0, 17, 5)
    with pytest.raises(ValueError):
        PostprocessSettings(scale_factors=(0.5, 2.0))
    with pytest.raises(ValueError):
        PostprocessSettings(joint_order=tuple(range(16)))
    with pytest.raises(ValueError):
        inference.aggregate_outputs([], settings, (64, 64))


@pytest.mark.parametrize("tag_dim,shared_tag", [(2, False), (1, False), (2, True)])
def test_refine_pruned_equals_refine(tag_dim, shared_tag):
    """parse's refine (top-m pixels per joint, whole-map search only when the bound fails) gives `refine`'s people bit
    for bit: quantised heatmaps (many tied maxima, so the first-maximum rule matters), person tags near some pixel
    tags (pruned path) and far from all (whole-map path), T = 1 or 2, per-joint or shared tag maps."""
    rng = np.random.default_rng(tag_dim + 3 * shared_tag)
    h, w, j = 48, 40, 5
    heat = (np.round(rng.random((h, w, j)) * 8) / 8).astype(np.float32)  # 9 levels: many ties
    heat[rng.random((h, w, j)) < 0.05] = 0.0
    tags = rng.normal(0.0, 1.5, (h, w, 1 if shared_tag else j, tag_dim)).astype(np.float32)
    people = np.zeros((12, j, 3 + tag_dim), np.float32)
    for p in range(12):
        present = rng.choice(j, 1 + p % 3, replace=False)
        for k in present:
            people[p, k, :3] = (rng.integers(0, w), rng.integers(0, h), 0.5)
    people[10, :, :3] = 0.0
    people[10, 0, :3] = (3, 4, 0.7)
    tags[4, 3, 0] = 40.0  # person 10's tag is far from every other tag: round(distance) > heatmap range
    det = np.ascontiguousarray(np.moveaxis(heat, 2, 0))
    full_tags = np.broadcast_to(tags, (h, w, j, tag_dim)) if shared_tag else tags
    want = np.stack([group.refine(p, heat, full_tags) for p in people])
    for m in (16, 200, h * w):
        cands = group.RefineCandidates(det, tags, m=m)
        got = np.stack([group.refine_pruned(p, det, cands) for p in people])
        assert_exact(f"refine_pruned m={m}", got, want)
    assert (want[:, :, 2] > 0).sum() > (people[:, :, 2] > 0).sum()  # refine filled joints

    # both branches ran at m=200: count whole-map searches
    cands = group.RefineCandidates(det, tags, m=200)
    fallbacks = []
    orig = cands.argmax

    def counting(jj, prev):
        s = cands.cand_det[jj] - np.round(np.sqrt(((cands.tags[cands.flat[jj], cands._tag_column(jj)]
                                                    - prev[None]) ** 2).sum(-1)))
        fallbacks.append(bool(s.max() <= cands.floor[jj]))
        return orig(jj, prev)

    cands.argmax = counting
    for p in people:
        group.refine_pruned(p, det, cands)
    assert any(fallbacks) and not all(fallbacks), fallbacks

    with pytest.raises(ValueError, match="RefineCandidates"):
        group.RefineCandidates(det, tags[:, :-1])


@pytest.mark.parametrize("kernel,padding", [(5, 2), (3, 1), (1, 0)])
def test_nms_equals_one_max_pool_window(kernel, padding):
    """The separable maximum of `group.nms` keeps exactly the pixels torch's max_pool2d (one k x k reduce_window with
    -inf padding) keeps, signed zeros and plateaus included, on coarse values with many ties."""
    import jax
    import jax.numpy as jnp
    x = np.round(np.random.default_rng(3).normal(size=(2, 37, 29, 5)), 1).astype(np.float32)
    x[0, :6, :6, 0] = 0.7  # a plateau in a corner
    pooled = jax.lax.reduce_window(jnp.asarray(x), -jnp.inf, jax.lax.max, (1, kernel, kernel, 1), (1, 1, 1, 1),
                                   ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    want = x * (np.asarray(pooled) == x)
    got = np.asarray(group.nms(x, kernel, padding))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
    assert 0 < np.count_nonzero(got) < got.size
