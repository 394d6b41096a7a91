"""The vectorised predictions parser/writer, proposal ranks and evaluate() against the pre-change code.

The references are the pre-change functions kept in :mod:`refground.bench.eval_bench` (``_reference_*``):
every result must be identical (parsed values and their types, written bytes, ranks, figures) and every
malformed input must raise the same exception with the same message.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from refground.bench import eval_bench as eb
from refground.data.model import Dataset, Image, Mention, Object, Query
from refground.errors import UsageError
from refground.eval import metrics
from refground.eval.evaluate import comprehension_of, evaluate
from refground.eval.metrics import first_hit_ranks, pointit_hits, proposal_hit_ranks
from refground.eval.predictions import (
    PhrasePrediction, Predictions, QueryPrediction, read_predictions, write_predictions,
)
from refground.structures import RaggedBoxes, offsets_of
from test_eval import hand_dataset, hand_predictions, region


def outcome(fn, *args):
    """``("ok", value)`` or ``(exception type name, message)``: what a call does, comparable across versions."""
    try:
        return "ok", fn(*args)
    except Exception as exc:  # noqa: BLE001 -- the comparison is the point, whatever the type
        return type(exc).__name__, str(exc)


def parsed(preds: Predictions) -> list[str]:
    """Every prediction with its line, as repr: types show (1 vs 1.0), so equal reprs mean equal values."""
    return [repr(p) for p in preds]


def read_both(path):
    new, ref = outcome(read_predictions, path), outcome(eb._reference_read_predictions, path)
    if new[0] == "ok" and ref[0] == "ok":
        return ("ok", parsed(new[1])), ("ok", parsed(ref[1]))
    return new, ref


# ----------------------------------------------------------------------------------------- parsing
GOOD = '{"query_id": 1, "boxes": [[0, 0, 1, 1], [0.5, 0.25, 2.5, 3]], "scores": [2, 1.5]}'

LINES = [
    GOOD,
    '{"query_id": 1, "box": [0, 0, 1, 1], "score": 0.5, "boxes": [[0, 0, 1, 1]], "scores": [0.5]}',
    '{"query_id": 1, "boxes": []}',                                   # a query with no boxes
    '{"query_id": 1, "boxes": [], "scores": []}',
    '{"query_id": 1, "boxes": [[-0.0, 0, 0, 0], [3, 3, 3, 3]], "scores": [1, 1]}',  # degenerate, ties
    '{"query_id": 1, "boxes": [[0, 0, 9007199254740993, 18446744073709551617]]}',  # ints past 2**53, 2**64
    '{"query_id": 1, "boxes": [[5e-324, 0, 1.7976931348623157e308, 1e308]]}',
    '{"query_id": 1, "box": [0, 0, 1e308, 1.5], "boxes": [[1, 2, 3, 4]]}',
    '{"query_id": 1, "mention": 2, "boxes": [[0, 0, 1, 1]], "scores": [0.1]}',
    # malformed ranked boxes
    '{"query_id": 1, "boxes": [[0, 0, NaN, 1]]}',
    '{"query_id": 1, "boxes": [[0, 0, 1, 1], [0, 0, Infinity, 1]]}',
    '{"query_id": 1, "boxes": [[0, 0, 1, 1], [-Infinity, 0, 1, 1]]}',
    '{"query_id": 1, "boxes": [[0, 0, 1, 1], [0, 0, 1e400, 1]]}',      # a float literal that overflows: inf
    '{"query_id": 1, "boxes": [[0, 0, "1", 1]]}',
    '{"query_id": 1, "boxes": [[0, 0, 1, 1], [0, true, 1, 1]]}',
    '{"query_id": 1, "boxes": [[0, 0, null, 1]]}',
    '{"query_id": 1, "boxes": [[0, 0, 1, 1], [0, 0, 1]]}',            # 3 coordinates
    '{"query_id": 1, "boxes": [[0, 0, 1, 1, 1]]}',
    '{"query_id": 1, "boxes": [[0, 0, 1, 1], [[0, 0, 1, 1]]]}',
    '{"query_id": 1, "boxes": [[0, 0, 1, 1], 7]}',
    '{"query_id": 1, "boxes": [{"x": 1}]}',
    '{"query_id": 1, "boxes": [[0, 0, 1, 1], [2, 0, 1, 1], [0, 5, 1, 1]]}',  # x2 < x1 (then y2 < y1)
    '{"query_id": 1, "boxes": [[0, 5, 1, 1]]}',
    '{"query_id": 1, "boxes": [[0, 0, 1, 1], [0, "a", 1]]}',
    '{"query_id": 1, "boxes": 5}',
    '{"query_id": 1, "boxes": {"a": [0, 0, 1, 1]}}',
    '{"query_id": 1, "boxes": "0 0 1 1"}',
    '{"query_id": 1, "boxes": [[0, 0, 1, 100000000000000000000000000000000000000000000000000000000000000000000000000'
    '000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000'
    '00000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000'
    '000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000]]}',
    # malformed scores
    '{"query_id": 1, "boxes": [[0, 0, 1, 1], [0, 0, 2, 2]], "scores": [0.1, 0.9]}',
    '{"query_id": 1, "boxes": [[0, 0, 1, 1], [0, 0, 2, 2]], "scores": [1, NaN]}',
    '{"query_id": 1, "boxes": [[0, 0, 1, 1], [0, 0, 2, 2]], "scores": [Infinity, 1]}',
    '{"query_id": 1, "boxes": [[0, 0, 1, 1], [0, 0, 2, 2]], "scores": [1, "0.5"]}',
    '{"query_id": 1, "boxes": [[0, 0, 1, 1], [0, 0, 2, 2]], "scores": [true, false]}',
    '{"query_id": 1, "boxes": [[0, 0, 1, 1], [0, 0, 2, 2]], "scores": [1, null]}',
    '{"query_id": 1, "boxes": [[0, 0, 1, 1]], "scores": [1, 2]}',
    '{"query_id": 1, "boxes": [[0, 0, 1, 1]], "scores": 1}',
    '{"query_id": 1, "scores": [1]}',
    # the single box and the rest of the line
    '{"query_id": 1, "box": [0, 0, NaN, 1]}',
    '{"query_id": 1, "box": [0, 0, 1]}',
    '{"query_id": 1, "box": [true, 0, 1, 1]}',
    '{"query_id": 1, "box": [2, 0, 1, 1]}',
    '{"query_id": 1, "box": "0 0 1 1"}',
    '{"query_id": 1, "box": [0, 0, 1, 1], "score": NaN}',
    '{"query_id": 1, "bbox": [0, 0, 1, 1], "boxes": [[0, 0, NaN, 1]]}',
    '{"query_id": 1.0, "boxes": [[0, 0, 1, 1]]}',
    '{"query_id": 1}',
]


@pytest.mark.parametrize("line", LINES)
def test_parse_line_matches_reference(tmp_path, line):
    path = tmp_path / "p.jsonl"
    path.write_text(line + "\n")
    new, ref = read_both(path)
    assert new == ref


def test_parse_overflowing_int_raises_as_before(tmp_path):
    """An integer too large for a float was an OverflowError (exit 1) and stays one, with the same message."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"query_id": 1, "boxes": [[0, 0, 1, ' + "9" * 400 + ']]}\n')
    new, ref = read_both(path)
    assert new == ref and new[0] == "OverflowError"
    path.write_text('{"query_id": 1, "boxes": [[0, 0, 1, 1]], "scores": [' + "9" * 400 + ']}\n')
    new, ref = read_both(path)
    assert new == ref and new[0] == "OverflowError"


