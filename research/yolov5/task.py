"""YOLOv5 glue for the shared trainer: model, loss, optimiser, data, evaluation, export."""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from research import parallel, tasks
from research.data import pipeline
from research.evaluation.detection import DetectionDataMixin
from research.vision import boxes as postprocess
from research.yolov5 import data
from research.yolov5 import loss as loss_lib
from research.yolov5 import optim
from research.yolov5.model import YOLOv5, build_model, load_yaml_cfg


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


@tasks.register("yolov5")
class Task(DetectionDataMixin, tasks.Task):
    """YOLOv5 on a detection dataset (`shapes` or a local COCO folder).

    The class count: `config.model.num_classes` when set; else, for `export` and `predict` with
    official weights (`config.model.init_from`), the weights' own count (as the official
    `export.py --weights`); else the dataset's, which must then agree with the weights'.
    """

    use_ema = True
    accumulates = True  # nominal batch size (nbs) and warmup-varying accumulation, as train.py

    def __init__(self, config, mode: str = "train"):
        super().__init__(config, mode)
        self.use_ema = bool(config.ema)
        from research.yolov5 import bridge
        nc = self.resolve_num_classes(
            lambda sd: bridge.num_classes(model_from_config(config, nc=80), sd, config.model.init_from))
        self.model = model_from_config(config, nc=nc)
        hyp = dict(config.hyp)
        if config.scale_hyp:
            hyp = loss_lib.scale_hyp(hyp, nl=len(self.model.strides), nc=nc, imgsz=config.data.image_size)
        self.loss_hyp = hyp
        self.schedule = None  # set by make_optimizer (it needs the run's step counts)
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
        sd = self.init_state_dict()
        if sd is not None:
            from research.yolov5 import bridge
            # the checkpoint's anchors are the cfg's; autoanchor may have changed this run's since
            base = model_from_config(self.config, len(self.class_names))
            variables = bridge.from_torch(base, sd, variables)
            logging.info("initialised from %s", self.config.model.init_from)
        return dict(variables)

    def num_train_examples(self) -> int:
        return self.dataset.num_examples(self.config.data.train_split)

    def make_optimizer(self, params, steps: tasks.Steps):
        """train.py's SGD (three parameter groups, warmup, lambda lr, accumulation to `nbs`)."""
        self.schedule = optim.Yolov5Schedule.from_hyp(
            self.config.hyp, epochs=steps.num_epochs, steps_per_epoch=steps.steps_per_epoch,
            batch_size=self.config.batch_size, cos_lr=self.config.cos_lr, nbs=self.config.nbs)
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

    def log_hyperparams(self, step: int) -> dict[str, float]:
        v = self.schedule.values(step)
        return {k: float(v[k]) for k in ("lr_bias", "lr_weight", "momentum")}

    def accumulate(self, step: int) -> int:
        return int(self.schedule.values(step)["accumulate"])

    def ema_decay(self, updates):
        return optim.ema_decay(updates) if self.use_ema else None

    def train_loader(self, iterator_state=None):
        return data.loader(self.dataset, self.config.data.train_split, train=True, batch_size=self.config.batch_size,
                           hyp=self.config.hyp, seed=self.config.seed, iterator_state=iterator_state)

    @staticmethod
    def to_device(local: dict) -> dict:  # noqa: D102 (the contract's)
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

    # ---------------------------------------------------------------- the detector protocol
    # (research/evaluation/detection.py: the `coco_detection` evaluator of config.evals)
    def predictions(self, variables, onnx_path: str | None, split: str) -> Iterator[tuple[dict, np.ndarray]]:
        """(loader batch, raw `pred` [B, N, 5 + nc]) over `split`, from `variables` or the ONNX model."""
        cfg = self.config
        rect = bool(cfg.eval.rect)
        if rect and onnx_path:
            logging.info("eval: the exported ONNX model has a fixed %d px input; square batches, not rect",
                         cfg.data.image_size)
            rect = False
        # rect: val.py's aspect-ratio batches (each shape compiles once; the last batch of a shape
        # is padded to the full batch, so the compiled shapes are the distinct batch shapes)
        loader = data.loader(self.dataset, split, train=False, batch_size=cfg.eval.batch_size, hyp=cfg.hyp, seed=0,
                             process_index=0, process_count=1, rect_stride=max(self.model.strides) if rect else 0)
        if onnx_path:
            from research.bridge.onnx_export import OnnxRunner
            runner = OnnxRunner(onnx_path)
            run = lambda images: runner(images.astype(np.float32) / 255.0)[0]  # noqa: E731
        else:
            fwd = self.predict_fn()
            variables = parallel.local_copy(variables)
            run = lambda images: np.asarray(fwd(variables, images))  # noqa: E731
        with pipeline.closing_iterator(loader) as it:  # workers and shared memory freed at the end or on error
            for batch in it:
                yield batch, run(batch["image"])

    def detections(self, variables, onnx_path: str | None, split: str) -> Iterator[dict]:
        """val.py's detections: NMS (`config.eval` thresholds, multi-label) and boxes back to the
        original image pixels, with each image's ground truth (all its boxes, not capped at
        `data.max_labels`); padding examples skipped."""
        cfg = self.config
        self.dataset.check_split(split)
        # the records' own boxes: the batches cap them at data.max_labels, scoring must not
        truth = pipeline.ground_truth(str(self.dataset.builder.data_dir), split)
        for batch, pred in self.predictions(variables, onnx_path, split):
            out = postprocess.non_max_suppression(pred, cfg.eval.conf_thres, cfg.eval.iou_thres,
                                                  multi_label=True, max_det=cfg.eval.max_det)
            for i in range(len(batch["image_id"])):
                if batch["image_id"][i] < 0:  # padding that completes the last global batch
                    continue
                info = _image_info(batch, i)
                d = out[i].copy()
                d[:, :4] = postprocess.scale_boxes(batch["image"].shape[1:3], d[:, :4], info["orig_hw"],
                                                   ratio_pad=info["ratio_pad"])
                classes, xyxy = truth[int(batch["image_id"][i])]
                yield {"image": info["coco"], "gt_xyxy": xyxy, "gt_labels": classes, "dets": d}

    def predict(self, variables: dict, out_dir: str) -> list[str]:
        """detect.py on `config.predict.input_dir` (or the first eval images): boxes drawn into PNGs."""
        from research.vision import plots
        cfg = self.config
        fwd = self.predict_fn()
        s = cfg.data.image_size
        paths = []
        for name, image0, image, ratio, pad in self._predict_images(s):
            pred = np.asarray(fwd(variables, image[None]))
            det = postprocess.non_max_suppression(pred, cfg.predict.conf_thres, cfg.predict.iou_thres,
                                                  max_det=cfg.eval.max_det)[0]
            det[:, :4] = postprocess.scale_boxes((s, s), det[:, :4], image0.shape[:2],
                                                 ratio_pad=((ratio, ratio), pad))
            path = os.path.join(out_dir, f"{name}.png")
            plots.draw_detections(image0, det, self.class_names, path)
            paths.append(path)
        return paths

    def _predict_images(self, size: int):
        if self.config.predict.input_dir:
            return data.images_from_folder(self.config.predict.input_dir, size, self.config.predict.num_images)
        return data.split_images(self.dataset, self.config.data.eval_split, size, self.config.predict.num_images)

    def export_spec(self, variables: dict) -> tasks.ExportSpec:
        """export.py's graph: images [B, S, S, 3] float32 0-1 -> `pred` [B, N, 5 + nc] (pixels)."""
        s = self.config.data.image_size
        onnx_model = self.model.for_export()

        def apply_fn(images):
            return onnx_model.apply(variables, images, train=False)["pred"]

        return tasks.ExportSpec(apply_fn, {"images": np.zeros((1, s, s, 3), np.float32)}, ("pred",),
                                dynamic_batch=("images",))

    def to_torch(self, variables: dict) -> dict:
        from research.yolov5 import bridge
        return bridge.to_torch(self.model, variables)

    @classmethod
    def benchmark_spec(cls, config, *, variant: str, image_size: int):
        from research.yolov5 import benchmark
        return benchmark.benchmark_spec(config, variant=variant, image_size=image_size)

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


def _image_info(batch: dict, i: int) -> dict:
    """Original size and letterbox ratio/pad of example `i` of an evaluation batch."""
    h0, w0 = (int(v) for v in batch["orig_hw"][i])
    ratio = float(batch["ratio"][i])
    pad = batch["pad"][i].astype(np.float64)
    return {"coco": {"id": int(batch["image_id"][i]), "height": h0, "width": w0}, "orig_hw": (h0, w0),
            "ratio_pad": ((ratio, ratio), tuple(pad))}
