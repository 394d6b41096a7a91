"""`refground data synth`: generate the synthetic referring-expression world into the cache."""

from __future__ import annotations

import time
from typing import Annotated, Optional

import typer

from refground.cli.apps import data_app
from refground.cli.console import emit, info, table
from refground.cli.options import CacheOpt, DatasetOpt, ForceOpt, JsonOpt, SeedOpt
from refground.data.store import dataset_dir
from refground.data.synth import DEFAULT_FRACTIONS, ensure_synthetic, summary


@data_app.command("synth")
def synth(
    images: Annotated[int, typer.Option("--num-images", help="Number of images to generate.")] = 5000,
    image_size: Annotated[int, typer.Option("--image-size", help="Image side in pixels (square images; "
                                            "object sizes scale with it); at least 64.")] = 256,
    seed: SeedOpt = 0,
    dataset: DatasetOpt = "synth",
    cache: CacheOpt = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Worker processes (default: min(2, CPUs)); "
                                                   "the output does not depend on it.", show_default=False)] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Generate the synthetic world: textured images of occluding coloured shapes with exact instance masks,
    referring expressions (category, attribute, location, size, first- and second-order relations), captions
    with linked phrases, and train/val/testA/testB splits. Deterministic for a seed."""
    directory = dataset_dir(dataset, cache)
    t0 = time.perf_counter()
    ds, written = ensure_synthetic(directory, dataset, images, seed, image_size, workers, DEFAULT_FRACTIONS, force)
    skipped = not written
    if skipped:
        info(f"{directory}: complete with the same parameters; skipping (use --force to regenerate)")
    seconds = time.perf_counter() - t0
    s = summary(ds)
    result = {"dataset": dataset, "path": str(directory), "skipped": skipped, "seconds": round(seconds, 3), **s}
    rows = [("images", s["images"]), ("objects", s["objects"]),
            ("objects per image", f"{s['objects_per_image']['mean']:.2f} "
                                  f"[{s['objects_per_image']['min']}, {s['objects_per_image']['max']}]"),
            ("expressions", s["expressions"])]
    rows += [(f"  {k}", v) for k, v in s["expressions_by_kind"].items()]
    rows += [("relation share", s["relation_share"]), ("second-order share", s["second_order_share"]),
             ("captions", s["captions"]),
             ("images by split", ", ".join(f"{k} {v}" for k, v in s["images_by_split"].items())),
             ("seconds", f"{seconds:.1f}" + (" (skipped)" if skipped else ""))]
    emit(result, as_json, [table(f"synthetic dataset {dataset!r} at {directory}", ["name", "value"], rows)])
