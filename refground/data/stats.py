"""Dataset statistics: counts per split and kind, objects per image, expression lengths."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from refground.data.model import BASE_SPLITS, KIND_ORDER, PHRASE_KINDS, RELATION_KINDS, TASKS, Dataset


def _summary(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {"min": 0, "mean": 0.0, "max": 0}
    return {"min": int(values.min()), "mean": round(float(values.mean()), 3), "max": int(values.max())}


def dataset_stats(ds: Dataset) -> dict[str, Any]:
    """Figures about ``ds`` as a JSON-ready dict.

    ``splits``: per stored query split, images / expressions / captions; ``kinds``: per expression kind,
    count and share of all expressions (plus captions); ``objects_per_image``, ``expression_length``
    (tokens; overall and per kind), ``categories`` (object counts); ``caption_phrases``: the mentions of
    captions, and ``caption_phrase_kinds``: per phrase kind (``Mention.kind``: singular, plural,
    needs-relation in the synthetic world), count and share of the caption phrases (empty where no phrase
    has a kind, as in real data).
    """
    tasks = ds.query_tasks
    expr = tasks == TASKS.index("expression")
    n_tokens = np.array([t.count(" ") + 1 for t in ds.query_texts], dtype=np.int64)
    kinds = np.array(ds.query_kinds, dtype=object)
    qsplits = np.array(ds.query_splits, dtype=object)

    splits: dict[str, dict[str, int]] = {}
    seen = dict.fromkeys(list(ds.image_splits) + list(ds.query_splits))
    known = [s for s in BASE_SPLITS if s in seen]
    for split in known + [s for s in seen if s not in known]:
        in_split = qsplits == split
        splits[split or "(none)"] = {
            "images": int(sum(1 for s in ds.image_splits if s == split)),
            "expressions": int((in_split & expr).sum()),
            "captions": int((in_split & ~expr).sum()),
        }

    n_expr = int(expr.sum())
    kind_counts = Counter(kinds[expr].tolist())
    kind_stats: dict[str, dict[str, Any]] = {}
    order = {k: i for i, k in enumerate(KIND_ORDER)}
    for kind, count in sorted(kind_counts.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])):
        sel = expr & (kinds == kind)
        kind_stats[kind or "(unlabelled)"] = {"count": int(count), "share": round(count / n_expr, 4),
                                             "length": _summary(n_tokens[sel])}
    relation_share = sum(kind_counts.get(k, 0) for k in RELATION_KINDS) / n_expr if n_expr else 0.0
    per_image = np.diff(ds.image_object_offsets)
    caption_mention = np.repeat(~expr, np.diff(ds.query_mention_offsets))
    n_phrases = int(caption_mention.sum())
    phrase_counts = Counter(k for k, c in zip(ds.mention_kinds, caption_mention.tolist()) if c and k)
    phrase_order = {k: i for i, k in enumerate(PHRASE_KINDS)}
    phrase_kinds = {k: {"count": int(v), "share": round(v / n_phrases, 4)}
                    for k, v in sorted(phrase_counts.items(), key=lambda kv: (phrase_order.get(kv[0], 99), kv[0]))}
    categories = Counter(ds.categories[i] for i in ds.object_categories.tolist())
    return {
        "dataset": ds.name,
        "images": ds.num_images,
        "objects": ds.num_objects,
        "expressions": n_expr,
        "captions": int((~expr).sum()),
        "splits": splits,
        "kinds": kind_stats,
        "relation_share": round(relation_share, 4),
        "second_order_share": round(kind_counts.get("relation2", 0) / n_expr, 4) if n_expr else 0.0,
        "objects_per_image": _summary(per_image),
        "expression_length": _summary(n_tokens[expr]),
        "caption_length": _summary(n_tokens[~expr]),
        "caption_phrases": n_phrases,
        "caption_phrase_kinds": phrase_kinds,
        "categories": dict(sorted(categories.items())),
    }
