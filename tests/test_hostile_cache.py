"""Hostile-input regressions of the cache itself (issue 14): edited, truncated or deleted files, moved and copied
caches, `cache verify --sweep` next to live jobs, SIGTERM, two writers of one artifact, a --cache that is a
file. Each test failed on the code before the fix."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import fail, lock_held_elsewhere, run_json
from refground.cache import fingerprint, is_current, read_manifest_of, write_manifest
from refground.cache.listing import verify
from refground.cache.lock import artifact_lock, lock_path
from refground.data.store import dataset_dir, load_dataset, load_named
from refground.errors import ArtifactError, DataError

SYNTH = ["--num-images", "24", "--image-size", "128", "--seed", "0", "--workers", "1"]


@pytest.fixture
def cache(tmp_path, synth_cache) -> Path:
    """A private copy of the fixture cache (dataset "synth" only)."""
    root = tmp_path / "cache"
    shutil.copytree(synth_cache / "synth" / "dataset", root / "synth" / "dataset")
    return root


def _statuses(root: Path) -> dict[tuple[str, str], object]:
    return {(e.kind, e.name): e for e in verify(root)}


# ------------------------------------------------------------------------------ case 7a/7b: edited datasets
@pytest.mark.parametrize("column", ["object_boxes.npy", "query_texts.json"])
def test_edited_dataset_column_is_refused_named_and_repaired(cache, capsys, column):
    ann = dataset_dir("synth", cache) / "annotations" / column
    if column.endswith(".npy"):
        a = np.load(ann)
        a[0, 0] += 1  # same size, other content: what an editing user does
        np.save(ann, a)
    else:
        texts = json.loads(ann.read_text())
        texts[0] = texts[0][::-1]
        ann.write_text(json.dumps(texts, separators=(",", ":"), sort_keys=True))
    with pytest.raises(DataError, match=f"{column}: .*run `refground data synth --dataset synth .*--force`"):
        load_named("synth", cache)
    entry = _statuses(cache)[("dataset", "synth")]
    assert entry.status == "damaged" and column in entry.problems[0]
    msg = fail(capsys, "cache", "verify", "--cache", str(cache))
    assert column in msg and "refground data synth --dataset synth --num-images 24" in msg
    # The advice repairs it: the same `data synth` regenerates instead of saying "complete, skipping".
    out = run_json(capsys, "data", "synth", "--cache", str(cache), *SYNTH)
    assert out["skipped"] is False
    assert _statuses(cache)[("dataset", "synth")].status == "complete"
    load_named("synth", cache)


def test_deleted_or_truncated_column_is_named_and_data_synth_repairs_it(cache, capsys):
    ann = dataset_dir("synth", cache) / "annotations"
    (ann / "query_texts.json").unlink()
    with open(ann / "object_boxes.npy", "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(DataError, match=r"annotations/.*(missing|bytes).*run `refground data synth"):
        load_named("synth", cache)
    assert _statuses(cache)[("dataset", "synth")].status == "damaged"
    # Before: `data synth` said "complete with the same parameters; skipping" and the next step failed.
    assert run_json(capsys, "data", "synth", "--cache", str(cache), *SYNTH)["skipped"] is False
    load_named("synth", cache)


def test_edited_image_is_caught_by_verify(cache, capsys):
    images = sorted((dataset_dir("synth", cache) / "images").glob("*.png"))
    with open(images[3], "r+b") as fh:
        fh.seek(60)
        b = fh.read(1)
        fh.seek(60)
        fh.write(bytes([b[0] ^ 0xFF]))
    entry = _statuses(cache)[("dataset", "synth")]
    assert entry.status == "damaged" and images[3].name in entry.problems[0]


# --------------------------------------------------------------- case 7c/7f/9: damaged artifacts, cache hits
def _graph(cache: Path, capsys) -> dict:
    return run_json(capsys, "graph", "--cache", str(cache), "--features", "")


def test_truncated_artifact_is_not_a_cache_hit_and_rerunning_the_step_repairs_it(cache, capsys):
    assert _graph(cache, capsys)["status"] == "written"
    path = cache / "synth" / "graph" / "gt.h5"
    m = read_manifest_of(path)
    assert is_current(path, m.fingerprint)
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)
    # Before: the manifest alone made it current ("cache hit") although the advice said "re-run the step".
    assert not is_current(path, m.fingerprint)
    entry = _statuses(cache)[("graph", "gt.h5")]
    assert entry.status == "damaged" and "gt.h5" in entry.problems[0]
    msg = fail(capsys, "cache", "verify", "--cache", str(cache))
    assert "gt.h5" in msg and "refground graph --dataset synth" in msg
    _graph(cache, capsys)
    assert is_current(path, m.fingerprint)
    assert _statuses(cache)[("graph", "gt.h5")].status == "complete"


def test_reader_refuses_an_artifact_edited_at_the_same_size(cache, capsys):
    from refground.cache import require

    _graph(cache, capsys)
    path = cache / "synth" / "graph" / "gt.h5"
    with open(path, "r+b") as fh:
        fh.seek(path.stat().st_size - 10)
        fh.write(b"\0" * 10)
    with pytest.raises(ArtifactError, match="gt.h5: content changed.*run `refground graph`"):
        require(path, "refground graph")


def _fake_run(cache: Path) -> Path:
    run = cache / "synth" / "runs" / "toy" / "r"
    run.mkdir(parents=True)
    (run / "model.pt").write_bytes(os.urandom(300_000))
    (run / "checkpoint.pt").write_bytes(os.urandom(700_000))
    (run / "config.json").write_text("{}")
    write_manifest(run, step="train.toy@1", params={}, parents={}, fingerprint=fingerprint("t", {}, {}), kind="runs")
    return run


@pytest.mark.parametrize("victim", ["model.pt", "checkpoint.pt"])
def test_truncated_weights_are_caught_by_verify_and_are_not_current(cache, victim):
    run = _fake_run(cache)
    fp = read_manifest_of(run).fingerprint
    assert _statuses(cache)[("runs/toy", "r")].status == "complete"
    with open(run / victim, "r+b") as fh:
        fh.truncate(1000)
    entry = _statuses(cache)[("runs/toy", "r")]
    assert entry.status == "damaged" and victim in entry.problems[0]
    assert not is_current(run, fp)


def test_emptied_zarr_chunk_is_caught_by_verify(cache):
    from refground.cache import ChunkedJob
    from refground.cache.zarrstore import write_zarr

    path = cache / "synth" / "dense" / "toy.zarr"
    job = ChunkedJob(path, "fp", num_items=8, chunk_size=4)
    for k in range(2):
        job.save(k, {"s8.map": np.full((4, 2, 4, 4), k + 1, np.float16), "images.ids": np.arange(4 * k, 4 * k + 4)})
    write_zarr(path, job, {"format": "test"}, images_per_chunk=2)
    job.remove()
    write_manifest(path, step="extract.dense@1", params={}, parents={}, fingerprint="fp", kind="dense")
    assert _statuses(cache)[("dense", "toy.zarr")].status == "complete"
    chunk = max((p for p in (path / "s8").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    chunk.write_bytes(b"")
    entry = _statuses(cache)[("dense", "toy.zarr")]
    assert entry.status == "damaged" and chunk.name in entry.problems[0]
    assert not is_current(path, "fp")


def test_deep_verify_catches_what_the_sampled_hash_does_not(cache):
    run = _fake_run(cache)
    blob = run / "checkpoint.pt"
    # A byte between the sampled blocks of a file over 512 KiB: only --deep reads it.
    with open(blob, "r+b") as fh:
        fh.seek(80_000)
        b = fh.read(1)
        fh.seek(80_000)
        fh.write(bytes([b[0] ^ 1]))
    assert _statuses(cache)[("runs/toy", "r")].status == "complete"
    deep = {(e.kind, e.name): e for e in verify(cache, deep=True)}
    assert deep[("runs/toy", "r")].status == "damaged"


# -------------------------------------------------------------------------- case 8: moved and copied caches
def test_moved_cache_stays_current_and_copied_cache_sees_its_own_dataset(cache, capsys, tmp_path):
    _graph(cache, capsys)
    moved = tmp_path / "moved"
    shutil.move(str(cache), moved)
    # Before: the parent's absolute path was gone, so the graph was stale after a move.
    assert _graph(moved, capsys)["status"] == "hit"
    assert _statuses(moved)[("graph", "gt.h5")].status == "complete"
    copy = tmp_path / "copy"
    shutil.copytree(moved, copy)
    run_json(capsys, "data", "synth", "--cache", str(copy), "--num-images", "20", "--image-size", "128",
             "--workers", "1")
    # Before: the copy's graph pointed at the original dataset, so the regenerated one went unnoticed.
    assert _statuses(copy)[("graph", "gt.h5")].status == "stale"
    assert _statuses(moved)[("graph", "gt.h5")].status == "complete"
    assert _graph(copy, capsys)["status"] == "written"


# ------------------------------------------------------------------------- case 3: verify --sweep and locks
def test_sweep_leaves_a_live_jobs_folder_and_deletes_a_dead_ones(cache):
    final = cache / "synth" / "graph" / "gt.h5"
    final.parent.mkdir(parents=True)
    live = final.with_name(".gt.h5.tmp-0123abcd")
    live.write_bytes(b"half")
    with lock_held_elsewhere(final):
        entry = {e.name: e for e in verify(cache, sweep=True)}[live.name]
        assert entry.status == "in use" and live.exists()  # before: deleted under the running job
    verify(cache, sweep=True)
    assert not live.exists()


def test_sweep_puts_back_the_only_copy_left_between_two_renames(cache, capsys):
    ds = dataset_dir("synth", cache)
    old = ds.with_name(".dataset.old-89abcdef")
    os.replace(ds, old)  # what a kill between atomic_dir's two renames leaves
    entry = {e.name: e for e in verify(cache, sweep=True)}[old.name]
    assert "restored" in entry.detail
    assert not old.exists() and ds.is_dir()  # before: deleted, the dataset lost
    load_dataset(ds)


def test_second_writer_of_an_artifact_is_refused(cache, capsys):
    with lock_held_elsewhere(cache / "synth" / "graph" / "gt.h5"):
        msg = fail(capsys, "graph", "--cache", str(cache), "--features", "")
        assert "another process is writing it" in msg and "gt.h5" in msg
    with lock_held_elsewhere(dataset_dir("synth", cache)):
        msg = fail(capsys, "data", "synth", "--cache", str(cache), "--force", *SYNTH)
        assert "another process is writing it" in msg
    _graph(cache, capsys)


def test_lock_files_are_not_listed_as_artifacts(cache, capsys):
    _graph(cache, capsys)
    with artifact_lock(cache / "synth" / "graph" / "gt.h5"):
        pass
    assert lock_path(cache / "synth" / "graph" / "gt.h5").exists()
    names = [e.name for e in verify(cache)]
    assert not any(n.endswith(".lock") for n in names)
    run_json(capsys, "cache", "verify", "--cache", str(cache))


# ------------------------------------------------------------------------------------- case 11e: SIGTERM
def test_sigterm_leaves_no_staging_folder(tmp_path):
    root = tmp_path / "c"
    env = {**os.environ, "REFGROUND_CACHE": str(root)}
    proc = subprocess.Popen([sys.executable, "-m", "refground.cli.main", "data", "synth", "--num-images", "400",
                             "--image-size", "128", "--workers", "1"], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not list((root / "synth").glob(".dataset.tmp-*")):
        time.sleep(0.05)
    assert list((root / "synth").glob(".dataset.tmp-*")), "synth did not start"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "terminated" in err
    assert not list((root / "synth").glob(".dataset.*-*"))  # before: the staging folder stayed


# ---------------------------------------------------------------------------- case 10: --cache is a file
def test_cache_option_naming_a_file_is_a_usage_error(tmp_path, capsys):
    f = tmp_path / "notadir"
    f.write_text("x")
    for args in (["cache", "ls"], ["graph"], ["data", "synth", *SYNTH]):
        msg = fail(capsys, *args, "--cache", str(f))
        assert "notadir" in msg and "not a folder" in msg
        msg = fail(capsys, *args, "--cache", str(f / "sub"))  # a folder under a file: was NotADirectoryError
        assert "notadir is a file, not a folder" in msg


def test_query_proposal_sets_are_listed_and_verified(cache):
    """`vlnms/<tag>/<split>.h5` proposal sets were not listed, so `cache verify` never checked them."""
    from refground.cache import write_h5

    path = cache / "synth" / "vlnms" / "fc-bce" / "val.h5"
    path.parent.mkdir(parents=True)
    write_h5(path, [{"images.ids": np.arange(4)}], {"format": "test"})
    write_manifest(path, step="vlnms@1", params={}, parents={}, fingerprint="fp", kind="vlnms")
    (path.parent / "val.jsonl").write_text("{}\n")  # the eval copy beside it: not an artifact
    entries = {(e.kind, e.name): e for e in verify(cache)}
    assert entries[("vlnms/fc-bce", "val.h5")].status == "complete"
    assert not any(name.endswith(".jsonl") for _, name in entries)
    with open(path, "r+b") as fh:
        fh.truncate(100)
    entry = _statuses(cache)[("vlnms/fc-bce", "val.h5")]
    assert entry.status == "damaged" and "val.h5" in entry.problems[0]
