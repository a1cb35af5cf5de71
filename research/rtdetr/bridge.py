"""RT-DETR <-> official PyTorch `RTDETR` state_dict (keys `backbone.…`, `encoder.…`, `decoder.…`).

The generic rule of `research/bridge/torch_bridge.py` does everything but two things it cannot know:

* `nn.MultiheadAttention` stores one fused `in_proj_weight` `[3E, E]` / `in_proj_bias` `[3E]`. The Flax
  attention keeps it fused too (`self_attn/in_proj/{kernel [E, 3E], bias}`, q|k|v in that order), so the
  only change is the name: `...self_attn.in_proj.weight` <-> `...self_attn.in_proj_weight` (the rule's
  dense transpose gives the torch layout).
* `FrozenBatchNorm2d` (R50/R101 backbones, `freeze_norm`) keeps `weight`, `bias`, `running_mean`,
  `running_var` as buffers (no `num_batches_tracked`); the Flax `FrozenBatchNorm` keeps all four in
  `batch_stats` as `scale`, `bias`, `mean`, `var`. They are converted here, outside the generic rule.

Official checkpoints (training `state_dict()`s and release files) keep the weights under `ema.module` or
`model`: `read_official_checkpoint` reads either without unpickling code.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from research.bridge import torch_bridge
from research.rtdetr.model import RTDETR

_IN_PROJ = ((".in_proj.weight", ".in_proj_weight"), (".in_proj.bias", ".in_proj_bias"))
_FROZEN_LEAVES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def _split_frozen(variables: Mapping[str, Any]) -> tuple[dict, dict]:
    """-> (variables without FrozenBatchNorm entries, {module path tuple: {leaf: array}} of FrozenBatchNorms).

    A FrozenBatchNorm is a batch_stats module holding `scale` (a trainable BatchNorm keeps it in params).
    """
    out = {k: v for k, v in variables.items()}
    if "batch_stats" not in variables:
        return out, {}
    flat = traverse_util.flatten_dict(dict(variables["batch_stats"]))
    frozen_modules = {k[:-1] for k in flat if k[-1] == "scale"}
    frozen = {}
    rest = {}
    for k, v in flat.items():
        if k[:-1] in frozen_modules:
            frozen.setdefault(k[:-1], {})[k[-1]] = v
        else:
            rest[k] = v
    out["batch_stats"] = traverse_util.unflatten_dict(rest) if rest else {}
    return out, frozen


def to_torch(model: RTDETR, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax variables -> official state_dict (numpy, torch layouts, official key names, BatchNorm
    `num_batches_tracked` = 0). Keys and shapes are what the official `load_state_dict(strict=True)` expects."""
    del model  # the rule needs nothing model-specific
    rest, frozen = _split_frozen(variables)
    sd = torch_bridge.flax_to_torch(rest)
    out = {}
    for k, v in sd.items():
        for flax_suffix, torch_suffix in _IN_PROJ:
            if k.endswith(flax_suffix):
                k = k[: -len(flax_suffix)] + torch_suffix
        out[k] = v
    for path, leaves in frozen.items():
        for leaf, torch_leaf in _FROZEN_LEAVES.items():
            out[".".join(path + (torch_leaf,))] = np.asarray(leaves[leaf], np.float32)
    return out


