r"""Entry point: train, evaluate, predict, export or benchmark a network.

  python launch.py --config=configs/yolov5.py:variant=s,data=shapes --workdir=workdirs/y5 \
      --mode=train --config.batch_size=32

Modes: train | eval | predict | export | benchmark | all (train, then eval, predict, export), and a
network's own modes (research/tasks.py `Task.extra_modes`; SiamFC: track).
Multi-host: --config.distributed.num_processes=N --config.distributed.process_id=i
--config.distributed.coordinator_address=host:port (or nothing, on clusters JAX detects).
"""

from research.cpu import hostenv

if __name__ == "__main__":  # glibc reads its malloc tunables at start-up only (research/cpu/hostenv.py)
    hostenv.reexec_with_tunables()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (with :args).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and exports.")
_MODE = flags.DEFINE_string("mode", "train", "What to run: train | eval | predict | export | benchmark | all, "
                            "or a network's own mode (siamfc: track).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from research import modes
    modes.run(_CONFIG.value, _WORKDIR.value, _MODE.value)


if __name__ == "__main__":
    app.run(main)
