"""ReIR's report, figure and benchmark (refground.methods.reir.report / figures, refground.bench.reir_bench): the
caption figure renders from an explain dict, Fig. 4's IoU figures equal a slow loop and the evaluator, runs are
placed by their config, the report end to end on fake runs (predictions faked, nothing trained), and the
benchmarks in quick mode against their slow references."""

from __future__ import annotations

import importlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ref_iou

from refground.errors import DataError
from refground.methods.reir import VARIANTS
from refground.methods.reir.model import variant_config

# The package's ``report`` is the registry's callable; the module is imported by its full name.
rr = importlib.import_module("refground.methods.reir.report")

pytestmark = pytest.mark.usefixtures("torch_one_thread")


# ============================================================================================ figure
def _explain(ds) -> dict:
    """A fake :func:`explain_caption` dict for the first val caption of ``ds``: phrase i's candidates are three
    boxes in its own corner strip (the first chosen, the last padding with score -1), its truth the dataset's."""
    q = next(q for q in ds.queries("val", "caption"))
    n = len(q.mentions)
    w = ds.image(q.image_id).width
    cands = [np.array([[4 + 30 * i, 4, 24 + 30 * i, 24], [6 + 30 * i, 30, 26 + 30 * i, 60], [0, 0, 1, 1]], float)
             for i in range(n)]
    truth = [ds.object_boxes[[ds.object_row(o) for o in m.object_ids]] if m.object_ids else None
             for m in q.mentions]
    truth[-1] = None  # a phrase without true boxes is drawn without them
    assert 30 * n < w
    return {"dataset": ds, "image_id": q.image_id, "tokens": q.tokens, "spans": [(m.start, m.end) for m in q.mentions],
            "candidates": cands, "scores": [np.array([0.9, 0.4, -1.0])] * n,
            "boxes": np.stack([c[0] for c in cands]), "truth": truth, "kinds": [m.kind for m in q.mentions],
            "query_id": q.id, "run": "reir"}