@pytest.mark.parametrize("text", [
    "",                                                                   # empty file
    "\n \n\t\n",
    GOOD + "\n" + GOOD.replace('"query_id": 1', '"query_id": 2') + "\n",
    GOOD + '\n{"query_id": 2, "boxes": [[0, 0, 1, 1], [0, 0, NaN, 1]]}\n{"query_id": 3, "box": [\n',  # first error wins
    GOOD + "\n" + GOOD + "\n",                                           # duplicate query
    '{"query_id": 3, "mention": 0, "boxes": [[0, 0, 1, 1]]}\n{"query_id": 3, "mention": 1, "boxes": []}\n',
])
def test_read_files_match_reference(tmp_path, text):
    path = tmp_path / "p.jsonl"
    path.write_text(text)
    new, ref = read_both(path)
    assert new == ref


def test_parsed_boxes_are_tuples_of_floats(tmp_path):
    """The fast path builds the same value types as the per-coordinate one (tuples of Python floats)."""
    path = tmp_path / "p.jsonl"
    path.write_text(GOOD + "\n")
    p = read_predictions(path).queries[1]
    assert p.boxes == ((0.0, 0.0, 1.0, 1.0), (0.5, 0.25, 2.5, 3.0)) and p.scores == (2.0, 1.5)
    assert all(type(v) is float for b in p.boxes for v in b) and all(type(s) is float for s in p.scores)
    assert type(p.boxes) is tuple and all(type(b) is tuple for b in p.boxes)


