"""refground.retrieval: faiss search against numpy references, shards and their merge, the cached index artifact."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import run_json
from hf_tiny import make_tiny_clip
from test_extract_hf_cli import hf_cache  # noqa: F401 - the fixture: dataset copy and tiny model folders

from refground.bench.retrieval_bench import clustered_vectors, unit_vectors
from refground.cli.main import main
from refground.errors import UsageError
from refground.retrieval import index as ix

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def exact_topk(db: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The obviously-correct reference: every score in float64, a full stable sort per query."""
    s = q.astype(np.float64) @ db.astype(np.float64).T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, axis=1), order


def check_same_topk(rows, scores, db, q, tol=1e-6):
    """``rows`` is the exact top-k of every query: as sets where the reference's scores tie within ``tol``, in the
    reference's order everywhere else (loop over queries and ranks: slow and plain)."""
    ref_s, ref_r = exact_topk(db, q, rows.shape[1])
    full = q.astype(np.float64) @ db.astype(np.float64).T
    for i in range(len(q)):
        assert len(set(rows[i].tolist())) == rows.shape[1]
        for j in range(rows.shape[1]):
            if rows[i, j] != ref_r[i, j]:
                # Only a tie may swap: the row found scores what the reference's row at this rank scores.
                assert abs(full[i, rows[i, j]] - ref_s[i, j]) <= tol, (i, j)
        np.testing.assert_allclose(scores[i], ref_s[i], atol=1e-5)
    return ref_r


def test_flat_search_is_the_exact_top_k_on_10000_vectors():
    rng = np.random.default_rng(0)
    db, q = unit_vectors(10_000, 64, rng), unit_vectors(300, 64, rng)
    s, r = ix.search_index(ix.build_index(db), q, 10)
    ref_r = check_same_topk(r, s, db, q)
    assert (r == ref_r).all(axis=1).mean() > 0.99  # random floats almost never tie
    assert ix.topk_agreement(r, ref_r, db, q).all()
    # The numpy baseline of the benchmark is exact too.
    ns, nr = ix.brute_force_topk(db, q, 10)
    check_same_topk(nr, ns, db, q)


def test_agreement_tolerates_ties_and_catches_wrong_lists():
    rng = np.random.default_rng(1)
    base = unit_vectors(50, 16, rng)
    db = np.concatenate([base, base[:10]])  # rows 50..59 duplicate rows 0..9: exact ties
    q = unit_vectors(20, 16, rng)
    s, r = ix.search_index(ix.build_index(db), q, 8)
    check_same_topk(r, s, db, q)
    _, ref = exact_topk(db, q, 8)
    twin = np.where(ref < 10, ref + 50, np.where((ref >= 50) & (ref < 60), ref - 50, ref))
    assert ix.topk_agreement(twin, ref, db, q).all()  # a tie's twin is as good
    wrong = ref.copy()
    wrong[:, [0, 7]] = wrong[:, [7, 0]]  # best and 8th swapped: not a tie
    assert not ix.topk_agreement(wrong, ref, db, q).any()
    dup = ref.copy()
    dup[:, 1] = dup[:, 0]
    assert not ix.topk_agreement(dup, ref, db, q).any()
    assert ix.recall_at_k(ref, ref) == 1.0 and ix.recall_at_k(np.full_like(ref, -1), ref) == 0.0


def test_merge_topk_matches_a_python_loop():
    rng = np.random.default_rng(2)
    q, m, k = 30, 17, 6
    scores = np.round(rng.standard_normal((q, m)), 1).astype(np.float32)  # rounded: plenty of ties
    rows = np.stack([rng.permutation(100)[:m] for _ in range(q)])
    rows[rng.random((q, m)) < 0.2] = -1  # empty slots
    got_s, got_r = ix.merge_topk(scores, rows, k)
    for i in range(q):
        cand = sorted((-float(s), int(r)) for s, r in zip(scores[i], rows[i]) if r >= 0)[:k]
        cand += [(np.inf, -1)] * (k - len(cand))
        assert got_r[i].tolist() == [r for _, r in cand]
        assert got_s[i].tolist() == [-s for s, _ in cand]
    s, r = ix.merge_topk(scores[:, :3], rows[:, :3], 5)  # fewer candidates than k: padded
    assert s.shape == (q, 5) and (r[:, 3:] == -1).all() and np.isneginf(s[:, 3:]).all()


