"""The two ONNX graphs a SiamFC tracker deploys: `template.onnx` and `search.onnx`.

Trackers run the network in two parts (official `TrackerSiamFC.init` / `update`): the exemplar crop
is embedded once (`net.backbone(z)`, the "kernel"), then every frame's search crops are embedded
and cross-correlated with it (`net.head(kernel, net.backbone(x))`). The graphs:

  template.onnx  exemplar [B, 127, 127, 3] float32 raw 0..255 RGB (NHWC)
                 -> template [B, 6, 6, C] features (NHWC)
  search.onnx    template [1, 6, 6, C], search [B, 255, 255, 3] float32 raw 0..255 RGB
                 -> response [B, 1, 17, 17] (the official NCHW response, times out_scale)

`B` is symbolic in both. With one template the correlation is a plain convolution whose kernel is
the `template` input (no batch-sized group count), so the search graph takes any number of scales.
`OnnxBackend` (`research/siamfc/tracker.py`) runs a `TrackerSiamFC` on them.

`--mode=export` writes both next to the shared `model.onnx` (the pair graph of `Task.export_spec`),
each checked against the JAX model in ONNX Runtime (`check_graphs`).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from research.siamfc.model import SiamFC

TEMPLATE_FILE = "template.onnx"
SEARCH_FILE = "search.onnx"
# ONNX Runtime vs XLA float32 on the same graph: different summation orders (~1e-6 relative
# measured); the project's acceptance rule for exported graphs is 1e-4 of the output's magnitude.
CHECK_RTOL = 1e-4


def template_fn(model: SiamFC, variables: Mapping[str, Any]):
    """`exemplar [B, Hz, Wz, 3]` float32 0..255 -> `template [B, hz, wz, C]` (`SiamFC.embed`, eval mode)."""
    def fn(exemplar):
        return model.apply(variables, exemplar, method=SiamFC.embed)
    return fn


def single_template_xcorr(template: jax.Array, search: jax.Array, out_scale: float) -> jax.Array:
    """One template against every search embedding (official `_fast_xcorr` with `nz = 1`), NCHW out.

    Args:
      template: `[1, hz, wz, C]` template features.
      search: `[B, hx, wx, C]` search features.
      out_scale: the head's response scale.

    Returns:
      `[B, 1, hx - hz + 1, wx - wz + 1]` responses (the same sums as `model.xcorr` with `Bz = 1`).
    """
    kernel = jnp.transpose(template, (1, 2, 3, 0)).astype(search.dtype)  # HWIO, O = 1
    out = jax.lax.conv_general_dilated(search, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.transpose(out * out_scale, (0, 3, 1, 2))


def search_fn(model: SiamFC, variables: Mapping[str, Any]):
    """`template [1, hz, wz, C]`, `search [B, Hx, Wx, 3]` 0..255 -> `response [B, 1, ho, wo]`."""
    def fn(template, search):
        x = model.apply(variables, search, method=SiamFC.embed)
        return single_template_xcorr(template, x, model.out_scale)
    return fn


def example_inputs(model: SiamFC, variables: Mapping[str, Any], z_size: int = 127, x_size: int = 255,
                   batch: int = 1, seed: int = 0) -> tuple[dict, dict]:
    """Deterministic `(template_inputs, search_inputs)` example feeds: `batch` random 0..255 exemplar
    crops; the features of the first one against `batch` random search crops."""
    rng = np.random.default_rng(seed)
    z = rng.uniform(0, 255, (batch, z_size, z_size, 3)).astype(np.float32)
    x = rng.uniform(0, 255, (batch, x_size, x_size, 3)).astype(np.float32)
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
