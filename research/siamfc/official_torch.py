"""The official huanglianghua/siamfc-pytorch code, timed from a local checkout (optional).

Nothing here is needed to train, track or export. With `--config.benchmark.torch_repo=PATH` (a
clone of https://github.com/huanglianghua/siamfc-pytorch, with `torch`, `opencv` and the `got10k`
toolkit importable, as the official code needs) the benchmark harness runs `main` in a subprocess,
before and after our own measurements, and reports the official figures beside ours:

  infer                       the search branch as the official `TrackerSiamFC.update` runs it:
                              `net.backbone(x)` on `infer_batch` (3) search crops of
                              `image_size` px, then `net.head(kernel, x)` against one template
  template                    the template branch: `net.backbone(z)` on one 127 px exemplar
  template_and_search         both (the issue's "one template plus three search crops")
  train_step                  the official `TrackerSiamFC.train_step` (forward, `BalancedLoss`,
                              backward, SGD step) on `train_batch` pairs of 127 / 239 px crops
  tracker_frame               the official `TrackerSiamFC.update` per frame on the same synthetic
                              video as ours (`research.siamfc.benchmark.synthetic_video`)
  onnx_infer                  the search branch (kernel + crops -> responses, as our search.onnx)
                              exported with `torch.onnx.export` and run in ONNX Runtime (the
                              official code has no export; needs onnx/onnxruntime there)

All eager PyTorch on the CPU in eval mode under `torch.no_grad()` (as the official tracker),
with torch's default thread count. The official code is imported from `repo`, never copied.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

from research import official_runner


def import_official(repo: str):
    """The official `siamfc.siamfc` module from the checkout `repo` (which imports got10k).

    Raises:
      FileNotFoundError: `repo` is not a siamfc-pytorch checkout.
    """
    repo = os.path.abspath(os.path.expanduser(repo))
    if not os.path.isfile(os.path.join(repo, "siamfc", "siamfc.py")):
        raise FileNotFoundError(f"{repo}: not a huanglianghua/siamfc-pytorch checkout (no siamfc/siamfc.py)")
    if repo not in sys.path:
        sys.path.insert(0, repo)
    import siamfc.siamfc  # noqa: F401  (the official module, from the checkout)
    return sys.modules["siamfc.siamfc"]


def measure(repo: str, *, variant: str = "alexnet_v1", image_size: int = 255, infer_batch: int = 3,
            train_batch: int = 8, repeats: int = 10, warmup: int = 2, tracker_frames: int = 24,
            serve: bool = False) -> dict[str, Any]:
    """Times the official network, train step and tracker (module docstring); ms per call. With `serve`, times
    nothing and returns {'train_step': that step} for `official_runner.serve`.

    Raises:
      ValueError: a variant other than the official `alexnet_v1`.
    """
    import torch

    from research.siamfc.benchmark import synthetic_video, time_tracker
    if variant != "alexnet_v1":
        raise ValueError(f"the official code has only alexnet_v1, not {variant!r}")
    official = import_official(repo)
    torch.manual_seed(0)
    tracker = official.TrackerSiamFC()  # official init (ops.init_weights), CPU without CUDA
    net = tracker.net
    rs = np.random.RandomState(1)
    out: dict[str, Any] = {"torch_version": torch.__version__, "threads": torch.get_num_threads(),
                           "batches": {"template": 1, "template_and_search": infer_batch, "tracker_frame": 1}}
    z = torch.from_numpy(rs.uniform(0, 255, (1, 3, 127, 127)).astype(np.float32))
    x = torch.from_numpy(rs.uniform(0, 255, (infer_batch, 3, image_size, image_size)).astype(np.float32))

    # train step first (train mode), then everything in eval mode as the tracker runs it
    train_x = image_size - 16
    batch = (torch.from_numpy(rs.randint(0, 256, (train_batch, 3, 127, 127)).astype(np.float32)),
             torch.from_numpy(rs.randint(0, 256, (train_batch, 3, train_x, train_x)).astype(np.float32)))
    if serve:
        return {"train_step": lambda: tracker.train_step(batch, backward=True)}
    out["train_step"] = official_runner.times_ms(lambda: tracker.train_step(batch, backward=True), repeats, max(warmup - 1, 1))

    net.eval()
    with torch.no_grad():
        kernel = net.backbone(z)
        out["infer"] = official_runner.times_ms(lambda: net.head(kernel, net.backbone(x)), repeats, warmup)
        out["template"] = official_runner.times_ms(lambda: net.backbone(z), repeats, warmup)
        out["template_and_search"] = official_runner.times_ms(lambda: net.head(net.backbone(z), net.backbone(x)), repeats, warmup)

    class Search(torch.nn.Module):  # the search branch as ours exports it (search.onnx): cached kernel + crops
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, kernel, crops):
            return self.net.head(kernel, self.net.backbone(crops))

    official_runner.add_onnx(out, "onnx_infer", official_runner.onnx_times_ms(
        Search().eval(), (kernel, x), ["template_features", "search"], ["responses"],
        repeats=repeats, warmup=warmup, opset=17))
    out["batches"]["onnx_infer"] = infer_batch

    frames, box = synthetic_video(max(int(tracker_frames), 2) + warmup + 1)
    out["tracker_frame"] = time_tracker(tracker, frames, box, warmup)  # update is @torch.no_grad itself
    return out


def main(argv=None) -> None:
    """Command line of the harness's `time_torch_reference` (json of ms lists to `--out`)."""
    p = official_runner.parser(__doc__.splitlines()[0],
                               variant="alexnet_v1", image_size=255, infer_batch=3, train_batch=8, repeats=10, tracker_frames=24)
    a = p.parse_args(argv)
    res = measure(a.repo, variant=a.variant, image_size=a.image_size, infer_batch=a.infer_batch,
                  train_batch=a.train_batch, repeats=a.repeats, tracker_frames=a.tracker_frames, serve=a.serve)
    if a.serve:  # the harness calls the official train step and ours in turn
        official_runner.serve(res)
        return
    official_runner.write(a.out, res)


if __name__ == "__main__":
    main()
