"""Benchmarks of CMRIN (:mod:`refground.methods.cmrin.model`): training throughput, inference latency and the
gated graph convolution.

- ``cmrin_train``: queries/s of one training step (make_batch + forward + :func:`triplet_loss` + backward +
  Adam) of the default full CMRIN, batches of 64; the note gives the seconds per epoch this implies for the
  default world's training expressions. No baseline (nothing to compare a training step with).
- ``cmrin_infer``: ms per query of inference under ``torch.no_grad``, 256 queries per forward vs a
  baseline of one query per forward; both must give the same scores (else RuntimeError).
- ``ggcn``: one :class:`GatedGraphConv` forward (64 graphs x 20 vertices, 512 -> 512) vs
  :func:`gated_graph_conv_reference`, a per-vertex / per-neighbour Python loop of eq. 7 run on the first few
  graphs of the same batch (it checks the output and is timed on them; its cost is linear in the graphs).

Inputs are random but shaped like the default synthetic world (candidates per image 4-20, mean ~10; 6-18
words; vocabulary of 63 words; 256-d region features; relation graphs from
:func:`refground.graph.spatial_relations` of random boxes), so the benchmarks run anywhere. When
``$REFGROUND_CACHE`` holds current features and graph artifacts of the dataset "synth", ``cmrin_train`` and
``cmrin_infer`` use its candidates and expressions instead (the note says which).
"""

from __future__ import annotations

import functools
import os
import time

import numpy as np
import torch
from torch import Tensor

from refground.bench import BenchResult, best_time, register
from refground.bench.graph_bench import relation_boxes
from refground.graph import spatial_relations_many
from refground.grounding.candidates import CandidateSet, make_batch
from refground.grounding.queries import QueryTable
from refground.boxes import spatial_feature
from refground.methods.cmrin.model import CMRIN, CMRINConfig, GatedGraphConv, triplet_loss

SYNTH_VOCAB = 63          # words of the default world's vocabulary (min count 6), padding included
SYNTH_TRAIN_QUERIES = 25_279  # training expressions of the default 5000-image world
TRAIN_BATCH = 64
INFER_BATCH = 256
IMAGE_SIZE = (480, 640)   # (height, width)


def synthetic_candidates(num_images: int, seed: int, feature_dim: int = 256) -> CandidateSet:
    """Random candidates shaped like the default world: 4-20 boxes per image (4 + Binomial(16, 3/8), mean
    10), standard normal features float32[M, feature_dim], relation graphs of the boxes."""
    rng = np.random.default_rng(seed)
    counts = 4 + rng.binomial(16, 0.375, size=num_images)
    boxes = [relation_boxes(int(k), IMAGE_SIZE, seed * 100_003 + i).float() for i, k in enumerate(counts)]
    labels, rel_offsets = spatial_relations_many(boxes, [IMAGE_SIZE] * num_images)
    flat = torch.cat(boxes)
    sizes = np.tile(np.array(IMAGE_SIZE, dtype=np.int64), (num_images, 1))
    spatial = spatial_feature(flat, torch.tensor(IMAGE_SIZE)).numpy()
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    features = rng.standard_normal((int(offsets[-1]), feature_dim), dtype=np.float32)
    return CandidateSet("gt", np.arange(num_images, dtype=np.int64), offsets, flat.numpy(), features, spatial,
                        np.arange(int(offsets[-1]), dtype=np.int64), labels.astype(np.uint8),
                        rel_offsets.astype(np.int64), sizes)


def synthetic_queries(cands: CandidateSet, num_queries: int, seed: int, vocab_size: int = SYNTH_VOCAB
                      ) -> QueryTable:
    """Random expressions of 6-18 words (ids 1..vocab_size-1) on random images of ``cands``, each with a
    random target among its image's candidates."""
    rng = np.random.default_rng(seed + 1)
    image_rows = rng.integers(0, len(cands.image_ids), size=num_queries)
    lengths = rng.integers(6, 19, size=num_queries)
    words = rng.integers(1, vocab_size, size=(num_queries, 18))
    words[np.arange(18)[None, :] >= lengths[:, None]] = 0
    targets = rng.integers(0, 1 << 30, size=num_queries) % cands.counts()[image_rows]
    return QueryTable(np.arange(num_queries, dtype=np.int64), image_rows.astype(np.int64), words.astype(np.int64),
                      targets.astype(np.int64), ["synthetic"] * num_queries)


