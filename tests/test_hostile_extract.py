"""Hostile-input regressions of `refground extract` (issue 14): forced sharded jobs over a complete artifact
(case 5), damaged `.partial` chunks (case 7d), bytes that depended on the thread count (case 12) and the
writers' locks of extraction (two runs of the same chunks, a job of other inputs next to a live one, the
assembly). Each test failed on the code before the fix."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import fail, lock_held_elsewhere, run_json
from fake_sources import FakeSource
from refground.cache import ChunkedJob, Shard, read_manifest_of
from refground.cache.chunks import partial_dir, rebuild_pending
from refground.errors import ArtifactError
from refground.features import extract as X

FEATS = ("synth", "features", "detector-default.h5")
DENSE = ("synth", "dense", "detector-default.zarr")
# Four images a chunk: the 24-image fixture is six chunks, three per shard of two.
OPTS = ["--chunk-size", "4", "--no-dense", "--max-proposals", "20"]


@pytest.fixture
def cache(pipeline_cache, tmp_path) -> Path:
    """A private copy of the pipeline cache (dataset, tiny trained detector, its complete features)."""
    root = tmp_path / "cache"
    shutil.copytree(pipeline_cache, root)
    return root


def h5_arrays(path: Path) -> dict[str, np.ndarray]:
    import h5py

    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if hasattr(obj, "shape") else None)
    return out


def drop_features(root: Path) -> Path:
    """Delete the complete features artifact (a first extraction, not a rebuild); returns its path."""
    feats = root.joinpath(*FEATS)
    feats.unlink()
    feats.with_name(feats.name + ".manifest.json").unlink()
    return feats


# ----------------------------------------------------------------- case 5: forced shards over a complete artifact
def test_forced_shards_over_a_complete_artifact_rebuild_it(cache, capsys):
    c = str(cache)
    feats = cache.joinpath(*FEATS)
    partial = partial_dir(feats)
    assert run_json(capsys, "extract", "--cache", c, *OPTS, "--force")["artifacts"]["features"]["status"] == "written"
    ref = feats.read_bytes()
    inode = feats.stat().st_ino

    r1 = run_json(capsys, "extract", "--cache", c, *OPTS, "--force", "--shard", "1/2")
    assert r1["artifacts"]["features"]["status"] == "pending" and r1["chunks_computed"] == 3
    assert sorted(p.name for p in partial.glob("chunk-*.npz")) == [f"chunk-00000{k}.npz" for k in range(3)]
    # Before: the second forced shard wiped the first one's chunks, so the job never completed.
    r2 = run_json(capsys, "extract", "--cache", c, *OPTS, "--force", "--shard", "2/2")
    assert r2["chunks_computed"] == 3 and r2["artifacts"]["features"]["status"] == "written"
    assert not partial.exists() and feats.stat().st_ino != inode  # replaced, by the same bytes
    assert feats.read_bytes() == ref

    # Before: a shard run without --force took the old artifact for current ("cache hit") and never
    # computed its chunks.
    inode = feats.stat().st_ino
    run_json(capsys, "extract", "--cache", c, *OPTS, "--force", "--shard", "2/2")
    assert rebuild_pending(feats, read_manifest_of(feats).fingerprint)
    r3 = run_json(capsys, "extract", "--cache", c, *OPTS, "--shard", "1/2")
    assert not r3["cache_hit"] and r3["chunks_computed"] == 3
    assert r3["artifacts"]["features"]["status"] == "written" and feats.stat().st_ino != inode
    assert feats.read_bytes() == ref and not partial.exists()
    assert run_json(capsys, "extract", "--cache", c, *OPTS, "--shard", "2/2")["cache_hit"]


def test_restart_forgets_only_its_own_shard(tmp_path):
    job = ChunkedJob(tmp_path / "a.h5", "fp", 12, 4)
    for k in range(3):
        job.save(k, {"images.ids": np.arange(4 * k, 4 * k + 4)})
    job.restart(Shard(1, 2))  # chunks 1 and 2
    assert job.done() == {0} and job.forced and rebuild_pending(tmp_path / "a.h5", "fp")
    assert not rebuild_pending(tmp_path / "a.h5", "other")
    # Reopening the same job (another shard) keeps its chunks and the mark; another fingerprint discards both.
    again = ChunkedJob(tmp_path / "a.h5", "fp", 12, 4)
    assert again.done() == {0} and again.forced
    assert ChunkedJob(tmp_path / "a.h5", "fp2", 12, 4).done() == set()
    assert not rebuild_pending(tmp_path / "a.h5", "fp")


# ----------------------------------------------------------------------------- case 7d: damaged .partial chunks
def _targets(root: Path) -> list[X.Target]:
    return [X.Target("features", root / "features" / "fake.h5", "features@1", {}, {}, "fp-features", {"format": "f"})]


def _run(ds, root: Path, shard: Shard = Shard(), force: bool = False) -> dict:
    src = FakeSource()
    ex = X.Extractor(ds, src, src, None, max_proposals=10, batch_size=3, dense_size=64)
    return X.run(ds, _targets(root), ex, 4, shard, force=force)


def _truncate(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)


def test_truncated_or_incomplete_chunk_is_computed_again(tmp_path, synth_ds, caplog):
    _run(synth_ds, tmp_path / "whole")
    root = tmp_path / "cut"
    _run(synth_ds, root, Shard(0, 2))  # chunks 0-2 of 6
    job = ChunkedJob(root / "features" / "fake.h5", "fp-features", synth_ds.num_images, 4)
    _truncate(job.chunk_path(1))  # a full disk, or a copy cut short
    with open(job.chunk_path(2), "wb") as fh:  # an archive without the arrays a chunk must hold
        np.savez(fh, **{"images.ids": np.arange(4)})
    with caplog.at_level(logging.WARNING, logger="refground.cache.chunks"):
        res = _run(synth_ds, root)  # before: zipfile.BadZipFile (exit 1), on every rerun
    assert res["chunks_computed"] == 5 and not res["pending"]
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and "chunk-000001.npz: unreadable chunk (BadZipFile" in warned[0]
    assert "chunk-000002.npz: unreadable chunk (lacks " in warned[1]
    assert (root / "features" / "fake.h5").read_bytes() == (tmp_path / "whole" / "features" / "fake.h5").read_bytes()


def test_unreadable_chunk_is_a_one_line_error_and_is_deleted(tmp_path, synth_ds):
    root = tmp_path / "c"
    _run(synth_ds, root, Shard(0, 2))
    job = ChunkedJob(root / "features" / "fake.h5", "fp-features", synth_ds.num_images, 4)
    _truncate(job.chunk_path(0))
    with pytest.raises(ArtifactError, match=r"chunk-000000\.npz: unreadable chunk \(BadZipFile") as exc:
        job.load(0)  # before: zipfile.BadZipFile, which the CLI reports as an internal error
    assert len(str(exc.value).splitlines()) == 1 and not job.chunk_path(0).exists()
    # A flipped byte inside an array: the archive opens, its CRC fails when the assembly reads it.
    path = job.chunk_path(1)
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("proposals.features.npy")
    with open(path, "r+b") as fh:
        at = info.header_offset + 30 + len(info.filename) + info.file_size - 1
        fh.seek(at)
        b = fh.read(1)
        fh.seek(at)
        fh.write(bytes([b[0] ^ 0xFF]))
    _run(synth_ds, root, Shard(0, 2))  # chunk 0 again; chunk 1 passes the cheap check
    with pytest.raises(ArtifactError, match=r"chunk-000001\.npz: unreadable chunk \(BadZipFile: Bad CRC-32"):
        _run(synth_ds, root, Shard(1, 2))  # the last shard assembles
    assert not path.exists() and not (root / "features" / "fake.h5").exists()
    assert not _run(synth_ds, root, Shard(0, 2))["pending"]


def test_truncated_chunk_cli_exit_codes(cache, capsys):
    c = str(cache)
    feats = drop_features(cache)
    run_json(capsys, "extract", "--cache", c, *OPTS, "--shard", "1/2")
    chunk = partial_dir(feats) / "chunk-000001.npz"
    _truncate(chunk)
    from refground.cli.main import main

    rc = main(["extract", "--cache", c, *OPTS, "--json"])  # before: exit 1, BadZipFile, on every rerun
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert json.loads(out.out)["chunks_computed"] == 4 and feats.is_file()
    assert f"warning: {chunk}: unreadable chunk (BadZipFile" in out.err and len(out.err.splitlines()) == 1


# ------------------------------------------------------------------------------- case 12: thread count and bytes
def test_extracted_bytes_do_not_depend_on_the_thread_count(cache, tmp_path):
    """The same extraction in two processes with 1 and 2 intra-op threads (OMP_NUM_THREADS) stores the same
    bytes. Before, dense maps and proposal boxes/scores differed by up to 2.4e-4 on this tiny data."""
    out = {}
    for threads in ("1", "2"):
        root = tmp_path / f"t{threads}"
        shutil.copytree(cache, root)
        env = {**os.environ, "OMP_NUM_THREADS": threads}
        subprocess.run([sys.executable, "-m", "refground.cli.main", "extract", "--cache", str(root), "--force",
                        "--max-proposals", "20", "--chunk-size", "8"], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        out[threads] = root
    a, b = (h5_arrays(out[t].joinpath(*FEATS)) for t in ("1", "2"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    import zarr

    ga, gb = (zarr.open_group(str(out[t].joinpath(*DENSE)), mode="r") for t in ("1", "2"))
    for key in ga.array_keys():
        np.testing.assert_array_equal(ga[key][:], gb[key][:], err_msg=key)
    extra = read_manifest_of(out["2"].joinpath(*FEATS)).extra
    assert extra["threads"] == 1 and extra["torch"]


def test_worker_processes_store_the_same_bytes(cache, tmp_path, capsys):
    """``--workers 2`` (two spawned processes, one shard each, one thread each) writes the bytes one process
    writes: the speed of two threads without their thread-count-dependent rounding."""
    other = tmp_path / "other"
    shutil.copytree(cache, other)
    opts = ("--force", "--no-dense", "--max-proposals", "20", "--chunk-size", "2")
    one = run_json(capsys, "extract", "--cache", str(cache), *opts, "--workers", "1")
    two = run_json(capsys, "extract", "--cache", str(other), *opts, "--workers", "2")
    assert "workers" not in one and two["workers"] == 2 and two["chunks_computed"] == one["chunks_computed"] == 12
    assert two["artifacts"]["features"]["status"] == "written" and not partial_dir(other.joinpath(*FEATS)).exists()
    a, b = h5_arrays(cache.joinpath(*FEATS)), h5_arrays(other.joinpath(*FEATS))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert read_manifest_of(other.joinpath(*FEATS)).fingerprint == read_manifest_of(cache.joinpath(*FEATS)).fingerprint


def test_other_thread_count_is_another_artifact_state(cache, capsys):
    c = str(cache)
    feats = cache.joinpath(*FEATS)
    fp = read_manifest_of(feats).fingerprint
    assert run_json(capsys, "extract", "--cache", c, *OPTS)["cache_hit"]
    res = run_json(capsys, "extract", "--cache", c, *OPTS, "--threads", "2")
    assert not res["cache_hit"] and res["artifacts"]["features"]["status"] == "written"
    m = read_manifest_of(feats)
    assert m.fingerprint != fp and m.params["threads"] == 2 and m.extra["threads"] == 2
    assert "--threads 0: must be at least 1" in fail(capsys, "extract", "--cache", c, "--threads", "0")


# ----------------------------------------------------------------------------------------------------- locks
def test_second_run_of_the_same_chunks_is_refused(cache, capsys):
    c = str(cache)
    partial = partial_dir(cache.joinpath(*FEATS))
    with lock_held_elsewhere(partial / "shard-1-of-1"):  # a whole run is under way
        err = fail(capsys, "extract", "--cache", c, *OPTS, "--force")  # before: both ran, racing
        assert "another `refground extract` is writing it now" in err
        err = fail(capsys, "extract", "--cache", c, *OPTS, "--force", "--shard", "2/2")
        assert "`refground extract` is writing it now and its chunks overlap `refground extract --shard 2/2`'s" in err
    with lock_held_elsewhere(partial / "shard-2-of-2"):
        err = fail(capsys, "extract", "--cache", c, *OPTS, "--force", "--shard", "2/2")
        assert "another `refground extract --shard 2/2` is writing it now" in err
        # Shards of one split run side by side: that is what --shard is for.
        res = run_json(capsys, "extract", "--cache", c, *OPTS, "--force", "--shard", "1/2")
        assert res["artifacts"]["features"]["status"] == "pending" and res["chunks_computed"] == 3
        # A job of other options must not wipe the live job's folder.
        err = fail(capsys, "extract", "--cache", c, *OPTS[:-1], "5", "--shard", "1/2")
        assert "`refground extract --shard 2/2` is filling it with other inputs or options now" in err
        assert len(list(partial.glob("chunk-*.npz"))) == 3
    res = run_json(capsys, "extract", "--cache", c, *OPTS, "--shard", "2/2")
    assert res["artifacts"]["features"]["status"] == "written" and not partial.exists()


def test_assembly_holds_the_artifact_lock(cache, capsys):
    c = str(cache)
    feats = drop_features(cache)
    run_json(capsys, "extract", "--cache", c, *OPTS, "--shard", "1/2")
    with lock_held_elsewhere(feats):  # another process is writing the artifact itself
        res = run_json(capsys, "extract", "--cache", c, *OPTS, "--shard", "2/2")
        assert res["artifacts"]["features"]["status"] == "pending"  # all chunks there, assembly left alone
        err = fail(capsys, "extract", "merge", "--cache", c)
        assert f"{feats}: another process is writing it now" in err
    assert run_json(capsys, "extract", "merge", "--cache", c)["merged"] == [str(feats)]
    assert run_json(capsys, "extract", "--cache", c, *OPTS)["cache_hit"]