# ----------------------------------------------------------------------------------------- writing
def items_in_memory():
    """Line dicts and dataclasses as callers build them (numpy, torch, ints, tuples)."""
    f32 = np.array([[0.1, 0.2, 3.3, 4.4], [1, 1, 2.5, 2.5]], dtype=np.float32)
    return [
        {"query_id": 1, "box": f32[0].tolist(), "boxes": f32.tolist(), "scores": [0.75, 0.25]},
        {"query_id": 2, "boxes": []},
        {"query_id": 3, "box": [0, 0, 1, 1], "score": 1},
        {"query_id": 4, "mention": 0, "boxes": [[0, 0, 1, 1]], "scores": [3]},
        {"query_id": 5, "boxes": [[np.float64(0.5), 0, 1, 1]]},                # a float subclass: accepted
        QueryPrediction(6, box=(0, 0, 2, 2), boxes=((0, 0, 1, 1), (1, 1, 3, 3)), scores=(2, 1)),
        QueryPrediction(7, box=torch.tensor([0.5, 0.5, 1.5, 1.5]), boxes=torch.tensor(f32)),
        QueryPrediction(8, boxes=f32.astype(np.float64), scores=np.array([1.0, 0.5]), image_id=3),
        PhrasePrediction(9, 1, box=np.array([1, 2, 3, 4])),
        QueryPrediction(10, mask=region(4, 5, (1, 3), (0, 2))),
        {"query_id": 11, "box": [1e-7, 0.1, 0.2, 0.30000000000000004], "boxes": [[1e22, 1e22, 1e23, 1e23]]},
    ]


def write_both(tmp_path, items):
    new = outcome(write_predictions, tmp_path / "new.jsonl", items)
    ref = outcome(eb._reference_write_predictions, tmp_path / "ref.jsonl", items)
    if new[0] == "ok" and ref[0] == "ok":
        return ("ok", new[1].read_bytes()), ("ok", ref[1].read_bytes())
    # Messages name the file: compare them with the file names aligned.
    return new, (ref[0], ref[1].replace("ref.jsonl", "new.jsonl"))


def test_written_files_are_byte_identical(tmp_path):
    new, ref = write_both(tmp_path, items_in_memory())
    assert new[0] == "ok" and new == ref
    # Round trip: what is read back writes the same bytes again, by both versions.
    back = read_predictions(tmp_path / "new.jsonl")
    assert write_both(tmp_path, back) == (new, new)


@pytest.mark.parametrize("bad", [
    {"query_id": 1, "box": (0, 0, 1, 1)},                         # a tuple is not a JSON list
    {"query_id": 1, "boxes": [(0, 0, 1, 1)]},
    {"query_id": 1, "boxes": [[np.float32(0.5), 0, 1, 1]]},         # not a float subclass: refused
    {"query_id": 1, "boxes": [[np.int64(0), 0, 1, 1]]},
    {"query_id": 1, "boxes": [[0, 0, 1, 1]], "scores": [np.int64(1)]},
    {"query_id": 1, "boxes": [[0, 0, float("nan"), 1]]},
    QueryPrediction(1, boxes=((0, 0, 1),)),
    QueryPrediction(1, box=(3.0, 0.0, 1.0, 1.0)),
    QueryPrediction(1, boxes=((0.0, 0.0, 1.0, 1.0), (0.0, 0.0, 2.0, 2.0)), scores=(0.0, 1.0)),
])
def test_write_errors_match_reference(tmp_path, bad):
    new, ref = write_both(tmp_path, [{"query_id": 9, "boxes": []}, bad])
    assert new == ref and new[0] != "ok"


