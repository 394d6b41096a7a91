"""Benchmark of retrieval: faiss indexes against numpy brute force, side by side in one run.

``retrieval`` (``--quick``: 2,000 vectors, 200 queries): ``n`` random unit vectors of dimension 256 (10,000 by
default) and 1,000 random unit queries, top-10 by inner product.

- ``faiss flat``: ``IndexFlatIP`` search throughput (queries/s) against numpy brute force (one float32 matmul,
  ``argpartition``, a sort of the k best: :func:`~refground.retrieval.index.brute_force_topk`); the ratio is
  faiss / numpy. Its note gives the share of top-10 lists identical to numpy's, ties within 1e-6 aside
  (:func:`~refground.retrieval.index.topk_agreement`); below 1 raises RuntimeError.
- ``faiss flat, 4 shards``: the same vectors in 4 contiguous shards searched one after the other and merged
  (:func:`~refground.retrieval.index.search_shards`); equal to the unsharded result or RuntimeError.
- ``ivf recall@10 (random)`` and ``ivf recall@10 (clustered)``: ``IndexIVFFlat`` (default nlist and nprobe)
  recall@10 against the exact top-10 (a share), on the random vectors (no cluster structure: IVF's worst
  case) and on vectors drawn around 64 centres (what embeddings look like); ``ivf (clustered)``: its
  throughput against numpy on the clustered set.

faiss runs on the idle cores (``faiss_threads("auto")``, the count in the first note); numpy on its BLAS's
own threads.
"""

from __future__ import annotations

import time

import numpy as np

from refground.bench import BenchResult, best_time, register


def unit_vectors(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """float32[n, d] uniformly random unit vectors."""
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered_vectors(n: int, d: int, centres: int, rng: np.random.Generator, spread: float = 0.6) -> np.ndarray:
    """float32[n, d] unit vectors scattered around ``centres`` random unit centres (noise of norm ~``spread``)."""
    c = unit_vectors(centres, d, rng)
    x = c[rng.integers(0, centres, n)] + rng.standard_normal((n, d)).astype(np.float32) * (spread / np.sqrt(d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@register("retrieval")
def bench_retrieval(quick: bool, seed: int) -> list[BenchResult]:
    from refground.retrieval.index import faiss_threads

    # faiss on the idle cores (its OpenMP threads spin: on a busy shared host more threads are much slower);
    # numpy on its BLAS's own threads.
    with faiss_threads("auto") as threads:
        return _bench(quick, seed, threads)


def _bench(quick: bool, seed: int, threads: int) -> list[BenchResult]:
    from refground.retrieval.index import (
        brute_force_topk,
        build_index,
        build_sharded,
        default_nlist,
        default_nprobe,
        recall_at_k,
        search_index,
        search_shards,
        shard_bounds,
        topk_agreement,
    )

    n, nq, d, k = (2000, 200, 256, 10) if quick else (10_000, 1000, 256, 10)
    rng = np.random.default_rng(seed)
    db, q = unit_vectors(n, d, rng), unit_vectors(nq, d, rng)
    repeat = 3 if quick else 5
    flat = build_index(db)
    fs, fr = search_index(flat, q, k)
    _, nr = brute_force_topk(db, q, k)
    same = topk_agreement(fr, nr, db, q).mean()
    if same < 1.0:
        raise RuntimeError(f"faiss flat top-{k} differs from numpy's on {1 - same:.1%} of {nq} queries (seed {seed})")
    t_faiss = best_time(lambda: search_index(flat, q, k), repeat=repeat)
    t_numpy = best_time(lambda: brute_force_topk(db, q, k), repeat=repeat)
    out = [BenchResult("faiss flat", nq / t_faiss, "queries/s", nq / t_numpy, t_numpy / t_faiss,
                       f"{n:,} x {d} random unit vectors, {nq:,} queries, top-{k}, faiss on {threads} thread(s); identical to numpy's top-{k} "
                       f"(ties within 1e-6 aside) on {same:.1%} of queries; baseline = numpy matmul + argpartition "
                       "+ sort")]

    bounds = shard_bounds(n, 4)
    shards = build_sharded(db, bounds)
    ss, sr = search_shards(shards, bounds[:-1], q, k)
    equal = float(np.mean(topk_agreement(sr, fr, db, q)))
    if equal < 1.0 or not np.allclose(ss, fs, atol=1e-6):
        raise RuntimeError(f"4-shard search differs from the single index on {1 - equal:.1%} of queries (seed {seed})")
    t_shard = best_time(lambda: search_shards(shards, bounds[:-1], q, k), repeat=repeat)
    out.append(BenchResult("faiss flat, 4 shards", nq / t_shard, "queries/s", nq / t_numpy, t_numpy / t_shard,
                           f"same top-{k} as the single index on {equal:.1%} of queries (in-memory shards, merged "
                           "per shard)"))

    lists = default_nlist(n)
    probe = default_nprobe(lists)
    t0 = time.perf_counter()
    ivf = build_index(db, "ivf", seed=seed)
    t_build = time.perf_counter() - t0
    _, ir = search_index(ivf, q, k, probe)
    out.append(BenchResult("ivf recall@10 (random)", recall_at_k(ir, nr), "share", None, None,
                           f"nlist {lists}, nprobe {probe}, built in {t_build:.2f} s; uniformly random vectors have "
                           "no clusters, IVF's worst case"))

    cdb = clustered_vectors(n, d, 64, rng)
    # Queries near stored vectors (a perturbed copy of a random one), as a search for a known item is.
    cq = cdb[rng.integers(0, n, nq)] + rng.standard_normal((nq, d)).astype(np.float32) * (0.3 / np.sqrt(d))
    _, cr = brute_force_topk(cdb, cq, k)
    civf = build_index(cdb, "ivf", seed=seed)
    _, cir = search_index(civf, cq, k, probe)
    out.append(BenchResult("ivf recall@10 (clustered)", recall_at_k(cir, cr), "share", None, None,
                           f"{n:,} vectors around 64 centres, queries near stored vectors; nlist {lists}, nprobe "
                           f"{probe}"))
    t_ivf = best_time(lambda: search_index(civf, cq, k, probe), repeat=repeat)
    t_cnp = best_time(lambda: brute_force_topk(cdb, cq, k), repeat=repeat)
    out.append(BenchResult("ivf (clustered)", nq / t_ivf, "queries/s", nq / t_cnp, t_cnp / t_ivf,
                           f"nlist {lists}, nprobe {probe}; baseline = numpy brute force on the same vectors"))
    return out
