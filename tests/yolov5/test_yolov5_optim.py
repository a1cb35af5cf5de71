"""Tests of research/yolov5/optim.py against torch (SGD, clip_grad_norm_, LambdaLR + the train.py
warmup loop) and against the official formulas (schedule endpoints, weight decay, EMA)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from research.yolov5 import optim as yopt
from research.yolov5.loss import HYP_SCRATCH_LOW


class _Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
        x = nn.LayerNorm(name="ln")(x)
        return nn.Conv(5, (1, 1), name="detect")(x)


def _tiny_variables():
    """Variables of a real Flax model (structure from tracing init; values drawn, to stay fast)."""
    shapes = jax.eval_shape(_Tiny().init, jax.random.PRNGKey(0), jnp.ones((1, 6, 6, 3)))
    rng = np.random.default_rng(9)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)


def test_param_labels():
    params = _tiny_variables()["params"]
    labels = yopt.param_labels(params)
    assert labels == {"conv": {"kernel": "weight"}, "bn": {"scale": "bn_weight", "bias": "bias"},
                      "ln": {"scale": "bn_weight", "bias": "bias"},
                      "detect": {"kernel": "weight", "bias": "bias"}}


def _groups_case(rng):
    params = {"a": {"kernel": rng.normal(size=(3, 4)).astype(np.float32),
                    "bias": rng.normal(size=(4,)).astype(np.float32)},
              "bn": {"scale": rng.uniform(0.5, 1.5, size=(4,)).astype(np.float32),
                     "bias": rng.normal(size=(4,)).astype(np.float32)},
              "b": {"kernel": rng.normal(size=(2, 2, 4, 2)).astype(np.float32)}}
    return params


def _torch_groups(params):
    import torch
    tp = jax.tree.map(lambda x: torch.tensor(np.array(x), requires_grad=True), params)
    labels = yopt.param_labels(params)
    groups = {lab: [] for lab in ("bias", "weight", "bn_weight")}
    for p, lab in zip(jax.tree.leaves(tp), jax.tree.leaves(labels)):
        groups[lab].append(p)
    return tp, groups


def test_torch_sgd_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    params = _groups_case(rng)
    steps = 6
    lrs = {"bias": np.array([0.1, 0.08, 0.05, 0.03, 0.02, 0.01]),
           "weight": np.array([0.0, 0.002, 0.004, 0.006, 0.008, 0.01]),
           "bn_weight": np.array([0.0, 0.003, 0.004, 0.005, 0.02, 0.01])}
    mom = np.array([0.8, 0.83, 0.87, 0.9, 0.937, 0.937])
    wd = {"weight": 5e-3, "bias": 0.0, "bn_weight": 0.0}
    grads = [jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params) for _ in range(steps)]

    tp, groups = _torch_groups(params)
    opt = torch.optim.SGD([{"params": groups["bias"]},
                           {"params": groups["weight"], "weight_decay": wd["weight"]},
                           {"params": groups["bn_weight"], "weight_decay": 0.0}],
                          lr=0.01, momentum=0.9, nesterov=True)
    names = ["bias", "weight", "bn_weight"]

    tx = yopt.torch_sgd({k: (lambda s, v=v: jnp.asarray(v, jnp.float32)[s]) for k, v in lrs.items()},
                        lambda s: jnp.asarray(mom, jnp.float32)[s], nesterov=True, weight_decay=wd)
    state = tx.init(params)
    update = jax.jit(tx.update)
    jp = params
    for s in range(steps):
        for g, name in zip(opt.param_groups, names):
            g["lr"], g["momentum"] = float(lrs[name][s]), float(mom[s])
        for p, gr in zip(jax.tree.leaves(tp), jax.tree.leaves(grads[s])):
            p.grad = torch.tensor(gr)
        opt.step()
        upd, state = update(grads[s], state, jp)
        jp = optax.apply_updates(jp, upd)
        for a, b in zip(jax.tree.leaves(jp), jax.tree.leaves(tp)):
            np.testing.assert_allclose(np.asarray(a), b.detach().numpy(), rtol=1e-6, atol=1e-7)
        assert int(state.count) == s + 1
        assert float(state.momentum) == pytest.approx(mom[s])
        assert float(state.lr["bias"]) == pytest.approx(lrs["bias"][s])


def test_torch_sgd_step_argument_and_plain_sgd():
    """`step=` overrides the schedule position; without momentum schedules it is plain SGD."""
    params = {"w": jnp.ones((3,)), "bias": jnp.ones((2,))}
    grads = {"w": jnp.full((3,), 2.0), "bias": jnp.full((2,), 1.0)}
    tx = yopt.torch_sgd({"weight": lambda s: 0.1 * s, "bias": 0.5}, momentum=0.0, nesterov=False,
                        labels={"w": "weight", "bias": "bias"})
    state = tx.init(params)
    upd, state = tx.update(grads, state, params, step=3)
    np.testing.assert_allclose(upd["w"], -0.3 * 2.0 * np.ones(3), rtol=1e-6)
    np.testing.assert_allclose(upd["bias"], -0.5 * np.ones(2), rtol=1e-6)
    upd, state = tx.update(grads, state, params)  # position = count = 1
    np.testing.assert_allclose(upd["w"], -0.1 * 2.0 * np.ones(3), rtol=1e-6)


def test_clip_grad_norm_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    for scale in (0.1, 10.0):
        grads = {"a": (scale * rng.normal(size=(5, 7))).astype(np.float32),
                 "b": (scale * rng.normal(size=(11,))).astype(np.float32)}
        tg = [torch.tensor(grads["a"]), torch.tensor(grads["b"])]
        ps = [torch.zeros_like(t, requires_grad=True) for t in tg]
        for p, g in zip(ps, tg):
            p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(ps, max_norm=10.0)
        out, _ = yopt.clip_grad_norm_torch(10.0).update(grads, optax.EmptyState())
        np.testing.assert_allclose(out["a"], ps[0].grad.numpy(), rtol=1e-6)
        np.testing.assert_allclose(out["b"], ps[1].grad.numpy(), rtol=1e-6)


def test_weight_decay_scaling():
    assert yopt.nominal_accumulate(16) == 4 and yopt.nominal_accumulate(24) == 3
    assert yopt.nominal_accumulate(128) == 1
    assert yopt.scaled_weight_decay(5e-4, 16) == pytest.approx(5e-4)
    assert yopt.scaled_weight_decay(5e-4, 24) == pytest.approx(5e-4 * 24 * 3 / 64)
    assert yopt.scaled_weight_decay(5e-4, 128) == pytest.approx(1e-3)


def _sched(**kw):
    base = dict(epochs=10, steps_per_epoch=50, batch_size=16)
    base.update(kw)
    return yopt.Yolov5Schedule.from_hyp(HYP_SCRATCH_LOW, **base)


@pytest.mark.parametrize("cos_lr", [False, True])
def test_schedule_endpoints(cos_lr):
    s = _sched(cos_lr=cos_lr)
    nw = s.warmup_iters
    assert nw == 150  # max(round(3.0 * 50), 100)
    lf = s.lf
    assert lf(0) == pytest.approx(1.0) and lf(10) == pytest.approx(0.01)
    v0 = yopt.schedule_values(0, **dataclass_kwargs(s))
    assert v0 == {"lr_bias": 0.1, "lr_weight": 0.0, "lr_bn": 0.0, "momentum": 0.8, "accumulate": 1}
    vw = s.values(nw)  # warmup end lies in epoch 3
    for k in ("lr_bias", "lr_weight", "lr_bn"):
        assert vw[k] == pytest.approx(0.01 * lf(3), rel=1e-12)
    assert vw["momentum"] == pytest.approx(0.937) and vw["accumulate"] == 4
    mid = s.values(75)  # half way, epoch 1
    assert mid["lr_bias"] == pytest.approx(0.5 * 0.1 + 0.5 * 0.01 * lf(1))
    assert mid["lr_weight"] == pytest.approx(0.5 * 0.01 * lf(1))
    assert mid["momentum"] == pytest.approx(0.8685)
    assert mid["accumulate"] == 2  # round(2.5) = 2: numpy rounds half to even
    for epoch in (4, 7, 9):  # epoch boundaries after warmup: constant within an epoch
        before, start, end = s.values(epoch * 50 - 1), s.values(epoch * 50), s.values(epoch * 50 + 49)
        assert before["lr_weight"] == pytest.approx(0.01 * lf(epoch - 1), rel=1e-12)
        assert start["lr_weight"] == end["lr_weight"] == start["lr_bias"] == pytest.approx(0.01 * lf(epoch))
        assert start["momentum"] == 0.937 and start["accumulate"] == 4
    # the traced version agrees over the whole run
    ni = np.arange(0, 10 * 50)
    jv = jax.jit(jax.vmap(s.values_jnp))(jnp.asarray(ni))
    hv = [s.values(int(i)) for i in ni]
    np.testing.assert_array_equal(np.asarray(jv["accumulate"]), [h["accumulate"] for h in hv])
    for k in ("lr_bias", "lr_weight", "lr_bn", "momentum"):
        np.testing.assert_allclose(np.asarray(jv[k]), [h[k] for h in hv], rtol=2e-6, atol=1e-9)


def dataclass_kwargs(s):
    import dataclasses
    return {f.name: getattr(s, f.name) for f in dataclasses.fields(s)}


def test_official_training_loop_with_torch():
    """train.py's loop (LambdaLR, warmup, accumulation, clip, 3-group nesterov SGD) restated with
    torch versus yolov5_sgd driven with step=ni and summed gradients."""
    torch = pytest.importorskip("torch")
    epochs, nb, bs = 4, 30, 24  # nw = 100 iterations spans epochs 0..3; accumulate ramps 1 -> 3
    hyp = dict(HYP_SCRATCH_LOW)
    sched = yopt.Yolov5Schedule.from_hyp(hyp, epochs=epochs, steps_per_epoch=nb, batch_size=bs)
    rng = np.random.default_rng(2)
    params = _groups_case(rng)
    noise = [jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
             for _ in range(epochs * nb)]

    # torch, as train.py
    tp, groups = _torch_groups(params)
    wd = yopt.scaled_weight_decay(hyp["weight_decay"], bs)
    opt = torch.optim.SGD(groups["bias"], lr=hyp["lr0"], momentum=hyp["momentum"], nesterov=True)
    opt.add_param_group({"params": groups["weight"], "weight_decay": wd})
    opt.add_param_group({"params": groups["bn_weight"], "weight_decay": 0.0})
    lf = sched.lf
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=lf)
    nw = sched.warmup_iters
    accumulate = max(round(64 / bs), 1)
    last = -1
    tleaves = jax.tree.leaves(tp)
    opt.zero_grad()
    for epoch in range(epochs):
        for i in range(nb):
            ni = i + nb * epoch
            if ni <= nw:
                accumulate = max(1, np.interp(ni, [0, nw], [1, 64 / bs]).round())
                for j, g in enumerate(opt.param_groups):
                    g["lr"] = np.interp(ni, [0, nw], [hyp["warmup_bias_lr"] if j == 0 else 0.0,
                                                      g["initial_lr"] * lf(epoch)])
                    g["momentum"] = np.interp(ni, [0, nw], [hyp["warmup_momentum"], hyp["momentum"]])
            with torch.no_grad():
                for p, n in zip(tleaves, jax.tree.leaves(noise[ni])):
                    g = torch.tensor(n) + 0.1 * p
                    p.grad = g if p.grad is None else p.grad + g
            if ni - last >= accumulate:
                torch.nn.utils.clip_grad_norm_(tleaves, max_norm=10.0)
                opt.step()
                opt.zero_grad()
                last = ni
        scheduler.step()

    # ours
    tx = yopt.yolov5_sgd(hyp, sched)
    state = tx.init(params)
    update = jax.jit(lambda g, s, p, ni: tx.update(g, s, p, step=ni))
    jp = jax.tree.map(jnp.asarray, params)
    acc = None
    last = -1
    for ni in range(epochs * nb):
        g = jax.tree.map(lambda n, p: n + 0.1 * p, noise[ni], jp)
        acc = g if acc is None else jax.tree.map(jnp.add, acc, g)
        if ni - last >= sched.values(ni)["accumulate"]:
            upd, state = update(acc, state, jp, ni)
            jp = optax.apply_updates(jp, upd)
            acc, last = None, ni
    for a, b in zip(jax.tree.leaves(jp), tleaves):
        np.testing.assert_allclose(np.asarray(a), b.detach().numpy(), rtol=2e-5, atol=2e-6)


def test_ema():
    assert yopt.ema_decay(1) == pytest.approx(0.9999 * (1 - math.exp(-1 / 2000)), rel=1e-12)
    assert yopt.ema_decay(2000) == pytest.approx(0.9999 * (1 - math.exp(-1)), rel=1e-12)
    assert float(yopt.ema_decay(jnp.asarray(1))) == pytest.approx(0.9999 * (1 - math.exp(-1 / 2000)), rel=1e-6)

    variables = _tiny_variables()
    variables = {**variables, "counter": {"n": jnp.asarray(3, jnp.int32)}}
    state = yopt.ema_init(variables)
    assert int(state.updates) == 0
    update = jax.jit(yopt.ema_update)
    rng = np.random.default_rng(4)
    ref = jax.tree.map(lambda x: np.asarray(x, np.float64), variables)
    model = variables
    for k in range(1, 4):
        model = jax.tree.map(
            lambda x: x + rng.normal(size=x.shape).astype(np.float32) if x.dtype == jnp.float32 else x + 1,
            model)
        state = update(state, model)
        d = 0.9999 * (1 - math.exp(-k / 2000))
        ref = jax.tree.map(lambda e, m: e * d + (1 - d) * np.asarray(m, np.float64)
                           if m.dtype == jnp.float32 else e, ref, model)
        assert int(state.updates) == k
    for a, b in zip(jax.tree.leaves(state.variables), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6)
    # BatchNorm statistics are averaged too; integer leaves keep their EMA value
    assert not np.allclose(state.variables["batch_stats"]["bn"]["mean"], variables["batch_stats"]["bn"]["mean"])
    assert int(state.variables["counter"]["n"]) == 3
    # at updates = 2000 the decay is 0.9999 (1 - 1/e)
    s2 = yopt.EmaState(variables={"x": jnp.zeros(())}, updates=jnp.asarray(1999, jnp.int32))
    s2 = yopt.ema_update(s2, {"x": jnp.ones(())})
    assert float(s2.variables["x"]) == pytest.approx(1 - 0.9999 * (1 - math.exp(-1)), rel=1e-6)
