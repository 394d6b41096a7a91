"""The one home of box math: formats, areas, IoU / GIoU, NMS, box deltas and RoIAlign, in plain torch.

Conventions (see ``design.md``): a box is ``(x1, y1, x2, y2)`` ("xyxy") in continuous absolute pixels, no
+1: a box's width is ``x2 - x1``. A set of boxes is ``Tensor[N, 4]``. Image sizes are ``(height, width)``.
Degenerate boxes (zero or negative width or height) have area 0 and IoU 0 with every box, themselves
included, so nothing here returns NaN. Empty inputs (N = 0 or M = 0) give correctly shaped empty results.

Where torchvision has the op, the name and signature are torchvision's (``box_convert``, ``box_area``,
``box_iou``, ``generalized_box_iou``, ``clip_boxes_to_image``, ``remove_small_boxes``, ``nms``,
``batched_nms``, ``roi_align``), so code can switch between them; torchvision itself is not a dependency.
Additions: :func:`elementwise_box_iou`, :func:`box_inter_union`, :func:`box_centers`, the R-CNN box-delta
coder :func:`encode_boxes` / :func:`decode_boxes` / :class:`BoxCoder`, VL-NMS's query-aware
:func:`fused_nms`, and the design's 5-d spatial feature of a box :func:`spatial_feature`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "BoxCoder",
    "batched_nms",
    "box_area",
    "box_centers",
    "box_convert",
    "box_inter_union",
    "box_map_mean",
    "box_pixel_windows",
    "box_iou",
    "fused_nms",
    "clip_boxes_to_image",
    "clip_boxes_to_sizes",
    "decode_boxes",
    "elementwise_box_iou",
    "encode_boxes",
    "generalized_box_iou",
    "nms",
    "remove_small_boxes",
    "small_box_mask",
    "roi_align",
    "spatial_feature",
]

BOX_FORMATS = ("xyxy", "xywh", "cxcywh")

# detectron2 / torchvision clamp of the decoded log-size deltas: exp(dw) <= 1000 / 16.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def _upcast(t: Tensor) -> Tensor:
    """Float16/bfloat16 -> float32 and small ints -> int32, so products of coordinates cannot overflow."""
    if t.is_floating_point():
        return t if t.dtype in (torch.float32, torch.float64) else t.float()
    return t if t.dtype in (torch.int32, torch.int64) else t.int()


def _float(t: Tensor) -> Tensor:
    """Coordinates as float32/float64 (IoU and NMS need a floating type)."""
    t = _upcast(t)
    return t if t.is_floating_point() else t.float()


def _check_boxes(boxes: Tensor, name: str = "boxes") -> None:
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must be Tensor[N, 4], got shape {tuple(boxes.shape)}")


# --------------------------------------------------------------------------------------------- formats


def box_convert(boxes: Tensor, in_fmt: str, out_fmt: str) -> Tensor:
    """Convert boxes between formats.

    boxes: Tensor[..., 4] in ``in_fmt``; formats: "xyxy" (corners), "xywh" (top-left corner, width,
    height), "cxcywh" (centre, width, height). Returns Tensor[..., 4] in ``out_fmt`` (a new tensor).
    """
    for fmt in (in_fmt, out_fmt):
        if fmt not in BOX_FORMATS:
            raise ValueError(f"unknown box format {fmt!r}; expected one of {', '.join(BOX_FORMATS)}")
    if in_fmt == out_fmt:
        return boxes.clone()
    a, b, c, d = boxes.unbind(-1)
    if in_fmt == "xywh":
        xyxy = (a, b, a + c, b + d)
    elif in_fmt == "cxcywh":
        xyxy = (a - 0.5 * c, b - 0.5 * d, a + 0.5 * c, b + 0.5 * d)
    else:
        xyxy = (a, b, c, d)
    x1, y1, x2, y2 = xyxy
    if out_fmt == "xyxy":
        out = (x1, y1, x2, y2)
    elif out_fmt == "xywh":
        out = (x1, y1, x2 - x1, y2 - y1)
    else:
        out = ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1)
    return torch.stack(out, dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Area of each box. boxes: Tensor[..., 4] xyxy -> Tensor[...].

    Widths and heights are clamped at 0, so inverted boxes have area 0 (torchvision does not clamp; the two
    agree on valid boxes)."""
    boxes = _upcast(boxes)
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_centers(boxes: Tensor) -> Tensor:
    """Centre of each box. boxes: Tensor[..., 4] xyxy -> Tensor[..., 2] as (cx, cy)."""
    return torch.stack(((boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2), dim=-1)


def clip_boxes_to_image(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Clip boxes to the image. boxes: Tensor[..., 4] xyxy; size: (height, width) -> Tensor[..., 4].

    x coordinates are clamped to [0, width], y to [0, height] (a new tensor; the input is not modified).
    """
    height, width = size
    x = boxes[..., 0::2].clamp(min=0, max=width)
    y = boxes[..., 1::2].clamp(min=0, max=height)
    return torch.stack((x, y), dim=-1).reshape(boxes.shape)


def clip_boxes_to_sizes(boxes: Tensor, sizes: Tensor) -> Tensor:
    """:func:`clip_boxes_to_image` with a size per box: boxes Tensor[N, 4] xyxy, sizes Tensor[N, 2] (height,
    width) of each box's image -> Tensor[N, 4] (x clamped to [0, width], y to [0, height])."""
    _check_boxes(boxes)
    lo = torch.zeros_like(boxes)
    hi = sizes.to(boxes.dtype)[:, [1, 0, 1, 0]]
    return torch.minimum(torch.maximum(boxes, lo), hi)


def small_box_mask(boxes: Tensor, min_size: float) -> Tensor:
    """Bool Tensor[...]: boxes Tensor[..., 4] xyxy whose width and height are both >= ``min_size`` (the test
    of :func:`remove_small_boxes`, for batched boxes)."""
    return ((boxes[..., 2] - boxes[..., 0]) >= min_size) & ((boxes[..., 3] - boxes[..., 1]) >= min_size)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices of boxes whose width and height are both >= ``min_size``.

    boxes: Tensor[N, 4] xyxy -> Tensor[K] int64, increasing.
    """
    _check_boxes(boxes)
    return torch.where(small_box_mask(boxes, min_size))[0]


# ------------------------------------------------------------------------------------------------- IoU


def box_inter_union(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise intersection and union areas.

    boxes1: Tensor[N, 4], boxes2: Tensor[M, 4], xyxy -> (inter Tensor[N, M], union Tensor[N, M]).
    Areas of degenerate boxes count as 0, so ``union`` is 0 only where both boxes are degenerate.
    """
    _check_boxes(boxes1, "boxes1")
    _check_boxes(boxes2, "boxes2")
    boxes1, boxes2 = _upcast(boxes1), _upcast(boxes2)
    area1, area2 = box_area(boxes1), box_area(boxes2)
    # x and y handled separately ([N, M] each) rather than as [N, M, 2] stacks: fewer, cheaper passes.
    iw = torch.minimum(boxes1[:, None, 2], boxes2[None, :, 2])
    ih = torch.minimum(boxes1[:, None, 3], boxes2[None, :, 3])
    if torch.is_grad_enabled() and (boxes1.requires_grad or boxes2.requires_grad):
        iw = (iw - torch.maximum(boxes1[:, None, 0], boxes2[None, :, 0])).clamp(min=0)
        ih = (ih - torch.maximum(boxes1[:, None, 1], boxes2[None, :, 1])).clamp(min=0)
        inter = iw * ih
        return inter, area1[:, None] + area2[None, :] - inter
    # Same arithmetic in place (no autograd needed): about twice as fast on large matrices.
    iw.sub_(torch.maximum(boxes1[:, None, 0], boxes2[None, :, 0])).clamp_(min=0)
    ih.sub_(torch.maximum(boxes1[:, None, 1], boxes2[None, :, 1])).clamp_(min=0)
    inter = iw.mul_(ih)
    union = (area1[:, None] + area2[None, :]).sub_(inter)
    return inter, union


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den where den > 0, else 0 (callers guarantee num == 0 wherever den == 0)."""
    num, den = _float(num), _float(den)
    if torch.is_grad_enabled() and (num.requires_grad or den.requires_grad):
        # Divide by a safe denominator so that the backward of the unused branch is finite, not 0/0.
        pos = den > 0
        return torch.where(pos, num / torch.where(pos, den, torch.ones_like(den)), torch.zeros_like(num))
    return num / den.clamp(min=torch.finfo(den.dtype).tiny)  # one pass fewer; num == 0 where den == 0


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU. boxes1: Tensor[N, 4], boxes2: Tensor[M, 4], xyxy -> Tensor[N, M] in [0, 1].

    IoU = intersection / union on continuous coordinates (no +1); 0 where the union is 0, so a degenerate
    box has IoU 0 with everything, itself included.
    """
    inter, union = box_inter_union(boxes1, boxes2)
    return _ratio(inter, union)


def elementwise_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of matched pairs. boxes1, boxes2: Tensor[N, 4] xyxy -> Tensor[N] (``box_iou(b1, b2).diag()``)."""
    _check_boxes(boxes1, "boxes1")
    _check_boxes(boxes2, "boxes2")
    if boxes1.shape[0] != boxes2.shape[0]:
        raise ValueError(f"elementwise_box_iou needs equal lengths, got {boxes1.shape[0]} and {boxes2.shape[0]}")
    boxes1, boxes2 = _upcast(boxes1), _upcast(boxes2)
    iw = (torch.minimum(boxes1[:, 2], boxes2[:, 2]) - torch.maximum(boxes1[:, 0], boxes2[:, 0])).clamp(min=0)
    ih = (torch.minimum(boxes1[:, 3], boxes2[:, 3]) - torch.maximum(boxes1[:, 1], boxes2[:, 1])).clamp(min=0)
    inter = iw * ih
    union = box_area(boxes1) + box_area(boxes2) - inter
    return _ratio(inter, union)


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalized IoU (Rezatofighi et al. 2019). boxes1: Tensor[N, 4], boxes2: Tensor[M, 4], xyxy
    -> Tensor[N, M] in [-1, 1].

    GIoU = IoU - (C - U) / C with C the area of the smallest enclosing box and U the union. Where C is 0
    (both boxes degenerate and collinear) the penalty term is taken as 0, so no NaN appears.
    """
    inter, union = box_inter_union(boxes1, boxes2)
    iou = _ratio(inter, union)
    b1, b2 = _upcast(boxes1), _upcast(boxes2)
    cw = (torch.maximum(b1[:, None, 2], b2[None, :, 2]) - torch.minimum(b1[:, None, 0], b2[None, :, 0])).clamp(min=0)
    ch = (torch.maximum(b1[:, None, 3], b2[None, :, 3]) - torch.minimum(b1[:, None, 1], b2[None, :, 1])).clamp(min=0)
    enclosing = cw * ch
    # C >= U in exact arithmetic; the clamp only absorbs rounding so that GIoU never exceeds IoU.
    return iou - _ratio((enclosing - union).clamp(min=0), enclosing)


# ------------------------------------------------------------------------------------------------- NMS

# Candidates are processed in score order in blocks of this many boxes: each block is first tested
# against the boxes already kept, then resolved greedily within itself. Each needed IoU is computed
# once and temporaries stay O(_NMS_KEPT_CHUNK x _NMS_BLOCK) whatever N is.
_NMS_BLOCK = 512
# Rows of kept boxes compared with a block at once (bounds the [rows, block] IoU temporaries).
_NMS_KEPT_CHUNK = 4096


def _box_iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """:func:`box_iou` for NMS on numpy arrays [N, 4], [M, 4] -> [N, M]: the same operations in the same
    order, so the values are bitwise those of :func:`box_iou` (the tests check it).

    NMS runs on numpy because its blocks are many medium-sized ops: numpy runs them single-threaded with
    little per-op overhead, while torch's intra-op threads can stall badly when the machine's cores are
    oversubscribed (measured: 10x swings on a shared 2-core box).
    """
    area_a = np.maximum(a[:, 2] - a[:, 0], 0) * np.maximum(a[:, 3] - a[:, 1], 0)
    area_b = np.maximum(b[:, 2] - b[:, 0], 0) * np.maximum(b[:, 3] - b[:, 1], 0)
    inter = np.minimum(a[:, None, 2], b[None, :, 2])
    inter -= np.maximum(a[:, None, 0], b[None, :, 0])
    np.maximum(inter, 0, out=inter)
    ih = np.minimum(a[:, None, 3], b[None, :, 3])
    ih -= np.maximum(a[:, None, 1], b[None, :, 1])
    np.maximum(ih, 0, out=ih)
    inter *= ih
    union = area_a[:, None] + area_b[None, :]
    union -= inter
    np.maximum(union, np.finfo(union.dtype).tiny, out=union)  # num == 0 wherever union == 0
    inter /= union
    return inter


_FIXED_POINT_ROUNDS = 12


def _greedy_upper(suppress: np.ndarray) -> np.ndarray:
    """Greedy pass over a strictly upper-triangular "i suppresses j" matrix bool[B, B] -> keep bool[B].

    Box 0 is kept; every later box is kept iff no kept box before it suppresses it. That rule has exactly one
    solution (box i depends only on the boxes before it), so it is found as a fixed point: start with every
    box kept and recompute "not suppressed by a kept box" for all boxes at once until nothing changes; the
    first unchanged round is the solution. A round is one masked reduction over the matrix; dense proposal
    clusters settle in a few rounds (suppression chains are short). If they have not settled after
    ``_FIXED_POINT_ROUNDS``, :func:`_greedy_loop` finishes with one step per kept box.
    """
    keep = np.ones(suppress.shape[0], dtype=bool)
    for _ in range(_FIXED_POINT_ROUNDS):
        new = ~suppress[keep].any(axis=0)
        if np.array_equal(new, keep):
            return keep
        keep = new
    return _greedy_loop(suppress)


def _greedy_loop(suppress: np.ndarray, limit: int | None = None) -> np.ndarray:
    """:func:`_greedy_upper` as a loop that runs once per KEPT box, each step one vector update over all
    later boxes (the reference the fixed point is tested against, and its fallback). With ``limit``, only the
    first ``limit`` kept boxes are kept (the loop stops there: the greedy answer up to them does not depend on
    the boxes after)."""
    n = suppress.shape[0]
    removed = np.zeros(n, dtype=bool)
    if limit is not None and limit <= 0:
        removed[:] = True
        return ~removed
    i, kept = 0, 1
    while i < n - 1:
        tail = removed[i + 1:]
        if limit is not None and kept >= limit:
            tail[:] = True
            break
        tail |= suppress[i, i + 1:]
        j = int(tail.argmin())  # first box after i that is still alive (if any)
        if tail[j]:
            break
        i += 1 + j
        kept += 1
    return ~removed


def _nms_sorted(boxes: np.ndarray, labels: np.ndarray | None, iou_threshold: float,
                max_keep: int | None = None) -> np.ndarray:
    """Greedy NMS on boxes already in decreasing-score order -> kept positions, int64[k] increasing.

    boxes: float[N, 4] xyxy; labels: [N] or None (boxes with different labels never suppress each other);
    max_keep: stop once that many are kept (the first ``max_keep`` of the full answer).
    """
    n = boxes.shape[0]
    kept: list[np.ndarray] = []
    left = max_keep
    kept_boxes = boxes[:0]
    kept_labels = labels[:0] if labels is not None else None
    for start in range(0, n, _NMS_BLOCK):
        block = boxes[start:start + _NMS_BLOCK]
        block_labels = labels[start:start + _NMS_BLOCK] if labels is not None else None
        alive = np.ones(block.shape[0], dtype=bool)
        for r in range(0, kept_boxes.shape[0], _NMS_KEPT_CHUNK):
            over = _box_iou_np(kept_boxes[r:r + _NMS_KEPT_CHUNK], block) > iou_threshold
            if labels is not None:
                over &= kept_labels[r:r + _NMS_KEPT_CHUNK, None] == block_labels[None, :]
            alive &= ~over.any(axis=0)
        cand = np.flatnonzero(alive)
        if cand.size == 0:
            continue
        cb = block[cand]
        over = _box_iou_np(cb, cb) > iou_threshold
        if labels is not None:
            cl = block_labels[cand]
            over &= cl[:, None] == cl[None, :]
        if left is None:
            keep = _greedy_upper(np.triu(over, k=1))
        else:  # the loop stops at the last box wanted, where the fixed point would resolve them all
            keep = _greedy_loop(np.triu(over, k=1), left)
            left -= int(keep.sum())
        kept.append(cand[keep] + start)
        kept_boxes = np.concatenate([kept_boxes, cb[keep]])
        if labels is not None:
            kept_labels = np.concatenate([kept_labels, cl[keep]])
        if left is not None and left <= 0:
            break
    return np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)


def _nms(boxes: Tensor, scores: Tensor, iou_threshold: float, labels: Tensor | None,
         max_keep: int | None = None) -> Tensor:
    _check_boxes(boxes)
    if scores.ndim != 1 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"scores must be Tensor[{boxes.shape[0]}], got shape {tuple(scores.shape)}")
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    # All in numpy from here (see _box_iou_np). Stable sort: equal scores keep input order (lower index first).
    s = scores.detach().cpu().double().numpy()  # exact for every float dtype, numpy has no bfloat16
    order = np.argsort(-s, kind="stable")
    b = _float(boxes).detach().cpu().numpy()[order]
    lab = labels.detach().cpu().numpy()[order] if labels is not None else None
    keep = order[_nms_sorted(b, lab, float(iou_threshold), max_keep)].astype(np.int64)
    return torch.from_numpy(keep).to(boxes.device)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, max_keep: int | None = None) -> Tensor:
    """Greedy non-maximum suppression (torchvision semantics).

    boxes: Tensor[N, 4] xyxy; scores: Tensor[N]; a box is discarded when its IoU (:func:`box_iou`) with an
    already kept, higher-scoring box is > ``iou_threshold``. Returns Tensor[k] int64 indices into ``boxes``
    of the kept boxes, sorted by decreasing score. Equal scores are ordered stably: the lower index comes
    first (and wins). Degenerate boxes (IoU 0 with everything) never suppress and, for thresholds >= 0,
    are never suppressed. Boxes are not differentiated through (the result is an index). ``max_keep``: return
    only the first ``max_keep`` kept boxes (exactly ``nms(...)[:max_keep]``), and stop working there.

    Implementation: boxes are sorted by score and processed in blocks of 512; a block is compared with
    the boxes kept so far (one IoU matrix, in row chunks of 4096), then resolved through its own
    upper-triangular "suppresses" matrix, as a fixed point (:func:`_greedy_upper`) or, with ``max_keep``, with
    one vector update per kept box up to the last one wanted. Each needed IoU is computed once, and
    temporaries stay O(4096 x 512) for any N. The work runs in numpy on the CPU (boxes on another device are
    copied there and the indices copied back), see ``_box_iou_np``.
    """
    return _nms(boxes, scores, iou_threshold, None, max_keep)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS independently per category (torchvision signature).

    boxes: Tensor[N, 4] xyxy; scores: Tensor[N]; idxs: Tensor[N] integer category of each box. Boxes of
    different categories never suppress each other. Returns Tensor[k] int64 indices of the kept boxes,
    sorted by decreasing score (ties: lower index first), exactly ``nms`` run per category and merged.

    Unlike torchvision's coordinate-offset trick (shift each category's boxes far apart), the category
    test is applied to the suppression matrix directly: same result, and no float precision is lost to
    large offsets.
    """
    if idxs.shape != scores.shape:
        raise ValueError(f"idxs must be Tensor[{scores.shape[0]}], got shape {tuple(idxs.shape)}")
    return _nms(boxes, scores, iou_threshold, idxs)


# ------------------------------------------------------------------------------------------ box deltas


def encode_boxes(reference_boxes: Tensor, proposals: Tensor,
                 weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """R-CNN regression targets that turn ``proposals`` into ``reference_boxes``.

    reference_boxes (targets, e.g. ground truth): Tensor[N, 4] xyxy; proposals (anchors): Tensor[N, 4]
    xyxy with positive width and height; weights (wx, wy, ww, wh). Returns Tensor[N, 4] deltas
    (dx, dy, dw, dh) = (wx (gx - px) / pw, wy (gy - py) / ph, ww log(gw / pw), wh log(gh / ph)) with (x, y)
    box centres and (w, h) sizes (torchvision / detectron2 parameterisation, no +1).
    """
    wx, wy, ww, wh = (float(w) for w in weights)
    pw = proposals[:, 2] - proposals[:, 0]
    ph = proposals[:, 3] - proposals[:, 1]
    px = proposals[:, 0] + 0.5 * pw
    py = proposals[:, 1] + 0.5 * ph
    gw = reference_boxes[:, 2] - reference_boxes[:, 0]
    gh = reference_boxes[:, 3] - reference_boxes[:, 1]
    gx = reference_boxes[:, 0] + 0.5 * gw
    gy = reference_boxes[:, 1] + 0.5 * gh
    return torch.stack((wx * (gx - px) / pw, wy * (gy - py) / ph,
                        ww * torch.log(gw / pw), wh * torch.log(gh / ph)), dim=1)


def decode_boxes(deltas: Tensor, boxes: Tensor, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                 scale_clamp: float = DEFAULT_SCALE_CLAMP) -> Tensor:
    """Apply R-CNN deltas to boxes (inverse of :func:`encode_boxes`).

    deltas: Tensor[N, 4 * C] (one (dx, dy, dw, dh) per class, C >= 1); boxes: Tensor[N, 4] xyxy;
    weights (wx, wy, ww, wh). dw / dh (after dividing by the weights) are clamped at ``scale_clamp``
    (default log(1000 / 16), as detectron2) so exp cannot overflow. Returns Tensor[N, 4 * C] xyxy.
    """
    if deltas.ndim != 2 or deltas.shape[1] % 4 != 0:
        raise ValueError(f"deltas must be Tensor[N, 4 * C], got shape {tuple(deltas.shape)}")
    wx, wy, ww, wh = (float(w) for w in weights)
    boxes = boxes.to(deltas.dtype)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    cx = boxes[:, 0] + 0.5 * widths
    cy = boxes[:, 1] + 0.5 * heights
    dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
    dw = (deltas[:, 2::4] / ww).clamp(max=scale_clamp)
    dh = (deltas[:, 3::4] / wh).clamp(max=scale_clamp)
    pcx = dx * widths[:, None] + cx[:, None]
    pcy = dy * heights[:, None] + cy[:, None]
    pw = torch.exp(dw) * widths[:, None]
    ph = torch.exp(dh) * heights[:, None]
    out = torch.stack((pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph), dim=2)
    return out.reshape(deltas.shape)


class BoxCoder:
    """R-CNN box coder holding the weights and clamp: ``encode(reference_boxes, proposals)`` and
    ``decode(deltas, boxes)`` call :func:`encode_boxes` / :func:`decode_boxes` (same shapes)."""

    def __init__(self, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                 scale_clamp: float = DEFAULT_SCALE_CLAMP) -> None:
        if len(weights) != 4:
            raise ValueError(f"weights must be (wx, wy, ww, wh), got {tuple(weights)}")
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = float(scale_clamp)

    def encode(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        """Tensor[N, 4] targets, Tensor[N, 4] proposals -> Tensor[N, 4] deltas."""
        return encode_boxes(reference_boxes, proposals, self.weights)

    def decode(self, deltas: Tensor, boxes: Tensor) -> Tensor:
        """Tensor[N, 4 * C] deltas, Tensor[N, 4] boxes -> Tensor[N, 4 * C] boxes xyxy."""
        return decode_boxes(deltas, boxes, self.weights, self.scale_clamp)

    def __repr__(self) -> str:
        return f"BoxCoder(weights={self.weights}, scale_clamp={self.scale_clamp:.4f})"


def fused_nms(boxes: Tensor, confidence: Tensor, relatedness: Tensor, labels: Tensor, iou_threshold: float,
              top_n: int, class_agnostic: bool = False) -> Tensor:
    """Query-aware NMS of Sec. 3.2: per-class greedy NMS on the fused score s = r * c, for Q queries that
    share one image's boxes.

    boxes: Tensor[K, 4] xyxy; confidence: Tensor[K] detector confidences c; relatedness: Tensor[Q, K]
    relatedness r of each box to each query; labels: Tensor[K] detector classes (boxes of different
    classes never suppress each other unless ``class_agnostic``); a box is suppressed by a kept,
    higher-scoring box when their IoU is > ``iou_threshold``. Returns LongTensor[Q, top_n]: per query the
    kept boxes' indices, highest fused score first (equal scores: lower index first), -1 where fewer than
    ``top_n`` survive. Row q equals ``refground.boxes.batched_nms(boxes, r_q * c, labels, iou_threshold)
    [:top_n]`` (``boxes.nms`` when class-agnostic).

    Vectorised over queries, and the loop runs once per *kept* box (at most ``top_n`` times), not once per
    box: the K x K "suppresses" matrix (IoU > threshold and same class) is built once; each query holds the
    set of its boxes still alive; a step takes, for every query at once, its alive box of best rank (rank =
    position in the query's stable descending sort of s), keeps it and removes the boxes it suppresses.

    Like :func:`refground.boxes.nms`, the work runs in numpy on the CPU with the IoU of
    :func:`_box_iou_np`, bitwise the values of :func:`refground.boxes.box_iou` and the very
    function ``nms`` uses: torch's intra-op threads stall on a loaded 2-core machine (a 300 x 300
    ``box_iou`` measured 6.3 ms with 2 threads against 0.8 ms in numpy), and the per-step ops are tiny.
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be Tensor[K, 4], got shape {tuple(boxes.shape)}")
    k = boxes.shape[0]
    if relatedness.ndim != 2 or relatedness.shape[1] != k:
        raise ValueError(f"relatedness must be Tensor[Q, {k}], got shape {tuple(relatedness.shape)}")
    if confidence.shape != (k,) or labels.shape != (k,):
        raise ValueError(f"confidence and labels must be Tensor[{k}]")
    if top_n < 0:
        raise ValueError(f"top_n must be >= 0, got {top_n}")
    nq = relatedness.shape[0]
    result = np.full((nq, top_n), -1, dtype=np.int64)
    if k and nq and top_n:
        # s = r * c in the inputs' dtype, exactly the product a caller hands to batched_nms.
        fused = (relatedness.detach() * confidence.detach()[None, :]).cpu().double().numpy()
        order = np.argsort(-fused, axis=1, kind="stable")                # equal scores: lower index first
        rank = np.empty_like(order)
        rows = np.arange(nq)
        rank[rows[:, None], order] = np.arange(k)[None, :]
        b = _float(boxes).detach().cpu().numpy()
        over = _box_iou_np(b, b) > float(iou_threshold)                  # [K, K] "i suppresses j"
        if not class_agnostic:
            lab = labels.detach().cpu().numpy()
            over &= lab[:, None] == lab[None, :]
        alive = np.ones((nq, k), dtype=bool)
        for n in range(min(top_n, k)):
            best = np.where(alive, rank, k).argmin(1)                    # each query's best alive box
            has = alive[rows, best]
            if not has.any():
                break
            q, i = rows[has], best[has]
            result[q, n] = i
            alive[q] &= ~over[i]
            alive[q, i] = False  # a degenerate box does not suppress itself
    return torch.from_numpy(result).to(boxes.device)



