"""`refground report supervision`: the methods side by side by supervision level, scored through the registry
and the one metric module. Toy methods stand in for the real ones (nothing is trained here)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from conftest import fail, ref_iou
from refground.errors import ArtifactError
from refground.eval import supervision as sup
from refground.methods import Method, Option, register, train_command, unregister

EXPR_SPLITS = ("val", "testA", "testB")
PHRASE_SPLITS = ("test",)
TOY_VARIANTS = ("small", "cmrin")




def _shifted(box):
    """The box moved right by its own width: IoU 0 with it."""
    w = box[2] - box[0]
    return [box[0] + w, box[1], box[2] + w, box[3]]


def _box_rule(qid: int, options: dict) -> bool:
    """Whether the toy box method answers query ``qid`` right: another rule per candidate set, so that the
    rows of the two CMRIN settings differ when their options reach predict."""
    return qid % (2 if options.get("candidates") == "vlnms" else 3) != 0


@pytest.fixture
def cache(synth_cache, tmp_path) -> Path:
    """A cache of its own (the report writes into it) holding the fixture dataset."""
    root = tmp_path / "cache"
    shutil.copytree(synth_cache / "synth" / "dataset", root / "synth" / "dataset")
    return root


def _train(cache: Path, method: str, run: str) -> None:
    """A run folder with weights: what the report (and every method's loader) takes for a trained run."""
    d = cache / "synth" / "runs" / method / run
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.pt").write_bytes(b"toy")


def _proposal_sets(cache: Path, run: str = "fc-bce", splits=EXPR_SPLITS) -> None:
    for s in splits:
        p = cache / "synth" / "vlnms" / run / f"{s}.h5"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"toy")


@pytest.fixture
def toys(tmp_path):
    """Toy methods: box (comprehension, CMRIN's candidate options), phrase (captions), mask (a mask and a box per
    expression, like LTS) and bad (predictions naming an unknown query). Each predict refuses a run without
    weights, as the real ones do, and records its calls."""
    from refground.data.store import load_named
    from refground.eval.predictions import write_predictions
    from refground.grounding.candidates import query_proposals_path
    from refground.runs import resolve_run

    calls: list[dict] = []
    out_dir = tmp_path / "preds"
    out_dir.mkdir()

    def check_run(method, dataset, cache, run):
        if run != "class-name" and not (resolve_run(run, method, dataset, cache).path / "model.pt").is_file():
            raise ArtifactError(f"runs/{method}/{run}: missing; run `refground train {method} --run {run}`")

    def make_predict(name, lines_of):
        def predict(dataset, cache, run, jobs, *, force=False):
            check_run(name, dataset, cache, run)
            ds = load_named(dataset, cache)
            out = []
            for split, opts in jobs:
                calls.append({"method": name, "run": run, "split": split, "options": dict(opts), "force": force})
                if opts.get("candidates") == "vlnms":
                    p = query_proposals_path(dataset, cache, opts["vlnms_run"], split)
                    if not p.is_file():
                        raise ArtifactError(f"{p}: missing; run `refground vlnms --split {split}`")
                tag = "-".join(f"{k}{v}" for k, v in sorted(opts.items())) or "plain"
                path = write_predictions(out_dir / f"{name}.{run}.{split}.{tag}.jsonl", lines_of(ds, split, opts))
                out.append({"path": str(path), "split": split, "status": "written"})
            return out
        return predict

    def box_lines(ds, split, opts):
        return [{"query_id": q.id, "box": list(b) if _box_rule(q.id, opts) else _shifted(b)}
                for q in ds.queries(split, "expression") for b in [ds.object(q.referent_object_id).box]]

    def phrase_lines(ds, split, opts):
        # The first object's box of every phrase: right for singular phrases, short of a plural's union box.
        return [{"query_id": q.id, "mention": k, "box": list(ds.object(m.object_ids[0]).box)}
                for q in ds.queries(split, "caption") for k, m in enumerate(q.mentions) if m.object_ids]

    def mask_lines(ds, split, opts):
        lines = []
        for q in ds.queries(split, "expression"):
            o = ds.object(q.referent_object_id)
            # The exact mask (segmentation 100%) with a box right only for even ids: Precision@1 must be the box's.
            lines.append({"query_id": q.id, "mask": o.mask, "box": list(o.box) if q.id % 2 == 0 else _shifted(o.box)})
        return lines

    def bad_lines(ds, split, opts):
        return [{"query_id": 10 ** 9, "box": [0, 0, 1, 1]}]

    candidates = (Option("candidates", str, "gt", "Candidates.", choices=("gt", "proposals", "vlnms")),
                  Option("top_n", int, 10, "Top n."), Option("vlnms_run", str, "fc-bce", "Proposal set."))
    methods = [
        Method(name="toy-box", paper="", task="comprehension", summary="", variants=TOY_VARIANTS,
               predict=make_predict("toy-box", box_lines), predict_options=candidates),
        Method(name="toy-phrase", paper="", task="phrase grounding", summary="",
               predict=make_predict("toy-phrase", phrase_lines)),
        Method(name="toy-mask", paper="", task="segmentation", summary="",
               predict=make_predict("toy-mask", mask_lines)),
        Method(name="toy-bad", paper="", task="comprehension", summary="", predict=make_predict("toy-bad", bad_lines)),
    ]
    for m in methods:
        register(m)
    yield calls
    for m in methods:
        unregister(m.name)


