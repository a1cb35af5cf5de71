"""research/cpu/conv.py: every computation gives lax's convolution and gradients, nn.Conv's parameters."""

import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.cpu import conv

# (batch, size, cin, cout, kernel, stride, padding, groups): each routing branch of conv2d
CASES = [
    (2, 9, 5, 7, 1, 1, 0, 1),    # 1x1: one dot
    (2, 9, 5, 7, 1, 2, 0, 1),    # 1x1 strided: subsample, dot
    (2, 12, 3, 32, 6, 2, 2, 1),  # YOLOv5 stem: per-tap kernel gradient (stride 2, cin*cout >= 96)
    (2, 10, 16, 8, 3, 2, 1, 1),  # strided 3x3: per-tap kernel gradient
    (1, 6, 64, 8, 3, 1, 1, 1),   # stride 1, 64 channels: per-tap kernel gradient
    (2, 8, 8, 8, 3, 1, 1, 1),    # stride 1, few channels: lax
    (2, 11, 3, 8, 3, 2, 1, 1),   # strided, few channels: phase input gradient, lax kernel gradient
    (1, 11, 2, 4, 6, 2, 2, 1),   # odd size, 6x6 stride 2: phases of unequal tap counts
    (1, 13, 2, 3, 5, 3, 0, 1),   # stride 3, no padding: input rows no tap reaches
    (2, 8, 8, 8, 3, 1, 1, 2),    # grouped: lax
    (1, 6, 128, 8, 3, 1, 1, 1),  # onednn: > 64 input channels, per-tap kernel gradient
    (1, 7, 96, 8, 3, 2, 1, 1),   # onednn: > 64 input channels, strided
]
IMPLS = ["dot", "onednn"]


def _inputs(b, s, cin, cout, k, groups, seed=0):
    rs = np.random.RandomState(seed)
    x = jnp.asarray(rs.randn(b, s, s, cin).astype(np.float32))
    w = jnp.asarray(rs.randn(k, k, cin // groups, cout).astype(np.float32) / np.sqrt(k * k * cin))
    return x, w


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("b,s,cin,cout,k,stride,pad,groups", CASES)
def test_impl_equals_lax_forward_and_gradients(b, s, cin, cout, k, stride, pad, groups, impl):
    x, w = _inputs(b, s, cin, cout, k, groups)

    def loss(impl):
        # a non-uniform weighting of the output, so every output gradient entry differs
        def f(x, w):
            y = conv.conv2d(x, w, stride, pad, groups, impl)
            return jnp.sum(jnp.sin(y) * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / y.size)
        return f

    y_lax = conv.conv2d(x, w, stride, pad, groups, "lax")
    y_dot = jax.jit(lambda x, w: conv.conv2d(x, w, stride, pad, groups, impl))(x, w)
    assert y_dot.shape == y_lax.shape
    np.testing.assert_allclose(y_dot, y_lax, rtol=1e-5, atol=1e-5)
    g_lax = jax.grad(loss("lax"), argnums=(0, 1))(x, w)
    g_dot = jax.jit(jax.grad(loss(impl), argnums=(0, 1)))(x, w)
    for a, c in zip(g_dot, g_lax):
        assert float(jnp.max(jnp.abs(c))) > 1e-3  # a real gradient, not zeros on both sides
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5)


def test_routing_takes_the_per_tap_gradient_where_it_pays():
    x, w = _inputs(1, 6, 64, 8, 3, 1)
    jaxpr = str(jax.make_jaxpr(lambda x, w: conv.conv2d(x, w, 1, 1, 1, "dot"))(x, w))
    assert "custom_vjp_call" in jaxpr
    x, w = _inputs(1, 6, 8, 8, 3, 1)
    assert "custom_vjp_call" not in str(jax.make_jaxpr(lambda x, w: conv.conv2d(x, w, 1, 1, 1, "dot"))(x, w))
    x, w = _inputs(1, 6, 8, 8, 3, 1)
    assert "custom_vjp_call" in str(jax.make_jaxpr(lambda x, w: conv.conv2d(x, w, 2, 1, 1, "dot"))(x, w))
    x, w = _inputs(1, 6, 8, 8, 1, 1)
    assert "conv_general_dilated" not in str(jax.make_jaxpr(lambda x, w: conv.conv2d(x, w, 1, 0, 1, "dot"))(x, w))
    assert conv.resolve_impl("auto") == ("onednn" if jax.default_backend() == "cpu" else "lax")


def _targets(fn, *args):
    return set(re.findall(r"target_name=(\w+)", str(jax.make_jaxpr(fn)(*args))))


def test_onednn_routing():
    x, w = _inputs(1, 6, 32, 8, 3, 1)
    fwd = lambda x, w: conv.conv2d(x, w, 2, 1, 1, "onednn")  # noqa: E731
    grad = jax.grad(lambda x, w: jnp.sum(fwd(x, w)), argnums=(0, 1))
    assert _targets(fwd, x, w) == {"OnednnConvFwd"}
    assert _targets(grad, x, w) == {"OnednnConvFwd", "OnednnConvBwdData", "OnednnConvBwdW"}
    x, w = _inputs(1, 6, 128, 8, 3, 1)  # many input channels: oneDNN's kernel gradient too (faster at every shape timed)
    assert _targets(grad, x, w) == {"OnednnConvFwd", "OnednnConvBwdData", "OnednnConvBwdW"}
    x, w = _inputs(1, 6, 32, 8, 1, 1)  # 1x1 and bfloat16: as "dot"
    assert not _targets(fwd, x, w)
    x, w = _inputs(1, 6, 32, 8, 3, 1)
    assert not _targets(fwd, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))


