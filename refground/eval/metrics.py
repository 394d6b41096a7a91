"""Grounding metrics: one definition each (design.md, "Metrics").

Boxes are xyxy in continuous absolute pixels (no +1); box IoU comes from :mod:`refground.boxes` and mask
IoU from :mod:`refground.masks`, so this module holds no box or RLE arithmetic of its own. Inputs may be
numpy arrays, torch tensors or nested lists; results are plain Python floats / dicts. A metric over an
empty set of queries is ``nan`` (undefined, not 0).

* :func:`precision_at_1` -- share of queries whose top-1 box has IoU >= ``iou_threshold`` (0.5) with
  the ground truth box. Exactly 0.5 is a hit. Per-query hits: :func:`box_accuracy_hits`.
* :func:`phrase_accuracy` -- the same per phrase; a phrase with several ground-truth boxes is scored
  against their union box (``multi_box="union"``, the smallest box enclosing them all) or hits when the
  IoU with any of them reaches the threshold (``multi_box="any"``). Phrases without boxes are excluded.
* :func:`pointit` -- share of queries whose predicted box centre lies inside the ground-truth region.
  The region is the union of the *areas* of the query's ground-truth boxes (the centre is inside if it is
  inside any one of them; not the enclosing union box), or its mask where one is given and
  ``point_in="mask"``. Box borders are inside (``x1 <= cx <= x2``). For a mask the centre's pixel is
  ``(floor(cy), floor(cx))``, clamped to the image.
* :func:`mask_iou_stats` -- overall IoU (sum of intersections / sum of unions over the queries), mean
  IoU (mean of per-query IoU) and ``prec@X``: share of queries with IoU strictly greater than X. A query
  whose union is empty (both masks empty) has IoU 0.
* :func:`proposal_recall` -- for each N, share of targets covered at IoU >= 0.5 by at least one of the
  first N proposals of their query (used separately for referents and for context objects).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from refground import masks as rmasks
from refground.boxes import box_centers, elementwise_box_iou
from refground.structures import RaggedBoxes, offsets_of

IOU_THRESHOLD = 0.5
MASK_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
RECALL_NS = (1, 3, 5, 10, 20, 100)
MULTI_BOX = ("union", "any")
POINT_IN = ("box", "mask")

NAN = float("nan")


# ------------------------------------------------------------------------------------------ inputs
def as_boxes(boxes: Any) -> np.ndarray:
    """Any array-like of boxes -> ``float64[N, 4]`` (an empty input gives ``[0, 4]``)."""
    if isinstance(boxes, torch.Tensor):
        boxes = boxes.detach().cpu().numpy()
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, 4)
    if arr.ndim == 1 and arr.shape[0] == 4:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"boxes must have shape [N, 4], got {list(arr.shape)}")
    return arr


def _box_lists(boxes: Any) -> list[np.ndarray]:
    """``[Q, 4]`` (one box per query) or a sequence of ``[T_i, 4]`` -> list of ``float64[T_i, 4]``."""
    if isinstance(boxes, (np.ndarray, torch.Tensor)):
        return [b[None] for b in as_boxes(boxes)]
    return [as_boxes(b) for b in boxes]


def _t(boxes: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float64))


def _offsets(lists: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated rows and the segment id (list index) of each row."""
    lengths = np.array([len(b) for b in lists], dtype=np.int64)
    flat = np.concatenate(list(lists), axis=0) if len(lists) else np.zeros((0, 4))
    return flat.reshape(-1, 4), np.repeat(np.arange(len(lists)), lengths)


def _share(hits: np.ndarray) -> float:
    return float(np.mean(hits)) if len(hits) else NAN


# ------------------------------------------------------------------------------------ box accuracy
def matched_box_iou(pred_boxes: Any, gt_boxes: Any) -> np.ndarray:
    """IoU of each query's predicted box with its ground-truth box: ``[Q, 4]``, ``[Q, 4]`` -> ``float64[Q]``."""
    pred, gt = as_boxes(pred_boxes), as_boxes(gt_boxes)
    if len(pred) != len(gt):
        raise ValueError(f"{len(pred)} predicted boxes for {len(gt)} ground-truth boxes")
    return elementwise_box_iou(_t(pred), _t(gt)).numpy()


def box_accuracy_hits(pred_boxes: Any, gt_boxes: Any, iou_threshold: float = IOU_THRESHOLD) -> np.ndarray:
    """Per-query hits ``bool[Q]``: IoU(pred, gt) >= ``iou_threshold`` (exactly the threshold is a hit)."""
    return matched_box_iou(pred_boxes, gt_boxes) >= iou_threshold


