"""Pictures of queries: image, ground truth (box and mask), context objects, predictions, proposals.

Everything returns a PIL image; the CLI decides where it goes.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont

from refground import masks
from refground.data.model import Dataset, Query
from refground.data.store import image_path
from refground.errors import DataError

GT = (40, 220, 60)
CONTEXT = (40, 160, 255)
PRED = (255, 40, 40)
PROPOSAL = (255, 210, 0)
PHRASE_COLOURS = [(40, 220, 60), (40, 160, 255), (255, 120, 0), (220, 60, 220), (0, 220, 220)]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def load_image(ds: Dataset, image_id: int) -> PILImage.Image:
    """The RGB image of ``image_id``; a missing file is a one-line DataError."""
    path = image_path(ds, image_id)
    if not path.is_file():
        raise DataError(f"{path}: image file not found (image {image_id} of dataset {ds.name})")
    with PILImage.open(path) as im:
        return im.convert("RGB")


def _overlay(img: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], alpha: float) -> None:
    img[mask] = (1 - alpha) * img[mask] + alpha * np.array(colour, dtype=np.float64)


def render_query(
    ds: Dataset,
    query: Query,
    pred_boxes: Sequence[Sequence[float]] = (),
    pred_mask: dict | None = None,
    proposals: Sequence[Sequence[float]] = (),
    show_mask: bool = True,
    scale: int | None = None,
) -> PILImage.Image:
    """Draw ``query`` on its image.

    Ground truth: referent boxes (green; for captions each phrase in its own colour) with their masks
    overlaid, context objects in blue; ``pred_boxes`` (xyxy pixels; first = top-1, drawn thick red),
    ``pred_mask`` (RLE, red overlay), ``proposals`` (ranked xyxy, thin yellow). The query text is
    written under the image with the referent words in brackets. ``scale`` enlarges small images
    (default: to at least 512 pixels wide) so the text stays legible.
    """
    base = np.asarray(load_image(ds, query.image_id), dtype=np.float64)
    h, w = base.shape[:2]
    colours: list[tuple[tuple[int, int, int], tuple[int, ...]]] = []
    for k, m in enumerate(query.mentions):
        if query.task == "caption":
            colour = PHRASE_COLOURS[k % len(PHRASE_COLOURS)]
        else:
            colour = GT if m.role == "referent" else CONTEXT
        colours.append((colour, m.object_ids))
        if show_mask:
            for oid in m.object_ids:
                rle = ds.object(oid).mask
                if rle is not None:
                    _overlay(base, masks.decode(rle), colour, 0.35 if m.role == "referent" else 0.2)
    if pred_mask is not None:
        _overlay(base, masks.decode(pred_mask), PRED, 0.45)

    s = scale or max(1, -(-512 // w))
    img = PILImage.fromarray(base.clip(0, 255).astype(np.uint8)).resize((w * s, h * s), PILImage.NEAREST)
    draw = ImageDraw.Draw(img)
    for box in proposals:
        draw.rectangle([v * s for v in box], outline=PROPOSAL, width=1)
    for colour, ids in colours:
        for oid in ids:
            draw.rectangle([v * s for v in ds.object(oid).box], outline=colour, width=max(2, s))
    for k, box in enumerate(pred_boxes):
        draw.rectangle([v * s for v in box], outline=PRED, width=max(3, 2 * s) if k == 0 else 1)

    tokens = query.tokens
    for m in sorted(query.mentions, key=lambda m: -m.start):
        tokens = tokens[:m.start] + ["[" + " ".join(tokens[m.start:m.end]) + "]"] + tokens[m.end:]
    header = f"query {query.id} ({query.kind or query.task}, {query.split})"
    width = max(20, img.width // 11)
    lines = [header] + textwrap.wrap(" ".join(tokens), width=width)
    legend = ["boxes: " + ("one colour per [phrase]" if query.task == "caption" else "green = referent")]
    if any(m.role == "context" for m in query.mentions):
        legend.append("blue = context")
    if pred_boxes or pred_mask is not None:
        legend.append("red = prediction")
    if proposals:
        legend.append("yellow = proposals")
    lines += textwrap.wrap(", ".join(legend), width=width)
    font = _font(16)
    line_h = 22
    canvas = PILImage.new("RGB", (img.width, img.height + line_h * len(lines) + 10), (255, 255, 255))
    canvas.paste(img, (0, 0))
    d = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        d.text((6, img.height + 5 + i * line_h), line, fill=(0, 0, 0), font=font)
    return canvas


def save_png(image: PILImage.Image, path: Path) -> Path:
    """Save atomically as PNG."""
    from refground.atomic import atomic_file

    with atomic_file(Path(path), "wb") as fh:
        image.save(fh, format="PNG")
    return Path(path)


# ----------------------------------------------------------------------------------------------------------
# CMRIN Figure 4: ground truth, vertex-gate ("attention score") map, matching-score map

# A jet-like ramp (dark blue -> blue -> cyan -> yellow -> red -> dark red): warmer colour = higher score.
HEAT_STOPS = np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])
HEAT_COLOURS = np.array([[0, 0, 128], [0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0], [128, 0, 0]],
                        dtype=np.float64)
PANEL_GAP = 8  # white pixels between two panels of a figure


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Colour of each value in [0, 1] on the jet-like ramp :data:`HEAT_COLOURS` (values outside are
    clipped). values: float[...] -> uint8[..., 3] RGB."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    rgb = np.stack([np.interp(v, HEAT_STOPS, HEAT_COLOURS[:, c]) for c in range(3)], axis=-1)
    return np.rint(rgb).astype(np.uint8)


def score_map(height: int, width: int, boxes: np.ndarray, values: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """Per-pixel maximum of ``values`` over the boxes covering the pixel; ``fill`` where no box covers it.

    boxes: float[K, 4] xyxy continuous pixels (may be fractional or reach outside the image); values:
    float[K] finite. Pixel (x, y) (column x, row y) is covered by a box when its centre lies in it:
    x1 <= x + 0.5 < x2 and y1 <= y + 0.5 < y2. Returns float32[height, width].

    Boxes are painted in ascending order of value so a higher one overwrites a lower one: each pixel ends
    with the maximum exactly, with one slice assignment per box and no loop over pixels.
    """
    out = np.full((int(height), int(width)), fill, dtype=np.float32)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(boxes) != len(values):
        raise ValueError(f"score_map: {len(boxes)} boxes but {len(values)} values")
    if len(boxes) == 0 or height <= 0 or width <= 0:
        return out
    # First pixel whose centre is >= the edge: [start, stop) are the centres inside [x1, x2).
    xs = np.arange(width, dtype=np.float64) + 0.5
    ys = np.arange(height, dtype=np.float64) + 0.5
    x0, x1 = np.searchsorted(xs, boxes[:, 0], "left"), np.searchsorted(xs, boxes[:, 2], "left")
    y0, y1 = np.searchsorted(ys, boxes[:, 1], "left"), np.searchsorted(ys, boxes[:, 3], "left")
    for k in np.argsort(values, kind="stable"):
        out[y0[k]:y1[k], x0[k]:x1[k]] = values[k]
    return out


def normalise_scores(values: np.ndarray) -> np.ndarray:
    """Min-max normalise to [0, 1] (Figure 4); all values equal (or a single one) -> all 1. float32[K]."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(v) == 0:
        return v.astype(np.float32)
    lo, hi = float(v.min()), float(v.max())
    if not hi > lo:
        return np.ones_like(v, dtype=np.float32)
    return ((v - lo) / (hi - lo)).astype(np.float32)


