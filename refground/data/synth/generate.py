"""Orchestration: per-image generation in worker processes, splits, assembly into a Dataset, writing.

Image ``i`` (0-based; id ``i + 1``, file ``{i+1:06d}.png``) is generated from its own random streams
(``SeedSequence([seed, i, 1])`` for the scene and the expressions, ``[seed, i, 4]`` for the captions,
``[seed, i, 2]`` for the pixels), so the result does not depend on how images are spread over workers,
and annotations do not depend on whether pixels are rendered at all. Splits come from one permutation
(``[seed, num_images, 3]``).
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from refground.data.model import PHRASE_KINDS, Dataset, Image, Mention, Object, Query, Relation
from refground.data.stats import dataset_stats
from refground.data.store import dataset_writer, finish_dataset, is_complete_with, load_dataset
from refground.data.synth.language import KINDS, Facts, Sentence, captions, expressions
from refground.data.synth.render import render, save_png
from refground.data.synth.scene import sample_scene
from refground.data.synth.world import (CATEGORIES, CATEGORY_GROUPS, COLOR_NAMES, GENERATOR, GENERATOR_VERSION,
                                        SIZES, TESTA_GROUP, TESTB_GROUP, vocabulary)
from refground.data.validate import validate_dataset
from refground.errors import UsageError
from refground.masks import encode
from refground.progress import track

SPLITS = ("train", "val", "testA", "testB")
DEFAULT_FRACTIONS = (0.7, 0.1, 0.1, 0.1)
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 64, 4096
CHUNK = 16
COMMAND = "refground data synth"


def image_file(index: int) -> str:
    """File name of image ``index`` (0-based) relative to the image root."""
    return f"{index + 1:06d}.png"


def check_params(name: str, num_images: int, seed: int, image_size: int, workers: int | None,
                 split_fractions: Sequence[float]) -> tuple[float, ...]:
    """Raise :class:`UsageError` on a bad parameter; returns the split fractions as a tuple."""
    if not name or "/" in name or name.startswith("."):
        raise UsageError(f"bad dataset name {name!r}: expected a plain folder name")
    if int(num_images) < 1:
        raise UsageError(f"--num-images must be at least 1, got {num_images}")
    if not MIN_IMAGE_SIZE <= int(image_size) <= MAX_IMAGE_SIZE:
        raise UsageError(f"--image-size must be in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {image_size}")
    if int(seed) < 0:
        raise UsageError(f"--seed must be non-negative, got {seed}")
    if workers is not None and int(workers) < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    fr = tuple(float(v) for v in split_fractions)
    if len(fr) != len(SPLITS) or any(not math.isfinite(v) or v < 0 for v in fr) or abs(sum(fr) - 1) > 1e-6:
        raise UsageError(f"split fractions must be {len(SPLITS)} non-negative numbers summing to 1 "
                         f"({', '.join(SPLITS)}), got {list(split_fractions)}")
    return fr


def assign_splits(num_images: int, seed: int, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> list[str]:
    """Split of each image: exact counts (cumulative rounding of the fractions), a seeded permutation."""
    bounds = [0] + [int(round(v * num_images)) for v in np.cumsum(fractions)]
    bounds[-1] = num_images
    perm = np.random.default_rng([seed, num_images, 3]).permutation(num_images)
    out = [""] * num_images
    for name, a, b in zip(SPLITS, bounds[:-1], bounds[1:]):
        for i in perm[a:b].tolist():
            out[i] = name
    return out


def _role(split: str) -> str:
    return {"testA": TESTA_GROUP, "testB": TESTB_GROUP}.get(split, "")


def _pack(s: Sentence) -> tuple:
    return (s.text, s.mentions, s.relations)


def generate_image(seed: int, index: int, split: str, image_size: int, image_dir: str | None) -> dict[str, Any]:
    """Generate image ``index``: objects (category, colour, size, box, RLE counts), expressions and
    captions as plain tuples with object indices local to the image; renders the PNG into ``image_dir``
    when given."""
    rng = np.random.default_rng([seed, index, 1])
    role = _role(split)
    while True:
        scene = sample_scene(rng, image_size, role)
        facts = Facts(scene)
        exprs = expressions(facts, rng, role)
        if len(exprs) >= 2:
            break
    # Captions draw from their own stream, so that changing them leaves scenes and expressions as they were.
    caps = captions(facts, np.random.default_rng([seed, index, 4]))
    objects = [(int(scene.cat[k]), int(scene.color[k]), int(scene.size[k]), tuple(scene.box[k].tolist()),
                encode(scene.visible_mask(k))["counts"]) for k in range(scene.n)]
    if image_dir is not None:
        img = render(np.random.default_rng([seed, index, 2]), scene.height, scene.width, scene.shapes,
                     scene.color.tolist())
        save_png(img, Path(image_dir) / image_file(index))
    return {"objects": objects,
            "expressions": [(g, kind, _pack(s)) for g, kind, s in exprs],
            "captions": [_pack(s) for s in caps]}


def _chunk(args: tuple) -> list[dict[str, Any]]:
    seed, indices, splits, image_size, image_dir = args
    return [generate_image(seed, i, s, image_size, image_dir) for i, s in zip(indices, splits)]


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


@contextlib.contextmanager
def _image_results(seed: int, splits: list[str], image_size: int, image_dir: str | None, workers: int
                   ) -> Iterator[Iterator[dict[str, Any]]]:
    """Yields an iterator over the images' results in index order, computed by ``workers`` processes
    (chunks of ``CHUNK`` images; in this process when one worker suffices)."""
    n = len(splits)
    tasks = [(seed, list(range(a, min(n, a + CHUNK))), splits[a:a + CHUNK], image_size, image_dir)
             for a in range(0, n, CHUNK)]
    with chunk_results(_chunk, tasks, workers) as results:
        yield results


@contextlib.contextmanager
def chunk_results(chunk: Callable[[Any], list[dict[str, Any]]], tasks: list[Any], workers: int
                  ) -> Iterator[Iterator[dict[str, Any]]]:
    """Yields an iterator over ``chunk(task)``'s results, task after task in order, computed by ``workers``
    processes (in this process when one worker, or one task, suffices). ``chunk`` must be a module-level
    function (the workers import it)."""
    if workers <= 1 or len(tasks) <= 1:
        yield (r for t in tasks for r in chunk(t))
        return
    # fork where the platform has it: workers start at once and need no importable __main__ (spawn
    # re-runs the parent's main module, which fails for stdin scripts and notebooks). The pool is made
    # before any progress display starts its thread; the workers use numpy, zlib and pycocotools only.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(min(workers, len(tasks))) as pool:
        yield (r for part in pool.imap(chunk, tasks) for r in part)


def generate_dataset(name: str = "synth", num_images: int = 5000, seed: int = 0, image_size: int = 256,
                     image_dir: Path | None = None, workers: int | None = None,
                     split_fractions: Sequence[float] = DEFAULT_FRACTIONS) -> Dataset:
    """Generate the synthetic referring-expression world (see :mod:`refground.data.synth`).

    Renders ``image_size`` x ``image_size`` RGB PNGs into ``image_dir`` when given (files
    ``000001.png``...); without it only annotations are made (identical either way). ``workers``:
    processes (default ``min(2, cpu count)``); the result does not depend on it.
    """
    fractions = check_params(name, num_images, seed, image_size, workers, split_fractions)
    workers = default_workers() if workers is None else int(workers)
    splits = assign_splits(int(num_images), int(seed), fractions)
    if image_dir is not None:
        Path(image_dir).mkdir(parents=True, exist_ok=True)
    images: list[Image] = []
    objects: list[Object] = []
    queries: list[Query] = []
    next_obj, next_query, next_group = 1, 1, 1
    with _image_results(int(seed), splits, int(image_size), None if image_dir is None else str(image_dir),
                        workers) as results:
        for i, res in enumerate(track(results, total=len(splits), description="synth images")):
            next_obj, next_query, next_group = _collect(i, res, splits[i], int(image_size), images, objects,
                                                        queries, next_obj, next_query, next_group)
    meta = {
        "source": "synthetic",
        "generator": {"name": GENERATOR, "version": GENERATOR_VERSION,
                      "params": params_dict(name, num_images, seed, image_size, fractions)},
        "vocabulary": vocabulary(),
        "kinds": list(KINDS),
        "phrase_kinds": list(PHRASE_KINDS),
        "category_groups": {k: list(v) for k, v in CATEGORY_GROUPS.items()},
        "testA_group": TESTA_GROUP,
        "testB_group": TESTB_GROUP,
        "splits": dict(zip(SPLITS, fractions)),
    }
    return Dataset.from_records(name, images, objects, queries, categories=list(CATEGORIES), meta=meta)


def _collect(i: int, res: dict[str, Any], split: str, image_size: int, images: list[Image],
             objects: list[Object], queries: list[Query], next_obj: int, next_query: int, next_group: int
             ) -> tuple[int, int, int]:
    """Append image ``i``'s records with global ids; returns the next free object, query and group ids."""
    image_id = i + 1
    images.append(Image(image_id, image_file(i), int(image_size), int(image_size), split))
    ids = list(range(next_obj, next_obj + len(res["objects"])))
    next_obj += len(ids)
    size = [int(image_size), int(image_size)]
    for oid, (c, col, sz, box, counts) in zip(ids, res["objects"]):
        objects.append(Object(oid, image_id, CATEGORIES[c], tuple(float(v) for v in box),
                              {"size": size, "counts": counts},
                              {"color": COLOR_NAMES[col], "size": SIZES[sz]}))
    groups: dict[int, int] = {}
    for g, kind, packed in res["expressions"]:
        if g not in groups:
            groups[g] = next_group
            next_group += 1
        queries.append(_query(next_query, image_id, "expression", kind, split, groups[g], packed, ids))
        next_query += 1
    for packed in res["captions"]:
        queries.append(_query(next_query, image_id, "caption", "caption", split, -1, packed, ids))
        next_query += 1
    return next_obj, next_query, next_group


