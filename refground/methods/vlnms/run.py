"""VL-NMS as a pipeline step: train the relatedness module, apply it, write query-aware proposals.

Inputs: the features artifact with its pre-NMS detection set ``detections/`` (``refground extract
--detections``: every refined box with confidence >= delta before the detector's final NMS, with region
features), the dataset, and optionally the pseudo ground truth of contextual objects
(``refground pseudo vlnms``). For a query, the foreground boxes are its referent and (with pseudo ground
truth) the pseudo contextual objects; a detection is positive when its IoU with a foreground box exceeds
0.5 (eq. 4), rho is its largest IoU with them (eq. 5) and its regression target is the foreground box of
that IoU (eq. 6).

``apply_vlnms`` scores every detection of the query's image with the relatedness module, fuses
s = r x c with the detector confidence and runs per-class NMS on s
(:func:`refground.methods.vlnms.model.fused_nms`); the first ``top_n`` survivors are the query's proposals.
With ``model=None`` it is the confidence-only NMS on the same detection set (r = 1), the baseline of
Table 1. Proposal sets are written as ``<cache>/<dataset>/vlnms/<tag>/<split>.h5``
(:data:`PROPOSALS_FORMAT`; tag = the run name, or ``confidence``) plus ``<split>.jsonl`` ranked boxes that
``refground eval`` scores for proposal recall.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refground.boxes import elementwise_box_iou, fused_nms
from refground.cache import RaggedH5, current_extra, parent, require, write_h5, write_manifest
from refground.cache import fingerprint as make_fingerprint
from refground.cache.manifest import parent_fingerprints
from refground.data.model import Dataset
from refground.data.store import dataset_dir, load_dataset
from refground.errors import ArtifactError, UsageError
from refground.eval.metrics import IOU_THRESHOLD, RECALL_NS, proposal_hit_ranks, recall_from_ranks
from refground.features.contents import extract_command, require_sections
from refground.features.extract import fixed_threads
from refground.features.pipeline import features_path
from refground.grounding.candidates import check_finite, feature_stats, id_rows, query_proposals_path
from refground.grounding.queries import QueryTable, encode_queries, single_referent_rows
from refground.methods.vlnms.model import (VLNMSConfig, build_relatedness, decode_deltas, regression_targets,
                                    spatial_vector, vlnms_loss)
from refground.progress import track
from refground.runs import local_run_name, resolve_run
from refground.structures import RaggedBoxes, group_rows, offsets_of
from refground.text.vocab import Vocabulary
from refground.train import (MODEL_FILE, LoadedRun, RunSpec, best_epoch_figures, complete_run,
                             config_params, fit, load_run_folder, step_decay)

STEP = "train.vlnms@1"
APPLY_STEP = "vlnms@1"
PROPOSALS_FORMAT = "refground-vlnms-proposals"
FORMAT_VERSION = 1
CONFIDENCE = "confidence"  # the tag of confidence-only NMS on the detection set (no run may take it)
SCORE_BATCH = 256
# Detections the feature standardisation is estimated on: all ~280k of the default world's train images would
# take 580 MB as float64.
STATS_ROWS = 200_000
MIN_WORD_COUNT = 2  # Sec. 4.1: words seen fewer than 2 times in train are "unk"


def run_dir(dataset: str, cache: Any, name: str) -> Path:
    """``<cache>/<dataset>/runs/vlnms/<name>``: where training writes (``name`` plain or ``<dataset>/NAME``)."""
    name = local_run_name(name, "vlnms", dataset)
    if name == CONFIDENCE:
        raise UsageError(f"run name {CONFIDENCE!r} is reserved for confidence-only NMS")
    return dataset_dir(dataset, cache).parent / "runs" / "vlnms" / name


def proposals_path(dataset: str, cache: Any, tag: str, split: str) -> Path:
    """``<cache>/<dataset>/vlnms/<tag>/<split>.h5`` (the ranked boxes for ``refground eval``: ``.jsonl``): the
    shared query-aware proposal set of :func:`refground.grounding.candidates.query_proposals_path`."""
    return query_proposals_path(dataset, cache, tag, split)


# ------------------------------------------------------------------------------------------ data
class DetectionSet(RaggedBoxes):
    """The pre-NMS detections of every image: a :class:`~refground.structures.RaggedBoxes` (image row r owns
    rows ``offsets[r]:offsets[r + 1]``).

    Row fields: boxes float32[P, 4] xyxy pixels; scores float32[P] detector confidence c; labels int64[P] class
    index; features float16[P, D]. Group fields: image_ids int64[I]; image_sizes int64[I, 2] (height, width).
    Also the dataset's objects per image, object_offsets int64[I + 1] and object_boxes float32[O, 4] xyxy
    pixels; obj_iou float32 flat: image r's [K_r, M_r] IoU of its detections with its ground-truth objects at
    ``iou_offsets[r]`` (int64[I + 1]); threshold, the confidence floor the set was stored with.
    """

    image_ids: np.ndarray
    image_sizes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    features: np.ndarray
    object_offsets: np.ndarray
    object_boxes: np.ndarray
    obj_iou: np.ndarray
    iou_offsets: np.ndarray
    threshold: float

    def __init__(self, image_ids: np.ndarray, offsets: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
                 labels: np.ndarray, features: np.ndarray, image_sizes: np.ndarray, object_offsets: np.ndarray,
                 object_boxes: np.ndarray, obj_iou: np.ndarray, iou_offsets: np.ndarray, threshold: float) -> None:
        super().__init__(offsets, boxes, {"scores": scores, "labels": labels, "features": features},
                         {"image_ids": image_ids, "image_sizes": image_sizes})
        self.object_offsets, self.object_boxes = object_offsets, object_boxes
        self.obj_iou, self.iou_offsets, self.threshold = obj_iou, iou_offsets, threshold


def _pair_index(a_off: np.ndarray, b_off: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (a, b) row pairs within each group (a-major): a rows, b rows and the pair offsets per group."""
    ka, kb = np.diff(a_off), np.diff(b_off)
    n = ka * kb
    p_off = offsets_of(n)
    group = np.repeat(np.arange(len(n)), n)
    local = np.arange(int(p_off[-1])) - p_off[group]
    kbg = np.maximum(kb[group], 1)
    return a_off[group] + local // kbg, b_off[group] + local % kbg, p_off


