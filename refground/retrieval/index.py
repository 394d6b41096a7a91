"""faiss indexes over unit vectors: build, search, shard, merge; and the numpy references they are checked against.

Vectors are L2-normalised rows (CLIP embeddings), so the inner product is the cosine similarity and a
larger score is better. Two index types:

- ``flat``: ``faiss.IndexFlatIP``, exact search (the default);
- ``ivf``: ``faiss.IndexIVFFlat`` with the inner-product metric: ``nlist`` k-means cells (default
  :func:`default_nlist`) trained on a seeded sample of the vectors; a search visits the ``nprobe`` cells
  nearest the query (default :func:`default_nprobe`), so it is approximate and much faster on large sets.

A collection too large for one machine's memory is split into ``S`` shards over contiguous row ranges
(:func:`shard_bounds`), one index each; a search visits the shards one at a time and merges the per-shard
top-k lists exactly (:func:`merge_topk`), so the sharded top-k of a flat index equals the unsharded one.

Everything here is CPU-safe: an index is moved to the GPU only when the faiss build has GPUs
(:func:`gpu_available`), and built/saved on the CPU. faiss is imported inside the functions, so importing
this module costs nothing.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from refground.errors import UsageError

log = logging.getLogger("refground")

INDEX_TYPES = ("flat", "ivf")
MIN_POINTS_PER_LIST = 39  # faiss's k-means warns below 39 training points per centroid
MAX_POINTS_PER_LIST = 256  # ... and subsamples (with its own seed) above 256: we sample first, seeded
GPU_MAX_K = 2048  # faiss GPU indexes answer at most this many neighbours per query


def _faiss() -> Any:
    import faiss

    return faiss


def default_nlist(n: int) -> int:
    """IVF cells for ``n`` vectors: ``round(4 sqrt(n))``, clipped to [1, n // 39] so every cell gets at least 39
    training points (faiss's minimum; fewer makes k-means warn and its cells meaningless)."""
    return int(max(1, min(round(4 * math.sqrt(max(n, 0))), n // MIN_POINTS_PER_LIST)))


def default_nprobe(nlist: int) -> int:
    """Cells an IVF search visits by default: an eighth of them, at least 8 (all of them when fewer)."""
    return int(min(nlist, max(8, -(-nlist // 8))))


def normalise(vectors: np.ndarray) -> np.ndarray:
    """float32[N, D] C-contiguous copy of ``vectors`` with unit rows (an all-zero row stays zero).

    Stored embeddings are float16 (normalised before rounding, so their norms are 1 +- 1e-3): normalising
    again makes the inner product a cosine up to float32 rounding."""
    v = np.asarray(vectors, dtype=np.float32)
    if v.ndim != 2:
        raise ValueError(f"vectors must be a 2-d array [N, D], got shape {v.shape}")
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return np.ascontiguousarray(v / np.where(norms > 0, norms, 1.0), dtype=np.float32)


def gpu_available() -> bool:
    """Whether faiss can put indexes on a GPU here (a faiss-gpu build that sees at least one GPU)."""
    try:
        faiss = _faiss()
        return hasattr(faiss, "index_cpu_to_all_gpus") and int(faiss.get_num_gpus()) > 0
    except (AttributeError, RuntimeError):  # a CPU build without the GPU symbols, or no driver: CPU it is
        return False


@contextmanager
def faiss_threads(threads: int | str | None) -> Iterator[int]:
    """Run the block with faiss on ``threads`` OpenMP threads (``"auto"``: the idle cores now,
    :func:`refground.threads.auto_threads`; None: as they are), then restore. Yields the count in effect.

    Why: faiss's OpenMP threads spin while they wait, like torch's (:mod:`refground.threads`). Measured on this
    project's shared 2-core machine beside one busy process, a flat search of 1,000 queries over 10,000 x 256
    took 140-175 ms on 2 threads and 40 ms on 1 (numpy: 130 ms). The index bytes do not depend on the count
    (the IVF k-means gives the same cells on 1 and 2 threads), so it is not part of any fingerprint."""
    from refground.threads import AUTO, auto_threads

    faiss = _faiss()
    n = auto_threads() if threads == AUTO else threads
    before = int(faiss.omp_get_max_threads())
    if n is not None:
        faiss.omp_set_num_threads(int(n))
    try:
        yield int(faiss.omp_get_max_threads())
    finally:
        faiss.omp_set_num_threads(before)


def to_device(index: Any, k: int = 1) -> Any:
    """``index`` on all GPUs when :func:`gpu_available` (and ``k`` <= :data:`GPU_MAX_K`), else as given. A failed
    copy (out of GPU memory) is logged and the CPU index kept: searching never fails for want of a GPU."""
    if k > GPU_MAX_K or not gpu_available():
        return index
    try:
        return _faiss().index_cpu_to_all_gpus(index)
    except Exception as exc:  # noqa: BLE001 - any GPU failure falls back to the CPU index
        log.warning(f"faiss: could not move the index to the GPU ({exc}); searching on the CPU")
        return index


def build_index(vectors: np.ndarray, index_type: str = "flat", nlist: int | None = None, seed: int = 0) -> Any:
    """A CPU faiss index over ``vectors`` (float[N, D]; normalised here with :func:`normalise`), row i = id i.

    ``flat``: IndexFlatIP. ``ivf``: IndexIVFFlat (inner product) with ``nlist`` cells (None:
    :func:`default_nlist`; at most N), its k-means seeded with ``seed`` and trained on a sample of at most
    256 vectors per cell drawn with ``numpy.random.default_rng(seed)`` (the same vectors and seed give the
    same index). An IVF index is trained on the GPU when there is one, then brought back to the CPU (so it
    can be written with ``faiss.write_index``)."""
    faiss = _faiss()
    x = normalise(vectors)
    n, d = x.shape
    if index_type == "flat":
        index = faiss.IndexFlatIP(d)
        index.add(x)
        return index
    if index_type != "ivf":
        raise UsageError(f"index type must be one of {', '.join(INDEX_TYPES)}, got {index_type!r}")
    if n == 0:
        raise UsageError("an IVF index needs at least one vector to train on")
    lists = default_nlist(n) if nlist is None else int(nlist)
    if not 1 <= lists <= n:
        raise UsageError(f"--nlist must be in [1, {n}] (the number of vectors), got {lists}")
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, lists, faiss.METRIC_INNER_PRODUCT)
    index.own_fields = True
    quantizer.this.disown()  # the index owns (and frees) its quantizer
    index.cp.seed = int(seed)
    size = min(n, MAX_POINTS_PER_LIST * lists)
    rng = np.random.default_rng(seed)
    sample = x if size == n else x[np.sort(rng.choice(n, size=size, replace=False))]
    trainer = to_device(index)
    trainer.train(sample)
    if trainer is not index:
        index = faiss.index_gpu_to_cpu(trainer)
    index.add(x)
    return index


def index_lists(index: Any) -> int:
    """The IVF cells of ``index`` (0 for a flat index)."""
    return int(getattr(index, "nlist", 0) or 0)


def search_index(index: Any, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best rows of ``index`` for each query (normalised here), best first.

    Returns ``(scores float32[Q, k], rows int64[Q, k])``; where the index holds fewer than ``k`` vectors, or
    an IVF search finds fewer in its cells, the missing entries are row -1 with score -inf. ``nprobe``: IVF
    cells to visit (None: :func:`default_nprobe`; clipped to the index's cells); ignored by a flat index."""
    if k < 1:
        raise UsageError(f"top-k must be at least 1, got {k}")
    q = normalise(queries)
    nq = len(q)
    if getattr(index, "ntotal", 0) == 0 or nq == 0:
        return np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)
    lists = index_lists(index)
    if lists:
        index.nprobe = int(min(lists, max(1, default_nprobe(lists) if nprobe is None else int(nprobe))))
    k_eff = int(min(k, index.ntotal))
    scores, rows = to_device(index, k_eff).search(q, k_eff)
    scores = np.asarray(scores, dtype=np.float32)
    rows = np.asarray(rows, dtype=np.int64)
    scores[rows < 0] = -np.inf
    if k_eff < k:
        scores = np.concatenate([scores, np.full((nq, k - k_eff), -np.inf, np.float32)], axis=1)
        rows = np.concatenate([rows, np.full((nq, k - k_eff), -1, np.int64)], axis=1)
    return scores, rows


def merge_topk(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of each query's candidates: ``scores`` float[Q, M], ``rows`` int64[Q, M] (row -1 = no
    candidate), in any order; several shards' top-k lists side by side. Returns ``(float32[Q, k],
    int64[Q, k])`` by decreasing score, ties by increasing row, padded with (-inf, -1). One sort per query
    row of the [Q, M] block, no Python loop."""
    scores = np.asarray(scores, dtype=np.float32)
    rows = np.asarray(rows, dtype=np.int64)
    if scores.shape != rows.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and rows {rows.shape} must be two equal [Q, M] arrays")
    q, m = scores.shape
    s = np.where(rows < 0, -np.inf, scores).astype(np.float32)
    # Sort by -score, then by row (an empty slot's row is pushed past every real one).
    order = np.lexsort((np.where(rows < 0, np.iinfo(np.int64).max, rows), -s), axis=-1)[:, :k]
    top_s = np.take_along_axis(s, order, axis=1)
    top_r = np.where(np.isneginf(top_s), -1, np.take_along_axis(rows, order, axis=1))
    if m < k:
        top_s = np.concatenate([top_s, np.full((q, k - m), -np.inf, np.float32)], axis=1)
        top_r = np.concatenate([top_r, np.full((q, k - m), -1, np.int64)], axis=1)
    return top_s, top_r


def shard_bounds(n: int, shards: int) -> np.ndarray:
    """int64[S + 1] row bounds of ``shards`` contiguous, near-equal shards of ``n`` rows (shard s holds rows
    bounds[s]:bounds[s + 1]); :class:`UsageError` when ``shards`` < 1 or > ``n`` (an empty shard)."""
    if shards < 1:
        raise UsageError(f"--shards must be at least 1, got {shards}")
    if shards > max(n, 1):
        raise UsageError(f"--shards {shards}: more shards than the {n} vectors to index")
    return (np.arange(shards + 1, dtype=np.int64) * int(n)) // int(shards)


def read_index(path: str | Path, index_type: str | None = None) -> Any:
    """An index written by ``faiss.write_index``, read-only and memory-mapped where its type allows: a ``flat``
    index's vectors (``IO_FLAG_MMAP_IFC``), an ``ivf`` index's inverted lists (``IO_FLAG_MMAP``); the OS pages
    them in as a search touches them, so a shard larger than memory can still be searched. ``index_type``
    None (unknown): read into memory."""
    faiss = _faiss()
    flags = 0
    if index_type == "flat" and hasattr(faiss, "IO_FLAG_MMAP_IFC"):  # faiss >= 1.9
        flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
    elif index_type == "ivf":
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError:
        if not flags:
            raise
        return faiss.read_index(str(path))  # a build that cannot map this file: read it whole


def build_sharded(vectors: Any, bounds: np.ndarray, index_type: str = "flat", nlist: int | None = None,
                  seed: int = 0) -> list[Any]:
    """One index per shard of ``vectors`` (any array-like with row slicing, e.g. an h5py dataset: each shard
    is read when it is built). IVF shards each train their own cells (``nlist`` each, None: the default for
    the shard's size), seeded ``seed + s``. Returns the CPU indexes in shard order."""
    return [build_index(np.asarray(vectors[int(a):int(b)]), index_type, nlist, seed + s)
            for s, (a, b) in enumerate(itertools.pairwise(bounds))]


def search_shards(shards: Sequence[Any], starts: Sequence[int], queries: np.ndarray, k: int,
                  nprobe: int | None = None, index_type: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Search shard indexes one after another and merge exactly: each shard's top-k (rows offset by its first
    row ``starts[s]``) is merged into the running top-k (:func:`merge_topk`), so memory stays O(Q k) however
    many shards. ``shards``: indexes, or paths opened one at a time with :func:`read_index` (mapped as
    ``index_type``; each released before the next). Returns ``(scores float32[Q, k], rows int64[Q, k])`` as :func:`search_index`."""
    from refground.progress import track

    nq = len(queries)
    best_s = np.full((nq, 0), -np.inf, np.float32)
    best_r = np.full((nq, 0), -1, np.int64)
    for shard, start in track(zip(shards, starts), total=len(shards), description="search shards"):
        index = read_index(shard, index_type) if isinstance(shard, (str, Path)) else shard
        s, r = search_index(index, queries, k, nprobe)
        del index
        r = np.where(r >= 0, r + int(start), -1)
        best_s, best_r = merge_topk(np.concatenate([best_s, s], axis=1), np.concatenate([best_r, r], axis=1), k)
    return best_s, best_r


# ----------------------------------------------------------------------------- references (numpy, exact)


def brute_force_topk(db: np.ndarray, queries: np.ndarray, k: int, block: int = 4096
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product in numpy: one float32 matmul per block of queries, ``argpartition`` for
    the k best, then a sort of those k (ties by increasing row). ``db``, ``queries`` are used as given (not
    normalised). Returns ``(scores float32[Q, k'], rows int64[Q, k'])`` with k' = min(k, N). The baseline
    the faiss indexes are measured and checked against."""
    db = np.ascontiguousarray(db, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n = len(db)
    kk = int(min(k, n))
    out_s = np.empty((len(queries), kk), np.float32)
    out_r = np.empty((len(queries), kk), np.int64)
    for a in range(0, len(queries), block):
        sims = queries[a:a + block] @ db.T
        part = np.argpartition(-sims, kk - 1, axis=1)[:, :kk] if kk < n else np.broadcast_to(np.arange(n), sims.shape)
        ps = np.take_along_axis(sims, part, axis=1)
        order = np.lexsort((part, -ps), axis=-1)
        out_s[a:a + block] = np.take_along_axis(ps, order, axis=1)
        out_r[a:a + block] = np.take_along_axis(part, order, axis=1)
    return out_s, out_r


def topk_agreement(rows: np.ndarray, ref_rows: np.ndarray, db: np.ndarray, queries: np.ndarray,
                   tol: float = 1e-6) -> np.ndarray:
    """bool[Q]: whether each top-k list ``rows`` equals the reference list ``ref_rows`` ties aside.

    Both lists' true scores are recomputed in float64 from ``db`` and ``queries``; a list agrees when its rows
    are distinct and valid and its score at every rank is within ``tol`` of the reference's score at that
    rank. So rows may differ only where the reference's scores tie within ``tol`` (an order swap inside a
    tie, or another member of a tie at the k-th place); everywhere else the order must be the same."""
    rows = np.asarray(rows, dtype=np.int64)
    ref_rows = np.asarray(ref_rows, dtype=np.int64)
    if rows.shape != ref_rows.shape:
        return np.zeros(len(rows), dtype=bool)
    valid = (rows >= 0).all(axis=1) & (ref_rows >= 0).all(axis=1)
    db64 = np.asarray(db, dtype=np.float64)
    q64 = np.asarray(queries, dtype=np.float64)

    def true_scores(r: np.ndarray) -> np.ndarray:
        return np.einsum("qkd,qd->qk", db64[np.clip(r, 0, len(db64) - 1)], q64)

    close = (np.abs(true_scores(rows) - true_scores(ref_rows)) <= tol).all(axis=1)
    srt = np.sort(rows, axis=1)
    distinct = (np.diff(srt, axis=1) != 0).all(axis=1)
    return valid & close & distinct


def recall_at_k(rows: np.ndarray, exact_rows: np.ndarray) -> float:
    """Mean over queries of |rows_q ∩ exact_q| / k (both int64[Q, k]; -1 entries never count): the share of the
    exact top-k an approximate search found."""
    rows = np.asarray(rows, dtype=np.int64)
    exact_rows = np.asarray(exact_rows, dtype=np.int64)
    if exact_rows.size == 0:
        return 1.0
    hit = (rows[:, :, None] == exact_rows[:, None, :]) & (exact_rows[:, None, :] >= 0)
    return float(hit.any(axis=1).sum() / exact_rows.size)
