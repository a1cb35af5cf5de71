"""Bridge files: .pt / .safetensors round trips and clear errors for files that do not fit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.bridge import torch_bridge
from research.yolov5 import bridge
from research.yolov5.model import build_model


@pytest.fixture(scope="module")
def tiny():
    model = build_model(variant="tiny", nc=3)
    variables = jax.jit(lambda r: model.init(r, jnp.zeros((1, 64, 64, 3))))(jax.random.PRNGKey(0))
    return model, jax.tree_util.tree_map(np.asarray, variables)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_file_round_trip_gives_same_outputs(tiny, tmp_path, suffix):
    model, variables = tiny
    sd = bridge.to_torch(model, variables)
    path = torch_bridge.save_state_dict_file(sd, str(tmp_path / f"m{suffix}"))
    loaded = torch_bridge.load_state_dict_file(path)
    assert set(loaded) == set(sd)
    back = bridge.from_torch(model, loaded, variables)
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 64, 64, 3))
    a = model.apply(variables, x)["pred"]
    b = model.apply(back, x)["pred"]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_pt_loads_into_torch_with_official_layout(tiny, tmp_path):
    torch = pytest.importorskip("torch")
    model, variables = tiny
    path = torch_bridge.save_state_dict_file(bridge.to_torch(model, variables), str(tmp_path / "m.pt"))
    sd = torch.load(path, weights_only=True)
    # the first conv of the official model: Conv2d(3, c, 6, 2, 2, bias=False) in OIHW
    w = sd["model.0.conv.weight"]
    assert w.shape[1:] == (3, 6, 6)
    conv = torch.nn.Conv2d(3, w.shape[0], 6, 2, 2, bias=False)
    conv.load_state_dict({"weight": w}, strict=True)
    x = np.random.default_rng(0).uniform(0, 1, (1, 3, 64, 64)).astype(np.float32)
    ref = conv(torch.from_numpy(x)).detach().numpy().transpose(0, 2, 3, 1)
    ours = jax.lax.conv_general_dilated(jnp.asarray(x.transpose(0, 2, 3, 1)),
                                        variables["params"]["0"]["conv"]["kernel"], (2, 2), ((2, 2), (2, 2)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-4, atol=1e-5)
    assert sd["model.0.bn.num_batches_tracked"].dtype == torch.int64


def test_pickled_module_is_refused_without_unpickling(tmp_path):
    torch = pytest.importorskip("torch")
    path = str(tmp_path / "whole_model.pt")
    torch.save({"model": torch.nn.Conv2d(3, 4, 1)}, path)  # like official release files
    with pytest.raises(torch_bridge.BridgeError, match="not a plain state_dict"):
        torch_bridge.load_state_dict_file(path)


def test_state_dict_of_another_variant_lists_differences(tiny):
    model, variables = tiny
    other = build_model(variant="n", nc=3)
    other_vars = jax.eval_shape(lambda: other.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
    with pytest.raises(torch_bridge.BridgeError) as e:
        bridge.from_torch(other, bridge.to_torch(model, variables), other_vars)
    msg = str(e.value)
    assert "shape/value mismatches" in msg and "model.0.conv.weight" in msg


def test_wrong_class_count_and_missing_keys_named(tiny):
    model, variables = tiny
    sd = bridge.to_torch(model, variables)
    del sd["model.2.cv1.conv.weight"]
    sd["model.99.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(torch_bridge.BridgeError) as e:
        bridge.from_torch(model, sd, variables)
    assert "missing keys (1): model.2.cv1.conv.weight" in str(e.value)
    assert "unexpected keys (1): model.99.extra.weight" in str(e.value)
    other = build_model(variant="tiny", nc=5)
    with pytest.raises(torch_bridge.BridgeError, match="model.24.m.0.weight"):
        bridge.from_torch(other, bridge.to_torch(model, variables),
                          jax.eval_shape(lambda: other.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        torch_bridge.load_state_dict_file(str(tmp_path / "nope.pt"))


def test_checkpoint_entries_ema_first_and_each_layout(tmp_path):
    """Training checkpoints keep the weights nested: the EMA weights are taken first (as the official evaluation
    and export scripts take them), then `state_dict` / `model`; optimizer state beside them is read safely."""
    torch = pytest.importorskip("torch")
    ema = {"a.weight": torch.full((2, 3), 2.0), "a.running_mean": torch.zeros(3, dtype=torch.float16)}
    raw = {"a.weight": torch.full((2, 3), 1.0), "a.running_mean": torch.ones(3)}
    optimizer = {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}
    cases = {"rtdetr_train.pth": ({"model": raw, "ema": {"module": ema, "updates": 10, "warmups": 2000},
                                   "optimizer": optimizer, "last_epoch": 5}, "ema.module", 2.0),
             "ema_plain.pt": ({"ema": ema, "model": raw}, "ema", 2.0),
             "hrnet_checkpoint.pth": ({"state_dict": raw, "optimizer": optimizer, "epoch": 3}, "state_dict", 1.0),
             "model_only.pth": ({"model": raw}, "model", 1.0),
             "plain.pth": (raw, "state_dict", 1.0)}
    for name, (obj, where, value) in cases.items():
        path = str(tmp_path / name)
        torch.save(obj, path)
        sd, found = torch_bridge.read_checkpoint(path)
        assert found == where, name
        np.testing.assert_array_equal(sd["a.weight"], np.full((2, 3), value, np.float32), err_msg=name)
        assert sd["a.running_mean"].dtype == np.float32  # half precision widened
        np.testing.assert_array_equal(torch_bridge.load_state_dict_file(path)["a.weight"], sd["a.weight"])
    empty = str(tmp_path / "optimizer_only.pth")
    torch.save({"optimizer": optimizer, "epoch": 1}, empty)
    with pytest.raises(torch_bridge.BridgeError, match=r"optimizer_only\.pth: no state_dict.*\['epoch', 'optimizer'\]"):
        torch_bridge.load_state_dict_file(empty)
