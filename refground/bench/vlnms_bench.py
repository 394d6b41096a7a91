"""Benchmarks of VL-NMS (:mod:`refground.methods.vlnms.model`, :mod:`refground.methods.vlnms.run`).

- ``vlnms_nms``: :func:`fused_nms` for the 7 queries of one image over 81 pre-NMS detections (the default
  world's means), top 100 each, against a baseline of one ``refground.boxes.batched_nms`` per query; both
  must keep the same boxes (else RuntimeError).
- ``vlnms_score``: relatedness of every detection for all the queries of an image with VL-NMS-FC at its
  default size, scored the way ``refground vlnms`` does (the image's boxes encoded once, the queries of 64
  images per forward) against one query per forward; both must give the same scores (else RuntimeError).
- ``vlnms_loops``: each step that issue 16 vectorised (VL-NMS's foreground building, batch foreground rows,
  chunk scores and box decoding, proposal assembly, confidence-only VL-NMS end to end; the candidates' graph
  blocks and query image rows) against its pre-change loop, kept here as ``_reference_*`` (the tests'
  references too), on a world shaped like the default train split; every pair must agree bitwise.

Inputs are random, shaped like the default world (clustered boxes in a 480 x 640 image, 8 classes, 256-d
features, 6-18 words of a 63-word vocabulary), so the benchmarks run anywhere.
"""

from __future__ import annotations

import numpy as np
import torch

from refground.bench import BenchResult, best_time, register
from refground.boxes import batched_nms

IMAGE_SIZE = (480, 640)
QUERIES_PER_IMAGE = 7
DETECTIONS = 81


