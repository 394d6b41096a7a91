"""refground.boxes: every op against a slow pure-Python reference (expected_fn), plus edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from refground import boxes as B
from refground.bench.boxes_bench import box_iou_reference, clustered_boxes, iou_reference, nms_reference

# Hand-made boxes covering the edge cases: identical, nested, touching, disjoint, degenerate.
SPECIAL = torch.tensor([
    [0.0, 0.0, 10.0, 10.0],
    [0.0, 0.0, 10.0, 10.0],    # identical to 0
    [2.0, 2.0, 5.0, 6.0],      # nested in 0
    [10.0, 0.0, 20.0, 10.0],   # touches 0 along x = 10
    [30.0, 30.0, 40.0, 45.0],  # disjoint
    [3.0, 3.0, 3.0, 8.0],      # zero width
    [3.0, 3.0, 3.0, 8.0],      # zero width, identical to 5
    [4.0, 4.0, 4.0, 4.0],      # a point
    [8.0, 9.0, 2.0, 1.0],      # inverted (x2 < x1, y2 < y1)
], dtype=torch.float64)


def rand_boxes(n: int, seed: int, span: float = 50.0, dtype=torch.float64) -> torch.Tensor:
    """n random boxes in a small area so that many overlap; a few are degenerate."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=dtype) * span
    wh = torch.rand(n, 2, generator=g, dtype=dtype) * span / 2
    wh[torch.rand(n, generator=g) < 0.1, 0] = 0.0
    return torch.cat([xy, xy + wh], dim=1)


# --------------------------------------------------------------------------------------------- formats

def convert_expected(box: list[float], in_fmt: str, out_fmt: str) -> list[float]:
    if in_fmt == "xyxy":
        x1, y1, x2, y2 = box
    elif in_fmt == "xywh":
        x1, y1, x2, y2 = box[0], box[1], box[0] + box[2], box[1] + box[3]
    else:
        x1, y1 = box[0] - box[2] / 2, box[1] - box[3] / 2
        x2, y2 = box[0] + box[2] / 2, box[1] + box[3] / 2
    if out_fmt == "xyxy":
        return [x1, y1, x2, y2]
    if out_fmt == "xywh":
        return [x1, y1, x2 - x1, y2 - y1]
    return [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]


@pytest.mark.parametrize("in_fmt", B.BOX_FORMATS)
@pytest.mark.parametrize("out_fmt", B.BOX_FORMATS)
def test_box_convert_matches_reference_and_round_trips(in_fmt, out_fmt):
    boxes = rand_boxes(20, 0)
    got = B.box_convert(boxes, in_fmt, out_fmt)
    expected = torch.tensor([convert_expected(b, in_fmt, out_fmt) for b in boxes.tolist()], dtype=torch.float64)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(B.box_convert(got, out_fmt, in_fmt), boxes)
    assert B.box_convert(boxes[:0], in_fmt, out_fmt).shape == (0, 4)
    # Batched shapes [..., 4] are kept.
    assert B.box_convert(boxes.view(4, 5, 4), in_fmt, out_fmt).shape == (4, 5, 4)


def test_box_convert_rejects_unknown_format():
    with pytest.raises(ValueError, match="unknown box format"):
        B.box_convert(SPECIAL, "xyxy", "yxyx")


def test_area_centers_clip_remove_small():
    boxes = torch.cat([SPECIAL, rand_boxes(30, 1)])
    rows = boxes.tolist()
    torch.testing.assert_close(B.box_area(boxes), torch.tensor(
        [max(b[2] - b[0], 0) * max(b[3] - b[1], 0) for b in rows], dtype=torch.float64))
    torch.testing.assert_close(B.box_centers(boxes), torch.tensor(
        [[(b[0] + b[2]) / 2, (b[1] + b[3]) / 2] for b in rows], dtype=torch.float64))
    h, w = 25, 18
    clip = lambda v, hi: min(max(v, 0.0), hi)  # noqa: E731
    torch.testing.assert_close(B.clip_boxes_to_image(boxes - 5, (h, w)), torch.tensor(
        [[clip(b[0] - 5, w), clip(b[1] - 5, h), clip(b[2] - 5, w), clip(b[3] - 5, h)] for b in rows],
        dtype=torch.float64))
    assert B.clip_boxes_to_image(boxes.view(3, 13, 4), (h, w)).shape == (3, 13, 4)
    keep = B.remove_small_boxes(boxes, 3.0)
    assert keep.dtype == torch.int64
    assert keep.tolist() == [i for i, b in enumerate(rows) if b[2] - b[0] >= 3 and b[3] - b[1] >= 3]
    assert B.box_area(boxes[:0]).shape == (0,)
    assert B.remove_small_boxes(boxes[:0], 1.0).shape == (0,)


