"""HigherHRNet's part of the benchmark harness (`research/benchmark.py`): its `BenchSpec`, built from the real task
(loss, Adam, the export graph), plus its own stage: grouping and end-to-end single-scale inference.

Stages (`config.benchmark.*`, default W32 at 512 px like `experiments/coco/higher_hrnet/w32_512_adam_lr1e-3.yaml`):
  infer / onnx_infer   the network forward [B, S, S, 3] -> (output 0, output 1), JAX and ONNX Runtime
  train_step           the trainer's step with the task's loss (heatmaps + AE) and Adam on planted-people targets
  grouping             `inference.people_from_maps` (NMS + top-k jitted, matching / adjust / refine on the host,
                       back-projection) on `bench_inputs.planted_maps` (12 people, flip-test tags), per image
  single_scale         one image end to end as `valid.py` with the default TEST settings: resize, forward of the image
                       and its mirror, aggregation, grouping (`evaluation.predict_people`, batch 1)
The grouping record carries `share_of_single_scale` (grouping time / single-scale inference time; goal < 0.1) and
`share_of_infer` (over the bare forward). With `benchmark.torch_repo` the official model, loss and grouping are timed
in the same run (`research/higherhrnet/official_torch.py`); `grouping_over_torch_grouping_measured` is then our
grouping over the official `HeatmapParser.parse` on the same maps.
"""

from __future__ import annotations

import numpy as np

from research.benchmark import BenchSpec, host_init, record, time_calls

# The official PyTorch W32-512 on the same kind of 2-core CPU (issue 11 figures; benchmark.torch_repo measures it in
# the same run instead).
REFERENCE = {
    "setting": {"variant": "w32_512", "image_size": 512, "infer_batch": 1, "train_batch": 2},
    "infer_ms": (750.0, 840.0),  # eager PyTorch, 512 x 512, batch 1
    "train_step_ms": None,
    "gflops": None,
    "source": "issue 11: official W32-512 eager forward 750-840 ms per 512x512 image on a 2-core CPU (its ONNX "
              "export ~440 ms in ONNX Runtime)",
}

VARIANTS = {"w32_512": ("w32", 512), "w32_640": ("w32", 640), "w48_640": ("w48", 640), "small": ("small", 128),
            "tiny": ("tiny", 128)}


