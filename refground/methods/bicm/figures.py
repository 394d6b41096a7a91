"""BiCM's qualitative figure for one query (the paper's Figs. 4 and 6): the query-aware attention map with ``P_t``,
the vanilla attention map, COM's top proposals with their scores, and the final choice beside the ground truth.

:func:`explain_bicm` computes what the figure shows for one (image, text) pair, from the same pieces the method
runs on (:mod:`refground.features.clip_attention` for the maps, :func:`refground.methods.bicm.modules.compute_scores`
and :func:`refground.methods.bicm.run.predict_boxes` for the scores and the choice); :func:`render_bicm_figure`
draws it as a PIL image with :mod:`refground.viz`'s colours, heat ramp, fonts and panel spacing, so BiCM's pictures
read like the other methods'; :func:`show_bicm` is ``refground show --method bicm``. The ground truth is read for
display only, after the choice is made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw

from refground.errors import DataError, UsageError
from refground.viz import GT, PANEL_GAP, PRED, _colour_bar, _font, dashed_rectangle, heat_overlay, text_width, wrap

PANEL_WIDTH = 384  # default drawn width of one panel (4 side by side); small images are enlarged to it
DEFAULT_TOP_K = 5
ALPHA = 0.5  # opacity of the heat colours over the image
LINE_H, SMALL_H = 22, 18  # line heights of the 16 and 13 pixel fonts
# Colours of COM's ranked proposals (panel c), none of them red or green (the prediction's and the truth's).
RANK_COLOURS = [(255, 140, 0), (0, 200, 255), (200, 80, 255), (255, 220, 0), (0, 150, 140), (255, 105, 180),
                (120, 120, 255), (160, 110, 40)]
DEFAULT_SPLIT = "val"  # the query when none is given: the first expression of this split (refground show's default)


def _darker(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    """``colour`` darkened for text on white (the light cyans and yellows are unreadable as they are)."""
    return (int(0.7 * colour[0]), int(0.7 * colour[1]), int(0.7 * colour[2]))


def rank_colour(k: int) -> tuple[int, int, int]:
    """The colour of COM's rank-``k`` proposal (0 = best) in panel (c)."""
    return RANK_COLOURS[k % len(RANK_COLOURS)]


# ------------------------------------------------------------------------------------------------ compute
def _patch_size(model: Any) -> int:
    vc = getattr(model.config, "vision_config", None) or model.config
    p = vc.patch_size
    return int(p if isinstance(p, int) else p[0])


def _run_model(dataset: str, cache: Any, run: str) -> tuple[str, Any, Any]:
    """(variant, config, KAM model or None) of a run name: the class-name baseline, a training-free row
    (:data:`refground.methods.bicm.model.VARIANT_MODULES`) or a trained run (its config and KAM's MLP)."""
    from refground.methods.bicm.model import (
        CLASS_NAME,
        TRAINED,
        VARIANT_MODULES,
        variant_config,
    )
    from refground.methods.bicm.run import load_run
    from refground.runs import resolve_run

    if run == CLASS_NAME:
        return CLASS_NAME, None, None
    if run in VARIANT_MODULES and run not in TRAINED:
        return run, variant_config(run), None
    ref = resolve_run(run, "bicm", dataset, cache)
    if not ref.local:
        raise UsageError(f"--run {run}: BiCM predicts on the dataset its KAM was trained on")
    loaded = load_run(ref.path)
    return "bicm", loaded.config, loaded.model


def query_text(ds: Any, query_id: int | None) -> tuple[Any, str, int, np.ndarray | None]:
    """The query of ``query_id`` (None: the first expression of :data:`DEFAULT_SPLIT`), the text BiCM grounds (an
    expression's text, or a caption's first phrase), the mention index (-1 for an expression) and the true boxes
    float64[k, 4] (the referent's, or the phrase's objects'; None when it has none): display only."""
    from refground.methods.bicm.data import phrase_text

    if query_id is None:
        rows = ds.query_rows(DEFAULT_SPLIT, "expression")
        if not len(rows):
            raise UsageError(f"dataset {ds.name}: no expression in split {DEFAULT_SPLIT!r}; give --query")
        q = ds.queries(DEFAULT_SPLIT, "expression")[0]
    else:
        q = ds.query(int(query_id))
    if q.task == "caption":
        if not q.mentions:
            raise DataError(f"caption {q.id} has no phrase to ground")
        m, mention = q.mentions[0], 0
        text = phrase_text(q.tokens, m.start, m.end)
        ids = list(m.object_ids)
    else:
        mention = -1
        text = q.text
        ids = [o for m in q.mentions if m.role == "referent" for o in m.object_ids]
    truth = ds.object_boxes[[ds.object_row(o) for o in ids]].astype(np.float64).reshape(-1, 4) if ids else None
    return q, text, mention, truth


