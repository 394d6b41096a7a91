"""Benchmarks of the box math against slow, obviously correct pure-Python references.

The references (:func:`iou_reference`, :func:`box_iou_reference`, :func:`nms_reference`) are also what
the tests compare the fast ops with, so there is one definition of "correct" for both.

- ``nms``: :func:`refground.boxes.nms` on 2,000 clustered boxes (IoU threshold 0.5) vs greedy Python.
- ``box_iou``: :func:`refground.boxes.box_iou` on 1,000 x 1,000 boxes vs a Python double loop.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import Tensor

from refground.bench import BenchResult, best_time, register
from refground.boxes import box_iou, nms

Box = Sequence[float]


def iou_reference(a: Box, b: Box) -> float:
    """IoU of two xyxy boxes in plain Python floats; 0 when the union is 0 (degenerate boxes)."""
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    area_a = max(a[2] - a[0], 0.0) * max(a[3] - a[1], 0.0)
    area_b = max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def box_iou_reference(boxes1: Tensor, boxes2: Tensor) -> list[list[float]]:
    """Pairwise IoU by a Python double loop. boxes1: [N, 4], boxes2: [M, 4] xyxy -> N lists of M floats."""
    b2 = boxes2.tolist()
    return [[iou_reference(a, b) for b in b2] for a in boxes1.tolist()]


def nms_reference(boxes: Tensor, scores: Tensor, iou_threshold: float, labels: Tensor | None = None) -> list[int]:
    """Greedy NMS the slow way: visit boxes by decreasing score (ties: lower index first) and keep a box
    when no kept box (of the same label, if labels are given) overlaps it with IoU > threshold."""
    b, s = boxes.tolist(), scores.tolist()
    lab = labels.tolist() if labels is not None else [0] * len(b)
    keep: list[int] = []
    for i in sorted(range(len(b)), key=lambda i: (-s[i], i)):
        if all(lab[j] != lab[i] or iou_reference(b[i], b[j]) <= iou_threshold for j in keep):
            keep.append(i)
    return keep


def clustered_boxes(n: int, seed: int, image_size: float = 1000.0) -> tuple[Tensor, Tensor]:
    """Detector-like proposals: n boxes in clusters of ~20 jittered copies around n/20 objects, clipped to
    a square image. Returns (boxes Tensor[n, 4] float32 xyxy, scores Tensor[n] float32 in [0, 1))."""
    g = torch.Generator().manual_seed(seed)
    k = max(1, n // 20)
    centres = torch.rand(k, 2, generator=g) * image_size
    sizes = 20 + torch.rand(k, 2, generator=g) * 150
    which = torch.randint(0, k, (n,), generator=g)
    c = centres[which] + torch.randn(n, 2, generator=g) * sizes[which] * 0.15
    wh = sizes[which] * (0.7 + 0.6 * torch.rand(n, 2, generator=g))
    boxes = torch.cat([c - wh / 2, c + wh / 2], dim=1).clamp(0, image_size)
    return boxes, torch.rand(n, generator=g)


def _once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@register("nms")
def bench_nms(quick: bool, seed: int) -> list[BenchResult]:
    n, thr = 2000, 0.5
    boxes, scores = clustered_boxes(n, seed)
    ours = nms(boxes, scores, thr)
    ref = nms_reference(boxes, scores, thr)
    if ours.tolist() != ref:
        raise RuntimeError(f"nms disagrees with the reference on {n} boxes (seed {seed})")
    # Side by side in the same call; the reference is slow, so fewer rounds of it.
    t_ours = best_time(lambda: nms(boxes, scores, thr), repeat=3 if quick else 7)
    t_ref = min(_once(lambda: nms_reference(boxes, scores, thr)) for _ in range(1 if quick else 3))
    return [BenchResult("nms", t_ours * 1e3, "ms", t_ref * 1e3, t_ref / t_ours,
                        f"{n} clustered boxes, IoU > {thr}, {len(ref)} kept; baseline = greedy pure Python")]


@register("box_iou")
def bench_box_iou(quick: bool, seed: int) -> list[BenchResult]:
    n = 1000
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 900
    boxes = torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=g) * 100], dim=1)
    t_ours = best_time(lambda: box_iou(boxes, boxes), repeat=3 if quick else 7)
    rows = 100 if quick else n  # the Python double loop runs on rows x n pairs, scaled to n x n
    t_ref = _once(lambda: box_iou_reference(boxes[:rows], boxes)) * (n / rows)
    note = f"{n}x{n} float32; baseline = Python double loop"
    if rows != n:
        note += f" timed on {rows}x{n} pairs and scaled by {n // rows} to {n}x{n}"
    return [BenchResult("box_iou", t_ours * 1e3, "ms", t_ref * 1e3, t_ref / t_ours, note)]
