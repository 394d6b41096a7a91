"""What BiCM's training side may read (refground.methods.bicm.data) and how its pseudo labels are judged and
matched (refground.methods.bicm.pseudo): the unpaired pools carry no pairing (a query pool is the same when
every query is moved to another image), the detector's proposals against a slow per-image loop, Table 7's
judging on crafted labels, and the nearest-query search against numpy."""

from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import pytest

from refground.data.store import load_named
from refground.errors import ArtifactError, UsageError
from refground.methods.bicm.data import (
    DetectorProposals,
    ImagePool,
    QueryPool,
    unpaired_pools,
)
from refground.methods.bicm.pseudo import judge, nearest_queries, precision_table


def _fresh(synth_cache):
    """A private copy of the fixture dataset (tests change its arrays)."""
    return load_named("synth", synth_cache)


def _expressions(ds, split: str) -> list[str]:
    return [q.text for q in ds.queries(split, "expression")]


def _phrases(ds, split: str) -> list[str]:
    return [" ".join(q.tokens[m.start:m.end]) for q in ds.queries(split, "caption") for m in q.mentions]


# ----------------------------------------------------------------------------------------------- pools


def test_pools_carry_no_pairing(synth_ds):
    images, queries = unpaired_pools(synth_ds, "train", "expression", seed=0)
    # Nothing in the query pool but texts; nothing in the image pool about queries.
    assert {f.name for f in dataclasses.fields(QueryPool)} == {"split", "kind", "texts"}
    assert {f.name for f in dataclasses.fields(ImagePool)} == {"split", "image_ids", "rows", "sizes"}
    assert isinstance(queries.texts, tuple) and all(isinstance(t, str) for t in queries.texts)
    texts = _expressions(synth_ds, "train")
    assert sorted(queries.texts) == sorted(set(texts)) and len(queries) < len(texts)  # distinct texts only
    # Its order is neither the dataset's (first occurrence) nor sorted.
    first_seen = list(dict.fromkeys(texts))
    assert list(queries.texts) != first_seen and list(queries.texts) != sorted(queries.texts)
    # The image pool: the split's images, shuffled, with their rows and (height, width).
    train_rows = [r for r, s in enumerate(synth_ds.image_splits) if s == "train"]
    assert sorted(images.rows.tolist()) == train_rows and images.rows.tolist() != train_rows
    assert images.image_ids.tolist() == synth_ds.image_ids[images.rows].tolist()
    assert images.sizes.tolist() == [[int(synth_ds.image_height[r]), int(synth_ds.image_width[r])]
                                     for r in images.rows]
    assert images.image_ids.dtype == np.int64 and images.sizes.dtype == np.int32 and len(images) == len(train_rows)


@pytest.mark.parametrize("kind", ["expression", "phrase"])
def test_query_pool_is_the_same_when_queries_move_to_other_images(synth_cache, synth_ds, kind):
    before = unpaired_pools(synth_ds, "train", kind, seed=3)
    ds = _fresh(synth_cache)
    ids = ds.image_ids.tolist()
    moved = {i: ids[(k + 7) % len(ids)] for k, i in enumerate(ids)}  # every query to another image
    ds.query_image_ids = np.array([moved[int(i)] for i in ds.query_image_ids], dtype=ds.query_image_ids.dtype)
    assert (ds.query_image_ids != synth_ds.query_image_ids).all()
    after = unpaired_pools(ds, "train", kind, seed=3)
    assert after[1] == before[1]
    assert np.array_equal(after[0].image_ids, before[0].image_ids) and np.array_equal(after[0].sizes,
                                                                                      before[0].sizes)
    # The same when the queries of the split are stored in another order.
    ds = _fresh(synth_cache)
    rows = ds.query_rows("train", "expression" if kind == "expression" else "caption")
    if kind == "expression":
        texts = [ds.query_texts[r] for r in rows]
        for r, t in zip(rows, texts[::-1]):
            ds.query_texts[r] = t
        assert unpaired_pools(ds, "train", kind, seed=3)[1] == before[1]


def test_phrase_pool_and_seeds(synth_ds):
    _, phrases = unpaired_pools(synth_ds, "train", "phrase", seed=0)
    assert phrases.kind == "phrase" and sorted(phrases.texts) == sorted(set(_phrases(synth_ds, "train")))
    a_img, a_txt = unpaired_pools(synth_ds, "train", "expression", seed=0)
    b_img, b_txt = unpaired_pools(synth_ds, "train", "expression", seed=1)
    again = unpaired_pools(synth_ds, "train", "expression", seed=0)
    assert again[1] == a_txt and np.array_equal(again[0].rows, a_img.rows)  # seeded
    assert b_txt.texts != a_txt.texts and sorted(b_txt.texts) == sorted(a_txt.texts)
    assert b_img.rows.tolist() != a_img.rows.tolist() and sorted(b_img.rows.tolist()) == sorted(a_img.rows.tolist())
    with pytest.raises(UsageError, match="query kind"):
        unpaired_pools(synth_ds, "train", "caption")
    with pytest.raises(UsageError, match="no images in split 'testC'"):
        unpaired_pools(synth_ds, "testC")


