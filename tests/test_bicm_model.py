"""BiCM's modules (refground.methods.bicm.model / .modules) and the box ops they read
(refground.boxes.box_map_mean / box_pixel_windows), each against a slow, obviously-correct reference:
mask-and-mean loops for eq. 9, per-row Python for the box rules, eqs. 8/10/11 by hand, a hand softmax
cross-entropy for KAM's loss, and QAM's gradient weighting (eqs. 3-5) recomputed per text with
``torch.autograd`` on a tiny random CLIP. The map machinery itself (attention, gradient, upsampling, P_t's
connected component) is covered by tests/test_clip_attention.py; here: what BiCM adds on top of it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hf_tiny import make_tiny_clip

from refground.boxes import box_map_mean, box_pixel_windows
from refground.errors import UsageError
from refground.features.clip_attention import box_from_map
from refground.methods.bicm import model as M
from refground.methods.bicm.modules import ClipInputs, class_embeddings, image_modules

pytestmark = pytest.mark.usefixtures("torch_one_thread")


# ------------------------------------------------------------------------------- eq. 9: box means


def _pixels_ref(box, size: tuple[int, int]) -> tuple[list[int], list[int]]:
    """Rows and columns of the pixels whose centre (c + 0.5, r + 0.5) lies in [x1, x2) x [y1, y2), clipped to
    the image; an axis with none gets the pixel holding the box's centre on it (clamped into the image)."""
    hh, ww = size
    x1, y1, x2, y2 = (float(v) for v in box)
    cols = [c for c in range(ww) if x1 <= c + 0.5 < x2]
    rows = [r for r in range(hh) if y1 <= r + 0.5 < y2]
    if not cols:
        cols = [min(max(math.floor((x1 + x2) / 2), 0), ww - 1)]
    if not rows:
        rows = [min(max(math.floor((y1 + y2) / 2), 0), hh - 1)]
    return rows, cols


