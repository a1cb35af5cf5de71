"""SiamFC glue for the shared trainer: pairs through grain, balanced loss, SGD, tracking evaluation, export.

Follows the official `TrackerSiamFC.train_over` / `train_step` (huanglianghua/siamfc-pytorch
`siamfc/siamfc.py`): pairs from `Pair` + `SiamFCTransforms` (`research/siamfc/transforms.py`),
`Net(z, x)` in training mode (BatchNorm batch statistics; exemplars and searches pass the
backbone separately), logistic labels with `r_pos` / `r_neg` (`research/siamfc/loss.py`),
`BalancedLoss`, SGD (momentum 0.9, weight decay 5e-4 on every parameter, as `net.parameters()`)
with `ExponentialLR` stepped per epoch: epoch e uses `initial_lr * gamma ** e`, gamma =
`(ultimate_lr / initial_lr) ** (1 / epoch_num)`.

Evaluation and prediction run the tracker (`research/siamfc/tracker.py`) with the trained
variables over the evaluation videos (`research/siamfc/evaluation.py`: OTB success AUC and
precision at 20 px); `--mode=track` runs it on a user's video (`research/siamfc/track.py`).
Export: the official state_dict, the shared `model.onnx` (`exemplar [B, 127, 127, 3]`,
`search [B, 255, 255, 3]` float32 0..255 -> `response [B, 17, 17, 1]`, pairs i <-> i) and the two
graphs trackers deploy, `template.onnx` and `search.onnx` (`research/siamfc/export.py`).
"""

from __future__ import annotations

import functools
import math
import os

import cv2
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from research import parallel, tasks
from research.siamfc import bridge, loss as loss_lib, model as model_lib
from research.siamfc import evaluation  # noqa: F401  (registers the `tracking` evaluator type)
from research.siamfc import tracker as tracker_lib
from research.siamfc import transforms as transforms_lib

VARIANTS = {"alexnet_v1": model_lib.WIDTHS, "tiny": model_lib.TINY_WIDTHS}


def embedding_size(size: int) -> int:
    """Side of the AlexNetV1 embedding of a `size` px crop (no padding, stride 8): 127 -> 6, 255 -> 22.

    Raises:
      ValueError: the crop is smaller than the 87 px the network needs.
    """
    s = (size - 11) // 2 + 1
    s = (s - 3) // 2 + 1
    s = s - 4
    s = (s - 3) // 2 + 1
    s = s - 6
    if size < 87 or s < 1:
        raise ValueError(f"a {size} px crop is too small for AlexNetV1 (87 px at least)")
    return s


def build_model(config, export: bool = False) -> model_lib.SiamFC:
    """The `SiamFC` of `config.model` (widths of the variant unless `config.model.widths` is set).

    `conv_impl` (same variables whichever): "split" = `SplitGroupConv` (grouped layers group by
    group: same sums, faster on XLA:CPU), "lax" = `nn.Conv`; "dot" / "onednn" = the shared CPU
    speed layer (`research.cpu.layers.select`: its convolutions per group and its memory-lean
    BatchNorm); "auto" = "onednn" on CPU where its kernels load (same-run A/B, alexnet_v1:
    train step b8 -37 %, 3-scale search branch -55 % against "split"; "dot" is slower than
    "split", so without oneDNN "auto" is "split"; docs/siamfc.md), "lax" elsewhere.
    The CPU paths ("split", "dot", "onednn") also pool by strided slices and correlate in the
    faster forms outside training (`SiamFC.slice_pool`, `SiamFC.fast_xcorr`: same values to float
    rounding, faster on XLA:CPU). `export=True` always uses `nn.Conv`
    and `nn.max_pool` (one grouped Conv node per grouped layer, MaxPool nodes in ONNX).

    Raises:
      ValueError: an unknown variant, dtype or conv_impl.
    """
    m = config.model
    if m.variant not in VARIANTS:
        raise ValueError(f"config.model.variant={m.variant!r}; known: {sorted(VARIANTS)}")
    widths = tuple(int(w) for w in m.widths) if m.widths else VARIANTS[m.variant]
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}.get(m.dtype)
    if dtype is None:
        raise ValueError(f"config.model.dtype={m.dtype!r}: use float32, bfloat16 or float16")
    impl = resolve_conv_impl(m.conv_impl)
    out_scale = float(m.out_scale)
    if export or impl == "lax":
        return model_lib.SiamFC(widths=widths, out_scale=out_scale, conv=nn.Conv, dtype=dtype)
    if impl == "split":
        return model_lib.SiamFC(widths=widths, out_scale=out_scale, conv=model_lib.SplitGroupConv, slice_pool=True,
                                fast_xcorr=True, dtype=dtype)
    from research.cpu import layers as layers_lib
    return model_lib.SiamFC(widths=widths, out_scale=out_scale, layers=layers_lib.select(impl), slice_pool=True,
                            fast_xcorr=True, dtype=dtype)


