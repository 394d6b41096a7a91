"""``refground retrieve`` as a library call: embed the query, search the cached index, map rows back to the data.

A query is either a text (embedded with the CLIP model that made the artifact, so it lives in the same
space) or a stored image (``image_id``: its whole-image embedding from the artifact, no model needed). The
target section is ``images`` (whole images), ``regions`` (the features artifact's proposals), ``objects``
(ground-truth boxes) or ``queries`` (the dataset's stored expressions and captions); the default is
``images`` for a text and ``queries`` for an image ("which stored queries best describe it").

Each hit is mapped back from its index row: to its image id for every section, to its box (xyxy pixels) for
regions (read from the features artifact the CLIP artifact was cut from) and objects (the dataset's
ground-truth box, with its object id and category), and to its query id and text for queries.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from refground.cache import RaggedH5, read_manifest_of, require
from refground.data.model import Dataset
from refground.errors import ArtifactError, UsageError
from refground.retrieval.store import SECTIONS, IndexSpec, build_index_artifact, clip_artifact, search_index_artifact


@dataclass
class Hit:
    """One search result. ``row``: row of the section; ``box``: xyxy pixels (regions, objects);
    ``region``: the proposal's rank within its image (regions); ``object_id``/``category`` (objects);
    ``query_id``/``text`` (queries; ``image_id`` is then the query's image)."""

    rank: int
    score: float
    row: int
    image_id: int
    box: list[float] | None = None
    region: int | None = None
    object_id: int | None = None
    category: str | None = None
    query_id: int | None = None
    text: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Retrieval:
    """What :func:`retrieve` found: the query (``text`` or ``image_id``), the searched ``section`` of CLIP
    artifact ``clip``, the index summary (:func:`~refground.retrieval.store.build_index_artifact`) and the hits,
    best first."""

    dataset: str
    clip: str
    section: str
    top_k: int
    index: dict[str, Any]
    hits: list[Hit] = field(default_factory=list)
    text: str | None = None
    image_id: int | None = None
    nprobe: int | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"dataset": self.dataset, "clip": self.clip, "section": self.section, "top_k": self.top_k,
                             "index": self.index, "hits": [h.as_dict() for h in self.hits], "seconds": self.seconds}
        d["query"] = {"text": self.text} if self.text is not None else {"image_id": self.image_id}
        if self.nprobe is not None:
            d["nprobe"] = self.nprobe
        return d


def _embedding_rows(clip_path: Path, group: str) -> int:
    with RaggedH5(clip_path) as f:
        return int(f.file[group]["embedding"].shape[0]) if f.has(group, "embedding") else 0


def image_embedding(clip_path: str | Path, image_id: int) -> np.ndarray:
    """float32[1, E]: the stored whole-image embedding of ``image_id``; :class:`UsageError` for an id the
    artifact does not hold."""
    with RaggedH5(clip_path) as f:
        ids = f.table("images", "ids")
        where = np.flatnonzero(ids == int(image_id))
        if len(where) == 0:
            span = f" (ids {int(ids.min())}..{int(ids.max())})" if len(ids) else ""
            raise UsageError(f"--image {image_id}: unknown image id; {Path(clip_path).name} holds {len(ids)} images{span}")
        return np.asarray(f.file["images"]["embedding"][int(where[0])], dtype=np.float32)[None]


