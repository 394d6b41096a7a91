"""Consistency checks of a :class:`Dataset`, vectorised over all records.

Every problem is a :class:`DataError` with one line naming the source and the first offending record.
"""

from __future__ import annotations

import numpy as np

from refground.data.model import TASKS, Dataset
from refground.errors import DataError


def validate_dataset(ds: Dataset, source: str = "") -> None:
    """Raise :class:`DataError` on the first problem: boxes outside the image or of zero area, empty
    queries, mention spans outside the tokens, mentions linked to objects of another image, relation
    indices outside the query's mentions, expressions without exactly one referent object."""
    where = source or f"dataset {ds.name}"
    # Boxes: inside the image (continuous coordinates, so x2 <= width) and of positive area.
    if ds.num_objects:
        img_rows = np.array([ds._image_pos[int(i)] for i in ds.object_image_ids], dtype=np.int64)
        w = ds.image_width[img_rows].astype(np.float64)
        h = ds.image_height[img_rows].astype(np.float64)
        b = ds.object_boxes
        bad_finite = ~np.isfinite(b).all(axis=1)
        outside = (b[:, 0] < 0) | (b[:, 1] < 0) | (b[:, 2] > w) | (b[:, 3] > h)
        empty = (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])
        for name, mask in (("is not finite", bad_finite), ("lies outside its image", outside),
                           ("has zero area", empty)):
            if mask.any():
                k = int(np.flatnonzero(mask)[0])
                raise DataError(f"{where}: object {int(ds.object_ids[k])} box {b[k].tolist()} {name} "
                                f"(image {int(ds.object_image_ids[k])}, {int(w[k])}x{int(h[k])})")
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