# ---------------------------------------------------------------------------------- proposal ranks
def random_boxes(rng, n, size=12):
    """Boxes on a small grid: many ties, IoU exactly 0.5, touching edges and zero-area boxes."""
    xy = rng.integers(0, size, (n, 4)).astype(float)
    return np.concatenate([np.minimum(xy[:, :2], xy[:, 2:]), np.maximum(xy[:, :2], xy[:, 2:])], axis=1)


def random_case(seed, queries=40, max_props=15, max_targets=4):
    rng = np.random.default_rng(seed)
    props = [random_boxes(rng, int(rng.integers(0, max_props + 1))) for _ in range(queries)]
    tgts = [random_boxes(rng, int(rng.integers(0, max_targets + 1))) for _ in range(queries)]
    return props, tgts


def assert_same_ranks(new, ref):
    assert len(new) == len(ref)
    for a, b in zip(new, ref):
        assert a.dtype == b.dtype == np.int64 and a.tolist() == b.tolist()


@pytest.mark.parametrize("max_rank", [None, 0, 1, 3, 100, -2])
@pytest.mark.parametrize("seed", range(3))
def test_hit_ranks_match_reference(seed, max_rank, monkeypatch):
    props, tgts = random_case(seed)
    ref = eb._reference_proposal_hit_ranks(props, tgts, 0.5, max_rank)
    assert_same_ranks(proposal_hit_ranks(props, tgts, 0.5, max_rank), ref)
    monkeypatch.setattr(metrics, "_PAIR_CHUNK", 7)  # chunks that split groups and targets
    assert_same_ranks(proposal_hit_ranks(props, tgts, 0.5, max_rank), ref)
    if max_rank is None:  # some targets must be hit and some missed, or the comparison proves little
        flat = np.concatenate(ref)
        assert (flat == metrics.NO_HIT).any() and (flat < metrics.NO_HIT).any()


def test_hit_ranks_edge_cases():
    ref = eb._reference_proposal_hit_ranks
    cases = [
        ([], []),                                                        # no queries
        ([np.zeros((0, 4))], [np.zeros((0, 4))]),
        ([[[0, 0, 1, 1]]], [np.zeros((0, 4))]),                            # no targets
        ([np.zeros((0, 4))], [[[0, 0, 1, 1]]]),                            # no proposals
        ([[[5, 5, 6, 6], [0, 0, 2, 1]]], [[[0, 0, 1, 1], [0, 0, 2, 1]]]),  # IoU exactly 0.5 at rank 1
        ([[[0, 0, 0, 0], [1, 1, 1, 1]]], [[[0, 0, 0, 0]]]),                # degenerate: IoU 0 with itself
        ([[[0, 0, float("nan"), 1], [0, 0, 1, 1]]], [[[0, 0, 1, 1]]]),     # NaN never hits
        ([torch.tensor([[0.0, 0.0, 1.0, 1.0]])], [np.array([0.0, 0.0, 1.0, 1.0])]),  # tensor; one [4] box
    ]
    for props, tgts in cases:
        for thr in (0.5, 0.0, 1.0):
            assert_same_ranks(proposal_hit_ranks(props, tgts, thr), ref(props, tgts, thr))
    with pytest.raises(ValueError, match="2 proposal lists for 1 target lists"):
        proposal_hit_ranks([[], []], [[]])
    assert outcome(proposal_hit_ranks, [[[0, 0, 1]]], [[]]) == outcome(ref, [[[0, 0, 1]]], [[]])


def test_first_hit_ranks_on_ragged_float32():
    props, tgts = random_case(7, queries=25)
    ref = np.concatenate(eb._reference_proposal_hit_ranks(props, tgts, 0.5, 10))
    rb = [RaggedBoxes(offsets_of([len(b) for b in lists]), np.concatenate(lists).astype(np.float32))
          for lists in (props, tgts)]
    assert first_hit_ranks(rb[0], rb[1], 0.5, 10).tolist() == ref.tolist()
    with pytest.raises(ValueError, match="proposal lists for"):
        first_hit_ranks(rb[0], RaggedBoxes([0], np.zeros((0, 4))))


