"""Pictures of queries: image, ground truth (box and mask), context objects, predictions, proposals.

Everything returns a PIL image; the CLI decides where it goes.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

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
