"""research/cpu/kernels: the oneDNN convolutions with `groups` (one grouped primitive) give lax's
grouped convolution (`feature_group_count`) and its input and kernel gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.cpu.kernels import onednn

# (batch, height, width, cin, cout, kernel, stride, padding, groups)
CASES = [
    (2, 9, 9, 8, 12, 3, 1, 0, 2),     # AlexNet-like conv4/5: 3x3, two groups
    (1, 13, 11, 6, 9, 5, 2, 1, 3),    # strided, padded, three groups, odd sizes
    (2, 10, 10, 4, 8, 3, 1, 1, 4),    # depthwise-like: one input channel per group
    (1, 12, 12, 140, 16, 3, 1, 0, 2), # > 64 input channels per group
    (2, 8, 8, 6, 6, 3, 1, 1, 1),      # groups 1: the ungrouped path through the same entry points
]


@pytest.fixture(scope="module", autouse=True)
def _kernels():
    ok, why = onednn.available()
    if not ok:
        pytest.skip(f"oneDNN kernels unavailable: {why}")


def _lax(x, w, stride, pad, groups):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
                                        precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("b,h,wd,cin,cout,k,stride,pad,groups", CASES)
def test_grouped_conv_and_gradients_equal_lax(b, h, wd, cin, cout, k, stride, pad, groups):
    rs = np.random.RandomState(cin + groups)
    x = jnp.asarray(rs.randn(b, h, wd, cin).astype(np.float32))
    w = jnp.asarray(rs.randn(k, k, cin // groups, cout).astype(np.float32) / np.sqrt(k * k * cin / groups))
    ref, vjp = jax.vjp(lambda x, w: _lax(x, w, stride, pad, groups), x, w)
    y = jax.jit(lambda x, w: onednn.conv(x, w, stride, pad, groups))(x, w)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))
    dy = jnp.asarray(rs.randn(*ref.shape).astype(np.float32))
    dx_ref, dw_ref = vjp(dy)
    dx = jax.jit(lambda dy, w: onednn.conv_input_grad(dy, w, x.shape, stride, pad, groups))(dy, w)
    dw = jax.jit(lambda x, dy: onednn.conv_kernel_grad(x, dy, w.shape, stride, pad, groups))(x, dy)
    for got, want in ((dx, dx_ref), (dw, dw_ref)):
        assert got.shape == want.shape and float(jnp.abs(want).max()) > 1e-3
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()))


def test_groups_are_kept_apart():
    """Output group g depends on input group g only (an ungrouped kernel would mix them)."""
    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.randn(1, 7, 7, 8).astype(np.float32))
    w = jnp.asarray(rs.randn(3, 3, 4, 6).astype(np.float32))
    y = onednn.conv(x, w, 1, 0, 2)
    y_cut = onednn.conv(x.at[..., 4:].set(0.0), w, 1, 0, 2)
    np.testing.assert_array_equal(y_cut[..., :3], y[..., :3])
    assert float(jnp.abs(y_cut[..., 3:] - y[..., 3:]).max()) > 1.0


def test_groups_that_do_not_fit_are_refused():
    x = jnp.zeros((1, 8, 8, 6), jnp.float32)
    with pytest.raises(ValueError, match="groups=4 does not fit 6 input channels"):
        onednn.conv(x, jnp.zeros((3, 3, 3, 8), jnp.float32), 1, 0, 4)
    with pytest.raises(ValueError, match="groups=2 does not fit 6 input channels"):
        onednn.conv(x, jnp.zeros((3, 3, 3, 5), jnp.float32), 1, 0, 2)  # 5 output channels
    with pytest.raises(ValueError, match="groups=2 does not fit"):
        onednn.conv_kernel_grad(x, jnp.zeros((1, 6, 6, 8), jnp.float32), (3, 3, 6, 8), 1, 0, 2)
