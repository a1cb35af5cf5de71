"""HigherHRNet training targets: Gaussian heatmaps and the associative-embedding joint indices, per output resolution.

Follows `lib/dataset/target_generators/target_generators.py` (`HeatmapGenerator`, `JointsGenerator`) and the end of
`lib/dataset/COCOKeypoints.py` `__getitem__`, with channels-last maps:

  heatmaps  float32 [R, R, J]: per joint type, the maximum over people of an unnormalised Gaussian exp(-d^2 / (2
            sigma^2)) (peak 1 at the joint's integer pixel, sigma 2 output pixels for every resolution in the official
            cfgs), drawn in a (6 sigma + 3)-pixel square window; joints with v = 0 or outside the map are skipped.
  joints    int32 [P, J, 2]: per person row, (index, 1) pairs packed at the front for every labelled in-map joint,
            index = j * R * R + y * R + x (tag per joint) or y * R + x; the rest 0 (`research.higherhrnet.loss`
            reads them).
  mask      float32 [R, R]: 1 where the loss counts (the augmented `ignore == 0` mask at this resolution).

Joint coordinates are truncated with int() like the official code (so -0.5 becomes 0, inside the map).
"""

from __future__ import annotations

import numpy as np


def gaussian_patch(sigma: float) -> np.ndarray:
    """[6 sigma + 3, 6 sigma + 3] float64 Gaussian with its peak 1 at (3 sigma + 1, 3 sigma + 1) (official `self.g`)."""
    size = 6 * sigma + 3
    x = np.arange(0, size, 1, float)
    y = x[:, None]
    x0 = y0 = 3 * sigma + 1
    return np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * sigma ** 2))


def heatmaps(joints: np.ndarray, output_res: int, num_joints: int, sigma: float = 2.0) -> np.ndarray:
    """Heatmap targets of one image at one resolution (official `HeatmapGenerator.__call__`, channels last).

    Args:
      joints: [N, J, 3] (x, y, v) in this resolution's pixels (after augmentation).
      output_res: R, the square map side.
      num_joints: J.
      sigma: Gaussian sigma in map pixels (DATASET.SIGMA; official default output_res / 64 when negative).

    Returns:
      float32 [R, R, J].
    """
    if sigma < 0:
        sigma = output_res / 64
    g = gaussian_patch(sigma)
    hms = np.zeros((num_joints, output_res, output_res), np.float32)
    for p in np.asarray(joints):
        for idx in range(num_joints):
            pt = p[idx]
            if pt[2] <= 0:
                continue
            x, y = int(pt[0]), int(pt[1])
            if x < 0 or y < 0 or x >= output_res or y >= output_res:
                continue
            ul = int(np.round(x - 3 * sigma - 1)), int(np.round(y - 3 * sigma - 1))
            br = int(np.round(x + 3 * sigma + 2)), int(np.round(y + 3 * sigma + 2))
            c, d = max(0, -ul[0]), min(br[0], output_res) - ul[0]
            a, b = max(0, -ul[1]), min(br[1], output_res) - ul[1]
            cc, dd = max(0, ul[0]), min(br[0], output_res)
            aa, bb = max(0, ul[1]), min(br[1], output_res)
            hms[idx, aa:bb, cc:dd] = np.maximum(hms[idx, aa:bb, cc:dd], g[a:b, c:d])
    return np.ascontiguousarray(hms.transpose(1, 2, 0))


def joint_indices(joints: np.ndarray, max_num_people: int, output_res: int, tag_per_joint: bool = True) -> np.ndarray:
    """Associative-embedding joint indices of one image at one resolution (official `JointsGenerator.__call__`).

    Args:
      joints: [N, J, 3] (x, y, v) in this resolution's pixels.
      max_num_people: P (DATASET.MAX_NUM_PEOPLE, 30). People beyond P are dropped (the official code fails with an
        IndexError there).
      output_res: R.
      tag_per_joint: MODEL.TAG_PER_JOINT.

    Returns:
      int32 [P, J, 2].
    """
    joints = np.asarray(joints)
    n, num_joints = joints.shape[0], joints.shape[1]
    out = np.zeros((max_num_people, num_joints, 2), np.int32)
    for i in range(min(n, max_num_people)):
        tot = 0
        for idx in range(num_joints):
            pt = joints[i, idx]
            x, y = int(pt[0]), int(pt[1])
            if pt[2] > 0 and 0 <= x < output_res and 0 <= y < output_res:
                flat = y * output_res + x
                out[i, tot] = (idx * output_res ** 2 + flat if tag_per_joint else flat, 1)
                tot += 1
    return out


def make_targets(joints_list, masks, output_sizes, num_joints: int, max_num_people: int = 30, sigma: float = 2.0,
                 tag_per_joint: bool = True) -> dict:
    """Targets of every resolution (the loop at the end of `CocoKeypoints.__getitem__`).

    Args:
      joints_list: per resolution [N, J, 3] joints in that resolution's pixels.
      masks: per resolution [R, R] loss masks (1 = counts).
      output_sizes: DATASET.OUTPUT_SIZE, e.g. (128, 256).

    Returns:
      dict with `heatmaps_<i>` float32 [R_i, R_i, J], `mask_<i>` float32 [R_i, R_i], `joints_<i>` int32 [P, J, 2].
    """
    out = {}
    for i, r in enumerate(output_sizes):
        j = np.asarray(joints_list[i], np.float64).reshape(-1, num_joints, 3)
        out[f"heatmaps_{i}"] = heatmaps(j, r, num_joints, sigma)
        out[f"mask_{i}"] = np.asarray(masks[i], np.float32)
        out[f"joints_{i}"] = joint_indices(j, max_num_people, r, tag_per_joint)
    return out