def _map_mean_ref(value_map: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """eq. 9 as written: an explicit mask per box, the mean of the map under it."""
    m = value_map.double().numpy()
    out = []
    for b in boxes.tolist():
        rows, cols = _pixels_ref(b, m.shape)
        mask = np.zeros(m.shape, bool)
        mask[np.ix_(rows, cols)] = True
        out.append(m[mask].mean())
    return torch.tensor(out, dtype=torch.float64)


def _random_boxes(g: torch.Generator, n: int, hh: int, ww: int) -> torch.Tensor:
    """Fractional boxes of every kind: inside, across the borders, degenerate (zero width or height, or
    between two pixel centres), inverted, wholly outside, larger than the image."""
    xy = torch.rand(n, 2, generator=g) * torch.tensor([ww * 1.4, hh * 1.4]) - torch.tensor([ww * 0.2, hh * 0.2])
    wh = torch.rand(n, 2, generator=g) * torch.tensor([ww * 0.8, hh * 0.8])
    boxes = torch.cat([xy, xy + wh], 1)
    k = n // 8
    boxes[:k, 2] = boxes[:k, 0]  # zero width
    boxes[k:2 * k, 3] = boxes[k:2 * k, 1]  # zero height
    boxes[2 * k:3 * k, 2:] = boxes[2 * k:3 * k, :2] + 0.3  # smaller than a pixel
    boxes[3 * k:4 * k] = boxes[3 * k:4 * k, [2, 3, 0, 1]]  # inverted
    boxes[4 * k] = torch.tensor([ww + 3.0, hh + 1.0, ww + 9.0, hh + 5.0])  # outside, below right
    boxes[4 * k + 1] = torch.tensor([-9.0, -7.0, -2.0, -1.0])  # outside, above left
    boxes[4 * k + 2] = torch.tensor([-50.0, -50.0, ww + 50.0, hh + 50.0])  # the whole image and more
    boxes[4 * k + 3] = torch.tensor([2.5, 1.5, 5.5, 4.5])  # edges on pixel centres: [x1, x2) half-open
    return boxes


def test_box_map_mean_against_masks():
    g = torch.Generator().manual_seed(0)
    for hh, ww in ((13, 17), (32, 32), (5, 40)):
        value_map = torch.randn(hh, ww, generator=g)
        boxes = _random_boxes(g, 96, hh, ww)
        got = box_map_mean(value_map, boxes)
        assert got.dtype == torch.float64 and got.shape == (96,)
        torch.testing.assert_close(got, _map_mean_ref(value_map, boxes), atol=1e-12, rtol=1e-12)
    # A float32 map of a real map's scale: the float64 summed-area table keeps its means to ~1e-12 (a float32
    # table's cumulative sums would be off by ~1e-7 of the mean, as large as the map's fine differences).
    value_map = 5e-3 + torch.rand(256, 256, generator=g) * 1e-6
    boxes = _random_boxes(g, 40, 256, 256)
    torch.testing.assert_close(box_map_mean(value_map, boxes), _map_mean_ref(value_map, boxes), atol=0, rtol=1e-10)
    assert box_map_mean(value_map, torch.zeros(0, 4)).shape == (0,)
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        box_map_mean(torch.zeros(1, 4, 4), boxes)


def test_box_pixel_windows_edge_cases():
    size = (10, 20)  # H, W
    cases = {
        (0.0, 0.0, 20.0, 10.0): [0, 0, 20, 10],      # the image
        (2.5, 1.5, 5.5, 4.5): [2, 1, 5, 4],          # a centre on x1 is in, on x2 is out
        (2.6, 1.4, 5.6, 4.4): [3, 1, 6, 4],
        (-5.0, -3.0, 3.0, 2.0): [0, 0, 3, 2],        # clipped at the top left
        (15.0, 8.0, 90.0, 70.0): [15, 8, 20, 10],    # clipped at the bottom right
        (3.2, 1.0, 3.4, 5.0): [3, 1, 4, 5],          # no column centre inside: the column of its centre
        (0.0, 5.0, 10.0, 5.0): [0, 5, 10, 6],        # zero height: one row, its columns kept
        (1.6, 1.6, 2.4, 2.4): [2, 2, 3, 3],          # between four centres: the pixel holding its centre
        (25.0, 12.0, 30.0, 15.0): [19, 9, 20, 10],   # wholly outside: the nearest corner pixel
        (-10.0, -10.0, -5.0, -5.0): [0, 0, 1, 1],
        (5.0, 5.0, 2.0, 2.0): [3, 3, 4, 4],          # inverted: the pixel of its centre
    }
    boxes = torch.tensor(list(cases))
    got = box_pixel_windows(boxes, size)
    assert got.dtype == torch.int64
    assert got.tolist() == list(cases.values())
    for box, win in zip(cases, got.tolist()):  # the same as the slow per-pixel rule
        rows, cols = _pixels_ref(box, size)
        assert win == [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]
    # Integer boxes are read as pixel edges; an empty set of boxes is empty.
    assert box_pixel_windows(torch.tensor([[1, 2, 4, 6]]), size).tolist() == [[1, 2, 4, 6]]
    assert box_pixel_windows(torch.zeros(0, 4), size).shape == (0, 4)
    with pytest.raises(ValueError):
        box_pixel_windows(torch.zeros(4), size)


# ------------------------------------------------------------------------------- Sec. 4.1: box rules


def _choose_ref(scores: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor, rule: str) -> torch.Tensor:
    """One row at a time, in Python: the top valid box; the valid boxes strictly above the mean valid score
    (the top one when none is); the largest of them (first on ties) or their union."""
    out = []
    for q in range(len(scores)):
        idx = [i for i in range(scores.shape[1]) if bool(valid[q, i])]
        s = [float(scores[q, i]) for i in idx]
        top = idx[s.index(max(s))]
        if rule == "argmax":
            out.append(boxes[q, top].tolist())
            continue
        mean = sum(s) / len(s)
        above = [i for i in idx if float(scores[q, i]) > mean] or [top]
        if rule == "largest":
            areas = [max(float(boxes[q, i, 2] - boxes[q, i, 0]), 0.0) * max(float(boxes[q, i, 3] - boxes[q, i, 1]), 0.0)
                     for i in above]
            out.append(boxes[q, above[areas.index(max(areas))]].tolist())
        else:
            b = boxes[q, above]
            out.append([float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max())])
    return torch.tensor(out)