@functools.lru_cache(maxsize=2)
def _real_world(cache: str) -> tuple[CandidateSet, QueryTable, QueryTable, int, tuple[Tensor, Tensor]] | None:
    """(candidates, usable train queries, usable val queries, vocabulary size, feature stats) of "synth" in
    ``cache``, or None when its features or graph artifact is missing or stale."""
    from refground.data.store import dataset_dir, load_dataset
    from refground.errors import RefgroundError
    from refground.features.pipeline import features_path
    from refground.graph_artifact import graph_path
    from refground.grounding.candidates import feature_stats, load_candidates
    from refground.grounding.queries import encode_queries, encode_query_rows
    from refground.text.vocab import Vocabulary

    try:
        f_path = features_path("synth", cache)
        g_path = graph_path("synth", cache, "detector-default")
        ds = load_dataset(dataset_dir("synth", cache))
        cands = load_candidates(ds, f_path, "gt", graph_file=g_path)  # checks both artifacts are current
    except (RefgroundError, OSError):
        return None
    vocab = Vocabulary.of_split(ds, "train", CMRINConfig().min_word_count)
    tables = []
    for split in ("train", "val"):
        q = encode_queries(ds, split, vocab)
        rows = ds.query_rows(split, "expression")[q.targets >= 0]
        tables.append(encode_query_rows(ds, rows, vocab))
    return cands, tables[0], tables[1], len(vocab), feature_stats(cands, np.unique(tables[0].image_rows))