def resolve_conv_impl(conv_impl: str) -> str:
    """`config.model.conv_impl` with "auto" resolved for this backend (see `build_model`).

    Raises:
      ValueError: an unknown value.
    """
    impl = conv_impl
    if impl == "auto":
        if jax.default_backend() != "cpu":
            return "lax"
        from research.cpu.kernels import onednn
        return "onednn" if onednn.available()[0] else "split"
    if impl not in ("split", "lax", "dot", "onednn"):
        raise ValueError(f"config.model.conv_impl={conv_impl!r}: use auto, split, lax, dot or onednn")
    return impl


def exponential_lr(initial_lr: float, ultimate_lr: float, num_epochs: int, steps_per_epoch: int):
    """Official `ExponentialLR(gamma)` stepped once per epoch, as a schedule of the update count."""
    gamma = (ultimate_lr / initial_lr) ** (1.0 / num_epochs)

    def schedule(count):
        epoch = jnp.floor_divide(count, steps_per_epoch)
        return initial_lr * jnp.power(gamma, epoch.astype(jnp.float32))
    return schedule


@tasks.register("siamfc")
class Task(tasks.Task):
    """SiamFC on video pairs (`synthetic` embedded videos or a local GOT-10k folder).

    Extra mode: `track` (`research/siamfc/track.py`).
    """

    extra_modes = ("track",)

    def __init__(self, config, mode: str = "train"):
        super().__init__(config, mode)
        self.model = build_model(config)
        self.export_model = build_model(config, export=True)
        c = config.model
        self.z_size, self.x_size = int(c.exemplar_sz), int(c.instance_sz)
        self.transforms = transforms_lib.SiamFCTransforms(self.z_size, self.x_size, float(config.data.context))
        embedding_size(self.transforms.search_sz)  # fails early on crops too small for the network
        self.schedule = None

    def run_mode(self, mode: str, workdir: str) -> dict:
        """`track`: the tracker on `config.track.input` from `config.track.box` (`research/siamfc/track.py`)."""
        if mode != "track":
            raise NotImplementedError(f"siamfc has no mode {mode!r}")
        from research.siamfc import track
        return track.run(self, workdir)

    # ------------------------------------------------------------------ data
    @functools.cached_property
    def _builder(self):
        from research.siamfc import data
        d = self.config.data
        return data.prepare(d.name, d.data_dir, config=d.builder_config, manual_dir=d.manual_dir or None)

    def data_problems(self) -> list:
        """What the validation pass found in a GOT-10k / OTB folder (none for the synthetic data)."""
        from research.data import validation
        return validation.read(self._builder.data_dir)

    @functools.lru_cache(maxsize=None)
    def source(self, split: str):
        """`VideoSource` of `split` (the dataset is prepared on first use)."""
        from research.siamfc import data
        return data.VideoSource(self._builder.data_dir, split)

    def num_train_examples(self) -> int:
        return len(self.source(self.config.data.train_split)) * int(self.config.data.pairs_per_seq)

    def train_loader(self, iterator_state=None, *, process_index: int | None = None,
                     process_count: int | None = None):
        """This process's slices of the global pair batches, as a `pipeline.ResumableLoader`: its state
        is the number of global batches consumed (`{"global_batches": n}`), so a run resumes on any
        number of processes or grain workers (a grain state of an older checkpoint is restored as
        grain saved it). `process_index` / `process_count` default to JAX's (tests set them)."""
        import grain

        from research.data import pipeline
        c = self.config
        p_index = jax.process_index() if process_index is None else int(process_index)
        p_count = jax.process_count() if process_count is None else int(process_count)
        sampler = transforms_lib.PairSampler(self.source(c.data.train_split), self.transforms)
        options = grain.ReadOptions(num_threads=max(int(c.data.num_threads), 1), prefetch_buffer_size=4)
        workers = int(c.data.num_workers)
        if workers:
            from absl import flags
            if not flags.FLAGS.is_parsed():  # grain workers read absl flags; outside launch.py accept defaults
                flags.FLAGS.mark_as_parsed()

        def make(start_batch: int):
            ds = transforms_lib.pair_dataset(sampler, batch_size=c.batch_size, seed=c.seed,
                                             pairs_per_seq=c.data.pairs_per_seq, process_index=p_index,
                                             process_count=p_count, start_batch=start_batch)
            it_ds = ds.to_iter_dataset(options)
            if workers:
                it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
            return it_ds
        return pipeline.ResumableLoader(make, iterator_state)

    @staticmethod
    def to_device(local: dict) -> dict:  # noqa: D102 (the contract's)
        return {"exemplar": local["exemplar"], "search": local["search"]}

    # ------------------------------------------------------------------ training
    def init_variables(self, rng) -> dict:
        """Official init (xavier-uniform convolutions, zero biases, BatchNorm 1 / 0), or `init_from`."""
        variables = jax.jit(lambda r: model_lib.init_variables(self.model, r, 87, 87))(rng)
        if self.config.model.init_from:
            sd = self.init_state_dict()
            variables = bridge.from_torch(self.model, sd, variables)
            logging.info("initialised from %s", self.config.model.init_from)
        return dict(variables)

    def make_optimizer(self, params, steps: tasks.Steps):
        """`optim.SGD(lr, momentum, weight_decay)` + per-epoch `ExponentialLR` (torch's update order:
        decay added to the gradient, then momentum, then the learning rate)."""
        o = self.config.optim
        self.schedule = exponential_lr(float(o.initial_lr), float(o.ultimate_lr), steps.num_epochs,
                                       steps.steps_per_epoch)
        return optax.chain(optax.add_decayed_weights(float(o.weight_decay)),
                           optax.sgd(self.schedule, momentum=float(o.momentum)))

    def log_hyperparams(self, step: int) -> dict[str, float]:
        return {"lr": float(self.schedule(step))} if self.schedule is not None else {}

    def loss_fn(self, params, batch_stats, batch, rng):
        del rng
        z = batch["exemplar"].astype(jnp.float32)
        x = batch["search"].astype(jnp.float32)
        out, mutated = self.model.apply({"params": params, "batch_stats": batch_stats}, z, x, train=True,
                                        mutable=["batch_stats"])
        responses = out["response"]
        b, h, w, _ = responses.shape
        L = self.config.loss
        labels = jnp.asarray(loss_lib.create_labels(b, h, w, r_pos=L.r_pos, r_neg=L.r_neg,
                                                    total_stride=loss_lib.TOTAL_STRIDE))
        total = loss_lib.balanced_loss(responses, labels, neg_weight=float(L.neg_weight))
        # share of pairs whose response peak falls on a positive cell (the target centre region)
        peak = jnp.argmax(responses.reshape(b, -1), axis=1)
        hit = jnp.take_along_axis(labels.reshape(b, -1), peak[:, None], axis=1)[:, 0] == 1
        metrics = {"train/balanced_loss": total, "train/peak_on_target": jnp.mean(hit.astype(jnp.float32))}
        return total, (metrics, mutated["batch_stats"])

    # ------------------------------------------------------------------ tracking
    def tracker_settings(self) -> tracker_lib.TrackerSettings:
        """Official inference settings of `config.tracker`, with the crop sizes of `config.model`."""
        t, m = self.config.tracker, self.config.model
        return tracker_lib.TrackerSettings(
            out_scale=float(m.out_scale), exemplar_sz=self.z_size, instance_sz=self.x_size,
            context=float(self.config.data.context), scale_num=int(t.scale_num), scale_step=float(t.scale_step),
            scale_lr=float(t.scale_lr), scale_penalty=float(t.scale_penalty),
            window_influence=float(t.window_influence),
            response_sz=embedding_size(self.x_size) - embedding_size(self.z_size) + 1,
            response_up=int(t.response_up), total_stride=loss_lib.TOTAL_STRIDE)

    def make_tracker(self, variables):
        """A `TrackerSiamFC` whose `JaxBackend` holds these variables (a local numpy copy of possibly
        sharded arrays)."""
        backend = tracker_lib.JaxBackend(self.model, parallel.local_copy(variables))
        return tracker_lib.TrackerSiamFC(backend, self.tracker_settings())

    def predict(self, variables: dict, out_dir: str) -> list[str]:
        """Tracks the first `config.predict.num_frames` frames of eval video `config.predict.video`;
        each frame is written as a PNG with the ground truth (green) and the tracked box (red)."""
        p = self.config.predict
        src = self.source(self.config.data.eval_split)
        if not 0 <= p.video < len(src):
            raise ValueError(f"config.predict.video={p.video}: the {self.config.data.eval_split!r} split has "
                             f"{len(src)} videos")
        seq = src.sequence(p.video)
        frames = src.frames(p.video, p.num_frames or None)
        boxes = self.make_tracker(variables).track(frames, seq["boxes"][0])
        paths = []
        for t, (frame, box) in enumerate(zip(frames, boxes)):
            path = os.path.join(out_dir, f"{seq['name']}_{t:04d}.png")
            cv2.imwrite(path, draw_boxes(frame, seq["boxes"][t], box, upscale=int(p.upscale))[..., ::-1])
            paths.append(path)
        return paths

    # ------------------------------------------------------------------ export
    def export_spec(self, variables: dict) -> tasks.ExportSpec:
        """`exemplar [B, 127, 127, 3]`, `search [B, 255, 255, 3]` float32 0..255 -> `response [B, 17, 17, 1]`
        (the shared `model.onnx`, pairs i <-> i).

        The tracker's own graphs are `extra_exports`.
        """
        model = self.export_model

        def apply_fn(exemplar, search):
            z = model.apply(variables, exemplar, method=model_lib.SiamFC.embed)
            x = model.apply(variables, search, method=model_lib.SiamFC.embed)
            return pairwise_xcorr(z, x, model.out_scale)

        return tasks.ExportSpec(apply_fn, {"exemplar": np.zeros((1, self.z_size, self.z_size, 3), np.float32),
                                           "search": np.zeros((1, self.x_size, self.x_size, 3), np.float32)},
                                ("response",), dynamic_batch=("exemplar", "search"))

    def extra_exports(self, variables: dict, out_dir: str) -> dict:
        """The tracker's graphs as trackers deploy them, NCHW as the official network takes its
        tensors: `out_dir/template.onnx` (exemplar `[B, 3, 127, 127]` 0..255 -> template features
        `[B, C, 6, 6]`) and `search.onnx` (template features `[1, C, 6, 6]` + search crops
        `[B, 3, 255, 255]` -> responses `[B, 1, 17, 17]`), each checked against JAX in ONNX Runtime
        (`research/siamfc/export.py`); returns their paths and relative errors.

        Raises:
          RuntimeError: an exported graph disagrees with JAX (`export.check_graphs`).
        """
        from research.siamfc import export
        return export.export_graphs(self.export_model, variables, out_dir, z_size=self.z_size, x_size=self.x_size)

    def to_torch(self, variables: dict) -> dict:
        return bridge.to_torch(self.model, variables)

    @classmethod
    def benchmark_spec(cls, config, *, variant: str, image_size: int):
        """`research/siamfc/benchmark.py`: search branch, template branch, train step, tracker fps."""
        from research.siamfc import benchmark
        return benchmark.benchmark_spec(config, variant=variant, image_size=image_size)


