"""LTS's Figure 4 for one query, and the small success/failure panels of the report's grid.

Everything returns a PIL image (what :func:`refground.viz.save_png` writes); the heat colours, overlays, fonts
and panel spacing are :mod:`refground.viz`'s, so LTS pictures read like the other methods'.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw

from refground.data.model import Dataset, Query
from refground.errors import DataError
from refground.eval.metrics import (
    iou_from_counts,
    mask_intersection_union,
    point_in_mask,
)
from refground.viz import (
    GT,
    PANEL_GAP,
    PRED,
    _colour_bar,
    _font,
    _overlay,
    heat_overlay,
    load_image,
    text_width,
    wrap,
)

PANEL_WIDTH = 384  # default drawn width of one Figure 4 panel (4 side by side)
GRID_PANEL = 192  # least drawn width of one panel of the report's grid (small images are enlarged)
GRID_TEXT_LINES = 4  # expression lines under a grid panel
MASK_ALPHA = 0.5
LINE_H, SMALL_H = 22, 18  # line heights of the 16 and 13 pixel fonts


def _font_width(font: Any, text: str) -> int:
    return round(text_width(font, text))


def expression_text(query: Query) -> str:
    """The query's words with the referent's span in brackets (as :func:`refground.viz.render_query` writes)."""
    tokens = query.tokens
    for m in sorted(query.mentions, key=lambda m: -m.start):
        if m.role == "referent":
            tokens = tokens[:m.start] + ["[" + " ".join(tokens[m.start:m.end]) + "]"] + tokens[m.end:]
    return " ".join(tokens)


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU of two bool[H, W] masks by the metric module's definition (0 when both are empty)."""
    inter, union = mask_intersection_union([np.asarray(pred, dtype=bool)], [np.asarray(gt, dtype=bool)])
    return float(iou_from_counts(inter, union)[0])


def upsample_heatmap(heatmap: np.ndarray, height: int, width: int) -> np.ndarray:
    """The stride-8 map float[h, w] bilinearly resized to float32[height, width] (cell centres at
    ``(c + 0.5) * width / w``, like the model's upsampling and :func:`heatmap_points`)."""
    hm = np.asarray(heatmap, dtype=np.float32)
    if hm.ndim != 2 or hm.size == 0:
        raise DataError(f"LTS heatmap must be a non-empty [h, w] map, got shape {list(hm.shape)}")
    img = PILImage.fromarray(hm, mode="F").resize((int(width), int(height)), PILImage.BILINEAR)
    return np.asarray(img, dtype=np.float32)


def _enlarge(mask: np.ndarray, s: int) -> np.ndarray:
    return np.repeat(np.repeat(np.asarray(mask, dtype=bool), s, axis=0), s, axis=1)


def outline(mask: np.ndarray, thickness: int = 2) -> np.ndarray:
    """The inner border of ``mask`` (bool[H, W]): its pixels within ``thickness`` 4-neighbour steps of the
    background (the image edge counts as background)."""
    inner = np.asarray(mask, dtype=bool)
    for _ in range(max(1, thickness)):
        p = np.pad(inner, 1, constant_values=False)
        inner = inner & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return np.asarray(mask, dtype=bool) & ~inner


def _check_size(name: str, mask: np.ndarray | None, shape: tuple[int, int], query: Query) -> None:
    if mask is not None and tuple(np.shape(mask)) != shape:
        raise DataError(f"query {query.id}: {name} mask has shape {list(np.shape(mask))}, its image "
                        f"{list(shape)}")


