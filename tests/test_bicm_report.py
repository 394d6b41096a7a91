"""BiCM's report and figure (refground.methods.bicm.report / figures), nothing trained: the report end to end on
hand-written predictions (predict_bicm_many faked, every figure through the real evaluator), the lambda_t rows
through the real box rules on crafted module scores against a slow reference, Table 7 from a pseudo manifest,
missing-run and missing-pseudo rows, the bars, and the figure's drawing on a crafted map and boxes."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import ref_iou

# The package's ``report`` is the registry's callable; the module is imported by its full name.
rr = importlib.import_module("refground.methods.bicm.report")

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SPLITS = ("val", "testB")
PHRASE_SPLIT = "test"
FAR = [0.0, 0.0, 4.0, 4.0]  # a 4x4 corner box: IoU < 0.5 with every object of the fixture (checked)


# ============================================================================================ helpers


def _union(ds, ids) -> list[float]:
    b = ds.object_boxes[[ds.object_row(o) for o in ids]].astype(float)
    return [b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()]


def _hit(how: str, k: int) -> bool:
    """Whether line ``k`` of a fake file of kind ``how`` holds the truth: ``exact`` all, ``far`` none, ``half``
    the even lines, ``third`` every third line."""
    return {"exact": True, "far": False, "half": k % 2 == 0, "third": k % 3 == 0}[how]


def _fake_lines(ds, split: str, how: str) -> list[dict]:
    lines = []
    for k, q in enumerate(ds.queries(split, "expression")):
        truth = _union(ds, [q.referent_object_id])
        lines.append({"query_id": q.id, "box": truth if _hit(how, k) else FAR})
    k = 0
    for q in ds.queries(split, "caption"):
        for i, m in enumerate(q.mentions):
            if m.object_ids:
                lines.append({"query_id": q.id, "mention": i,
                              "box": _union(ds, m.object_ids) if _hit(how, k) else FAR})
                k += 1
    return lines


def _expected(ds, split: str, how: str, kind: str = "all") -> float:
    """Precision@1 of the fake file by a loop: IoU >= 0.5 with the referent's box, over the expressions of
    ``kind``."""
    boxes = {ln["query_id"]: ln["box"] for ln in _fake_lines(ds, split, how) if "mention" not in ln}
    hits = [ref_iou(boxes[q.id], _union(ds, [q.referent_object_id])) >= 0.5
            for q in ds.queries(split, "expression") if kind in ("all", q.kind)]
    return sum(hits) / len(hits)


def _expected_phrases(ds, split: str, how: str) -> tuple[float, float]:
    """(Acc, PointIt) of the fake file's phrases by a loop: IoU >= 0.5 with the union of the phrase's boxes; the
    box centre inside one of them (borders inside)."""
    boxes = {(ln["query_id"], ln["mention"]): ln["box"] for ln in _fake_lines(ds, split, how) if "mention" in ln}
    acc, point = [], []
    for q in ds.queries(split, "caption"):
        for i, m in enumerate(q.mentions):
            if not m.object_ids:
                continue
            b = boxes[(q.id, i)]
            acc.append(ref_iou(b, _union(ds, m.object_ids)) >= 0.5)
            cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
            gts = [_union(ds, [o]) for o in m.object_ids]
            point.append(any(g[0] <= cx <= g[2] and g[1] <= cy <= g[3] for g in gts))
    return sum(acc) / len(acc), sum(point) / len(point)


# (name, rule) -> how: the paper's rule and argmax give different files for some rows
HOW = {("class-name", "largest"): "far", ("class-name", "argmax"): "third", ("qam", "largest"): "third",
       ("qam", "argmax"): "far", ("com", "largest"): "half", ("com", "argmax"): "third",
       ("qam-com-sf", "largest"): "exact", ("qam-com-sf", "argmax"): "half", ("bicm", "largest"): "exact",
       ("bicm", "argmax"): "exact"}


def _how(name: str, rule: str) -> str:
    return HOW.get((name, rule), "half" if rule == "largest" else "far")


class FakeInputs:
    """What the report's lambda_t rows and timings read of :class:`refground.methods.bicm.run.Inputs`: the dataset,
    two proposals per val expression (its referent's box, then :data:`FAR`) and no parent artifacts."""

    def __init__(self, dataset, cache, *args, **kwargs):
        from refground.data.store import dataset_dir, load_dataset

        self.dataset, self.cache, self.features, self.clip_name = dataset, cache, "detector-default", "clip-fake"
        self.ds_dir = dataset_dir(dataset, cache)
        self.ds = load_dataset(self.ds_dir)
        qs = self.ds.queries("val", "expression")
        boxes = [b for q in qs for b in (_union(self.ds, [q.referent_object_id]), FAR)]
        self.props = SimpleNamespace(boxes=np.array(boxes, np.float32).reshape(-1, 4),
                                     labels=np.zeros(len(boxes), np.int64), class_names=["thing"])

    def parents(self):
        return {}


D_VALUES = (5e-5, 2e-4, 4.5e-3, 6e-4, 6e-3, 4.5e-2, 7e-2, 2e-3, 5.5e-4)  # S^TD of the truth: lambda_t decides


def _crafted_scores(ds):
    """Module scores of the val expressions: candidates (truth, far) + P_t (the whole image): S^BU 0, 0.5, 0.3;
    S^TD d_i, 0, 0 (d_i from :data:`D_VALUES`)."""
    from refground.methods.bicm.modules import ModuleScores

    qs = ds.queries("val", "expression")
    q = len(qs)
    d = np.array([D_VALUES[i % len(D_VALUES)] for i in range(q)], np.float32)
    size = [[0, 0, float(ds.image(x.image_id).width), float(ds.image(x.image_id).height)] for x in qs]
    arrays = {"image_rows": np.zeros(q, np.int64), "prop_rows": np.arange(2 * q).reshape(q, 2),
              "valid": np.ones((q, 2), bool), "s_pq": np.tile(np.float32([0.0, 0.25]), (q, 1)),
              "s_cq": np.tile(np.float32([0.0, 0.25]), (q, 1)), "td_qa": np.stack([d, np.zeros(q, np.float32)], 1),
              "pt_box_qa": np.array(size, np.float32), "pt_pq_qa": np.full(q, 0.1, np.float32),
              "pt_cq": np.full(q, 0.2, np.float32), "pt_td_qa": np.zeros(q, np.float32),
              "pt_class": np.zeros(q, np.int64)}
    return ModuleScores(arrays), np.array([x.id for x in qs], np.int64), d, size


def _slow_lambda(ds, lambda_t: float, rule: str) -> float:
    """Precision@1 of the crafted scores at ``lambda_t`` by a loop: score = S^BU + lambda_t S^TD; argmax: the top;
    largest: the largest-area candidate strictly above the mean score (the first on ties)."""
    _, _, d, size = _crafted_scores(ds)
    hits = 0
    for i, q in enumerate(ds.queries("val", "expression")):
        truth = _union(ds, [q.referent_object_id])
        cands = [truth, FAR, size[i]]
        scores = [lambda_t * float(d[i]), 0.5, 0.3]
        if rule == "argmax":
            pick = cands[max(range(3), key=lambda j: (scores[j], -j))]
        else:
            mean = sum(scores) / 3
            above = [j for j in range(3) if scores[j] > mean]
            area = [(c[2] - c[0]) * (c[3] - c[1]) for c in cands]
            pick = cands[max(above, key=lambda j: (area[j], -j))]
        hits += ref_iou(pick, truth) >= 0.5
    return hits / len(size)


def _write_pseudo_manifest(cache: Path, table7: list[dict]) -> None:
    from refground.cache import write_manifest
    from refground.methods.bicm.pseudo import pseudo_path

    path = pseudo_path("synth", cache)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"labels")
    write_manifest(path, step="pseudo.bicm@1", params={}, parents={}, fingerprint="fake-pseudo", kind="pseudo",
                   extra={"images": 16, "distinct_queries": 9, "seconds": 3.2, "table7": table7, "judged_all": 1.0})


