"""CMRIN (refground.methods.cmrin.model) against slow references written as plain loops, eq. by eq. (paper Sec. 3,
../shared/papers/cmrin.txt), plus end-to-end checks of every Table 2 variant and a tiny learning check."""

from __future__ import annotations

import math

import pytest
import torch

from refground.boxes import spatial_feature
from refground.errors import UsageError
from refground.methods.cmrin.model import (
    CMRIN,
    NUM_EDGE_TYPES,
    VARIANTS,
    CMRINConfig,
    CrossModalRelationshipExtractor,
    GatedGraphConv,
    triplet_loss,
    variant_config,
)

VOCAB = 10
TINY = dict(vocab_size=VOCAB, visual_dim=6, embed_dim=8, hidden_dim=8, type_dim=8, edge_type_dim=8,
            attention_dim=8, graph_dim=8, spatial_dim=4, match_dim=8, dropout=0.0)  # deterministic forwards


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: torch's intra-op threads on a shared 2-core machine cost more than the ops. One thread
    for this module only; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------------------
# random inputs


def random_relations(gen: torch.Generator, counts: list[int], k: int, density: float = 0.6) -> torch.Tensor:
    """LongTensor[B, k, k]: labels 0..11 among each item's first counts[b] vertices, 0 on the diagonal and at
    padded rows / columns."""
    rel = torch.zeros(len(counts), k, k, dtype=torch.long)
    for b, n in enumerate(counts):
        lab = torch.randint(1, NUM_EDGE_TYPES + 1, (n, n), generator=gen)
        keep = torch.rand(n, n, generator=gen, dtype=torch.float64) < density
        lab = lab * keep
        lab.fill_diagonal_(0)
        rel[b, :n, :n] = lab
    return rel


def random_words(gen: torch.Generator, lengths: list[int], t: int) -> torch.Tensor:
    words = torch.zeros(len(lengths), t, dtype=torch.long)
    for b, n in enumerate(lengths):
        words[b, :n] = torch.randint(1, VOCAB, (n,), generator=gen)
    return words


def random_boxes(gen: torch.Generator, shape: tuple[int, ...], size: float = 100.0) -> torch.Tensor:
    xy = torch.rand(*shape, 2, generator=gen, dtype=torch.float64) * size * 0.6
    wh = 1 + torch.rand(*shape, 2, generator=gen, dtype=torch.float64) * size * 0.39
    return torch.cat([xy, xy + wh], dim=-1)


def mask_of(counts: list[int], k: int) -> torch.Tensor:
    return torch.arange(k)[None, :] < torch.tensor(counts)[:, None]