def toy_rows(bicm: str = "toy-absent") -> tuple[sup.RowSpec, ...]:
    """The report's rows with the toy methods in place of the real ones (the same options and run keys)."""
    methods = {"baseline": "toy-box", "cmrin": "toy-box", "vlnms": "toy-box", "reir": "toy-phrase", "lts": "toy-mask",
               "bicm": bicm}
    return tuple(dataclasses.replace(r, method=methods[r.key]) for r in sup.ROWS)


def _train_all(cache: Path) -> None:
    for method, run in (("toy-box", "cmrin"), ("vlnms", "fc-bce"), ("toy-phrase", "reir"), ("toy-mask", "lts")):
        _train(cache, method, run)
    _proposal_sets(cache)


def _rows(res) -> dict[str, dict]:
    return {r["key"]: r for r in res["json"]["rows"]}


def test_rows_are_the_methods_as_specified():
    by_key = {r.key: r for r in sup.ROWS}
    assert list(by_key) == ["baseline", "cmrin", "vlnms", "reir", "lts", "bicm"]
    assert {k: (r.method, r.supervision) for k, r in by_key.items()} == {
        "baseline": ("bicm", "none (baseline)"), "cmrin": ("cmrin", "boxes paired"),
        "vlnms": ("cmrin", "boxes paired"), "reir": ("reir", "captions only"), "lts": ("lts", "masks paired"),
        "bicm": ("bicm", "nothing paired")}
    runs = sup.resolve_runs(None, sup.ROWS)
    assert runs == {"baseline": "class-name", "cmrin": "cmrin", "vlnms": "fc-bce", "reir": "reir", "lts": "lts",
                    "bicm": "bicm"}
    assert by_key["cmrin"].predict_options(runs) == {"candidates": "proposals", "top_n": 10}
    assert by_key["vlnms"].predict_options(runs) == {"candidates": "vlnms", "top_n": 10, "vlnms_run": "fc-bce"}
    # The options are CMRIN's own (names and choices), so the rows take the path of `eval --method cmrin`.
    from refground.methods import get_method

    cmrin = {o.name: o for o in get_method("cmrin").predict_options}
    assert {"proposals", "vlnms"} <= set(cmrin["candidates"].choices) and cmrin["top_n"].default == 10
    assert "vlnms_run" in cmrin
    assert not by_key["reir"].expressions and by_key["reir"].phrases


