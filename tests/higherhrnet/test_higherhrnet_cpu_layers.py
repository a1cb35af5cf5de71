"""HigherHRNet through the CPU speed layer (`research.cpu.layers`): the same parameter tree as plain flax, the same
outputs, loss and gradients; the task builds it from `config.model.conv_impl` and keeps the export graph plain."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.higherhrnet import get_config
from research.cpu import layers as cpu_layers
from research.higherhrnet import bench_inputs
from research.higherhrnet import task as task_lib
from research.higherhrnet.model import PhaseConvTranspose


def _task(conv_impl: str):
    c = get_config("smoke")
    c.model.conv_impl = conv_impl
    return task_lib.Task(c, "train")


@pytest.mark.parametrize("impl", ["auto"])  # oneDNN where it builds, else "dot"
def test_speed_layer_same_tree_outputs_and_gradients(impl):
    plain, fast = _task("lax"), _task(impl)
    assert plain.layers == cpu_layers.PLAIN and fast.layers.conv_impl in ("dot", "onednn") and fast.layers.lean_norm
    x = jnp.zeros((1, 64, 64, 3))
    variables = plain.model.init(jax.random.PRNGKey(1), x)
    shapes = jax.eval_shape(lambda: fast.model.init(jax.random.PRNGKey(1), x))
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(variables)
    assert jax.tree_util.tree_map(lambda a: a.shape, shapes) == jax.tree_util.tree_map(jnp.shape, variables)
    imgs = np.random.default_rng(0).random((2, 64, 64, 3), dtype=np.float32)
    for a, b in zip(plain.forward_fn(variables)(imgs), fast.forward_fn(variables)(imgs)):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-4 * np.abs(np.asarray(a)).max()
    batch = bench_inputs.train_batch(2, 64, 17)

    def grads(task):
        f = jax.jit(jax.value_and_grad(lambda p: task.loss_fn(p, variables["batch_stats"], batch, None)[0]))
        return f(variables["params"])

    (la, ga), (lb, gb) = grads(plain), grads(fast)
    assert float(lb) == pytest.approx(float(la), rel=1e-4)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ga), jax.tree_util.tree_leaves(gb)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 1e-3 * np.abs(a).max() + 1e-9, jax.tree_util.keystr(path)


def test_export_graph_stays_plain():
    import flax.linen as nn
    t = _task("auto")
    assert t.model.conv.func is cpu_layers.FlaxConv and t.model.norm is cpu_layers.FlaxBatchNorm
    assert t.export_model.conv is nn.Conv and t.export_model.norm is nn.BatchNorm
    # the transposed convolution's phase convolutions: the speed layer's in training, flax's plain ones in the export
    assert t.model.conv_transpose.keywords == {"impl": t.layers.conv_impl}
    assert t.export_model.conv_transpose is PhaseConvTranspose
    with pytest.raises(ValueError, match="conv_impl"):
        _task("fast")