def randomise_(module: torch.nn.Module, gen: torch.Generator, scale: float = 0.5) -> None:
    """Every parameter random (the edge-type biases start at zero, which would hide their terms)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


# ----------------------------------------------------------------------------------------------------------
# 1. GatedGraphConv, eq. 7


def ggcn_reference(conv: GatedGraphConv, x, rel, p_v, p_e) -> torch.Tensor:
    """Eq. 7 literally, one vertex and one neighbour at a time, float64."""
    w_out = conv.w_out.weight.detach().double()
    w_in = conv.w_in.weight.detach().double()
    w_self = conv.w_self.weight.detach().double()
    b_self = conv.w_self.bias.detach().double()
    b_edge = conv.edge_bias.detach().double()  # row e-1 is the bias of edge type e
    x, p_v, p_e = x.double(), p_v.double(), p_e.double()
    bsz, k, _ = x.shape
    out = torch.zeros(bsz, k, w_out.shape[0], dtype=torch.float64)
    for b in range(bsz):
        for i in range(k):
            x_o = torch.zeros(w_out.shape[0], dtype=torch.float64)
            x_i = torch.zeros(w_out.shape[0], dtype=torch.float64)
            for j in range(k):
                e = int(rel[b, i, j])
                if e > 0:  # out-relation i -> j
                    x_o = x_o + p_e[b, e - 1] * (w_out @ (x[b, j] * p_v[b, j]) + b_edge[e - 1])
                e = int(rel[b, j, i])
                if e > 0:  # in-relation j -> i
                    x_i = x_i + p_e[b, e - 1] * (w_in @ (x[b, j] * p_v[b, j]) + b_edge[e - 1])
            x_s = w_self @ x[b, i] + b_self
            out[b, i] = torch.clamp(x_o + x_i + x_s, min=0)
    return out


@pytest.mark.parametrize("case", ["padded", "single_vertex", "no_edges", "dense"])
def test_ggcn_matches_loop_reference(case):
    gen = torch.Generator().manual_seed(11)
    d_in, d_out = 5, 4
    if case == "padded":
        counts, k, density = [5, 3, 1, 4], 5, 0.7
    elif case == "single_vertex":
        counts, k, density = [1], 1, 1.0
    elif case == "no_edges":
        counts, k, density = [4, 2], 4, 0.0
    else:
        counts, k, density = [6, 6], 6, 1.0
    conv = GatedGraphConv(d_in, d_out)
    randomise_(conv, gen)
    rel = random_relations(gen, counts, k, density)
    mask = mask_of(counts, k)
    x = torch.randn(len(counts), k, d_in, generator=gen) * mask[..., None]
    p_v = torch.rand(len(counts), k, generator=gen) * mask
    p_e = torch.rand(len(counts), NUM_EDGE_TYPES, generator=gen) * 2
    got = conv(x, rel, p_v, p_e)
    assert got.shape == (len(counts), k, d_out)
    want = ggcn_reference(conv, x, rel, p_v, p_e)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    if case == "padded":
        # garbage features and gates at padded vertices never reach the real ones (they have no edges)
        junk = torch.where(mask[..., None], x, 1e3 * torch.randn(x.shape, generator=gen))
        again = conv(junk, rel, torch.where(mask, p_v, torch.ones_like(p_v)), p_e)
        torch.testing.assert_close(again[mask], got[mask])
    if case == "dense":  # every label 1..11 must have appeared, or some bias row went untested
        assert set(rel.unique().tolist()) == set(range(NUM_EDGE_TYPES + 1))
    if case in ("no_edges", "single_vertex"):
        # no edges: only the self term remains
        torch.testing.assert_close(got, torch.relu(conv.w_self(x)))


def test_ggcn_double_precision_exact_and_label_11():
    """float64 end to end to 1e-12, with the largest label (11) and both edge directions of one pair."""
    gen = torch.Generator().manual_seed(3)
    conv = GatedGraphConv(3, 2).double()
    randomise_(conv, gen)
    rel = torch.tensor([[[0, 11, 0], [1, 0, 0], [5, 0, 0]]])
    x = torch.randn(1, 3, 3, generator=gen, dtype=torch.float64)
    p_v = torch.rand(1, 3, generator=gen, dtype=torch.float64)
    p_e = torch.rand(1, NUM_EDGE_TYPES, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(conv(x, rel, p_v, p_e), ggcn_reference(conv, x, rel, p_v, p_e),
                               rtol=1e-12, atol=1e-12)


def test_ggcn_edge_gates_and_vertex_gates_matter():
    """A zero edge gate removes the edges of that type; a zero vertex gate removes that neighbour's message
    (but not its bias, which eq. 7 adds per edge regardless of p^v_j)."""
    gen = torch.Generator().manual_seed(5)
    conv = GatedGraphConv(3, 4).double()
    randomise_(conv, gen)
    with torch.no_grad():
        conv.w_self.bias.fill_(5.0)  # keep everything on the linear side of the ReLU
    rel = torch.tensor([[[0, 2], [0, 0]]])  # one edge 0 -> 1 of type 2
    x = torch.randn(1, 2, 3, generator=gen, dtype=torch.float64)
    p_e = torch.ones(1, NUM_EDGE_TYPES, dtype=torch.float64)
    self_only = conv.w_self(x)
    p_e0 = p_e.clone()
    p_e0[0, 1] = 0
    torch.testing.assert_close(conv(x, rel, torch.ones(1, 2, dtype=torch.float64), p_e0), self_only)
    p_v = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    out = conv(x, rel, p_v, p_e)
    b2 = conv.edge_bias[1]
    torch.testing.assert_close(out[0, 0], self_only[0, 0] + b2)                        # neighbour 1 gated off
    torch.testing.assert_close(out[0, 1], self_only[0, 1] + conv.w_in(x[0, 0]) + b2)   # in-relation from 0


def test_ggcn_gradcheck():
    gen = torch.Generator().manual_seed(7)
    conv = GatedGraphConv(2, 3).double()
    randomise_(conv, gen)
    with torch.no_grad():
        conv.w_self.bias.fill_(2.0)  # away from the ReLU kink, where finite differences are meaningless
    rel = torch.tensor([[[0, 3, 11], [7, 0, 0], [0, 1, 0]]])
    x = torch.randn(1, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    p_v = torch.rand(1, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    p_e = torch.rand(1, NUM_EDGE_TYPES, generator=gen, dtype=torch.float64, requires_grad=True)

    def f(x, p_v, p_e, edge_bias, w_out):
        return torch.func.functional_call(conv, {"edge_bias": edge_bias, "w_out.weight": w_out},
                                          (x, rel, p_v, p_e))

    eb = conv.edge_bias.detach().clone().requires_grad_(True)
    wo = conv.w_out.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x, p_v, p_e, eb, wo))


# ----------------------------------------------------------------------------------------------------------
# 2. CrossModalRelationshipExtractor, eqs. 1-6


def mlp2(seq: torch.nn.Sequential, v: torch.Tensor) -> torch.Tensor:
    """W1 relu(W0 v + b0) + b1 with the Sequential's weights, by hand."""
    l0, l1 = seq[0], seq[2]
    hid = torch.clamp(l0.weight.double() @ v + l0.bias.double(), min=0)
    return l1.weight.double() @ hid + l1.bias.double()


