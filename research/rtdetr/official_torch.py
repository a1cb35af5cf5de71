"""The official RT-DETR PyTorch code (lyuwenyu/RT-DETR `rtdetr_pytorch/`), timed from a local clone (optional).

Nothing here is needed to train, evaluate or export. `--config.benchmark.torch_repo=PATH` runs `main` in a
subprocess (`research/benchmark.py` `time_torch_reference`) to time the official model beside ours in the same run.

Only the files the model, its loss and its optimiser need are imported from the clone: the packages `src`,
`src.nn`, `src.nn.backbone`, `src.zoo`, `src.zoo.rtdetr`, `src.optim` and `src.misc` are entered without running
their `__init__.py` (which import the whole data pipeline), then `src.core` (the official registry and
`YAMLConfig`), `src/nn/backbone/presnet.py`, `src/zoo/rtdetr/{hybrid_encoder,rtdetr_decoder,rtdetr}.py` (the
forward pass), `src/zoo/rtdetr/{rtdetr_postprocessor,matcher,rtdetr_criterion}.py` and
`src/optim/{optim,ema}.py` (deploy post-processing and the train step) are imported as they are. The model,
criterion, optimiser (the yml's regex parameter groups) and EMA are built by the official `YAMLConfig` from
`configs/rtdetr/rtdetr_<variant>_6x_coco.yml`, as the official `tools/train.py` builds them.

The forward pass cannot be imported without torchvision: `src/zoo/rtdetr/rtdetr_decoder.py` imports
`.denoising` at module level (for the training-time denoising group), `denoising.py` imports `.box_ops`, and
`box_ops.py` starts with `from torchvision.ops.boxes import box_area`. `rtdetr_criterion.py` and
`rtdetr_postprocessor.py` `import torchvision` too (`sigmoid_focal_loss`, `box_convert`). Where torchvision
cannot be loaded (the CPU-only torch 2.13 of this project has no matching torchvision wheel), `main` times
nothing: it writes `{"skipped": <the import chain and the error>}`, prints the same to stderr, and exits 0, so
the rest of the benchmark runs. The official code is imported from the clone, never copied into this project.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
import types
from typing import Any

import numpy as np

from research import official_runner

# packages entered without their __init__ (which imports src.data -> torchvision)
_PACKAGES = ("src", "src.nn", "src.nn.backbone", "src.zoo", "src.zoo.rtdetr", "src.optim", "src.misc")
FORWARD_MODULES = ("src.nn.backbone.presnet", "src.zoo.rtdetr.hybrid_encoder", "src.zoo.rtdetr.rtdetr_decoder",
                   "src.zoo.rtdetr.rtdetr")
TRAIN_MODULES = ("src.zoo.rtdetr.rtdetr_postprocessor", "src.zoo.rtdetr.matcher", "src.zoo.rtdetr.rtdetr_criterion",
                 "src.optim.optim", "src.optim.ema")
CONFIGS = {v: f"configs/rtdetr/rtdetr_{v}_6x_coco.yml" for v in ("r18vd", "r34vd", "r50vd", "r50vd_m", "r101vd")}


class OfficialImportError(ImportError):
    """The official modules cannot be imported here; the message gives the chain of imports that failed."""


def code_root(repo: str) -> str:
    """The `rtdetr_pytorch` folder of a clone (the clone's root or that folder itself).

    Raises:
      FileNotFoundError: neither holds `src/zoo/rtdetr/rtdetr.py`.
    """
    repo = os.path.abspath(os.path.expanduser(repo))
    for root in (os.path.join(repo, "rtdetr_pytorch"), repo):
        if os.path.isfile(os.path.join(root, "src", "zoo", "rtdetr", "rtdetr.py")):
            return root
    raise FileNotFoundError(f"{repo}: not a lyuwenyu/RT-DETR clone (no rtdetr_pytorch/src/zoo/rtdetr/rtdetr.py)")


def _chain(exc: BaseException, root: str) -> str:
    """The import lines of the official files that led to `exc`, outermost first."""
    lines = []
    for frame in traceback.extract_tb(exc.__traceback__):
        if os.path.abspath(frame.filename).startswith(root + os.sep):
            lines.append(f"  {os.path.relpath(frame.filename, root)}:{frame.lineno}: {frame.line}")
    return "\n".join(lines)


def import_official(repo: str, train: bool = True) -> dict[str, types.ModuleType]:
    """Imports the official modules of the forward pass (and, with `train`, of the train step) from `repo`.

    Returns:
      {module name: module}, `src.core` included.
    Raises:
      FileNotFoundError: `repo` is not a clone.
      OfficialImportError: a module could not be imported (e.g. torchvision missing); the message lists the
        official import lines that led to the failure and the error.
    """
    root = code_root(repo)
    if root not in sys.path:
        sys.path.insert(0, root)
    for name in _PACKAGES:
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [os.path.join(root, *name.split("."))]
            sys.modules[name] = pkg
    modules = {}
    for name in ("src.core",) + FORWARD_MODULES + (TRAIN_MODULES if train else ()):
        try:
            modules[name] = importlib.import_module(name)
        except Exception as e:  # ImportError, or torchvision's RuntimeError for a mismatched build
            part = "forward pass" if name in FORWARD_MODULES or name == "src.core" else "train step"
            raise OfficialImportError(
                f"the official {part} cannot be imported from {root}: importing {name} failed at\n"
                f"{_chain(e, root)}\n  -> {type(e).__name__}: {e}") from e
    return modules


def _targets(torch, rs: np.random.RandomState, batch: int, nc: int = 80, boxes_per_image: int = 4) -> list[dict]:
    """Four boxes per image (labels, normalised cxcywh), as the JAX benchmark's synthetic batch."""
    out = []
    for _ in range(batch):
        boxes = np.concatenate([rs.uniform(0.2, 0.8, (boxes_per_image, 2)), rs.uniform(0.05, 0.3, (boxes_per_image, 2))],
                               axis=1).astype(np.float32)
        out.append({"labels": torch.from_numpy(rs.randint(0, nc, boxes_per_image).astype(np.int64)),
                    "boxes": torch.from_numpy(boxes)})
    return out


def measure(repo: str, *, variant: str, image_size: int, infer_batch: int, train_batch: int, repeats: int,
            warmup: int = 2, serve: bool = False) -> dict[str, Any]:
    """Times the official model built by the official `YAMLConfig` (backbone not pretrained, eval size S):

    * `train_step`: what `src/solver/det_engine.py` `train_one_epoch` does per batch: forward with targets
      (denoising queries), `SetCriterion`, backward, `clip_grad_norm_(0.1)`, AdamW step with the yml's
      parameter groups, `ModelEMA.update` (multi-scale resizing off, as ours at a fixed size);
    * `matcher`: one `HungarianMatcher` call on the last layer's outputs of that batch (the step makes
      num_decoder_layers + 1 such calls: last layer, auxiliary layers, encoder top-k);
    * `infer`: eval forward + `RTDETRPostProcessor`, `infer_fused`: the same after `model.deploy()` (RepVGG
      branches fused), as `tools/export_onnx.py` exports it. Where `src/data/coco` (the label -> COCO id remap
      of `infer`) needs a torchvision older than the interpreter's (`datapoints`, <= 0.15), `infer` runs without
      that remap and `notes` says so;
    * `onnx_infer`: that deploy graph (`images`, `orig_target_sizes` -> `labels`, `boxes`, `scores`, opset 16)
      exported as `tools/export_onnx.py` exports it, in ONNX Runtime.

    With `serve`, times nothing and returns {'train_step': the step} for `official_runner.serve`.

    Raises:
      OfficialImportError / FileNotFoundError: see `import_official`; KeyError: unknown variant.
    """
    import torch

    if variant not in CONFIGS:
        raise KeyError(f"no official config for variant {variant!r}; known: {sorted(CONFIGS)}")
    mods = import_official(repo, train=True)
    root = code_root(repo)
    torch.manual_seed(0)
    size = [int(image_size), int(image_size)]
    cwd = os.getcwd()
    os.chdir(root)  # the yml `__include__`s are relative to the config file; outputs stay unused
    try:
        cfg = mods["src.core"].YAMLConfig(os.path.join(root, CONFIGS[variant]), PResNet={"pretrained": False},
                                          HybridEncoder={"eval_spatial_size": size},
                                          RTDETRTransformer={"eval_spatial_size": size})
        model, criterion, postprocessor = cfg.model, cfg.criterion, cfg.postprocessor
        model.multi_scale = None
        optimizer, ema = cfg.optimizer, cfg.ema
    finally:
        os.chdir(cwd)
    out: dict[str, Any] = {"torch_version": torch.__version__, "threads": torch.get_num_threads(),
                           "batches": {"matcher": train_batch}}
    rs = np.random.RandomState(0)
    images = torch.from_numpy(rs.rand(train_batch, 3, image_size, image_size).astype(np.float32))
    targets = _targets(torch, rs, train_batch)
    max_norm = float(cfg.yaml_cfg.get("clip_max_norm", 0.1))
    model.train()
    criterion.train()

    def step():
        outputs = model(images, targets)
        loss = sum(criterion(outputs, targets).values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        if ema is not None:  # `use_ema: True` in include/optimizer.yml
            ema.update(model)

    if serve:
        return {"train_step": step}
    out["train_step"] = official_runner.times_ms(step, repeats, max(warmup - 1, 1))
    with torch.no_grad():
        outputs = model(images, targets)
        last = {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}
        out["matcher"] = official_runner.times_ms(lambda: criterion.matcher(last, targets), repeats, warmup)
    model.eval()
    if getattr(postprocessor, "remap_mscoco_category", False):
        try:  # the label -> COCO id remap lives in src/data/coco, which imports torchvision.datapoints (<= 0.15)
            importlib.import_module("src.data.coco")
        except ImportError as e:
            postprocessor.remap_mscoco_category = False
            out["notes"] = (f"infer without the label -> COCO category remap (300 dictionary look-ups per image): "
                            f"src/data/coco does not import with torchvision {_torchvision_version()} ({e})")
    x = torch.from_numpy(np.random.RandomState(1).rand(infer_batch, 3, image_size, image_size).astype(np.float32))
    sizes = torch.full((infer_batch, 2), float(image_size))
    with torch.inference_mode():
        out["infer"] = official_runner.times_ms(lambda: postprocessor(model(x), sizes), repeats, warmup)
        deployed, post = model.deploy(), postprocessor.deploy()
        out["infer_fused"] = official_runner.times_ms(lambda: post(deployed(x), sizes), repeats, warmup)

    class Deploy(torch.nn.Module):  # the graph tools/export_onnx.py exports: deployed model + post-processor
        def __init__(self):
            super().__init__()
            self.model, self.postprocessor = deployed, post

        def forward(self, images, orig_target_sizes):
            return self.postprocessor(self.model(images), orig_target_sizes)

    official_runner.add_onnx(out, "onnx_infer", official_runner.onnx_times_ms(
        Deploy().eval(), (x, sizes), ["images", "orig_target_sizes"], ["labels", "boxes", "scores"],
        repeats=repeats, warmup=warmup, opset=16))
    out["batches"]["onnx_infer"] = infer_batch
    return out


def _torchvision_version() -> str:
    try:
        import torchvision
        return torchvision.__version__
    except Exception:  # noqa: BLE001 (only for the note)
        return "?"


def main(argv=None) -> None:
    """`python -m research.rtdetr.official_torch --repo=... --variant=r18vd --image_size=640 --infer_batch=1
    --train_batch=2 --repeats=10 --out=torch.json` (the flags `research.benchmark.BenchSpec` documents).
    `--check` only imports the official modules and exits 0 (importable) or 3 (the reason on stderr)."""
    p = official_runner.parser(__doc__.splitlines()[0],
                               variant="r18vd", image_size=640, infer_batch=1, train_batch=2, repeats=10,
                               out_required=False)
    p.add_argument("--check", action="store_true")
    a = p.parse_args(argv)
    if a.check:
        try:
            import_official(a.repo)
        except OfficialImportError as e:
            print(f"official RT-DETR not importable: {e}", file=sys.stderr)
            sys.exit(3)
        return
    if a.serve:  # the harness calls the official train step and ours in turn
        official_runner.serve(measure(a.repo, variant=a.variant, image_size=a.image_size, infer_batch=a.infer_batch,
                                      train_batch=a.train_batch, repeats=a.repeats, serve=True))
        return
    if not a.out:
        p.error("--out is required")
    try:
        res = measure(a.repo, variant=a.variant, image_size=a.image_size, infer_batch=a.infer_batch,
                      train_batch=a.train_batch, repeats=a.repeats)
    except OfficialImportError as e:
        import torch
        msg = f"official PyTorch timing skipped: {e}"
        print(msg, file=sys.stderr)
        res = {"torch_version": torch.__version__, "threads": torch.get_num_threads(), "skipped": msg}
    official_runner.write(a.out, res)


if __name__ == "__main__":
    main()
