"""SiamFC training targets and loss: official `TrackerSiamFC._create_labels` and `losses.BalancedLoss`.

Labels mark the response cells within an L1 (block) distance of `r_pos / total_stride` cells of
the map centre as positives (1), cells closer than `r_neg / total_stride` (officially none, r_neg 0)
as ignored (0.5, weight 0) and the rest as negatives (0). The loss is binary cross-entropy on the
logits with positives and negatives each carrying half of the total weight, summed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

R_POS = 16  # official parse_args defaults, in search-crop pixels
R_NEG = 0
TOTAL_STRIDE = 8


def create_labels(batch: int, height: int, width: int, *, r_pos: float = R_POS, r_neg: float = R_NEG,
                  total_stride: int = TOTAL_STRIDE) -> np.ndarray:
    """Logistic labels of the official `TrackerSiamFC._create_labels`, NHWC.

    Args:
      batch: number of response maps (every map gets the same labels).
      height, width: response size in cells (17 x 17 for 255 px searches, 15 x 15 for 239 px).
      r_pos, r_neg: radii in search-crop pixels; divided by `total_stride` to get cells.
      total_stride: backbone stride, pixels per response cell.

    Returns:
      `[batch, height, width, 1]` float32: 1 where |dx| + |dy| <= r_pos cells from the centre
      ((size - 1) / 2, a cell centre for odd sizes), 0.5 where closer than r_neg cells (and not
      positive), else 0.
    """
    x = np.arange(width) - (width - 1) / 2
    y = np.arange(height) - (height - 1) / 2
    x, y = np.meshgrid(x, y)
    dist = np.abs(x) + np.abs(y)
    labels = np.where(dist <= r_pos / total_stride, 1.0, np.where(dist < r_neg / total_stride, 0.5, 0.0))
    return np.tile(labels.astype(np.float32)[None, :, :, None], (batch, 1, 1, 1))


def balanced_loss(logits: jax.Array, labels: jax.Array, neg_weight: float = 1.0) -> jax.Array:
    """Official `losses.BalancedLoss(neg_weight)(input, target)`: class-balanced logistic loss.

    Every positive (label 1) weighs `1 / num_pos`, every negative (label 0) `neg_weight / num_neg`,
    other labels 0; the weights are normalised to sum 1 over the whole batch and the weighted
    binary cross-entropy with logits is summed.

    Args:
      logits: `[B, H, W, 1]` responses (any shape, as long as `labels` has the same).
      labels: same shape, values in {0, 0.5, 1} (`create_labels`).
      neg_weight: relative weight of the negatives.

    Returns:
      Scalar float32 loss. A class without cells gets no weight, as in the official code; with
      no labelled cell at all the official loss is NaN (0 / 0), this one 0.
    """
    logits = logits.astype(jnp.float32)
    labels = labels.astype(jnp.float32)
    pos = labels == 1
    neg = labels == 0
    # Stable BCE with logits: max(x, 0) - x t + log(1 + exp(-|x|)), as torch computes it.
    bce = jnp.maximum(logits, 0.0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    num_pos = jnp.sum(pos).astype(jnp.float32)
    num_neg = jnp.sum(neg).astype(jnp.float32)
    # The official per-cell weights, 1 / num_pos and neg_weight / num_neg, normalised by their sum,
    # in closed form: summing the float32 weights of a 17 x 17 map is off by ~1e-6 relative
    # (XLA's summation order), 5x the float32 noise of the loss itself.
    pos_mass = jnp.where(num_pos > 0, 1.0, 0.0)
    neg_mass = jnp.where(num_neg > 0, neg_weight, 0.0)
    pos_term = jnp.sum(jnp.where(pos, bce, 0.0)) / jnp.maximum(num_pos, 1.0) * pos_mass
    neg_term = jnp.sum(jnp.where(neg, bce, 0.0)) / jnp.maximum(num_neg, 1.0) * neg_mass
    total = pos_mass + neg_mass
    return jnp.where(total > 0, (pos_term + neg_term) / jnp.where(total > 0, total, 1.0), 0.0)