def softmax_list(v: list[float]) -> list[float]:
    mx = max(v)
    ex = [math.exp(a - mx) for a in v]
    s = sum(ex)
    return [a / s for a in ex]


def cmre_reference(cmre: CrossModalRelationshipExtractor, h, word_mask, xs, cand_mask) -> dict:
    h, xs = h.double(), xs.double()
    bsz, t_len, d_h = h.shape
    k = xs.shape[1]
    w_v, w_h, w_n = (cmre.w_v.weight.detach().double(), cmre.w_h.weight.detach().double(),
                     cmre.w_n.weight.detach().double()[0])
    m = torch.zeros(bsz, t_len, 4, dtype=torch.float64)
    h_g = torch.zeros(bsz, d_h, dtype=torch.float64)
    lam = torch.zeros(bsz, t_len, k, dtype=torch.float64)
    c = torch.zeros(bsz, k, d_h, dtype=torch.float64)
    p_v = torch.zeros(bsz, k, dtype=torch.float64)
    p_e = torch.zeros(bsz, NUM_EDGE_TYPES, dtype=torch.float64)
    for b in range(bsz):
        valid = [i for i in range(k) if cand_mask[b, i]]
        for t in range(t_len):
            if not word_mask[b, t]:
                continue  # padding words: every weight 0
            m[b, t] = torch.tensor(softmax_list(mlp2(cmre.word_type, h[b, t]).tolist()))          # eq. 1
            h_g[b] += (m[b, t, 0] + m[b, t, 1] + m[b, t, 2]) * h[b, t]
            alpha = {i: float(w_n @ torch.tanh(w_v @ xs[b, i] + w_h @ h[b, t])) for i in valid}   # eq. 2
            probs = softmax_list([alpha[i] for i in valid])
            for i, pr in zip(valid, probs):
                lam[b, t, i] = m[b, t, 0] * pr
            w_e = torch.tensor(softmax_list(mlp2(cmre.edge_type, h[b, t]).tolist())) * m[b, t, 1]  # eq. 5
            p_e[b] += w_e                                                                        # eq. 6
        for i in range(k):
            for t in range(t_len):
                c[b, i] += lam[b, t, i] * h[b, t]                                                # eq. 3
                p_v[b, i] += lam[b, t, i]                                                        # eq. 4
    return {"word_types": m, "global": h_g, "attention": lam, "vertex_context": c, "vertex_gates": p_v,
            "edge_gates": p_e}