def _mark_point(draw: ImageDraw.ImageDraw, x: float, y: float, r: int) -> None:
    # A white ring around a black one: visible on the dark blue and on the red ends of the ramp alike.
    draw.ellipse([x - r, y - r, x + r, y + r], outline=(255, 255, 255), width=max(2, r // 3))
    draw.ellipse([x - r + 3, y - r + 3, x + r - 3, y + r - 3], outline=(0, 0, 0), width=2)
    draw.line([x - r - 4, y, x - r + 2, y], fill=(255, 255, 255), width=2)
    draw.line([x + r - 2, y, x + r + 4, y], fill=(255, 255, 255), width=2)


def render_lts_figure(ds: Dataset, ex: dict[str, Any], scale: int | None = None,
                      alpha: float = 0.5) -> PILImage.Image:
    """LTS's Figure 4 for one query: four panels side by side, each with its caption underneath.

    1. the image, captioned with the expression (referent words in brackets) and the query's id, kind, split;
    2. the localisation heatmap ``ex["heatmap"]`` (float[h, w] in [0, 1], stride 8: sigmoid of H_mask, or of
       the output map for variants without localisation), bilinearly upsampled to the image, min-max
       normalised (a flat map is all 1; the colour key gives the raw minimum and maximum) and blended over it
       with opacity ``alpha`` in :func:`refground.viz.heat_colours` (warmer = higher), its maximum
       ``ex["point"]`` (x, y image pixels) ringed;
    3. the predicted mask ``ex["mask"]`` (bool[H, W]) in red, its IoU with the ground truth in the title;
    4. the ground truth ``ex["gt"]`` (bool[H, W]) in green, or the dimmed image and "no ground-truth mask"
       when it is None.

    ``ex`` is :func:`refground.methods.lts.run.explain_query`'s dict (also ``query``, ``threshold``; ``probs``
    is not drawn). Each panel is ``width * scale`` pixels wide (default: the smallest integer scale reaching
    :data:`PANEL_WIDTH`), :data:`PANEL_GAP` pixels apart. A mask whose size is not the image's is a one-line
    DataError.
    """
    query: Query = ex["query"]
    base = np.asarray(load_image(ds, query.image_id), dtype=np.uint8)
    h, w = base.shape[:2]
    pred = np.asarray(ex["mask"], dtype=bool)
    gt = None if ex.get("gt") is None else np.asarray(ex["gt"], dtype=bool)
    _check_size("predicted", pred, (h, w), query)
    _check_size("ground-truth", gt, (h, w), query)
    s = int(scale or max(1, -(-PANEL_WIDTH // w)))
    pw, ph = w * s, h * s
    big = np.asarray(PILImage.fromarray(base).resize((pw, ph), PILImage.NEAREST))

    # 2: the heatmap, upsampled at the drawn resolution (smooth at any scale) and min-max normalised like
    # CMRIN's score maps: sigmoid(H_mask) of small referents peaks far below 1, and raw it would be all blue.
    raw = np.asarray(ex["heatmap"], dtype=np.float64)
    lo, hi = float(raw.min()), float(raw.max())
    heat = upsample_heatmap(ex["heatmap"], ph, pw)
    heat = (heat - lo) / (hi - lo) if hi > lo else np.ones_like(heat)
    heat_panel = PILImage.fromarray(heat_overlay(big, np.clip(heat, 0.0, 1.0), alpha))
    px, py = (float(v) for v in ex["point"])
    _mark_point(ImageDraw.Draw(heat_panel), px * s, py * s, max(6, pw // 40))
    where = ""
    if gt is not None:
        where = ", inside the referent" if bool(point_in_mask(np.array([[px, py]]), gt)[0]) else \
            ", outside the referent"

    # 3 and 4: masks over the image.
    def mask_panel(mask: np.ndarray, colour: tuple[int, int, int]) -> PILImage.Image:
        img = big.astype(np.float64)
        _overlay(img, _enlarge(mask, s), colour, MASK_ALPHA)
        edge = outline(_enlarge(mask, s), max(1, s // 2))
        img[edge] = colour
        return PILImage.fromarray(img.clip(0, 255).astype(np.uint8))

    pred_panel = mask_panel(pred, PRED)
    if gt is not None:
        gt_panel = mask_panel(gt, GT)
        iou_title = f"prediction, IoU {mask_iou(pred, gt):.2f}"
        gt_sub = f"referent mask, {int(gt.sum())} pixels"
    else:
        gt_panel = PILImage.fromarray(np.rint(0.35 * big + 0.65 * 255).astype(np.uint8))
        ImageDraw.Draw(gt_panel).text((10, ph // 2 - 10), "no ground-truth mask", fill=(0, 0, 0), font=_font(18))
        iou_title = "prediction (no ground truth: no IoU)"
        gt_sub = "this query's referent has no mask"

    font, small = _font(16), _font(13)
    threshold = ex.get("threshold")
    thr = f"P_mask > {float(threshold):g}, " if threshold is not None else ""
    captions: list[list[tuple[str, Any, tuple[int, int, int]]]] = [
        [(line, font, (0, 0, 0)) for line in wrap(f'"{expression_text(query)}"', font, pw - 12)]
        + [(line, small, (60, 60, 60)) for line in
           wrap(f"query {query.id} ({query.kind or query.task}, {query.split}), image {query.image_id}", small,
                pw - 12)],
        [("localisation heatmap (H_mask)", font, (0, 0, 0))]
        + [(line, small, (60, 60, 60)) for line in
           wrap(f"ring = maximum at ({px:.0f}, {py:.0f}){where}; "
                + ("colours min-max normalised" if hi > lo else f"a flat map (all {hi:.2g})"), small, pw - 12)],
        [(iou_title, font, (0, 0, 0))]
        + [(line, small, (60, 60, 60)) for line in wrap(f"red = {thr}{int(pred.sum())} pixels", small, pw - 12)],
        [("ground truth", font, (0, 0, 0)), (gt_sub, small, (60, 60, 60))],
    ]
    bar_h = 10
    heights = [sum(LINE_H if f is font else SMALL_H for _, f, _ in c) for c in captions]
    cap_h = max(heights[0], heights[1] + bar_h + 8, *heights[2:]) + 10
    panels = [PILImage.fromarray(big), heat_panel, pred_panel, gt_panel]
    total_w = len(panels) * pw + (len(panels) - 1) * PANEL_GAP
    canvas = PILImage.new("RGB", (total_w, ph + cap_h), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    for i, (panel, lines) in enumerate(zip(panels, captions)):
        x = i * (pw + PANEL_GAP)
        canvas.paste(panel, (x, 0))
        y = ph + 4
        for text, f, colour in lines:
            d.text((x + 6, y), text, fill=colour, font=f)
            y += LINE_H if f is font else SMALL_H
        if i == 1:  # the heat colours' key
            bar_w = max(2, min(pw - 90, 160))
            lo_text = f"{lo:.2g}"
            canvas.paste(_colour_bar(bar_w, bar_h), (x + 12 + _font_width(small, lo_text), y + 4))
            d.text((x + 6, y + 2), lo_text, fill=(0, 0, 0), font=small)
            d.text((x + 16 + _font_width(small, lo_text) + bar_w, y + 2), f"{hi:.2g}", fill=(0, 0, 0), font=small)
    return canvas


def example_panel(ds: Dataset, query: Query, pred: np.ndarray, gt: np.ndarray, iou: float,
                  width: int = GRID_PANEL) -> PILImage.Image:
    """One small panel of the report's grid: the image with the predicted mask (bool[H, W]) in red, the
    ground truth's outline (bool[H, W]) in green, and under it the IoU, the query id and the expression
    (wrapped, at most :data:`GRID_TEXT_LINES` lines). A small image is enlarged by the smallest integer scale
    reaching ``width`` (nearest neighbour, so the panel may be a little wider); a larger one is shrunk to
    ``width``."""
    base = np.asarray(load_image(ds, query.image_id), dtype=np.uint8)
    h, w = base.shape[:2]
    _check_size("predicted", pred, (h, w), query)
    _check_size("ground-truth", gt, (h, w), query)
    s = max(1, -(-width // w)) if w < width else 1
    img = np.asarray(PILImage.fromarray(base).resize((w * s, h * s), PILImage.NEAREST), dtype=np.float64)
    _overlay(img, _enlarge(pred, s), PRED, 0.4)
    img[outline(_enlarge(gt, s), max(2, s))] = GT
    pic = PILImage.fromarray(img.clip(0, 255).astype(np.uint8))
    if pic.width > width:  # a large real image: shrink to the panel's width (the outline stays 2+ pixels)
        pic = pic.resize((width, max(1, round(pic.height * width / pic.width))), PILImage.BILINEAR)
    pw = pic.width
    small = _font(13)
    text = wrap(query.text, small, pw - 8)
    if len(text) > GRID_TEXT_LINES:
        text = text[:GRID_TEXT_LINES - 1] + [text[GRID_TEXT_LINES - 1] + " ..."]
    lines = [f"IoU {iou:.2f}  (query {query.id})"] + text
    canvas = PILImage.new("RGB", (pw, pic.height + 6 + SMALL_H * len(lines)), (255, 255, 255))
    canvas.paste(pic, (0, 0))
    d = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        d.text((4, pic.height + 3 + i * SMALL_H), line, fill=(0, 0, 0) if i else (60, 60, 60), font=small)
    return canvas


def render_grid(rows: Sequence[tuple[str, Sequence[PILImage.Image], Sequence[PILImage.Image]]], title: str,
                per_side: int) -> PILImage.Image:
    """The report's grid: ``title`` on top, a header over the two halves ("successes", "failures"), then one row
    per ``(label, successes, failures)``: the label (an expression kind) on the left, up to ``per_side``
    success panels, a gap, up to ``per_side`` failure panels (:func:`example_panel`; the columns are as wide as
    the widest panel); an empty half says "none"."""
    font, small = _font(16), _font(13)
    panels = [p for _, ok, bad in rows for p in (*ok, *bad)]
    width = max([p.width for p in panels] or [GRID_PANEL])
    label_w, gap, half_gap = 110, PANEL_GAP, 3 * PANEL_GAP
    half = per_side * width + (per_side - 1) * gap
    total_w = max(label_w + 2 * half + half_gap + gap, _font_width(font, title) + 12)
    heights = [max([p.height for p in (*ok, *bad)] or [2 * SMALL_H]) for _, ok, bad in rows]
    head = LINE_H * 2 + 8
    canvas = PILImage.new("RGB", (total_w, head + sum(heights) + gap * len(rows) + 4), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    d.text((6, 4), title, fill=(0, 0, 0), font=font)
    x_ok, x_bad = label_w, label_w + half + half_gap
    d.text((x_ok + 4, 4 + LINE_H), "successes (IoU > 0.5)", fill=(0, 120, 0), font=font)
    d.text((x_bad + 4, 4 + LINE_H), "failures (IoU <= 0.5)", fill=(180, 0, 0), font=font)
    y = head
    for (label, ok, bad), rh in zip(rows, heights):
        d.line([0, y - gap // 2, total_w, y - gap // 2], fill=(200, 200, 200), width=1)
        d.text((6, y + 4), label, fill=(0, 0, 0), font=font)
        for x0, side in ((x_ok, ok), (x_bad, bad)):
            for k, p in enumerate(list(side)[:per_side]):
                canvas.paste(p, (x0 + k * (width + gap), y))
            if not side:
                d.text((x0 + 6, y + 6), "none", fill=(120, 120, 120), font=small)
        y += rh + gap
    d.line([x_bad - half_gap // 2, head - 4, x_bad - half_gap // 2, y], fill=(160, 160, 160), width=2)
    return canvas


__all__ = ["example_panel", "expression_text", "mask_iou", "outline", "render_grid", "render_lts_figure",
           "upsample_heatmap", "wrap"]