def test_figures_equal_evaluate_of_the_same_predictions(toys, cache, synth_ds):
    from refground.eval.evaluate import evaluate

    _train_all(cache)
    res = sup.supervision_report("synth", cache, None, rows=toy_rows())
    rows = _rows(res)
    assert [r["status"] for r in rows.values()] == ["scored"] * 5 + ["not available"]
    assert "not registered" in rows["bicm"]["message"]
    cols = sup.columns(EXPR_SPLITS, PHRASE_SPLITS)
    assert res["json"]["columns"] == cols == ["val Precision@1", "testA Precision@1", "testB Precision@1",
                                              "test phrase Acc", "test PointIt"]
    for key, r in rows.items():
        for split, pred in r["predictions"].items():  # every figure is evaluate()'s of the file predict wrote
            result = evaluate(synth_ds, pred["path"], split)
            if split in EXPR_SPLITS and key != "reir":
                cell = r["cells"][EXPR_SPLITS.index(split)]
                assert cell == result.sections["comprehension"]["all"]["precision@1"], (key, split)
            if split in PHRASE_SPLITS:
                got = r["cells"][3:5]
                want = ([result.sections["phrase_grounding"]["all"][k] for k in ("accuracy", "pointit")]
                        if "phrase_grounding" in result.sections else [None, None])
                assert got == want, (key, split)
    # ... and the figures themselves, counted by hand.
    for key in ("baseline", "cmrin", "vlnms"):
        opts = rows[key]["options"]
        for i, split in enumerate(EXPR_SPLITS):
            qs = synth_ds.queries(split, "expression")
            assert rows[key]["cells"][i] == pytest.approx(sum(_box_rule(q.id, opts) for q in qs) / len(qs))
    assert rows["cmrin"]["cells"][:3] != rows["vlnms"]["cells"][:3]  # the candidate options reached predict
    phrases = [(q, m) for q in synth_ds.queries("test", "caption") for m in q.mentions if m.object_ids]
    hits = 0
    for _q, m in phrases:
        boxes = [synth_ds.object(o).box for o in m.object_ids]
        union = [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]
        hits += ref_iou(boxes[0], union) >= 0.5
    assert rows["reir"]["cells"] == [None, None, None, pytest.approx(hits / len(phrases)), 1.0]
    assert 0 < hits < len(phrases)
    # LTS: the mask box's Precision@1 (the comprehension section), not the masks' figures.
    for i, split in enumerate(EXPR_SPLITS):
        qs = synth_ds.queries(split, "expression")
        assert rows["lts"]["cells"][i] == pytest.approx(sum(q.id % 2 == 0 for q in qs) / len(qs))
        assert rows["lts"]["figures"][split]["segmentation"]["overall_iou"] == 1.0
    # Sections a method's predictions lack are None ("-"): the box baseline writes no phrase lines.
    assert rows["baseline"]["cells"][3:] == [None, None] and rows["bicm"]["cells"] == [None] * 5
    # What each predict was asked: the row's options, its splits, no --force.
    asked = {(c["method"], c["run"], c["split"], tuple(sorted(c["options"].items())), c["force"]) for c in toys}
    assert asked == {
        *(("toy-box", "class-name", s, (), False) for s in (*EXPR_SPLITS, "test")),
        *(("toy-box", "cmrin", s, (("candidates", "proposals"), ("top_n", 10)), False) for s in EXPR_SPLITS),
        *(("toy-box", "cmrin", s, (("candidates", "vlnms"), ("top_n", 10), ("vlnms_run", "fc-bce")), False)
          for s in EXPR_SPLITS),
        ("toy-phrase", "reir", "test", (), False),
        *(("toy-mask", "lts", s, (), False) for s in EXPR_SPLITS),
    }

    # The table, the markdown, the JSON beside it and the chart.
    md = Path(res["markdown_path"])
    assert md == cache / "synth" / "report" / "supervision.md"
    table = res["tables"][0]
    assert table.columns == ["row", "supervision", "method", "run", *cols, "status"]
    assert [t[4:9] for t in table.rows] == [r["cells"] for r in rows.values()]
    assert len(res["tables"]) == 2 and res["tables"][1].rows[0][:2] == ["BiCM", "not available"]
    text = md.read_text()
    assert "| LTS, mask box | masks paired | toy-mask | lts |" in text and "![" in text
    assert f"{100 * rows['cmrin']['cells'][0]:.1f}" in text
    assert json.loads(md.with_suffix(".json").read_text()) == res["json"]
    from PIL import Image

    png = md.with_name("supervision_bars.png")
    assert res["json"]["png"] == str(png)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == sup.BARS_SIZE


