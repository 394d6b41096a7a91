"""Metrics against slow, obviously-correct references; threshold boundaries; empty and degenerate inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import ref_iou

from refground import masks
from refground.eval.metrics import (
    box_accuracy_hits, mask_intersection_union, mask_iou_stats, matched_box_iou, phrase_accuracy, phrase_hits,
    point_in_mask, pointit, pointit_hits, precision_at_1, proposal_recall, union_box, union_boxes,
)


# ------------------------------------------------------------------------------------ references


def ref_inside(point, box) -> bool:
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


def random_boxes(rng, n, size=12, integer=True):
    """Boxes on a small grid (many ties, touching edges, zero-area boxes)."""
    xy = rng.integers(0, size, (n, 4)).astype(float) if integer else rng.uniform(0, size, (n, 4))
    return np.concatenate([np.minimum(xy[:, :2], xy[:, 2:]), np.maximum(xy[:, :2], xy[:, 2:])], axis=1)


def random_lists(rng, n, max_len, allow_empty=True):
    lo = 0 if allow_empty else 1
    return [random_boxes(rng, int(rng.integers(lo, max_len + 1))) for _ in range(n)]


# ----------------------------------------------------------------------------------- Precision@1
@pytest.mark.parametrize("seed", range(4))
def test_precision_at_1_matches_loop(seed):
    rng = np.random.default_rng(seed)
    pred, gt = random_boxes(rng, 300), random_boxes(rng, 300, integer=seed % 2 == 0)
    ious = [ref_iou(p, g) for p, g in zip(pred, gt)]
    assert np.allclose(matched_box_iou(pred, gt), ious, atol=1e-12)
    hits = [i >= 0.5 for i in ious]
    assert box_accuracy_hits(pred, gt).tolist() == hits
    assert precision_at_1(pred, gt) == pytest.approx(sum(hits) / len(hits))
    assert precision_at_1(torch.tensor(pred, dtype=torch.float32), torch.tensor(gt)) == precision_at_1(pred, gt)
    assert precision_at_1(pred, gt, iou_threshold=0.3) == pytest.approx(np.mean([i >= 0.3 for i in ious]))


def test_iou_exactly_half_is_a_hit():
    gt = [[0.0, 0.0, 1.0, 1.0]]
    assert matched_box_iou([[0.0, 0.0, 2.0, 1.0]], gt)[0] == 0.5
    assert precision_at_1([[0.0, 0.0, 2.0, 1.0]], gt) == 1.0
    assert precision_at_1([[0.0, 0.0, 2.0001, 1.0]], gt) == 0.0
    # degenerate boxes: zero area on both sides is IoU 0, not nan
    assert precision_at_1([[3.0, 3.0, 3.0, 3.0]], [[3.0, 3.0, 3.0, 3.0]]) == 0.0


def test_empty_inputs_give_nan_and_shapes_are_checked():
    assert math.isnan(precision_at_1(np.zeros((0, 4)), np.zeros((0, 4))))
    assert math.isnan(pointit(np.zeros((0, 4)), np.zeros((0, 4))))
    assert math.isnan(phrase_accuracy(np.zeros((0, 4)), []))
    assert all(math.isnan(v) for v in mask_iou_stats([], []).values())
    with pytest.raises(ValueError, match="2 predicted boxes for 1"):
        precision_at_1(np.zeros((2, 4)), np.zeros((1, 4)))
    with pytest.raises(ValueError, match=r"shape \[N, 4\]"):
        precision_at_1(np.zeros((2, 3)), np.zeros((2, 3)))


# ------------------------------------------------------------------------------ phrase grounding
def test_union_box_matches_loop():
    rng = np.random.default_rng(3)
    lists = random_lists(rng, 50, 5, allow_empty=False)
    expected = [[min(b[0] for b in L), min(b[1] for b in L), max(b[2] for b in L), max(b[3] for b in L)]
                for L in lists]
    assert union_boxes(lists).tolist() == expected
    assert union_box(lists[0]).tolist() == expected[0]
    with pytest.raises(ValueError):
        union_box(np.zeros((0, 4)))


def test_union_versus_any_on_multi_box_phrases():
    gts = [[[0, 0, 1, 1], [9, 9, 10, 10]],   # far apart: union box is huge
           [[0, 0, 4, 4], [4, 0, 8, 4], [8, 0, 12, 4]]]  # in a row: union box [0, 0, 12, 4]
    pred = [[0, 0, 1, 1], [0, 0, 12, 4]]
    assert phrase_hits(pred, gts, "any").tolist() == [True, False]    # IoU 1 / IoU 1/3 with each
    assert phrase_hits(pred, gts, "union").tolist() == [False, True]  # IoU 0.01 / IoU 1
    # 16/32 = 0.5 exactly with each of the side-by-side boxes is a hit under "any"
    assert phrase_hits([[0, 0, 8, 4]], [[[0, 0, 4, 4], [2, 0, 10, 4]]], "any").tolist() == [True]
    with pytest.raises(ValueError, match="multi_box"):
        phrase_hits(pred, gts, "all")


@pytest.mark.parametrize("multi_box", ["union", "any"])
def test_phrase_hits_match_loop(multi_box):
    rng = np.random.default_rng(5)
    lists = random_lists(rng, 200, 4)
    pred = random_boxes(rng, 200)
    expected = []
    for p, L in zip(pred, lists):
        if len(L) == 0:
            continue
        if multi_box == "union":
            u = [min(b[0] for b in L), min(b[1] for b in L), max(b[2] for b in L), max(b[3] for b in L)]
            expected.append(ref_iou(p, u) >= 0.5)
        else:
            expected.append(any(ref_iou(p, b) >= 0.5 for b in L))
    keep = [len(L) > 0 for L in lists]
    got = phrase_hits(pred[keep], [L for L, k in zip(lists, keep) if k], multi_box)
    assert got.tolist() == expected
    assert phrase_accuracy(pred, lists, multi_box) == pytest.approx(np.mean(expected))  # empty ones excluded


# -------------------------------------------------------------------------------------- PointIt
def test_pointit_borders_count_as_inside_and_union_means_areas():
    gt = [[[0, 0, 2, 2]]]
    assert pointit_hits([[2, 2, 2, 2]], gt).tolist() == [True]          # centre on the corner
    assert pointit_hits([[1, 0, 3, 4]], gt).tolist() == [True]          # centre (2, 2) on the border
    assert pointit_hits([[2.5, 0, 2.5, 0]], gt).tolist() == [False]     # x just outside
    two = [[[0, 0, 1, 1], [3, 3, 4, 4]]]
    assert pointit_hits([[1.5, 1.5, 2.5, 2.5]], two).tolist() == [False]  # inside the union box only
    assert pointit_hits([[3, 3, 3.5, 3.5]], two).tolist() == [True]
    assert pointit([[0, 0, 2, 2], [5, 5, 6, 6]], np.array([[0, 0, 2, 2], [0, 0, 1, 1]])) == 0.5


def test_pointit_matches_loop():
    rng = np.random.default_rng(7)
    lists = random_lists(rng, 300, 4)
    pred = random_boxes(rng, 300)
    expected = [any(ref_inside(((p[0] + p[2]) / 2, (p[1] + p[3]) / 2), b) for b in L) for p, L in zip(pred, lists)]
    assert pointit_hits(pred, lists).tolist() == expected
    assert pointit(pred, lists) == pytest.approx(np.mean(expected))


def test_pointit_in_mask_uses_floor_and_clamps():
    m = np.zeros((4, 6), dtype=bool)
    m[1, 2] = True  # pixel row 1, col 2 spans x in [2, 3), y in [1, 2)
    rle = masks.encode(m)
    pts = np.array([[2.0, 1.0], [2.999, 1.999], [1.999, 1.0], [3.0, 1.0], [2.5, -7.0]])
    assert point_in_mask(pts, rle).tolist() == [True, True, False, False, False]
    m2 = np.zeros((4, 6), dtype=bool)
    m2[3, 5] = True
    assert point_in_mask(np.array([[100.0, 100.0], [-1, -1]]), m2).tolist() == [True, False]  # clamped
    # per query: a whole-region mask replaces the box; per-object None keeps that object's box
    pred = [[2, 1, 3, 2], [2, 1, 3, 2], [9, 9, 9, 9]]
    gt = [np.array([[0, 0, 6, 4]]), np.array([[0, 0, 6, 4]]), np.array([[0, 0, 1, 1], [8, 8, 10, 10]])]
    assert pointit_hits(pred, gt, [rle, None, [rle, None]], point_in="mask").tolist() == [True, True, True]
    pred_off = [[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]]  # centre (0.5, 0.5): in the boxes, not the mask
    assert pointit_hits(pred_off, gt, [rle, None, [rle, None]], point_in="mask").tolist() == [False, True, False]
    assert pointit_hits(pred_off, gt, [rle, None, [rle, None]], point_in="box").tolist() == [True, True, True]


# --------------------------------------------------------------------------------- segmentation
def test_mask_stats_match_pycocotools_and_numpy():
    rng = np.random.default_rng(11)
    preds, gts = [], []
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(1, 20, 2))
        preds.append(rng.random((h, w)) < rng.random())
        gts.append(rng.random((h, w)) < rng.random())
    preds.append(np.zeros((3, 3), bool))
    gts.append(np.zeros((3, 3), bool))  # empty union: IoU 0
    inter = np.array([np.sum(p & g) for p, g in zip(preds, gts)])
    union = np.array([np.sum(p | g) for p, g in zip(preds, gts)])
    ious = np.array([i / u if u else 0.0 for i, u in zip(inter, union)])
    coco = [masks.mask_iou([masks.encode(p)], [masks.encode(g)])[0, 0] for p, g in zip(preds, gts)]
    assert np.allclose(ious, coco)
    rle_p, rle_g = [masks.encode(p) for p in preds], [masks.encode(g) for g in gts]
    for a, b in ((preds, gts), (rle_p, rle_g), (rle_p, gts)):
        i, u = mask_intersection_union(a, b)
        assert i.tolist() == inter.tolist() and u.tolist() == union.tolist()
        stats = mask_iou_stats(a, b)
        assert stats["overall_iou"] == pytest.approx(inter.sum() / union.sum())
        assert stats["mean_iou"] == pytest.approx(ious.mean())
        for t in (0.5, 0.6, 0.7, 0.8, 0.9):
            assert stats[f"prec@{t:g}"] == pytest.approx(np.mean(ious > t))
    assert list(mask_iou_stats(rle_p, rle_g)) == ["overall_iou", "mean_iou", "prec@0.5", "prec@0.6", "prec@0.7",
                                                  "prec@0.8", "prec@0.9"]


def test_mask_threshold_is_strict_and_empty_union_is_zero():
    g = np.zeros((5, 2), bool)
    g[:, 0] = True                      # 5 pixels
    half = np.zeros((5, 2), bool)
    half[:, :] = True                   # 10 pixels: IoU 0.5
    three_fifths = np.zeros((5, 2), bool)
    three_fifths[:3, 0] = True          # 3 of 5 pixels: IoU 0.6
    stats = mask_iou_stats([half, three_fifths], [g, g], thresholds=(0.5, 0.6))
    assert stats["prec@0.5"] == 0.5 and stats["prec@0.6"] == 0.0
    assert stats["overall_iou"] == pytest.approx(8 / 15) and stats["mean_iou"] == pytest.approx(0.55)
    empty = np.zeros((2, 2), bool)
    assert mask_iou_stats([empty], [empty]) == {"overall_iou": 0.0, "mean_iou": 0.0, "prec@0.5": 0.0,
                                                "prec@0.6": 0.0, "prec@0.7": 0.0, "prec@0.8": 0.0, "prec@0.9": 0.0}
    with pytest.raises(ValueError, match="size"):
        mask_iou_stats([np.zeros((2, 3))], [np.zeros((3, 2))])


# ------------------------------------------------------------------------------- proposal recall
def ref_recall(proposals, targets, ns):
    total = sum(len(t) for t in targets)
    out = {}
    for n in ns:
        covered = sum(1 for P, T in zip(proposals, targets) for t in T if any(ref_iou(p, t) >= 0.5 for p in P[:n]))
        out[n] = covered / total if total else float("nan")
    return out


def test_proposal_recall_matches_loop():
    rng = np.random.default_rng(13)
    proposals = random_lists(rng, 60, 30)        # includes empty lists and lists shorter than N
    targets = random_lists(rng, 60, 3)           # includes queries without targets
    proposals[0] = np.zeros((0, 4))
    ns = (1, 3, 5, 10, 20, 100)
    got = proposal_recall(proposals, targets, ns)
    assert list(got) == list(ns)
    for n, v in ref_recall(proposals, targets, ns).items():
        assert got[n] == pytest.approx(v)
    # tensors in, same answer
    assert proposal_recall([torch.tensor(p) for p in proposals], targets, ns) == got


def test_proposal_recall_small_cases():
    props = [[[5, 5, 6, 6], [0, 0, 1, 1]], []]
    tgts = [[[0, 0, 1, 1], [0, 0, 2, 1]], [[0, 0, 1, 1]]]
    # target (0,0,1,1) hit at rank 1; (0,0,2,1) has IoU exactly 0.5 with rank 1 -> covered; second query empty
    assert proposal_recall(props, tgts, ns=(1, 2, 50)) == {1: 0.0, 2: pytest.approx(2 / 3), 50: pytest.approx(2 / 3)}
    r = proposal_recall([[]], [np.zeros((0, 4))], ns=(1,))
    assert math.isnan(r[1])
