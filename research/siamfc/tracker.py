"""The SiamFC single-object tracker: official `siamfc.TrackerSiamFC.init` / `update` around a Flax `SiamFC`.

`init(frame, box)` crops the exemplar (context 0.5 around the box, 127 px) and embeds it once.
Each `update(frame)` crops three search regions (255 px, sizes `x_sz * 1.0375 ** [-1, 0, 1]`),
correlates them with the cached exemplar embedding, upsamples the 17 x 17 responses x16 to
272 x 272 (OpenCV bicubic), penalises the two scale changes (x0.9745), picks the scale with the
highest peak, blends its normalised map with a Hann window (weight 0.176), moves the centre by
the peak's offset from the map centre (through the stride 8, the x16 upsampling and the crop
scale) and damps the size change (scale learning rate 0.59).

Where it runs: crops and the post-processing run on the host in numpy / OpenCV exactly as the
official code (`research/siamfc/ops.py` says why). The network part is a small backend with two
calls, `template(z_crop) -> features` and `responses(features, x_crops) -> [S, 17, 17]`:
`JaxBackend` runs the Flax model under `jax.jit` with fixed shapes (`[1, 127, 127, 3]` and
`[3, 255, 255, 3]` uint8 crops), so it compiles once per model and never per frame
(`TRACE_COUNTS` counts traces for tests); `OnnxBackend` runs the exported `template.onnx` /
`search.onnx` graphs (`research/siamfc/export.py`) in ONNX Runtime. The tracking logic is the
same object for both.

The state keeps the official numpy dtypes: centre `(y, x)` and target size `(h, w)` float32 arrays
updated in place; `z_sz` / `x_sz` float32 after `init` and float64 after the first update (numpy
promotion of the float64 scale). Boxes are `[x, y, w, h]` with the 1-based convention of the
got10k toolkit that the official tracker follows (centre = x - 1 + (w - 1) / 2).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from research.siamfc import ops
from research.siamfc.model import SiamFC

TRACE_COUNTS: collections.Counter = collections.Counter()  # (function name, model) -> traces


@dataclasses.dataclass(frozen=True)
class TrackerSettings:
    """Hyper-parameters with the defaults of the official `TrackerSiamFC.parse_args`.

    Inference: `exemplar_sz` / `instance_sz` crop sides (px), `context` (fraction of w + h added
    around the box), `scale_num` / `scale_step` search scales, `scale_lr` size damping,
    `scale_penalty` factor on the non-centre scales, `window_influence` Hann-window weight,
    `response_sz` / `response_up` response side and upsampling factor, `total_stride` backbone
    stride (px per response cell), `out_scale` response scale of the head.
    Training (`epoch_num` ... `r_neg`) is kept for a training loop: SGD with momentum and
    weight decay, learning rate decayed exponentially from `initial_lr` to `ultimate_lr`,
    label radii `r_pos` / `r_neg` in pixels (`research/siamfc/loss.py`).
    """

    out_scale: float = 0.001
    exemplar_sz: int = 127
    instance_sz: int = 255
    context: float = 0.5
    scale_num: int = 3
    scale_step: float = 1.0375
    scale_lr: float = 0.59
    scale_penalty: float = 0.9745
    window_influence: float = 0.176
    response_sz: int = 17
    response_up: int = 16
    total_stride: int = 8
    epoch_num: int = 50
    batch_size: int = 8
    num_workers: int = 32
    initial_lr: float = 1e-2
    ultimate_lr: float = 1e-5
    weight_decay: float = 5e-4
    momentum: float = 0.9
    r_pos: int = 16
    r_neg: int = 0

    @property
    def upscale_sz(self) -> int:
        """Side of the upsampled response map (272 by default)."""
        return self.response_up * self.response_sz

    @property
    def scale_factors(self) -> np.ndarray:
        """`[scale_num]` float64 search-size factors `scale_step ** [-(n // 2) .. n // 2]`."""
        half = self.scale_num // 2
        return self.scale_step ** np.linspace(-half, half, self.scale_num)


@functools.partial(jax.jit, static_argnums=0)
def embed_exemplar(model: SiamFC, variables: Mapping[str, Any], z: jax.Array) -> jax.Array:
    """`[Bz, 127, 127, 3]` crops (uint8 or float, 0..255) -> `[Bz, 6, 6, C]` embeddings (the `kernel`)."""
    TRACE_COUNTS["embed_exemplar", model] += 1
    return model.apply(variables, z.astype(jnp.float32), method=SiamFC.embed)


@functools.partial(jax.jit, static_argnums=0)
def search_responses(model: SiamFC, variables: Mapping[str, Any], kernel: jax.Array, x: jax.Array) -> jax.Array:
    """Cached exemplar `[1, 6, 6, C]` against search crops `[S, 255, 255, 3]` -> `[S, 17, 17]` responses."""
    TRACE_COUNTS["search_responses", model] += 1
    return model.apply(variables, kernel, x.astype(jnp.float32), method=SiamFC.respond)["response"][..., 0]


class JaxBackend:
    """The tracker's network part as the jitted Flax model (`embed_exemplar`, `search_responses`).

    Args:
      model: the `SiamFC` module (hashable: a static jit argument).
      variables: its `{'params', 'batch_stats'}` (numpy or jax arrays, e.g. `bridge.from_torch`),
        put on the default device once.

    Attributes:
      out_scale: the head's response scale (checked against the tracker settings).
    """

    def __init__(self, model: SiamFC, variables: Mapping[str, Any]):
        # On the device once: numpy leaves would be copied into every call (2.3 M floats for
        # alexnet_v1, ~3 ms of a 3-scale update on one CPU thread).
        self.model, self.variables = model, jax.device_put(variables)
        self.out_scale = float(model.out_scale)

    def template(self, z: np.ndarray) -> jax.Array:
        """`[1, 127, 127, 3]` uint8 exemplar crop -> `[1, 6, 6, C]` template features (on the device)."""
        return embed_exemplar(self.model, self.variables, z)

    def responses(self, features, x: np.ndarray) -> np.ndarray:
        """Template features `[1, 6, 6, C]` against `[S, 255, 255, 3]` uint8 search crops -> `[S, 17, 17]`
        float32 responses (official `net.head(kernel, net.backbone(x))`, NCHW channel dropped)."""
        return np.asarray(search_responses(self.model, self.variables, features, x))


class OnnxBackend:
    """The tracker's network part as the two exported graphs in ONNX Runtime (CPU).

    `template.onnx`: `exemplar [B, 3, 127, 127]` float32 0..255 -> `template [B, C, 6, 6]`;
    `search.onnx`: `template [1, C, 6, 6]`, `search [B, 3, 255, 255]` -> `response [B, 1, 17, 17]`
    (NCHW as the official tracker feeds its network; `research/siamfc/export.py` writes both with
    `--mode=export`). Graphs exported before the switch to NCHW (NHWC images `[B, 127, 127, 3]`,
    features `[B, 6, 6, C]`) still run: each graph's image layout is read from its input shape.

    Args:
      template_path, search_path: the two `.onnx` files.
      num_threads: ONNX Runtime intra-op threads (None: its default).

    Raises:
      FileNotFoundError: a graph is missing (the message says to run `--mode=export`).
    """

    out_scale = None  # baked into search.onnx

    def __init__(self, template_path: str, search_path: str, num_threads: int | None = None):
        import os

        from research.bridge.onnx_export import OnnxRunner
        for path in (template_path, search_path):
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} not found: run --mode=export first (it writes template.onnx "
                                        "and search.onnx)")
        self.template_runner = OnnxRunner(template_path, num_threads)
        self.search_runner = OnnxRunner(search_path, num_threads)
        self.template_nchw = _channels_first(self.template_runner, "exemplar")
        self.search_nchw = _channels_first(self.search_runner, "search")

    @classmethod
    def from_dir(cls, export_dir: str, num_threads: int | None = None) -> "OnnxBackend":
        """The graphs `export_dir/template.onnx` and `export_dir/search.onnx`."""
        import os
        return cls(os.path.join(export_dir, "template.onnx"), os.path.join(export_dir, "search.onnx"), num_threads)

    def template(self, z: np.ndarray) -> np.ndarray:
        """`[1, 127, 127, 3]` uint8 exemplar crop -> template features as `template.onnx` gives them
        (`[1, C, 6, 6]` float32)."""
        return self.template_runner(exemplar=_images(z, self.template_nchw))[0]

    def responses(self, features, x: np.ndarray) -> np.ndarray:
        """Template features (from `template`) against `[S, 255, 255, 3]` uint8 crops -> `[S, 17, 17]` float32."""
        out = self.search_runner(template=np.asarray(features, np.float32), search=_images(x, self.search_nchw))[0]
        return out[:, 0]


def _channels_first(runner, name: str) -> bool:
    """Whether the graph's image input `name` is NCHW (`[B, 3, H, W]`) rather than NHWC."""
    shape = runner.session.get_inputs()[runner.input_names.index(name)].shape
    return shape[1] == 3 and shape[-1] != 3


