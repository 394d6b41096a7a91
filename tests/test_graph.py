"""refground.graph: spatial relations against the pure-Python reference, crafted boundary cases, features."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from refground.boxes import spatial_feature as spatial_features
from refground.bench.graph_bench import relation_boxes, relation_reference, spatial_relations_reference
from refground.graph import (
    NUM_RELATIONS,
    RELATION_NAMES,
    _far_threshold,
    spatial_relations,
    spatial_relations_many,
)

INSIDE, COVER, OVERLAP, NONE = 1, 2, 3, 0
RIGHT, TOP_RIGHT, TOP, TOP_LEFT, LEFT, BOTTOM_LEFT, BOTTOM, BOTTOM_RIGHT = range(4, 12)


def check(boxes, size) -> torch.Tensor:
    """spatial_relations(boxes, size), asserted equal to the reference; returns it."""
    ours = spatial_relations(boxes, size)
    assert ours.dtype == torch.int64
    assert ours.tolist() == spatial_relations_reference(boxes, size)
    return ours


def theta_ref(bi: list[float], bj: list[float]) -> float:
    """theta_ij in degrees exactly as the reference computes it."""
    dx = (bi[0] + bi[2]) / 2 - (bj[0] + bj[2]) / 2
    dy = -((bi[1] + bi[3]) / 2 - (bj[1] + bj[3]) / 2)
    return math.degrees(math.atan2(dy, dx))


def test_constants():
    assert NUM_RELATIONS == 12 == len(RELATION_NAMES)
    assert RELATION_NAMES[0] == "no relationship"
    assert RELATION_NAMES[1:4] == ("inside", "cover", "overlap")
    assert RELATION_NAMES[4:] == ("right", "top right", "top", "top left", "left", "bottom left", "bottom",
                                  "bottom right")


# ------------------------------------------------------------------------------------- random boxes


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("size", [(480, 640), (100, 1000), (500, 200)])
def test_matches_reference_on_random_boxes(seed, size):
    for k in (2, 7, 40):
        boxes = relation_boxes(k, size, seed)
        ours = check(boxes, size)
        check(boxes.float(), size)
        assert torch.equal(spatial_relations(boxes.numpy(), size), ours)
    # every label occurs at K = 40, so the comparison covers every rule
    assert set(ours.unique().tolist()) == set(range(NUM_RELATIONS))


@pytest.mark.parametrize("seed", range(3))
def test_matches_reference_on_integer_grid(seed):
    """Whole-pixel boxes on a tiny grid: identical boxes, shared edges and exact distance ties (diagonal 10
    in a 6 x 8 image, so d / diagonal == 0.5 happens)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 9, (30, 2), generator=g)
    b = torch.randint(0, 9, (30, 2), generator=g)
    boxes = torch.cat([torch.minimum(a, b), torch.maximum(a, b)], dim=1)
    ours = check(boxes, (6, 8))
    assert torch.equal(check(boxes.double(), (6, 8)), ours)


@pytest.mark.parametrize("seed", range(3))
def test_antisymmetry(seed):
    boxes = relation_boxes(40, (480, 640), seed)
    rel = spatial_relations(boxes, (480, 640))
    same_box = (boxes[:, None] == boxes[None]).all(-1)
    c = (boxes[:, :2] + boxes[:, 2:]) / 2
    same_centre = (c[:, None] == c[None]).all(-1)
    opposite = {s: 4 + (s - 4 + 4) % 8 for s in range(4, 12)}
    seen = set()
    for i in range(40):
        for j in range(40):
            a, b = int(rel[i, j]), int(rel[j, i])
            seen.add(a)
            if i == j:
                assert a == 0
            elif a == INSIDE:
                assert b == (INSIDE if same_box[i, j] else COVER)
            elif a in (COVER, OVERLAP, NONE):
                assert b == {COVER: INSIDE, OVERLAP: OVERLAP, NONE: NONE}[a]
            elif same_centre[i, j]:
                assert a == b == RIGHT  # theta = atan2(0, 0) = 0 both ways
            else:
                assert b == opposite[a]
    assert seen == set(range(NUM_RELATIONS))


# ----------------------------------------------------------------------------------- crafted cases