def _detections(rng: np.random.Generator, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k boxes around k // 6 object centres (duplicates overlap, as before NMS), confidences and 8 classes."""
    centres = rng.uniform([60, 60], [580, 420], size=(max(1, k // 6), 2))
    pick = rng.integers(0, len(centres), size=k)
    wh = rng.uniform(20, 90, size=(len(centres), 2))[pick] * rng.uniform(0.8, 1.25, size=(k, 2))
    c = centres[pick] + rng.normal(0, 6, size=(k, 2))
    boxes = np.concatenate([c - wh / 2, c + wh / 2], axis=1).clip(0, [640, 480, 640, 480])
    return (torch.from_numpy(boxes.astype(np.float32)), torch.from_numpy(rng.uniform(0.05, 1, k).astype(np.float32)),
            torch.from_numpy((pick % 8).astype(np.int64)))


@register("vlnms_nms")
def bench_vlnms_nms(quick: bool, seed: int) -> list[BenchResult]:
    from refground.boxes import fused_nms

    rng = np.random.default_rng(seed)
    boxes, conf, labels = _detections(rng, DETECTIONS)
    rel = torch.from_numpy(rng.uniform(0, 1, (QUERIES_PER_IMAGE, DETECTIONS)).astype(np.float32))

    def ours() -> torch.Tensor:
        return fused_nms(boxes, conf, rel, labels, 0.5, 100)

    def loop() -> list[torch.Tensor]:
        return [batched_nms(boxes, rel[q] * conf, labels, 0.5)[:100] for q in range(QUERIES_PER_IMAGE)]

    a, b = ours(), loop()
    for q in range(QUERIES_PER_IMAGE):
        if not torch.equal(a[q][a[q] >= 0], b[q]):
            raise RuntimeError("fused_nms keeps other boxes than per-query batched_nms")
    repeat = 2 if quick else 5
    t_ours, t_loop = best_time(ours, repeat), best_time(loop, repeat)
    return [BenchResult("vlnms_nms", t_ours * 1000, "ms/image", t_loop * 1000, t_loop / t_ours,
                        f"{QUERIES_PER_IMAGE} queries x {DETECTIONS} detections, top 100, per-class IoU 0.5; "
                        "baseline: batched_nms per query")]


@register("vlnms_score")
def bench_vlnms_score(quick: bool, seed: int) -> list[BenchResult]:
    from refground.methods.vlnms.model import VLNMSConfig, build_relatedness
    from refground.methods.vlnms.run import (DetectionSet, VLNMSQueries, make_vlnms_batch, relatedness_scores)
    from refground.grounding.queries import QueryTable

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    images = 8 if quick else 64
    counts = np.clip(rng.poisson(DETECTIONS, images), 16, 166)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    parts = [_detections(rng, int(k)) for k in counts]
    boxes = torch.cat([p[0] for p in parts]).numpy()
    n = int(offsets[-1])
    obj_off = np.zeros(images + 1, np.int64)
    dets = DetectionSet(np.arange(images), offsets, boxes, torch.cat([p[1] for p in parts]).numpy(),
                        torch.cat([p[2] for p in parts]).numpy(),
                        rng.standard_normal((n, 256)).astype(np.float16),
                        np.tile(np.array(IMAGE_SIZE, np.int64), (images, 1)), obj_off, np.zeros((0, 4), np.float32),
                        np.zeros(0, np.float32), np.zeros(images + 1, np.int64), 0.05)
    nq = images * QUERIES_PER_IMAGE
    lengths = rng.integers(6, 19, nq)
    words = rng.integers(1, 63, (nq, 18))
    words[np.arange(18)[None, :] >= lengths[:, None]] = 0
    table = QueryTable(np.arange(nq), np.repeat(np.arange(images), QUERIES_PER_IMAGE), words.astype(np.int64),
                       np.full(nq, -1), ["synthetic"] * nq)
    queries = VLNMSQueries(table, np.zeros(nq + 1, np.int64), np.zeros(0, np.int64))
    model = build_relatedness(VLNMSConfig(vocab_size=63)).eval()
    index = np.arange(nq)
    single = index[: (QUERIES_PER_IMAGE * 2 if quick else QUERIES_PER_IMAGE * 8)]

    def ours() -> list[np.ndarray]:
        return relatedness_scores(model, queries, dets, index)[0]

    def one_by_one() -> list[np.ndarray]:
        with torch.no_grad():
            out = []
            for i in single:
                b = make_vlnms_batch(queries, dets, np.array([i]))
                out.append(model(**b.inputs())["scores"][0].numpy())
            return out

    a, b = ours(), one_by_one()
    for i in range(len(single)):
        if not np.allclose(a[i], b[i], atol=1e-5):
            raise RuntimeError("grouped relatedness scores differ from one query per forward")
    t_ours = best_time(ours, 2 if quick else 3) / images
    t_single = best_time(one_by_one, 2 if quick else 3) / (len(single) / QUERIES_PER_IMAGE)
    return [BenchResult("vlnms_score", t_ours * 1000, "ms/image", t_single * 1000, t_single / t_ours,
                        f"VL-NMS-FC default size, {QUERIES_PER_IMAGE} queries x ~{DETECTIONS} detections per image; "
                        f"baseline: one query per forward; {torch.get_num_threads()} threads")]


# ------------------------------------------------------------------------------------------------------------
# The loops over queries and boxes that issue 16 removed from VL-NMS's per-batch paths and the candidate
# loading: each pre-change implementation, kept as the slow reference the tests compare with (bit for bit) and
# the baseline of the ``vlnms_loops`` benchmark.

def _reference_query_foreground(ds, table, pseudo):
    """Pre-change :func:`refground.methods.vlnms.run.query_foreground`: a loop over queries."""
    from refground.structures import offsets_of

    fg: list[np.ndarray] = []
    for n, qid in enumerate(table.query_ids.tolist()):
        first = int(ds.image_object_offsets[table.image_rows[n]])
        own = [int(table.targets[n])] if table.targets[n] >= 0 else []
        ctx = [] if pseudo is None else [ds.object_row(int(o)) - first for o in pseudo.get(qid, ())]
        fg.append(np.array(own + [c for c in ctx if c not in own], dtype=np.int64))
    counts = np.array([len(x) for x in fg], dtype=np.int64)
    return offsets_of(counts), (np.concatenate(fg) if fg else np.zeros(0, np.int64))


def _reference_fg_rows(fg_offsets, index):
    """Pre-change foreground rows of a batch in ``make_vlnms_batch``: one arange per query."""
    return np.concatenate([np.arange(fg_offsets[i], fg_offsets[i + 1]) for i in index]) \
        if len(index) else np.zeros(0, np.int64)


def _reference_score_chunks(order, image_rows, batch_size):
    """Pre-change chunking of ``relatedness_scores``: a loop over image boundaries."""
    new_image = np.r_[True, image_rows[1:] != image_rows[:-1]] if len(image_rows) else np.zeros(0, bool)
    starts = np.flatnonzero(new_image)
    chunks, s0 = [], 0
    for s in starts.tolist()[1:] + [len(order)]:
        if s - s0 >= batch_size or s == len(order):
            chunks.append((s0, s))
            s0 = s
    return chunks


def _reference_chunk_outputs(out, boxes, valid, q2u, image_sizes, weights=(10.0, 10.0, 5.0, 5.0)):
    """Pre-change body of ``relatedness_scores`` for one chunk: per query, its scores and its boxes decoded and
    clamped on their own (lists, query by query)."""
    from refground.methods.vlnms.model import decode_deltas

    rel, refined = [], []
    for n in range(len(q2u)):
        u = int(q2u[n])
        k = int(valid[u].sum())
        rel.append(out["scores"][n, :k].numpy().astype(np.float32))
        det = boxes[u, :k]
        if "deltas" in out:
            h, w = image_sizes[u]
            box = decode_deltas(out["deltas"][n, :k], torch.from_numpy(det), weights)
            box[:, 0::2] = box[:, 0::2].clamp(0, float(w))
            box[:, 1::2] = box[:, 1::2].clamp(0, float(h))
            refined.append(box.numpy().astype(np.float32))
        else:
            refined.append(det)
    return rel, refined


@torch.no_grad()
def _reference_relatedness_scores(model, queries, dets, index, batch_size=256):
    """Pre-change ``relatedness_scores`` (lists of per-query arrays, in the order of ``index``)."""
    from refground.methods.vlnms.run import image_tensors

    model.eval()
    weights = tuple(getattr(getattr(model, "config", None), "box_coder_weights", (10.0, 10.0, 5.0, 5.0)))
    t = queries.table
    index = np.asarray(index, dtype=np.int64)
    if len(index) == 0:
        return [], []
    size = dets.counts()[t.image_rows[index]]
    order = index[np.lexsort((t.image_rows[index], size))]
    rel: dict[int, np.ndarray] = {}
    refined: dict[int, np.ndarray] = {}
    for s0, s1 in _reference_score_chunks(order, t.image_rows[order], batch_size):
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
        r_list, b_list = _reference_chunk_outputs(out, boxes, valid, q2u, dets.image_sizes[images], weights)
        for n, q in enumerate(chunk.tolist()):
            rel[q], refined[q] = r_list[n], b_list[n]
    return [rel[i] for i in index.tolist()], [refined[i] for i in index.tolist()]


def _reference_kept_proposals(picks, image_rows, dets, rel, refined):
    """Pre-change assembly of ``apply_vlnms``: ``picks`` a list of per-query kept indices, ``rel`` / ``refined``
    lists of per-query arrays; one Python step per kept box."""
    from refground.structures import offsets_of

    counts = np.array([len(p) for p in picks], dtype=np.int64)
    offsets = offsets_of(counts)
    local = np.concatenate(picks) if len(picks) else np.zeros(0, np.int64)
    q_of = np.repeat(np.arange(len(picks)), counts)
    det_rows = dets.offsets[image_rows[q_of]] + local
    rel_kept = np.array([rel[q][i] for q, i in zip(q_of.tolist(), local.tolist())], dtype=np.float32)
    boxes = np.array([refined[q][i] for q, i in zip(q_of.tolist(), local.tolist())], dtype=np.float32).reshape(-1, 4)
    fused = rel_kept * dets.scores[det_rows]
    return offsets, det_rows, boxes, fused.astype(np.float32), rel_kept


def _reference_apply_vlnms(model, queries, dets, iou_threshold=0.5, top_n=100, class_agnostic=False,
                           min_confidence=0.0):
    """Pre-change ``apply_vlnms`` (per-query lists, a loop over the queries of each image, a loop per kept box)."""
    from refground.boxes import fused_nms
    from refground.methods.vlnms.run import QueryProposals

    t = queries.table
    if model is not None:
        rel, refined = _reference_relatedness_scores(model, queries, dets, np.arange(len(t)))
    else:
        rel = [np.ones(int(k), np.float32) for k in dets.counts()[t.image_rows]]
        refined = [dets.boxes[dets.rows(int(r))] for r in t.image_rows]
    order = np.argsort(t.image_rows, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(t.image_rows[order]) != 0]) if len(order) else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], len(order)]
    picks: list[np.ndarray] = [np.zeros(0, np.int64)] * len(t)
    for s, e in zip(starts.tolist(), ends.tolist()):
        qs = order[s:e]
        r = int(t.image_rows[qs[0]])
        sl = dets.rows(r)
        conf = dets.scores[sl]
        sub = np.flatnonzero(conf >= min_confidence)
        if len(sub) == 0 and len(conf):
            sub = np.array([int(conf.argmax())])
        rel_q = np.stack([rel[q] for q in qs])[:, sub] if len(qs) else np.zeros((0, len(sub)), np.float32)
        keep = fused_nms(torch.from_numpy(dets.boxes[sl][sub]), torch.from_numpy(conf[sub]),
                         torch.from_numpy(rel_q), torch.from_numpy(dets.labels[sl][sub]), iou_threshold, top_n,
                         class_agnostic).numpy()
        keep = np.where(keep >= 0, sub[np.maximum(keep, 0)] if len(sub) else -1, -1)
        for j, q in enumerate(qs.tolist()):
            picks[q] = keep[j][keep[j] >= 0]
    parts = _reference_kept_proposals(picks, t.image_rows, dets, rel, refined)
    return QueryProposals(t.query_ids.copy(), *parts, 0.0, 0.0)


def _reference_sub_relations(flat, offsets, counts, keep):
    """Pre-change ``grounding.candidates._sub_relations``: a loop over images."""
    from refground.structures import offsets_of

    parts, lens = [], []
    for r in range(len(counts)):
        k, n = int(counts[r]), int(keep[r])
        m = flat[offsets[r]:offsets[r] + k * k].reshape(k, k)
        parts.append(m[:n, :n].reshape(-1))
        lens.append(n * n)
    return (np.concatenate(parts) if parts else np.zeros(0, np.uint8)), offsets_of(lens)


def _reference_query_image_rows(ds, qids):
    """Pre-change image rows of query groups in ``load_query_candidates``: two id lookups per query."""
    return np.array([ds.image_row(int(ds.query_image_ids[ds.query_row(int(q))])) for q in qids], dtype=np.int64)


def _reference_load_query_candidates(ds, proposals_file, top_n=10):
    """Pre-change ``grounding.candidates.load_query_candidates`` (without the manifest check)."""
    from refground.cache import RaggedH5
    from refground.graph import spatial_relations_many
    from refground.grounding.candidates import CandidateSet, _spatial
    from refground.structures import RaggedBoxes

    with RaggedH5(proposals_file) as f:
        qids = f.table("queries", "ids").astype(np.int64)
        top = RaggedBoxes.read(f, "proposals", ("features",)).top(top_n)
    offsets = top.offsets
    boxes = top.boxes.astype(np.float32)
    features = top.features.astype(np.float32)
    image_rows = _reference_query_image_rows(ds, qids)
    sizes = np.stack([ds.image_height, ds.image_width], axis=1).astype(np.int64)[image_rows]
    group_boxes = [boxes[offsets[g]:offsets[g + 1]] for g in range(len(qids))]
    relations, rel_offsets = spatial_relations_many(group_boxes, [tuple(x) for x in sizes.tolist()])
    of_row = np.repeat(np.arange(len(qids)), np.diff(offsets))
    spatial = _spatial(boxes, sizes[of_row]) if len(boxes) else np.zeros((0, 5), np.float32)
    cands = CandidateSet("vlnms", ds.image_ids[image_rows].astype(np.int64), offsets, boxes, features, spatial,
                         np.full(len(boxes), -1, dtype=np.int64), relations, rel_offsets.astype(np.int64), sizes)
    return cands, qids


# ------------------------------------------------------------------------------ inputs like the default world
TRAIN_QUERIES, TRAIN_IMAGES, OBJECTS_PER_IMAGE, PROPOSALS = 36_000, 3_500, 10, 100


def world_dataset(images: int, queries: int, rng: np.random.Generator, objects: int = OBJECTS_PER_IMAGE):
    """A :class:`~refground.data.model.Dataset` with only the id columns the lookups read (shuffled ids, so no
    lookup can lean on their order): ``objects`` objects per image, ``queries`` queries on random images."""
    from refground.data.model import Dataset

    image_ids = rng.permutation(images * 3)[:images].astype(np.int64) + 1
    object_ids = rng.permutation(images * objects * 2)[:images * objects].astype(np.int64) + 1
    query_ids = rng.permutation(queries * 2)[:queries].astype(np.int64) + 1
    image_rows = np.sort(rng.integers(0, images, queries))
    cols = {"image_ids": image_ids, "object_ids": object_ids, "query_ids": query_ids,
            "image_object_offsets": np.arange(images + 1, dtype=np.int64) * objects,
            "query_image_ids": image_ids[image_rows],
            "image_height": np.full(images, IMAGE_SIZE[0], np.int32),
            "image_width": np.full(images, IMAGE_SIZE[1], np.int32)}
    return Dataset("bench", [], {}, cols), image_rows


def world_foreground_inputs(images: int, queries: int, seed: int):
    """Dataset, QueryTable and pseudo contexts (0-3 objects of the query's image, the referent sometimes
    among them) shaped like the default world's train split."""
    from refground.grounding.queries import QueryTable

    rng = np.random.default_rng(seed)
    ds, image_rows = world_dataset(images, queries, rng)
    targets = np.where(rng.random(queries) < 0.05, -1, rng.integers(0, OBJECTS_PER_IMAGE, queries))
    table = QueryTable(ds.query_ids.copy(), image_rows, np.ones((queries, 1), np.int64), targets.astype(np.int64),
                       ["synthetic"] * queries)
    n_ctx = rng.integers(0, 4, queries)
    flat = ds.object_ids[np.repeat(image_rows * OBJECTS_PER_IMAGE, n_ctx) + rng.integers(0, OBJECTS_PER_IMAGE, n_ctx.sum())]
    cuts = np.cumsum(n_ctx)[:-1]
    has = rng.random(queries) < 0.9                                     # some queries have no entry at all
    pseudo = {int(q): c for q, c, h in zip(ds.query_ids.tolist(), np.split(flat, cuts), has.tolist()) if h}
    return ds, table, pseudo


def world_detection_set(images: int, rng: np.random.Generator):
    """A :class:`~refground.methods.vlnms.run.DetectionSet` of random detections (~81 per image, 1-d features)."""
    from refground.methods.vlnms.run import DetectionSet

    counts = np.clip(rng.poisson(DETECTIONS, images), 16, 166)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n = int(offsets[-1])
    xy = rng.uniform(0, 560, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10, 80, (n, 2))], 1).astype(np.float32)
    return DetectionSet(np.arange(images, dtype=np.int64), offsets, boxes, rng.uniform(0.05, 1, n).astype(np.float32),
                        rng.integers(0, 8, n).astype(np.int64), np.zeros((n, 1), np.float16),
                        np.tile(np.array(IMAGE_SIZE, np.int64), (images, 1)), np.zeros(images + 1, np.int64),
                        np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(images + 1, np.int64), 0.05)