def _images(crops: np.ndarray, nchw: bool) -> np.ndarray:
    """`[S, H, W, 3]` uint8 crops as float32 graph input, NCHW (contiguous) or NHWC."""
    crops = np.asarray(crops)
    if nchw:  # one pass: cast while copying into the channels-first order
        out = np.empty((crops.shape[0], crops.shape[3]) + crops.shape[1:3], np.float32)
        out[...] = crops.transpose(0, 3, 1, 2)
        return out
    return crops.astype(np.float32)


def upsample_and_penalize(responses: np.ndarray, settings: TrackerSettings) -> np.ndarray:
    """`[S, 17, 17]` float32 responses -> `[S, 272, 272]` float32, non-centre scales times the penalty."""
    up = ops.upsample_bicubic(np.asarray(responses, np.float32), settings.upscale_sz)
    half = settings.scale_num // 2
    up[:half] *= settings.scale_penalty
    up[half + 1:] *= settings.scale_penalty
    return up


def locate_peak(responses_up: np.ndarray, hann: np.ndarray,
                settings: TrackerSettings) -> tuple[int, tuple[int, int], np.ndarray]:
    """Scale choice and peak position, official `update` post-processing.

    Args:
      responses_up: `[S, U, U]` penalised upsampled responses (float32; not modified).
      hann: `[U, U]` float64 Hann window summing to 1 (`ops.hann_window`).

    Returns:
      `(scale_id, (row, col), final)`: the scale whose map has the highest maximum (first on ties),
      the first argmax in C order of `final`, and `final` `[U, U]` float64: the chosen map shifted
      to minimum 0 and normalised to sum 1 (float32, as the official code), blended with `hann`.
    """
    scale_id = int(np.argmax(np.amax(responses_up, axis=(1, 2))))
    r = responses_up[scale_id].copy()
    r -= r.min()
    r /= r.sum() + 1e-16
    final = (1 - settings.window_influence) * r + settings.window_influence * hann
    row, col = np.unravel_index(final.argmax(), final.shape)
    return scale_id, (int(row), int(col)), final


