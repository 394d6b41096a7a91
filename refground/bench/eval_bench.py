"""Benchmark of scoring a predictions file, against the pre-change implementation kept here as reference.

- ``eval_scoring``: a predictions file shaped like the quickstart's (3,600 expression queries, each with a
  top-1 ``box`` and 10 ranked float32 ``boxes`` with ``scores``, as ``refground eval --method cmrin`` writes
  them) on a random dataset of the synthetic world's shape (10 objects and 7 expressions + 1 caption per
  image; relation queries with context objects). Four figures, each against the reference in the same run:
  writing the file (:func:`refground.eval.predictions.write_predictions`), reading it
  (:func:`~refground.eval.predictions.read_predictions`), scoring it with every section the file holds
  (:func:`refground.eval.evaluate.evaluate`: comprehension and proposal recall) and the quickstart's
  read + comprehension (:func:`~refground.eval.evaluate.comprehension_of`). Written bytes, parsed
  predictions and every figure must be identical to the reference's, else RuntimeError.

The ``_reference_*`` functions are the code as it was before the vectorised version (per-coordinate
validation, one ``box_iou`` per query, a :class:`~refground.data.model.Query` record per query, ``json.dumps``
per line); the tests compare the library with them on edge cases. Helpers the change left alone
(``Predictions``, ``_mask``, ``_Index``, ``_phrases``, ``_by_kind``, ...) are imported, not copied.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refground.atomic import atomic_file
from refground.bench import BenchResult, best_time, register
from refground.boxes import box_iou
from refground.data.model import TASKS, Dataset, Image, Mention, Object, Query, check_split_name
from refground.errors import DataError, UsageError
from refground.eval.evaluate import (
    EvalResult, Figures, _boxes_or_zero, _by_kind, _f, _Index, _mean, _phrases,
)
from refground.eval.metrics import (
    IOU_THRESHOLD, MASK_THRESHOLDS, MULTI_BOX, NO_HIT, POINT_IN, RECALL_NS, _t, as_boxes, box_accuracy_hits,
    mask_intersection_union, mask_stats_from_counts, matched_box_iou, pointit_hits, recall_from_ranks,
)
from refground.eval.predictions import (
    FIELDS, Box, PhrasePrediction, Prediction, Predictions, QueryPrediction, _mask,
)

# ===================================================================== reference: predictions file


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(obj: dict[str, Any], key: str, where: str, minimum: int | None = None) -> int:
    v = obj[key]
    if not isinstance(v, int) or isinstance(v, bool):
        raise DataError(f"{where}: {key} must be an integer, got {json.dumps(v)}")
    if minimum is not None and v < minimum:
        raise DataError(f"{where}: {key} must be >= {minimum}, got {v}")
    return v


def _box(value: Any, where: str, what: str = "box") -> Box:
    if not isinstance(value, list) or len(value) != 4 or not all(_is_number(v) for v in value):
        raise DataError(f"{where}: {what} must be 4 numbers [x1, y1, x2, y2], got {json.dumps(value)}")
    x1, y1, x2, y2 = (float(v) for v in value)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise DataError(f"{where}: {what} has a non-finite number: {json.dumps(value)}")
    if x2 < x1 or y2 < y1:
        raise DataError(f"{where}: {what} {json.dumps(value)} has x2 < x1 or y2 < y1 (expected xyxy)")
    return (x1, y1, x2, y2)


def _number(value: Any, where: str, what: str) -> float:
    if not _is_number(value) or not math.isfinite(float(value)):
        raise DataError(f"{where}: {what} must be a finite number, got {json.dumps(value)}")
    return float(value)


def _ranked(obj: dict[str, Any], where: str) -> tuple[tuple[Box, ...] | None, tuple[float, ...] | None]:
    if "boxes" not in obj:
        if "scores" in obj:
            raise DataError(f"{where}: scores given without boxes")
        return None, None
    raw = obj["boxes"]
    if not isinstance(raw, list):
        raise DataError(f"{where}: boxes must be a list of [x1, y1, x2, y2], got {json.dumps(raw)[:80]}")
    boxes = tuple(_box(b, where, f"boxes[{i}]") for i, b in enumerate(raw))
    if "scores" not in obj:
        return boxes, None
    rs = obj["scores"]
    if not isinstance(rs, list) or len(rs) != len(boxes):
        raise DataError(f"{where}: scores must be a list of {len(boxes)} numbers (one per box)")
    scores = tuple(_number(s, where, f"scores[{i}]") for i, s in enumerate(rs))
    if any(b > a for a, b in zip(scores, scores[1:])):
        raise DataError(f"{where}: scores must be non-increasing (boxes are ranked best first)")
    return boxes, scores


def _reference_parse_line(obj: Any, where: str, line: int = 0) -> Prediction:
    """:func:`refground.eval.predictions.parse_line` before the change."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = [k for k in obj if k not in FIELDS]
    if unknown:
        raise DataError(f"{where}: unknown field {unknown[0]!r} (expected: {', '.join(FIELDS)})")
    if "query_id" not in obj:
        raise DataError(f"{where}: missing query_id")
    qid = _int(obj, "query_id", where)
    image_id = _int(obj, "image_id", where) if "image_id" in obj else None
    box = _box(obj["box"], where) if "box" in obj else None
    score = _number(obj["score"], where, "score") if "score" in obj else None
    if score is not None and box is None:
        raise DataError(f"{where}: score given without box")
    boxes, scores = _ranked(obj, where)
    if "mention" in obj:
        if "mask" in obj:
            raise DataError(f"{where}: phrase lines (with mention) take boxes, not masks")
        if box is None and boxes is None:
            raise DataError(f"{where}: phrase line without box or boxes")
        return PhrasePrediction(qid, _int(obj, "mention", where, minimum=0), box, score, boxes, scores,
                                image_id, line)
    mask = _mask(obj["mask"], where) if "mask" in obj else None
    if box is None and boxes is None and mask is None:
        raise DataError(f"{where}: no box, boxes or mask for query {qid}")
    return QueryPrediction(qid, box, score, boxes, scores, mask, image_id, line)


