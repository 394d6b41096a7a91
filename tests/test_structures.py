"""refground.structures: RaggedBoxes, checked against slow, obviously correct loops."""

from __future__ import annotations

import numpy as np
import pytest

from refground.structures import RaggedBoxes, group_rows, offsets_of


def make(counts: list[int], seed: int = 0, dim: int = 3) -> RaggedBoxes:
    rng = np.random.default_rng(seed)
    m = sum(counts)
    xy = rng.uniform(0, 50, (m, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + rng.uniform(1, 20, (m, 2)).astype(np.float32)], axis=1)
    return RaggedBoxes(offsets_of(counts), boxes,
                       {"features": rng.standard_normal((m, dim)).astype(np.float32),
                        "scores": rng.uniform(0, 1, m).astype(np.float32), "ids": np.arange(m, dtype=np.int64)},
                       {"image_ids": np.arange(len(counts), dtype=np.int64) * 10,
                        "image_sizes": np.tile(np.array([[64, 80]], np.int64), (len(counts), 1))})


def slow_offsets(counts: list[int]) -> list[int]:
    out = [0]
    for c in counts:
        out.append(out[-1] + c)
    return out


CASES = [[3, 0, 5, 1], [0, 0, 0], [7], [], [2, 9, 0, 0, 4]]


@pytest.mark.parametrize("counts", CASES)
def test_groups_rows_and_fields(counts):
    rb = make(counts)
    assert rb.offsets.dtype == np.int64 and rb.offsets.tolist() == slow_offsets(counts)
    assert len(rb) == len(counts) and rb.num_rows == sum(counts)
    assert rb.counts().tolist() == counts
    assert rb.boxes.shape == (sum(counts), 4) and rb.feature_dim == 3
    assert rb.row_fields == ("boxes", "features", "scores", "ids") and rb.group_fields == ("image_ids", "image_sizes")
    start = 0
    for g, c in enumerate(counts):
        assert rb.rows(g) == slice(start, start + c)
        for name in rb.row_fields:
            np.testing.assert_array_equal(rb.group(g, name), getattr(rb, name)[start:start + c])
        assert rb.group(g).shape == (c, 4)
        start += c
    with pytest.raises(KeyError):
        rb.group(0, "image_ids")


@pytest.mark.parametrize("counts", CASES)
@pytest.mark.parametrize("n", [0, 1, 2, 5, 100])
def test_top_matches_a_loop(counts, n):
    rb = make(counts, seed=len(counts) + n)
    top = rb.top(n)
    assert type(top) is RaggedBoxes and len(top) == len(rb)
    assert top.counts().tolist() == [min(c, n) for c in counts]
    for name in rb.row_fields:
        parts = [getattr(rb, name)[rb.offsets[g]:rb.offsets[g] + min(c, n)] for g, c in enumerate(counts)]
        want = np.concatenate(parts) if parts else getattr(rb, name)[:0]
        got = getattr(top, name)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    for name in rb.group_fields:
        np.testing.assert_array_equal(getattr(top, name), getattr(rb, name))
    assert top.feature_dim == rb.feature_dim


@pytest.mark.parametrize("counts", CASES)
def test_group_rows_and_padded_rows_match_loops(counts):
    rb = make(counts)
    rng = np.random.default_rng(len(counts))
    picks = [np.arange(len(counts)), rng.integers(0, max(len(counts), 1), 6) if counts else np.zeros(0, np.int64),
             np.zeros(0, np.int64)]
    for groups in picks:
        for n in (None, 0, 1, 3):
            rows, off = rb.group_rows(groups, n)
            want = [r for g in groups.tolist() for r in range(rb.offsets[g], rb.offsets[g + 1])
                    [: (counts[g] if n is None else n)]]
            assert rows.dtype == np.int64 and rows.tolist() == want
            lens = [min(counts[g], counts[g] if n is None else n) for g in groups.tolist()]
            assert off.tolist() == slow_offsets(lens)
            np.testing.assert_array_equal(group_rows(rb.offsets, groups, n)[0], rows)
        rows, valid = rb.padded_rows(groups)
        k = max([1] + [counts[g] for g in groups.tolist()])
        assert rows.shape == valid.shape == (len(groups), k)
        for i, g in enumerate(groups.tolist()):
            for j in range(k):
                assert valid[i, j] == (j < counts[g])
                assert rows[i, j] == (rb.offsets[g] + j if j < counts[g] else 0)


