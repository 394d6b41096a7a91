"""Issue 16: VL-NMS's per-batch paths and the candidate loading without loops over queries or boxes give
bitwise the arrays of the pre-change loops (kept in ``refground.bench.vlnms_bench`` as ``_reference_*``),
on tiny inputs with the edge cases: queries without detections or foreground, images with one box, no pseudo
contexts, empty splits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from refground.bench import vlnms_bench as vb
from refground.data.model import Dataset
from refground.errors import DataError
from refground.grounding import candidates as cand_mod
from refground.grounding.candidates import _sub_relations, id_rows, load_query_candidates
from refground.grounding.queries import QueryTable
from refground.methods.vlnms.model import VLNMSConfig, build_relatedness
from refground.methods.vlnms.run import (DetectionSet, VLNMSQueries, apply_vlnms, chunk_outputs, kept_proposals,
                                        make_vlnms_batch, query_foreground, relatedness_ragged, relatedness_scores,
                                        score_chunks)
from refground.structures import RaggedBoxes, group_rows, offsets_of

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def same(a, b) -> None:
    """Bitwise equal arrays (NaN payloads and signed zeros included) with the same dtype and shape."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
    assert a.tobytes() == b.tobytes()


def same_all(xs, ys) -> None:
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        same(x, y)


# ------------------------------------------------------------------------------------------------ inputs
def tiny_dataset(objects_per_image=(3, 0, 1, 4), queries_per_image=(2, 1, 2, 3)) -> tuple[Dataset, np.ndarray]:
    """A columnar dataset of shuffled ids (no lookup can lean on their order) and its queries' image rows."""
    n_img = len(objects_per_image)
    image_rows = np.repeat(np.arange(n_img), queries_per_image)
    n_obj, n_q = int(sum(objects_per_image)), len(image_rows)
    image_ids = np.array([40, 7, 93, 12, 5, 61][:n_img], dtype=np.int64)
    cols = {"image_ids": image_ids, "object_ids": (np.arange(n_obj)[::-1] * 3 + 100).astype(np.int64),
            "query_ids": (np.arange(n_q)[::-1] * 7 + 1000).astype(np.int64),
            "image_object_offsets": offsets_of(objects_per_image), "query_image_ids": image_ids[image_rows],
            "image_height": np.array([120, 90, 64, 200, 50, 70][:n_img], np.int32),
            "image_width": np.array([160, 100, 64, 150, 60, 80][:n_img], np.int32)}
    return Dataset("tiny", [], {}, cols), image_rows


def tiny_table(ds: Dataset, image_rows: np.ndarray, targets, words=None) -> QueryTable:
    n = len(image_rows)
    if words is None:
        rng = np.random.default_rng(n)
        lengths = rng.integers(1, 5, n)
        words = rng.integers(1, 10, (n, 5)) * (np.arange(5)[None, :] < lengths[:, None])
    return QueryTable(ds.query_ids[:n].copy(), np.asarray(image_rows, np.int64), np.asarray(words, np.int64),
                      np.asarray(targets, np.int64), ["synthetic"] * n)


def tiny_detections(counts, seed=0, dim=4, sizes=None) -> DetectionSet:
    """Detections of len(counts) images (counts may hold 0 and 1); boxes partly outside the image, so the
    refined boxes get clamped."""
    rng = np.random.default_rng(seed)
    counts = np.asarray(counts, np.int64)
    n_img, n = len(counts), int(counts.sum())
    sizes = np.tile([[60, 80]], (n_img, 1)) if sizes is None else np.asarray(sizes)
    xy = rng.uniform(-10, 70, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(2, 40, (n, 2))], 1).astype(np.float32)
    return DetectionSet(np.arange(n_img, dtype=np.int64), offsets_of(counts), boxes,
                        rng.uniform(0.05, 1, n).astype(np.float32), rng.integers(0, 3, n).astype(np.int64),
                        rng.standard_normal((n, dim)).astype(np.float16), sizes.astype(np.int64),
                        np.zeros(n_img + 1, np.int64), np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                        np.zeros(n_img + 1, np.int64), 0.05)