def test_missing_runs_are_rows_with_the_command_that_makes_them(toys, cache):
    res = sup.supervision_report("synth", cache, cache / "r.md", rows=toy_rows(), splits="val,testB")
    rows = _rows(res)
    assert {k: r["status"] for k, r in rows.items()} == {
        "baseline": "scored", "cmrin": "not trained", "vlnms": "not trained", "reir": "not trained",
        "lts": "not trained", "bicm": "not available"}
    assert rows["cmrin"]["command"] == train_command("toy-box", "synth", "cmrin", TOY_VARIANTS) == \
        "refground train toy-box --variant cmrin"
    assert rows["reir"]["command"] == "refground train toy-phrase --run reir"
    assert rows["vlnms"]["command"] == ("refground train toy-box --variant cmrin && refground train vlnms --run "
                                        "fc-bce && refground vlnms --run fc-bce --split val --split testB")
    assert all(c is None for k in ("cmrin", "vlnms", "reir", "lts") for c in rows[k]["cells"])
    text = Path(res["markdown_path"]).read_text()
    assert "not trained: `refground train toy-mask --run lts`" in text
    # CMRIN and VL-NMS trained, one proposal set missing: that set's `refground vlnms` step.
    _train(cache, "toy-box", "cmrin")
    _train(cache, "vlnms", "fc-bce")
    _proposal_sets(cache, splits=("val",))
    rows = _rows(sup.supervision_report("synth", cache, cache / "r.md", rows=toy_rows(), splits="val,testB"))
    assert rows["cmrin"]["status"] == "scored"
    assert (rows["vlnms"]["status"], rows["vlnms"]["command"]) == ("not scored",
                                                                    "refground vlnms --run fc-bce --split testB")
    assert "testB.h5: missing" in rows["vlnms"]["message"]
    # Predictions that do not fit the dataset: the row says so; the report stands.
    _train(cache, "toy-bad", "bicm")
    rows = _rows(sup.supervision_report("synth", cache, cache / "r.md", rows=toy_rows(bicm="toy-bad")))
    assert rows["bicm"]["status"] == "not scored" and "unknown query id" in rows["bicm"]["message"]
    assert rows["bicm"]["command"] == ""


def test_run_names_force_and_option_errors(toys, cache):
    from refground.errors import UsageError

    _train_all(cache)
    _train(cache, "toy-box", "other")
    rows = _rows(sup.supervision_report("synth", cache, cache / "r.md", runs={"cmrin": "other", "lts": None},
                                        rows=toy_rows(), force=True, phrase_splits=""))
    assert rows["cmrin"]["run"] == rows["vlnms"]["run"] == "other" and rows["lts"]["run"] == "lts"
    assert {c["force"] for c in toys} == {True} and {c["run"] for c in toys if c["method"] == "toy-box"} == {
        "class-name", "other"}
    assert rows["reir"]["status"] == "not scored" and rows["reir"]["cells"] == [None] * 3  # no phrase column asked
    with pytest.raises(UsageError, match="unknown run key"):
        sup.supervision_report("synth", cache, None, runs={"detector": "x"}, rows=toy_rows())
    with pytest.raises(UsageError, match="unknown split"):
        sup.supervision_report("synth", cache, None, splits="val,bogus", rows=toy_rows())
    with pytest.raises(UsageError, match="both empty"):
        sup.supervision_report("synth", cache, None, splits="", phrase_splits="", rows=toy_rows())
    with pytest.raises(UsageError, match="no caption queries"):
        sup.supervision_report("synth", cache, None, phrase_splits="testC", rows=toy_rows())
    with pytest.raises(UsageError, match="empty run name"):
        sup.supervision_report("synth", cache, None, runs={"cmrin": " "}, rows=toy_rows())
    (cache / "afile").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        sup.supervision_report("synth", cache, None, runs={"lts": str(cache / "afile")}, rows=toy_rows())
    # An option the method does not declare (a renamed option, say): the row is not available.
    odd = tuple(dataclasses.replace(r, options=(("depth", 3),)) if r.key == "cmrin" else r for r in toy_rows())
    rows = _rows(sup.supervision_report("synth", cache, cache / "r.md", rows=odd))
    assert rows["cmrin"]["status"] == "not available" and "--depth" in rows["cmrin"]["message"]