def test_figure_renders_from_an_explain_dict(synth_ds):
    from refground.methods.reir.figures import (
        MIN_WIDTH,
        phrase_colour,
        render_reir_figure,
    )

    ex = _explain(synth_ds)
    img = np.asarray(render_reir_figure(ex))
    w = synth_ds.image(ex["image_id"]).width
    s = -(-MIN_WIDTH // w)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert img.shape[1] == w * s and img.shape[0] > synth_ds.image(ex["image_id"]).height * s  # text under it
    for i, box in enumerate(ex["boxes"]):  # each chosen box's top edge, past its tag, is in its phrase's colour
        x = int((box[0] + 0.8 * (box[2] - box[0])) * s)
        assert tuple(img[int(box[1] * s) + 1, x]) == phrase_colour(i)
    assert np.array_equal(img, np.asarray(render_reir_figure(ex)))  # deterministic
    assert np.asarray(render_reir_figure(ex, scale=2)).shape[1] == 2 * w
    with pytest.raises(DataError, match="phrases but"):
        render_reir_figure({**ex, "boxes": ex["boxes"][:1]})


# ============================================================================================ Fig. 4 figures


def test_iou_figures_equal_a_slow_loop():
    rng = np.random.default_rng(3)
    boxes, truth = [], []
    for k in range(40):
        t = rng.uniform(0, 80, size=(1 + k % 3, 2))
        truth.append(np.concatenate([t, t + rng.uniform(5, 40, size=t.shape)], axis=1))
        p = rng.uniform(0, 80, size=2)
        boxes.append(None if k % 7 == 3 else tuple(np.concatenate([p, p + rng.uniform(5, 50, size=2)])))
    # Exactly at the thresholds: IoU 0.5, 0.6 and 0.8 are hits at their own threshold.
    for pred, gt in (((0, 0, 10, 10), [[0, 0, 10, 20]]), ((0, 0, 10, 6), [[0, 0, 10, 10]]),
                     ((0, 0, 10, 8), [[0, 0, 5, 5], [5, 5, 10, 10]])):
        boxes.append(pred)
        truth.append(np.array(gt, float))
    thresholds = (0.5, 0.6, 0.7, 0.8)
    got = rr.iou_figures(boxes, truth, thresholds)

    ious = []
    for b, t in zip(boxes, truth):
        u = (min(r[0] for r in t), min(r[1] for r in t), max(r[2] for r in t), max(r[3] for r in t))
        ious.append(0.0 if b is None else ref_iou(b, u))
    assert ious[-3:] == [0.5, 0.6, 0.8]
    assert got["phrases"] == len(truth) and got["missing"] == sum(b is None for b in boxes)
    assert got["mean_iou"] == pytest.approx(sum(ious) / len(ious), abs=1e-9)
    for t in thresholds:
        assert got[f"acc@{t:g}"] == pytest.approx(sum(i >= t for i in ious) / len(ious), abs=1e-12), t
    assert got["acc@0.5"] >= got["acc@0.6"] >= got["acc@0.7"] >= got["acc@0.8"]
    empty = rr.iou_figures([], [], thresholds)
    assert empty["phrases"] == 0 and empty["mean_iou"] is None and empty["acc@0.5"] is None


def _fake_lines(ds, split: str, how: str) -> list[dict]:
    """Phrase lines for ``split``'s captions: ``exact`` the true union box, ``shift`` shifted by a third of its
    width on plural and needs-relation phrases, ``far`` a box far away on every second phrase; the first phrase
    of every third caption has no line (a miss)."""
    lines = []
    for k, q in enumerate(ds.queries(split, "caption")):
        for i, m in enumerate(q.mentions):
            if i == 0 and k % 3 == 0:
                continue
            if m.object_ids:
                b = ds.object_boxes[[ds.object_row(o) for o in m.object_ids]]
                box = np.array([b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()], float)
            else:
                box = np.array([0, 0, 10, 10], float)
            if how == "shift" and m.kind != "singular":
                box[[0, 2]] += (box[2] - box[0]) / 3
            if how == "far" and (k + i) % 2:
                box = np.array([0, 0, 3, 3], float)
            lines.append({"query_id": q.id, "mention": i, "box": [float(v) for v in box]})
    return lines


def test_iou_curve_at_05_is_the_evaluators_accuracy(synth_ds, tmp_path):
    from refground.eval.evaluate import evaluate
    from refground.eval.predictions import read_predictions, write_predictions

    for how in ("exact", "shift", "far"):
        path = write_predictions(tmp_path / f"{how}.jsonl", _fake_lines(synth_ds, "test", how))
        preds = read_predictions(path)
        ev = evaluate(synth_ds, preds, "test", sections=("phrase_grounding",)).to_dict()["phrase_grounding"]
        curve = rr.iou_curve(synth_ds, preds, "test")
        assert curve["phrases"] == ev["all"]["phrases"] and curve["missing"] == ev["all"]["missing"]
        assert curve["acc@0.5"] == pytest.approx(ev["all"]["accuracy"], abs=1e-12)
        _, _, kinds = rr.phrase_boxes(synth_ds, preds, "test")
        assert set(kinds) == set(ev) - {"all"}


# ============================================================================================ placement
def test_runs_are_placed_by_config_not_name():
    for v in VARIANTS:  # whatever its sizes and schedule
        assert rr.placed_variant(variant_config(v).to_dict()) == v
        assert rr.placed_variant(variant_config(v, dim=32, hidden_dim=16, epochs=1, lr=5e-4).to_dict()) == v
    assert rr.placed_variant(variant_config("reir", top_k=7).to_dict()) is None  # a K of no row
    assert rr.placed_variant({"regression": False}) == "tsd-vogn"  # missing fields: the defaults
    assert rr.placed_variant(None) is None and rr.placed_variant([1]) is None

    ck = rr.CHECK
    assert rr.marks(variant_config("baseline").to_dict()) == {"TSD": "", "STR": "", "VOGN&RC": ""}
    assert rr.marks(variant_config("tsd-str-noq").to_dict()) == {"TSD": ck, "STR": "w/o x_q", "VOGN&RC": ""}
    assert rr.marks(variant_config("tsd-vogn").to_dict()) == {"TSD": ck, "STR": "", "VOGN&RC": ck}
    assert rr.marks(variant_config("uniform").to_dict()) == {"TSD": ck, "STR": ck, "VOGN&RC": "uniform"}
    assert rr.marks({}) == {"TSD": ck, "STR": ck, "VOGN&RC": ck}

    st = {"run": "reir-e4", "trained": True, "variant": "reir"}
    assert rr.row_label(st) == "ReIR (all) (reir-e4)" and rr.row_label({**st, "run": "reir"}) == "ReIR (all)"
    assert rr.row_label({"run": "x", "trained": False, "variant": None}) == "x (not trained)"
    status = {"k3": {"trained": True, "variant": "reir-k3"}, "ub": {"trained": True, "variant": "upper-bound"},
              "odd": {"trained": True, "variant": None}, "reir-e4": {"trained": True, "variant": "reir"},
              "tsd": {"trained": False, "variant": "tsd"}, "base": {"trained": True, "variant": "baseline"}}
    assert rr.main_run(status) == "reir-e4" and rr.upper_run(status) == "ub"
    assert rr.main_run({**status, "reir": {"trained": True, "variant": "reir-k10"}}) == "reir"
    assert rr.main_run({"ub": status["ub"], "k3": status["k3"]}) == "k3" and rr.main_run({}) is None
    assert rr.table2_order(status) == ["base", "tsd", "reir-e4", "odd", "ub"]  # paper order; K rows in Table 3
    from refground.methods.reir.run import CLASS_NAME_RUN

    assert rr.CLASS_NAME == CLASS_NAME_RUN
    assert rr.train_command("synth", "reir-k3") == "refground train reir --variant reir-k3"
    assert rr.train_command("f30k", "mine") == "refground train reir --dataset f30k --run mine"


# ============================================================================================ report
def _fake_run(cache: Path, name: str, variant: str, **fields) -> None:
    """A complete run folder ``runs/reir/<name>`` with the variant's config and placeholder weights."""
    from refground.cache import write_manifest

    path = cache / "synth" / "runs" / "reir" / name
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(variant_config(variant, **fields).to_dict()))
    (path / "model.pt").write_bytes(b"weights")
    write_manifest(path, step="train.reir@1", params={}, parents={}, fingerprint=f"fake-{name}", kind="runs/reir")