def _fake_run(cache: Path, name: str = "bicm") -> None:
    """A complete run folder ``runs/bicm/<name>`` (config and placeholder weights)."""
    from refground.cache import write_manifest
    from refground.methods.bicm.model import variant_config

    path = cache / "synth" / "runs" / "bicm" / name
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(variant_config("bicm").to_dict()))
    (path / "model.pt").write_bytes(b"weights")
    write_manifest(path, step="train.bicm@1", params={}, parents={}, fingerprint=f"fake-{name}", kind="runs/bicm")


@pytest.fixture
def fake_cache(synth_cache, synth_ds, tmp_path, monkeypatch):
    """A cache with the fixture dataset; predict_bicm_many writes hand-written files (recorded in ``calls``),
    Inputs and split_scores are the fakes above."""
    from refground.eval.predictions import write_predictions
    from refground.methods.bicm import run as bicm_run

    cache = tmp_path / "cache"
    shutil.copytree(synth_cache / "synth" / "dataset", cache / "synth" / "dataset")
    calls: list[tuple[str, str, str, tuple[str, ...]]] = []

    def fake_predict(dataset, cache_, name, splits, box_rule="largest", phrase_box_rule="union", features=None,
                     clip=None, force=False, kinds=("expression", "phrase")):
        assert (box_rule, phrase_box_rule) in (("largest", "union"), ("argmax", "argmax"))
        calls.append((name, box_rule, phrase_box_rule, tuple(splits)))
        out = []
        for s in splits:
            p = write_predictions(tmp_path / "preds" / name / f"{s}.{box_rule}.jsonl",  # a file per rule, as the real
                                  _fake_lines(synth_ds, s, _how(name, box_rule)))
            out.append({"path": str(p), "split": s, "status": "written"})
        return out

    def fake_scores(inp, split, kind, thr_a=0.7, force=False):
        assert (split, kind) == ("val", "expression")
        ms, qids, _, _ = _crafted_scores(inp.ds)
        return ms, qids, np.full(len(qids), -1)

    monkeypatch.setattr(bicm_run, "predict_bicm_many", fake_predict)
    monkeypatch.setattr(bicm_run, "Inputs", FakeInputs)
    monkeypatch.setattr(bicm_run, "split_scores", fake_scores)
    return SimpleNamespace(cache=cache, calls=calls, tmp=tmp_path)


