"""Helpers shared by the config files."""

from __future__ import annotations

import ast

import ml_collections


def parse_arg(arg: str | None, lazy: bool = False, **spec) -> ml_collections.ConfigDict:
    """Parses `--config=file.py:k1=v1,k2=v2,flag` against typed defaults.

    `spec` gives each known key its default; values are converted to the default's type and an
    unknown key is an error (so a typo never passes silently). A bare `flag` sets a bool True.
    """
    out = ml_collections.ConfigDict(dict(spec))
    if not arg:
        return out
    for item in arg.split(","):
        if not item:
            continue
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in spec:
            raise ValueError(f"unknown config argument {key!r} in {arg!r}; known: {sorted(spec)}")
        default = spec[key]
        if not _:
            if not isinstance(default, bool):
                raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
            out[key] = True
        elif isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config argument {key}={value!r} is not a bool")
            out[key] = value.lower() in ("true", "1")
        elif isinstance(default, int):
            out[key] = int(value)
        elif isinstance(default, float):
            out[key] = float(value)
        elif isinstance(default, str):
            out[key] = value
        else:
            out[key] = ast.literal_eval(value)
    return out


def add_shared_fields(c: ml_collections.ConfigDict, *, log_every_steps: int, eval_every_steps: int,
                      checkpoint_every_steps: int, benchmark_variant: str, benchmark_image_size: int = 640,
                      benchmark_batch_size: int = 1, benchmark_train_batch_size: int = 2) -> ml_collections.ConfigDict:
    """The fields every network's config has, with the same meaning (read by the shared trainer,
    modes and benchmark harness); returns `c`.

      log_every_steps / eval_every_steps (0: evaluate only at the end) / checkpoint_every_steps;
      keep_checkpoints 3; async_checkpoints (orbax writes in the background); resume_changes
      (resume a workdir whose recorded config differs in a field that changes the run: off, so
      such a resume is refused with the diff);
      export.onnx / export.torch: what --mode=export writes besides nothing else;
      export.channels_first: the ONNX graphs take images NCHW [B, C, H, W], as the official exports do
      (default False: NHWC [B, H, W, C], as the JAX model; ONNX evaluation accepts either);
      benchmark.*: --mode=benchmark's setting; `torch_repo` a local clone of the official code
      (timed in the same run), `torch_python` the interpreter that runs it ("" = this one);
      distributed.*: multi-host (`jax.distributed.initialize`; empty = single process or what JAX
      detects on the cluster).
    """
    c.log_every_steps = log_every_steps
    c.eval_every_steps = eval_every_steps
    c.checkpoint_every_steps = checkpoint_every_steps
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    c.resume_changes = False
    c.export = ml_collections.ConfigDict(dict(onnx=True, torch=True, channels_first=False))
    c.benchmark = ml_collections.ConfigDict(dict(
        image_size=benchmark_image_size, batch_size=benchmark_batch_size,
        train_batch_size=benchmark_train_batch_size, variant=benchmark_variant, repeats=10,
        torch_repo="", torch_python=""))
    c.distributed = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=0, process_id=-1))
    return c