# ------------------------------------------------------------------------------------------------- IoU

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_box_iou_matches_python_double_loop(seed):
    b1 = torch.cat([SPECIAL, rand_boxes(40, seed)])
    b2 = torch.cat([rand_boxes(25, seed + 100), SPECIAL])
    got = B.box_iou(b1, b2)
    assert got.shape == (len(b1), len(b2))
    # Same float64 arithmetic in the same order, so the results agree exactly.
    assert got.tolist() == box_iou_reference(b1, b2)
    m = len(b2)
    assert B.elementwise_box_iou(b1[:m], b2).tolist() == [iou_reference(a, b) for a, b in zip(b1[:m].tolist(),
                                                                                              b2.tolist())]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numpy_iou_used_by_nms_is_bitwise_box_iou(dtype):
    b1 = torch.cat([SPECIAL, rand_boxes(60, 4)]).to(dtype)
    b2 = torch.cat([rand_boxes(50, 5), SPECIAL]).to(dtype)
    got = B._box_iou_np(b1.numpy(), b2.numpy())
    assert got.dtype == b1.numpy().dtype
    assert torch.equal(torch.from_numpy(got), B.box_iou(b1, b2))


def test_box_iou_special_cases():
    iou = B.box_iou(SPECIAL, SPECIAL)
    assert not torch.isnan(iou).any()
    assert iou[0, 1] == 1.0 and iou[0, 0] == 1.0                 # identical
    assert iou[0, 2] == pytest.approx(12.0 / 100.0)              # nested: inner / outer area
    assert iou[0, 3] == 0.0 and iou[0, 4] == 0.0                 # touching, disjoint
    for d in (5, 6, 7, 8):                                       # degenerate: 0 with everything, itself too
        assert (iou[d] == 0).all() and (iou[:, d] == 0).all()
    assert torch.equal(iou, iou.T)


def test_box_iou_empty_and_dtypes():
    assert B.box_iou(SPECIAL[:0], SPECIAL).shape == (0, len(SPECIAL))
    assert B.box_iou(SPECIAL, SPECIAL[:0]).shape == (len(SPECIAL), 0)
    assert B.generalized_box_iou(SPECIAL[:0], SPECIAL[:0]).shape == (0, 0)
    assert B.elementwise_box_iou(SPECIAL[:0], SPECIAL[:0]).shape == (0,)
    ints = torch.tensor([[0, 0, 4, 4], [2, 2, 6, 6]])
    assert B.box_iou(ints, ints)[0, 1].item() == pytest.approx(4 / 28)
    f32 = B.box_iou(SPECIAL.float(), SPECIAL.float())
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), B.box_iou(SPECIAL, SPECIAL))
    with pytest.raises(ValueError):
        B.box_iou(SPECIAL[:, :3], SPECIAL)
    with pytest.raises(ValueError):
        B.elementwise_box_iou(SPECIAL, SPECIAL[:2])


def test_box_iou_gradient_is_finite_for_degenerate_boxes():
    boxes = SPECIAL.clone().requires_grad_(True)
    (B.box_iou(boxes, boxes).sum() + B.generalized_box_iou(boxes, boxes).sum()).backward()
    assert torch.isfinite(boxes.grad).all()
    # The autograd path computes the same values as the in-place one.
    with torch.no_grad():
        plain = B.box_iou(SPECIAL, SPECIAL)
    torch.testing.assert_close(B.box_iou(boxes, boxes).detach(), plain)


