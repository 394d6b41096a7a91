"""`refground data synth`: generate the synthetic referring-expression world (or, with ``--preset web``, the
built-in CLIP's pretraining corpus) into the cache."""

from __future__ import annotations

import time
from typing import Annotated, Optional

import typer

from refground.cli.apps import data_app
from refground.cli.console import emit, info, table
from refground.cli.options import CacheOpt, ForceOpt, JsonOpt, SeedOpt
from refground.data.store import dataset_dir
from refground.data.synth import DEFAULT_FRACTIONS, ensure_synthetic, summary
from refground.data.synth.web import WEB_DEFAULTS, ensure_web_corpus, web_summary
from refground.errors import UsageError

PRESETS = ("world", "web")
WORLD_DEFAULTS = {"name": "synth", "num_images": 5000, "image_size": 256}


@data_app.command("synth")
def synth(
    preset: Annotated[str, typer.Option("--preset", help="What to generate: 'world' (the benchmark: referring "
                                        "expressions and captions) or 'web' (the built-in CLIP's pretraining "
                                        "corpus: images with alt-text captions, sharing no image or sentence "
                                        "with the world).")] = "world",
    images: Annotated[Optional[int], typer.Option("--num-images", help="Number of images to generate (default: "
                                                  "5000 for world, 20000 for web).", show_default=False)] = None,
    image_size: Annotated[Optional[int], typer.Option("--image-size", help="Image side in pixels (square images; "
                                                      "object sizes scale with it); at least 64 (default: 256 "
                                                      "for world, 128 for web).", show_default=False)] = None,
    seed: SeedOpt = 0,
    dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", help="Dataset name: the folder under the "
                                                   "cache root (default: synth for world, web for web).",
                                                   show_default=False)] = None,
    cache: CacheOpt = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Worker processes (default: min(2, CPUs)); "
                                                   "the output does not depend on it.", show_default=False)] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Generate the synthetic world: textured images of occluding coloured shapes with exact instance masks,
    referring expressions (category, attribute, location, size, first- and second-order relations), captions
    with linked phrases, and train/val/testA/testB splits. With --preset web: the web corpus, 1-6 shapes per
    image in close-ups, rows, columns, grids and scatters on other backgrounds, two alt-text captions each,
    train/val splits. Deterministic for a seed."""
    if preset not in PRESETS:
        raise UsageError(f"--preset must be one of: {', '.join(PRESETS)} (got {preset!r})")
    defaults = WEB_DEFAULTS if preset == "web" else WORLD_DEFAULTS
    dataset = defaults["name"] if dataset is None else dataset
    images = defaults["num_images"] if images is None else images
    image_size = defaults["image_size"] if image_size is None else image_size
    directory = dataset_dir(dataset, cache)
    t0 = time.perf_counter()
    if preset == "web":
        ds, written = ensure_web_corpus(directory, dataset, images, seed, image_size, workers, force)
    else:
        ds, written = ensure_synthetic(directory, dataset, images, seed, image_size, workers, DEFAULT_FRACTIONS,
                                       force)
    skipped = not written
    if skipped:
        info(f"{directory}: complete with the same parameters; skipping (use --force to regenerate)")
    seconds = time.perf_counter() - t0
    s = web_summary(ds) if preset == "web" else summary(ds)
    result = {"dataset": dataset, "preset": preset, "path": str(directory), "skipped": skipped,
              "seconds": round(seconds, 3), **s}
    rows = [("images", s["images"]), ("objects", s["objects"]),
            ("objects per image", (f"{s['objects_per_image']['mean']:.2f} "
                                   f"[{s['objects_per_image']['min']}, {s['objects_per_image']['max']}]"))]
    if preset == "web":
        rows += [("captions", s["captions"]),
                 ("caption length (tokens)", (f"{s['caption_length']['mean']:.1f} "
                                              f"[{s['caption_length']['min']}, {s['caption_length']['max']}]")),
                 ("vocabulary size", s["vocabulary_size"]),
                 ("colour share of captions", s["colour_share"]),
                 ("relation share of captions", s["spatial_share"]),
                 ("share of objects named with colour", s["objects_named_with_colour"]),
                 ("share of objects named with category", s["objects_named_with_category"]),
                 ("layouts", ", ".join(f"{k} {v}" for k, v in s["layouts"].items())),
                 ("backgrounds", ", ".join(f"{k} {v}" for k, v in s["backgrounds"].items()))]
        title = f"web corpus {dataset!r} at {directory}"
    else:
        rows += [("expressions", s["expressions"])]
        rows += [(f"  {k}", v) for k, v in s["expressions_by_kind"].items()]
        rows += [("relation share", s["relation_share"]), ("second-order share", s["second_order_share"]),
                 ("captions", s["captions"])]
        title = f"synthetic dataset {dataset!r} at {directory}"
    rows += [("images by split", ", ".join(f"{k} {v}" for k, v in s["images_by_split"].items())),
             ("seconds", f"{seconds:.1f}" + (" (skipped)" if skipped else ""))]
    emit(result, as_json, [table(title, ["name", "value"], rows)])
