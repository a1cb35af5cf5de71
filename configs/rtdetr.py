r"""RT-DETR (real-time DETR: PResNet-vd backbone, hybrid encoder, deformable decoder with query selection).

Default (CPU, embedded `shapes` data, a small RT-DETR at 128 px; --mode=all took 618 s on 2 busy cores):

  python launch.py --config=configs/rtdetr.py --workdir=workdirs/rtdetr_main --mode=all

trains, evaluates (mAP@0.5 0.167, mAP@0.5:0.95 0.099 on the `shapes` validation split after 375 steps; the
exported ONNX model scores the same), draws predictions and exports `model.{pt,safetensors,onnx}`;
docs/rtdetr.md has the measured numbers. Official
recipe on COCO from a local folder, on GPUs (configs/rtdetr/rtdetr_<variant>_6x_coco.yml: 72 epochs, 640 px,
multi-scale 480..800, AdamW 1e-4 with the variant's parameter groups, EMA 0.9999):

  python launch.py --config=configs/rtdetr.py:variant=r50vd,data=coco \
      --config.data.manual_dir=/data/coco --workdir=/runs/rtdetr_r50vd --mode=train

Evaluate, predict or export official weights without training (an official checkpoint or release file:
the weights under `ema.module`, else `model`, read with weights_only=True; or a plain state_dict):

  python launch.py --config=configs/rtdetr.py:variant=r18vd,data=coco --config.data.manual_dir=/data/coco \
      --config.model.init_from=rtdetr_r18vd.pt --workdir=/runs/r18_eval --mode=eval

Arguments after the colon: variant (r18vd|r34vd|r50vd|r50vd_m|r101vd; default: the small CPU model),
data (shapes|coco), smoke (the `tiny` model and a few steps, for tests). Every field can be overridden with
--config.<field>=value; a field that does not exist is an error.
"""

from __future__ import annotations

import ml_collections

from configs.common import add_shared_fields, parse_arg

VARIANTS = ("r18vd", "r34vd", "r50vd", "r50vd_m", "r101vd")

# AdamW parameter groups of each official config: (regex searched in the official parameter name, lr or -1 for
# the base lr, weight decay or -1 for the base weight decay); the first matching group wins, the rest is the
# default group. r18vd / r34vd override include/optimizer.yml in their own yml; r101vd keeps one group.
_INCLUDE_GROUPS = (("backbone", 1e-5, -1.0),
                   (r"^(?=.*encoder(?=.*bias|.*norm.*weight)).*$", -1.0, 0.0),
                   (r"^(?=.*decoder(?=.*bias|.*norm.*weight)).*$", -1.0, 0.0))
OPTIM_GROUPS = {
    "r18vd": ((r"^(?=.*backbone)(?=.*norm).*$", 1e-5, 0.0),
              (r"^(?=.*backbone)(?!.*norm).*$", 1e-5, -1.0),
              (r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bias)).*$", -1.0, 0.0)),
    "r34vd": ((r"^(?=.*backbone)(?=.*norm|bn).*$", 1e-5, 0.0),
              (r"^(?=.*backbone)(?!.*norm|bn).*$", 1e-5, -1.0),
              (r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn|bias)).*$", -1.0, 0.0)),
    "r50vd": _INCLUDE_GROUPS,
    "r50vd_m": _INCLUDE_GROUPS,
    "r101vd": (("backbone", 1e-6, -1.0),),
}
# configs/rtdetr/include/rtdetr_r50vd.yml (RTDETR.multi_scale)
MULTI_SCALE = (480, 512, 544, 576, 608, 640, 640, 640, 672, 704, 736, 768, 800)