def load_detections(ds: Dataset, features_file: Path) -> DetectionSet:
    """The ``detections/`` group of a features artifact, with each detection's IoU with its image's objects."""
    require(features_file, "refground extract --detections", check_parents=True)
    require_sections(features_file, ("detections",), "VL-NMS")
    with RaggedH5(features_file) as f:
        if not np.array_equal(f.table("images", "ids"), ds.image_ids):
            raise ArtifactError(f"{features_file}: its images differ from the dataset's; run `refground extract --force`")
        raw = RaggedBoxes.read(f, "detections", ("scores", "labels", "features"))
        threshold = float(f.attr("detection_threshold", 0.0) or 0.0)
    offsets, boxes = raw.offsets, raw.boxes.astype(np.float32)
    scores, labels, features = raw.scores.astype(np.float32), raw.labels.astype(np.int64), raw.features
    check_finite(features_file, extract_command(features_file), detections_features=features,
                 detections_boxes=boxes, detections_scores=scores)
    obj_off = ds.image_object_offsets.astype(np.int64)
    obj_boxes = ds.object_boxes.astype(np.float32)
    a, b, iou_off = _pair_index(offsets, obj_off)
    iou = np.zeros(len(a), dtype=np.float32)
    step = 1 << 20
    for s in range(0, len(a), step):
        iou[s:s + step] = elementwise_box_iou(torch.from_numpy(boxes[a[s:s + step]]),
                                              torch.from_numpy(obj_boxes[b[s:s + step]])).numpy()
    sizes = np.stack([ds.image_height, ds.image_width], axis=1).astype(np.int64)
    return DetectionSet(ds.image_ids.astype(np.int64), offsets, boxes, scores, labels, features, sizes, obj_off,
                        obj_boxes, iou, iou_off, threshold)


@dataclass
class VLNMSQueries:
    """Encoded queries with their foreground: ``table`` (words, image rows, referent index) and per query the
    local indices (within its image's objects) of the foreground objects, referent first, flat with
    ``fg_offsets`` int64[Q + 1]."""

    table: QueryTable
    fg_offsets: np.ndarray
    fg_local: np.ndarray

    def __len__(self) -> int:
        return len(self.table)


def encode_vlnms_queries(ds: Dataset, split: str, vocab: Vocabulary, pseudo: dict[int, np.ndarray] | None = None,
                         max_words: int = 40) -> VLNMSQueries:
    """The split's expression queries; foreground = referent + ``pseudo[query_id]`` (context object ids)."""
    table = encode_queries(ds, split, vocab, max_words)
    return VLNMSQueries(table, *query_foreground(ds, table, pseudo))


def query_foreground(ds: Dataset, table: QueryTable, pseudo: dict[int, Any] | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The foreground objects of each query of ``table``: its referent (``targets[n]`` when >= 0), then the
    context object ids ``pseudo[query_id]`` in their order, less any that is the referent (a repeated context
    stays repeated), as local indices within the query's image's objects.

    Returns fg_offsets int64[Q + 1] and fg_local int64[F]. Vectorised over queries and contexts (the pre-change
    loop is ``refground.bench.vlnms_bench._reference_query_foreground``); an unknown context object id is the
    :class:`DataError` of ``Dataset.object_row``.
    """
    nq = len(table)
    targets = np.asarray(table.targets, dtype=np.int64)
    own = np.flatnonzero(targets >= 0)
    ctx_q, ctx_local = np.zeros(0, np.int64), np.zeros(0, np.int64)
    if pseudo and nq:
        keys = np.fromiter(pseudo.keys(), np.int64, len(pseudo))
        lens = np.fromiter(map(len, pseudo.values()), np.int64, len(pseudo))
        # A list value of no ids concatenates as float: ids stay exact below 2^53.
        flat = np.concatenate([np.zeros(0, np.int64), *pseudo.values()])
        key = id_rows(keys, table.query_ids, "query", missing=-1)        # -1: the query has no contexts
        has = np.flatnonzero(key >= 0)
        rows, _ = group_rows(offsets_of(lens), key[has])
        ctx_q = np.repeat(has, lens[key[has]])
        first = ds.image_object_offsets[table.image_rows[ctx_q]].astype(np.int64)
        ctx_local = id_rows(ds.object_ids, flat[rows].astype(np.int64), "object") - first
        keep = (targets[ctx_q] < 0) | (ctx_local != targets[ctx_q])
        ctx_q, ctx_local = ctx_q[keep], ctx_local[keep]
    # Referent first: a stable sort by query keeps the referents (listed first) ahead of their contexts.
    q_of = np.concatenate([own, ctx_q])
    order = np.argsort(q_of, kind="stable")
    local = np.concatenate([targets[own], ctx_local])[order]
    return offsets_of(np.bincount(q_of, minlength=nq)), local.astype(np.int64, copy=False)


@dataclass
class VLNMSBatch:
    """Padded inputs and targets of B queries over their images' detections (K = the batch's largest set).

    words LongTensor[B, T]; features Tensor[B, K, D]; spatial Tensor[B, K, 5]; box_mask BoolTensor[B, K];
    labels Tensor[B, K] (1 where IoU > 0.5 with a foreground box); rho Tensor[B, K] (largest IoU with the
    foreground, 0 without any); targets Tensor[B, K, 4] regression targets towards that box; det_rows
    int64[B, K] rows of the detection set (-1 at padding).
    """

    words: torch.Tensor
    features: torch.Tensor
    spatial: torch.Tensor
    box_mask: torch.Tensor
    labels: torch.Tensor
    rho: torch.Tensor
    targets: torch.Tensor
    det_rows: np.ndarray

    def inputs(self) -> dict[str, torch.Tensor]:
        return {"words": self.words, "features": self.features, "spatial": self.spatial, "box_mask": self.box_mask}


def _gather(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``a[idx]``, or zeros of that shape when ``a`` is empty (images without objects: nothing to match)."""
    return a[idx] if len(a) else np.zeros((*idx.shape, *a.shape[1:]), dtype=a.dtype)


