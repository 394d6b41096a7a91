"""VL-NMS (refground.methods.vlnms.model) against slow references written as plain loops (paper Sec. 3,
../shared/papers/vlnms.txt): eqs. 1-2 per box and word, eq. 4 against torch's BCE, eq. 5's sampling-after-
splitting pairs against a Python loop, eqs. 6-7, and the fused-score NMS against per-query batched_nms."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from refground.boxes import fused_nms
from refground.boxes import batched_nms, box_area, nms
from refground.errors import UsageError
from refground.methods.vlnms.model import (
    RelatednessFC,
    RelatednessTrans,
    VLNMSConfig,
    bce_loss,
    build_relatedness,
    decode_deltas,
    q_values,
    ranking_loss,
    ranking_pairs,
    regression_loss,
    regression_targets,
    spatial_vector,
    vlnms_loss,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

VOCAB = 12
TINY = dict(vocab_size=VOCAB, visual_dim=6, word_dim=5, gru_hidden=4, mlp_dim=7, attention_dim=5, trans_dim=8,
            trans_heads=2, trans_layers=2, trans_ff=12, max_words=8, dropout=0.0)


def tiny(variant: str, **kw) -> VLNMSConfig:
    return VLNMSConfig(**{**TINY, "variant": variant, **kw})


def make_model(variant: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = build_relatedness(tiny(variant, **kw))
    model.set_feature_stats(torch.randn(6) * 0.1, torch.rand(6) + 0.5)
    return model


def inputs(seed: int = 0):
    """Two queries: 3 and 2 words (T = 4), 3 and 4 valid boxes (K = 4)."""
    g = torch.Generator().manual_seed(seed)
    words = torch.tensor([[3, 4, 5, 0], [6, 7, 0, 0]])
    features = torch.randn(2, 4, 6, generator=g)
    spatial = torch.rand(2, 4, 5, generator=g)
    box_mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    return words, features, spatial, box_mask


def random_boxes(k: int, g: torch.Generator, size: float = 50.0) -> torch.Tensor:
    xy = torch.rand(k, 2, generator=g) * size
    wh = torch.rand(k, 2, generator=g) * size / 2 + 1
    return torch.cat([xy, xy + wh], dim=1)


# ----------------------------------------------------------------------------------------------------- config


def test_config_validation_and_round_trip():
    assert VLNMSConfig().regression is False and VLNMSConfig(variant="trans").regression is True
    assert VLNMSConfig(variant="trans", regression=False).regression is False
    for bad in (dict(variant="mlp"), dict(loss="hinge"), dict(variant="fc", regression=True),
                dict(trans_dim=10, trans_heads=4), dict(dropout=1.0), dict(top_h=0), dict(attention_dim=-1),
                dict(lr=0.0), dict(box_coder_weights=(1.0, 1.0, 1.0))):
        with pytest.raises(UsageError):
            VLNMSConfig(**bad)
    c = VLNMSConfig(variant="trans", loss="rank", top_h=7)
    again = VLNMSConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert again == c and again.box_coder_weights == (10.0, 10.0, 5.0, 5.0)
    with pytest.raises(UsageError, match="nonsense"):
        VLNMSConfig.from_dict({**c.to_dict(), "nonsense": 1})


def test_spatial_vector():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 200.0, 100.0]])
    v = spatial_vector(boxes, (100, 200))  # height 100, width 200
    assert torch.allclose(v, torch.tensor([[0.05, 0.2, 0.15, 0.6, 800 / 20000], [0, 0, 1, 1, 1.0]]))
    batched = spatial_vector(boxes[None].expand(3, 2, 4), torch.tensor([[100, 200]] * 3)[:, None, :])
    assert torch.allclose(batched, v.expand(3, 2, 5))
    assert torch.allclose(v[:, 4], box_area(boxes) / 20000)


# ---------------------------------------------------------------------------------------------------- modules


@pytest.mark.parametrize("variant", ["fc", "trans"])
def test_shapes_and_padding_invariance(variant):
    model = make_model(variant).eval()
    words, features, spatial, box_mask = inputs()
    with torch.no_grad():
        out = model(words, features, spatial, box_mask)
        # Two more padded boxes with garbage features and two more padded word slots.
        g = torch.Generator().manual_seed(5)
        words2 = torch.cat([words, torch.zeros(2, 2, dtype=torch.long)], dim=1)
        features2 = torch.cat([features, 1e3 * torch.randn(2, 2, 6, generator=g)], dim=1)
        features2[0, 3] = 7e2  # the padded box inside the original K as well
        spatial2 = torch.cat([spatial, torch.rand(2, 2, 5, generator=g)], dim=1)
        mask2 = torch.cat([box_mask, torch.zeros(2, 2, dtype=torch.bool)], dim=1)
        out2 = model(words2, features2, spatial2, mask2)
    assert out["logits"].shape == out["scores"].shape == (2, 4)
    assert torch.equal(out["scores"][~box_mask], torch.zeros(1))
    assert torch.allclose(out["scores"], torch.sigmoid(out["logits"]) * box_mask)
    assert torch.allclose(out2["scores"][:, :4][box_mask], out["scores"][box_mask], atol=1e-5)
    assert torch.allclose(out2["logits"][:, :4][box_mask], out["logits"][box_mask], atol=1e-5)
    if variant == "fc":
        att = out["attention"]
        assert att.shape == (2, 4, 4)
        assert torch.allclose(att.sum(-1), box_mask.float(), atol=1e-6)
        assert torch.equal(att[0, :, 3], torch.zeros(4)) and torch.equal(att[1, :, 2:], torch.zeros(4, 2))
        assert torch.allclose(out2["attention"][:, :4, :4], att, atol=1e-5)
        assert "deltas" not in out
    else:
        assert out["deltas"].shape == (2, 4, 4)
        assert torch.equal(out["deltas"][0, 3], torch.zeros(4))
        assert torch.allclose(out2["deltas"][:, :4][box_mask], out["deltas"][box_mask], atol=1e-5)
        assert "deltas" not in make_model("trans", regression=False).eval()(*inputs())


@pytest.mark.parametrize("attention_dim", [0, 5])
def test_fc_matches_per_box_per_word_loop(attention_dim):
    """Eqs. 1-2 with explicit concatenations, one box and one word at a time."""
    model: RelatednessFC = make_model("fc", attention_dim=attention_dim).eval()
    words, features, spatial, box_mask = inputs(1)
    box_half = torch.randn(features.shape[-1])  # u_v . v^a_i for some box-dependent v^a_i
    with torch.no_grad():
        out = model(words, features, spatial, box_mask)
        w = model.text(words)
        std = model.standardise
        for b in range(2):
            n_words = int((words[b] != 0).sum())
            for i in range(4):
                if not box_mask[b, i]:
                    continue
                v = (features[b, i] - std.feature_mean) / std.feature_std
                a = []
                for j in range(n_words):
                    if attention_dim:
                        s = model.fc_u(torch.tanh(model.fc_s(torch.cat([model.mlp_a(v), w[b, j]]))))
                    else:
                        # The literal FC_s on [v^a_i; w_j] with an arbitrary box half (u_v . v^a_i, v^a_i any
                        # box-dependent vector): it must cancel in the softmax over the words.
                        s = (box_half * v).sum() + model.fc_s(w[b, j])
                    a.append(s.reshape(-1)[0])
                alpha = torch.softmax(torch.stack(a), 0)                                     # eq. 1
                q = sum(alpha[j] * w[b, j] for j in range(n_words))
                m = model.mlp_b(v) * q
                m = m / m.norm()                                                             # eq. 2
                r = model.fc_r(m)[0]
                assert torch.allclose(out["logits"][b, i], r, atol=1e-5)
                assert torch.allclose(out["scores"][b, i], torch.sigmoid(r), atol=1e-6)
                assert torch.allclose(out["attention"][b, i, :n_words], alpha, atol=1e-6)
    att = out["attention"][1]
    if attention_dim == 0:
        # Eq. 1 read literally: the softmax over words cancels the box term, every box attends alike.
        assert torch.allclose(att, att[0].expand_as(att), atol=1e-6)
    else:
        assert not torch.allclose(att, att[0].expand_as(att), atol=1e-4)


def test_trans_text_tokens():
    model: RelatednessTrans = make_model("trans")
    ids = model.text_ids(torch.tensor([[3, 4, 5, 0], [6, 0, 0, 0], [0, 0, 0, 0]]))
    cls, sep = VOCAB, VOCAB + 1
    assert ids.tolist() == [[cls, 3, 4, 5, sep, 0], [cls, 6, sep, 0, 0, 0], [cls, sep, 0, 0, 0, 0]]
    with pytest.raises(ValueError, match="max_words"):
        model.text_ids(torch.ones(1, 9, dtype=torch.long))


# ------------------------------------------------------------------------------------------------- objectives


def test_bce_loss_matches_torch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, generator=g)
    labels = (torch.rand(3, 5, generator=g) > 0.5).float()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    per_query = [F.binary_cross_entropy(torch.sigmoid(logits[b][mask[b]]), labels[b][mask[b]]) for b in range(2)]
    assert torch.allclose(bce_loss(logits, labels, mask), torch.stack(per_query).mean(), atol=1e-6)
    assert bce_loss(logits, labels, torch.zeros_like(mask)).item() == 0


def test_q_values_edges():
    rho = [0.0, 0.3, 0.5, 0.500001, 0.55, 0.6, 0.6001, 0.65, 0.7, 0.75, 0.8, 0.9, 0.95, 1.0]
    expected = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4, 5, 5]
    for dtype in (torch.float32, torch.float64):
        assert q_values(torch.tensor(rho, dtype=dtype)).tolist() == expected
    # IoUs computed as ratios (float32 rounding around the bin edges).
    assert q_values(torch.tensor([6.0]) / 10).item() == 1 and q_values(torch.tensor([0.1 + 0.5])).item() == 1
    assert q_values(torch.tensor([[0.6, 0.2]])).shape == (1, 2)


def slow_ranking_pairs(scores, rho, mask, top_h):
    """Eq. 5's pair sampling, literally."""
    def q(r):
        return math.ceil(round(max(0.0, r - 0.5) / 0.1, 6))
    out = []
    b, k = scores.shape
    for n in range(b):
        for i in range(k):
            if not (mask[n, i] and rho[n, i] > 0.5):
                continue
            qi = q(float(rho[n, i]))
            cand = [j for j in range(k) if mask[n, j] and q(float(rho[n, j])) < qi]
            cand.sort(key=lambda j: (-float(scores[n, j]), j))
            out += [(n, i, j) for j in cand[:top_h]]
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranking_pairs_match_loop(seed):
    g = torch.Generator().manual_seed(seed)
    b, k = 4, 9
    scores = torch.round(torch.rand(b, k, generator=g) * 8) / 8  # many ties
    rho = torch.rand(b, k, generator=g)
    rho[0, :3] = torch.tensor([0.6, 0.7, 1.0])  # exact bin edges
    mask = torch.rand(b, k, generator=g) > 0.2
    mask[3] = False  # a query without boxes
    for top_h in (1, 2, 3, 100):
        qi, pi, ni = ranking_pairs(scores, rho, mask, top_h)
        got = list(zip(qi.tolist(), pi.tolist(), ni.tolist()))
        want = slow_ranking_pairs(scores, rho, mask, top_h)
        assert got == want and len(want) > 0
    none = ranking_pairs(scores, torch.zeros(b, k), mask, 5)
    assert all(t.numel() == 0 for t in none)


