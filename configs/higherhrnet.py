r"""HigherHRNet (bottom-up multi-person pose estimation, associative embedding).

Default (CPU, embedded synthetic stick-figure people, 128 px, the SMALL widths; a few minutes on 2 cores):

  python launch.py --config=configs/higherhrnet.py --workdir=workdirs/higherhrnet_main --mode=all

trains, evaluates OKS keypoint AP on the synthetic validation split, draws predictions and exports ONNX + the
official state_dict (docs/higherhrnet.md has the measured numbers). COCO keypoints from a local folder
(annotations/person_keypoints_*.json + images/<set>/), official recipe (experiments/coco/higher_hrnet/*.yaml: Adam
1e-3, 300 epochs, lr x0.1 at 200 and 260, COCO val AP 67.1 for w32_512):

  python launch.py --config=configs/higherhrnet.py:variant=w32_512,data=coco \
      --config.data.manual_dir=/data/coco --workdir=/runs/hhrnet_w32_512 --mode=train

Arguments after the colon: variant (w32_512 | w32_640 | w48_640 | small | tiny), data (synthetic | coco | crowdpose),
smoke (tiny model and a few steps, for tests). Every field can be overridden with --config.<field>=value; a field
that does not exist is an error.
"""

from __future__ import annotations

import ml_collections

from configs.common import add_shared_fields, parse_arg

# (model variant, INPUT_SIZE, IMAGES_PER_GPU) of the official experiment yamls
OFFICIAL = {"w32_512": ("w32", 512, 12), "w32_640": ("w32", 640, 12), "w48_640": ("w48", 640, 10)}
# not official, 128 px: small (the CPU default on the synthetic people) and tiny (tests, smoke)
CPU_VARIANTS = ("small", "tiny")

COCO_FLIP_INDEX = (0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15)
COCO_JOINT_ORDER = (0, 1, 2, 3, 4, 5, 6, 11, 12, 7, 8, 9, 10, 13, 14, 15, 16)
COCO_SKELETON = ((15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8), (7, 9),
                 (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6))
