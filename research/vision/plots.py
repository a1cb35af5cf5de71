"""Drawing helpers: detections on an image (PIL) and training curves (matplotlib, Agg).

`draw_detections` follows the look of the official YOLOv5 v7.0 annotator (`utils/plots.py`):
the Ultralytics 20-colour palette indexed by class, line width max(round((H + W + C) / 2 * 0.003), 2),
a filled label box in the class colour with white `"{name} {conf:.2f}"` text placed above the
box (inside it when there is no room above), highest-confidence boxes drawn last. It uses
Pillow's built-in default font, so nothing is downloaded.

`plot_curves` reads the trainer's metric records (`{"step": 10, "train/loss": 1.2, ...}`, a list
or a JSON-lines file) and draws one panel per `train/*` series plus one mAP panel for the
`eval/*mAP*` series, against step. Matplotlib is used through its object API with the Agg
canvas, so the global backend is left alone and nothing is shown.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["PALETTE", "class_color", "draw_detections", "load_records", "plot_curves"]

# Ultralytics palette, RGB.
_HEX = ("FF3838", "FF9D97", "FF701F", "FFB21D", "CFD231", "48F90A", "92CC17", "3DDB86", "1A9334", "00D4BB",
        "2C99A8", "00C2FF", "344593", "6473FF", "0018EC", "8438FF", "520085", "CB38FF", "FF95C8", "FF37C7")
PALETTE: tuple[tuple[int, int, int], ...] = tuple(tuple(int(h[k:k + 2], 16) for k in (0, 2, 4)) for h in _HEX)


def class_color(cls: int) -> tuple[int, int, int]:
    """RGB colour of a class index (palette cycles every 20 classes)."""
    return PALETTE[int(cls) % len(PALETTE)]


def _default_font(size: int):
    try:
        return ImageFont.load_default(size=size)  # scalable built-in font (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _class_name(class_names, c: int) -> str:
    if class_names is None:
        return str(c)
    if isinstance(class_names, Mapping):
        return str(class_names.get(c, c))
    return str(class_names[c]) if 0 <= c < len(class_names) else str(c)


def _to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    im = np.asarray(image)
    if im.dtype != np.uint8:
        if not np.issubdtype(im.dtype, np.floating):
            raise ValueError(f"image must be uint8, or float in [0, 1]; got {im.dtype}")
        im = np.clip(np.round(im * 255.0), 0, 255).astype(np.uint8)
    if im.ndim == 2:
        im = im[..., None]
    if im.ndim != 3 or im.shape[2] not in (1, 3, 4):
        raise ValueError(f"image must be HW, HW1, HW3 or HW4; got shape {im.shape}")
    if im.shape[2] == 1:
        im = np.repeat(im, 3, axis=2)
    return np.ascontiguousarray(im[..., :3])


def draw_detections(image: np.ndarray, dets: np.ndarray, class_names: Sequence[str] | Mapping[int, str] | None,
                    path_png: str | os.PathLike | None = None, *, line_width: int | None = None,
                    font_size: int | None = None, show_conf: bool = True) -> np.ndarray:
    """Draw detections on an RGB image and optionally save it as PNG.

    Args:
      image: [H, W, 3] uint8 RGB (grey, RGBA and float-in-[0, 1] images are converted).
      dets: [n, 6] rows (x1, y1, x2, y2, conf, cls) in the image's pixel coordinates, e.g. the
        output of `non_max_suppression` after `scale_boxes`. [n, 5] rows (no conf) also work.
      class_names: names by class index (list or dict); None writes the index.
      path_png: where to save the PNG (parent directories are created); None = don't save.
      line_width, font_size: override the official size heuristics.
      show_conf: append the confidence to the label.

    Returns:
      The drawn [H, W, 3] uint8 image.
    """
    im = _to_rgb_uint8(image)
    h, w = im.shape[:2]
    lw = line_width or max(round(sum(im.shape) / 2 * 0.003), 2)
    font = _default_font(font_size or max(round((h + w) / 2 * 0.035), 12))
    pil = Image.fromarray(im)
    draw = ImageDraw.Draw(pil)
    dets = np.asarray(dets, dtype=np.float64)
    dets = np.zeros((0, 6)) if dets.size == 0 else dets.reshape(-1, dets.shape[-1])
    has_conf = dets.shape[1] >= 6
    order = np.argsort(dets[:, 4], kind="stable") if has_conf else np.arange(dets.shape[0])
    for k in order:  # ascending confidence: the best boxes end up on top
        row = dets[k]
        x1, y1, x2, y2 = row[:4]
        x1, x2 = sorted((x1, x2))
        y1, y2 = sorted((y1, y2))
        c = int(row[5] if has_conf else row[4])
        color = class_color(c)
        draw.rectangle((x1, y1, x2, y2), outline=color, width=lw)
        label = _class_name(class_names, c)
        if has_conf and show_conf:
            label = f"{label} {row[4]:.2f}"
        if not label:
            continue
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        tw, th = right - left, bottom - top
        outside = y1 - th - 2 >= 0  # room for the label above the box
        ty = y1 - th - 2 if outside else y1
        draw.rectangle((x1, ty, x1 + tw + 2, ty + th + 2), fill=color)
        draw.text((x1 + 1 - left, ty + 1 - top), label, fill=(255, 255, 255), font=font)
    out = np.asarray(pil)
    if path_png is not None:
        path_png = os.fspath(path_png)
        parent = os.path.dirname(os.path.abspath(path_png))
        os.makedirs(parent, exist_ok=True)
        pil.save(path_png, format="PNG")
    return out


def load_records(records: str | os.PathLike | Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Metric records from a JSON-lines file (blank / unparsable lines skipped) or an iterable of dicts."""
    if isinstance(records, (str, os.PathLike)):
        out = []
        with open(records) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # e.g. a line cut short by a crash
                if isinstance(rec, dict):
                    out.append(rec)
        return out
    return [dict(r) for r in records]




