"""The optional localisation ``point`` of query lines and ``loc_acc`` (LTS's localisation accuracy: the share
of queries whose heatmap maximum lies on the referent's ground-truth mask), on the hand-built dataset of
tests/test_eval.py with hand-computed figures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from refground.cli.main import main
from test_eval import hand_dataset, region, write_lines

from refground.data.store import dataset_dir, save_dataset
from refground.errors import DataError
from refground.eval.evaluate import SECTIONS, evaluate
from refground.eval.predictions import (
    FIELDS,
    Predictions,
    QueryPrediction,
    read_predictions,
    write_predictions,
)
from refground.tables import PERCENT


# ---------------------------------------------------------------------------------------- parsing
def test_point_is_parsed_and_optional(tmp_path):
    assert "point" in FIELDS
    path = tmp_path / "p.jsonl"
    write_lines(path, [{"query_id": 1, "point": [3, 4.5]},  # a point alone is a prediction
                       {"query_id": 2, "box": [0, 0, 1, 1], "point": [0.0, 1e-3]},
                       {"query_id": 3, "box": [0, 0, 1, 1]}])
    preds = read_predictions(path)
    assert preds.queries[1].point == (3.0, 4.5) and all(type(v) is float for v in preds.queries[1].point)
    assert preds.queries[1].top_box is None and preds.queries[1].ranked == ()
    assert preds.queries[2].point == (0.0, 1e-3) and preds.queries[3].point is None
    assert preds.has_points and not Predictions.from_items([{"query_id": 3, "box": [0, 0, 1, 1]}]).has_points


@pytest.mark.parametrize("point,message", [
    ("[1]", "point must be 2 numbers [x, y], got [1]"),
    ("[1, 2, 3]", "point must be 2 numbers [x, y], got [1, 2, 3]"),
    ('"1, 2"', 'point must be 2 numbers [x, y], got "1, 2"'),
    ("{\"x\": 1, \"y\": 2}", "point must be 2 numbers [x, y]"),
    ("[true, 2]", "point must be 2 numbers [x, y], got [true, 2]"),
    ('[1, "2"]', "point must be 2 numbers [x, y]"),
    ("[[1, 2]]", "point must be 2 numbers [x, y]"),
    ("null", "point must be 2 numbers [x, y], got null"),
    ("[NaN, 2]", "point has a non-finite number"),
    ("[1, Infinity]", "point has a non-finite number"),
])
def test_malformed_points_name_file_and_line(tmp_path, point, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"query_id": 1, "box": [0, 0, 1, 1]}\n\n'
                    f'{{"query_id": 2, "box": [0, 0, 1, 1], "point": {point}}}\n')
    with pytest.raises(DataError) as exc:
        read_predictions(path)
    assert str(exc.value).startswith(f"{path}: line 3: ") and message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_phrase_lines_take_no_point(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"query_id": 1, "mention": 0, "box": [0, 0, 1, 1], "point": [0, 0]}\n')
    with pytest.raises(DataError, match=r"line 1: phrase lines \(with mention\) take boxes, not points"):
        read_predictions(path)
    with pytest.raises(DataError, match="line 1: no box, boxes or mask for query 1"):
        Predictions.from_items([{"query_id": 1}])


def test_point_round_trip(tmp_path):
    items = [QueryPrediction(7, box=(1.0, 2.0, 3.5, 4.0), point=(2.25, 3.0)),
             QueryPrediction(8, mask=region(4, 5, (1, 3), (0, 2)), point=(0.5, 1.5), image_id=1),
             QueryPrediction(9, point=torch.tensor([1.5, 2.5])),  # tensors and arrays are written as floats
             QueryPrediction(10, point=np.array([4, 5], dtype=np.int64)),
             {"query_id": 11, "point": [1, 2]},
             QueryPrediction(12, box=(0.0, 0.0, 1.0, 1.0))]
    path = write_predictions(tmp_path / "p.jsonl", items)
    lines = [json.loads(t) for t in path.read_text().splitlines()]
    assert lines[0] == {"query_id": 7, "box": [1.0, 2.0, 3.5, 4.0], "point": [2.25, 3.0]}
    assert list(lines[1]) == ["query_id", "image_id", "mask", "point"]
    assert lines[2]["point"] == [1.5, 2.5] and lines[3]["point"] == [4.0, 5.0] and "point" not in lines[5]
    back = read_predictions(path)
    assert back.queries[7] == items[0] and back.queries[8] == items[1] and back.queries[12] == items[5]
    assert [back.queries[q].point for q in (9, 10, 11)] == [(1.5, 2.5), (4.0, 5.0), (1.0, 2.0)]
    write_predictions(tmp_path / "again.jsonl", back)
    assert (tmp_path / "again.jsonl").read_text() == path.read_text()
    with pytest.raises(DataError, match="<predictions>: line 1: point has a non-finite number"):
        Predictions.from_items([QueryPrediction(1, point=(float("nan"), 0.0))])


# ----------------------------------------------------------------------------------------- loc_acc
# testB of hand_dataset(): 101 "category" -> object 1 (mask rows 0-9, cols 0-9); 102 "relation1" -> object 2
# (mask rows 20-39, cols 20-29: the left half of its box); 103 "relation1" -> object 3 (no mask: left out);
# 104 "location" -> object 4 (mask rows 70-79, cols 70-79). Points are (x, y) = (col, row) pixels.
POINTS = {
    101: [9.99, 0.0],   # pixel (row 0, col 9): on the mask -> hit
    102: [30.0, 25.0],  # pixel (25, 30): in the box but right of the half mask -> miss
    103: [55.0, 55.0],  # no gt mask: not scored
    # 104: no point -> a miss
}


def point_lines(with_masks: bool) -> list[dict]:
    lines = []
    for q, pt in POINTS.items():
        line = {"query_id": q, "point": pt}
        if with_masks and q != 103:
            line["mask"] = region(100, 100, (0, 10), (0, 10))
        lines.append(line)
    lines.append({"query_id": 104, "mask": region(100, 100, (70, 80), (70, 80))} if with_masks
                 else {"query_id": 104, "box": [70, 70, 80, 80]})  # a line, but without a point
    return lines


def test_loc_acc_in_the_segmentation_section(tmp_path):
    path = tmp_path / "p.jsonl"
    write_lines(path, point_lines(with_masks=True))
    res = evaluate(hand_dataset(), path, "testB")
    d = res.to_dict()
    json.dumps(d, allow_nan=False)
    assert "localisation" not in d  # with masks, loc_acc lives in the segmentation section
    seg = d["segmentation"]
    assert list(seg) == ["all", "category", "location", "relation1"]
    # scorable: 101 (hit), 102 (miss), 104 (no point: miss) -> 1/3
    assert seg["all"]["loc_acc"] == pytest.approx(1 / 3)
    assert (seg["all"]["queries"], seg["all"]["no_gt_mask"]) == (3, 1)
    assert seg["category"]["loc_acc"] == 1.0 and seg["location"]["loc_acc"] == 0.0
    assert seg["relation1"]["loc_acc"] == 0.0 and seg["relation1"]["queries"] == 1
    assert seg["all"]["mean_iou"] is not None  # the mask figures are still there

    table = next(t for t in res.tables() if t.title.startswith("segmentation"))
    col = table.columns.index("loc_acc")
    assert table.kinds is not None and table.kinds[col] == PERCENT
    assert [r[col] for r in table.rows] == pytest.approx([1 / 3, 1.0, 0.0, 0.0])

    # a file without points has no loc_acc at all
    no_points = [{k: v for k, v in line.items() if k != "point"} for line in point_lines(with_masks=True)]
    no_points = [line for line in no_points if len(line) > 1]
    seg = evaluate(hand_dataset(), Predictions.from_items(no_points), "testB").to_dict()["segmentation"]
    assert "loc_acc" not in seg["all"]


def test_loc_acc_without_masks_has_its_own_section(tmp_path):
    path = tmp_path / "p.jsonl"
    write_lines(path, point_lines(with_masks=False))
    res = evaluate(hand_dataset(), path, "testB")
    d = res.to_dict()
    assert "localisation" in SECTIONS and "segmentation" not in d and "comprehension" in d
    loc = d["localisation"]
    assert list(loc) == ["all", "category", "location", "relation1"]
    assert loc["all"] == {"queries": 3, "scored": 2, "missing": 1, "no_gt_mask": 1, "loc_acc": pytest.approx(1 / 3)}
    assert loc["location"] == {"queries": 1, "scored": 0, "missing": 1, "no_gt_mask": 0, "loc_acc": 0.0}
    assert loc["relation1"] == {"queries": 1, "scored": 1, "missing": 0, "no_gt_mask": 1, "loc_acc": 0.0}
    assert loc["category"]["loc_acc"] == 1.0
    titles = [t.title for t in res.tables()]
    assert titles == ["comprehension: hand testB", "localisation: hand testB"]
    assert {(r["section"], r["kind"]) for r in res.rows()} >= {("localisation", "all"), ("localisation", "location")}

    # sections= picks it like any other section; split testA holds only 103 (no gt mask): nothing to score
    only = evaluate(hand_dataset(), path, "testB", sections=("localisation",)).to_dict()
    assert set(only) - {"dataset", "split", "predictions", "options", "counts"} == {"localisation"}
    a = evaluate(hand_dataset(), path, "testA").to_dict()["localisation"]["all"]
    assert a == {"queries": 0, "scored": 0, "missing": 0, "no_gt_mask": 1, "loc_acc": None}


def test_points_follow_the_pixel_convention():
    """Pixel (r, c) spans [c, c+1) x [r, r+1): x = 10.0 is already column 10, off object 1's mask (cols 0-9)."""
    ds = hand_dataset()
    for x, hit in ((9.999, 1.0), (10.0, 0.0), (0.0, 1.0)):
        preds = Predictions.from_items([{"query_id": 101, "point": [x, 5.0]}])
        assert evaluate(ds, preds, "testB").to_dict()["localisation"]["category"]["loc_acc"] == hit


def test_cli_eval_prints_and_writes_loc_acc(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one line per table row
    cache = tmp_path / "cache"
    save_dataset(hand_dataset(), dataset_dir("hand", cache))
    path = tmp_path / "p.jsonl"
    write_lines(path, point_lines(with_masks=True))
    code = main(["eval", "--predictions", str(path), "--dataset", "hand", "--split", "testB", "--cache", str(cache)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "loc acc" in out and " 33.3 " in out  # a share: printed as a percentage
    figures = json.loads((tmp_path / "p.eval-testB.json").read_text())
    assert figures["segmentation"]["all"]["loc_acc"] == pytest.approx(1 / 3)