def explain_bicm(dataset: str, cache: Any, run: str, query_id: int | None, top_k: int | None = None,
                 box_rule: str | None = None) -> dict[str, Any]:
    """What :func:`render_bicm_figure` draws for one query (see its docstring for the keys).

    The maps come from one CLIP pass on the pair (:func:`~refground.features.clip_attention.
    cls_attention_and_grad_texts`): the query-aware map (eqs. 4-5) and the vanilla map (the head mean of the [CLS]
    attention), each at the image's size, min-max normalised (:func:`~refground.features.clip_attention.
    grid_to_image`), ``P_t`` cut from each at Thr_a (:func:`~refground.features.clip_attention.box_from_map`).
    COM's ranking is ``S^BU = S^PQ + S^CQ`` (eq. 8) of the proposals, from a one-row
    :func:`~refground.methods.bicm.modules.compute_scores`; the final box is ``run``'s under ``box_rule`` (default
    the paper's: ``largest`` for an expression, ``union`` for a phrase)."""
    import torch

    from refground.features.clip_attention import (
        box_from_map,
        cls_attention_and_grad_texts,
        grid_to_image_pair,
        head_mean,
        processor_window,
    )
    from refground.methods.bicm.model import BiCMConfig, variant_config
    from refground.methods.bicm.modules import compute_scores
    from refground.methods.bicm.run import DEFAULT_FEATURES, Inputs, predict_boxes

    k = DEFAULT_TOP_K if top_k is None else int(top_k)
    if k < 1:
        raise UsageError(f"--top-k {k}: must be at least 1")
    variant, cfg, kam = _run_model(dataset, cache, run)
    pc = cfg if cfg is not None else BiCMConfig(qam="none", sf=False, kam=False)
    inp = Inputs(dataset, cache, DEFAULT_FEATURES, None, pc.top_n, pc.min_score, pc.min_boxes)
    q, text, mention, truth = query_text(inp.ds, query_id)
    rule = box_rule or ("largest" if mention < 0 else "union")
    row = inp.row_of_image()[int(q.image_id)]
    image = inp.image(row)
    hh, ww = image.shape[:2]

    clip = inp.clip.clip
    pixels = clip._pixels([image])
    att, grad, sims = cls_attention_and_grad_texts(clip.model, pixels, **clip.tokens([text]))
    patch = _patch_size(clip.model)
    grid = int(pixels.shape[-2]) // patch, int(pixels.shape[-1]) // patch
    window = processor_window(clip.processor.image_processor, hh, ww)
    a_qa = head_mean(att[None], grad, True).view(*grid).cpu()  # eqs. 4-5
    a_va = head_mean(att[None], None, False).view(*grid).cpu()  # Table 5's vanilla map
    pairs = {m: grid_to_image_pair(a, (hh, ww), window) for m, a in (("qa", a_qa), ("va", a_va))}
    maps = {m: norm for m, (_, norm) in pairs.items()}
    raw_max = {m: float(raw.max()) for m, (raw, _) in pairs.items()}
    pt = {m: box_from_map(maps[m], pc.thr_a).numpy() for m in maps}

    ms = compute_scores(inp.clip, inp.image, inp.props, np.array([row], np.int64), [text], pc.thr_a)
    _, com = predict_boxes(inp, ms, [text], "com", variant_config("com"), "argmax")
    valid = com["valid"][0]
    s_bu = com["score"][0].masked_fill(~valid, float("-inf"))
    order = torch.argsort(s_bu, descending=True, stable=True)[:min(k, int(valid.sum()))]
    names = inp.props.class_names
    final, cand = predict_boxes(inp, ms, [text], variant, cfg, rule, kam)
    cvalid = cand["valid"][0]
    score = cand["score"][0]
    mean = float(score[cvalid].mean()) if bool(cvalid.any()) else float("nan")
    top = int(score.masked_fill(~cvalid, float("-inf")).argmax())
    pt_index = int(cand["pt_index"])
    return {
        "image": image, "text": text, "query_id": int(q.id), "mention": mention, "task": q.task,
        "kind": q.kind, "split": q.split, "image_id": int(q.image_id), "run": run, "variant": variant,
        "qa_map": maps["qa"].numpy(), "va_map": maps["va"].numpy(), "qa_raw_max": raw_max["qa"],
        "va_raw_max": raw_max["va"], "pt_box": pt["qa"], "va_pt_box": pt["va"], "thr_a": float(pc.thr_a),
        "sim_iq": float(sims[0]),
        "com_boxes": com["boxes"][0][order].numpy(), "com_scores": com["score"][0][order].numpy(),
        "com_pq": com["s_pq"][0][order].numpy(), "com_cq": com["s_cq"][0][order].numpy(),
        "com_labels": [names[int(c)] for c in com["labels"][0][order]],
        "final_box": final[0].numpy(), "rule": rule, "candidates": int(cvalid.sum()),
        "above_mean": int((cvalid & (score > mean)).sum()), "top_is_pt": pt_index >= 0 and top == pt_index,
        "truth": truth,
    }


