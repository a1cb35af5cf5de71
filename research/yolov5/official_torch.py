"""The official ultralytics/yolov5 PyTorch code, run from a local checkout (optional).

Nothing here is needed to train, evaluate or export. It lets a user who has the official code
(`git clone https://github.com/ultralytics/yolov5` and its requirements) check, on their machine:

  * that our exported state_dict loads with `strict=True` into the official
    `models.yolo.Model` and gives the same outputs (`tests/yolov5/test_yolov5_official_torch.py`, which runs
    when `YOLOV5_REPO` names the checkout);
  * the official model's speed beside ours in the same benchmark run
    (`--config.benchmark.torch_repo=PATH`, measured in a subprocess by `main` below).

The official code is imported from `repo`, never copied into this project.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

from research import official_runner


def import_official(repo: str):
    """Imports the official `models.yolo`, `utils.loss` and `utils.torch_utils` from `repo`."""
    repo = os.path.abspath(os.path.expanduser(repo))
    if not os.path.isfile(os.path.join(repo, "models", "yolo.py")):
        raise FileNotFoundError(f"{repo}: not an ultralytics/yolov5 checkout (no models/yolo.py)")
    if repo not in sys.path:
        sys.path.insert(0, repo)
    import models.yolo  # noqa: F401  (the official modules, from the checkout)
    import utils.loss
    import utils.torch_utils
    return sys.modules["models.yolo"], utils.loss, utils.torch_utils


def official_model(repo: str, cfg: dict):
    """The official `Model` built from our cfg dict (the same layer list, multiples and nc)."""
    import copy
    yolo, _, _ = import_official(repo)
    return yolo.Model(copy.deepcopy(dict(cfg)), ch=3)


def measure(repo: str, *, variant: str, image_size: int, infer_batch: int, train_batch: int,
            repeats: int, warmup: int = 2, hyp: dict | None = None, serve: bool = False) -> dict[str, Any]:
    """Times the official model: inference (eval mode; also with Conv+BN fused, as the official
    detect.py runs it; `onnx_infer`: the fused model exported as export.py exports it, in ONNX Runtime)
    and a training step as the official train.py takes it (forward,
    ComputeLoss, backward, gradient clipping at 10, nesterov SGD step, ModelEMA update). With `serve`, times
    nothing and returns {'train_step': that step} for `official_runner.serve`."""
    import torch

    from research.yolov5.hyp import HYP_SCRATCH_LOW
    from research.yolov5.cfg import load_yaml_cfg

    _, loss_mod, tu = import_official(repo)
    torch.manual_seed(0)
    model = official_model(repo, load_yaml_cfg(None, variant=variant, nc=80))
    rs = np.random.RandomState(1)
    out: dict[str, Any] = {"torch_version": torch.__version__, "threads": torch.get_num_threads()}

    model.train()
    model.hyp = dict(hyp or HYP_SCRATCH_LOW)
    compute_loss = loss_mod.ComputeLoss(model)
    opt = tu.smart_optimizer(model, "SGD", model.hyp["lr0"], model.hyp["momentum"], model.hyp["weight_decay"])
    ema = tu.ModelEMA(model)
    images = torch.from_numpy(rs.rand(train_batch, 3, image_size, image_size).astype(np.float32))
    # four boxes per image (image index, class, cx, cy, w, h normalised), like the JAX benchmark
    t = [[b, rs.randint(80), *rs.uniform(0.2, 0.8, 2), *rs.uniform(0.05, 0.3, 2)]
         for b in range(train_batch) for _ in range(4)]
    targets = torch.tensor(t, dtype=torch.float32)

    def step():
        loss, _ = compute_loss(model(images), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
        opt.step()
        opt.zero_grad()
        ema.update(model)

    if serve:
        return {"train_step": step}
    out["train_step"] = official_runner.times_ms(step, repeats, max(warmup - 1, 1))

    model.eval()
    x = torch.from_numpy(rs.rand(infer_batch, 3, image_size, image_size).astype(np.float32))
    with torch.inference_mode():
        out["infer"] = official_runner.times_ms(lambda: model(x), repeats, warmup)
        fused = model.fuse()
        out["infer_fused"] = official_runner.times_ms(lambda: fused(x), repeats, warmup)
    # export.py's ONNX: the fused eval model with Detect in export mode (one output tensor), opset 17
    for m in fused.modules():
        if type(m).__name__ == "Detect":
            m.export = True
    official_runner.add_onnx(out, "onnx_infer", official_runner.onnx_times_ms(
        fused, (x,), ["images"], ["output0"], repeats=repeats, warmup=warmup, opset=17, keep_as="onnx_infer"))
    out.setdefault("batches", {})["onnx_infer"] = infer_batch
    return out


def main(argv=None) -> None:
    p = official_runner.parser(__doc__.splitlines()[0],
                               variant="s", image_size=640, infer_batch=1, train_batch=2, repeats=10)
    a = p.parse_args(argv)
    res = measure(a.repo, variant=a.variant, image_size=a.image_size, infer_batch=a.infer_batch,
                  train_batch=a.train_batch, repeats=a.repeats, serve=a.serve)
    if a.serve:  # the harness calls the official train step and ours in turn
        official_runner.serve(res)
        return
    official_runner.write(a.out, res)


if __name__ == "__main__":
    main()
