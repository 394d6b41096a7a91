"""Relation labels of caption phrases for ReIR (Sec. 3.2.3: the visual object graph's edges; Sec. 3.3: the
classes of the relation loss L_rel; Sec. 4.2: "we select C_r = 88 relations, of which frequency are greater
than 100").

Every caption is parsed into (subject phrase, predicate, object phrase) triples with a language parser
(:mod:`refground.text.relations`: the toolkit heuristic, or spaCy with ``parser="spacy"``); the parser
sees the caption's tokens and its phrase spans, never the recorded relations, the phrases' objects or any
box (weak supervision). Each parsed triple is an edge of the caption's graph, at train and test time. The
predicates seen more than ``min_count`` times on the TRAIN split's captions are the classes
R = {0 (no relation), 1..C_r}, ordered by decreasing training frequency, then alphabetically; an edge
whose predicate is not among them keeps label 0 (the edge exists, L_rel skips it: r_ij > 0 only).

Artifact ``cache/<dataset>/pseudo/reir.h5`` (:func:`build_pseudo_reir`)::

    queries/ids          int64[Q]     every caption query of the dataset (all splits), dataset order
    relations/offsets    int64[Q + 1] relations of query row q are rows offsets[q]:offsets[q + 1]
    relations/subject    int32[R]     subject phrase: index into the query's mentions
    relations/object     int32[R]     object phrase: index into the query's mentions
    relations/label      int32[R]     class id in 1..C_r (classes[label - 1]), or 0: predicate not kept
    relations/predicate  int32[R]     the parsed predicate: index into predicates/text
    predicates/text      bytes[P]     every distinct parsed predicate (UTF-8, sorted)
    attrs: format, version, parser ("toolkit" or "spacy"), min_count, classes (JSON list of the kept
           predicates: class id = index + 1), counts (JSON: training-split count of each kept class),
           spacy (model and versions, with parser "spacy")

plus its manifest (parent: the dataset), so a changed dataset makes it stale. Read it with
:func:`load_pseudo_reir`. The parser is deterministic: ``seed`` changes nothing and is not recorded.

The report (:func:`evaluate_relations`) compares the parsed triples with the dataset's recorded ones
(``Query.relations``; the synthetic world records every relation its captions state; Flickr30K records
none) on the train, val and test splits: read for the figures only, never for the labels.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from refground.errors import ArtifactError, UsageError

PSEUDO_FORMAT = "refground-pseudo-reir"
PSEUDO_STEP = "pseudo-reir@1"
FORMAT_VERSION = 1
PARSERS = ("toolkit", "spacy")
SPACY_MODEL = "en_core_web_sm"
REMEDY = "refground pseudo reir"
REPORT_SPLITS = ("train", "val", "test")  # refer semantics: "test" holds testA, testB...
CLASS_SPLIT = "train"  # the paper counts relations on the training set


@dataclass
class PseudoRelations:
    """Parsed relations of caption queries (ragged, one row per query).

    ``query_ids`` int64[Q]; ``offsets`` int64[Q + 1] (query row q's relations are rows
    ``offsets[q]:offsets[q + 1]``); ``subject``, ``object`` int32[R] mention indices within the query;
    ``label`` int32[R] class id (0: predicate not among ``classes``); ``predicate`` int32[R] index into
    ``predicates`` (every distinct parsed predicate); ``classes`` the kept predicates (class id = index + 1);
    ``counts`` their training-split frequencies; ``parser``, ``min_count`` how they were made."""

    query_ids: np.ndarray
    offsets: np.ndarray
    subject: np.ndarray
    object: np.ndarray
    label: np.ndarray
    predicate: np.ndarray
    predicates: list[str]
    classes: list[str]
    counts: dict[str, int] = field(default_factory=dict)
    parser: str = "toolkit"
    min_count: int = 100
    _rows: dict[int, int] | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.query_ids)

    @property
    def num_classes(self) -> int:
        """C_r + 1: the size of R, "no relation" included."""
        return len(self.classes) + 1

    def row(self, query_id: int) -> int:
        """Row of ``query_id`` (:class:`ArtifactError` when it is not a caption of the artifact)."""
        if self._rows is None:
            self._rows = {int(q): r for r, q in enumerate(self.query_ids.tolist())}
        try:
            return self._rows[int(query_id)]
        except KeyError:
            raise ArtifactError(f"query {query_id} has no parsed relations (not a caption of this dataset); "
                                f"run `{REMEDY}`") from None

    def edges(self, query_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(subject int32[k], object int32[k], label int32[k])``: the graph edges of one caption query
        (mention indices) and their relation classes (0: an edge without a kept class)."""
        r = self.row(query_id)
        s = slice(int(self.offsets[r]), int(self.offsets[r + 1]))
        return self.subject[s], self.object[s], self.label[s]

    def triples(self, query_id: int) -> list[tuple[int, str, int]]:
        """The parsed ``(subject, predicate, object)`` triples of one caption query, in parse order."""
        r = self.row(query_id)
        return [(int(self.subject[k]), self.predicates[int(self.predicate[k])], int(self.object[k]))
                for k in range(int(self.offsets[r]), int(self.offsets[r + 1]))]