def text_embedding(clip_path: str | Path, text: str, ds: Dataset | None = None) -> np.ndarray:
    """float32[1, E]: ``text`` embedded with the CLIP model recorded as the artifact's ``clip`` parent (an
    ``hf:PATH`` folder, or a built-in CLIP's run folder).

    :class:`ArtifactError` when that model is gone or changed since the embeddings were made (the text would
    land in another space than the stored vectors)."""
    from refground.features.sources import resolve

    clip_path = Path(clip_path)
    m = require(clip_path)
    p = m.parents.get("clip")
    dataset = clip_path.parent.parent.name
    # The model folder (hf:PATH) or the built-in CLIP's run folder (builtin:PATH) the embeddings came from.
    kinds = {"file": "hf", "run": "builtin"}
    if p is None or p.kind not in kinds:
        raise ArtifactError(f"{clip_path}: no CLIP model recorded, so a text cannot be embedded in its space; "
                            "search by --image ID, or re-run `refground extract --clip hf:PATH`")
    model = Path(p.path)
    if not model.is_dir():
        raise ArtifactError(f"{clip_path}: its CLIP model {model} is gone; a text query needs it (--image ID does "
                            "not)")
    source = f"{kinds[p.kind]}:{model}"
    spec = resolve(source, "clip", clip_path.parent.parent / "runs")
    if spec.parent is not None and spec.parent.fingerprint != p.fingerprint:
        raise ArtifactError(f"{clip_path}: the CLIP model {model} changed since its embeddings were made; run "
                            f"`refground extract --dataset {dataset} --clip {source}`")
    encoder = spec.load(ds)
    return np.asarray(encoder.embed_texts([text]).float().numpy(), dtype=np.float32)


def describe_rows(clip_path: str | Path, section: str, rows: np.ndarray, scores: np.ndarray,
                  ds: Dataset) -> list[Hit]:
    """:class:`Hit` records of section ``rows`` (int64[K], valid rows) with their ``scores`` (float[K])."""
    clip_path = Path(clip_path)
    group = SECTIONS[section]
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        return []
    with RaggedH5(clip_path) as f:
        image_ids = f.table("images", "ids")
        if len(image_ids) != ds.num_images or not np.array_equal(image_ids, ds.image_ids):
            raise ArtifactError(f"{clip_path}: its images differ from dataset {ds.name}'s; re-run `refground extract "
                                f"--dataset {ds.name} --clip hf:PATH`")
        if group == "images":
            img_rows = rows
        else:
            offsets = f.offsets[group]
            img_rows = np.searchsorted(offsets, rows, side="right") - 1
            local = rows - offsets[img_rows]
        query_ids = f.file["queries"]["ids"][np.unique(rows)] if group == "queries" else None
    hits = [Hit(rank=i + 1, score=float(scores[i]), row=int(r), image_id=int(image_ids[img_rows[i]]))
            for i, r in enumerate(rows)]
    if group == "proposals":
        boxes = region_boxes(clip_path, rows)
        for h, b, loc in zip(hits, np.round(boxes.astype(np.float64), 2).tolist(), local.tolist()):
            h.box, h.region = b, int(loc)
    elif group == "objects":
        if ds.num_objects != int(offsets[-1]):
            raise ArtifactError(f"{clip_path}: {int(offsets[-1])} object embeddings but dataset {ds.name} has "
                                f"{ds.num_objects} objects; re-run `refground extract --dataset {ds.name} --clip hf:PATH`")
        # The artifact's objects are the dataset's, in the dataset's order (grouped by image).
        boxes = np.round(np.asarray(ds.object_boxes, dtype=np.float64)[rows], 2).tolist()
        for h, b, oid, cat in zip(hits, boxes, ds.object_ids[rows].tolist(), ds.object_categories[rows].tolist()):
            h.box, h.object_id, h.category = b, int(oid), ds.categories[int(cat)]
    elif group == "queries":
        qids = query_ids[np.searchsorted(np.unique(rows), rows)]
        for h, qid in zip(hits, qids.tolist()):
            h.query_id, h.text = int(qid), ds.query(int(qid)).text
    return hits


