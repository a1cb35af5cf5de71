"""HigherHRNet bottom-up grouping: NMS, top-k, associative-embedding matching, adjust, refine, back-projection.

Follows the official HRNet/HigherHRNet-Human-Pose-Estimation (commit aa23881) `lib/core/group.py`
(`HeatmapParser.nms`, `top_k`, `match_by_tag`, `adjust`, `refine`, `parse`) and `lib/utils/transforms.py`
(`get_affine_transform`, `affine_transform`, `get_final_preds`), with the `TEST` settings of
`lib/config/default.py` merged with `experiments/coco/higher_hrnet/w32_512_adam_lr1e-3.yaml`.

Split by where the work runs:
  * `nms` and `top_k` are JAX, jit-able with fixed shapes (a whole map in, `max_num_people` candidates out);
  * the grouping (`match_by_tag`, `adjust`, `refine`, `person_scores`, `parse`) loops over joints and people with
    data-dependent sizes, so it is numpy on the host, in the official dtypes (float64 tag distances and costs,
    float32 maps) so every decision and every value matches the official code bit for bit;
  * `affine_transform_matrix` / `final_preds` map heatmap pixels back to original-image pixels in float64.

Layouts: maps are channels-last like the rest of the codebase: heatmaps `[B, H, W, J]` (batched, JAX side) or
`[H, W, J]` (one image, host side), tags `[B, H, W, J, T]` / `[H, W, J, T]` with T = 2 under flip test
(original, flipped). Units: heatmap pixels of the aggregated maps (pixel index, x = column, y = row) until
`final_preds`, which returns original-image pixels.

The Hungarian matching uses `scipy.optimize.linear_sum_assignment` where the official code calls `munkres`
(3.0.0); both return an optimal assignment, and on the golden cases (including one built with ties) they pick the
same one. Where several optimal assignments exist the choice may differ from munkres; `match_by_tag` takes
`solver=` to swap it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "COCO_FLIP_INDEX",
    "COCO_JOINT_ORDER",
    "PostprocessSettings",
    "nms",
    "top_k",
    "match_by_tag",
    "hungarian",
    "adjust",
    "refine",
    "person_scores",
    "parse",
    "affine_transform_matrix",
    "final_preds",
]

# Left/right swap of the 17 COCO keypoints (official `FLIP_CONFIG['COCO']`, lib/dataset/transforms/build.py).
COCO_FLIP_INDEX: Tuple[int, ...] = (0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15)

# Order in which match_by_tag visits joint types (official `Params.joint_order` without a centre joint): the hips
# (11, 12) come before the elbows (7, 8), so a person seen only from the hips down still seeds a group there.
COCO_JOINT_ORDER: Tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 11, 12, 7, 8, 9, 10, 13, 14, 15, 16)


@dataclasses.dataclass(frozen=True)
class PostprocessSettings:
    """Test-time settings of HigherHRNet post-processing (official `cfg.TEST` and friends).

    Defaults are the values in effect for `w32_512_adam_lr1e-3.yaml` (the yaml overrides some `lib/config/default.py`
    defaults; those are noted per field). Frozen and hashable, so it can be a static argument of `jax.jit`.

    Attributes:
        num_joints: DATASET.NUM_JOINTS (17, COCO). A centre joint (DATASET.WITH_CENTER) is not supported.
        max_num_people: DATASET.MAX_NUM_PEOPLE: candidates kept per joint type by top-k, and the most groups a
            candidate can be matched to.
        detection_threshold: TEST.DETECTION_THRESHOLD; a candidate joins the grouping when its heatmap value is
            strictly above it (yaml 0.1; default.py 0.2).
        tag_threshold: TEST.TAG_THRESHOLD; a matched candidate joins the group only when the unrounded tag distance
            is strictly below it, otherwise it starts a new group (1.0).
        use_detection_val: TEST.USE_DETECTION_VAL; matching cost round(distance) * 100 - value instead of the
            plain distance (True).
        ignore_too_much: TEST.IGNORE_TOO_MUCH; skip a joint type once max_num_people groups exist (False).
        adjust: TEST.ADJUST; quarter-pixel shift towards the larger neighbour plus the half-pixel centre (True).
        refine: TEST.REFINE; fill every missing joint of a group from the whole map (True).
        nms_kernel, nms_padding: TEST.NMS_KERNEL / NMS_PADDING of the max-pool NMS (yaml 5 / 2; default.py 3 / 1).
        tag_per_joint: MODEL.TAG_PER_JOINT; one tag map per joint type (True) or one shared map.
        flip_test: TEST.FLIP_TEST; average heatmaps with those of the mirrored input and stack the tags (yaml True;
            default.py False).
        flip_index: channel permutation applied to flipped outputs (COCO left/right swap).
        project2image: TEST.PROJECT2IMAGE; resize every map to the scale-1 network input size, so the aggregated
            maps have stride 1 (yaml True; default.py False). Otherwise maps stay at the stride-2 output size.
        scale_factors: TEST.SCALE_FACTOR, the multi-scale test scales ((1,); the official README's multi-scale
            command uses (0.5, 1.0, 2.0)).
        input_size: DATASET.INPUT_SIZE, the short side of the network input at scale 1 before rounding the long
            side up to a multiple of 64 (512).
        loss_with_heatmaps: LOSS.WITH_HEATMAPS_LOSS per stage output: whether the output starts with num_joints
            heatmap channels ((True, True)).
        loss_with_ae: LOSS.WITH_AE_LOSS per stage output: whether the output carries tag channels ((True, False)).
        test_with_heatmaps: TEST.WITH_HEATMAPS: stage outputs whose heatmaps are averaged ((True, True)).
        test_with_ae: TEST.WITH_AE: stage outputs whose tags are used ((True, False)).
        joint_order: visiting order of match_by_tag (COCO_JOINT_ORDER).
    """

    num_joints: int = 17
    max_num_people: int = 30
    detection_threshold: float = 0.1
    tag_threshold: float = 1.0
    use_detection_val: bool = True
    ignore_too_much: bool = False
    adjust: bool = True
    refine: bool = True
    nms_kernel: int = 5
    nms_padding: int = 2
    tag_per_joint: bool = True
    flip_test: bool = True
    flip_index: Tuple[int, ...] = COCO_FLIP_INDEX
    project2image: bool = True
    scale_factors: Tuple[float, ...] = (1.0,)
    input_size: int = 512
    loss_with_heatmaps: Tuple[bool, ...] = (True, True)
    loss_with_ae: Tuple[bool, ...] = (True, False)
    test_with_heatmaps: Tuple[bool, ...] = (True, True)
    test_with_ae: Tuple[bool, ...] = (True, False)
    joint_order: Tuple[int, ...] = COCO_JOINT_ORDER

    def __post_init__(self):
        if sorted(self.joint_order) != list(range(self.num_joints)):
            raise ValueError(f"joint_order {self.joint_order} is not a permutation of range({self.num_joints})")
        if self.flip_test and sorted(self.flip_index) != list(range(self.num_joints)):
            raise ValueError(f"flip_index {self.flip_index} is not a permutation of range({self.num_joints})")
        if not self.scale_factors:
            raise ValueError("scale_factors is empty")
        if len(self.scale_factors) > 1 and 1 not in self.scale_factors:
            # The official code takes tags from scale 1 only and then concatenates an empty list.
            raise ValueError(f"multi-scale test needs scale 1 among scale_factors, got {self.scale_factors}")


# --------------------------------------------------------------------------------------------- JAX: NMS, top-k


def nms(heatmaps, kernel: int = 5, padding: int = 2):
    """Keep each pixel that equals the maximum of its kernel x kernel window, zero the rest (official `nms`).

    Args:
        heatmaps: `[B, H, W, J]` float aggregated heatmaps.
        kernel, padding: max-pool window (stride 1) and its padding; padding counts as -inf, like torch's
            `max_pool2d`. With 2 * padding + 1 != kernel the output size changes and the comparison fails, as in
            the official code.

    Returns:
        `[B, H, W, J]`: `heatmaps * (maxpool(heatmaps) == heatmaps)`. Every pixel of a plateau of equal maxima is
        kept. The product (not a select) keeps the official signed zeros (-0.0 for negative non-maxima).
    """
    import jax.numpy as jnp

    heatmaps = jnp.asarray(heatmaps)
    # the k x k maximum as a k-wide maximum along W, then along H, each over k shifted slices (max is exact, so the
    # same values as one `reduce_window`): XLA:CPU ran the 5 x 5 `reduce_window` on [1, 512, 512, 17] in 80-100 ms,
    # two thirds of the whole grouping; this form in ~7 ms
    padded = jnp.pad(heatmaps, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=-jnp.inf)
    h, w = padded.shape[1] - kernel + 1, padded.shape[2] - kernel + 1
    rows = functools.reduce(jnp.maximum, [padded[:, :, i:i + w] for i in range(kernel)])
    pooled = functools.reduce(jnp.maximum, [rows[:, i:i + h] for i in range(kernel)])
    return heatmaps * (pooled == heatmaps).astype(heatmaps.dtype)


def top_k(heatmaps, tags, settings: PostprocessSettings = PostprocessSettings()) -> Dict[str, Any]:
    """NMS, then the `max_num_people` largest values per joint type with their tags and positions (official `top_k`).

    Args:
        heatmaps: `[B, H, W, J]` aggregated heatmaps (not yet NMS'd; NMS is applied here as in the official code).
        tags: `[B, H, W, J, T]` aggregated tags (`[B, H, W, 1, T]` when `settings.tag_per_joint` is False).
        settings: uses `max_num_people`, `nms_kernel`, `nms_padding`, `tag_per_joint`.

    Returns:
        dict with `val` `[B, J, K]` float (descending), `tag` `[B, J, K, T]`, `loc` `[B, J, K, 2]` int32 (x, y)
        pixel indices in the aggregated maps, K = max_num_people. Equal values come out lowest row-major index first
        (`jax.lax.top_k`); torch.topk leaves that order unspecified.
    """
    return top_k_of_nms(nms(heatmaps, settings.nms_kernel, settings.nms_padding), tags, settings)


def top_k_of_nms(det, tags, settings: PostprocessSettings = PostprocessSettings()) -> Dict[str, Any]:
    """`top_k` of maps already through `nms` (`det` [B, H, W, J]); same `tags`, settings and result.

    Jit it apart from `nms` (as `inference.people_from_maps` does): in one XLA:CPU computation the NMS comparison fused
    into the transpose before `lax.top_k` ran 2-3x slower than the two apart (W32-512's [1, 512, 512, 17] maps: 75
    against 29 ms, the NMS alone 10).
    """
    import jax
    import jax.numpy as jnp

    b, h, w, j = det.shape
    flat = jnp.transpose(det, (0, 3, 1, 2)).reshape(b, j, h * w)
    val, ind = jax.lax.top_k(flat, settings.max_num_people)
    x, y = ind % w, ind // w
    tags = jnp.asarray(tags)
    batch = jnp.arange(b)[:, None, None]
    joint = jnp.arange(j)[None, :, None] if settings.tag_per_joint else jnp.zeros((1, j, 1), jnp.int32)
    tag = tags[batch, y, x, joint]  # [B, J, K, T], gathered without moving the whole tag map
    return {"val": val, "tag": tag, "loc": jnp.stack((x, y), axis=-1)}


# ------------------------------------------------------------------------------------------ host: grouping


def hungarian(cost: np.ndarray) -> np.ndarray:
    """Minimum-cost assignment of a cost matrix with rows <= columns: `[rows, 2]` int32 (row, col), rows ascending.

    Stands in for the official `py_max_match` (munkres 3.0.0): both are exact on these float64 costs and find the
    same total cost, but with round(distance) * 100 - value costs ties between optimal assignments are common and
    the two may pick different ones (7% of random 1..7 x 1..7 matrices of that form; the golden cases agree). For
    the official choice on every tie pass `solver=lambda c: np.array(munkres.Munkres().compute(c), np.int32)`.
    """
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost)
    return np.stack((rows, cols), axis=1).astype(np.int32)


def match_by_tag(val: np.ndarray, tag: np.ndarray, loc: np.ndarray,
                 settings: PostprocessSettings = PostprocessSettings(),
                 solver: Callable[[np.ndarray], np.ndarray] = hungarian,
                 trace: Optional[List[Dict[str, Any]]] = None) -> np.ndarray:
    """Group one image's candidates into people by their tags (official `match_by_tag`).

    Joint types are visited in `settings.joint_order`. Candidates with value > detection_threshold take part. The
    first joint type that has any seeds one group per candidate. For every later type, each candidate is matched
    to one of the first max_num_people groups by a minimum-cost assignment on round(|tag - group mean tag|) * 100 -
    value (use_detection_val) or the distance itself; it joins its group when the unrounded distance is <
    tag_threshold and otherwise starts a new group. A group's tag is the mean of its members' tags. Groups are
    keyed by the first tag component of their first member (a new group with a bit-identical key overwrites the
    old entry's tag list and that joint, as the official dict does).

    Args:
        val: `[J, K]` candidate values (top-k output of one image), heatmap units.
        tag: `[J, K, T]` candidate tags.
        loc: `[J, K, 2]` candidate (x, y) pixel indices of the aggregated maps.
        settings: thresholds, max_num_people, joint order.
        solver: cost `[rows, cols]` (rows <= cols) -> `[rows, 2]` (row, col) pairs.
        trace: when a list, one dict per assignment call is appended: `joint`, `cost`, `dist`, `pairs`, `keys`,
            `num_added`, `num_grouped` (the official `match_by_tag` locals of that call).

    Returns:
        `[N, J, 3 + T]` float32 people in group-creation order; columns (x, y, value, tag...) with x, y integer pixel
        indices; absent joints are all zero. N may be 0.
    """
    val = np.asarray(val)
    tag = np.asarray(tag)
    loc = np.asarray(loc)
    num_joints = settings.num_joints
    width = 3 + tag.shape[2]
    empty_person = np.zeros((num_joints, width))

    joint_dict: Dict[Any, np.ndarray] = {}
    tag_dict: Dict[Any, List[np.ndarray]] = {}
    for i, idx in enumerate(settings.joint_order):
        tags = tag[idx]
        # float64 rows, like the official concatenation of int locations with float32 values and tags.
        joints = np.concatenate((loc[idx], val[idx, :, None], tags), axis=1).astype(np.float64)
        keep = joints[:, 2] > settings.detection_threshold
        tags = tags[keep]
        joints = joints[keep]
        if joints.shape[0] == 0:
            continue

        if i == 0 or not joint_dict:
            for t, joint in zip(tags, joints):
                key = t[0]
                joint_dict.setdefault(key, np.copy(empty_person))[idx] = joint
                tag_dict[key] = [t]
            continue

        grouped_keys = list(joint_dict.keys())[:settings.max_num_people]
        if settings.ignore_too_much and len(grouped_keys) == settings.max_num_people:
            continue
        # np.mean over a list of float32 tags: float32 accumulation, as the official code gets.
        grouped_tags = [np.mean(tag_dict[k], axis=0) for k in grouped_keys]
        diff = joints[:, None, 3:] - np.array(grouped_tags)[None, :, :]
        dist = np.linalg.norm(diff, ord=2, axis=2)
        cost = np.copy(dist)
        if settings.use_detection_val:
            cost = np.round(cost) * 100 - joints[:, 2:3]
        num_added, num_grouped = diff.shape[0], diff.shape[1]
        if num_added > num_grouped:
            cost = np.concatenate((cost, np.zeros((num_added, num_added - num_grouped)) + 1e10), axis=1)

        pairs = np.asarray(solver(cost))
        if trace is not None:
            trace.append({"joint": idx, "cost": cost, "dist": dist, "pairs": pairs,
                          "keys": np.array(grouped_keys, dtype=np.float64),
                          "num_added": num_added, "num_grouped": num_grouped})
        for row, col in pairs:
            if row < num_added and col < num_grouped and dist[row][col] < settings.tag_threshold:
                key = grouped_keys[col]
                joint_dict[key][idx] = joints[row]
                tag_dict[key].append(tags[row])
            else:
                key = tags[row][0]
                joint_dict.setdefault(key, np.copy(empty_person))[idx] = joints[row]
                tag_dict[key] = [tags[row]]

    if not joint_dict:
        return np.zeros((0, num_joints, width), np.float32)
    return np.array([joint_dict[k] for k in joint_dict]).astype(np.float32)


def _joint_major(heatmaps: np.ndarray) -> np.ndarray:
    """[H, W, J, ...] -> contiguous [J, H, W, ...]."""
    heatmaps = np.asarray(heatmaps)
    return np.ascontiguousarray(np.moveaxis(heatmaps, 2, 0))


def _quarter_offsets(det_j: np.ndarray, x: int, y: int) -> Tuple[float, float]:
    """Quarter-pixel steps towards the larger neighbour (strict `>`, clamped neighbours) at integer pixel (x, y)."""
    h, w = det_j.shape
    dx = 0.25 if det_j[y, min(x + 1, w - 1)] > det_j[y, max(x - 1, 0)] else -0.25
    dy = 0.25 if det_j[min(y + 1, h - 1), x] > det_j[max(y - 1, 0), x] else -0.25
    return dx, dy


def adjust(grouped: np.ndarray, heatmaps: np.ndarray) -> np.ndarray:
    """Sub-pixel refinement of the grouped joints of one image (official `adjust`).

    Args:
        grouped: `[N, J, 3 + T]` from match_by_tag (integer pixel indices).
        heatmaps: `[H, W, J]` aggregated heatmaps of that image (before NMS).

    Returns:
        A new `[N, J, 3 + T]` float32 array: each present joint (value > 0) moves to its pixel centre (+0.5) plus
        0.25 towards the larger horizontal and vertical neighbour (-0.25 on ties; at the border the clamped
        neighbour is the pixel itself). Heatmap pixels.
    """
    return _adjust(grouped, _joint_major(heatmaps))


def _adjust(grouped: np.ndarray, det: np.ndarray) -> np.ndarray:
    """`adjust` on joint-major maps `det` `[J, H, W]`."""
    out = np.array(grouped, dtype=np.float32, copy=True)
    for person in out:
        for j, joint in enumerate(person):
            if joint[2] > 0:
                x, y = joint[0], joint[1]  # float32 scalars: the official shifts in float32
                dx, dy = _quarter_offsets(det[j], int(x), int(y))
                person[j, 0:2] = (x + dx + 0.5, y + dy + 0.5)
    return out


def person_scores(grouped: np.ndarray) -> np.ndarray:
    """`[N]` float32: mean heatmap value over all J joints of each person (absent joints count 0; official `parse`)."""
    # Per person, on a strided float32 column, so numpy sums in the same order as the official `i[:, 2].mean()`.
    return np.array([person[:, 2].mean() for person in np.asarray(grouped, np.float32)], dtype=np.float32)


def refine(person: np.ndarray, heatmaps: np.ndarray, tags: np.ndarray) -> np.ndarray:
    """Fill the missing joints of one person from the whole map (official `refine`).

    The person's tag is the mean of the tags read at its present joints (at `int` of the adjusted position). For
    each absent joint type the pixel maximising heatmap - round(|tag - person tag|) is taken (first maximum in
    row-major order) and added when its heatmap value is > 0, at pixel centre + quarter offset, with tag columns
    left 0. There is no tag threshold (the official `> 0.01` test is commented out).

    Args:
        person: `[J, 3 + T]` adjusted joints (heatmap pixels).
        heatmaps: `[H, W, J]` aggregated heatmaps; tags: `[H, W, J, T]` aggregated tags.

    Returns:
        A new `[J, 3 + T]` float32 array.
    """
    return _refine(person, _joint_major(heatmaps), _joint_major(tags))


def _refine(person: np.ndarray, det: np.ndarray, tag: np.ndarray) -> np.ndarray:
    """`refine` on joint-major maps: det `[J, H, W]`, tag `[J, H, W, T]`."""
    if tag.ndim == 3:
        tag = tag[..., None]
    out = np.array(person, dtype=np.float32, copy=True)
    read = []
    for j in range(out.shape[0]):
        if out[j, 2] > 0:
            x, y = out[j, :2].astype(np.int32)
            read.append(tag[j, y, x])
    prev_tag = np.mean(read, axis=0)  # float32 accumulation, as in the official code

    for j in range(out.shape[0]):
        if out[j, 2] != 0:  # the official fills joints whose value is exactly 0
            continue
        det_j = det[j]
        dist = np.sqrt(((tag[j] - prev_tag[None, None, :]) ** 2).sum(axis=2))  # float32 throughout
        y, x = np.unravel_index(np.argmax(det_j - np.round(dist)), det_j.shape)
        value = det_j[y, x]
        if value > 0:
            dx, dy = _quarter_offsets(det_j, int(x), int(y))
            out[j, 0] = x + 0.5 + dx
            out[j, 1] = y + 0.5 + dy
            out[j, 2] = value
    return out


class RefineCandidates:
    """One image's maps prepared for `refine_pruned`: per joint type, the `m` highest heatmap pixels.

    `refine` searches the whole map for argmax(heatmap - round(|tag - person tag|)) once per missing joint of every
    person: on maps with many people (the noise maps of an untrained network give the maximum, 30, each missing ~15
    joints) that is hundreds of full-map passes, most of the single-scale inference time. Since round(distance) >= 0,
    no pixel outside the top-m set S (heatmap <= min over S) can reach the best value found inside S when that value
    is strictly above min over S; then the first maximum in S (pixels kept in row-major order) is the first maximum
    of the whole map, computed with the same float32 arithmetic on the same pixels. Otherwise (a person tag far from
    every tag in S) the whole map is searched, as `_refine` does.

    Args:
      det: `[J, H, W]` joint-major aggregated heatmaps.
      tags: `[H, W, J', T]` aggregated tags as `aggregate_outputs` gives them (J' = J, or 1 when one tag map is
        shared by all joint types); not copied.
      m: size of S per joint type.
    """

    def __init__(self, det: np.ndarray, tags: np.ndarray, m: int = 1024):
        j, h, w = det.shape
        if tags.ndim == 3:
            tags = tags[..., None]
        if tags.shape[:2] != (h, w) or tags.shape[2] not in (1, j):
            raise ValueError(f"RefineCandidates: tags {tags.shape} do not match heatmaps [J, H, W] = {det.shape}")
        self.det = det.reshape(j, h * w)
        self.tags = tags.reshape(h * w, tags.shape[2], tags.shape[3])
        self.width = w
        m = min(m, h * w)
        if m == h * w:
            flat = np.broadcast_to(np.arange(h * w), (j, h * w))
        else:
            flat = np.sort(np.argpartition(self.det, h * w - m, axis=1)[:, h * w - m:], axis=1)
        self.flat = flat
        self.cand_det = np.take_along_axis(self.det, flat, axis=1)
        self.floor = self.cand_det.min(axis=1)
        self._cand_tag: Dict[int, np.ndarray] = {}

    def _tag_column(self, j: int) -> int:
        return j if self.tags.shape[1] > 1 else 0

    def tag_at(self, j: int, x: int, y: int) -> np.ndarray:
        """`[T]` tag of joint type j at pixel (x, y)."""
        return self.tags[y * self.width + x, self._tag_column(j)]

    def argmax(self, j: int, prev_tag: np.ndarray) -> int:
        """Row-major index of the first maximum of det[j] - round(|tag[j] - prev_tag|) over the whole map."""
        if j not in self._cand_tag:
            self._cand_tag[j] = self.tags[self.flat[j], self._tag_column(j)]  # [m, T]
        score = self.cand_det[j] - np.round(np.sqrt(((self._cand_tag[j] - prev_tag[None, :]) ** 2).sum(axis=-1)))
        best = int(np.argmax(score))
        if score[best] > self.floor[j]:
            return int(self.flat[j, best])
        planes = self.tags[:, self._tag_column(j)]  # [H*W, T]
        sq = None
        for t in range(planes.shape[1]):  # the sum over T in numpy's order for T < 8 (sequential)
            d = planes[:, t] - prev_tag[t]
            sq = d * d if sq is None else sq + d * d
        return int(np.argmax(self.det[j] - np.round(np.sqrt(sq))))


def refine_pruned(person: np.ndarray, det: np.ndarray, cands: RefineCandidates) -> np.ndarray:
    """`refine` of one person, the same result bit for bit, with the per-joint search through `cands`.

    Args:
      person: `[J, 3 + T]` adjusted joints (heatmap pixels); det: `[J, H, W]` joint-major heatmaps; cands: built from
        det and the image's tags.

    Returns:
      A new `[J, 3 + T]` float32 array (see `refine`).
    """
    out = np.array(person, dtype=np.float32, copy=True)
    read = []
    for j in range(out.shape[0]):
        if out[j, 2] > 0:
            x, y = out[j, :2].astype(np.int32)
            read.append(cands.tag_at(j, int(x), int(y)))
    prev_tag = np.mean(read, axis=0)  # float32 accumulation, as in the official code
    for j in range(out.shape[0]):
        if out[j, 2] != 0:  # the official fills joints whose value is exactly 0
            continue
        y, x = divmod(cands.argmax(j, prev_tag), cands.width)
        value = det[j, y, x]
        if value > 0:
            dx, dy = _quarter_offsets(det[j], int(x), int(y))
            out[j, 0] = x + 0.5 + dx
            out[j, 1] = y + 0.5 + dy
            out[j, 2] = value
    return out


def parse(heatmaps: np.ndarray, tags: np.ndarray, candidates: Mapping[str, np.ndarray],
          settings: PostprocessSettings = PostprocessSettings(),
          solver: Callable[[np.ndarray], np.ndarray] = hungarian,
          trace: Optional[List[Dict[str, Any]]] = None) -> Dict[str, np.ndarray]:
    """Group, adjust, score and refine the people of one image (official `HeatmapParser.parse` after `top_k`).

    Args:
        heatmaps: `[H, W, J]` aggregated heatmaps (before NMS); tags: `[H, W, J, T]` aggregated tags.
        candidates: one image's top-k output: `val` `[J, K]`, `tag` `[J, K, T]`, `loc` `[J, K, 2]`.
        settings, solver, trace: see `match_by_tag`.

    Returns:
        dict of float32 arrays: `grouped_raw` `[N, J, 3 + T]` (match_by_tag), `adjusted` (after adjust, or a copy
        of grouped_raw when settings.adjust is False), `people` (after refine: the official `grouped[0]`), `scores`
        `[N]` (computed after adjust, before refine: refined joints never count). Heatmap pixels.
    """
    grouped = match_by_tag(candidates["val"], candidates["tag"], candidates["loc"], settings, solver, trace)
    det = _joint_major(heatmaps)
    adjusted = _adjust(grouped, det) if settings.adjust else grouped.copy()
    scores = person_scores(adjusted)
    people = adjusted.copy()
    if settings.refine and len(people):
        # the whole-map searches of `refine` pruned to each joint's highest pixels (same result, see the class)
        cands = RefineCandidates(det, np.asarray(tags))
        people = np.stack([refine_pruned(p, det, cands) for p in people])
    return {"grouped_raw": grouped, "adjusted": adjusted, "people": people, "scores": scores}


# ------------------------------------------------------------------------------------------ host: back-projection


def affine_transform_matrix(center: Sequence[float], scale: Sequence[float], output_size: Sequence[int],
                            inv: bool = False) -> np.ndarray:
    """`[2, 3]` float64 affine map between original-image pixels and an output of `output_size` = (W, H), rotation 0.

    Equals the official `get_affine_transform(center, scale, 0, output_size, inv=inv)` without OpenCV: the official
    builds three float32 point pairs (centre, a point scale[0] * 100 above it, and a third at a right angle) and
    solves for the map with `cv2.getAffineTransform`; for rotation 0 that solution is a uniform scaling plus
    translation, written here in closed form from the same float32 points. Only scale[0] (the width, in units of
    200 pixels) is used: the map scales both axes by W / (scale[0] * 200).

    Args:
        center: (x, y) original-image pixels. scale: (w, h) / 200. output_size: (W, H) pixels.
        inv: False: original -> output pixels; True: output -> original pixels.

    Returns:
        `[[a, 0, tx], [0, a, ty]]` float64, applied to column vectors (x, y, 1).
    """
    src_w = np.float64(scale[0]) * 200.0
    dst_w, dst_h = output_size[0], output_size[1]
    center = np.asarray(center, np.float64)
    # The official stores its points as float32: the centre, the point src_w / 2 above it, and the output centre.
    src0 = center.astype(np.float32)
    src1_y = np.float32(center[1] + (-src_w * 0.5))
    half_src = np.float64(src0[1] - src1_y)  # float32 difference (as get_3rd_point computes it), exact in float64
    dst0 = np.array([dst_w * 0.5, dst_h * 0.5], np.float32)
    dst1_y = np.float32(np.float64(dst_h) * 0.5 + np.float32(dst_w * -0.5))
    half_dst = np.float64(dst0[1] - dst1_y)
    if inv:
        a = half_src / half_dst
        t = src0.astype(np.float64) - a * dst0.astype(np.float64)
    else:
        a = half_dst / half_src
        t = dst0.astype(np.float64) - a * src0.astype(np.float64)
    return np.array([[a, 0.0, t[0]], [0.0, a, t[1]]], np.float64)


def final_preds(people: np.ndarray, center: Sequence[float], scale: Sequence[float],
                heatmap_size: Sequence[int]) -> np.ndarray:
    """Map people from aggregated-heatmap pixels to original-image pixels (official `get_final_preds`).

    Args:
        people: `[N, J, 3 + T]` refined joints (x, y in heatmap pixels, value, tags).
        center, scale: of the image, as `multi_scale_size` gives them for the smallest test scale.
        heatmap_size: (W, H) of the aggregated maps.

    Returns:
        `[N, J, 3 + T]` float32: x, y in original-image pixels (not clipped to the image), the other columns
        unchanged. Every joint is projected, including absent ones (their (0, 0) lands at the map's corner).
    """
    people = np.asarray(people, np.float32)
    trans = affine_transform_matrix(center, scale, heatmap_size, inv=True)
    out = people.copy()
    x = people[..., 0].astype(np.float64)
    y = people[..., 1].astype(np.float64)
    out[..., 0] = trans[0, 0] * x + trans[0, 1] * y + trans[0, 2]
    out[..., 1] = trans[1, 0] * x + trans[1, 1] * y + trans[1, 2]
    return out