def check_options(parser: str, min_count: int) -> None:
    """:class:`UsageError` for an unknown parser or a negative / non-integer ``min_count``."""
    if parser not in PARSERS:
        raise UsageError(f"--parser {parser!r}: expected one of: {', '.join(PARSERS)}")
    if isinstance(min_count, bool) or not isinstance(min_count, (int, np.integer)) or min_count < 0:
        raise UsageError(f"--min-count {min_count!r}: must be an integer >= 0 (a predicate is a class when seen "
                         "more often than this on the training captions)")


def relation_parser(parser: str = "toolkit") -> Callable[[Sequence[str], Sequence[tuple[int, int]]], list]:
    """(tokens, phrase spans) -> (subject, predicate, object) triples with the toolkit heuristic or spaCy
    (which fails now, with the install hint, rather than on the first caption)."""
    if parser == "spacy":
        from refground.text.relations import _spacy_parser, parse_relations_spacy

        _spacy_parser(SPACY_MODEL)
        return lambda tokens, spans: parse_relations_spacy(" ".join(tokens), spans, SPACY_MODEL)
    from refground.text.relations import parse_relations

    return parse_relations


def caption_rows(ds) -> np.ndarray:
    """int64 rows of every caption query of ``ds``, dataset order."""
    return ds.query_rows("all", task="caption")


def parse_captions(ds, parser: str = "toolkit", rows: np.ndarray | None = None,
                   parse: Callable | None = None) -> tuple[np.ndarray, list[list[tuple[int, str, int]]]]:
    """``(query ids int64[Q], triples per query)`` of the caption queries (``rows``, default all of them).

    Reads only each query's text and its mention spans: never ``Query.relations``, mention objects or boxes
    (so scrambling those cannot change the result)."""
    from refground.progress import track

    rows = caption_rows(ds) if rows is None else rows
    parse = parse or relation_parser(parser)
    mo = ds.query_mention_offsets
    starts, ends = ds.mention_starts, ds.mention_ends
    out: list[list[tuple[int, str, int]]] = []
    for k in track(rows.tolist(), len(rows), "parse captions"):
        m0, m1 = int(mo[k]), int(mo[k + 1])
        spans = list(zip(starts[m0:m1].tolist(), ends[m0:m1].tolist()))
        out.append(parse(ds.query_texts[k].split(" "), spans))
    return ds.query_ids[rows].astype(np.int64), out


def relation_classes(predicates: Sequence[Sequence[str]], min_count: int) -> tuple[list[str], dict[str, int]]:
    """The kept predicates and their counts: every predicate of ``predicates`` (the training captions',
    one list per caption) seen more than ``min_count`` times, by decreasing count then alphabetically."""
    counts = Counter(p for preds in predicates for p in preds)
    kept = sorted((p for p, c in counts.items() if c > min_count), key=lambda p: (-counts[p], p))
    return kept, {p: int(counts[p]) for p in kept}