def test_search_pads_when_k_exceeds_the_index_and_rejects_bad_k():
    rng = np.random.default_rng(3)
    db, q = unit_vectors(4, 8, rng), unit_vectors(2, 8, rng)
    s, r = ix.search_index(ix.build_index(db), q, 6)
    assert (r[:, 4:] == -1).all() and np.isneginf(s[:, 4:]).all()
    assert sorted(r[0, :4].tolist()) == [0, 1, 2, 3]
    with pytest.raises(UsageError, match="top-k"):
        ix.search_index(ix.build_index(db), q, 0)


def test_shard_bounds_are_contiguous_and_near_equal():
    for n, shards in ((10, 3), (10_000, 4), (7, 7), (5, 1)):
        b = ix.shard_bounds(n, shards)
        sizes = np.diff(b)
        assert b[0] == 0 and b[-1] == n and len(b) == shards + 1
        assert sizes.min() >= 1 and sizes.max() - sizes.min() <= 1
    for bad in (0, -1, 11):
        with pytest.raises(UsageError, match="--shards"):
            ix.shard_bounds(10, bad)


@pytest.mark.parametrize("shards", [2, 3, 7])
def test_sharded_search_equals_the_single_index_and_numpy(shards, tmp_path):
    import faiss

    rng = np.random.default_rng(4)
    db, q = unit_vectors(3001, 32, rng), unit_vectors(100, 32, rng)
    single_s, single_r = ix.search_index(ix.build_index(db), q, 10)
    bounds = ix.shard_bounds(len(db), shards)
    s, r = ix.search_shards(ix.build_sharded(db, bounds), bounds[:-1], q, 10)
    check_same_topk(r, s, db, q)
    assert ix.topk_agreement(r, single_r, db, q).all()
    np.testing.assert_allclose(s, single_s, atol=1e-6)
    # From files, memory-mapped, one at a time: the same lists.
    paths = []
    for i, index in enumerate(ix.build_sharded(db, bounds)):
        paths.append(tmp_path / f"shard-{i}.faiss")
        faiss.write_index(index, str(paths[-1]))
    fs, fr = ix.search_shards(paths, bounds[:-1], q, 10, index_type="flat")
    assert np.array_equal(fr, r) and np.array_equal(fs, s)
    # IVF shards probed in every cell are exact too.
    ivf = ix.build_sharded(db, bounds, "ivf", seed=5)
    _, ir = ix.search_shards(ivf, bounds[:-1], q, 10, nprobe=10_000)
    assert ix.topk_agreement(ir, single_r, db, q).all()


def test_ivf_recall_on_clustered_data_and_seeded_determinism(tmp_path):
    import faiss

    rng = np.random.default_rng(6)
    db = clustered_vectors(10_000, 64, 40, rng)
    q = db[rng.integers(0, len(db), 200)] + rng.standard_normal((200, 64)).astype(np.float32) * 0.05
    _, exact = exact_topk(db, q, 10)
    a = ix.build_index(db, "ivf", seed=7)
    b = ix.build_index(db, "ivf", seed=7)
    c = ix.build_index(db, "ivf", seed=8)
    # Same seed, same bytes (before a search sets nprobe, which the bytes hold too); another seed, other cells.
    assert np.array_equal(faiss.serialize_index(a), faiss.serialize_index(b))
    assert not np.array_equal(faiss.serialize_index(a), faiss.serialize_index(c))
    assert a.nlist == ix.default_nlist(10_000) == 256
    _, ar = ix.search_index(a, q, 10)  # default nprobe
    assert ix.recall_at_k(ar, exact) >= 0.95
    _, all_cells = ix.search_index(a, q, 10, nprobe=a.nlist)
    assert ix.topk_agreement(all_cells, exact, db, q).all()
    bs, br = ix.search_index(b, q, 10, nprobe=4)
    as_, ar4 = ix.search_index(a, q, 10, nprobe=4)
    assert np.array_equal(ar4, br) and np.array_equal(as_, bs)
    with pytest.raises(UsageError, match="--nlist"):
        ix.build_index(db[:10], "ivf", nlist=11)