CROWDPOSE_FLIP_INDEX = (1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 12, 13)
CROWDPOSE_SKELETON = ((12, 13), (13, 0), (13, 1), (0, 2), (2, 4), (1, 3), (3, 5), (13, 7), (13, 6), (7, 9), (9, 11),
                      (6, 8), (8, 10))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant="", data="synthetic", smoke=False)
    if arg.data not in ("synthetic", "coco", "crowdpose"):
        raise ValueError(f"data={arg.data!r}: synthetic, coco or crowdpose")
    real = arg.data != "synthetic"
    variant = arg.variant or ("w32_512" if real else "small")
    if variant not in OFFICIAL and variant not in CPU_VARIANTS:
        raise ValueError(f"variant={variant!r}: one of {sorted(OFFICIAL)}, small or tiny")
    net, input_size, per_gpu = OFFICIAL.get(variant, (variant, 128, 16))

    c = ml_collections.ConfigDict()
    c.network = "higherhrnet"
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.variant = net  # w32 | w48 | small | tiny (research/higherhrnet/model.py VARIANTS)
    c.model.init_from = ""  # an official PyTorch state_dict (.pth weights_only / .safetensors)
    # research.cpu.layers.select: "auto" = the CPU speed layer's convolutions / BatchNorm on the CPU backend, plain
    # flax elsewhere; "lax" = plain flax; "dot" / "onednn" force a CPU convolution (same parameters in every case)
    c.model.conv_impl = "auto"

    c.data = ml_collections.ConfigDict()
    c.data.name = arg.data
    c.data.data_dir = "data/tfds"
    c.data.manual_dir = ""  # coco / crowdpose: folder with annotations/ and images/
    c.data.train_set = "train2017" if arg.data != "crowdpose" else "trainval"
    c.data.validation_set = "val2017" if arg.data != "crowdpose" else "test"
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.image_size = 128  # synthetic images (square)
    c.data.num_train_examples = 1024  # synthetic: images generated
    c.data.num_eval_examples = 128
    c.data.num_workers = 2 if not real else 8  # loader threads
    c.data.input_size = input_size  # DATASET.INPUT_SIZE
    c.data.output_sizes = (input_size // 4, input_size // 2)  # DATASET.OUTPUT_SIZE
    c.data.sigma = 2.0  # DATASET.SIGMA
    c.data.max_num_people = 30  # DATASET.MAX_NUM_PEOPLE
    c.data.max_rotation = 30.0
    c.data.min_scale = 0.75
    c.data.max_scale = 1.5
    c.data.scale_type = "short"
    c.data.max_translate = 40.0
    c.data.flip_prob = 0.5  # DATASET.FLIP
    crowd = arg.data == "crowdpose"
    c.data.num_joints = 14 if crowd else 17
    c.data.flip_index = CROWDPOSE_FLIP_INDEX if crowd else COCO_FLIP_INDEX
    c.data.joint_order = tuple(range(14)) if crowd else COCO_JOINT_ORDER
    c.data.skeleton = CROWDPOSE_SKELETON if crowd else COCO_SKELETON

    c.loss = ml_collections.ConfigDict()
    c.loss.heatmaps_loss_factor = (1.0, 1.0)
    c.loss.push_loss_factor = (0.001, 0.001)
    c.loss.pull_loss_factor = (0.001, 0.001)
    c.loss.ae_loss_type = "exp"

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3  # TRAIN.LR (Adam, no weight decay: get_optimizer)
    c.optim.lr_steps = (200, 260)  # TRAIN.LR_STEP (epochs)
    c.optim.lr_factor = 0.1  # TRAIN.LR_FACTOR

    c.batch_size = per_gpu * 8  # global: IMAGES_PER_GPU x 8 GPUs
    c.num_epochs = 300  # TRAIN.END_EPOCH
    c.total_steps = 0  # > 0 overrides num_epochs

    # benchmark (research/higherhrnet/benchmark.py): W32 at 512 px like w32_512_adam_lr1e-3.yaml (variant
    # w32_512 | w32_640 | w48_640 | tiny); torch_repo a clone of HRNet/HigherHRNet-Human-Pose-Estimation: its
    # model, loss and grouping are then timed in the same run (its grouping needs the `munkres` package in
    # the torch_python interpreter)
    add_shared_fields(c, log_every_steps=50, eval_every_steps=5000, checkpoint_every_steps=1000,
                      benchmark_variant="w32_512", benchmark_image_size=512)
    c.benchmark.repeats = 5

    # evaluators by type (research/evaluation/base.py); every_steps 0 = eval_every_steps
    c.evals = ml_collections.ConfigDict()
    c.evals.oks = ml_collections.ConfigDict(dict(type="coco_keypoints", every_steps=0))
    c.eval = ml_collections.ConfigDict()
    c.eval.use_ema = False  # no EMA in the official trainer
    c.eval.onnx = False
    c.eval.batch_size = 1  # images per forward (valid.py: 1)
    c.eval.max_images = 0  # 0 = the whole split
    c.eval.flip_test = True  # TEST.FLIP_TEST
    c.eval.scale_factors = (1.0,)  # TEST.SCALE_FACTOR
    c.eval.detection_threshold = 0.1  # TEST.DETECTION_THRESHOLD
    c.eval.tag_threshold = 1.0  # TEST.TAG_THRESHOLD

    c.predict = ml_collections.ConfigDict()
    c.predict.num_images = 8
    c.predict.score_threshold = 0.2
    c.predict.joint_threshold = 0.1
    c.predict.upscale = 1.0 if real else 3.0


    if not real:
        # CPU recipe on the synthetic people (not official): SMALL widths at 128 px, Adam 2e-3 with the
        # milestones at epochs 14 and 18 of a 20-epoch run (1280 steps, ~5 min of training on 2 cores: OKS AP
        # 0.58; 40 epochs with milestones 28 / 36 reach 0.67 in twice the time; the TINY widths plateau at 0.40),
        # and push / pull factors 0.05 (50x the official 0.001: in a few hundred steps the official factors
        # leave the tags unseparated, people merge in the grouping and AP stays at 0.10-0.105 from step 320 to
        # 960; factors 0.01 / 0.05 reach AP 0.22 / 0.26 at step 512, TINY widths).
        c.batch_size = 16
        c.num_epochs = 20
        c.optim.lr = 2e-3
        c.optim.lr_steps = (14, 18)
        c.loss.push_loss_factor = (0.05, 0.05)
        c.loss.pull_loss_factor = (0.05, 0.05)
        c.log_every_steps = 16
        c.eval_every_steps = 640
        c.checkpoint_every_steps = 640
        c.async_checkpoints = False
        c.eval.batch_size = 16

    if arg.smoke:
        c.model.variant = "tiny"
        c.data.image_size = 64
        c.data.input_size = 64
        c.data.output_sizes = (16, 32)
        c.data.num_train_examples = 32
        c.data.num_eval_examples = 8
        c.data.num_workers = 1
        c.batch_size = 4
        c.num_epochs = 0
        c.total_steps = 6
        c.log_every_steps = 2
        c.eval_every_steps = 6
        c.checkpoint_every_steps = 3
        c.eval.batch_size = 4
        c.predict.num_images = 2
        c.async_checkpoints = False
    return c
