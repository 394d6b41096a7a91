"""What unpaired grounding may read (BiCM, Sec. 3.1 and 3.5; design.md, "Supervision, kept honest").

BiCM's training data is a pool of images and a separate pool of queries, "without correspondences". The
loader here is the only way the method's training side reaches the dataset:

* :class:`ImagePool`: the image ids of a split, shuffled (seeded), with their sizes; no query, no object, no box;
* :class:`QueryPool`: the distinct query texts of the same split (expressions, or caption phrases), sorted and
  then shuffled (seeded), with no query id, no image id and no count per image: a function of the *set* of
  texts only, so reassigning the queries to other images leaves it bit for bit the same (the test of
  tests/test_bicm_data.py).

Proposals come from the detector (``features/<name>.h5``: boxes, class labels, scores; the detector learnt boxes
and categories, never queries, like the paper's Visual Genome detector) and CLIP embeddings from the CLIP artifact
(``clip/<model>.h5``: whole images, proposal crops, category prompts). Neither holds a benchmark box. Ground truth
is read by evaluation code only (:mod:`refground.methods.bicm.pseudo` judging pseudo labels after they are fixed,
``refground eval``), never by what trains or predicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refground.data.model import TASKS, Dataset, split_matches
from refground.errors import ArtifactError, UsageError

QUERY_KINDS = ("expression", "phrase")  # which queries a pool holds: referring expressions or caption phrases


def phrase_text(tokens: list[str], start: int, end: int) -> str:
    """The words of a caption phrase (mention span ``[start, end)`` of the caption's tokens)."""
    return " ".join(tokens[start:end])


def split_image_rows(ds: Dataset, split: str) -> np.ndarray:
    """Rows of the images of ``split`` (int64, dataset order)."""
    return np.array([i for i, s in enumerate(ds.image_splits) if split_matches(s, split)], dtype=np.int64)


def eval_pairs(ds: Dataset, split: str, kind: str) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """The (image, text) pairs of the queries of ``split``: every expression (``kind`` expression), or every caption
    phrase (``phrase``). Returns image rows int64[Q], texts, query ids int64[Q] and mention indices int64[Q] (-1 for
    expressions)."""
    if kind not in QUERY_KINDS:
        raise UsageError(f"query kind {kind!r}: expected one of {', '.join(QUERY_KINDS)}")
    rows = ds.query_rows(split)
    rows = rows[ds.query_tasks[rows] == TASKS.index("expression" if kind == "expression" else "caption")]
    row_of = {int(i): r for r, i in enumerate(ds.image_ids.tolist())}
    pairs: list[tuple[int, str, int, int]] = []  # (image row, text, query id, mention)
    for r in rows.tolist():
        text, qid, irow = ds.query_texts[r], int(ds.query_ids[r]), row_of[int(ds.query_image_ids[r])]
        if kind == "expression":
            pairs.append((irow, text, qid, -1))
            continue
        tokens = text.split(" ")
        a, b = int(ds.query_mention_offsets[r]), int(ds.query_mention_offsets[r + 1])
        spans = zip(ds.mention_starts[a:b].tolist(), ds.mention_ends[a:b].tolist())
        pairs += [(irow, phrase_text(tokens, s, e), qid, i) for i, (s, e) in enumerate(spans)]
    img, texts, qids, mentions = (list(c) for c in zip(*pairs)) if pairs else ([], [], [], [])
    return (np.array(img, np.int64), texts, np.array(qids, np.int64), np.array(mentions, np.int64))


def query_texts(ds: Dataset, split: str, kind: str) -> list[str]:
    """Every query text of ``split`` of one ``kind`` (expression texts, or the words of every caption phrase),
    in dataset order, duplicates kept (what :class:`QueryPool` reduces to a set)."""
    return eval_pairs(ds, split, kind)[1]


@dataclass(frozen=True)
class ImagePool:
    """The images of a split, shuffled: ``image_ids`` int64[I], ``rows`` int64[I] (their rows in the dataset, for
    reading pixels and proposals), ``sizes`` int32[I, 2] (height, width). Nothing about queries."""

    split: str
    image_ids: np.ndarray
    rows: np.ndarray
    sizes: np.ndarray

    def __len__(self) -> int:
        return len(self.image_ids)


@dataclass(frozen=True)
class QueryPool:
    """The distinct query texts of a split, shuffled: ``texts`` tuple[str] (Q). No ids, no image, no order that
    follows the dataset's."""

    split: str
    kind: str
    texts: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)