# ------------------------------------------------------------------------------------------- proposals


def _read_ref(path, top_n: int, min_score: float, min_boxes: int) -> dict[str, list]:
    """Per image, in Python: its first ``top_n`` proposals (stored best first), of which those with a score of
    at least ``min_score`` or among the first ``min_boxes`` (min_score 0: all of them)."""
    from refground.cache import RaggedH5

    with RaggedH5(path) as f:
        offsets = f.offsets["proposals"]
        boxes, labels, scores = (f.table("proposals", k) for k in ("boxes", "labels", "scores"))
    out: dict[str, list] = {"rows": [], "counts": []}
    for i in range(len(offsets) - 1):
        rows = list(range(int(offsets[i]), int(offsets[i + 1])))[:top_n]
        kept = [r for k, r in enumerate(rows) if min_score <= 0 or scores[r] >= min_score or k < min_boxes]
        out["rows"] += kept
        out["counts"].append(len(kept))
    out["boxes"], out["labels"], out["scores"] = boxes[out["rows"]], labels[out["rows"]], scores[out["rows"]]
    return out


def test_detector_proposals_against_a_per_image_loop(pipeline_cache, synth_ds):
    path = pipeline_cache / "synth" / "features" / "detector-default.h5"
    ref = _read_ref(path, 100, 0.0, 0)
    scores = ref["scores"]
    mid = float(np.median(scores))
    for top_n, min_score, min_boxes in ((100, 0.0, 0), (5, 0.0, 0), (20, mid, 0), (20, mid, 4), (8, mid, 3),
                                        (3, mid, 10), (20, float(scores.max()) + 1, 2), (7, 0.0, 50)):
        props = DetectorProposals.read(path, synth_ds, top_n, min_score, min_boxes)
        want = _read_ref(path, top_n, min_score, min_boxes)
        assert props.crop_rows.tolist() == want["rows"], (top_n, min_score, min_boxes)
        assert np.diff(props.offsets).tolist() == want["counts"] and props.offsets[0] == 0
        assert np.array_equal(props.boxes, want["boxes"].astype(np.float32))
        assert np.array_equal(props.labels, want["labels"]) and np.array_equal(props.scores, want["scores"])
        assert props.image_ids.tolist() == synth_ds.image_ids.tolist()
        assert props.class_names and all(isinstance(n, str) for n in props.class_names)
        for row in (0, 5, len(synth_ds.image_ids) - 1):
            sl = props.of(row)
            assert sl.stop - sl.start == want["counts"][row]
    # Each image's scores are best first, so every rule keeps a prefix of them.
    assert all(np.all(np.diff(scores[a:b]) <= 0) for a, b in zip(np.cumsum([0, *ref["counts"][:-1]]),
                                                                   np.cumsum(ref["counts"])))
    assert 0 < mid < float(scores.max())  # the median cut really drops boxes
    with pytest.raises(UsageError, match="--top-n 0"):
        DetectorProposals.read(path, synth_ds, 0)


def test_detector_proposals_refuse_other_images_and_nameless_detectors(pipeline_cache, synth_cache, tmp_path):
    import shutil

    path = pipeline_cache / "synth" / "features" / "detector-default.h5"
    ds = _fresh(synth_cache)
    ds.image_ids = ds.image_ids[::-1].copy()
    with pytest.raises(ArtifactError, match="images differ"):
        DetectorProposals.read(path, ds, 10)
    nameless = tmp_path / "nameless.h5"
    shutil.copy(path, nameless)
    with h5py.File(nameless, "a") as f:
        del f.attrs["class_names"]
    with pytest.raises(ArtifactError, match="no detector class names"):
        DetectorProposals.read(nameless, _fresh(synth_cache), 10)


# ------------------------------------------------------------------------------------ judging (Table 7)


def _objects_of(ds, image_id: int):
    return [o for o in (ds.object(int(i)) for i in ds.object_ids) if o.image_id == image_id]


