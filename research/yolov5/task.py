"""YOLOv5 glue for the shared trainer: model, loss, optimiser, data, evaluation, export."""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from research import parallel
from research.yolov5 import loss as loss_lib
from research.yolov5 import optim
from research.yolov5 import postprocess
from research.yolov5.model import VARIANTS, YOLOv5, build_model, load_yaml_cfg


AUTOANCHOR_FILE = "autoanchor.json"


def model_from_config(config, nc: int, anchors: list | None = None) -> YOLOv5:
    """The model the config names; `anchors` ([nl][na*2] pixels) replace the yaml's (autoanchor)."""
    m = config.model
    cfg = load_yaml_cfg(m.yaml or None, variant=m.variant or None, nc=nc)
    if anchors is not None:
        cfg["anchors"] = [list(map(float, level)) for level in anchors]
    if m.depth_multiple > 0:
        cfg["depth_multiple"] = m.depth_multiple
    if m.width_multiple > 0:
        cfg["width_multiple"] = m.width_multiple
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}.get(m.dtype)
    if dtype is None:
        raise ValueError(f"config.model.dtype={m.dtype!r}: use float32, bfloat16 or float16")
    return build_model(cfg, dtype=dtype, conv_impl=m.conv_impl)


class Task:
    """YOLOv5 on a detection dataset (`shapes` or a local COCO folder)."""

    def __init__(self, config):
        self.config = config
        from research.data import detection
        self.dataset = detection.DetectionData(config.data)
        self.class_names = self.dataset.class_names
        self.model = model_from_config(config, nc=len(self.class_names))
        self.use_ema = bool(config.ema)
        nl = len(self.model.strides)
        hyp = dict(config.hyp)
        if config.scale_hyp:
            hyp = loss_lib.scale_hyp(hyp, nl=nl, nc=len(self.class_names), imgsz=config.data.image_size)
        self.loss_hyp = hyp
        self.steps_per_epoch = max(self.dataset.num_examples(config.data.train_split) // config.batch_size, 1)
        if config.total_steps > 0:
            self.total_steps = int(config.total_steps)
            self.epochs = max(math.ceil(self.total_steps / self.steps_per_epoch), 1)
        else:
            self.epochs = int(config.num_epochs)
            self.total_steps = self.epochs * self.steps_per_epoch
        self.schedule = optim.Yolov5Schedule.from_hyp(
            config.hyp, epochs=self.epochs, steps_per_epoch=self.steps_per_epoch,
            batch_size=config.batch_size, cos_lr=config.cos_lr, nbs=config.nbs)
        self.anchors = jnp.asarray(self.model.anchors_stride_units)

    # ---------------------------------------------------------------- workdir set-up
    def prepare(self, workdir: str, mode: str) -> None:
        """Anchors for this workdir: those `autoanchor.json` records, else (a new training run with
        `config.autoanchor`) the official anchor check on the training labels, recorded there."""
        path = os.path.join(workdir, AUTOANCHOR_FILE)
        if os.path.exists(path):
            try:
                with open(path) as f:
                    report = json.load(f)
                anchors = np.asarray(report["anchors"], np.float32)
                assert anchors.shape == self.model.anchors_pixels.shape
            except (KeyError, TypeError, ValueError, AssertionError) as e:
                raise ValueError(f"{path}: not an anchor record for this model (anchors of shape "
                                 f"{tuple(self.model.anchors_pixels.shape)} expected): {e!r}") from e
            self._set_anchors(anchors)
            return
        fresh = not os.path.isdir(os.path.join(workdir, "checkpoints")) or not os.listdir(
            os.path.join(workdir, "checkpoints"))
        if mode not in ("train", "all") or not self.config.autoanchor or not fresh:
            return
        from research.yolov5 import autoanchor
        shapes, wh = self.dataset.label_sizes(self.config.data.train_split)
        report = autoanchor.check_anchors(shapes, wh, self.model.anchors_pixels, float(self.config.hyp.anchor_t),
                                          self.config.data.image_size, seed=self.config.seed)
        if report["changed"]:
            self._set_anchors(np.asarray(report["anchors"], np.float32))
        if jax.process_index() == 0:  # every process computed the same anchors from the same seed
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(report, f, indent=1)
            os.replace(tmp, path)

    def _set_anchors(self, anchors_px: np.ndarray) -> None:
        if np.array_equal(anchors_px, self.model.anchors_pixels):
            return
        self.model = model_from_config(self.config, len(self.class_names),
                                       anchors=anchors_px.reshape(anchors_px.shape[0], -1).tolist())
        self.anchors = jnp.asarray(self.model.anchors_stride_units)
        logging.info("anchors (pixels): %s", anchors_px.reshape(anchors_px.shape[0], -1).round(1).tolist())

    # ---------------------------------------------------------------- training pieces
    def init_variables(self, rng) -> dict:
        """Random init, or the official PyTorch state_dict named by config.model.init_from."""
        s = self.config.data.image_size
        variables = jax.jit(lambda r: self.model.init(r, jnp.zeros((1, s, s, 3)), train=False))(rng)
        if self.config.model.init_from:
            from research.bridge import torch_bridge
            from research.yolov5 import bridge
            sd = torch_bridge.load_state_dict_file(self.config.model.init_from)
            # the checkpoint's anchors are the cfg's; autoanchor may have changed this run's since
            base = model_from_config(self.config, len(self.class_names))
            variables = bridge.from_torch(base, sd, variables)
            logging.info("initialised from %s", self.config.model.init_from)
        return dict(variables)

    def make_optimizer(self, params):
        return optim.yolov5_sgd(self.config.hyp, self.schedule, max_grad_norm=self.config.max_grad_norm or None)

    def loss_fn(self, params, batch_stats, batch, rng):
        del rng
        images = batch["image"].astype(jnp.float32) / 255.0
        out, mutated = self.model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                        mutable=["batch_stats"])
        total, items = loss_lib.compute_loss(out["heads_nhwc"], batch["boxes"], batch["classes"], batch["valid"],
                                             self.anchors, self.loss_hyp, layout="nhwc")
        metrics = {f"train/{k}": v for k, v in items.items()}
        return total, (metrics, mutated["batch_stats"])

    def optimizer_kwargs(self, step):
        return {"step": step}

    def hyperparams(self, step: int) -> dict[str, float]:
        v = self.schedule.values(step)
        return {k: float(v[k]) for k in ("lr_bias", "lr_weight", "momentum")}

    def accumulate(self, step: int) -> int:
        return int(self.schedule.values(step)["accumulate"])

    def ema_decay(self, updates):
        return optim.ema_decay(updates) if self.use_ema else None

    def train_loader(self, iterator_state=None):
        return self.dataset.loader(self.config.data.train_split, train=True, batch_size=self.config.batch_size,
                                   hyp=self.config.hyp, seed=self.config.seed, iterator_state=iterator_state)

    @staticmethod
    def to_device(local: dict) -> dict:
        return {k: local[k] for k in ("image", "boxes", "classes", "valid")}

    def transform_batch(self, batch: dict, step: int) -> dict:
        """train.py's `--multi-scale` (config.multi_scale): the global batch resized on the devices.

        As the official trainer: every iteration draws a size from [0.5, 1.5] x image_size in
        multiples of the largest stride (at least 32), the images are resized bilinearly
        (align_corners=False, no antialiasing, as `F.interpolate`); labels are normalised, so they
        stay. The draw depends only on (seed, iteration), so a resumed run draws the same sizes.
        Each size compiles the train step once.
        """
        if not self.config.multi_scale:
            return batch
        h, w = batch["image"].shape[1:3]
        size = multi_scale_shape((h, w), self.config.data.image_size, max(max(self.model.strides), 32),
                                 seed=self.config.seed, step=step)
        if size == (h, w):
            return batch
        return dict(batch, image=_resize_bilinear(batch["image"], size))

    def evaluators(self):
        return [DetectionEvaluator(self)]

    # ---------------------------------------------------------------- other modes
    def evaluate(self, workdir: str, onnx: bool = False) -> dict:
        return evaluate(self, workdir, onnx)

    def predict(self, workdir: str) -> list[str]:
        return predict(self, workdir)

    def export(self, workdir: str) -> dict:
        return export(self, workdir)

    def after_training(self, workdir: str) -> None:
        after_training(self, workdir)

    def coco_gt_file(self, path: str):
        """pycocotools COCO of an annotation json, loaded once per task."""
        cache = self.__dict__.setdefault("_coco_gt_files", {})
        if path not in cache:
            from research.evaluation.coco import load_coco_gt
            cache[path] = load_coco_gt(path)
        return cache[path]

    def predict_fn(self):
        @jax.jit
        def fwd(variables, images):
            return self.model.apply(variables, images.astype(jnp.float32) / 255.0, train=False)["pred"]
        return fwd


