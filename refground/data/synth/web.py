"""The web corpus: images and alt-text captions for pretraining the built-in CLIP, sharing no image and no
sentence with the synthetic world (the benchmark), as web alt-text data shares nothing with RefCOCO.

The same things as the world (its 8 categories, 8 colours and shape painter) in other pictures: 1-6 objects
in close-ups, rows, columns, grids and scatters, without occlusion, on backgrounds the world never draws
(:data:`~refground.data.synth.render.WEB_BACKGROUNDS`), described by two alt-text captions each
(:mod:`~refground.data.synth.web_language`) that name the objects' colours, categories, counts, relative
sizes and sometimes their spatial relations, the layout or the background.

Image ``i`` (0-based; id ``i + 1``, file ``{i+1:06d}.png``) comes from its own random streams, never one of
the world's (``[seed, i, 1|2|4]``): ``SeedSequence([seed, i, 101])`` for the scene and the captions,
``[seed, i, 102]`` for the pixels; the train/val split (0.95/0.05) from one permutation
(``[seed, num_images, 103]``). The result depends neither on the worker count nor on whether pixels are
rendered. Objects carry boxes, masks and attributes for inspection only; what trains on the corpus is the
images and the captions (queries of task ``caption``, kind ``alt-text``, whose mentions link each phrase
to the objects it names).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from refground.data.model import Dataset, Image, Object, Query
from refground.data.stats import dataset_stats
from refground.data.store import dataset_writer, finish_dataset, is_complete_with, load_dataset
from refground.data.synth.generate import (CHUNK, COMMAND, DEFAULT_FRACTIONS, _pack, _query, check_params,
                                           chunk_results, default_workers, image_file)
from refground.data.synth.render import WEB_BACKGROUNDS, render_web, save_png
from refground.data.synth.web_language import (BACKGROUND_PHRASES, CAPTION_KIND, LAYOUT_PHRASES, PREFIXES,
                                               SUFFIXES, WEB_COUNT_WORDS, WEB_MARKERS, WEB_RELATION_WORDS,
                                               alt_texts)
from refground.data.synth.web_scene import LAYOUTS, SIZE_BOUNDS, sample_web_scene
from refground.data.synth.world import CATEGORIES, COLOR_NAMES, COLORS, PLURALS, SIZES
from refground.data.validate import validate_dataset
from refground.masks import encode
from refground.progress import track

WEB_GENERATOR = "refground.data.synth.web"
# Bump when the output for a given (seed, parameters) changes (it is part of the recorded parameters).
WEB_GENERATOR_VERSION = 1
WEB_PRESET = "web"
WEB_SPLITS = ("train", "val")
WEB_FRACTIONS = (0.95, 0.05)
WEB_DEFAULTS = {"name": "web", "num_images": 20000, "image_size": 128}
SCENE_TAG, PIXEL_TAG, SPLIT_TAG = 101, 102, 103  # the world's streams use 1, 2, 3 and 4


def web_splits(num_images: int, seed: int) -> list[str]:
    """Split of each image: ``round(0.05 * num_images)`` val images chosen by a seeded permutation, the rest
    train."""
    n_val = round(WEB_FRACTIONS[1] * num_images)
    out = ["train"] * num_images
    for i in np.random.default_rng([seed, num_images, SPLIT_TAG]).permutation(num_images)[:n_val].tolist():
        out[i] = "val"
    return out


def generate_web_image(seed: int, index: int, image_size: int, image_dir: str | None) -> dict[str, Any]:
    """Generate web image ``index``: objects (category, colour, size class, box, RLE counts) and its two
    captions as plain tuples with object indices local to the image; renders the PNG into ``image_dir`` when
    given."""
    rng = np.random.default_rng([seed, index, SCENE_TAG])
    ws = sample_web_scene(rng, image_size)
    caps = alt_texts(ws, rng)
    sc = ws.scene
    objects = [(int(sc.cat[k]), int(sc.color[k]), int(sc.size[k]), tuple(sc.box[k].tolist()),
                encode(sc.visible_mask(k))["counts"]) for k in range(sc.n)]
    if image_dir is not None:
        img = render_web(np.random.default_rng([seed, index, PIXEL_TAG]), sc.height, sc.width, sc.shapes,
                         sc.color.tolist(), ws.background)
        save_png(img, Path(image_dir) / image_file(index))
    return {"objects": objects, "captions": [_pack(s) for s in caps], "layout": ws.layout,
            "background": ws.background}


def _chunk(args: tuple) -> list[dict[str, Any]]:
    seed, indices, image_size, image_dir = args
    return [generate_web_image(seed, i, image_size, image_dir) for i in indices]


@contextlib.contextmanager
def _image_results(seed: int, num_images: int, image_size: int, image_dir: str | None, workers: int
                   ) -> Iterator[Iterator[dict[str, Any]]]:
    """Yields an iterator over the images' results in index order, computed by ``workers`` processes in
    chunks of ``CHUNK`` images (:func:`~refground.data.synth.generate.chunk_results`, as the world's)."""
    tasks = [(seed, list(range(a, min(num_images, a + CHUNK))), image_size, image_dir)
             for a in range(0, num_images, CHUNK)]
    with chunk_results(_chunk, tasks, workers) as results:
        yield results


def web_vocabulary() -> dict[str, Any]:
    """The corpus's words and pictures as a JSON-able dict (recorded in ``Dataset.meta['vocabulary']``)."""
    return {
        "categories": list(CATEGORIES),
        "plurals": dict(PLURALS),
        "colors": {k: list(v) for k, v in COLORS.items()},
        "sizes": list(SIZES),
        "size_bounds": list(SIZE_BOUNDS),
        "count_words": {str(k): v for k, v in WEB_COUNT_WORDS.items()},
        "relations": {k: list(v) for k, v in WEB_RELATION_WORDS.items()},
        "prefixes": list(PREFIXES),
        "suffixes": list(SUFFIXES),
        "backgrounds": {k: list(v) for k, v in BACKGROUND_PHRASES.items()},
        "layouts": {k: list(v) for k, v in LAYOUT_PHRASES.items()},
        "markers": sorted(WEB_MARKERS),
    }


def web_params(name: str, num_images: int, seed: int, image_size: int) -> dict[str, Any]:
    """The parameters that determine a web corpus (recorded in its manifest and meta); ``preset`` keeps it
    apart from a world dataset of the same numbers."""
    return {"preset": WEB_PRESET, "name": name, "num_images": int(num_images), "seed": int(seed),
            "image_size": int(image_size), "split_fractions": list(WEB_FRACTIONS),
            "generator_version": WEB_GENERATOR_VERSION}


def _check(name: str, num_images: int, seed: int, image_size: int, workers: int | None) -> None:
    # The world's checks (name, counts, sizes, seed, workers); its split fractions are not the corpus's.
    check_params(name, num_images, seed, image_size, workers, DEFAULT_FRACTIONS)


def generate_web_corpus(name: str = "web", num_images: int = 20000, seed: int = 0, image_size: int = 128,
                        image_dir: Path | None = None, workers: int | None = None) -> Dataset:
    """Generate the web corpus (see the module docstring) as a :class:`Dataset`.

    Renders ``image_size`` x ``image_size`` RGB PNGs into ``image_dir`` when given (files ``000001.png``...);
    without it only annotations are made (identical either way). ``workers``: processes (default
    ``min(2, cpu count)``); the result does not depend on it.
    """
    _check(name, num_images, seed, image_size, workers)
    workers = default_workers() if workers is None else int(workers)
    n, size = int(num_images), int(image_size)
    splits = web_splits(n, int(seed))
    if image_dir is not None:
        Path(image_dir).mkdir(parents=True, exist_ok=True)
    images: list[Image] = []
    objects: list[Object] = []
    queries: list[Query] = []
    layouts: Counter[str] = Counter()
    backgrounds: Counter[str] = Counter()
    with _image_results(int(seed), n, size, None if image_dir is None else str(image_dir), workers) as results:
        for i, res in enumerate(track(results, total=n, description="web images")):
            image_id = i + 1
            images.append(Image(image_id, image_file(i), size, size, splits[i]))
            ids = list(range(len(objects) + 1, len(objects) + 1 + len(res["objects"])))
            for oid, (c, col, sz, box, counts) in zip(ids, res["objects"]):
                objects.append(Object(oid, image_id, CATEGORIES[c], tuple(float(v) for v in box),
                                      {"size": [size, size], "counts": counts},
                                      {"color": COLOR_NAMES[col], "size": SIZES[sz]}))
            for packed in res["captions"]:
                queries.append(_query(len(queries) + 1, image_id, "caption", CAPTION_KIND, splits[i], -1, packed,
                                      ids))
            layouts[res["layout"]] += 1
            backgrounds[res["background"]] += 1
    meta = {
        "source": "synthetic-web",
        "generator": {"name": WEB_GENERATOR, "version": WEB_GENERATOR_VERSION,
                      "params": web_params(name, n, seed, size)},
        "vocabulary": web_vocabulary(),
        "splits": dict(zip(WEB_SPLITS, WEB_FRACTIONS)),
        "layouts": {k: layouts[k] for k in LAYOUTS},
        "backgrounds": {k: backgrounds[k] for k in WEB_BACKGROUNDS},
    }
    return Dataset.from_records(name, images, objects, queries, categories=list(CATEGORIES), meta=meta)


def write_web_corpus(directory: Path, name: str = "web", num_images: int = 20000, seed: int = 0,
                     image_size: int = 128, workers: int | None = None) -> Dataset:
    """Generate and write a web corpus folder (``<directory>/images`` + annotations + manifest), staged and
    renamed into place on success. Returns the dataset (``meta['image_root']`` set)."""
    _check(name, num_images, seed, image_size, workers)
    directory = Path(directory)
    with dataset_writer(directory) as stage:
        ds = generate_web_corpus(name, num_images, seed, image_size, stage / "images", workers)
        validate_dataset(ds, source=str(directory))
        finish_dataset(ds, stage, command=COMMAND, params=web_params(name, num_images, seed, image_size))
    ds.meta["image_root"] = str(directory / "images")
    return ds


def ensure_web_corpus(directory: Path, name: str = "web", num_images: int = 20000, seed: int = 0,
                      image_size: int = 128, workers: int | None = None, force: bool = False
                      ) -> tuple[Dataset, bool]:
    """The web corpus at ``directory``: loaded when it is complete with the same parameters (unless
    ``force``), else generated with :func:`write_web_corpus`. Returns ``(dataset, written)``."""
    _check(name, num_images, seed, image_size, workers)
    if not force and is_complete_with(Path(directory), web_params(name, num_images, seed, image_size)):
        return load_dataset(Path(directory)), False
    return write_web_corpus(directory, name, num_images, seed, image_size, workers), True


def web_summary(ds: Dataset) -> dict[str, Any]:
    """Figures of a web corpus: images, objects (per image), captions, caption length (tokens), vocabulary
    size (distinct caption tokens), ``colour_share`` (captions naming at least one colour),
    ``spatial_share`` (captions with a relation between two phrases), ``objects_named_with_colour`` and
    ``objects_named_with_category`` (share of objects that a phrase of one of their image's captions links
    with their colour word / category or plural word), layouts and backgrounds (image counts), images by
    split."""
    s = dataset_stats(ds)
    texts = ds.query_texts
    colours = set(COLOR_NAMES)
    tokens = [t.split(" ") for t in texts]
    vocab = {w for ts in tokens for w in ts}
    n_q = max(len(texts), 1)
    n_rel = np.diff(ds.query_relation_offsets)
    # Per mention: its words; per linked object: whether the mention says its colour / category.
    n_men = np.diff(ds.query_mention_offsets)
    q_of_mention = np.repeat(np.arange(ds.num_queries), n_men)
    named_colour: set[int] = set()
    named_cat: set[int] = set()
    for j, q in enumerate(q_of_mention.tolist()):
        words = set(tokens[q][int(ds.mention_starts[j]):int(ds.mention_ends[j])])
        for oid in ds.mention_object_ids[ds.mention_object_offsets[j]:ds.mention_object_offsets[j + 1]].tolist():
            row = ds.object_row(oid)
            if ds.object_attributes["color"][row] in words:
                named_colour.add(oid)
            cat = ds.categories[int(ds.object_categories[row])]
            if cat in words or PLURALS[cat] in words:
                named_cat.add(oid)
    n_obj = max(ds.num_objects, 1)
    return {
        "images": s["images"],
        "objects": s["objects"],
        "objects_per_image": s["objects_per_image"],
        "captions": s["captions"],
        "caption_length": s["caption_length"],
        "vocabulary_size": len(vocab),
        "colour_share": round(sum(1 for ts in tokens if colours.intersection(ts)) / n_q, 4),
        "spatial_share": round(float((n_rel > 0).sum()) / n_q, 4),
        "objects_named_with_colour": round(len(named_colour) / n_obj, 4),
        "objects_named_with_category": round(len(named_cat) / n_obj, 4),
        "layouts": dict(ds.meta.get("layouts") or {}),
        "backgrounds": dict(ds.meta.get("backgrounds") or {}),
        "images_by_split": {k: v["images"] for k, v in s["splits"].items() if v["images"]},
    }