def benchmark_spec(config, *, variant: str, image_size: int) -> BenchSpec:
    """HigherHRNet `variant` (w32_512 | w32_640 | w48_640 | small | tiny) at `image_size` with random weights, through the
    real task's loss_fn / make_optimizer / export graph, without its data. Inputs: `images` [B, S, S, 3] in [0, 1].

    Raises:
      ValueError: unknown variant, or an image size not a multiple of 32.
    """
    import jax
    import jax.numpy as jnp

    from research import tasks
    from research.higherhrnet import bench_inputs, evaluation, inference
    from research.higherhrnet import task as task_lib
    from research.higherhrnet.model import count_params

    if variant not in VARIANTS:
        raise ValueError(f"benchmark variant {variant!r}: one of {sorted(VARIANTS)}")
    if image_size % 32:
        raise ValueError(f"benchmark image_size {image_size} must be a multiple of 32")
    cfg = config.copy_and_resolve_references()
    cfg.model.variant = VARIANTS[variant][0]
    cfg.data.input_size = image_size
    cfg.data.output_sizes = (image_size // 4, image_size // 2)
    task = task_lib.Task(cfg, mode="benchmark")
    steps = tasks.Steps(steps_per_epoch=1000, total_steps=300_000, num_epochs=300)
    shapes = jax.eval_shape(lambda r: task.model.init(r, jnp.zeros((1, 64, 64, 3)), train=False),
                            jax.random.PRNGKey(0))
    variables = host_init(shapes)
    nj = int(cfg.data.num_joints)

    def make_inputs(batch_size: int) -> dict:
        return {"images": np.random.RandomState(1).rand(batch_size, image_size, image_size, 3).astype(np.float32)}

    def infer_fn(v, images):
        return task.apply_images(v, images)

    def export_fn(v, images):
        return task.apply_images(v, images, export=True)

    def make_batch(batch_size: int) -> dict:
        return bench_inputs.train_batch(batch_size, image_size, nj, max_people=int(cfg.data.max_num_people))

    def extra_stages(repeats: int, warmup: int) -> list[dict]:
        settings = task.postprocess_settings()
        heat, tags = bench_inputs.planted_maps(image_size, nj)
        heat_b, tags_b = jnp.asarray(heat[None]), jnp.asarray(tags[None])
        center, scale = (image_size / 2.0, image_size / 2.0), (image_size / 200.0, image_size / 200.0)
        people = inference.people_from_maps(heat_b, tags_b, center, scale, settings)[0]
        times, cpu = time_calls(lambda i: inference.people_from_maps(heat_b, tags_b, center, scale, settings),
                                repeats, warmup)
        grouping = record("grouping", 1, image_size, times, cpu, people=int(len(people["scores"])),
                          note="people_from_maps on bench_inputs.planted_maps (12 planted people, flip-test tags): "
                               "NMS + top-k (jitted), matching, adjust, refine, back-projection")
        forward = task.forward_fn(variables)
        image = (np.random.RandomState(2).rand(image_size, image_size, 3) * 255).astype(np.uint8)
        run = lambda i: list(evaluation.predict_people(forward, [image], settings, 1))  # noqa: E731
        times, cpu = time_calls(run, repeats, warmup)
        single = record("single_scale", 1, image_size, times, cpu, flip_test=bool(settings.flip_test),
                        note="one image as valid.py: resize, forward of image and mirror, aggregation, grouping "
                             "(random weights: the grouping part here is on noise maps)")
        grouping["share_of_single_scale"] = grouping["median_ms"] / single["median_ms"]
        grouping["share_goal"] = 0.1
        return [grouping, single]

    info = {"params": count_params(variables["params"]), "num_joints": nj, "official_variant": variant,
            "train_people_per_image": 4}
    return BenchSpec(
        name="higherhrnet", variant=variant, image_size=image_size, variables=variables, make_inputs=make_inputs,
        infer_fn=infer_fn, export_fn=export_fn, make_batch=make_batch, loss_fn=task.loss_fn,
        tx=task.make_optimizer(variables["params"], steps), ema_decay=None, use_ema=False, accumulates=False,
        onnx_output_names=["output_0", "output_1"], torch_reference_module="research.higherhrnet.official_torch",
        torch_serves=("train_step", "infer"),
        reference=REFERENCE if variant == "w32_512" else None, info=info, extra_stages=extra_stages,
        measured_pairs=(("grouping", "torch_grouping"), ("onnx_infer", "torch_onnx_infer_dynamic")))


def conv_impl_ab(config, *, variant: str = "tiny", image_size: int = 128, train_batch: int = 16, repeats: int = 5,
                 impls: tuple[str, ...] = ("lax", "auto", "lax", "auto")) -> dict:
    """Same-run A/B of the train step with plain flax layers ("lax") and the CPU speed layer ("auto"), alternated
    so a drift of a shared machine touches both: {impl: [median ms per run], 'auto_over_lax': ratio of the means}.

        python -m research.higherhrnet.benchmark --ab [--variant tiny --image_size 128 --train_batch 16]
    """
    from research import benchmark as harness
    out: dict = {}
    for impl in impls:
        cfg = config.copy_and_resolve_references()
        cfg.model.conv_impl = impl
        spec = benchmark_spec(cfg, variant=variant, image_size=image_size)
        res = harness.benchmark(spec, infer_batch=1, train_batch=train_batch, repeats=repeats, stages=("train",))
        step = [r for r in res["records"] if r["what"] == "train_step"][0]
        out.setdefault(impl, []).append(step["median_ms"])
    if "lax" in out and "auto" in out:
        out["auto_over_lax"] = float(np.mean(out["auto"]) / np.mean(out["lax"]))
    return out


if __name__ == "__main__":
    import argparse
    import json

    from configs.higherhrnet import get_config
    p = argparse.ArgumentParser(description="HigherHRNet train-step A/B: plain flax vs the CPU speed layer")
    p.add_argument("--ab", action="store_true", required=True)
    p.add_argument("--variant", default="tiny")
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--train_batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    print(json.dumps(conv_impl_ab(get_config(), variant=a.variant, image_size=a.image_size,
                                  train_batch=a.train_batch, repeats=a.repeats), indent=2))