def giou_expected(a: list[float], b: list[float]) -> float:
    cw = max(max(a[2], b[2]) - min(a[0], b[0]), 0.0)
    ch = max(max(a[3], b[3]) - min(a[1], b[1]), 0.0)
    c = cw * ch
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    union = max(a[2] - a[0], 0) * max(a[3] - a[1], 0) + max(b[2] - b[0], 0) * max(b[3] - b[1], 0) - iw * ih
    return iou_reference(a, b) - ((c - union) / c if c > 0 else 0.0)


def test_generalized_box_iou_matches_reference():
    b1 = torch.cat([SPECIAL, rand_boxes(30, 5)])
    b2 = torch.cat([rand_boxes(20, 6, span=200), SPECIAL])
    got = B.generalized_box_iou(b1, b2)
    expected = torch.tensor([[giou_expected(a, b) for b in b2.tolist()] for a in b1.tolist()], dtype=torch.float64)
    torch.testing.assert_close(got, expected)
    assert got.min() >= -1 and got.max() <= 1
    g = B.generalized_box_iou(SPECIAL, SPECIAL)
    assert g[0, 1] == 1.0
    assert g[7, 7] == 0.0  # two identical points: no enclosing area, no penalty, no NaN
    far = B.generalized_box_iou(torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([[1000.0, 1000, 1001, 1001]]))
    assert -1 < far.item() < -0.99


# ------------------------------------------------------------------------------------------------- NMS

@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
def test_nms_matches_greedy_reference(seed, thr):
    boxes, scores = clustered_boxes(300, seed, image_size=300.0)
    boxes = torch.cat([boxes.double(), SPECIAL])
    scores = torch.cat([scores, torch.rand(len(SPECIAL), generator=torch.Generator().manual_seed(seed))])
    keep = B.nms(boxes, scores, thr)
    assert keep.dtype == torch.int64
    assert keep.tolist() == nms_reference(boxes, scores, thr)
    assert (scores[keep][1:] <= scores[keep][:-1]).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_nms_blocked_path_matches_reference(monkeypatch, seed):
    # Tiny blocks and kept-chunks exercise the cross-block and chunked code paths on few boxes.
    monkeypatch.setattr(B, "_NMS_BLOCK", 16)
    monkeypatch.setattr(B, "_NMS_KEPT_CHUNK", 5)
    boxes, scores = clustered_boxes(250, seed + 10, image_size=250.0)
    boxes = boxes.double()
    for thr in (0.2, 0.6):
        assert B.nms(boxes, scores, thr).tolist() == nms_reference(boxes, scores, thr)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_fixed_point_matches_the_per_box_loop(seed):
    # Random upper-triangular suppression matrices of several densities, and a chain in which box i suppresses
    # only box i + 1: its answer alternates (kept, removed, kept...), which takes one round per box, so the
    # fixed point gives up after _FIXED_POINT_ROUNDS and the loop must finish it.
    rng = np.random.default_rng(seed)
    for n, density in ((1, 0.5), (2, 1.0), (40, 0.05), (200, 0.3), (600, 0.02)):
        sup = np.triu(rng.random((n, n)) < density, k=1)
        assert np.array_equal(B._greedy_upper(sup), B._greedy_loop(sup))
    chain = np.eye(3 * B._FIXED_POINT_ROUNDS, k=1, dtype=bool)
    expected = np.arange(len(chain)) % 2 == 0
    assert np.array_equal(B._greedy_loop(chain), expected)
    assert np.array_equal(B._greedy_upper(chain), expected)


