"""SiamFC <-> official PyTorch `Net(AlexNetV1(), SiamFC(0.001))` state_dict (keys `backbone.convN.i.…`).

The generic rule of `research/bridge/torch_bridge.py` covers every key: the Flax module names are
the official attribute names, and a grouped convolution needs no override, because Flax stores its
kernel as `[kh, kw, in / groups, out]` and torch as `[out, in / groups, kh, kw]`, the same
transposition as an ungrouped one. The head has no parameters.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from research.bridge import torch_bridge
from research.siamfc.model import SiamFC

TORCH_MAPPING = torch_bridge.TorchMapping()


def to_torch(model: SiamFC, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax `{'params', 'batch_stats'}` -> official state_dict (numpy, torch layouts and key names).

    BatchNorm `num_batches_tracked` counters are included (as 0), so torch's strict
    `load_state_dict` accepts the result.
    """
    del model  # every key follows from the variable paths
    return _torch_order(torch_bridge.flax_to_torch(variables, TORCH_MAPPING))


_LEAF_ORDER = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _torch_order(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Orders keys as torch's `state_dict()` does: module by module, parameters before buffers.

    Order does not matter to `load_state_dict`, but the file then reads like the official one.
    """
    modules: dict[str, None] = {}
    for k in sd:
        modules.setdefault(k.rsplit(".", 1)[0], None)
    out = {f"{m}.{leaf}": sd[f"{m}.{leaf}"] for m in modules for leaf in _LEAF_ORDER if f"{m}.{leaf}" in sd}
    if len(out) != len(sd):  # a leaf name outside _LEAF_ORDER would otherwise vanish
        raise torch_bridge.BridgeError(f"unexpected state_dict leaves: {sorted(set(sd) - set(out))}")
    return out


def from_torch(model: SiamFC, state_dict: Mapping[str, Any], template: Mapping[str, Any]) -> dict[str, Any]:
    """Official state_dict -> Flax variables shaped like `template` (e.g. `model.init` output).

    Strict like `load_state_dict(strict=True)`: raises `torch_bridge.BridgeError` naming every
    missing key, unexpected key and shape mismatch (e.g. a checkpoint of another width).
    """
    return torch_bridge.torch_to_flax(state_dict, template, TORCH_MAPPING,
                                      what=f"SiamFC AlexNetV1 (widths {tuple(model.widths)})")