def test_default_nlist_and_nprobe():
    assert [ix.default_nlist(n) for n in (1, 38, 39, 100, 10_000, 1_000_000)] == [1, 1, 1, 2, 256, 4000]
    assert [ix.default_nprobe(n) for n in (1, 5, 8, 64, 256, 4000)] == [1, 5, 8, 8, 32, 500]


def test_gpu_path_is_used_when_present_and_never_fails(monkeypatch):
    import faiss

    rng = np.random.default_rng(9)
    db, q = unit_vectors(500, 16, rng), unit_vectors(5, 16, rng)
    assert ix.gpu_available() == (faiss.get_num_gpus() > 0)
    _, cpu_r = ix.search_index(ix.build_index(db), q, 5)
    moved = []
    monkeypatch.setattr(ix, "gpu_available", lambda: True)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda index: moved.append(index) or index, raising=False)
    monkeypatch.setattr(faiss, "index_gpu_to_cpu", lambda index: index, raising=False)
    _, r = ix.search_index(ix.build_index(db), q, 5)
    ix.build_index(db, "ivf", nlist=4)
    assert len(moved) == 2 and np.array_equal(r, cpu_r)  # one search, one IVF training
    big_k = ix.build_index(db)
    assert ix.to_device(big_k, k=ix.GPU_MAX_K + 1) is big_k and len(moved) == 2  # GPU indexes stop at k = 2048

    def broken(index):
        raise RuntimeError("out of GPU memory")

    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", broken, raising=False)
    _, r = ix.search_index(ix.build_index(db), q, 5)
    assert np.array_equal(r, cpu_r)


def test_faiss_threads_are_set_for_the_block_and_restored():
    import faiss

    before = faiss.omp_get_max_threads()
    with ix.faiss_threads(1) as n:
        assert n == 1 == faiss.omp_get_max_threads()
    assert faiss.omp_get_max_threads() == before
    with ix.faiss_threads("auto") as n:
        assert 1 <= n
    with ix.faiss_threads(None) as n:
        assert n == before


def test_faiss_is_imported_lazily():
    code = "import sys, refground.cli.main, refground.retrieval; print('faiss' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ------------------------------------------------------------------------------------ the index artifact


@pytest.fixture
def own_clip(hf_cache, tmp_path):  # noqa: F811
    """A fresh cache with the fixture dataset, a tiny CLIP of our own (its folder may be rewritten) and its
    artifacts: features/hf-detr.h5 and clip/hf-myclip.h5. Returns (cache root, clip folder)."""
    root = tmp_path / "cache"
    shutil.copytree(hf_cache["cache"] / "synth" / "dataset", root / "synth" / "dataset")
    clip = make_tiny_clip(tmp_path / "models" / "myclip")
    assert main(["extract", "--cache", str(root), "--detector", f"hf:{hf_cache['detr']}", "--clip", f"hf:{clip}",
                 "--no-dense", "--max-proposals", "3"]) == 0
    return root, clip, hf_cache["detr"]


