r"""YOLOv5 (v6.0/v7.0 anchor-based detector).

Default (CPU, embedded `shapes` data, ~10 minutes of training on 2 cores):

  python launch.py --config=configs/yolov5.py --workdir=workdirs/yolov5_main --mode=all

reaches mAP@0.5 of about 0.3-0.4 on the `shapes` validation split (docs/yolov5.md has the
measured numbers). COCO from a local folder on GPUs, official recipe (300 epochs, 640 px):

  python launch.py --config=configs/yolov5.py:variant=s,data=coco \
      --config.data.manual_dir=/data/coco --workdir=/runs/yolov5s_coco --mode=train

Arguments after the colon: variant (n|s|m|l|x), data (shapes|coco), smoke (tiny model and a
few steps, for tests). Every field can be overridden with --config.<field>=value; a field name
that does not exist is an error.
"""

from __future__ import annotations

import ml_collections

from configs.common import add_shared_fields, parse_arg

from research.yolov5.hyp import HYP_SCRATCH_LOW  # data/hyps/hyp.scratch-low.yaml (v7.0)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant="", data="shapes", smoke=False)
    c = ml_collections.ConfigDict()
    c.network = "yolov5"
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.yaml = ""  # a custom layer-list yaml; "" = research/yolov5/models/yolov5.yaml
    # n/s/m/l/x set the official depth/width multiples ("tiny": width 1/8, for tests).
    c.model.variant = arg.variant or ("s" if arg.data == "coco" else "n")
    c.model.depth_multiple = 0.0  # > 0 overrides the variant's
    c.model.width_multiple = 0.0
    c.model.dtype = "float32"  # "bfloat16" for mixed precision on GPUs
    # How convolutions compute (same parameters and outputs): "auto" = "dot" on CPU (matrix
    # products, faster there), "lax" on GPU/TPU. See research/cpu/conv.py.
    c.model.conv_impl = "auto"
    c.model.init_from = ""  # an official PyTorch state_dict (.pt weights_only / .safetensors)
    # 0 = the data's class count (export/predict from init_from: the weights' count)
    c.model.num_classes = 0

    c.data = ml_collections.ConfigDict()
    c.data.name = arg.data
    c.data.data_dir = "data/tfds"  # where tfds builders write their array_record files
    c.data.manual_dir = ""  # COCO: folder with images + annotations/instances_*.json
    c.data.image_size = 640 if arg.data == "coco" else 128
    c.data.max_labels = 100 if arg.data == "coco" else 16
    c.data.num_workers = 0 if arg.data == "shapes" else 8
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.num_train_examples = 2000 if arg.data == "shapes" else 0  # shapes: images generated
    c.data.num_eval_examples = 200 if arg.data == "shapes" else 0
    # train.py's --cache: training images decoded and resized once into a memory-mapped file
    # under data_dir (up to 3 * image_size^2 bytes per image), shared by the loader's workers
    c.data.cache_images = False

    c.hyp = ml_collections.ConfigDict(HYP_SCRATCH_LOW)
    c.scale_hyp = True  # train.py's box/cls/obj scaling by nl, nc and image size
    c.cos_lr = False
    c.nbs = 64  # nominal batch size: gradients accumulate up to it
    c.max_grad_norm = 10.0
    c.ema = True
    c.autoanchor = True  # train.py's check_anchors before a new run (its --noautoanchor = False)
    # train.py's --multi-scale: every iteration resizes the batch to a random multiple of 32 in
    # [0.5, 1.5] x image_size (each size compiles the train step once)
    c.multi_scale = False

    c.batch_size = 64 if arg.data == "coco" else 16  # global, over all devices and hosts
    c.num_epochs = 300
    c.total_steps = 0  # > 0 overrides num_epochs

    # eval_every_steps: and at the end; 0 = no evaluation while training. benchmark: yolov5s at 640;
    # torch_repo a clone of ultralytics/yolov5, torch_python an interpreter with its requirements
    # (at head it imports pandas, ultralytics, torchvision)
    add_shared_fields(c, log_every_steps=20, eval_every_steps=500, checkpoint_every_steps=200,
                      benchmark_variant="s")

    # evaluators by type (research/evaluation/base.py); every_steps 0 = eval_every_steps, split "" = data.eval_split
    c.evals = ml_collections.ConfigDict()
    c.evals.coco = ml_collections.ConfigDict(dict(type="coco_detection", every_steps=0, split=""))

    c.eval = ml_collections.ConfigDict()
    c.eval.conf_thres = 0.001
    c.eval.iou_thres = 0.6
    c.eval.max_det = 300
    c.eval.batch_size = 32
    c.eval.use_ema = True
    # ground truth: "auto" = the COCO folder's annotation json (as val.py), the loader's labels
    # for `shapes`; "labels" = always the loader's labels; or a path to a COCO json
    c.eval.annotations = "auto"
    # val.py's rectangular batches (aspect-ratio order, each batch letterboxed to its own shape,
    # square 640 images at 672): on for COCO as val.py; `shapes` images are square and stay at
    # image_size. The ONNX evaluation is always square (the export has a fixed input size).
    c.eval.rect = arg.data == "coco"
    c.eval.onnx = False  # --mode=eval evaluates workdir/export/model.onnx through ONNX Runtime

    c.predict = ml_collections.ConfigDict()
    c.predict.conf_thres = 0.25
    c.predict.iou_thres = 0.45
    c.predict.num_images = 8
    c.predict.input_dir = ""  # images to draw on; "" = the first eval images


    if arg.data == "shapes":
        # CPU recipe for the embedded data (not official): a short schedule learns faster with an
        # optimiser update every batch, lr0 0.02, one warmup epoch and the unscaled loss gains
        # (train.py's scaling by nc/80 and (imgsz/640)^2 shrinks cls 13x and obj 25x here).
        c.nbs = 16
        c.hyp.lr0 = 0.02
        c.hyp.warmup_epochs = 1.0
        c.scale_hyp = False
        c.num_epochs = 11
        c.eval_every_steps = 275

    if arg.smoke:
        c.model.variant = "tiny"
        c.data.image_size = 64
        c.data.num_train_examples = 128  # the builder's `tiny` config
        c.data.num_eval_examples = 32
        c.batch_size = 8
        c.nbs = 8
        c.total_steps = 8
        c.hyp.warmup_epochs = 0.0
        c.log_every_steps = 2
        c.eval_every_steps = 8
        c.checkpoint_every_steps = 4
        c.eval.batch_size = 8
        c.predict.num_images = 2
        c.async_checkpoints = False
    return c
