"""Contrastive denoising queries of RT-DETR training (official `src/zoo/rtdetr/denoising.py`).

Officially, with g = the largest number of targets of any image in the batch, the builder makes
`num_group = max(num_denoising // g, 1)` groups of `2 g` queries: in each group first the g positive
queries (image b's targets 0..n_b-1, then padding up to g), then g negative queries (the same
targets again). Labels are replaced by a random class with probability `label_noise_ratio / 2`;
each box corner (xyxy) moves by `sign * u * size / 2 * box_noise_scale` with u ~ U[0, 1) for
positives and u ~ U[1, 2) for negatives, is clipped to [0, 1] and turned back into cxcywh and then
into logit space. Padding queries carry class `num_classes` (the embedding's padding row) and a
zero box (logit -11.51). An attention mask keeps the matching queries from seeing any denoising
query and each group from seeing the other groups. When no image has a target there are no
denoising queries at all.

Here the number of denoising queries is data dependent only through the traced value g, so the
queries live in a STATIC number of slots `D = num_denoising_slots(M, num_denoising)` =
`2 * max(num_denoising, M)` for targets padded to M per image, an upper bound of `2 g num_group`
for every g <= M. Slot s < 2 g num_group holds exactly the official query s; the remaining slots
are inactive: padding queries that no other query may attend to (each sees only itself and the
matching queries, so no attention row is empty) and that the criterion ignores (`dn_valid`).
With no target in the batch every slot is inactive, so the matching queries see exactly what
they see officially without denoising, and the denoising loss terms are 0. Everything is
jit-compatible; the randomness comes from a JAX PRNG key (so the draws differ from torch's).

dn_meta (dict):
  * `dn_target_idx` `[B, D]` int32: for each positive query, the target slot (index into the
    padded `[B, M]` target arrays) it reconstructs; -1 for negative, padding and inactive slots.
    This replaces the official `dn_positive_idx` list (see `dn_meta_from_official`).
  * `dn_valid` `[D]` bool: the active slots (the official queries).
  * `dn_num_group` int32 scalar: the official `num_group` (1 when the batch has no target).
  * `dn_num_split` `(D, num_queries)` Python ints: where the decoder splits its query axis.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from research.vision import boxes as box_lib


def inverse_sigmoid(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """Logit of `x` clipped to [0, 1], with both odds terms clipped at `eps` (official `utils.inverse_sigmoid`)."""
    x = jnp.clip(x, 0.0, 1.0)
    return jnp.log(jnp.clip(x, eps, None) / jnp.clip(1 - x, eps, None))


def num_denoising_slots(max_num_targets: int, num_denoising: int = 100) -> int:
    """Static number of denoising slots D for targets padded to `max_num_targets` per image.

    `2 * g * max(num_denoising // g, 1)` reaches its largest value over g = 1..M at
    `2 * max(num_denoising, M)` (g = 1, or g = M > num_denoising).
    """
    return 2 * max(num_denoising, max_num_targets)


def denoising_layout(num_targets: jax.Array, num_slots: int, num_denoising: int = 100) -> dict[str, jax.Array]:
    """The official group layout, placed in `num_slots` static slots.

    Args:
      num_targets: `[B]` int, targets per image (traced).
      num_slots: D, static.
      num_denoising: the official `num_denoising`.
    Returns dict of:
      `max_gt` (g, scalar), `num_group` (scalar, >= 1), `active` `[D]` bool, `group` `[D]` int32
      (group of each active slot; a distinct negative id for each inactive slot), `target` `[D]`
      int32 (rank j of the target the slot refers to within its half-group), `negative` `[D]` bool,
      `real` `[B, D]` bool (active slot whose target j exists in image b, i.e. not padding).
    """
    num_targets = jnp.asarray(num_targets, jnp.int32)
    g = jnp.max(num_targets) if num_targets.size else jnp.int32(0)
    g1 = jnp.maximum(g, 1)
    num_group = jnp.where(g > 0, jnp.maximum(num_denoising // g1, 1), 1)
    s = jnp.arange(num_slots, dtype=jnp.int32)
    active = s < 2 * g * num_group
    within = s % (2 * g1)
    target = within % g1
    group = jnp.where(active, s // (2 * g1), -1 - s)
    real = active[None, :] & (target[None, :] < num_targets[:, None])
    return {"max_gt": g, "num_group": num_group, "active": active, "group": group, "target": target,
            "negative": within >= g1, "real": real}


def denoising_attention_mask(group: jax.Array, num_queries: int) -> jax.Array:
    """Self-attention mask over `[D denoising slots + num_queries matching queries]`.

    True = may NOT attend (torch `nn.MultiheadAttention` bool `attn_mask` convention), as the
    official mask: matching queries never see denoising slots; a denoising slot sees the slots of
    its own group and every matching query.

    Args:
      group: `[D]` int32 group id per slot (from `denoising_layout`).
    Returns:
      `[D + Q, D + Q]` bool, rows = queries, columns = keys.
    """
    d = group.shape[0]
    is_dn = jnp.arange(d + num_queries) < d
    gid = jnp.concatenate([group, jnp.full((num_queries,), jnp.iinfo(jnp.int32).min, jnp.int32)])
    match_sees_dn = ~is_dn[:, None] & is_dn[None, :]
    other_group = is_dn[:, None] & is_dn[None, :] & (gid[:, None] != gid[None, :])
    return match_sees_dn | other_group


def get_contrastive_denoising_training_group(
        key: jax.Array,
        labels: jax.Array,
        boxes: jax.Array,
        valid: jax.Array,
        num_classes: int,
        num_queries: int,
        class_embed: Optional[Callable[[jax.Array], jax.Array]] = None,
        num_denoising: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 1.0):
    """Builds the noised denoising queries (official `get_contrastive_denoising_training_group`).

    Args:
      key: PRNG key for the label and box noise.
      labels: `[B, M]` int class ids in 0..num_classes-1.
      boxes: `[B, M, 4]` cxcywh normalised to the image.
      valid: `[B, M]` bool, real targets. Real targets may sit anywhere in the row; they are taken
        in row order (the official per-image target order).
      num_classes: number of classes; also the padding class id (the embedding's extra row).
      num_queries: number of matching queries (for the attention mask).
      class_embed: optional callable (e.g. the decoder's `nn.Embed(num_classes + 1, ...)`) applied
        to the class ids; without it the ids themselves are returned.
      num_denoising, label_noise_ratio, box_noise_scale: as officially (decoder defaults 100, 0.5, 1.0).
    Returns:
      `(query_class, query_bbox_unact, attn_mask, dn_meta)`, or four None when `num_denoising <= 0`:
      query_class `[B, D]` int32 ids (or `class_embed` of them), query_bbox_unact `[B, D, 4]`
      (logit-space cxcywh), attn_mask `[D + Q, D + Q]` bool (True = blocked), dn_meta as in the
      module docstring, with D = `num_denoising_slots(M, num_denoising)`.
    """
    if num_denoising <= 0:
        return None, None, None, None
    labels = jnp.asarray(labels).astype(jnp.int32)
    boxes = jnp.asarray(boxes)
    valid = jnp.asarray(valid, bool)
    bs, m = valid.shape
    d = num_denoising_slots(m, num_denoising)

    # Real targets first, in row order: the official per-image target list.
    order = jnp.argsort(~valid, axis=1, stable=True).astype(jnp.int32)
    lay = denoising_layout(valid.sum(1), d, num_denoising)
    j = jnp.minimum(lay["target"], m - 1) if m else jnp.zeros_like(lay["target"])
    slot_target = order[:, j] if m else jnp.zeros((bs, d), jnp.int32)             # [B, D]
    real = lay["real"]
    if m:
        cls = jnp.take_along_axis(labels, slot_target, axis=1)
        box = jnp.take_along_axis(boxes, slot_target[..., None], axis=1)
    else:
        cls = jnp.zeros((bs, d), jnp.int32)
        box = jnp.zeros((bs, d, 4), boxes.dtype if boxes.size else jnp.float32)
    cls = jnp.where(real, cls, num_classes)
    box = jnp.where(real[..., None], box, 0)
    negative = lay["negative"][None, :, None]

    k_flip, k_label, k_sign, k_mag = jax.random.split(key, 4)
    if label_noise_ratio > 0:
        flip = jax.random.uniform(k_flip, (bs, d)) < label_noise_ratio * 0.5
        new_label = jax.random.randint(k_label, (bs, d), 0, num_classes, jnp.int32)
        cls = jnp.where(flip & real, new_label, cls)

    if box_noise_scale > 0:
        known = box_lib.cxcywh_to_xyxy(box)
        diff = jnp.tile(box[..., 2:] * 0.5, 2) * box_noise_scale
        sign = jax.random.randint(k_sign, box.shape, 0, 2).astype(box.dtype) * 2.0 - 1.0
        part = jax.random.uniform(k_mag, box.shape, box.dtype)
        part = jnp.where(negative, part + 1.0, part) * sign
        known = jnp.clip(known + part * diff, 0.0, 1.0)
        bbox_unact = inverse_sigmoid(box_lib.xyxy_to_cxcywh(known))
    else:
        # Officially the logit transform sits inside the box-noise branch, so without box noise
        # the decoder receives the plain cxcywh boxes as if they were logits; kept as is.
        bbox_unact = box

    attn_mask = denoising_attention_mask(lay["group"], num_queries)
    positive = real & ~lay["negative"][None, :]
    dn_meta = {
        "dn_target_idx": jnp.where(positive, slot_target, -1).astype(jnp.int32),
        "dn_valid": lay["active"],
        "dn_num_group": lay["num_group"].astype(jnp.int32),
        "dn_num_split": (d, num_queries),
    }
    query_class = class_embed(cls) if class_embed is not None else cls
    return query_class, bbox_unact, attn_mask, dn_meta


def dn_meta_from_official(dn_positive_idx: Sequence[np.ndarray], num_targets: Sequence[int], dn_num_group: int,
                          dn_num_split: Sequence[int]) -> dict:
    """Official dn_meta (`dn_positive_idx` tuple, `dn_num_group`, `dn_num_split`) -> this module's dn_meta.

    Official targets are per-image lists, so target j of image b is slot j of a prefix-padded
    `[B, M]` layout. The positives of image b are paired with targets `0..n_b-1` repeated
    `dn_num_group` times (official `SetCriterion.get_cdn_matched_indices`).
    """
    d = int(dn_num_split[0])
    target_idx = np.full((len(num_targets), d), -1, np.int32)
    for b, (pos, n) in enumerate(zip(dn_positive_idx, num_targets)):
        pos = np.asarray(pos, np.int64)
        if n > 0:
            if pos.size != n * dn_num_group:
                raise ValueError(f"image {b}: {pos.size} positive queries for {n} targets x {dn_num_group} groups")
            target_idx[b, pos] = np.tile(np.arange(n), dn_num_group)
    return {"dn_target_idx": target_idx, "dn_valid": np.ones((d,), bool),
            "dn_num_group": np.int32(dn_num_group), "dn_num_split": (d, int(dn_num_split[1]))}