# ============================================================================================ report
def test_crafted_boxes_are_what_the_slow_reference_assumes(synth_ds):
    for q in synth_ds.queries("val", "expression"):
        truth = _union(synth_ds, [q.referent_object_id])
        assert ref_iou(FAR, truth) < 0.5
        img = synth_ds.image(q.image_id)
        assert ref_iou([0, 0, img.width, img.height], truth) < 0.5
    # the rules and lambda_t give different figures on the crafted scores (so the table can show a mix-up)
    figs = {(lt, r): _slow_lambda(synth_ds, lt, r) for lt in (10.0, 100.0) for r in ("largest", "argmax")}
    assert len(set(figs.values())) >= 3


def test_report_end_to_end_on_fake_predictions(fake_cache, synth_ds):
    from refground.eval.evaluate import evaluate
    from refground.methods.bicm import run as bicm_run

    cache = fake_cache.cache
    _fake_run(cache)
    table7 = [{"thr_k": 0.6, "labels": 12, "judged": 12, "precision": 0.5},
              {"thr_k": 0.9, "labels": 4, "judged": 3, "precision": 0.6667}]
    _write_pseudo_manifest(cache, table7)
    inp = FakeInputs("synth", cache)
    mod = bicm_run.modules_path(inp, "val", "expression")  # a measured module pass
    mod.parent.mkdir(parents=True)
    mod.write_bytes(b"scores")
    from refground.cache import write_manifest

    write_manifest(mod, step="bicm.modules@1", params={}, parents={}, fingerprint="fake-mod", kind="bicm",
                   extra={"pairs": 15, "seconds": 0.3, "ms_per_query": 20.0})

    out = fake_cache.tmp / "r.md"
    res = rr.bicm_report("synth", cache, out, splits="val,testB", phrase_split="test", run="bicm")
    js = res["json"]

    # every row predicted once per rule on each expression split and the phrase split (a file per rule)
    calls = fake_cache.calls
    names = {c[0] for c in calls}
    assert names == {"class-name", "qam", "com", "com-class", "com-visual", "qam-com", "va-com", "qam-com-sf",
                     "va-com-sf", "bicm"}
    assert len(calls) == 2 * 3 * len(names)
    assert sorted((c[0], c[1], c[3]) for c in calls) == sorted(
        (n, r, (s,)) for n in names for r in ("argmax", "largest") for s in ("val", "testB", "test"))

    tables = {t.title.split(" on ")[0] + (" argmax" if "argmax" in t.title else ""): t for t in res["tables"]}
    t4 = tables["BiCM components (Table 4)"]
    assert t4.columns == ["row", "val P@1", "testB P@1", "test phrase Acc", "test PointIt", rr.PAPER_COLUMN]
    assert [r[0] for r in t4.rows] == ["class-name baseline [25]", "QAM", "COM", "QAM+COM", "QAM+COM+SF",
                                       "QAM+COM+SF+KAM (bicm)"]
    for row, name in zip(t4.rows, ("class-name", "qam", "com", "qam-com", "qam-com-sf", "bicm")):
        how = _how(name, "largest")
        assert row[1:3] == pytest.approx([_expected(synth_ds, s, how) for s in SPLITS])
        assert row[3:5] == pytest.approx(list(_expected_phrases(synth_ds, PHRASE_SPLIT, how)))
    assert [r[-1] for r in t4.rows] == pytest.approx([0.5325, 0.3086, 0.576, 0.5843, 0.6015, 0.6146])
    t4a = tables["BiCM components (Table 4) argmax"]
    for row, name in zip(t4a.rows, ("class-name", "qam", "com", "qam-com", "qam-com-sf", "bicm")):
        assert row[1:3] == pytest.approx([_expected(synth_ds, s, _how(name, "argmax")) for s in SPLITS])
    # a figure equals the evaluator's on the file the report scored (largest: the file left on disk)
    path = js["figures"]["paper"]["com"]["val"]["predictions"]
    assert t4.rows[2][1] == evaluate(synth_ds, path, "val").to_dict()["comprehension"]["all"]["precision@1"]

    t5 = tables["BiCM top-down maps (Table 5)"]
    assert [r[0] for r in t5.rows] == ["COM", "QAM (VA) + COM", "QAM (QA) + COM", "QAM (VA) + COM + SF",
                                       "QAM (QA) + COM + SF"]
    assert t5.columns[5:7] == ["val P@1 (argmax)", "testB P@1 (argmax)"]
    assert t5.rows[4][1] == pytest.approx(1.0) and t5.rows[4][5] == pytest.approx(_expected(synth_ds, "val", "half"))
    t6 = tables["BiCM bottom-up information (Table 6)"]
    assert [r[0] for r in t6.rows][1:] == ["COM: object class name", "COM: visual object",
                                           "COM: visual object + class name"]
    assert t6.rows[0][1] == pytest.approx(0.0) and t6.rows[0][-1] == pytest.approx(0.5325)

    t7 = tables["BiCM pseudo labels (Table 7)"]
    assert t7.rows == [[0.6, 12, 12, 0.5, 6058, pytest.approx(0.642)], [0.9, 4, 3, pytest.approx(0.6667), 3986,
                                                                          pytest.approx(0.747)]]

    kinds = next(t for t in res["tables"] if "per expression kind" in t.title)
    assert kinds.columns == ["kind", "queries", "class-name baseline [25]", "COM", "QAM+COM+SF",
                             "QAM+COM+SF+KAM (bicm)"]
    by_kind = {r[0]: r for r in kinds.rows}
    assert set(by_kind) == {"all"} | {q.kind for q in synth_ds.queries("val", "expression")}
    for kind, r in by_kind.items():
        assert r[1] == sum(1 for q in synth_ds.queries("val", "expression") if kind in ("all", q.kind))
        assert r[3] == pytest.approx(_expected(synth_ds, "val", "half", kind)), kind

    lam = next(t for t in res["tables"] if "lambda_t" in t.title)
    assert [r[0] for r in lam.rows] == [1000.0, 100.0, 10.0]
    assert lam.rows[0][1:] == pytest.approx([t4.rows[4][1], t4a.rows[4][1]])  # Table 4's QAM+COM+SF row
    for r in lam.rows[1:]:
        assert r[1:] == pytest.approx([_slow_lambda(synth_ds, r[0], "largest"), _slow_lambda(synth_ds, r[0], "argmax")])
    lt_path = cache / "synth" / "runs" / "bicm" / "qam-com-sf-lt100" / "predictions" / "val.jsonl"
    assert js["lambda_t"]["qam-com-sf-lt100"]["predictions"] == str(lt_path) and lt_path.is_file()
    assert (cache / "synth" / "runs" / "bicm" / "qam-com-sf-lt10-argmax" / "predictions" / "val.jsonl").is_file()
    assert rr.lambda_predictions(inp, "val", 100.0)["status"] == "hit"  # current: not rewritten

    times = next(t for t in res["tables"] if "timings" in t.title)
    assert times.rows == [["modules (QAM + COM + SF)", "val", "expression", 15, 0.3, 20.0],
                          ["pseudo labels (nearest query + modules)", "train", "image", 16, 3.2, 200.0]]

    assert res["markdown_path"] == str(out) and out.is_file()
    assert json.loads(out.with_suffix(".json").read_text()) == js
    png = fake_cache.tmp / "r_table4.png"
    assert js["png"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as im:
        assert im.size == rr.BARS_SIZE
    md = out.read_text()
    assert "### Table 7" in md and "r_table4.png" in md and "| QAM+COM+SF+KAM (bicm) |" in md
    assert js["run"] == {"run": "bicm", "trained": True, "command": ""} and js["pseudo"]["present"]

    # the bars are the tables' figures: one bar per scored cell, its height the figure in %
    fig = rr.bars_figure("synth", [t4, t4a])
    for ax, t in zip(fig.axes, (t4, t4a)):
        heights = sorted(p.get_height() for p in ax.patches)
        assert heights == pytest.approx(sorted(100 * v for r in t.rows for v in r[1:5] if v is not None))


def test_report_without_run_or_pseudo_labels(fake_cache, synth_ds):
    cache = fake_cache.cache
    res = rr.bicm_report("synth", cache, None, splits="val", phrase_split="test")
    js = res["json"]
    assert Path(res["markdown_path"]) == cache / "synth" / "report" / "bicm.md"
    assert Path(js["png"]) == cache / "synth" / "report" / "bicm_table4.png"
    assert "bicm" not in {c[0] for c in fake_cache.calls}  # an untrained run is not predicted
    command = "refground pseudo bicm && refground train bicm"
    assert js["run"] == {"run": "bicm", "trained": False, "command": command}
    t4 = res["tables"][0]
    assert t4.rows[-1][0] == f"QAM+COM+SF+KAM (bicm): not trained: {command}"
    assert t4.rows[-1][1:4] == [None, None, None] and t4.rows[-1][-1] == pytest.approx(0.6146)
    t7 = next(t for t in res["tables"] if "Table 7" in t.title)
    assert t7.rows == [["no pseudo labels: refground pseudo bicm", None, None, None, None, None]]
    kinds = next(t for t in res["tables"] if "per expression kind" in t.title)
    assert len(kinds.columns) == 5 and "not trained" in next(n for h, _, n in rr.build_tables(
        "synth", {"paper": {}, "argmax": {}}, js["run"], ("val",), "", {}, {"present": False, "path": "p"}, [])
        if h.startswith("Per expression kind"))
    times = next(t for t in res["tables"] if "timings" in t.title)
    assert times.rows == []
    assert "not trained: refground pseudo bicm && refground train bicm" in Path(res["markdown_path"]).read_text()

    # with pseudo labels but no run: only the training command; another run name trains that run
    _write_pseudo_manifest(cache, [{"thr_k": 0.9, "labels": 0, "judged": 0, "precision": None}])
    assert rr.run_status("synth", cache, "bicm", True)["command"] == "refground train bicm"
    assert rr.run_status("synth", cache, "mine", True)["command"] == "refground train bicm --run mine"
    assert rr.run_status("synth", cache, "qam-com-sf", False)["trained"]  # a training-free row: nothing to train
    st = rr.pseudo_state("synth", cache)
    assert st["present"] and st["current"] and st["extra"]["table7"][0]["precision"] is None


def test_report_leaves_out_phrase_columns_without_captions(fake_cache):
    res = rr.bicm_report("synth", fake_cache.cache, fake_cache.tmp / "x.md", splits="val", phrase_split="")
    assert res["tables"][0].columns == ["row", "val P@1", rr.PAPER_COLUMN]
    assert all(c[3] == ("val",) for c in fake_cache.calls)
    assert rr.lambda_name(1000.0) == "qam-com-sf-lt1000" and rr.lambda_name(10, "argmax") == "qam-com-sf-lt10-argmax"


# ============================================================================================ figure
def _figure_ex() -> dict:
    """A 40x30 grey image, a query-aware map that is 1 on a block and 0 elsewhere, a flat vanilla map, three COM
    boxes, a final box and a disjoint true box."""
    h, w = 30, 40
    qa = np.zeros((h, w), np.float32)
    qa[5:15, 20:35] = 1.0
    return {"image": np.full((h, w, 3), 128, np.uint8), "qa_map": qa, "va_map": np.full((h, w), 0.5, np.float32),
            "pt_box": np.array([20, 5, 35, 15], np.float32), "va_pt_box": np.array([0, 0, 40, 30], np.float32),
            "thr_a": 0.7, "qa_raw_max": 3e-3, "va_raw_max": 2e-2,
            "com_boxes": np.array([[2, 2, 18, 12], [22, 16, 38, 28], [3, 18, 12, 27]], np.float32),
            "com_scores": np.array([0.9, 0.7, 0.4]), "com_pq": np.array([0.3, 0.3, 0.2]),
            "com_cq": np.array([0.6, 0.4, 0.2]), "com_labels": ["circle", "square", "star"],
            "final_box": np.array([2, 2, 18, 12], np.float32), "truth": np.array([[22, 16, 38, 28]], float),
            "text": "the red circle", "query_id": 7, "kind": "attribute", "split": "val", "task": "expression",
            "image_id": 3, "run": "bicm", "rule": "largest", "candidates": 4, "above_mean": 2, "top_is_pt": False,
            "sim_iq": 0.31}


def test_figure_draws_maps_and_boxes_where_they_are():
    from refground.errors import DataError
    from refground.methods.bicm.figures import (
        PANEL_WIDTH,
        rank_colour,
        render_bicm_figure,
    )
    from refground.viz import GT, PANEL_GAP, PRED, heat_colours

    ex = _figure_ex()
    img = np.asarray(render_bicm_figure(ex))
    s = -(-PANEL_WIDTH // 40)
    pw = 40 * s
    assert img.shape[1] == 4 * pw + 3 * PANEL_GAP and img.shape[2] == 3
    # the panels' top: the first row where panel (d) shows the plain grey image (left of every box)
    x_d = 3 * (pw + PANEL_GAP)
    top = next(y for y in range(img.shape[0]) if tuple(img[y, x_d + 1]) == (128, 128, 128))
    assert top > 0 and img.shape[0] > top + 30 * s

    def at(panel: int, x: float, y: float) -> tuple:
        return tuple(int(v) for v in img[top + int(y * s), panel * (pw + PANEL_GAP) + int(x * s)])

    # (a) the map's colours over the image (opacity 0.5), P_t's edge in red
    hot, cold = heat_colours(np.array([1.0, 0.0])).astype(float)
    assert at(0, 27, 10) == tuple(np.rint(0.5 * 128 + 0.5 * hot).astype(int))
    assert at(0, 5, 25) == tuple(np.rint(0.5 * 128 + 0.5 * cold).astype(int))
    assert at(0, 27, 5) == PRED and at(0, 20, 10) == PRED
    # (b) the flat map everywhere but its P_t (dashed white along the border)
    mid = tuple(np.rint(0.5 * 128 + 0.5 * heat_colours(np.array([0.5]))[0].astype(float)).astype(int))
    assert at(1, 20, 20) == mid
    # (c) each COM box in its rank's colour (the top edge right of the rank tag, the right edge)
    for i, b in enumerate(ex["com_boxes"]):
        assert at(2, b[0] + 0.8 * (b[2] - b[0]), b[1]) == rank_colour(i), i
        assert at(2, b[2] - 0.05, (b[1] + b[3]) / 2) == rank_colour(i), i
    assert at(2, 20, 14) == (128, 128, 128)  # between boxes: the image
    # (d) the final box red, the truth green
    assert at(3, 10, 2) == PRED and at(3, 30, 22) == (128, 128, 128)
    x = 3 * (pw + PANEL_GAP) + 30 * s
    assert tuple(img[top + 16 * s - 1, x]) == GT and tuple(img[top + 16 * s, x]) == (128, 128, 128)  # just outside
    # a final box on the truth: red inside its edges, green just outside
    on = np.asarray(render_bicm_figure({**ex, "final_box": ex["truth"][0]}))
    assert tuple(on[top + 16 * s - 1, x]) == GT and tuple(on[top + 16 * s, x]) == PRED

    assert np.array_equal(img, np.asarray(render_bicm_figure(ex)))  # deterministic
    assert np.asarray(render_bicm_figure(ex, scale=2)).shape[1] == 4 * 80 + 3 * PANEL_GAP
    assert np.asarray(render_bicm_figure({**ex, "truth": None, "com_boxes": ex["com_boxes"][:0],
                                          "com_scores": ex["com_scores"][:0]})).shape[1] == img.shape[1]
    with pytest.raises(DataError, match="qa_map"):
        render_bicm_figure({**ex, "qa_map": ex["qa_map"][:5]})
    with pytest.raises(DataError, match="COM boxes"):
        render_bicm_figure({**ex, "com_scores": ex["com_scores"][:1]})


def test_query_text_of_expressions_captions_and_the_default(synth_ds):
    from refground.methods.bicm.figures import query_text

    q0 = synth_ds.queries("val", "expression")[0]
    q, text, mention, truth = query_text(synth_ds, None)  # refground show's default: the first val expression
    assert q.id == q0.id and text == q0.text and mention == -1
    assert truth.tolist() == [_union(synth_ds, [q0.referent_object_id])]
    cap = next(c for c in synth_ds.queries("test", "caption") if c.mentions and c.mentions[0].object_ids)
    q, text, mention, truth = query_text(synth_ds, cap.id)
    m = cap.mentions[0]
    assert mention == 0 and text == " ".join(cap.tokens[m.start:m.end])
    assert truth.tolist() == synth_ds.object_boxes[[synth_ds.object_row(o) for o in m.object_ids]].tolist()


def test_explain_and_show_on_a_tiny_clip(synth_ds, synth_cache, tmp_path, monkeypatch):
    """The figure's maps, P_t, COM ranking and final boxes on a tiny random CLIP against the public map functions
    and a slow loop over the proposals (Inputs faked: random proposals and crop embeddings, nothing trained)."""
    import torch
    from hf_tiny import make_tiny_clip

    from refground.data.store import image_path
    from refground.errors import UsageError
    from refground.features import clip_attention as CA
    from refground.features.base import read_image
    from refground.features.hf import HFClip
    from refground.methods.bicm import figures as bf
    from refground.methods.bicm import run as bicm_run
    from refground.methods.bicm.data import DetectorProposals
    from refground.methods.bicm.modules import ClipInputs, class_embeddings

    clip = HFClip(make_tiny_clip(tmp_path / "clip"), batch_size=4)
    rng = np.random.default_rng(0)
    n_img, per = len(synth_ds.image_ids), 6
    n = n_img * per
    xy, wh = rng.uniform(0, 90, (n, 2)), rng.uniform(8, 38, (n, 2))
    names = ["circle", "square", "star"]
    props = DetectorProposals(synth_ds.image_ids.astype(np.int64), np.arange(n_img + 1) * per,
                              np.concatenate([xy, xy + wh], 1).astype(np.float32), rng.integers(0, 3, n),
                              np.ones(n, np.float32), np.arange(n), names)
    crops = rng.normal(size=(n, 8)).astype(np.float16)
    cls_emb = class_embeddings(clip, names)
    rows = {int(i): r for r, i in enumerate(synth_ds.image_ids.tolist())}
    fake = SimpleNamespace(ds=synth_ds, props=props, row_of_image=lambda: rows,
                           clip=ClipInputs(clip, crops, np.zeros((n_img, 8), np.float16), cls_emb,
                                           {"context": 0.1, "square": True}),
                           image=lambda row: read_image(image_path(synth_ds, int(synth_ds.image_ids[row]))))
    monkeypatch.setattr(bicm_run, "Inputs", lambda *a, **k: fake)

    q = synth_ds.queries("val", "expression")[1]
    image = fake.image(rows[q.image_id])
    ex = bf.explain_bicm("synth", synth_cache, "com", q.id, top_k=3)
    assert ex["text"] == q.text and ex["rule"] == "largest" and ex["mention"] == -1
    torch.testing.assert_close(torch.from_numpy(ex["qa_map"]), CA.image_query_attention_maps(clip, image, [q.text])[0])
    torch.testing.assert_close(torch.from_numpy(ex["va_map"]),
                               CA.query_attention_maps(clip, [image], [q.text], weighted=False)[0])
    assert ex["pt_box"].tolist() == CA.box_from_map(torch.from_numpy(ex["qa_map"]), 0.7).tolist()

    # COM's S^BU of the image's proposals by a loop: cosine with the crop embedding plus with the class name's
    fq = clip.embed_texts([q.text])[0].double().numpy()
    fq /= np.linalg.norm(fq)
    sl = props.of(rows[q.image_id])
    bu = []
    for r in range(sl.start, sl.stop):
        c = crops[r].astype(np.float64)
        e = cls_emb[props.labels[r]].double().numpy()
        bu.append(fq @ c / np.linalg.norm(c) + fq @ e / np.linalg.norm(e))
    order = sorted(range(len(bu)), key=lambda i: -bu[i])[:3]
    assert ex["com_scores"] == pytest.approx([bu[i] for i in order], abs=1e-4)
    assert ex["com_boxes"].tolist() == props.boxes[sl][order].tolist()
    assert ex["com_labels"] == [names[props.labels[sl][i]] for i in order]
    # the final box of COM under the paper's rule: the largest of the above-mean proposals
    mean = sum(bu) / len(bu)
    area = [(b[2] - b[0]) * (b[3] - b[1]) for b in props.boxes[sl].tolist()]
    pick = max((i for i in range(len(bu)) if bu[i] > mean), key=lambda i: area[i])
    assert ex["final_box"].tolist() == props.boxes[sl][pick].tolist() and not ex["top_is_pt"]
    assert ex["candidates"] == len(bu) and ex["above_mean"] == sum(b > mean for b in bu)
    assert ex["truth"].tolist() == [_union(synth_ds, [q.referent_object_id])]

    qam = bf.explain_bicm("synth", synth_cache, "qam", q.id)  # QAM alone: P_t is the answer
    assert qam["final_box"].tolist() == qam["pt_box"].tolist() and qam["top_is_pt"]
    assert len(qam["com_boxes"]) == 5

    cap = next(c for c in synth_ds.queries("test", "caption") if c.mentions and c.mentions[0].object_ids)
    out = tmp_path / "show.png"
    res = bf.show_bicm("synth", synth_cache, "qam-com-sf", cap.id, out, top_k=2, show_mask=True)
    assert res["path"] == str(out) and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"caption {cap.id}, phrase 1 (union)" in res["message"] and "IoU" in res["message"]
    with pytest.raises(UsageError, match="top-k"):
        bf.explain_bicm("synth", synth_cache, "com", q.id, top_k=0)