def heat_overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the coloured ``heat`` (float[H, W] in [0, 1]) over ``image`` (uint8[H, W, 3]) with opacity
    ``alpha``. Returns uint8[H, W, 3]."""
    mixed = (1 - alpha) * np.asarray(image, dtype=np.float64) + alpha * heat_colours(heat).astype(np.float64)
    return np.rint(mixed).clip(0, 255).astype(np.uint8)


def _colour_bar(width: int, height: int = 10) -> PILImage.Image:
    ramp = heat_colours(np.linspace(0.0, 1.0, max(2, width)))
    return PILImage.fromarray(np.repeat(ramp[None], height, axis=0))


# ------------------------------------------------------------------- drawing helpers shared by the methods' figures


def text_width(font: Any, text: str) -> float:
    """Drawn width of ``text`` in ``font``, pixels."""
    try:
        return float(font.getlength(text))
    except AttributeError:  # a bitmap font without getlength: about 6 pixels a character
        return 6.0 * len(text)


def wrap(text: str, font: Any, width: int) -> list[str]:
    """``text`` broken at spaces into lines no wider than ``width`` pixels in ``font`` (a longer word stays
    whole on its own line)."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        trial = f"{line} {word}" if line else word
        if line and text_width(font, trial) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line] if line else lines


def dashed_rectangle(draw: ImageDraw.ImageDraw, box: Sequence[float], colour: tuple[int, int, int], width: int = 1,
                     dash: float = 6.0, gap: float = 4.0) -> None:
    """Outline ``box`` (x1, y1, x2, y2 in drawn pixels) with dashes of ``dash`` pixels and ``gap`` pixels between
    (PIL draws only solid outlines)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    for ax, ay, bx, by in ((x1, y1, x2, y1), (x2, y1, x2, y2), (x2, y2, x1, y2), (x1, y2, x1, y1)):
        length = math.hypot(bx - ax, by - ay)
        if length == 0:
            continue
        ux, uy = (bx - ax) / length, (by - ay) / length
        t = 0.0
        while t < length:
            e = min(t + dash, length)
            draw.line([ax + ux * t, ay + uy * t, ax + ux * e, ay + uy * e], fill=colour, width=width)
            t = e + gap