def spatial_feature(boxes: Tensor, image_size: Tensor | Sequence[float]) -> Tensor:
    """p_i = [x, y, w, h, wh] (the design's 5-d spatial feature, CMRIN's p_i): centre, width and height
    normalised by the image, and the normalised area.

    boxes: Tensor[..., 4] xyxy pixels (integer boxes are taken as float32); image_size: (height, width), or
    Tensor[..., 2] of (height, width) broadcastable to boxes' leading shape. Returns Tensor[..., 5] in the
    boxes' floating dtype. A non-positive image side is a ValueError.
    """
    if not isinstance(boxes, Tensor):
        boxes = torch.tensor(np.asarray(boxes))  # a copy: read-only numpy columns stay untouched
    if not boxes.is_floating_point() or boxes.dtype in (torch.float16, torch.bfloat16):
        boxes = boxes.float()
    size = torch.as_tensor(image_size)
    if size.shape[-1:] != (2,) or bool((size <= 0).any()):
        raise ValueError(f"image_size must be positive (height, width), got {image_size}")
    h = size[..., 0:1].to(boxes.dtype)
    w = size[..., 1:2].to(boxes.dtype)
    bw = (boxes[..., 2:3] - boxes[..., 0:1]) / w
    bh = (boxes[..., 3:4] - boxes[..., 1:2]) / h
    cx = (boxes[..., 0:1] + boxes[..., 2:3]) / (2 * w)
    cy = (boxes[..., 1:2] + boxes[..., 3:4]) / (2 * h)
    return torch.cat([cx, cy, bw, bh, bw * bh], dim=-1)


