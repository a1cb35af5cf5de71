"""YOLOv5 builder: official parameter counts, bias init, custom layer lists, bf16, decoding."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.yolov5.model import build_model, count_params, make_divisible, parse_model, load_yaml_cfg

OFFICIAL = {"n": 1_872_157, "s": 7_235_389, "m": 21_190_557, "l": 46_563_709, "x": 86_749_405}


@pytest.mark.parametrize("variant", list(OFFICIAL))
def test_parameter_counts_equal_official(variant):
    model = build_model(variant=variant)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
    assert count_params(shapes["params"]) == OFFICIAL[variant]


def test_parse_model_scaling_rules():
    specs = parse_model(load_yaml_cfg(variant="s"))
    assert make_divisible(64 * 0.5) == 32 and make_divisible(1024 * 0.25) == 256
    c3 = dict(specs[6].kwargs)
    assert specs[6].module == "C3" and c3["n"] == round(9 * 0.33) and specs[6].out_channels == 256
    assert specs[12].module == "Concat" and specs[12].out_channels == 256 + 256
    assert specs[-1].module == "Detect" and specs[-1].out_channels == 3 * 85


def test_detect_bias_init_is_official():
    model = build_model(variant="tiny", nc=6)
    v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    for i, stride in enumerate((8, 16, 32)):
        b = np.asarray(v["params"]["24"][f"m.{i}"]["bias"]).reshape(3, 11)
        fan_in = v["params"]["24"][f"m.{i}"]["kernel"].shape[2]
        bound = 1 / math.sqrt(fan_in)
        obj = b[:, 4] - math.log(8 / (640 / stride) ** 2)
        cls = b[:, 5:] - math.log(0.6 / (6 - 0.99999))
        assert np.all(np.abs(obj) <= bound + 1e-6) and np.all(np.abs(cls) <= bound + 1e-6)
        assert np.all(np.abs(b[:, :4]) <= bound + 1e-6)


def test_custom_layer_list_and_errors():
    cfg = load_yaml_cfg(variant="n", nc=2)
    cfg["backbone"] = cfg["backbone"][:3] + [[-1, 1, "Conv", [256, 3, 2]], [-1, 1, "Conv", [512, 3, 2]],
                                             [-1, 1, "SPPF", [512, 5]]]
    cfg["head"] = [[[3, 4, 5], 1, "Detect", ["nc", "anchors"]]]
    model = build_model(cfg)
    out = model.apply(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))), jnp.zeros((2, 64, 64, 3)))
    assert [h.shape for h in out["heads"]] == [(2, 3, 8, 8, 7), (2, 3, 4, 4, 7), (2, 3, 4, 4, 7)]
    assert model.strides == (8, 16, 16)  # probed like the official Model, not assumed
    cfg["head"] = [[-1, 1, "Foo", []]] + cfg["head"]
    with pytest.raises(ValueError, match="layer 6: unknown module 'Foo'"):
        build_model(cfg)
    with pytest.raises(ValueError, match="unknown YOLOv5 variant 'q'"):
        build_model(variant="q")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        build_model("missing.yaml")


def test_bfloat16_compute_close_to_float32():
    f32 = build_model(variant="tiny", nc=3)
    bf16 = build_model(variant="tiny", nc=3, dtype=jnp.bfloat16)
    v = f32.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    x = jax.random.uniform(jax.random.PRNGKey(1), (1, 64, 64, 3))
    a, b = f32.apply(v, x)["heads"][0], bf16.apply(v, x)["heads"][0]
    assert b.dtype == jnp.float32  # heads are cast back for the loss
    assert float(jnp.abs(a - b).max()) < 0.05 * float(jnp.abs(a).max())
    assert float(jnp.abs(a - b).max()) > 0  # bf16 really computed


def test_decode_matches_formula():
    model = build_model(variant="tiny", nc=1)
    v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    out = model.apply(v, jax.random.uniform(jax.random.PRNGKey(2), (1, 64, 64, 3)))
    h = np.asarray(out["heads"][1])  # stride 16, 4x4 grid
    s = 1 / (1 + np.exp(-h))
    a, y, x = 2, 3, 1
    anchor = np.asarray(model.anchors_pixels[1, a])
    exp = [(s[0, a, y, x, 0] * 2 - 0.5 + x) * 16, (s[0, a, y, x, 1] * 2 - 0.5 + y) * 16,
           (s[0, a, y, x, 2] * 2) ** 2 * anchor[0], (s[0, a, y, x, 3] * 2) ** 2 * anchor[1]]
    n0 = 3 * 8 * 8
    row = np.asarray(out["pred"])[0, n0 + a * 16 + y * 4 + x]
    np.testing.assert_allclose(row[:4], exp, rtol=1e-5)
    np.testing.assert_allclose(row[4:], s[0, a, y, x, 4:], rtol=1e-6)


def test_heads_nhwc_are_the_official_heads_transposed():
    model = build_model(variant="tiny", nc=2)
    v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    x = jax.random.uniform(jax.random.PRNGKey(3), (2, 64, 64, 3))
    for train in (False, True):
        out = model.apply(v, x, train=train, mutable=["batch_stats"])[0] if train else model.apply(v, x)
        for off, nhwc in zip(out["heads"], out["heads_nhwc"]):
            assert nhwc.shape == (2, off.shape[2], off.shape[3], 3, 7)
            np.testing.assert_array_equal(np.asarray(nhwc).transpose(0, 3, 1, 2, 4), off)
