"""RT-DETR glue for the shared trainer: model, denoising + matching + criterion, optimiser, EMA, data,
evaluation (the shared COCO evaluator), prediction, export.

Official sources (lyuwenyu/RT-DETR `rtdetr_pytorch/`): `src/zoo/rtdetr/rtdetr.py` (train-time `multi_scale`),
`src/solver/det_engine.py` (loss = sum of the criterion's terms, `clip_grad_norm_(0.1)`, EMA update after each
step), `src/optim/ema.py` (`ModelEMA`: decay * (1 - exp(-updates / warmups)), over parameters and buffers),
`configs/rtdetr/include/optimizer.yml` and the variant configs (AdamW parameter groups by regex over the
parameter names, MultiStepLR stepped once per epoch), `src/zoo/rtdetr/rtdetr_postprocessor.py`
(`research/rtdetr/postprocess.py`), `src/data/coco/coco_eval.py` (pycocotools bbox evaluation of all top-k
detections: the shared `coco_detection` evaluator).
"""

from __future__ import annotations

import functools
import os
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from research import optim as shared_optim
from research import parallel, tasks
from research.data import pipeline
from research.evaluation.detection import DetectionDataMixin
from research.rtdetr import data as data_lib
from research.rtdetr import transforms as T
from research.rtdetr.criterion import SetCriterion
from research.rtdetr.denoising import get_contrastive_denoising_training_group
from research.rtdetr.matcher import HungarianMatcher
from research.rtdetr.model import RTDETR, build_model, trainable_mask
from research.rtdetr.postprocess import postprocess

DEPLOY_ONNX = "deploy.onnx"  # the official tools/export_onnx.py graph, beside model.onnx


def model_from_config(config, num_classes: int, conv_impl: str | None = None) -> RTDETR:
    """The model of `config.model` (variant + per-part overrides) for `num_classes` classes.

    Convolutions and BatchNorms (backbone, encoder, decoder input projections) compute as
    `research.cpu.layers.select(conv_impl)` says (default `config.model.conv_impl`; "auto": the CPU speed layer on
    CPU, flax's layers elsewhere), always with `nn.Conv` / `nn.BatchNorm`'s parameters, so weights, the bridge and
    checkpoints do not depend on it. "lax" gives flax's own layers (what ONNX export traces).

    Raises:
      ValueError: an unknown dtype or conv_impl.
    """
    from research.cpu.layers import select as select_layers
    from research.rtdetr.backbone import BN_EPS, BN_MOMENTUM
    m = config.model
    s = int(config.data.image_size)
    dtype = {"float32": None, "bfloat16": jnp.bfloat16}.get(m.dtype, "bad")
    if dtype == "bad":
        raise ValueError(f"config.model.dtype={m.dtype!r}: use float32 or bfloat16")
    layers = select_layers(m.conv_impl if conv_impl is None else conv_impl)
    norm = functools.partial(layers.nn_batch_norm, momentum=BN_MOMENTUM, epsilon=BN_EPS, use_fast_variance=False)
    return build_model(m.variant, num_classes=num_classes, eval_spatial_size=(s, s), dtype=dtype,
                       conv=layers.nn_conv, norm=norm, backbone=dict(m.backbone), encoder=dict(m.encoder),
                       decoder=dict(m.decoder))


def lr_factor(step, *, steps_per_epoch: int, milestones_epochs, gamma: float, warmup_steps: int):
    """Learning-rate multiplier at iteration `step` (numpy or jax): MultiStepLR stepped once per epoch (official
    `lr_scheduler.step()` after each epoch: gamma ** #milestones <= epoch), times a linear warmup
    min(1, (step + 1) / warmup_steps) when warmup_steps > 0 (rtdetrv2's `LinearWarmup`; v1 has none)."""
    xp = jnp if isinstance(step, jax.Array) else np
    epoch = step // max(int(steps_per_epoch), 1)
    passed = sum((epoch >= int(m)).astype(xp.float32) if xp is jnp else float(epoch >= int(m))
                 for m in milestones_epochs)
    f = gamma ** passed
    if warmup_steps > 0:
        f = f * xp.minimum(1.0, (step + 1) / float(warmup_steps))
    return f


