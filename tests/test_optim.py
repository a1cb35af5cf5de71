"""research/optim.py: parameter groups from the official configs' name patterns."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from research import optim


def _params():
    return {"backbone": {"conv1": {"kernel": jnp.ones((3, 3, 3, 4))}, "norm": {"scale": jnp.ones(4),
                                                                                "bias": jnp.zeros(4)}},
            "encoder": {"proj": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)},
                        "norm": {"scale": jnp.ones(4), "bias": jnp.zeros(4)}}}


def test_official_rtdetr_patterns_label_by_torch_names():
    rules = [(r"^(?=.*backbone)(?!.*norm).*$", "backbone"),
             (r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bias)).*$", "no_decay")]
    labels = optim.group_labels(_params(), rules, default="rest")
    assert labels["backbone"]["conv1"]["kernel"] == "backbone"
    assert labels["backbone"]["norm"]["scale"] == "rest"  # backbone norms: the default group
    assert labels["encoder"]["proj"]["kernel"] == "rest"
    assert labels["encoder"]["proj"]["bias"] == "no_decay" and labels["encoder"]["norm"]["scale"] == "no_decay"
    assert optim.param_name([jax.tree_util.DictKey("a"), jax.tree_util.DictKey("0"),
                             jax.tree_util.DictKey("scale")]) == "a.0.weight"


def test_groups_drive_optax_multi_transform_and_decay_mask():
    params = _params()
    labels = optim.group_labels(params, [(r"^backbone\.", "backbone")], default="rest")
    tx = optax.multi_transform({"backbone": optax.sgd(0.1), "rest": optax.sgd(1.0)}, labels)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert np.allclose(updates["backbone"]["conv1"]["kernel"], -0.1)
    assert np.allclose(updates["encoder"]["proj"]["kernel"], -1.0)
    decay = optim.mask(params, [r"norm", r"\.bias$"])
    assert decay["encoder"]["proj"]["kernel"] and not decay["encoder"]["proj"]["bias"]
    assert not decay["backbone"]["norm"]["scale"]
