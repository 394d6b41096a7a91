"""Consistency checks of a :class:`Dataset`, vectorised over all records.

Every problem is a :class:`DataError` with one line naming the source and the first offending record.
"""

from __future__ import annotations

import numpy as np

from refground.data.model import PHRASE_KINDS, TASKS, Dataset
from refground.errors import DataError


def check_boxes(boxes: np.ndarray, width: np.ndarray, height: np.ndarray,
                tolerance: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Classify boxes ``float64[M, 4]`` (xyxy) against their image sizes ``[M]``.

    Returns ``(clipped_boxes, clipped, bad)``: ``clipped`` marks boxes at most ``tolerance`` pixels outside
    the image (clipped in the returned array; importers of real annotations allow one pixel); ``bad`` marks
    non-finite boxes, boxes further outside, and boxes of zero area after clipping.
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    w = np.asarray(width, dtype=np.float64)
    h = np.asarray(height, dtype=np.float64)
    finite = np.isfinite(b).all(axis=1)
    lo = np.zeros_like(b)
    hi = np.stack([w, h, w, h], axis=1)
    over = np.maximum(lo - b, b - hi).max(axis=1) if len(b) else np.zeros(0)
    far = ~finite | (over > tolerance)
    clipped = finite & (over > 0) & ~far
    b[clipped] = np.clip(b[clipped], lo[clipped], hi[clipped])
    empty = (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])
    return b, clipped, far | (finite & empty)


def box_problem(box: np.ndarray, width: float, height: float) -> str:
    """A words-only description of why ``box`` (xyxy) is invalid for a ``width x height`` image."""
    if not np.isfinite(box).all():
        return "is not finite"
    if box[2] <= box[0] or box[3] <= box[1]:
        return "has zero area"
    return f"lies outside the {int(width)}x{int(height)} image"


