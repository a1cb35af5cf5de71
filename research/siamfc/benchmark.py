"""SiamFC's part of the benchmark harness (`research/benchmark.py`): its `BenchSpec`.

    python launch.py --config=configs/siamfc.py --workdir=W --mode=benchmark \
        [--config.benchmark.torch_repo=/path/to/siamfc-pytorch]

Stages (the tracker's own workload, at `config.benchmark.variant`, `alexnet_v1` by default):

  infer           the search branch: `batch_size` (3 scales) search crops of `image_size` px
                  (255) through the backbone and correlated with one cached template
                  (`SiamFC.respond`, what every `TrackerSiamFC.update` runs)
  onnx_infer      the same as the exported `search.onnx` graph in ONNX Runtime
  train_step      the trainer's step on `train_batch_size` (8) pairs of 127 / 239 px crops
                  (the task's loss and SGD), as `--mode=train` runs it
  template        (extra) the template branch: one 127 px exemplar -> `[1, 6, 6, C]` features
  tracker_frame   (extra) the whole `TrackerSiamFC.update` per frame (crops, network, upsampling,
                  peak, state) on a synthetic 640 x 360 video (`synthetic_video`), JAX backend;
                  `onnx_tracker_frame` the same tracker on the exported graphs

With `--config.benchmark.torch_repo` the official network, train step and tracker are timed in
the same run (`research/siamfc/official_torch.py`): `torch_infer`, `torch_template`,
`torch_template_and_search`, `torch_train_step`, `torch_tracker_frame`, and the same-run ratios
`*_over_torch_*_measured`.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np

from research.benchmark import BenchSpec, custom_call_flops, host_init, record, time_calls

VIDEO_SIZE = (360, 640)  # (height, width) of the synthetic tracking video
TARGET_SIDE = 64


def synthetic_video(n: int, height: int = VIDEO_SIZE[0], width: int = VIDEO_SIZE[1], side: int = TARGET_SIDE,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` uint8 RGB frames `[n, height, width, 3]` of a textured square moving over smooth noise,
    and the first frame's box `[x, y, w, h]` (1-based x, y). Deterministic: the official runner
    times its tracker on the same frames."""
    import cv2
    rng = np.random.default_rng(seed)
    bg = cv2.resize(rng.uniform(30, 200, (9, 16, 3)).astype(np.float32), (width, height),
                    interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:side, 0:side]
    tex = np.where(((yy // 8 + xx // 8) % 2)[..., None] == 1, [250, 230, 20], [200, 20, 200]).astype(np.float32)
    frames = np.empty((n, height, width, 3), np.uint8)
    x0, y0 = width // 4, height // 3
    for t in range(n):
        x = int(x0 + 3 * t) % max(width - side, 1)
        y = int(y0 + 2 * t) % max(height - side, 1)
        img = bg.copy()
        img[y:y + side, x:x + side] = tex
        frames[t] = np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
    return frames, np.array([x0 + 1, y0 + 1, side, side], np.float64)


def time_tracker(tracker, frames: np.ndarray, box: np.ndarray, warmup: int) -> list[float]:
    """Milliseconds of each `tracker.update` after `init` on frame 0 and `warmup` untimed updates."""
    tracker.init(frames[0], box)
    times = []
    for i, f in enumerate(frames[1:]):
        t0 = time.perf_counter()
        tracker.update(f)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1000.0)
    return times


def benchmark_spec(config, *, variant: str, image_size: int) -> BenchSpec:
    """SiamFC at `variant` with `image_size` px search crops (random weights), through the real task's
    loss_fn / make_optimizer, without its data.

    Inputs of `infer` and `onnx_infer`: `template [1, C, 6, 6]` features and `search [B, 3, S, S]`
    float32 0..255, NCHW as `search.onnx` and the official network take them (`infer` transposes
    them to the model's NHWC inside the jitted function).
    """
    import jax
    import jax.numpy as jnp

    from research import tasks
    from research.siamfc import export as export_lib
    from research.siamfc import task as task_lib
    from research.siamfc import tracker as tracker_lib
    from research.siamfc.model import SiamFC, param_count

    cfg = config.copy_and_resolve_references()
    cfg.model.variant = variant
    cfg.model.instance_sz = int(image_size)
    task = task_lib.Task(cfg, mode="benchmark")
    model, export_model = task.model, task.export_model
    z_size, x_size = task.z_size, task.x_size
    train_x = task.transforms.search_sz
    steps = tasks.Steps(steps_per_epoch=1000, total_steps=50_000, num_epochs=50)
    shapes = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 87, 87, 3)), jnp.zeros((1, 87, 87, 3))),
                            jax.random.PRNGKey(0))
    variables = host_init(shapes)
    tz = task_lib.embedding_size(z_size)
    width = int(shapes["params"]["backbone"]["conv5"]["0"]["kernel"].shape[-1])
    b = config.benchmark

    def make_inputs(batch_size: int) -> dict:
        rs = np.random.RandomState(1)
        return {"template": rs.normal(0, 1, (1, width, tz, tz)).astype(np.float32),
                "search": rs.uniform(0, 255, (batch_size, 3, x_size, x_size)).astype(np.float32)}

    def infer_fn(v, template, search):  # [B, 1, 17, 17] as the official head and search.onnx give it
        out = model.apply(v, jnp.transpose(template, (0, 2, 3, 1)), jnp.transpose(search, (0, 2, 3, 1)),
                          method=SiamFC.respond)["response"]
        return jnp.transpose(out, (0, 3, 1, 2))

    def export_fn(v, template, search):  # as search.onnx: [B, 1, 17, 17]
        return export_lib.search_fn(export_model, v)(template, search)

    def make_batch(batch_size: int) -> dict:
        rs = np.random.RandomState(0)
        return {"exemplar": rs.randint(0, 256, (batch_size, z_size, z_size, 3)).astype(np.uint8),
                "search": rs.randint(0, 256, (batch_size, train_x, train_x, 3)).astype(np.uint8)}

    def extra_stages(repeats: int, warmup: int) -> list[dict]:
        recs = []
        z = np.random.RandomState(2).uniform(0, 255, (1, z_size, z_size, 3)).astype(np.float32)
        v = jax.tree_util.tree_map(jnp.asarray, variables)
        embed = jax.jit(lambda v, z: model.apply(v, z, method=SiamFC.embed))
        t0 = time.perf_counter()
        compiled = embed.lower(v, z).compile()
        compile_s = time.perf_counter() - t0
        times, cpu = time_calls(lambda i: embed(v, z), repeats, warmup)
        flops = None
        try:  # XLA's count plus the oneDNN custom calls it leaves out
            ca = compiled.cost_analysis()
            ca = ca[0] if isinstance(ca, (list, tuple)) else ca
            flops = float(ca["flops"]) + custom_call_flops(compiled.as_text()) if ca and "flops" in ca else None
        except Exception:
            pass
        recs.append(record("template", 1, z_size, times, cpu, compile_s=compile_s, flops=flops,
                           note="template branch: one exemplar crop -> features (SiamFC.embed, jitted)"))

        n = max(int(b.tracker_frames), 2) + warmup
        frames, box = synthetic_video(n + 1)
        settings = task.tracker_settings()
        numpy_vars = jax.tree_util.tree_map(np.asarray, variables)
        tr = tracker_lib.TrackerSiamFC(tracker_lib.JaxBackend(model, numpy_vars), settings)
        times = time_tracker(tr, frames, box, warmup)
        note = (f"TrackerSiamFC.update per frame on a synthetic {VIDEO_SIZE[1]}x{VIDEO_SIZE[0]} video: host crops "
                "(OpenCV), the jitted search branch, x16 bicubic upsampling, peak and state; images_per_s = fps")
        recs.append(record("tracker_frame", 1, x_size, times, None, fps=1000.0 / float(np.median(times)),
                           note=note))
        with tempfile.TemporaryDirectory() as tmp:
            export_lib.export_graphs(export_model, numpy_vars, tmp, z_size=z_size, x_size=x_size, check=False)
            tr = tracker_lib.TrackerSiamFC(tracker_lib.OnnxBackend.from_dir(tmp), settings)
            times = time_tracker(tr, frames, box, warmup)
        recs.append(record("onnx_tracker_frame", 1, x_size, times, None, fps=1000.0 / float(np.median(times)),
                           note="the same tracker on the exported template.onnx / search.onnx (ONNX Runtime)"))
        return recs

    return BenchSpec(
        name="siamfc", variant=variant, image_size=int(image_size), variables=variables, make_inputs=make_inputs,
        infer_fn=infer_fn, export_fn=export_fn, torch_reference_module="research.siamfc.official_torch",
        torch_serves=("train_step",),
        torch_args=(f"--tracker_frames={int(b.tracker_frames)}",),
        make_batch=make_batch, loss_fn=task.loss_fn, tx=task.make_optimizer(variables["params"], steps),
        ema_decay=None, use_ema=False, accumulates=False, onnx_output_names=["response"],
        extra_stages=extra_stages,
        measured_pairs=(("template", "torch_template"), ("tracker_frame", "torch_tracker_frame"),
                        ("onnx_tracker_frame", "torch_tracker_frame")),
        info={"params": param_count(variables), "exemplar_size": z_size, "search_size": x_size,
              "train_search_size": train_x, "conv_impl": task_lib.resolve_conv_impl(cfg.model.conv_impl),
              "dtype": cfg.model.dtype,
              "infer": "search branch: B search crops against one cached template",
              "tracker_video": f"{VIDEO_SIZE[1]}x{VIDEO_SIZE[0]}, {int(b.tracker_frames)} timed updates"})
