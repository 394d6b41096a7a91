"""Score a predictions file (:mod:`refground.eval.predictions`) against one split of a dataset.

:func:`evaluate` picks the queries of the split with refer semantics (``ds.queries(split)``) and reports,
for each kind of prediction the file holds (a section is computed when at least one line of the file has
that kind of prediction; then every query of the split that lacks one counts as a miss):

* ``comprehension`` (expression queries, top-1 box = ``box`` or ``boxes[0]``): Precision@1
  (``precision@1``), PointIt (``pointit``) and the mean IoU of the top-1 box (``mean_iou``).
* ``segmentation`` (expression queries with ``mask``): ``overall_iou``, ``mean_iou``, ``prec@0.5`` ...
  ``prec@0.9``. A missing mask is scored as an empty mask (I = 0, U = |gt|). Queries whose referent has
  no ground-truth mask cannot be scored: they are left out and counted in ``no_gt_mask``.
* ``proposals`` (expression queries with ranked ``boxes``): ``recall@N`` of the referents and, separately,
  ``context_recall@N`` of the context objects (the distinct objects of the query's ``"context"``
  mentions). A query without a ranked list is scored with ``[box]`` if it has a box, else with none.
* ``phrase_grounding`` (caption queries, one phrase line per mention): ``accuracy`` (``multi_box``) and
  ``pointit``. Every mention of a caption that links at least one object is a phrase to ground (whatever
  its role); mentions without objects are excluded and counted in ``counts["phrases_without_boxes"]``.

Missing predictions count as misses (IoU 0, no hit, nothing covered) and are reported as ``missing`` next
to ``scored`` in every row. Each section has an ``"all"`` row and one row per ``Query.kind`` present
(real data has kind ``""``: only ``"all"``). Figures over no items are ``None`` (JSON null).
Predictions for queries outside the split are ignored (``counts["predictions_outside_split"]``); ids not
in the dataset, phrase lines for expressions (and the reverse), mention indices out of range, a wrong
``image_id`` or a mask of the wrong size are :class:`~refground.errors.DataError` naming file and line.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from refground import masks as rmasks
from refground.data.model import KIND_ORDER, TASKS, Dataset, Query, check_split_name
from refground.errors import DataError, UsageError
from refground.eval.metrics import (
    IOU_THRESHOLD, MASK_THRESHOLDS, MULTI_BOX, POINT_IN, RECALL_NS, box_accuracy_hits,
    mask_intersection_union, mask_stats_from_counts, matched_box_iou, phrase_hits, pointit_hits,
    proposal_hit_ranks, recall_from_ranks,
)
from refground.tables import TableData
from refground.eval.predictions import PhrasePrediction, Predictions, QueryPrediction, read_predictions

SECTIONS = ("comprehension", "segmentation", "proposals", "phrase_grounding")

Figures = dict[str, Any]


@dataclass
class EvalResult:
    """Figures of one evaluation. ``sections[section][kind]`` is a dict of figures (see module docstring)."""

    dataset: str
    split: str
    predictions: str
    options: dict[str, Any]
    counts: dict[str, int]
    sections: dict[str, dict[str, Figures]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"dataset", "split", "predictions", "options", "counts", <section>: {kind: figures}}``."""
        out: dict[str, Any] = {"dataset": self.dataset, "split": self.split, "predictions": self.predictions,
                               "options": dict(self.options), "counts": dict(self.counts)}
        for name, by_kind in self.sections.items():
            out[name] = {kind: dict(figs) for kind, figs in by_kind.items()}
        return out

    def rows(self) -> list[dict[str, Any]]:
        """One flat dict per (section, kind): ``{"section", "kind", **figures}``."""
        return [{"section": s, "kind": k, **figs}
                for s, by_kind in self.sections.items() for k, figs in by_kind.items()]

    def tables(self) -> list[TableData]:
        """The tables the CLI prints: one per section (proposal recall: referents and context objects)."""
        where = f"{self.dataset} {self.split}"
        layouts: list[tuple[str, str, list[str] | None]] = [
            ("comprehension", "comprehension", None),
            ("segmentation", "segmentation", None),
            ("proposal recall: referents", "proposals",
             ["queries", "scored", "missing", "referents"] + [f"recall@{n}" for n in self.options["ns"]]),
            ("proposal recall: context objects", "proposals",
             ["context_objects"] + [f"context_recall@{n}" for n in self.options["ns"]]),
            ("phrase grounding", "phrase_grounding", None),
        ]
        tables = []
        for title, section, keys in layouts:
            by_kind = self.sections.get(section)
            if not by_kind:
                continue
            keys = keys or list(by_kind["all"])
            rows = [[kind, *[("-" if figs[k] is None else figs[k]) for k in keys]] for kind, figs in by_kind.items()]
            tables.append(TableData(f"{title}: {where}", ["kind", *keys], rows))
        return tables