def test_ranking_loss_from_pairs():
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(3, 6, generator=g, requires_grad=True)
    rho = torch.rand(3, 6, generator=g)
    mask = torch.rand(3, 6, generator=g) > 0.1
    pairs = slow_ranking_pairs(scores.detach(), rho, mask, 2)
    want = sum(max(0.0, float(scores.detach()[n, j] - scores.detach()[n, i]) + 0.1) for n, i, j in pairs) / len(pairs)
    loss = ranking_loss(scores, rho, mask, margin=0.1, top_h=2)
    assert abs(loss.item() - want) < 1e-6
    loss.backward()
    assert scores.grad.abs().sum() > 0
    empty = ranking_loss(scores, torch.zeros(3, 6), mask)
    assert empty.item() == 0 and empty.requires_grad


def test_regression_round_trip_and_loss():
    g = torch.Generator().manual_seed(0)
    boxes = random_boxes(12, g).view(3, 4, 4)
    gt = random_boxes(12, g).view(3, 4, 4)
    for weights in ((10.0, 10.0, 5.0, 5.0), (1.0, 1.0, 1.0, 1.0)):
        t = regression_targets(boxes, gt, weights)
        assert t.shape == (3, 4, 4)
        assert torch.allclose(decode_deltas(t, boxes, weights), gt, atol=1e-3)
    t = regression_targets(boxes, gt)
    # (10, 10, 5, 5) scales the (1, 1, 1, 1) deltas.
    assert torch.allclose(t, regression_targets(boxes, gt, (1, 1, 1, 1)) * torch.tensor([10, 10, 5, 5.0]),
                          atol=1e-5)
    deltas = torch.randn(3, 4, 4, generator=g, requires_grad=True)
    positive = torch.rand(3, 4, generator=g) > 0.5
    t_bad = t.clone()
    t_bad[~positive] = float("nan")  # non-positives may hold anything
    loss = regression_loss(deltas, t_bad, positive)
    want = sum(F.smooth_l1_loss(deltas[b, i], t[b, i], reduction="sum") for b, i in positive.nonzero().tolist())
    assert torch.allclose(loss, want / int(positive.sum()), atol=1e-6)
    loss.backward()
    assert torch.isfinite(deltas.grad).all() and deltas.grad[~positive].abs().sum() == 0
    assert regression_loss(deltas, t, torch.zeros_like(positive)).item() == 0