# ------------------------------------------------------------------------------------------------ drawing
def _box_iou_with_truth(box: np.ndarray, truth: np.ndarray | None) -> float | None:
    """IoU of ``box`` with the union of the true boxes (the metric module's definitions); None without truth."""
    from refground.eval.metrics import matched_box_iou, union_box

    if truth is None or not len(truth):
        return None
    return float(matched_box_iou(np.asarray(box, np.float64).reshape(1, 4),
                                 union_box(np.asarray(truth, np.float64).reshape(-1, 4))[None])[0])


def _tag(draw: ImageDraw.ImageDraw, x: float, y: float, text: str, colour: tuple[int, int, int], font: Any) -> None:
    """A small filled label (a rank) with its top-left corner at (x, y)."""
    w = text_width(font, text)
    draw.rectangle([x, y, x + w + 6, y + 16], fill=colour)
    draw.text((x + 3, y + 1), text, fill=(0, 0, 0), font=font)


def _check(ex: dict[str, Any]) -> tuple[int, int]:
    image = np.asarray(ex["image"])
    if image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"BiCM figure: the image must be [H, W, 3], got {list(image.shape)}")
    h, w = image.shape[:2]
    for key in ("qa_map", "va_map"):
        if tuple(np.shape(ex[key])) != (h, w):
            raise DataError(f"BiCM figure: {key} has shape {list(np.shape(ex[key]))}, the image {[h, w]}")
    if len(ex["com_boxes"]) != len(ex["com_scores"]):
        raise DataError(f"BiCM figure: {len(ex['com_boxes'])} COM boxes but {len(ex['com_scores'])} scores")
    return h, w


