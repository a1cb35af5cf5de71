"""HigherHRNet training augmentation, applied consistently to the image, the loss masks and the joints.

Follows `lib/dataset/transforms/transforms.py` and `build.py` (`build_transforms` for training):

  RandomAffineTransform   centre = image centre, scale = short (or long) side / 200 times U[min_scale, max_scale),
                          rotation U[-max_rotation, max_rotation) degrees, centre shifted by integers in
                          [-max_translate * scale, max_translate * scale); one affine map per output resolution (the
                          masks are warped as uint8 * 255, bilinear, then > 0.5; the joints transformed in float64)
                          and one for the input (`cv2.warpAffine`, bilinear, black border). Outside the image the
                          mask is 0, so the loss ignores it, as officially.
  RandomHorizontalFlip    with probability `flip_prob` (0.5): image and masks mirrored, joints relabelled by
                          `flip_index` and x -> output_size - x - 1 at each resolution.
  ToTensor + Normalize    done on the device (`normalize`): /255, ImageNet mean / std.

Randomness comes from a `np.random.Generator` (the official code uses the global numpy / `random` state), drawn in
the official order (scale, rotation, dx, dy, then the flip), so a given generator state gives one augmentation.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import cv2
import numpy as np

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """The `DATASET` augmentation settings (w32_512_adam_lr1e-3.yaml values)."""

    input_size: int = 512
    output_sizes: tuple[int, ...] = (128, 256)
    max_rotation: float = 30.0
    min_scale: float = 0.75
    max_scale: float = 1.5
    scale_type: str = "short"
    max_translate: float = 40.0
    flip_prob: float = 0.5
    flip_index: tuple[int, ...] = (0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15)


def affine_matrix(center: Sequence[float], scale: float, res: Sequence[int], rot: float = 0.0) -> np.ndarray:
    """[3, 3] float64 map from image pixels to a `res` = (h, w) output (official `_get_affine_matrix`): the square of
    side 200 * scale around `center` fills the output, rotated by `rot` degrees about the output centre."""
    h = 200 * scale
    t = np.zeros((3, 3))
    t[0, 0] = float(res[1]) / h
    t[1, 1] = float(res[0]) / h
    t[0, 2] = res[1] * (-float(center[0]) / h + 0.5)
    t[1, 2] = res[0] * (-float(center[1]) / h + 0.5)
    t[2, 2] = 1
    if rot != 0:
        r = np.deg2rad(-rot)
        sn, cs = np.sin(r), np.cos(r)
        rot_mat = np.array([[cs, -sn, 0], [sn, cs, 0], [0, 0, 1.0]])
        t_mat = np.eye(3)
        t_mat[0, 2], t_mat[1, 2] = -res[1] / 2, -res[0] / 2
        t_inv = t_mat.copy()
        t_inv[:2, 2] *= -1
        t = t_inv @ rot_mat @ t_mat @ t
    return t


def affine_joints(joints: np.ndarray, mat: np.ndarray) -> np.ndarray:
    """(x, y) of [..., 2] points through a [2, 3] affine map (float64)."""
    pts = np.asarray(joints, np.float64)
    flat = pts.reshape(-1, 2)
    return (np.concatenate([flat, np.ones_like(flat[:, :1])], 1) @ mat.T).reshape(pts.shape)


def random_affine(image: np.ndarray, masks: list, joints: list, cfg: AugmentConfig, rng: np.random.Generator):
    """Official `RandomAffineTransform.__call__`.

    Args:
      image: uint8 [H, W, 3]. masks: per output resolution a [H, W] float mask (1 = counts). joints: per output
        resolution [N, J, 3] (x, y, v) in image pixels.
      cfg: the augmentation settings. rng: the randomness.

    Returns:
      (image uint8 [S, S, 3], masks [R_i, R_i] float32 in {0, 1}, joints [N, J, 3] in output pixels (v unchanged)).
    """
    height, width = image.shape[:2]
    center = np.array((width / 2, height / 2))
    if cfg.scale_type == "long":
        scale = max(height, width) / 200
    elif cfg.scale_type == "short":
        scale = min(height, width) / 200
    else:
        raise ValueError(f"unknown scale_type {cfg.scale_type!r}: 'short' or 'long'")
    aug_scale = rng.random() * (cfg.max_scale - cfg.min_scale) + cfg.min_scale
    scale *= aug_scale
    aug_rot = (rng.random() * 2 - 1) * cfg.max_rotation
    if cfg.max_translate > 0:
        lo, hi = int(-cfg.max_translate * scale), int(cfg.max_translate * scale)  # np.random.randint truncates
        center[0] += rng.integers(lo, hi) if hi > lo else 0
        center[1] += rng.integers(lo, hi) if hi > lo else 0
    out_masks, out_joints = [], []
    for i, r in enumerate(cfg.output_sizes):
        mat = affine_matrix(center, scale, (r, r), aug_rot)[:2]
        m = cv2.warpAffine((np.asarray(masks[i]) * 255).astype(np.uint8), mat, (r, r)) / 255
        out_masks.append((m > 0.5).astype(np.float32))
        j = np.array(joints[i], np.float64, copy=True)
        j[..., :2] = affine_joints(j[..., :2], mat)
        out_joints.append(j)
    mat = affine_matrix(center, scale, (cfg.input_size, cfg.input_size), aug_rot)[:2]
    image = cv2.warpAffine(image, mat, (cfg.input_size, cfg.input_size))
    return image, out_masks, out_joints


def horizontal_flip(image: np.ndarray, masks: list, joints: list, flip_index: Sequence[int],
                    output_sizes: Sequence[int]):
    """The mirror of `RandomHorizontalFlip` (always applied): image and masks flipped left-right, joints relabelled
    by flip_index, x -> output_size - x - 1 per resolution. Applying it twice gives back the inputs."""
    image = np.ascontiguousarray(image[:, ::-1])
    masks = [np.ascontiguousarray(m[:, ::-1]) for m in masks]
    out = []
    for j, r in zip(joints, output_sizes):
        j = np.array(j, np.float64, copy=True)[:, list(flip_index)]
        j[:, :, 0] = r - j[:, :, 0] - 1
        out.append(j)
    return image, masks, out


def augment(image: np.ndarray, ignore: np.ndarray, joints: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator):
    """The official training transform (affine, then flip with probability `cfg.flip_prob`).

    Args:
      image: uint8 [H, W, 3] RGB. ignore: uint8 [H, W] (1 = ignored region). joints: [N, J, 3] image pixels.
      cfg, rng: settings and randomness (deterministic given the generator's state).

    Returns:
      (image uint8 [S, S, 3], masks: per output size [R, R] float32, joints: per output size [N, J, 3]).
    """
    n_out = len(cfg.output_sizes)
    mask = (np.asarray(ignore) < 1).astype(np.float64)
    joints = np.asarray(joints, np.float64)
    image, masks, joints_list = random_affine(image, [mask] * n_out, [joints] * n_out, cfg, rng)
    if rng.random() < cfg.flip_prob:
        image, masks, joints_list = horizontal_flip(image, masks, joints_list, cfg.flip_index, cfg.output_sizes)
    return image, masks, joints_list


def normalize(images, max_value: float = 255.0):
    """RGB [..., 3] in [0, max_value] -> the network input (ToTensor + Normalize): (x / max_value - mean) / std,
    float32 (max_value 255 for uint8 images, 1 for the exported graph's input). Works on numpy and jax arrays."""
    import jax.numpy as jnp
    x = jnp.asarray(images).astype(jnp.float32)
    if max_value != 1.0:
        x = x / max_value
    return (x - jnp.asarray(MEAN, jnp.float32)) / jnp.asarray(STD, jnp.float32)


def normalize_for_export(images):
    """`normalize(images, 1.0)` for [B, H, W, 3] images, written channels-first for the exported graph: the same
    values, but in ONNX the subtraction and division broadcast over whole [H, W] planes after the layout
    transpose (which onnxruntime merges with the first convolution's), instead of over a last axis of 3:
    0.5 ms instead of 4.7 ms of a W32-512 forward at 512 px (onnxruntime profile, transpose included)."""
    import jax.numpy as jnp
    x = jnp.transpose(jnp.asarray(images, jnp.float32), (0, 3, 1, 2))
    x = (x - jnp.asarray(MEAN, jnp.float32)[:, None, None]) / jnp.asarray(STD, jnp.float32)[:, None, None]
    return jnp.transpose(x, (0, 2, 3, 1))
