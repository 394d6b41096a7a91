"""Text-similarity pseudo ground truth for contextual objects (VL-NMS Sec. 3.3).

For each referring expression: extract its nouns (:mod:`refground.text.nouns`), compute the cosine
similarity between the nouns' word vectors and the category names of the image's ground-truth objects
(:mod:`refground.text.wordvec`), and keep the objects whose category is at least ``gamma`` similar to some
noun (paper: 0.4). The referent is always foreground for VL-NMS, so the stored set excludes it; whether the
referent's own category was matched is stored as a flag.

Artifact ``cache/<dataset>/pseudo/vlnms.h5`` (:func:`build_pseudo_vlnms`)::

    queries/ids              int64[Q]     expression queries of the split, dataset order
    queries/offsets          int64[Q + 1] contexts of query row q are objects/ids[offsets[q]:offsets[q + 1]]
    objects/offsets          the same dataset as queries/offsets (an HDF5 hard link: RaggedH5's convention)
    objects/ids              int64[N]     pseudo contextual object ids, dataset object order per query
    queries/referent_matched uint8[Q]     1 where the referent's own category matched a noun
    queries/num_nouns        int32[Q]     nouns extracted from the query
    attrs: format, version, gamma, parser, split, vectors ("toolkit" or the GloVe file's sha256), dim

plus its manifest (parents: the dataset and, with GloVe, the vector file), so a changed dataset or vector
file makes it stale. Read it with :func:`load_pseudo_vlnms` (query id -> context object ids).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from refground.errors import ArtifactError, UsageError

PSEUDO_FORMAT = "refground-pseudo-vlnms"
PSEUDO_STEP = "pseudo-vlnms@1"
FORMAT_VERSION = 1
PARSERS = ("toolkit", "spacy")
REMEDY = "refground pseudo vlnms"
# float32 unit vectors: a word's cosine with itself can be 1 - 6e-8, and gamma 1 must still match it.
SIM_EPS = 1e-6


@dataclass
class PseudoContexts:
    """Pseudo contextual objects of expression queries (ragged, one row per query).

    ``query_ids`` int64[Q]; ``offsets`` int64[Q + 1]; ``object_ids`` int64[N] (row q's contexts are
    ``object_ids[offsets[q]:offsets[q + 1]]``, referent excluded); ``referent_matched`` bool[Q];
    ``num_nouns`` int32[Q]; ``gamma``, ``parser``, ``vectors`` (identity of the word vectors)."""

    query_ids: np.ndarray
    offsets: np.ndarray
    object_ids: np.ndarray
    referent_matched: np.ndarray
    num_nouns: np.ndarray
    gamma: float
    parser: str
    vectors: str

    def __len__(self) -> int:
        return len(self.query_ids)

    def contexts(self, row: int) -> np.ndarray:
        """int64[k] context object ids of query row ``row``."""
        return self.object_ids[int(self.offsets[row]):int(self.offsets[row + 1])]

    def as_dict(self) -> dict[int, np.ndarray]:
        """Query id -> int64[k] context object ids."""
        return {int(q): self.contexts(r) for r, q in enumerate(self.query_ids.tolist())}


def check_options(gamma: float, parser: str) -> None:
    """:class:`UsageError` for a gamma outside [-1, 1] (a cosine) or an unknown parser."""
    if not (-1.0 <= float(gamma) <= 1.0):
        raise UsageError(f"--gamma {gamma}: must be in [-1, 1] (a cosine similarity)")
    if parser not in PARSERS:
        raise UsageError(f"--parser {parser!r}: expected one of: {', '.join(PARSERS)}")


def noun_extractor(ds, parser: str = "toolkit") -> Callable[[str], list[str]]:
    """text -> nouns, with the toolkit heuristic (the dataset's lexicon) or spaCy."""
    if parser == "spacy":
        from refground.text.nouns import extract_nouns_spacy, spacy_model

        spacy_model("en_core_web_sm")  # fail now, with the install hint, not on the first query
        return extract_nouns_spacy
    from refground.text.nouns import NounLexicon, extract_nouns

    lex = NounLexicon.for_dataset(ds)
    return lambda text: extract_nouns(text.split(" "), lex)


def _referent_ids(ds, rows: np.ndarray) -> np.ndarray:
    """int64[len(rows)] object id of the first referent mention of each query row (-1 where none)."""
    out = np.full(len(rows), -1, dtype=np.int64)
    for n, k in enumerate(rows.tolist()):
        for j in range(int(ds.query_mention_offsets[k]), int(ds.query_mention_offsets[k + 1])):
            if ds.mention_roles[j] == 0 and ds.mention_object_offsets[j + 1] > ds.mention_object_offsets[j]:
                out[n] = ds.mention_object_ids[ds.mention_object_offsets[j]]
                break
    return out


def pseudo_contexts(ds, vectors, gamma: float = 0.4, parser: str = "toolkit", split: str = "all",
                    extractor: Callable[[str], list[str]] | None = None) -> PseudoContexts:
    """Pseudo contextual objects of every expression query of ``split`` in ``ds``.

    Per query: one similarity matrix nouns x categories (``vectors``: :class:`WordVectors`); a category
    matches when its similarity to some noun is >= ``gamma`` (up to ``SIM_EPS``, float32 rounding); the
    query's image objects of matched categories, minus the referent, are its contexts (dataset object
    order). ``extractor``: text -> nouns (default :func:`noun_extractor` of ``parser``)."""
    from refground.progress import track

    check_options(gamma, parser)
    extract = extractor or noun_extractor(ds, parser)
    rows = ds.query_rows(split, task="expression")
    cat_vecs = vectors.vectors(ds.categories)  # [C, d]
    noun_cache: dict[str, np.ndarray] = {}
    referents = _referent_ids(ds, rows)
    img_row = {int(i): k for k, i in enumerate(ds.image_ids.tolist())}
    off = ds.image_object_offsets
    counts = np.zeros(len(rows), dtype=np.int64)
    matched = np.zeros(len(rows), dtype=bool)
    n_nouns = np.zeros(len(rows), dtype=np.int32)
    chunks: list[np.ndarray] = []
    for n, k in enumerate(track(rows.tolist(), len(rows), "pseudo contexts")):
        nouns = extract(ds.query_texts[k])
        n_nouns[n] = len(nouns)
        if not nouns:
            continue
        for w in nouns:
            if w not in noun_cache:
                noun_cache[w] = vectors.vectors([w])[0]
        sim = np.stack([noun_cache[w] for w in nouns]) @ cat_vecs.T  # [nouns, C]
        cat_ok = (sim >= gamma - SIM_EPS).any(axis=0)
        i = img_row[int(ds.query_image_ids[k])]
        s = slice(int(off[i]), int(off[i + 1]))
        ids = ds.object_ids[s][cat_ok[ds.object_categories[s]]]
        is_ref = ids == referents[n]
        matched[n] = bool(is_ref.any())
        ids = ids[~is_ref]
        counts[n] = len(ids)
        chunks.append(ids)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    object_ids = np.concatenate(chunks).astype(np.int64) if chunks else np.zeros(0, np.int64)
    return PseudoContexts(ds.query_ids[rows].astype(np.int64), offsets, object_ids, matched, n_nouns,
                          float(gamma), parser, getattr(vectors, "identity", ""))


def _gold_contexts(ds, row: int, referent: int) -> set[int]:
    out: set[int] = set()
    for j in range(int(ds.query_mention_offsets[row]), int(ds.query_mention_offsets[row + 1])):
        if ds.mention_roles[j] == 1:
            out.update(ds.mention_object_ids[ds.mention_object_offsets[j]:ds.mention_object_offsets[j + 1]].tolist())
    out.discard(referent)
    return out


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 6) if b else None


