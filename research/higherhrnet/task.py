"""HigherHRNet on the shared system: data, targets, loss, optimiser, OKS evaluation, prediction drawing, export.

Training follows `tools/dist_train.py` + `lib/core/trainer.py` `do_train`: the augmented image
(`research/higherhrnet/transforms.py`), heatmap / mask / joint targets at both output resolutions
(`targets.py`), the loss sum of `multi_loss` (`loss.py`), Adam (no weight decay, `get_optimizer`) with MultiStepLR:
the official scheduler steps at the start of each epoch, so epoch e (0-based) trains at lr * factor^(number of
milestones <= e + 1). Evaluation: `evaluation.KeypointEvaluator` (valid.py + COCOeval keypoints), the `coco_keypoints` evaluator type
that `config.evals.oks` selects.

Batch layout from the loader (b = this process's rows of the global batch, S = input size, R_i = output sizes,
P = max_num_people, J = joints):

  image       uint8   [b, S, S, 3]
  heatmaps_i  float32 [b, R_i, R_i, J]
  mask_i      float32 [b, R_i, R_i]
  joints_i    int32   [b, P, J, 2]
"""

from __future__ import annotations

import dataclasses
import functools
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from research import parallel, tasks
from research.data import pipeline
from research.higherhrnet import bridge, data, evaluation, group, targets
from research.higherhrnet import transforms as T
from research.higherhrnet.loss import LossConfig, multi_loss
from research.higherhrnet.model import VARIANTS, PhaseConvTranspose, build_model


def model_config(config):
    """The `HigherHRNetConfig` of `config.model.variant` with the data's joint count."""
    v = config.model.variant
    if v not in VARIANTS:
        raise ValueError(f"config.model.variant={v!r}: choose one of {sorted(VARIANTS)}")
    return dataclasses.replace(VARIANTS[v], num_joints=int(config.data.num_joints))


def lr_schedule(lr: float, lr_steps, factor: float, steps_per_epoch: int):
    """MultiStepLR stepped at each epoch start (dist_train.py): per-iteration learning rate.

    Milestone m (epochs) lowers the rate from the first iteration of epoch m - 1 (0-based) on.
    """
    bounds: dict = {}
    for m in lr_steps:
        b = max(int(m) - 1, 0) * int(steps_per_epoch)
        bounds[b] = bounds.get(b, 1.0) * float(factor)
    return optax.piecewise_constant_schedule(float(lr), bounds)


class _Records:
    """Random-access decoded records of one split (opened lazily; pickles cheaply)."""

    def __init__(self, builder_dir: str, split: str):
        self.builder_dir, self.split, self._ds = builder_dir, split, None

    def _open(self):
        if self._ds is None:
            import tensorflow_datasets as tfds
            self._ds = data.open_split(tfds.builder_from_directory(self.builder_dir), self.split)
        return self._ds

    def __getstate__(self):
        return dict(self.__dict__, _ds=None)

    def __len__(self):
        return len(self._open())

    def __getitem__(self, i):
        return data.decode_record(self._open()[int(i)])

    def raw(self, i):
        """Record i undecoded (images as bytes)."""
        return self._open()[int(i)]


class _LoadAugment:
    """One batch slice: the records of `indices` loaded, augmented (rng from (seed, global position)) and targeted."""

    def __init__(self, records: _Records, config, rows: slice, global_batch: int):
        d = config.data
        self.records, self.rows, self.global_batch = records, rows, global_batch
        self.seed = int(config.seed)
        self.aug = T.AugmentConfig(input_size=int(d.input_size), output_sizes=tuple(d.output_sizes),
                                   max_rotation=float(d.max_rotation), min_scale=float(d.min_scale),
                                   max_scale=float(d.max_scale), scale_type=d.scale_type,
                                   max_translate=float(d.max_translate), flip_prob=float(d.flip_prob),
                                   flip_index=tuple(d.flip_index))
        self.num_joints, self.max_people, self.sigma = int(d.num_joints), int(d.max_num_people), float(d.sigma)

    def example(self, index: int, position: int) -> dict:
        r = self.records[index]
        keep = (r["is_crowd"] == 0) | (r["num_keypoints"] > 0)  # CocoKeypoints.__getitem__'s filter
        rng = np.random.default_rng([self.seed, int(position)])
        image, masks, joints = T.augment(r["image"], r["ignore"], r["keypoints"][keep], self.aug, rng)
        out = targets.make_targets(joints, masks, self.aug.output_sizes, self.num_joints, self.max_people,
                                   self.sigma)
        out["image"] = image
        return out

    def __call__(self, batch_index: int, indices: np.ndarray) -> dict:
        rows = range(len(indices))[self.rows]
        exs = [self.example(indices[i], batch_index * self.global_batch + i) for i in rows]
        return {k: np.stack([e[k] for e in exs]) for k in exs[0]}