def precision_at_1(pred_boxes: Any, gt_boxes: Any, iou_threshold: float = IOU_THRESHOLD) -> float:
    """Comprehension Precision@1 (accuracy): share of queries with IoU(top-1 box, gt box) >= threshold.

    pred_boxes, gt_boxes: ``[Q, 4]`` xyxy absolute pixels, row i the top-1 prediction / the referent box
    of query i. ``nan`` for Q = 0.
    """
    return _share(box_accuracy_hits(pred_boxes, gt_boxes, iou_threshold))


def union_box(boxes: Any) -> np.ndarray:
    """The smallest box enclosing ``boxes`` (``[T, 4]``, T >= 1) -> ``float64[4]``."""
    b = as_boxes(boxes)
    if len(b) == 0:
        raise ValueError("union_box of no boxes")
    return np.concatenate([b[:, :2].min(axis=0), b[:, 2:].max(axis=0)])


def union_boxes(box_lists: Sequence[Any]) -> np.ndarray:
    """:func:`union_box` of each list, vectorised: ``T_i >= 1`` boxes each -> ``float64[P, 4]``."""
    lists = [as_boxes(b) for b in box_lists]
    if any(len(b) == 0 for b in lists):
        raise ValueError("union_boxes: a list without boxes")
    flat, seg = _offsets(lists)
    out = np.empty((len(lists), 4))
    out[:, :2] = np.inf
    out[:, 2:] = -np.inf
    np.minimum.at(out[:, :2], seg, flat[:, :2])
    np.maximum.at(out[:, 2:], seg, flat[:, 2:])
    return out


def phrase_hits(pred_boxes: Any, gt_boxes: Sequence[Any], multi_box: str = "union",
                iou_threshold: float = IOU_THRESHOLD) -> np.ndarray:
    """Per-phrase hits ``bool[P]``. pred_boxes: ``[P, 4]``; gt_boxes: P lists of ``[T_i, 4]``, T_i >= 1.

    ``multi_box="union"``: IoU with the union box of the phrase's boxes >= threshold; ``"any"``: IoU with
    at least one of them >= threshold. With one box per phrase both are Precision@1.
    """
    if multi_box not in MULTI_BOX:
        raise ValueError(f"multi_box must be one of {MULTI_BOX}, got {multi_box!r}")
    pred = as_boxes(pred_boxes)
    lists = [as_boxes(b) for b in gt_boxes]
    if len(pred) != len(lists):
        raise ValueError(f"{len(pred)} predicted boxes for {len(lists)} phrases")
    if multi_box == "union":
        return box_accuracy_hits(pred, union_boxes(lists), iou_threshold)
    if any(len(b) == 0 for b in lists):
        raise ValueError("phrase_hits: a phrase without ground-truth boxes (exclude it)")
    flat, seg = _offsets(lists)
    ok = box_accuracy_hits(pred[seg], flat, iou_threshold)
    return np.bincount(seg, weights=ok, minlength=len(lists)) > 0


def phrase_accuracy(pred_boxes: Any, gt_boxes: Sequence[Any], multi_box: str = "union",
                    iou_threshold: float = IOU_THRESHOLD) -> float:
    """Phrase grounding accuracy (:func:`phrase_hits` averaged); phrases without boxes are excluded."""
    lists = [as_boxes(b) for b in gt_boxes]
    keep = np.array([len(b) > 0 for b in lists], dtype=bool)
    pred = as_boxes(pred_boxes)
    if len(pred) != len(lists):
        raise ValueError(f"{len(pred)} predicted boxes for {len(lists)} phrases")
    return _share(phrase_hits(pred[keep], [b for b, k in zip(lists, keep) if k], multi_box, iou_threshold))


# ---------------------------------------------------------------------------------------- PointIt
def _dense(mask: Any) -> np.ndarray:
    if isinstance(mask, dict):
        return rmasks.decode(mask)
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    arr = np.asarray(mask).astype(bool)
    if arr.ndim != 2:
        raise ValueError(f"a mask must be [H, W], got shape {list(arr.shape)}")
    return arr


def _is_mask(value: Any) -> bool:
    return isinstance(value, dict) or (isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 2)