def validate_dataset(ds: Dataset, source: str = "") -> None:
    """Raise :class:`DataError` on the first problem: boxes outside the image or of zero area, empty
    queries, mention spans outside the tokens, mentions linked to objects of another image, relation
    indices outside the query's mentions, expressions without exactly one referent object, phrase kinds
    other than "" and :data:`~refground.data.model.PHRASE_KINDS`, and phrase kinds on expressions' mentions."""
    where = source or f"dataset {ds.name}"
    # Boxes: inside the image (continuous coordinates, so x2 <= width), finite, of positive area.
    if ds.num_objects:
        img_rows = np.array([ds._image_pos[int(i)] for i in ds.object_image_ids], dtype=np.int64)
        w, h = ds.image_width[img_rows], ds.image_height[img_rows]
        _, _, bad = check_boxes(ds.object_boxes, w, h)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            box = ds.object_boxes[k]
            raise DataError(f"{where}: object {int(ds.object_ids[k])} box {box.tolist()} "
                            f"{box_problem(box, w[k], h[k])} (image {int(ds.object_image_ids[k])})")
    # Queries: non-empty text; single-space tokens.
    for k, text in enumerate(ds.query_texts):
        if not text.strip():
            raise DataError(f"{where}: query {int(ds.query_ids[k])} is empty")
    n_tokens = np.array([t.count(" ") + 1 for t in ds.query_texts], dtype=np.int64)
    # Mentions: spans within their query's tokens.
    n_mentions = np.diff(ds.query_mention_offsets)
    q_of_mention = np.repeat(np.arange(ds.num_queries), n_mentions)
    if len(q_of_mention):
        bad = (ds.mention_starts < 0) | (ds.mention_ends <= ds.mention_starts) | \
              (ds.mention_ends > n_tokens[q_of_mention])
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            q = int(q_of_mention[j])
            raise DataError(f"{where}: query {int(ds.query_ids[q])} has a mention span "
                            f"[{int(ds.mention_starts[j])}, {int(ds.mention_ends[j])}) outside its "
                            f"{int(n_tokens[q])} tokens")
    # Mention objects: exist and lie in the query's image.
    n_objs = np.diff(ds.mention_object_offsets)
    if len(ds.mention_object_ids):
        q_of_link = np.repeat(q_of_mention, n_objs)
        for oid, q in zip(ds.mention_object_ids.tolist(), q_of_link.tolist()):
            row = ds._object_pos.get(oid)
            if row is None:
                raise DataError(f"{where}: query {int(ds.query_ids[q])} refers to unknown object {oid}")
            if ds.object_image_ids[row] != ds.query_image_ids[q]:
                raise DataError(f"{where}: query {int(ds.query_ids[q])} refers to object {oid} of "
                                f"another image")
    for q, img in enumerate(ds.query_image_ids.tolist()):
        if img not in ds._image_pos:
            raise DataError(f"{where}: query {int(ds.query_ids[q])} refers to unknown image {img}")
    # Mention kinds: one per mention, a known phrase kind, on captions only (an expression's kind is its query's).
    if len(ds.mention_kinds) != len(q_of_mention):
        raise DataError(f"{where}: {len(ds.mention_kinds)} mention kinds for {len(q_of_mention)} mentions")
    kinded = np.array([k != "" for k in ds.mention_kinds], dtype=bool)
    if kinded.any():
        unknown = [j for j in np.flatnonzero(kinded).tolist() if ds.mention_kinds[j] not in PHRASE_KINDS]
        if unknown:
            q = int(q_of_mention[unknown[0]])
            raise DataError(f"{where}: query {int(ds.query_ids[q])} has a mention of unknown kind "
                            f"{ds.mention_kinds[unknown[0]]!r}; expected one of: {', '.join(PHRASE_KINDS)}")
        on_expr = kinded & (ds.query_tasks[q_of_mention] == TASKS.index("expression"))
        if on_expr.any():
            q = int(q_of_mention[int(np.flatnonzero(on_expr)[0])])
            raise DataError(f"{where}: expression {int(ds.query_ids[q])} has a mention with a phrase kind; "
                            "phrase kinds are for captions")
    # Relations: indices inside the query's mentions.
    n_rel = np.diff(ds.query_relation_offsets)
    if n_rel.sum():
        q_of_rel = np.repeat(np.arange(ds.num_queries), n_rel)
        lim = n_mentions[q_of_rel]
        bad = (ds.relation_subjects < 0) | (ds.relation_objects < 0) | \
              (ds.relation_subjects >= lim) | (ds.relation_objects >= lim)
        if bad.any():
            q = int(q_of_rel[int(np.flatnonzero(bad)[0])])
            raise DataError(f"{where}: query {int(ds.query_ids[q])} has a relation between mentions "
                            f"it does not have")
    # Expressions: exactly one referent mention with exactly one object.
    expr = ds.query_tasks == TASKS.index("expression")
    referent = ds.mention_roles == 0
    n_ref = np.add.reduceat(referent.astype(np.int64), ds.query_mention_offsets[:-1]) if len(referent) \
        else np.zeros(ds.num_queries, dtype=np.int64)
    n_ref = np.where(n_mentions > 0, n_ref, 0)
    bad = expr & (n_ref != 1)
    if bad.any():
        q = int(np.flatnonzero(bad)[0])
        raise DataError(f"{where}: expression {int(ds.query_ids[q])} has {int(n_ref[q])} referent "
                        "mentions, expected one")
    if expr.any() and len(referent):
        first = ds.query_mention_offsets[:-1]
        ref_rows = first + np.array([int(np.argmax(ds.mention_roles[a:b] == 0)) if b > a else 0
                                     for a, b in zip(first, ds.query_mention_offsets[1:])])
        for q in np.flatnonzero(expr).tolist():
            j = int(ref_rows[q])
            if n_objs[j] != 1:
                raise DataError(f"{where}: expression {int(ds.query_ids[q])} refers to {int(n_objs[j])} "
                                "objects, expected exactly one")