def test_vlnms_loss_combines():
    words, features, spatial, box_mask = inputs()
    labels = torch.tensor([[1.0, 0, 0, 0], [0, 1, 1, 0]])
    rho = torch.tensor([[0.8, 0.3, 0.1, 0.0], [0.2, 0.6, 0.9, 0.45]])
    g = torch.Generator().manual_seed(1)
    targets = torch.randn(2, 4, 4, generator=g)
    for variant, loss in (("fc", "bce"), ("fc", "rank"), ("trans", "bce"), ("trans", "rank")):
        config = tiny(variant, loss=loss, reg_weight=0.5)
        model = make_model(variant, loss=loss, reg_weight=0.5).eval()
        out = model(words, features, spatial, box_mask)
        got = vlnms_loss(out, labels, rho, targets, box_mask, config)
        cls = (bce_loss(out["logits"], labels, box_mask) if loss == "bce"
               else ranking_loss(out["scores"], rho, box_mask, 0.1, 100))
        assert torch.allclose(got["cls"], cls)
        if variant == "trans":
            reg = regression_loss(out["deltas"], targets, labels.bool() & box_mask)
            assert torch.allclose(got["loss"], cls + 0.5 * reg)
            only = labels.bool().clone()
            only[1, 2] = False  # e.g. a box matched to pseudo ground truth: no regression
            reg2 = vlnms_loss(out, labels, rho, targets, box_mask, config, reg_mask=only)["reg"]
            assert torch.allclose(reg2, regression_loss(out["deltas"], targets, only))
            with pytest.raises(ValueError):
                vlnms_loss(out, labels, rho, None, box_mask, config)
        else:
            assert "reg" not in got and torch.equal(got["loss"], cls)