# ------------------------------------------------------------------------------------------ helpers
def _f(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _mean(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _kind_order(kinds: set[str]) -> list[str]:
    known = [k for k in KIND_ORDER if k in kinds]
    return known + sorted(kinds - set(KIND_ORDER))


def _by_kind(kinds: Sequence[str], figures: Callable[[np.ndarray], Figures]) -> dict[str, Figures]:
    """``{"all": figures(all rows), kind: figures(rows of that kind), ...}``; kind "" only in "all"."""
    arr = np.asarray(kinds, dtype=object)
    out = {"all": figures(np.arange(len(arr)))}
    for kind in _kind_order(set(kinds) - {""}):
        out[kind] = figures(np.flatnonzero(arr == kind))
    return out


class _Index:
    """Lookups from ids to dataset rows, built once from the columns."""

    def __init__(self, ds: Dataset):
        self.ds = ds
        self.query = {int(i): k for k, i in enumerate(ds.query_ids.tolist())}
        self.image = {int(i): k for k, i in enumerate(ds.image_ids.tolist())}
        self.object = {int(i): k for k, i in enumerate(ds.object_ids.tolist())}

    def image_size(self, image_id: int) -> tuple[int, int]:
        k = self.image[int(image_id)]
        return int(self.ds.image_height[k]), int(self.ds.image_width[k])

    def object_mask(self, row: int) -> dict[str, Any] | None:
        counts = self.ds.object_masks[row]
        if not counts:
            return None
        h, w = self.image_size(int(self.ds.object_image_ids[row]))
        return {"size": [h, w], "counts": counts}


def _check_against(ds: Dataset, preds: Predictions, index: _Index) -> None:
    """Every prediction names a query of ``ds`` of the right task, a valid mention, image and mask size."""
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


def _boxes_or_zero(boxes: Sequence[Any]) -> np.ndarray:
    """Top-1 boxes with missing ones as zeros (their hits are masked out by the caller)."""
    return np.array([b if b is not None else (0.0, 0.0, 0.0, 0.0) for b in boxes], dtype=np.float64).reshape(-1, 4)


# ------------------------------------------------------------------------------------- sections
def _comprehension(expr: list[Query], preds: Predictions, gt: np.ndarray, gt_masks: list, point_in: str,
                   thr: float) -> dict[str, Figures]:
    tops = [preds.queries[q.id].top_box if q.id in preds.queries else None for q in expr]
    have = np.array([b is not None for b in tops], dtype=bool)
    boxes = _boxes_or_zero(tops)
    ious = np.where(have, matched_box_iou(boxes, gt), 0.0)
    hits = box_accuracy_hits(boxes, gt, thr) & have
    points = pointit_hits(boxes, gt, gt_masks if point_in == "mask" else None, point_in) & have

    def figures(idx: np.ndarray) -> Figures:
        return {"queries": len(idx), "scored": int(have[idx].sum()), "missing": int((~have[idx]).sum()),
                "precision@1": _mean(hits[idx]), "pointit": _mean(points[idx]), "mean_iou": _mean(ious[idx])}

    return _by_kind([q.kind for q in expr], figures)


def _segmentation(expr: list[Query], preds: Predictions, gt_masks: list,
                  thresholds: Sequence[float]) -> dict[str, Figures]:
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


def _proposals(expr: list[Query], preds: Predictions, gt: np.ndarray, index: _Index, ns: Sequence[int],
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
    ref_ranks = proposal_hit_ranks(props, [gt[i:i + 1] for i in range(len(expr))], thr, max_rank)
    ctx_ranks = proposal_hit_ranks(props, ctx_targets, thr, max_rank)

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


def _phrases(caps: list[Query], preds: Predictions, index: _Index, multi_box: str, point_in: str,
             thr: float) -> dict[str, Figures]:
    ds = index.ds
    kinds, tops, gt_lists, mask_lists = [], [], [], []
    for q in caps:
        for m_idx, m in enumerate(q.mentions):
            if not m.object_ids:
                continue
            rows = [index.object[o] for o in m.object_ids]
            p = preds.phrases.get((q.id, m_idx))
            kinds.append(q.kind)
            tops.append(p.top_box if p is not None else None)
            gt_lists.append(ds.object_boxes[rows].reshape(-1, 4))
            mask_lists.append([index.object_mask(r) for r in rows])
    have = np.array([b is not None for b in tops], dtype=bool)
    boxes = _boxes_or_zero(tops)
    hits = phrase_hits(boxes, gt_lists, multi_box, thr) & have
    points = pointit_hits(boxes, gt_lists, mask_lists if point_in == "mask" else None, point_in) & have

    def figures(idx: np.ndarray) -> Figures:
        return {"phrases": len(idx), "scored": int(have[idx].sum()), "missing": int((~have[idx]).sum()),
                "accuracy": _mean(hits[idx]), "pointit": _mean(points[idx])}

    return _by_kind(kinds, figures)


# ------------------------------------------------------------------------------------------- main
def evaluate(
    ds: Dataset,
    predictions: Predictions | str | os.PathLike,
    split: str,
    multi_box: str = "union",
    point_in: str = "box",
    ns: Sequence[int] = RECALL_NS,
    iou_threshold: float = IOU_THRESHOLD,
    mask_thresholds: Sequence[float] = MASK_THRESHOLDS,
) -> EvalResult:
    """Score ``predictions`` (a :class:`Predictions` or a file path) on ``split`` of ``ds``.

    multi_box: ``"union"`` | ``"any"`` (phrases with several boxes); point_in: ``"box"`` | ``"mask"``
    (PointIt region); ns: the N of proposal recall@N. See the module docstring for what is reported.
    Raises :class:`UsageError` for bad option values or a split without queries, :class:`DataError` for
    predictions that do not fit the dataset.
    """
    check_split_name(split)
    if multi_box not in MULTI_BOX:
        raise UsageError(f"unknown multi-box rule {multi_box!r}; expected one of: {', '.join(MULTI_BOX)}")
    if point_in not in POINT_IN:
        raise UsageError(f"unknown point-in region {point_in!r}; expected one of: {', '.join(POINT_IN)}")
    ns = sorted({int(n) for n in ns})
    if not ns or ns[0] < 1:
        raise UsageError(f"proposal recall N must be positive integers, got {list(ns)}")
    preds = predictions if isinstance(predictions, Predictions) else read_predictions(predictions)
    index = _Index(ds)
    _check_against(ds, preds, index)

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
        sections["comprehension"] = _comprehension(expr, preds, gt, gt_masks, point_in, iou_threshold)
    if preds.has_masks:
        sections["segmentation"] = _segmentation(expr, preds, gt_masks, mask_thresholds)
    if preds.has_ranked:
        sections["proposals"] = _proposals(expr, preds, gt, index, ns, iou_threshold)
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


__all__ = ["EvalResult", "TableData", "evaluate", "SECTIONS"]


def comprehension_of(ds: Dataset, path: str | os.PathLike, split: str) -> dict[str, Figures]:
    """The comprehension section (``{kind: figures}``, ``"all"`` first) of a predictions file on ``split``."""
    return evaluate(ds, read_predictions(path), split).sections["comprehension"]
