"""What every official-PyTorch benchmark runner (`research/<network>/official_torch.py`) shares.

The runners execute in the interpreter of the official code (`config.benchmark.torch_python`), so
this module needs nothing beyond the standard library at import: no jax, no numpy (`onnx_times_ms` imports
torch and onnxruntime when called). The harness
(`research.benchmark.time_torch_reference`) starts a runner as
`python -m research.<network>.official_torch --repo=... --variant=... --image_size=...
--infer_batch=... --train_batch=... --repeats=... --out=<json>` plus the spec's `torch_args`, and
reads a json of named lists of milliseconds per call (or `skipped` with the reason). A runner that also
takes `--serve` answers timing requests on stdin instead (`serve`), so the harness can call the official step
and ours in turn (`research.benchmark.TorchServer`, `alternate_with_official`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Sequence

# set by the harness (`research.benchmark.time_torch_reference`): the folder where `onnx_times_ms(keep_as=...)` leaves
# a copy of each official export, so the harness can also time it in turn with ours in one process
ONNX_DIR_ENV = "RESEARCH_OFFICIAL_ONNX_DIR"
# what starts every line of the `serve` protocol on the runner's stdout (the official code may print its own lines)
SERVE_PREFIX = "@@official_runner "


def times_ms(fn: Callable[[], Any], repeats: int, warmup: int) -> list[float]:
    """`warmup` untimed calls of `fn`, then the wall time of each of `repeats` calls, in ms."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def parser(description: str, *, variant: str, image_size: int, infer_batch: int, train_batch: int,
           repeats: int = 10, out_required: bool = True, **extra_ints: int) -> argparse.ArgumentParser:
    """The runners' command line: the harness's flags with this network's defaults, and `--<name>`
    int flags for `extra_ints` (e.g. SiamFC's `tracker_frames=24`)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--repo", required=True, help="a local clone of the official repository")
    p.add_argument("--variant", default=variant)
    p.add_argument("--image_size", type=int, default=image_size)
    p.add_argument("--infer_batch", type=int, default=infer_batch)
    p.add_argument("--train_batch", type=int, default=train_batch)
    p.add_argument("--repeats", type=int, default=repeats)
    for name, default in extra_ints.items():
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--out", required=out_required, default="", help="where to write the json of timings")
    p.add_argument("--serve", action="store_true",
                   help="answer timing requests on stdin (`serve`) instead of measuring everything once")
    return p


def _say(outfile, message: dict) -> None:
    outfile.write(SERVE_PREFIX + json.dumps(message) + "\n")
    outfile.flush()


def serve(calls: dict[str, Callable[[], Any]], infile=None, outfile=None) -> None:
    """Times `calls` on request, one line each way, until `quit` or the end of input: the harness then calls the
    official step and ours in turn, each process idle while the other runs (`research.benchmark.TorchServer`).

    Protocol (every answer is one line `SERVE_PREFIX` + json on `outfile`, default stdout):
      first, unasked: {"ready": [names], "torch_version"?: str}
      request `NAME N` (N calls, default 1): {"name": NAME, "times_ms": [N wall times, ms]}
      an unknown name or a malformed line: {"error": "..."}; the runner keeps serving.
    """
    infile = infile or sys.stdin
    outfile = outfile or sys.stdout
    ready: dict[str, Any] = {"ready": sorted(calls)}
    if "torch" in sys.modules:
        ready["torch_version"] = sys.modules["torch"].__version__
    _say(outfile, ready)
    for line in infile:
        words = line.split()
        if not words:
            continue
        if words[0] == "quit":
            break
        try:
            n = int(words[1]) if len(words) > 1 else 1
        except ValueError:
            _say(outfile, {"error": f"bad request {line.strip()!r}: expected 'NAME N'"})
            continue
        if words[0] not in calls:
            _say(outfile, {"error": f"unknown call {words[0]!r}: this runner serves {sorted(calls)}"})
            continue
        _say(outfile, {"name": words[0], "times_ms": times_ms(calls[words[0]], max(n, 1), 0)})


def write(path: str, result: dict) -> None:
    """Writes the runner's result json for the harness."""
    with open(path, "w") as f:
        json.dump(result, f)


def onnx_times_ms(model, example_inputs: tuple, input_names: Sequence[str], output_names: Sequence[str], *,
                  repeats: int, warmup: int, opset: int = 17, dynamic_batch: bool = False,
                  keep_as: str = "") -> tuple[list[float] | None, str]:
    """The official model exported as its repository exports it (`torch.onnx.export`, TorchScript-based, the
    exporter the official export scripts were written for) and timed in ONNX Runtime with the same session
    settings as ours (`research.bridge.onnx_export.OnnxRunner`: CPU provider, default threads).

    Args:
      model: the torch module in eval mode, prepared as the official export prepares it (fused, deploy mode).
      example_inputs: the torch tensors it takes (their values are fed to ONNX Runtime as NumPy arrays).
      input_names / output_names: the graph's names.
      dynamic_batch: export the first dimension of every input and output as the symbol 'B' (`dynamic_axes`,
        as our exports do) instead of the example's fixed batch.
      keep_as: when the harness sets `$RESEARCH_OFFICIAL_ONNX_DIR`, the export is also copied there as
        `<keep_as>.onnx` (the harness then times it alternately with our graph; `<keep_as>` names the timings).
    Returns:
      (times in ms, "") or (None, why it was not timed): onnx/onnxruntime missing from the official
      interpreter, or the export failing.
    """
    try:
        import onnxruntime as ort
        import torch
    except ImportError as e:
        return None, f"official ONNX export not timed: {e} (install onnx and onnxruntime in the official interpreter)"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "official.onnx")
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                axes = {n: {0: "B"} for n in (*input_names, *output_names)} if dynamic_batch else None
                torch.onnx.export(model, tuple(example_inputs), path, dynamo=False, opset_version=opset,
                                  do_constant_folding=True, input_names=list(input_names),
                                  output_names=list(output_names), dynamic_axes=axes)
        except Exception as e:  # noqa: BLE001 (reported in the result, the rest of the runner goes on)
            return None, f"official ONNX export failed: {type(e).__name__}: {e}"
        keep_dir = os.environ.get(ONNX_DIR_ENV, "")
        if keep_as and keep_dir and os.path.isdir(keep_dir):
            shutil.copyfile(path, os.path.join(keep_dir, f"{keep_as}.onnx"))
        session = ort.InferenceSession(path, sess_options=ort.SessionOptions(), providers=["CPUExecutionProvider"])
        feed = {name: t.detach().cpu().numpy() for name, t in zip(input_names, example_inputs)}
        return times_ms(lambda: session.run(None, feed), repeats, warmup), ""


def add_onnx(out: dict, key: str, timed: tuple[list[float] | None, str]) -> None:
    """Puts `onnx_times_ms`'s result in a runner's json: the timings under `key`, or the reason under `notes`."""
    times, why = timed
    if times is not None:
        out[key] = times
    else:
        out["notes"] = "; ".join(n for n in (out.get("notes", ""), why) if n)