def image_tensors(dets: DetectionSet, image_rows: np.ndarray
                  ) -> tuple[torch.Tensor, np.ndarray, torch.Tensor, np.ndarray, np.ndarray]:
    """The detections of ``image_rows`` padded to the largest set: features Tensor[N, K, D], boxes
    float32[N, K, 4], spatial Tensor[N, K, 5] (:func:`refground.methods.vlnms.model.spatial_vector`), valid bool[N, K]
    and rows int64[N, K] of the detection set (0 at padding)."""
    rows, valid = dets.padded_rows(image_rows)
    feats = dets.features[rows].astype(np.float32) * valid[..., None]
    boxes = dets.boxes[rows] * valid[..., None]
    spatial = spatial_vector(torch.from_numpy(boxes), torch.from_numpy(dets.image_sizes[image_rows][:, None, :]))
    return torch.from_numpy(feats), boxes, spatial.float(), valid, rows


def make_vlnms_batch(queries: VLNMSQueries, dets: DetectionSet, index: np.ndarray,
                     coder_weights: tuple[float, ...] = (10.0, 10.0, 5.0, 5.0)) -> VLNMSBatch:
    """Pad queries ``index`` with their images' detections and compute their training targets (vectorised)."""
    index = np.asarray(index, dtype=np.int64)
    t = queries.table
    img = t.image_rows[index]
    feats, boxes, spatial, valid, rows = image_tensors(dets, img)
    k = valid.shape[1]
    slot = np.arange(k)
    # IoU of each detection with each of its image's objects, padded to [B, K, M].
    m_counts = dets.object_offsets[img + 1] - dets.object_offsets[img]
    m = max(1, int(m_counts.max()) if len(m_counts) else 1)
    mslot = np.arange(m)
    pair_valid = valid[:, :, None] & (mslot[None, None, :] < m_counts[:, None, None])
    iou_rows = dets.iou_offsets[img][:, None, None] + slot[None, :, None] * m_counts[:, None, None] + mslot[None, None, :]
    iou = np.where(pair_valid, _gather(dets.obj_iou, np.where(pair_valid, iou_rows, 0)), 0.0)
    # Foreground objects of each query.
    fg_counts = queries.fg_offsets[index + 1] - queries.fg_offsets[index]
    fg_q = np.repeat(np.arange(len(index)), fg_counts)
    fg_pos = group_rows(queries.fg_offsets, index)[0]
    fg = np.zeros((len(index), m), dtype=bool)
    fg[fg_q, queries.fg_local[fg_pos]] = True
    fg_iou = np.where(fg[:, None, :], iou, -1.0)
    best = fg_iou.argmax(axis=2)
    rho = np.clip(np.take_along_axis(fg_iou, best[..., None], axis=2)[..., 0], 0.0, None) * valid
    gt_boxes = _gather(dets.object_boxes, dets.object_offsets[img][:, None]
                       + np.minimum(best, np.maximum(m_counts[:, None] - 1, 0)))
    targets = regression_targets(torch.from_numpy(boxes.reshape(-1, 4)),
                                 torch.from_numpy(gt_boxes.reshape(-1, 4).astype(np.float32)),
                                 coder_weights).reshape(len(index), k, 4)
    words = t.words[index]
    tw = max(1, int((words != 0).sum(1).max()) if len(words) else 1)
    return VLNMSBatch(torch.from_numpy(words[:, :tw].copy()), feats, spatial,
                      torch.from_numpy(valid), torch.from_numpy((rho > 0.5).astype(np.float32)),
                      torch.from_numpy(rho.astype(np.float32)), targets.float(), np.where(valid, rows, -1))


