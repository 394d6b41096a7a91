"""What ReIR reads, and what it may not: captions, their phrases' word spans, parsed relations and the images'
proposals; never a phrase-to-box link or a box of the caption's image (design.md, "Supervision, kept honest").

The weak setting is enforced by construction: :class:`CaptionView` copies from a :class:`Dataset` only the
columns weak supervision allows (images' ids and sizes, the captions' text, image, split and phrase spans) and
nothing else, and :class:`CaptionTable` and :class:`ProposalTable` are built from the view and the proposals of a
features artifact (the detector's boxes, never the ground truth's). Only :func:`phrase_truth` reads the
dataset's links, for the val figures that pick the best epoch, for the upper bound (``supervised``) and for
evaluation; training batches of a weak variant never carry its output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refground.data.model import TASKS, Dataset, split_matches
from refground.errors import ArtifactError, DataError
from refground.methods.reir.model import ReIRBatch
from refground.text.nouns import NounLexicon, default_lexicon, extract_nouns
from refground.text.vocab import Vocabulary
from refground.text.wordvec import WordVectors, phrase_words

# Columns of a Dataset that weak supervision allows (CaptionView copies these and nothing else).
WEAK_COLUMNS = ("image_ids", "image_width", "image_height", "image_splits", "query_ids", "query_image_ids",
                "query_tasks", "query_texts", "query_splits", "query_kinds", "query_mention_offsets",
                "mention_starts", "mention_ends")


@dataclass
class CaptionView:
    """The part of a dataset that ReIR's weak training may read: :data:`WEAK_COLUMNS` (copies), the dataset's
    name and category names (the detector's vocabulary). No object, box, mask, mention-object link or recorded
    relation is reachable from it."""

    name: str
    categories: list[str]
    columns: dict[str, Any] = field(repr=False)

    @classmethod
    def of(cls, ds: Dataset) -> CaptionView:
        cols = {}
        for k in WEAK_COLUMNS:
            v = getattr(ds, k)
            cols[k] = v.copy() if isinstance(v, np.ndarray) else list(v)
        return cls(ds.name, list(ds.categories), cols)

    def __getattr__(self, key: str) -> Any:
        cols = self.__dict__.get("columns", {})
        if key in cols:
            return cols[key]
        raise AttributeError(f"CaptionView has no {key!r}: weak supervision reads only {', '.join(WEAK_COLUMNS)}")

    def query_rows(self, split: str = "all", task: str | None = None) -> np.ndarray:
        """Rows (storage order) of the queries in ``split`` (refer semantics) and ``task``, like
        :meth:`Dataset.query_rows`."""
        keep = np.array([split_matches(s, split) for s in self.query_splits], dtype=bool)
        if task is not None:
            keep &= np.asarray(self.query_tasks) == TASKS.index(task)
        return np.nonzero(keep)[0].astype(np.int64)


def head_lexicon(categories: list[str], class_names: list[str]) -> NounLexicon:
    """Nouns for :func:`phrase_head`: the dataset's categories and the detector's class names (regular plurals),
    plus the synthetic world's plural table."""
    lex = NounLexicon.from_names([*categories, *class_names])
    lex.plurals.update(default_lexicon().plurals)
    return lex


def phrase_head(tokens: list[str], lexicon: NounLexicon) -> str:
    """The phrase's head noun for eq. 3 (its last noun, plurals as their singular); the whole phrase where no noun
    is found."""
    nouns = extract_nouns(tokens, lexicon)
    return nouns[-1] if nouns else " ".join(tokens)


def class_similarity(heads: list[str], class_names: list[str], vectors: WordVectors) -> np.ndarray:
    """float32[P, C] = max(cos(E_ext(head), E_ext(class name)), 0) (eq. 3, clipped at 0: module docstring of
    :mod:`refground.methods.reir.model`)."""
    if not heads:
        return np.zeros((0, len(class_names)), np.float32)
    return np.maximum(vectors.similarity(heads, class_names), 0.0).astype(np.float32)


@dataclass
class ProposalTable:
    """Every image's first M proposals, padded: boxes float32[I, M, 4] xyxy pixels, feats float16[I, M, D],
    classes int64[I, M] (detector class index), scores float32[I, M], mask bool[I, M], sizes float32[I, 2]
    (height, width), ``image_ids`` int64[I] in the dataset's order, ``class_names``."""

    image_ids: np.ndarray
    boxes: np.ndarray
    feats: np.ndarray
    classes: np.ndarray
    scores: np.ndarray
    mask: np.ndarray
    sizes: np.ndarray
    class_names: list[str]

    @classmethod
    def read(cls, path: Path, view: CaptionView, max_proposals: int) -> ProposalTable:
        """The proposals of ``features/<name>.h5`` (one contiguous read per field)."""
        from refground.cache import RaggedH5
        from refground.structures import RaggedBoxes

        with RaggedH5(path) as f:
            ids = f.table("images", "ids")
            if not np.array_equal(ids, view.image_ids):
                raise ArtifactError(f"{path}: its images differ from the dataset's; run `refground extract --force`")
            props = RaggedBoxes.read(f, "proposals", ("features", "labels", "scores")).top(max_proposals)
            names = f.attr("class_names", []) or []
        take, valid = props.padded_rows(np.arange(len(ids)))
        boxes = np.where(valid[..., None], props.boxes[take], 0.0).astype(np.float32)
        feats = np.where(valid[..., None], props.features[take], 0).astype(np.float16)
        classes = np.where(valid, props.labels[take], 0).astype(np.int64)
        scores = np.where(valid, props.scores[take], 0.0).astype(np.float32)
        sizes = np.stack([view.image_height, view.image_width], axis=1).astype(np.float32)
        return cls(ids.astype(np.int64), boxes, feats, classes, scores, valid, sizes, list(names))


@dataclass
class CaptionTable:
    """The captions of a split, padded (Q captions, T words, N phrases, L words per phrase, C classes):

    ``query_ids`` int64[Q]; ``image_rows`` int64[Q] (row of the caption's image in the :class:`ProposalTable`);
    ``words`` int64[Q, T]; ``spans`` int64[Q, N, 2]; ``phrase_words`` int64[Q, N, L]; ``phrase_mask``
    bool[Q, N]; ``num_phrases`` int64[Q]; ``class_sim`` float32[Q, N, C] (eq. 3 per class); the parsed relations
    ragged per caption: ``edge_offsets`` int64[Q + 1], ``edges`` int64[E, 2] (phrase i, phrase j) and
    ``edge_labels`` int64[E] (0: not a kept class). ``kinds`` the query kinds (for reports)."""

    query_ids: np.ndarray
    image_rows: np.ndarray
    words: np.ndarray
    spans: np.ndarray
    phrase_words: np.ndarray
    phrase_mask: np.ndarray
    num_phrases: np.ndarray
    class_sim: np.ndarray
    edge_offsets: np.ndarray
    edges: np.ndarray
    edge_labels: np.ndarray

    def __len__(self) -> int:
        return int(len(self.query_ids))

    @classmethod
    def build(cls, view: CaptionView, split: str, vocab: Vocabulary, vectors: WordVectors, class_names: list[str],
              relations: Any, proposals: ProposalTable) -> CaptionTable:
        """The caption queries of ``split`` (dataset order) of ``view``; ``relations`` a
        :class:`refground.methods.reir.pseudo.PseudoRelations` (parsed, never the recorded triples)."""
        rows = view.query_rows(split, "caption")
        texts = view.query_texts
        mo = view.query_mention_offsets
        starts, ends = view.mention_starts, view.mention_ends
        img_row = {int(i): k for k, i in enumerate(proposals.image_ids.tolist())}
        lexicon = head_lexicon(view.categories, class_names)
        q_ids = np.asarray(view.query_ids)[rows].astype(np.int64)
        toks = [texts[k].split(" ") for k in rows.tolist()]
        n_ph = np.array([int(mo[k + 1] - mo[k]) for k in rows.tolist()], dtype=np.int64)
        if len(rows) and int(n_ph.min()) < 1:
            bad = int(q_ids[int(np.argmin(n_ph))])
            raise DataError(f"caption {bad} has no phrases; ReIR grounds the phrases of a caption")
        t_max = max([len(t) for t in toks], default=1)
        n_max = max(int(n_ph.max()) if len(n_ph) else 1, 1)
        spans = np.zeros((len(rows), n_max, 2), np.int64)
        heads: list[str] = []
        head_at: list[tuple[int, int]] = []
        phrase_tokens: list[list[str]] = []
        for q, k in enumerate(rows.tolist()):
            for i, j in enumerate(range(int(mo[k]), int(mo[k + 1]))):
                a, b = int(starts[j]), int(ends[j])
                if not 0 <= a < b <= len(toks[q]):
                    raise DataError(f"caption {int(q_ids[q])}: phrase {i} spans tokens [{a}, {b}) of a caption of "
                                    f"{len(toks[q])} words")
                spans[q, i] = (a, b)
                words = [w.lower() for w in toks[q][a:b]]
                phrase_tokens.append(words)
                heads.append(phrase_head(words, lexicon))
                head_at.append((q, i))
        l_max = max([len(p) for p in phrase_tokens], default=1)
        words = np.zeros((len(rows), t_max), np.int64)
        for q, t in enumerate(toks):
            words[q, :len(t)] = vocab.encode(t)
        phrase_words_ = np.zeros((len(rows), n_max, l_max), np.int64)
        for (q, i), p in zip(head_at, phrase_tokens):
            phrase_words_[q, i, :len(p)] = vocab.encode(p)
        mask = np.arange(n_max)[None, :] < n_ph[:, None]
        sim = np.zeros((len(rows), n_max, len(class_names)), np.float32)
        if heads:
            flat = class_similarity(heads, [" ".join(phrase_words(c)) for c in class_names], vectors)
            qi = np.array(head_at, dtype=np.int64)
            sim[qi[:, 0], qi[:, 1]] = flat
        image_rows = np.array([img_row[int(i)] for i in np.asarray(view.query_image_ids)[rows].tolist()],
                              dtype=np.int64)
        e_off, e_pairs, e_labels = _edges_of(relations, q_ids, n_ph)
        return cls(q_ids, image_rows, words, spans, phrase_words_, mask, n_ph, sim, e_off, e_pairs, e_labels)

    def batch(self, proposals: ProposalTable, index: np.ndarray, targets: np.ndarray | None = None) -> ReIRBatch:
        """The :class:`ReIRBatch` of captions ``index`` int[B] (words, phrases and proposals trimmed to the batch's
        longest); ``targets`` int64[Q, N] best-covering proposals (the upper bound only)."""
        index = np.asarray(index, dtype=np.int64)
        t = max(1, int((self.words[index] != 0).sum(1).max()))
        n = max(1, int(self.num_phrases[index].max()))
        pw = self.phrase_words[index, :n]
        length = max(1, int((pw != 0).sum(-1).max()))
        img = self.image_rows[index]
        m = max(1, int(proposals.mask[img].sum(1).max()))
        e_rows = [np.arange(self.edge_offsets[q], self.edge_offsets[q + 1]) for q in index.tolist()]
        owner = np.concatenate([np.full(len(r), b, np.int64) for b, r in enumerate(e_rows)]) if e_rows else \
            np.zeros(0, np.int64)
        flat = np.concatenate(e_rows) if e_rows else np.zeros(0, np.int64)
        edges = np.concatenate([owner[:, None], self.edges[flat]], axis=1) if len(flat) else np.zeros((0, 3), np.int64)
        tg = None if targets is None else torch.from_numpy(targets[index, :n].astype(np.int64))
        return ReIRBatch(
            words=torch.from_numpy(self.words[index, :t]), spans=torch.from_numpy(self.spans[index, :n]),
            phrase_words=torch.from_numpy(pw[..., :length]), phrase_mask=torch.from_numpy(self.phrase_mask[index, :n]),
            feats=torch.from_numpy(proposals.feats[img, :m].astype(np.float32)),
            boxes=torch.from_numpy(proposals.boxes[img, :m]), prop_mask=torch.from_numpy(proposals.mask[img, :m]),
            sizes=torch.from_numpy(proposals.sizes[img]), classes=torch.from_numpy(proposals.classes[img, :m]),
            class_sim=torch.from_numpy(self.class_sim[index, :n]), image_index=torch.from_numpy(img),
            edges=torch.from_numpy(edges.astype(np.int64)),
            edge_labels=torch.from_numpy(self.edge_labels[flat].astype(np.int64)), targets=tg)

    def batches(self, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
        """One epoch's caption indices in batches of ``batch_size`` (a permutation from ``rng``)."""
        order = rng.permutation(len(self))
        return [order[a:a + batch_size] for a in range(0, len(order), batch_size)]


def _edges_of(relations: Any, query_ids: np.ndarray, num_phrases: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                                      np.ndarray]:
    """Per caption of ``query_ids`` its parsed relations: offsets int64[Q + 1], pairs int64[E, 2], labels
    int64[E]. A caption missing from the artifact is an ArtifactError (it was parsed for another dataset)."""
    if relations is None:
        return np.zeros(len(query_ids) + 1, np.int64), np.zeros((0, 2), np.int64), np.zeros(0, np.int64)
    row_of = {int(q): k for k, q in enumerate(np.asarray(relations.query_ids).tolist())}
    missing = [int(q) for q in query_ids.tolist() if int(q) not in row_of]
    if missing:
        raise ArtifactError(f"the relation labels lack caption {missing[0]} (and {len(missing) - 1} more); run "
                            "`refground pseudo reir --force`")
    rows = np.array([row_of[int(q)] for q in query_ids.tolist()], dtype=np.int64)
    from refground.structures import group_rows

    flat, offsets = group_rows(np.asarray(relations.offsets, np.int64), rows)
    pairs = np.stack([np.asarray(relations.subject, np.int64)[flat], np.asarray(relations.object, np.int64)[flat]],
                     axis=1) if len(flat) else np.zeros((0, 2), np.int64)
    owner = np.repeat(np.arange(len(rows)), np.diff(offsets))
    if len(pairs) and (pairs.max(1) >= num_phrases[owner]).any():
        raise ArtifactError("the relation labels name phrases the captions do not have; run "
                            "`refground pseudo reir --force`")
    return offsets.astype(np.int64), pairs, np.asarray(relations.label, np.int64)[flat]


def phrase_truth(ds: Dataset, query_ids: np.ndarray, n_max: int) -> list[list[np.ndarray | None]]:
    """Per caption of ``query_ids`` and per phrase its true boxes float32[k, 4] (None for a phrase without one).
    Reads the dataset's mention-object links: for evaluation, best-epoch selection on val and the upper bound
    only, never for a weak variant's training batches."""
    out: list[list[np.ndarray | None]] = []
    for q in query_ids.tolist():
        query = ds.query(int(q))
        row: list[np.ndarray | None] = []
        for m in query.mentions[:n_max]:
            if m.object_ids:
                row.append(ds.object_boxes[[ds.object_row(o) for o in m.object_ids]].astype(np.float32).reshape(-1, 4))
            else:
                row.append(None)
        out.append(row)
    return out


def supervised_targets(truth: list[list[np.ndarray | None]], table: CaptionTable, proposals: ProposalTable,
                       iou_threshold: float = 0.5) -> np.ndarray:
    """The upper bound's targets int64[Q, N]: per phrase the proposal of its image with the highest IoU to its true
    (union) box when that IoU is >= ``iou_threshold``, else -1."""
    from refground.boxes import box_iou
    from refground.eval.metrics import union_box

    n = table.phrase_mask.shape[1]
    out = np.full((len(table), n), -1, np.int64)
    for q, row in enumerate(truth):
        img = int(table.image_rows[q])
        valid = proposals.mask[img]
        if not valid.any():
            continue
        props = torch.from_numpy(proposals.boxes[img][valid])
        for i, gt in enumerate(row[:n]):
            if gt is None:
                continue
            iou = box_iou(props, torch.from_numpy(union_box(gt)[None].astype(np.float32)))[:, 0]
            best = int(iou.argmax())
            if float(iou[best]) >= iou_threshold:
                out[q, i] = int(np.nonzero(valid)[0][best])
    return out


__all__ = ["WEAK_COLUMNS", "CaptionTable", "CaptionView", "ProposalTable", "class_similarity", "phrase_head",
           "phrase_truth", "supervised_targets"]