def tiny_model(variant: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = VLNMSConfig(variant=variant, vocab_size=10, visual_dim=4, word_dim=8, gru_hidden=4, mlp_dim=8,
                      trans_dim=8, trans_heads=2, trans_layers=1, trans_ff=8, max_words=6)
    model = build_relatedness(cfg).eval()
    if variant == "trans":
        with torch.no_grad():  # deltas of a few units: boxes move far enough to be clamped
            model.mlp_t[-1].weight.mul_(30.0)
    return model


# -------------------------------------------------------------------------------------- foreground
def test_query_foreground_matches_the_loop_with_edge_cases():
    ds, image_rows = tiny_dataset()
    oid = ds.object_ids
    # Query 2's image (row 1) has no objects; query 3 has no referent; query 5 has no pseudo entry at all.
    table = tiny_table(ds, image_rows, [1, 0, -1, -1, 0, 0, 3, 2])
    q = ds.query_ids.tolist()
    pseudo = {q[0]: np.array([oid[2], oid[1], oid[0], oid[2]]),      # the referent among them, a repeat
              q[1]: np.array([], np.int64), q[2]: [],                 # empty entries (a list: concatenates as float)
              q[3]: (oid[3],), q[4]: np.array([oid[4], oid[4]]),
              q[6]: np.array([oid[7], oid[6]]), q[7]: np.array([oid[7], oid[6], oid[5]]),
              999_999: np.array([oid[0]])}                            # a query not in the split
    for p in (pseudo, None, {}):
        ours, ref = query_foreground(ds, table, p), vb._reference_query_foreground(ds, table, p)
        same_all(ours, ref)
    off, local = query_foreground(ds, table, pseudo)
    fg = [local[off[n]:off[n + 1]].tolist() for n in range(len(table))]
    # The loop's semantics spelled out: referent first, then the contexts in order less the referent (query
    # 0: 1 dropped, the repeated 2 kept); query 4's contexts lie in another image: out-of-range indices, kept.
    assert fg == [[1, 2, 0, 2], [0], [], [0], [0, 1, 1], [0], [3, 2], [2, 3, 1]]


def test_query_foreground_empty_table_and_unknown_object():
    ds, image_rows = tiny_dataset()
    empty = tiny_table(ds, image_rows[:0], np.zeros(0), words=np.zeros((0, 1)))
    for p in (None, {1000: np.array([100])}):
        same_all(query_foreground(ds, empty, p), vb._reference_query_foreground(ds, empty, p))
    table = tiny_table(ds, image_rows, np.zeros(len(image_rows)))
    bad = {int(ds.query_ids[4]): np.array([int(ds.object_ids[0]), 5])}
    with pytest.raises(DataError) as ours:
        query_foreground(ds, table, bad)
    with pytest.raises(DataError) as ref:
        vb._reference_query_foreground(ds, table, bad)
    assert str(ours.value) == str(ref.value) == "unknown object id 5"


def test_make_vlnms_batch_foreground_rows_match_the_loop():
    ds, image_rows = tiny_dataset()
    table = tiny_table(ds, image_rows, [1, 0, -1, -1, 0, 0, 3, 2])
    off, _ = query_foreground(ds, table, {int(ds.query_ids[0]): np.array([ds.object_ids[2]])})
    for index in ([], [2], [0, 0, 3], [7, 1, 2, 5, 0], list(range(8))):
        idx = np.array(index, np.int64)
        same(group_rows(off, idx)[0], vb._reference_fg_rows(off, idx))


# -------------------------------------------------------------------------------------- scoring
@pytest.mark.parametrize("batch_size", [-1, 0, 1, 3, 7, 256])
def test_score_chunks_match_the_loop(batch_size):
    rng = np.random.default_rng(batch_size + 5)
    for rows in (np.array([4]), np.sort(rng.integers(0, 9, 40)), np.repeat([3, 1, 2], [5, 1, 9])):
        order = rng.permutation(len(rows))
        assert score_chunks(order, rows, batch_size) == vb._reference_score_chunks(order, rows, batch_size)
    # The pre-change scoring returned before chunking no queries (its loop made one empty chunk of them).
    assert score_chunks(np.zeros(0, np.int64), np.zeros(0, np.int64), batch_size) == []


@pytest.mark.parametrize("deltas", [False, True])
def test_chunk_outputs_match_the_loop(deltas):
    rng = np.random.default_rng(3)
    u, b, k = 5, 11, 6
    valid = np.arange(k)[None, :] < np.array([6, 0, 1, 3, 6])[:, None]           # an image without boxes, one with one
    xy = rng.uniform(-20, 90, (u, k, 2))
    boxes = (np.concatenate([xy, xy + rng.uniform(1, 50, (u, k, 2))], 2) * valid[..., None]).astype(np.float32)
    q2u = np.array([0, 0, 1, 2, 2, 2, 3, 4, 4, 1, 3])
    out = {"scores": torch.from_numpy(rng.uniform(0, 1, (b, k)).astype(np.float32))}
    if deltas:
        d = rng.normal(0, 8, (b, k, 4)).astype(np.float32)
        d[0, 0] = [np.nan, -0.0, 80.0, -np.inf]                                   # odd values go through unchanged
        out["deltas"] = torch.from_numpy(d)
    sizes = np.array([[60, 80], [50, 50], [90, 70], [30, 100], [64, 64]], np.int64)
    rel, box = chunk_outputs(out, boxes, valid, q2u, sizes)
    ref_rel, ref_box = vb._reference_chunk_outputs(out, boxes, valid, q2u, sizes)
    same(rel, np.concatenate(ref_rel))
    same(box, np.concatenate(ref_box))
    if deltas:
        assert np.isnan(box).any() and (box[~np.isnan(box)] >= 0).all()


@pytest.mark.parametrize("variant", ["fc", "trans"])
def test_relatedness_matches_the_pre_change_scoring(variant):
    counts = [5, 0, 1, 9, 3, 2]
    dets = tiny_detections(counts, seed=1, sizes=[[60, 80], [40, 40], [50, 90], [70, 70], [60, 80], [30, 30]])
    ds, image_rows = tiny_dataset(objects_per_image=(1,) * 6, queries_per_image=(3, 2, 1, 4, 2, 1))
    queries = VLNMSQueries(tiny_table(ds, image_rows, np.zeros(len(image_rows))), np.zeros(14, np.int64),
                           np.zeros(0, np.int64))
    model = tiny_model(variant)
    rng = np.random.default_rng(0)
    for index, bs in ((np.arange(13), 256), (rng.permutation(13), 3), (np.array([12, 2, 5]), 1),
                      (np.zeros(0, np.int64), 4)):
        ref = vb._reference_relatedness_scores(model, queries, dets, index, bs)
        rel, refined = relatedness_scores(model, queries, dets, index, bs)
        same_all(rel, ref[0])
        same_all(refined, ref[1])
        ragged = relatedness_ragged(model, queries, dets, index, bs)
        same(ragged.offsets, offsets_of(dets.counts()[image_rows[index]]))
        same(ragged.relatedness, np.concatenate([np.zeros(0, np.float32), *ref[0]]))
        same(ragged.boxes, np.concatenate([np.zeros((0, 4), np.float32), *ref[1]]))
    if variant == "trans":   # the refined boxes moved and were clamped
        moved = relatedness_ragged(model, queries, dets, np.arange(13)).boxes
        assert not np.array_equal(moved, dets.boxes[group_rows(dets.offsets, image_rows)[0]])
        hw = dets.image_sizes[np.repeat(image_rows, dets.counts()[image_rows])]          # (height, width) per row
        assert moved.min() == 0 and (moved[:, 2] <= hw[:, 1]).all() and (moved[:, 3] <= hw[:, 0]).all()
        assert (moved[:, 2] == hw[:, 1]).any()


# ------------------------------------------------------------------------------------------ NMS
@pytest.mark.parametrize("with_scores", [False, True])
def test_kept_proposals_match_the_loop(with_scores):
    rng = np.random.default_rng(4)
    dets = tiny_detections([4, 0, 1, 7], seed=2)
    image_rows = np.array([0, 0, 1, 2, 3, 3, 3], np.int64)
    k = dets.counts()[image_rows]
    picks = np.full((len(image_rows), 5), -1, np.int64)
    for q, n in enumerate([3, 4, 0, 1, 5, 0, 2]):     # building inputs: as fused_nms returns them
        picks[q, :n] = rng.permutation(int(k[q]))[:n]
    off = offsets_of(k)
    rows = group_rows(dets.offsets, image_rows)[0]
    scored = RaggedBoxes(off, rng.uniform(0, 90, (int(off[-1]), 4)).astype(np.float32),
                         {"relatedness": rng.uniform(0, 1, int(off[-1])).astype(np.float32)}) if with_scores else None
    rel = np.split(scored.relatedness, off[1:-1]) if with_scores else [np.ones(int(n), np.float32) for n in k]
    refined = np.split(scored.boxes, off[1:-1]) if with_scores else np.split(dets.boxes[rows], off[1:-1])
    pick_list = [p[p >= 0] for p in picks]
    same_all(kept_proposals(picks, image_rows, dets, scored),
             vb._reference_kept_proposals(pick_list, image_rows, dets, rel, refined))
    empty = kept_proposals(np.zeros((0, 0), np.int64), image_rows[:0], dets, None)
    same_all(empty, vb._reference_kept_proposals([], image_rows[:0], dets, [], []))


def props_fields(p):
    return [p.offsets, p.query_ids, p.boxes, p.det_rows, p.fused, p.relatedness]


@pytest.mark.parametrize("variant", [None, "fc", "trans"])
def test_apply_vlnms_matches_the_pre_change_code(variant):
    dets = tiny_detections([6, 0, 1, 9, 4], seed=3)
    ds, image_rows = tiny_dataset(objects_per_image=(1,) * 5, queries_per_image=(3, 2, 1, 4, 2))
    queries = VLNMSQueries(tiny_table(ds, image_rows, np.zeros(len(image_rows))), np.zeros(13, np.int64),
                           np.zeros(0, np.int64))
    model = None if variant is None else tiny_model(variant, seed=1)
    floor = float(np.sort(dets.scores[dets.rows(3)])[-3])   # image 3 keeps 3; images 0, 4 perhaps none above it
    for top_n, thr, agnostic, mc in ((100, 0.5, False, 0.0), (1, 0.5, False, 0.0), (3, 0.3, True, 0.0),
                                     (5, 0.7, False, floor), (2, 1.0, True, 0.99)):
        ours = apply_vlnms(model, queries, dets, thr, top_n, agnostic, min_confidence=mc)
        ref = vb._reference_apply_vlnms(model, queries, dets, thr, top_n, agnostic, mc)
        same_all(props_fields(ours), props_fields(ref))
        counts = ours.counts()
        assert (counts[image_rows == 1] == 0).all() and (counts[image_rows != 1] >= 1).all()


def test_apply_vlnms_on_no_queries():
    dets = tiny_detections([3, 2])
    ds, image_rows = tiny_dataset(objects_per_image=(1, 1), queries_per_image=(0, 0))
    queries = VLNMSQueries(tiny_table(ds, image_rows, np.zeros(0), words=np.zeros((0, 1))), np.zeros(1, np.int64),
                           np.zeros(0, np.int64))
    for model in (None, tiny_model("trans")):
        ours = apply_vlnms(model, queries, dets, 0.5, 10)
        same_all(props_fields(ours), props_fields(vb._reference_apply_vlnms(model, queries, dets, 0.5, 10)))
        assert len(ours) == 0 and ours.boxes.shape == (0, 4)


def test_make_vlnms_batch_still_builds_the_targets():
    """make_vlnms_batch's foreground gather, end to end: rho is the best IoU with the referent or the contexts."""
    ds, image_rows = tiny_dataset(objects_per_image=(2, 1), queries_per_image=(2, 1))
    dets = tiny_detections([3, 2], seed=5)
    ds.object_boxes = np.array([[0, 0, 20, 20], [30, 30, 60, 50], [5, 5, 40, 40]], np.float64)
    dets.object_offsets = ds.image_object_offsets
    dets.object_boxes = ds.object_boxes.astype(np.float32)
    from refground.boxes import box_iou
    from refground.methods.vlnms.run import _pair_index
    a, b, dets.iou_offsets = _pair_index(dets.offsets, dets.object_offsets)
    dets.obj_iou = box_iou(torch.from_numpy(dets.boxes), torch.from_numpy(dets.object_boxes)).numpy()[a, b]
    table = tiny_table(ds, image_rows, [0, -1, 0])
    pseudo = {int(ds.query_ids[0]): np.array([ds.object_ids[1]]), int(ds.query_ids[1]): np.array([ds.object_ids[1]])}
    queries = VLNMSQueries(table, *query_foreground(ds, table, pseudo))
    batch = make_vlnms_batch(queries, dets, np.array([1, 0, 2]))
    iou = box_iou(torch.from_numpy(dets.boxes[:3]), torch.from_numpy(dets.object_boxes[:2])).numpy()
    np.testing.assert_allclose(batch.rho[0, :3].numpy(), iou[:, 1], atol=1e-6)             # context only
    np.testing.assert_allclose(batch.rho[1, :3].numpy(), iou.max(1), atol=1e-6)            # referent + context


# ------------------------------------------------------------------------------------------ candidates
def test_sub_relations_match_the_loop():
    rng = np.random.default_rng(6)
    for counts, keep in (([], []), ([0], [0]), ([1], [1]), ([3, 0, 5, 1, 4], [2, 0, 5, 1, 0]),
                         ([6, 6, 2], [6, 3, 2])):
        counts, keep = np.array(counts, np.int64), np.array(keep, np.int64)
        off = offsets_of(counts * counts)
        flat = rng.integers(0, 12, int(off[-1]), dtype=np.uint8)
        same_all(_sub_relations(flat, off, counts, keep), vb._reference_sub_relations(flat, off, counts, keep))
    # The block is the top-left one: image 1 of 2 x 2 boxes keeps 1 of them.
    flat = np.arange(1 + 4, dtype=np.uint8)
    same_all(_sub_relations(flat, offsets_of([1, 4]), np.array([1, 2]), np.array([1, 1])),
             (np.array([0, 1], np.uint8), np.array([0, 1, 2])))


def test_id_rows_match_the_dataset_lookups():
    ds, _ = tiny_dataset()
    keys = ds.object_ids[[3, 0, 0, 7, 5]]
    same(id_rows(ds.object_ids, keys, "object"), np.array([ds.object_row(int(k)) for k in keys], np.int64))
    same(id_rows(ds.image_ids, np.zeros(0, np.int64), "image"), np.zeros(0, np.int64))
    same(id_rows(ds.query_ids, [ds.query_ids[2], 3, ds.query_ids[0]], "query", missing=-1), np.array([2, -1, 0]))
    same(id_rows(np.zeros(0, np.int64), [4, 5], "query", missing=-1), np.array([-1, -1]))
    for ids, bad in ((ds.query_ids, [ds.query_ids[1], 77, 78]), (np.zeros(0, np.int64), [77])):
        with pytest.raises(DataError, match=r"^unknown query id 77$"):
            id_rows(ids, bad, "query")
    with pytest.raises(DataError) as ref:
        ds.query_row(77)
    assert str(ref.value) == "unknown query id 77"


def write_proposals_file(path, qids, counts, seed=7):
    from refground.cache import write_h5

    rng = np.random.default_rng(seed)
    n = int(np.sum(counts))
    xy = rng.uniform(0, 50, (n, 2))
    chunk = {"queries.ids": np.asarray(qids, np.int64), "proposals.counts": np.asarray(counts, np.int64),
             "proposals.boxes": np.concatenate([xy, xy + rng.uniform(3, 60, (n, 2))], 1).astype(np.float32),
             "proposals.features": rng.standard_normal((n, 3)).astype(np.float16)}
    write_h5(path, [chunk], {"format": "refground-vlnms-proposals", "version": 1})


def cand_fields(c):
    return [c.offsets, c.boxes, c.features, c.spatial, c.object_ids, c.image_ids, c.image_sizes, c.relations,
            c.rel_offsets]


@pytest.mark.parametrize("top_n", [1, 3, 50])
def test_load_query_candidates_matches_the_pre_change_loader(tmp_path, monkeypatch, top_n):
    monkeypatch.setattr(cand_mod, "require", lambda *a, **k: None)   # a hand-written file has no manifest
    ds, _ = tiny_dataset()
    qids = ds.query_ids[[5, 0, 2, 7, 1]]
    path = tmp_path / "val.h5"
    write_proposals_file(path, qids, [4, 0, 1, 7, 2])                  # a query without proposals, one with one
    ours, ours_q = load_query_candidates(ds, path, top_n)
    ref, ref_q = vb._reference_load_query_candidates(ds, path, top_n)
    same(ours_q, ref_q)
    same_all(cand_fields(ours), cand_fields(ref))
    assert ours.source == ref.source == "vlnms"
    unknown = tmp_path / "bad.h5"
    write_proposals_file(unknown, [int(qids[0]), 4], [1, 1])
    with pytest.raises(DataError, match="unknown query id 4"):
        load_query_candidates(ds, unknown, top_n)


def test_load_query_candidates_of_an_empty_split(tmp_path, monkeypatch):
    monkeypatch.setattr(cand_mod, "require", lambda *a, **k: None)
    ds, _ = tiny_dataset()
    path = tmp_path / "empty.h5"
    write_proposals_file(path, np.zeros(0, np.int64), np.zeros(0, np.int64))
    ours, ref = load_query_candidates(ds, path, 5), vb._reference_load_query_candidates(ds, path, 5)
    same(ours[1], ref[1])
    same_all(cand_fields(ours[0]), cand_fields(ref[0]))
    assert len(ours[0]) == 0


# ------------------------------------------------------------------------------------------ benchmark
def one_call(fn, repeat=1, min_time=0.0) -> float:
    """best_time in one call, after checking what the benchmark asks of it."""
    import time

    assert type(repeat) is int and repeat >= 2 and 0 < min_time <= 0.05, (repeat, min_time)
    t0 = time.perf_counter()
    fn()
    return max(time.perf_counter() - t0, 1e-9)


@pytest.fixture
def small_bench(monkeypatch):
    """The benchmark on a world of 30 images and 210 queries in quick mode, each timing one call."""
    monkeypatch.setattr(vb, "TRAIN_IMAGES", 300)
    monkeypatch.setattr(vb, "TRAIN_QUERIES", 2100)
    monkeypatch.setattr(vb, "best_time", one_call)


@pytest.mark.parametrize("quick", [True, False])
def test_benchmark_reports_every_step(small_bench, quick):
    results = vb.bench_vlnms_loops(quick, 0)
    assert [r.name for r in results] == ["vlnms_foreground", "vlnms_fg_rows", "vlnms_chunk_outputs",
                                         "vlnms_kept_proposals", "vlnms_apply", "candidates_sub_relations",
                                         "candidates_query_rows"]
    for r in results:
        assert math.isfinite(r.figure) and r.figure > 0 and r.baseline > 0, r
        assert r.ratio == pytest.approx(r.baseline / r.figure) and "pre-change" in r.note


def test_benchmark_refuses_a_wrong_result(small_bench, monkeypatch):
    import refground.methods.vlnms.run as run

    real = run.kept_proposals

    def off_by_one(picks, *a):
        out = real(picks, *a)
        return (out[0], out[1] + 1, *out[2:])

    monkeypatch.setattr(run, "kept_proposals", off_by_one)
    with pytest.raises(RuntimeError, match="kept_proposals"):
        vb.bench_vlnms_loops(True, 0)
