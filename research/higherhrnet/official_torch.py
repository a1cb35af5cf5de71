"""The official HRNet/HigherHRNet-Human-Pose-Estimation PyTorch code, timed from a local checkout (optional).

`--config.benchmark.torch_repo=PATH` makes `--mode=benchmark` run `main` below in a subprocess (interpreter
`--config.benchmark.torch_python`), before and after our measurements, and report:

  infer        eager `PoseHigherResolutionNet` forward (eval mode, `torch.inference_mode`) at [B, 3, S, S]
  onnx_infer   that model exported with `torch.onnx.export` (the official code has no export script; images ->
               both outputs in order, opset 17) in ONNX Runtime, when onnx/onnxruntime import there
  onnx_infer_dynamic  the same export with a symbolic batch dimension (`dynamic_axes`), like our exported graph
  train_step   forward + the official `MultiLossFactory` (heatmap MSE per resolution, AE push/pull) summed as
               `lib/core/trainer.py do_train` does + backward + Adam (lr 1e-3) step, on the batch of
               `bench_inputs.train_batch` (the same planted-people targets our train step gets)
  grouping     `lib/core/group.py HeatmapParser.parse(det, tag, adjust=True, refine=True)` on
               `bench_inputs.planted_maps` (the maps our grouping stage gets), when the official group.py imports
               (it needs the `munkres` package, listed in the official requirements.txt); otherwise left out and named
               in `notes` (a string: every list in the json is read as timings)

With `--serve` the runner builds the train step and the eval forward only and times them on request
(`official_runner.serve`), for the harness's alternated train-step and inference timings.

The official modules are loaded from the checkout by file path (`lib/models/pose_higher_hrnet.py`, `lib/core/loss.py`
import only torch; `lib/core/group.py` torch, numpy and munkres), never copied into this project. The configuration is
the official experiment yaml (`experiments/coco/higher_hrnet/<variant>_adam_lr1e-3.yaml`, read with PyYAML) over the
`lib/config/default.py` defaults the used modules read, without yacs.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

import numpy as np

from research import official_runner

# lib/config/default.py values read by the model, the loss and HeatmapParser that the experiment yamls may not set
DEFAULTS = {
    "MODEL": {"INIT_WEIGHTS": False, "TAG_PER_JOINT": True},
    "DATASET": {"WITH_CENTER": False, "MAX_NUM_PEOPLE": 30, "NUM_JOINTS": 17},
    "TEST": {"ADJUST": True, "REFINE": True, "DETECTION_THRESHOLD": 0.2, "TAG_THRESHOLD": 1.0,
             "USE_DETECTION_VAL": True, "IGNORE_TOO_MUCH": False, "IGNORE_CENTER": True, "NMS_KERNEL": 3,
             "NMS_PADDING": 1},
}


class Node(dict):
    """Attribute access over a nested dict (the part of yacs' CfgNode the official modules use)."""

    def __getattr__(self, k):
        try:
            return self[k]
        except KeyError:
            raise AttributeError(k) from None


def _node(d: Any) -> Any:
    return Node({k: _node(v) for k, v in d.items()}) if isinstance(d, dict) else d


def official_cfg(repo: str, variant: str) -> Node:
    """The experiment yaml of `variant` (w32_512 | w32_640 | w48_640) over `DEFAULTS`.

    Raises:
      FileNotFoundError: `repo` has no such experiment file.
    """
    import yaml
    path = os.path.join(repo, "experiments", "coco", "higher_hrnet", f"{variant}_adam_lr1e-3.yaml")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not a HigherHRNet checkout, or no experiment for variant {variant!r}")
    with open(path) as f:
        cfg = yaml.safe_load(f)
    for sec, vals in DEFAULTS.items():
        cfg.setdefault(sec, {})
        for k, v in vals.items():
            cfg[sec].setdefault(k, v)
    cfg["MODEL"]["INIT_WEIGHTS"] = False  # no ImageNet file: torch's default initialisation (timing only)
    return _node(cfg)


def _load(repo: str, rel: str, name: str):
    path = os.path.join(repo, rel)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: not a HigherHRNet checkout")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def official_model(repo: str, variant: str):
    """(cfg, the official `PoseHigherResolutionNet` of `variant` with torch's default initialisation, seed 0)."""
    import torch

    repo = os.path.abspath(os.path.expanduser(repo))
    cfg = official_cfg(repo, variant)
    torch.manual_seed(0)
    return cfg, _load(repo, "lib/models/pose_higher_hrnet.py", "official_pose_higher_hrnet").get_pose_net(cfg, False)


def train_step_fn(repo: str, cfg: Node, model, image_size: int, train_batch: int):
    """A no-argument callable doing one official training step as `lib/core/trainer.py do_train` does: forward,
    `MultiLossFactory` on the batch of `bench_inputs.train_batch` (the planted-people targets ours gets), the sum over
    outputs of the batch means, zero_grad, backward, Adam (lr `TRAIN.LR`) step. Puts `model` in train mode."""
    import torch

    from research.higherhrnet import bench_inputs
    repo = os.path.abspath(os.path.expanduser(repo))
    loss_factory = _load(repo, "lib/core/loss.py", "official_loss").MultiLossFactory(cfg)
    b = bench_inputs.train_batch(train_batch, image_size, int(cfg.MODEL.NUM_JOINTS))
    rs = np.random.RandomState(1)
    images = torch.from_numpy(rs.rand(train_batch, 3, image_size, image_size).astype(np.float32))
    heatmaps = [torch.from_numpy(np.ascontiguousarray(b[f"heatmaps_{i}"].transpose(0, 3, 1, 2))) for i in range(2)]
    masks = [torch.from_numpy(b[f"mask_{i}"]) for i in range(2)]
    joints = [torch.from_numpy(b[f"joints_{i}"].astype(np.int64)) for i in range(2)]
    opt = torch.optim.Adam(model.parameters(), lr=float(cfg.TRAIN.LR))
    model.train()

    def step():
        outputs = model(images)
        hm, push, pull = loss_factory(outputs, heatmaps, masks, joints)
        loss = 0
        for i in range(len(outputs)):
            for part in (hm[i], push[i], pull[i]):
                if part is not None:
                    loss = loss + part.mean(dim=0)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def _infer_input(image_size: int, infer_batch: int, train_batch: int):
    """The inference input [infer_batch, 3, S, S] float32 in [0, 1): RandomState(1)'s draw after the training
    images' draw (the value `measure` has always used)."""
    import torch

    rs = np.random.RandomState(1)
    rs.rand(train_batch, 3, image_size, image_size)
    return torch.from_numpy(rs.rand(infer_batch, 3, image_size, image_size).astype(np.float32))


def infer_fn(repo: str, variant: str, image_size: int, infer_batch: int, train_batch: int):
    """The eval model's forward on `measure`'s inference input (a model of its own, so the served train step's
    updates leave it alone), as a no-argument call under `torch.inference_mode`."""
    import torch

    _, model = official_model(repo, variant)
    model.eval()
    x = _infer_input(image_size, infer_batch, train_batch)

    def forward():
        with torch.inference_mode():
            return model(x)

    return forward


def measure(repo: str, *, variant: str, image_size: int, infer_batch: int, train_batch: int, repeats: int,
            warmup: int = 1) -> dict[str, Any]:
    """Times the official model, loss + Adam step and grouping (see the module docstring); ms per call."""
    import torch

    from research.higherhrnet import bench_inputs
    repo = os.path.abspath(os.path.expanduser(repo))
    cfg, model = official_model(repo, variant)
    out: dict[str, Any] = {"torch_version": torch.__version__, "threads": torch.get_num_threads(), "notes": "",
                           "batches": {"grouping": 1},
                           "params": int(sum(p.numel() for p in model.parameters()))}
    step = train_step_fn(repo, cfg, model, image_size, train_batch)
    out["train_step"] = official_runner.times_ms(step, repeats, warmup)

    model.eval()
    x = _infer_input(image_size, infer_batch, train_batch)
    with torch.inference_mode():
        out["infer"] = official_runner.times_ms(lambda: model(x), repeats, warmup)
    # the official code has no export script: torch.onnx.export of the eval model, both outputs in order
    official_runner.add_onnx(out, "onnx_infer", official_runner.onnx_times_ms(
        model, (x,), ["images"], ["output_0", "output_1"], repeats=repeats, warmup=warmup, opset=17,
        keep_as="onnx_infer"))
    out["batches"]["onnx_infer"] = infer_batch
    # the same export with a symbolic batch, the form ours ships (`images` [B, S, S, 3]): onnxruntime runs a
    # fixed-shape graph a little faster, so both are timed and compared with ours
    official_runner.add_onnx(out, "onnx_infer_dynamic", official_runner.onnx_times_ms(
        model, (x,), ["images"], ["output_0", "output_1"], repeats=repeats, warmup=warmup, opset=17,
        dynamic_batch=True, keep_as="onnx_infer_dynamic"))
    out["batches"]["onnx_infer_dynamic"] = infer_batch

    try:
        group = _load(repo, "lib/core/group.py", "official_group")
    except ImportError as e:  # munkres missing
        out["notes"] = f"official grouping not timed: lib/core/group.py does not import ({e})"
        return out
    parser = group.HeatmapParser(cfg)
    heat, tags = bench_inputs.planted_maps(image_size, int(cfg.MODEL.NUM_JOINTS))
    det = torch.from_numpy(np.ascontiguousarray(heat.transpose(2, 0, 1))[None])
    tag = torch.from_numpy(np.ascontiguousarray(tags.transpose(2, 0, 1, 3))[None])
    with torch.inference_mode():
        grouped, _ = parser.parse(det, tag, True, True)
        out["grouping_people"] = len(grouped[0])
        out["grouping"] = official_runner.times_ms(lambda: parser.parse(det, tag, True, True), repeats, warmup)
    return out


def main(argv=None) -> None:
    p = official_runner.parser(__doc__.splitlines()[0],
                               variant="w32_512", image_size=512, infer_batch=1, train_batch=2, repeats=5)
    a = p.parse_args(argv)
    if a.serve:  # the harness calls the official train step / forward and ours in turn (`official_runner.serve`)
        cfg, model = official_model(a.repo, a.variant)
        official_runner.serve({"train_step": train_step_fn(a.repo, cfg, model, a.image_size, a.train_batch),
                               "infer": infer_fn(a.repo, a.variant, a.image_size, a.infer_batch, a.train_batch)})
        return
    res = measure(a.repo, variant=a.variant, image_size=a.image_size, infer_batch=a.infer_batch,
                  train_batch=a.train_batch, repeats=a.repeats)
    official_runner.write(a.out, res)


if __name__ == "__main__":
    sys.exit(main())