def point_in_mask(points: np.ndarray, mask: Any) -> np.ndarray:
    """Whether each point ``(x, y)`` of ``float64[N, 2]`` falls on a foreground pixel of ``mask``.

    The pixel of a point is ``(row, col) = (floor(y), floor(x))`` clamped to the image (pixel (r, c)
    spans ``[c, c+1) x [r, r+1)``). mask: RLE dict or dense ``[H, W]``.
    """
    m = _dense(mask)
    h, w = m.shape
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    cols = np.clip(np.floor(pts[:, 0]), 0, w - 1).astype(np.int64)
    rows = np.clip(np.floor(pts[:, 1]), 0, h - 1).astype(np.int64)
    return m[rows, cols]


def _centre_inside(boxes: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Whether each centre ``(cx, cy)`` of ``[N, 2]`` lies in the matching box of ``[N, 4]`` (borders in)."""
    return ((boxes[:, 0] <= centers[:, 0]) & (centers[:, 0] <= boxes[:, 2]) &
            (boxes[:, 1] <= centers[:, 1]) & (centers[:, 1] <= boxes[:, 3]))


def pointit_hits(pred_boxes: Any, gt_boxes: Any, gt_masks: Sequence[Any] | None = None,
                 point_in: str = "box") -> np.ndarray:
    """Per-query PointIt hits ``bool[Q]``.

    pred_boxes: ``[Q, 4]``. gt_boxes: ``[Q, 4]`` (one box per query) or Q lists of ``[T_i, 4]`` (the
    region is the union of their areas: inside any one box counts). Borders count as inside.
    gt_masks (used only with ``point_in="mask"``): one entry per query, each None (use the boxes), a mask
    for the whole region (RLE dict or dense ``[H, W]``; replaces the boxes), or a list aligned with the
    query's boxes whose items are a mask or None (that object's box is used).
    """
    if point_in not in POINT_IN:
        raise ValueError(f"point_in must be one of {POINT_IN}, got {point_in!r}")
    centers = box_centers(torch.from_numpy(as_boxes(pred_boxes))).numpy()
    if gt_masks is None and isinstance(gt_boxes, (np.ndarray, torch.Tensor)):
        gt = as_boxes(gt_boxes)  # one box per query and no masks: no groups to build
        if len(centers) != len(gt):
            raise ValueError(f"{len(centers)} predicted boxes for {len(gt)} ground-truth regions")
        return _centre_inside(gt, centers)
    lists = _box_lists(gt_boxes)
    if len(centers) != len(lists):
        raise ValueError(f"{len(centers)} predicted boxes for {len(lists)} ground-truth regions")
    if gt_masks is not None and len(gt_masks) != len(lists):
        raise ValueError(f"{len(gt_masks)} mask entries for {len(lists)} queries")
    use_box = [np.ones(len(b), dtype=bool) for b in lists]
    mask_jobs: list[tuple[int, Any]] = []  # (query, mask): the region includes this mask
    if point_in == "mask" and gt_masks is not None:
        for q, entry in enumerate(gt_masks):
            if entry is None:
                continue
            if _is_mask(entry):
                use_box[q][:] = False
                mask_jobs.append((q, entry))
                continue
            if len(entry) != len(lists[q]):
                raise ValueError(f"query {q}: {len(entry)} masks for {len(lists[q])} boxes")
            for j, m in enumerate(entry):
                if m is not None:
                    use_box[q][j] = False
                    mask_jobs.append((q, m))
    flat, seg = _offsets(lists)
    sel = np.concatenate(use_box) if len(use_box) else np.zeros(0, dtype=bool)
    flat, seg = flat[sel], seg[sel]
    inside = _centre_inside(flat, centers[seg])
    hits = np.bincount(seg, weights=inside, minlength=len(lists)) > 0
    for q, m in mask_jobs:  # one decode per mask; masks are few next to boxes
        if not hits[q]:
            hits[q] = bool(point_in_mask(centers[q:q + 1], m)[0])
    return hits


def pointit(pred_boxes: Any, gt_boxes: Any, gt_masks: Sequence[Any] | None = None, point_in: str = "box") -> float:
    """PointIt: share of queries whose predicted box centre lies inside the ground-truth region.

    See :func:`pointit_hits` for the inputs; ``nan`` for Q = 0.
    """
    return _share(pointit_hits(pred_boxes, gt_boxes, gt_masks, point_in))


# ----------------------------------------------------------------------------------- segmentation
def _as_rle(mask: Any) -> dict[str, Any]:
    return mask if isinstance(mask, dict) else rmasks.encode(_dense(mask))


def _size(mask: Any) -> tuple[int, int]:
    if isinstance(mask, dict):
        return int(mask["size"][0]), int(mask["size"][1])
    return tuple(int(v) for v in np.shape(mask))  # type: ignore[return-value]


def mask_intersection_union(pred_masks: Sequence[Any], gt_masks: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Per-query pixel counts ``(intersection int64[Q], union int64[Q])`` of matched mask pairs.

    Masks are RLE dicts or dense ``[H, W]`` arrays/tensors (a stacked ``[Q, H, W]`` works too); each pair
    must have the same size. RLE pairs go through pycocotools (:func:`refground.masks.intersection_union`).
    """
    if len(pred_masks) != len(gt_masks):
        raise ValueError(f"{len(pred_masks)} predicted masks for {len(gt_masks)} ground-truth masks")
    inter = np.zeros(len(gt_masks), dtype=np.int64)
    union = np.zeros(len(gt_masks), dtype=np.int64)
    for q, (p, g) in enumerate(zip(pred_masks, gt_masks)):
        if _size(p) != _size(g):
            raise ValueError(f"mask {q}: predicted size {list(_size(p))} != ground-truth size {list(_size(g))}")
        if not isinstance(p, dict) and not isinstance(g, dict):
            pd, gd = _dense(p), _dense(g)
            inter[q], union[q] = int(np.count_nonzero(pd & gd)), int(np.count_nonzero(pd | gd))
        else:
            inter[q], union[q] = rmasks.intersection_union(_as_rle(p), _as_rle(g))
    return inter, union


