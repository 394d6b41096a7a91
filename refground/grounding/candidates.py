"""Candidate boxes and padded query batches for any two-stage grounding model (the shared candidates interface).

A :class:`CandidateSet` holds, for every group (an image, or a query for query-aware proposals), its
candidate boxes with region features, 5-d spatial features p_i and the spatial relation graph between
them, flat in memory with per-group offsets (a :class:`~refground.structures.RaggedBoxes`). A
:class:`CandidateSpec` names where candidates come from:

* ``gt``: the ground-truth objects of each image (features and graph artifacts);
* ``proposals``: the first ``top_n`` proposals of each image by confidence (features and graph artifacts);
* ``vlnms``: the first ``top_n`` query-aware proposals of each query, written by ``refground vlnms`` to
  :func:`query_proposals_path` (any method that writes that format is a source; a second stage never
  imports the method that made them).

:func:`candidates_for` loads a spec and points a :class:`~refground.grounding.queries.QueryTable` at its
groups; :func:`make_batch` pads a batch of queries into the tensors the models take.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from refground.cache import RaggedH5, require
from refground.data.model import Dataset
from refground.errors import ArtifactError, DataError, UsageError
from refground.features.contents import extract_command, require_sections
from refground.graph_artifact import graph_path
from refground.grounding.queries import QueryTable, group_queries
from refground.structures import RaggedBoxes, offsets_of

SOURCES = ("gt", "proposals", "vlnms")
QUERY_PROPOSALS = "vlnms"  # the folder of query-aware proposal sets: <cache>/<dataset>/vlnms/<tag>/<split>.h5

# Relation label of a pair after mirroring the image left-right / top-bottom (labels 4-11 are the direction
# sectors right, top right, top, top left, left, bottom left, bottom, bottom right; 0-3 do not change).
HFLIP_RELATION = np.array([0, 1, 2, 3, 8, 7, 6, 5, 4, 11, 10, 9], dtype=np.int64)
VFLIP_RELATION = np.array([0, 1, 2, 3, 4, 11, 10, 9, 8, 7, 6, 5], dtype=np.int64)
# Words that name a direction, and what they become in the mirrored image (the synthetic world's words;
# a word missing from the vocabulary is ignored).
HFLIP_WORDS = (("left", "right"), ("leftmost", "rightmost"))
VFLIP_WORDS = (("top", "bottom"), ("topmost", "bottommost"), ("above", "below"), ("over", "under"),
               ("upper", "lower"), ("beneath", "above"), ("lowest", "topmost"))


# Elements checked per np.isfinite call: bounds the temporary bool array on a large feature table.
FINITE_BLOCK = 1 << 22


def all_finite(a: np.ndarray) -> bool:
    """Whether a float array holds no NaN or Inf (an integer array always passes); checked in blocks."""
    if a.dtype.kind not in "fc":
        return True
    flat = a.reshape(-1)
    return all(bool(np.isfinite(flat[i:i + FINITE_BLOCK]).all()) for i in range(0, flat.size, FINITE_BLOCK))


def check_finite(path: Path, remedy: str, **arrays: np.ndarray) -> None:
    """A one-line ArtifactError naming ``path`` and the command ``remedy`` when one of ``arrays`` (by name,
    e.g. ``objects_features=...``) holds NaN or Inf: a damaged artifact would otherwise train to a silent
    loss of 0 (every score NaN, so no hard negative) or rank garbage."""
    for name, a in arrays.items():
        if not all_finite(np.asarray(a)):
            raise ArtifactError(f"{path}: {name.replace('_', '/', 1)} holds NaN or Inf values (damaged); "
                                f"run `{remedy}`")


# The sections of a features artifact (refground.features.contents.NEEDS) each candidate source reads.
CANDIDATE_NEEDS = {"gt": ("object_features",), "proposals": ("proposals", "proposal_features"), "vlnms": ()}


def require_candidate_sections(features_file: Path, sources: Any, step: str = "") -> None:
    """A one-line :class:`ArtifactError` (before any data is read) when the features artifact lacks a
    section that one of the candidate ``sources`` (names of :data:`SOURCES`) reads, naming the `refground
    extract` options that supply it. ``step``: how the message names the consumer (default ``--candidates
    <source>``)."""
    for source in dict.fromkeys(sources):
        if CANDIDATE_NEEDS.get(source):
            require_sections(features_file, CANDIDATE_NEEDS[source], step or f"--candidates {source}")


def proposals_command(proposals_file: Path) -> str:
    """The ``refground vlnms ... --force`` command that rewrites the query-aware proposal set
    ``proposals_file`` (``<cache>/<dataset>/vlnms/<tag>/<split>.h5``)."""
    path = Path(proposals_file)
    tag = path.parent.name
    who = "--confidence-only" if tag == "confidence" else f"--run {tag}"
    dataset = path.parent.parent.parent.name
    where = f" --dataset {dataset}" if dataset and dataset != "synth" else ""
    return f"refground vlnms{where} {who} --split {path.stem} --force"


class CandidateSet(RaggedBoxes):
    """Candidates of every group (an image, or a query for query-aware proposals): a
    :class:`~refground.structures.RaggedBoxes` (group g owns rows ``offsets[g]:offsets[g + 1]``).

    Row fields: boxes float32[M, 4] xyxy pixels; features float32[M, D]; spatial float32[M, 5] (= [x, y, w, h,
    wh], :func:`refground.boxes.spatial_feature`); object_ids int64[M] (ground-truth object id, or -1 for
    proposals). Group fields: image_ids int64[G] (a query group's: its query's image); image_sizes int64[G, 2]
    (height, width). Also ``source`` (one of :data:`SOURCES`) and the relation graphs: relations uint8 flat per
    group (K_g x K_g, entry [a, b] the label of a to b) with ``rel_offsets`` int64[G + 1].
    """

    source: str
    image_ids: np.ndarray
    image_sizes: np.ndarray
    features: np.ndarray
    spatial: np.ndarray
    object_ids: np.ndarray
    relations: np.ndarray
    rel_offsets: np.ndarray

    def __init__(self, source: str, image_ids: np.ndarray, offsets: np.ndarray, boxes: np.ndarray,
                 features: np.ndarray, spatial: np.ndarray, object_ids: np.ndarray, relations: np.ndarray,
                 rel_offsets: np.ndarray, image_sizes: np.ndarray) -> None:
        super().__init__(offsets, boxes, {"features": features, "spatial": spatial, "object_ids": object_ids},
                         {"image_ids": image_ids, "image_sizes": image_sizes})
        if len(rel_offsets) != len(self) + 1:
            raise ValueError(f"CandidateSet: rel_offsets has length {len(rel_offsets)}, expected {len(self) + 1}")
        self.source, self.relations, self.rel_offsets = source, relations, rel_offsets

    def relation_matrix(self, group: int) -> np.ndarray:
        """uint8[K_g, K_g]: the relation labels among group ``group``'s candidates."""
        k = int(self.offsets[group + 1] - self.offsets[group])
        a, b = int(self.rel_offsets[group]), int(self.rel_offsets[group + 1])
        return self.relations[a:b].reshape(k, k)


