"""Region-level arrays in HDF5: ragged per-image tables with offsets, read in contiguous runs.

File layout (one file per artifact, e.g. ``features/<extractor>.h5``)::

    /<section>/offsets   int64[I + 1]   rows of image row i are offsets[i]:offsets[i + 1]   (ragged sections)
    /<section>/<field>   [R, ...]       R = offsets[-1]; contiguous layout, no compression
    /<table>/<field>     [I, ...]       per-image tables (one row per image)
    attrs                format, version, and what the producing step adds (JSON strings for non-scalars)

Every array is one contiguous dataset, so the features of a run of consecutive images are one slice: a
training batch drawn from consecutive images (:func:`block_batches`) is a handful of reads, not one
look-up per image. The file is assembled from committed chunks (:mod:`refground.cache.chunks`) in chunk
order and written under a temporary name, so its content does not depend on interruptions or sharding;
datasets are created without timestamps so the bytes do not either.

Chunk arrays are named ``"<section>.<field>"``; a ragged section also has ``"<section>.counts"``
(int64[n], rows per image of the chunk); a per-image table has no counts (its arrays have n rows).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from refground.cache.chunks import ChunkedJob
from refground.errors import ArtifactError


def _h5py():
    import h5py

    return h5py


def _attr(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool, np.integer, np.floating)):
        return value
    return json.dumps(value, sort_keys=True)


def _split(key: str) -> tuple[str, str]:
    section, _, field = key.partition(".")
    if not field:
        raise ValueError(f"chunk array name {key!r} is not '<section>.<field>'")
    return section, field


def _close(z: Any) -> None:
    """Close a job's chunk archive (a plain dict has nothing to close)."""
    close = getattr(z, "close", None)
    if close is not None:
        close()