def unpaired_pools(ds: Dataset, split: str = "train", kind: str = "expression", seed: int = 0
                   ) -> tuple[ImagePool, QueryPool]:
    """The two pools of unpaired training (Sec. 3.5) from ``split`` of ``ds``.

    The image pool is the split's images in a seeded random order; the query pool the split's distinct query
    texts of ``kind`` (``expression`` | ``phrase``), sorted, then put in a seeded random order of their own
    (another stream of the seed: the two orders share nothing). An empty pool is a one-line UsageError."""
    rows = split_image_rows(ds, split)
    if not len(rows):
        raise UsageError(f"dataset {ds.name} has no images in split {split!r}")
    texts = sorted(set(t for t in query_texts(ds, split, kind) if t.strip()))
    if not texts:
        raise UsageError(f"dataset {ds.name} has no {kind} queries in split {split!r}")
    img_order = np.random.default_rng([int(seed), 20, 1]).permutation(len(rows))
    txt_order = np.random.default_rng([int(seed), 20, 2]).permutation(len(texts))
    rows = rows[img_order]
    sizes = np.stack([ds.image_height[rows], ds.image_width[rows]], 1).astype(np.int32)
    return (ImagePool(split, ds.image_ids[rows].astype(np.int64), rows, sizes),
            QueryPool(split, kind, tuple(texts[i] for i in txt_order.tolist())))


# ------------------------------------------------------------------------------------------ proposals


@dataclass
class DetectorProposals:
    """The detector's top proposals of every image (one contiguous read): ``image_ids`` int64[I] in dataset order,
    ``offsets`` int64[I+1] into the flat rows, ``boxes`` float32[P, 4] xyxy pixels, ``labels`` int64[P] (index into
    ``class_names``), ``scores`` float32[P], ``crop_rows`` int64[P] (the row of each proposal in the CLIP
    artifact's ``proposals/embedding``: the CLIP artifact embeds every proposal of the features file, and the top
    ``top_n`` are a prefix of each image's)."""

    image_ids: np.ndarray
    offsets: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    crop_rows: np.ndarray
    class_names: list[str]

    def of(self, row: int) -> slice:
        """The flat rows of image ``row`` (dataset order)."""
        return slice(int(self.offsets[row]), int(self.offsets[row + 1]))

    @classmethod
    def read(cls, path: Path, ds: Dataset, top_n: int, min_score: float = 0.0, min_boxes: int = 0
             ) -> DetectorProposals:
        """The detector's boxes of each image of ``features/<name>.h5`` (best first): those with a confidence of at
        least ``min_score``, no fewer than ``min_boxes`` (the best ones, whatever their confidence) and no more than
        ``top_n``. ``min_score`` 0.2 with ``min_boxes`` 10 and ``top_n`` 100 is the convention of the Visual
        Genome Faster R-CNN that BiCM (and most unpaired and weakly supervised work) reads its "100 proposals"
        from (bottom-up attention: 10 to 100 boxes above confidence 0.2); 0 / 0 / 100 the plain top 100."""
        from refground.cache import RaggedH5
        from refground.structures import RaggedBoxes

        if top_n < 1:
            raise UsageError(f"--top-n {top_n}: must be at least 1")
        with RaggedH5(path) as f:
            ids = f.table("images", "ids")
            if not np.array_equal(ids, ds.image_ids):
                raise ArtifactError(f"{path}: its images differ from the dataset's; run `refground extract --force`")
            full = RaggedBoxes.read(f, "proposals", ("labels", "scores"))
            names = list(f.attr("class_names", []) or [])
        if not names:
            raise ArtifactError(f"{path}: no detector class names; BiCM's COM needs them (extract with a detector "
                                "that names classes, e.g. the built-in one)")
        from refground.structures import offsets_of

        flat, offsets = full.group_rows(None, top_n)
        if min_score > 0:
            counts = np.diff(offsets)
            group = np.repeat(np.arange(len(counts)), counts)
            slot = np.arange(len(flat)) - np.repeat(offsets[:-1], counts)  # rank within the image, best first
            keep = (full.scores[flat] >= min_score) | (slot < min_boxes)
            counts = np.bincount(group[keep], minlength=len(counts))
            flat, offsets = flat[keep], offsets_of(counts)
        return cls(ids.astype(np.int64), offsets, full.boxes[flat].astype(np.float32),
                   full.labels[flat].astype(np.int64), full.scores[flat].astype(np.float32), flat, names)


__all__ = ["DetectorProposals", "ImagePool", "QUERY_KINDS", "QueryPool", "eval_pairs", "phrase_text", "query_texts",
           "split_image_rows", "unpaired_pools"]