def test_report_end_to_end_on_fake_runs(synth_cache, synth_ds, tmp_path, monkeypatch):
    from refground.eval.predictions import write_predictions
    from refground.methods.reir import run as reir_run

    cache = tmp_path / "cache"
    shutil.copytree(synth_cache / "synth" / "dataset", cache / "synth" / "dataset")
    for name, variant in (("reir-e2", "reir"), ("tsd-vogn", "tsd-vogn"), ("k3", "reir-k3"),
                          ("upper-bound", "upper-bound"), ("odd", "reir")):
        _fake_run(cache, name, variant, **({"top_k": 7} if name == "odd" else {}))
    how = {"class-name": "far", "reir-e2": "shift", "tsd-vogn": "far", "k3": "shift", "upper-bound": "exact",
           "odd": "exact"}
    calls = []

    def fake_predict(dataset, cache_, name, splits, features=None, force=False):
        calls.append(name)
        out = []
        for s in splits:
            p = write_predictions(tmp_path / "preds" / name / f"{s}.jsonl", _fake_lines(synth_ds, s, how[name]))
            out.append({"path": str(p), "split": s, "status": "written"})
        return out

    monkeypatch.setattr(reir_run, "predict_reir_many", fake_predict)
    out = tmp_path / "r.md"
    res = rr.reir_report("synth", cache, out, runs="reir-e2,tsd-vogn,k3,reir-k10,upper-bound,odd",
                         splits="val,test", iou_run="reir-e2", no_reg_run="tsd-vogn")
    js = res["json"]
    assert sorted(calls) == sorted(["class-name", "reir-e2", "tsd-vogn", "k3", "upper-bound", "odd"])  # once each
    assert res["markdown_path"] == str(out) and out.is_file()
    assert json.loads(out.with_suffix(".json").read_text()) == js
    png = tmp_path / "r_iou.png"
    assert js["png"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = out.read_text()
    assert "![Fig. 4" in md and "r_iou.png" in md and "refground train reir --variant reir-k10" in md

    assert js["main_run"] == "reir-e2" and js["upper_run"] == "upper-bound"
    assert {n: r["variant"] for n, r in js["runs"].items()} == {
        "reir-e2": "reir", "tsd-vogn": "tsd-vogn", "k3": "reir-k3", "reir-k10": "reir-k10",
        "upper-bound": "upper-bound", "odd": None}
    assert not js["runs"]["reir-k10"]["trained"] and js["runs"]["reir-e2"]["trained"]
    tables = {t.title.split(" on ")[0]: t for t in res["tables"]}
    t2 = tables["ReIR ablation (Table 2)"]
    labels = [r[0] for r in t2.rows]
    assert labels == ["class-name baseline (no training)", "+TSD +VOGN&RC", "ReIR (all) (reir-e2)", "odd",
                      "upper bound (+ supervised cross-entropy)"]
    val_acc = t2.columns.index("val Acc")
    by_label = {r[0]: r for r in t2.rows}
    assert by_label["upper bound (+ supervised cross-entropy)"][val_acc] == pytest.approx(
        js["runs"]["upper-bound"]["figures"]["val"]["phrase_grounding"]["all"]["accuracy"])
    assert by_label["+TSD +VOGN&RC"][1:4] == [rr.CHECK, "", rr.CHECK]
    t3 = tables["ReIR K top proposals per phrase (Table 3)"]
    assert [r[0] for r in t3.rows] == [3, 5, 10] and t3.rows[2][1] == "ReIR, K = 10 (not trained)"
    assert t3.rows[2][2] is None
    gap = tables["ReIR upper bound"].rows[2]
    ub, main = tables["ReIR upper bound"].rows[1], tables["ReIR upper bound"].rows[0]
    assert gap[1:] == pytest.approx([u - m for u, m in zip(ub[1:], main[1:])])
    kinds = tables["ReIR"]  # "ReIR on synth per phrase kind (%)"
    assert {r[1] for r in kinds.rows} == {"all", "singular", "plural", "needs-relation"}
    assert "reir-e2 Acc" in kinds.columns and "upper-bound PointIt" in kinds.columns
    # Fig. 4: the with-L_reg curve at 0.5 is Table 2's Acc of the same run; the exact boxes of the upper bound
    # are no part of it.
    fig4 = js["iou"]
    assert fig4["with_reg"]["run"] == "reir-e2" and fig4["with_reg"]["regression"] is True
    assert fig4["without_reg"]["regression"] is False and fig4["note"] == ""
    for s in ("val", "test"):
        assert fig4["with_reg"]["figures"][s]["acc@0.5"] == pytest.approx(
            js["runs"]["reir-e2"]["figures"][s]["phrase_grounding"]["all"]["accuracy"])
    f = fig4["with_reg"]["figures"]["test"]
    assert 0 < f["acc@0.8"] <= f["acc@0.5"] < 1 and 0 < f["mean_iou"] < 1


def test_report_default_out_and_untrained_fig4_runs(synth_cache, synth_ds, tmp_path, monkeypatch):
    from refground.eval.predictions import write_predictions
    from refground.methods.reir import run as reir_run

    cache = tmp_path / "cache"
    shutil.copytree(synth_cache / "synth" / "dataset", cache / "synth" / "dataset")

    def fake_predict(dataset, cache_, name, splits, features=None, force=False):
        assert name == "class-name"  # nothing is trained: only the baseline is scored
        return [{"path": str(write_predictions(tmp_path / f"{s}.jsonl", _fake_lines(synth_ds, s, "far"))),
                 "split": s} for s in splits]

    monkeypatch.setattr(reir_run, "predict_reir_many", fake_predict)
    res = rr.reir_report("synth", cache, None, splits="val")
    assert Path(res["markdown_path"]) == cache / "synth" / "report" / "reir.md"
    js = res["json"]
    assert js["png"] is None and js["main_run"] is None and "not trained" in js["iou"]["note"]
    assert all(not r["trained"] for r in js["runs"].values()) and set(js["runs"]) == set(VARIANTS)
    missing = next(t for t in res["tables"] if "not trained" in t.title)
    assert [r[0] for r in missing.rows] == list(VARIANTS)
    assert js["baseline"]["figures"]["val"]["phrase_grounding"]["all"]["phrases"] > 0


# ============================================================================================ bench
def test_quick_benchmarks_report_sane_figures():
    from refground.bench import list_benchmarks
    from refground.bench import reir_bench as rb

    assert "reir" in list_benchmarks()
    results = rb.bench_reir(True, 0)
    assert [(r.name, r.unit) for r in results] == [("reir_train", "captions/s"), ("reir_infer", "ms/caption"),
                                                   ("reir_matching", "ms"), ("reir_proposals", "captions/s")]
    for r in results:
        assert math.isfinite(r.figure) and r.figure > 0 and r.note, r
    train, infer, matching, props = results
    assert train.baseline is None and "s per epoch" in train.note
    for r in (infer, matching):
        assert r.baseline > 0 and r.ratio == pytest.approx(r.baseline / r.figure)
    assert props.ratio == pytest.approx(props.figure / props.baseline)


@pytest.mark.parametrize("regression,reg_query", [(True, True), (True, False), (False, False)])
def test_matching_reference_equals_the_head(regression, reg_query):
    from refground.bench.reir_bench import matching_head_reference
    from refground.methods.reir.model import MatchingHead

    torch.manual_seed(0)
    head = MatchingHead(8, 6, regression, reg_query)
    if regression:
        with torch.no_grad():
            head.reg_out.weight.normal_()
    xq, xo = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    with torch.no_grad():
        s, d = head(xq[:, :, None], xo[:, None])
        s_ref, d_ref = matching_head_reference(head, xq, xo)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-6)
    if regression:
        torch.testing.assert_close(d, d_ref, rtol=1e-5, atol=1e-6)
    else:
        assert d is None and d_ref is None


