"""Shared fixtures: a small synthetic dataset saved in a temporary cache (generated once per session)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synth_cache(tmp_path_factory) -> Path:
    """A cache root holding dataset "synth": 24 images of 128x128 with rendered PNGs."""
    from refground.data.store import dataset_dir
    from refground.data.synth import write_synthetic

    root = tmp_path_factory.mktemp("cache")
    write_synthetic(dataset_dir("synth", root), name="synth", num_images=24, seed=0, image_size=128, workers=1)
    return root


@pytest.fixture(scope="session")
def synth_ds(synth_cache):
    from refground.data.store import load_named

    return load_named("synth", synth_cache)


@pytest.fixture
def torch_one_thread():
    """Tiny models: torch's intra-op threads cost far more than the ops on a shared 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_json(capsys, *args) -> dict:
    """Run the CLI with --json; assert exit 0 and return the JSON object it printed."""
    import json

    from refground.cli.main import main

    rc = main([*args, "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)


@contextlib.contextmanager
def lock_held_elsewhere(artifact: Path) -> Iterator[None]:
    """Another live process holding the writer's lock of ``artifact`` (``refground.cache.lock.artifact_lock``)
    for the block: a running job, as a second writer or ``cache verify --sweep`` sees it."""
    import subprocess
    import sys

    code = ("import time\nfrom refground.cache.lock import artifact_lock\n"
            f"with artifact_lock({str(artifact)!r}):\n    print('held', flush=True)\n    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def fail(capsys, *args) -> str:
    """Run the CLI; assert exit 2 with a one-line error and return it."""
    from refground.cli.main import main

    rc = main(list(args))
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    return err


TINY_CMRIN = {"embed_dim": 16, "hidden_dim": 16, "type_dim": 8, "edge_type_dim": 8, "attention_dim": 16,
              "graph_dim": 16, "spatial_dim": 8, "match_dim": 16, "epochs": 2, "batch_size": 16, "lr": 2e-3}


def train_tiny_cmrin(root: Path, name: str = "cmrin", dataset: str = "synth") -> dict:
    """Train the tiny CMRIN config (seed 0) into ``<root>/<dataset>/runs/cmrin/<name>`` on one torch thread."""
    import torch

    from refground.methods.cmrin.model import CMRINConfig
    from refground.methods.cmrin.run import train_cmrin

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_cmrin(dataset, root, name, CMRINConfig(**TINY_CMRIN), seed=0)
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="session")
def pipeline_cache(synth_cache, synth_ds, tmp_path_factory) -> Path:
    """A cache with the fixture dataset, a tiny detector (runs/detector/default), its features (no dense
    maps) and graphs: everything `refground train cmrin` needs. Copy it before writing into it."""
    import shutil

    import torch

    from refground.features.detector_train import train_detector
    from refground.features.pipeline import extract_dataset
    from refground.graph_artifact import build_graphs
    from test_detector import tiny_config

    root = tmp_path_factory.mktemp("pipeline") / "cache"
    shutil.copytree(synth_cache / "synth" / "dataset", root / "synth" / "dataset")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_detector(synth_ds, root / "synth" / "runs" / "detector" / "default", tiny_config(epochs=1), seed=0,
                       dataset_dir=root / "synth" / "dataset", evaluate=False)
        extract_dataset("synth", root, dense=False, max_proposals=20)
        build_graphs("synth", root)
    finally:
        torch.set_num_threads(threads)
    return root


@pytest.fixture(scope="session")
def lts_cache(pipeline_cache, tmp_path_factory) -> Path:
    """pipeline_cache plus the tiny detector's dense maps (``dense/detector-default.zarr``, the 24 images at
    strides 32, 16, 8: 4x4, 8x8, 16x16 cells of 16 channels): everything `refground train lts` needs. Copy it
    before writing into it."""
    import shutil

    import torch

    from refground.features.pipeline import extract_dataset

    root = tmp_path_factory.mktemp("lts") / "cache"
    shutil.copytree(pipeline_cache, root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # The features artifact is a hit (same max_proposals); only the dense maps are computed (~0.2 s).
        res = extract_dataset("synth", root, dense=True, max_proposals=20)
    finally:
        torch.set_num_threads(threads)
    assert res["artifacts"]["dense"]["status"] == "written"
    return root


def ref_iou(a, b) -> float:
    """Box IoU of two xyxy boxes, written out: the slow reference the metric module's IoU is checked against."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
