"""On-disk form of a :class:`~refground.data.model.Dataset` under ``cache/<dataset>/dataset/``.

Layout::

    dataset/
      manifest.json            producing command, parameters, library version, time, complete flag
      annotations/meta.json    name, categories, meta (deterministic)
      annotations/<column>.npy numeric columns (np.save: deterministic bytes, memory-mappable)
      annotations/<column>.json string columns (JSON list of str)
                               (``mention_kinds`` may be absent: older datasets; loads as "" per mention)
      images/                  rendered images (synthetic datasets only)

The annotation files are byte-identical for identical content (no timestamps inside); only
``manifest.json`` records when and how the dataset was made. The folder is written under a temporary name
and renamed on success, so a reader never sees half of it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from refground import __version__
from refground.atomic import atomic_dir
from refground.cache.manifest import content_problems, content_record
from refground.data.model import Dataset
from refground.errors import ArtifactError, DataError, UsageError, check_parent_folders

FORMAT = "refground-dataset"
FORMAT_VERSION = 1


# Columns added after FORMAT_VERSION 1 was fixed: a dataset written before them (an old cache, an import made by
# an older version) loads with their default, computed from the columns read before them.
_ADDED_COLUMNS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "mention_kinds": lambda columns: [""] * len(columns["mention_starts"]),
}


def cache_root(cache: str | os.PathLike | None = None) -> Path:
    """The artifact root: ``cache`` if given, else ``$REFGROUND_CACHE``, else ``./cache``. A path that names an
    existing file (not a folder), or lies under one, is a one-line UsageError."""
    root = Path(cache or os.environ.get("REFGROUND_CACHE") or "cache")
    src = "--cache" if cache else ("$REFGROUND_CACHE" if os.environ.get("REFGROUND_CACHE") else "the cache root")
    if root.exists() and not root.is_dir():
        raise UsageError(f"{root}: {src} names a file, not a folder; pass --cache with a folder")
    check_parent_folders(root, src)
    return root


def dataset_dir(name: str, cache: str | os.PathLike | None = None) -> Path:
    """``<cache>/<name>/dataset``."""
    return cache_root(cache) / name / "dataset"


def _write_columns(ds: Dataset, ann: Path) -> None:
    ann.mkdir(parents=True, exist_ok=True)
    meta = {"name": ds.name, "categories": ds.categories, "meta": ds.meta}
    (ann / "meta.json").write_text(json.dumps(meta, sort_keys=True, indent=1))
    for key, value in ds.columns().items():
        if isinstance(value, np.ndarray):
            np.save(ann / f"{key}.npy", value, allow_pickle=False)
        else:
            (ann / f"{key}.json").write_text(json.dumps(value, separators=(",", ":"), sort_keys=True))


@contextmanager
def dataset_writer(directory: Path) -> Iterator[Path]:
    """Stage a dataset folder: yields the staging folder (write images into ``<stage>/images``),
    then call :func:`finish_dataset` inside the block. Renamed into place on success."""
    with atomic_dir(Path(directory)) as stage:
        yield stage


def finish_dataset(ds: Dataset, stage: Path, command: str = "", params: dict[str, Any] | None = None) -> None:
    """Write annotations and the manifest (complete flag last) into a staging folder."""
    _write_columns(ds, stage / "annotations")
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": ds.name,
        "command": command,
        "params": params or {},
        "library_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "counts": {"images": ds.num_images, "objects": ds.num_objects, "queries": ds.num_queries},
        "complete": True,
        # Sizes and hashes of the annotation files and images, so an edit, truncation or deletion after the
        # fact is caught (annotations on every load, images by `refground cache verify`).
        "files": content_record({p.relative_to(stage).as_posix(): p for sub in ("annotations", "images")
                                 for p in sorted((stage / sub).rglob("*")) if p.is_file()}),
    }
    (stage / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))


def save_dataset(ds: Dataset, directory: Path, command: str = "", params: dict[str, Any] | None = None) -> Path:
    """Write ``ds`` to ``directory`` atomically (replacing what was there). Returns ``directory``."""
    with dataset_writer(directory) as stage:
        finish_dataset(ds, stage, command, params)
    return Path(directory)


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of a dataset folder; raises :class:`ArtifactError` if missing or incomplete."""
    directory = Path(directory)
    path = directory / "manifest.json"
    if not path.is_file():
        raise ArtifactError(f"{directory}: no dataset here (missing manifest.json); "
                            "run `refground data synth` or `refground data import-...` first")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: malformed manifest ({exc}); re-run the step that made it") from None
    if manifest.get("format") != FORMAT or not manifest.get("complete"):
        raise ArtifactError(f"{path}: incomplete or foreign dataset; re-run the step that made it")
    return manifest