def test_index_artifact_is_a_hit_then_rebuilt_when_the_clip_artifact_changes(own_clip, capsys):
    from refground.retrieval.store import (
        IndexSpec,
        build_index_artifact,
        clip_artifact,
        search_index_artifact,
    )

    root, clip, detr = own_clip
    capsys.readouterr()
    path = clip_artifact("synth", root)
    assert path.name == "hf-myclip.h5"
    first = build_index_artifact(path, "objects", IndexSpec())
    assert first["status"] == "written" and first["ntotal"] > 0 and first["shards"] == 1
    hit = build_index_artifact(path, "objects", IndexSpec())
    assert hit["status"] == "hit" and hit["fingerprint"] == first["fingerprint"]
    # The index searches the section's vectors exactly.
    from refground.cache import RaggedH5

    with RaggedH5(path) as f:
        emb = ix.normalise(f.table("objects", "embedding"))
    q = emb[:5] + 0.01
    s, r = search_index_artifact(first["path"], q, 7)
    check_same_topk(r, s, emb, ix.normalise(q))
    # A new model in the same folder: the CLIP artifact is re-extracted, so the index goes stale and is rebuilt.
    shutil.rmtree(clip)
    make_tiny_clip(clip, seed=1)
    from refground.retrieval.search import text_embedding

    with pytest.raises(Exception, match="changed since its embeddings were made"):
        text_embedding(path, "a cat")
    assert main(["extract", "--cache", str(root), "--detector", f"hf:{detr}", "--clip", f"hf:{clip}",
                 "--no-dense", "--max-proposals", "3"]) == 0
    capsys.readouterr()
    rebuilt = build_index_artifact(path, "objects", IndexSpec())
    assert rebuilt["status"] == "written" and rebuilt["fingerprint"] != first["fingerprint"]
    with RaggedH5(path) as f:
        emb2 = ix.normalise(f.table("objects", "embedding"))
    assert not np.allclose(emb2, emb)
    s2, r2 = search_index_artifact(rebuilt["path"], emb2[:3], 4)
    check_same_topk(r2, s2, emb2, emb2[:3])
    # Sharded, IVF: its own folder; probing every cell gives the exact answer across the shard files.
    sh = build_index_artifact(path, "objects", IndexSpec(type="ivf", shards=3, seed=2))
    assert sh["path"].endswith("objects-ivf-s3") and sh["shards"] == 3 and len(sh["nlist"]) == 3
    _, r3 = search_index_artifact(sh["path"], emb2[:3], 4, nprobe=1000)
    assert np.array_equal(r3, r2)


def test_cache_verify_reports_stale_damaged_and_leftover_indexes(own_clip, capsys):
    from refground.cache.listing import remedy, verify
    from refground.retrieval.store import IndexSpec, build_index_artifact, clip_artifact

    root, clip, detr = own_clip
    path = clip_artifact("synth", root)
    flat = build_index_artifact(path, "images", IndexSpec())
    ivf = build_index_artifact(path, "queries", IndexSpec(type="ivf", shards=2))
    entries = {e.name: e for e in verify(root) if e.kind == "index/hf-myclip"}
    assert {n: e.status for n, e in entries.items()} == {"images-flat": "complete", "queries-ivf-s2": "complete"}
    # A damaged shard file is caught by its content record; a meaningless one by the index check.
    shard = root / "synth" / "index" / "hf-myclip" / "queries-ivf-s2" / "shard-001.faiss"
    shard.write_bytes(b"junk")
    e = {e.name: e for e in verify(root) if e.kind == "index/hf-myclip"}["queries-ivf-s2"]
    assert e.status == "damaged" and "shard-001.faiss" in e.problems[0]
    assert remedy(e, root) == (f"refground retrieve --build --rebuild --dataset synth --cache {root} --clip hf-myclip "
                               "--queries --index ivf --shards 2 --seed 0")
    from refground.retrieval.store import index_problems

    probs = index_problems(shard.parent)
    assert len(probs) == 1 and "faiss cannot read" in probs[0]
    again = build_index_artifact(path, "queries", IndexSpec(type="ivf", shards=2))
    assert again["status"] == "written" and not index_problems(shard.parent)  # damaged = not current
    # Re-extracted embeddings: every index of them is stale, with the command that rebuilds it.
    shutil.rmtree(clip)
    make_tiny_clip(clip, seed=3)
    assert main(["extract", "--cache", str(root), "--detector", f"hf:{detr}", "--clip", f"hf:{clip}",
                 "--no-dense", "--max-proposals", "3"]) == 0
    capsys.readouterr()
    stale = {e.name: e for e in verify(root) if e.kind == "index/hf-myclip"}
    assert stale["images-flat"].status == "stale" and "clip" in stale["images-flat"].problems[0]
    # A leftover staging folder of a killed build is listed, and swept.
    left = root / "synth" / "index" / "hf-myclip" / ".images-flat.tmp-0123abcd"
    left.mkdir()
    assert any(e.status == "leftover" and e.path == left for e in verify(root))
    verify(root, sweep=True)
    assert not left.exists()
    res = run_json(capsys, "cache", "ls", "--cache", str(root))
    kinds = {e["kind"] for e in res["entries"]}
    assert "index/hf-myclip" in kinds
    assert flat["status"] == ivf["status"] == "written"