# The CPU model for the embedded data (not official): the r18vd structure (the `tiny` variant) at small widths.
CPU_MODEL = dict(
    backbone=dict(base_width=16),
    encoder=dict(in_channels=(32, 64, 128), hidden_dim=64, nhead=4, dim_feedforward=128, expansion=0.5,
                 depth_mult=1 / 3),
    decoder=dict(feat_channels=(64, 64, 64), hidden_dim=64, nhead=4, dim_feedforward=128, num_queries=100,
                 num_decoder_layers=3, num_denoising=50))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant="", data="shapes", smoke=False)
    if arg.variant and arg.variant not in VARIANTS:
        raise ValueError(f"unknown RT-DETR variant {arg.variant!r}; choose one of {VARIANTS}")
    if arg.data not in ("shapes", "coco"):
        raise ValueError(f"unknown data {arg.data!r}; choose shapes or coco")
    official = bool(arg.variant)
    coco = arg.data == "coco"
    c = ml_collections.ConfigDict()
    c.network = "rtdetr"
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.variant = arg.variant or "tiny"
    # per-part overrides of the variant's constructor arguments (research/rtdetr/model.py VARIANTS)
    cpu = {} if official else CPU_MODEL
    c.model.backbone = ml_collections.ConfigDict(dict(cpu.get("backbone", {})))
    c.model.encoder = ml_collections.ConfigDict(dict(cpu.get("encoder", {})))
    c.model.decoder = ml_collections.ConfigDict(dict(cpu.get("decoder", {})))
    c.model.dtype = "float32"  # "bfloat16" for mixed precision on GPUs
    # How convolutions and BatchNorm compute (same parameters and outputs; research/cpu/layers.py): "auto" = the
    # CPU speed layer on CPU (oneDNN or matrix-product convolutions, memory-lean BatchNorm), flax's elsewhere;
    # "lax" = flax's everywhere. ONNX export always traces flax's layers.
    c.model.conv_impl = "auto"
    c.model.init_from = ""  # official checkpoint (.pth: ema.module, else model; weights_only) or .safetensors
    c.model.num_classes = 0  # 0 = the data's class count (export/predict from init_from: the weights')

    c.data = ml_collections.ConfigDict()
    c.data.name = arg.data
    c.data.data_dir = "data/tfds"
    c.data.manual_dir = ""  # COCO: folder with images + annotations/instances_*.json
    c.data.image_size = 640 if coco else 128  # the network input S (official Resize([640, 640]))
    c.data.max_labels = 100 if coco else 16
    c.data.num_workers = 8 if coco else 0
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.num_train_examples = 0 if coco else 2000  # shapes: images generated (picks the builder config)
    c.data.num_eval_examples = 0 if coco else 200
    c.data.cache_images = False  # (the shared DetectionData field; unused by RT-DETR's loader)

    # official train transforms (research/rtdetr/transforms.py): probabilities and the zoom-out range
    c.aug = ml_collections.ConfigDict(dict(photometric_p=0.5, zoom_out_p=0.5, zoom_out_side_range=(1.0, 4.0),
                                           iou_crop_p=0.8, flip_p=0.5, min_size=1.0))
    # official train-time random resize of the batch (rtdetr.py multi_scale); () = off
    c.multi_scale = MULTI_SCALE if official else ()

    c.criterion = ml_collections.ConfigDict()  # include/rtdetr_r50vd.yml
    c.criterion.weight_dict = ml_collections.ConfigDict(dict(loss_vfl=1.0, loss_bbox=5.0, loss_giou=2.0))
    c.criterion.alpha = 0.75
    c.criterion.gamma = 2.0
    c.criterion.matcher = ml_collections.ConfigDict(dict(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, alpha=0.25,
                                                         gamma=2.0))

    c.optim = ml_collections.ConfigDict()  # include/optimizer.yml + the variant's yml
    c.optim.lr = 1e-4
    c.optim.betas = (0.9, 0.999)
    c.optim.eps = 1e-8
    c.optim.weight_decay = 1e-4
    c.optim.groups = OPTIM_GROUPS.get(arg.variant, OPTIM_GROUPS["r18vd"])
    c.optim.clip_max_norm = 0.1
    c.optim.milestones_epochs = (1000,)  # MultiStepLR, stepped per epoch (1000 > 72: no decay officially)
    c.optim.gamma = 0.1
    c.optim.warmup_steps = 0  # v1 has no warmup (rtdetrv2 adds LinearWarmup 2000)

    c.ema = ml_collections.ConfigDict(dict(use=True, decay=0.9999, warmups=2000))

    c.batch_size = 16  # global (official: 4 per GPU on 4 GPUs)
    c.num_epochs = 72
    c.total_steps = 0  # > 0 overrides num_epochs

    # benchmark (research/rtdetr/benchmark.py): the official R18vd structure at 640, random weights;
    # inference batch 1 (JAX, ONNX Runtime), train step batch 2 and the matcher's share of it;
    # torch_repo a clone of lyuwenyu/RT-DETR, timed in the same run (research/rtdetr/official_torch.py;
    # its model files import torchvision, so torch_python must be an interpreter with torch,
    # torchvision, scipy and pyyaml)
    add_shared_fields(c, log_every_steps=20, eval_every_steps=5000, checkpoint_every_steps=1000,
                      benchmark_variant="r18vd")

    c.evals = ml_collections.ConfigDict()
    c.evals.coco = ml_collections.ConfigDict(dict(type="coco_detection", every_steps=0, split=""))

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 8 if coco else 32  # official val batch 8
    c.eval.num_top_queries = 300  # RTDETRPostProcessor.num_top_queries
    c.eval.use_ema = True
    # "auto": the COCO folder's annotation json for coco, the loader's labels for shapes; "labels"; or a path
    c.eval.annotations = "auto"
    c.eval.onnx = False  # --mode=eval evaluates the exported graph (workdir/export/deploy.onnx) in ONNX Runtime

    c.predict = ml_collections.ConfigDict()
    c.predict.score_thres = 0.5
    c.predict.num_images = 8
    c.predict.input_dir = ""


    if not official:
        # CPU recipe for the embedded data (not official): no pretrained backbone, so one learning rate for
        # every group, higher, with a short warmup; a few epochs; a milder zoom-out.
        c.optim.lr = 1e-3
        c.optim.groups = ((r"^(?=.*backbone)(?=.*norm).*$", -1.0, 0.0),
                          (r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bias)).*$", -1.0, 0.0))
        c.optim.warmup_steps = 50
        # the shapes' objects are 8-60 % of a 128 px image: the official 1-4x zoom-out shrinks them to a few
        # pixels; 1-2x learns faster here (mAP50 0.133 vs 0.102 after 375 steps, flax layers; docs/rtdetr.md)
        c.aug.zoom_out_side_range = (1.0, 2.0)
        c.num_epochs = 3
        c.eval_every_steps = 125
        c.checkpoint_every_steps = 125
        c.log_every_steps = 25
        c.predict.score_thres = 0.3

    if arg.smoke:
        c.model.variant = "tiny"
        for part in ("backbone", "encoder", "decoder"):
            c.model[part] = ml_collections.ConfigDict()
        c.data.image_size = 64
        c.data.num_train_examples = 128  # the shapes builder's `tiny` config
        c.data.num_eval_examples = 32
        c.batch_size = 8
        c.total_steps = 6
        c.log_every_steps = 2
        c.eval_every_steps = 6
        c.checkpoint_every_steps = 3
        c.eval.batch_size = 16
        c.eval.num_top_queries = 100  # 20 queries x 6 classes
        c.predict.num_images = 2
        c.predict.score_thres = 0.0
        c.optim.warmup_steps = 0
        c.async_checkpoints = False
    return c