def test_empty_single_and_self_pairs():
    assert spatial_relations(torch.zeros(0, 4), (10, 10)).shape == (0, 0)
    assert spatial_relations(np.zeros((0, 4), np.float32), (10, 10)).shape == (0, 0)
    assert spatial_relations([[1.0, 2.0, 3.0, 4.0]], (10, 10)).tolist() == [[0]]
    assert spatial_relations_reference(torch.zeros(0, 4), (10, 10)) == []
    rel = check(relation_boxes(12, (50, 60), 0), (50, 60))
    assert rel.diagonal().eq(0).all()


def test_touching_nested_identical():
    boxes = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],    # 0
        [10.0, 0.0, 20.0, 10.0],   # 1: shares 0's right edge
        [0.0, 10.0, 10.0, 20.0],   # 2: shares 0's bottom edge
        [0.0, 0.0, 5.0, 10.0],     # 3: inside 0, sharing three edges
        [2.0, 3.0, 4.0, 5.0],      # 4: strictly inside 0 and 3
        [0.0, 0.0, 10.0, 10.0],    # 5: identical to 0
    ])
    rel = check(boxes, (100, 100))
    assert rel[1, 0] == RIGHT and rel[0, 1] == LEFT
    assert rel[2, 0] == BOTTOM and rel[0, 2] == TOP  # image y points down, theta's y up
    assert rel[0, 3] == INSIDE and rel[3, 0] == COVER
    assert rel[0, 4] == INSIDE and rel[4, 0] == COVER and rel[3, 4] == INSIDE and rel[4, 3] == COVER
    assert rel[0, 5] == INSIDE and rel[5, 0] == INSIDE  # identical boxes: rule 1 holds both ways
    assert rel[5, 3] == INSIDE and rel[5, 4] == INSIDE


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_iou_threshold_is_strict(dtype):
    a = [0.0, 0.0, 3.0, 1.0]
    cases = {  # second box -> expected relation of it to a
        (1.0, 0.0, 4.0, 1.0): RIGHT,      # IoU exactly 2 / 4 = 0.5: not > 0.5
        (0.99, 0.0, 3.99, 1.0): OVERLAP,  # just above
        (1.01, 0.0, 4.01, 1.0): RIGHT,    # just below
        (-1.0, 0.0, 2.0, 1.0): LEFT,      # exactly 0.5 on the other side
    }
    for b, expected in cases.items():
        rel = check(torch.tensor([a, list(b)], dtype=dtype), (50, 50))
        assert rel[1, 0] == expected and rel[0, 1] == {RIGHT: LEFT, LEFT: RIGHT, OVERLAP: OVERLAP}[expected]


def test_distance_threshold_is_strict_and_uses_the_pixel_diagonal():
    size = (300, 400)  # diagonal exactly 500
    a = [0.0, 0.0, 2.0, 2.0]  # centre (1, 1)
    for dy, expected in ((0.0, BOTTOM_RIGHT), (1e-9, NONE), (-1e-9, BOTTOM_RIGHT)):
        b = [150.0, 200.0 + dy, 152.0, 202.0 + dy]  # centre (151, 201 + dy): d = 250 for dy = 0
        rel = check(torch.tensor([a, b], dtype=torch.float64), size)
        assert rel[1, 0] == expected
        assert rel[0, 1] == (NONE if expected == NONE else TOP_LEFT)
    # the same pair is far in a small non-square image and near in a large one
    pair = torch.tensor([[0.0, 0.0, 10.0, 10.0], [600.0, 0.0, 610.0, 10.0]])
    assert check(pair, (100, 1000))[1, 0] == NONE  # 600 / 1005 > 0.5
    assert check(pair, (1000, 1000))[1, 0] == RIGHT  # 600 / 1414 < 0.5
    assert check(pair, (1000, 100))[1, 0] == NONE


def test_far_threshold_is_exactly_rule_4():
    for diagonal in (500.0, math.hypot(480, 640), math.hypot(77, 1000), math.hypot(256, 256), 1.0):
        t = _far_threshold(diagonal)
        s = t
        for _ in range(3):
            s = math.nextafter(s, 0.0)
        for _ in range(7):
            assert (s >= t) == (math.sqrt(s) / diagonal > 0.5)
            s = math.nextafter(s, math.inf)