def test_random_batch_is_what_the_model_reads_and_captions_stand_alone():
    from refground.bench import reir_bench as rb

    b = rb.random_batch(7, 1, proposals=12)
    assert b.words.shape[0] == 7 and b.spans.shape[1] <= rb.PHRASES and b.feats.shape[1] == 12
    assert bool((b.spans[..., 1] > b.spans[..., 0])[b.phrase_mask].all())
    assert bool((torch.gather(b.words, 1, b.spans[..., 0].clamp(max=b.words.shape[1] - 1)) != 0)[b.phrase_mask].all())
    one = rb.caption_batch(b, 4)
    assert one.words.shape[0] == 1 and bool(one.prop_mask.all()) and bool(one.phrase_mask.all())
    assert torch.equal(one.edges[:, 1:], b.edges[b.edges[:, 0] == 4][:, 1:])


def test_benchmarks_raise_on_wrong_results(monkeypatch):
    from refground.bench import reir_bench as rb
    from refground.methods.reir.model import MatchingHead

    real = MatchingHead.forward
    monkeypatch.setattr(MatchingHead, "forward", lambda self, q, o: tuple(
        None if v is None else v * 1.01 for v in real(self, q, o)))
    with pytest.raises(RuntimeError, match="reir_matching"):
        rb.bench_matching(True, 0)