def multi_scale_shape(hw: tuple[int, int], image_size: int, gs: int, seed: int, step: int) -> tuple[int, int]:
    """The (h, w) train.py's multi-scale gives a batch of shape `hw` at iteration `step`."""
    rng = np.random.default_rng([int(seed), int(step), 0x6D53])  # independent of the data's streams
    sz = int(rng.integers(int(image_size * 0.5), int(image_size * 1.5) + gs)) // gs * gs
    sf = sz / max(hw)
    if sf == 1:
        return tuple(hw)
    return tuple(math.ceil(x * sf / gs) * gs for x in hw)


@functools.partial(jax.jit, static_argnums=1)
def _resize_bilinear(images, size):
    """[B, H, W, C] -> [B, *size, C] float32, as F.interpolate(bilinear, align_corners=False)."""
    b, _, _, c = images.shape
    return jax.image.resize(images.astype(jnp.float32), (b, *size, c), "linear", antialias=False)


class DetectionEvaluator:
    """COCO mAP of the (EMA) model on the eval split: forward, NMS, boxes back to original pixels."""

    def __init__(self, task: Task, onnx_path: str | None = None):
        self.task = task
        self.onnx_path = onnx_path
        self.fwd = task.predict_fn()

    def predictions(self, state) -> Iterator[tuple[dict, np.ndarray]]:
        cfg = self.task.config
        rect = bool(cfg.eval.rect)
        if rect and self.onnx_path:
            logging.info("eval: the exported ONNX model has a fixed %d px input; square batches, not rect",
                         cfg.data.image_size)
            rect = False
        # rect: val.py's aspect-ratio batches (each shape compiles once; the last batch of a shape
        # is padded to the full batch, so the compiled shapes are the distinct batch shapes)
        loader = self.task.dataset.loader(cfg.data.eval_split, train=False, batch_size=cfg.eval.batch_size,
                                          hyp=cfg.hyp, seed=0, process_index=0, process_count=1,
                                          rect_stride=max(self.task.model.strides) if rect else 0)
        if self.onnx_path:
            from research.bridge.onnx_export import OnnxRunner
            runner = OnnxRunner(self.onnx_path)
            run = lambda images: runner(images.astype(np.float32) / 255.0)[0]  # noqa: E731
        else:
            variables = state.eval_variables(cfg.eval.use_ema) if hasattr(state, "eval_variables") else state
            variables = parallel.local_copy(variables)
            run = lambda images: np.asarray(self.fwd(variables, images))  # noqa: E731
        for batch in loader:
            pred = run(batch["image"])
            yield batch, pred

    def run(self, state):
        """Yields (name, value); process 0 evaluates the whole split with a local copy."""
        from research.evaluation.coco import CocoDetectionEvaluator
        if jax.process_index() != 0:
            return
        cfg = self.task.config
        gt_images, gt_boxes, gt_labels, dets = [], [], [], []
        for batch, pred in self.predictions(state):
            out = postprocess.non_max_suppression(pred, cfg.eval.conf_thres, cfg.eval.iou_thres,
                                                  multi_label=True, max_det=cfg.eval.max_det)
            for i in range(len(batch["image_id"])):
                if batch["image_id"][i] < 0:  # padding that completes the last global batch
                    continue
                info = _image_info(batch, i)
                gt_images.append(info["coco"])
                gt_boxes.append(info["gt_xyxy"])
                gt_labels.append(batch["classes"][i][batch["valid"][i]])
                d = out[i].copy()
                d[:, :4] = postprocess.scale_boxes(batch["image"].shape[1:3], d[:, :4], info["orig_hw"],
                                                   ratio_pad=info["ratio_pad"])
                dets.append((info["coco"]["id"], d))
        ann = self.task.dataset.annotation_file(cfg.data.eval_split, cfg.eval.annotations)
        if ann:  # the dataset's own file; only the evaluated images count (as val.py)
            gt = self.task.coco_gt_file(ann)
        else:
            gt = self.task.dataset.coco_gt(gt_images, gt_boxes, gt_labels)
        ev = CocoDetectionEvaluator(gt, self.task.dataset.label_to_category_id)
        for image_id, d in dets:
            ev.add(image_id, d[:, :4], d[:, 4], d[:, 5].astype(np.int64))
        res = ev.result()
        self.last_detections = dets
        prefix = "eval_onnx" if self.onnx_path else "eval"
        yield f"{prefix}/mAP50", res["mAP50"]
        yield f"{prefix}/mAP50_95", res["mAP50_95"]


