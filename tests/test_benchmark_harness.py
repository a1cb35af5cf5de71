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
