"""The one container of boxes in groups: :class:`RaggedBoxes` (numpy, flat rows with per-group offsets).

A group is an image (the candidates or pre-NMS detections of each image, the proposals of a features
artifact) or a query (query-aware proposals). Every such set in the library is a :class:`RaggedBoxes`
(:class:`refground.grounding.candidates.CandidateSet`, :class:`refground.methods.vlnms.run.DetectionSet`,
:class:`refground.methods.vlnms.run.QueryProposals` subclass it), so the offsets, per-group rows, top-N and
padding logic lives here once. Box math stays in :mod:`refground.boxes`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

# Names a field may not take: the container's own attributes.
_RESERVED = frozenset({"offsets", "boxes", "row_fields", "group_fields"})


def offsets_of(counts: np.ndarray | Sequence[int]) -> np.ndarray:
    """int64[G + 1] offsets of groups of ``counts`` int[G] rows: ``[0, c0, c0 + c1, ...]``."""
    return np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))]).astype(np.int64)


def group_rows(offsets: np.ndarray, groups: np.ndarray | Sequence[int] | None = None, n: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``groups`` (default: every group, in order), concatenated in the order of ``groups``, and the
    new offsets int64[len(groups) + 1] into them; with ``n``, only the first ``n`` rows of each group.

    offsets: int64[G + 1] (group g owns rows ``offsets[g]:offsets[g + 1]``). Vectorised: no loop over rows
    or groups.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    g = np.arange(len(offsets) - 1) if groups is None else np.asarray(groups, dtype=np.int64).reshape(-1)
    starts = offsets[g]
    counts = offsets[g + 1] - starts
    if n is not None:
        counts = np.minimum(counts, max(int(n), 0))
    new_off = offsets_of(counts)
    rows = np.repeat(starts, counts) + (np.arange(new_off[-1]) - np.repeat(new_off[:-1], counts))
    return rows.astype(np.int64, copy=False), new_off


class RaggedBoxes:
    """Boxes of G groups, flat in memory with per-group offsets, plus named per-row and per-group fields.

    offsets: int64[G + 1], ``offsets[0] == 0``, non-decreasing; group g owns rows ``offsets[g]:offsets[g + 1]``
    of every row field. boxes: float[M, 4] (M = ``offsets[-1]``), xyxy in continuous absolute pixels (float32
    from every loader of the library). Row fields (``rows``): arrays whose first dimension is M, e.g. features
    float[M, D], scores float32[M], labels int64[M]. Group fields (``groups``): arrays of length G, e.g.
    image_ids int64[G], image_sizes int64[G, 2] (height, width), query_ids int64[G].

    Every field is an attribute (``rb.features``, ``rb.image_ids``); ``row_fields`` (``"boxes"`` first) and
    ``group_fields`` name them. Arrays are stored as given (no dtype conversion, no copy); an empty ``boxes``
    of any shape becomes float32[0, 4]. Subclasses add attributes of their own (relation blocks, timings),
    which :meth:`top` does not carry.
    """

    offsets: np.ndarray
    boxes: np.ndarray
    row_fields: tuple[str, ...]
    group_fields: tuple[str, ...]

    def __init__(self, offsets: np.ndarray | Sequence[int], boxes: np.ndarray,
                 rows: Mapping[str, Any] | None = None, groups: Mapping[str, Any] | None = None) -> None:
        offsets = np.asarray(offsets, dtype=np.int64)
        if offsets.ndim != 1 or len(offsets) == 0 or offsets[0] != 0 or np.any(np.diff(offsets) < 0):
            raise ValueError(f"RaggedBoxes needs offsets int[G + 1] from 0, non-decreasing; got {offsets!r}")
        boxes = np.asarray(boxes)
        if boxes.size == 0 and boxes.shape != (0, 4):
            boxes = np.zeros((0, 4), dtype=boxes.dtype if boxes.dtype.kind == "f" else np.float32)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"RaggedBoxes needs boxes float[M, 4], got shape {boxes.shape}")
        m, g = int(offsets[-1]), len(offsets) - 1
        if len(boxes) != m:
            raise ValueError(f"RaggedBoxes: {len(boxes)} boxes but offsets end at {m}")
        self.offsets, self.boxes = offsets, boxes
        rows, groups = dict(rows or {}), dict(groups or {})
        for kind, fields, want in (("row", rows, m), ("group", groups, g)):
            for name, value in fields.items():
                if name in _RESERVED or not name.isidentifier() or hasattr(type(self), name) \
                        or (kind == "group" and name in rows):
                    raise ValueError(f"RaggedBoxes: {name!r} cannot be a field name")
                if len(value) != want:
                    raise ValueError(f"RaggedBoxes: {kind} field {name!r} has length {len(value)}, expected {want}")
                setattr(self, name, value)
        self.row_fields = ("boxes", *rows)
        self.group_fields = tuple(groups)

    def __len__(self) -> int:
        """G, the number of groups."""
        return len(self.offsets) - 1

    @property
    def num_rows(self) -> int:
        """M, the number of rows (boxes) over all groups."""
        return int(self.offsets[-1])

    def counts(self) -> np.ndarray:
        """int64[G]: rows per group."""
        return np.diff(self.offsets)

    def rows(self, g: int) -> slice:
        """The rows of group ``g``: ``offsets[g]:offsets[g + 1]``."""
        return slice(int(self.offsets[g]), int(self.offsets[g + 1]))

    def group(self, g: int, field: str = "boxes") -> Any:
        """Row field ``field`` (default the boxes, float[K_g, 4]) of group ``g``: a view, shape [K_g, ...]."""
        if field not in self.row_fields:
            raise KeyError(f"RaggedBoxes has no row field {field!r} (row fields: {', '.join(self.row_fields)})")
        return getattr(self, field)[self.rows(g)]

    def group_rows(self, groups: np.ndarray | Sequence[int] | None = None, n: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
        """:func:`group_rows` of this container: rows int64[R] of ``groups`` (in that order; default all), the
        first ``n`` of each when given, and offsets int64[len(groups) + 1] into them."""
        return group_rows(self.offsets, groups, n)

    def top(self, n: int) -> RaggedBoxes:
        """The first ``n`` rows of every group (all rows of a group with fewer), every row field gathered and
        every group field kept: a new :class:`RaggedBoxes` (a plain one, also for subclasses)."""
        rows, offsets = self.group_rows(None, n)
        return RaggedBoxes(offsets, self.boxes[rows], {k: getattr(self, k)[rows] for k in self.row_fields[1:]},
                           {k: getattr(self, k) for k in self.group_fields})

    def padded_rows(self, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row indices of ``groups`` int[N] padded to the largest of them (K = max(1, largest count)):
        rows int64[N, K] (0 at padding, so they index any row field safely when M > 0) and valid bool[N, K]."""
        groups = np.asarray(groups, dtype=np.int64)
        counts = self.offsets[groups + 1] - self.offsets[groups]
        k = max(1, int(counts.max()) if len(counts) else 1)
        slot = np.arange(k)
        valid = slot[None, :] < counts[:, None]
        return np.where(valid, self.offsets[groups][:, None] + slot[None, :], 0), valid

    @property
    def feature_dim(self) -> int:
        """D of the row field ``features`` float[M, D] (AttributeError without one)."""
        if "features" not in self.row_fields:
            raise AttributeError(f"{type(self).__name__} has no features")
        return int(getattr(self, "features").shape[1])

    @staticmethod
    def read(f: Any, section: str, fields: Iterable[str] = ()) -> RaggedBoxes:
        """A ragged section of an HDF5 artifact (:class:`refground.cache.RaggedH5` ``f``): its offsets, its
        ``boxes`` and the row ``fields`` named, as stored (no dtype conversion). Always a plain RaggedBoxes."""
        return RaggedBoxes(f.offsets[section], f.table(section, "boxes"), {k: f.table(section, k) for k in fields})

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(groups={len(self)}, rows={self.num_rows}, "
                f"row_fields={list(self.row_fields)}, group_fields={list(self.group_fields)})")


__all__ = ["RaggedBoxes", "group_rows", "offsets_of"]
