"""`refground extract`, `graph`, `cache ls/verify` with the built-in detector: hits, staleness, kills, shards."""

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
import torch

from refground.cache import RaggedH5
from refground import progress
from refground.features.detector import BuiltinDetector
from refground.features.detector_train import train_detector
from refground.train import MODEL_FILE
from refground.graph import spatial_relations
from refground.graph_artifact import read_graph
from conftest import fail, run_json
from test_detector import tiny_config


@pytest.fixture(scope="module")
def template(synth_cache, synth_ds, tmp_path_factory) -> Path:
    """A cache with the fixture dataset and a tiny trained detector as runs/detector/default."""
    root = tmp_path_factory.mktemp("extract") / "template"
    shutil.copytree(synth_cache / "synth" / "dataset", root / "synth" / "dataset")
    train_detector(synth_ds, root / "synth" / "runs" / "detector" / "default", tiny_config(epochs=1), seed=0,
                   dataset_dir=root / "synth" / "dataset", evaluate=False)
    return root


def clone(template: Path, dest: Path) -> Path:
    shutil.copytree(template, dest)
    return dest


def h5_arrays(path: Path) -> dict[str, np.ndarray]:
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if hasattr(obj, "shape") else None)
    return out


def test_extract_graph_hit_and_staleness(template, synth_ds, tmp_path, capsys):
    root = clone(template, tmp_path / "c")
    c = str(root)
    res = run_json(capsys, "extract", "--cache", c, "--chunk-size", "8")
    assert {k: v["status"] for k, v in res["artifacts"].items()} == {"features": "written", "dense": "written"}
    feats = root / "synth" / "features" / "detector-default.h5"
    det = BuiltinDetector.load(root / "synth" / "runs" / "detector" / "default")
    with RaggedH5(feats) as f:
        counts = f.counts("proposals")
        assert counts.max() <= 100 and counts.min() > 0
        for row in (0, 7):
            s = f.image("proposals", "scores", row)
            assert np.all(np.diff(s) <= 0)  # best first
        # Ground-truth object features are the detector's region features of the ground-truth boxes.
        from refground.data.store import image_path
        from refground.features.base import read_image

        row = 3
        im = read_image(image_path(synth_ds, int(synth_ds.image_ids[row])))
        o = synth_ds.image_object_offsets
        gt = torch.as_tensor(synth_ds.object_boxes[o[row]:o[row + 1]], dtype=torch.float32)
        exp = det.region_features([im], [gt])[0].numpy().astype(np.float16)
        np.testing.assert_allclose(f.image("objects", "features", row).astype(np.float32), exp.astype(np.float32),
                                   atol=2e-3)
        assert f.attr("class_names") == det.class_names and f.attr("feature_dim") == 32
    # Same inputs again: a cache hit that loads no model.
    t0 = time.perf_counter()
    hit = run_json(capsys, "extract", "--cache", c, "--chunk-size", "8")
    assert hit["cache_hit"] and time.perf_counter() - t0 < 2.0
    # Graphs over ground truth and proposals.
    g = run_json(capsys, "graph", "--cache", c)
    assert g["status"] == "written"
    with RaggedH5(root / "synth" / "graph" / "detector-default.h5") as gf, RaggedH5(feats) as f:
        for row in (0, 5):
            boxes = torch.as_tensor(f.image("proposals", "boxes", row))
            size = (int(synth_ds.image_height[row]), int(synth_ds.image_width[row]))
            assert torch.equal(torch.as_tensor(read_graph(gf, "proposals", row)), spatial_relations(boxes, size))
            gt = torch.as_tensor(synth_ds.object_boxes[o[row]:o[row + 1]])
            assert torch.equal(torch.as_tensor(read_graph(gf, "objects", row)), spatial_relations(gt, size))
    assert run_json(capsys, "graph", "--cache", c)["status"] == "hit"
    v = run_json(capsys, "cache", "verify", "--cache", c)
    assert v["ok"]
    listed = run_json(capsys, "cache", "ls", "--cache", c)
    kinds = {(e["kind"], e["name"]) for e in listed["entries"]}
    assert {("features", "detector-default.h5"), ("dense", "detector-default.zarr"),
            ("graph", "detector-default.h5"), ("runs/detector", "default")} <= kinds

    # Changed detector weights make the features stale: later steps refuse them, verify says so, extract redoes.
    weights = root / "synth" / "runs" / "detector" / "default" / MODEL_FILE
    state = torch.load(weights, weights_only=True)
    key = next(k for k in state if k.endswith("weight"))
    state[key] = state[key] * 1.5
    torch.save(state, weights)
    # As a retrained detector would: its manifest records the new weights (a bare edit is "damaged" instead).
    from refground.cache import read_manifest_of, write_manifest

    m = read_manifest_of(weights.parent)
    write_manifest(weights.parent, step=m.step, params=m.params, parents=m.parents, fingerprint=m.fingerprint,
                   extra=m.extra, kind=m.kind)
    err = fail(capsys, "graph", "--cache", c)
    assert "stale (its detector changed since it was made); run `refground extract`" in err
    err = fail(capsys, "cache", "verify", "--cache", c)
    assert "stale" in err
    old = h5_arrays(feats)
    again = run_json(capsys, "extract", "--cache", c, "--chunk-size", "8")
    assert again["artifacts"]["features"]["status"] == "written" and not again["cache_hit"]
    assert not np.array_equal(old["proposals/features"], h5_arrays(feats)["proposals/features"])
    assert run_json(capsys, "graph", "--cache", c)["status"] == "written"  # its input changed: rebuilt
    assert run_json(capsys, "cache", "verify", "--cache", c)["ok"]
    # Another parameter is another artifact state: recomputed, not reused.
    fewer = run_json(capsys, "extract", "--cache", c, "--chunk-size", "8", "--max-proposals", "5", "--no-dense")
    assert fewer["artifacts"]["features"]["status"] == "written"
    with RaggedH5(feats) as f:
        assert f.counts("proposals").max() <= 5


