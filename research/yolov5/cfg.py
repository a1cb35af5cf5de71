"""YOLOv5 model yaml reading (the official `yolov5{n,s,m,l,x}.yaml` multiples): no JAX, no flax.

Kept apart from `research/yolov5/model.py` so the official-PyTorch benchmark runner
(`research/yolov5/official_torch.py`, run in the official code's interpreter) can build the official
model from the same layer list without importing JAX.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import yaml

VARIANTS = {  # depth_multiple, width_multiple of the official yolov5{n,s,m,l,x}.yaml
    "n": (0.33, 0.25),
    "s": (0.33, 0.50),
    "m": (0.67, 0.75),
    "l": (1.0, 1.0),
    "x": (1.33, 1.25),
    "tiny": (0.33, 0.125),  # not official: a fast variant for tests
}
DEFAULT_YAML = os.path.join(os.path.dirname(__file__), "models", "yolov5.yaml")


def load_yaml_cfg(path_or_dict: str | Mapping[str, Any] | None = None, *, variant: str | None = None,
                  nc: int | None = None) -> dict:
    """Reads a model yaml (or takes a dict) and applies the variant multiples / class count."""
    if path_or_dict is None or path_or_dict == "":
        path_or_dict = DEFAULT_YAML
    if isinstance(path_or_dict, str):
        if not os.path.exists(path_or_dict):
            raise FileNotFoundError(f"YOLOv5 model yaml not found: {path_or_dict}")
        with open(path_or_dict) as f:
            cfg = yaml.safe_load(f)
    else:
        cfg = _plain(path_or_dict)
    for key in ("anchors", "backbone", "head"):
        if key not in cfg:
            raise ValueError(f"YOLOv5 model cfg lacks '{key}' (have {sorted(cfg)})")
    if variant:
        if variant not in VARIANTS:
            raise ValueError(f"unknown YOLOv5 variant {variant!r}; choose one of {sorted(VARIANTS)}")
        cfg["depth_multiple"], cfg["width_multiple"] = VARIANTS[variant]
    if nc is not None:
        cfg["nc"] = int(nc)
    return cfg


def _plain(obj):
    """ConfigDict / FrozenDict / tuple trees -> plain dicts and lists."""
    if hasattr(obj, "to_dict"):
        obj = obj.to_dict()
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