def evaluate_pseudo(ds, pseudo: PseudoContexts) -> dict[str, Any]:
    """Precision and recall (micro: summed over queries) of the pseudo contexts against the recorded
    context mentions (``Query.mentions`` with role "context", their objects, referent excluded), overall
    and per query kind. Also the share of queries whose referent category matched, and the mean number of
    pseudo contexts per query. Where the dataset records no context mentions for these queries,
    precision and recall are None and ``note`` says so."""
    rows = np.array([ds.query_row(int(q)) for q in pseudo.query_ids.tolist()], dtype=np.int64)
    referents = _referent_ids(ds, rows)
    stats: dict[str, list[int]] = {}  # kind -> [queries, predicted, gold, true positives, referent matched]
    for n, k in enumerate(rows.tolist()):
        gold = _gold_contexts(ds, k, int(referents[n]))
        pred = set(pseudo.contexts(n).tolist())
        for key in ("all", ds.query_kinds[k] or "-"):
            s = stats.setdefault(key, [0, 0, 0, 0, 0])
            s[0] += 1
            s[1] += len(pred)
            s[2] += len(gold)
            s[3] += len(pred & gold)
            s[4] += int(pseudo.referent_matched[n])

    def figures(s: list[int]) -> dict[str, Any]:
        return {"queries": s[0], "pseudo": s[1], "gold": s[2], "hits": s[3], "precision": _ratio(s[3], s[1]),
                "recall": _ratio(s[3], s[2]), "referent_matched": _ratio(s[4], s[0]),
                "pseudo_per_query": _ratio(s[1], s[0])}

    overall = figures(stats.get("all", [0, 0, 0, 0, 0]))
    has_gold = overall["gold"] > 0
    result: dict[str, Any] = {
        "dataset": ds.name, "gamma": pseudo.gamma, "parser": pseudo.parser, "vectors": pseudo.vectors,
        "has_context_mentions": has_gold, **overall,
        "per_kind": {k: figures(v) for k, v in sorted(stats.items(), key=lambda kv: _kind_key(kv[0]))
                     if k != "all"},
    }
    if not has_gold:
        result["precision"] = result["recall"] = None
        result["note"] = (f"dataset {ds.name} records no context mentions for these queries: precision and recall "
                          "of the pseudo contexts cannot be measured")
    return result