def box_pixel_windows(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """The pixels a box covers, as integer windows: Tensor[N, 4] int64 ``[c1, r1, c2, r2]`` (end exclusive),
    pixel (r, c) inside box ``[x1, y1, x2, y2]`` when its centre (c + 0.5, r + 0.5) is, clipped to the image of
    ``size`` (H, W). Per axis, a box that spans no pixel centre gets the one row (column) nearest its centre, so
    a mean over it is defined (a zero-height box keeps its columns on one row). boxes: Tensor[N, 4] xyxy pixels."""
    _check_boxes(boxes)
    hh, ww = int(size[0]), int(size[1])
    b = _float(boxes).to(torch.float64)
    c1 = torch.ceil(b[:, 0] - 0.5).clamp(0, ww)
    r1 = torch.ceil(b[:, 1] - 0.5).clamp(0, hh)
    c2 = torch.ceil(b[:, 2] - 0.5).clamp(0, ww)
    r2 = torch.ceil(b[:, 3] - 0.5).clamp(0, hh)
    cx = torch.floor((b[:, 0] + b[:, 2]) / 2).clamp(0, ww - 1)
    cy = torch.floor((b[:, 1] + b[:, 3]) / 2).clamp(0, hh - 1)
    empty_c, empty_r = c2 <= c1, r2 <= r1
    c1, c2 = torch.where(empty_c, cx, c1), torch.where(empty_c, cx + 1, c2)
    r1, r2 = torch.where(empty_r, cy, r1), torch.where(empty_r, cy + 1, r2)
    return torch.stack([c1, r1, c2, r2], 1).long()


def box_map_mean(value_map: Tensor, boxes: Tensor) -> Tensor:
    """The mean of ``value_map`` over the pixels of each box (BiCM's S^TD, eq. 9), from one summed-area table.

    value_map: Tensor[H, W]; boxes: Tensor[N, 4] xyxy pixels (the pixels of :func:`box_pixel_windows`).
    Returns Tensor[N] float64 (a summed-area table in float32 loses the small differences of a 256 x 256 map)."""
    if value_map.ndim != 2:
        raise ValueError(f"value_map must be [H, W], got {tuple(value_map.shape)}")
    hh, ww = value_map.shape
    win = box_pixel_windows(boxes, (hh, ww))
    sat = torch.zeros(hh + 1, ww + 1, dtype=torch.float64, device=value_map.device)
    sat[1:, 1:] = value_map.to(torch.float64).cumsum(0).cumsum(1)
    c1, r1, c2, r2 = win.unbind(1)
    total = sat[r2, c2] - sat[r1, c2] - sat[r2, c1] + sat[r1, c1]
    return total / ((r2 - r1) * (c2 - c1)).to(torch.float64)


# -------------------------------------------------------------------------------------------- RoIAlign

# Upper bound on the number of elements of one gathered sample tensor (RoIs are processed in chunks).
_ROI_CHUNK_ELEMS = 1 << 23


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _to_rois(boxes: Tensor | Sequence[Tensor], like: Tensor) -> Tensor:
    """Tensor[K, 5] (batch_index, x1, y1, x2, y2) or a list of per-image Tensor[L_i, 4] -> Tensor[K, 5]."""
    if isinstance(boxes, Tensor):
        if boxes.ndim != 2 or boxes.shape[1] != 5:
            raise ValueError(f"boxes must be Tensor[K, 5] or a list of Tensor[L, 4], got {tuple(boxes.shape)}")
        return boxes.to(device=like.device, dtype=like.dtype)
    parts = []
    for i, b in enumerate(boxes):
        _check_boxes(b, f"boxes[{i}]")
        b = b.to(device=like.device, dtype=like.dtype)
        parts.append(torch.cat([torch.full_like(b[:, :1], float(i)), b], dim=1))
    return torch.cat(parts) if parts else like.new_zeros((0, 5))


def _axis_samples(start: Tensor, bin_size: Tensor, grid: Tensor, bins: int, g: int, size: int
                  ) -> tuple[Tensor, Tensor]:
    """Bilinear taps of RoIAlign's sampling points along one axis (torchvision's CPU kernel, made
    separable: a 2-d tap weight is the product of its y and x weights).

    start, bin_size: Tensor[K]; grid: Tensor[K] int64 samples per bin (<= 0: none). Returns
    (index Tensor[K, bins, g, 2] int64 in [0, size), weight Tensor[K, bins, g, 2]) for the low and high
    neighbour of each sample; invalid samples (beyond the RoI's own grid, or outside [-1, size]) weigh 0.
    """
    dtype = start.dtype
    p = torch.arange(bins, device=start.device, dtype=dtype)[None, :, None]
    i = torch.arange(g, device=start.device)[None, None, :]
    gf = grid.clamp(min=1).to(dtype)[:, None, None]
    bs = bin_size[:, None, None]
    coord = start[:, None, None] + p * bs + (i.to(dtype) + 0.5) * bs / gf
    valid = (i < grid[:, None, None]) & (coord >= -1.0) & (coord <= size)
    c = coord.clamp(min=0)
    low = c.floor().long()
    edge = low >= size - 1
    low = torch.where(edge, torch.full_like(low, size - 1), low)
    high = torch.where(edge, low, low + 1)
    c = torch.where(edge, low.to(dtype), c)
    frac = c - low.to(dtype)
    weight = torch.stack((1.0 - frac, frac), dim=-1) * valid[..., None].to(dtype)
    return torch.stack((low, high), dim=-1), weight


def _roi_align_gather(input: Tensor, batch: Tensor, yi: Tensor, wy: Tensor, xi: Tensor, wx: Tensor
                      ) -> Tensor:
    """Sum of tap values: gathers every (y, x) tap of every sample. -> Tensor[K, C, PH, PW]."""
    n, c, h, w = input.shape
    k, ph = yi.shape[:2]
    pw = xi.shape[1]
    flat = input.permute(0, 2, 3, 1).reshape(n * h * w, c)
    taps = yi.shape[2] * 2 * xi.shape[2] * 2
    chunk = max(1, _ROI_CHUNK_ELEMS // max(1, ph * pw * taps * c))
    outs = []
    for s in range(0, k, chunk):
        sl = slice(s, s + chunk)
        kk = yi[sl].shape[0]
        # [k, PH, PW, Gy, 2, Gx, 2] flat positions and weights of the taps.
        pos = (batch[sl, None, None, None, None, None, None] * (h * w)
               + yi[sl, :, None, :, :, None, None] * w + xi[sl, None, :, None, None, :, :])
        wts = wy[sl, :, None, :, :, None, None] * wx[sl, None, :, None, None, :, :]
        vals = flat.index_select(0, pos.reshape(-1)).view(kk, ph, pw, taps, c)
        # A broadcast multiply-sum, not matmul: batched matmuls of [1, taps] x [taps, C] are slow on the CPU
        # (measured 3.5x slower forward + backward).
        outs.append((wts.reshape(kk, ph, pw, taps, 1) * vals).sum(3))
    return torch.cat(outs).permute(0, 3, 1, 2)


def _roi_align_dense(input: Tensor, batch: Tensor, yi: Tensor, wy: Tensor, xi: Tensor, wx: Tensor
                     ) -> Tensor:
    """Sum of tap values as two matrix products per RoI: A_y[PH, H] @ X[C, H, W] @ A_x[PW, W]^T, with the
    interpolation matrices A built by scatter-adding the tap weights. Cost does not grow with the sampling
    grid, so this wins when RoIs are large relative to the feature map. -> Tensor[K, C, PH, PW]."""
    n, c, h, w = input.shape
    k, ph = yi.shape[:2]
    pw = xi.shape[1]
    ay = wy.new_zeros((k, ph, h)).scatter_add_(2, yi.reshape(k, ph, -1), wy.reshape(k, ph, -1))
    ax = wx.new_zeros((k, pw, w)).scatter_add_(2, xi.reshape(k, pw, -1), wx.reshape(k, pw, -1))
    out = input.new_zeros((k, c, ph, pw))
    chunk = max(1, _ROI_CHUNK_ELEMS // max(1, ph * c * w))
    parts, where = [], []
    for img in torch.unique(batch).tolist():
        rows = torch.nonzero(batch == img).squeeze(1)
        for s in range(0, rows.numel(), chunk):
            r = rows[s:s + chunk]
            t = torch.einsum("kph,chw->kcpw", ay[r], input[img])
            parts.append(torch.einsum("kcpw,kqw->kcpq", t, ax[r]))
            where.append(r)
    if parts:
        out = out.index_copy(0, torch.cat(where), torch.cat(parts))
    return out


def roi_align(input: Tensor, boxes: Tensor | Sequence[Tensor], output_size: int | Sequence[int],
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False,
              _method: str = "auto") -> Tensor:
    """RoIAlign (Mask R-CNN) with torchvision's semantics, in plain torch.

    input: Tensor[N, C, H, W]; boxes: Tensor[K, 5] rows (batch_index, x1, y1, x2, y2) or a list of N
    Tensor[L_i, 4] xyxy (one per image), in input-image coordinates; output_size: int or (PH, PW);
    spatial_scale: factor mapping box coordinates to feature-map coordinates (e.g. 1/16);
    sampling_ratio: bilinear samples per bin along each axis (<= 0: ceil(roi_size / output_size), per RoI);
    aligned: subtract half a pixel from the scaled box so that pixel centres line up (the Detectron2 fix);
    when False, RoIs smaller than one feature cell are stretched to 1 x 1 as in the original.
    Returns Tensor[K, C, PH, PW]: each bin is the average of its bilinear samples; samples beyond
    [-1, size] contribute 0. Differentiable with respect to ``input`` (autograd gives the backward);
    boxes are constants.
    """
    if input.ndim != 4:
        raise ValueError(f"input must be Tensor[N, C, H, W], got shape {tuple(input.shape)}")
    ph, pw = _pair(output_size)
    n, c, h, w = input.shape
    rois = _to_rois(boxes, input).detach()
    k = rois.shape[0]
    if k == 0:
        return input.new_zeros((0, c, ph, pw))
    batch = rois[:, 0].long()
    offset = 0.5 if aligned else 0.0
    x1 = rois[:, 1] * spatial_scale - offset
    y1 = rois[:, 2] * spatial_scale - offset
    roi_w = rois[:, 3] * spatial_scale - offset - x1
    roi_h = rois[:, 4] * spatial_scale - offset - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_w, bin_h = roi_w / pw, roi_h / ph
    if sampling_ratio > 0:
        grid_h = torch.full((k,), sampling_ratio, dtype=torch.int64, device=input.device)
        grid_w = grid_h
    else:
        grid_h = torch.ceil(roi_h / ph).long()
        grid_w = torch.ceil(roi_w / pw).long()
    gy = max(int(grid_h.max()), 0)
    gx = max(int(grid_w.max()), 0)
    if gy == 0 or gx == 0:
        return input.new_zeros((k, c, ph, pw))
    yi, wy = _axis_samples(y1, bin_h, grid_h, ph, gy, h)
    xi, wx = _axis_samples(x1, bin_w, grid_w, pw, gx, w)
    method = _method
    if method == "auto":
        # Per (RoI, channel, output row): gather touches PW * 4 * Gy * Gx taps, dense does H * W + W * PW.
        method = "gather" if pw * 4 * gy * gx <= h * w + w * pw else "dense"
    if method == "gather":
        total = _roi_align_gather(input, batch, yi, wy, xi, wx)
    elif method == "dense":
        total = _roi_align_dense(input, batch, yi, wy, xi, wx)
    else:
        raise ValueError(f"unknown roi_align method {_method!r}")
    count = (grid_h * grid_w).clamp(min=1).to(input.dtype)
    return total / count[:, None, None, None]