def test_pointit_one_box_per_query_matches_groups():
    """The array fast path (one box per query) equals the general path over one-box groups."""
    rng = np.random.default_rng(3)
    pred, gt = random_boxes(rng, 400), random_boxes(rng, 400)
    fast = pointit_hits(pred, gt)
    general = pointit_hits(pred, [g[None] for g in gt])
    assert fast.dtype == general.dtype == bool and fast.tolist() == general.tolist()
    assert 0 < fast.sum() < len(fast)  # borders and misses both occur
    assert pointit_hits(pred, torch.tensor(gt)).tolist() == fast.tolist()
    with pytest.raises(ValueError, match="400 predicted boxes for 3 ground-truth regions"):
        pointit_hits(pred, gt[:3])


# ---------------------------------------------------------------------------------------- evaluate
def eval_both(ds, path_or_preds, split, **kw):
    new = outcome(lambda: evaluate(ds, path_or_preds, split, **kw).to_dict())
    ref = outcome(lambda: eb._reference_evaluate(ds, path_or_preds, split, **kw).to_dict())
    return new, ref


OPTIONS = [{}, {"multi_box": "any"}, {"point_in": "mask"}, {"ns": (1, 2, 3)}, {"iou_threshold": 0.3}]


@pytest.mark.parametrize("kw", OPTIONS)
def test_evaluate_matches_reference_on_hand_dataset(tmp_path, kw):
    path = tmp_path / "p.jsonl"
    write_predictions(path, hand_predictions())
    ds = hand_dataset()
    for split in ("testB", "testA", "train", "all"):
        new, ref = eval_both(ds, path, split, **kw)
        assert new[0] == "ok" and new == ref


def test_evaluate_matches_reference_on_random_dataset(tmp_path):
    ds = eb.bench_dataset(120, seed=5, split="val")
    lines = eb.bench_lines(ds, "val", 10, seed=5)
    lines[3] = {"query_id": lines[3]["query_id"], "boxes": []}                   # a query with no boxes
    lines[4] = {"query_id": lines[4]["query_id"], "box": lines[4]["box"]}         # top-1 only
    path = tmp_path / "p.jsonl"
    write_predictions(path, lines)
    for kw in OPTIONS:
        new, ref = eval_both(ds, path, "val", **kw)
        assert new[0] == "ok" and new == ref
    got = evaluate(ds, path, "val").to_dict()
    assert got["proposals"]["all"]["context_objects"] > 0 and 0 < got["comprehension"]["all"]["precision@1"] < 1
    assert comprehension_of(ds, path, "val") == eb._reference_comprehension_of(ds, path, "val")


def test_evaluate_matches_reference_on_synthetic_world(tmp_path, synth_ds):
    """Real generator output: captions, relation queries, masks; ranked boxes near the objects."""
    rng = np.random.default_rng(0)
    lines = []
    for n, q in enumerate(synth_ds.queries("all")):
        if n % 7 == 6:
            continue  # missing predictions
        own = synth_ds.object_boxes[synth_ds.object_slice(q.image_id)]
        boxes = own[rng.permutation(len(own))] + rng.normal(0, 2, (len(own), 4))
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2])
        boxes = boxes.astype(np.float32).tolist()
        if q.task == "caption":
            lines += [{"query_id": q.id, "mention": m, "box": boxes[m % len(boxes)]} for m in range(len(q.mentions))]
        else:
            lines.append({"query_id": q.id, "box": boxes[0], "boxes": boxes})
    path = tmp_path / "p.jsonl"
    write_predictions(path, lines)
    for split in ("val", "testA", "testB", "train"):
        for kw in OPTIONS[:3]:
            new, ref = eval_both(synth_ds, path, split, **kw)
            assert new[0] == "ok" and new == ref


def broken_dataset(mentions) -> Dataset:
    images = [Image(1, "1.png", 10, 10, "val")]
    objects = [Object(1, 1, "circle", (0.0, 0.0, 5.0, 5.0)), Object(2, 1, "star", (5.0, 5.0, 9.0, 9.0))]
    queries = [Query(1, 1, "expression", "ok", (Mention(0, 1, "context", (2,)), Mention(0, 1, "referent", (1,))),
                     split="val"),
               Query(2, 1, "expression", "bad", mentions, split="val")]
    return Dataset.from_records("broken", images, objects, queries)