def test_judge_on_crafted_labels_synthetic(synth_ds):
    """Synthetic world: any text is judged on the image's own objects by the world's oracle; here texts whose
    denotation is plain: ``the <category>`` is every object of that category."""
    rows, texts, boxes, want_correct, want_judged = [], [], [], [], []

    def add(row, text, box, correct, judged):
        rows.append(row), texts.append(text), boxes.append(box), want_correct.append(correct)
        want_judged.append(judged)

    single = multi = absent = False
    for row, image_id in enumerate(synth_ds.image_ids.tolist()):
        objs = _objects_of(synth_ds, image_id)
        by_cat: dict[str, list] = {}
        for o in objs:
            by_cat.setdefault(o.category, []).append(np.asarray(o.box, np.float32))
        for cat, bs in by_cat.items():
            if len(bs) == 1 and not single:
                single = True
                b = bs[0]
                add(row, f"the {cat}", b, True, True)
                w, h = b[2] - b[0], b[3] - b[1]
                add(row, f"the {cat}", b + np.array([w, h, w, h]) * 1.5, False, True)  # off the object
                add(row, f"the {cat}", b + np.array([0, 0, w, h]) * 1.2, False, True)  # IoU 1/2.2**2 < 0.5
            if len(bs) >= 2 and not multi:
                multi = True
                union = np.concatenate([np.min(bs, 0)[:2], np.max(bs, 0)[2:]])
                add(row, f"the {cat}", union, True, True)  # the union of what it denotes
                add(row, f"the {cat}", bs[1], True, True)  # or any one of them
        missing = sorted(set(synth_ds.categories) - set(by_cat))
        if missing and not absent:
            absent = True
            add(row, f"the {missing[0]}", np.asarray(objs[0].box, np.float32), False, True)  # denotes nothing
    assert single and multi and absent
    add(0, "hello world zzz", np.array([0, 0, 10, 10], np.float32), False, False)  # outside the grammar
    correct, judged = judge(synth_ds, np.array(rows), texts, np.stack(boxes))
    assert correct.tolist() == want_correct and judged.tolist() == want_judged


def test_judge_on_crafted_labels_real_data(synth_cache):
    """Elsewhere only a text the image's own expressions hold is judged, against that expression's referent."""
    ds = _fresh(synth_cache)
    ds.meta["source"] = "refcoco"
    q0 = ds.queries("train", "expression")[0]
    row_of = {int(i): r for r, i in enumerate(ds.image_ids.tolist())}
    other = next(q for q in ds.queries("train", "expression") if q.image_id != q0.image_id and q.text != q0.text)
    ref = np.asarray(ds.object(q0.referent_object_id).box, np.float32)
    far = ref + 200
    rows = np.array([row_of[q0.image_id], row_of[q0.image_id], row_of[other.image_id], row_of[q0.image_id]])
    texts = [q0.text, q0.text, q0.text, "hello world"]
    correct, judged = judge(ds, rows, texts, np.stack([ref, far, ref, ref]))
    assert judged.tolist() == [True, True, False, False]
    assert correct.tolist() == [True, False, False, False]


def test_precision_table_on_crafted_scores():
    fused = np.array([0.95, 0.85, 0.75, 0.65, 0.5, 0.91, 0.9], np.float32)
    correct = np.array([1, 0, 1, 1, 1, 1, 1], bool)
    judged = np.array([1, 1, 0, 1, 1, 1, 1], bool)
    rows = precision_table(fused, correct, judged, (0.6, 0.7, 0.8, 0.9, 0.96))
    assert rows == [
        {"thr_k": 0.6, "labels": 6, "judged": 5, "precision": 0.8},   # 0.5 out; 0.75 unjudged
        {"thr_k": 0.7, "labels": 5, "judged": 4, "precision": 0.75},
        {"thr_k": 0.8, "labels": 4, "judged": 4, "precision": 0.75},
        {"thr_k": 0.9, "labels": 2, "judged": 2, "precision": 1.0},  # "higher than": 0.9 itself is out
        {"thr_k": 0.96, "labels": 0, "judged": 0, "precision": None},
    ]
    assert [r["thr_k"] for r in precision_table(fused, correct, judged)] == [0.6, 0.7, 0.8, 0.9]  # Table 7's


# ------------------------------------------------------------------------------------- nearest queries


def test_nearest_queries_against_numpy():
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((50, 16)).astype(np.float32) * rng.uniform(0.1, 5, (50, 1)).astype(np.float32)
    images = rng.standard_normal((20, 16)).astype(np.float32) * 3
    queries[41] = queries[7]  # an exact duplicate: the lower row wins
    images[3] = queries[41] * 2
    rows, cos = nearest_queries(images, queries)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    im = images / np.linalg.norm(images, axis=1, keepdims=True)
    sims = im.astype(np.float64) @ qn.T.astype(np.float64)
    assert rows.dtype == np.int64 and cos.dtype == np.float32
    assert rows.tolist() == sims.argmax(1).tolist() and rows[3] == 7
    np.testing.assert_allclose(cos, sims.max(1), atol=1e-5)
