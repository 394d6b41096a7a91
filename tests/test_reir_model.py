"""ReIR's modules and losses (refground/methods/reir/model.py): shapes per variant, and every loss term and the
graph's message passing against slow, obviously correct loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from refground.boxes import box_iou, encode_boxes
from refground.methods.reir.model import (
    NEG,
    VARIANTS,
    ReIR,
    ReIRBatch,
    adjacency_of,
    ranking_loss,
    reconstruction_loss,
    reir_loss,
    relation_loss,
    self_taught_regression,
    supervised_loss,
    variant_config,
    variant_of_config,
)

B, T, N, L, M, D, C, V = 4, 10, 3, 3, 12, 16, 5, 20


def make_batch(seed: int = 0, targets: bool = True) -> ReIRBatch:
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(2, V, (B, T), generator=g)
    words[1, 8:] = 0
    spans = torch.tensor([[0, 2], [3, 5], [6, 8]]).expand(B, N, 2).clone()
    phrase_words = torch.randint(2, V, (B, N, L), generator=g)
    phrase_words[:, :, 2] = 0
    phrase_mask = torch.ones(B, N, dtype=torch.bool)
    phrase_mask[2, 2] = False
    spans[2, 2] = 0
    xy = torch.rand(B, M, 2, generator=g) * 80
    wh = torch.rand(B, M, 2, generator=g) * 30 + 4
    boxes = torch.cat([xy, xy + wh], -1)
    boxes[:, 1] = boxes[:, 0] + 1.0  # a near-duplicate of proposal 0: self-taught regression has a neighbour
    prop_mask = torch.ones(B, M, dtype=torch.bool)
    prop_mask[3, 9:] = False
    return ReIRBatch(words=words, spans=spans, phrase_words=phrase_words, phrase_mask=phrase_mask,
                     feats=torch.randn(B, M, D, generator=g), boxes=boxes, prop_mask=prop_mask,
                     sizes=torch.full((B, 2), 128.0), classes=torch.randint(0, C, (B, M), generator=g),
                     class_sim=torch.rand(B, N, C, generator=g), image_index=torch.tensor([0, 0, 1, 2]),
                     edges=torch.tensor([[0, 0, 1], [1, 1, 2], [3, 0, 2], [0, 1, 2]]),
                     edge_labels=torch.tensor([1, 0, 2, 2]),
                     targets=torch.tensor([[0, 3, -1], [5, -1, 2], [1, 1, -1], [8, 0, 4]]) if targets else None)


def tiny(variant: str = "reir", **kw):
    return variant_config(variant, vocab_size=V, visual_dim=D, num_relations=2, word_dim=8, dim=16, hidden_dim=12,
                          decoder_dim=10, **kw)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_runs_forward_and_backward_with_the_documented_shapes(variant, torch_one_thread):
    torch.manual_seed(0)
    cfg = tiny(variant)
    model = ReIR(cfg)
    b = make_batch()
    out = model(b)
    assert out["x_q"].shape == (B, N, 16) and out["x_o"].shape == (B, M, 16)
    assert out["s_c"].shape == out["alpha_c"].shape == (B, N, M)
    assert out["pred_boxes"].shape == (B, N, 4)
    assert torch.allclose(out["alpha_c"].sum(-1), torch.ones(B, N))
    assert float(out["alpha_c"][3, :, 9:].detach().max()) < 1e-6  # padded proposals get no attention
    assert ("delta_c" in out) == cfg.regression
    if cfg.two_stage:
        k = cfg.top_k
        assert out["top"].shape == out["s_f"].shape == (B, N, k) and out["x_top"].shape == (B, N, k, 16)
        # V_i is the top K by s^c
        masked = out["s_c"].detach().masked_fill(~b.prop_mask[:, None, :], -1.0)
        assert torch.equal(torch.gather(masked, 2, out["top"]), masked.topk(k, dim=-1).values)
    assert ("omega" in out) == cfg.graph
    loss, parts = reir_loss(model, out, b, regression_on=True)
    loss.backward()
    assert math.isfinite(float(loss))
    assert ("reg" in parts) == cfg.regression and ("rel" in parts) == cfg.graph and ("sup" in parts) == cfg.supervised
    assert variant_of_config(cfg.to_dict()) == variant


def test_phrase_features_are_the_mean_of_the_phrase_words_states():
    torch.manual_seed(0)
    model = ReIR(tiny())
    b = make_batch()
    xq = model.language(b.words, b.spans)
    from refground.grounding.rnn import run_packed

    h, _ = run_packed(model.language.lstm, model.language.embed(b.words), b.words)
    for i in range(B):
        for n in range(N):
            s, e = b.spans[i, n].tolist()
            want = h[i, s:e].mean(0) if e > s else torch.zeros(16)
            torch.testing.assert_close(xq[i, n], want)


def test_reconstruction_loss_equals_a_loop_over_phrases_and_words():
    torch.manual_seed(0)
    model = ReIR(tiny())
    b = make_batch()
    z = torch.randn(B, N, 16)
    got = reconstruction_loss(model.decoder, z, b.phrase_words, b.phrase_mask)
    for i in range(B):
        total = 0.0
        for n in range(N):
            if not b.phrase_mask[i, n]:
                continue
            words = b.phrase_words[i, n]
            words = words[words != 0]
            logits = model.decoder(z[i, n][None], words[None])[0]  # step t predicts word t
            total += sum(-float(torch.log_softmax(logits[t], -1)[words[t]]) for t in range(len(words)))
        assert abs(float(got[i]) - total) < 1e-4 * max(1.0, total)


def slow_str(delta, boxes, conf, valid, tau):
    beta = 1.0 / 9.0
    out = torch.zeros(delta.shape[0])
    for i in range(delta.shape[0]):
        for n in range(delta.shape[1]):
            if not valid[i, n].any():
                continue
            c = conf[i, n].clone()
            c[~valid[i, n]] = -2.0
            best = int(c.argmax())
            target = boxes[i, n, best]
            for k in range(delta.shape[2]):
                if not valid[i, n, k]:
                    continue
                iou = float(box_iou(boxes[i, n, k][None], target[None])[0, 0])
                if iou <= tau:
                    continue
                goal = encode_boxes(target[None], boxes[i, n, k][None])[0]
                for d in (delta[i, n, k] - goal).tolist():
                    a = abs(d)
                    out[i] += 0.5 * a * a / beta if a < beta else a - 0.5 * beta
    return out


def test_self_taught_regression_equals_a_loop_with_the_iou_threshold():
    g = torch.Generator().manual_seed(3)
    bsz, n, k = 3, 2, 6
    base = torch.tensor([10.0, 10.0, 50.0, 60.0])
    jitter = torch.randn(bsz, n, k, 4, generator=g) * 4
    boxes = base + jitter
    boxes[0, 0, 5] = torch.tensor([90.0, 90.0, 120.0, 120.0])  # far away: IoU < tau, stays unchanged
    conf = torch.rand(bsz, n, k, generator=g)
    conf[0, 0, 5] = 0.0  # not the most confident box itself
    valid = torch.ones(bsz, n, k, dtype=torch.bool)
    valid[1, 1, 4:] = False
    delta = torch.randn(bsz, n, k, 4, generator=g, requires_grad=True)
    got = self_taught_regression(delta, boxes, conf, valid, 0.6)
    torch.testing.assert_close(got, slow_str(delta.detach(), boxes, conf, valid, 0.6), rtol=1e-5, atol=1e-5)
    got.sum().backward()
    assert delta.grad is not None and float(delta.grad[0, 0, 5].abs().sum()) == 0.0  # far box: no gradient


def test_ranking_loss_equals_a_loop_over_caption_image_pairs():
    torch.manual_seed(0)
    b = make_batch()
    xq = torch.randn(B, N, 16)
    xo = torch.randn(B, M, 16)
    got = ranking_loss({"x_q": xq, "x_o": xo}, b, margin=0.2, scale=10.0)

    def score(d, i):
        sims = []
        for n in range(N):
            if not b.phrase_mask[d, n]:
                continue
            valid = b.prop_mask[i]
            cos = F.cosine_similarity(xq[d, n][None], xo[i][valid], dim=-1)
            alpha = torch.softmax(10.0 * cos, -1)
            z = (alpha[:, None] * xo[i][valid]).sum(0)
            sims.append(float(F.cosine_similarity(xq[d, n], z, dim=0)))
        return sum(sims) / len(sims)

    s = [[score(d, i) for i in range(B)] for d in range(B)]
    total = 0.0
    for d in range(B):
        for i in range(B):
            if int(b.image_index[d]) == int(b.image_index[i]):
                continue
            total += max(0.0, 0.2 - s[d][d] + s[d][i])  # other images for caption d
            total += max(0.0, 0.2 - s[i][i] + s[d][i])  # other captions for image i
    assert abs(float(got) - total / B) < 1e-4


def test_relation_loss_equals_a_loop_over_labelled_edges():
    torch.manual_seed(0)
    model = ReIR(tiny())
    b = make_batch()
    z = torch.randn(B, N, 16)
    got = relation_loss(model, {"z_f": z, "z_c": z}, b)
    want = torch.zeros(B)
    for (cap, i, j), lab in zip(b.edges.tolist(), b.edge_labels.tolist()):
        if lab == 0:
            continue  # an unkept predicate still connects the graph, but is not classified
        logits = model.relation(torch.cat([z[cap, i], z[cap, j]])[None])
        want[cap] += float(F.cross_entropy(logits, torch.tensor([lab - 1])))
    torch.testing.assert_close(got.detach(), want)


def test_graph_messages_follow_eqs_6_and_7_and_uniform_weights():
    torch.manual_seed(0)
    for attention in (True, False):
        model = ReIR(tiny(graph_attention=attention))
        z = torch.randn(B, N, 16)
        b = make_batch()
        adj = adjacency_of(b.edges, B, N)
        assert bool(adj[0, 0, 1]) and bool(adj[0, 1, 0]) and not bool(adj.diagonal(dim1=1, dim2=2).any())
        z_prime, w = model.graph(z, adj)
        for i in range(B):
            m = model.graph.message(z[i])
            for a in range(N):
                nb = [j for j in range(N) if adj[i, a, j]]
                if not nb:
                    torch.testing.assert_close(z_prime[i, a], z[i, a])
                    continue
                logits = torch.stack([m[a] @ m[j] for j in nb])
                ws = torch.softmax(logits, 0) if attention else torch.full((len(nb),), 1.0 / len(nb))
                want = z[i, a] + sum(wj * m[j] for wj, j in zip(ws, nb))
                torch.testing.assert_close(z_prime[i, a], want, rtol=1e-5, atol=1e-5)


def test_supervised_loss_is_cross_entropy_towards_the_target_proposal():
    torch.manual_seed(0)
    model = ReIR(tiny("upper-bound"))
    b = make_batch()
    out = model(b)
    got = supervised_loss(out, b)
    want = torch.zeros(B)
    for i in range(B):
        for n in range(N):
            t = int(b.targets[i, n])
            if t < 0:
                continue
            want[i] += float(F.cross_entropy(out["logits_c"][i, n][None], torch.tensor([t])))
            top = out["top"][i, n].tolist()
            if t in top:
                want[i] += float(F.cross_entropy(out["logits_f"][i, n][None], torch.tensor([top.index(t)])))
    torch.testing.assert_close(got.detach(), want)
    assert float(out["logits_c"][3, 0, 10]) == NEG * 1.0 or float(out["logits_c"][3, 0, 10]) <= NEG / 2