@pytest.mark.parametrize("mentions,expected", [
    ((Mention(0, 1, "context", (1,)),), "query 2 has no referent mention"),
    ((Mention(0, 1, "referent", (1, 2)),), "query 2 refers to 2 objects, expected exactly one"),
    ((Mention(0, 1, "referent", ()), Mention(0, 1, "referent", (1,))), "query 2 refers to 0 objects"),  # the first
    ((Mention(0, 1, "context", (2,)), Mention(0, 1, "referent", (2,))), None),  # fine: the referent second
    ((Mention(0, 1, "referent", (99,)),), "99"),                              # unknown object: KeyError as before
])
def test_referent_errors_match_reference(mentions, expected):
    ds = broken_dataset(mentions)
    preds = Predictions.from_items([{"query_id": 1, "box": [0, 0, 5, 5], "boxes": [[5, 5, 9, 9]]}])
    new, ref = eval_both(ds, preds, "val")
    assert new == ref
    assert new[0] == "ok" if expected is None else expected in new[1]


@pytest.mark.parametrize("items", [
    [{"query_id": 101, "box": [0, 0, 1, 1]}, {"query_id": 999, "box": [0, 0, 1, 1]},
     {"query_id": 105, "box": [0, 0, 1, 1]}],                                 # the first bad line is named
    [{"query_id": 105, "mention": 0, "box": [0, 0, 1, 1]}, {"query_id": 101, "mention": 0, "box": [0, 0, 1, 1]}],
    [{"query_id": 105, "mention": 3, "box": [0, 0, 1, 1]}, {"query_id": 105, "mention": 4, "box": [0, 0, 1, 1]}],
    [{"query_id": 102, "image_id": 1, "box": [0, 0, 1, 1]}, {"query_id": 101, "image_id": 2, "box": [0, 0, 1, 1]}],
    [{"query_id": 105, "mention": 1, "image_id": 2, "box": [0, 0, 1, 1]}],
    [{"query_id": 101, "mask": region(100, 100, (0, 1), (0, 1))},
     {"query_id": 102, "mask": region(10, 10, (0, 1), (0, 1))}],
    [{"query_id": 106, "box": [0, 0, 1, 1]}, {"query_id": 105, "mention": 3, "box": [0, 0, 1, 1]}],  # all fit
])
def test_check_against_matches_reference(tmp_path, items):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    new, ref = eval_both(hand_dataset(), path, "testB")
    assert new == ref
    assert (new[0] == "ok") == (items[0]["query_id"] == 106)  # only the last case fits


def test_sections_option(tmp_path):
    path = tmp_path / "p.jsonl"
    write_predictions(path, hand_predictions())
    ds = hand_dataset()
    full = evaluate(ds, path, "testB").to_dict()
    only = evaluate(ds, path, "testB", sections=("comprehension", "proposals")).to_dict()
    assert {k for k in only if k in full and k not in ("dataset", "split", "predictions", "options", "counts")} \
        == {"comprehension", "proposals"}
    assert only["comprehension"] == full["comprehension"] and only["proposals"] == full["proposals"]
    assert only["counts"] == full["counts"]
    assert comprehension_of(ds, path, "testB") == full["comprehension"]
    with pytest.raises(UsageError, match="unknown section"):
        evaluate(ds, path, "testB", sections=("comprehensions",))


# ------------------------------------------------------------------------------------------- bench
def test_quick_benchmark_checks_and_reports(monkeypatch):
    monkeypatch.setattr(eb, "best_time", lambda fn, repeat=1, min_time=0.0: (fn(), 0.001)[1])
    results = eb.bench_eval_scoring(True, 0)
    assert [r.name for r in results] == ["eval_write", "eval_read", "eval_score", "eval_comprehension_of"]
    assert all(r.unit == "ms" and r.figure == 1.0 and r.ratio == 1.0 for r in results)


def test_benchmark_refuses_different_bytes(monkeypatch):
    from refground.eval import predictions

    monkeypatch.setattr(predictions, "_ENCODER", json.JSONEncoder(separators=(",", ":")))
    with pytest.raises(RuntimeError, match="other bytes"):
        eb.bench_eval_scoring(True, 0)
