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