def region_boxes(clip_path: str | Path, rows: np.ndarray) -> np.ndarray:
    """float32[K, 4] xyxy pixels of proposal ``rows`` of the CLIP artifact: its proposals are crops of its
    ``features`` parent's proposals, row for row. :class:`ArtifactError` if that artifact changed since."""
    clip_path = Path(clip_path)
    m = require(clip_path)
    p = m.parents.get("features")
    if p is None:
        raise ArtifactError(f"{clip_path}: no features artifact recorded for its proposal crops; re-run "
                            "`refground extract --clip`")
    fm = read_manifest_of(p.path)
    if fm is None or not fm.complete or fm.fingerprint != p.fingerprint or not Path(p.path).exists():
        raise ArtifactError(f"{p.path}: changed (or gone) since {clip_path.name}'s region embeddings were cut from it; "
                            "re-run `refground extract --clip` with the same detector")
    require(p.path)
    with RaggedH5(clip_path) as c, RaggedH5(p.path) as f:
        if not np.array_equal(c.offsets["proposals"], f.offsets.get("proposals", np.zeros(0))):
            raise ArtifactError(f"{clip_path}: its proposals do not line up with {p.path}'s; re-run `refground "
                                "extract --clip`")
        uniq = np.unique(rows)
        boxes = f.file["proposals"]["boxes"][uniq] if len(uniq) else np.zeros((0, 4), np.float32)
    return np.asarray(boxes, dtype=np.float32)[np.searchsorted(uniq, rows)]


def retrieve(dataset: str, cache: Any = None, text: str | None = None, image_id: int | None = None,
             section: str | None = None, top_k: int = 10, spec: IndexSpec | None = None, nprobe: int | None = None,
             clip: str | None = None, force: bool = False, threads: int | str | None = None) -> Retrieval:
    """Search ``section`` of the CLIP artifact ``clip`` of ``dataset`` for ``text`` or the stored image
    ``image_id`` (exactly one). The index is built on first use and cached (:mod:`refground.retrieval.store`);
    ``force`` rebuilds it; ``threads``: faiss's OpenMP threads (``"auto"``, a count, or None: as they are;
    :func:`~refground.retrieval.index.faiss_threads`). ``section`` None: ``images`` for a text, ``queries`` for an image. Returns the
    ``top_k`` best hits (``spec`` None: a flat index; fewer when the section is smaller, or an IVF search found fewer in its cells).
    One-line errors: :class:`UsageError` for an empty text, an unknown image id, top_k < 1, a bad spec;
    :class:`ArtifactError` for a missing or stale CLIP artifact."""
    from refground.data.store import dataset_dir, load_dataset

    t0 = time.perf_counter()
    if (text is None) == (image_id is None):
        raise UsageError("give a query text or --image ID (one of them)")
    if text is not None and not text.strip():
        raise UsageError("the query text is empty")
    if top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {top_k}")
    if nprobe is not None and nprobe < 1:
        raise UsageError(f"--nprobe must be at least 1, got {nprobe}")
    spec = spec or IndexSpec()
    spec.check()
    section = section or ("images" if text is not None else "queries")
    if section not in SECTIONS:
        raise UsageError(f"section must be one of {', '.join(SECTIONS)}, got {section!r}")
    clip_path = clip_artifact(dataset, cache, clip)
    require(clip_path, remedy=f"refground extract --dataset {dataset} --clip hf:PATH")
    vec = image_embedding(clip_path, image_id) if image_id is not None else None
    if _embedding_rows(clip_path, SECTIONS[section]) == 0:
        raise UsageError(f"{clip_path}: the {section} section is empty: nothing to search")
    ds = load_dataset(dataset_dir(dataset, cache))
    from refground.retrieval.index import faiss_threads

    with faiss_threads(threads):
        summary = build_index_artifact(clip_path, section, spec, force=force)
        if vec is None:
            vec = text_embedding(clip_path, text.strip(), ds)
        scores, rows = search_index_artifact(summary["path"], vec, top_k, nprobe)
    keep = rows[0] >= 0
    hits = describe_rows(clip_path, section, rows[0][keep], scores[0][keep], ds)
    used_nprobe = None
    if spec.type == "ivf":
        from refground.retrieval.index import default_nprobe

        used_nprobe = int(nprobe) if nprobe is not None else default_nprobe(max(summary["nlist"]))
    return Retrieval(dataset=dataset, clip=clip_path.stem, section=section, top_k=top_k, index=summary, hits=hits,
                     text=text.strip() if text is not None else None,
                     image_id=int(image_id) if image_id is not None else None, nprobe=used_nprobe,
                     seconds=round(time.perf_counter() - t0, 3))