@pytest.mark.parametrize("variant,loss", [("fc", "bce"), ("fc", "rank"), ("trans", "bce"), ("trans", "rank")])
def test_gradients_reach_every_parameter(variant, loss):
    model = make_model(variant, loss=loss)
    model.train()
    words, features, spatial, box_mask = inputs(2)
    rho = torch.tensor([[0.8, 0.3, 0.55, 0.0], [0.2, 0.6, 0.95, 0.45]])
    labels = (rho > 0.5).float()
    g = torch.Generator().manual_seed(2)
    targets = torch.randn(2, 4, 4, generator=g)
    out = model(words, features, spatial, box_mask)
    vlnms_loss(out, labels, rho, targets, box_mask, model.config)["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# -------------------------------------------------------------------------------------------------- fused NMS


def slow_fused_nms(boxes, confidence, relatedness, labels, thr, top_n, class_agnostic=False):
    out = torch.full((relatedness.shape[0], top_n), -1, dtype=torch.long)
    for q in range(relatedness.shape[0]):
        s = relatedness[q] * confidence
        keep = nms(boxes, s, thr) if class_agnostic else batched_nms(boxes, s, labels, thr)
        keep = keep[:top_n]
        out[q, :len(keep)] = keep
    return out


def check_fused(boxes, confidence, relatedness, labels, thr, top_n, class_agnostic=False):
    got = fused_nms(boxes, confidence, relatedness, labels, thr, top_n, class_agnostic)
    want = slow_fused_nms(boxes, confidence, relatedness, labels, thr, top_n, class_agnostic)
    assert got.dtype == torch.long and got.shape == (relatedness.shape[0], top_n)
    assert torch.equal(got, want)
    return got


def test_fused_nms_crafted():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [20, 20, 30, 30], [21, 20, 31, 30],
                          [0, 0, 10, 10], [50, 50, 50, 60]], dtype=torch.float32)  # identical boxes, a degenerate one
    confidence = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.95, 0.5, 0.99])
    labels = torch.tensor([1, 1, 2, 1, 1, 1, 1])
    relatedness = torch.tensor([[1.0, 1, 1, 1, 1, 1, 1], [0.1, 0.9, 0.5, 0.8, 0.2, 0.3, 0.0],
                                [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5], [0.0, 0, 0, 0, 0, 0, 0]])
    for thr in (0.0, 0.3, 0.5, 0.7, 1.0):
        for top_n in (0, 1, 3, 7, 12):
            for agnostic in (False, True):
                check_fused(boxes, confidence, relatedness, labels, thr, top_n, agnostic)
    got = check_fused(boxes, confidence, relatedness, labels, 0.5, 10)
    assert got[0].tolist() == [6, 4, 0, 2, -1, -1, -1, -1, -1, -1]
    one_class = torch.zeros(7, dtype=torch.long)
    check_fused(boxes, confidence, relatedness, one_class, 0.5, 10)
    same = boxes[:1].expand(5, 4).contiguous()
    got = check_fused(same, torch.full((5,), 0.5), torch.rand(3, 5), torch.zeros(5, dtype=torch.long), 0.5, 3)
    assert (got[:, 1:] == -1).all()