@pytest.mark.parametrize("rule", M.BOX_RULES)
def test_choose_boxes_against_per_row_python(rule):
    g = torch.Generator().manual_seed(3)
    q, n = 300, 9
    # Scores in quarters and integer corners: many ties of score (also with the mean) and of area.
    scores = torch.randint(0, 6, (q, n), generator=g).float() / 4
    xy = torch.randint(0, 20, (q, n, 2), generator=g).float()
    boxes = torch.cat([xy, xy + torch.randint(0, 6, (q, n, 2), generator=g).float()], -1)
    valid = torch.rand(q, n, generator=g) < 0.7
    valid[torch.arange(q), torch.randint(0, n, (q,), generator=g)] = True
    valid[0] = False
    valid[0, 4] = True  # a row of one candidate
    scores[1], valid[1] = 1.0, True  # a row whose scores are all equal
    # Padding holds garbage that must not count: NaN boxes, NaN / huge scores.
    scores = scores.masked_fill(~valid, float("nan"))
    scores[~valid & (torch.rand(q, n, generator=g) < 0.5)] = 1e9
    boxes = boxes.masked_fill(~valid[..., None], float("nan"))
    got = M.choose_boxes(scores, boxes, valid, rule)
    assert got.shape == (q, 4)
    torch.testing.assert_close(got, _choose_ref(scores, boxes, valid, rule), atol=0, rtol=0)
    assert got[0].tolist() == boxes[0, 4].tolist()


def test_choose_boxes_ties_and_equal_scores():
    boxes = torch.tensor([[[0.0, 0, 2, 2], [0, 0, 9, 9], [5, 5, 8, 8], [1, 1, 4, 4], [0, 0, 50, 50]]])
    valid = torch.tensor([[False, True, True, True, True]])  # the first slot is padding
    # All valid scores equal: nothing is above the mean, so every rule takes the top (first valid) box, not the
    # largest or the union of all.
    equal = torch.tensor([[7.0, 1.0, 1.0, 1.0, 1.0]])
    for rule in M.BOX_RULES:
        assert M.choose_boxes(equal, boxes, valid, rule).tolist() == [[0, 0, 9, 9]]
    # Tied top scores: argmax is the first; the two tied boxes of equal area: largest is the first of them.
    tied = torch.tensor([[0.0, 0.0, 3.0, 3.0, 0.0]])
    boxes2 = boxes.clone()
    boxes2[0, 3] = torch.tensor([10.0, 10, 13, 13])  # the same area as box 2
    assert M.choose_boxes(tied, boxes2, valid, "argmax").tolist() == [[5, 5, 8, 8]]
    assert M.choose_boxes(tied, boxes2, valid, "largest").tolist() == [[5, 5, 8, 8]]
    assert M.choose_boxes(tied, boxes2, valid, "union").tolist() == [[5, 5, 13, 13]]
    # largest: the biggest above-mean box, even when it is not the top one; one at the mean is not above it.
    s = torch.tensor([[0.0, 3.0, 1.0, 2.0, 1.99]])  # mean of the valid 2.0: box 3 is at it, box 4 below
    assert M.choose_boxes(s, boxes, valid, "largest").tolist() == [[0, 0, 9, 9]]
    s = torch.tensor([[0.0, 2.0, 0.0, 3.0, 2.5]])  # mean 1.875: boxes 1, 3, 4 above; 4 is the largest
    assert M.choose_boxes(s, boxes, valid, "largest").tolist() == [[0, 0, 50, 50]]
    assert M.choose_boxes(s, boxes, valid, "argmax").tolist() == [[1, 1, 4, 4]]
    with pytest.raises(UsageError, match="box rule"):
        M.choose_boxes(s, boxes, valid, "biggest")
    with pytest.raises(UsageError, match="no candidate"):
        M.choose_boxes(s, boxes, torch.zeros(1, 5, dtype=torch.bool), "argmax")


# ------------------------------------------------------------------------------- eqs. 8, 10, 11; config


def _expected_score(cfg: M.BiCMConfig, s_pq, s_cq, s_td, s_kam):
    bu = {"both": s_pq + s_cq, "class": s_cq, "visual": s_pq, "none": torch.zeros_like(s_pq)}[cfg.com]  # eq. 8
    out = bu + (cfg.lambda_t * s_td if cfg.sf else 0)  # eq. 10
    return out + (cfg.lambda_k * s_kam if cfg.kam else 0)  # eq. 11