def _image_info(batch: dict, i: int) -> dict:
    """Original size, letterbox ratio/pad and ground-truth boxes in original pixels."""
    s_h, s_w = batch["image"].shape[1:3]
    h0, w0 = (int(v) for v in batch["orig_hw"][i])
    ratio = float(batch["ratio"][i])
    pad = batch["pad"][i].astype(np.float64)
    valid = batch["valid"][i]
    b = batch["boxes"][i][valid].astype(np.float64)
    xyxy = np.stack([(b[:, 0] - b[:, 2] / 2) * s_w, (b[:, 1] - b[:, 3] / 2) * s_h,
                     (b[:, 0] + b[:, 2] / 2) * s_w, (b[:, 1] + b[:, 3] / 2) * s_h], -1).reshape(-1, 4)
    xyxy = postprocess.scale_boxes((s_h, s_w), xyxy, (h0, w0), ratio_pad=((ratio, ratio), tuple(pad)))
    return {"coco": {"id": int(batch["image_id"][i]), "height": h0, "width": w0}, "orig_hw": (h0, w0),
            "ratio_pad": ((ratio, ratio), tuple(pad)), "gt_xyxy": xyxy}


# ---------------------------------------------------------------------------------------------
# Modes beyond training: restore, evaluate, predict, export