def test_killed_run_resumes_to_the_same_artifact(template, tmp_path, capsys):
    whole = clone(template, tmp_path / "whole")
    run_json(capsys, "extract", "--cache", str(whole), "--chunk-size", "4", "--no-dense")
    cut = clone(template, tmp_path / "cut")
    partial = cut / "synth" / "features" / "detector-default.h5.partial"
    # The same options and thread count as the uninterrupted run: the chunks must come out the same.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-m", "refground.cli.main", "extract", "--cache", str(cut),
                             "--chunk-size", "4", "--no-dense"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(partial.glob("chunk-*.npz")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(partial.glob("chunk-*.npz")))
    assert 1 <= done < 6, "the process should have been killed half-way"
    res = run_json(capsys, "extract", "--cache", str(cut), "--chunk-size", "4", "--no-dense")
    assert res["chunks_computed"] == 6 - done  # only the missing chunks
    a = whole / "synth" / "features" / "detector-default.h5"
    b = cut / "synth" / "features" / "detector-default.h5"
    assert a.read_bytes() == b.read_bytes()


def test_shards_and_merge(template, tmp_path, capsys):
    whole = clone(template, tmp_path / "whole")
    run_json(capsys, "extract", "--cache", str(whole), "--chunk-size", "4", "--no-dense")
    a = clone(template, tmp_path / "a")  # machine A does shard 1/2, machine B shard 2/2; then copy and merge
    b = clone(template, tmp_path / "b")
    r1 = run_json(capsys, "extract", "--cache", str(a), "--chunk-size", "4", "--no-dense", "--shard", "1/2")
    assert r1["artifacts"]["features"]["status"] == "pending" and r1["chunks_computed"] == 3
    err = fail(capsys, "extract", "merge", "--cache", str(a))
    assert "3 of 6 chunks missing" in err
    run_json(capsys, "extract", "--cache", str(b), "--chunk-size", "4", "--no-dense", "--shard", "2/2")
    pa = a / "synth" / "features" / "detector-default.h5.partial"
    for chunk in (b / "synth" / "features" / "detector-default.h5.partial").glob("chunk-*.npz"):
        shutil.copy(chunk, pa / chunk.name)
    merged = run_json(capsys, "extract", "merge", "--cache", str(a))
    assert merged["merged"] == [str(a / "synth" / "features" / "detector-default.h5")]
    assert (whole / "synth" / "features" / "detector-default.h5").read_bytes() == \
        (a / "synth" / "features" / "detector-default.h5").read_bytes()
    assert run_json(capsys, "extract", "--cache", str(a), "--chunk-size", "4", "--no-dense")["cache_hit"]
    assert "nothing to merge" in fail(capsys, "extract", "merge", "--cache", str(a))


def test_missing_inputs_name_the_step(tmp_path, capsys):
    assert "run `refground data synth`" in fail(capsys, "extract", "--cache", str(tmp_path))
    assert "run `refground data synth`" in fail(capsys, "graph", "--cache", str(tmp_path))


def test_interrupted_detector_training_is_refused(template, synth_ds, tmp_path, capsys):
    root = clone(template, tmp_path / "c")
    run = root / "synth" / "runs" / "detector" / "default"
    shutil.rmtree(run)

    def interrupt_in(epoch):
        def tracker(iterable, total, description):
            if f"epoch {epoch}/" in description:
                raise KeyboardInterrupt
            yield from iterable
        return tracker

    def train(tracker=None):
        progress.set_tracker(tracker)
        try:
            train_detector(synth_ds, run, tiny_config(epochs=2), seed=0, dataset_dir=root / "synth" / "dataset",
                           evaluate=False)
        finally:
            progress.set_tracker(None)

    # Stopped in epoch 1: no weights yet.
    with pytest.raises(KeyboardInterrupt):
        train(interrupt_in(1))
    assert not (run / MODEL_FILE).exists()
    err = fail(capsys, "extract", "--cache", str(root))
    assert "default: no trained built-in detector here; run `refground train detector`" in err
    # Stopped in epoch 2: epoch 1's weights and checkpoint, but no complete manifest.
    with pytest.raises(KeyboardInterrupt):
        train(interrupt_in(2))
    assert (run / MODEL_FILE).is_file() and json.loads((run / "manifest.json").read_text())["complete"] is False
    err = fail(capsys, "extract", "--cache", str(root))
    assert "default: incomplete; run `refground train detector`" in err
    # Resumed to the end: accepted.
    train()
    res = run_json(capsys, "extract", "--cache", str(root), "--no-dense", "--max-proposals", "5")
    assert res["artifacts"]["features"]["status"] == "written"