def test_fused_score_follows_the_switches():
    g = torch.Generator().manual_seed(4)
    s_pq, s_cq, s_td, s_kam = (torch.randn(3, 6, generator=g) for _ in range(4))
    for com in M.COM_INFO:
        got = M.bottom_up(s_pq, s_cq, com)
        want = {"both": s_pq + s_cq, "class": s_cq, "visual": s_pq, "none": torch.zeros_like(s_pq)}[com]
        assert torch.equal(got, want)
    # The inputs are never modified in place (bottom_up returns a new tensor even for one source).
    M.bottom_up(s_pq, s_cq, "class").add_(1)
    assert torch.equal(s_cq, s_cq.clone())
    configs = [M.variant_config(v) for v in M.VARIANT_MODULES]
    configs += [M.variant_config("bicm", lambda_t=3.0, lambda_k=0.25), M.variant_config("qam-com-sf", lambda_t=-2.0),
                M.BiCMConfig(qam="none", com="class", sf=False, kam=False)]
    for cfg in configs:
        got = M.fused_score(s_pq, s_cq, s_td, cfg, s_kam if cfg.kam else None)
        torch.testing.assert_close(got, _expected_score(cfg, s_pq, s_cq, s_td, s_kam))
        # S^TD counts only with SF; S^KAM only with KAM (given to a config without it, it is ignored).
        moved = M.fused_score(s_pq, s_cq, s_td + 1, cfg, s_kam if cfg.kam else None)
        assert torch.allclose(moved - got, torch.full_like(got, cfg.lambda_t if cfg.sf else 0.0), atol=1e-5)
        if not cfg.kam:
            assert torch.equal(M.fused_score(s_pq, s_cq, s_td, cfg, s_kam), got)
    with pytest.raises(UsageError, match="KAM"):
        M.fused_score(s_pq, s_cq, s_td, M.variant_config("bicm"))
    # The paper's weights: lambda_t 1000, lambda_k 1 (Sec. 4.1).
    cfg = M.BiCMConfig()
    assert (cfg.lambda_t, cfg.lambda_k, cfg.thr_a, cfg.thr_k, cfg.epochs, cfg.lr) == (1000.0, 1.0, 0.7, 0.9, 50, 1e-4)


@pytest.mark.parametrize("fields, match", [
    ({"qam": "grad"}, "qam"), ({"com": "text"}, "com"),
    ({"qam": "none", "com": "none", "sf": False, "kam": False}, "QAM or COM"),
    ({"qam": "none"}, "SF"), ({"com": "none"}, "SF"), ({"qam": "none", "kam": False}, "SF"),
    ({"sf": False}, "KAM"), ({"thr_a": 0.0}, "thr_a"), ({"thr_a": 1.5}, "thr_a"),
    ({"top_n": 0}, "top_n"), ({"hidden": 0}, "hidden"), ({"epochs": 0}, "epochs"),
    ({"batch_size": 1}, "batch_size"), ({"lr": 0.0}, "lr"),
])
def test_config_refuses_inconsistent_switches(fields, match):
    with pytest.raises(UsageError, match=match):
        M.BiCMConfig(**fields)


@pytest.mark.parametrize("fraction", [1.0, 1.5, -0.1])
def test_config_refuses_a_held_out_fraction_outside_0_1(fraction):
    with pytest.raises(UsageError, match="kam_val_fraction"):
        M.BiCMConfig(kam_val_fraction=fraction)


def test_config_round_trip_and_unknown_fields():
    cfg = M.variant_config("va-com-sf", thr_a=0.5, top_n=7)
    assert M.BiCMConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(UsageError, match="unknown BiCM config field.*lambda_x"):
        M.BiCMConfig.from_dict({**cfg.to_dict(), "lambda_x": 1})
    assert M.BiCMConfig(kam_val_fraction=0.0).kam_val_fraction == 0.0  # no held-out labels is allowed