def test_distance_exactly_at_the_float_threshold():
    """A pair whose squared centre distance is exactly the smallest float that rule 4 calls far."""
    diagonal = 500.0
    t = _far_threshold(diagonal)
    dy = 0.5
    x = math.sqrt(t - dy * dy)
    for _ in range(4):
        x = math.nextafter(x, 0.0)
    while x * x + dy * dy != t:
        x = math.nextafter(x, math.inf)
    j = [-1.0, -1.0, 1.0, 1.0]  # centre (0, 0)
    for cx, expected in ((x, NONE), (math.nextafter(x, 0.0), RIGHT)):
        i = [cx - 1, -dy - 1, cx + 1, -dy + 1]  # centre (cx, -dy): theta slightly above 0
        assert ((i[0] + i[2]) / 2, (i[1] + i[3]) / 2) == (cx, -dy)
        assert check(torch.tensor([i, j], dtype=torch.float64), (300, 400))[0, 1] == expected


def test_eight_directions_and_axes():
    j = [95.0, 95.0, 105.0, 105.0]  # centre (100, 100)
    boxes = [j]
    for k in range(8):  # 0, 45, ..., 315 degrees, y up
        cx = 100 + 50 * math.cos(math.radians(45 * k))
        cy = 100 - 50 * math.sin(math.radians(45 * k))
        boxes.append([cx - 2, cy - 2, cx + 2, cy + 2])
    rel = check(torch.tensor(boxes, dtype=torch.float64), (400, 400))
    assert rel[1:, 0].tolist() == list(range(4, 12))
    assert rel[0, 1:].tolist() == [4 + (s + 4) % 8 for s in range(8)]
    # theta exactly 0, 90, 180, -90 (dy is -0.0 for the horizontal pairs)
    axes = torch.tensor([j, [140, 95, 150, 105], [95, 40, 105, 50], [40, 95, 50, 105], [95, 150, 105, 160]],
                        dtype=torch.float64)
    assert check(axes, (400, 400))[1:, 0].tolist() == [RIGHT, TOP, LEFT, BOTTOM]
    # concentric cross: no containment, IoU 0.11, d = 0 -> theta = atan2(0, 0) = 0 -> right, both ways
    cross = torch.tensor([[0, 40, 100, 60], [40, 0, 60, 100]], dtype=torch.float32)
    assert check(cross, (200, 200)).tolist() == [[0, RIGHT], [RIGHT, 0]]


def _box_at_theta(j: list[float], target: float, accept) -> list[float] | None:
    """A 4 x 4 box whose centre lies at ``target`` degrees from j's centre, nudged by a few ulps until the
    reference's theta satisfies ``accept(theta)``; None if no nudge does."""
    cxj, cyj = (j[0] + j[2]) / 2, (j[1] + j[3]) / 2
    t = math.radians(target)
    for r in range(20, 120):
        cx, cy = cxj + r * math.cos(t), cyj - r * math.sin(t)
        for sx in range(-3, 4):
            for sy in range(-3, 4):
                x1, y1 = cx - 2, cy - 2
                x2, y2 = x1 + 4, y1 + 4
                for _ in range(abs(sx)):
                    x1, x2 = (math.nextafter(v, math.copysign(math.inf, sx)) for v in (x1, x2))
                for _ in range(abs(sy)):
                    y1, y2 = (math.nextafter(v, math.copysign(math.inf, sy)) for v in (y1, y2))
                if accept(theta_ref([x1, y1, x2, y2], j)):
                    return [x1, y1, x2, y2]
    return None


# boundary -> (sector exactly on it, sector just clockwise of it); sectors are closed on their clockwise side
BOUNDARIES = {22.5: (TOP_RIGHT, RIGHT), 67.5: (TOP, TOP_RIGHT), 112.5: (TOP_LEFT, TOP), 157.5: (LEFT, TOP_LEFT),
              -157.5: (BOTTOM_LEFT, LEFT), -112.5: (BOTTOM, BOTTOM_LEFT), -67.5: (BOTTOM_RIGHT, BOTTOM),
              -22.5: (RIGHT, BOTTOM_RIGHT)}


@pytest.mark.parametrize("boundary", list(BOUNDARIES))
def test_exact_sector_boundaries(boundary):
    j = [100.0, 100.0, 110.0, 110.0]
    on = _box_at_theta(j, boundary, lambda th: th == boundary)
    below = _box_at_theta(j, boundary, lambda th: boundary - 1e-9 < th < boundary)
    above = _box_at_theta(j, boundary, lambda th: boundary < th < boundary + 1e-9)
    if on is None or below is None or above is None:
        pytest.skip(f"this libm's atan2 gives no float box pair at exactly {boundary} degrees")
    rel = check(torch.tensor([j, on, below, above], dtype=torch.float64), (400, 400))
    on_sector, cw_sector = BOUNDARIES[boundary]
    assert rel[1:, 0].tolist() == [on_sector, cw_sector, on_sector]


