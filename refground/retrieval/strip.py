"""A PNG strip of retrieval hits: one tile per hit, best first, with its rank and score under it.

Tiles show the hit's image scaled to a fixed size; a region or object hit has its box drawn in the prediction
colour of :mod:`refground.viz` (red), a query hit its text under the tile. An image query (``--image ID``)
gets its own tile first, framed in the ground-truth colour (green). The caption at the top says what was
searched. Returns a PIL image; the CLI writes it (:func:`refground.viz.save_png`).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw

from refground.data.model import Dataset
from refground.retrieval.search import Hit, Retrieval
from refground.viz import GT, PANEL_GAP, PRED, _font, load_image

TILE = 160  # pixels of a tile's longer side
PER_ROW = 5  # tiles per row of the strip
LINE_H = 18


def _tile(ds: Dataset, image_id: int, box: Sequence[float] | None, tile: int) -> PILImage.Image:
    """The image scaled so its longer side is ``tile`` pixels (nearest: synthetic images stay crisp), with
    ``box`` (xyxy pixels of the original image) drawn."""
    img = load_image(ds, image_id)
    s = tile / max(img.width, img.height)
    img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), PILImage.NEAREST)
    if box is not None:
        ImageDraw.Draw(img).rectangle([v * s for v in box], outline=PRED, width=3)
    return img


def _caption(hit: Hit, width_chars: int) -> list[str]:
    lines = [f"#{hit.rank}  {hit.score:.3f}", f"image {hit.image_id}"]
    if hit.object_id is not None:
        lines[-1] += f", object {hit.object_id}" + (f" ({hit.category})" if hit.category else "")
    if hit.region is not None:
        lines[-1] += f", region {hit.region}"
    if hit.text is not None:
        lines += textwrap.wrap(f"q{hit.query_id}: {hit.text}", width=width_chars)[:4]
    return lines


def render_strip(ds: Dataset, result: Retrieval, tile: int = TILE, per_row: int = PER_ROW) -> PILImage.Image:
    """The strip of ``result``'s hits (see the module docstring): rows of ``per_row`` tiles of ``tile`` pixels."""
    font = _font(13)
    chars = max(12, tile // 7)
    tiles: list[tuple[PILImage.Image, list[str], tuple[int, int, int] | None]] = []
    if result.image_id is not None:
        tiles.append((_tile(ds, result.image_id, None, tile), ["query image", f"image {result.image_id}"], GT))
    for h in result.hits:
        tiles.append((_tile(ds, h.image_id, h.box if result.section in ("regions", "objects") else None, tile),
                      _caption(h, chars), None))
    what = f'"{result.text}"' if result.text is not None else f"image {result.image_id}"
    header = textwrap.wrap(f"{what} -> {result.section} of {result.clip} ({result.index.get('type', '?')} index), "
                           f"top {len(result.hits)}", width=max(30, (tile + PANEL_GAP) * min(per_row, max(1, len(tiles)))
                                                               // 7))
    if not result.hits:
        header.append("no hits")
    cols = max(1, min(per_row, len(tiles)))
    n_rows = -(-len(tiles) // cols) if tiles else 0
    caption_lines = max((len(c) for _, c, _ in tiles), default=0)
    cell_w, cell_h = tile + PANEL_GAP, tile + PANEL_GAP + caption_lines * LINE_H
    top = len(header) * LINE_H + PANEL_GAP
    canvas = PILImage.new("RGB", (max(cols * cell_w + PANEL_GAP, 240), top + n_rows * cell_h + PANEL_GAP),
                          (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(header):
        draw.text((PANEL_GAP, PANEL_GAP // 2 + i * LINE_H), line, fill=(0, 0, 0), font=font)
    positions = np.arange(len(tiles))
    xs = PANEL_GAP + (positions % cols) * cell_w
    ys = top + (positions // cols) * cell_h
    for (img, lines, frame), x, y in zip(tiles, xs.tolist(), ys.tolist()):
        canvas.paste(img, (x, y))
        if frame is not None:
            draw.rectangle([x - 2, y - 2, x + img.width + 1, y + img.height + 1], outline=frame, width=2)
        for j, line in enumerate(lines):
            draw.text((x, y + tile + 2 + j * LINE_H), line, fill=(0, 0, 0), font=font)
    return canvas