def test_variant_config_for_every_variant():
    from refground.methods import bicm as registry

    assert registry.VARIANTS == M.VARIANTS and registry.BOX_RULES == M.BOX_RULES  # the lazy copies agree
    assert set(M.VARIANTS) == set(M.VARIANT_MODULES) | {M.CLASS_NAME}
    # Table 4: QAM, COM, QAM+COM, +SF, +KAM; Table 5: VA maps; Table 6: COM's information.
    table = {"qam": ("qa", "none", False, False), "com": ("none", "both", False, False),
             "com-class": ("none", "class", False, False), "com-visual": ("none", "visual", False, False),
             "qam-com": ("qa", "both", False, False), "va-com": ("va", "both", False, False),
             "qam-com-sf": ("qa", "both", True, False), "va-com-sf": ("va", "both", True, False),
             "bicm": ("qa", "both", True, True)}
    assert set(table) == set(M.VARIANT_MODULES)
    for name, switches in table.items():
        cfg = M.variant_config(name)
        assert (cfg.qam, cfg.com, cfg.sf, cfg.kam) == switches, name
        assert (name in M.TRAINED) == cfg.kam
        rest = {k: v for k, v in cfg.to_dict().items() if k not in ("qam", "com", "sf", "kam")}
        assert rest == {k: v for k, v in M.BiCMConfig().to_dict().items() if k not in ("qam", "com", "sf", "kam")}
        assert M.variant_config(name, thr_a=0.4, hidden=12).to_dict() == {**cfg.to_dict(), "thr_a": 0.4,
                                                                        "hidden": 12}
    with pytest.raises(UsageError, match="class-name"):  # the baseline is no config
        M.variant_config(M.CLASS_NAME)
    with pytest.raises(UsageError, match="--variant 'nope'"):
        M.variant_config("nope")
    with pytest.raises(UsageError, match="SF"):  # an override that contradicts the row
        M.variant_config("com", sf=True)


# ------------------------------------------------------------------------------------------------ KAM


