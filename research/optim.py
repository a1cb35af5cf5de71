"""Parameter groups by name patterns: what the official PyTorch optimisers express with
`param_groups` (per-group learning rate, weight decay), for optax.

A parameter's name is its Flax path joined with "." and its leaf renamed as the torch bridge
does (`backbone.res_layers.0.blocks.0.branch2a.conv.weight`, `...norm.bias`), so the official
configs' regular expressions apply unchanged. Rules are tried in order; the first whose pattern
matches (`re.search`) gives the label; parameters no rule matches get `default`:

    labels = group_labels(params, [(r"^(?=.*backbone)(?!.*norm).*$", "backbone"),
                                   (r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bias)).*$", "no_decay")],
                          default="rest")
    tx = optax.multi_transform({"backbone": adamw(1e-5), "no_decay": adamw(1e-4, weight_decay=0.0),
                                "rest": adamw(1e-4)}, labels)

RT-DETR's backbone learning rate and no-decay norms, and YOLOv5's three groups (conv weights
decayed, BatchNorm weights and biases not: `research/yolov5/optim.py`), are written this way.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax

_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def _part(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def param_name(path, torch_names: bool = True) -> str:
    """The name of a params leaf from its tree path, joined with "."; with `torch_names` the
    leaf is renamed as the torch bridge does (`kernel`/`scale`/`embedding` -> `weight`)."""
    parts = [_part(k) for k in path]
    if torch_names:
        parts[-1] = _LEAF.get(parts[-1], parts[-1])
    return ".".join(parts)


def group_labels(params: Any, rules: Sequence[tuple[str, str]], default: str, torch_names: bool = True) -> Any:
    """A tree like `params` holding each leaf's group label (see the module docstring).

    `torch_names=False` matches the Flax names instead (`bn.scale`, `conv.kernel`), e.g. to
    group every norm layer's `scale` whatever the module is called.

    Raises:
      re.error: a pattern that is not a valid regular expression.
    """
    compiled = [(re.compile(p), label) for p, label in rules]

    def label(path, _):
        name = param_name(path, torch_names)
        for pattern, lab in compiled:
            if pattern.search(name):
                return lab
        return default

    return jax.tree_util.tree_map_with_path(label, params)


def mask(params: Any, patterns: Sequence[str]) -> Any:
    """A bool tree like `params`: True where the name matches none of `patterns` (e.g. the
    parameters that get weight decay when `patterns` name the no-decay ones)."""
    labels = group_labels(params, [(p, "matched") for p in patterns], default="other")
    return jax.tree_util.tree_map(lambda lab: lab == "other", labels)
