"""HigherHRNet <-> official PyTorch `PoseHigherResolutionNet` state_dict (keys `conv1.weight`, `stage2.0.branches...`).

Module names in `research/higherhrnet/model.py` are the official attribute paths, so the shared rule of
`research/bridge/torch_bridge.py` maps every tensor except the transposed convolutions of the head
(`deconv_layers.<i>.0.0.weight`): torch stores them `(in, out, kh, kw)` and correlates the stride-dilated input with the
spatially flipped kernel, while the Flax kernel is `[kh, kw, in, out]` applied without flip. BatchNorm
`num_batches_tracked` counters are emitted (as 0): the official modules register them, so a strict
`load_state_dict` needs them; on import they are ignored.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from research.bridge import torch_bridge
from research.higherhrnet.model import HigherHRNet


def _deconv_to_torch(k: np.ndarray) -> np.ndarray:
    """Flax [kh, kw, in, out] -> torch (in, out, kh, kw), spatially flipped."""
    return np.ascontiguousarray(np.transpose(k[::-1, ::-1], (2, 3, 0, 1)))


def _deconv_from_torch(w: np.ndarray) -> np.ndarray:
    """torch (in, out, kh, kw) -> Flax [kh, kw, in, out], spatially flipped."""
    return np.ascontiguousarray(np.transpose(np.asarray(w), (2, 3, 0, 1))[::-1, ::-1])


def torch_mapping(model: HigherHRNet) -> torch_bridge.TorchMapping:
    """The generic rule plus one override pair per transposed convolution of the head."""
    keys = [f"deconv_layers.{i}.0.0.weight" for i in range(model.config.deconv.num_deconvs)]
    return torch_bridge.TorchMapping(
        to_torch_overrides={k: _deconv_to_torch for k in keys},
        from_torch_overrides={k: _deconv_from_torch for k in keys},
        num_batches_tracked=True)


def to_torch(model: HigherHRNet, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax `{'params', 'batch_stats'}` -> official state_dict (numpy, torch layouts, official keys).

    Keys come in the official `state_dict()` order (module registration order: the final layers before the deconv
    layers, each BatchNorm's weight, bias, running_mean, running_var, num_batches_tracked).
    """
    sd = torch_bridge.flax_to_torch(variables, torch_mapping(model))
    return {k: sd[k] for k in sorted(sd, key=_official_order)}


def strip_module_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The state_dict without the `module.` prefix that `torch.nn.DataParallel` / DistributedDataParallel adds to
    every key (the `state_dict` of the official `tools/dist_train.py` checkpoints is the wrapped model's); unchanged
    when not every key has it."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def from_torch(model: HigherHRNet, state_dict: Mapping[str, Any], template: Mapping[str, Any]) -> dict[str, Any]:
    """Official state_dict -> Flax variables shaped like `template` (strict: raises `BridgeError` listing every
    missing / unexpected key and shape mismatch, like `load_state_dict(strict=True)`). Keys may carry DataParallel's
    `module.` prefix (`strip_module_prefix`)."""
    stages = "/".join(str(s.num_channels[-1]) for s in model.config.stages)
    return torch_bridge.torch_to_flax(
        strip_module_prefix(state_dict), template, torch_mapping(model),
        what=f"HigherHRNet (branch widths {stages}, {model.config.num_joints} joints)")


# Rank of each attribute name among its siblings in the official modules' registration order.
_NAME_RANK = {name: r for r, name in enumerate((
    "conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample", "layer1",
    "transition1", "stage2", "transition2", "stage3", "transition3", "stage4", "final_layers", "deconv_layers",
    "branches", "fuse_layers", "weight", "bias", "running_mean", "running_var", "num_batches_tracked"))}


def _official_order(key: str) -> tuple:
    """Sort key giving torch's `state_dict()` order (module registration order; Sequential / ModuleList indices
    numerically), which does not depend on how a Flax variables dict happens to be ordered (jit sorts keys)."""
    return tuple((int(t), "") if t.isdigit() else (_NAME_RANK.get(t, len(_NAME_RANK)), t) for t in key.split("."))