def _same(name: str, a, b) -> None:
    """RuntimeError unless the arrays (or tuples/lists of arrays) are bitwise equal with the same dtypes."""
    if isinstance(a, (tuple, list)):
        if len(a) != len(b):
            raise RuntimeError(f"{name}: {len(a)} outputs against {len(b)} of the pre-change code")
        for x, y in zip(a, b):
            _same(name, x, y)
        return
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
        raise RuntimeError(f"{name}: differs from the pre-change code")


def _row(name: str, ours, ref, quick: bool, unit: str, note: str, per: float = 1.0) -> BenchResult:
    # Quick: 2 rounds of 20 ms (seven pairs of rounds of the default 50 ms would take 1.4 s alone).
    repeat, min_time = (2, 0.02) if quick else (3, 0.05)
    t_ours, t_ref = best_time(ours, repeat, min_time) / per, best_time(ref, repeat, min_time) / per
    return BenchResult(name, t_ours * 1000, unit, t_ref * 1000, t_ref / t_ours, note + "; baseline: the pre-change loop")


@register("vlnms_loops")
def bench_vlnms_loops(quick: bool, seed: int) -> list[BenchResult]:
    """Each vectorised step against its pre-change loop, on random inputs shaped like the default world's train
    split (36,000 queries over 3,500 images, 10 objects and ~81 pre-NMS detections per image; ``quick``: a
    tenth). Every pair must give bitwise the same arrays (else RuntimeError)."""
    from refground.grounding.candidates import _sub_relations, id_rows
    from refground.methods.vlnms.run import VLNMSQueries, apply_vlnms, chunk_outputs, kept_proposals, query_foreground
    from refground.grounding.queries import QueryTable
    from refground.structures import RaggedBoxes, group_rows

    scale = 10 if quick else 1
    images, queries = TRAIN_IMAGES // scale, TRAIN_QUERIES // scale
    rng = np.random.default_rng(seed)
    results = []
    world = f"{queries:,} queries over {images:,} images"

    # Foreground objects of every query (encode_vlnms_queries).
    ds, table, pseudo = world_foreground_inputs(images, queries, seed)
    _same("query_foreground", query_foreground(ds, table, pseudo), _reference_query_foreground(ds, table, pseudo))
    results.append(_row("vlnms_foreground", lambda: query_foreground(ds, table, pseudo),
                        lambda: _reference_query_foreground(ds, table, pseudo), quick, "ms",
                        f"foreground of {world}, 0-3 pseudo contexts each"))

    # Foreground rows of every training batch of an epoch (make_vlnms_batch).
    fg_off, _ = query_foreground(ds, table, pseudo)
    batches = np.array_split(rng.permutation(queries), max(1, queries // 64))
    _same("fg_rows", [group_rows(fg_off, b)[0] for b in batches[:50]], [_reference_fg_rows(fg_off, b) for b in batches[:50]])
    results.append(_row("vlnms_fg_rows", lambda: [group_rows(fg_off, b)[0] for b in batches],
                        lambda: [_reference_fg_rows(fg_off, b) for b in batches], quick, "ms",
                        f"foreground rows of the {len(batches):,} batches of 64 of an epoch"))

    # Scores and refined boxes of one scoring chunk (relatedness_scores): 256 queries over 36 images.
    u, b, k = 36, 256, 90
    valid = np.arange(k)[None, :] < rng.integers(60, k + 1, u)[:, None]
    xy = rng.uniform(0, 560, (u, k, 2))
    boxes = (np.concatenate([xy, xy + rng.uniform(10, 80, (u, k, 2))], 2) * valid[..., None]).astype(np.float32)
    q2u = np.sort(rng.integers(0, u, b))
    out = {"scores": torch.from_numpy(rng.uniform(0, 1, (b, k)).astype(np.float32)),
           "deltas": torch.from_numpy(rng.normal(0, 1, (b, k, 4)).astype(np.float32))}
    sizes = np.tile(np.array(IMAGE_SIZE, np.int64), (u, 1))
    ref = _reference_chunk_outputs(out, boxes, valid, q2u, sizes)
    _same("chunk_outputs", chunk_outputs(out, boxes, valid, q2u, sizes), (np.concatenate(ref[0]), np.concatenate(ref[1])))
    results.append(_row("vlnms_chunk_outputs", lambda: chunk_outputs(out, boxes, valid, q2u, sizes),
                        lambda: _reference_chunk_outputs(out, boxes, valid, q2u, sizes), quick, "ms/chunk",
                        f"{b} queries over {u} images x <= {k} detections, with box deltas (VL-NMS-Trans); "
                        f"{queries // b:,} chunks per split"))

    # Assembly of the proposals of every query after the NMS (apply_vlnms).
    dets = world_detection_set(images, rng)
    image_rows = table.image_rows
    kq = dets.counts()[image_rows]
    off = np.concatenate([[0], np.cumsum(kq)]).astype(np.int64)
    scored = RaggedBoxes(off, rng.uniform(0, 560, (int(off[-1]), 4)).astype(np.float32),
                         {"relatedness": rng.uniform(0, 1, int(off[-1])).astype(np.float32)})
    width = 100
    picks = (rng.random((queries, width)) * kq[:, None]).astype(np.int64)
    picks[np.arange(width)[None, :] >= rng.integers(10, 40, queries)[:, None]] = -1
    pick_list = [p[p >= 0] for p in picks]
    rel_list, box_list = np.split(scored.relatedness, off[1:-1]), np.split(scored.boxes, off[1:-1])
    _same("kept_proposals", kept_proposals(picks, image_rows, dets, scored),
          _reference_kept_proposals(pick_list, image_rows, dets, rel_list, box_list))
    results.append(_row("vlnms_kept_proposals", lambda: kept_proposals(picks, image_rows, dets, scored),
                        lambda: _reference_kept_proposals(pick_list, image_rows, dets, rel_list, box_list), quick,
                        "ms", f"proposals of {world}, 10-39 kept of ~{DETECTIONS} each"))

    # Confidence-only VL-NMS end to end (the NMS itself, one fused_nms call per image, is the same in both).
    n_img = 10 if quick else 60
    adets = world_detection_set(n_img, rng)
    nq = n_img * QUERIES_PER_IMAGE
    aq = VLNMSQueries(QueryTable(np.arange(nq), np.repeat(np.arange(n_img), QUERIES_PER_IMAGE),
                                 np.ones((nq, 1), np.int64), np.full(nq, -1), ["synthetic"] * nq),
                      np.zeros(nq + 1, np.int64), np.zeros(0, np.int64))
    a, r = apply_vlnms(None, aq, adets), _reference_apply_vlnms(None, aq, adets)
    _same("apply_vlnms", [getattr(a, f) for f in ("offsets", "query_ids", *a.row_fields)],
          [getattr(r, f) for f in ("offsets", "query_ids", *r.row_fields)])
    results.append(_row("vlnms_apply", lambda: apply_vlnms(None, aq, adets), lambda: _reference_apply_vlnms(None, aq, adets),
                        quick, "ms/image", f"confidence-only, {QUERIES_PER_IMAGE} queries x ~{DETECTIONS} detections "
                        "per image, top 100 (one fused_nms per image in both)", per=n_img))

    # The graph block of the first 10 proposals of every image (load_candidates, source proposals).
    counts = np.clip(rng.poisson(PROPOSALS - 5, images), 1, PROPOSALS).astype(np.int64)
    rel_off = np.concatenate([[0], np.cumsum(counts * counts)]).astype(np.int64)
    flat = rng.integers(0, 12, int(rel_off[-1]), dtype=np.uint8)
    keep = np.minimum(counts, 10)
    _same("sub_relations", _sub_relations(flat, rel_off, counts, keep), _reference_sub_relations(flat, rel_off, counts, keep))
    results.append(_row("candidates_sub_relations", lambda: _sub_relations(flat, rel_off, counts, keep),
                        lambda: _reference_sub_relations(flat, rel_off, counts, keep), quick, "ms",
                        f"10 x 10 blocks of {images:,} images' ~{PROPOSALS - 5} x {PROPOSALS - 5} proposal graphs"))

    # The image rows of every query group (load_query_candidates).
    qds, _ = world_dataset(images, queries, rng)
    qids = rng.permutation(qds.query_ids)

    def image_rows_of() -> np.ndarray:
        return id_rows(qds.image_ids, qds.query_image_ids[id_rows(qds.query_ids, qids, "query")], "image")

    _same("query_image_rows", image_rows_of(), _reference_query_image_rows(qds, qids))
    results.append(_row("candidates_query_rows", image_rows_of, lambda: _reference_query_image_rows(qds, qids),
                        quick, "ms", f"image rows of {queries:,} query groups (two id lookups each)"))
    return results