def test_fused_nms_empty():
    e = torch.zeros(0, 4)
    assert fused_nms(e, torch.zeros(0), torch.zeros(3, 0), torch.zeros(0, dtype=torch.long), 0.5, 4).tolist() == \
        [[-1] * 4] * 3
    boxes = torch.tensor([[0.0, 0, 1, 1]])
    assert fused_nms(boxes, torch.ones(1), torch.zeros(0, 1), torch.zeros(1, dtype=torch.long), 0.5, 4).shape == (0, 4)
    with pytest.raises(ValueError):
        fused_nms(boxes, torch.ones(1), torch.ones(2, 3), torch.zeros(1, dtype=torch.long), 0.5, 4)


@pytest.mark.parametrize("seed", range(4))
def test_fused_nms_random(seed):
    g = torch.Generator().manual_seed(seed)
    k = 40
    boxes = random_boxes(k, g, size=60.0)
    confidence = torch.rand(k, generator=g) * 0.9 + 0.1
    relatedness = torch.rand(5, k, generator=g)  # continuous: no ties in r * c
    labels = torch.randint(0, 3, (k,), generator=g)
    for thr in (0.3, 0.5, 0.7):
        for top_n in (5, 20, 50):
            check_fused(boxes, confidence, relatedness, labels, thr, top_n)
            check_fused(boxes, confidence, relatedness, labels, thr, top_n, class_agnostic=True)
    # With every relatedness 1 it is plain confidence NMS.
    ones = fused_nms(boxes, confidence, torch.ones(2, k), labels, 0.5, 50)
    plain = batched_nms(boxes, confidence, labels, 0.5)
    assert ones[0, :len(plain)].tolist() == plain.tolist() and (ones[0, len(plain):] == -1).all()
    assert torch.equal(ones[0], ones[1])


def test_fused_nms_keeps_the_related_box():
    """The point of VL-NMS: of two overlapping same-class boxes, plain NMS keeps the more confident one even
    though the query is about the other; the fused score keeps the related one."""
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [40, 40, 50, 50]])
    confidence = torch.tensor([0.9, 0.6, 0.5])
    labels = torch.tensor([0, 0, 0])
    relatedness = torch.tensor([[0.1, 0.9, 0.2]])
    plain = fused_nms(boxes, confidence, torch.ones(1, 3), labels, 0.5, 2)
    fused = fused_nms(boxes, confidence, relatedness, labels, 0.5, 2)
    assert plain[0].tolist() == [0, 2] and fused[0].tolist() == [1, 2]