def iou_from_counts(inter: Any, union: Any) -> np.ndarray:
    """Per-query IoU ``inter / union`` (``float64``), 0 where the union is 0."""
    i, u = np.asarray(inter, dtype=np.float64), np.asarray(union, dtype=np.float64)
    return np.divide(i, u, out=np.zeros_like(i), where=u > 0)


def mask_stats_from_counts(inter: Any, union: Any, thresholds: Sequence[float] = MASK_THRESHOLDS) -> dict[str, float]:
    """:func:`mask_iou_stats` from per-query intersection/union counts (breakdowns reuse the counts)."""
    i, u = np.asarray(inter, dtype=np.float64), np.asarray(union, dtype=np.float64)
    ious = iou_from_counts(i, u)
    if len(ious) == 0:
        overall = NAN
    else:
        overall = float(i.sum() / u.sum()) if u.sum() > 0 else 0.0
    stats = {"overall_iou": overall, "mean_iou": _share(ious)}
    for t in thresholds:
        stats[prec_key(t)] = _share(ious > t)
    return stats


def prec_key(threshold: float) -> str:
    """The stats key of a threshold: ``0.5`` -> ``"prec@0.5"``."""
    return f"prec@{threshold:g}"


def mask_iou_stats(pred_masks: Sequence[Any], gt_masks: Sequence[Any],
                   thresholds: Sequence[float] = MASK_THRESHOLDS) -> dict[str, float]:
    """Segmentation figures over matched mask pairs (see :func:`mask_intersection_union` for inputs).

    Returns ``{"overall_iou": sum I / sum U, "mean_iou": mean per-query IoU, "prec@0.5": share with IoU
    > 0.5, ...}`` (strictly greater). A pair whose union is 0 has IoU 0; overall IoU is 0 when every
    union is 0 and ``nan`` (like the others) when there are no pairs.
    """
    return mask_stats_from_counts(*mask_intersection_union(pred_masks, gt_masks), thresholds)


# -------------------------------------------------------------------------------- proposal recall
NO_HIT = np.iinfo(np.int64).max


# (proposal, target) pairs whose IoU is computed at once. Below torch's parallel grain size (32768
# elements), so every op runs on the calling thread: intra-op threads stall on a busy machine (measured on
# a loaded 2-core host: scoring 3,600 queries took 330 ms with 2^18-pair chunks, under 100 ms with these); also
# bounds the temporaries.
_PAIR_CHUNK = 1 << 14


def _rank_limit(counts: np.ndarray, max_rank: int | None) -> np.ndarray:
    """How many proposals of each group take part: ``len(p[:max_rank])`` for every group at once."""
    if max_rank is None:
        return counts
    if max_rank >= 0:
        return np.minimum(counts, max_rank)
    return np.maximum(counts + max_rank, 0)