def bucket_batches(items: np.ndarray, sizes: np.ndarray, batch_size: int, rng: np.random.Generator,
                   pool: int = 16) -> list[np.ndarray]:
    """Shuffled batches of ``items`` whose detection-set ``sizes`` are alike: the items are shuffled, cut into
    pools of ``pool`` batches, sorted by size within a pool, cut into batches, and the batches shuffled. A batch
    costs its largest set times its length, so this halves the padding of random batches on the default world
    while every epoch still sees every item once in a seeded random order."""
    perm = rng.permutation(len(items))
    out: list[np.ndarray] = []
    span = batch_size * pool
    for s in range(0, len(perm), span):
        chunk = perm[s:s + span]
        chunk = chunk[np.argsort(sizes[chunk], kind="stable")]
        out.extend(items[chunk[i:i + batch_size]] for i in range(0, len(chunk), batch_size))
    order = rng.permutation(len(out))
    return [out[i] for i in order]


# ------------------------------------------------------------------------------------- applying
class QueryProposals(RaggedBoxes):
    """The query-aware proposals of a split: a :class:`~refground.structures.RaggedBoxes` of one group per query
    (query n owns rows ``offsets[n]:offsets[n + 1]``, best fused score first).

    Row fields: boxes float32[P, 4] xyxy pixels (refined by the regression head where the run has one);
    det_rows int64[P] rows of the detection set; fused float32[P] = r x c; relatedness float32[P]. Group field:
    query_ids int64[Q]. Also score_seconds and nms_seconds, the time of relatedness scoring and of NMS.
    """

    query_ids: np.ndarray
    det_rows: np.ndarray
    fused: np.ndarray
    relatedness: np.ndarray
    score_seconds: float
    nms_seconds: float

    def __init__(self, query_ids: np.ndarray, offsets: np.ndarray, det_rows: np.ndarray, boxes: np.ndarray,
                 fused: np.ndarray, relatedness: np.ndarray, score_seconds: float, nms_seconds: float) -> None:
        super().__init__(offsets, boxes, {"det_rows": det_rows, "fused": fused, "relatedness": relatedness},
                         {"query_ids": query_ids})
        self.score_seconds, self.nms_seconds = score_seconds, nms_seconds

    def ranked_boxes(self, n: int) -> np.ndarray:
        """float32[K_n, 4]: the proposals of query row ``n``, best first."""
        return self.group(n)


def _check_floor(min_confidence: float) -> None:
    if not 0 <= min_confidence < 1:
        raise UsageError(f"--min-confidence {min_confidence}: must be in [0, 1)")


def score_chunks(order: np.ndarray, image_rows: np.ndarray, batch_size: int) -> list[tuple[int, int]]:
    """Cut ``order`` (queries sorted so that the queries of an image are consecutive; ``image_rows`` their
    images in that order) into ``(start, end)`` chunks of whole images: a chunk ends at the first image
    boundary at least ``batch_size`` queries after its start, or at the end. One search per chunk."""
    n = len(order)
    if n == 0:
        return []
    bounds = np.r_[np.flatnonzero(image_rows[1:] != image_rows[:-1]) + 1, n]    # image ends, increasing
    chunks, s0 = [], 0
    while s0 < n:
        s = int(bounds[min(np.searchsorted(bounds, s0 + max(batch_size, 1)), len(bounds) - 1)])
        chunks.append((s0, s))
        s0 = s
    return chunks


@torch.no_grad()
def relatedness_ragged(model: torch.nn.Module, queries: VLNMSQueries, dets: DetectionSet, index: np.ndarray,
                       batch_size: int = SCORE_BATCH, description: str = "") -> RaggedBoxes:
    """r of every detection of each query's image and, for models with a regression head, the refined boxes
    (else the detection boxes), for the queries ``index`` in that order: a :class:`RaggedBoxes` whose group
    n is query ``index[n]`` over the detections of its image (row j: the image's j-th detection), boxes
    float32[P, 4] and the row field ``relatedness`` float32[P].

    Queries are scored in chunks of whole images (about ``batch_size`` queries, :func:`score_chunks`): the
    image's detections are padded once, and a model with ``encode_boxes`` (VL-NMS-FC) encodes them once for
    all its queries. A chunk's scores and decoded boxes are gathered and written with no loop over queries.
    """
    model.eval()
    weights = tuple(getattr(getattr(model, "config", None), "box_coder_weights", (10.0, 10.0, 5.0, 5.0)))
    t = queries.table
    index = np.asarray(index, dtype=np.int64)
    out_off = offsets_of(dets.counts()[t.image_rows[index]])
    rel_out = np.zeros(int(out_off[-1]), np.float32)
    box_out = np.zeros((int(out_off[-1]), 4), np.float32)
    # Images in order of detection count, so a chunk's padding to its largest set stays small; ``perm`` holds
    # positions in ``index``, which say where a query's rows go.
    size = dets.counts()[t.image_rows[index]]
    perm = np.lexsort((t.image_rows[index], size))
    order = index[perm]
    chunks = score_chunks(order, t.image_rows[order], batch_size)
    for s0, s1 in (track(chunks, total=len(chunks), description=description) if description else chunks):
        chunk = order[s0:s1]
        images, q2u = np.unique(t.image_rows[chunk], return_inverse=True)
        feats, boxes, spatial, valid, rows = image_tensors(dets, images)
        mask = torch.from_numpy(valid)
        words = t.words[chunk]
        words = torch.from_numpy(words[:, :max(1, int((words != 0).sum(1).max()))].copy())
        qi = torch.from_numpy(q2u)
        if hasattr(model, "encode_boxes"):
            enc = model.encode_boxes(feats, mask)
            out = model.score_boxes(words, {k: v[qi] for k, v in enc.items()}, mask[qi])
        else:
            out = model(words, feats[qi], spatial[qi], mask[qi])
        dst = group_rows(out_off, perm[s0:s1])[0]           # the chunk's rows in the output, in chunk order
        rel_out[dst], box_out[dst] = chunk_outputs(out, boxes, valid, q2u, dets.image_sizes[images], weights)
    return RaggedBoxes(out_off, box_out, {"relatedness": rel_out})