def pseudo_relations(ds, parser: str = "toolkit", min_count: int = 100,
                     parse: Callable | None = None) -> PseudoRelations:
    """Parse every caption of ``ds`` and label its relations (classes counted on the train split)."""
    from refground.data.model import split_matches

    check_options(parser, min_count)
    rows = caption_rows(ds)
    qids, triples = parse_captions(ds, parser, rows, parse)
    train = [[p for _, p, _ in t] for k, t in zip(rows.tolist(), triples)
             if split_matches(ds.query_splits[k], CLASS_SPLIT)]
    classes, counts = relation_classes(train, min_count)
    class_id = {p: i + 1 for i, p in enumerate(classes)}
    predicates = sorted({p for t in triples for _, p, _ in t})
    pred_id = {p: i for i, p in enumerate(predicates)}
    flat = [x for t in triples for x in t]
    lengths = np.array([len(t) for t in triples], dtype=np.int64)
    return PseudoRelations(
        query_ids=qids,
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        subject=np.array([s for s, _, _ in flat], dtype=np.int32),
        object=np.array([o for _, _, o in flat], dtype=np.int32),
        label=np.array([class_id.get(p, 0) for _, p, _ in flat], dtype=np.int32),
        predicate=np.array([pred_id[p] for _, p, _ in flat], dtype=np.int32),
        predicates=predicates, classes=classes, counts=counts, parser=parser, min_count=int(min_count))


# ------------------------------------------------------------------------------------------- evaluation
def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 6) if b else None


def _normalise(predicate: str) -> str:
    return " ".join(predicate.lower().split())


def evaluate_relations(ds, pseudo: PseudoRelations) -> dict[str, Any]:
    """The parser against the dataset's recorded relation triples, per split (train, val, test, all).

    Per split: ``captions``, ``recorded`` (distinct recorded triples), ``parsed`` (parsed triples),
    ``hits`` (parsed triples equal to a recorded one: same subject, object and predicate, the recorded
    predicate lower-cased with single spaces), ``precision`` = hits / parsed, ``recall`` = hits / recorded,
    and the same for directed subject-object pairs ignoring the predicate (``pair_*``, distinct pairs).
    Micro-averaged (summed over captions); None where a denominator is 0. Where the dataset records no
    relation for its captions, every precision and recall is None and ``note`` says so."""
    from refground.data.model import split_matches

    names = (*REPORT_SPLITS, "all")
    stats = {s: dict.fromkeys(("captions", "recorded", "parsed", "hits", "pair_recorded", "pair_parsed",
                               "pair_hits"), 0) for s in names}
    ro = ds.query_relation_offsets
    for qid in pseudo.query_ids.tolist():
        k = ds.query_row(qid)
        gold = {(int(ds.relation_subjects[j]), _normalise(ds.relation_predicates[j]), int(ds.relation_objects[j]))
                for j in range(int(ro[k]), int(ro[k + 1]))}
        pred = set(pseudo.triples(qid))
        gold_pairs = {(s, o) for s, _, o in gold}
        pred_pairs = {(s, o) for s, _, o in pred}
        figures = (1, len(gold), len(pred), len(pred & gold), len(gold_pairs), len(pred_pairs),
                   len(pred_pairs & gold_pairs))
        for s in names:
            if split_matches(ds.query_splits[k], s):
                for key, v in zip(stats[s], figures):
                    stats[s][key] += v

    def finish(st: dict[str, int]) -> dict[str, Any]:
        return {**st, "precision": _ratio(st["hits"], st["parsed"]), "recall": _ratio(st["hits"], st["recorded"]),
                "pair_precision": _ratio(st["pair_hits"], st["pair_parsed"]),
                "pair_recall": _ratio(st["pair_hits"], st["pair_recorded"])}

    splits = {s: finish(st) for s, st in stats.items()}
    labelled = int((pseudo.label > 0).sum())
    result: dict[str, Any] = {
        "dataset": ds.name, "parser": pseudo.parser, "min_count": pseudo.min_count, "captions": len(pseudo),
        "relations": len(pseudo.label), "labelled": labelled,
        "labelled_share": _ratio(labelled, len(pseudo.label)), "classes_kept": len(pseudo.classes),
        "classes": list(pseudo.classes), "counts": dict(pseudo.counts),
        "has_recorded_relations": splits["all"]["recorded"] > 0, "splits": splits,
    }
    if not result["has_recorded_relations"]:
        for st in splits.values():
            for key in ("precision", "recall", "pair_precision", "pair_recall"):
                st[key] = None
        result["note"] = (f"dataset {ds.name} records no relations for its captions: the parser's precision and "
                          "recall cannot be measured")
    if not pseudo.classes:
        result["classes_note"] = (f"no predicate is seen more than {pseudo.min_count} times on the training captions: "
                                  "no relation class, every edge has label 0 (lower --min-count)")
    return result