def render_bicm_figure(ex: dict[str, Any], scale: int | None = None, alpha: float = ALPHA) -> PILImage.Image:
    """Four panels side by side, each with its caption underneath (boxes xyxy image pixels):

    (a) the query-aware attention map ``ex["qa_map"]`` (float[H, W] in [0, 1], min-max normalised) in
        :func:`refground.viz.heat_colours` over the image ``ex["image"]`` (uint8[H, W, 3]) with ``P_t``
        ``ex["pt_box"]`` in red;
    (b) the vanilla attention map ``ex["va_map"]`` the same way, its ``P_t`` ``ex["va_pt_box"]`` dashed white;
    (c) COM's top proposals ``ex["com_boxes"]`` (float[k, 4], best first) in :func:`rank_colour`, numbered, the
        best thick; the caption lists each with its class ``ex["com_labels"]`` and ``S^BU`` ``ex["com_scores"]``
        (``= S^PQ + S^CQ``: ``ex["com_pq"]``, ``ex["com_cq"]``);
    (d) ``ex["final_box"]`` (float[4]) of run ``ex["run"]`` in red (drawn inside the box's edges) and the true boxes
        ``ex["truth"]`` (float[m, 4] or None) in green (drawn just outside theirs, so a hit hides neither), with its
        IoU against their union box.

    Header keys: ``text``, ``query_id``, ``kind``, ``split``, ``task``, ``run``, ``rule``, ``thr_a``; optional
    ``qa_raw_max`` / ``va_raw_max`` (the raw maps' maxima), ``sim_iq``, ``candidates``, ``above_mean``,
    ``top_is_pt``. Each panel is ``W * scale`` pixels wide (default: the smallest integer scale reaching
    :data:`PANEL_WIDTH`), :data:`refground.viz.PANEL_GAP` apart. Returns an RGB PIL image."""

    h, w = _check(ex)
    s = int(scale or max(1, -(-PANEL_WIDTH // w)))
    pw, ph = w * s, h * s
    base = np.asarray(ex["image"], dtype=np.uint8)
    big = np.asarray(PILImage.fromarray(base).resize((pw, ph), PILImage.NEAREST))
    thick = max(3, s)
    small, font = _font(13), _font(16)

    def heat_panel(key: str) -> PILImage.Image:
        heat = np.repeat(np.repeat(np.clip(np.asarray(ex[key], np.float64), 0.0, 1.0), s, 0), s, 1)
        return PILImage.fromarray(heat_overlay(big, heat, alpha))

    def scaled(box: Any) -> list[float]:
        return [float(v) * s for v in np.asarray(box, np.float64).reshape(4)]

    pa = heat_panel("qa_map")
    ImageDraw.Draw(pa).rectangle(scaled(ex["pt_box"]), outline=PRED, width=thick)
    pb = heat_panel("va_map")
    if ex.get("va_pt_box") is not None:
        dashed_rectangle(ImageDraw.Draw(pb), scaled(ex["va_pt_box"]), (255, 255, 255), width=max(2, s // 2))

    pc = PILImage.fromarray(big.copy())
    dc = ImageDraw.Draw(pc)
    boxes = np.asarray(ex["com_boxes"], np.float64).reshape(-1, 4)
    for i in range(len(boxes) - 1, -1, -1):  # the best on top
        b = scaled(boxes[i])
        dc.rectangle(b, outline=rank_colour(i), width=thick if i == 0 else max(1, s // 2 + 1))
    for i in range(len(boxes)):
        b = scaled(boxes[i])
        _tag(dc, b[0] + 2, b[1] + 2, str(i + 1), rank_colour(i), small)

    pd = PILImage.fromarray(big.copy())
    dd = ImageDraw.Draw(pd)
    truth = None if ex.get("truth") is None else np.asarray(ex["truth"], np.float64).reshape(-1, 4)
    gw = max(2, s)
    for t in truth if truth is not None else []:  # just outside the box: a prediction on the truth hides neither
        x1, y1, x2, y2 = scaled(t)
        dd.rectangle([x1 - gw, y1 - gw, x2 + gw - 1, y2 + gw - 1], outline=GT, width=gw)
    dd.rectangle(scaled(ex["final_box"]), outline=PRED, width=thick)
    iou = _box_iou_with_truth(ex["final_box"], truth)

    grey = (60, 60, 60)
    thr = f"Thr_a = {float(ex.get('thr_a', 0.7)):g}"

    def raw(key: str) -> str:
        return f", raw max {ex[key]:.2g}" if ex.get(key) is not None else ""

    com_lines = [f"{i + 1}. {ex['com_labels'][i] if i < len(ex.get('com_labels') or []) else '?'}: "
                 f"{float(ex['com_scores'][i]):.3f}"
                 + (f" = {float(ex['com_pq'][i]):.3f} + {float(ex['com_cq'][i]):.3f}"
                    if ex.get("com_pq") is not None and ex.get("com_cq") is not None else "")
                 for i in range(len(boxes))]
    verdict = "no true box" if iou is None else f"IoU {iou:.2f} with the truth ({'hit' if iou >= 0.5 else 'miss'})"
    extra = []
    if ex.get("candidates") is not None:
        extra.append(f"{ex['candidates']} candidates, {ex.get('above_mean', '?')} above the mean score")
    if ex.get("top_is_pt"):
        extra.append("top score: P_t")
    captions: list[list[tuple[str, Any, tuple[int, int, int]]]] = [
        [("(a) query-aware map, P_t (red)", font, (0, 0, 0))]
        + [(ln, small, grey) for ln in wrap(f"eqs. 4-5, {thr}{raw('qa_raw_max')}", small, pw - 12)],
        [("(b) vanilla attention map", font, (0, 0, 0))]
        + [(ln, small, grey) for ln in wrap(f"mean over heads of the [CLS] attention; its P_t dashed white"
                                            f"{raw('va_raw_max')}", small, pw - 12)],
        [(f"(c) COM: top {len(boxes)} by S^BU", font, (0, 0, 0))]
        + [(ln, small, _darker(rank_colour(i))) for i, c in enumerate(com_lines) for ln in wrap(c, small, pw - 12)]
        + [("S^BU = S^PQ + S^CQ (eq. 8)", small, grey)],
        [(f"(d) run {ex.get('run')} (red), truth (green)", font, (0, 0, 0))]
        + [(ln, small, grey) for ln in wrap(f"rule {ex.get('rule')}; {verdict}; the truth is for display only"
                                            + ("; " + "; ".join(extra) if extra else ""), small, pw - 12)],
    ]
    what = "phrase" if ex.get("task") == "caption" else "expression"
    sim = f", S^IQ {float(ex['sim_iq']):.3f}" if ex.get("sim_iq") is not None else ""
    head = [(ln, font, (0, 0, 0)) for ln in wrap(f'"{ex.get("text", "")}"', font, 4 * pw - 12)]
    where = f"query {ex.get('query_id')} ({what}, {ex.get('kind') or ex.get('task')}, {ex.get('split')})"
    head += [(f"{where}, image {ex.get('image_id')}{sim}", small, grey)]
    head_h = sum(LINE_H if f is font else SMALL_H for _, f, _ in head) + 8
    bar_h = 10
    cap_h = max(sum(LINE_H if f is font else SMALL_H for _, f, _ in c) for c in captions) + bar_h + 16
    panels = [pa, pb, pc, pd]
    total_w = len(panels) * pw + (len(panels) - 1) * PANEL_GAP
    canvas = PILImage.new("RGB", (total_w, head_h + ph + cap_h), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    y = 4
    for text, f, colour in head:
        d.text((6, y), text, fill=colour, font=f)
        y += LINE_H if f is font else SMALL_H
    for i, (panel, lines) in enumerate(zip(panels, captions)):
        x = i * (pw + PANEL_GAP)
        canvas.paste(panel, (x, head_h))
        y = head_h + ph + 4
        for text, f, colour in lines:
            d.text((x + 6, y), text, fill=colour, font=f)
            y += LINE_H if f is font else SMALL_H
        if i < 2:  # the heat colours' key (the maps are min-max normalised)
            bar_w = max(2, min(pw - 60, 160))
            canvas.paste(_colour_bar(bar_w, bar_h), (x + 24, y + 4))
            d.text((x + 6, y + 2), "0", fill=(0, 0, 0), font=small)
            d.text((x + 28 + bar_w, y + 2), "1", fill=(0, 0, 0), font=small)
    return canvas


def show_bicm(dataset: str, cache: Any, run: str, query_id: int | None, out: Path, top_k: int | None = None,
              box_rule: str | None = None, **_: Any) -> dict[str, Any]:
    """``refground show --method bicm``: :func:`explain_bicm` drawn by :func:`render_bicm_figure` to ``out`` (PNG).
    ``query_id`` None: the first expression of the val split (``refground show``'s default). Other options of
    ``refground show`` (``show_mask``) do not apply. Returns ``{"path", "message"}``."""
    from refground.viz import save_png

    ex = explain_bicm(dataset, cache, run, query_id, top_k, box_rule)
    save_png(render_bicm_figure(ex), Path(out))
    iou = _box_iou_with_truth(ex["final_box"], ex["truth"])
    what = f"caption {ex['query_id']}, phrase 1" if ex["mention"] >= 0 else f"query {ex['query_id']}"
    verdict = "" if iou is None else f", IoU {iou:.2f} with the truth"
    return {"path": str(out), "message": f"bicm run {run}, {what} ({ex['rule']}){verdict}"}


__all__ = ["DEFAULT_TOP_K", "PANEL_WIDTH", "explain_bicm", "query_text", "rank_colour", "render_bicm_figure",
           "show_bicm"]