def test_kam_mlp_shape_range_and_layers():
    torch.manual_seed(0)
    e, hidden, m = 6, 5, 11
    kam = M.KnowledgeAdaptation(e, hidden)
    g = torch.Generator().manual_seed(1)
    fi, fp, fc, fq = (torch.randn(m, e, generator=g) for _ in range(4))
    logits = kam(fi, fp, fc, fq)
    assert logits.shape == (m,)
    s = kam.score(fi, fp, fc, fq)
    assert s.shape == (m,) and bool(((s > 0) & (s < 1)).all())
    torch.testing.assert_close(s, torch.sigmoid(logits))
    # Fig. 3 by hand (eval mode: batch norm with its running statistics): FC+BN+ReLU, FC+BN+ReLU, FC.
    with torch.no_grad():
        for bn in (kam.fuse[1], kam.transform[1]):
            bn.running_mean.normal_(generator=g)
            bn.running_var.uniform_(0.5, 2.0, generator=g)
            bn.weight.normal_(generator=g)
            bn.bias.normal_(generator=g)
    kam.eval()

    def layer(x, lin, bn):
        y = x @ lin.weight.T + lin.bias
        return torch.relu((y - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias)

    x = torch.cat([fi, fp, fc, fq], 1)  # the order of the paper's inputs: f_i, f_p, f_c, f_q
    h = layer(layer(x, kam.fuse[0], kam.fuse[1]), kam.transform[0], kam.transform[1])
    want = (h @ kam.out.weight.T + kam.out.bias)[:, 0]
    with torch.no_grad():
        torch.testing.assert_close(kam(fi, fp, fc, fq), want, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(kam(fq, fp, fc, fi), want)  # the inputs are not interchangeable
        assert bool(((kam.score(fi, fp, fc, fq) > 0) & (kam.score(fi, fp, fc, fq) < 1)).all())


def test_kam_loss_is_a_masked_softmax_cross_entropy():
    g = torch.Generator().manual_seed(2)
    b, n = 7, 6
    logits = torch.randn(b, n, generator=g) * 3
    valid = torch.rand(b, n, generator=g) < 0.6
    target = torch.randint(0, n, (b,), generator=g)
    valid[torch.arange(b), target] = True
    valid[0] = False
    valid[0, target[0]] = True  # one candidate: its loss is 0
    ref = []
    for r in range(b):
        lv = [float(logits[r, i]) for i in range(n) if valid[r, i]]
        ref.append(-(float(logits[r, target[r]]) - math.log(sum(math.exp(v) for v in lv))))
    want = torch.tensor(sum(ref) / b)
    x = logits.clone().requires_grad_(True)
    got = M.kam_loss(x, valid, target)
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)
    assert abs(ref[0]) < 1e-6
    # Padding is masked: any value there (huge, NaN) gives the same loss and no gradient.
    other = logits.masked_fill(~valid, 1e4)
    other[~valid & (torch.rand(b, n, generator=g) < 0.5)] = float("nan")
    torch.testing.assert_close(M.kam_loss(other, valid, target), got.detach())
    got.backward()
    assert torch.equal(x.grad[~valid], torch.zeros(int((~valid).sum())))
    assert bool((x.grad[valid].abs() > 0).any())


# ------------------------------------------------------------------------------ QAM + COM + SF on an image


@pytest.fixture(scope="module")
def clip_inputs(tmp_path_factory) -> ClipInputs:
    """A tiny random CLIP (eager attention, 2 vision layers of 4 heads, a 4x4 patch grid), random cached crop
    embeddings of 30 proposals and the CLIP text embeddings of three class names."""
    from refground.features.hf import HFClip

    folder = make_tiny_clip(tmp_path_factory.mktemp("bicm") / "clip",
                            vision_config={"num_hidden_layers": 2, "num_attention_heads": 4})
    clip = HFClip(folder, batch_size=4)
    rng = np.random.default_rng(0)
    crops = rng.standard_normal((30, clip.embed_dim)).astype(np.float16)
    return ClipInputs(clip, crops, np.zeros((1, clip.embed_dim), np.float16),
                      class_embeddings(clip, ["red circle", "blue square", "cat"]), {"context": 0.1, "square": True})


def _window_map(grid: torch.Tensor, size: tuple[int, int], window: tuple[int, int, int, int]) -> torch.Tensor:
    """The raw map at image size: the patch grid bilinearly upsampled (align_corners=False) onto the integral
    window the processor's centre crop keeps, 0 outside it."""
    x1, y1, x2, y2 = window
    out = torch.zeros(size, dtype=torch.float64)
    out[y1:y2, x1:x2] = F.interpolate(grid.double()[None, None], size=(y2 - y1, x2 - x1), mode="bilinear",
                                      align_corners=False)[0, 0]
    return out


def _normalised(raw: torch.Tensor, window: tuple[int, int, int, int]) -> torch.Tensor:
    x1, y1, x2, y2 = window
    out = torch.zeros_like(raw)
    inner = raw[y1:y2, x1:x2]
    lo, hi = float(inner.min()), float(inner.max())
    out[y1:y2, x1:x2] = (inner - lo) / (hi - lo) if hi > lo else 0.0
    return out


def _qam_reference(clip, image: np.ndarray, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """eqs. 1-5 for one (image, text) pair, on its own: a forward pass of the vision tower with attentions,
    S^IQ with the text alone, alpha = d S^IQ / d att by autograd, mean over heads of att * ReLU(alpha), and
    the vanilla mean over heads of att. Returns both maps on the 4x4 grid."""
    model = clip.model
    with torch.no_grad():
        t = model.get_text_features(**clip.tokens([text]))
    t = F.normalize((t if isinstance(t, torch.Tensor) else t.pooler_output).float(), dim=-1)
    pixels = clip._pixels([image]).clone().requires_grad_(True)
    out = model.vision_model(pixel_values=pixels, output_attentions=True, return_dict=True)
    probs = out.attentions[-1]  # [1, heads, 17, 17]
    f = model.visual_projection(out.pooler_output)
    f = F.normalize((f if isinstance(f, torch.Tensor) else f.pooler_output).float(), dim=-1)
    sim = (f * t).sum()
    (alpha,) = torch.autograd.grad(sim, probs)
    att, alpha = probs[0, :, 0, 1:].detach(), alpha[0, :, 0, 1:]
    heads = att.shape[0]
    qa = sum(att[h] * torch.relu(alpha[h]) for h in range(heads)) / heads
    va = sum(att[h] for h in range(heads)) / heads
    return qa.view(4, 4), va.view(4, 4)


@pytest.mark.parametrize("shape, window", [((64, 64), (0, 0, 64, 64)), ((96, 64), (0, 16, 64, 80))])
def test_image_modules_against_autograd_per_text(clip_inputs, shape, window):
    from refground.features.extract import clip_crops

    clip = clip_inputs.clip
    rng = np.random.default_rng(shape[0])
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    texts = ["the red cat", "a blue dog left of the ball", "person"]
    fq = clip.embed_texts(texts)
    g = torch.Generator().manual_seed(shape[0])
    boxes = _random_boxes(g, 24, *shape).clamp(-5, max(shape) + 5)
    boxes = torch.cat([boxes[:, :2].minimum(boxes[:, 2:]), boxes[:, :2].maximum(boxes[:, 2:])], 1)
    labels = np.arange(24) % 3
    crop_rows = rng.permutation(30)[:24]
    thr_a = 0.6
    out = image_modules(clip_inputs, image, texts, fq, boxes.numpy(), labels, crop_rows, thr_a)
    assert out["td_qa"].shape == out["s_pq"].shape == out["s_cq"].shape == (3, 24)
    fqn = F.normalize(fq, dim=-1)
    prop = F.normalize(torch.from_numpy(clip_inputs.crop_embedding[crop_rows].astype(np.float32)), dim=-1)
    torch.testing.assert_close(torch.from_numpy(out["s_pq"]), fqn @ prop.T, atol=1e-5, rtol=0)  # eq. 6
    fc = F.normalize(clip_inputs.class_embedding, dim=-1)[labels]
    torch.testing.assert_close(torch.from_numpy(out["s_cq"]), fqn @ fc.T, atol=1e-5, rtol=0)  # eq. 7
    # P_t's class: the class of the proposal of highest S^CQ (Sec. 3.3).
    assert out["pt_class"].tolist() == labels[(fqn @ fc.T).argmax(1).numpy()].tolist()
    torch.testing.assert_close(torch.from_numpy(out["pt_cq"]), (fqn @ fc.T).max(1).values, atol=1e-5, rtol=0)
    va_seen = []
    for k, text in enumerate(texts):
        qa, va = _qam_reference(clip, image, text)
        assert float(qa.max()) > 0
        raw = _window_map(qa, shape, window)
        # S^TD (eq. 9) reads the raw map (its scale is what lambda_t = 1000 weighs), box means by masks.
        torch.testing.assert_close(torch.from_numpy(out["td_qa"][k]).double(), _map_mean_ref(raw, boxes),
                                   atol=1e-9, rtol=1e-4)
        # P_t: the normalised map (min-max over the window the model saw) thresholded at Thr_a.
        pt = box_from_map(_normalised(raw, window).float(), thr_a)
        assert out["pt_box_qa"][k].tolist() == pt.tolist()
        assert window[1] <= pt[1] < pt[3] <= window[3]
        torch.testing.assert_close(float(out["pt_td_qa"][k]), float(_map_mean_ref(raw, pt[None])[0]), atol=1e-9,
                                   rtol=1e-4)
        # P_t's crop through the CLIP, its S^PQ.
        feat = F.normalize(clip.embed_images(clip_crops(image, pt[None].numpy(), 0.1, True)), dim=-1)[0]
        torch.testing.assert_close(torch.from_numpy(out["pt_feat_qa"][k]), feat, atol=1e-5, rtol=0)
        torch.testing.assert_close(float(out["pt_pq_qa"][k]), float(fqn[k] @ feat), atol=1e-5, rtol=0)
        # The vanilla map (Table 5) is the head mean of att alone: the same for every text.
        va_raw = _window_map(va, shape, window)
        torch.testing.assert_close(torch.from_numpy(out["td_va"][k]).double(), _map_mean_ref(va_raw, boxes),
                                   atol=1e-9, rtol=1e-4)
        va_seen.append(box_from_map(_normalised(va_raw, window).float(), thr_a).tolist())
    assert all(v == va_seen[0] for v in va_seen) and out["pt_box_va"].tolist() == va_seen
    assert not np.allclose(out["td_qa"][0], out["td_qa"][1])  # the query changes the map
    assert all(p.grad is None for p in clip.model.parameters())


def _fake_attention(monkeypatch, grids: list[torch.Tensor], heads: int = 2):
    """Replace the CLIP's attention and gradient (eqs. 1 and 3) with crafted ones whose query-aware map
    (eqs. 4-5) is ``grids[t]`` for text t: head 0 attends with weight 1 and a gradient of 2 * grid, every other
    head attends with weight 3 and a negative gradient (ReLU removes it, and the mean still divides by all
    heads: (1 * 2 * grid + 0) / 2 = grid for two heads). The vanilla map is then the constant (1 + 3) / 2."""
    from refground.features import clip_attention as CA

    def fake(model, pixel_values, input_ids, attention_mask=None):
        assert len(input_ids) == len(grids)
        u = grids[0].numel()
        att = torch.full((heads, u), 3.0)
        att[0] = 1.0
        grad = torch.full((len(grids), heads, u), -7.0)
        grad[:, 0] = torch.stack([heads * g.flatten() for g in grids])
        return att, grad, torch.zeros(len(grids))

    monkeypatch.setattr(CA, "cls_attention_and_grad_texts", fake)


def test_p_t_and_s_td_on_crafted_maps(clip_inputs, monkeypatch):
    clip = clip_inputs.clip
    image = np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # 16 pixels per patch
    v = 0.004  # the raw scale of a real map (a [CLS] attention of ~1/U times a small gradient)
    blob = torch.zeros(4, 4)
    blob[1:3, 1:3] = v
    two = torch.zeros(4, 4)
    two[0, 0], two[3, 3] = v, 0.9 * v  # two blobs, both above Thr_a after normalisation
    flat = torch.full((4, 4), v)
    texts = ["a", "b", "c"]
    _fake_attention(monkeypatch, [blob, two, flat])
    boxes = np.array([[24, 24, 40, 40], [0, 0, 64, 64], [0, 0, 8, 8], [56, 56, 64, 64]], np.float32)
    out = image_modules(clip_inputs, image, texts, clip.embed_texts(texts), boxes, np.zeros(4, np.int64),
                        np.arange(4), 0.7)
    # The blob: bilinear weights reach 0.7 of the peak at (x + 0.5) / 16 - 0.5 = 0.7, i.e. from pixel 19 to 44.
    assert out["pt_box_qa"][0].tolist() == [19, 19, 45, 45]
    # Two blobs: only the one holding the maximum (a box over both would span the image).
    assert out["pt_box_qa"][1].tolist() == [0, 0, 13, 13]
    # S^TD is in the raw map's units: the blob's plateau (pixels 24..39 sample only its patches) is v, the
    # constant map is v everywhere; the corner boxes of the two-blob map sample only the corner patches.
    np.testing.assert_allclose(out["td_qa"][0, 0], v, rtol=1e-5)
    np.testing.assert_allclose(out["td_qa"][2], v, rtol=1e-5)
    np.testing.assert_allclose(out["pt_td_qa"][2], v, rtol=1e-5)
    np.testing.assert_allclose(out["td_qa"][1, 2:], [v, 0.9 * v], rtol=1e-5)
    raw = _window_map(blob, (64, 64), (0, 0, 64, 64))
    np.testing.assert_allclose(out["td_qa"][0], _map_mean_ref(raw, torch.from_numpy(boxes)).numpy(), rtol=1e-5)
    np.testing.assert_allclose(out["pt_td_qa"][0], float(_map_mean_ref(raw, torch.tensor([[19.0, 19, 45, 45]]))[0]),
                               rtol=1e-5)
    # The vanilla map is constant here: its P_t is the whole image and its S^TD the mean attention, 2.
    assert out["pt_box_va"].tolist() == [[0, 0, 64, 64]] * 3
    np.testing.assert_allclose(out["td_va"], 2.0, rtol=1e-6)


@pytest.mark.parametrize("shape", [(64, 64), (96, 64)])
def test_a_flat_map_gives_the_whole_image(clip_inputs, monkeypatch, shape):
    clip = clip_inputs.clip
    image = np.random.default_rng(6).integers(0, 256, (*shape, 3), dtype=np.uint8)
    _fake_attention(monkeypatch, [torch.full((4, 4), 0.004)])
    out = image_modules(clip_inputs, image, ["a"], clip.embed_texts(["a"]), np.array([[0, 0, 8, 8]], np.float32),
                        np.zeros(1, np.int64), np.arange(1), 0.7)
    # box_from_map's documented rule: a constant map normalises to zeros and its region is the whole image.
    assert out["pt_box_qa"][0].tolist() == [0, 0, shape[1], shape[0]]
