"""YOLOv5 v7.0 training optimisation (train.py, smart_optimizer, ModelEMA) as optax / JAX pieces.

What the official recipe does, and where each part lives here:
  * three parameter groups (`smart_optimizer`): biases (no decay), norm-layer weights
    (no decay) and all other weights (decay)          -> `param_labels`
  * torch.optim.SGD(nesterov=True) with per-group lr     -> `torch_sgd`
  * gradient clipping `clip_grad_norm_(max_norm=10)`      -> `clip_grad_norm_torch`
  * LambdaLR per epoch (linear or one_cycle), warmup of lr, momentum and the gradient
    accumulation count over the first `nw` batches      -> `Yolov5Schedule`, `schedule_values`
  * weight decay scaled by the nominal batch size 64     -> `scaled_weight_decay`
  * ModelEMA over the whole state (params + BN stats)    -> `ema_init`, `ema_update`

Schedule position. Warmup counts batches (`ni`), not optimizer steps: with gradient
accumulation several batches make one step. So `torch_sgd`'s update takes the schedule
position as an extra keyword, `tx.update(grads, state, params, step=ni)`, which optax.chain
forwards; without it the schedules read the optimizer step count kept in the state (so on
its own the transform behaves like a torch optimizer whose schedules follow its steps).
The values used at the last update are kept in the state (`lr`, `momentum`) for logging.

Gradient accumulation (the trainer's job): the official loss is already multiplied by the
batch size and `backward()` sums gradients over the accumulated batches, so accumulate by
summing gradients, not averaging, and step when `ni - last_opt_step >= accumulate`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from research import optim as shared_optim

LABELS = ("bias", "bn_weight", "weight")
NBS = 64  # official nominal batch size

Schedule = Union[float, Callable[[Any], Any]]


# ---------------------------------------------------------------- parameter groups

# the official train.py groups: norm-layer weights (g[1], flax's `scale`) and biases (g[2])
# without decay, the other weights (g[0]) with it; matched on the Flax leaf names
_GROUP_RULES = ((r"(^|\.)bias$", "bias"), (r"(^|\.)scale$", "bn_weight"))


def param_labels(params: Any) -> Any:
    """Labels every leaf of a Flax params tree with its official optimizer group.

    `bias` leaves -> "bias" (no decay); BatchNorm weights (`bn.scale`, which the official code
    groups by the module being a `*Norm*`) -> "bn_weight" (no decay); every other leaf (conv /
    dense kernels) -> "weight" (decayed). Through the shared `research.optim.group_labels`.
    """
    return shared_optim.group_labels(params, _GROUP_RULES, default="weight", torch_names=False)


# ---------------------------------------------------------------- torch SGD

class TorchSGDState(NamedTuple):
    count: jax.Array          # int32: optimizer steps taken
    momentum_buffer: Any      # like params
    lr: dict                  # label -> float32 lr used at the last update (for logging)
    momentum: jax.Array       # momentum used at the last update (for logging)


def _evaluate(schedule: Schedule, step) -> jax.Array:
    value = schedule(step) if callable(schedule) else schedule
    return jnp.asarray(value, jnp.float32)


def torch_sgd(learning_rates: Mapping[str, Schedule], momentum: Schedule, nesterov: bool = True,
              weight_decay: Mapping[str, float] | None = None,
              labels: Any = param_labels) -> optax.GradientTransformationExtraArgs:
    """torch.optim.SGD (dampening 0) with one param group per label, as an optax transform.

    Per leaf with its group's lr and weight decay wd and the momentum m:
      g = grad + wd * p;  buf = g on the first step, else m * buf + g;
      d = g + m * buf (nesterov) or buf;  update = -lr * d.

    Args:
      learning_rates: label -> lr or schedule(step); every label present in the tree needs one.
      momentum: momentum or schedule(step).
      nesterov: torch's `nesterov`.
      weight_decay: label -> L2 coefficient (missing labels: 0).
      labels: pytree of labels matching params, or a function params -> labels.

    `update(grads, state, params, step=None)`: schedules are evaluated at `step` when given
    (the trainer passes the batch index ni), else at the optimizer step count.
    """
    learning_rates = dict(learning_rates)
    weight_decay = dict(weight_decay or {})

    def get_labels(params):
        return labels(params) if callable(labels) else labels

    def init_fn(params):
        return TorchSGDState(
            count=jnp.zeros((), jnp.int32),
            momentum_buffer=jax.tree.map(jnp.zeros_like, params),
            lr={k: jnp.zeros((), jnp.float32) for k in learning_rates},
            momentum=jnp.zeros((), jnp.float32))

    def update_fn(updates, state, params=None, *, step=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("torch_sgd needs params (weight decay and param groups)")
        pos = state.count if step is None else step
        lrs = {k: _evaluate(s, pos) for k, s in learning_rates.items()}
        m = _evaluate(momentum, pos)
        first = state.count == 0
        label_tree = get_labels(params)
        missing = set(jax.tree.leaves(label_tree)) - set(lrs)
        if missing:
            raise ValueError(f"no learning rate for param labels {sorted(missing)}")

        def leaf(g, p, buf, lab):
            dtype = g.dtype
            wd = weight_decay.get(lab, 0.0)
            if wd:
                g = g + wd * p
            buf = jnp.where(first, g, m.astype(dtype) * buf + g)
            d = g + m.astype(dtype) * buf if nesterov else buf
            return (-lrs[lab].astype(dtype) * d).astype(dtype), buf.astype(dtype)

        flat_g, treedef = jax.tree.flatten(updates)
        flat_p = treedef.flatten_up_to(params)
        flat_b = treedef.flatten_up_to(state.momentum_buffer)
        flat_l = treedef.flatten_up_to(label_tree)
        out = [leaf(g, p, b, l) for g, p, b, l in zip(flat_g, flat_p, flat_b, flat_l)]
        new_updates = treedef.unflatten([u for u, _ in out])
        new_buf = treedef.unflatten([b for _, b in out])
        return new_updates, TorchSGDState(count=state.count + 1, momentum_buffer=new_buf,
                                          lr=lrs, momentum=m)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def clip_grad_norm_torch(max_norm: float = 10.0) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_: grads *= min(1, max_norm / (global L2 norm + 1e-6))."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        leaves = jax.tree.leaves(updates)
        total = jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))
        coef = jnp.minimum(max_norm / (total + 1e-6), 1.0)
        return jax.tree.map(lambda g: (g * coef).astype(g.dtype), updates), state

    return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------- schedules

def nominal_accumulate(batch_size: int, nbs: int = NBS) -> int:
    """Batches per optimizer step after warmup: max(round(nbs / batch_size), 1)."""
    return max(round(nbs / batch_size), 1)


def scaled_weight_decay(weight_decay: float, batch_size: int, nbs: int = NBS) -> float:
    """Official weight decay scaling: wd * batch_size * accumulate / nbs."""
    return weight_decay * batch_size * nominal_accumulate(batch_size, nbs) / nbs


def lr_lambda(epochs: int, lrf: float, cos_lr: bool = False) -> Callable[[Any], Any]:
    """The LambdaLR factor lf(epoch): linear (default) or one_cycle(1, lrf, epochs) cosine.

    Works on python numbers (math) and on jax arrays (jnp) alike.
    """
    if cos_lr:
        def lf(x):
            cos = jnp.cos if isinstance(x, jax.Array) else math.cos
            return ((1 - cos(x * math.pi / epochs)) / 2) * (lrf - 1) + 1
    else:
        def lf(x):
            return (1 - x / epochs) * (1.0 - lrf) + lrf
    return lf


@dataclasses.dataclass(frozen=True)
class Yolov5Schedule:
    """train.py v7.0 lr / momentum / accumulation schedule as a function of the batch index ni.

    Attributes mirror the hyp keys; `steps_per_epoch` is nb (batches per epoch) and
    `batch_size` the total batch size (over all devices).
    """
    epochs: int
    steps_per_epoch: int
    batch_size: int
    lr0: float = 0.01
    lrf: float = 0.01
    momentum: float = 0.937
    warmup_epochs: float = 3.0
    warmup_momentum: float = 0.8
    warmup_bias_lr: float = 0.1
    cos_lr: bool = False
    nbs: int = NBS

    @classmethod
    def from_hyp(cls, hyp: Mapping[str, float], *, epochs: int, steps_per_epoch: int,
                 batch_size: int, cos_lr: bool = False, nbs: int = NBS) -> "Yolov5Schedule":
        keys = ("lr0", "lrf", "momentum", "warmup_epochs", "warmup_momentum", "warmup_bias_lr")
        return cls(epochs=epochs, steps_per_epoch=steps_per_epoch, batch_size=batch_size,
                   cos_lr=cos_lr, nbs=nbs, **{k: float(hyp[k]) for k in keys})

    @property
    def warmup_iters(self) -> int:
        """nw = max(round(warmup_epochs * nb), 100)."""
        return max(round(self.warmup_epochs * self.steps_per_epoch), 100)

    @property
    def lf(self) -> Callable[[Any], Any]:
        return lr_lambda(self.epochs, self.lrf, self.cos_lr)

    def _accumulate_host(self, ni) -> np.ndarray:
        ni = np.asarray(ni)
        nw = self.warmup_iters
        warm = np.maximum(1, np.round(np.interp(ni, [0, nw], [1, self.nbs / self.batch_size])))
        return np.where(ni <= nw, warm, nominal_accumulate(self.batch_size, self.nbs)).astype(np.int64)

    def values(self, ni: int) -> dict[str, float]:
        """Host (numpy float64) values at batch index ni, exactly as train.py sets them."""
        ni = int(ni)
        nw = self.warmup_iters
        epoch = ni // self.steps_per_epoch
        lr_epoch = self.lr0 * self.lf(epoch)
        if ni <= nw:
            xi = [0, nw]
            lr_bias = float(np.interp(ni, xi, [self.warmup_bias_lr, lr_epoch]))
            lr_other = float(np.interp(ni, xi, [0.0, lr_epoch]))
            mom = float(np.interp(ni, xi, [self.warmup_momentum, self.momentum]))
        else:
            lr_bias = lr_other = float(lr_epoch)
            mom = self.momentum
        return {"lr_bias": lr_bias, "lr_weight": lr_other, "lr_bn": lr_other, "momentum": mom,
                "accumulate": int(self._accumulate_host(ni))}

    def values_jnp(self, ni) -> dict[str, jax.Array]:
        """Same as `values` for a traced integer ni (float32 lr / momentum, exact accumulate)."""
        ni = jnp.asarray(ni, jnp.int32)
        nw = self.warmup_iters
        epoch = (ni // self.steps_per_epoch).astype(jnp.float32)
        lr_epoch = self.lr0 * self.lf(epoch)
        t = ni.astype(jnp.float32) / nw
        in_warmup = ni <= nw
        lr_bias = jnp.where(in_warmup, self.warmup_bias_lr + t * (lr_epoch - self.warmup_bias_lr), lr_epoch)
        lr_other = jnp.where(in_warmup, t * lr_epoch, lr_epoch)
        mom = jnp.where(in_warmup, self.warmup_momentum + t * (self.momentum - self.warmup_momentum),
                        self.momentum)
        # The warmup accumulation count is a step function of ni: find its steps on the host so
        # the traced value rounds exactly like numpy does in float64.
        acc_host = self._accumulate_host(np.arange(nw + 1))
        rises = np.nonzero(np.diff(acc_host))[0] + 1  # first ni of each new value
        acc_warm = acc_host[0] + jnp.sum(
            jnp.asarray(np.diff(acc_host)[rises - 1], jnp.int32) * (ni >= jnp.asarray(rises, jnp.int32)))
        acc = jnp.where(in_warmup, acc_warm, nominal_accumulate(self.batch_size, self.nbs))
        return {"lr_bias": lr_bias.astype(jnp.float32), "lr_weight": lr_other.astype(jnp.float32),
                "lr_bn": lr_other.astype(jnp.float32), "momentum": jnp.asarray(mom, jnp.float32),
                "accumulate": acc.astype(jnp.int32)}

    def learning_rates(self) -> dict[str, Callable[[Any], jax.Array]]:
        """label -> jnp schedule of ni, for `torch_sgd`."""
        return {"bias": lambda ni: self.values_jnp(ni)["lr_bias"],
                "weight": lambda ni: self.values_jnp(ni)["lr_weight"],
                "bn_weight": lambda ni: self.values_jnp(ni)["lr_bn"]}

    def momentum_schedule(self) -> Callable[[Any], jax.Array]:
        return lambda ni: self.values_jnp(ni)["momentum"]


def schedule_values(ni: int, **schedule_kwargs) -> dict[str, float]:
    """Host values {lr_bias, lr_weight, lr_bn, momentum, accumulate} at batch index ni.

    `schedule_kwargs` are `Yolov5Schedule`'s fields (epochs, steps_per_epoch, batch_size,
    lr0, lrf, momentum, warmup_epochs, warmup_momentum, warmup_bias_lr, cos_lr, nbs).
    """
    return Yolov5Schedule(**schedule_kwargs).values(ni)


def schedule_values_jnp(ni, **schedule_kwargs) -> dict[str, jax.Array]:
    """jit-able `schedule_values` (ni may be traced; the kwargs are static)."""
    return Yolov5Schedule(**schedule_kwargs).values_jnp(ni)


def yolov5_sgd(hyp: Mapping[str, float], schedule: Yolov5Schedule, *,
               max_grad_norm: float | None = 10.0,
               labels: Any = param_labels) -> optax.GradientTransformationExtraArgs:
    """The official optimizer: clip_grad_norm_(10) then 3-group nesterov SGD with the schedule.

    Weight decay `scaled_weight_decay(hyp['weight_decay'], schedule.batch_size)` applies to the
    "weight" group only. Call `update(grads, state, params, step=ni)`.
    """
    wd = scaled_weight_decay(float(hyp["weight_decay"]), schedule.batch_size, schedule.nbs)
    sgd = torch_sgd(schedule.learning_rates(), schedule.momentum_schedule(), nesterov=True,
                    weight_decay={"weight": wd, "bias": 0.0, "bn_weight": 0.0}, labels=labels)
    if max_grad_norm is None:
        return sgd
    return optax.chain(clip_grad_norm_torch(max_grad_norm), sgd)


# ---------------------------------------------------------------- EMA

class EmaState(NamedTuple):
    variables: Any     # EMA copy of the model variables (params and batch_stats)
    updates: jax.Array  # int32 number of EMA updates


def ema_decay(updates, decay: float = 0.9999, tau: float = 2000.0):
    """Official ramp d(updates) = decay * (1 - exp(-updates / tau))."""
    if isinstance(updates, jax.Array):
        return decay * -jnp.expm1(-updates.astype(jnp.float32) / tau)
    return decay * -math.expm1(-updates / tau)


def ema_init(variables: Any) -> EmaState:
    """Starts the EMA as a copy of the model variables (official deepcopy), updates = 0."""
    return EmaState(variables=jax.tree.map(jnp.array, variables), updates=jnp.zeros((), jnp.int32))


def ema_update(state: EmaState, variables: Any, decay: float = 0.9999,
               tau: float = 2000.0) -> EmaState:
    """One ModelEMA.update after an optimizer step: ema = d * ema + (1 - d) * model.

    Applies to every floating-point leaf (params and BatchNorm statistics alike, as the
    official state_dict loop); other leaves keep their EMA value.
    """
    updates = state.updates + 1
    u = updates.astype(jnp.float32) / tau
    d = decay * -jnp.expm1(-u)
    one_minus_d = (1.0 - decay) + decay * jnp.exp(-u)  # avoids cancellation in 1 - d near 1

    def leaf(e, v):
        e = jnp.asarray(e)
        if not jnp.issubdtype(e.dtype, jnp.floating):
            return e
        return (e * d.astype(e.dtype) + one_minus_d.astype(e.dtype) * jnp.asarray(v, e.dtype)).astype(e.dtype)

    return EmaState(variables=jax.tree.map(leaf, state.variables, variables), updates=updates)