@tasks.register("higherhrnet")
class Task(tasks.Task):
    """HigherHRNet (bottom-up multi-person pose) on the synthetic people or a local COCO / CrowdPose folder."""

    def __init__(self, config, mode: str = "train"):
        super().__init__(config, mode)
        self.model_cfg = model_config(config)
        from research.cpu import layers as cpu_layers
        # convolutions and BatchNorm through the CPU speed layer where `config.model.conv_impl` picks it (same
        # parameter tree as nn.Conv / nn.BatchNorm); the export graph stays plain flax (what exports trace)
        self.layers = cpu_layers.select(config.model.conv_impl)
        # inference folds each BatchNorm into its convolution (same variables; `model.Fold`), and the transposed
        # convolution computes as four phase convolutions (`model.phase_conv_transpose`) in training and inference
        # (on CPU with oneDNN: each convolution with its bias, residual add and ReLU in one oneDNN call)
        fold_impl = "onednn_fused" if self.layers.conv_impl == "onednn" else self.layers.conv_impl
        # in training the four phase convolutions take the layer's convolution too (oneDNN on CPU: its kernel gradient
        # 8 ms per phase against 24-26 for XLA's)
        conv_transpose = functools.partial(PhaseConvTranspose, impl=self.layers.conv_impl)
        self.model = build_model(self.model_cfg, conv=self.layers.nn_conv, norm=self.layers.nn_batch_norm,
                                 conv_transpose=conv_transpose, fold_bn=True, fold_impl=fold_impl)
        # flax's plain layers (BatchNorm unfolded: onnxslim folds it) and the head in its ONNX form (`HigherHRNet.
        # onnx_form`: the transposed convolution as four phase Convs with the BatchNorm folded in, padded channels;
        # jax2onnx's nn.ConvTranspose lowering fails on explicit padding with JAX >= 0.7)
        self.export_model = build_model(self.model_cfg, conv_transpose=PhaseConvTranspose, onnx_form=True)
        lc = config.loss
        self.loss_cfg = LossConfig(num_joints=int(config.data.num_joints), with_heatmaps_loss=(True, True),
                                   heatmaps_loss_factor=tuple(lc.heatmaps_loss_factor),
                                   with_ae_loss=self.model_cfg.with_ae_loss,
                                   push_loss_factor=tuple(lc.push_loss_factor),
                                   pull_loss_factor=tuple(lc.pull_loss_factor), ae_loss_type=lc.ae_loss_type)
        self.schedule = None
        if tuple(config.data.output_sizes) != (config.data.input_size // 4, config.data.input_size // 2):
            raise ValueError(f"config.data.output_sizes {tuple(config.data.output_sizes)} must be input_size / 4 and "
                             f"/ 2 ({config.data.input_size // 4}, {config.data.input_size // 2})")

    @classmethod
    def benchmark_spec(cls, config, *, variant: str, image_size: int):
        """`research/higherhrnet/benchmark.py`: W32 inference (JAX, ONNX), train step, grouping and single-scale
        inference, with the official PyTorch model timed in the same run when `benchmark.torch_repo` is set."""
        from research.higherhrnet import benchmark
        return benchmark.benchmark_spec(config, variant=variant, image_size=image_size)

    # ---------------------------------------------------------------- data
    @functools.cached_property
    def builder(self):
        return data.prepare(self.config.data)

    def data_problems(self) -> list:
        """What the validation pass found in a COCO / CrowdPose folder (none for the synthetic data)."""
        from research.data import validation
        return validation.read(self.builder.data_dir)

    def records(self, split: str) -> _Records:
        return _Records(str(self.builder.data_dir), split)

    def num_train_examples(self) -> int:
        return len(self.records(self.config.data.train_split))

    def train_loader(self, iterator_state=None, process_index: int | None = None,
                     process_count: int | None = None):
        """This process's rows of the shuffled global batches, resumable on any process count.

        One seeded order of the records (grain `shuffle` + `repeat`), cut into global batches of `config.batch_size`;
        process p of n loads rows [p * b/n, (p + 1) * b/n) of each, augmented with randomness keyed by (seed, global
        position), so the global batches do not depend on n. The iterator's `get_state()` is the number of global
        batches consumed (`research.data.pipeline.ResumableLoader`), so a checkpoint resumes on any process count.

        Args:
          iterator_state: a `get_state()` of an earlier iterator (None: from the start).
          process_index, process_count: default `jax.process_index()` / `jax.process_count()` (tests pass them).

        Raises:
          ValueError: the global batch does not split evenly over the processes.
        """
        c = self.config
        p = jax.process_index() if process_index is None else int(process_index)
        n_proc = jax.process_count() if process_count is None else int(process_count)
        if c.batch_size % n_proc:
            raise ValueError(f"config.batch_size={c.batch_size} does not split over {n_proc} processes")
        local = c.batch_size // n_proc
        recs = self.records(c.data.train_split)
        op = _LoadAugment(recs, c, slice(p * local, (p + 1) * local), c.batch_size)
        ds = (grain.MapDataset.range(len(recs)).shuffle(seed=int(c.seed)).repeat()
              .batch(int(c.batch_size), drop_remainder=True).map_with_index(op))
        threads = max(int(c.data.num_workers), 1)

        def make(start_batch: int):
            # slicing after map_with_index keeps each batch's global index (its augmentation keys)
            part = ds[start_batch:] if start_batch else ds
            return part.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads))
        return pipeline.ResumableLoader(make, iterator_state)

    def _eval_rows(self) -> list[int]:
        """Record indices of the evaluated images (the first `config.eval.max_images`, 0 = all), by image id."""
        if "_rows" not in self.__dict__:
            recs = self.records(self.config.data.eval_split)
            n = len(recs) if self.config.eval.max_images <= 0 else min(len(recs), int(self.config.eval.max_images))
            ids = [int(recs.raw(i)["image_id"]) for i in range(len(recs))]
            self._rows = sorted(range(len(recs)), key=lambda i: ids[i])[:n]
        return self._rows

    def eval_records(self) -> list[dict]:
        """Annotations of the evaluated images (`hw` instead of the pixels), in `eval_images` order, cached."""
        if "_eval_records" not in self.__dict__:
            recs = self.records(self.config.data.eval_split)
            rows = []
            for i in self._eval_rows():
                r = recs[i]
                r["hw"] = r.pop("image").shape[:2]
                r.pop("ignore")
                rows.append(r)
            self._eval_records = rows
        return self._eval_records

    def eval_images(self, limit: int | None = None):
        """The evaluated images (uint8 [H, W, 3] RGB), decoded one at a time."""
        recs = self.records(self.config.data.eval_split)
        for i in self._eval_rows()[:limit]:
            yield recs[i]["image"]

    def ground_truth(self) -> dict:
        return data.coco_ground_truth(self.eval_records(), int(self.config.data.num_joints),
                                      tuple(map(tuple, self.config.data.skeleton)))

    def crowd_index(self) -> dict[int, float]:
        """image id -> `crowdIndex` of the evaluated CrowdPose images, read from the annotation file of
        `config.data.validation_set` in `config.data.manual_dir` (the records keep no per-image fields).

        Raises:
          FileNotFoundError: the annotation file is missing. ValueError: an evaluated image has no crowdIndex.
        """
        d = self.config.data
        path = data.folder_paths(d.manual_dir, d.validation_set, data.folder_layout(d))[0]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CrowdPose scoring needs the images' crowdIndex from {path}")
        import json
        with open(path) as f:
            images = {int(im["id"]): im.get("crowdIndex") for im in json.load(f).get("images", [])}
        out = {}
        for r in self.eval_records():
            ci = images.get(int(r["image_id"]))
            if ci is None:
                raise ValueError(f"{path}: image {r['image_id']} has no crowdIndex")
            out[int(r["image_id"])] = float(ci)
        return out

    def oks_sigmas(self):
        j = int(self.config.data.num_joints)
        if j == 17:
            return None
        if j == 14:
            return evaluation.CROWDPOSE_SIGMAS
        raise ValueError(f"no OKS sigmas known for {j} joints (17 COCO, 14 CrowdPose)")

    # ---------------------------------------------------------------- training
    def init_variables(self, rng) -> dict:
        s = int(self.config.data.input_size)
        variables = dict(jax.jit(lambda r: self.model.init(r, jnp.zeros((1, s, s, 3)), train=False))(rng))
        if self.config.model.init_from:
            sd = self.init_state_dict()
            variables = dict(bridge.from_torch(self.model, sd, variables))
        return variables

    def make_optimizer(self, params, steps: tasks.Steps):
        o = self.config.optim
        self.schedule = lr_schedule(o.lr, tuple(o.lr_steps), o.lr_factor, steps.steps_per_epoch)
        return optax.adam(self.schedule, b1=0.9, b2=0.999, eps=1e-8)

    def log_hyperparams(self, step: int) -> dict:
        return {"lr": float(self.schedule(step))} if self.schedule is not None else {}

    def loss_fn(self, params, batch_stats, batch, rng):
        del rng
        x = T.normalize(batch["image"])
        out, mutated = self.model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                        mutable=["batch_stats"])
        n = len(out["outputs"])
        res = multi_loss(out["outputs"], [batch[f"heatmaps_{i}"] for i in range(n)],
                         [batch[f"mask_{i}"] for i in range(n)], [batch[f"joints_{i}"] for i in range(n)],
                         self.loss_cfg)
        metrics = {"train/loss": res["loss"]}
        for name in ("heatmaps_loss", "push_loss", "pull_loss"):
            for i, v in enumerate(res[name]):
                if v is not None:
                    metrics[f"train/{name}_{i}"] = jnp.mean(v)
        return res["loss"], (metrics, mutated["batch_stats"])

    # ---------------------------------------------------------------- inference
    def postprocess_settings(self) -> group.PostprocessSettings:
        c = self.config
        return group.PostprocessSettings(
            num_joints=int(c.data.num_joints), max_num_people=int(c.data.max_num_people),
            detection_threshold=float(c.eval.detection_threshold), tag_threshold=float(c.eval.tag_threshold),
            tag_per_joint=self.model_cfg.tag_per_joint, flip_test=bool(c.eval.flip_test),
            flip_index=tuple(c.data.flip_index), project2image=True, scale_factors=tuple(c.eval.scale_factors),
            input_size=int(c.data.input_size), loss_with_ae=self.model_cfg.with_ae_loss,
            joint_order=tuple(c.data.joint_order), adjust=True, refine=True)

    def apply_images(self, variables, images, export: bool = False):
        """images [B, H, W, 3] float32 RGB in [0, 1] -> (output 0 [B, H/4, W/4, 2J], output 1 [B, H/2, W/2, J])."""
        x = T.normalize_for_export(images) if export else T.normalize(images, max_value=1.0)
        out = (self.export_model if export else self.model).apply(variables, x, train=False)["outputs"]
        return tuple(out)

    def forward_fn(self, variables):
        variables = parallel.local_copy(variables)
        fwd = jax.jit(self.apply_images)
        return lambda x: fwd(variables, jnp.asarray(x, jnp.float32))

    def predict(self, variables, out_dir):
        """The first `config.predict.num_images` eval images with the grouped people drawn (one colour per person,
        joints with value >= `config.predict.joint_threshold` of people scoring >= `config.predict.score_threshold`)."""
        import cv2
        c = self.config
        num = int(c.predict.num_images)
        recs = self.eval_records()[:num]
        images = list(self.eval_images(num))
        people = evaluation.predict_people(self.forward_fn(variables), images, self.postprocess_settings(),
                                           c.eval.batch_size)
        paths = []
        for r, image, p in zip(recs, images, people):
            img = np.ascontiguousarray(image[..., ::-1]).copy()
            img = cv2.resize(img, None, fx=c.predict.upscale, fy=c.predict.upscale, interpolation=cv2.INTER_NEAREST)
            u = float(c.predict.upscale)
            for n, (k, s) in enumerate(zip(p["keypoints"], p["scores"])):
                if s < c.predict.score_threshold:
                    continue
                color = tuple(int(v) for v in np.random.default_rng(n).integers(64, 256, 3))
                ok = k[:, 2] >= c.predict.joint_threshold
                pt = lambda j: (int(round(k[j, 0] * u)), int(round(k[j, 1] * u)))  # noqa: E731
                for a, b in c.data.skeleton:
                    if ok[a] and ok[b]:
                        cv2.line(img, pt(a), pt(b), color, 2, cv2.LINE_AA)
                for j in np.nonzero(ok)[0]:
                    cv2.circle(img, pt(j), 3, color, -1, cv2.LINE_AA)
            path = os.path.join(out_dir, f"{r['image_id']:06d}.png")
            cv2.imwrite(path, img)
            paths.append(path)
        return paths

    def export_spec(self, variables) -> tasks.ExportSpec:
        """images [B, S, S, 3] float32 RGB in [0, 1] (normalisation inside) -> `output_0`, `output_1`."""
        s = int(self.config.data.input_size)
        return tasks.ExportSpec(lambda images: self.apply_images(variables, images, export=True),
                                {"images": np.zeros((1, s, s, 3), np.float32)}, ("output_0", "output_1"),
                                dynamic_batch=("images",))

    def to_torch(self, variables) -> dict:
        return bridge.to_torch(self.model, variables)
