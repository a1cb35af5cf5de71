"""The contract between a network and the shared system, and the registry of networks.

A network plugs in by subclassing `Task` in `research/<name>/task.py` and registering it:

    @tasks.register("yolov5")
    class Task(tasks.Task): ...

and by adding `configs/<name>.py` (whose `config.network` names it). The shared code
(`research/main.py`, `research/modes.py`, `research/trainer.py`, the benchmark harness) calls only
the members below; it never asks whether a member exists. `docs/architecture.md` walks through
the data flow and the steps to add a network.

Required members (abstract):
  num_train_examples()                   examples in one epoch of the training split (step counts)
  init_variables(rng)                    {'params', 'batch_stats'?}; from `config.model.init_from`
                                         (official weights) when it is set
  make_optimizer(params, steps)          optax transform; `update` is called with `step=` (the
                                         iteration), the one channel for step-dependent values
  loss_fn(params, batch_stats, batch, rng) -> (loss, (metrics, new_batch_stats))   [jit-able]
  train_loader(iterator_state)           iterable of this process's batch slices; its iterator has
                                         grain's get_state() (saved with each checkpoint)
  predict(variables, out_dir)            draws/saves predictions, returns the written paths
  export_spec(variables)                 `ExportSpec`: what `--mode=export` writes to ONNX
  to_torch(variables)                    official PyTorch state_dict (numpy arrays)

Optional members (documented defaults here):
  evaluators(onnx_path=None, out_dir=None)  built from `config.evals` by type
                                         (`research/evaluation/base.py`): objects with
                                         `every_steps` and `run(variables)` yielding (name, value)
  use_ema = False; accumulates = False   no EMA, no gradient-accumulation state
  prepare(workdir, mode)                 nothing (YOLOv5: the anchors of this run)
  data_problems() -> []                  what the data validation pass found in the run's
                                         dataset folders (`research.data.validation.Problem`s),
                                         listed once before the run and written to the workdir
  accumulate(step) -> 1                  batches per optimiser update (only when `accumulates`)
  ema_decay(opt_step) -> None
  log_hyperparams(step) -> {}            host floats logged as `hyper/<name>`
  to_device(local_batch) -> the batch    the arrays the step needs
  transform_batch(batch, step) -> batch  device-side change of the global batch before the step
  after_training(workdir)                curves.png from metrics.jsonl
  extra_exports(variables, out_dir) -> {}   more files `--mode=export` writes (SiamFC's tracker
                                         graphs template.onnx / search.onnx), by result name
  extra_modes = (); run_mode(mode, workdir)   network-specific modes beyond the shared ones
                                         (SiamFC: `track`), run by `launch.py --mode=<mode>`
  benchmark_spec(config, variant, image_size)   [classmethod] the network's `BenchSpec` for
                                         `--mode=benchmark` (default: a clear error)
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
from typing import Any, Callable, Iterable, Mapping

_REGISTRY: dict[str, type] = {}
# Networks whose package registers a Task on import (the module is imported on first use).
NETWORKS = ("yolov5", "higherhrnet", "siamfc", "rtdetr")


def register(name: str) -> Callable[[type], type]:
    """Class decorator: `@register("yolov5")` makes `config.network = "yolov5"` select the class."""
    def wrap(cls: type) -> type:
        if not issubclass(cls, Task):
            raise TypeError(f"{cls.__name__} must subclass research.tasks.Task")
        _REGISTRY[name] = cls
        cls.name = name
        return cls
    return wrap


def task_class(name: str) -> type:
    """The registered Task class of network `name` (its `research.<name>.task` is imported first).

    Raises:
      ValueError: `name` is not a known network (the message lists them).
    """
    if name not in _REGISTRY and name in NETWORKS:
        importlib.import_module(f"research.{name}.task")
    if name not in _REGISTRY:
        known = sorted(set(NETWORKS) | set(_REGISTRY))
        raise ValueError(f"unknown network config.network={name!r}; available: {', '.join(known)}")
    return _REGISTRY[name]


def registered() -> list[str]:
    """Names of every network a config can select (imports each network's task module)."""
    for name in NETWORKS:
        task_class(name)
    return sorted(_REGISTRY)


def get_task(config, mode: str = "train") -> "Task":
    """The task of `config.network`, built for `mode` (train | eval | predict | export | all)."""
    return task_class(config.network)(config, mode=mode)


@dataclasses.dataclass(frozen=True)
class Steps:
    """Step counts of a run, derived by the trainer (`research.trainer.compute_steps`).

    Attributes:
      steps_per_epoch: global batches in one pass over the training split (at least 1).
      total_steps: iterations of the whole run.
      num_epochs: epochs the schedule spans (total_steps rounded up to whole epochs).
    """

    steps_per_epoch: int
    total_steps: int
    num_epochs: int


@dataclasses.dataclass(frozen=True)
class ExportSpec:
    """What `--mode=export` traces into ONNX and how the ONNX evaluator feeds it.

    Attributes:
      apply_fn: `fn(**inputs) -> output or tuple of outputs` (jax arrays), weights closed over.
      inputs: name -> example array (any rank; float32 unless the graph needs otherwise).
      output_names: one name per output leaf, in order.
      dynamic_batch: names of the inputs whose first dimension is the symbolic batch `B`.
    """

    apply_fn: Callable[..., Any]
    inputs: Mapping[str, Any]
    output_names: tuple[str, ...]
    dynamic_batch: tuple[str, ...] = ()


class Task(abc.ABC):
    """A network on the shared system; see the module docstring for the whole contract.

    Attributes:
      config: the run's ml_collections config (locked).
      mode: the mode it was built for; a task may skip work a mode does not need (no data
        preparation for `export`).
      model: the Flax module.
      use_ema: keep an exponential moving average of params and batch statistics.
      accumulates: the train state keeps a gradient accumulator and `accumulate(step)` decides
        when the optimiser applies it.
    """

    name: str = ""
    use_ema: bool = False
    accumulates: bool = False
    extra_modes: tuple[str, ...] = ()

    def __init__(self, config, mode: str = "train"):
        self.config = config
        self.mode = mode

    # ------------------------------------------------------------------ required
    @abc.abstractmethod
    def num_train_examples(self) -> int:
        """Examples in one epoch of the training split."""

    @abc.abstractmethod
    def init_variables(self, rng) -> dict:
        """Flax variables; the official weights of `config.model.init_from` when it is set."""

    @abc.abstractmethod
    def make_optimizer(self, params, steps: Steps):
        """The optax transform; its `update(grads, state, params, step=iteration)`."""

    @abc.abstractmethod
    def loss_fn(self, params, batch_stats, batch: dict, rng) -> tuple[Any, tuple[dict, Any]]:
        """(loss, (metrics, new_batch_stats)) on a global batch; traced inside the jitted step."""

    @abc.abstractmethod
    def train_loader(self, iterator_state: dict | None = None) -> Iterable[dict]:
        """This process's slices of the global training batches, resumable from `iterator_state`."""

    @abc.abstractmethod
    def predict(self, variables: dict, out_dir: str) -> list[str]:
        """Runs the model on the prediction inputs and writes its pictures; returns their paths."""

    @abc.abstractmethod
    def export_spec(self, variables: dict) -> ExportSpec:
        """The function and named example inputs `--mode=export` writes to ONNX."""

    @abc.abstractmethod
    def to_torch(self, variables: dict) -> dict:
        """The official PyTorch state_dict (numpy arrays keyed by the official names)."""

    # ------------------------------------------------------------------ optional, with defaults
    def prepare(self, workdir: str, mode: str) -> None:
        """Workdir-specific set-up before any mode runs. Default: nothing."""

    def data_problems(self) -> list:
        """The problems the validation pass found in the data this run reads
        (`research.data.validation.Problem`s; `research.data.validation.read(data_dir)` gives a
        prepared dataset's). Default: none (generated data)."""
        return []

    def init_state_dict(self) -> dict | None:
        """The official state_dict of `config.model.init_from` (numpy arrays), read once per task
        without unpickling code (`torch.load(weights_only=True)` or safetensors); None when unset.

        Raises:
          FileNotFoundError / ValueError: the file is missing or not a state_dict (naming it).
        """
        if not self.config.model.init_from:
            return None
        if self.__dict__.get("_init_state_dict") is None:
            from research.bridge import torch_bridge
            self._init_state_dict = torch_bridge.load_state_dict_file(self.config.model.init_from)
        return self._init_state_dict

    def evaluators(self, onnx_path: str | None = None, out_dir: str | None = None) -> list:
        """The evaluators of `config.evals` (each `run(variables) -> iterator of (name, value)`,
        at its own `every_steps`).

        With `onnx_path` they run the exported model through ONNX Runtime (`variables` is then
        None); with `out_dir` they may write their results there (`--mode=eval`).

        Raises:
          ValueError: an entry of `config.evals` of an unknown type.
        """
        from research.evaluation import base
        return base.build(self, self.config.get("evals", {}), default_every_steps=self.config.eval_every_steps,
                          onnx_path=onnx_path, out_dir=out_dir)

    def accumulate(self, step: int) -> int:
        """Batches per optimiser update at iteration `step` (read only when `accumulates`)."""
        return 1

    def ema_decay(self, opt_step):
        """EMA decay after `opt_step` updates (jit-able), read only when `use_ema`."""
        return None

    def log_hyperparams(self, step: int) -> dict[str, float]:
        """Host floats logged as `hyper/<name>` (learning rates, momentum...). Default: none."""
        return {}

    def to_device(self, local: dict) -> dict:
        """The arrays of a loader batch that the step needs. Default: all of them."""
        return local

    def transform_batch(self, batch: dict, step: int) -> dict:
        """A device-side change of the global batch before the step. Default: none."""
        return batch

    @classmethod
    def benchmark_spec(cls, config, *, variant: str, image_size: int):
        """The `research.benchmark.BenchSpec` of this network (built from the real task).

        Raises:
          NotImplementedError: the network has no benchmark spec yet.
        """
        raise NotImplementedError(f"network {cls.name!r} has no benchmark spec: define "
                                  f"Task.benchmark_spec in research/{cls.name}/task.py")

    def extra_exports(self, variables: dict, out_dir: str) -> dict:
        """Files `--mode=export` writes beyond `model.{pt,safetensors,onnx}` into `out_dir` (when
        `config.export.onnx`), each written atomically and checked by the task; returns result name
        -> path (or figure). Default: none."""
        return {}

    def run_mode(self, mode: str, workdir: str) -> dict:
        """Runs network-specific mode `mode` (one of `extra_modes`); returns its results (names ->
        floats or paths). The task restores its variables itself
        (`research.modes.restore_variables(self, workdir)`).

        Raises:
          NotImplementedError: the task lists `mode` in `extra_modes` without implementing it.
        """
        raise NotImplementedError(f"network {self.name!r} lists mode {mode!r} but does not run it")

    def after_training(self, workdir: str) -> None:
        """After the last step: `curves.png` from `metrics.jsonl` (process 0)."""
        import os

        import jax

        from research.vision import plots
        path = os.path.join(workdir, "metrics.jsonl")
        if jax.process_index() == 0 and os.path.exists(path):
            plots.plot_curves(path, os.path.join(workdir, "curves.png"))
