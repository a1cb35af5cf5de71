"""RT-DETR post-processing (official `src/zoo/rtdetr/rtdetr_postprocessor.py`, `RTDETRPostProcessor`).

With the focal-loss head (every official config): scores = sigmoid(logits) `[B, Q, C]`, flattened over
(query, class) and the `num_top_queries` best kept: label = flat index % C, query = flat index // C, the
query's box (cxcywh normalised -> xyxy) scaled by the original image size `orig_target_sizes` (w, h) per image.
One query may so give several (class, score) detections; there is no NMS. Without focal loss: softmax over
C classes (the last one is "no object" and dropped), the best class per query, top-k when Q > num_top_queries.

This is also the deploy graph (`deploy_mode`: `labels, boxes, scores`), the ONNX export's outputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def box_cxcywh_to_xyxy(b):
    """`[..., 4]` cxcywh -> xyxy (torchvision `box_convert`)."""
    cx, cy, w, h = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def postprocess(pred_logits, pred_boxes, orig_target_sizes, num_top_queries: int = 300, use_focal_loss: bool = True):
    """(labels `[B, K]` int32, boxes `[B, K, 4]` xyxy in original pixels, scores `[B, K]`), best first.

    Args:
      pred_logits: `[B, Q, C]` class logits.
      pred_boxes: `[B, Q, 4]` cxcywh normalised to the image.
      orig_target_sizes: `[B, 2]` (width, height) of the original images, int or float.
      num_top_queries: K (official 300).
      use_focal_loss: sigmoid scores over (query, class) pairs (official configs) or softmax per query.

    Raises:
      ValueError: (focal) K larger than Q * C. Without focal loss all Q queries are kept when Q <= K.
    """
    b, q, c = pred_logits.shape
    sizes = jnp.asarray(orig_target_sizes).astype(pred_boxes.dtype)
    boxes = box_cxcywh_to_xyxy(pred_boxes) * jnp.tile(sizes, (1, 2))[:, None, :]
    if use_focal_loss:
        if num_top_queries > q * c:
            raise ValueError(f"num_top_queries {num_top_queries} > {q} queries x {c} classes (torch.topk fails too); "
                             "lower config.eval.num_top_queries")
        scores, index = jax.lax.top_k(jax.nn.sigmoid(pred_logits).reshape(b, q * c), num_top_queries)
        # index >= 0: truncating division is floor division (and exports to ONNX with a symbolic batch,
        # where jax2onnx's `rem` lowering does not)
        query = jax.lax.div(index, jnp.asarray(c, index.dtype))
        labels = index - query * c
        boxes = jnp.take_along_axis(boxes, query[..., None], axis=1)
    else:
        scores = jax.nn.softmax(pred_logits, axis=-1)[:, :, :-1]
        labels = jnp.argmax(scores, -1)
        scores = jnp.max(scores, -1)
        if q > num_top_queries:
            scores, index = jax.lax.top_k(scores, num_top_queries)
            labels = jnp.take_along_axis(labels, index, axis=1)
            boxes = jnp.take_along_axis(boxes, index[..., None], axis=1)
    return labels.astype(jnp.int32), boxes, scores
