"""Dense per-image maps in zarr (v3): one array per stride, ``[I, C, H / s, W / s]``.

Layout of ``dense/<backbone>.zarr``::

    zarr.json            group attributes: format, strides, image size, what the producing step adds
    s8, s16, s32         float16[I, C_s, size / s, size / s], chunked by ``images_per_chunk`` images
    image_ids            int64[I]

Assembled from committed chunks (:mod:`refground.cache.chunks`) into a temporary folder that is renamed
into place, like the HDF5 artifacts. Chunk arrays are named ``"<array>.map"`` (``"s8.map"``...) and
``"images.ids"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from refground.atomic import atomic_dir
from refground.cache.chunks import ChunkedJob
from refground.errors import ArtifactError


def write_zarr(path: Path, job: ChunkedJob, attrs: dict[str, Any], images_per_chunk: int = 16) -> None:
    """Assemble the chunks of ``job`` into a zarr group at ``path`` (atomically). A chunk that fails to read
    (or lacks ``images.ids``) is deleted and raises a one-line :class:`ArtifactError` naming it
    (:meth:`ChunkedJob.load`); ``path`` is then left as it was."""
    import zarr

    job.require_all()
    with atomic_dir(Path(path)) as tmp:
        group = zarr.open_group(store=str(tmp), mode="w")
        group.attrs.update(attrs)
        arrays: dict[str, Any] = {}
        pos = 0
        for k in range(job.num_chunks):
            with job.load(k) as z:
                ids = z["images.ids"]
                for key in z.keys():
                    name = key.partition(".")[0]
                    if name == "images":
                        continue
                    a = z[key]
                    if name not in arrays:
                        arrays[name] = group.create_array(name, shape=(job.num_items, *a.shape[1:]), dtype=a.dtype,
                                                          chunks=(images_per_chunk, *a.shape[1:]),
                                                          compressors=None, fill_value=0)
                    arrays[name][pos:pos + len(a)] = a
                if "image_ids" not in arrays:
                    arrays["image_ids"] = group.create_array("image_ids", shape=(job.num_items,), dtype="int64",
                                                             chunks=(max(1, job.num_items),), compressors=None,
                                                             fill_value=0)
                arrays["image_ids"][pos:pos + len(ids)] = ids
                pos += len(ids)


def open_dense(path: str | Path):
    """The zarr group of a dense artifact (read-only)."""
    import zarr

    try:
        return zarr.open_group(store=str(path), mode="r")
    except Exception as exc:  # zarr raises several unrelated types for a missing or damaged store
        raise ArtifactError(f"{path}: unreadable zarr store ({exc}); re-run `refground extract --dense`") from None


def dense_batch(group, stride: int, image_rows: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
    """``dtype``[B, C, h, w] maps of ``image_rows`` at ``stride`` (float32 by default; ``np.float16`` keeps the
    stored bytes): one contiguous slice when the rows are consecutive, else one orthogonal selection."""
    arr = group[f"s{stride}"]
    rows = np.asarray(image_rows, dtype=np.int64)
    if len(rows) and np.all(np.diff(rows) == 1):
        return np.asarray(arr[int(rows[0]):int(rows[-1]) + 1], dtype=dtype)
    return np.asarray(arr.get_orthogonal_selection((rows,)), dtype=dtype)