@tasks.register("rtdetr")
class Task(DetectionDataMixin, tasks.Task):
    """RT-DETR on a detection dataset (`shapes` or a local COCO folder); see the module docstring."""

    use_ema = True

    def __init__(self, config, mode: str = "train"):
        super().__init__(config, mode)
        self.use_ema = bool(config.ema.use)
        nc = self.resolve_num_classes(self._weights_num_classes)
        self.num_classes = nc
        self.model = model_from_config(config, nc)
        # what ONNX export traces (flax's own convolutions and BatchNorm); the same parameters
        self.export_model = model_from_config(config, nc, conv_impl="lax")
        d = self.model.decoder.keywords
        self.num_queries = int(d.get("num_queries", 300))
        self.num_denoising = int(d.get("num_denoising", 100))
        # official RTDETRTransformer defaults (no config changes them)
        self.label_noise_ratio, self.box_noise_scale = 0.5, 1.0
        c = config.criterion
        self.criterion = SetCriterion(
            matcher=HungarianMatcher(cost_class=c.matcher.cost_class, cost_bbox=c.matcher.cost_bbox,
                                     cost_giou=c.matcher.cost_giou, alpha=c.matcher.alpha, gamma=c.matcher.gamma),
            weight_dict=dict(c.weight_dict), alpha=c.alpha, gamma=c.gamma, num_classes=nc)
        self.steps = None

    # ---------------------------------------------------------------- classes, data, weights
    def _weights_num_classes(self, sd) -> int:
        """The class count of an official RT-DETR state_dict (`decoder.enc_score_head.weight` rows).

        Raises:
          ValueError: the file has no such key (not an RT-DETR state_dict), naming it.
        """
        key = "decoder.enc_score_head.weight"
        if key not in sd:
            raise ValueError(f"config.model.init_from={self.config.model.init_from}: no {key}; "
                             "not an RT-DETR state_dict")
        return int(np.shape(sd[key])[0])

    def num_train_examples(self) -> int:
        return self.dataset.num_examples(self.config.data.train_split)

    def init_state_dict(self) -> dict | None:
        """The official state_dict of `config.model.init_from` (read once per task): an official checkpoint
        (weights under `ema.module`, else `model`, as the official `tools/export_onnx.py` takes them) or a plain
        state_dict (`.pth` read with `weights_only=True`, or `.safetensors`); None when unset.

        Raises:
          FileNotFoundError / torch_bridge.BridgeError: see `bridge.read_official_checkpoint` (the messages name
            the file).
        """
        if not self.config.model.init_from:
            return None
        if self.__dict__.get("_init_state_dict") is None:
            from research.rtdetr import bridge
            sd, where = bridge.read_official_checkpoint(self.config.model.init_from)
            logging.info("read %d tensors from %s (%s)", len(sd), self.config.model.init_from, where)
            self._init_state_dict = sd
        return self._init_state_dict

    def init_variables(self, rng) -> dict:
        """Official initialisation (the modules' torch-style initialisers), or the official state_dict of
        `config.model.init_from` through the bridge (strict: every key and shape must fit)."""
        s = self.config.data.image_size
        variables = dict(jax.jit(lambda r: self.model.init(r, jnp.zeros((1, s, s, 3)), train=False))(rng))
        sd = self.init_state_dict()
        if sd is not None:
            from research.rtdetr import bridge
            variables = bridge.from_torch(self.model, sd, variables)
            logging.info("initialised from %s", self.config.model.init_from)
        return variables

    # ---------------------------------------------------------------- optimiser
    def param_groups(self, params) -> dict:
        """Pytree like `params` of group labels: `frozen` (official requires_grad=False: no update), `g<i>` for
        the first of `config.optim.groups` whose pattern `re.search`es the official parameter name (the shared
        `research.optim.group_labels`: Flax path joined with ".", `kernel`/`scale`/`embedding` -> `weight`;
        the fused attention projection is `in_proj.weight` here, `in_proj_weight` officially: the same for
        the official patterns, which look for `bias` / `norm` / `bn` / `backbone` / `encoder` / `decoder`),
        else `default`.

        Raises:
          re.error: a pattern of `config.optim.groups` is not a valid regular expression.
        """
        rules = [(g[0], f"g{i}") for i, g in enumerate(self.config.optim.groups)]
        labels = shared_optim.group_labels(params, rules, default="default")
        return jax.tree_util.tree_map(lambda label, trainable: label if trainable else "frozen", labels,
                                      trainable_mask(self.model, params))

    def make_optimizer(self, params, steps: tasks.Steps):
        """Official AdamW (decoupled weight decay, betas, eps 1e-8) with its parameter groups, gradients clipped
        to global norm `clip_max_norm` first, the learning rate of each group times `lr_factor(step)`."""
        self.steps = steps
        o = self.config.optim
        factor = functools.partial(lr_factor, steps_per_epoch=steps.steps_per_epoch,
                                   milestones_epochs=tuple(o.milestones_epochs), gamma=o.gamma,
                                   warmup_steps=int(o.warmup_steps))

        def group(lr, wd):
            parts = [optax.scale_by_adam(b1=o.betas[0], b2=o.betas[1], eps=o.eps)]
            if wd > 0:
                parts.append(optax.add_decayed_weights(wd))
            parts.append(optax.scale_by_schedule(lambda count: -lr * factor(count)))
            return optax.chain(*parts)

        transforms = {"default": group(o.lr, o.weight_decay), "frozen": optax.set_to_zero()}
        for i, g in enumerate(o.groups):
            lr = o.lr if g[1] < 0 else g[1]
            wd = o.weight_decay if g[2] < 0 else g[2]
            transforms[f"g{i}"] = group(lr, wd)
        labels = self.param_groups(params)
        used = set(jax.tree_util.tree_leaves(labels))
        transforms = {k: v for k, v in transforms.items() if k in used}
        chain = [optax.clip_by_global_norm(o.clip_max_norm)] if o.clip_max_norm > 0 else []
        return optax.chain(*chain, optax.multi_transform(transforms, labels))

    def log_hyperparams(self, step: int) -> dict[str, float]:
        if self.steps is None:
            return {}
        o = self.config.optim
        f = lr_factor(step, steps_per_epoch=self.steps.steps_per_epoch, milestones_epochs=tuple(o.milestones_epochs),
                      gamma=o.gamma, warmup_steps=int(o.warmup_steps))
        out = {"lr": float(o.lr * f)}
        if len(o.groups) and o.groups[0][1] >= 0:
            out["lr_backbone"] = float(o.groups[0][1] * f)
        return out

    def ema_decay(self, opt_step):
        """Official ModelEMA: decay * (1 - exp(-updates / warmups))."""
        e = self.config.ema
        return e.decay * (1.0 - jnp.exp(-jnp.asarray(opt_step, jnp.float32) / e.warmups))

    # ---------------------------------------------------------------- loss
    def loss_fn(self, params, batch_stats, batch, rng):
        """Official training forward + criterion on the global batch.

        Denoising queries from the batch's targets (`denoising.py`, noise from the step rng), the model in train
        mode (BatchNorm batch statistics), Hungarian matching on the host (pure_callback) for the last layer,
        each auxiliary layer and the encoder top-k (`aux_outputs + [enc_outputs]`, the official numbering), the
        denoising outputs against their known targets. Loss = sum of the weighted terms; metrics
        `train/<official key>` (loss_vfl, loss_bbox, loss_giou, ..._aux_<i>, ..._dn_<i>).
        """
        images = batch["image"].astype(jnp.float32) / 255.0
        targets = {"labels": batch["classes"], "boxes": batch["boxes"], "valid": batch["valid"]}
        dn_class, dn_bbox, dn_mask, dn_meta = get_contrastive_denoising_training_group(
            rng, targets["labels"], targets["boxes"], targets["valid"], self.num_classes, self.num_queries,
            num_denoising=self.num_denoising, label_noise_ratio=self.label_noise_ratio,
            box_noise_scale=self.box_noise_scale)
        out, mutated = self.model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                        dn_class=dn_class, dn_bbox_unact=dn_bbox, dn_attn_mask=dn_mask,
                                        mutable=["batch_stats"])
        outputs = {"pred_logits": out["pred_logits"].astype(jnp.float32), "pred_boxes": out["pred_boxes"],
                   "aux_outputs": _f32(out.get("aux_outputs", []) + [out["enc_outputs"]])}
        if dn_meta is not None:
            outputs["dn_aux_outputs"] = _f32(out["dn_outputs"])
            outputs["dn_meta"] = dn_meta
        terms = self.criterion(outputs, targets)
        total = sum(terms.values())
        return total, ({f"train/{k}": v for k, v in terms.items()}, mutated["batch_stats"])

    def train_loader(self, iterator_state=None):
        """This process's slices of the global training batches; the iterator's state is
        `{"global_batches": n}` (`research.data.pipeline.ResumableLoader`), so a checkpoint resumes at global
        batch n on any number of processes."""
        from research.data import pipeline
        c = self.config

        def make(start_batch: int):
            return data_lib.make_loader(self.dataset.builder, c.data.train_split, image_size=c.data.image_size,
                                        batch_size=c.batch_size, train=True, max_labels=c.data.max_labels,
                                        seed=c.seed, aug=dict(c.aug), worker_count=c.data.num_workers,
                                        start_batch=start_batch)
        return pipeline.ResumableLoader(make, iterator_state)

    @staticmethod
    def to_device(local: dict) -> dict:  # noqa: D102 (the contract's)
        return {k: local[k] for k in ("image", "boxes", "classes", "valid")}

    def transform_batch(self, batch: dict, step: int) -> dict:
        """Official train-time `multi_scale` (rtdetr.py): each iteration the batch is resized to a size drawn
        from `config.multi_scale` with F.interpolate's default 'nearest' mode (boxes are normalised, so they
        stay). The draw depends only on (seed, iteration); each size compiles the train step once."""
        sizes = tuple(self.config.multi_scale)
        if not sizes:
            return batch
        sz = int(np.random.default_rng([int(self.config.seed), int(step), 0x52544452]).choice(sizes))
        if sz == batch["image"].shape[1] and sz == batch["image"].shape[2]:
            return batch
        return dict(batch, image=resize_nearest(batch["image"], sz))

    # ---------------------------------------------------------------- the detector protocol
    # (research/evaluation/detection.py: the `coco_detection` evaluator of config.evals)

    def deploy_fn(self, variables, for_export: bool = False):
        """The official deploy model (model.deploy() + postprocessor.deploy()): (images [B, S, S, 3] float 0-1,
        orig_target_sizes [B, 2] (w, h)) -> (labels [B, K] int32, boxes [B, K, 4] xyxy pixels, scores [B, K]).
        `for_export`: through flax's own layers (`export_model`), as ONNX export needs."""
        k = int(self.config.eval.num_top_queries)
        model = self.export_model if for_export else self.model

        def fn(images, orig_target_sizes):
            out = model.apply(variables, images, train=False)
            return postprocess(out["pred_logits"].astype(jnp.float32), out["pred_boxes"], orig_target_sizes, k)

        return fn

    def _runner(self, variables, onnx_path: str | None):
        """(images [B, S, S, 3] uint8, sizes [B, 2]) -> (labels, boxes, scores) from JAX, or from an exported graph:
        the deploy graph (`deploy.onnx`, or one with an `orig_target_sizes` input) as it is; `model.onnx` (raw
        `pred_logits`, `pred_boxes`) through the deploy graph beside it when there is one, else with the
        post-processor applied to its outputs."""
        if onnx_path:
            from research.bridge.onnx_export import OnnxRunner
            runner = OnnxRunner(onnx_path)
            deploy_path = os.path.join(os.path.dirname(onnx_path), DEPLOY_ONNX)
            if "orig_target_sizes" not in runner.input_names and os.path.exists(deploy_path):
                runner = OnnxRunner(deploy_path)
            if "orig_target_sizes" in runner.input_names:
                return lambda images, sizes: runner(images=images.astype(np.float32) / 255.0,
                                                    orig_target_sizes=sizes.astype(np.float32))
            k = int(self.config.eval.num_top_queries)
            post = jax.jit(lambda logits, boxes, sizes: postprocess(logits, boxes, sizes, k))
            return lambda images, sizes: [np.asarray(a) for a in post(
                *runner(images=images.astype(np.float32) / 255.0), sizes.astype(np.float32))]
        variables = parallel.local_copy(variables)
        fwd = jax.jit(lambda v, images, sizes: self.deploy_fn(v)(images.astype(jnp.float32) / 255.0, sizes))
        return lambda images, sizes: [np.asarray(a) for a in fwd(variables, images, sizes.astype(np.float32))]

    def detections(self, variables, onnx_path: str | None, split: str) -> Iterator[dict]:
        """All top-k detections per image (as the official CocoEvaluator gets them), boxes in original pixels,
        with the ground truth of each image (its normalised boxes times the original size); padding skipped."""
        c = self.config
        loader = data_lib.make_loader(self.dataset.builder, split, image_size=c.data.image_size,
                                      batch_size=c.eval.batch_size, train=False, max_labels=c.data.max_labels,
                                      process_index=0, process_count=1)
        run = self._runner(variables, onnx_path)
        with pipeline.closing_iterator(loader) as it:  # workers and shared memory freed at the end or on error
            for batch in it:
                labels, boxes, scores = run(batch["image"], batch["orig_size"])
                for i in range(len(batch["image_id"])):
                    if batch["image_id"][i] < 0:
                        continue
                    w, h = (int(v) for v in batch["orig_size"][i])
                    valid = batch["valid"][i]
                    gt = batch["boxes"][i][valid].astype(np.float64) * np.array([w, h, w, h])
                    gt_xyxy = np.concatenate([gt[:, :2] - gt[:, 2:] / 2, gt[:, :2] + gt[:, 2:] / 2],
                                             -1).reshape(-1, 4)
                    dets = np.concatenate([boxes[i], scores[i][:, None], labels[i][:, None].astype(np.float32)],
                                          -1)
                    yield {"image": {"id": int(batch["image_id"][i]), "height": h, "width": w},
                           "gt_xyxy": gt_xyxy, "gt_labels": batch["classes"][i][valid], "dets": dets}

    def predict(self, variables: dict, out_dir: str) -> list[str]:
        """The deploy model on `config.predict.input_dir` (or the first eval images); detections with score >=
        `config.predict.score_thres` drawn on the original images (PNG)."""
        from research.data import detection
        from research.vision import plots
        c = self.config
        s = c.data.image_size
        run = self._runner(variables, None)
        if c.predict.input_dir:
            items = ((name, img0) for name, img0, *_ in detection.images_from_folder(
                c.predict.input_dir, s, c.predict.num_images))
        else:
            from research.data import pipeline
            source = pipeline.DetectionSource(self.dataset.builder.data_dir, c.data.eval_split)
            items = ((f"{c.data.eval_split}_{i:04d}", source[i]["image"])
                     for i in range(min(c.predict.num_images, source.num_records)))
        paths = []
        for name, img0 in items:
            img, _ = T.resize(img0, None, s)
            h0, w0 = img0.shape[:2]
            labels, boxes, scores = run(img[None], np.array([[w0, h0]], np.float32))
            keep = scores[0] >= c.predict.score_thres
            dets = np.concatenate([boxes[0][keep], scores[0][keep, None], labels[0][keep, None]], -1)
            path = os.path.join(out_dir, f"{name}.png")
            plots.draw_detections(img0, dets, self.class_names, path)
            paths.append(path)
        return paths

    def export_spec(self, variables: dict) -> tasks.ExportSpec:
        """`model.onnx`: the network alone (official `RTDETR` in eval mode after `deploy()`): `images` [B, S, S, 3]
        float32 0-1 (NHWC here) -> `pred_logits` [B, 300, C] (before the sigmoid), `pred_boxes` [B, 300, 4]
        (cx, cy, w, h normalised to 0-1). The deploy graph with the post-processor is `deploy.onnx`
        (`extra_exports`)."""
        s = self.config.data.image_size
        model = self.export_model

        def fn(images):
            out = model.apply(variables, images, train=False)
            return out["pred_logits"].astype(jnp.float32), out["pred_boxes"].astype(jnp.float32)

        return tasks.ExportSpec(fn, {"images": np.zeros((1, s, s, 3), np.float32)}, ("pred_logits", "pred_boxes"),
                                dynamic_batch=("images",))

    def extra_exports(self, variables: dict, out_dir: str) -> dict:
        """`deploy.onnx`, the official deploy graph (`tools/export_onnx.py`: `model.deploy()` +
        `postprocessor.deploy()`): inputs `images` [B, S, S, 3] float32 0-1 (NHWC here; NCHW with
        `config.export.channels_first`, as `model.onnx`) and `orig_target_sizes`
        [B, 2] float32 (w, h) -> `labels` [B, K] int32, `boxes` [B, K, 4] (xyxy, pixels of the original image),
        `scores` [B, K]. Both graphs are then checked against JAX in ONNX Runtime on two random images (raw outputs
        within `ACCEPT_RTOL` of their range; the deploy graph's scores, sorted, likewise); returns the path and the
        errors.

        Raises:
          RuntimeError: an exported graph disagrees with JAX.
        """
        from research.bridge.onnx_export import ACCEPT_RTOL, OnnxRunner, export_onnx
        s = self.config.data.image_size
        path = export_onnx(self.deploy_fn(variables, for_export=True),
                           {"images": np.zeros((1, s, s, 3), np.float32),
                            "orig_target_sizes": np.full((1, 2), s, np.float32)},
                           os.path.join(out_dir, DEPLOY_ONNX), dynamic_batch=("images", "orig_target_sizes"),
                           output_names=("labels", "boxes", "scores"),
                           channels_first=bool(self.config.export.channels_first))
        rs = np.random.default_rng(0)
        images = rs.uniform(0, 1, (2, s, s, 3)).astype(np.float32)
        sizes = np.array([[s, s], [2 * s, s]], np.float32)
        errors = {}
        raw_fn = self.export_spec(variables).apply_fn
        checks = [("model.onnx", [np.asarray(a) for a in jax.jit(raw_fn)(images)],
                   OnnxRunner(os.path.join(out_dir, "model.onnx"))(images=images), ("pred_logits", "pred_boxes")),
                  (DEPLOY_ONNX, [np.sort(np.asarray(jax.jit(self.deploy_fn(variables))(images, sizes)[2]), -1)],
                   [np.sort(OnnxRunner(path)(images=images, orig_target_sizes=sizes)[2], -1)], ("scores",))]
        for graph, ref, got, names in checks:
            for name, r, g in zip(names, ref, got):
                err = float(np.abs(r.astype(np.float64) - g).max() / max(float(np.abs(r).max()), 1e-12))
                errors[f"onnx_check/{graph}/{name}"] = err
                if not err <= ACCEPT_RTOL:
                    raise RuntimeError(f"exported {graph} output {name!r} differs from JAX by {err:.3g} of its range "
                                       f"(accepted {ACCEPT_RTOL})")
        return {"onnx_deploy": path, **errors}

    def to_torch(self, variables: dict) -> dict:
        from research.rtdetr import bridge
        return bridge.to_torch(self.model, variables)

    @classmethod
    def benchmark_spec(cls, config, *, variant: str, image_size: int):
        """`research/rtdetr/benchmark.py` `benchmark_spec` (the real task's loss, optimiser and EMA)."""
        from research.rtdetr import benchmark
        return benchmark.benchmark_spec(config, variant=variant, image_size=image_size)


def _f32(outs: list) -> list:
    return [{"pred_logits": o["pred_logits"].astype(jnp.float32), "pred_boxes": o["pred_boxes"]} for o in outs]


@functools.partial(jax.jit, static_argnums=1)
def resize_nearest(images, size: int):
    """[B, H, W, C] -> [B, size, size, C] as torch `F.interpolate(mode='nearest')`: source index floor(i * in / out)."""
    h, w = images.shape[1:3]
    iy = jnp.floor(jnp.arange(size) * (h / size)).astype(jnp.int32).clip(0, h - 1)
    ix = jnp.floor(jnp.arange(size) * (w / size)).astype(jnp.int32).clip(0, w - 1)
    return images[:, iy][:, :, ix]