@pytest.mark.parametrize("seed", [0, 1])
def test_nms_max_keep_is_the_head_of_the_full_answer(monkeypatch, seed):
    boxes, scores = clustered_boxes(700, seed + 20, image_size=400.0)
    for block in (512, 16):  # one block, and the limit reached across blocks
        monkeypatch.setattr(B, "_NMS_BLOCK", block)
        full = B.nms(boxes, scores, 0.5)
        for k in (0, 1, 7, 48, len(full), len(full) + 5):
            assert B.nms(boxes, scores, 0.5, max_keep=k).tolist() == full[:k].tolist(), (block, k)
    sup = np.triu(np.random.default_rng(seed).random((50, 50)) < 0.1, k=1)
    for k in (1, 3, 10):
        got = B._greedy_loop(sup, k)
        assert got.sum() == min(k, B._greedy_loop(sup).sum())
        assert np.array_equal(np.flatnonzero(got), np.flatnonzero(B._greedy_loop(sup))[:k])


def test_nms_default_blocks_on_more_boxes_than_one_block():
    boxes, scores = clustered_boxes(1100, 7, image_size=800.0)
    boxes = boxes.double()
    assert B.nms(boxes, scores, 0.5).tolist() == nms_reference(boxes, scores, 0.5)


def test_nms_threshold_is_strict_and_ties_are_stable():
    # IoU of these two is exactly 0.5: kept at threshold 0.5 (suppression needs IoU > threshold).
    boxes = torch.tensor([[0.0, 0, 2, 1], [0.0, 0, 1, 1]])
    assert B.nms(boxes, torch.tensor([0.9, 0.8]), 0.5).tolist() == [0, 1]
    assert B.nms(boxes, torch.tensor([0.8, 0.9]), 0.49).tolist() == [1]
    # Equal scores: lower index first, and it wins against an identical box.
    same = torch.tensor([[0.0, 0, 5, 5], [20.0, 20, 25, 25], [0.0, 0, 5, 5], [40.0, 0, 45, 5]])
    assert B.nms(same, torch.ones(4), 0.5).tolist() == [0, 1, 3]
    assert B.nms(same, torch.tensor([1.0, 2.0, 2.0, 1.0]), 0.5).tolist() == [1, 2, 3]  # 2 beats identical 0


def test_nms_empty_and_degenerate():
    empty = B.nms(torch.zeros(0, 4), torch.zeros(0), 0.5)
    assert empty.shape == (0,) and empty.dtype == torch.int64
    assert B.batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5).shape == (0,)
    # Identical zero-width boxes have IoU 0: none suppresses another.
    flat = torch.tensor([[3.0, 3, 3, 8]] * 4)
    assert B.nms(flat, torch.tensor([0.1, 0.4, 0.3, 0.2]), 0.0).tolist() == [1, 2, 3, 0]
    with pytest.raises(ValueError):
        B.nms(flat, torch.ones(3), 0.5)


def batched_expected(boxes, scores, idxs, thr) -> list[int]:
    """Per-class nms, merged and sorted by decreasing score (ties: lower index first)."""
    kept: list[int] = []
    for c in torch.unique(idxs).tolist():
        members = torch.nonzero(idxs == c).squeeze(1)
        kept += members[B.nms(boxes[members], scores[members], thr)].tolist()
    s = scores.tolist()
    return sorted(kept, key=lambda i: (-s[i], i))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_nms_equals_per_class_nms(seed):
    boxes, scores = clustered_boxes(400, seed, image_size=300.0)
    boxes = boxes.double()
    idxs = torch.randint(0, 4, (400,), generator=torch.Generator().manual_seed(seed))
    keep = B.batched_nms(boxes, scores, idxs, 0.5)
    assert keep.tolist() == batched_expected(boxes, scores, idxs, 0.5)
    assert keep.tolist() == nms_reference(boxes, scores, 0.5, labels=idxs)
    # Fewer boxes are suppressed than when classes are ignored.
    assert len(keep) > len(B.nms(boxes, scores, 0.5))


# ------------------------------------------------------------------------------------------ box deltas

