"""HigherHRNet training loss: masked heatmap MSE per resolution plus associative-embedding push / pull on the tags.

Follows `lib/core/loss.py` (`MultiLossFactory`, `HeatmapLoss`, `AELoss`) and the loss sum of `lib/core/trainer.py`
`do_train`, as pure jit-able functions on NHWC outputs. The official AELoss loops over people in Python; here people
are a padded axis (`MAX_NUM_PEOPLE` = 30 rows, empty rows all zero) and visibility masks replace the loops, with the
same arithmetic: a person with no visible joint does not count, one person gives push 0, no person gives 0 and 0.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """`LOSS` of the yaml (`experiments/coco/higher_hrnet/w32_512_adam_lr1e-3.yaml`), one entry per output.

    Attributes:
      num_joints: `MODEL.NUM_JOINTS`: the heatmap channels at the front of every output.
      with_heatmaps_loss, heatmaps_loss_factor: `WITH_HEATMAPS_LOSS`, `HEATMAPS_LOSS_FACTOR`.
      with_ae_loss, push_loss_factor, pull_loss_factor: `WITH_AE_LOSS`, `PUSH_LOSS_FACTOR`, `PULL_LOSS_FACTOR`.
      ae_loss_type: `AE_LOSS_TYPE`, 'exp' (exp(-d^2)) or 'max' (max(0, 1 - |d|)).
    """

    num_joints: int = 17
    with_heatmaps_loss: tuple[bool, ...] = (True, True)
    heatmaps_loss_factor: tuple[float, ...] = (1.0, 1.0)
    with_ae_loss: tuple[bool, ...] = (True, False)
    push_loss_factor: tuple[float, ...] = (0.001, 0.001)
    pull_loss_factor: tuple[float, ...] = (0.001, 0.001)
    ae_loss_type: str = "exp"

    @classmethod
    def from_official(cls, cfg: Mapping[str, Any]) -> "LossConfig":
        """From an official experiment yaml parsed to nested dicts: `MODEL.NUM_JOINTS` and the `LOSS` lists.

        Raises:
          KeyError: a required key is missing. ValueError: list lengths differ or the AE type is unknown.
        """
        loss = cfg["LOSS"]
        out = cls(num_joints=int(cfg["MODEL"]["NUM_JOINTS"]),
                  with_heatmaps_loss=tuple(bool(v) for v in loss["WITH_HEATMAPS_LOSS"]),
                  heatmaps_loss_factor=tuple(float(v) for v in loss["HEATMAPS_LOSS_FACTOR"]),
                  with_ae_loss=tuple(bool(v) for v in loss["WITH_AE_LOSS"]),
                  push_loss_factor=tuple(float(v) for v in loss["PUSH_LOSS_FACTOR"]),
                  pull_loss_factor=tuple(float(v) for v in loss["PULL_LOSS_FACTOR"]),
                  ae_loss_type=str(loss["AE_LOSS_TYPE"]))
        if "NUM_STAGES" in loss and int(loss["NUM_STAGES"]) != out.num_stages:
            raise ValueError(f"LOSS.NUM_STAGES {loss['NUM_STAGES']} but {out.num_stages} WITH_HEATMAPS_LOSS entries")
        out.validate()
        return out

    @property
    def num_stages(self) -> int:
        return len(self.with_heatmaps_loss)

    def validate(self) -> None:
        """Raises ValueError where the official `_init_check` asserts (list lengths) or the loss type is unknown."""
        n = self.num_stages
        for name in ("heatmaps_loss_factor", "with_ae_loss", "push_loss_factor", "pull_loss_factor"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"LossConfig.{name} needs {n} entries (one per output), got {getattr(self, name)}")
        if self.ae_loss_type not in ("exp", "max"):
            raise ValueError(f"unknown AE loss type {self.ae_loss_type!r}; expected 'exp' or 'max'")


def heatmap_loss(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked squared error, mean over pixels and joints (official `HeatmapLoss`).

    Args:
      pred, target: [B, H, W, J] heatmaps.
      mask: [B, H, W], 0 where crowd / unannotated people are (the dataset's `masks`), 1 elsewhere.

    Returns:
      [B] per-image loss (not yet multiplied by the loss factor).
    """
    if pred.shape != target.shape:
        raise ValueError(f"heatmap prediction {pred.shape} and target {target.shape} differ")
    d = pred.astype(jnp.float32) - target.astype(jnp.float32)
    return jnp.mean(jnp.square(d) * mask.astype(jnp.float32)[..., None], axis=(1, 2, 3))