def test_onednn_build_is_cached_and_reports_a_missing_compiler(tmp_path, monkeypatch):
    from research.cpu.kernels import onednn
    monkeypatch.setenv("RESEARCH_KERNEL_CACHE", str(tmp_path / "k"))
    path = onednn.build()
    assert path.startswith(str(tmp_path / "k")) and os.path.getsize(path) > 0
    mtime = os.path.getmtime(path)
    assert onednn.build() == path and os.path.getmtime(path) == mtime  # reused, not rebuilt
    monkeypatch.setenv("RESEARCH_KERNEL_CACHE", str(tmp_path / "k2"))
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(onednn.OnednnUnavailable, match="C\\+\\+ compiler 'no-such-compiler' not found"):
        onednn.build()


def test_auto_falls_back_to_dot_where_onednn_is_unavailable(monkeypatch, caplog):
    from research.cpu.kernels import onednn
    monkeypatch.setattr(onednn, "available", lambda: (False, "no oneDNN here"))
    conv._onednn_ok.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            assert conv.resolve_impl("auto") == "dot"
        assert "no oneDNN here" in caplog.text
        with pytest.raises(onednn.OnednnUnavailable, match="conv_impl 'onednn': no oneDNN here"):
            conv.resolve_impl("onednn")
    finally:
        conv._onednn_ok.cache_clear()


def test_bfloat16_kernel_gradient_stays_close():
    x, w = _inputs(2, 10, 16, 8, 3, 1)
    f = lambda impl: jax.grad(  # noqa: E731
        lambda w: jnp.sum(conv.conv2d(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), 2, 1, 1, impl)
                          .astype(jnp.float32) ** 2))(w)
    ref = jax.grad(lambda w: jnp.sum(conv.conv2d(x, w, 2, 1, 1, "lax") ** 2))(w)
    for impl in IMPLS:  # bfloat16 takes the "dot" computation under "onednn"
        np.testing.assert_allclose(f(impl), ref, rtol=0.05, atol=0.05 * float(jnp.max(jnp.abs(ref))))


def test_conv2d_module_has_nn_conv_parameters_and_outputs():
    x, _ = _inputs(2, 8, 6, 4, 3, 1)
    ours = conv.Conv2D(4, 3, stride=2, padding=1, use_bias=True, impl="dot")
    ref = nn.Conv(4, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=True)
    v = ref.init(jax.random.PRNGKey(0), x)
    v = jax.tree_util.tree_map(lambda a: a + 0.1, v)  # a non-zero bias
    assert jax.tree_util.tree_structure(ours.init(jax.random.PRNGKey(0), x)) == jax.tree_util.tree_structure(v)
    np.testing.assert_allclose(ours.apply(v, x), ref.apply(v, x), rtol=1e-5, atol=1e-5)


def test_unknown_impl_is_an_error():
    x, w = _inputs(1, 4, 2, 2, 1, 1)
    with pytest.raises(ValueError, match="conv_impl 'fast'"):
        conv.conv2d(x, w, impl="fast")