def _query(qid: int, image_id: int, task: str, kind: str, split: str, group: int, packed: tuple,
           ids: list[int]) -> Query:
    text, mentions, relations = packed
    return Query(qid, image_id, task, text,
                 tuple(Mention(a, b, role, tuple(ids[k] for k in objs), typ, "", mkind)
                       for a, b, role, objs, typ, mkind in mentions),
                 tuple(Relation(s, p, o) for s, p, o in relations), kind, split, group, text)


def params_dict(name: str, num_images: int, seed: int, image_size: int,
                split_fractions: Sequence[float]) -> dict[str, Any]:
    """The parameters that determine a synthetic dataset (recorded in its manifest and meta)."""
    return {"name": name, "num_images": int(num_images), "seed": int(seed), "image_size": int(image_size),
            "split_fractions": [float(v) for v in split_fractions], "generator_version": GENERATOR_VERSION}


def write_synthetic(directory: Path, name: str = "synth", num_images: int = 5000, seed: int = 0,
                    image_size: int = 256, workers: int | None = None,
                    split_fractions: Sequence[float] = DEFAULT_FRACTIONS) -> Dataset:
    """Generate and write a synthetic dataset folder (``<directory>/images`` + annotations + manifest),
    staged and renamed into place on success. Returns the dataset (``meta['image_root']`` set)."""
    fractions = check_params(name, num_images, seed, image_size, workers, split_fractions)
    directory = Path(directory)
    with dataset_writer(directory) as stage:
        ds = generate_dataset(name, num_images, seed, image_size, stage / "images", workers, fractions)
        validate_dataset(ds, source=str(directory))
        finish_dataset(ds, stage, command=COMMAND, params=params_dict(name, num_images, seed, image_size, fractions))
    ds.meta["image_root"] = str(directory / "images")
    return ds


