"""YOLOv5 <-> official PyTorch `models.yolo.Model` state_dict (keys `model.<layer>.…`)."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from research.bridge import torch_bridge
from research.yolov5.model import YOLOv5


def torch_mapping(model: YOLOv5) -> torch_bridge.TorchMapping:
    detect = model.detect_spec.index
    return torch_bridge.TorchMapping(
        prefix="model.", buffers={f"model.{detect}.anchors": model.anchors_stride_units})


def to_torch(model: YOLOv5, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax variables -> official state_dict (numpy, torch layouts, official key names)."""
    return torch_bridge.flax_to_torch(variables, torch_mapping(model))


def from_torch(model: YOLOv5, state_dict: Mapping[str, Any], template: Mapping[str, Any]) -> dict[str, Any]:
    """Official state_dict -> Flax variables shaped like `template` (strict)."""
    d, w = model.cfg["depth_multiple"], model.cfg["width_multiple"]
    return torch_bridge.torch_to_flax(
        state_dict, template, torch_mapping(model),
        what=f"YOLOv5 (depth {d}, width {w}, nc {model.cfg['nc']})")


def num_classes(model: YOLOv5, state_dict: Mapping[str, Any], what: str = "state_dict") -> int:
    """The class count of an official state_dict, from its Detect convolutions' output channels.

    `model` gives the Detect layer's index and anchors per level (any class count).

    Raises:
      torch_bridge.BridgeError: the state_dict has no Detect layer where `model` has it, or its
        output channels are not a multiple of the anchors per level.
    """
    detect = model.detect_spec.index
    key = f"model.{detect}.m.0.weight"
    if key not in state_dict:
        raise torch_bridge.BridgeError(f"{what}: no {key} (not a YOLOv5 state_dict of this layer list?)")
    out = int(np.shape(state_dict[key])[0])
    na = model.anchors_pixels.shape[1]
    if out % na or out // na <= 5:
        raise torch_bridge.BridgeError(f"{what}: {key} has {out} output channels, not {na} x (5 + classes)")
    return out // na - 5
