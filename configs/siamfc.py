r"""SiamFC (fully-convolutional Siamese tracker, AlexNetV1 backbone), after huanglianghua/siamfc-pytorch.

Default (CPU, embedded synthetic videos, a few minutes on 2 cores):

  python launch.py --config=configs/siamfc.py --workdir=workdirs/siamfc_main --mode=all

trains the tiny-width network (`TinySiamFC` widths, official crop sizes 127 / 255 px and official
tracker) for 480 steps on pairs of the synthetic videos (4.5-7.5 min on 2 cores), then tracks the
8 validation videos: success AUC 0.82, precision@20px 1.0 (0.22 / 0.35 before training;
docs/siamfc.md has the measured table).

Official recipe (`TrackerSiamFC.parse_args` defaults: AlexNetV1, batch 8, 50 epochs, SGD lr
1e-2 -> 1e-5, weight decay 5e-4, momentum 0.9) on a local GOT-10k folder, on a GPU:

  python launch.py --config=configs/siamfc.py:variant=alexnet_v1,data=got10k \
      --config.data.manual_dir=/data/GOT-10k --workdir=/runs/siamfc_got10k --mode=train

Arguments after the colon: variant (alexnet_v1 | tiny; default tiny on `synthetic`, alexnet_v1 on
`got10k`), data (synthetic | got10k), smoke (tiny model and a few steps, for tests). Every field
can be overridden with --config.<field>=value; a field that does not exist is an error.
"""

from __future__ import annotations

import ml_collections

from configs.common import add_shared_fields, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant="", data="synthetic", smoke=False)
    if arg.data not in ("synthetic", "got10k"):
        raise ValueError(f"data={arg.data!r}: use synthetic or got10k")
    synthetic = arg.data == "synthetic"
    c = ml_collections.ConfigDict()
    c.network = "siamfc"
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    # alexnet_v1: official widths (96, 256, 384, 384, 256), 2.34 M parameters; tiny: (8, 16, 16, 16, 16)
    c.model.variant = arg.variant or ("tiny" if synthetic else "alexnet_v1")
    c.model.widths = ()  # a 5-tuple overrides the variant's widths
    c.model.dtype = "float32"
    # auto: on CPU the shared speed layer's oneDNN convolutions (research/cpu/layers.py) where they
    # load, else grouped convs per group ("split"); plain ("lax") elsewhere. Same variables whichever.
    c.model.conv_impl = "auto"
    c.model.init_from = ""  # an official state_dict (siamfc_alexnet_e50.pth as weights_only / .safetensors)
    c.model.out_scale = 0.001
    c.model.exemplar_sz = 127
    c.model.instance_sz = 255  # training searches are instance_sz - 16 = 239 px (15 x 15 responses)

    c.data = ml_collections.ConfigDict()
    c.data.name = arg.data
    c.data.data_dir = "data/tfds"
    c.data.manual_dir = ""  # GOT-10k: the folder with train/ and val/
    c.data.builder_config = "default" if synthetic else ""
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.context = 0.5
    c.data.pairs_per_seq = 1  # official Pair default: one pair per sequence per epoch
    c.data.num_threads = 2  # grain threads preparing batches
    c.data.num_workers = 0 if synthetic else 8  # grain worker processes (official: 32)

    c.loss = ml_collections.ConfigDict(dict(r_pos=16.0, r_neg=0.0, neg_weight=1.0))
    c.optim = ml_collections.ConfigDict(dict(initial_lr=1e-2, ultimate_lr=1e-5, weight_decay=5e-4, momentum=0.9))

    c.tracker = ml_collections.ConfigDict(dict(scale_num=3, scale_step=1.0375, scale_lr=0.59, scale_penalty=0.9745,
                                               window_influence=0.176, response_up=16))

    c.batch_size = 8  # global
    c.num_epochs = 50
    c.total_steps = 0

    # eval_every_steps 0: no evaluation while training (--mode=eval runs the tracker over the eval videos).
    # export: model, template and search.onnx. benchmark (research/siamfc/benchmark.py): infer = the
    # search branch (3 scales of image_size px against one template), train_step at train_batch_size
    # pairs, plus the template branch and the whole tracker per frame on a synthetic video; torch_repo
    # a clone of huanglianghua/siamfc-pytorch (with got10k importable): the official network, train
    # step and tracker are timed in the same run (research/siamfc/official_torch.py).
    add_shared_fields(c, log_every_steps=20, eval_every_steps=0, checkpoint_every_steps=500,
                      benchmark_variant="alexnet_v1", benchmark_image_size=255, benchmark_batch_size=3,
                      benchmark_train_batch_size=8)
    c.benchmark.tracker_frames = 24  # frames of the synthetic video timed by the tracker stage

    # evaluators by type (research/evaluation/base.py): the tracker over evaluation videos, scored
    # as the got10k toolkit's ExperimentOTB (success AUC, precision, normalised precision) and
    # ExperimentGOT10k (AO, SR@0.5, SR@0.75); every_steps 0 = eval_every_steps, split "" = the
    # dataset's evaluation split. data "" = the task's data; else another dataset to track, e.g.
    # data=otb, builder_config=otb2015, manual_dir=/data/OTB100 (research/siamfc/data.py).
    c.evals = ml_collections.ConfigDict()
    c.evals.tracking = ml_collections.ConfigDict(dict(type="tracking", every_steps=0, split="",
                                                      max_videos=0 if synthetic else 30,  # 0 = all
                                                      max_frames=0, data="", builder_config="", manual_dir=""))
    c.eval = ml_collections.ConfigDict()
    c.eval.use_ema = False  # no EMA in the official recipe
    c.eval.onnx = False

    c.predict = ml_collections.ConfigDict(dict(video=0, num_frames=12, upscale=3 if synthetic else 1))

    # --mode=track (research/siamfc/track.py): input = a folder of frames or a video file; box = the
    # target in the first frame, "x,y,w,h" pixels (1-based x, y as OTB / GOT-10k ground truth).
    # Writes <workdir>/track/boxes.txt and track.mp4 (or frames/*.png with save_frames).
    c.track = ml_collections.ConfigDict(dict(input="", box="", onnx=False, save_frames=False,
                                             fps=0.0,  # of the written video; 0 = the input's (else 25)
                                             max_frames=0))  # 0 = all


    if synthetic:
        # CPU recipe for the embedded videos (not official): 96 videos x 8 pairs = 96 steps per
        # epoch, 5 epochs, the exponential decay from 0.1 to 1e-3 (measured: the official 1e-2
        # learns about 3x slower with the tiny widths; docs/siamfc.md).
        c.data.pairs_per_seq = 8
        c.num_epochs = 5
        c.optim.initial_lr = 0.1
        c.optim.ultimate_lr = 1e-3
        c.log_every_steps = 16
        c.eval_every_steps = 192
        c.checkpoint_every_steps = 96

    if arg.smoke:
        c.model.variant = "tiny"
        c.data.builder_config = "tiny"
        c.data.pairs_per_seq = 1
        c.batch_size = 4
        c.total_steps = 6
        c.log_every_steps = 2
        c.eval_every_steps = 6
        c.checkpoint_every_steps = 3
        c.evals.tracking.max_videos = 1
        c.evals.tracking.max_frames = 4
        c.predict.num_frames = 2
        c.async_checkpoints = False
    return c