class TrackerSiamFC:
    """Official `TrackerSiamFC` inference (`init`, `update`, `track`) around a network backend.

    Args:
      backend: the network part, `JaxBackend(model, variables)` or `OnnxBackend(template.onnx,
        search.onnx)`: `template(z) -> features`, `responses(features, x) -> [S, 17, 17]`.
      settings: inference hyper-parameters (official defaults).

    Raises:
      ValueError: `settings.out_scale` differs from the backend's (one value, two places).

    Attributes (after `init`): `center` `(y, x)` and `target_sz` `(h, w)` float32 state, `z_sz`,
    `x_sz` crop sides (px), `avg_color` first-frame mean RGB (float64, crop padding), `kernel`
    template features (`[1, 6, 6, C]` from `JaxBackend`, `[1, C, 6, 6]` from `OnnxBackend`), and
    `last`: the intermediates of the latest call (crops, corners, responses, upsampled maps, final
    map, scale id, peak) for inspection.
    """

    def __init__(self, backend, settings: TrackerSettings = TrackerSettings()):
        out_scale = getattr(backend, "out_scale", None)
        if out_scale is not None and settings.out_scale != out_scale:
            raise ValueError(f"settings.out_scale {settings.out_scale} != the network's out_scale {out_scale}")
        self.backend = backend
        self.settings = settings
        self.scale_factors = settings.scale_factors
        self.hann = ops.hann_window(settings.upscale_sz)
        self.last: dict[str, Any] = {}

    def init(self, frame: np.ndarray, box: Sequence[float]) -> None:
        """Starts a track.

        Args:
          frame: `[H, W, 3]` uint8 RGB image.
          box: `[x, y, w, h]` target box, 1-based left/top as the got10k toolkit passes it.
        """
        s = self.settings
        frame = _check_frame(frame)
        box = np.asarray(box, np.float64)
        # float32 like the official state, which every later in-place update keeps.
        state = np.array([box[1] - 1 + (box[3] - 1) / 2, box[0] - 1 + (box[2] - 1) / 2, box[3], box[2]],
                         dtype=np.float32)
        self.center, self.target_sz = state[:2], state[2:]
        context = s.context * np.sum(self.target_sz)
        self.z_sz = np.sqrt(np.prod(self.target_sz + context))
        self.x_sz = self.z_sz * s.instance_sz / s.exemplar_sz
        self.avg_color = np.mean(frame, axis=(0, 1))
        z = ops.crop_and_resize(frame, self.center, self.z_sz, s.exemplar_sz, border_value=self.avg_color)
        self.kernel = self.backend.template(z[None])
        self.last = {"z_crop": z, "z_corners": ops.crop_corners(self.center, self.z_sz)[1]}

    def search_crops(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`[S, 255, 255, 3]` uint8 search crops of `frame` at the current state, with their
        `[S]` rounded sizes and `[S, 4]` corners `[y0, x0, y1, x1]`."""
        s = self.settings
        sizes = [self.x_sz * f for f in self.scale_factors]
        crops = np.stack([ops.crop_and_resize(frame, self.center, sz, s.instance_sz, border_value=self.avg_color)
                          for sz in sizes])
        boxes = [ops.crop_corners(self.center, sz) for sz in sizes]
        return crops, np.array([b[0] for b in boxes]), np.stack([b[1] for b in boxes])

    def update(self, frame: np.ndarray) -> np.ndarray:
        """Tracks the target into `frame` (`[H, W, 3]` uint8 RGB); returns the `[x, y, w, h]` float64 box.

        Raises RuntimeError before `init`.
        """
        if not hasattr(self, "kernel"):
            raise RuntimeError("TrackerSiamFC.update called before init")
        s = self.settings
        frame = _check_frame(frame)
        crops, sizes, corners = self.search_crops(frame)
        responses = np.asarray(self.backend.responses(self.kernel, crops), np.float32)
        responses_up = upsample_and_penalize(responses, s)
        scale_id, peak, final = locate_peak(responses_up, self.hann, s)

        # Peak offset from the map centre -> search-crop pixels (stride, upsampling) -> image pixels.
        disp = (np.array(peak) - (s.upscale_sz - 1) / 2) * s.total_stride / s.response_up
        disp = disp * self.x_sz * self.scale_factors[scale_id] / s.instance_sz
        self.center += disp  # in place: the state stays float32
        scale = (1 - s.scale_lr) * 1.0 + s.scale_lr * self.scale_factors[scale_id]
        self.target_sz *= scale
        self.z_sz = self.z_sz * scale
        self.x_sz = self.x_sz * scale

        self.last = {"x_crops": crops, "crop_sizes": sizes, "crop_corners": corners, "responses": responses,
                     "responses_up": responses_up, "response_final": final, "scale_id": scale_id, "peak": peak}
        return np.array([self.center[1] + 1 - (self.target_sz[1] - 1) / 2,
                         self.center[0] + 1 - (self.target_sz[0] - 1) / 2,
                         self.target_sz[1], self.target_sz[0]], dtype=np.float64)

    def track(self, frames: Sequence[np.ndarray], box: Sequence[float]) -> np.ndarray:
        """Runs `init` on `frames[0]` with `box` and `update` on the rest; `[N, 4]` boxes, row 0 = `box`."""
        boxes = np.zeros((len(frames), 4))
        boxes[0] = box
        for i, frame in enumerate(frames):
            if i == 0:
                self.init(frame, box)
            else:
                boxes[i] = self.update(frame)
        return boxes


def _check_frame(frame: np.ndarray) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected an [H, W, 3] RGB frame, got shape {frame.shape}")
    if frame.dtype != np.uint8:
        # The official crop resizes uint8 patches with OpenCV's fixed-point filter; float frames
        # would give other crops (and other peaks).
        raise ValueError(f"expected a uint8 frame (the official crops are uint8), got {frame.dtype}")
    return frame
