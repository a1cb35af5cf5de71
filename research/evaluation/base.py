"""Evaluators chosen by the config (big_vision's `config.evals.<name>.type` pattern).

    config.evals.coco = ConfigDict(dict(type="coco_detection", every_steps=0, split="validation"))

`Task.evaluators()` builds one evaluator per entry of `config.evals` through `build`; each runs at
its own cadence (`every_steps`; 0 = `config.eval_every_steps`) while training, in `--mode=eval`
and on the exported ONNX model. An evaluator type is a class registered here by name; it asks
the task for what only the network knows (its predictions) through a small documented protocol
(see each type's docstring) and computes the metric with the real library (pycocotools, ...).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Iterator

_TYPES: dict[str, type] = {}
# evaluator types by module, imported on first use (so a network needs no import of its own)
_MODULES = {"coco_detection": "research.evaluation.detection"}


def register(type_name: str) -> Callable[[type], type]:
    """Class decorator: makes `config.evals.<name>.type = type_name` build this class."""
    def wrap(cls: type) -> type:
        _TYPES[type_name] = cls
        return cls
    return wrap


class Evaluator:
    """Base of the evaluator types.

    Attributes:
      task: the network's task (the evaluator reads its predictions through it).
      name: the entry's name in `config.evals`.
      config: the entry (type, every_steps, and the type's own fields).
      every_steps: training cadence in steps (0: never while training).
      onnx_path: evaluate the exported ONNX model instead of `variables`.
      out_dir: where `--mode=eval` wants result files (None while training).
      prefix: metric-name prefix: `eval` (or the entry's `prefix`), `eval_onnx` for ONNX.
    """

    def __init__(self, task, name: str, config, *, default_every_steps: int = 0, onnx_path: str | None = None,
                 out_dir: str | None = None):
        self.task, self.name, self.config = task, name, config
        every = int(config.get("every_steps", 0) or 0)
        self.every_steps = every if every > 0 else int(default_every_steps)
        self.onnx_path, self.out_dir = onnx_path, out_dir
        base = config.get("prefix", "eval") or "eval"
        self.prefix = f"{base}_onnx" if onnx_path else base

    def run(self, variables) -> Iterator[tuple[str, Any]]:
        """Yields (metric name, value); `variables` is None when ONNX-backed."""
        raise NotImplementedError


def build(task, evals_config, *, default_every_steps: int = 0, onnx_path: str | None = None,
          out_dir: str | None = None) -> list[Evaluator]:
    """One evaluator per entry of `config.evals` (a ConfigDict of ConfigDicts with a `type`).

    Raises:
      ValueError: an entry without `type`, or of an unknown type (the message lists the known ones).
    """
    out = []
    for name in sorted(evals_config):
        entry = evals_config[name]
        type_name = entry.get("type", "")
        if type_name in _MODULES and type_name not in _TYPES:
            importlib.import_module(_MODULES[type_name])
        if type_name not in _TYPES:
            known = sorted(set(_TYPES) | set(_MODULES))
            raise ValueError(f"config.evals.{name}.type={type_name!r}: unknown evaluator type; known: {known}")
        out.append(_TYPES[type_name](task, name, entry, default_every_steps=default_every_steps,
                                     onnx_path=onnx_path, out_dir=out_dir))
    return out