def chunk_outputs(out: dict[str, torch.Tensor], boxes: np.ndarray, valid: np.ndarray, q2u: np.ndarray,
                  image_sizes: np.ndarray, weights: tuple[float, ...] = (10.0, 10.0, 5.0, 5.0)
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The rows of one scored chunk of B queries over U images, query after query: relatedness float32[P] and
    boxes float32[P, 4] (P = the queries' detections; the detection boxes, or with ``out["deltas"]`` the
    boxes it refines, clamped to the image).

    out: the model's output (``scores`` Tensor[B, K], optional ``deltas`` Tensor[B, K, 4]); boxes float32[U, K, 4]
    and valid bool[U, K] (a prefix per image) of :func:`image_tensors`; q2u int[B] each query's image;
    image_sizes int64[U, 2] (height, width). One gather and one decode for the chunk (the pre-change loop over
    queries is ``refground.bench.vlnms_bench._reference_chunk_outputs``).
    """
    vq = valid[q2u]                                         # [B, K]: each query's own detections
    rel = out["scores"].detach().numpy()[vq].astype(np.float32)
    det = boxes[q2u][vq]                                    # [P, 4]
    if "deltas" in out:
        hw = np.repeat(image_sizes[q2u], vq.sum(1), axis=0).astype(np.float32)          # [P, 2] (height, width)
        # One thread: elementwise ops over a chunk's ~80k values split over threads above torch's grain size,
        # which stalls for milliseconds on a busy machine (16 ms against 1 ms here); the values do not change.
        with fixed_threads(1):
            box = decode_deltas(torch.from_numpy(out["deltas"].detach().numpy()[vq]), torch.from_numpy(det), weights)
            # clamp with tensor bounds: bitwise the values of the per-query clamp(0, w) / clamp(0, h), NaN and
            # signed zeros included (clamp(min=0) then minimum() is not: it changes the sign of NaNs).
            det = torch.clamp(box, min=torch.zeros_like(box), max=torch.from_numpy(hw[:, [1, 0, 1, 0]])).numpy()
    return rel, det.astype(np.float32, copy=False)


def relatedness_scores(model: torch.nn.Module, queries: VLNMSQueries, dets: DetectionSet, index: np.ndarray,
                       batch_size: int = SCORE_BATCH, description: str = "") -> tuple[list[np.ndarray], list[np.ndarray]]:
    """:func:`relatedness_ragged` as lists in the order of ``index``: r of every detection of each query's
    image (float32[K_q]) and the refined boxes (float32[K_q, 4]; the detection boxes without a regression
    head). Views into the ragged arrays; callers on the hot path use :func:`relatedness_ragged`."""
    if len(index) == 0:
        return [], []
    scored = relatedness_ragged(model, queries, dets, index, batch_size, description)
    cuts = scored.offsets[1:-1]
    return np.split(scored.relatedness, cuts), np.split(scored.boxes, cuts)


def apply_vlnms(model: torch.nn.Module | None, queries: VLNMSQueries, dets: DetectionSet, iou_threshold: float = 0.5,
                top_n: int = 100, class_agnostic: bool = False, description: str = "",
                min_confidence: float = 0.0) -> QueryProposals:
    """Query-aware proposals of every query (``model=None``: confidence-only NMS, r = 1).

    The NMS runs once per image for all its queries (they share the detections: one
    :func:`~refground.boxes.fused_nms` call per image; merging images into one call would make every
    suppression step scan them all); regression-refined boxes replace the kept detections' boxes in the
    output (the suppression itself uses the detector's boxes). ``min_confidence`` is a floor on the detector
    confidence c applied before the NMS, i.e. a detection threshold above the one the pre-NMS set was stored
    with (an image with no detection above it keeps its most confident one, so every query has a proposal).
    The kept indices of all queries are assembled with gathers, no loop over queries or boxes.
    """
    if top_n < 1:
        raise UsageError(f"--top-n {top_n}: must be at least 1")
    _check_floor(min_confidence)
    if not 0 < iou_threshold <= 1:
        raise UsageError(f"--nms-threshold {iou_threshold}: must be in (0, 1]")
    t = queries.table
    nq = len(t)
    t0 = time.perf_counter()
    scored = None
    if model is not None:
        scored = relatedness_ragged(model, queries, dets, np.arange(nq), description=description)
    t1 = time.perf_counter()
    order = np.argsort(t.image_rows, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(t.image_rows[order]) != 0]) if len(order) else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], len(order)]
    set_sizes = dets.counts()[t.image_rows]
    # fused_nms keeps at most min(top_n, K) boxes: the columns past the largest set are -1 for every query.
    picks = np.full((nq, min(top_n, int(set_sizes.max()) if nq else 0)), -1, dtype=np.int64)
    for s, e in zip(starts.tolist(), ends.tolist()):
        qs = order[s:e]
        r = int(t.image_rows[qs[0]])
        sl = dets.rows(r)
        conf = dets.scores[sl]
        sub = np.flatnonzero(conf >= min_confidence)
        if len(sub) == 0 and len(conf):
            sub = np.array([int(conf.argmax())])
        rel_q = np.ones((len(qs), len(sub)), np.float32) if scored is None else \
            scored.relatedness[scored.offsets[qs][:, None] + sub[None, :]]
        keep = fused_nms(torch.from_numpy(dets.boxes[sl][sub]), torch.from_numpy(conf[sub]),
                         torch.from_numpy(rel_q), torch.from_numpy(dets.labels[sl][sub]), iou_threshold, top_n,
                         class_agnostic).numpy()
        keep = np.where(keep >= 0, sub[np.maximum(keep, 0)] if len(sub) else -1, -1)
        picks[qs] = keep[:, :picks.shape[1]]
    t2 = time.perf_counter()
    return QueryProposals(t.query_ids.copy(), *kept_proposals(picks, t.image_rows, dets, scored), t1 - t0, t2 - t1)


def kept_proposals(picks: np.ndarray, image_rows: np.ndarray, dets: DetectionSet, scored: RaggedBoxes | None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The proposals of Q queries from their NMS picks, with gathers (the pre-change loop over every kept
    box is ``refground.bench.vlnms_bench._reference_kept_proposals``).

    picks int64[Q, W]: per query the kept detections (indices within its image's set, best first, -1 after
    the last); image_rows int[Q]; scored: :func:`relatedness_ragged` of the Q queries (None: r = 1 and the
    detection boxes). Returns offsets int64[Q + 1], det_rows int64[P], boxes float32[P, 4], fused float32[P]
    (r x c) and relatedness float32[P].
    """
    kept = picks >= 0                                   # a prefix of each row: row-major order is rank order
    counts = kept.sum(1).astype(np.int64)
    local = picks[kept].astype(np.int64, copy=False)
    q_of = np.repeat(np.arange(len(picks)), counts)
    det_rows = dets.offsets[image_rows[q_of]] + local
    if scored is None:
        rel = np.ones(len(local), dtype=np.float32)
        boxes = dets.boxes[det_rows].astype(np.float32).reshape(-1, 4)
    else:
        at = scored.offsets[q_of] + local
        rel = scored.relatedness[at].astype(np.float32)
        boxes = scored.boxes[at].astype(np.float32).reshape(-1, 4)
    fused = (rel * dets.scores[det_rows]).astype(np.float32)
    return offsets_of(counts), det_rows, boxes, fused, rel


def recall_of(props: QueryProposals, queries: VLNMSQueries, ds: Dataset, ns: tuple[int, ...] = RECALL_NS
              ) -> dict[str, float]:
    """Referent and (recorded) context-object recall@N of ``props`` (the design's proposal recall)."""
    return ranked_recall(ds, queries.table.query_ids, [props.ranked_boxes(n) for n in range(len(queries))], ns)


def ranked_recall(ds: Dataset, query_ids: np.ndarray, ranked: list[np.ndarray], ns: tuple[int, ...] = RECALL_NS
                  ) -> dict[str, float]:
    """``recall@N`` of the referents and ``context_recall@N`` of the queries' recorded context objects, with
    ``ranked[n]`` float[K_n, 4] the ranked boxes of query ``query_ids[n]``."""
    ref_t, ctx_t = [], []
    for qid in query_ids.tolist():
        q = ds.query(int(qid))
        ref_t.append(ds.object_boxes[[ds.object_row(q.referent_object_id)]])
        ctx = list(dict.fromkeys(o for mm in q.mentions if mm.role == "context" for o in mm.object_ids))
        ctx_t.append(ds.object_boxes[[ds.object_row(o) for o in ctx]].reshape(-1, 4))
    out: dict[str, float] = {}
    for prefix, targets in (("recall", ref_t), ("context_recall", ctx_t)):
        ranks = proposal_hit_ranks(ranked, targets, IOU_THRESHOLD, max(ns))
        flat = np.concatenate(ranks) if ranks else np.zeros(0, np.int64)
        out.update({f"{prefix}@{n}": float(v) for n, v in recall_from_ranks(flat, ns).items()})
    return out


# -------------------------------------------------------------------------------------- training
def load_vlnms_run(path: Path) -> LoadedRun:
    """Load a complete VL-NMS run folder (a missing or interrupted one is a one-line ArtifactError)."""
    return load_run_folder(path, "vlnms", VLNMSConfig.from_dict, build_relatedness)


def _pseudo(dataset: str, cache: Any, use: bool) -> tuple[dict[int, np.ndarray] | None, dict[str, Any]]:
    if not use:
        return None, {}
    from refground.methods.vlnms.pseudo import load_pseudo_vlnms, pseudo_path

    path = pseudo_path(dataset, cache)
    require(path, "refground pseudo vlnms", check_parents=True)
    return load_pseudo_vlnms(path), {"pseudo": parent("artifact", path)}


def train_vlnms(dataset: str, cache: Any = None, name: str = "fc-bce", config: VLNMSConfig | None = None,
                features: str = "detector-default", pseudo: bool = True, seed: int = 0, resume: bool = True,
                force: bool = False, nms_threshold: float = 0.5) -> dict[str, Any]:
    """Train the relatedness module on the train split's queries over their images' pre-NMS detections.

    Foreground: the referent plus, with ``pseudo``, the pseudo contextual objects of ``refground pseudo
    vlnms`` (Table 4 compares both). Keeps the epoch with the best val referent recall@10 of the fused-score
    NMS (threshold ``nms_threshold``). Skips a complete run with the same fingerprint unless ``force``;
    resumes an interrupted one. Returns the summary (``run``, ``cache_hit``, ``best_epoch``, ``metrics``...).
    """
    t_start = time.perf_counter()
    config = config or VLNMSConfig()
    ds_dir = dataset_dir(dataset, cache)
    f_path = features_path(dataset, cache, features)
    pseudo_map, pseudo_parent = _pseudo(dataset, cache, pseudo)
    require_sections(f_path, ("detections",), "`refground train vlnms`")  # before any loading
    require(f_path, "refground extract --detections", check_parents=True)
    out = run_dir(dataset, cache, name)
    params = {"config": config_params(config.to_dict()),
              "seed": int(seed), "features": features, "pseudo": bool(pseudo), "nms_threshold": float(nms_threshold),
              "train_split": "train", "select_split": "val"}
    spec = RunSpec(out, STEP, params, {"dataset": parent("dataset", ds_dir), "features": parent("artifact", f_path),
                                       **pseudo_parent}, kind="runs/vlnms")
    with spec.lock():  # one writer per run folder, from the cache-hit check to the complete manifest
        result = spec.start(name, force, t_start)
        if result["cache_hit"]:
            return result
        ds = load_dataset(ds_dir)
        dets = load_detections(ds, f_path)
        vocab = Vocabulary.of_split(ds, "train", MIN_WORD_COUNT)
        train_q = encode_vlnms_queries(ds, "train", vocab, pseudo_map, config.max_words)
        val_q = encode_vlnms_queries(ds, "val", vocab, None, config.max_words)
        usable = single_referent_rows(train_q.table, dataset)
        config.vocab_size, config.visual_dim = len(vocab), dets.feature_dim
        state = spec.begin(config.to_dict(), vocab, resume, force)

        torch.manual_seed(seed)
        model = build_relatedness(config)
        model.set_feature_stats(*feature_stats(dets, np.unique(train_q.table.image_rows), STATS_ROWS))
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)

        set_sizes = dets.counts()[train_q.table.image_rows]

        def batches(rng: np.random.Generator) -> list[np.ndarray]:
            return bucket_batches(usable, set_sizes[usable], config.batch_size, rng)

        def train_step(rows: np.ndarray, gen: torch.Generator) -> tuple[torch.Tensor, int]:
            model.train()
            b = make_vlnms_batch(train_q, dets, rows, config.box_coder_weights)
            out_ = model(**b.inputs())
            return vlnms_loss(out_, b.labels, b.rho, b.targets, b.box_mask, config)["loss"], len(rows)

        def evaluate() -> dict[str, Any]:
            props = apply_vlnms(model, val_q, dets, nms_threshold, top_n=max(RECALL_NS))
            return {f"val_{k}": round(v, 5) for k, v in recall_of(props, val_q, ds).items()}

        fr = fit(model, optimizer, spec, epochs=config.epochs, seed=seed, batches=batches, train_step=train_step,
                 evaluate=evaluate, select="val_recall@10", lr_at=step_decay(config.lr, config.lr_decay_epochs), state=state,
                 description=f"train vlnms ({config.variant}, {config.loss})")
        metrics = {"split": "val", "best_epoch": fr.best_epoch, **best_epoch_figures(fr)}
        result.update(spec.finish(fr, config.epochs, len(usable), metrics), seconds=round(time.perf_counter() - t_start, 3))
        return result


# ------------------------------------------------------------------------------ proposals files
def write_proposals(path: Path, props: QueryProposals, dets: DetectionSet, attrs: dict[str, Any]) -> None:
    """The HDF5 proposal set (:data:`PROPOSALS_FORMAT`) and ``<stem>.jsonl`` ranked boxes beside it::

        queries/ids int64[Q]; proposals/offsets int64[Q + 1]; proposals/boxes float32[P, 4],
        scores float32[P] (fused r x c), relatedness float32[P], confidence float32[P], labels int32[P],
        features float16[P, D], detection_rows int64[P]; attrs format, version, top_n, nms_threshold, ...
    """
    from refground.eval.predictions import write_predictions

    rows = props.det_rows
    chunk = {"queries.ids": props.query_ids.astype(np.int64), "proposals.counts": props.counts(),
             "proposals.boxes": props.boxes.astype(np.float32), "proposals.scores": props.fused.astype(np.float32),
             "proposals.relatedness": props.relatedness.astype(np.float32),
             "proposals.confidence": dets.scores[rows].astype(np.float32),
             "proposals.labels": dets.labels[rows].astype(np.int32),
             "proposals.features": dets.features[rows].astype(np.float16),
             "proposals.detection_rows": rows.astype(np.int64)}
    write_h5(path, [chunk], {"format": PROPOSALS_FORMAT, "version": FORMAT_VERSION, **attrs})
    lines = []
    for n, qid in enumerate(props.query_ids.tolist()):
        boxes = props.ranked_boxes(n)
        if len(boxes):
            lines.append({"query_id": int(qid), "boxes": boxes.tolist(),
                          "scores": props.group(n, "fused").tolist()})
    write_predictions(path.with_suffix(".jsonl"), lines)


def run_vlnms(dataset: str, cache: Any = None, run: str | None = None, splits: tuple[str, ...] = ("val", "testA", "testB"),
              top_n: int = 100, nms_threshold: float = 0.5, class_agnostic: bool = False,
              features: str | None = None, force: bool = False, min_confidence: float = 0.0
              ) -> list[dict[str, Any]]:
    """Write (or find current) the query-aware proposals of each split: with ``run`` a trained VL-NMS run,
    without it confidence-only NMS on the same detections. Returns per split ``{"path", "status", "recall@N"...,
    "ms_per_image"...}``.

    ``run`` may be another dataset's (``DATASET/NAME``) or a run folder: applied as trained to this dataset's
    detections of the same extractor, its proposal set is tagged ``DATASET.NAME`` (:attr:`RunRef.tag`)."""
    _check_floor(min_confidence)
    ds_dir = dataset_dir(dataset, cache)
    parents: dict[str, Any] = {"dataset": parent("dataset", ds_dir)}
    rpath, timing_extra = None, {}
    if run is not None:
        from refground.grounding.transfer import features_for_run

        ref = resolve_run(run, "vlnms", dataset, cache)
        if ref.local and ref.name == CONFIDENCE:
            raise UsageError(f"run name {CONFIDENCE!r} is reserved for confidence-only NMS")
        rpath = ref.path
        m = complete_run(rpath, "vlnms")
        if ref.local or "features" not in m.parents:
            features = features or m.params.get("features", "detector-default")
        else:
            features = features_for_run(Path(m.parents["features"].path), ds_dir.parent, dataset, features,
                                        ("detections",))
        parents["run"] = parent("file", rpath / MODEL_FILE)
        tag = ref.tag
        timing_extra = {"run_origin": ref.origin(m.fingerprint)}
    else:
        features = features or "detector-default"
        tag = CONFIDENCE
    f_path = features_path(dataset, cache, features)
    require(f_path, "refground extract --detections", check_parents=True)
    require_sections(f_path, ("detections",), "`refground vlnms`")
    parents["features"] = parent("artifact", f_path)
    parent_fps = parent_fingerprints(parents)
    params = {"top_n": int(top_n), "nms_threshold": float(nms_threshold), "class_agnostic": bool(class_agnostic)}
    if min_confidence:  # recorded only when set, so proposals written before the option stay current
        params["min_confidence"] = float(min_confidence)
    # Each proposal set is written by one process at a time: its lock is held from its cache-hit check to its
    # manifest (a second `refground vlnms` of the same tag and split is refused, not raced).
    with contextlib.ExitStack() as locks:
        return _run_vlnms_locked(locks, dataset, cache, (rpath, timing_extra), splits, tag, params, parents, parent_fps, ds_dir,
                                 f_path, top_n, nms_threshold, class_agnostic, min_confidence, force)


def _run_vlnms_locked(locks: contextlib.ExitStack, dataset: str, cache: Any, run_of: tuple[Path | None, dict],
                      splits: tuple[str, ...], tag: str, params: dict[str, Any], parents: dict[str, Any],
                      parent_fps: dict[str, str], ds_dir: Path, f_path: Path, top_n: int, nms_threshold: float,
                      class_agnostic: bool, min_confidence: float, force: bool) -> list[dict[str, Any]]:
    """:func:`run_vlnms` once its inputs are checked; takes each proposal set's lock into ``locks`` before
    looking at it. ``run_of``: the run folder (None: confidence-only NMS) and what its manifests record of it."""
    run, origin = run_of
    from refground.cache.lock import artifact_lock

    results, todo = [], []
    for split in splits:
        path = proposals_path(dataset, cache, tag, split)
        locks.enter_context(artifact_lock(path))
        fp = make_fingerprint(APPLY_STEP, {**params, "split": split}, parent_fps)
        res = {"split": split, "tag": tag, "path": str(path), "status": "hit"}
        results.append(res)
        hit = current_extra(path, fp, force)
        if hit is None:
            todo.append((res, path, split, fp))
        else:
            res.update(hit)
    if not todo:
        return results
    ds = load_dataset(ds_dir)
    dets = load_detections(ds, f_path)
    loaded = load_vlnms_run(run) if run is not None else None
    if loaded is not None:
        from refground.grounding.transfer import check_feature_width

        check_feature_width(loaded.config.visual_dim, dets.feature_dim, f_path, run)
    vocab = loaded.vocab if loaded else Vocabulary.build([])  # confidence-only NMS reads no words
    max_words = loaded.config.max_words if loaded else 40
    for res, path, split, fp in todo:
        queries = encode_vlnms_queries(ds, split, vocab, None, max_words)
        props = apply_vlnms(loaded.model if loaded else None, queries, dets, nms_threshold, top_n, class_agnostic,
                            description=f"vlnms {tag} {split}", min_confidence=min_confidence)
        figures = recall_of(props, queries, ds)
        images = len(np.unique(queries.table.image_rows))
        timing = {"images": images, "queries": len(queries), "score_seconds": round(props.score_seconds, 3),
                  "nms_seconds": round(props.nms_seconds, 3),
                  "ms_per_image": round(1000 * (props.score_seconds + props.nms_seconds) / max(1, images), 3),
                  "threads": torch.get_num_threads()}
        write_proposals(path, props, dets, {**params, "split": split, "tag": tag})
        write_manifest(path, step=APPLY_STEP, params={**params, "split": split}, parents=parents, fingerprint=fp,
                       kind="vlnms", extra={**figures, **timing, **origin})
        res.update(status="written", **figures, **timing, **origin)
    return results