def summary(ds: Dataset) -> dict[str, Any]:
    """Counts of a synthetic dataset: images, objects, expressions by kind, captions, caption phrases by
    kind, shares, splits (a view of :func:`refground.data.stats.dataset_stats`, which defines each figure)."""
    s = dataset_stats(ds)
    return {
        "images": s["images"],
        "objects": s["objects"],
        "objects_per_image": s["objects_per_image"],
        "expressions": s["expressions"],
        "expressions_by_kind": {k: s["kinds"].get(k, {}).get("count", 0) for k in KINDS},
        "relation_share": s["relation_share"],
        "second_order_share": s["second_order_share"],
        "captions": s["captions"],
        "caption_phrases": s["caption_phrases"],
        "caption_phrases_by_kind": {k: v["count"] for k, v in s["caption_phrase_kinds"].items()},
        "images_by_split": {k: v["images"] for k, v in s["splits"].items() if v["images"]},
    }


def ensure_synthetic(directory: Path, name: str = "synth", num_images: int = 5000, seed: int = 0,
                     image_size: int = 256, workers: int | None = None,
                     split_fractions: Sequence[float] = DEFAULT_FRACTIONS, force: bool = False
                     ) -> tuple[Dataset, bool]:
    """The synthetic dataset at ``directory``: loaded when it is complete with the same parameters (unless
    ``force``), else generated with :func:`write_synthetic`. Returns ``(dataset, written)``."""
    fractions = check_params(name, num_images, seed, image_size, workers, split_fractions)
    if not force and is_complete_with(Path(directory), params_dict(name, num_images, seed, image_size, fractions)):
        return load_dataset(Path(directory)), False
    return write_synthetic(directory, name, num_images, seed, image_size, workers, fractions), True