def from_torch(model: RTDETR, state_dict: Mapping[str, Any], template: Mapping[str, Any]) -> dict[str, Any]:
    """Official state_dict -> Flax variables shaped like `template` (strict: raises `torch_bridge.BridgeError`
    listing every missing / unexpected key and shape mismatch)."""
    sd = {}
    for k, v in state_dict.items():
        for flax_suffix, torch_suffix in _IN_PROJ:
            if k.endswith(torch_suffix):
                k = k[: -len(torch_suffix)] + flax_suffix
        sd[k] = _np(v)
    rest, frozen = _split_frozen(template)
    frozen_vals, missing, mismatched = {}, [], []
    for path, leaves in frozen.items():
        for leaf, torch_leaf in _FROZEN_LEAVES.items():
            key = ".".join(path + (torch_leaf,))
            if key not in sd:
                missing.append(key)
                continue
            v = sd.pop(key)
            if tuple(v.shape) != tuple(np.shape(leaves[leaf])):
                mismatched.append(f"{key}: file {tuple(v.shape)} vs model {tuple(np.shape(leaves[leaf]))}")
                continue
            frozen_vals[path + (leaf,)] = np.asarray(v, dtype=leaves[leaf].dtype)
    what = f"RT-DETR ({_describe(model)})"
    if missing or mismatched:
        raise torch_bridge.BridgeError(
            f"state_dict does not fit {what}:\n" + "".join(
                f"  {t} ({len(ks)}): {', '.join(ks[:20])}\n" for t, ks in (("missing keys", missing),
                                                                         ("shape mismatches", mismatched)) if ks))
    out = torch_bridge.torch_to_flax(sd, rest, what=what)
    if frozen_vals:
        bs = traverse_util.flatten_dict(dict(out.get("batch_stats", {})))
        bs.update(frozen_vals)
        out["batch_stats"] = traverse_util.unflatten_dict(bs)
    return out


def _np(v: Any) -> np.ndarray:
    """A torch tensor or array-like -> numpy (torch imported by the caller, never here)."""
    if hasattr(v, "detach"):
        return v.detach().cpu().float().numpy() if v.is_floating_point() else v.detach().cpu().numpy()
    return np.asarray(v)


def _describe(model: RTDETR) -> str:
    try:
        b, d = model.backbone.keywords, model.decoder.keywords
        return f"depth {b.get('depth')}, {d.get('num_decoder_layers')} decoder layers, {d.get('num_classes')} classes"
    except AttributeError:
        return "custom"


# Where the official training code keeps the weights in a checkpoint (`src/solver/solver.py` `state_dict`):
# `{'model': ..., 'ema': {'module': ..., 'updates', 'warmups'}, 'optimizer': ..., 'lr_scheduler': ...,
# 'last_epoch': ...}`; the release files hold `{'ema': {'module': ...}}`. `tools/export_onnx.py` and the
# evaluation take the EMA weights when present, else `model`.
CHECKPOINT_ENTRIES = (("ema", "module"), ("model",))


def read_official_checkpoint(path: str) -> tuple[dict[str, np.ndarray], str]:
    """The RT-DETR state_dict of an official checkpoint or weights file, read without running pickled code.

    `.pth`/`.pt` files are read with `torch.load(..., weights_only=True)`, which rebuilds tensors, containers
    and plain values (an optimizer or lr-scheduler state is fine) and refuses anything else; `.safetensors`
    holds a plain state_dict (`torch_bridge.read_checkpoint` with the official entries). The weights are taken
    as the official `tools/export_onnx.py` takes them:
    `ckpt['ema']['module']` when present, else `ckpt['model']`, else the file itself when it is a plain
    state_dict.

    Args:
      path: the file.
    Returns:
      (state_dict as numpy arrays keyed by the official names, where it was found: `ema.module`, `model`
      or `state_dict`).
    Raises:
      FileNotFoundError: no such file.
      ImportError: a `.pt`/`.pth` file and no torch.
      torch_bridge.BridgeError: the file holds pickled objects other than tensors and plain containers
        (refused by `weights_only=True`; the message names the file and the object), or no state_dict under
        `ema.module` / `model` / the top level, or non-tensor values in it.
    """
    return torch_bridge.read_checkpoint(
        path, entries=CHECKPOINT_ENTRIES, network="RT-DETR",
        hint="If you trust it, extract the weights once in an environment with the official code: "
             "`ckpt = torch.load(f, weights_only=False); torch.save(ckpt['ema']['module'] if 'ema' in ckpt "
             "else ckpt['model'], 'state_dict.pth')`, and pass that file.")
