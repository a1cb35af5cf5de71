"""YOLOv5's part of the benchmark harness (`research/benchmark.py`): its `BenchSpec`, built from
the real task (loss, optimiser, EMA as training uses them), and the reference figures of the
official PyTorch YOLOv5s measured on the 2-core CPU machine.
"""

from __future__ import annotations

import numpy as np

from research.benchmark import BenchSpec, host_init

# The official ultralytics PyTorch YOLOv5s on the same 2-core CPU (from the issue that set the
# speed targets); `--config.benchmark.torch_repo` measures it in the same run instead.
REFERENCE = {
    "setting": {"variant": "s", "image_size": 640, "infer_batch": 1, "train_batch": 2},
    "infer_ms": (130.0, 140.0),  # 640x640, batch 1, forward only
    "train_step_ms": (800.0, 900.0),  # 640x640, batch 2, forward + backward + step
    "gflops": 16.5,  # ultralytics README / model summary (2 x MACs), batch 1
    "source": "issue figures for the official ultralytics PyTorch YOLOv5s on the same 2-core CPU "
              "(benchmark.torch_repo measures it in this run instead); GFLOPs from the ultralytics README",
}


def benchmark_spec(config, *, variant: str, image_size: int, nc: int = 80) -> BenchSpec:
    """YOLOv5 at `variant` / `image_size` (random weights, `nc` classes) through the real task's
    loss_fn / make_optimizer / ema_decay, without its data. Inputs: `images` [B, S, S, 3] 0-1."""
    import jax
    import jax.numpy as jnp

    from research import tasks
    from research.yolov5 import task as task_lib
    from research.yolov5.model import count_params

    cfg = config.copy_and_resolve_references()
    cfg.model.variant = variant
    cfg.model.num_classes = nc  # fixed here, so the task reads no dataset
    cfg.data.image_size = image_size
    task = task_lib.Task(cfg, mode="benchmark")
    steps = tasks.Steps(steps_per_epoch=1000, total_steps=300_000, num_epochs=300)

    model = task.model
    init_size = 64  # parameters do not depend on the input size
    shapes = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, init_size, init_size, 3)), train=False),
                            jax.random.PRNGKey(0))
    variables = host_init(shapes)
    max_labels = int(config.data.max_labels)

    def make_inputs(batch_size: int) -> dict:
        return {"images": np.random.RandomState(1).rand(batch_size, image_size, image_size, 3).astype(np.float32)}

    def infer_fn(v, images):
        return model.apply(v, images, train=False)["pred"]

    onnx_model = model.for_export()  # as `--mode=export` writes it

    def export_fn(v, images):
        return onnx_model.apply(v, images, train=False)["pred"]

    def make_batch(batch_size: int) -> dict:
        rs = np.random.RandomState(0)
        n_boxes = min(4, max_labels)
        boxes = np.zeros((batch_size, max_labels, 4), np.float32)
        boxes[:, :n_boxes, :2] = rs.uniform(0.2, 0.8, (batch_size, n_boxes, 2))
        boxes[:, :n_boxes, 2:] = rs.uniform(0.05, 0.3, (batch_size, n_boxes, 2))
        valid = np.zeros((batch_size, max_labels), bool)
        valid[:, :n_boxes] = True
        classes = np.where(valid, rs.randint(0, nc, (batch_size, max_labels)), 0).astype(np.int32)
        image = rs.randint(0, 256, (batch_size, image_size, image_size, 3)).astype(np.uint8)
        return {"image": image, "boxes": boxes, "classes": classes, "valid": valid}

    return BenchSpec(
        name="yolov5", variant=variant, image_size=image_size, variables=variables, make_inputs=make_inputs,
        infer_fn=infer_fn, export_fn=export_fn, torch_reference_module="research.yolov5.official_torch",
        torch_serves=("train_step",),
        make_batch=make_batch, loss_fn=task.loss_fn, tx=task.make_optimizer(variables["params"], steps),
        ema_decay=task.ema_decay if task.use_ema else None, use_ema=task.use_ema, accumulates=task.accumulates,
        onnx_output_names=["pred"], reference=REFERENCE,
        info={"nc": nc, "params": count_params(variables["params"]), "max_labels": max_labels,
              "boxes_per_image": min(4, max_labels), "dtype": config.model.dtype})
