"""The two ONNX graphs a SiamFC tracker deploys: `template.onnx` and `search.onnx`.

Trackers run the network in two parts (official `TrackerSiamFC.init` / `update`): the exemplar crop
is embedded once (`net.backbone(z)`, the "kernel"), then every frame's search crops are embedded
and cross-correlated with it (`net.head(kernel, net.backbone(x))`). The graphs take and give the
official NCHW tensors (the official tracker's `permute(0, 3, 1, 2)` crops and its `kernel`):

  template.onnx  exemplar [B, 3, 127, 127] float32 raw 0..255 RGB (NCHW)
                 -> template [B, C, 6, 6] features (NCHW, the official `kernel`)
  search.onnx    template [1, C, 6, 6], search [B, 3, 255, 255] float32 raw 0..255 RGB
                 -> response [B, 1, 17, 17] (the official NCHW response, times out_scale)

`B` is symbolic in both. NCHW inputs leave no layout Transpose in the graphs (the convolutions are
NCHW in ONNX). The correlation with the one template (`single_template_xcorr`) is a 1 x 1
convolution whose kernel is the `template` input followed by a constant 0/1 convolution, not one
6 x 6 convolution with the template as its kernel, as `torch.onnx.export` writes the official
head: ONNX Runtime cannot prepack a kernel that is a graph input and runs that 6 x 6 one through
a 32 MB im2col (2.4 ms of the 3-scale search branch, against 0.8 ms; one thread, 2-core CPU).
The search graph takes any number of scales. `OnnxBackend` (`research/siamfc/tracker.py`) runs a
`TrackerSiamFC` on them.

`--mode=export` writes both next to the shared `model.onnx` (the pair graph of `Task.export_spec`),
each checked against the JAX model in ONNX Runtime (`check_graphs`).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from research.siamfc.model import SiamFC, xcorr_single

TEMPLATE_FILE = "template.onnx"
SEARCH_FILE = "search.onnx"
# ONNX Runtime vs XLA float32 on the same graph: different summation orders (~1e-6 relative
# measured); the project's acceptance rule for exported graphs is 1e-4 of the output's magnitude.
CHECK_RTOL = 1e-4


def template_fn(model: SiamFC, variables: Mapping[str, Any]):
    """`exemplar [B, 3, Hz, Wz]` float32 0..255 (NCHW) -> `template [B, C, hz, wz]` (`SiamFC.embed`,
    eval mode, NCHW: the official `kernel = net.backbone(z)`)."""
    def fn(exemplar):
        feats = model.apply(variables, jnp.transpose(exemplar, (0, 2, 3, 1)), method=SiamFC.embed)
        return jnp.transpose(feats, (0, 3, 1, 2))
    return fn


def single_template_xcorr(template: jax.Array, search: jax.Array, out_scale: float) -> jax.Array:
    """One template against every search embedding (official `_fast_xcorr` with `nz = 1`), NCHW out.

    `model.xcorr_single`: a 1 x 1 convolution with the template as its kernel, then a constant
    0/1 `hz x wz` convolution summing the shifted products (the module docstring says why).

    Args:
      template: `[1, C, hz, wz]` template features (NCHW, the official `kernel`); with a larger
        batch the first one is used.
      search: `[B, hx, wx, C]` search features (NHWC).
      out_scale: the head's response scale.

    Returns:
      `[B, 1, hx - hz + 1, wx - wz + 1]` responses.

    Raises:
      ValueError: the channel counts differ.
    """
    out = xcorr_single(jnp.transpose(template, (0, 2, 3, 1)), search, out_scale)
    return jnp.transpose(out, (0, 3, 1, 2))


def search_fn(model: SiamFC, variables: Mapping[str, Any]):
    """`template [1, C, hz, wz]`, `search [B, 3, Hx, Wx]` 0..255 (NCHW) -> `response [B, 1, ho, wo]`."""
    def fn(template, search):
        x = model.apply(variables, jnp.transpose(search, (0, 2, 3, 1)), method=SiamFC.embed)
        return single_template_xcorr(template, x, model.out_scale)
    return fn


def example_inputs(model: SiamFC, variables: Mapping[str, Any], z_size: int = 127, x_size: int = 255,
                   batch: int = 1, seed: int = 0) -> tuple[dict, dict]:
    """Deterministic `(template_inputs, search_inputs)` example feeds (NCHW): `batch` random 0..255
    exemplar crops; the features of the first one against `batch` random search crops."""
    rng = np.random.default_rng(seed)
    z = rng.uniform(0, 255, (batch, 3, z_size, z_size)).astype(np.float32)
    x = rng.uniform(0, 255, (batch, 3, x_size, x_size)).astype(np.float32)
    feats = np.asarray(jax.jit(template_fn(model, variables))(z[:1]))
    return {"exemplar": z}, {"template": feats, "search": x}


def export_graphs(model: SiamFC, variables: Mapping[str, Any], out_dir: str, *, z_size: int = 127,
                  x_size: int = 255, check: bool = True) -> dict[str, Any]:
    """Writes `out_dir/template.onnx` and `out_dir/search.onnx` (atomically); returns their paths and,
    with `check`, the largest ONNX-vs-JAX error of each relative to the output's magnitude.

    `model` should use `nn.Conv` (`task.build_model(config, export=True)`): one grouped Conv node
    per grouped layer. Variables are numpy or jax arrays.

    Raises:
      RuntimeError: with `check`, a graph's ONNX Runtime outputs differ from JAX by more than
        `CHECK_RTOL` of their magnitude (the message names the graph and the error).
    """
    from research.bridge.onnx_export import export_onnx
    variables = jax.tree_util.tree_map(np.asarray, variables)
    os.makedirs(out_dir, exist_ok=True)
    t_in, s_in = example_inputs(model, variables, z_size, x_size)
    paths = {"onnx_template": os.path.join(out_dir, TEMPLATE_FILE), "onnx_search": os.path.join(out_dir, SEARCH_FILE)}
    export_onnx(template_fn(model, variables), t_in, paths["onnx_template"], dynamic_batch=("exemplar",),
                output_names=("template",))
    export_onnx(search_fn(model, variables), s_in, paths["onnx_search"], dynamic_batch=("search",),
                output_names=("response",))
    out: dict[str, Any] = dict(paths)
    if check:
        errs = check_graphs(model, variables, out_dir, z_size=z_size, x_size=x_size)
        out.update({f"onnx_{k}_rel_err": v for k, v in errs.items()})
    return out


def check_graphs(model: SiamFC, variables: Mapping[str, Any], out_dir: str, *, z_size: int = 127,
                 x_size: int = 255) -> dict[str, float]:
    """ONNX Runtime against JAX on random crops (batches 1 and 3): {'template', 'search'} ->
    max |onnx - jax| / max |jax|.

    Raises:
      RuntimeError: an error above `CHECK_RTOL`, naming the graph.
    """
    from research.bridge.onnx_export import OnnxRunner
    t_run = OnnxRunner(os.path.join(out_dir, TEMPLATE_FILE))
    s_run = OnnxRunner(os.path.join(out_dir, SEARCH_FILE))
    t_jax, s_jax = jax.jit(template_fn(model, variables)), jax.jit(search_fn(model, variables))
    errs = {"template": 0.0, "search": 0.0}
    for batch in (1, 3):
        t_in, s_in = example_inputs(model, variables, z_size, x_size, batch=batch, seed=batch)
        for name, run, fn, feed in (("template", t_run, t_jax, t_in), ("search", s_run, s_jax, s_in)):
            ref = np.asarray(fn(**feed), np.float64)
            got = run(**feed)[0].astype(np.float64)
            if got.shape != ref.shape:
                raise RuntimeError(f"{name}.onnx gives shape {got.shape}, JAX {ref.shape}")
            errs[name] = max(errs[name], float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30)))
    for name, err in errs.items():
        if not err <= CHECK_RTOL:
            raise RuntimeError(f"{os.path.join(out_dir, name + '.onnx')}: ONNX Runtime differs from JAX by "
                               f"{err:.2e} of the output's magnitude (accepted {CHECK_RTOL:g})")
    return errs