def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def plot_curves(records: str | os.PathLike | Iterable[Mapping[str, Any]], out_png: str | os.PathLike, *,
                step_key: str = "step", panel_size: tuple[float, float] = (4.0, 3.0), dpi: int = 100,
                max_cols: int = 4) -> str:
    """Plot `train/*` series (one panel each, the terms in name order and `train/loss` last) and `eval/*mAP*` series
    (one shared panel; other `eval/*` keys get their own panels) against `step`; save a PNG.

    The figure is `ncols * panel_size[0]` by `nrows * panel_size[1]` inches at `dpi`. Records
    without `step_key` use their position; negative eval values (pycocotools' "undefined" -1)
    are not drawn. Returns the PNG path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    recs = load_records(records)
    series: dict[str, tuple[list[float], list[float]]] = {}
    for idx, rec in enumerate(recs):
        step = rec.get(step_key, idx)
        if not _is_number(step):
            continue
        for key, v in rec.items():
            if key == step_key or not _is_number(v) or not math.isfinite(float(v)):
                continue
            if key.startswith("eval/") and float(v) < 0:
                continue
            xs, ys = series.setdefault(key, ([], []))
            xs.append(float(step))
            ys.append(float(v))

    # each network's loss terms in name order, the total last
    train_keys = sorted((k for k in series if k.startswith("train/")), key=lambda k: (k == "train/loss", k))
    map_keys = sorted((k for k in series if k.startswith("eval/") and "mAP" in k),
                      key=lambda k: (k != "eval/mAP50_95", k != "eval/mAP50", k))
    other_eval = sorted(k for k in series if k.startswith("eval/") and k not in map_keys)
    panels: list[tuple[str, list[str]]] = [(k, [k]) for k in train_keys]
    if map_keys:
        panels.append(("eval/mAP", map_keys))
    panels += [(k, [k]) for k in other_eval]

    n = max(len(panels), 1)
    ncols = min(n, max_cols)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    if not panels:
        axes[0].set_axis_off()
        axes[0].text(0.5, 0.5, "no records", ha="center", va="center")
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            xs, ys = series[key]
            order = np.argsort(xs, kind="stable")
            ax.plot(np.asarray(xs)[order], np.asarray(ys)[order], marker="." if len(xs) < 30 else None,
                    linewidth=1.5, label=key.split("/", 1)[1])
        ax.set_title(title)
        ax.set_xlabel(step_key)
        ax.grid(True, alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    out_png = os.fspath(out_png)
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, format="png", dpi=dpi)
    return out_png