def gather_tags(tags: jax.Array, joints: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Reads each annotated joint's tag.

    Args:
      tags: [B, H, W, D] tag maps (D = num_joints with TAG_PER_JOINT, else 1).
      joints: [B, P, K, 2] int, the dataset's `joints` (official `JointsGenerator`): per person row (padded to P
        people), up to K (joint index, visible) pairs packed at the front, where the index is the flat position in
        the channel-major [D, H, W] tag tensor, `j * H * W + y * W + x` (`y * W + x` with one tag map), and visible
        > 0 marks a real entry.

    Returns:
      ([B, P, K] float32 tag values, 0 where not visible; [B, P, K] bool visibility).
    """
    b, h, w, d = tags.shape
    idx, vis = joints[..., 0].astype(jnp.int32), joints[..., 1] > 0
    hw = h * w
    # channel-major (NCHW) flat index -> position in the NHWC array, so no transpose of the tag maps is needed
    flat = jnp.clip((idx % hw) * d + idx // hw, 0, hw * d - 1)
    vals = jnp.take_along_axis(tags.reshape(b, -1).astype(jnp.float32), flat.reshape(b, -1), axis=1)
    return jnp.where(vis, vals.reshape(idx.shape), 0.0), vis


def ae_loss_single(values: jax.Array, visible: jax.Array, loss_type: str = "exp") -> tuple[jax.Array, jax.Array]:
    """Associative-embedding push / pull of one image (official `AELoss.singleTagLoss`).

    Args:
      values: [P, K] tag of each annotated joint. visible: [P, K] bool.
      loss_type: 'exp' or 'max'.

    Returns:
      (push, pull) scalars, not yet multiplied by the loss factors: pull = mean over people of the variance of their
      joints' tags around the person's mean tag; push = 0.5 * mean over ordered pairs of different people of
      exp(-(mean_a - mean_b)^2) ('exp') or max(0, 1 - |mean_a - mean_b|) ('max'); people without a visible joint are
      left out, push is 0 with fewer than two people, both are 0 with none.
    """
    vis = visible.astype(jnp.float32)
    count = jnp.sum(vis, axis=1)
    person = count > 0
    denom = jnp.maximum(count, 1.0)
    mean = jnp.sum(values * vis, axis=1) / denom
    pull_p = jnp.sum(jnp.square(values - mean[:, None]) * vis, axis=1) / denom
    n = jnp.sum(person.astype(jnp.float32))
    pull = jnp.sum(jnp.where(person, pull_p, 0.0)) / jnp.maximum(n, 1.0)
    diff = mean[:, None] - mean[None, :]
    if loss_type == "exp":
        sim = jnp.exp(-jnp.square(diff))
    elif loss_type == "max":
        sim = jnp.maximum(1.0 - jnp.abs(diff), 0.0)
    else:
        raise ValueError(f"unknown AE loss type {loss_type!r}; expected 'exp' or 'max'")
    p = values.shape[0]
    pairs = person[:, None] & person[None, :] & ~jnp.eye(p, dtype=bool)
    push = jnp.sum(jnp.where(pairs, sim, 0.0)) / jnp.maximum((n - 1.0) * n, 1.0) * 0.5
    return jnp.where(n > 1, push, 0.0), pull


def ae_loss(tags: jax.Array, joints: jax.Array, loss_type: str = "exp") -> tuple[jax.Array, jax.Array]:
    """Batched `ae_loss_single` (official `AELoss.forward`).

    Args:
      tags: [B, H, W, D] tag maps. joints: [B, P, K, 2] int (see `gather_tags`).

    Returns:
      (push [B], pull [B]), not yet multiplied by the loss factors.
    """
    values, vis = gather_tags(tags, joints)
    return jax.vmap(lambda v, m: ae_loss_single(v, m, loss_type))(values, vis)


def multi_loss(outputs: Sequence[jax.Array], heatmaps: Sequence[jax.Array], masks: Sequence[jax.Array],
               joints: Sequence[jax.Array], config: LossConfig = LossConfig()) -> dict:
    """The official `MultiLossFactory` forward plus the total that `do_train` back-propagates.

    Args:
      outputs: per resolution [B, H_i, W_i, C_i] network outputs (`model(...)['outputs']`): num_joints heatmaps, then
        the tag maps where `with_ae_loss[i]`.
      heatmaps: per resolution [B, H_i, W_i, num_joints] target heatmaps.
      masks: per resolution [B, H_i, W_i] loss masks.
      joints: per resolution [B, P, K, 2] int joint indices / visibility (see `gather_tags`).
      config: loss settings.

    Returns:
      dict with per-output lists (None where that loss is off) of [B] losses already multiplied by their factors:
      `heatmaps_loss`, `push_loss`, `pull_loss`; and `loss`, the scalar sum over outputs of their batch means.

    Raises:
      ValueError: list lengths differ from the number of outputs in `config`.
    """
    config.validate()
    n = config.num_stages
    for name, seq in (("outputs", outputs), ("heatmaps", heatmaps), ("masks", masks), ("joints", joints)):
        if len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries, the loss config {n} outputs")
    nj = config.num_joints
    hm_losses, push_losses, pull_losses = [], [], []
    total = jnp.zeros((), jnp.float32)
    for i in range(n):
        offset = 0
        hm = push = pull = None
        if config.with_heatmaps_loss[i]:
            hm = heatmap_loss(outputs[i][..., :nj], heatmaps[i], masks[i]) * config.heatmaps_loss_factor[i]
            offset = nj
        if config.with_ae_loss[i]:
            push, pull = ae_loss(outputs[i][..., offset:], joints[i], config.ae_loss_type)
            push, pull = push * config.push_loss_factor[i], pull * config.pull_loss_factor[i]
        # do_train adds an output's push / pull only inside its heatmap-loss branch
        if hm is not None:
            total = total + jnp.mean(hm)
            if push is not None:
                total = total + jnp.mean(push) + jnp.mean(pull)
        hm_losses.append(hm)
        push_losses.append(push)
        pull_losses.append(pull)
    return {"heatmaps_loss": hm_losses, "push_loss": push_losses, "pull_loss": pull_losses, "loss": total}
