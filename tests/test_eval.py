"""Predictions file, evaluate() on a hand-built dataset with hand-computed figures, and `refground eval`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from refground import masks
from refground.cli.main import main
from refground.data.model import Dataset, Image, Mention, Object, Query
from refground.data.store import dataset_dir, save_dataset
from refground.errors import DataError, UsageError
from refground.eval.evaluate import evaluate
from refground.eval.predictions import (
    PhrasePrediction, Predictions, QueryPrediction, read_predictions, rle_string_counts, write_predictions,
)


def region(h, w, rows, cols) -> dict:
    m = np.zeros((h, w), dtype=bool)
    m[rows[0]:rows[1], cols[0]:cols[1]] = True
    return masks.encode(m)


def hand_dataset() -> Dataset:
    """Image 1 (100x100, testB): objects 1-4; image 2 (50x50, train): object 5.

    Object 2's mask is only the left half of its box (so PointIt in box and in mask differ); object 3 has
    no mask.
    """
    images = [Image(1, "1.png", 100, 100, "testB"), Image(2, "2.png", 50, 50, "train")]
    objects = [
        Object(1, 1, "circle", (0.0, 0.0, 10.0, 10.0), region(100, 100, (0, 10), (0, 10))),
        Object(2, 1, "square", (20.0, 20.0, 40.0, 40.0), region(100, 100, (20, 40), (20, 30))),
        Object(3, 1, "star", (50.0, 50.0, 60.0, 60.0)),
        Object(4, 1, "circle", (70.0, 70.0, 80.0, 80.0), region(100, 100, (70, 80), (70, 80))),
        Object(5, 2, "star", (0.0, 0.0, 5.0, 5.0)),
    ]
    ref = lambda *ids: Mention(0, 2, "referent", ids)  # noqa: E731
    ctx = lambda *ids: Mention(3, 5, "context", ids)  # noqa: E731
    queries = [
        Query(101, 1, "expression", "the circle", (ref(1),), kind="category", split="testB"),
        Query(102, 1, "expression", "the square left of star", (ref(2), ctx(3)), kind="relation1", split="testB"),
        Query(103, 1, "expression", "the star near circle and circle",
              (ref(3), ctx(1), Mention(5, 6, "context", (4,))), kind="relation1", split="testAB"),
        Query(104, 1, "expression", "the bottom circle", (ref(4),), kind="location", split="testB"),
        Query(105, 1, "caption", "two shapes a star the sky a circle",
              (Mention(0, 2, "referent", (1, 2)), Mention(2, 4, "referent", (3,)),
               Mention(4, 6, "referent", ()), Mention(6, 8, "context", (4,))), kind="caption", split="testB"),
        Query(106, 2, "expression", "the star", (ref(5),), kind="category", split="train"),
    ]
    return Dataset.from_records("hand", images, objects, queries)


def hand_predictions() -> list[dict]:
    return [
        {"query_id": 101, "box": [0, 0, 10, 10], "mask": region(100, 100, (0, 10), (0, 10)),
         "boxes": [[50, 50, 60, 60], [0, 0, 10, 10]], "scores": [0.9, 0.8]},
        # IoU 200/400 = 0.5 exactly (a hit); centre (30, 30) is in the box but right of the half mask
        {"query_id": 102, "box": [25, 20, 35, 40], "mask": region(100, 100, (20, 40), (20, 40)), "boxes": []},
        # IoU 25/175; centre (60, 60) on the corner of the referent box (inside)
        {"query_id": 103, "box": [55, 55, 65, 65],
         "boxes": [[0, 0, 10, 10], [55, 55, 65, 65], [70, 70, 80, 80], [50, 50, 60, 60]]},
        # 104: no prediction (a miss everywhere)
        {"query_id": 105, "mention": 0, "box": [0, 0, 40, 40]},  # the union box of objects 1 and 2
        {"query_id": 105, "mention": 1, "box": [0, 0, 1, 1]},
        {"query_id": 106, "box": [0, 0, 5, 5]},  # outside split testB
    ]


def write_lines(path, items) -> None:
    path.write_text("".join(json.dumps(i) + "\n" for i in items))


# ------------------------------------------------------------------------------------ evaluate
def test_evaluate_hand_computed_figures(tmp_path):
    ds = hand_dataset()
    path = tmp_path / "p.jsonl"
    write_lines(path, hand_predictions())
    res = evaluate(ds, path, "testB")
    d = res.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["counts"] == {"queries": 5, "expressions": 4, "captions": 1, "phrases": 3, "phrases_without_boxes": 1,
                           "predictions": 6, "predictions_in_split": 5, "predictions_outside_split": 1}

    comp = d["comprehension"]
    assert list(comp) == ["all", "category", "location", "relation1"]  # KIND_ORDER
    a = comp["all"]
    assert (a["queries"], a["scored"], a["missing"]) == (4, 3, 1)
    assert a["precision@1"] == 0.5 and a["pointit"] == 0.75
    assert a["mean_iou"] == pytest.approx((1 + 0.5 + 25 / 175 + 0) / 4)
    assert comp["relation1"]["precision@1"] == 0.5 and comp["relation1"]["mean_iou"] == pytest.approx((0.5 + 1 / 7) / 2)
    assert comp["location"] == {"queries": 1, "scored": 0, "missing": 1, "precision@1": 0.0, "pointit": 0.0,
                                "mean_iou": 0.0}

    seg = d["segmentation"]["all"]  # 103 has no gt mask; 104 missing -> empty mask
    assert (seg["queries"], seg["scored"], seg["missing"], seg["no_gt_mask"]) == (3, 2, 1, 1)
    assert seg["overall_iou"] == pytest.approx(300 / 600) and seg["mean_iou"] == pytest.approx(0.5)
    assert seg["prec@0.5"] == pytest.approx(1 / 3) and seg["prec@0.9"] == pytest.approx(1 / 3)
    assert d["segmentation"]["relation1"]["queries"] == 1 and d["segmentation"]["relation1"]["no_gt_mask"] == 1

    prop = d["proposals"]["all"]  # referent ranks: 1, none, 3, none; context: 3 none, 1 at 0, 4 at 2
    assert [prop[k] for k in ("queries", "scored", "missing", "referents", "context_objects")] == [4, 3, 1, 4, 3]
    assert [prop[f"recall@{n}"] for n in (1, 3, 5, 100)] == [0.0, 0.25, 0.5, 0.5]
    assert [prop[f"context_recall@{n}"] for n in (1, 3, 5)] == pytest.approx([1 / 3, 2 / 3, 2 / 3])
    assert d["proposals"]["category"]["context_objects"] == 0 and d["proposals"]["category"]["context_recall@1"] is None

    ph = d["phrase_grounding"]
    assert list(ph) == ["all", "caption"]
    assert ph["all"] == {"phrases": 3, "scored": 2, "missing": 1, "accuracy": pytest.approx(1 / 3),
                         "pointit": pytest.approx(1 / 3)}

    any_ = evaluate(ds, path, "testB", multi_box="any").to_dict()["phrase_grounding"]["all"]
    assert any_["accuracy"] == 0.0
    in_mask = evaluate(ds, path, "testB", point_in="mask").to_dict()
    assert in_mask["comprehension"]["all"]["pointit"] == 0.5  # 102's centre is off the half mask
    assert in_mask["phrase_grounding"]["all"]["pointit"] == pytest.approx(1 / 3)

    # tables: rich-free rows, None shown as "-"
    titles = [t.title for t in res.tables()]
    assert titles == ["comprehension: hand testB", "segmentation: hand testB", "proposal recall: referents: hand testB",
                      "proposal recall: context objects: hand testB", "phrase grounding: hand testB"]
    ctx_table = res.tables()[3]
    assert ctx_table.rows[1][0] == "category" and ctx_table.rows[1][2] == "-"
    pairs = {(r["section"], r["kind"]) for r in res.rows()}
    assert ("comprehension", "all") in pairs and ("phrase_grounding", "caption") in pairs


def test_sections_follow_what_the_file_holds(tmp_path):
    ds = hand_dataset()
    res = evaluate(ds, Predictions.from_items([{"query_id": 101, "box": [0, 0, 10, 10]}]), "testA")
    d = res.to_dict()
    assert set(d) - {"dataset", "split", "predictions", "options", "counts"} == {"comprehension"}
    assert d["comprehension"]["all"]["queries"] == 1  # testA holds only 103 (stored as testAB)
    assert d["comprehension"]["all"]["missing"] == 1 and d["counts"]["predictions_outside_split"] == 1
    # real data: kind "" -> only the "all" row
    plain = Dataset.from_records("plain", ds.images(), ds.objects(),
                                 [Query(1, 1, "expression", "it", (Mention(0, 1, "referent", (1,)),), split="val")])
    d = evaluate(plain, Predictions.from_items([{"query_id": 1, "box": [0, 0, 10, 10]}]), "val").to_dict()
    assert list(d["comprehension"]) == ["all"] and d["comprehension"]["all"]["precision@1"] == 1.0


@pytest.mark.parametrize("item,message", [
    ({"query_id": 999, "box": [0, 0, 1, 1]}, "line 1: unknown query id 999 (not in dataset hand)"),
    ({"query_id": 105, "box": [0, 0, 1, 1]}, "line 1: query 105 is a caption"),
    ({"query_id": 101, "mention": 0, "box": [0, 0, 1, 1]}, "line 1: query 101 is an expression"),
    ({"query_id": 105, "mention": 4, "box": [0, 0, 1, 1]}, "mention 4 out of range (query 105 has 4 mentions)"),
    ({"query_id": 101, "image_id": 2, "box": [0, 0, 1, 1]}, "image_id 2 does not match query 101's image 1"),
    ({"query_id": 101, "mask": region(10, 10, (0, 1), (0, 1))}, "mask size [10, 10] does not match image 1"),
])
def test_evaluate_refuses_predictions_that_do_not_fit(tmp_path, item, message):
    path = tmp_path / "p.jsonl"
    write_lines(path, [item])
    with pytest.raises(DataError) as exc:
        evaluate(hand_dataset(), path, "testB")
    assert str(exc.value).startswith(f"{path}: line 1: ") and message in str(exc.value)


def test_evaluate_usage_errors():
    ds, preds = hand_dataset(), Predictions.from_items([{"query_id": 101, "box": [0, 0, 1, 1]}])
    with pytest.raises(UsageError, match="no queries in split 'testC'"):
        evaluate(ds, preds, "testC")
    with pytest.raises(UsageError, match="unknown split 'tst'"):
        evaluate(ds, preds, "tst")
    with pytest.raises(UsageError, match="multi-box"):
        evaluate(ds, preds, "testB", multi_box="all")
    with pytest.raises(UsageError, match="point-in"):
        evaluate(ds, preds, "testB", point_in="pixel")


# ---------------------------------------------------------------------------- predictions file
def test_predictions_round_trip(tmp_path):
    items = [QueryPrediction(7, box=(1.0, 2.0, 3.5, 4.0), score=0.3, image_id=1),
             QueryPrediction(8, boxes=((0.0, 0.0, 1.0, 1.0), (0.25, 0.0, 1.0, 2.0)), scores=(2.0, 1.0),
                             mask=region(4, 5, (1, 3), (0, 2))),
             PhrasePrediction(9, 2, box=(0.1, 0.2, 0.3, 0.4)),
             {"query_id": 10, "boxes": []}]
    path = write_predictions(tmp_path / "sub" / "p.jsonl", items)
    back = read_predictions(path)
    assert back.queries[7] == items[0] and back.queries[8] == items[1] and back.phrases[(9, 2)] == items[2]
    assert back.queries[10].ranked == () and back.queries[10].top_box is None
    assert back.queries[8].top_box == (0.0, 0.0, 1.0, 1.0) and back.queries[7].ranked == ((1.0, 2.0, 3.5, 4.0),)
    assert [p.line for p in back] == [1, 2, 3, 4]
    assert json.loads(path.read_text().splitlines()[2]) == {"query_id": 9, "mention": 2, "box": [0.1, 0.2, 0.3, 0.4]}
    assert [p.name for p in path.parent.iterdir()] == ["p.jsonl"]  # atomic: no temporary left
    write_predictions(tmp_path / "again.jsonl", back)
    assert (tmp_path / "again.jsonl").read_text() == path.read_text()


@pytest.mark.parametrize("text,message", [
    ('{"query_id": 1, "box": [0, 0, 1, 1]}\n{"query_id": 2, "box": [0, 0, 1\n', "line 2: malformed JSON"),
    ('{"box": [0, 0, 1, 1]}\n', "line 1: missing query_id"),
    ('{"query_id": "7", "box": [0, 0, 1, 1]}\n', 'line 1: query_id must be an integer, got "7"'),
    ('{"query_id": 1, "box": [0, 0, 1]}\n', "line 1: box must be 4 numbers [x1, y1, x2, y2], got [0, 0, 1]"),
    ('{"query_id": 1, "box": [0, 0, NaN, 1]}\n', "line 1: box has a non-finite number"),
    ('{"query_id": 1, "box": [5, 0, 1, 1]}\n', "line 1: box [5, 0, 1, 1] has x2 < x1 or y2 < y1"),
    ('{"query_id": 1, "boxes": [[0, 0, 1, 1], [0, 1, 1]]}\n', "line 1: boxes[1] must be 4 numbers"),
    ('{"query_id": 1, "boxes": [[0, 0, 1, 1], [0, 0, 2, 2]], "scores": [0.1, 0.9]}\n', "scores must be non-increasing"),
    ('{"query_id": 1, "boxes": [[0, 0, 1, 1]], "scores": [1, 2]}\n', "scores must be a list of 1 numbers"),
    ('{"query_id": 1, "bbox": [0, 0, 1, 1]}\n', "line 1: unknown field 'bbox'"),
    ('{"query_id": 1}\n', "line 1: no box, boxes or mask for query 1"),
    ('{"query_id": 1, "mention": 0, "mask": {"size": [1, 1], "counts": "01"}}\n', "phrase lines"),
    ('{"query_id": 1, "mention": -1, "box": [0, 0, 1, 1]}\n', "mention must be >= 0"),
    ('{"query_id": 1, "mask": {"size": [2, 2], "counts": "~~~"}}\n', "mask counts are not a valid COCO RLE"),
    ('{"query_id": 1, "mask": {"size": [2, 2], "counts": [1, 2]}}\n', "mask counts cover 3 pixels, expected 2 x 2"),
    ('[1, 2]\n', "line 1: expected a JSON object"),
    ('{"query_id": 3, "box": [0, 0, 1, 1]}\n\n{"query_id": 3, "box": [0, 0, 2, 2]}\n',
     "line 3: duplicate prediction for query 3 (first on line 1)"),
    ('{"query_id": 3, "mention": 1, "box": [0, 0, 1, 1]}\n{"query_id": 3, "mention": 1, "box": [0, 0, 1, 1]}\n',
     "line 2: duplicate prediction for query 3 mention 1"),
    ("\n  \n", "empty predictions file"),
])
def test_bad_predictions_files(tmp_path, text, message):
    path = tmp_path / "p.jsonl"
    path.write_text(text)
    with pytest.raises(DataError) as exc:
        read_predictions(path)
    assert str(exc.value).startswith(f"{path}: ") and message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_missing_file_and_in_memory_validation(tmp_path):
    with pytest.raises(DataError, match="no such predictions file"):
        read_predictions(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"<predictions>: line 2: box .* has x2 < x1"):
        Predictions.from_items([QueryPrediction(1, box=(0, 0, 1, 1)), QueryPrediction(2, box=(3, 0, 1, 1))])


def test_rle_string_parser_matches_encoder():
    rng = np.random.default_rng(0)
    for _ in range(100):
        h, w = (int(v) for v in rng.integers(1, 25, 2))
        m = rng.random((h, w)) < rng.random()
        flat = m.T.reshape(-1)  # column-major runs, starting with zeros
        change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
        bounds = np.concatenate([[0], change, [flat.size]])
        runs = np.diff(bounds).tolist()
        if flat[0]:
            runs = [0] + runs
        assert rle_string_counts(masks.encode(m)["counts"]) == runs
    assert rle_string_counts("") == [] and rle_string_counts("1P") is None and rle_string_counts("0 ") is None


# ----------------------------------------------------------------------------------------- CLI
@pytest.fixture
def cli_setup(tmp_path):
    cache = tmp_path / "cache"
    save_dataset(hand_dataset(), dataset_dir("hand", cache))
    preds = tmp_path / "run" / "preds.jsonl"
    preds.parent.mkdir()
    write_lines(preds, hand_predictions())
    return cache, preds


def run(capsys, *args):
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_happy_path_table_and_json(capsys, cli_setup):
    cache, preds = cli_setup
    base = ("eval", "--predictions", preds, "--dataset", "hand", "--split", "testB", "--cache", cache)
    code, out, err = run(capsys, *base)
    assert code == 0, err
    # Shares print as percentages with one decimal (the JSON keeps the fraction)
    assert "comprehension: hand testB" in out and "relation1" in out and " 50.0 " in out and "0.5000" not in out
    written = preds.parent / "preds.eval-testB.json"
    saved = json.loads(written.read_text())
    assert saved["comprehension"]["all"]["precision@1"] == 0.5 and str(written) in err.replace("\n", "")

    code, out, _ = run(capsys, *base, "--json", "--multi-box", "any", "--point-in", "mask",
                       "--out", preds.parent / "x.json")
    assert code == 0
    payload = json.loads(out)  # exactly one JSON object on stdout
    assert payload["options"]["multi_box"] == "any" and payload["phrase_grounding"]["all"]["accuracy"] == 0.0
    assert payload["comprehension"]["all"]["pointit"] == 0.5
    assert json.loads((preds.parent / "x.json").read_text()) == payload


def test_cli_errors_are_one_line_exit_2(capsys, cli_setup, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # short relative paths in the messages
    cache, preds = "cache", "run/preds.jsonl"

    def check(args, message):
        code, out, err = run(capsys, "eval", *args, "--cache", cache)
        assert code == 2, err
        # rich folds long stderr lines at the console width; the message itself is one line
        text = " ".join(err.split())
        assert err.startswith("error: ") and text.count("error:") == 1 and message in text, err
        assert "Traceback" not in err and out == ""

    ok = ("--dataset", "hand", "--split", "testB")
    check(("--predictions", "nope.jsonl", *ok), "nope.jsonl: no such predictions file")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query_id": 101, "box": [0, 0, 1, 1]}\n{"query_id": 102,\n')
    check(("--predictions", "bad.jsonl", *ok), "bad.jsonl: line 2: malformed JSON")
    bad.write_text('{"query_id": 101, "box": [0, 0, 1]}\n')
    check(("--predictions", "bad.jsonl", *ok), "bad.jsonl: line 1: box must be 4 numbers")
    bad.write_text('{"query_id": 101, "box": [0, 0, 1, 1]}\n{"query_id": 4242, "box": [0, 0, 1, 1]}\n')
    check(("--predictions", "bad.jsonl", *ok), "bad.jsonl: line 2: unknown query id 4242")
    bad.write_text("")
    check(("--predictions", "bad.jsonl", *ok), "bad.jsonl: empty predictions file")
    check(("--predictions", preds, "--dataset", "hand", "--split", "testD"), "unknown split 'testD'")
    check(("--predictions", preds, "--dataset", "nothere", "--split", "testB"),
          "cache/nothere/dataset: no dataset here (missing manifest.json)")
    check(("--predictions", preds, *ok, "--multi-box", "all"), "--multi-box must be one of: union, any")
    check(ok, "--predictions FILE")
    assert not (tmp_path / "bad.eval-testB.json").exists()


# ------------------------------------------------------------------------ synthetic world, oracle
def oracle_items(ds: Dataset, split: str) -> list[dict]:
    """Ground truth as predictions: every figure must be 1."""
    items = []
    for q in ds.queries(split):
        if q.task == "expression":
            ref = ds.object(q.referent_object_id)
            ctx = [ds.object(o).box for m in q.mentions if m.role == "context" for o in m.object_ids]
            item = {"query_id": q.id, "box": list(ref.box), "boxes": [list(ref.box)] + [list(b) for b in ctx]}
            if ref.mask is not None:
                item["mask"] = ref.mask
            items.append(item)
        else:
            for k, m in enumerate(q.mentions):
                if m.object_ids:
                    boxes = np.array([ds.object(o).box for o in m.object_ids])
                    union = [*boxes[:, :2].min(0), *boxes[:, 2:].max(0)]
                    items.append({"query_id": q.id, "mention": k, "box": [float(v) for v in union]})
    return items


def test_oracle_predictions_score_one_on_synth(synth_ds, synth_cache, tmp_path, capsys):
    split = "testA"
    path = write_predictions(tmp_path / "oracle.jsonl", oracle_items(synth_ds, split))
    d = evaluate(synth_ds, path, split).to_dict()
    assert d["counts"]["predictions_outside_split"] == 0 and d["counts"]["expressions"] > 0
    kinds = {q.kind for q in synth_ds.queries(split, task="expression")}
    assert set(d["comprehension"]) == {"all"} | kinds
    for kind, figs in d["comprehension"].items():
        assert figs["missing"] == 0 and figs["precision@1"] == figs["pointit"] == figs["mean_iou"] == 1.0, kind
    seg = d["segmentation"]["all"]
    assert seg["overall_iou"] == seg["mean_iou"] == seg["prec@0.9"] == 1.0
    assert d["proposals"]["all"]["recall@1"] == 1.0
    if d["proposals"]["all"]["context_objects"]:
        assert d["proposals"]["all"]["context_recall@100"] == 1.0
    assert d["phrase_grounding"]["all"]["accuracy"] == 1.0 and d["phrase_grounding"]["all"]["missing"] == 0

    code = main(["eval", "-p", str(path), "--split", split, "--cache", str(synth_cache), "--json"])
    out = capsys.readouterr().out
    assert code == 0 and json.loads(out)["comprehension"]["all"]["precision@1"] == 1.0
    assert (tmp_path / f"oracle.eval-{split}.json").is_file()