def dataset_remedy(directory: Path, manifest: dict[str, Any]) -> str:
    """The command that rewrites the dataset folder ``directory`` (from its manifest's command and params)."""
    name = Path(directory).parent.name
    command = manifest.get("command") or "refground data synth"
    if not command.startswith("refground"):
        command = f"refground {command}"
    p = manifest.get("params") or {}
    if command.endswith("data synth"):
        flags = " ".join(f"--{opt} {p[key]}" for key, opt in (("preset", "preset"), ("num_images", "num-images"),
                                                                ("image_size", "image-size"), ("seed", "seed"))
                         if key in p)
        cache = Path(directory).parent.parent
        return f"{command} --dataset {name} {flags} --cache {cache} --force"
    return f"{command} --dataset {name} --cache {Path(directory).parent.parent} --force (with the same inputs)"


def dataset_problems(directory: Path, manifest: dict[str, Any], everything: bool = False,
                     deep: bool = False) -> list[str]:
    """Files of a dataset folder that differ from what its manifest recorded when it was written: the
    annotation files (small: re-hashed whole), and with ``everything`` also the images (``deep``: sha256 of
    every byte, see :func:`refground.cache.manifest.content_problems`). Empty for a folder written before
    the manifest recorded files."""
    record = manifest.get("files") or {}
    if not everything:
        record = {k: v for k, v in record.items() if k.startswith("annotations/")}
    return content_problems(directory, record, deep)


def is_complete_with(directory: Path, params: dict[str, Any]) -> bool:
    """Whether ``directory`` holds a complete, undamaged dataset made with exactly ``params`` (so a step can
    skip). A missing, incomplete, unreadable or damaged one is simply "no": the step then redoes the work.
    """
    try:
        m = read_manifest(directory)
    except ArtifactError:
        return False
    return m.get("params") == params and not dataset_problems(directory, m)


def load_dataset(directory: Path) -> Dataset:
    """Load a dataset folder written by :func:`save_dataset`."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    damaged = dataset_problems(directory, manifest)
    if damaged:
        more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
        raise DataError(f"{damaged[0]}{more}; run `{dataset_remedy(directory, manifest)}`")
    ann = directory / "annotations"
    try:
        meta = json.loads((ann / "meta.json").read_text())
        columns: dict[str, Any] = {}
        for key in Dataset.COLUMN_NAMES:
            npy, js = ann / f"{key}.npy", ann / f"{key}.json"
            if npy.is_file():
                columns[key] = np.load(npy, allow_pickle=False)
            elif js.is_file():
                columns[key] = json.loads(js.read_text())
            elif key in _ADDED_COLUMNS:
                columns[key] = _ADDED_COLUMNS[key](columns)
            else:
                raise DataError(f"{ann}: missing column file {key}.npy/.json; "
                                f"run `{dataset_remedy(directory, manifest)}`")
    except (OSError, ValueError) as exc:
        raise DataError(f"{ann}: unreadable annotations ({exc}); run `{dataset_remedy(directory, manifest)}`") from None
    info = dict(meta.get("meta") or {})
    # A relative image root (or none: synthetic images live beside the annotations) resolves against
    # the dataset folder, so a cache can be moved as a whole.
    info["image_root"] = str(directory / info.get("image_root", "images"))
    return Dataset(meta["name"], meta["categories"], info, columns)


def load_named(name: str, cache: str | os.PathLike | None = None) -> Dataset:
    """Load ``<cache>/<name>/dataset``."""
    return load_dataset(dataset_dir(name, cache))


def image_path(ds: Dataset, image_id: int) -> Path:
    """Absolute path of an image file (``meta['image_root']`` joined with the image's file)."""
    root = ds.meta.get("image_root")
    if not root:
        raise DataError(f"dataset {ds.name}: no image_root in its meta")
    return Path(root) / ds.image(image_id).file
