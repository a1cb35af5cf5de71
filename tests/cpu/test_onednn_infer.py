"""research/cpu/kernels/onednn.conv_affine_act: oneDNN's inference convolution with a per-channel scale and bias,
residual and ReLU fused (`onednn_conv_infer.cc`) gives lax's convolution followed by the same arithmetic, for each
kernel/stride/padding form HigherHRNet's inference uses; bad shapes are refused naming them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.cpu.kernels import onednn

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu" or not onednn.available()[0],
                                reason="oneDNN kernels unavailable here")

# (batch, size, cin, cout, kernel, stride, padding)
CASES = [
    (1, 17, 5, 7, 3, 1, 1),     # odd size, few channels
    (2, 16, 32, 64, 3, 2, 1),   # strided 3x3 (HRNet's stem and downsampling chains)
    (1, 9, 8, 8, 1, 1, 0),      # 1x1 (Bottleneck, fuse layers)
    (2, 15, 6, 4, 3, 2, 1),     # odd size, strided: the floor output size
    (1, 8, 256, 32, 1, 1, 0),   # wide 1x1
]


def _ref(x, w, a, b, stride, padding, relu, residual):
    p = padding
    y = jax.lax.conv_general_dilated(x, w, (stride, stride), ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=jax.lax.Precision.HIGHEST) * a + b
    if residual is not None:
        y = y + residual
    return jnp.maximum(y, 0) if relu else y


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_conv_affine_act_equals_lax(case, relu, with_residual):
    n, h, cin, cout, k, s, p = case
    rs = np.random.RandomState(sum(case))
    x = jnp.asarray(rs.randn(n, h, h, cin).astype(np.float32))
    w = jnp.asarray(rs.randn(k, k, cin, cout).astype(np.float32) / np.sqrt(k * k * cin))
    a = jnp.asarray(rs.uniform(0.5, 1.5, cout).astype(np.float32))
    b = jnp.asarray(rs.randn(cout).astype(np.float32))
    ho = (h + 2 * p - k) // s + 1
    r = jnp.asarray(rs.randn(n, ho, ho, cout).astype(np.float32)) if with_residual else None
    got = jax.jit(lambda x, w, a, b, r: onednn.conv_affine_act(x, w, a, b, s, p, relu, r))(x, w, a, b, r)
    want = _ref(x, w, a, b, s, p, relu, r)
    assert got.shape == want.shape == (n, ho, ho, cout)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    if relu:
        assert float(got.min()) == 0.0 and float((got == 0).mean()) > 0.1  # the ReLU did clamp
    else:
        assert float(got.min()) < 0


def test_conv_affine_act_refuses_bad_shapes():
    x, w = jnp.zeros((1, 8, 8, 4)), jnp.zeros((3, 3, 4, 6))
    with pytest.raises(ValueError, match="bias shape"):
        onednn.conv_affine_act(x, w, None, jnp.zeros((5,)), 1, 1, True)
    with pytest.raises(ValueError, match="scale shape"):
        onednn.conv_affine_act(x, w, jnp.zeros((4,)), jnp.zeros((6,)), 1, 1, True)
    with pytest.raises(ValueError, match="residual shape"):
        onednn.conv_affine_act(x, w, None, jnp.zeros((6,)), 1, 1, True, jnp.zeros((1, 4, 4, 6)))


def test_materialize_is_the_identity_that_xla_cannot_fuse_through():
    """`onednn.materialize`: same values and dtype, the gradient passes through, and under jit the value is one custom
    call that the consumers read (two consumers of a materialised `sin` do not each recompute it)."""
    x = jnp.asarray(np.random.RandomState(0).randn(2, 5, 7, 3).astype(np.float32))
    np.testing.assert_array_equal(jax.jit(onednn.materialize)(x), x)
    xi = jnp.arange(6, dtype=jnp.int32).reshape(2, 3)
    np.testing.assert_array_equal(jax.jit(onednn.materialize)(xi), xi)
    f = lambda x: jnp.sum(onednn.materialize(jnp.sin(x)) ** 2)  # noqa: E731
    np.testing.assert_allclose(jax.grad(f)(x), 2 * jnp.sin(x) * jnp.cos(x), rtol=1e-6, atol=1e-6)

    def two_consumers(x):
        s = onednn.materialize(jnp.sin(x))
        return s * 2 + 1, jnp.exp(s)

    hlo = jax.jit(two_consumers).lower(x).compile().as_text()
    assert hlo.count('custom_call_target="OnednnMaterialize"') == 1
    assert hlo.count(" sine(") == 1  # computed once, not duplicated into each consumer's fusion
    a, b = jax.jit(two_consumers)(x)
    np.testing.assert_allclose(a, np.sin(x) * 2 + 1, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(b, np.exp(np.sin(x)), rtol=1e-6, atol=1e-6)