def test_bars_draw_one_bar_per_figure():
    rows = [{"label": "a", "supervision": "x", "cells": [0.5, None, 0.25]},
            {"label": "b", "supervision": "y", "cells": [None, None, None]},
            {"label": "c", "supervision": "z", "cells": [0.1, 0.2, 0.3]}]
    fig = sup.bars_figure("synth", rows, ("val",), ("test",))  # columns: val Precision@1, test Acc and PointIt
    (ax,) = fig.axes
    heights = sorted(round(p.get_height(), 6) for p in ax.patches)
    assert heights == sorted(round(100 * v, 6) for r in rows for v in r["cells"] if v is not None)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a: x", "c: z"]
    empty = sup.bars_figure("synth", [rows[1]], ("val",), ("test",))
    assert not empty.axes[0].patches and any(t.get_text() == "no data" for t in empty.axes[0].texts)


def test_cli(toys, cache, monkeypatch, capsys, tmp_path):
    from typer.testing import CliRunner

    from refground.cli.main import build_app

    _train_all(cache)
    monkeypatch.setattr(sup, "ROWS", toy_rows())
    out = tmp_path / "rep" / "sup.md"
    args = ["report", "supervision", "--cache", str(cache), "--out", str(out), "--lts-run", "nope"]
    res = CliRunner().invoke(build_app(), [*args, "--json"])
    assert res.exit_code == 0, res.output
    js = json.loads(res.stdout)
    assert js == json.loads(out.with_suffix(".json").read_text())
    by_key = {r["key"]: r for r in js["rows"]}
    assert by_key["lts"]["status"] == "not trained"
    assert by_key["lts"]["command"] == "refground train toy-mask --run nope"
    assert by_key["cmrin"]["status"] == "scored" and out.with_name("sup_bars.png").is_file()
    # The table (a second run overwrites the report's own files).
    res = CliRunner().invoke(build_app(), args, env={"COLUMNS": "200", "TERM": "dumb"})
    assert res.exit_code == 0, res.output
    assert "supervision level" in res.stdout and "masks paired" in res.stdout and "Rows without figures" in res.stdout
    # Outputs that are not the report's own are refused before anything is computed.
    toys.clear()
    c = ("--cache", str(cache))
    assert "is a folder" in fail(capsys, "report", "supervision", *c, "--out", str(tmp_path))
    assert "must end in .md" in fail(capsys, "report", "supervision", *c, "--out", str(tmp_path / "x.txt"))
    (tmp_path / "mine.json").write_text('{"notes": 1}')
    assert "not an output of this command" in fail(capsys, "report", "supervision", *c, "--out",
                                                  str(tmp_path / "mine.md"))
    (tmp_path / "two_bars.png").write_text("not a picture")
    assert "not an output of this command" in fail(capsys, "report", "supervision", *c, "--out",
                                                  str(tmp_path / "two.md"))
    assert "unknown split" in fail(capsys, "report", "supervision", *c, "--splits", "val,nope")
    assert toys == [] and not (tmp_path / "mine.md").exists() and not (tmp_path / "two.md").exists()


def test_a_method_named_supervision_does_not_take_the_report(tmp_path):
    from typer.testing import CliRunner

    from refground.cli.main import build_app

    def report(dataset, cache, out):
        raise AssertionError("the method's report must not run")

    register(Method(name="supervision", paper="", task="comprehension", summary="", report=report))
    try:
        res = CliRunner().invoke(build_app(), ["report", "supervision", "--help"], env={"COLUMNS": "200"})
    finally:
        unregister("supervision")
    assert res.exit_code == 0 and "--phrase-splits" in res.stdout and "--bicm-run" in res.stdout
