"""Benchmarks of the feature cache: training-batch reads from HDF5, and extraction throughput.

``h5_batch_read``: the features of a batch of 64 queries read from our layout (one contiguous array per
field, batches drawn from consecutive images by :func:`refground.cache.block_batches`) against the
layout a straightforward implementation writes (one HDF5 group per image, a batch of 64 random queries =
64 group look-ups). Same data, same file system, same process.

``extract_rate``: images per second of a whole `refground extract` (PNG decode, detector, RoIAlign features
of proposals and ground-truth objects, dense maps, chunk commit and final assembly) with the built-in
detector on a fresh synthetic dataset. It uses the trained default detector of the cache root
(``$REFGROUND_CACHE`` or ./cache) when there is one, else a randomly initialised detector of the default
configuration (same compute; the note says which).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from refground.bench import BenchResult, register
from refground.cache import RaggedH5, block_batches, write_h5


def _fake_features(path: Path, images: int, per_image: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    counts = rng.integers(per_image // 2, per_image + 1, size=images)
    feats = rng.standard_normal((int(counts.sum()), dim)).astype(np.float16)
    write_h5(path, [{"images.ids": np.arange(images), "proposals.counts": counts, "proposals.features": feats}], {})
    return counts


def _grouped(path: Path, ragged: Path) -> None:
    import h5py

    with RaggedH5(ragged) as f, h5py.File(path, "w") as g:
        allf = f.table("proposals", "features")
        o = f.offsets["proposals"]
        for i in range(len(o) - 1):
            g.create_dataset(f"{i}/features", data=allf[o[i]:o[i + 1]])


@register("h5_batch_read")
def h5_batch_read(quick: bool, seed: int) -> list[BenchResult]:
    rng = np.random.default_rng(seed)
    images = 600 if quick else 3500
    per_image, dim, batch = 100, 256, 64
    queries_per_image = 7  # about what the synthetic world has
    with tempfile.TemporaryDirectory() as d:
        ours, theirs = Path(d) / "ragged.h5", Path(d) / "groups.h5"
        _fake_features(ours, images, per_image, dim, rng)
        _grouped(theirs, ours)
        item_images = np.repeat(np.arange(images), queries_per_image)
        n_batches = 40 if quick else 150
        import h5py

        batches = block_batches(item_images, batch, rng)[:n_batches]
        rows_per_batch = [np.unique(item_images[b]) for b in batches]
        with RaggedH5(ours) as f:
            reads, nbytes = [], 0
            t0 = time.perf_counter()
            for rows in rows_per_batch:
                a, _, r = f.read("proposals", "features", rows)
                reads.append(r)
                nbytes += a.nbytes
            ours_t = (time.perf_counter() - t0) / len(batches)
        with h5py.File(theirs, "r") as g:
            t0 = time.perf_counter()
            for rows in rows_per_batch:  # the same images, one group look-up each
                _ = np.concatenate([g[str(int(i))]["features"][()] for i in rows])
            base_t = (time.perf_counter() - t0) / len(batches)
    mb_s = nbytes / len(batches) / ours_t / 2**20
    return [
        BenchResult("h5_batch_read", 1.0 / ours_t, "batches/s", 1.0 / base_t, base_t / ours_t,
                    note=f"batch of {batch} queries ({queries_per_image} per image, ~{per_image * 3 // 4} proposals x "
                         f"{dim} fp16 each), {images} images; ours: {np.mean(reads):.1f} contiguous reads per batch "
                         f"({mb_s:.0f} MB/s); baseline: the same images from one HDF5 group per image "
                         f"({np.mean([len(r) for r in rows_per_batch]):.1f} look-ups per batch)"),
    ]


@register("extract_rate")
def extract_rate(quick: bool, seed: int) -> list[BenchResult]:
    import torch

    from refground.data.store import cache_root, dataset_dir, load_dataset
    from refground.data.synth import write_synthetic
    from refground.features import extract as X
    from refground.features.detector import BuiltinDetector, DetectorConfig, DetectorModel
    from refground.train import MODEL_FILE

    n = 64 if quick else 320
    trained = cache_root() / "synth" / "runs" / "detector" / "default"
    with tempfile.TemporaryDirectory() as d:
        write_synthetic(dataset_dir("synth", d), name="synth", num_images=n, seed=seed + 1, image_size=256,
                        workers=1)
        ds = load_dataset(dataset_dir("synth", d))
        if (trained / MODEL_FILE).is_file():
            det, note = BuiltinDetector.load(trained), f"trained detector {trained}"
        else:
            torch.manual_seed(seed)
            det, note = BuiltinDetector(DetectorModel(DetectorConfig())), "untrained default-config detector"
        root = Path(d) / "synth"
        results = []
        for dense in (False, True):
            targets = [X.Target("features", root / "features" / f"x{dense}.h5", "s", {}, {}, "fp", {})]
            if dense:
                targets.append(X.Target("dense", root / "dense" / "x.zarr", "s", {}, {}, "fp", {}))
            ex = X.Extractor(ds, det, det, None, max_proposals=100, batch_size=16, dense_size=256)
            t0 = time.perf_counter()
            X.run(ds, targets, ex, chunk_size=64)
            dt = time.perf_counter() - t0
            results.append(BenchResult("extract_rate" + ("_with_dense" if dense else ""), n / dt, "images/s",
                                       note=f"{n} images of 256 px, top-100 proposals + GT features"
                                            + (" + dense maps" if dense else "") + f"; {note}; "
                                            f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs"))
    return results
