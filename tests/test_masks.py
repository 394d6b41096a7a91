"""refground.masks (pycocotools RLE) against numpy brute force."""

from __future__ import annotations

import numpy as np
import pytest

from refground import masks as M


def random_masks(n: int, h: int, w: int, seed: int) -> list[np.ndarray]:
    """Blobby random masks (a random rectangle with random holes), one of them empty, one full."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        m = np.zeros((h, w), dtype=bool)
        r0, c0 = rng.integers(0, h), rng.integers(0, w)
        r1, c1 = rng.integers(r0, h + 1), rng.integers(c0, w + 1)
        m[r0:r1, c0:c1] = True
        m &= rng.random((h, w)) > 0.2
        out.append(m)
    out[0] = np.zeros((h, w), dtype=bool)
    out[1] = np.ones((h, w), dtype=bool)
    return out


def bbox_expected(m: np.ndarray) -> tuple[float, float, float, float]:
    pts = np.argwhere(m)
    if len(pts) == 0:
        return (0.0, 0.0, 0.0, 0.0)
    (r0, c0), (r1, c1) = pts.min(0), pts.max(0)
    return (float(c0), float(r0), float(c1 + 1), float(r1 + 1))


def iou_expected(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


@pytest.mark.parametrize("seed", [0, 1])
def test_encode_decode_round_trip_area_and_bbox(seed):
    for m in random_masks(8, 17, 23, seed):
        rle = M.encode(m)
        assert rle["size"] == [17, 23] and isinstance(rle["counts"], str)
        back = M.decode(rle)
        assert back.dtype == bool and np.array_equal(back, m)
        assert M.area(rle) == int(m.sum())
        assert M.to_bbox(rle) == bbox_expected(m)
        # Compressed counts given as bytes or the uncompressed form decode to the same mask.
        assert np.array_equal(M.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}), m)


def test_uncompressed_rle_is_accepted():
    m = np.zeros((4, 5), dtype=bool)
    m[1:3, 2:4] = True
    # Column-major runs (4 rows per column): 9 zeros, 2 ones, 2 zeros, 2 ones, 5 zeros.
    raw = {"size": [4, 5], "counts": [9, 2, 2, 2, 5]}
    assert np.array_equal(M.decode(raw), m)
    assert np.array_equal(M.decode(M.from_segmentation(raw, 4, 5)), m)
    assert M.from_segmentation(M.encode(m), 4, 5) == M.encode(m)
    with pytest.raises(ValueError):
        M.from_segmentation(42, 4, 5)


@pytest.mark.parametrize("seed", [0, 3])
def test_mask_iou_and_intersection_union_vs_numpy(seed):
    ms = random_masks(6, 15, 12, seed)
    ns = random_masks(4, 15, 12, seed + 50)
    got = M.mask_iou([M.encode(m) for m in ms], [M.encode(n) for n in ns])
    assert got.shape == (6, 4) and got.dtype == np.float64
    expected = np.array([[iou_expected(a, b) for b in ns] for a in ms])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    for a, b in zip(ms, ns):
        inter, union = M.intersection_union(M.encode(a), M.encode(b))
        assert (inter, union) == (int((a & b).sum()), int((a | b).sum()))


def test_empty_masks_and_empty_lists():
    z = M.encode(np.zeros((5, 6), dtype=bool))
    assert M.area(z) == 0
    assert M.to_bbox(z) == (0.0, 0.0, 0.0, 0.0)
    assert M.mask_iou([z], [z]).tolist() == [[0.0]]
    assert M.intersection_union(z, z) == (0, 0)
    assert M.mask_iou([], [z]).shape == (0, 1)
    assert M.mask_iou([z, z], []).shape == (2, 0)


def test_from_polygons_rasterises_simple_polygons():
    # An axis-aligned rectangle with integer corners covers exactly the pixels inside it.
    rect = M.decode(M.from_polygons([[2, 3, 7, 3, 7, 8, 2, 8]], 12, 10))
    expected = np.zeros((12, 10), dtype=bool)
    expected[3:8, 2:7] = True
    assert np.array_equal(rect, expected)
    # A right triangle: the pixels whose centres lie strictly inside (x + y < 8 at centres).
    tri = M.decode(M.from_polygons([[0, 0, 8, 0, 0, 8]], 10, 10))
    rr, cc = np.mgrid[0:10, 0:10]
    assert np.array_equal(tri, (rr + 0.5) + (cc + 0.5) < 8)
    # Several polygons merge into one mask (their union); from_segmentation takes the same list.
    two = M.from_polygons([[0, 0, 2, 0, 2, 2, 0, 2], [5, 5, 8, 5, 8, 6, 5, 6]], 10, 10)
    want = np.zeros((10, 10), dtype=bool)
    want[0:2, 0:2] = True
    want[5:6, 5:8] = True
    assert np.array_equal(M.decode(two), want)
    assert M.from_segmentation([[0, 0, 2, 0, 2, 2, 0, 2], [5, 5, 8, 5, 8, 6, 5, 6]], 10, 10) == two
