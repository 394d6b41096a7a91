"""Spatial relation graphs between the boxes of one image (CMRIN Sec. 3.1.1, made exact in design.md).

Boxes are xyxy in absolute pixels; image sizes are ``(height, width)``. For box i, c_i is its centre,
d_ij = |c_i - c_j|, the image diagonal is sqrt(W^2 + H^2), and theta_ij = atan2(-(cy_i - cy_j), cx_i - cx_j)
in degrees is the direction of the vector from centre j to centre i with the y axis pointing up
(atan2(0, 0) = 0). The relation of box i to box j (i != j) is given by the first rule that holds:

1. box i contains box j (x1_i <= x1_j, y1_i <= y1_j, x2_i >= x2_j, y2_i >= y2_j): 1 "inside"
   (so identical boxes are "inside" each other, in both directions);
2. box i is contained in box j: 2 "cover";
3. IoU > 0.5 (:func:`refground.boxes.box_iou`): 3 "overlap";
4. d_ij / diagonal > 0.5: 0 "no relationship";
5. otherwise the direction sector 4 + min(floor(((theta_ij + 22.5) mod 360) / 45), 7): 4 right,
   5 top right, 6 top, 7 top left, 8 left, 9 bottom left, 10 bottom, 11 bottom right.

Self pairs are 0. Sectors are half-open, closed on their clockwise side: a direction exactly on a boundary
belongs to the sector counter-clockwise of it (theta = 22.5 is "top right", -22.5 is "right",
157.5 is "left", -157.5 is "bottom left"). The ``min(..., 7)`` only matters for theta a hair below -22.5,
where the float ``mod 360`` rounds up to exactly 360 (design.md's formula would give 12 there).
Two boxes with the same centre that neither contain each other nor overlap by IoU > 0.5 (a cross) are
"right" of each other in both directions (theta = 0).

The fast version agrees with the pure-Python reference
:func:`refground.bench.graph_bench.spatial_relations_reference` bit for bit, boundaries included: it works in
float64 (float32 inputs convert exactly), decides rules 1-4 with the reference's comparisons or exact
equivalents of them, and recomputes theta with ``math.atan2`` for the rare pairs within 1e-9 of a sector
boundary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from refground.boxes import box_iou, elementwise_box_iou

__all__ = [
    "NUM_RELATIONS",
    "RELATION_NAMES",
    "spatial_relations",
    "spatial_relations_many",
]

RELATION_NAMES: tuple[str, ...] = (
    "no relationship",
    "inside",
    "cover",
    "overlap",
    "right",
    "top right",
    "top",
    "top left",
    "left",
    "bottom left",
    "bottom",
    "bottom right",
)
NUM_RELATIONS = len(RELATION_NAMES)

# math.degrees' constant: the boundary fallback reproduces the reference's theta to the last bit.
_RAD2DEG = 180.0 / math.pi
# torch's vectorised atan2 (SLEEF) and libm's math.atan2 differ in the last ulp on a few percent of inputs;
# pairs whose sector position lies this close to a boundary get their theta from math.atan2 instead.
_BOUNDARY_TOL = 1e-9
# Pairs per padded chunk in spatial_relations_many: the [pairs, 4] copies stay under torch's 32,768-element
# grain, so no op is split over threads (which stalls for milliseconds when the cores are busy).
_PAIR_BUDGET = 8000

Size = Sequence[int] | Sequence[float]


def _boxes_tensor(boxes: Tensor | np.ndarray | Sequence) -> Tensor:
    """Any [K, 4] array-like -> Tensor[K, 4] of its own dtype (no copy where possible)."""
    if isinstance(boxes, np.ndarray) and not boxes.flags.writeable:
        boxes = np.array(boxes)  # torch warns about sharing read-only memory (e.g. memory-mapped columns)
    t = torch.as_tensor(boxes)
    if t.numel() == 0 and t.ndim == 1:
        t = t.reshape(0, 4)
    if t.ndim != 2 or t.shape[-1] != 4:
        raise ValueError(f"boxes must be [K, 4] xyxy, got shape {tuple(t.shape)}")
    return t


def _as_boxes(boxes: Tensor | np.ndarray | Sequence) -> Tensor:
    """Any [K, 4] array-like -> Tensor[K, 4] float64 (on the input's device), :func:`_column_major`."""
    t = _boxes_tensor(boxes)
    return torch.empty(4, t.shape[0], dtype=torch.float64, device=t.device).copy_(t.mT).mT


def _diagonal(image_size: Size) -> float:
    """The image diagonal sqrt(W^2 + H^2) in pixels of a (height, width) size, checked."""
    if len(image_size) != 2:
        raise ValueError(f"image_size must be (height, width), got {tuple(image_size)!r}")
    h, w = float(image_size[0]), float(image_size[1])
    if not (h > 0 and w > 0):
        raise ValueError(f"image_size must be positive (height, width), got {tuple(image_size)!r}")
    return math.sqrt(w * w + h * h)


def _sectors(dx: Tensor, dy: Tensor) -> Tensor:
    """Direction sector 0..7 (0 = right, counter-clockwise) of the vectors (dx, dy), y up -> uint8.

    dx, dy: Tensor[..., K, K] float64, twice the centre offsets (cx_i - cx_j, -(cy_i - cy_j)). Away from
    sector boundaries any accurate formula gives the reference's sector, so the bulk uses a cheap one,
    floor(theta / 45 + 8.5) mod 8 with torch's atan2; pairs within ``_BOUNDARY_TOL`` of a boundary are redone
    with exactly the reference's float operations (``math.atan2``, ``% 360``, ``/ 45``), where the last ulp
    decides.
    """
    # Shifted by the tolerance so that "near a boundary" is one test, frac < 2 * tol (frac, not round or
    # floor: those split 2,048-element blocks over threads, which stalls for milliseconds on a busy machine).
    pos = torch.atan2(dy, dx).mul_(_RAD2DEG / 45.0).add_(8.5 + _BOUNDARY_TOL)
    frac = pos.frac()
    if float(frac.amin()) < 2 * _BOUNDARY_TOL:
        idx = (frac < 2 * _BOUNDARY_TOL).nonzero(as_tuple=True)
        exact = [((math.atan2(y / 2, x / 2) * _RAD2DEG + 22.5) % 360.0) / 45.0
                 for y, x in zip(dy[idx].tolist(), dx[idx].tolist())]
        # min(.., 7): just below theta = -22.5 the float mod rounds up to exactly 360 (bottom right).
        pos[idx] = torch.tensor([min(math.floor(p), 7) + 8.5 for p in exact], dtype=pos.dtype, device=pos.device)
    return pos.to(torch.uint8).bitwise_and_(7)


def _far_threshold(diagonal: float) -> float:
    """The smallest float64 s with sqrt(s) / diagonal > 0.5 in float arithmetic, so that rule 4 on a squared
    distance s is ``s >= threshold``, exactly (both roundings are monotone, so the rule is a threshold)."""
    s = 0.25 * diagonal * diagonal
    while math.sqrt(s) / diagonal > 0.5:
        s = math.nextafter(s, 0.0)
    while not math.sqrt(s) / diagonal > 0.5:
        s = math.nextafter(s, math.inf)
    return s


def _column_major(boxes: Tensor) -> Tensor:
    """The same boxes [..., K, 4], stored coordinate by coordinate, so that pairwise ops (box_iou's too)
    broadcast contiguous coordinate vectors, not strided columns: about 25% faster here."""
    return boxes.mT.contiguous().mT


def _relations_padded(boxes: Tensor, far_threshold: Tensor | float, iou: Tensor) -> Tensor:
    """Relation labels of a batch of images padded to a common K.

    boxes: Tensor[B, K, 4] float64 xyxy, best :func:`_column_major`; far_threshold: :func:`_far_threshold`
    of each image's diagonal, a float or Tensor[B, 1, 1] float64; iou: Tensor[B, K, K] pairwise IoU ->
    Tensor[B, K, K] uint8 (entries in padding rows and columns are meaningless).
    """
    x1, y1, x2, y2 = boxes.unbind(-1)
    # i contains j where its four margins around j are all >= 0 (a - b >= 0 exactly when a >= b): one
    # comparison instead of four.
    margin = x1.unsqueeze(-2) - x1.unsqueeze(-1)
    torch.minimum(margin, y1.unsqueeze(-2) - y1.unsqueeze(-1), out=margin)
    torch.minimum(margin, x2.unsqueeze(-1) - x2.unsqueeze(-2), out=margin)
    torch.minimum(margin, y2.unsqueeze(-1) - y2.unsqueeze(-2), out=margin)
    contains = margin >= 0
    # Twice the centre offsets, exactly (halving is exact), straight from the coordinate sums: box_centers'
    # stack and divisions cost more than the rest of this block. cy_j - cy_i is -(cy_i - cy_j) up to the
    # sign of a zero, which leaves the sector unchanged.
    sx, sy = x1 + x2, y1 + y2
    dx = sx.unsqueeze(-1) - sx.unsqueeze(-2)
    dy = sy.unsqueeze(-2) - sy.unsqueeze(-1)
    labels = _sectors(dx, dy).add_(4)
    # Rules 4, 3, 2, 1 in reverse order, so the first rule that holds is the one that stays.
    labels.mul_((dx * dx).add_(dy * dy) < 4.0 * far_threshold)
    labels.masked_fill_(iou > 0.5, 3)
    labels.masked_fill_(contains.mT, 2)
    labels.masked_fill_(contains, 1)
    labels.diagonal(dim1=-2, dim2=-1).zero_()
    return labels


def spatial_relations(boxes: Tensor | np.ndarray, image_size: Size) -> Tensor:
    """Relation label of every ordered pair of boxes of one image (rules in the module docstring).

    boxes: Tensor[K, 4] (or an array-like) xyxy, absolute pixels, any real dtype; image_size: (height, width)
    in pixels. Returns LongTensor[K, K] (on the boxes' device) with values in 0..11 (:data:`RELATION_NAMES`),
    entry [i, j] the relation of box i to box j; the diagonal is 0. K = 0 gives a [0, 0] tensor.
    """
    threshold = _far_threshold(_diagonal(image_size))
    # Inference mode skips autograd bookkeeping on every op (~15% here); the conversion to int64 outside it
    # makes the result a normal tensor, usable anywhere (e.g. saved for backward as embedding indices).
    with torch.inference_mode():
        b = _as_boxes(boxes)
        if b.shape[0] == 0:
            labels = torch.zeros(0, 0, dtype=torch.uint8, device=b.device)
        else:
            labels = _relations_padded(b[None], threshold, box_iou(b, b)[None])[0]
    return labels.to(torch.int64)


def spatial_relations_many(
    boxes_list: Sequence[Tensor | np.ndarray], sizes: Sequence[Size]
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`spatial_relations` of many images, in the ragged layout stored in ``graph/<extractor>.h5``.

    boxes_list: n arrays [K_i, 4] xyxy pixels; sizes: n (height, width). Returns ``(labels, offsets)``:
    labels uint8[sum K_i^2], image i's [K_i, K_i] matrix flattened row-major at
    ``labels[offsets[i]:offsets[i + 1]]``; offsets int64[n + 1] with offsets[0] = 0.
    """
    if len(boxes_list) != len(sizes):
        raise ValueError(f"{len(boxes_list)} box sets but {len(sizes)} image sizes")
    n = len(boxes_list)
    thresholds = torch.tensor([_far_threshold(_diagonal(s)) for s in sizes], dtype=torch.float64)
    with torch.inference_mode():
        boxes = [_as_boxes(b).cpu() for b in boxes_list]
    counts = np.array([b.shape[0] for b in boxes], dtype=np.int64)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts * counts, out=offsets[1:])
    labels = np.empty(int(offsets[-1]), dtype=np.uint8)

    # Images sorted by box count, in chunks padded to the chunk's largest count: one batched computation per
    # chunk with little padding. Chunks stay under _PAIR_BUDGET pairs so that no op is split over threads.
    order = np.argsort(counts, kind="stable")
    order = order[counts[order] > 0]
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end + 1 - start) * int(counts[order[end]]) ** 2 <= _PAIR_BUDGET:
            end += 1
        idx = order[start:end]
        start = end
        k, bsz = int(counts[idx[-1]]), len(idx)
        with torch.inference_mode():
            padded = _column_major(torch.nn.utils.rnn.pad_sequence([boxes[i] for i in idx], batch_first=True))
            if bsz == 1:
                iou = box_iou(padded[0], padded[0])[None]
            else:
                # box_iou is per image; elementwise_box_iou (the same arithmetic) takes all pairs of the chunk.
                planes = padded.mT.transpose(0, 1)  # [4, B, K], so that the pairs come out column-major
                pair_i = planes.unsqueeze(-1).expand(4, bsz, k, k).reshape(4, -1).mT
                pair_j = planes.unsqueeze(-2).expand(4, bsz, k, k).reshape(4, -1).mT
                iou = elementwise_box_iou(pair_i, pair_j).view(bsz, k, k)
            chunk = _relations_padded(padded, thresholds[idx].view(bsz, 1, 1), iou).numpy()
        for row, i in enumerate(idx):
            ki = counts[i]
            labels[offsets[i]:offsets[i + 1]] = chunk[row, :ki, :ki].reshape(-1)
    return labels, offsets