def write_h5(path: Path, chunks: Iterable[dict[str, np.ndarray]] | ChunkedJob, attrs: dict[str, Any],
             extra: Sequence[dict[str, np.ndarray]] = ()) -> None:
    """Assemble chunk arrays (in order) into one HDF5 file at ``path``, atomically.

    ``chunks``: a :class:`ChunkedJob` (all chunks must be committed) or a sequence of dicts of arrays named
    as in the module docstring; ``extra``: dicts appended after them (arrays that belong to no chunk, e.g. a
    CLIP artifact's category embeddings). Two passes: sizes first (only the small ``counts`` arrays are
    read), then each chunk's arrays are copied into preallocated contiguous datasets. A job's chunk that
    fails to read is deleted and raises a one-line :class:`ArtifactError` naming it (the next run of the
    step computes it again); nothing is written at ``path`` then.
    """
    h5py = _h5py()
    path = Path(path)
    if isinstance(chunks, ChunkedJob):
        job = chunks
        job.require_all()
        n_job = job.num_chunks
        listed = list(extra)
    else:
        job = None
        n_job = 0
        listed = list(chunks) + list(extra)
    n_chunks = n_job + len(listed)

    def get(k: int) -> Any:
        # One chunk at a time: a job's archives are opened lazily (an open file per chunk would run out of
        # file handles on a large job).
        return job.load(k) if k < n_job else listed[k - n_job]

    # Pass 1: row totals per section (ragged: from the small counts arrays; tables: from each chunk's
    # first array), dtype and trailing shape per field.
    counts: dict[str, list[np.ndarray]] = {}
    table_rows: dict[str, int] = {}
    fields: dict[str, dict[str, tuple[np.dtype, tuple[int, ...]]]] = {}
    for k in range(n_chunks):
        z = get(k)
        keys = list(z.keys())
        ragged = sorted({_split(key)[0] for key in keys if key.endswith(".counts")})
        for section in ragged:
            counts.setdefault(section, []).append(np.asarray(z[f"{section}.counts"], dtype=np.int64))
        seen_table: set[str] = set()
        for key in keys:
            section, fld = _split(key)
            if fld == "counts":
                continue
            new_field = fld not in fields.get(section, {})
            if section not in ragged and section not in seen_table:
                a = z[key]
                table_rows[section] = table_rows.get(section, 0) + len(a)
                seen_table.add(section)
            elif new_field:
                a = z[key]
            if new_field:
                fields.setdefault(section, {})[fld] = (a.dtype, tuple(a.shape[1:]))
        _close(z)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with h5py.File(tmp, "w", libver="latest", track_order=False) as f:
            for key, value in attrs.items():
                f.attrs[key] = _attr(value)
            offsets: dict[str, np.ndarray] = {}
            # Sorted: the file layout (and so its bytes) must not depend on dict/set order or hash seeds.
            for section, cs in sorted(counts.items()):
                c = np.concatenate(cs) if cs else np.zeros(0, np.int64)
                offsets[section] = np.concatenate([[0], np.cumsum(c)]).astype(np.int64)
                f.create_dataset(f"{section}/offsets", data=offsets[section], track_times=False)
            for section, fs in sorted(fields.items()):
                rows = int(offsets[section][-1]) if section in offsets else table_rows[section]
                for fld, (dtype, shape) in sorted(fs.items()):
                    f.create_dataset(f"{section}/{fld}", shape=(rows, *shape), dtype=dtype, track_times=False)
            # Pass 2: copy.
            pos = {s: 0 for s in fields}
            for k in range(n_chunks):
                z = get(k)
                keys = list(z.keys())
                for section in fields:
                    present = [key for key in keys if key.startswith(section + ".") and not key.endswith(".counts")]
                    if not present:
                        continue
                    first = np.asarray(z[present[0]])
                    for key in present:
                        a = first if key == present[0] else np.asarray(z[key])
                        if len(a):
                            f[f"{section}/{_split(key)[1]}"][pos[section]:pos[section] + len(a)] = a
                    pos[section] += len(first)
                _close(z)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class RaggedH5:
    """Read access to a file written by :func:`write_h5` (open for the object's lifetime; use as a
    context manager or call :meth:`close`). Offsets are held in memory; arrays are read on demand."""

    def __init__(self, path: str | Path):
        h5py = _h5py()
        self.path = Path(path)
        try:
            self.file = h5py.File(self.path, "r")
        except (OSError, FileNotFoundError) as exc:
            raise ArtifactError(f"{self.path}: unreadable HDF5 file ({exc}); re-run the step that made it") from None
        self.offsets: dict[str, np.ndarray] = {}
        for name, group in self.file.items():
            if isinstance(group, h5py.Group) and "offsets" in group:  # flat datasets (BiCM's scores) have none
                self.offsets[name] = group["offsets"][()]

    def __enter__(self) -> RaggedH5:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.file.close()

    def attr(self, key: str, default: Any = None) -> Any:
        """An attribute, JSON-decoded where it was stored as JSON."""
        if key not in self.file.attrs:
            return default
        v = self.file.attrs[key]
        if isinstance(v, bytes):
            v = v.decode()
        if isinstance(v, str) and v[:1] in "[{":
            try:
                return json.loads(v)
            except ValueError:
                return v
        return v

    def has(self, section: str, field: str | None = None) -> bool:
        return section in self.file and (field is None or field in self.file[section])

    def counts(self, section: str) -> np.ndarray:
        """int64[I] rows per image of a ragged section."""
        return np.diff(self.offsets[section])

    def rows_of(self, section: str, image_row: int) -> slice:
        o = self.offsets[section]
        return slice(int(o[image_row]), int(o[image_row + 1]))

    def image(self, section: str, field: str, image_row: int) -> np.ndarray:
        """The rows of one image (one slice read)."""
        return self.file[section][field][self.rows_of(section, image_row)]

    def table(self, section: str, field: str) -> np.ndarray:
        """A whole dataset in memory."""
        return self.file[section][field][()]

    def read(self, section: str, field: str, image_rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray, int]:
        """Rows of several images, concatenated in the order of ``image_rows``.

        Returns ``(array [R, ...], offsets int64[len(image_rows) + 1] into it, reads)``. Consecutive image
        rows are coalesced into one slice read each (``reads`` says how many were made), so images drawn
        as a block cost one read per section and field.
        """
        rows = np.asarray(image_rows, dtype=np.int64)
        ds = self.file[section][field]
        if section not in self.offsets:  # per-image table
            starts, stops = rows, rows + 1
        else:
            o = self.offsets[section]
            starts, stops = o[rows], o[rows + 1]
        lengths = stops - starts
        out_off = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        out = np.empty((int(out_off[-1]), *ds.shape[1:]), dtype=ds.dtype)
        reads = 0
        i, n = 0, len(rows)
        while i < n:
            j = i
            # Extend the run while the next image's rows start where this run's rows end.
            while j + 1 < n and starts[j + 1] == stops[j]:
                j += 1
            if stops[j] > starts[i]:
                out[out_off[i]:out_off[j + 1]] = ds[int(starts[i]):int(stops[j])]
                reads += 1
            i = j + 1
        return out, out_off, reads


def block_batches(item_images: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Batches of item indices (e.g. queries) in which items come from consecutive image rows.

    ``item_images``: int64[Q] image row of each item, non-decreasing (queries are stored grouped by image).
    The item order is cut into blocks of ``batch_size`` at a random offset, and the blocks are shuffled:
    every epoch sees different batch boundaries and order, while each batch touches one run of
    consecutive images, so its features are one contiguous read per array (:meth:`RaggedH5.read`).
    """
    q = len(item_images)
    if q == 0:
        return []
    if np.any(np.diff(item_images) < 0):
        raise ValueError("item_images must be grouped by image (non-decreasing)")
    start = int(rng.integers(0, batch_size)) if q > batch_size else 0
    cuts = list(range(start, q, batch_size))
    if cuts[0] != 0:
        cuts.insert(0, 0)
    bounds = cuts + [q]
    blocks = [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    order = rng.permutation(len(blocks))
    return [blocks[i] for i in order]