# --------------------------------------------------------------------------------------------- artifact
def pseudo_path(dataset: str, cache: Any = None) -> Path:
    """``<cache>/<dataset>/pseudo/reir.h5``."""
    from refground.data.store import dataset_dir

    return dataset_dir(dataset, cache).parent / "pseudo" / "reir.h5"


def write_pseudo(path: Path, pseudo: PseudoRelations, attrs: dict[str, Any]) -> None:
    """Write ``pseudo`` as the HDF5 layout of the module docstring (staged under a temporary name by
    :func:`~refground.cache.write_h5`, renamed into place)."""
    from refground.cache import write_h5

    text = [p.encode("utf-8") for p in pseudo.predicates]
    width = max((len(t) for t in text), default=1) or 1
    chunk = {"queries.ids": pseudo.query_ids.astype(np.int64),
             "relations.counts": np.diff(pseudo.offsets).astype(np.int64),
             "relations.subject": pseudo.subject.astype(np.int32),
             "relations.object": pseudo.object.astype(np.int32),
             "relations.label": pseudo.label.astype(np.int32),
             "relations.predicate": pseudo.predicate.astype(np.int32),
             "predicates.text": np.array(text, dtype=f"S{width}")}
    write_h5(Path(path), [chunk], {"format": PSEUDO_FORMAT, "version": FORMAT_VERSION, "parser": pseudo.parser,
                                   "min_count": int(pseudo.min_count), "classes": list(pseudo.classes),
                                   "counts": dict(pseudo.counts), **attrs})


def read_pseudo(path: str | Path) -> PseudoRelations:
    """The :class:`PseudoRelations` of a complete, current artifact (:class:`ArtifactError` naming
    ``refground pseudo reir`` when it is missing, half-written, stale or malformed)."""
    from refground.cache import RaggedH5, require

    path = Path(path)
    require(path, remedy=REMEDY, check_parents=True)
    with RaggedH5(path) as f:
        if f.attr("format") != PSEUDO_FORMAT:
            raise ArtifactError(f"{path}: not a ReIR relation-label file; run `{REMEDY}`")
        try:
            qids = f.table("queries", "ids").astype(np.int64)
            offsets = f.table("relations", "offsets").astype(np.int64)
            arrays = [f.table("relations", k).astype(np.int32) for k in ("subject", "object", "label", "predicate")]
            predicates = [t.decode("utf-8") for t in f.table("predicates", "text").tolist()]
        except KeyError as exc:
            raise ArtifactError(f"{path}: missing array ({exc}); run `{REMEDY} --force`") from None
        classes = list(f.attr("classes", []))
        counts = {str(k): int(v) for k, v in dict(f.attr("counts", {})).items()}
        parser, min_count = str(f.attr("parser")), int(f.attr("min_count"))
    subject, obj, label, predicate = arrays
    bad = len(offsets) != len(qids) + 1 or offsets[0] != 0 or bool(np.any(np.diff(offsets) < 0))
    n = int(offsets[-1]) if not bad else 0
    bad = bad or any(len(a) != n for a in arrays)
    if not bad and n:
        bad = label.min() < 0 or label.max() > len(classes) or predicate.min() < 0 or predicate.max() >= len(predicates)
    if bad:
        raise ArtifactError(f"{path}: inconsistent relation arrays; run `{REMEDY} --force`")
    return PseudoRelations(qids, offsets, subject, obj, label, predicate, predicates, classes, counts, parser,
                           min_count)


def load_pseudo_reir(path: str | Path) -> PseudoRelations:
    """The relation labels of ``pseudo/reir.h5`` (see :class:`PseudoRelations`); refuses a missing,
    incomplete or stale artifact with :class:`ArtifactError` naming ``refground pseudo reir``."""
    return read_pseudo(path)


