"""Flax variables <-> PyTorch state_dicts, by one mechanical naming rule.

Networks name their Flax modules after the official PyTorch attributes (`0/conv`, `m.0/cv1`),
so a parameter path joined with "." is the torch key once the leaf is renamed:

  params/.../kernel     -> ...weight   conv HWIO -> OIHW (3, 2, 0, 1); dense (in, out) -> (out, in)
  params/.../scale      -> ...weight   (norm layers)
  params/.../bias       -> ...bias
  params/.../embedding  -> ...weight
  batch_stats/.../mean  -> ...running_mean
  batch_stats/.../var   -> ...running_var      (+ ...num_batches_tracked, a 0-d int64 counter)

A network supplies what the rule cannot know through `TorchMapping`: the key prefix
(`model.` for YOLOv5), constant buffers (YOLOv5 anchors) and per-key overrides (a transposed
convolution's kernel layout, for instance). Files are read without unpickling code:
`torch.load(..., weights_only=True)` or safetensors.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any, Callable, Mapping

import numpy as np
from flax import traverse_util


class BridgeError(ValueError):
    """A state_dict does not fit the model; the message lists every difference."""


@dataclasses.dataclass(frozen=True)
class TorchMapping:
    """What a network adds to the generic rule.

    Attributes:
      prefix: prepended to every key (`model.` for YOLOv5's `Model.model` Sequential).
      buffers: constant torch buffers the Flax model keeps as attributes, key -> value.
      to_torch_overrides: torch key -> fn(flax array) -> torch array, replacing the default
        layout change for that key (e.g. ConvTranspose kernels).
      from_torch_overrides: torch key -> fn(torch array) -> flax array (inverse of the above).
      num_batches_tracked: emit BatchNorm `num_batches_tracked` counters (official modules
        register them, so `load_state_dict(strict=True)` needs them).
    """

    prefix: str = ""
    buffers: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    to_torch_overrides: Mapping[str, Callable[[np.ndarray], np.ndarray]] = dataclasses.field(default_factory=dict)
    from_torch_overrides: Mapping[str, Callable[[np.ndarray], np.ndarray]] = dataclasses.field(default_factory=dict)
    num_batches_tracked: bool = True


_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("params", "embedding"): "weight",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def torch_key(collection: str, path: tuple[str, ...], prefix: str = "") -> str:
    """('params', ('0', 'conv', 'kernel')) -> 'model.0.conv.weight' with prefix 'model.'."""
    leaf = _LEAF_NAMES.get((collection, path[-1]))
    if leaf is None:
        raise BridgeError(f"no torch name for Flax variable {collection}/{'/'.join(path)}")
    return prefix + ".".join(path[:-1] + (leaf,))


def _kernel_to_torch(x: np.ndarray) -> np.ndarray:
    if x.ndim == 4:
        return np.transpose(x, (3, 2, 0, 1))
    if x.ndim == 2:
        return x.T
    if x.ndim == 3:  # 1-d conv: (W, I, O) -> (O, I, W)
        return np.transpose(x, (2, 1, 0))
    return x


def _kernel_from_torch(x: np.ndarray) -> np.ndarray:
    if x.ndim == 4:
        return np.transpose(x, (2, 3, 1, 0))
    if x.ndim == 2:
        return x.T
    if x.ndim == 3:
        return np.transpose(x, (2, 1, 0))
    return x


def _flat(variables: Mapping[str, Any]) -> dict[tuple[str, tuple[str, ...]], np.ndarray]:
    out = {}
    for col in ("params", "batch_stats"):
        if col in variables:
            for path, v in traverse_util.flatten_dict(dict(variables[col])).items():
                out[(col, tuple(path))] = v
    return out


def flax_to_torch(variables: Mapping[str, Any], mapping: TorchMapping = TorchMapping()) -> dict[str, np.ndarray]:
    """Flax `{'params', 'batch_stats'}` -> ordered {torch key: numpy array} (torch layouts)."""
    sd: dict[str, np.ndarray] = {}
    bn_modules = []
    for (col, path), v in _flat(variables).items():
        key = torch_key(col, path, mapping.prefix)
        v = np.asarray(v, dtype=np.float32) if np.issubdtype(np.asarray(v).dtype, np.floating) else np.asarray(v)
        if key in mapping.to_torch_overrides:
            v = mapping.to_torch_overrides[key](v)
        elif path[-1] == "kernel":
            v = _kernel_to_torch(v)
        sd[key] = np.ascontiguousarray(v)
        if col == "batch_stats" and path[-1] == "var":
            bn_modules.append(mapping.prefix + ".".join(path[:-1]))
    if mapping.num_batches_tracked:
        for m in bn_modules:
            sd[m + ".num_batches_tracked"] = np.zeros((), np.int64)
    for k, v in mapping.buffers.items():
        sd[k] = np.asarray(v, np.float32)
    return sd


def torch_to_flax(state_dict: Mapping[str, Any], template: Mapping[str, Any],
                  mapping: TorchMapping = TorchMapping(), *, what: str = "model",
                  buffer_atol: float = 1e-4) -> dict[str, Any]:
    """Fills a Flax variables template from a torch state_dict; strict like `load_state_dict`.

    Raises `BridgeError` naming every missing key, unexpected key, shape mismatch and buffer
    whose value differs from the model's (e.g. anchors of another cfg).
    """
    sd = {k: _to_numpy(v) for k, v in state_dict.items()}
    missing, mismatched, used = [], [], set()
    new: dict[str, dict[tuple[str, ...], np.ndarray]] = {}
    for (col, path), tmpl in _flat(template).items():
        key = torch_key(col, path, mapping.prefix)
        if key not in sd:
            missing.append(key)
            continue
        used.add(key)
        v = sd[key]
        if key in mapping.from_torch_overrides:
            v = mapping.from_torch_overrides[key](v)
        elif path[-1] == "kernel":
            v = _kernel_from_torch(v)
        if tuple(v.shape) != tuple(tmpl.shape):
            mismatched.append(f"{key}: file {tuple(sd[key].shape)} vs model "
                              f"{tuple(_kernel_to_torch(np.zeros(tmpl.shape)).shape) if path[-1] == 'kernel' else tuple(tmpl.shape)}")
            continue
        new.setdefault(col, {})[path] = np.asarray(v, dtype=tmpl.dtype)
    for k, v in mapping.buffers.items():
        if k not in sd:
            missing.append(k)
            continue
        used.add(k)
        if sd[k].shape != np.shape(v) or not np.allclose(sd[k], v, atol=buffer_atol):
            mismatched.append(f"{k}: file value differs from the model's ({np.asarray(v).ravel()[:6]} ...)")
    unexpected = [k for k in sd if k not in used and not k.endswith("num_batches_tracked")]
    if missing or unexpected or mismatched:
        lines = [f"state_dict does not fit {what}:"]
        for title, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape/value mismatches", mismatched)):
            if keys:
                shown = keys[:20] + ([f"... and {len(keys) - 20} more"] if len(keys) > 20 else [])
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(shown))
        raise BridgeError("\n".join(lines))
    return {col: traverse_util.unflatten_dict(d) for col, d in new.items()}


def _to_numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):  # torch.Tensor
        v = v.detach().cpu()
        if str(v.dtype) in ("torch.bfloat16", "torch.float16"):
            v = v.float()
        return v.numpy()
    return np.asarray(v)


# Where training code keeps the weights inside a checkpoint, looked up in this order: the EMA weights first, as
# the official evaluation and export scripts take them (RT-DETR `{'ema': {'module': ...}}`, YOLOv5's
# `attempt_load` takes `ckpt.get('ema') or ckpt['model']`), then a plain `state_dict` / `model` entry.
CHECKPOINT_ENTRIES: tuple[tuple[str, ...], ...] = (("ema", "module"), ("ema",), ("state_dict",), ("model",))

_PICKLE_HINT = ("If you trust it, extract the weights once in an environment with the official code, e.g. "
                "`ckpt = torch.load(f, weights_only=False)` then `torch.save(ckpt['model'].float().state_dict(), "
                "'state_dict.pt')` for a pickled module (official YOLOv5 release files) or "
                "`torch.save(ckpt['ema']['module'], 'state_dict.pth')` for a training checkpoint, and pass that file.")


def read_checkpoint(path: str, *, entries: tuple[tuple[str, ...], ...] = CHECKPOINT_ENTRIES, network: str = "",
                    hint: str = _PICKLE_HINT) -> tuple[dict[str, np.ndarray], str]:
    """The state_dict in a weights file or training checkpoint, read without running pickled code.

    `.pt`/`.pth` files are read with `torch.load(..., weights_only=True)`, which rebuilds tensors, containers and
    plain values (an optimizer or lr-scheduler state beside the weights is fine) and refuses anything else;
    `.safetensors` holds a plain state_dict. The weights are the first of `entries` (nested keys, e.g.
    `('ema', 'module')`) that holds a mapping, else the file itself when it is a plain state_dict.
    Half-precision tensors are widened to float32.

    Args:
      path: the file.
      entries: where to look, in order.
      network: named in the messages ("no RT-DETR state_dict in it").
      hint: what the message for a refused pickle tells the user to do.
    Returns:
      (state_dict as numpy arrays keyed by the file's names, where it was found: e.g. `ema.module`, `model`,
      or `state_dict` for the top level).
    Raises:
      FileNotFoundError: no such file.
      ImportError: a `.pt`/`.pth` file and no torch.
      BridgeError: the file holds pickled objects other than tensors and plain containers (refused by
        `weights_only=True`: "not a plain state_dict", naming the file and the object), is not a torch file, has
        no state_dict at any of `entries` nor at the top level, or has non-tensor values in it.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{network + ' ' if network else ''}weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file
        return dict(load_file(path)), "state_dict"
    try:
        import torch
    except ImportError as e:  # pragma: no cover
        raise ImportError(f"reading {path} needs torch (pip install torch==2.13.0) or a .safetensors file") from e
    import pickle
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line),
                      str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise BridgeError(
            f"{path}: refused to unpickle it, not a plain state_dict (torch.load(weights_only=True): {detail}). "
            f"The file holds Python objects other than tensors and plain containers, and unpickling them could "
            f"run code. {hint}") from None
    except (RuntimeError, EOFError, OSError) as e:  # truncated or not a torch file at all
        raise BridgeError(f"{path}: not a readable torch file ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    sd, where = None, None
    for entry in entries:
        node = obj
        for key in entry:
            node = node.get(key) if isinstance(node, Mapping) else None
        if isinstance(node, Mapping) and node:
            if entry == ("ema",) and not all(hasattr(v, "shape") for v in node.values()):
                continue  # {'ema': {'module': ..., 'updates': ...}} without a module: not the weights
            sd, where = node, ".".join(entry)
            break
    if sd is None and isinstance(obj, Mapping) and obj and all(hasattr(v, "shape") for v in obj.values()):
        sd, where = obj, "state_dict"
    if sd is None:
        top = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
        looked = ", ".join("[" + "][".join(repr(k) for k in e) + "]" for e in entries)
        raise BridgeError(f"{path}: no {network + ' ' if network else ''}state_dict in it (looked for {looked} and "
                          f"a plain mapping of names to tensors; top level: {top})")
    bad = [str(k) for k, v in sd.items() if not hasattr(v, "shape")]
    if bad:
        raise BridgeError(f"{path}: ['{where}'] is not a state_dict: non-tensor values at {', '.join(bad[:10])}")
    return {str(k): _to_numpy(v) for k, v in sd.items()}, where


def load_state_dict_file(path: str) -> dict[str, np.ndarray]:
    """The state_dict of a `.pt`/`.pth` or `.safetensors` file: `read_checkpoint(path)[0]` (see there: EMA weights
    of a training checkpoint first, never unpickles code; same errors)."""
    return read_checkpoint(path)[0]


def save_state_dict_file(state_dict: Mapping[str, np.ndarray], path: str) -> str:
    """Writes `.pt` (torch.save of tensors) or `.safetensors`, atomically."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    os.close(fd)
    try:
        if path.endswith(".safetensors"):
            from safetensors.numpy import save_file
            save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, tmp)
        else:
            import torch
            torch.save({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
