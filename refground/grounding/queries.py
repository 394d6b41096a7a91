"""Encoded queries for grounding models: a split's referring expressions as vocabulary ids with their image
rows and referents (:class:`QueryTable`), and the word maps of the mirroring augmentation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refground.data.model import Dataset
from refground.errors import ArtifactError, DataError
from refground.text.vocab import Vocabulary


@dataclass
class QueryTable:
    """Encoded expression queries of one split.

    query_ids int64[Q]; image_rows int64[Q] (row of the query's image in the dataset); words int64[Q, T]
    (0-padded vocabulary ids); targets int64[Q] (index of the referent among its image's ground-truth
    objects, -1 where the referent is not a single object of the image); kinds list[str].
    """

    query_ids: np.ndarray
    image_rows: np.ndarray
    words: np.ndarray
    targets: np.ndarray
    kinds: list[str]

    def __len__(self) -> int:
        return len(self.query_ids)


def encode_queries(ds: Dataset, split: str, vocab: Vocabulary, max_words: int = 40) -> QueryTable:
    """The expression queries of ``split`` (refer semantics) encoded with ``vocab``; an empty split or an
    empty expression is a :class:`DataError`. Longer expressions are cut to ``max_words`` words."""
    rows = ds.query_rows(split, "expression")
    if len(rows) == 0:
        raise DataError(f"dataset {ds.name} has no expression queries in split {split!r}")
    return encode_query_rows(ds, rows, vocab, max_words)


def encode_query_rows(ds: Dataset, rows: np.ndarray, vocab: Vocabulary, max_words: int = 40) -> QueryTable:
    """The queries at storage rows ``rows`` (see :func:`encode_queries`)."""
    rows = np.asarray(rows, dtype=np.int64)
    image_pos = {int(i): r for r, i in enumerate(ds.image_ids.tolist())}
    words = np.zeros((len(rows), max_words), dtype=np.int64)
    targets = np.full(len(rows), -1, dtype=np.int64)
    image_rows = np.zeros(len(rows), dtype=np.int64)
    longest = 1
    for n, k in enumerate(rows.tolist()):
        q = ds._query_at(k)
        tokens = [t for t in q.tokens if t]
        if not tokens:
            raise DataError(f"dataset {ds.name}: query {q.id} is empty")
        ids = vocab.encode(tokens[:max_words])
        words[n, :len(ids)] = ids
        longest = max(longest, len(ids))
        r = image_pos[q.image_id]
        image_rows[n] = r
        ref = [m.object_ids for m in q.mentions if m.role == "referent"]
        if ref and len(ref[0]) == 1:
            targets[n] = ds.object_row(ref[0][0]) - int(ds.image_object_offsets[r])
    return QueryTable(ds.query_ids[rows].astype(np.int64), image_rows, words[:, :longest], targets,
                      [ds.query_kinds[k] for k in rows.tolist()])


def group_queries(queries: "QueryTable", group_query_ids: np.ndarray) -> "QueryTable":
    """``queries`` with ``image_rows`` pointing at the per-query candidate groups of
    :func:`load_query_candidates` (a query missing from the proposal set is a one-line ArtifactError)."""
    pos = {int(q): g for g, q in enumerate(group_query_ids.tolist())}
    missing = [int(q) for q in queries.query_ids.tolist() if int(q) not in pos]
    if missing:
        raise ArtifactError(f"the query-aware proposals lack query {missing[0]} (and {len(missing) - 1} more); "
                            "run `refground vlnms` for this split")
    rows = np.array([pos[int(q)] for q in queries.query_ids.tolist()], dtype=np.int64)
    return QueryTable(queries.query_ids, rows, queries.words, queries.targets, queries.kinds)


def single_referent_rows(table: QueryTable, dataset: str) -> np.ndarray:
    """int64 rows of ``table`` whose referent is one object of their image (what a comprehension loss trains on);
    none at all is a one-line DataError naming ``dataset``."""
    rows = np.flatnonzero(table.targets >= 0)
    if len(rows) == 0:
        raise DataError(f"dataset {dataset}: no train expression with a single referent object")
    return rows


def flip_word_map(vocab: Vocabulary, pairs: tuple[tuple[str, str], ...]) -> np.ndarray:
    """int64[V]: the id each word id becomes in the mirrored image (pairs swap both ways; a word already
    mapped by an earlier pair keeps that mapping)."""
    table = np.arange(len(vocab), dtype=np.int64)
    done: set[int] = set()
    for a, b in pairs:
        ia, ib = vocab.index.get(a), vocab.index.get(b)
        if ia is None or ib is None:
            continue
        for x, y in ((ia, ib), (ib, ia)):
            if x not in done:
                table[x] = y
                done.add(x)
    return table




__all__ = ["QueryTable", "encode_queries", "encode_query_rows", "flip_word_map", "group_queries",
           "single_referent_rows"]