def _spatial(boxes: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    from refground.boxes import spatial_feature

    return spatial_feature(torch.from_numpy(boxes.astype(np.float32)), torch.from_numpy(sizes)).numpy()


def id_rows(ids: np.ndarray, keys: np.ndarray, what: str, missing: int | None = None) -> np.ndarray:
    """Rows int64[N] of ``keys`` int[N] in the column of unique ``ids`` (any order): ``Dataset.image_row``,
    ``query_row`` or ``object_row`` for many ids at once (one sort, no loop over ids). A key not in ``ids``
    gets ``missing``, or without it is the :class:`DataError` "unknown <what> id <key>" of the first one."""
    ids = np.asarray(ids)
    keys = np.asarray(keys).reshape(-1)
    order = np.argsort(ids, kind="stable")
    pos = np.minimum(np.searchsorted(ids, keys, sorter=order), max(len(ids) - 1, 0))
    rows = order[pos] if len(ids) else np.zeros(len(keys), np.int64)
    found = ids[rows] == keys if len(ids) else np.zeros(len(keys), bool)
    if missing is not None:
        return np.where(found, rows, missing).astype(np.int64)
    if not found.all():
        raise DataError(f"unknown {what} id {int(keys[np.argmin(found)])}")
    return rows.astype(np.int64)


def _sub_relations(flat: np.ndarray, offsets: np.ndarray, counts: np.ndarray, keep: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The top-left ``keep_r x keep_r`` block of every image's ``K_r x K_r`` matrix (the relation of two
    boxes depends only on the pair, so the first N proposals' graph is a block of the full graph): one
    gather of all blocks (the pre-change loop over images is ``refground.bench.vlnms_bench._reference_sub_relations``)."""
    counts = np.asarray(counts, dtype=np.int64)
    keep = np.asarray(keep, dtype=np.int64)
    if len(counts) == 0:
        return np.zeros(0, np.uint8), offsets_of([])
    # Row a of image r's block starts at entry offsets[r] + a * K_r of the flat matrices and has keep_r
    # entries: one start per block row, then consecutive entries from each (no division per entry).
    image = np.repeat(np.arange(len(counts)), keep)
    row = np.arange(len(image)) - offsets_of(keep)[image]
    starts = np.asarray(offsets, dtype=np.int64)[image] + row * counts[image]
    width = keep[image]
    out_off = offsets_of(width)
    return flat[np.repeat(starts - out_off[:-1], width) + np.arange(int(out_off[-1]))], offsets_of(keep * keep)


def load_candidates(ds: Dataset, features_file: Path, source: str = "gt", top_n: int = 10,
                    graph_file: Path | None = None) -> CandidateSet:
    """Candidates of every image of ``ds`` from a features artifact and its graph artifact.

    ``source="gt"``: the ground-truth objects (dataset order) with their region features;
    ``source="proposals"``: the first ``top_n`` proposals of each image (best first). ``graph_file``
    defaults to the graph artifact made for ``features_file`` (``graph/<features name>.h5``).
    """
    if source not in SOURCES[:2]:
        raise UsageError(f"unknown candidate source {source!r}; expected gt or proposals")
    if source == "proposals" and top_n < 1:
        raise UsageError(f"--top-n {top_n}: must be at least 1")
    if graph_file is None:
        graph_file = graph_path(ds.name, Path(features_file).parents[2], Path(features_file).stem)
    # What the features lack comes first: re-running `extract` with the same options would not supply it.
    require_candidate_sections(features_file, (source,))
    for path, step in ((features_file, "refground extract"), (graph_file, "refground graph")):
        require(path, step, check_parents=True)
    sizes = np.stack([ds.image_height, ds.image_width], axis=1).astype(np.int64)
    with RaggedH5(features_file) as f, RaggedH5(graph_file) as g:
        if not np.array_equal(f.table("images", "ids"), ds.image_ids):
            raise ArtifactError(f"{features_file}: its images differ from the dataset's; "
                                "run `refground extract --force`")
        if not np.array_equal(g.table("images", "ids"), ds.image_ids):
            raise ArtifactError(f"{graph_file}: its images differ from the dataset's; run `refground graph --force`")
        if source == "gt":
            if not np.array_equal(f.table("objects", "ids"), ds.object_ids):
                raise ArtifactError(f"{features_file}: its objects differ from the dataset's; "
                                    "run `refground extract --force`")
            offsets = ds.image_object_offsets.astype(np.int64)
            features = f.table("objects", "features").astype(np.float32)
            check_finite(features_file, extract_command(features_file), objects_features=features)
            boxes = ds.object_boxes.astype(np.float32)
            object_ids = ds.object_ids.astype(np.int64)
            relations, rel_offsets = g.table("objects", "labels"), g.offsets["objects"]
            if not np.array_equal(np.diff(rel_offsets), np.diff(offsets) ** 2):
                raise ArtifactError(f"{graph_file}: its object graphs do not match the dataset; "
                                    "run `refground graph --force`")
        else:
            if not g.has("proposals"):
                raise ArtifactError(f"{graph_file}: no proposal graphs; run `refground graph`")
            props = RaggedBoxes.read(f, "proposals", ("features",))
            top = props.top(top_n)
            offsets = top.offsets
            features = top.features.astype(np.float32)
            boxes = top.boxes.astype(np.float32)
            check_finite(features_file, extract_command(features_file), proposals_features=features,
                         proposals_boxes=boxes)
            object_ids = np.full(len(boxes), -1, dtype=np.int64)
            counts = props.counts()
            if not np.array_equal(np.diff(g.offsets["proposals"]), counts ** 2):
                raise ArtifactError(f"{graph_file}: its proposal graphs do not match {features_file}; "
                                    "run `refground graph --force`")
            relations, rel_offsets = _sub_relations(g.table("proposals", "labels"), g.offsets["proposals"], counts,
                                                    np.diff(offsets))
    image_of_row = np.repeat(np.arange(ds.num_images), np.diff(offsets))
    spatial = _spatial(boxes, sizes[image_of_row]) if len(boxes) else np.zeros((0, 5), np.float32)
    return CandidateSet(source, ds.image_ids.astype(np.int64), offsets, boxes, features, spatial, object_ids,
                        relations.astype(np.uint8), rel_offsets.astype(np.int64), sizes)


def load_query_candidates(ds: Dataset, proposals_file: Path, top_n: int = 10) -> tuple[CandidateSet, np.ndarray]:
    """Candidates per *query* from a query-aware proposal set (``refground vlnms``: the first ``top_n`` of
    each query, best first), with their spatial relation graphs computed here.

    Returns the set (its groups are the file's queries, ``image_ids`` the queries' image ids) and
    query_ids int64[G] of the groups; :func:`group_queries` points a :class:`QueryTable` at them.
    """
    from refground.graph import spatial_relations_many

    if top_n < 1:
        raise UsageError(f"--top-n {top_n}: must be at least 1")
    require(proposals_file, f"refground vlnms --split {Path(proposals_file).stem}", check_parents=True)
    with RaggedH5(proposals_file) as f:
        qids = f.table("queries", "ids").astype(np.int64)
        top = RaggedBoxes.read(f, "proposals", ("features",)).top(top_n)
    offsets = top.offsets
    boxes = top.boxes.astype(np.float32)
    features = top.features.astype(np.float32)
    check_finite(proposals_file, proposals_command(proposals_file), proposals_features=features,
                 proposals_boxes=boxes)
    image_rows = id_rows(ds.image_ids, ds.query_image_ids[id_rows(ds.query_ids, qids, "query")], "image")
    sizes = np.stack([ds.image_height, ds.image_width], axis=1).astype(np.int64)[image_rows]
    # spatial_relations_many takes a list of groups (and costs ~15 us a group); numpy views are the cheapest
    # list to build (0.2 us a group; torch.split and np.split take 1.4 us and 0.8 us).
    group_boxes = [boxes[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
    relations, rel_offsets = spatial_relations_many(group_boxes, sizes.tolist())
    of_row = np.repeat(np.arange(len(qids)), np.diff(offsets))
    spatial = _spatial(boxes, sizes[of_row]) if len(boxes) else np.zeros((0, 5), np.float32)
    cands = CandidateSet("vlnms", ds.image_ids[image_rows].astype(np.int64), offsets, boxes, features, spatial,
                         np.full(len(boxes), -1, dtype=np.int64), relations, rel_offsets.astype(np.int64), sizes)
    return cands, qids


def query_proposals_path(dataset: str, cache: Any, tag: str, split: str) -> Path:
    """``<cache>/<dataset>/vlnms/<tag>/<split>.h5``: a query-aware proposal set (``<split>.jsonl`` beside it holds
    the ranked boxes for ``refground eval``). ``tag`` is a VL-NMS run as ``--run`` spells it: another dataset's
    run ``DATASET/NAME`` finds its set under ``DATASET.NAME`` (:func:`refground.runs.applied_tag`)."""
    from refground.data.store import dataset_dir
    from refground.runs import applied_tag

    return dataset_dir(dataset, cache).parent / QUERY_PROPOSALS / applied_tag(tag, "vlnms", dataset, cache) / \
        f"{split}.h5"


@dataclass(frozen=True)
class CandidateSpec:
    """Where a second stage's candidates come from: ``source`` (one of :data:`SOURCES`), ``top_n`` (per image
    or per query; unused for ``gt``) and ``run`` (the query-aware proposal set's tag for ``vlnms``: a plain name,
    :func:`refground.runs.applied_tag` of how ``--vlnms-run`` spells the run)."""

    source: str = "gt"
    top_n: int = 10
    run: str = ""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise UsageError(f"--candidates {self.source!r}: expected one of: {', '.join(SOURCES)}")
        if self.top_n < 1:
            raise UsageError(f"--top-n {self.top_n}: must be at least 1")
        if self.source == "vlnms" and not self.run:
            raise UsageError("--candidates vlnms needs the proposal set's run (--vlnms-run NAME)")

    @property
    def tag(self) -> str:
        """``gt``, ``proposals<N>`` or ``vlnms-<run><N>``: the candidates part of a predictions file name."""
        if self.source == "gt":
            return "gt"
        if self.source == "vlnms":
            return f"vlnms-{self.run}{self.top_n}"
        return f"proposals{self.top_n}"

    @property
    def key(self) -> str:
        """The source as recorded in a predictions manifest: ``gt``, ``proposals`` or ``vlnms:<run>``."""
        return f"vlnms:{self.run}" if self.source == "vlnms" else self.source

    def proposals_file(self, dataset: str, cache: Any, split: str) -> Path | None:
        """The query-aware proposal set this spec reads on ``split`` (None for per-image sources)."""
        return query_proposals_path(dataset, cache, self.run, split) if self.source == "vlnms" else None


def candidates_for(ds: Dataset, spec: CandidateSpec, queries: QueryTable, features_file: Path,
                   graph_file: Path | None = None, proposals_file: Path | None = None
                   ) -> tuple[CandidateSet, QueryTable]:
    """The candidate set of ``spec`` and ``queries`` pointed at its groups: per image for ``gt`` and
    ``proposals`` (``queries`` unchanged), per query for ``vlnms`` (read from ``proposals_file``)."""
    if spec.source == "vlnms":
        if proposals_file is None:
            raise UsageError("query-aware candidates need their proposal set's file")
        cands, qids = load_query_candidates(ds, proposals_file, spec.top_n)
        return cands, group_queries(queries, qids)
    return load_candidates(ds, features_file, spec.source, spec.top_n, graph_file=graph_file), queries


@dataclass
class Flips:
    """Per-query mirroring for training augmentation: ``horizontal`` / ``vertical`` bool[B] and the word maps
    of :func:`flip_word_map`. A mirrored query sees x (or y) of every candidate's centre reflected, the
    relation labels of :data:`HFLIP_RELATION` / :data:`VFLIP_RELATION` and its direction words swapped;
    the region features stay as they are (the scene is mirrored, not the objects)."""

    horizontal: np.ndarray
    vertical: np.ndarray
    h_words: np.ndarray
    v_words: np.ndarray


@dataclass
class Batch:
    """Padded model inputs of B queries: words LongTensor[B, T]; features Tensor[B, K, D]; spatial
    Tensor[B, K, 5]; relations LongTensor[B, K, K]; cand_mask BoolTensor[B, K]; targets LongTensor[B];
    index int64[B] (rows of the QueryTable)."""

    words: Tensor
    features: Tensor
    spatial: Tensor
    relations: Tensor
    cand_mask: Tensor
    targets: Tensor
    index: np.ndarray

    def inputs(self) -> dict[str, Tensor]:
        return {"words": self.words, "features": self.features, "spatial": self.spatial,
                "relations": self.relations, "cand_mask": self.cand_mask}


def make_batch(queries: QueryTable, cands: CandidateSet, index: np.ndarray, flips: Flips | None = None) -> Batch:
    """Pad the queries ``index`` (rows of ``queries``) with their images' candidates (vectorised gathers),
    mirroring the queries that ``flips`` selects."""
    index = np.asarray(index, dtype=np.int64)
    img = queries.image_rows[index]
    counts = cands.counts()[img]
    rows, valid = cands.padded_rows(img)                                            # [B, K]
    slot = np.arange(rows.shape[1])
    feats = cands.features[rows] * valid[..., None]
    spatial = cands.spatial[rows] * valid[..., None]
    pair_valid = valid[:, :, None] & valid[:, None, :]
    rel_rows = np.where(pair_valid, cands.rel_offsets[img][:, None, None] + slot[None, :, None] * counts[:, None, None]
                        + slot[None, None, :], 0)
    rel = np.where(pair_valid, cands.relations[rel_rows], 0)
    words = queries.words[index]
    if flips is not None:
        h, v = flips.horizontal[:, None], flips.vertical[:, None]
        spatial = spatial.copy()
        spatial[..., 0] = np.where(h & valid, 1.0 - spatial[..., 0], spatial[..., 0])
        spatial[..., 1] = np.where(v & valid, 1.0 - spatial[..., 1], spatial[..., 1])
        rel = np.where(h[..., None], HFLIP_RELATION[rel], rel)
        rel = np.where(v[..., None], VFLIP_RELATION[rel], rel)
        words = np.where(h, flips.h_words[words], words)
        words = np.where(v, flips.v_words[words], words)
    t = max(1, int((words != 0).sum(1).max()))
    return Batch(torch.from_numpy(words[:, :t].copy()), torch.from_numpy(feats.astype(np.float32)),
                 torch.from_numpy(spatial.astype(np.float32)), torch.from_numpy(rel.astype(np.int64)),
                 torch.from_numpy(valid), torch.from_numpy(queries.targets[index].copy()), index)


def feature_stats(cands: RaggedBoxes, image_rows: np.ndarray, limit: int | None = None) -> tuple[Tensor, Tensor]:
    """Per-dimension mean and standard deviation (Tensor[D] each) of the features of groups ``image_rows`` of any
    :class:`~refground.structures.RaggedBoxes` with a ``features`` field (a :class:`CandidateSet`, VL-NMS's
    detection set), over their first ``limit`` rows (in the order of ``image_rows``) when given."""
    rows = cands.group_rows(image_rows)[0]
    x = cands.features[rows[:limit]].astype(np.float64)
    if len(x) == 0:
        return torch.zeros(cands.feature_dim), torch.ones(cands.feature_dim)
    return torch.from_numpy(x.mean(0).astype(np.float32)), torch.from_numpy(x.std(0).astype(np.float32))


__all__ = ["Batch", "CANDIDATE_NEEDS", "CandidateSet", "CandidateSpec", "Flips", "HFLIP_RELATION", "VFLIP_RELATION",
           "SOURCES", "all_finite", "candidates_for", "check_finite", "feature_stats", "id_rows", "load_candidates",
           "load_query_candidates", "make_batch", "proposals_command", "query_proposals_path",
           "require_candidate_sections"]