def first_hit_ranks(proposals: RaggedBoxes, targets: RaggedBoxes, iou_threshold: float = IOU_THRESHOLD,
                    max_rank: int | None = None) -> np.ndarray:
    """:func:`proposal_hit_ranks` on groups in one container each, vectorised over all groups.

    proposals: Q groups of ranked boxes (best first; a group may be empty); targets: Q groups of target
    boxes (group q belongs to the same query as proposal group q). Returns ``int64[targets.num_rows]``, row
    for row of ``targets.boxes``: the 0-based rank of the first of the group's first ``max_rank``
    proposals (``p[:max_rank]``) with IoU >= ``iou_threshold``, else :data:`NO_HIT`.

    Every (proposal, target) pair of a group goes through one elementwise IoU, in float64 like the per-query
    pairwise IoU, so each IoU, and hence each rank, is bit for bit the per-query result.
    """
    if len(proposals) != len(targets):
        raise ValueError(f"{len(proposals)} proposal lists for {len(targets)} target lists")
    ranks = np.full(targets.num_rows, NO_HIT, dtype=np.int64)
    k = _rank_limit(proposals.counts(), max_rank)
    t = targets.counts()
    pairs = k * t  # group q: its pairs are (rank, target) in rank-major order
    pair_off = offsets_of(pairs)
    for start in range(0, int(pair_off[-1]), _PAIR_CHUNK):
        idx = np.arange(start, min(start + _PAIR_CHUNK, int(pair_off[-1])), dtype=np.int64)
        g = np.searchsorted(pair_off, idx, side="right") - 1
        local, tg = idx - pair_off[g], t[g]
        rank = local // tg
        t_row = targets.offsets[g] + local % tg
        p_row = proposals.offsets[g] + rank
        hit = elementwise_box_iou(_t(proposals.boxes[p_row]), _t(targets.boxes[t_row])).numpy() >= iou_threshold
        np.minimum.at(ranks, t_row[hit], rank[hit])
    return ranks


def proposal_hit_ranks(proposals: Sequence[Any], targets: Sequence[Any], iou_threshold: float = IOU_THRESHOLD,
                       max_rank: int | None = None) -> list[np.ndarray]:
    """For each query, the 0-based rank of the first proposal covering each target (IoU >= threshold).

    proposals: Q ranked lists ``[K_i, 4]`` (best first; may be empty); targets: Q lists ``[T_i, 4]``.
    Returns Q arrays ``int64[T_i]``; a target that no proposal (among the first ``max_rank``) covers gets
    :data:`NO_HIT`. A target is covered by the first N proposals iff its rank < N. One vectorised pass
    (:func:`first_hit_ranks`); callers holding a :class:`RaggedBoxes` call that directly.
    """
    if len(proposals) != len(targets):
        raise ValueError(f"{len(proposals)} proposal lists for {len(targets)} target lists")
    if not len(targets):
        return []
    props, tgts = [as_boxes(p) for p in proposals], [as_boxes(t) for t in targets]
    ragged = [RaggedBoxes(offsets_of([len(b) for b in lists]), np.concatenate(lists) if lists else np.zeros((0, 4)))
              for lists in (props, tgts)]
    flat = first_hit_ranks(ragged[0], ragged[1], iou_threshold, max_rank)
    return np.split(flat, ragged[1].offsets[1:-1])


def recall_from_ranks(ranks: Any, ns: Sequence[int] = RECALL_NS) -> dict[int, float]:
    """``{N: share of ranks < N}`` over one flat array of first-hit ranks (``nan`` when empty)."""
    r = np.asarray(ranks, dtype=np.int64).reshape(-1)
    return {int(n): _share(r < n) for n in ns}


def proposal_recall(proposals: Sequence[Any], targets: Sequence[Any], ns: Sequence[int] = RECALL_NS,
                    iou_threshold: float = IOU_THRESHOLD) -> dict[int, float]:
    """Proposal recall@N: ``{N: share of all targets covered at IoU >= threshold by one of the first N
    proposals of their query}``; the denominator is the total number of targets (``nan`` when 0).

    proposals: Q ranked lists ``[K_i, 4]`` (may be empty; N larger than K_i means all of them);
    targets: Q lists ``[T_i, 4]`` (pass referents and context objects as separate calls).
    """
    ranks = proposal_hit_ranks(proposals, targets, iou_threshold, max_rank=max(ns) if len(ns) else 0)
    flat = np.concatenate(ranks) if ranks else np.zeros(0, dtype=np.int64)
    return recall_from_ranks(flat, ns)