def test_just_below_minus_22_5_is_bottom_right_not_12():
    """theta a hair below -22.5: the float (theta + 22.5) % 360 rounds up to exactly 360.0, which the
    literal formula would turn into sector 12."""
    j = [100.0, 100.0, 110.0, 110.0]
    box = _box_at_theta(j, -22.5, lambda th: th < -22.5 and (th + 22.5) % 360.0 == 360.0)
    if box is None:
        pytest.skip("no float box pair with theta rounding to 360 after the mod on this libm")
    assert relation_reference(box, j, 1000.0) == BOTTOM_RIGHT
    assert check(torch.tensor([j, box], dtype=torch.float64), (400, 400))[1, 0] == BOTTOM_RIGHT


def test_inputs_and_errors():
    boxes = relation_boxes(9, (60, 80), 1)
    ours = spatial_relations(boxes, (60, 80))
    assert torch.equal(spatial_relations(boxes.tolist(), (60, 80)), ours)
    as_f32 = spatial_relations(boxes.float(), (60, 80))
    assert torch.equal(spatial_relations(boxes.numpy().astype(np.float32), [60, 80]), as_f32)
    frozen = boxes.numpy().copy()
    frozen.flags.writeable = False  # like a memory-mapped column: must not warn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(spatial_relations(frozen, (60, 80)), ours)
        assert torch.equal(spatial_features(frozen, (60, 80)), spatial_features(boxes, (60, 80)))
    # a normal tensor, not an inference-mode one: usable as embedding indices under autograd
    weight = torch.randn(NUM_RELATIONS, 3, requires_grad=True)
    torch.nn.functional.embedding(ours, weight).sum().backward()
    assert weight.grad is not None
    with pytest.raises(ValueError, match="boxes"):
        spatial_relations(torch.zeros(3, 5), (10, 10))
    with pytest.raises(ValueError, match="image_size"):
        spatial_relations(boxes, (0, 10))
    with pytest.raises(ValueError, match="image_size"):
        spatial_relations(boxes, (10,))


# ---------------------------------------------------------------------------------------- many images


def test_many_matches_per_image_calls():
    rng = np.random.default_rng(0)
    counts = [0, 1, 2, 95, 0, 36, 40, 3, 90] + rng.integers(0, 30, 20).tolist()
    boxes_list, sizes = [], []
    for n, k in enumerate(counts):
        size = (int(rng.integers(50, 500)), int(rng.integers(50, 500)))
        b = relation_boxes(int(k), size, n)
        boxes_list.append(b.numpy() if n % 3 == 0 else b.float() if n % 3 == 1 else b)
        sizes.append(size)
    labels, offsets = spatial_relations_many(boxes_list, sizes)
    assert labels.dtype == np.uint8 and offsets.dtype == np.int64
    assert offsets.tolist() == [0] + np.cumsum(np.square(counts)).tolist()
    for b, size, lo, hi in zip(boxes_list, sizes, offsets[:-1], offsets[1:]):
        np.testing.assert_array_equal(labels[lo:hi], spatial_relations(b, size).numpy().ravel())
    empty_labels, empty_offsets = spatial_relations_many([], [])
    assert empty_labels.shape == (0,) and empty_offsets.tolist() == [0]
    with pytest.raises(ValueError, match="sizes"):
        spatial_relations_many(boxes_list, sizes[:-1])


# --------------------------------------------------------------------------------------- features


def test_spatial_features_hand_example():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 100.0], [0.0, 0.0, 400.0, 200.0]], dtype=torch.float64)
    f = spatial_features(boxes, (200, 400))  # height 200, width 400
    expected = torch.tensor([[30 / 400, 60 / 200, 40 / 400, 80 / 200, 3200 / 80000],
                             [0.5, 0.5, 1.0, 1.0, 1.0]], dtype=torch.float64)
    assert f.shape == (2, 5) and f.dtype == torch.float64
    torch.testing.assert_close(f, expected, rtol=0, atol=1e-15)
    assert spatial_features(boxes.float(), (200, 400)).dtype == torch.float32
    ints = spatial_features(torch.tensor([[10, 20, 50, 100]]), (200, 400))
    assert ints.dtype == torch.float32
    torch.testing.assert_close(ints, expected[:1].float())
    assert spatial_features(torch.zeros(0, 4), (10, 10)).shape == (0, 5)
    with pytest.raises(ValueError):
        spatial_features(boxes, (200, 0))