def test_empty_container_and_offsets_of():
    rb = RaggedBoxes(np.zeros(1, np.int64), np.zeros(0))
    assert len(rb) == 0 and rb.num_rows == 0 and rb.boxes.shape == (0, 4) and rb.counts().shape == (0,)
    assert rb.top(3).offsets.tolist() == [0] and rb.group_rows()[0].shape == (0,)
    assert rb.padded_rows(np.zeros(0, np.int64))[0].shape == (0, 1)
    with pytest.raises(AttributeError):
        _ = rb.feature_dim
    assert offsets_of([]).tolist() == [0] and offsets_of([]).dtype == np.int64
    assert offsets_of(np.array([2, 0, 3])).tolist() == [0, 2, 2, 5]
    assert "groups=0" in repr(rb)


def test_invalid_inputs_raise():
    boxes = np.zeros((3, 4), np.float32)
    for off in ([1, 3], [0, 2, 1, 3], [], [[0, 3]], [0, 4]):
        with pytest.raises(ValueError):
            RaggedBoxes(np.array(off, np.int64), boxes)
    with pytest.raises(ValueError):
        RaggedBoxes([0, 3], np.zeros((3, 5)))
    with pytest.raises(ValueError):
        RaggedBoxes([0, 3], boxes, {"scores": np.zeros(2)})
    with pytest.raises(ValueError):
        RaggedBoxes([0, 3], boxes, groups={"image_ids": np.zeros(2)})
    for bad in ("offsets", "top", "rows", "counts", "group", "not an identifier"):
        with pytest.raises(ValueError):
            RaggedBoxes([0, 3], boxes, {bad: np.zeros(3)})
    with pytest.raises(ValueError):
        RaggedBoxes([0, 3], boxes, {"x": np.zeros(3)}, {"x": np.zeros(1)})


def test_read_a_ragged_section(tmp_path):
    from refground.cache import RaggedH5, write_h5

    rb = make([2, 0, 3])
    path = tmp_path / "a.h5"
    write_h5(path, [{"images.ids": rb.image_ids, "proposals.counts": rb.counts(), "proposals.boxes": rb.boxes,
                     "proposals.scores": rb.scores}], {})
    with RaggedH5(path) as f:
        back = RaggedBoxes.read(f, "proposals", ("scores",))
    assert back.row_fields == ("boxes", "scores") and back.group_fields == ()
    np.testing.assert_array_equal(back.offsets, rb.offsets)
    np.testing.assert_array_equal(back.boxes, rb.boxes)
    np.testing.assert_array_equal(back.scores, rb.scores)


def test_the_library_sets_are_ragged_boxes():
    from refground.grounding.candidates import CandidateSet
    from refground.methods.vlnms.run import DetectionSet, QueryProposals

    counts = [2, 0, 3]
    base = make(counts)
    rel_off = offsets_of([c * c for c in counts])
    cands = CandidateSet("gt", base.image_ids, base.offsets, base.boxes, base.features, np.zeros((5, 5), np.float32),
                         base.ids, np.arange(rel_off[-1], dtype=np.uint8), rel_off, base.image_sizes)
    assert isinstance(cands, RaggedBoxes) and cands.feature_dim == 3 and cands.source == "gt"
    assert cands.row_fields == ("boxes", "features", "spatial", "object_ids")
    assert cands.relation_matrix(2).tolist() == np.arange(4, 13).reshape(3, 3).tolist()
    assert cands.relation_matrix(1).shape == (0, 0)
    dets = DetectionSet(base.image_ids, base.offsets, base.boxes, base.scores, base.ids, base.features,
                        base.image_sizes, np.zeros(4, np.int64), np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                        np.zeros(4, np.int64), 0.05)
    assert isinstance(dets, RaggedBoxes) and dets.rows(2) == slice(2, 5) and dets.threshold == 0.05
    np.testing.assert_array_equal(dets.group(2, "scores"), base.scores[2:5])
    props = QueryProposals(base.image_ids, base.offsets, base.ids, base.boxes, base.scores, base.scores, 1.0, 2.0)
    assert isinstance(props, RaggedBoxes) and props.query_ids is base.image_ids
    np.testing.assert_array_equal(props.ranked_boxes(0), base.boxes[:2])
    assert props.ranked_boxes(1).shape == (0, 4)
