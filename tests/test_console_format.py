"""How figures are shown to people (refground.tables, cli/console.table): kinds inferred from the real
column names of the CLI's tables, one format per kind, alignment by kind; JSON keeps the fractions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from refground.tables import (AUTO, BYTES, BY_ROW, COUNT, FLOAT, MS, PERCENT, RATIO, SECONDS, TEXT, TableData,
                              column_kind, format_table, format_value, pct, unit_kind)


@pytest.mark.parametrize("value, kind, text", [
    (0.88744, PERCENT, "88.7"), (1.0, PERCENT, "100.0"), (0, PERCENT, "0.0"), (np.float32(0.5), PERCENT, "50.0"),
    (-1e-5, PERCENT, "0.0"),  # no "-0.0"
    (0.0004, PERCENT, "0.0"),  # shares keep one decimal
    (12.3456, SECONDS, "12.3"), (3725.04, SECONDS, "3,725.0"), (0.0, SECONDS, "0.0"),
    (0.004, SECONDS, "0.004"),  # a real time is never shown as nothing
    (8.5191, MS, "8.5"), (0.0437, MS, "0.044"),
    (1234, COUNT, "1,234"), (np.int64(7), COUNT, "7"), (12.0, COUNT, "12"), (2.5, COUNT, "2.500"),
    (0.168045, FLOAT, "0.1680"), (153.27, FLOAT, "153.3"), (12345.6, FLOAT, "12,346"), (0.002, FLOAT, "0.002000"),
    (1e-5, FLOAT, "1.000e-05"), (0, FLOAT, "0"), (3, FLOAT, "3"),
    (62.66, RATIO, "62.7x"), (479_031, BYTES, "467.8 KB"), (512, BYTES, "512 B"), (3 * 1024 ** 3, BYTES, "3.0 GB"),
    (None, PERCENT, "-"), (float("nan"), SECONDS, "-"), (math.inf, FLOAT, "inf"), ("-", PERCENT, "-"),
    ("4, 10.667, 20", BY_ROW, "4, 10.667, 20"), (True, AUTO, "True"), (7, AUTO, "7"), (0.25, AUTO, "0.2500"),
    (0.25, TEXT, "0.25"),
])
def test_format_value(value, kind, text):
    assert format_value(value, kind) == text


def test_pct_is_the_percent_format():
    assert pct(0.88744) == "88.7" and pct(None) == "-" and pct(float("nan")) == "-"


# Every name below is a column (or a name/value row) of a table the CLI prints, with the kind it must get.
REAL_NAMES = {
    # refground eval (refground/eval/evaluate.py: EvalResult.tables)
    "kind": TEXT, "queries": COUNT, "scored": COUNT, "missing": COUNT, "referents": COUNT, "context_objects": COUNT,
    "phrases": COUNT, "no_gt_mask": COUNT, "precision@1": PERCENT, "pointit": PERCENT, "mean_iou": PERCENT,
    "overall_iou": PERCENT, "prec@0.5": PERCENT, "prec@0.9": PERCENT, "accuracy": PERCENT, "recall@1": PERCENT,
    "recall@100": PERCENT, "context_recall@10": PERCENT,
    # train <method>: curve tables and the best epoch (methods' train_tables)
    "epoch": COUNT, "loss": FLOAT, "val precision@1": PERCENT, "val recall@10": PERCENT,
    "val context_recall@10": PERCENT, "seconds": SECONDS, "figure": TEXT, "value": BY_ROW,
    # train detector (rows of its name/value table too)
    "metric": TEXT, "referent recall": PERCENT, "context recall": PERCENT, "category accuracy": PERCENT,
    "colour accuracy": PERCENT, "size accuracy": PERCENT, "mean proposals / image": FLOAT,
    "inference images/s": FLOAT, "training seconds": SECONDS, "training images/s": FLOAT,
    # vlnms, pseudo vlnms
    "split": TEXT, "status": TEXT, "R@1": PERCENT, "R@100": PERCENT, "ctx R@5": PERCENT, "ms/image": MS,
    "pseudo/query": AUTO, "precision": PERCENT, "recall": PERCENT, "referent matched": PERCENT,
    # data stats, data synth
    "images": COUNT, "objects": COUNT, "expressions": COUNT, "captions": COUNT, "count": COUNT, "share": PERCENT,
    "mean tokens": FLOAT, "relation share of expressions": PERCENT,
    "second-order share of expressions": PERCENT,  # "second" here is no time
    "relation share": PERCENT, "objects / image (min, mean, max)": FLOAT,
    # extract, graph, cache, bench
    "images computed": COUNT, "images per second": FLOAT, "feature dim": COUNT, "path": TEXT, "features": AUTO,
    "relations gt": AUTO, "dataset": TEXT, "name": TEXT, "created": TEXT, "fingerprint": TEXT, "detail": TEXT,
    "unit": TEXT, "ratio": RATIO,
    # not figures, though they look like them
    "iou_threshold": FLOAT, "gamma": FLOAT, "step": AUTO, "size": AUTO,
}


@pytest.mark.parametrize("name, kind", list(REAL_NAMES.items()))
def test_column_kind_of_the_clis_names(name, kind):
    assert column_kind(name) == kind


@pytest.mark.parametrize("unit, kind", [("s", SECONDS), ("ms", MS), ("ms/image", MS), ("ms/query", MS),
                                        ("images/s", FLOAT), ("queries/s", FLOAT), ("batches/s", FLOAT)])
def test_bench_units(unit, kind):
    assert unit_kind(unit) == kind


def test_a_curve_table_aligned_by_kind():
    t = TableData("training curve", ["epoch", "loss", "val precision@1", "seconds"],
                  [[1, 0.168045, 0.88744, 5.58], [2, 0.156328, "-", 12.3456]])
    f = format_table(t)
    assert f.headers == ["epoch", "loss", "val precision@1", "seconds"] and f.units == ["", "", "%", ""]
    assert f.rows == [["1", "0.1680", "88.7", "5.6"], ["2", "0.1563", "-", "12.3"]]
    assert f.right == [True, True, True, True]
    assert t.rows[0][2] == 0.88744  # the data stays machine-precise


def test_units_headers_and_explicit_kinds():
    # "%" in the title: no unit under each header; underscores become spaces so long names can wrap.
    f = format_table(TableData("recall (%)", ["kind", "context_recall@10", "val"], [["all", 0.5, 0.25]],
                               [None, None, PERCENT]))
    assert f.headers == ["kind", "context recall@10", "val"] and f.units == ["", "", ""]
    assert f.rows == [["all", "50.0", "25.0"]] and f.right == [False, True, True]
    # Columns whose names say nothing of the figure (splits, expression kinds) need their kinds given.
    assert format_table(TableData("t", ["split", "all"], [["val", 0.5]])).rows == [["val", "0.5000"]]


def test_name_value_tables_take_each_rows_kind():
    t = TableData("detector", ["metric", "value"],
                  [["category accuracy", 0.9151], ["mean proposals / image", 19.875], ["training seconds", 183.04],
                   ["images", 5000], ["objects / image (min, mean, max)", "4, 10.667, 20"], ["path", "a/b"]])
    f = format_table(t)
    assert f.rows == [["category accuracy (%)", "91.5"], ["mean proposals / image", "19.88"],
                      ["training seconds", "183.0"], ["images", "5,000"],
                      ["objects / image (min, mean, max)", "4, 10.667, 20"], ["path", "a/b"]]
    assert f.right == [False, True]
    # All text: left-aligned.
    assert format_table(TableData("t", ["name", "value"], [["path", "a/b"]])).right == [False, False]


def test_rich_table_renders_the_layout():
    from rich.console import Console

    from refground.cli.console import table

    t = table("training curve", ["epoch", "loss", "val precision@1", "seconds"], [[1, 0.168045, 0.88744, 5.58]])
    assert [c.justify for c in t.columns] == ["right"] * 4
    console = Console(width=120, record=True, highlight=False)
    console.print(t)
    text = console.export_text()
    assert "88.7" in text and "0.1680" in text and "5.6" in text and "(%)" in text and "0.8874" not in text
    t = table("runs", ["run", "detail"], [["a[b]", "[bold]x"]])  # no rich markup in values
    assert [c.justify for c in t.columns] == ["left", "left"]
    console.print(t)
    text = console.export_text()
    assert "[bold]x" in text and "a[b]" in text


def test_every_eval_table_formats_by_kind(tmp_path):
    from refground.eval.evaluate import evaluate
    from test_eval import hand_dataset, hand_predictions, write_lines

    path = tmp_path / "p.jsonl"
    write_lines(path, hand_predictions())
    res = evaluate(hand_dataset(), path, "testB")
    tables = res.tables()
    assert len(tables) == 5
    for t in tables:
        f = format_table(t)
        kinds = [column_kind(c) for c in t.columns]
        assert kinds[0] == TEXT and all(k in (COUNT, PERCENT) for k in kinds[1:]), (t.title, t.columns)
        assert f.right == [False] + [True] * (len(kinds) - 1)
        for row, cells in zip(t.rows, f.rows):
            for value, kind, cell in zip(row, kinds, cells):
                if kind == PERCENT and isinstance(value, float):
                    assert cell == f"{100 * value:.1f}"
                elif kind == COUNT:
                    assert cell == str(value)
    # The JSON beside keeps fractions.
    assert json.loads(json.dumps(res.to_dict()))["comprehension"]["all"]["precision@1"] == 0.5


def test_method_tables_format_by_kind():
    from refground.methods.cmrin import train_tables as cmrin_tables
    from refground.methods.vlnms import train_tables as vlnms_tables

    curve = {"epochs": [{"epoch": 1, "loss": 0.168045, "seconds": 5.58, "val_precision@1": 0.8125,
                         "val_recall@10": 0.9, "val_context_recall@10": 0.75}]}
    best, cm_curve = map(format_table, cmrin_tables({"name": "x", "metrics": {"precision@1": 0.8125,
                                                                              "precision@1/relation2": 0.5},
                                                     "curve": curve}))
    assert best.rows == [["all", "81.2"], ["relation2", "50.0"]] and best.units == ["", "%"]
    assert cm_curve.rows == [["1", "0.1680", "81.2", "5.6"]]
    best, vl_curve = map(format_table, vlnms_tables({"name": "x", "metrics": {"recall@10": 0.9}, "curve": curve}))
    assert best.rows == [["recall@10 (%)", "90.0"]]
    assert vl_curve.rows == [["1", "0.1680", "90.0", "75.0", "5.6"]]