def encode_expected(gt: list[float], p: list[float], weights) -> list[float]:
    wx, wy, ww, wh = weights
    pw, ph = p[2] - p[0], p[3] - p[1]
    gw, gh = gt[2] - gt[0], gt[3] - gt[1]
    return [wx * ((gt[0] + gw / 2) - (p[0] + pw / 2)) / pw, wy * ((gt[1] + gh / 2) - (p[1] + ph / 2)) / ph,
            ww * math.log(gw / pw), wh * math.log(gh / ph)]


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_decode_round_trip_and_reference(weights):
    g = torch.Generator().manual_seed(3)
    props = rand_boxes(50, 11)
    props[:, 2:] += 1.0  # positive sizes
    gt = props + torch.randn(50, 4, generator=g, dtype=torch.float64) * 2
    gt[:, 2:] = torch.maximum(gt[:, 2:], gt[:, :2] + 0.5)
    deltas = B.encode_boxes(gt, props, weights)
    expected = torch.tensor([encode_expected(a, b, weights) for a, b in zip(gt.tolist(), props.tolist())],
                            dtype=torch.float64)
    torch.testing.assert_close(deltas, expected)
    torch.testing.assert_close(B.decode_boxes(deltas, props, weights), gt)
    coder = B.BoxCoder(weights)
    torch.testing.assert_close(coder.decode(coder.encode(gt, props), props), gt)
    # Class-specific deltas [N, 4 * C]: each group of four decodes independently.
    multi = torch.cat([deltas, torch.zeros_like(deltas)], dim=1)
    out = coder.decode(multi, props)
    assert out.shape == (50, 8)
    torch.testing.assert_close(out[:, :4], gt)
    torch.testing.assert_close(out[:, 4:], props)  # zero deltas give the boxes back
    assert coder.decode(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0, 4)
    assert B.encode_boxes(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0, 4)


def test_decode_clamps_log_size():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 4.0]])
    out = B.decode_boxes(torch.tensor([[0.0, 0.0, 50.0, 50.0]]), boxes)
    w, h = (out[0, 2] - out[0, 0]).item(), (out[0, 3] - out[0, 1]).item()
    assert w == pytest.approx(2 * 1000 / 16) and h == pytest.approx(4 * 1000 / 16)
    assert torch.isfinite(out).all()


# -------------------------------------------------------------------------------------------- RoIAlign

def _bilinear(v: list[list[float]], h: int, w: int, y: float, x: float) -> float:
    """torchvision's bilinear_interpolate, written out."""
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return 0.0
    y, x = max(y, 0.0), max(x, 0.0)
    y_lo, x_lo = int(y), int(x)
    if y_lo >= h - 1:
        y_lo = y_hi = h - 1
        y = float(y_lo)
    else:
        y_hi = y_lo + 1
    if x_lo >= w - 1:
        x_lo = x_hi = w - 1
        x = float(x_lo)
    else:
        x_hi = x_lo + 1
    ly, lx = y - y_lo, x - x_lo
    hy, hx = 1.0 - ly, 1.0 - lx
    return hy * hx * v[y_lo][x_lo] + hy * lx * v[y_lo][x_hi] + ly * hx * v[y_hi][x_lo] + ly * lx * v[y_hi][x_hi]


def roi_align_expected(inp, rois, output_size, spatial_scale, sampling_ratio, aligned) -> torch.Tensor:
    """torchvision's CPU roi_align kernel as plain loops over RoIs, channels, bins and samples."""
    data = inp.tolist()
    _, c, h, w = inp.shape
    ph_n, pw_n = output_size
    out = torch.zeros(len(rois), c, ph_n, pw_n, dtype=torch.float64)
    off = 0.5 if aligned else 0.0
    for k, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        sw, sh = x1 * spatial_scale - off, y1 * spatial_scale - off
        rw, rh = x2 * spatial_scale - off - sw, y2 * spatial_scale - off - sh
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / ph_n, rw / pw_n
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(rh / ph_n)
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(rw / pw_n)
        count = max(gh * gw, 1)
        for ch in range(c):
            for ph in range(ph_n):
                for pw in range(pw_n):
                    acc = 0.0
                    for iy in range(gh):
                        y = sh + ph * bh + (iy + 0.5) * bh / gh
                        for ix in range(gw):
                            x = sw + pw * bw + (ix + 0.5) * bw / gw
                            acc += _bilinear(data[int(b)][ch], h, w, y, x)
                    out[k, ch, ph, pw] = acc / count
    return out


