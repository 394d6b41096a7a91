"""CMRIN's Figure 4: ground truth, the vertex-gate ("attention score") map and the matching-score map."""

from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw

from refground.data.model import Dataset, Query
from refground.viz import (PANEL_GAP, PRED, _colour_bar, _font, heat_overlay, load_image,
                           normalise_scores, render_query, score_map)


def render_cmrin_figure(
    ds: Dataset,
    query: Query,
    boxes: np.ndarray,
    scores: np.ndarray,
    vertex_gates: np.ndarray | None = None,
    candidates: str = "gt",
    show_mask: bool = True,
    scale: int | None = None,
    alpha: float = 0.5,
) -> PILImage.Image:
    """CMRIN's Figure 4 for one query: three panels side by side, then the query text.

    1. ground truth, drawn by :func:`render_query` (referent green, context blue, masks overlaid);
    2. the vertex-gate ("attention score", eq. 4) map; for variants without vertex gates
       (``vertex_gates`` None) the panel shows the dimmed image and the note "no vertex gates in this
       variant", so every figure has the same layout;
    3. the matching-score (eq. 8) map, with the top-scoring candidate's box (the prediction) in red.

    boxes: float[K, 4] xyxy image pixels (the candidates); scores, vertex_gates: float[K]. A pixel's value
    is the highest normalised value among the candidates covering its centre (:func:`score_map` at the
    drawn resolution); values are min-max normalised to [0, 1] over the candidates (all equal -> 1),
    uncovered pixels are 0. The heat map (:func:`heat_colours`, warmer = higher) is blended over the image
    with opacity ``alpha``. Each panel is ``width * scale`` pixels wide (``scale`` as render_query:
    default enough for 512 pixels), with :data:`PANEL_GAP` pixels between panels.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    gt_full = render_query(ds, query, show_mask=show_mask, scale=scale)
    base = np.asarray(load_image(ds, query.image_id), dtype=np.uint8)
    h, w = base.shape[:2]
    s = scale or max(1, -(-512 // w))
    pw, ph = w * s, h * s
    big = np.asarray(PILImage.fromarray(base).resize((pw, ph), PILImage.NEAREST))
    drawn = boxes * s

    def heat_panel(values: np.ndarray) -> PILImage.Image:
        heat = score_map(ph, pw, drawn, normalise_scores(values))
        return PILImage.fromarray(heat_overlay(big, heat, alpha))

    panels = [gt_full.crop((0, 0, pw, ph))]
    if vertex_gates is not None:
        panels.append(heat_panel(np.asarray(vertex_gates, dtype=np.float64).reshape(-1)))
    else:
        dim = PILImage.fromarray(np.rint(0.35 * big + 0.65 * 255).astype(np.uint8))
        ImageDraw.Draw(dim).text((10, ph // 2 - 10), "no vertex gates in this variant", fill=(0, 0, 0), font=_font(18))
        panels.append(dim)
    score_panel = heat_panel(scores)
    top = int(np.argmax(scores)) if len(scores) else -1
    if top >= 0:
        ImageDraw.Draw(score_panel).rectangle([float(v) for v in drawn[top]], outline=PRED, width=max(3, s))
    panels.append(score_panel)

    n_ref = [oid for m in query.mentions if m.role == "referent" for oid in m.object_ids]
    iou_note = ""
    if top >= 0 and len(n_ref) == 1:
        import torch

        from refground.boxes import box_iou

        ref = torch.tensor([ds.object(n_ref[0]).box], dtype=torch.float64)
        iou = float(box_iou(torch.from_numpy(boxes[top:top + 1]), ref)[0, 0])
        iou_note = f", IoU {iou:.2f} with the referent"
    legend = "green = referent" + (", blue = context" if any(m.role == "context" for m in query.mentions) else "")
    captions = [
        ["ground truth", legend],
        ["attention (vertex gates)", "warmer = higher, 0..1" if vertex_gates is not None else "not in this variant"],
        ["matching score", (f"red = top-1 (score {scores[top]:.3f}{iou_note})" if top >= 0 else "no candidates")],
    ]

    font, small = _font(16), _font(13)
    line_h, bar_h = 22, 10
    cap_h = 2 * line_h + bar_h + 12
    total_w = 3 * pw + 2 * PANEL_GAP
    tokens = query.tokens
    for m in sorted(query.mentions, key=lambda m: -m.start):
        tokens = tokens[:m.start] + ["[" + " ".join(tokens[m.start:m.end]) + "]"] + tokens[m.end:]
    header = (f"query {query.id} ({query.kind or query.task}, {query.split}), {len(boxes)} candidates "
              f"({candidates}); pixel = max normalised score of the candidates covering it")
    width_chars = max(20, total_w // 9)
    lines = textwrap.wrap(header, width=width_chars) + textwrap.wrap(" ".join(tokens), width=width_chars)
    canvas = PILImage.new("RGB", (total_w, ph + cap_h + line_h * len(lines) + 10), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    for i, (panel, (title, sub)) in enumerate(zip(panels, captions)):
        x = i * (pw + PANEL_GAP)
        canvas.paste(panel, (x, 0))
        d.text((x + 6, ph + 4), title, fill=(0, 0, 0), font=font)
        d.text((x + 6, ph + 4 + line_h), sub, fill=(60, 60, 60), font=small)
        if i > 0 and (i == 2 or vertex_gates is not None):
            bar_w = max(2, min(pw - 40, 160))
            y = ph + 2 * line_h + 6
            canvas.paste(_colour_bar(bar_w, bar_h), (x + 18, y))
            d.text((x + 6, y - 2), "0", fill=(0, 0, 0), font=small)
            d.text((x + 22 + bar_w, y - 2), "1", fill=(0, 0, 0), font=small)
    for i, line in enumerate(lines):
        d.text((6, ph + cap_h + 5 + i * line_h), line, fill=(0, 0, 0), font=font)
    return canvas
