"""research/cpu/pool.py: max_pool_same equals nn.max_pool, and its gradient routes ties the same way."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.cpu.pool import max_pool_same


def _ref(x, k):
    p = k // 2
    return nn.max_pool(x, (k, k), strides=(1, 1), padding=((p, p), (p, p)))


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("ties", [False, True])
def test_forward_and_gradient_equal_reduce_window(k, ties):
    rs = np.random.RandomState(k)
    shape = (2, 9, 11, 3)
    # with ties (few distinct values), the gradient must go to the first maximum of each window
    x = rs.randint(0, 3, shape).astype(np.float32) if ties else rs.randn(*shape).astype(np.float32)
    x, g = jnp.asarray(x), jnp.asarray(rs.randn(*shape).astype(np.float32))

    def cascade(pool):  # SPPF chains three pools: later ones see plateaus of equal values
        return lambda x: jnp.sum(g * pool(pool(pool(x))))

    new = lambda v: max_pool_same(v, k, train=True)  # noqa: E731
    np.testing.assert_array_equal(new(x), _ref(x, k))
    np.testing.assert_array_equal(max_pool_same(x, k), _ref(x, k))
    d_new = jax.jit(jax.grad(cascade(new)))(x)
    d_ref = jax.jit(jax.grad(cascade(lambda v: _ref(v, k))))(x)
    np.testing.assert_allclose(d_new, d_ref, rtol=1e-6, atol=1e-5)
    if ties:  # not a uniform split between equal values: some inputs get nothing
        assert int(jnp.sum(d_new == 0)) > 0


def test_even_kernel_is_an_error():
    with pytest.raises(ValueError, match="kernel 4 must be odd"):
        max_pool_same(jnp.zeros((1, 4, 4, 1)), 4)


@pytest.mark.parametrize("k,stride,padding,size", [(3, 2, 0, 15), (3, 2, 0, 14), (3, 2, 1, 13), (2, 2, 0, 9)])
@pytest.mark.parametrize("ties", [False, True])
def test_strided_pool_forward_and_gradient_equal_reduce_window(k, stride, padding, size, ties):
    """AlexNet's 3x3 stride-2 pooling (SiamFC) and other strides: values and first-argmax gradient routing."""
    from research.cpu.pool import max_pool
    rs = np.random.RandomState(size + 10 * ties)
    shape = (2, size, size + 2, 3)
    x = rs.randint(0, 3, shape).astype(np.float32) if ties else rs.randn(*shape).astype(np.float32)
    x = jnp.asarray(x)
    pad = ((padding, padding), (padding, padding))
    ref = lambda v: nn.max_pool(v, (k, k), strides=(stride, stride), padding=pad)  # noqa: E731
    new = lambda v: max_pool(v, k, stride, padding, train=True)  # noqa: E731
    y = ref(x)
    g = jnp.asarray(rs.randn(*y.shape).astype(np.float32))
    np.testing.assert_array_equal(new(x), y)
    np.testing.assert_array_equal(max_pool(x, k, stride, padding), y)
    d_new = jax.jit(jax.grad(lambda v: jnp.sum(g * new(v))))(x)
    d_ref = jax.jit(jax.grad(lambda v: jnp.sum(g * ref(v))))(x)
    np.testing.assert_allclose(d_new, d_ref, rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(d_ref).sum()) > 0
