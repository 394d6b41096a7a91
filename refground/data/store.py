"""On-disk form of a :class:`~refground.data.model.Dataset` under ``cache/<dataset>/dataset/``.

Layout::

    dataset/
      manifest.json            producing command, parameters, library version, time, complete flag
      annotations/meta.json    name, categories, meta (deterministic)
      annotations/<column>.npy numeric columns (np.save: deterministic bytes, memory-mappable)
      annotations/<column>.json string columns (JSON list of str)
      images/                  rendered images (synthetic datasets only)

The annotation files are byte-identical for identical content (no timestamps inside); only
``manifest.json`` records when and how the dataset was made. The folder is written under a temporary name
and renamed on success, so a reader never sees half of it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from refground import __version__
from refground.atomic import atomic_dir
from refground.data.model import Dataset
from refground.errors import ArtifactError, DataError

FORMAT = "refground-dataset"
FORMAT_VERSION = 1


def cache_root(cache: str | os.PathLike | None = None) -> Path:
    """The artifact root: ``cache`` if given, else ``$REFGROUND_CACHE``, else ``./cache``."""
    return Path(cache or os.environ.get("REFGROUND_CACHE") or "cache")


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


def is_complete_with(directory: Path, params: dict[str, Any]) -> bool:
    """Whether ``directory`` holds a complete dataset made with exactly ``params`` (so a step can skip).

    A missing, incomplete or unreadable manifest is simply "no": the step then redoes the work.
    """
    try:
        return read_manifest(directory).get("params") == params
    except ArtifactError:
        return False


def load_dataset(directory: Path) -> Dataset:
    """Load a dataset folder written by :func:`save_dataset`."""
    directory = Path(directory)
    read_manifest(directory)
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
            else:
                raise DataError(f"{ann}: missing column file {key}.npy/.json; re-run the step that made it")
    except (OSError, ValueError) as exc:
        raise DataError(f"{ann}: unreadable annotations ({exc}); re-run the step that made it") from None
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
