"""Run by tests/test_loader_cleanup.py in a fresh interpreter (grain workers are spawned processes,
which need an importable main module): stops a 2-worker training loader early, closes it or not,
reads rectangular evaluation batches, and prints how many shared-memory blocks it left behind."""

import os
import time

from absl import app


def _blocks() -> set:
    return {n for n in os.listdir("/dev/shm") if n.startswith("psm_")}


def main(argv):
    from research.data import pipeline, shapes
    from research.yolov5 import data as D
    data_dir, mode = argv[1], argv[2]
    builder = pipeline.prepare("shapes_detection", data_dir, config=shapes.ShapesConfig(
        name="t64", image_size=64, num_train=48, num_validation=20, seed=1))
    before = _blocks()
    train = D.make_detection_loader(builder, "train", image_size=64, batch_size=4, train=True, worker_count=2,
                                    worker_buffer_size=2, process_index=0, process_count=1)
    it = iter(train)
    seen = [next(it)["image"].shape for _ in range(3)]  # stop early, as a run ends mid-epoch
    time.sleep(1.0)  # let the workers fill their buffers
    if mode == "close":
        pipeline.close_iterator(it)
    val = D.make_detection_loader(builder, "validation", image_size=64, batch_size=8, train=False, worker_count=2,
                                  num_epochs=1, process_index=0, process_count=1, rect_stride=32)
    with pipeline.closing_iterator(val) as vit:
        n = sum(int((b["image_id"] >= 0).sum()) for b in vit)
    time.sleep(1.0)  # grain unlinks read blocks from a background thread
    print("TRAIN", seen, "VAL", n, "LEFT", len(_blocks() - before), flush=True)
    if mode == "close":
        return
    pipeline.close_iterator(it)  # the control leaves nothing behind either, once it is closed


if __name__ == "__main__":
    app.run(main)
