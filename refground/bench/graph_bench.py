"""Benchmarks of the spatial relation graph against a slow, obviously correct pure-Python reference.

:func:`spatial_relations_reference` is also what the tests compare :func:`refground.graph.spatial_relations`
with, so there is one definition of "correct" for both. It follows design.md's rules literally, with its
own IoU (independent of :mod:`refground.boxes`) and ``math.atan2``.

- ``graph``: :func:`refground.graph.spatial_relations` on 100 boxes vs the Python double loop (ms), and
  :func:`refground.graph.spatial_relations_many` (images/s) vs calling ``spatial_relations`` per image.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from refground.bench import BenchResult, best_time, register
from refground.graph import spatial_relations, spatial_relations_many


def relation_reference(a: Sequence[float], b: Sequence[float], diagonal: float) -> int:
    """Relation label of box a to box b (xyxy pixels, two different boxes of the pair), design.md's rules
    1-5 in order; ``diagonal`` is the image diagonal in pixels."""
    ax1, ay1, ax2, ay2 = a
    bx1, by1, bx2, by2 = b
    if ax1 <= bx1 and ay1 <= by1 and ax2 >= bx2 and ay2 >= by2:
        return 1  # inside: a contains b
    if bx1 <= ax1 and by1 <= ay1 and bx2 >= ax2 and by2 >= ay2:
        return 2  # cover: a is contained in b
    iw = max(min(ax2, bx2) - max(ax1, bx1), 0.0)
    ih = max(min(ay2, by2) - max(ay1, by1), 0.0)
    inter = iw * ih
    area_a = max(ax2 - ax1, 0.0) * max(ay2 - ay1, 0.0)
    area_b = max(bx2 - bx1, 0.0) * max(by2 - by1, 0.0)
    union = area_a + area_b - inter
    iou = inter / union if union > 0 else 0.0
    if iou > 0.5:
        return 3  # overlap
    dx = (ax1 + ax2) / 2 - (bx1 + bx2) / 2
    dy = -((ay1 + ay2) / 2 - (by1 + by2) / 2)  # y axis up
    if math.sqrt(dx * dx + dy * dy) / diagonal > 0.5:
        return 0  # no relationship
    theta = math.degrees(math.atan2(dy, dx))
    # min(.., 7): just below -22.5 the float mod rounds up to exactly 360.0 (that direction is bottom right).
    return 4 + min(math.floor(((theta + 22.5) % 360.0) / 45.0), 7)


def spatial_relations_reference(boxes: Tensor | np.ndarray | Sequence,
                                image_size: Sequence[float]) -> list[list[int]]:
    """Relation labels by a Python double loop. boxes: [K, 4] xyxy pixels; image_size: (height, width) ->
    K lists of K ints, [i][j] the relation of box i to box j, 0 on the diagonal."""
    rows = boxes.tolist() if hasattr(boxes, "tolist") else boxes
    b = [[float(v) for v in box] for box in rows]
    h, w = float(image_size[0]), float(image_size[1])
    diagonal = math.sqrt(w * w + h * h)
    return [[0 if i == j else relation_reference(b[i], b[j], diagonal) for j in range(len(b))]
            for i in range(len(b))]


def relation_boxes(k: int, image_size: tuple[int, int], seed: int) -> Tensor:
    """k boxes that produce every relation: spread over the image (far pairs, all directions), with boxes
    nested in others, jittered copies, copies snapped to whole pixels (shared edges, equal coordinates) and
    exact duplicates. image_size: (height, width) -> Tensor[k, 4] float64 xyxy."""
    g = torch.Generator().manual_seed(seed)
    h, w = image_size
    scale = torch.tensor([w, h, w, h], dtype=torch.float64)
    xy = torch.rand(k, 2, generator=g, dtype=torch.float64) * 0.8
    wh = 0.02 + torch.rand(k, 2, generator=g, dtype=torch.float64) * 0.3
    base = torch.cat([xy, (xy + wh).clamp(max=1.0)], dim=1) * scale
    kind = torch.randint(0, 5, (k,), generator=g)
    p = base[torch.randint(0, max(k, 1), (k,), generator=g)]
    lo, hi = torch.rand(k, 2, generator=g, dtype=torch.float64).sort(dim=1).values.unbind(1)
    size = p[:, 2:] - p[:, :2]
    nested = torch.cat([p[:, :2] + size * lo[:, None] * 0.5, p[:, 2:] - size * (1 - hi[:, None]) * 0.5], dim=1)
    jitter = p + (torch.rand(k, 4, generator=g, dtype=torch.float64) - 0.5) * 0.1 * size.sum(1, keepdim=True)
    out = base.clone()
    out[kind == 1] = nested[kind == 1]
    out[kind == 2] = jitter[kind == 2]
    out[kind == 3] = base[kind == 3].round()
    out[kind == 4] = p[kind == 4].round()  # duplicates each other when they share a parent
    return out


def _once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@register("graph")
def bench_graph(quick: bool, seed: int) -> list[BenchResult]:
    size = (480, 640)
    k = 100
    boxes = relation_boxes(k, size, seed).float()
    if spatial_relations(boxes, size).tolist() != spatial_relations_reference(boxes, size):
        raise RuntimeError(f"spatial_relations disagrees with the reference on {k} boxes (seed {seed})")
    # Side by side in the same call; the reference is slow, so fewer rounds of it.
    t_ours = best_time(lambda: spatial_relations(boxes, size), repeat=3 if quick else 7)
    t_ref = min(_once(lambda: spatial_relations_reference(boxes, size)) for _ in range(1 if quick else 3))
    results = [BenchResult("graph_relations", t_ours * 1e3, "ms", t_ref * 1e3, t_ref / t_ours,
                           f"{k} boxes ({k * k} ordered pairs), float32; baseline = pure-Python double loop")]

    n, per_image = (100, 36) if quick else (500, 36)
    many = [relation_boxes(per_image, size, seed * 100_003 + i).float() for i in range(n)]
    sizes = [size] * n
    labels, offsets = spatial_relations_many(many, sizes)
    for i in range(0, n, max(1, n // 10)):
        if not np.array_equal(labels[offsets[i]:offsets[i + 1]], spatial_relations(many[i], size).numpy().ravel()):
            raise RuntimeError(f"spatial_relations_many disagrees with spatial_relations on image {i}")

    def loop() -> None:
        np.concatenate([spatial_relations(b, s).numpy().astype(np.uint8).ravel() for b, s in zip(many, sizes)])

    t_many = best_time(lambda: spatial_relations_many(many, sizes), repeat=2 if quick else 3, min_time=0.0)
    t_loop = best_time(loop, repeat=2 if quick else 3, min_time=0.0)
    results.append(BenchResult("graph_many", n / t_many, "images/s", n / t_loop, t_loop / t_many,
                               f"{n} images x {per_image} boxes -> ragged uint8 labels + offsets; "
                               f"baseline = spatial_relations per image"))
    return results