def test_cmre_matches_loop_reference():
    gen = torch.Generator().manual_seed(13)
    cfg = CMRINConfig(**TINY)
    cmre = CrossModalRelationshipExtractor(cfg, visual_dim=6)
    randomise_(cmre, gen, scale=0.7)
    lengths, counts, t_len, k = [4, 1, 6], [3, 5, 1], 6, 5
    word_mask = mask_of(lengths, t_len)
    cand_mask = mask_of(counts, k)
    h = torch.randn(3, t_len, 8, generator=gen) * word_mask[..., None]
    xs = torch.randn(3, k, 6, generator=gen) * cand_mask[..., None]
    got = cmre(h, word_mask, xs, cand_mask)
    want = cmre_reference(cmre, h, word_mask, xs, cand_mask)
    assert set(got) == set(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        torch.testing.assert_close(got[name].double(), want[name], rtol=1e-5, atol=1e-6, msg=name)

    m, lam = got["word_types"].double(), got["attention"].double()
    # eq. 1: a distribution over the 4 types at every real word, zero at padding words
    torch.testing.assert_close(m.sum(-1), word_mask.double())
    # eq. 2: lambda_t sums over the vertices to the entity weight m_t^(0); padded vertices get nothing
    torch.testing.assert_close(lam.sum(-1), m[..., 0])
    assert (lam[~cand_mask[:, None, :].expand_as(lam)] == 0).all()
    assert (lam[~word_mask] == 0).all()
    # eq. 4: the vertex gates sum to the total entity weight; eqs 5-6: the edge gates to the relation weight
    torch.testing.assert_close(got["vertex_gates"].double().sum(-1), m[..., 0].sum(-1))
    torch.testing.assert_close(got["edge_gates"].double().sum(-1), m[..., 1].sum(-1))
    assert (got["vertex_gates"][~cand_mask] == 0).all()
    assert (got["vertex_context"][~cand_mask] == 0).all()
    # item 2 has one candidate: it takes the whole entity weight
    torch.testing.assert_close(lam[2, :, 0], m[2, :, 0])


def test_cmre_padding_invariance_and_finite_grads():
    """Padding words / vertices (even with garbage features) change nothing at the real ones; grads are finite
    despite the -inf fill."""
    gen = torch.Generator().manual_seed(17)
    cmre = CrossModalRelationshipExtractor(CMRINConfig(**TINY), visual_dim=6).double()
    randomise_(cmre, gen)
    h = torch.randn(1, 3, 8, generator=gen, dtype=torch.float64)
    xs = torch.randn(1, 2, 6, generator=gen, dtype=torch.float64)
    alone = cmre(h, torch.ones(1, 3, dtype=torch.bool), xs, torch.ones(1, 2, dtype=torch.bool))
    h_pad = torch.cat([h, torch.zeros(1, 2, 8, dtype=torch.float64)], 1)
    xs_pad = torch.cat([xs, 100 * torch.randn(1, 3, 6, generator=gen, dtype=torch.float64)], 1)
    xs_pad.requires_grad_(True)
    padded = cmre(h_pad, mask_of([3], 5), xs_pad, mask_of([2], 5))
    torch.testing.assert_close(padded["global"], alone["global"])
    torch.testing.assert_close(padded["attention"][:, :3, :2], alone["attention"])
    torch.testing.assert_close(padded["vertex_context"][:, :2], alone["vertex_context"])
    torch.testing.assert_close(padded["edge_gates"], alone["edge_gates"])
    (padded["vertex_context"].sum() + padded["vertex_gates"].sum()).backward()
    assert torch.isfinite(xs_pad.grad).all()
    assert (xs_pad.grad[0, 2:] == 0).all()


# ----------------------------------------------------------------------------------------------------------
# 3. triplet loss, eq. 9


def hard_set(row: list[float], gt: int, margin: float) -> list[int]:
    return [j for j, s in enumerate(row) if j != gt and s + margin - row[gt] > 0]


def picks_of(scores: torch.Tensor, target: torch.Tensor, gen: torch.Generator, margin: float) -> list[int]:
    """Which negative each query drew, read off the gradient (+1/B at the drawn negative), -1 if none."""
    s = scores.clone().requires_grad_(True)
    triplet_loss(s, target, margin, generator=gen).backward()
    g = s.grad
    assert torch.isfinite(g).all()
    out = []
    for b in range(len(target)):
        pos = [j for j in range(s.shape[1]) if g[b, j] > 0]
        assert len(pos) <= 1
        out.append(pos[0] if pos else -1)
    return out


def test_triplet_no_hard_negative_is_zero():
    ninf = float("-inf")
    scores = torch.tensor([[0.9, 0.5, 0.2, ninf], [ninf, 0.3, -0.8, 0.1]])
    target = torch.tensor([0, 1])
    s = scores.clone().requires_grad_(True)
    loss = triplet_loss(s, target, 0.1)
    assert loss.item() == 0.0
    loss.backward()
    assert (s.grad == 0).all()


def test_triplet_single_hard_negative_is_its_violation():
    ninf = float("-inf")
    # query 0: only index 2 is hard (0.45 + 0.1 - 0.5 = 0.05); query 1: only 0 (violation 0.3); query 2: none
    scores = torch.tensor([[0.1, 0.5, 0.45, ninf], [0.4, -0.2, 0.0, -0.3], [0.9, ninf, ninf, ninf]],
                          dtype=torch.float64)
    target = torch.tensor([1, 2, 0])
    for seed in range(5):
        loss = triplet_loss(scores, target, 0.1, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(loss, torch.tensor((0.05 + 0.5 + 0.0) / 3, dtype=torch.float64))


def test_triplet_matches_slow_reference_on_random_rows():
    """With the draw fixed by reading it off the gradient, the loss is the reference mean of violations."""
    gen = torch.Generator().manual_seed(2)
    scores = torch.rand(40, 6, generator=gen, dtype=torch.float64) * 2 - 1
    scores[torch.rand(40, 6, generator=gen) < 0.3] = float("-inf")
    target = torch.tensor([next(j for j in range(6) if scores[b, j] > float("-inf")) if
                           (scores[b] > float("-inf")).any() else 0 for b in range(40)])
    scores[torch.arange(40), target] = torch.rand(40, generator=gen, dtype=torch.float64) * 2 - 1
    margin = 0.3
    loss = triplet_loss(scores, target, margin, generator=torch.Generator().manual_seed(9))
    picks = picks_of(scores, target, torch.Generator().manual_seed(9), margin)
    want = 0.0
    for b, j in enumerate(picks):
        hard = hard_set(scores[b].tolist(), int(target[b]), margin)
        if hard:
            assert j in hard
            want += float(scores[b, j]) + margin - float(scores[b, target[b]])
        else:
            assert j == -1
    torch.testing.assert_close(loss, torch.tensor(want / 40, dtype=torch.float64))


def test_triplet_draw_is_uniform_over_hard_negatives_only():
    ninf = float("-inf")
    # gt = 1 (0.5); hard: 0, 3, 5; not hard: 2 (violation exactly 0), 4 (-0.25); padding: 6
    row = [0.75, 0.5, 0.25, 0.5, 0.0, 0.625, ninf]
    margin = 0.25
    assert hard_set(row, 1, margin) == [0, 3, 5]
    n = 3000
    scores = torch.tensor([row] * n, dtype=torch.float64)
    target = torch.full((n,), 1)
    picks = picks_of(scores, target, torch.Generator().manual_seed(0), margin)
    freq = {j: picks.count(j) / n for j in set(picks)}
    assert set(freq) == {0, 3, 5}
    for j in (0, 3, 5):
        assert abs(freq[j] - 1 / 3) < 0.05, freq
    # different generators give different draws; the same one reproduces them
    again = picks_of(scores[:50], target[:50], torch.Generator().manual_seed(0), margin)
    assert again == picks_of(scores[:50], target[:50], torch.Generator().manual_seed(0), margin)
    assert again != picks_of(scores[:50], target[:50], torch.Generator().manual_seed(1), margin)


def test_triplet_padding_finite_gradients():
    ninf = float("-inf")
    scores = torch.tensor([[ninf, 0.2, 0.3, ninf], [0.1, ninf, ninf, ninf], [ninf, ninf, 0.0, -0.05]],
                          requires_grad=True)
    target = torch.tensor([1, 0, 3])
    loss = triplet_loss(scores, target, 0.1, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(scores.grad).all()
    # query 0: one hard negative (2), query 1: none, query 2: one hard negative (2)
    torch.testing.assert_close(loss, torch.tensor((0.2 + 0.0 + 0.15) / 3))
    want = torch.zeros(3, 4)
    want[0, 2], want[0, 1], want[2, 2], want[2, 3] = 1 / 3, -1 / 3, 1 / 3, -1 / 3
    torch.testing.assert_close(scores.grad, want)


# ----------------------------------------------------------------------------------------------------------
# 4. spatial feature


def test_spatial_feature_hand_values():
    # image 100 high, 200 wide; box x 10..30, y 20..60
    p = spatial_feature(torch.tensor([10.0, 20.0, 30.0, 60.0]), torch.tensor([100, 200]))
    torch.testing.assert_close(p, torch.tensor([0.1, 0.4, 0.1, 0.4, 0.04]))
    # whole image -> centre (0.5, 0.5), size 1, area 1
    p = spatial_feature(torch.tensor([0.0, 0.0, 50.0, 30.0]), torch.tensor([30, 50]))
    torch.testing.assert_close(p, torch.tensor([0.5, 0.5, 1.0, 1.0, 1.0]))


def test_spatial_feature_broadcast_matches_loop():
    gen = torch.Generator().manual_seed(4)
    boxes = random_boxes(gen, (3, 4))
    sizes = torch.tensor([[[100, 120]], [[80, 200]], [[150, 90]]])  # [B, 1, 2] (height, width)
    got = spatial_feature(boxes, sizes)
    assert got.shape == (3, 4, 5)
    for b in range(3):
        h, w = float(sizes[b, 0, 0]), float(sizes[b, 0, 1])
        for i in range(4):
            x1, y1, x2, y2 = boxes[b, i].tolist()
            want = [(x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h,
                    (x2 - x1) * (y2 - y1) / (w * h)]
            torch.testing.assert_close(got[b, i], torch.tensor(want, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------------------
# 5. the whole model, every Table 2 variant


def make_inputs(gen: torch.Generator, lengths: list[int], counts: list[int], t_len: int, k: int,
                dtype=torch.float32) -> dict[str, torch.Tensor]:
    cand_mask = mask_of(counts, k)
    sizes = torch.tensor([[100, 160]] * len(counts))[:, None, :]
    spatial = spatial_feature(random_boxes(gen, (len(counts), k)), sizes) * cand_mask[..., None]
    return {"words": random_words(gen, lengths, t_len),
            "features": ((torch.randn(len(counts), k, TINY["visual_dim"], generator=gen, dtype=torch.float64)
                          * 2 + 1) * cand_mask[..., None]).to(dtype),
            "spatial": spatial.to(dtype),
            "relations": random_relations(gen, counts, k, 0.8),
            "cand_mask": cand_mask}


def tiny_model(name: str, seed: int = 0, **overrides) -> CMRIN:
    torch.manual_seed(seed)
    model = CMRIN(variant_config(name, **{**TINY, **overrides}))
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for conv in model.ggcn:  # nonzero edge biases so their gradients and padding behaviour are exercised
            conv.edge_bias.copy_(torch.randn(conv.edge_bias.shape, generator=gen) * 0.3)
        model.set_feature_stats(torch.full((TINY["visual_dim"],), 1.0), torch.full((TINY["visual_dim"],), 2.0))
    return model


def crop(inputs: dict[str, torch.Tensor], b: int, n_words: int, n_cands: int) -> dict[str, torch.Tensor]:
    return {"words": inputs["words"][b:b + 1, :n_words], "features": inputs["features"][b:b + 1, :n_cands],
            "spatial": inputs["spatial"][b:b + 1, :n_cands],
            "relations": inputs["relations"][b:b + 1, :n_cands, :n_cands],
            "cand_mask": inputs["cand_mask"][b:b + 1, :n_cands]}


def test_variants_registry_matches_table2():
    assert list(VARIANTS) == ["instance", "global-2", "guided-2", "fusion-1", "fusion-3", "cmrin"]
    cfgs = {name: variant_config(name) for name in VARIANTS}
    assert cfgs["cmrin"] == CMRINConfig()
    assert (cfgs["cmrin"].language, cfgs["cmrin"].context, cfgs["cmrin"].layers, cfgs["cmrin"].fusion) == \
        ("weighted", "guided", 2, True)
    assert [cfgs[n].layers for n in VARIANTS] == [0, 2, 2, 1, 3, 2]
    assert [cfgs[n].fusion for n in VARIANTS] == [False, False, False, True, True, True]
    assert CMRINConfig.from_dict(cfgs["fusion-3"].to_dict()) == cfgs["fusion-3"]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_forward_backward_padding(name):
    gen = torch.Generator().manual_seed(21)
    model = tiny_model(name).double()
    lengths, counts, t_len, k = [5, 2, 3], [4, 2, 1], 5, 4
    inputs = make_inputs(gen, lengths, counts, t_len, k, dtype=torch.float64)
    out = model(**inputs)
    scores = out["scores"]
    mask = inputs["cand_mask"]
    assert scores.shape == (3, k) and scores.dtype == torch.float64
    assert torch.isneginf(scores[~mask]).all()
    assert torch.isfinite(scores[mask]).all()
    assert (scores[mask].abs() <= 1 + 1e-9).all()
    cfg = model.config
    if cfg.language == "weighted":
        assert out["vertex_gates"].shape == (3, k) and out["edge_gates"].shape == (3, NUM_EDGE_TYPES)
        assert out["word_types"].shape == (3, t_len, 4) and out["attention"].shape == (3, t_len, k)
    else:
        assert set(out) == {"scores"}
    assert len(model.ggcn) == cfg.layers

    # backward: every parameter gets a finite gradient, nonzero for all but the padding embedding row
    loss = triplet_loss(scores, torch.tensor([1, 0, 0]), margin=2.0, generator=torch.Generator().manual_seed(0))
    assert loss > 0
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname
    assert (model.language.embed.weight.grad[0] == 0).all()

    # padding invariance: each query scored alone (no padding) gets the same scores
    with torch.no_grad():
        for b in range(3):
            alone = model(**crop(inputs, b, lengths[b], counts[b]))["scores"]
            torch.testing.assert_close(alone[0], scores[b, :counts[b]].detach(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["instance", "cmrin"])
def test_visual_location_variant(name):
    gen = torch.Generator().manual_seed(8)
    model = tiny_model(name, visual_location=True)
    inputs = make_inputs(gen, [3, 4], [3, 2], 4, 3)
    out = model(**inputs)
    assert out["scores"].shape == (2, 3) and torch.isneginf(out["scores"][1, 2])
    # the spatial feature now also reaches the visual features: changing it changes the vertex attention
    if name == "cmrin":
        moved = dict(inputs, spatial=inputs["spatial"] + 0.3)
        assert not torch.allclose(model(**moved)["attention"], out["attention"])


def test_feature_standardisation():
    """set_feature_stats standardises: scaling features and stats together changes nothing."""
    gen = torch.Generator().manual_seed(9)
    model = tiny_model("cmrin")
    inputs = make_inputs(gen, [3, 2], [3, 3], 3, 3)
    mean, std = torch.randn(6, generator=gen), torch.rand(6, generator=gen) + 0.5
    model.set_feature_stats(mean, std)
    before = model(**inputs)["scores"]
    model.set_feature_stats(mean * 3 + 1, std * 3)
    moved = dict(inputs, features=(inputs["features"] * 3 + 1) * inputs["cand_mask"][..., None])
    torch.testing.assert_close(model(**moved)["scores"], before, rtol=1e-4, atol=1e-5)


def test_global_context_opens_every_gate():
    """Row 2 (global viscxt) equals running the convolutions by hand with p^v = mask / K and p^e = 1."""
    gen = torch.Generator().manual_seed(10)
    model = tiny_model("global-2").double()
    inputs = make_inputs(gen, [4, 2], [3, 2], 4, 3, dtype=torch.float64)
    got = model(**inputs)["scores"]
    mask = inputs["cand_mask"]
    with torch.no_grad():
        _, last = model.language(inputs["words"])
        x = (inputs["features"] - model.feature_mean) / model.feature_std * mask[..., None]
        for conv in model.ggcn:
            p_v = mask.double() / mask.sum(1, keepdim=True).double()
            x = ggcn_reference(conv, x, inputs["relations"], p_v, torch.ones(2, NUM_EDGE_TYPES))
        v = torch.nn.functional.normalize(model.w_s0(torch.cat([model.w_p(inputs["spatial"]), x], -1)), dim=-1)
        q = torch.nn.functional.normalize(model.w_s1(last), dim=-1)
        want = (v * q[:, None]).sum(-1).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(got, want)


def test_global_language_context_is_last_lstm_state():
    """'global' h_g = [forward state after the last real word, backward state after the first word]."""
    torch.manual_seed(0)
    model = tiny_model("instance").double()
    enc = model.language
    words = torch.tensor([[3, 5, 2, 0, 0], [7, 0, 0, 0, 0]])
    h, last = enc(words)
    for b, n in enumerate([3, 1]):
        # run the directions by hand, one word at a time, with LSTMCells sharing the weights
        emb = enc.embed(words[b, :n]).double()
        for direction, order in ((0, range(n)), (1, range(n - 1, -1, -1))):
            sfx = "_reverse" if direction else ""
            cell = torch.nn.LSTMCell(8, 4).double()
            with torch.no_grad():
                for nm in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    getattr(cell, nm).copy_(getattr(enc.lstm, f"{nm}_l0{sfx}"))
            hx = cx = torch.zeros(1, 4, dtype=torch.float64)
            for t in order:
                hx, cx = cell(emb[t:t + 1], (hx, cx))
                torch.testing.assert_close(h[b, t, 4 * direction:4 * direction + 4], hx[0])
            torch.testing.assert_close(last[b, 4 * direction:4 * direction + 4], hx[0])
        assert (h[b, n:] == 0).all()


BAD_CONFIGS = [
    ("instance", {"layers": 2}),
    ("instance", {"fusion": True}),
    ("global-2", {"fusion": True}),
    ("global-2", {"layers": 0}),
    ("guided-2", {"layers": 0}),
    ("cmrin", {"language": "global"}),
    ("cmrin", {"language": "mean"}),
    ("cmrin", {"context": "local"}),
    ("cmrin", {"hidden_dim": 7}),
    ("cmrin", {"hidden_dim": 0}),
    ("cmrin", {"epochs": 0}),
    ("cmrin", {"batch_size": 0}),
    ("cmrin", {"lr": 0.0}),
    ("cmrin", {"lr": float("nan")}),
]


@pytest.mark.parametrize("name,overrides", BAD_CONFIGS)
def test_invalid_configs_raise_usage_error(name, overrides):
    with pytest.raises(UsageError):
        variant_config(name, **overrides)


def test_unknown_variant_and_field_raise_usage_error():
    with pytest.raises(UsageError, match="unknown CMRIN variant"):
        variant_config("cmrin-4")
    with pytest.raises(UsageError, match="bogus"):
        CMRINConfig.from_dict({**CMRINConfig().to_dict(), "bogus": 1})


# ----------------------------------------------------------------------------------------------------------
# 6. learning sanity check


def test_cmrin_learns_toy_colour_matching():
    """Each image has 4 candidates of distinct colours (one-hot features + noise); the expression names one
    colour among filler words; the target is the candidate of that colour. Chance is 1/4."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    n, k, colours, t_len = 96, 4, 6, 4
    colour_idx = torch.stack([torch.randperm(colours, generator=gen)[:k] for _ in range(n)])     # [n, k]
    target = torch.randint(0, k, (n,), generator=gen)
    features = torch.nn.functional.one_hot(colour_idx, colours).float()
    features = features + 0.1 * torch.randn(n, k, colours, generator=gen)
    words = torch.randint(1, 3, (n, t_len), generator=gen)                   # filler words 1, 2
    pos = torch.randint(0, t_len, (n,), generator=gen)
    words[torch.arange(n), pos] = 3 + colour_idx[torch.arange(n), target]  # colour words 3..8
    lengths = torch.randint(2, t_len + 1, (n,), generator=gen).maximum(pos + 1)
    words = words * (torch.arange(t_len)[None] < lengths[:, None])
    cand_mask = torch.ones(n, k, dtype=torch.bool)
    spatial = spatial_feature(random_boxes(gen, (n, k)), torch.tensor([100, 160])).float()
    relations = random_relations(gen, [k] * n, k, 0.5)
    cfg = variant_config("cmrin", **{**TINY, "visual_dim": colours})
    model = CMRIN(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    inputs = {"words": words, "features": features, "spatial": spatial, "relations": relations,
              "cand_mask": cand_mask}

    def accuracy() -> float:
        with torch.no_grad():
            return (model(**inputs)["scores"].argmax(1) == target).float().mean().item()

    start = accuracy()
    loss_gen = torch.Generator().manual_seed(1)
    for _ in range(150):
        opt.zero_grad()
        loss = triplet_loss(model(**inputs)["scores"], target, cfg.margin, generator=loss_gen)
        loss.backward()
        opt.step()
    end = accuracy()
    assert start < 0.5
    assert end > 0.85, (start, end)
