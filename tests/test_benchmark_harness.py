"""The shared benchmark harness's ONNX comparison: our exported graph and an official export (NCHW input) called in
turn in one ONNX Runtime process, and the ratios it gives."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from research import benchmark
from research.bridge.onnx_export import export_onnx


def _nchw_conv_graph(path: str, size: int) -> None:
    """An 'official' export: images [1, 3, S, S] -> one 3x3 convolution (8 channels), as torch.onnx writes it."""
    w = numpy_helper.from_array(np.random.RandomState(0).randn(8, 3, 3, 3).astype(np.float32), "w")
    node = helper.make_node("Conv", ["images", "w"], ["output_0"], pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "official", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                                 [1, 3, size, size])],
                              [helper.make_tensor_value_info("output_0", TensorProto.FLOAT, None)], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_alternate_onnx_times_both_graphs_in_turn_and_gives_ratios(tmp_path):
    size = 32
    ours, theirs = str(tmp_path / "ours.onnx"), str(tmp_path / "official.onnx")
    export_onnx(lambda images: images * 2.0 + 1.0, np.zeros((1, size, size, 3), np.float32), ours)
    _nchw_conv_graph(theirs, size)
    inputs = {"images": np.random.RandomState(1).rand(1, size, size, 3).astype(np.float32)}
    alt = benchmark.alternate_onnx(ours, {"onnx_infer": theirs}, inputs, rounds=5, warmup=1)
    assert alt["rounds"] == 5 and set(alt) >= {"ours", "onnx_infer"}
    # graphs called in turn: no session's idle threads spin into the next graph's call
    assert benchmark.alternation_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert "not spinning" in alt["note"]
    for key in ("ours", "onnx_infer"):
        assert len(alt[key]["times_ms"]) == 5 and alt[key]["min_ms"] > 0
        assert alt[key]["median_ms"] == pytest.approx(float(np.median(alt[key]["times_ms"])))
    # the official graph was fed NCHW (a [1, S, S, 3] feed would have failed in ONNX Runtime)
    import onnxruntime as ort
    sess = ort.InferenceSession(theirs, providers=["CPUExecutionProvider"])
    feed = benchmark._feed(sess, inputs)
    assert feed["images"].shape == (1, 3, size, size)
    np.testing.assert_array_equal(feed["images"], inputs["images"].transpose(0, 3, 1, 2))
    with pytest.raises(ValueError, match="not among ours"):
        benchmark._feed(sess, {"x": inputs["images"]})
    recs = [benchmark.record("alternated_onnx_infer", 1, size, [30.0, 40.0]),
            benchmark.record("alternated_torch_onnx_infer", 1, size, [50.0]),
            benchmark.record("alternated_torch_onnx_infer_dynamic", 1, size, [35.0])]
    spec = type("Spec", (), {"reference": None, "measured_pairs": (), "variant": "x", "image_size": size})()
    r = benchmark.ratios(recs, spec, infer_batch=1, train_batch=1)
    assert r["onnx_infer_over_torch_onnx_infer_alternated"] == pytest.approx(35.0 / 50.0)
    assert r["onnx_infer_over_torch_onnx_infer_dynamic_alternated"] == pytest.approx(1.0)
    lines = benchmark.table(recs).splitlines()  # long record names widen the first column, rows stay aligned
    assert len({len(line) for line in lines}) == 1 and "alternated_torch_onnx_infer_dynamic" in lines[-1]


def test_serve_answers_timing_requests_line_by_line():
    import io
    import json

    from research import official_runner
    calls = []
    infile = io.StringIO("step 3\n\nbogus 1\nstep x\nstep\nquit\nstep 5\n")
    outfile = io.StringIO()
    official_runner.serve({"step": lambda: calls.append(1)}, infile, outfile)
    lines = outfile.getvalue().splitlines()
    assert all(line.startswith(official_runner.SERVE_PREFIX) for line in lines)
    msgs = [json.loads(line[len(official_runner.SERVE_PREFIX):]) for line in lines]
    assert msgs[0]["ready"] == ["step"]
    assert msgs[1]["name"] == "step" and len(msgs[1]["times_ms"]) == 3
    assert "unknown call 'bogus'" in msgs[2]["error"] and "bad request" in msgs[3]["error"]
    assert len(msgs[4]["times_ms"]) == 1 and len(msgs) == 5  # nothing after quit
    assert len(calls) == 4


def _worker_cmd(*args: str) -> tuple[list[str], dict]:
    import os
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    return [sys.executable, os.path.join(root, "tests", "serve_worker.py"), *args], env


def test_train_step_alternated_with_a_served_official_runner():
    import time

    order = []

    def ours(i):
        order.append(i)
        time.sleep(0.002)
        return np.zeros(1)

    cmd, env = _worker_cmd()
    with benchmark.TorchServer(cmd, env) as server:
        assert server.ready["ready"] == ["sleep"]
        alt = benchmark.alternate_with_official(server, {"sleep": ours}, rounds=4, warmup=1)
        with pytest.raises(RuntimeError, match="unknown call 'train_step'"):
            server.time("train_step", 1)
        assert len(server.time("sleep", 2)) == 2  # still serving after an error
    assert server.proc.returncode == 0  # quit on exit
    assert order == [0, 1, 2, 3, 4] and alt["rounds"] == 4
    assert len(alt["sleep"]["ours"]) == len(alt["sleep"]["official"]) == 4
    assert min(alt["sleep"]["official"]) >= 5.0 and min(alt["sleep"]["ours"]) >= 2.0
    recs = [benchmark.record("alternated_train_step", 2, 64, [90.0, 110.0, 200.0]),
            benchmark.record("alternated_torch_train_step", 2, 64, [100.0, 125.0, 120.0]),
            benchmark.record("alternated_onnx_infer", 1, 64, [30.0])]
    spec = type("Spec", (), {"reference": None, "measured_pairs": (), "variant": "x", "image_size": 64})()
    r = benchmark.ratios(recs, spec, infer_batch=1, train_batch=2)
    assert r["train_step_over_torch_train_step_alternated"] == pytest.approx(110.0 / 120.0)
    assert r["train_step_over_torch_train_step_alternated_paired"] == pytest.approx(0.9)  # of 0.9, 0.88, 1.67
    assert not any(k.startswith("onnx_infer_over_torch_train") for k in r)


def test_torch_server_names_a_runner_that_fails_to_start():
    cmd, env = _worker_cmd("--crash")
    with pytest.raises(RuntimeError, match="could not be built"):
        with benchmark.TorchServer(cmd, env):
            pass


# opt-in: each network's official runner serving its train step (`--serve`) from a local clone of the official code,
# in the interpreter $OFFICIAL_PYTHON (config.benchmark.torch_python: one with the official requirements; default this)
_OFFICIAL = {  # network: (environment variable naming the clone, variant, image size)
    "higherhrnet": ("HIGHERHRNET_REPO", "w32_512", 64),
    "yolov5": ("YOLOV5_REPO", "n", 64),
    "siamfc": ("SIAMFC_REPO", "alexnet_v1", 255),
    "rtdetr": ("RTDETR_REPO", "r18vd", 320),  # 300 queries need more than 64 px of anchors
}
_SERVES = {"higherhrnet": ("infer", "train_step")}  # what each runner serves (its spec's torch_serves), sorted


@pytest.mark.parametrize("network", sorted(_OFFICIAL))
def test_official_runner_serves_its_train_step(network):
    import os
    import types
    env_var, variant, size = _OFFICIAL[network]
    repo = os.environ.get(env_var, "")
    if not (repo and os.path.isdir(repo)):
        pytest.skip(f"{env_var} names no official clone")
    pytest.importorskip("torch")
    spec = types.SimpleNamespace(torch_reference_module=f"research.{network}.official_torch", variant=variant,
                                 image_size=size, torch_args=())
    cmd, env = benchmark._torch_command(spec, repo, 1, 2, 1, os.environ.get("OFFICIAL_PYTHON", ""), out="",
                                        serve=True)
    serves = _SERVES.get(network, ("train_step",))
    with benchmark.TorchServer(cmd, env) as server:
        assert server.ready["ready"] == sorted(serves) and server.ready["torch_version"]
        for name in serves:
            times = server.time(name, 2)
            assert len(times) == 2 and min(times) > 0