def _world(num_train: int, num_val: int, seed: int) -> tuple[CandidateSet, QueryTable, QueryTable, CMRIN, str]:
    """Candidates, train and val queries and a freshly initialised default CMRIN for them; the last item
    says where the data came from."""
    cache = os.environ.get("REFGROUND_CACHE")
    real = _real_world(cache) if cache else None
    if real is not None:
        cands, train_q, val_q, vocab_size, stats = real
        where = f"real data: synth in {cache}"
    else:
        cands = synthetic_candidates(max(64, (num_train + num_val) // 4), seed)
        train_q = synthetic_queries(cands, num_train, seed)
        val_q = synthetic_queries(cands, num_val, seed + 7)
        vocab_size, stats = SYNTH_VOCAB, None
        where = "random inputs shaped like the default world"
    torch.manual_seed(seed)
    model = CMRIN(CMRINConfig(vocab_size=vocab_size, visual_dim=cands.feature_dim))
    if stats is not None:
        model.set_feature_stats(*stats)
    return cands, train_q, val_q, model, where


@register("cmrin_train")
def bench_cmrin_train(quick: bool, seed: int) -> list[BenchResult]:
    warmup, steps = (1, 2) if quick else (3, 30)  # a step of 64 queries takes about 0.1 s on 2 quiet cores
    cands, train_q, _, model, where = _world(TRAIN_BATCH * (warmup + steps), 0, seed)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train_q))
    batches = [order[i * TRAIN_BATCH:(i + 1) * TRAIN_BATCH] for i in range(warmup + steps)]
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=model.config.lr)
    gen = torch.Generator().manual_seed(seed)

    def step(rows: np.ndarray) -> float:
        b = make_batch(train_q, cands, rows)
        loss = triplet_loss(model(**b.inputs())["scores"], b.targets, model.config.margin, gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    for rows in batches[:warmup]:
        step(rows)
    t0 = time.perf_counter()
    losses = [step(rows) for rows in batches[warmup:]]
    elapsed = time.perf_counter() - t0
    if not all(np.isfinite(losses)):
        raise RuntimeError(f"cmrin_train: non-finite training loss {losses}")
    qps = TRAIN_BATCH * steps / elapsed
    return [BenchResult("cmrin_train", qps, "queries/s", None, None,
                        f"default CMRIN (vocab {model.config.vocab_size}, visual {model.config.visual_dim}), "
                        f"batch {TRAIN_BATCH}, {steps} steps of make_batch + forward + triplet loss + backward + "
                        f"Adam; {where}; {torch.get_num_threads()} threads; = "
                        f"{SYNTH_TRAIN_QUERIES / qps:.0f} s per epoch of the default world's "
                        f"{SYNTH_TRAIN_QUERIES} training expressions")]


@register("cmrin_infer")
def bench_cmrin_infer(quick: bool, seed: int) -> list[BenchResult]:
    single = 24 if quick else 64  # queries run one per forward (the baseline is slow)
    cands, _, val_q, model, where = _world(0, INFER_BATCH, seed)
    index = np.arange(min(INFER_BATCH, len(val_q)))
    model.eval()

    @torch.no_grad()
    def batched() -> Tensor:
        return model(**make_batch(val_q, cands, index).inputs())["scores"]

    @torch.no_grad()
    def one_by_one(rows: np.ndarray) -> list[Tensor]:
        return [model(**make_batch(val_q, cands, rows[n:n + 1]).inputs())["scores"][0] for n in range(len(rows))]

    one_by_one(index[:1])  # warm-up: first-call allocations
    # The checking runs are timed too: in quick mode they are the only ones (a 256-query forward is ~1-2 s).
    t0 = time.perf_counter()
    scores = batched()
    t_batch = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = one_by_one(index[:single])
    t_single = time.perf_counter() - t0
    counts = cands.counts()[val_q.image_rows[index]]
    for n, s in enumerate(ref):
        k = int(counts[n])
        if s.shape[0] != k or not torch.allclose(scores[n, :k], s, rtol=0, atol=1e-5):
            diff = float((scores[n, :k] - s[:k]).abs().max()) if s.shape[0] == k else float("nan")
            raise RuntimeError(f"cmrin_infer: batched and one-query scores differ for query {n} "
                               f"(max |diff| {diff:.2e}, {s.shape[0]} vs {k} candidates)")
    if not quick:
        t_batch = min(t_batch, best_time(batched, repeat=2, min_time=0.0))
        t_single = min(t_single, best_time(lambda: one_by_one(index[:single]), repeat=1, min_time=0.0))
    ours, base = t_batch / len(index) * 1e3, t_single / single * 1e3
    return [BenchResult("cmrin_infer", ours, "ms/query", base, base / ours,
                        f"default CMRIN under no_grad incl. make_batch, {len(index)} queries per forward; baseline "
                        f"= one query per forward ({single} queries); scores agree to 1e-5; {where}; "
                        f"{torch.get_num_threads()} threads")]


def gated_graph_conv_reference(conv: GatedGraphConv, x: Tensor, relations: Tensor, vertex_gates: Tensor,
                               edge_gates: Tensor) -> Tensor:
    """Eq. 7 by a per-vertex, per-neighbour Python loop with ``conv``'s weights (same arguments and result
    as ``conv.forward``): x'_i = relu(W_self x_i + b_self + sum_{j: e_ij > 0} p^e_{e_ij} (W_out x_j p^v_j +
    b_{e_ij}) + sum_{j: e_ji > 0} p^e_{e_ji} (W_in x_j p^v_j + b_{e_ji}))."""
    w_out, w_in, w_self = conv.w_out.weight, conv.w_in.weight, conv.w_self.weight
    b_self, b_edge = conv.w_self.bias, conv.edge_bias
    batch, k = relations.shape[:2]
    rel = relations.tolist()
    out = x.new_zeros(batch, k, w_self.shape[0])
    for b in range(batch):
        for i in range(k):
            acc = w_self @ x[b, i] + b_self
            for j in range(k):
                e = rel[b][i][j]
                if e > 0:  # out-relation i -> j
                    acc = acc + edge_gates[b, e - 1] * (w_out @ (x[b, j] * vertex_gates[b, j]) + b_edge[e - 1])
                e = rel[b][j][i]
                if e > 0:  # in-relation j -> i
                    acc = acc + edge_gates[b, e - 1] * (w_in @ (x[b, j] * vertex_gates[b, j]) + b_edge[e - 1])
            out[b, i] = torch.relu(acc)
    return out


def ggcn_inputs(batch: int, k: int, dim: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Random GGCN inputs like the model's second layer: graphs of the default world's candidate counts
    padded to ``k`` (padded rows/columns label 0, gate 0). Returns (x [B, k, dim], relations [B, k, k],
    vertex_gates [B, k], edge_gates [B, 11])."""
    cands = synthetic_candidates(batch, seed, feature_dim=1)
    counts = np.minimum(cands.counts(), k)
    relations = torch.zeros(batch, k, k, dtype=torch.long)
    for r in range(batch):
        n = int(counts[r])
        relations[r, :n, :n] = torch.from_numpy(cands.relation_matrix(r)[:n, :n].astype(np.int64))
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(k)[None, :] < torch.from_numpy(counts)[:, None]
    x = torch.randn(batch, k, dim, generator=g)
    vertex_gates = torch.rand(batch, k, generator=g) * mask
    edge_gates = torch.rand(batch, 11, generator=g)
    return x, relations, vertex_gates, edge_gates


@register("ggcn")
def bench_ggcn(quick: bool, seed: int) -> list[BenchResult]:
    batch, k, dim = 64, 20, 512
    loop_graphs = 2 if quick else 8
    torch.manual_seed(seed)
    conv = GatedGraphConv(dim, dim)
    with torch.no_grad():
        conv.edge_bias.normal_(0.0, 0.1)  # zero at init: give the edge biases something to get wrong
    args = ggcn_inputs(batch, k, dim, seed)
    small = tuple(a[:loop_graphs] for a in args)
    with torch.no_grad():
        full = conv(*args)
        ref = gated_graph_conv_reference(conv, *small)
        if not torch.allclose(full[:loop_graphs], ref, rtol=1e-4, atol=1e-4):
            diff = float((full[:loop_graphs] - ref).abs().max())
            raise RuntimeError(f"ggcn: GatedGraphConv disagrees with the loop reference (max |diff| {diff:.2e})")
        t_ours = best_time(lambda: conv(*args), repeat=3 if quick else 7)
        t_ref = best_time(lambda: gated_graph_conv_reference(conv, *small), repeat=1 if quick else 2, min_time=0.0)
    base = t_ref / loop_graphs * batch
    return [BenchResult("ggcn", t_ours * 1e3, "ms", base * 1e3, base / t_ours,
                        f"GatedGraphConv forward, {batch} graphs x {k} vertices (4-20 real), {dim} -> {dim}, "
                        f"no_grad; baseline = per-vertex/per-neighbour Python loop of eq. 7, timed on {loop_graphs} "
                        f"graphs and scaled x{batch // loop_graphs} (its cost is linear in the graphs); outputs "
                        f"agree to 1e-4; {torch.get_num_threads()} threads")]
