"""What LTS reads: dense maps from zarr in contiguous windows, and referent masks as training targets.

* :class:`DenseMaps` -- the three levels of ``dense/<name>.zarr`` for a set of dataset image rows, read a window
  of images at a time (one contiguous read per level, never one file access per query).
* :func:`referent_masks` -- each query's referent mask (the union of its referent objects' instance masks) as
  RLE; a dataset without masks is a one-line DataError.
* :func:`mask_targets` -- those masks area-averaged to the stride-4 and stride-8 grids of the dense frame
  (uint8 shares of 255), computed once per split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from refground import masks as rmasks
from refground.cache.zarrstore import dense_batch, open_dense
from refground.data.model import Dataset
from refground.errors import ArtifactError, DataError

STRIDES = (32, 16, 8)  # F_v1, F_v2, F_v3


class DenseMaps:
    """The dense artifact at ``path`` for dataset ``ds``: :meth:`rows_of` maps dataset image rows to zarr rows,
    :meth:`read` gives the float16 maps of a set of images at the three strides in one read per level."""

    def __init__(self, path: Path, ds: Dataset) -> None:
        self.path = Path(path)
        self.group = open_dense(path)
        try:
            ids = np.asarray(self.group["image_ids"][:], dtype=np.int64)
            self.shapes = {s: tuple(self.group[f"s{s}"].shape[1:]) for s in STRIDES}
        except KeyError as exc:
            raise ArtifactError(f"{path}: no array {exc} in the dense maps; re-run `refground extract --dense "
                                "--force`") from None
        pos = {int(i): k for k, i in enumerate(ids.tolist())}
        missing = [int(i) for i in ds.image_ids.tolist() if int(i) not in pos]
        if missing:
            raise ArtifactError(f"{path}: no dense maps for {len(missing)} images of {ds.name} (e.g. image "
                                f"{missing[0]}); re-run `refground extract --dense --force`")
        self._rows = np.array([pos[int(i)] for i in ds.image_ids.tolist()], dtype=np.int64)

    @property
    def channels(self) -> list[int]:
        """Channels of F_v1, F_v2, F_v3."""
        return [int(self.shapes[s][0]) for s in STRIDES]

    @property
    def frame(self) -> int:
        """Side of the square frame the maps were computed on (stride-8 side x 8)."""
        return int(self.shapes[8][1]) * 8

    def rows_of(self, image_rows: np.ndarray) -> np.ndarray:
        """Zarr rows int64[N] of dataset image rows."""
        return self._rows[np.asarray(image_rows, dtype=np.int64)]

    def read(self, zarr_rows: np.ndarray) -> dict[int, np.ndarray]:
        """{stride: float16[N, C, h, w]} of sorted distinct ``zarr_rows`` (a contiguous slice when they are
        consecutive, else one orthogonal selection per level)."""
        return {s: dense_batch(self.group, s, zarr_rows, np.float16) for s in STRIDES}

    def read_one(self, zarr_row: int) -> dict[int, np.ndarray]:
        """The slow way (the benchmark's baseline): one image, one read per level."""
        return self.read(np.array([zarr_row]))


@dataclass
class Window:
    """The maps of a block of images: ``rows`` sorted zarr rows int64[N], ``maps`` {stride: float16[N, ...]}."""

    rows: np.ndarray
    maps: dict[int, np.ndarray]

    def gather(self, zarr_rows: np.ndarray) -> list[torch.Tensor]:
        """float32 Tensors [B, C, h, w] of F_v1, F_v2, F_v3 for the images at ``zarr_rows`` (all in the window)."""
        idx = np.searchsorted(self.rows, zarr_rows)
        return [torch.from_numpy(self.maps[s][idx].astype(np.float32)) for s in STRIDES]


def windows_of(zarr_rows: np.ndarray, size: int) -> list[np.ndarray]:
    """The distinct sorted ``zarr_rows`` cut into consecutive blocks of at most ``size`` images."""
    rows = np.unique(np.asarray(zarr_rows, dtype=np.int64))
    return [rows[i:i + size] for i in range(0, len(rows), max(1, size))]


def referent_object_rows(ds: Dataset, query_rows: np.ndarray) -> list[np.ndarray]:
    """Per query (storage rows ``query_rows``) the dataset object rows of its referent(s), int64[k] (k >= 1)."""
    out = []
    for k in np.asarray(query_rows, dtype=np.int64).tolist():
        q = ds._query_at(k)
        ref = [m.object_ids for m in q.mentions if m.role == "referent"]
        ids = [int(i) for i in (ref[0] if ref else ())]
        if not ids:
            raise DataError(f"dataset {ds.name}: query {q.id} has no referent object")
        out.append(np.array([ds.object_row(i) for i in ids], dtype=np.int64))
    return out


def referent_masks(ds: Dataset, query_rows: np.ndarray, command: str = "refground train lts") -> list[dict[str, Any]]:
    """Per query its referent mask as a compressed RLE of the image's size (the union of its referent objects'
    masks). A dataset whose referents have no instance masks is a one-line DataError naming ``command``."""
    out = []
    for k, objs in zip(np.asarray(query_rows).tolist(), referent_object_rows(ds, query_rows)):
        counts = [ds.object_masks[int(o)] for o in objs]
        if not all(counts):
            q = ds._query_at(k)
            raise DataError(f"dataset {ds.name} has no instance mask for the referent of query {q.id}: `{command}` "
                            "needs referent masks (the synthetic world and RefCOCO/+/g with their COCO instances "
                            "have them; `refground data import-refcoco` reads them from instances.json; Flickr30K Entities has none)")
        img = ds.image_row(int(ds.object_image_ids[int(objs[0])]))
        size = [int(ds.image_height[img]), int(ds.image_width[img])]
        rles = [{"size": size, "counts": c} for c in counts]
        out.append(rles[0] if len(rles) == 1 else rmasks.encode(np.any([rmasks.decode(r) for r in rles], axis=0)))
    return out


def mask_targets(masks: Sequence[dict[str, Any]], frame: int, batch: int = 512) -> dict[int, np.ndarray]:
    """The masks (RLEs) resized to the dense frame (``frame`` x ``frame``, as the images were for the maps) and
    area-averaged to the stride-4 and stride-8 grids: {4: uint8[Q, frame/4, frame/4], 8: uint8[Q, frame/8,
    frame/8]}, the covered share of each cell x 255 (rounded)."""
    out = {s: np.zeros((len(masks), frame // s, frame // s), dtype=np.uint8) for s in (4, 8)}
    for lo in range(0, len(masks), batch):
        dense = [rmasks.decode(m) for m in masks[lo:lo + batch]]
        for s in (4, 8):
            side = frame // s
            if len({d.shape for d in dense}) == 1:
                t = F.interpolate(torch.from_numpy(np.stack(dense))[:, None].float(), size=(side, side),
                                  mode="area")[:, 0]
            else:  # images of several sizes (real datasets): one at a time
                t = torch.cat([F.interpolate(torch.from_numpy(d)[None, None].float(), size=(side, side),
                                             mode="area")[:, 0] for d in dense])
            out[s][lo:lo + len(dense)] = (t * 255).round().to(torch.uint8).numpy()
    return out


def decode_targets(targets: np.ndarray) -> torch.Tensor:
    """uint8 shares of :func:`mask_targets` -> float32 Tensor in [0, 1]."""
    return torch.from_numpy(targets.astype(np.float32) / 255.0)


__all__ = [
    "STRIDES",
    "DenseMaps",
    "Window",
    "decode_targets",
    "mask_targets",
    "referent_masks",
    "referent_object_rows",
    "windows_of",
]