def _kind_key(kind: str) -> tuple[int, str]:
    from refground.data.model import KIND_ORDER

    return (KIND_ORDER.index(kind), kind) if kind in KIND_ORDER else (len(KIND_ORDER), kind)


# --------------------------------------------------------------------------------------------- artifact
def pseudo_path(dataset: str, cache: Any = None) -> Path:
    """``<cache>/<dataset>/pseudo/vlnms.h5``."""
    from refground.data.store import dataset_dir

    return dataset_dir(dataset, cache).parent / "pseudo" / "vlnms.h5"


def write_pseudo(path: Path, pseudo: PseudoContexts, attrs: dict[str, Any]) -> None:
    """Write ``pseudo`` as the HDF5 layout of the module docstring, atomically."""
    import h5py

    from refground.cache import write_h5

    path = Path(path)
    stage = path.with_name(f".{path.name}.stage-{uuid.uuid4().hex[:8]}")
    chunk = {"queries.ids": pseudo.query_ids.astype(np.int64),
             "queries.referent_matched": pseudo.referent_matched.astype(np.uint8),
             "queries.num_nouns": pseudo.num_nouns.astype(np.int32),
             "objects.counts": np.diff(pseudo.offsets).astype(np.int64),
             "objects.ids": pseudo.object_ids.astype(np.int64)}
    try:
        write_h5(stage, [chunk], {"format": PSEUDO_FORMAT, "version": FORMAT_VERSION, **attrs})
        with h5py.File(stage, "r+") as f:
            f["queries/offsets"] = f["objects/offsets"]  # hard link: no copy
        os.replace(stage, path)
    finally:
        if stage.exists():
            stage.unlink()


def read_pseudo(path: str | Path) -> PseudoContexts:
    """The :class:`PseudoContexts` of a complete, current artifact (:class:`ArtifactError` naming
    ``refground pseudo vlnms`` when it is missing, half-written, stale or malformed)."""
    from refground.cache import RaggedH5, require

    path = Path(path)
    require(path, remedy=REMEDY, check_parents=True)
    with RaggedH5(path) as f:
        if f.attr("format") != PSEUDO_FORMAT:
            raise ArtifactError(f"{path}: not a VL-NMS pseudo ground-truth file; run `{REMEDY}`")
        try:
            qids = f.table("queries", "ids").astype(np.int64)
            offsets = f.table("queries", "offsets").astype(np.int64)
            oids = f.table("objects", "ids").astype(np.int64)
            matched = f.table("queries", "referent_matched").astype(bool)
            n_nouns = f.table("queries", "num_nouns").astype(np.int32)
        except KeyError as exc:
            raise ArtifactError(f"{path}: missing array ({exc}); run `{REMEDY} --force`") from None
        gamma, parser, vectors = float(f.attr("gamma")), str(f.attr("parser")), str(f.attr("vectors"))
    if (len(offsets) != len(qids) + 1 or offsets[0] != 0 or offsets[-1] != len(oids) or np.any(np.diff(offsets) < 0)
            or len(matched) != len(qids)):
        raise ArtifactError(f"{path}: inconsistent offsets; run `{REMEDY} --force`")
    return PseudoContexts(qids, offsets, oids, matched, n_nouns, gamma, parser, vectors)