def pairwise_xcorr(exemplar: jax.Array, search: jax.Array, out_scale: float) -> jax.Array:
    """`model.xcorr` for `Bz == Bx` (pair i <-> i) as a sum of shifted products, for ONNX export.

    `xcorr` runs all pairs as one convolution with `Bz` feature groups, which a symbolic batch
    dimension cannot express (the group count must be a constant); this form has no batch-sized
    constant. Same sums in another order (float32 round-off only).

    Args:
      exemplar: `[B, hz, wz, C]`; search: `[B, hx, wx, C]` embeddings.

    Returns:
      `[B, hx - hz + 1, wx - wz + 1, 1]` responses times `out_scale`.
    """
    _, hz, wz, _ = exemplar.shape
    ho, wo = search.shape[1] - hz + 1, search.shape[2] - wz + 1
    out = 0.0
    for u in range(hz):
        for v in range(wz):
            out = out + jnp.einsum("bhwc,bc->bhw", search[:, u:u + ho, v:v + wo, :], exemplar[:, u, v, :])
    return (out * out_scale)[..., None]


def draw_boxes(frame: np.ndarray, gt_box, tracked_box, upscale: int = 1) -> np.ndarray:
    """`frame` (uint8 RGB) enlarged `upscale` times (nearest) with `[x, y, w, h]` boxes (1-based x, y):
    ground truth green, tracked red."""
    img = cv2.resize(frame, None, fx=upscale, fy=upscale, interpolation=cv2.INTER_NEAREST) if upscale > 1 else \
        frame.copy()
    for box, color in ((gt_box, (0, 200, 0)), (tracked_box, (230, 0, 0))):
        x, y, w, h = (float(v) for v in box)
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            continue
        p1 = (int(round((x - 1) * upscale)), int(round((y - 1) * upscale)))
        p2 = (int(round((x - 1 + w) * upscale)) - 1, int(round((y - 1 + h) * upscale)) - 1)
        cv2.rectangle(img, p1, p2, color, max(1, upscale // 2))
    return img
