"""Instance masks as COCO compressed RLE (through pycocotools) and mask IoU.

An RLE is ``{"size": [height, width], "counts": str}`` (compressed counts, ASCII), the form COCO and
refer files use. Dense masks are ``np.ndarray[H, W]`` of bool/uint8.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools import mask as cocomask

RLE = dict[str, Any]


def encode(mask: np.ndarray) -> RLE:
    """Dense mask ``[H, W]`` -> compressed RLE with ``str`` counts."""
    m = np.asfortranarray(np.asarray(mask, dtype=np.uint8))
    rle = cocomask.encode(m)
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def _coco(rle: RLE) -> dict[str, Any]:
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed RLE, as some COCO files store it
        return cocomask.frPyObjects(rle, *rle["size"])
    return {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def decode(rle: RLE) -> np.ndarray:
    """Compressed (or uncompressed) RLE -> bool mask ``[H, W]``."""
    return cocomask.decode(_coco(rle)).astype(bool)


def area(rle: RLE) -> int:
    """Number of foreground pixels."""
    return int(cocomask.area(_coco(rle)))


def to_bbox(rle: RLE) -> tuple[float, float, float, float]:
    """Tight box of the foreground, xyxy continuous pixels (a pixel (r, c) spans [c, c+1) x [r, r+1))."""
    x, y, w, h = (float(v) for v in cocomask.toBbox(_coco(rle)))
    return (x, y, x + w, y + h)


def from_polygons(polygons: Sequence[Sequence[float]], height: int, width: int) -> RLE:
    """COCO polygons ``[[x1, y1, x2, y2, ...], ...]`` -> one merged compressed RLE."""
    rles = cocomask.frPyObjects([list(p) for p in polygons], height, width)
    merged = cocomask.merge(rles)
    return {"size": [int(merged["size"][0]), int(merged["size"][1])], "counts": merged["counts"].decode("ascii")}


def from_segmentation(segm: Any, height: int, width: int) -> RLE:
    """Any COCO ``segmentation`` value (polygons, uncompressed or compressed RLE) -> compressed RLE."""
    if isinstance(segm, list):
        return from_polygons(segm, height, width)
    if isinstance(segm, dict) and "counts" in segm:
        if isinstance(segm["counts"], list):
            r = cocomask.frPyObjects(segm, height, width)
            return {"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")}
        counts = segm["counts"]
        return {"size": [int(segm["size"][0]), int(segm["size"][1])],
                "counts": counts.decode("ascii") if isinstance(counts, bytes) else str(counts)}
    raise ValueError(f"unsupported segmentation of type {type(segm).__name__}")


def mask_iou(pred: Sequence[RLE], gt: Sequence[RLE]) -> np.ndarray:
    """Pairwise IoU ``float64[len(pred), len(gt)]`` between two lists of RLEs (pycocotools)."""
    if len(pred) == 0 or len(gt) == 0:
        return np.zeros((len(pred), len(gt)), dtype=np.float64)
    iou = cocomask.iou([_coco(r) for r in pred], [_coco(r) for r in gt], [0] * len(gt))
    return np.asarray(iou, dtype=np.float64).reshape(len(pred), len(gt))


def intersection_union(pred: RLE, gt: RLE) -> tuple[int, int]:
    """Pixel counts (|pred & gt|, |pred | gt|) of two same-size masks (overall IoU sums these)."""
    p, g = _coco(pred), _coco(gt)
    inter = int(cocomask.area(cocomask.merge([p, g], intersect=True)))
    union = int(cocomask.area(cocomask.merge([p, g], intersect=False)))
    return inter, union
