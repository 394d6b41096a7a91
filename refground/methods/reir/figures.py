"""ReIR's caption figure: one caption's phrases on its image, each with its chosen box, its top-K candidates and
its true boxes, and the caption under the image with every phrase in its box's colour.

Returns a PIL image (what :func:`refground.viz.save_png` writes, as the other methods' figures do); the image
loading, fonts and phrase colours are :mod:`refground.viz`'s, so ReIR's pictures read like the rest.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw

from refground.errors import DataError
from refground.eval.metrics import IOU_THRESHOLD, matched_box_iou, union_box
from refground.viz import PHRASE_COLOURS, _font, dashed_rectangle, load_image, text_width

MIN_WIDTH = 512  # drawn width the image is enlarged to (integer nearest-neighbour scale), so text stays legible
TRUTH = (255, 255, 255)
LINE_H, SMALL_H = 22, 18  # line heights of the 16 and 13 pixel fonts
MARGIN = 8


def phrase_colour(i: int) -> tuple[int, int, int]:
    """The box colour of phrase ``i`` (:data:`refground.viz.PHRASE_COLOURS`, cycled)."""
    return PHRASE_COLOURS[i % len(PHRASE_COLOURS)]


def text_colour(i: int) -> tuple[int, int, int]:
    """Phrase ``i``'s colour darkened for text on white (the light greens and cyans are unreadable as they are)."""
    return tuple(int(0.7 * c) for c in phrase_colour(i))  # type: ignore[return-value]


def _tag(draw: ImageDraw.ImageDraw, x: float, y: float, text: str, colour: tuple[int, int, int], font: Any) -> None:
    """A small filled label (the phrase's number) with its top-left corner at (x, y)."""
    w = text_width(font, text)
    draw.rectangle([x, y, x + w + 6, y + 16], fill=colour)
    draw.text((x + 3, y + 1), text, fill=(0, 0, 0), font=font)


def _phrase_iou(box: np.ndarray, truth: np.ndarray | None) -> float | None:
    """IoU of the chosen box with the phrase's true (union) box (the metric module's definitions); None without
    truth."""
    if truth is None or len(np.asarray(truth).reshape(-1, 4)) == 0:
        return None
    return float(matched_box_iou(np.asarray(box, np.float64).reshape(1, 4),
                                 union_box(np.asarray(truth, np.float64).reshape(-1, 4))[None])[0])


def _check(ex: dict[str, Any]) -> int:
    n = len(ex["spans"])
    for key in ("boxes", "candidates", "scores"):
        if len(ex[key]) != n:
            raise DataError(f"ReIR figure: {n} phrases but {len(ex[key])} {key}")
    return n


