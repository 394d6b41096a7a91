"""Score a predictions file (:mod:`refground.eval.predictions`) against one split of a dataset.

:func:`evaluate` picks the queries of the split with refer semantics (``ds.queries(split)``) and reports,
for each kind of prediction the file holds (a section is computed when at least one line of the file has
that kind of prediction; then every query of the split that lacks one counts as a miss):

* ``comprehension`` (expression queries, top-1 box = ``box`` or ``boxes[0]``): Precision@1
  (``precision@1``), PointIt (``pointit``) and the mean IoU of the top-1 box (``mean_iou``).
* ``segmentation`` (expression queries with ``mask``): ``overall_iou``, ``mean_iou``, ``prec@0.5`` ...
  ``prec@0.9``. A missing mask is scored as an empty mask (I = 0, U = |gt|). Queries whose referent has
  no ground-truth mask cannot be scored: they are left out and counted in ``no_gt_mask``. When the file
  also holds localisation points (``point``), the section adds ``loc_acc``: the share of these scorable
  queries whose point lies on a foreground pixel of the referent's ground-truth mask
  (:func:`~refground.eval.metrics.point_in_mask`: the pixel under the point, clamped to the image); a
  missing point is a miss. (``scored``/``missing`` there count masks.)
* ``localisation`` (expression queries with ``point``, only when no segmentation section is computed:
  the file has no masks, or ``sections`` leaves segmentation out): ``loc_acc`` as above, over the same
  queries (``no_gt_mask`` left out), with ``scored``/``missing`` counting points.
* ``proposals`` (expression queries with ranked ``boxes``): ``recall@N`` of the referents and, separately,
  ``context_recall@N`` of the context objects (the distinct objects of the query's ``"context"``
  mentions). A query without a ranked list is scored with ``[box]`` if it has a box, else with none.
* ``phrase_grounding`` (caption queries, one phrase line per mention): ``accuracy`` (``multi_box``) and
  ``pointit``. Every mention of a caption that links at least one object is a phrase to ground (whatever
  its role); mentions without objects are excluded and counted in ``counts["phrases_without_boxes"]``.
  Its rows are per phrase kind (``Mention.kind``: ``singular``, ``plural``, ``needs-relation`` in the
  synthetic world) where the mention has one, else per ``Query.kind``.

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
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np

from refground import masks as rmasks
from refground.data.model import KIND_ORDER, ROLES, TASKS, Dataset, Query, check_split_name
from refground.errors import DataError, UsageError
from refground.eval.metrics import (
    IOU_THRESHOLD, MASK_THRESHOLDS, MULTI_BOX, POINT_IN, RECALL_NS, box_accuracy_hits, first_hit_ranks,
    mask_intersection_union, mask_stats_from_counts, matched_box_iou, phrase_hits, point_in_mask,
    pointit_hits, recall_from_ranks,
)
from refground.structures import RaggedBoxes, group_rows, offsets_of
from refground.tables import PERCENT, TableData
from refground.eval.predictions import PhrasePrediction, Predictions, QueryPrediction, read_predictions

SECTIONS = ("comprehension", "segmentation", "localisation", "proposals", "phrase_grounding")

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
            ("localisation", "localisation", None),
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
            # loc_acc is a share, but its name says so to no column rule of refground.tables: state the kind.
            kinds = [None, *[PERCENT if k == "loc_acc" else None for k in keys]] if "loc_acc" in keys else None
            tables.append(TableData(f"{title}: {where}", ["kind", *keys], rows, kinds))
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


def _all_fit(ds: Dataset, preds: Predictions, index: _Index) -> bool:
    """Whether :func:`_check_against` passes, decided for all predictions at once (no record per line)."""
    lines = [*preds.queries.values(), *preds.phrases.values()]
    rows = [index.query.get(int(p.query_id)) for p in lines]
    if None in rows:
        return False
    rows_arr = np.array(rows, dtype=np.int64)
    is_caption = ds.query_tasks[rows_arr] == TASKS.index("caption")
    n_query = len(preds.queries)
    if is_caption[:n_query].any() or not is_caption[n_query:].all():
        return False
    if preds.phrases:
        mentions = np.array([p.mention for p in preds.phrases.values()], dtype=np.int64)
        offsets = ds.query_mention_offsets
        if (mentions >= offsets[rows_arr[n_query:] + 1] - offsets[rows_arr[n_query:]]).any():
            return False
    given = [(k, p.image_id) for k, p in enumerate(lines) if p.image_id is not None]
    if given and any(i != int(ds.query_image_ids[rows[k]]) for k, i in given):
        return False
    return all(tuple(p.mask["size"]) == index.image_size(int(ds.query_image_ids[rows[k]]))
               for k, p in enumerate(lines[:n_query]) if p.mask is not None)


def _check_against(ds: Dataset, preds: Predictions, index: _Index) -> None:
    """Every prediction names a query of ``ds`` of the right task, a valid mention, image and mask size."""
    if _all_fit(ds, preds, index):
        return
    # Something does not fit: the line-by-line pass finds the first such line and words the error.
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


@dataclass
class _Expressions:
    """The expression queries of a split, read from the dataset's columns instead of one :class:`Query`
    record per query. Rows in storage order, like ``ds.queries(split)``."""

    rows: np.ndarray  # int64[E] rows of the query columns
    ids: list[int]  # query ids (Python ints: the keys of Predictions.queries)
    kinds: list[str]
    gt_rows: np.ndarray  # int64[E] object row of each query's referent


def _mentions_of(ds: Dataset, rows: np.ndarray, role: str) -> tuple[np.ndarray, np.ndarray]:
    """The mentions of ``role`` of queries ``rows``, in order: (mention rows, index into ``rows`` of each)."""
    m_rows, m_off = group_rows(ds.query_mention_offsets, rows)
    owner = np.repeat(np.arange(len(rows), dtype=np.int64), np.diff(m_off))
    keep = ds.mention_roles[m_rows] == ROLES.index(role)
    return m_rows[keep], owner[keep]


def _expressions(ds: Dataset, rows: np.ndarray, index: _Index) -> _Expressions:
    """:class:`_Expressions` of query ``rows``; the referent is ``Query.referent_object_id`` (the first
    referent mention, which must link exactly one object) for all rows at once, with its errors."""
    ids = ds.query_ids[rows].tolist()
    m_rows, owner = _mentions_of(ds, rows, "referent")
    first = np.full(len(rows), -1, dtype=np.int64)
    queries, at = np.unique(owner, return_index=True)  # owner is sorted: first referent of each query
    first[queries] = m_rows[at]
    oo = ds.mention_object_offsets
    safe = np.maximum(first, 0)
    n_objects = np.where(first >= 0, oo[safe + 1] - oo[safe], 0)
    ok = (first >= 0) & (n_objects == 1)
    bad = np.flatnonzero(~ok)
    stop = int(bad[0]) if len(bad) else len(rows)
    # Queries before the first bad one are looked up first, as the per-record loop did (same KeyError).
    gt_rows = [index.object[o] for o in ds.mention_object_ids[oo[first[:stop]]].tolist()]
    if len(bad):
        q = ids[stop]
        if first[stop] < 0:
            raise DataError(f"query {q} has no referent mention")
        raise DataError(f"query {q} refers to {int(n_objects[stop])} objects, expected exactly one")
    return _Expressions(rows, ids, [ds.query_kinds[k] for k in rows.tolist()], np.array(gt_rows, dtype=np.int64))


def _context_boxes(ds: Dataset, rows: np.ndarray, index: _Index) -> RaggedBoxes:
    """Per query of ``rows``, the boxes of the distinct objects of its context mentions, first seen first
    (``dict.fromkeys`` over the mentions' objects, for all queries at once)."""
    m_rows, owner = _mentions_of(ds, rows, "context")
    o_rows, o_off = group_rows(ds.mention_object_offsets, m_rows)
    objects = ds.mention_object_ids[o_rows]
    o_owner = np.repeat(owner, np.diff(o_off))
    if len(objects):
        _, first = np.unique(np.stack([o_owner, objects], axis=1), axis=0, return_index=True)
        keep = np.sort(first)
        objects, o_owner = objects[keep], o_owner[keep]
    object_rows = np.array([index.object[o] for o in objects.tolist()], dtype=np.int64)
    return RaggedBoxes(offsets_of(np.bincount(o_owner, minlength=len(rows))),
                       ds.object_boxes[object_rows].reshape(-1, 4))


def _flat_boxes(boxes: list[Any]) -> np.ndarray:
    """``float64[N, 4]`` of N boxes (4-sequences of numbers, e.g. the tuples of parsed predictions)."""
    if set(map(len, boxes)) <= {4}:
        try:  # one flat run of floats: numpy converts that ~30x faster than a list of 4-tuples
            return np.fromiter(chain.from_iterable(boxes), dtype=np.float64, count=4 * len(boxes)).reshape(-1, 4)
        except (TypeError, ValueError):
            pass  # not plain numbers (predictions built in memory): the general conversion decides
    return np.array(boxes, dtype=np.float64).reshape(-1, 4)


def _boxes_or_zero(boxes: Sequence[Any]) -> np.ndarray:
    """Top-1 boxes with missing ones as zeros (their hits are masked out by the caller)."""
    zero = (0.0, 0.0, 0.0, 0.0)
    return _flat_boxes([b if b is not None else zero for b in boxes])


# ------------------------------------------------------------------------------------- sections
def _comprehension(ex: _Expressions, preds: Predictions, gt: np.ndarray, gt_masks: list | None, point_in: str,
                   thr: float) -> dict[str, Figures]:
    got = map(preds.queries.get, ex.ids)
    tops = [p.top_box if p is not None else None for p in got]
    have = np.array([b is not None for b in tops], dtype=bool)
    boxes = _boxes_or_zero(tops)
    ious = np.where(have, matched_box_iou(boxes, gt), 0.0)
    hits = box_accuracy_hits(boxes, gt, thr) & have
    points = pointit_hits(boxes, gt, gt_masks if point_in == "mask" else None, point_in) & have

    def figures(idx: np.ndarray) -> Figures:
        return {"queries": len(idx), "scored": int(have[idx].sum()), "missing": int((~have[idx]).sum()),
                "precision@1": _mean(hits[idx]), "pointit": _mean(points[idx]), "mean_iou": _mean(ious[idx])}

    return _by_kind(ex.kinds, figures)


def _point_hits(ex: _Expressions, preds: Predictions, gt_masks: list) -> tuple[np.ndarray, np.ndarray]:
    """``(have, hits)``, both ``bool[E]``: whether each query has a ``point``, and whether that point lies on
    a foreground pixel of its referent's ground-truth mask (False without a point or a mask)."""
    got = map(preds.queries.get, ex.ids)
    points = [p.point if p is not None else None for p in got]
    have = np.array([pt is not None for pt in points], dtype=bool)
    hits = np.zeros(len(points), dtype=bool)
    usable = np.array([m is not None for m in gt_masks], dtype=bool)
    # One mask decode per referent object, with the points of all the queries that refer to it.
    by_object: dict[int, list[int]] = {}
    for k in np.flatnonzero(have & usable).tolist():
        by_object.setdefault(int(ex.gt_rows[k]), []).append(k)
    for ks in by_object.values():
        hits[ks] = point_in_mask(np.array([points[k] for k in ks], dtype=np.float64), gt_masks[ks[0]])
    return have, hits


def _localisation(ex: _Expressions, gt_masks: list, have: np.ndarray, hits: np.ndarray) -> dict[str, Figures]:
    """``loc_acc`` over the queries whose referent has a ground-truth mask (missing points are misses)."""
    usable = np.array([m is not None for m in gt_masks], dtype=bool)

    def figures(idx: np.ndarray) -> Figures:
        use = idx[usable[idx]]
        return {"queries": len(use), "scored": int(have[use].sum()), "missing": int((~have[use]).sum()),
                "no_gt_mask": int((~usable[idx]).sum()), "loc_acc": _mean(hits[use])}

    return _by_kind(ex.kinds, figures)


def _segmentation(ex: _Expressions, preds: Predictions, gt_masks: list, thresholds: Sequence[float],
                  loc_hits: np.ndarray | None = None) -> dict[str, Figures]:
    """The segmentation figures; with ``loc_hits`` (``bool[E]`` of :func:`_point_hits`) also ``loc_acc``."""
    usable = np.array([m is not None for m in gt_masks], dtype=bool)
    have = np.array([q in preds.queries and preds.queries[q].mask is not None for q in ex.ids], dtype=bool)
    empty: dict[tuple[int, int], dict[str, Any]] = {}
    pred_list, gt_list = [], []
    for q, g, ok in zip(ex.ids, gt_masks, have):
        if g is None:
            continue
        if ok:
            pred_list.append(preds.queries[q].mask)
        else:
            size = (int(g["size"][0]), int(g["size"][1]))
            if size not in empty:
                empty[size] = rmasks.encode(np.zeros(size, dtype=bool))
            pred_list.append(empty[size])
        gt_list.append(g)
    inter = np.zeros(len(ex.ids), dtype=np.int64)
    union = np.zeros(len(ex.ids), dtype=np.int64)
    inter[usable], union[usable] = mask_intersection_union(pred_list, gt_list)

    def figures(idx: np.ndarray) -> Figures:
        use = idx[usable[idx]]
        stats = mask_stats_from_counts(inter[use], union[use], thresholds)
        out = {"queries": len(use), "scored": int(have[use].sum()), "missing": int((~have[use]).sum()),
               "no_gt_mask": int((~usable[idx]).sum()), **{k: _f(v) for k, v in stats.items()}}
        if loc_hits is not None:
            out["loc_acc"] = _mean(loc_hits[use])
        return out

    return _by_kind(ex.kinds, figures)


def _proposals(ex: _Expressions, preds: Predictions, gt: np.ndarray, index: _Index, ns: Sequence[int],
               thr: float) -> dict[str, Figures]:
    got = [preds.queries.get(q) for q in ex.ids]
    ranked = [p.ranked if p is not None else () for p in got]
    have = np.array([p is not None and (p.boxes is not None or p.box is not None) for p in got], dtype=bool)
    props = RaggedBoxes(offsets_of(list(map(len, ranked))), _flat_boxes(list(chain.from_iterable(ranked))))
    max_rank = max(ns)
    ref_ranks = first_hit_ranks(props, RaggedBoxes(np.arange(len(gt) + 1), gt), thr, max_rank)  # one per query
    ctx = _context_boxes(index.ds, ex.rows, index)
    ctx_ranks = first_hit_ranks(props, ctx, thr, max_rank)

    def figures(idx: np.ndarray) -> Figures:
        ref = ref_ranks[idx]
        ctx_r = ctx_ranks[group_rows(ctx.offsets, idx)[0]]
        out: Figures = {"queries": len(idx), "scored": int(have[idx].sum()),
                        "missing": int((~have[idx]).sum()), "referents": len(ref)}
        out.update({f"recall@{n}": _f(v) for n, v in recall_from_ranks(ref, ns).items()})
        out["context_objects"] = len(ctx_r)
        out.update({f"context_recall@{n}": _f(v) for n, v in recall_from_ranks(ctx_r, ns).items()})
        return out

    return _by_kind(ex.kinds, figures)


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
            kinds.append(m.kind or q.kind)  # the phrase's kind where it has one (synthetic captions)
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
    sections: Collection[str] | None = None,
) -> EvalResult:
    """Score ``predictions`` (a :class:`Predictions` or a file path) on ``split`` of ``ds``.

    multi_box: ``"union"`` | ``"any"`` (phrases with several boxes); point_in: ``"box"`` | ``"mask"``
    (PointIt region); ns: the N of proposal recall@N; sections: compute only these of :data:`SECTIONS`
    (default: all the file holds; the predictions are checked against the dataset either way). See the
    module docstring for what is reported.
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
    wanted = set(SECTIONS if sections is None else sections)
    if wanted - set(SECTIONS):
        raise UsageError(f"unknown section(s) {', '.join(sorted(wanted - set(SECTIONS)))}; "
                         f"expected: {', '.join(SECTIONS)}")
    preds = predictions if isinstance(predictions, Predictions) else read_predictions(predictions)
    index = _Index(ds)
    _check_against(ds, preds, index)

    rows = ds.query_rows(split)
    if not len(rows):
        raise UsageError(f"dataset {ds.name} has no queries in split {split!r} "
                         f"(its splits: {', '.join(ds.splits()) or 'none'})")
    tasks = ds.query_tasks[rows]
    ex = _expressions(ds, rows[tasks == TASKS.index("expression")], index)
    cap_rows = rows[tasks == TASKS.index("caption")]
    cap_objects = np.diff(ds.mention_object_offsets)[group_rows(ds.query_mention_offsets, cap_rows)[0]]
    in_split = set(ds.query_ids[rows].tolist())
    used = len(in_split.intersection(preds.queries)) + sum(1 for q, _mention in preds.phrases if q in in_split)

    gt = ds.object_boxes[ex.gt_rows].reshape(-1, 4)
    do = {name for name, present in (("comprehension", preds.has_boxes), ("segmentation", preds.has_masks),
                                     ("proposals", preds.has_ranked), ("phrase_grounding", bool(preds.phrases)))
          if present and name in wanted}
    # Points are scored inside the segmentation section when there is one, else in a section of their own.
    if preds.has_points and "segmentation" not in do and "localisation" in wanted:
        do.add("localisation")
    score_points = preds.has_points and ("segmentation" in do or "localisation" in do)
    need_masks = ("segmentation" in do or "localisation" in do
                  or ("comprehension" in do and point_in == "mask"))
    gt_masks = [index.object_mask(r) for r in ex.gt_rows.tolist()] if need_masks else None
    loc_have, loc_hits = _point_hits(ex, preds, gt_masks) if score_points else (None, None)

    sections_out: dict[str, dict[str, Figures]] = {}
    if "comprehension" in do:
        sections_out["comprehension"] = _comprehension(ex, preds, gt, gt_masks, point_in, iou_threshold)
    if "segmentation" in do:
        sections_out["segmentation"] = _segmentation(ex, preds, gt_masks, mask_thresholds, loc_hits)
    if "localisation" in do:
        sections_out["localisation"] = _localisation(ex, gt_masks, loc_have, loc_hits)
    if "proposals" in do:
        sections_out["proposals"] = _proposals(ex, preds, gt, index, ns, iou_threshold)
    if "phrase_grounding" in do:
        caps = [ds.query(q) for q in ds.query_ids[cap_rows].tolist()]  # few next to expressions
        sections_out["phrase_grounding"] = _phrases(caps, preds, index, multi_box, point_in, iou_threshold)
    counts = {
        "queries": len(rows),
        "expressions": len(ex.ids),
        "captions": len(cap_rows),
        "phrases": int(np.count_nonzero(cap_objects)),  # mentions linking an object
        "phrases_without_boxes": int(np.count_nonzero(cap_objects == 0)),
        "predictions": len(preds),
        "predictions_in_split": used,
        "predictions_outside_split": len(preds) - used,
    }
    options = {"multi_box": multi_box, "point_in": point_in, "iou_threshold": float(iou_threshold),
               "ns": list(ns), "mask_thresholds": [float(t) for t in mask_thresholds]}
    return EvalResult(ds.name, split, preds.path, options, counts, sections_out)


__all__ = ["EvalResult", "TableData", "evaluate", "SECTIONS"]


def comprehension_of(ds: Dataset, path: str | os.PathLike, split: str) -> dict[str, Figures]:
    """The comprehension section (``{kind: figures}``, ``"all"`` first) of a predictions file on ``split``."""
    return evaluate(ds, read_predictions(path), split, sections=("comprehension",)).sections["comprehension"]
