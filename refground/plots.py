"""Small line charts drawn with PIL (no plotting library is a dependency): training curves, recall@N."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image as PILImage
from PIL import ImageDraw

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


def line_chart(series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str, x_label: str,
               y_label: str, size: tuple[int, int] = (640, 400), y_range: tuple[float, float] | None = None
               ) -> PILImage.Image:
    """One panel with a line per series (``name -> (xs, ys)``), axes with min/max ticks and a legend."""
    from refground.viz import _font

    w, h = size
    left, right, top, bottom = 60, 20, 36, 44
    img = PILImage.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = _font(12)
    xs_all = [float(x) for xs, _ in series.values() for x in xs]
    ys_all = [float(y) for _, ys in series.values() for y in ys]
    d.text((left, 10), title, fill="black", font=font)
    if not xs_all:
        d.text((left, h // 2), "no data", fill="gray", font=font)
        return img
    x0, x1 = min(xs_all), max(xs_all)
    y0, y1 = y_range if y_range else (min(ys_all), max(ys_all))
    x1 = x1 if x1 > x0 else x0 + 1
    y1 = y1 if y1 > y0 else y0 + 1

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (w - left - right), h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom))

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for v, anchor in ((y0, h - bottom), (y1, top)):
        d.text((4, anchor - 6), f"{v:.3g}", fill="black", font=font)
    for v, anchor in ((x0, left), (x1, w - right - 20)):
        d.text((anchor, h - bottom + 4), f"{v:.3g}", fill="black", font=font)
    d.text(((w - len(x_label) * 6) // 2, h - 18), x_label, fill="black", font=font)
    d.text((4, top - 14), y_label, fill="black", font=font)
    for k, (name, (xs, ys)) in enumerate(series.items()):
        colour = COLOURS[k % len(COLOURS)]
        pts = [px(float(x), float(y)) for x, y in zip(xs, ys)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for p in pts:
            d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=colour)
        d.text((left + 8, top + 6 + 14 * k), name, fill=colour, font=font)
    return img


def render_curve(curve: dict[str, Any], title: str) -> PILImage.Image:
    """A run's ``curve.json`` as two panels side by side: loss per epoch, and the val figures per epoch."""
    epochs = curve.get("epochs", [])
    xs = [r["epoch"] for r in epochs]
    loss = line_chart({"train loss": (xs, [r["loss"] for r in epochs])}, f"{title}: loss", "epoch", "loss")
    keys = [k for k in (epochs[0] if epochs else {}) if k.startswith("val_precision@1")]
    val = line_chart({k[4:]: (xs, [r[k] for r in epochs]) for k in keys}, f"{title}: val Precision@1", "epoch",
                     "P@1", y_range=(0.0, 1.0))
    img = PILImage.new("RGB", (loss.width + val.width, max(loss.height, val.height)), "white")
    img.paste(loss, (0, 0))
    img.paste(val, (loss.width, 0))
    return img