def load_pseudo_vlnms(path: str | Path) -> dict[int, np.ndarray]:
    """Query id -> int64[k] pseudo contextual object ids (referent excluded) from ``pseudo/vlnms.h5``;
    refuses a missing, incomplete or stale artifact with :class:`ArtifactError` naming the step."""
    return read_pseudo(path).as_dict()


def build_pseudo_vlnms(dataset: str, cache: Any = None, gamma: float = 0.4, word_vectors: str | Path | None = None,
                       parser: str = "toolkit", split: str = "all", dim: int = 100, seed: int = 0,
                       force: bool = False) -> dict[str, Any]:
    """Write (or find current) ``pseudo/vlnms.h5`` of ``dataset`` and evaluate it against the recorded
    context mentions. ``word_vectors``: a GloVe text file, or None for :func:`toolkit_vectors` (``dim``,
    ``seed``). Returns the evaluation (see :func:`evaluate_pseudo`) plus status ("hit" | "written"),
    path and seconds."""
    from refground.cache import fingerprint, is_current, parent, write_manifest
    from refground.cache.manifest import parent_fingerprints
    from refground.data.model import check_split_name
    from refground.data.store import dataset_dir, load_dataset

    t0 = time.perf_counter()
    check_options(gamma, parser)
    check_split_name(split)
    if word_vectors is not None and not Path(word_vectors).is_file():
        raise UsageError(f"{word_vectors}: word-vector file not found")
    ds_dir = dataset_dir(dataset, cache)
    parents = {"dataset": parent("dataset", ds_dir)}
    params: dict[str, Any] = {"format_version": FORMAT_VERSION, "gamma": float(gamma), "parser": parser, "split": split}
    if word_vectors is not None:
        parents["word_vectors"] = parent("file", word_vectors)
        params["vectors"] = parents["word_vectors"].fingerprint
    else:
        params.update(vectors="toolkit", dim=int(dim), seed=int(seed))
    fp = fingerprint(PSEUDO_STEP, params, parent_fingerprints(parents))
    out = pseudo_path(dataset, cache)
    ds = load_dataset(ds_dir)
    if not force and is_current(out, fp):
        pseudo = read_pseudo(out)
        status = "hit"
    else:
        from refground.cache.lock import artifact_lock

        # One writer: a second run of this step while this one writes is refused, not raced.
        with artifact_lock(out):
            t1 = time.perf_counter()
            extractor = noun_extractor(ds, parser)
            if word_vectors is not None:
                from refground.text.wordvec import load_glove

                # Only the words the similarity needs: category words and the split's nouns (memoised, so
                # pseudo_contexts does not extract them twice).
                memo: dict[str, list[str]] = {}
                base = extractor

                def extractor(text: str) -> list[str]:
                    if text not in memo:
                        memo[text] = base(text)
                    return memo[text]

                needed = {w for c in ds.categories for w in c.lower().replace("_", " ").split()}
                for k in ds.query_rows(split, task="expression").tolist():
                    needed.update(w for noun in extractor(ds.query_texts[k]) for w in noun.split())
                vectors = load_glove(word_vectors, restrict_to=needed)
            else:
                from refground.text.wordvec import toolkit_vectors

                vectors = toolkit_vectors(ds, dim=dim, seed=seed)
            t2 = time.perf_counter()
            pseudo = pseudo_contexts(ds, vectors, gamma, parser, split, extractor=extractor)
            t3 = time.perf_counter()
            out.parent.mkdir(parents=True, exist_ok=True)
            write_pseudo(out, pseudo, {"gamma": float(gamma), "parser": parser, "split": split,
                                       "vectors": vectors.identity, "dim": vectors.dim})
            write_manifest(out, step=PSEUDO_STEP, params=params, parents=parents, fingerprint=fp, kind="pseudo",
                           extra={"queries": len(pseudo), "contexts": int(len(pseudo.object_ids))})
        status = "written"
        timing = {"seconds_vectors": round(t2 - t1, 3), "seconds_contexts": round(t3 - t2, 3)}
    result = evaluate_pseudo(ds, pseudo)
    result.update(status=status, path=str(out), split=split, seconds=round(time.perf_counter() - t0, 3))
    if status == "written":
        result.update(timing)
    return result