def render_reir_figure(ex: dict[str, Any], scale: int | None = None) -> PILImage.Image:
    """The caption figure of :func:`refground.methods.reir.run.explain_caption`'s dict ``ex`` (keys ``dataset``
    a :class:`~refground.data.model.Dataset`, ``image_id``, ``tokens`` list[str], ``spans`` list of (start,
    end) token spans, ``candidates`` list of float[K, 4], ``scores`` list of float[K] (eq. 11's s; negative
    for padding, not drawn), ``boxes`` float[N, 4] the chosen boxes, ``truth`` list of float[k, 4] or None,
    ``kinds`` list[str]; optional ``query_id`` and ``run`` for the header). Boxes are xyxy image pixels.

    On the image (enlarged by the smallest integer scale reaching :data:`MIN_WIDTH` pixels, or ``scale``), per
    phrase i in colour :func:`phrase_colour` (i): its top-K candidates thin and dashed, its chosen box solid
    and thick with the tag "i+1", and its true boxes white, dashed, tagged "i+1" in the phrase's colour. Under
    the image: a header, the caption with each phrase in its colour and brackets, one line per phrase (number,
    words, kind, the chosen box's score and its IoU with the true union box, hit at IoU >= 0.5), and a legend.
    Returns an RGB PIL image."""
    n = _check(ex)
    base = load_image(ex["dataset"], int(ex["image_id"]))
    w, h = base.size
    s = int(scale or max(1, -(-MIN_WIDTH // w)))
    img = base.resize((w * s, h * s), PILImage.NEAREST)
    draw = ImageDraw.Draw(img)
    small = _font(13)
    boxes = np.asarray(ex["boxes"], dtype=np.float64).reshape(-1, 4)
    truth = [None if t is None else np.asarray(t, dtype=np.float64).reshape(-1, 4) for t in ex["truth"]]
    truth += [None] * (n - len(truth))
    # Candidates first (thin, under everything), then the truth, then the chosen boxes on top.
    for i in range(n):
        cands = np.asarray(ex["candidates"][i], dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(ex["scores"][i], dtype=np.float64).reshape(-1)
        for box, sc in zip(cands, scores):
            if sc >= 0:
                dashed_rectangle(draw, box * s, phrase_colour(i), width=1, dash=4, gap=3)
    for i, t in enumerate(truth):
        if t is None:
            continue
        for box in t:
            dashed_rectangle(draw, box * s, TRUTH, width=max(2, s // 2), dash=8, gap=5)
            _tag(draw, box[0] * s + 2, box[3] * s - 18, str(i + 1), phrase_colour(i), small)
    for i, box in enumerate(boxes):
        draw.rectangle([v * s for v in box], outline=phrase_colour(i), width=max(3, s))
        _tag(draw, box[0] * s + 2, box[1] * s + 2, str(i + 1), phrase_colour(i), small)

    font = _font(16)
    width = img.width
    lines: list[list[tuple[str, Any, tuple[int, int, int]]]] = []  # each line: runs of (text, font, colour)
    head = f"caption {ex['query_id']}, " if ex.get("query_id") is not None else ""
    run = f", run {ex['run']}" if ex.get("run") else ""
    lines.append([(f"{head}image {ex['image_id']}{run}", small, (60, 60, 60))])

    # The caption, word by word: a phrase's words in its colour, in brackets; wrapped at the panel's width.
    colour_of: dict[int, int] = {}
    for i, (a, b) in enumerate(ex["spans"]):
        for t in range(int(a), int(b)):
            colour_of[t] = i
    starts = {int(a): i for i, (a, _) in enumerate(ex["spans"])}
    ends = {int(b) - 1: i for i, (_, b) in enumerate(ex["spans"])}
    line: list[tuple[str, Any, tuple[int, int, int]]] = []
    x = 0.0
    for t, word in enumerate(ex["tokens"]):
        text = ("[" if t in starts else "") + word + ("]" if t in ends else "") + " "
        colour = text_colour(colour_of[t]) if t in colour_of else (0, 0, 0)
        ww = text_width(font, text)
        if line and x + ww > width - 2 * MARGIN:
            lines.append(line)
            line, x = [], 0.0
        line.append((text, font, colour))
        x += ww
    if line:
        lines.append(line)

    kinds = list(ex.get("kinds") or [])
    for i in range(n):
        a, b = (int(v) for v in ex["spans"][i])
        kind = kinds[i] if i < len(kinds) else ""
        scores = np.asarray(ex["scores"][i], dtype=np.float64).reshape(-1)
        best = float(scores.max()) if len(scores) else float("nan")
        iou = _phrase_iou(boxes[i], truth[i])
        verdict = "no true box" if iou is None else \
            f"IoU {iou:.2f} with the true box ({'hit' if iou >= IOU_THRESHOLD else 'miss'})"
        words = " ".join(ex["tokens"][a:b])
        lines.append([(f"{i + 1}. {words}" + (f" ({kind})" if kind else "") + f": s = {best:.2f}, {verdict}",
                       small, text_colour(i))])
    legend = ("thick = chosen box (eq. 11's argmax, refined), thin dashed = its top-K candidates, "
              "white dashed = true boxes; numbers = phrases")
    lines += _wrap_runs(legend, small, width - 2 * MARGIN, (60, 60, 60))

    heights = [LINE_H if any(f is font for _, f, _ in ln) else SMALL_H for ln in lines]
    canvas = PILImage.new("RGB", (width, img.height + sum(heights) + 2 * MARGIN), (255, 255, 255))
    canvas.paste(img, (0, 0))
    d = ImageDraw.Draw(canvas)
    y = img.height + MARGIN
    for ln, lh in zip(lines, heights):
        x = float(MARGIN)
        for text, f, colour in ln:
            d.text((x, y), text, fill=colour, font=f)
            x += text_width(f, text)
        y += lh
    return canvas


def _wrap_runs(text: str, font: Any, width: float, colour: tuple[int, int, int]
               ) -> list[list[tuple[str, Any, tuple[int, int, int]]]]:
    """``text`` broken at spaces into lines no wider than ``width`` pixels, each one run of ``colour``."""
    out: list[list[tuple[str, Any, tuple[int, int, int]]]] = []
    cur = ""
    for word in text.split():
        trial = f"{cur} {word}" if cur else word
        if cur and text_width(font, trial) > width:
            out.append([(cur, font, colour)])
            cur = word
        else:
            cur = trial
    if cur:
        out.append([(cur, font, colour)])
    return out


__all__ = ["phrase_colour", "render_reir_figure", "text_colour"]
