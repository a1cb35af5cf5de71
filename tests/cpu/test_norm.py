"""research/cpu/norm.py: BatchNormAct equals nn.BatchNorm + activation, values and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.cpu.norm import BatchNormAct


class _Ref(nn.Module):
    act: str = "silu"

    @nn.compact
    def __call__(self, x, train):
        y = nn.BatchNorm(use_running_average=not train, momentum=0.97, epsilon=1e-3, name="bn")(x)
        return nn.silu(y) if self.act == "silu" else y


class _New(nn.Module):
    act: str = "silu"

    @nn.compact
    def __call__(self, x, train):
        return BatchNormAct(momentum=0.97, epsilon=1e-3, act=self.act, name="bn")(x, train)


def _setup(shape=(2, 7, 5, 16), seed=0, offset=1.0):
    rs = np.random.RandomState(seed)
    x = jnp.asarray(rs.randn(*shape).astype(np.float32) * 3 + offset)
    v = _Ref().init(jax.random.PRNGKey(0), x, False)
    # non-trivial scale, bias and running statistics
    v = jax.tree_util.tree_map(lambda a: jnp.asarray(rs.rand(*a.shape).astype(np.float32) + 0.5), v)
    g = jnp.asarray(rs.randn(*shape).astype(np.float32))
    return x, v, g


@pytest.mark.parametrize("act", ["silu", "none"])
@pytest.mark.parametrize("train", [False, True])
def test_values_gradients_and_running_stats_equal_flax(act, train):
    x, v, g = _setup()
    new_v = _New(act).init(jax.random.PRNGKey(0), x, False)
    assert jax.tree_util.tree_structure(new_v) == jax.tree_util.tree_structure(v)  # same variables

    def run(model):
        def f(p, x):
            out, upd = model.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train,
                                   mutable=["batch_stats"])
            return jnp.sum(out * g), (out, upd)
        return jax.value_and_grad(f, (0, 1), has_aux=True)(v["params"], x)

    (_, (o_ref, u_ref)), g_ref = run(_Ref(act))
    (_, (o_new, u_new)), g_new = run(_New(act))
    np.testing.assert_allclose(o_new, o_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves((g_new, u_new)), jax.tree_util.tree_leaves((g_ref, u_ref))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
    if train:  # the running averages moved
        assert not np.allclose(u_new["batch_stats"]["bn"]["mean"], v["batch_stats"]["bn"]["mean"])


def test_large_mean_channels_keep_their_gradient():
    # conv outputs whose mean is 20x their spread: sum(dz*x) - mean*sum(dz) must still match
    x, v, g = _setup(offset=60.0)

    def grads(model):
        f = lambda p, x: jnp.sum(g * model.apply({"params": p, "batch_stats": v["batch_stats"]}, x, True,
                                                 mutable=["batch_stats"])[0])
        return jax.grad(f, (0, 1))(v["params"], x)

    for a, b in zip(jax.tree_util.tree_leaves(grads(_New())), jax.tree_util.tree_leaves(grads(_Ref()))):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_bfloat16_compute_keeps_float32_statistics():
    x, v, _ = _setup()
    m = BatchNormAct(momentum=0.97, epsilon=1e-3, dtype=jnp.bfloat16)
    out, upd = m.apply({"params": v["params"]["bn"], "batch_stats": v["batch_stats"]["bn"]}, x, True,
                       mutable=["batch_stats"])
    assert out.dtype == jnp.bfloat16 and upd["batch_stats"]["mean"].dtype == jnp.float32
    ref, _ = _Ref().apply(v, x, True, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=0.05, atol=0.05)


def test_unknown_activation_is_an_error():
    with pytest.raises(ValueError, match="act 'relu6'"):
        BatchNormAct(act="relu6").init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 3)))