def _rois(seed: int, n_img: int, h: int, w: int, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = 7
    x1 = torch.rand(k, generator=g, dtype=torch.float64) * (w / scale) * 1.1 - 2
    y1 = torch.rand(k, generator=g, dtype=torch.float64) * (h / scale) * 1.1 - 2
    bw = torch.rand(k, generator=g, dtype=torch.float64) * (w / scale) * 0.8
    bh = torch.rand(k, generator=g, dtype=torch.float64) * (h / scale) * 0.8
    batch = torch.randint(0, n_img, (k,), generator=g).double()
    rois = torch.stack([batch, x1, y1, x1 + bw, y1 + bh], dim=1)
    extra = torch.tensor([[0, 1.0, 1.0, 1.3, 1.2],     # smaller than a cell
                          [1, 3.0, 3.0, 3.0, 3.0],     # zero size
                          [0, 6.0, 5.0, 2.0, 1.0],     # inverted
                          [1, -10.0, -10.0, 100.0, 100.0]], dtype=torch.float64)  # beyond the map
    return torch.cat([rois, extra])


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.5])
def test_roi_align_matches_reference(aligned, sampling_ratio, spatial_scale):
    g = torch.Generator().manual_seed(int(aligned) + 2 * sampling_ratio)
    inp = torch.randn(2, 3, 9, 11, generator=g, dtype=torch.float64)
    rois = _rois(int(aligned) + 3, 2, 9, 11, spatial_scale)
    expected = roi_align_expected(inp, rois, (3, 2), spatial_scale, sampling_ratio, aligned)
    for method in ("gather", "dense", "auto"):
        got = B.roi_align(inp, rois, (3, 2), spatial_scale, sampling_ratio, aligned, _method=method)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    got32 = B.roi_align(inp.float(), rois.float(), (3, 2), spatial_scale, sampling_ratio, aligned)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), expected, rtol=0, atol=1e-5)


def test_roi_align_box_list_module_and_empty():
    inp = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    per_image = [torch.tensor([[0.0, 0.0, 6.0, 5.0], [1.0, 2.0, 7.5, 7.0]]), torch.tensor([[2.0, 1.0, 4.0, 8.0]])]
    rois = torch.tensor([[0, 0.0, 0.0, 6.0, 5.0], [0, 1.0, 2.0, 7.5, 7.0], [1, 2.0, 1.0, 4.0, 8.0]])
    a = B.roi_align(inp, per_image, 4, 1.0, 2, True)
    torch.testing.assert_close(a, B.roi_align(inp, rois, (4, 4), 1.0, 2, True))
    assert B.roi_align(inp, torch.zeros(0, 5), (3, 2)).shape == (0, 4, 3, 2)
    assert B.roi_align(inp, [torch.zeros(0, 4), torch.zeros(0, 4)], 2).shape == (0, 4, 2, 2)


def test_roi_align_on_a_ramp_gives_bin_centres():
    # Feature value = x index; with aligned=True a box coordinate u is the feature coordinate u - 0.5, and
    # bilinear interpolation of a linear ramp is exact, so each bin averages to its centre minus 0.5.
    ramp = torch.arange(12, dtype=torch.float64).expand(1, 1, 10, 12).clone()
    out = B.roi_align(ramp, torch.tensor([[0, 2.0, 2.0, 8.0, 8.0]], dtype=torch.float64), 3, aligned=True)
    torch.testing.assert_close(out[0, 0], torch.tensor([[2.5, 4.5, 6.5]] * 3, dtype=torch.float64))


@pytest.mark.parametrize("method", ["gather", "dense"])
@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_gradcheck(method, aligned):
    inp = torch.randn(2, 2, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    rois = torch.tensor([[0, 0.5, 0.2, 4.6, 3.9], [1, 1.0, 1.5, 5.5, 4.5], [1, -1.0, 2.0, 3.0, 6.0]],
                        dtype=torch.float64)
    fn = lambda x: B.roi_align(x, rois, (2, 3), 1.0, -1, aligned, _method=method)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (inp,), eps=1e-6, atol=1e-5)
