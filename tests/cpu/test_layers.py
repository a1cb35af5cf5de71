"""research/cpu/layers.py: the one seam choosing layer implementations keeps parameters and values."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.cpu import layers as layers_lib


class _Block(nn.Module):
    layers: layers_lib.Layers = layers_lib.PLAIN
    act: str = "relu"

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = self.layers.conv(8, 3, 2, 1, name="conv")(x)
        x = self.layers.norm_act(self.act, momentum=0.9, epsilon=1e-5, name="bn")(x, train)
        x = self.layers.max_pool_same(x, 3, train)
        return self.layers.conv(4, 1, use_bias=True, name="head")(x)


def test_select_is_the_one_place_and_values_are_hashable():
    assert layers_lib.select("lax") is layers_lib.PLAIN
    dot = layers_lib.select("dot")
    assert dot == layers_lib.Layers("dot", True, True) and hash(dot) == hash(layers_lib.Layers("dot", True, True))
    assert not layers_lib.PLAIN.lean_norm and not layers_lib.PLAIN.lean_pool_grad
    with pytest.raises(ValueError, match="conv_impl 'fast'"):
        layers_lib.select("fast")


@pytest.mark.parametrize("act", ["relu", "silu", "none"])
def test_speed_layer_equals_plain_layers_in_values_and_gradients(act):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
    plain, fast = _Block(layers_lib.PLAIN, act), _Block(layers_lib.select("dot"), act)
    variables = plain.init(jax.random.PRNGKey(1), x)
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(fast.init(jax.random.PRNGKey(1), x))
    assert set(variables) == {"params", "batch_stats"}
    assert set(variables["params"]["conv"]) == {"kernel"} and variables["params"]["conv"]["kernel"].shape == (3, 3, 3, 8)

    def loss(model, params):
        y, upd = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                             mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y)), upd["batch_stats"]

    (lp, sp), gp = jax.value_and_grad(lambda p: loss(plain, p), has_aux=True)(variables["params"])
    (lf, sf), gf = jax.value_and_grad(lambda p: loss(fast, p), has_aux=True)(variables["params"])
    assert abs(float(lp - lf)) <= 1e-4 * abs(float(lp)) + 1e-5
    for a, b in zip(jax.tree_util.tree_leaves((gp, sp)), jax.tree_util.tree_leaves((gf, sf))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
    if act == "relu":  # ReLU really applied, as torch's (no gradient at 0)
        from research.cpu import norm
        z = jnp.array([-1.0, 0.0, 2.0])
        assert np.asarray(norm._act(z, "relu")).tolist() == [0.0, 0.0, 2.0]
        assert np.asarray(norm._act_grad(z, jnp.ones(3), "relu")).tolist() == [0.0, 0.0, 1.0]


class _FlaxStyleNet(nn.Module):
    """A network written against nn.Conv / nn.BatchNorm factories (HigherHRNet, SiamFC, RT-DETR style)."""

    conv: object = nn.Conv
    norm: object = nn.BatchNorm

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = self.conv(8, (3, 3), strides=2, padding=1, name="c1")(x)
        x = self.norm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="bn")(x)
        x = nn.relu(x)
        x = self.conv(8, (3, 3), padding="SAME", feature_group_count=2, name="c2")(x)  # groups
        x = self.conv(4, (1, 1), use_bias=False, name="c3")(x)
        x = self.conv(4, (3, 3), strides=(2, 2), padding="SAME", name="c4")(x)  # asymmetric: XLA fallback
        return self.conv(4, (3, 1), padding="VALID", name="c5")(x)  # non-square: XLA fallback


def test_flax_factories_keep_nn_parameters_values_and_gradients():
    assert layers_lib.PLAIN.nn_conv is nn.Conv and layers_lib.PLAIN.nn_batch_norm is nn.BatchNorm
    fast = layers_lib.select("dot")
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
    plain, quick = _FlaxStyleNet(), _FlaxStyleNet(conv=fast.nn_conv, norm=fast.nn_batch_norm)
    variables = plain.init(jax.random.PRNGKey(1), x)
    other = quick.init(jax.random.PRNGKey(1), x)
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(other)
    for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(other)):
        assert a.shape == b.shape
    np.testing.assert_allclose(np.asarray(quick.apply(variables, x)), np.asarray(plain.apply(variables, x)),
                               rtol=1e-5, atol=1e-5)

    def loss(model, params):
        y, upd = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                             mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y)), upd

    (lp, sp), gp = jax.value_and_grad(lambda p: loss(plain, p), has_aux=True)(variables["params"])
    (lq, sq), gq = jax.value_and_grad(lambda p: loss(quick, p), has_aux=True)(variables["params"])
    assert abs(float(lp - lq)) <= 1e-4 * abs(float(lp)) + 1e-5
    for a, b in zip(jax.tree_util.tree_leaves((gp, sp)), jax.tree_util.tree_leaves((gq, sq))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