def build_pseudo_reir(dataset: str, cache: Any = None, *, parser: str = "toolkit", min_count: int = 100,
                      force: bool = False, seed: int = 0) -> dict[str, Any]:
    """Write (or find current) ``pseudo/reir.h5`` of ``dataset`` and evaluate the parser against the recorded
    relations (:func:`evaluate_relations`). ``seed`` is accepted for the pseudo contract and changes nothing
    (the parsers are deterministic). Returns the evaluation plus status ("hit" | "written"), path and
    seconds."""
    from refground.cache import fingerprint, is_current, parent, write_manifest
    from refground.cache.manifest import parent_fingerprints
    from refground.data.store import dataset_dir, load_dataset

    del seed  # deterministic: not part of the fingerprint, so another seed is still a hit
    t0 = time.perf_counter()
    check_options(parser, min_count)
    params: dict[str, Any] = {"format_version": FORMAT_VERSION, "parser": parser, "min_count": int(min_count)}
    attrs: dict[str, Any] = {}
    if parser == "spacy":
        from refground.text.relations import spacy_identity

        # Another spaCy or model version parses differently: it is part of the fingerprint.
        params["spacy"] = attrs["spacy"] = spacy_identity(SPACY_MODEL)
    ds_dir = dataset_dir(dataset, cache)
    parents = {"dataset": parent("dataset", ds_dir)}
    fp = fingerprint(PSEUDO_STEP, params, parent_fingerprints(parents))
    out = pseudo_path(dataset, cache)
    ds = load_dataset(ds_dir)
    if not len(caption_rows(ds)):
        raise UsageError(f"dataset {dataset} has no caption queries: ReIR grounds the phrases of captions "
                         "(Flickr30K Entities, or the synthetic world's captions)")
    if not force and is_current(out, fp):
        pseudo = read_pseudo(out)
        status = "hit"
    else:
        from refground.cache.lock import artifact_lock

        # One writer: a second run of this step while this one writes is refused, not raced.
        with artifact_lock(out):
            pseudo = pseudo_relations(ds, parser, int(min_count))
            out.parent.mkdir(parents=True, exist_ok=True)
            write_pseudo(out, pseudo, attrs)
            write_manifest(out, step=PSEUDO_STEP, params=params, parents=parents, fingerprint=fp, kind="pseudo",
                           extra={"captions": len(pseudo), "relations": len(pseudo.label),
                                  "classes": len(pseudo.classes)})
        status = "written"
    result = evaluate_relations(ds, pseudo)
    result.update(status=status, path=str(out), seconds=round(time.perf_counter() - t0, 3))
    return result


def pseudo_reir(dataset: str, cache: Any = None, *, seed: int = 0, force: bool = False, parser: str = "toolkit",
                min_count: int = 100) -> dict[str, Any]:
    """``refground pseudo reir``: the relation labels of every caption (the registry's pseudo contract:
    returns the figures of :func:`build_pseudo_reir` plus ``tables`` and ``json``)."""
    from refground.tables import COUNT, PERCENT, SECONDS, TEXT, TableData, format_value

    res = build_pseudo_reir(dataset, cache, parser=parser, min_count=min_count, force=force, seed=seed)
    title = (f"pseudo reir {dataset} (parser {res['parser']}, min count {res['min_count']}, "
             f"{format_value(res['seconds'], SECONDS)} s)")
    summary = TableData(title, ["figure", "value"], [
        ["captions", res["captions"]], ["relations parsed", res["relations"]],
        ["relations per caption", round(res["relations"] / max(res["captions"], 1), 3)],
        ["classes kept (C_r)", res["classes_kept"]], ["labelled share", res["labelled_share"]]],
        [TEXT, None])
    cols = ["split", "captions", "recorded", "parsed", "precision", "recall", "pair precision", "pair recall"]
    rows = [[s, st["captions"], st["recorded"], st["parsed"], st["precision"], st["recall"], st["pair_precision"],
             st["pair_recall"]] for s, st in res["splits"].items()]
    accuracy = TableData("parsed vs recorded relation triples (pair: subject-object, any predicate)", cols, rows,
                         [TEXT, COUNT, COUNT, COUNT, PERCENT, PERCENT, PERCENT, PERCENT])
    classes = TableData(f"relation classes (training count > {res['min_count']})", ["class", "predicate", "count"],
                        [[i + 1, p, res["counts"][p]] for i, p in enumerate(res["classes"])], [COUNT, TEXT, COUNT])
    tables = [summary, accuracy] + ([classes] if res["classes"] else [])
    return {**res, "tables": tables, "json": res}
