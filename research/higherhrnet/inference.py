"""HigherHRNet test-time aggregation: flip test, multi-scale, resizing to the image, then grouping into people.

Follows the official HRNet/HigherHRNet-Human-Pose-Estimation (commit aa23881) `lib/core/inference.py`
(`get_multi_stage_outputs`, `aggregate_results`), the size/centre/scale arithmetic of `lib/utils/transforms.py`
(`get_multi_scale_size`) and the per-image loop of `tools/valid.py`:

    for each scale s, largest first:   outputs of the image and of its mirror
        -> output 0 resized to output 1's size (bilinear, align_corners=False), heatmaps of both averaged,
           the mirror's maps flipped back with left/right channels swapped
        -> every map resized to the scale-1 input size (PROJECT2IMAGE)
        -> heatmaps: mean of image and mirror, summed over scales; tags: output 0's, from scale 1 only, the image's
           and the mirror's stacked on a last axis
    heatmaps / number of scales -> NMS, top-k, grouping, back-projection (research/higherhrnet/group.py).

The map arithmetic is JAX (jit-able, fixed shapes). Resizing is gathers plus elementwise products and sums in the
operation order of torch's CPU kernel, so no matmul precision setting can round it. The division by the number of
scales is a true division: XLA rewrites `x / n` by a broadcast scalar into `x * (1 / n)`, which differs by one ulp
for n = 3, so the divisor is hidden behind an optimisation barrier.

Layouts: network outputs and maps are channels-last (`[B, H, W, C]`); tags carry a last axis T (original,
flipped). The network is any callable `x [B, H, W, 3] -> sequence of stage outputs [B, h, w, C]`: stage 0
(stride 4) with J heatmaps then J tag channels, stage 1 (stride 2) with J heatmaps (the official output order).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from research.higherhrnet import group
from research.higherhrnet.group import PostprocessSettings

__all__ = [
    "PostprocessSettings",
    "multi_scale_size",
    "multi_scale_geometry",
    "resize_bilinear",
    "stage_outputs",
    "aggregate",
    "finish_aggregation",
    "aggregate_outputs",
    "multi_scale_inference",
    "people_from_maps",
]

Array = Any


# ------------------------------------------------------------------------------------------ sizes (host)


def multi_scale_size(image_hw: Sequence[int], input_size: int, current_scale: float,
                     min_scale: float) -> Tuple[Tuple[int, int], np.ndarray, np.ndarray]:
    """Network input size, centre and scale for one test scale (official `get_multi_scale_size`).

    The short side becomes `input_size * current_scale`; the long side keeps the aspect ratio, rounded up to a
    multiple of 64 at `min_scale` and then multiplied up, so all scales share one aspect ratio.

    Args:
        image_hw: original image (H, W) pixels.
        input_size: DATASET.INPUT_SIZE (512).
        current_scale, min_scale: this scale and the smallest test scale.

    Returns:
        ((W, H) network input pixels, center int64 [2] (x, y) original pixels, scale float64 [2] (w, h) / 200 of the
        original region covering the input).
    """
    h, w = int(image_hw[0]), int(image_hw[1])
    center = np.array([int(w / 2.0 + 0.5), int(h / 2.0 + 0.5)])
    min_input_size = int((min_scale * input_size + 63) // 64 * 64)
    if w < h:
        w_resized = int(min_input_size * current_scale / min_scale)
        h_resized = int(int((min_input_size / w * h + 63) // 64 * 64) * current_scale / min_scale)
        scale_w = w / 200.0
        scale_h = h_resized / w_resized * w / 200.0
    else:
        h_resized = int(min_input_size * current_scale / min_scale)
        w_resized = int(int((min_input_size / h * w + 63) // 64 * 64) * current_scale / min_scale)
        scale_h = h / 200.0
        scale_w = w_resized / h_resized * h / 200.0
    return (w_resized, h_resized), center, np.array([scale_w, scale_h])


def multi_scale_geometry(image_hw: Sequence[int],
                         settings: PostprocessSettings = PostprocessSettings()) -> Dict[str, Any]:
    """Sizes of one image's multi-scale test, as `tools/valid.py` computes them.

    Returns:
        dict with `scales` (descending, processing order), `input_sizes` ((W, H) network input per scale; resize
        the image to it with the affine map `group.affine_transform_matrix(center, scale, size)` of that scale),
        `base_size` ((W, H) at scale 1: the size of the aggregated maps under project2image), `center`, `scale`
        (of the smallest scale: what the back-projection uses).
    """
    scales = sorted(settings.scale_factors, reverse=True)
    min_scale = min(settings.scale_factors)
    base_size, _, _ = multi_scale_size(image_hw, settings.input_size, 1.0, min_scale)
    sizes = [multi_scale_size(image_hw, settings.input_size, s, min_scale) for s in scales]
    return {"scales": scales, "input_sizes": [size for size, _, _ in sizes], "base_size": base_size,
            "center": sizes[-1][1], "scale": sizes[-1][2]}


# ------------------------------------------------------------------------------------------ resizing (JAX)


def _linear_taps(in_size: int, out_size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of torch's linear resize (align_corners=False) as its CPU kernel computes them:
    ratio = float32(in) / out, src = max(ratio * (dst + 0.5) - 0.5, 0) with one rounding to float32 (the kernel's
    compiled code fuses the multiply and the subtraction), i0 = floor(src), i1 = i0 + 1 clamped, weights
    (1 - frac, frac) in float32."""
    ratio = np.float32(in_size) / np.float32(out_size)
    dst = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)).astype(np.float64)
    # The float32 product is exact in float64, so this rounds once, like a fused multiply-add.
    src = (np.float64(ratio) * dst - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    lam1 = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
    lam0 = (np.float32(1) - lam1).astype(np.float32)
    i1 = i0 + (i0 < in_size - 1)
    return i0, i1, lam0, lam1


def _resize_axis(x, axis: int, out_size: int):
    in_size = x.shape[axis]
    if in_size == out_size:
        return x  # torch uses weights (1, 0) on the pixel itself: the identity for finite values
    i0, i1, lam0, lam1 = _linear_taps(in_size, out_size)
    shape = [1] * x.ndim
    shape[axis] = out_size
    w0 = jnp.asarray(lam0.reshape(shape), x.dtype)
    w1 = jnp.asarray(lam1.reshape(shape), x.dtype)
    return jnp.take(x, i0, axis=axis) * w0 + jnp.take(x, i1, axis=axis) * w1


def resize_bilinear(x: Array, size_hw: Sequence[int]) -> Array:
    """Bilinear resize of `[B, H, W, C]` to `[B, size_hw[0], size_hw[1], C]`, torch `interpolate(mode='bilinear',
    align_corners=False)` semantics (no antialiasing; source coordinates clamped at 0, the last pixel repeated).

    Width is interpolated first, then height, the order torch's CPU kernel uses, so results are torch's bit for
    bit where its compiler does not contract the multiply-adds.
    """
    x = _resize_axis(x, 2, int(size_hw[1]))
    return _resize_axis(x, 1, int(size_hw[0]))


# ------------------------------------------------------------------------------------------ aggregation (JAX)


def stage_outputs(outputs: Sequence[Array], outputs_flip: Optional[Sequence[Array]],
                  settings: PostprocessSettings = PostprocessSettings(),
                  size_projected: Optional[Sequence[int]] = None) -> Tuple[List[Array], List[Array]]:
    """Heatmaps and tags of one scale from the network outputs (official `get_multi_stage_outputs`).

    Args:
        outputs: stage outputs for the image, `[B, h_i, w_i, C_i]`, the last one the finest (stride 2).
        outputs_flip: the same for the horizontally mirrored image (as the network returns them, in mirrored
            coordinates and channel labels), or None without flip test.
        settings: uses num_joints, loss_with_heatmaps, loss_with_ae, test_with_heatmaps, test_with_ae,
            tag_per_joint, flip_index.
        size_projected: (W, H) to resize every map to (project2image), or None to keep the finest output's size.

    Returns:
        (heatmaps, tags): heatmaps `[avg of image, avg of mirror]` (one entry without flip), each `[B, H, W, J]`:
        the mean of the selected stages' heatmaps at the finest output size (coarser outputs resized up first);
        tags: one `[B, H, W, J]` per selected stage and per image/mirror. Mirror maps are flipped back with
        flip_index applied. Heatmap units as the network gives them.
    """
    j = settings.num_joints

    def collect(outs, mirrored):
        target = outs[-1].shape[1:3]
        hm_sum, count, tags = 0, 0, []
        for i, output in enumerate(outs):
            if len(outs) > 1 and i != len(outs) - 1:
                output = resize_bilinear(output, target)
            if mirrored:
                output = jnp.flip(output, axis=2)
            offset = j if settings.loss_with_heatmaps[i] else 0
            if settings.loss_with_heatmaps[i] and settings.test_with_heatmaps[i]:
                hm = output[..., :j]
                if mirrored:
                    hm = hm[..., list(settings.flip_index)]
                hm_sum = hm_sum + hm
                count += 1
            if settings.loss_with_ae[i] and settings.test_with_ae[i]:
                tag = output[..., offset:]
                if mirrored and settings.tag_per_joint:
                    tag = tag[..., list(settings.flip_index)]
                tags.append(tag)
        return ([hm_sum / count] if count else []), tags

    heatmaps, tags = collect(outputs, False)
    if outputs_flip is not None:
        heatmaps_flip, tags_flip = collect(outputs_flip, True)
        heatmaps += heatmaps_flip
        tags += tags_flip
    if size_projected is not None:
        hw = (int(size_projected[1]), int(size_projected[0]))
        heatmaps = [resize_bilinear(h, hw) for h in heatmaps]
        tags = [resize_bilinear(t, hw) for t in tags]
    return heatmaps, tags


def aggregate(scale: float, final_heatmaps: Optional[Array], tags_list: List[Array], heatmaps: List[Array],
              tags: List[Array], settings: PostprocessSettings = PostprocessSettings()) -> Tuple[Array, List[Array]]:
    """Add one scale's maps to the running sum (official `aggregate_results`, without in-place updates).

    Heatmaps: image/mirror mean (flip test), added to `final_heatmaps` (resized to its size without project2image).
    Tags: kept only at scale 1 (or with a single scale), appended to a new `tags_list`.

    Returns:
        (new final_heatmaps `[B, H, W, J]`, new tags_list of `[B, H, W, J]`).
    """
    tags_list = list(tags_list)
    if scale == 1 or len(settings.scale_factors) == 1:
        if final_heatmaps is not None and not settings.project2image:
            tags = [resize_bilinear(t, final_heatmaps.shape[1:3]) for t in tags]
        tags_list.extend(tags)
    heatmaps_avg = (heatmaps[0] + heatmaps[1]) / 2.0 if settings.flip_test else heatmaps[0]
    if final_heatmaps is None:
        final_heatmaps = heatmaps_avg
    elif settings.project2image:
        final_heatmaps = final_heatmaps + heatmaps_avg
    else:
        final_heatmaps = final_heatmaps + resize_bilinear(heatmaps_avg, final_heatmaps.shape[1:3])
    return final_heatmaps, tags_list


def finish_aggregation(final_heatmaps: Array, tags_list: Sequence[Array], num_scales: int) -> Dict[str, Array]:
    """Divide the heatmap sum by the number of scales (correctly rounded) and stack the tags.

    Returns:
        dict: `heatmaps` `[B, H, W, J]`, `tags` `[B, H, W, J, T]` (T = len(tags_list): original, flipped).
    """
    if num_scales != 1:
        # A materialised divisor: XLA turns division by a broadcast scalar into a multiplication by its reciprocal.
        divisor = jax.lax.optimization_barrier(jnp.full(final_heatmaps.shape, num_scales, final_heatmaps.dtype))
        final_heatmaps = final_heatmaps / divisor
    return {"heatmaps": final_heatmaps, "tags": jnp.stack(list(tags_list), axis=-1)}


@functools.partial(jax.jit, static_argnames=("settings", "base_size"))
def aggregate_outputs(outputs_by_scale: Sequence[Tuple[Sequence[Array], Optional[Sequence[Array]]]],
                      settings: PostprocessSettings = PostprocessSettings(),
                      base_size: Optional[Tuple[int, int]] = None) -> Dict[str, Array]:
    """Aggregated heatmaps and tags of one image from its network outputs at every test scale (jitted).

    Args:
        outputs_by_scale: per scale in descending order (`multi_scale_geometry(...)['scales']`), a pair (outputs of
            the image, outputs of its mirror or None without flip test); each a sequence of `[B, h, w, C]` stage
            outputs.
        settings: the post-processing settings (static).
        base_size: (W, H) of the scale-1 input (static); required with project2image.

    Returns:
        dict: `heatmaps` `[B, H, W, J]` and `tags` `[B, H, W, J, T]` (H, W = base_size under project2image, else the
        largest scale's finest output size), the `det` and `tag` the grouping takes.

    Raises:
        ValueError: when the number of scales differs from settings.scale_factors, or base_size is missing.
    """
    scales = sorted(settings.scale_factors, reverse=True)
    if len(outputs_by_scale) != len(scales):
        raise ValueError(f"got outputs for {len(outputs_by_scale)} scales, settings have {len(scales)}")
    if settings.project2image and base_size is None:
        raise ValueError("project2image needs base_size")
    final, tags_list = None, []
    for s, (outputs, outputs_flip) in zip(scales, outputs_by_scale):
        if settings.flip_test and outputs_flip is None:
            raise ValueError("flip_test needs the mirrored image's outputs")
        heatmaps, tags = stage_outputs(outputs, outputs_flip if settings.flip_test else None, settings,
                                       base_size if settings.project2image else None)
        final, tags_list = aggregate(s, final, tags_list, heatmaps, tags, settings)
    return finish_aggregation(final, tags_list, len(scales))


def multi_scale_inference(network: Callable[[Array], Sequence[Array]], inputs: Sequence[Array],
                          settings: PostprocessSettings = PostprocessSettings(),
                          base_size: Optional[Tuple[int, int]] = None) -> Dict[str, Array]:
    """Run the network on each scale's input (and its mirror) and aggregate (valid.py's per-image loop).

    Args:
        network: `x [B, H, W, 3] -> sequence of [B, h, w, C]` stage outputs (e.g. a jitted model apply).
        inputs: one normalised network input `[B, H_s, W_s, 3]` per scale, in descending scale order, each already
            resized to `multi_scale_geometry(...)['input_sizes']`.
        settings, base_size: see `aggregate_outputs`.

    Returns:
        `aggregate_outputs`' dict.
    """
    per_scale = []
    for x in inputs:
        outputs = tuple(network(x))
        outputs_flip = tuple(network(jnp.flip(jnp.asarray(x), axis=2))) if settings.flip_test else None
        per_scale.append((outputs, outputs_flip))
    return aggregate_outputs(per_scale, settings, None if base_size is None else tuple(int(v) for v in base_size))


_nms_jit = jax.jit(group.nms, static_argnames=("kernel", "padding"))
_top_k_of_nms_jit = jax.jit(group.top_k_of_nms, static_argnames=("settings",))


def _top_k_jit(heatmaps: Array, tags: Array, settings: PostprocessSettings) -> Dict[str, Array]:
    """`group.top_k` as two jitted stages, the NMS and the rest (`group.top_k_of_nms` says why)."""
    det = _nms_jit(heatmaps, kernel=settings.nms_kernel, padding=settings.nms_padding)
    return _top_k_of_nms_jit(det, tags, settings=settings)


def people_from_maps(heatmaps: Array, tags: Array, center: Sequence[float], scale: Sequence[float],
                     settings: PostprocessSettings = PostprocessSettings(),
                     trace: Optional[List[Dict[str, Any]]] = None) -> List[Dict[str, np.ndarray]]:
    """People of each image from aggregated maps: NMS and top-k (jitted), grouping on the host, back-projection.

    Args:
        heatmaps: `[B, H, W, J]`, tags: `[B, H, W, J, T]` from `aggregate_outputs`.
        center, scale: from `multi_scale_geometry` (all images of the batch must share them; valid.py uses
            batch 1).
        settings: the post-processing settings.
        trace: optional list receiving, per image, the list of matching steps (see `group.match_by_tag`).

    Returns:
        Per image a dict: `keypoints` `[N, J, 3 + T]` float32 (x, y original-image pixels, heatmap value, tags;
        the official `get_final_preds` rows), `scores` `[N]` (the per-person score valid.py evaluates), and the
        heatmap-pixel intermediates of `group.parse` (`grouped_raw`, `adjusted`, `people`) plus `candidates`.
    """
    candidates = {k: np.asarray(v) for k, v in _top_k_jit(heatmaps, tags, settings=settings).items()}
    heatmaps_np = np.asarray(heatmaps)
    tags_np = np.asarray(tags)
    size = (heatmaps_np.shape[2], heatmaps_np.shape[1])
    results = []
    for b in range(heatmaps_np.shape[0]):
        cand = {k: v[b] for k, v in candidates.items()}
        steps = [] if trace is not None else None
        parsed = group.parse(heatmaps_np[b], tags_np[b], cand, settings, trace=steps)
        if trace is not None:
            trace.append(steps)
        parsed["keypoints"] = group.final_preds(parsed["people"], center, scale, size)
        parsed["candidates"] = cand
        results.append(parsed)
    return results
