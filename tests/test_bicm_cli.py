"""BiCM end to end through the CLI on a tiny world: the fixture dataset, its tiny built-in detector's proposals
(conftest's pipeline_cache), a tiny random CLIP (tests/hf_tiny.py) through `refground extract --clip hf:PATH`,
then `refground pseudo bicm`, `refground train bicm` (interrupted and resumed bit for bit, a rerun a cache hit)
and `refground eval --method bicm` of the trained run and of a training-free row, checked against the library's
own scores; the one-line errors; and `refground bench bicm` on the same cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fail, run_json
from hf_tiny import make_tiny_clip
from refground.cli.main import main

from refground import progress

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TINY = {"hidden": 8, "batch_size": 2}  # KAM on the tiny CLIP's 8-d embeddings


@pytest.fixture(scope="module")
def clip_cache(pipeline_cache, tmp_path_factory) -> Path:
    """pipeline_cache (dataset, tiny detector, features/detector-default.h5 with 20 proposals per image) plus
    clip/hf-clip.h5 from a tiny random CLIP: everything BiCM reads. Copy it before writing into it."""
    root = tmp_path_factory.mktemp("bicm") / "cache"
    shutil.copytree(pipeline_cache, root)
    clip = make_tiny_clip(tmp_path_factory.mktemp("bicm-models") / "clip")
    rc = main(["extract", "--cache", str(root), "--clip", f"hf:{clip}", "--no-dense", "--max-proposals", "20"])
    assert rc == 0
    assert (root / "synth" / "clip" / "hf-clip.h5").is_file()
    return root


@pytest.fixture(scope="module")
def pseudo_cache(clip_cache, tmp_path_factory) -> Path:
    """clip_cache plus pseudo/bicm.h5 (`refground pseudo bicm`, seed 0)."""
    root = tmp_path_factory.mktemp("bicm-pseudo") / "cache"
    shutil.copytree(clip_cache, root)
    assert main(["pseudo", "bicm", "--cache", str(root), "--threads", "1"]) == 0
    return root


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "cache"))


def _config(tmp_path: Path, **fields) -> Path:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({**TINY, **fields}))
    return path


def _thr_k(cache: Path) -> float:
    """A Thr_k that keeps three quarters of the pseudo labels (the tiny CLIP's fused scores are not the paper's)."""
    from refground.methods.bicm.pseudo import load_pseudo, pseudo_path

    return float(np.quantile(load_pseudo(pseudo_path("synth", cache)).fused, 0.25))


# ------------------------------------------------------------------------------------------- errors


def test_one_line_errors(clip_cache, tmp_path, capsys):
    cache = _copy(clip_cache, tmp_path)
    c = ("--cache", str(cache))
    cfg = str(_config(tmp_path, epochs=1))
    # No pseudo labels yet: the message names the step.
    assert "refground pseudo bicm" in fail(capsys, "train", "bicm", *c, "--config", cfg, "--threads", "1")
    # A training-free row is scored, not trained.
    err = fail(capsys, "train", "bicm", *c, "--run", "com", "--config", cfg)
    assert "training-free row" in err and "refground eval --method bicm --run com" in err
    assert "only configs with KAM" in fail(capsys, "train", "bicm", *c, "--variant", "qam-com-sf")
    # An unknown box rule is refused before anything runs.
    err = fail(capsys, "eval", "--method", "bicm", "--run", "com", "--split", "val", *c, "--box-rule", "biggest")
    assert "--box-rule 'biggest'" in err and "largest" in err
    assert not (cache / "synth" / "runs" / "bicm").exists()
    # BiCM reads the detector's proposals and their CLIP embeddings: without the CLIP artifact, a one-line error.
    shutil.rmtree(cache / "synth" / "clip")
    assert "refground extract" in fail(capsys, "eval", "--method", "bicm", "--run", "com", "--split", "val", *c)
    assert "refground extract" in fail(capsys, "bench", "bicm", *c, "--queries", "1", "--out",
                                       str(tmp_path / "b.json"))


# ---------------------------------------------------------------------------------------- end to end


def test_pseudo_labels_are_the_fused_argmax_of_each_images_nearest_query(pseudo_cache, synth_ds, capsys):
    from refground.methods.bicm.model import fused_score, variant_config
    from refground.methods.bicm.modules import candidates
    from refground.methods.bicm.pseudo import load_pseudo, pseudo_path
    from refground.methods.bicm.run import Inputs

    again = run_json(capsys, "pseudo", "bicm", "--cache", str(pseudo_cache), "--threads", "1")
    assert again["status"] == "hit"
    train_images = [r for r, s in enumerate(synth_ds.image_splits) if s == "train"]
    assert again["images"] == len(train_images) and [r["thr_k"] for r in again["table7"]] == [0.6, 0.7, 0.8, 0.9]
    pl = load_pseudo(pseudo_path("synth", pseudo_cache))
    assert sorted(pl.scores["image_rows"].tolist()) == train_images
    assert set(pl.texts) <= {q.text for q in synth_ds.queries("train", "expression")}
    # Each label: the candidate (proposals + P_t) of highest S_r (eq. 10) under the paper's defaults.
    inp = Inputs("synth", pseudo_cache, top_n=pl.top_n, min_score=pl.min_score, min_boxes=pl.min_boxes)
    cfg = variant_config("qam-com-sf")
    cand = candidates(pl.scores, cfg, inp.props)
    s = fused_score(cand["s_pq"], cand["s_cq"], cand["s_td"], cfg).masked_fill(~cand["valid"], float("-inf"))
    assert pl.box_index.tolist() == s.argmax(1).tolist()
    np.testing.assert_allclose(pl.fused, s.max(1).values.numpy(), rtol=1e-6)
    ar = np.arange(len(pl.box_index))
    assert np.array_equal(pl.boxes, cand["boxes"][ar, pl.box_index].numpy())
    # Table 7's counts are those of the stored fused scores.
    assert [r["labels"] for r in again["table7"]] == [int((pl.fused > t).sum()) for t in (0.6, 0.7, 0.8, 0.9)]


def test_train_then_eval_the_run_and_a_row(pseudo_cache, synth_ds, tmp_path, capsys):
    from refground.methods.bicm.model import choose_boxes, fused_score
    from refground.methods.bicm.modules import candidates
    from refground.methods.bicm.run import (
        Inputs,
        eval_pairs,
        predict_boxes,
        split_scores,
    )

    cache = _copy(pseudo_cache, tmp_path)
    c = ("--cache", str(cache))
    thr = _thr_k(cache)
    res = run_json(capsys, "train", "bicm", *c, "--config", str(_config(tmp_path)), "--epochs", "2", "--thr-k",
                   str(thr), "--threads", "1")
    run = cache / "synth" / "runs" / "bicm" / "bicm"
    assert res["cache_hit"] is False and Path(res["run"]) == run and res["resumed_from"] == 0
    from refground.methods.bicm.pseudo import load_pseudo, pseudo_path

    kept = int((load_pseudo(pseudo_path("synth", cache)).fused > thr).sum())
    m = res["metrics"]
    assert m["pseudo_labels"] == kept and m["train_pairs"] + m["held_out"] == kept and m["thr_k"] == thr
    for f in ("config.json", "checkpoint.pt", "model.pt", "curve.json", "metrics.json"):
        assert (run / f).is_file(), f
    saved = json.loads((run / "config.json").read_text())
    assert saved["hidden"] == 8 and saved["epochs"] == 2 and saved["embed_dim"] == 8 and saved["kam"] is True

    n_expr = len(synth_ds.queries("val", "expression"))
    n_phr = sum(len(q.mentions) for q in synth_ds.queries("val", "caption"))
    ev = run_json(capsys, "eval", "--method", "bicm", "--run", "bicm", "--split", "val", *c, "--threads", "1")
    assert ev["comprehension"]["all"]["queries"] == ev["comprehension"]["all"]["scored"] == n_expr
    assert ev["phrase_grounding"]["all"]["phrases"] == ev["phrase_grounding"]["all"]["scored"] == n_phr
    lines = [json.loads(x) for x in Path(ev["predictions"]).read_text().splitlines()]
    assert len(lines) == n_expr + n_phr
    # The file holds the library's boxes: eq. 11 with the trained KAM, the largest above-mean box.
    from refground.methods.bicm.run import load_run

    cfg = load_run(run).config
    inp = Inputs("synth", cache, top_n=cfg.top_n, min_score=cfg.min_score, min_boxes=cfg.min_boxes)
    ms, qids, _ = split_scores(inp, "val", "expression", cfg.thr_a)
    _, texts, _, _ = eval_pairs(inp.ds, "val", "expression")
    boxes, cand = predict_boxes(inp, ms, texts, "bicm", cfg, "largest", load_run(run).model)
    assert "s_kam" in cand and bool(((cand["s_kam"][cand["valid"]] > 0) & (cand["s_kam"][cand["valid"]] < 1)).all())
    by_q = {x["query_id"]: x["box"] for x in lines if "mention" not in x}
    np.testing.assert_allclose([by_q[q] for q in qids.tolist()], boxes.numpy(), atol=1e-3)

    # A training-free row: COM alone (S^PQ + S^CQ over the proposals, no P_t), each box rule.
    com = run_json(capsys, "eval", "--method", "bicm", "--run", "com", "--split", "val", *c, "--threads", "1")
    assert com["comprehension"]["all"]["scored"] == n_expr and Path(com["predictions"]).parent.parent.name == "com"
    from refground.methods.bicm.model import variant_config

    row = variant_config("com")
    cand = candidates(ms, row, inp.props)
    assert cand["boxes"].shape[1] == ms["valid"].shape[1]  # no P_t without QAM
    s = fused_score(cand["s_pq"], cand["s_cq"], cand["s_td"], row)
    for rule in ("largest", "argmax"):
        out = run_json(capsys, "eval", "--method", "bicm", "--run", "com", "--split", "val", *c, "--box-rule", rule)
        got = {x["query_id"]: x["box"] for x in map(json.loads, Path(out["predictions"]).read_text().splitlines())
               if "mention" not in x}
        want = choose_boxes(s, cand["boxes"], cand["valid"], rule).numpy()
        np.testing.assert_allclose([got[q] for q in qids.tolist()], want, atol=1e-3)


def test_interrupted_training_resumes_bit_for_bit_and_a_rerun_hits(pseudo_cache, tmp_path, capsys):
    from test_hostile_train import interrupt_in_epoch

    from refground.methods import get_method
    from refground.methods.bicm.run import run_dir
    from refground.train import MODEL_FILE, load_weights

    cache = _copy(pseudo_cache, tmp_path)
    c = ("--cache", str(cache))
    cfg = _config(tmp_path, thr_k=_thr_k(cache))
    args = ["train", "bicm", *c, "--config", str(cfg), "--epochs", "2", "--threads", "1"]
    a = run_json(capsys, *args, "--run", "A")
    # Run B is killed in its second epoch (after the first epoch's checkpoint) ...
    progress.set_tracker(interrupt_in_epoch(2))
    try:
        with pytest.raises(KeyboardInterrupt):
            get_method("bicm").train("synth", cache, "B", config=json.loads(cfg.read_text()),
                                     overrides={"epochs": 2}, seed=0)
    finally:
        progress.set_tracker(None)
    b_dir = run_dir("synth", cache, "B")
    assert json.loads((b_dir / "manifest.json").read_text())["complete"] is False
    # ... and the same command resumes it after epoch 1, ending where the uninterrupted run did.
    torch.manual_seed(123)
    b = run_json(capsys, *args, "--run", "B")
    assert b["resumed_from"] == 1 and b["cache_hit"] is False and b["epochs_trained_now"] == 1
    assert (Path(a["run"]) / MODEL_FILE).read_bytes() == (b_dir / MODEL_FILE).read_bytes()
    wa, wb = (load_weights(Path(r) / "checkpoint.pt")["model"] for r in (a["run"], b_dir))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ca, cb = (json.loads((Path(r) / "curve.json").read_text())["epochs"] for r in (a["run"], b_dir))
    assert [e["loss"] for e in ca] == [e["loss"] for e in cb]
    # A rerun is a cache hit; the same run with other epochs is a finished run of other settings: refused.
    again = run_json(capsys, *args, "--run", "B")
    assert again["cache_hit"] is True
    err = fail(capsys, *args[:-4], "--epochs", "3", "--threads", "1", "--run", "B")
    assert "other settings" in err and "epochs: 2 -> 3" in err and "--force" in err


# ------------------------------------------------------------------------------------------------ bench


def test_bench_bicm_reports_both_timings(clip_cache, tmp_path, capsys):
    out = tmp_path / "bench.json"
    res = run_json(capsys, "bench", "bicm", "--cache", str(clip_cache), "--queries", "3", "--out", str(out))
    assert json.loads(out.read_text()) == res
    (row,) = res["results"]
    assert row["name"] == "bicm QAM+COM+SF" and row["unit"] == "ms/query"
    assert row["figure"] > 0 and row["baseline"] > 0 and row["ratio"] == pytest.approx(row["baseline"] / row["figure"])
    assert "3 expression queries of synth" in row["note"] and "CLIP hf-clip" in row["note"]
    assert "bicm" in run_json_list(capsys)
    # The bench writes nothing into the cache it reads.
    assert not (clip_cache / "bench").exists() and not (clip_cache / "synth" / "bicm").exists()


def run_json_list(capsys) -> list[str]:
    assert main(["bench", "--list"]) == 0
    return capsys.readouterr().out.split()


def test_bench_bicm_refuses_to_time_wrong_scores(clip_cache, monkeypatch):
    from refground.bench import bicm as bb

    real = bb._ours

    def skewed(*args):
        out = real(*args)
        return {**out, "s_pq": out["s_pq"] + 0.05}

    monkeypatch.setattr(bb, "_ours", skewed)
    with pytest.raises(RuntimeError, match="S\\^PQ"):
        bb.bench_bicm(True, 0, cache=clip_cache, queries=1)


def test_on_demand_benchmarks_run_only_when_named(monkeypatch):
    import refground.bench as B

    seen = []

    def plain(quick, seed):
        seen.append(("plain", quick, seed))
        return [B.BenchResult("plain", 1.0, "s")]

    def data(quick, seed, dataset="synth", cache=None, queries=None):
        seen.append(("data", dataset, cache, queries))
        return [B.BenchResult("data", 2.0, "s")]

    monkeypatch.setattr(B, "_REGISTRY", {})
    monkeypatch.setattr(B, "_ON_DEMAND", set())
    monkeypatch.setattr(B, "_load", lambda: None)
    B.register("plain")(plain)
    B.register("data", on_demand=True)(data)
    opts = {"dataset": "d", "cache": None, "queries": 4}
    assert [r.name for r in B.run_benchmarks([], True, 1, opts)] == ["plain"]
    assert [r.name for r in B.run_benchmarks(["data", "plain"], False, 2, opts)] == ["data", "plain"]
    # Options reach only the benchmarks that take them; None means "not given" (the benchmark's default).
    assert seen == [("plain", True, 1), ("data", "d", None, 4), ("plain", False, 2)]
    assert B.list_benchmarks() == ["data", "plain"]
