"""Benchmarks of the data layer: synthetic generation rate and dataset load time."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from refground.bench import BenchResult, best_time, register
from refground.data.model import Dataset
from refground.data.store import load_dataset, save_dataset


@register("synth_rate")
def synth_rate(quick: bool, seed: int) -> list[BenchResult]:
    """Images per second of `generate_dataset` (256 px, PNGs written, default workers)."""
    from refground.data.synth import generate_dataset
    from refground.data.synth.generate import default_workers

    n = 200 if quick else 1000
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        generate_dataset(num_images=n, seed=seed, image_dir=Path(d) / "images")
        dt = time.perf_counter() - t0
    return [BenchResult("synth_rate", n / dt, "images/s",
                        note=f"{n} images of 256 px with masks, expressions, captions and PNGs; "
                             f"{default_workers()} workers")]


def _naive_records(ds: Dataset) -> list[dict]:
    """The same records as one plain JSON list of dicts (what a straightforward exporter would write)."""
    out: list[dict] = []
    for im in ds.images():
        out.append({"type": "image", "id": im.id, "file": im.file, "width": im.width, "height": im.height,
                    "split": im.split})
    for o in ds.objects():
        out.append({"type": "object", "id": o.id, "image_id": o.image_id, "category": o.category,
                    "box": list(o.box), "mask": o.mask, "attributes": o.attributes})
    for k in range(ds.num_queries):
        q = ds._query_at(k)
        out.append({"type": "query", "id": q.id, "image_id": q.image_id, "task": q.task, "text": q.text,
                    "kind": q.kind, "split": q.split, "group": q.group, "raw": q.raw,
                    "mentions": [{"start": m.start, "end": m.end, "role": m.role, "object_ids": list(m.object_ids),
                                  "type": m.type, "entity": m.entity} for m in q.mentions],
                    "relations": [{"subject": r.subject, "predicate": r.predicate, "object": r.object}
                                  for r in q.relations]})
    return out


@register("dataset_load")
def dataset_load(quick: bool, seed: int) -> list[BenchResult]:
    """Seconds to load a saved synthetic dataset with `load_dataset`; baseline: json.load of the same
    records stored as one naive JSON list of dicts."""
    from refground.data.synth import generate_dataset

    n = 2000 if quick else 20000
    ds = generate_dataset(num_images=n, seed=seed)  # annotations only: loading never reads the pixels
    with tempfile.TemporaryDirectory() as d:
        folder = save_dataset(ds, Path(d) / "dataset")
        naive = Path(d) / "records.json"
        naive.write_text(json.dumps(_naive_records(ds)))
        del ds

        def baseline() -> None:
            with open(naive) as fh:
                json.load(fh)

        ours = best_time(lambda: load_dataset(folder), repeat=3, min_time=0.0)
        base = best_time(baseline, repeat=3, min_time=0.0)
    return [BenchResult("dataset_load", ours, "s", baseline=base, ratio=base / ours,
                        note=f"{n} images (~{10 * n} objects with RLE masks, ~{10 * n} queries)")]
