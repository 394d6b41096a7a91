"""The artifact store: fingerprints and manifests, chunked resumable jobs, HDF5/zarr layouts, cache ls/verify."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fake_sources import FakeClip, FakeSource, boxes_of
from refground.cache import (ChunkedJob, RaggedH5, Shard, block_batches, dataset_fingerprint, file_digest,
                             fingerprint, is_current, manifest_path, parent, read_manifest_of, require,
                             stale_parents, write_h5, write_manifest)
from refground.cache.listing import list_cache, verify
from refground.data.store import dataset_dir
from refground.errors import ArtifactError, UsageError
from refground.features import extract as X


# ------------------------------------------------------------------------------------ fingerprints
def test_fingerprint_depends_on_every_input():
    base = fingerprint("s@1", {"a": 1, "b": [1, 2]}, {"dataset": "x"})
    assert base == fingerprint("s@1", {"b": [1, 2], "a": 1}, {"dataset": "x"})  # key order irrelevant
    assert base != fingerprint("s@2", {"a": 1, "b": [1, 2]}, {"dataset": "x"})
    assert base != fingerprint("s@1", {"a": 2, "b": [1, 2]}, {"dataset": "x"})
    assert base != fingerprint("s@1", {"a": 1, "b": [1, 2]}, {"dataset": "y"})


def test_file_digest_of_files_and_folders(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w.bin").write_bytes(b"abc")
    (tmp_path / "m" / ".hidden").write_bytes(b"zzz")
    d0 = file_digest(tmp_path / "m")
    (tmp_path / "m" / ".hidden").write_bytes(b"changed")  # hidden files are not inputs
    assert file_digest(tmp_path / "m") == d0
    (tmp_path / "m" / "w.bin").write_bytes(b"abd")
    assert file_digest(tmp_path / "m") != d0
    import hashlib

    assert file_digest(tmp_path / "m" / "w.bin") == hashlib.sha256(b"abd").hexdigest()
    with pytest.raises(ArtifactError, match="missing input file"):
        file_digest(tmp_path / "nope")


def test_manifest_paths_and_require_messages(tmp_path):
    assert manifest_path(tmp_path / "features" / "x.h5").name == "x.h5.manifest.json"
    assert manifest_path(tmp_path / "dense" / "x.zarr").name == "x.zarr.manifest.json"
    assert manifest_path(tmp_path / "runs" / "cmrin" / "default") == tmp_path / "runs" / "cmrin" / "default" / "manifest.json"
    art = tmp_path / "features" / "x.h5"
    with pytest.raises(ArtifactError, match=r"x\.h5: missing; run `refground extract`"):
        require(art, "refground extract")
    (tmp_path / "features" / "x.h5.partial").mkdir(parents=True)
    with pytest.raises(ArtifactError, match="half-written"):
        require(art, "refground extract")
    art.write_bytes(b"")
    write_manifest(art, step="s@1", params={}, parents={}, fingerprint="f", complete=False)
    with pytest.raises(ArtifactError, match="incomplete"):
        require(art)
    assert not is_current(art, "f")
    write_manifest(art, step="s@1", params={}, parents={}, fingerprint="f")
    assert is_current(art, "f") and not is_current(art, "g")
    assert require(art).kind == "features"


def test_stale_parents_follow_the_chain(tmp_path, synth_cache):
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"weights-1")
    a = tmp_path / "features" / "a.h5"
    a.parent.mkdir()
    a.write_bytes(b"")
    parents = {"dataset": parent("dataset", dataset_dir("synth", synth_cache)), "detector": parent("file", ckpt)}
    write_manifest(a, step="s@1", params={}, parents=parents, fingerprint="fa")
    b = tmp_path / "graph" / "a.h5"
    b.parent.mkdir()
    b.write_bytes(b"")
    write_manifest(b, step="g@1", params={}, parents={"features": parent("artifact", a)}, fingerprint="fb")
    assert stale_parents(read_manifest_of(a)) == [] and stale_parents(read_manifest_of(b)) == []
    ckpt.write_bytes(b"weights-2")  # a changed checkpoint makes the features stale ...
    assert stale_parents(read_manifest_of(a)) == ["detector"]
    with pytest.raises(ArtifactError, match="stale .its detector changed"):
        require(a, "refground extract", check_parents=True)
    # ... and once the features are re-made (new fingerprint), the graph made from the old ones is stale.
    write_manifest(a, step="s@1", params={}, parents={**parents, "detector": parent("file", ckpt)}, fingerprint="fa2")
    assert stale_parents(read_manifest_of(b)) == ["features"]


def test_dataset_fingerprint_changes_with_its_manifest(tmp_path, synth_cache):
    src = dataset_dir("synth", synth_cache)
    dst = tmp_path / "synth" / "dataset"
    shutil.copytree(src, dst)
    fp = dataset_fingerprint(dst)
    assert fp == dataset_fingerprint(src)
    m = json.loads((dst / "manifest.json").read_text())
    m["params"]["seed"] = 99
    (dst / "manifest.json").write_text(json.dumps(m))
    assert dataset_fingerprint(dst) != fp


# ------------------------------------------------------------------------------------ HDF5 layout
def _chunks(rng, n_chunks=3, per=4):
    out = []
    for k in range(n_chunks):
        c = rng.integers(0, 5, size=per)
        out.append({"images.ids": np.arange(per * k, per * (k + 1)), "p.counts": c,
                    "p.x": rng.random((int(c.sum()), 3)).astype(np.float16), "p.y": np.arange(int(c.sum()))})
    return out


def test_write_h5_layout_and_deterministic_bytes(tmp_path):
    chunks = _chunks(np.random.default_rng(0))
    write_h5(tmp_path / "a.h5", chunks, {"format": "x", "names": ["a", "b"]})
    write_h5(tmp_path / "b.h5", chunks, {"format": "x", "names": ["a", "b"]})
    assert (tmp_path / "a.h5").read_bytes() == (tmp_path / "b.h5").read_bytes()
    allx = np.concatenate([c["p.x"] for c in chunks])
    with RaggedH5(tmp_path / "a.h5") as f:
        assert f.attr("names") == ["a", "b"] and f.attr("format") == "x"
        np.testing.assert_array_equal(f.table("images", "ids"), np.arange(12))
        np.testing.assert_array_equal(f.counts("p"), np.concatenate([c["p.counts"] for c in chunks]))
        np.testing.assert_array_equal(f.table("p", "x"), allx)
        o = f.offsets["p"]
        for i in range(12):
            np.testing.assert_array_equal(f.image("p", "x", i), allx[o[i]:o[i + 1]])
    assert not list(tmp_path.glob(".*tmp*"))  # nothing left behind


@pytest.mark.parametrize("rows", [[2, 3, 4, 7, 8], [5], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [9, 2, 3], []])
def test_ragged_read_coalesces_consecutive_images(tmp_path, rows):
    chunks = _chunks(np.random.default_rng(1))
    write_h5(tmp_path / "a.h5", chunks, {})
    allx = np.concatenate([c["p.x"] for c in chunks])
    with RaggedH5(tmp_path / "a.h5") as f:
        o = f.offsets["p"]
        out, off, reads = f.read("p", "x", rows)
        expected = [allx[o[i]:o[i + 1]] for i in rows]
        np.testing.assert_array_equal(out, np.concatenate(expected) if expected else np.zeros((0, 3)))
        for j, e in enumerate(expected):
            np.testing.assert_array_equal(out[off[j]:off[j + 1]], e)
        # One read per run of consecutive images (runs of empty images cost nothing).
        runs = [r for r in np.split(np.asarray(rows), np.flatnonzero(np.diff(rows) != 1) + 1) if len(r)]
        assert reads <= len(runs)
        ids, _, _ = f.read("images", "ids", rows)  # per-image tables read the same way
        np.testing.assert_array_equal(ids, np.asarray(rows, dtype=np.int64))


def test_block_batches_cover_every_item_once_from_consecutive_images():
    item_images = np.repeat(np.arange(50), np.random.default_rng(0).integers(0, 6, 50))
    b1 = block_batches(item_images, 16, np.random.default_rng(1))
    b2 = block_batches(item_images, 16, np.random.default_rng(2))
    for batches in (b1, b2):
        assert sorted(np.concatenate(batches).tolist()) == list(range(len(item_images)))
        assert all(len(b) <= 16 for b in batches)
        for b in batches:  # consecutive items -> consecutive image rows -> one contiguous read
            assert np.all(np.diff(b) == 1)
    assert [b.tolist() for b in b1] != [b.tolist() for b in b2]  # epochs differ
    with pytest.raises(ValueError):
        block_batches(np.array([2, 1]), 4, np.random.default_rng(0))
    assert block_batches(np.zeros(0, np.int64), 4, np.random.default_rng(0)) == []


# ------------------------------------------------------------------------------------ chunked jobs
def test_shards_partition_the_chunks_and_parse():
    job_chunks = 23
    for n in (1, 2, 3, 5, 23, 30):
        got = []
        for k in range(n):
            lo = k * job_chunks // n
            got += list(range(lo, (k + 1) * job_chunks // n))
        assert got == list(range(job_chunks))
    assert Shard.parse("2/4") == Shard(1, 4) and str(Shard(1, 4)) == "2/4" and Shard.parse("").whole
    for bad in ("0/3", "4/3", "x", "1/0", "1-2"):
        with pytest.raises(UsageError, match="--shard"):
            Shard.parse(bad)


def test_job_with_other_fingerprint_is_wiped(tmp_path):
    job = ChunkedJob(tmp_path / "a.h5", "fp1", 10, 4)
    job.save(0, {"images.ids": np.arange(4)})
    assert ChunkedJob(tmp_path / "a.h5", "fp1", 10, 4).done() == {0}
    assert ChunkedJob(tmp_path / "a.h5", "fp2", 10, 4).done() == set()
    job = ChunkedJob(tmp_path / "a.h5", "fp2", 10, 4)
    assert job.num_chunks == 3 and job.chunk_range(2) == (8, 10)
    assert job.todo(Shard(1, 2)) == [1, 2] and job.todo(Shard(0, 2)) == [0]


# ------------------------------------------------------------------------------------ extraction runs
def _targets(root: Path, clip: bool = False) -> list[X.Target]:
    kinds = ["features", "dense"] + (["clip"] if clip else [])
    suffix = {"features": "h5", "dense": "zarr", "clip": "h5"}
    return [X.Target(k, root / k / f"fake.{suffix[k]}", f"{k}@1", {}, {}, f"fp-{k}", {"format": k}) for k in kinds]


def _run(ds, root, src, clip=None, shard=Shard(), chunk=8):
    ex = X.Extractor(ds, src, src, clip, max_proposals=10, batch_size=3, dense_size=64)
    return X.run(ds, _targets(root, clip is not None), ex, chunk, shard)


def test_extraction_contents_match_the_sources(tmp_path, synth_ds):
    src, clip = FakeSource(), FakeClip()
    res = _run(synth_ds, tmp_path, src, clip)
    assert res["images_computed"] == synth_ds.num_images and not res["pending"]
    from refground.features.base import read_image
    from refground.data.store import image_path

    with RaggedH5(tmp_path / "features" / "fake.h5") as f:
        np.testing.assert_array_equal(f.table("images", "ids"), synth_ds.image_ids)
        np.testing.assert_array_equal(f.offsets["objects"], synth_ds.image_object_offsets)
        np.testing.assert_array_equal(f.table("objects", "ids"), synth_ds.object_ids)
        for row in (0, 5, synth_ds.num_images - 1):
            iid = int(synth_ds.image_ids[row])
            im = read_image(image_path(synth_ds, iid))
            p = src.propose([im], [iid], 10)[0]
            np.testing.assert_array_equal(f.image("proposals", "boxes", row), p.boxes.numpy())
            np.testing.assert_array_equal(f.image("proposals", "scores", row), p.scores.numpy())
            exp = src.region_features([im], [p.boxes])[0].numpy().astype(np.float16)
            np.testing.assert_array_equal(f.image("proposals", "features", row), exp)
            gt = src.region_features([im], [torch.as_tensor(boxes_of(synth_ds, row), dtype=torch.float32)])[0]
            np.testing.assert_array_equal(f.image("objects", "features", row), gt.numpy().astype(np.float16))
    with RaggedH5(tmp_path / "clip" / "fake.h5") as c:
        q = c.table("queries", "ids")
        assert sorted(q.tolist()) == sorted(synth_ds.query_ids.tolist())
        row = 3
        qids = c.image("queries", "ids", row)
        assert all(synth_ds.query(int(i)).image_id == synth_ds.image_ids[row] for i in qids)
        texts = [synth_ds.query(int(i)).text for i in qids]
        np.testing.assert_array_equal(c.image("queries", "embedding", row),
                                      clip.embed_texts(texts).numpy().astype(np.float16))
        assert c.table("categories", "embedding").shape == (len(synth_ds.categories), 4)
        assert c.attr("category_names") is None  # attrs come from the pipeline, not the bare run
        assert len(c.table("objects", "embedding")) == synth_ds.num_objects
    import zarr

    g = zarr.open_group(str(tmp_path / "dense" / "fake.zarr"), mode="r")
    assert g["s8"].shape == (synth_ds.num_images, 3, 8, 8) and g["s32"].shape == (synth_ds.num_images, 3, 2, 2)
    np.testing.assert_array_equal(g["image_ids"][:], synth_ds.image_ids)


def test_interrupted_run_resumes_to_identical_artifacts(tmp_path, synth_ds):
    _run(synth_ds, tmp_path / "whole", FakeSource())
    src = FakeSource(fail_after=4)  # 4 batches of 3 images = 1.5 chunks of 8: chunk 0 committed, chunk 1 not
    with pytest.raises(KeyboardInterrupt):
        _run(synth_ds, tmp_path / "cut", src)
    job = ChunkedJob(tmp_path / "cut" / "features" / "fake.h5", "fp-features", synth_ds.num_images, 8)
    assert job.done() == {0}
    assert not (tmp_path / "cut" / "features" / "fake.h5").exists()
    src2 = FakeSource()
    res = _run(synth_ds, tmp_path / "cut", src2)
    assert res["chunks_computed"] == 2 and src2.calls == 6  # only the missing chunks were computed
    a = (tmp_path / "whole" / "features" / "fake.h5").read_bytes()
    assert a == (tmp_path / "cut" / "features" / "fake.h5").read_bytes()
    import zarr

    ga = zarr.open_group(str(tmp_path / "whole" / "dense" / "fake.zarr"), mode="r")
    gb = zarr.open_group(str(tmp_path / "cut" / "dense" / "fake.zarr"), mode="r")
    for k in ga.array_keys():
        np.testing.assert_array_equal(ga[k][:], gb[k][:])
    assert not (tmp_path / "cut" / "features" / "fake.h5.partial").exists()


def test_shards_fill_disjoint_chunks_and_the_last_one_assembles(tmp_path, synth_ds):
    _run(synth_ds, tmp_path / "whole", FakeSource())
    r1 = _run(synth_ds, tmp_path / "sh", FakeSource(), shard=Shard(0, 3))
    assert r1["pending"] and not (tmp_path / "sh" / "features" / "fake.h5").exists()
    r3 = _run(synth_ds, tmp_path / "sh", FakeSource(), shard=Shard(2, 3))
    assert r3["pending"]
    r2 = _run(synth_ds, tmp_path / "sh", FakeSource(), shard=Shard(1, 3))
    assert not r2["pending"] and r1["chunks_computed"] + r2["chunks_computed"] + r3["chunks_computed"] == 3
    assert (tmp_path / "whole" / "features" / "fake.h5").read_bytes() == \
        (tmp_path / "sh" / "features" / "fake.h5").read_bytes()


def test_finalise_refuses_missing_chunks(tmp_path, synth_ds):
    _run(synth_ds, tmp_path, FakeSource(), shard=Shard(0, 2))
    with pytest.raises(ArtifactError, match=r"1 of 3 chunks missing|2 of 3 chunks missing"):
        X.finalise(tmp_path / "features" / "fake.h5.partial")


# ------------------------------------------------------------------------------------ ls / verify
def test_ls_and_verify_find_partials_leftovers_stale_and_damage(tmp_path, synth_cache):
    root = tmp_path / "cache"
    shutil.copytree(synth_cache / "synth" / "dataset", root / "synth" / "dataset")
    feats = root / "synth" / "features"
    feats.mkdir()
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"w1")
    good = feats / "good.h5"
    write_h5(good, _chunks(np.random.default_rng(0)), {"format": "x"})
    write_manifest(good, step="s@1", params={}, parents={"detector": parent("file", ckpt)}, fingerprint="g")
    bad = feats / "bad.h5"
    with h5py.File(bad, "w") as f:  # offsets promise more rows than the array holds
        f["p/offsets"] = np.array([0, 3, 9])
        f["p/x"] = np.zeros((5, 2))
    write_manifest(bad, step="s@1", params={}, parents={}, fingerprint="b")
    ChunkedJob(feats / "half.h5", "fp", 10, 4).save(0, {"images.ids": np.arange(4)})
    (feats / ".good.h5.tmp-0123abcd").write_bytes(b"junk")
    entries = {(e.kind, e.name): e for e in list_cache(root)}
    assert entries[("dataset", "synth")].status == "complete"
    assert entries[("features", "good.h5")].status == "complete"
    assert entries[("features", "half.h5")].status == "partial" and entries[("features", "half.h5")].detail == "1/3 chunks"
    assert entries[("features", ".good.h5.tmp-0123abcd")].status == "leftover"
    checked = {(e.kind, e.name): e for e in verify(root)}
    assert checked[("features", "good.h5")].status == "complete"
    assert checked[("features", "bad.h5")].status == "damaged"
    assert "p/x has 5 rows, offsets say 9" in checked[("features", "bad.h5")].problems[0]
    ckpt.write_bytes(b"w2")
    assert {(e.kind, e.name): e for e in verify(root)}[("features", "good.h5")].status == "stale"
    verify(root, sweep=True)
    assert not (feats / ".good.h5.tmp-0123abcd").exists() and (feats / "half.h5.partial").exists()


def test_h5_bytes_do_not_depend_on_the_hash_seed(tmp_path):
    """Two processes with different PYTHONHASHSEED write the same bytes (no set/dict order leaks in)."""
    import subprocess
    import sys

    code = ("import numpy as np, sys; from refground.cache import write_h5; "
            "write_h5(sys.argv[1], [{'images.ids': np.arange(3), 'b.counts': np.array([1, 0, 2]), "
            "'b.x': np.ones((3, 2)), 'a.counts': np.array([2, 1, 0]), 'a.y': np.zeros(3), 'c.z': np.arange(3)}], "
            "{'format': 'x'})")
    for seed in ("1", "2", "3"):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / f"{seed}.h5")], check=True,
                       env={**__import__("os").environ, "PYTHONHASHSEED": seed})
    assert (tmp_path / "1.h5").read_bytes() == (tmp_path / "2.h5").read_bytes() == (tmp_path / "3.h5").read_bytes()