def _reference_read_predictions(path: str | os.PathLike) -> Predictions:
    """:func:`refground.eval.predictions.read_predictions` before the change."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such predictions file")
    preds = Predictions(str(path))
    try:
        with open(path, encoding="utf-8") as fh:
            for n, text in enumerate(fh, start=1):
                if not text.strip():
                    continue
                where = f"{path}: line {n}"
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
                preds.add(_reference_parse_line(obj, where, n))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file") from None
    if not len(preds):
        raise DataError(f"{path}: empty predictions file (expected JSON lines with query_id)")
    return preds


def _box_json(box: Any) -> list[float]:
    if isinstance(box, torch.Tensor):
        box = box.detach().cpu().tolist()
    return [float(v) for v in np.asarray(box, dtype=np.float64).reshape(4)]


def _reference_to_json(pred: Prediction) -> dict[str, Any]:
    """:func:`refground.eval.predictions.to_json` before the change."""
    out: dict[str, Any] = {"query_id": int(pred.query_id)}
    if isinstance(pred, PhrasePrediction):
        out["mention"] = int(pred.mention)
    if pred.image_id is not None:
        out["image_id"] = int(pred.image_id)
    if pred.box is not None:
        out["box"] = _box_json(pred.box)
    if pred.score is not None:
        out["score"] = float(pred.score)
    if pred.boxes is not None:
        out["boxes"] = [_box_json(b) for b in pred.boxes]
    if pred.scores is not None:
        out["scores"] = [float(s) for s in pred.scores]
    if isinstance(pred, QueryPrediction) and pred.mask is not None:
        counts = pred.mask["counts"]
        out["mask"] = {"size": [int(v) for v in pred.mask["size"]],
                       "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}
    return out


def _reference_from_items(items: Iterable[Prediction | dict[str, Any]], path: str = "<predictions>") -> Predictions:
    """``Predictions.from_items`` before the change (through the reference parser)."""
    preds = Predictions(path)
    for n, item in enumerate(items, start=1):
        obj = item if isinstance(item, dict) else _reference_to_json(item)
        preds.add(_reference_parse_line(obj, f"{path}: line {n}", n))
    return preds


def _reference_write_predictions(path: str | os.PathLike,
                                 items: Iterable[Prediction | dict[str, Any]] | Predictions) -> Path:
    """:func:`refground.eval.predictions.write_predictions` before the change."""
    path = Path(path)
    preds = items if isinstance(items, Predictions) else _reference_from_items(items, str(path))
    with atomic_file(path, "w", encoding="utf-8") as fh:
        for pred in preds:
            fh.write(json.dumps(_reference_to_json(pred), separators=(", ", ": ")) + "\n")
    return path


# ============================================================================== reference: metrics


def _reference_proposal_hit_ranks(proposals: Sequence[Any], targets: Sequence[Any],
                                  iou_threshold: float = IOU_THRESHOLD, max_rank: int | None = None
                                  ) -> list[np.ndarray]:
    """:func:`refground.eval.metrics.proposal_hit_ranks` before the change: one ``box_iou`` per query."""
    if len(proposals) != len(targets):
        raise ValueError(f"{len(proposals)} proposal lists for {len(targets)} target lists")
    out = []
    for props, tgts in zip(proposals, targets):
        p, t = as_boxes(props), as_boxes(tgts)
        if max_rank is not None:
            p = p[:max_rank]
        ranks = np.full(len(t), NO_HIT, dtype=np.int64)
        if len(p) and len(t):
            hit = box_iou(_t(p), _t(t)).numpy() >= iou_threshold  # [K, T]
            covered = hit.any(axis=0)
            ranks[covered] = hit.argmax(axis=0)[covered]
        out.append(ranks)
    return out


# ============================================================================= reference: evaluate


def _reference_check_against(ds: Dataset, preds: Predictions, index: _Index) -> None:
    offsets = ds.query_mention_offsets
    for p in preds:
        where = preds.where(p)
        k = index.query.get(int(p.query_id))
        if k is None:
            raise DataError(f"{where}: unknown query id {p.query_id} (not in dataset {ds.name})")
        task = TASKS[int(ds.query_tasks[k])]
        image_id = int(ds.query_image_ids[k])
        if isinstance(p, PhrasePrediction):
            if task != "caption":
                raise DataError(f"{where}: query {p.query_id} is an expression; \"mention\" lines are for captions")
            n = int(offsets[k + 1] - offsets[k])
            if p.mention >= n:
                raise DataError(f"{where}: mention {p.mention} out of range (query {p.query_id} has {n} mentions)")
        elif task == "caption":
            raise DataError(f"{where}: query {p.query_id} is a caption; give one line per phrase with \"mention\"")
        if p.image_id is not None and p.image_id != image_id:
            raise DataError(f"{where}: image_id {p.image_id} does not match query {p.query_id}'s image {image_id}")
        if isinstance(p, QueryPrediction) and p.mask is not None:
            size = index.image_size(image_id)
            if tuple(p.mask["size"]) != size:
                raise DataError(f"{where}: mask size {list(p.mask['size'])} does not match image {image_id} "
                                f"(height, width) = {list(size)}")


def _ref_comprehension(expr: list[Query], preds: Predictions, gt: np.ndarray, gt_masks: list, point_in: str,
                       thr: float) -> dict[str, Figures]:
    tops = [preds.queries[q.id].top_box if q.id in preds.queries else None for q in expr]
    have = np.array([b is not None for b in tops], dtype=bool)
    boxes = _boxes_or_zero(tops)
    ious = np.where(have, matched_box_iou(boxes, gt), 0.0)
    hits = box_accuracy_hits(boxes, gt, thr) & have
    points = pointit_hits(boxes, gt, gt_masks if point_in == "mask" else None, point_in) & have

    def figures(idx: np.ndarray) -> Figures:
        return {"queries": len(idx), "scored": int(have[idx].sum()), "missing": int((~have[idx]).sum()),
                "precision@1": _mean(hits[idx]), "pointit": _mean(points[idx]),
                "mean_iou": _mean(ious[idx])}

    return _by_kind([q.kind for q in expr], figures)


def _ref_segmentation(expr: list[Query], preds: Predictions, gt_masks: list,
                      thresholds: Sequence[float]) -> dict[str, Figures]:
    from refground import masks as rmasks

    usable = np.array([m is not None for m in gt_masks], dtype=bool)
    have = np.array([q.id in preds.queries and preds.queries[q.id].mask is not None for q in expr], dtype=bool)
    empty: dict[tuple[int, int], dict[str, Any]] = {}
    pred_list, gt_list = [], []
    for q, g, ok in zip(expr, gt_masks, have):
        if g is None:
            continue
        if ok:
            pred_list.append(preds.queries[q.id].mask)
        else:
            size = (int(g["size"][0]), int(g["size"][1]))
            if size not in empty:
                empty[size] = rmasks.encode(np.zeros(size, dtype=bool))
            pred_list.append(empty[size])
        gt_list.append(g)
    inter = np.zeros(len(expr), dtype=np.int64)
    union = np.zeros(len(expr), dtype=np.int64)
    inter[usable], union[usable] = mask_intersection_union(pred_list, gt_list)

    def figures(idx: np.ndarray) -> Figures:
        use = idx[usable[idx]]
        stats = mask_stats_from_counts(inter[use], union[use], thresholds)
        return {"queries": len(use), "scored": int(have[use].sum()), "missing": int((~have[use]).sum()),
                "no_gt_mask": int((~usable[idx]).sum()), **{k: _f(v) for k, v in stats.items()}}

    return _by_kind([q.kind for q in expr], figures)


def _ref_proposals(expr: list[Query], preds: Predictions, gt: np.ndarray, index: _Index, ns: Sequence[int],
                   thr: float) -> dict[str, Figures]:
    ds = index.ds
    props, have, ctx_targets = [], [], []
    for q in expr:
        p = preds.queries.get(q.id)
        ranked = p.ranked if p is not None else ()
        have.append(p is not None and (p.boxes is not None or p.box is not None))
        props.append(np.asarray(ranked, dtype=np.float64).reshape(-1, 4))
        ctx_ids = dict.fromkeys(o for m in q.mentions if m.role == "context" for o in m.object_ids)
        rows = [index.object[o] for o in ctx_ids]
        ctx_targets.append(ds.object_boxes[rows].reshape(-1, 4))
    have_arr = np.array(have, dtype=bool)
    max_rank = max(ns)
    ref_ranks = _reference_proposal_hit_ranks(props, [gt[i:i + 1] for i in range(len(expr))], thr, max_rank)
    ctx_ranks = _reference_proposal_hit_ranks(props, ctx_targets, thr, max_rank)

    def figures(idx: np.ndarray) -> Figures:
        ref = np.concatenate([ref_ranks[i] for i in idx]) if len(idx) else np.zeros(0, np.int64)
        ctx = np.concatenate([ctx_ranks[i] for i in idx]) if len(idx) else np.zeros(0, np.int64)
        out: Figures = {"queries": len(idx), "scored": int(have_arr[idx].sum()),
                           "missing": int((~have_arr[idx]).sum()), "referents": len(ref)}
        out.update({f"recall@{n}": _f(v) for n, v in recall_from_ranks(ref, ns).items()})
        out["context_objects"] = len(ctx)
        out.update({f"context_recall@{n}": _f(v) for n, v in recall_from_ranks(ctx, ns).items()})
        return out

    return _by_kind([q.kind for q in expr], figures)


def _reference_evaluate(ds: Dataset, predictions: Predictions | str | os.PathLike, split: str,
                        multi_box: str = "union", point_in: str = "box", ns: Sequence[int] = RECALL_NS,
                        iou_threshold: float = IOU_THRESHOLD,
                        mask_thresholds: Sequence[float] = MASK_THRESHOLDS) -> EvalResult:
    """:func:`refground.eval.evaluate.evaluate` before the change (a Query record per query)."""
    check_split_name(split)
    if multi_box not in MULTI_BOX:
        raise UsageError(f"unknown multi-box rule {multi_box!r}; expected one of: {', '.join(MULTI_BOX)}")
    if point_in not in POINT_IN:
        raise UsageError(f"unknown point-in region {point_in!r}; expected one of: {', '.join(POINT_IN)}")
    ns = sorted({int(n) for n in ns})
    if not ns or ns[0] < 1:
        raise UsageError(f"proposal recall N must be positive integers, got {list(ns)}")
    preds = predictions if isinstance(predictions, Predictions) else _reference_read_predictions(predictions)
    index = _Index(ds)
    _reference_check_against(ds, preds, index)

    queries = ds.queries(split)
    if not queries:
        raise UsageError(f"dataset {ds.name} has no queries in split {split!r} "
                         f"(its splits: {', '.join(ds.splits()) or 'none'})")
    expr = [q for q in queries if q.task == "expression"]
    caps = [q for q in queries if q.task == "caption"]
    in_split = {q.id for q in queries}
    used = sum(1 for p in preds if p.query_id in in_split)

    gt_rows = np.array([index.object[q.referent_object_id] for q in expr], dtype=np.int64)
    gt = ds.object_boxes[gt_rows].reshape(-1, 4)
    gt_masks = [index.object_mask(int(r)) for r in gt_rows]

    sections: dict[str, dict[str, Figures]] = {}
    if preds.has_boxes:
        sections["comprehension"] = _ref_comprehension(expr, preds, gt, gt_masks, point_in, iou_threshold)
    if preds.has_masks:
        sections["segmentation"] = _ref_segmentation(expr, preds, gt_masks, mask_thresholds)
    if preds.has_ranked:
        sections["proposals"] = _ref_proposals(expr, preds, gt, index, ns, iou_threshold)
    if preds.phrases:
        sections["phrase_grounding"] = _phrases(caps, preds, index, multi_box, point_in, iou_threshold)
    counts = {
        "queries": len(queries),
        "expressions": len(expr),
        "captions": len(caps),
        "phrases": sum(1 for q in caps for m in q.mentions if m.object_ids),
        "phrases_without_boxes": sum(1 for q in caps for m in q.mentions if not m.object_ids),
        "predictions": len(preds),
        "predictions_in_split": used,
        "predictions_outside_split": len(preds) - used,
    }
    options = {"multi_box": multi_box, "point_in": point_in, "iou_threshold": float(iou_threshold),
               "ns": list(ns), "mask_thresholds": [float(t) for t in mask_thresholds]}
    return EvalResult(ds.name, split, preds.path, options, counts, sections)


def _reference_comprehension_of(ds: Dataset, path: str | os.PathLike, split: str) -> dict[str, Figures]:
    """:func:`refground.eval.evaluate.comprehension_of` before the change (every section computed)."""
    return _reference_evaluate(ds, _reference_read_predictions(path), split).sections["comprehension"]


# ========================================================================================= inputs
EXPRESSION_KINDS = ("category", "attribute", "location", "size", "relation1", "relation2")


def bench_dataset(num_queries: int, seed: int, split: str = "val", per_image: int = 7, objects: int = 10,
                  size: int = 256) -> Dataset:
    """A random dataset shaped like the synthetic world: ``per_image`` expressions (relation1: one context
    object; relation2: two context mentions sharing an object) and one caption per image, all in ``split``."""
    rng = np.random.default_rng(seed)
    images, objs, queries = [], [], []
    oid = qid = 1
    for i in range(-(-num_queries // per_image)):
        images.append(Image(i + 1, f"{i}.png", size, size, split))
        xy = rng.uniform(0, size * 0.8, (objects, 2))
        boxes = np.concatenate([xy, np.minimum(xy + rng.uniform(8, size * 0.4, (objects, 2)), size)], 1)
        ids = list(range(oid, oid + objects))
        objs += [Object(ids[j], i + 1, "circle", tuple(float(v) for v in boxes[j])) for j in range(objects)]
        oid += objects
        for _ in range(per_image):
            ref, c1, c2 = (ids[k] for k in rng.permutation(objects)[:3])
            kind = EXPRESSION_KINDS[int(rng.integers(len(EXPRESSION_KINDS)))]
            ms = [Mention(0, 2, "referent", (ref,))]
            if kind == "relation1":
                ms.append(Mention(3, 5, "context", (c1,)))
            elif kind == "relation2":
                ms += [Mention(3, 5, "context", (c1, c2)), Mention(5, 6, "context", (c1,))]
            queries.append(Query(qid, i + 1, "expression", "the thing near it", tuple(ms), kind=kind, split=split))
            qid += 1
        queries.append(Query(qid, i + 1, "caption", "two things here",
                             (Mention(0, 2, "referent", (ids[0], ids[1])), Mention(2, 3, "referent", ())),
                             kind="caption", split=split))
        qid += 1
    return Dataset.from_records("bench", images, objs, queries)


def bench_lines(ds: Dataset, split: str, k: int, seed: int) -> list[dict[str, Any]]:
    """CMRIN-style prediction lines for the expressions of ``split``: ``k`` float32 boxes ranked by a float32
    score (the referent, jittered, at a random rank), ``box`` = the first; every 50th query left out."""
    rng = np.random.default_rng(seed + 1)
    lines = []
    rows = ds.query_rows(split, "expression")
    offsets, oo = ds.query_mention_offsets, ds.mention_object_offsets
    for n, r in enumerate(rows.tolist()):
        if n % 50 == 49:
            continue
        referent = int(ds.mention_object_ids[oo[offsets[r]]])  # bench_dataset: the first mention is the referent
        xy = rng.uniform(0, 200, (k, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(5, 60, (k, 2))], 1)
        boxes[rng.integers(k)] = ds.object_boxes[ds.object_row(referent)] + rng.normal(0, 3, 4)
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2])
        boxes = boxes.astype(np.float32)
        scores = np.sort(rng.random(k).astype(np.float32))[::-1]
        lines.append({"query_id": int(ds.query_ids[r]), "box": boxes[0].tolist(), "boxes": boxes.tolist(),
                      "scores": scores.tolist()})
    return lines


# ====================================================================================== benchmark


@register("eval_scoring")
def bench_eval_scoring(quick: bool, seed: int) -> list[BenchResult]:
    from refground.eval.evaluate import comprehension_of, evaluate
    from refground.eval.predictions import read_predictions, write_predictions

    n, k, split = (600 if quick else 3600), 10, "val"
    ds = bench_dataset(n, seed, split)
    lines = bench_lines(ds, split, k, seed)
    repeat = 2 if quick else 3
    results = []
    with tempfile.TemporaryDirectory() as d:
        ours_path, ref_path = Path(d) / "ours.jsonl", Path(d) / "ref.jsonl"
        write_predictions(ours_path, lines)
        _reference_write_predictions(ref_path, lines)
        if ours_path.read_bytes() != ref_path.read_bytes():
            raise RuntimeError("write_predictions writes other bytes than the reference")
        ours, ref = read_predictions(ours_path), _reference_read_predictions(ours_path)
        if ours.queries != ref.queries or [p.line for p in ours] != [p.line for p in ref]:
            raise RuntimeError("read_predictions parses other predictions than the reference")
        if evaluate(ds, ours, split).to_dict() != _reference_evaluate(ds, ref, split).to_dict():
            raise RuntimeError("evaluate gives other figures than the reference")
        if comprehension_of(ds, ours_path, split) != _reference_comprehension_of(ds, ours_path, split):
            raise RuntimeError("comprehension_of gives other figures than the reference")
        what = f"{len(lines)} queries x {k} ranked float32 boxes + scores"
        cases = [
            ("eval_write", lambda: write_predictions(ours_path, lines),
             lambda: _reference_write_predictions(ref_path, lines), "write_predictions"),
            ("eval_read", lambda: read_predictions(ours_path), lambda: _reference_read_predictions(ours_path),
             "read_predictions"),
            ("eval_score", lambda: evaluate(ds, ours, split), lambda: _reference_evaluate(ds, ref, split),
             "evaluate, all sections the file holds (comprehension, proposal recall), parsed predictions"),
            ("eval_comprehension_of", lambda: comprehension_of(ds, ours_path, split),
             lambda: _reference_comprehension_of(ds, ours_path, split), "read + comprehension (the quickstart's)"),
        ]
        for name, fn, base, note in cases:
            t_ours = best_time(fn, repeat=repeat, min_time=0.0)
            t_ref = best_time(base, repeat=repeat, min_time=0.0)
            results.append(BenchResult(name, t_ours * 1e3, "ms", t_ref * 1e3, t_ref / t_ours,
                                       f"{note}; {what}; baseline: the pre-change code (eval_bench._reference_*)"))
    return results