def _restore(task: Task, workdir: str):
    from research import trainer
    variables = task.init_variables(jax.random.PRNGKey(0))
    state = trainer.create_train_state(variables, task.make_optimizer(variables["params"]), task.use_ema)
    ckpt = trainer.Checkpointer(workdir, async_save=False)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {ckpt.directory}: run --mode=train first")
        state, _ = ckpt.restore(state)
    finally:
        ckpt.close()
    return state


def evaluate(self: Task, workdir: str, onnx: bool = False) -> dict:
    path = None
    if onnx or self.config.eval.onnx:
        path = os.path.join(workdir, "export", "model.onnx")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: run --mode=export first")
        state = None
    else:
        state = _restore(self, workdir)
    return {k: float(v) for k, v in DetectionEvaluator(self, onnx_path=path).run(state)}


def predict(self: Task, workdir: str) -> list[str]:
    from research.yolov5 import visualize
    cfg = self.config
    state = _restore(self, workdir)
    variables = state.eval_variables(cfg.eval.use_ema)
    fwd = self.predict_fn()
    out_dir = os.path.join(workdir, "predictions")
    os.makedirs(out_dir, exist_ok=True)
    s = cfg.data.image_size
    paths = []
    for name, image0, image, ratio, pad in self.dataset.predict_images(cfg.predict.input_dir, s,
                                                                     cfg.predict.num_images):
        pred = np.asarray(fwd(variables, image[None]))
        det = postprocess.non_max_suppression(pred, cfg.predict.conf_thres, cfg.predict.iou_thres,
                                              max_det=cfg.eval.max_det)[0]
        det[:, :4] = postprocess.scale_boxes((s, s), det[:, :4], image0.shape[:2],
                                             ratio_pad=((ratio, ratio), pad))
        path = os.path.join(out_dir, f"{name}.png")
        visualize.draw_detections(image0, det, self.class_names, path)
        paths.append(path)
    return paths


def export(self: Task, workdir: str) -> dict:
    from research.bridge import torch_bridge
    from research.yolov5 import bridge
    cfg = self.config
    state = _restore(self, workdir)
    variables = jax.tree_util.tree_map(np.asarray, state.eval_variables(cfg.eval.use_ema))
    out_dir = os.path.join(workdir, "export")
    os.makedirs(out_dir, exist_ok=True)
    results = {}
    if cfg.export.torch:
        sd = bridge.to_torch(self.model, variables)
        results["torch_pt"] = torch_bridge.save_state_dict_file(sd, os.path.join(out_dir, "model.pt"))
        results["safetensors"] = torch_bridge.save_state_dict_file(sd, os.path.join(out_dir, "model.safetensors"))
    if cfg.export.onnx:
        from research.bridge.onnx_export import export_onnx
        s = cfg.data.image_size

        onnx_model = self.model.for_export()

        def apply_fn(images):
            return onnx_model.apply(variables, images, train=False)["pred"]

        results["onnx"] = export_onnx(apply_fn, np.zeros((1, s, s, 3), np.float32),
                                      os.path.join(out_dir, "model.onnx"), dynamic_batch=True,
                                      output_names=["pred"])
    return results


def after_training(self: Task, workdir: str) -> None:
    from research.yolov5 import visualize
    path = os.path.join(workdir, "metrics.jsonl")
    if jax.process_index() == 0 and os.path.exists(path):
        visualize.plot_curves(path, os.path.join(workdir, "curves.png"))
