"""VL-NMS as a pipeline: training targets, query-aware proposals, CMRIN on them, the CLI and its errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_CMRIN, fail, run_json
from refground.boxes import batched_nms, box_iou
from refground.cache import RaggedH5
from refground.data.store import load_dataset
from refground.errors import UsageError
from refground.eval.predictions import read_predictions
from refground.methods.vlnms.model import VLNMSConfig
from refground.methods.vlnms.run import (apply_vlnms, encode_vlnms_queries, load_detections, load_vlnms_run, make_vlnms_batch,
                                        proposals_path, relatedness_scores, run_dir, train_vlnms)
from refground.text.vocab import Vocabulary
from refground.train import load_weights

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TINY_VLNMS = {"word_dim": 8, "gru_hidden": 8, "mlp_dim": 8, "attention_dim": 4, "trans_dim": 8, "trans_heads": 2,
              "trans_layers": 1, "trans_ff": 8, "epochs": 2, "batch_size": 16, "lr": 2e-3}


@pytest.fixture(scope="module")
def vcache(pipeline_cache, tmp_path_factory) -> Path:
    """The pipeline cache with pre-NMS detections, graphs, a tiny CMRIN run, pseudo ground truth and two tiny
    VL-NMS runs (fc-bce, trans-bce) with their proposals on val."""
    from refground.cli.main import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("vlnms") / "cache"
    shutil.copytree(pipeline_cache, root)
    cfg = root.parent / "cmrin.json"
    cfg.write_text(json.dumps(TINY_CMRIN))
    vcfg = root.parent / "vlnms.json"
    vcfg.write_text(json.dumps(TINY_VLNMS))
    c = ["--cache", str(root)]
    try:
        for argv in (["extract", "--detections", "--detection-threshold", "0.05", "--no-dense", "--max-proposals",
                      "20", *c],
                     ["graph", *c], ["train", "cmrin", "--config", str(cfg), *c], ["pseudo", "vlnms", *c],
                     ["train", "vlnms", "--config", str(vcfg), *c],
                     ["train", "vlnms", "--config", str(vcfg), "--variant", "trans", *c],
                     ["vlnms", "--run", "fc-bce", "--split", "val", "--top-n", "15", *c],
                     ["vlnms", "--confidence-only", "--split", "val", "--top-n", "15", *c]):
            assert main([*argv, "--json"]) == 0, argv
    finally:
        torch.set_num_threads(threads)
    return root


def test_batch_targets_match_a_loop(vcache):
    ds = load_dataset(vcache / "synth" / "dataset")
    dets = load_detections(ds, vcache / "synth" / "features" / "detector-default.h5")
    vocab = Vocabulary.build(ds._query_at(k).tokens for k in ds.query_rows("train", "expression"))
    pseudo = {int(q): np.array([o.id for o in ds.objects_of(ds.query(int(q)).image_id)][:2])
              for q in ds.query_ids.tolist()}
    qs = encode_vlnms_queries(ds, "train", vocab, pseudo)
    index = np.arange(min(9, len(qs)))
    b = make_vlnms_batch(qs, dets, index)
    for n, i in enumerate(index.tolist()):
        q = ds.query(int(qs.table.query_ids[i]))
        r = ds.image_row(q.image_id)
        boxes = torch.from_numpy(dets.boxes[dets.rows(r)])
        fg_ids = [q.referent_object_id] + [int(o) for o in pseudo[q.id] if int(o) != q.referent_object_id]
        fg = torch.from_numpy(ds.object_boxes[[ds.object_row(o) for o in fg_ids]].astype(np.float32))
        iou = box_iou(boxes, fg)
        k = len(boxes)
        rho = iou.max(1).values
        np.testing.assert_allclose(b.rho[n, :k].numpy(), rho.numpy(), atol=1e-6)
        np.testing.assert_array_equal(b.labels[n, :k].numpy(), (rho > 0.5).float().numpy())
        assert not b.box_mask[n, k:].any() and (b.rho[n, k:] == 0).all()
        assert b.box_mask[n, :k].all()
        np.testing.assert_array_equal(b.det_rows[n, :k], np.arange(dets.offsets[r], dets.offsets[r + 1]))


@pytest.mark.parametrize("run", ["fc-bce", "trans-bce"])
def test_image_grouped_scoring_equals_one_query_per_forward(vcache, run):
    ds = load_dataset(vcache / "synth" / "dataset")
    dets = load_detections(ds, vcache / "synth" / "features" / "detector-default.h5")
    loaded = load_vlnms_run(run_dir("synth", vcache, run))
    qs = encode_vlnms_queries(ds, "val", loaded.vocab)
    index = np.arange(len(qs))[::-1].copy()               # any order; queries of an image far apart
    rel, refined = relatedness_scores(loaded.model, qs, dets, index, batch_size=5)
    weights = loaded.config.box_coder_weights
    with torch.no_grad():
        for j, i in enumerate(index.tolist()):
            b = make_vlnms_batch(qs, dets, np.array([i]), weights)
            out = loaded.model(**b.inputs())
            np.testing.assert_allclose(rel[j], out["scores"][0].numpy(), rtol=1e-5, atol=1e-6)
            boxes = dets.boxes[b.det_rows[0]]
            if "deltas" in out:
                assert not np.allclose(refined[j], boxes)
            else:
                np.testing.assert_array_equal(refined[j], boxes)


def test_confidence_only_is_per_class_nms_on_the_detections(vcache):
    ds = load_dataset(vcache / "synth" / "dataset")
    dets = load_detections(ds, vcache / "synth" / "features" / "detector-default.h5")
    path = proposals_path("synth", vcache, "confidence", "val")
    with RaggedH5(path) as f:
        qids, off = f.table("queries", "ids"), f.offsets["proposals"]
        rows = f.table("proposals", "detection_rows")
        boxes, feats = f.table("proposals", "boxes"), f.table("proposals", "features")
    assert len(qids) == len(ds.query_rows("val", "expression"))
    for n in range(len(qids)):
        r = ds.image_row(ds.query(int(qids[n])).image_id)
        sl = dets.rows(r)
        keep = batched_nms(torch.from_numpy(dets.boxes[sl]), torch.from_numpy(dets.scores[sl]),
                           torch.from_numpy(dets.labels[sl]), 0.5)[:15].numpy()
        np.testing.assert_array_equal(rows[off[n]:off[n + 1]] - dets.offsets[r], keep)
    np.testing.assert_array_equal(boxes, dets.boxes[rows])
    np.testing.assert_array_equal(feats, dets.features[rows])


def test_min_confidence_is_a_detection_floor_before_the_nms(vcache):
    """--min-confidence: per-class NMS over the detections with c >= the floor only (an image with none keeps
    its most confident detection); floor 0 changes nothing."""
    ds = load_dataset(vcache / "synth" / "dataset")
    dets = load_detections(ds, vcache / "synth" / "features" / "detector-default.h5")
    queries = encode_vlnms_queries(ds, "val", Vocabulary.build([]))
    plain = apply_vlnms(None, queries, dets, 0.5, 15)
    np.testing.assert_array_equal(apply_vlnms(None, queries, dets, 0.5, 15, min_confidence=0.0).det_rows,
                                  plain.det_rows)
    rows = queries.table.image_rows
    top = np.array([dets.scores[dets.rows(int(r))].max() for r in rows])
    levels = np.unique(top)  # the tiny detector's confidences differ little: a floor between image maxima
    floor = float(levels[len(levels) // 2])
    assert (top < floor).any() and (top >= floor).any()  # both branches are exercised
    props = apply_vlnms(None, queries, dets, 0.5, 15, min_confidence=floor)
    for n, r in enumerate(rows.tolist()):
        sl = dets.rows(r)
        conf = dets.scores[sl]
        ok = np.flatnonzero(conf >= floor) if top[n] >= floor else np.array([int(conf.argmax())])
        keep = batched_nms(torch.from_numpy(dets.boxes[sl][ok]), torch.from_numpy(conf[ok]),
                           torch.from_numpy(dets.labels[sl][ok]), 0.5)[:15].numpy()
        np.testing.assert_array_equal(props.det_rows[props.offsets[n]:props.offsets[n + 1]] - dets.offsets[r],
                                      ok[keep])
    assert len(props.det_rows) < len(plain.det_rows)
    with pytest.raises(UsageError, match="min-confidence"):
        apply_vlnms(None, queries, dets, 0.5, 15, min_confidence=1.0)


def test_vlnms_proposals_are_ranked_by_fused_score(vcache, capsys):
    path = proposals_path("synth", vcache, "fc-bce", "val")
    with RaggedH5(path) as f:
        off = f.offsets["proposals"]
        s, r, c = (f.table("proposals", k) for k in ("scores", "relatedness", "confidence"))
    assert np.diff(off).max() <= 15 and np.diff(off).min() >= 1
    np.testing.assert_allclose(s, r * c, rtol=1e-6)
    for n in range(len(off) - 1):
        assert (np.diff(s[off[n]:off[n + 1]]) <= 1e-7).all()
    preds = read_predictions(path.with_suffix(".jsonl"))
    assert len(preds) == len(off) - 1
    ev = run_json(capsys, "eval", "--predictions", str(path.with_suffix(".jsonl")), "--split", "val",
                  "--cache", str(vcache))
    figs = ev["proposals"]["all"]
    assert 0 <= figs["recall@1"] <= figs["recall@10"] <= figs["recall@100"] <= 1
    # The manifest's recall is the evaluator's (one definition of proposal recall).
    extra = json.loads(Path(str(path) + ".manifest.json").read_text())["extra"]
    assert extra["recall@10"] == pytest.approx(figs["recall@10"])
    assert extra["context_recall@10"] == pytest.approx(figs["context_recall@10"])


def test_rerun_hits_and_training_is_deterministic(vcache, capsys):
    again = run_json(capsys, "vlnms", "--run", "fc-bce", "--split", "val", "--top-n", "15", "--cache", str(vcache))
    assert again["splits"][0]["status"] == "hit"
    cfg = VLNMSConfig(**{**TINY_VLNMS, "loss": "rank"})
    a = train_vlnms("synth", vcache, "rank-a", cfg, seed=1)
    b = train_vlnms("synth", vcache, "rank-b", VLNMSConfig(**{**TINY_VLNMS, "loss": "rank"}), seed=1)
    assert a["cache_hit"] is False and a["metrics"] == b["metrics"]
    wa = load_weights(run_dir("synth", vcache, "rank-a") / "model.pt")
    wb = load_weights(run_dir("synth", vcache, "rank-b") / "model.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    hit = run_json(capsys, "train", "vlnms", "--loss", "rank", "--run", "rank-a", "--seed", "1",
                   "--config", str(vcache.parent / "vlnms.json"), "--cache", str(vcache))
    assert hit["cache_hit"] is True


def test_cmrin_on_vlnms_proposals(vcache, capsys):
    res = run_json(capsys, "eval", "--method", "cmrin", "--candidates", "vlnms", "--vlnms-run", "fc-bce",
                   "--top-n", "5", "--split", "val", "--cache", str(vcache))
    pred_file = Path(res["predictions"])
    assert pred_file.name == "val.vlnms-fc-bce5.jsonl"
    preds = read_predictions(pred_file)
    with RaggedH5(proposals_path("synth", vcache, "fc-bce", "val")) as f:
        qids, off, boxes = f.table("queries", "ids"), f.offsets["proposals"], f.table("proposals", "boxes")
    first = {int(q): boxes[off[n]:off[n] + 5] for n, q in enumerate(qids.tolist())}
    for p in list(preds)[:20]:
        cand = {tuple(np.round(b, 3)) for b in first[p.query_id].tolist()}
        assert {tuple(np.round(b, 3)) for b in p.ranked} == cand   # CMRIN ranks exactly the query's top 5
    assert 0 <= res["comprehension"]["all"]["precision@1"] <= 1


def test_report_writes_tables_and_plots(vcache, capsys):
    res = run_json(capsys, "report", "vlnms", "--runs", "fc-bce,trans-bce", "--timing-images", "2",
                   "--cache", str(vcache))
    md = Path(res["markdown_path"]).read_text()
    for needle in ("Table 1", "Table 2", "Table 6", "VL-NMS-FC, BCE", "VL-NMS-Trans", "confidence-only"):
        assert needle in md
    assert all(Path(p).is_file() and Path(p).read_bytes()[:4] == b"\x89PNG" for p in res["pngs"])
    assert set(res["precision"]) >= {"ground truth", "detector", "confidence", "fc-bce", "trans-bce"}


def test_errors_are_one_line(vcache, pipeline_cache, capsys, tmp_path):
    c = ["--cache", str(vcache)]
    assert "--run NAME, or --confidence-only" in fail(capsys, "vlnms", *c)
    assert "--run NAME, or --confidence-only" in fail(capsys, "vlnms", "--run", "fc-bce", "--confidence-only", *c)
    assert "refground train vlnms" in fail(capsys, "vlnms", "--run", "nope", *c)
    assert "reserved" in fail(capsys, "train", "vlnms", "--run", "confidence", *c)
    assert "--candidates" in fail(capsys, "eval", "--method", "cmrin", "--candidates", "nms", "--split", "val", *c)
    assert "refground vlnms" in fail(capsys, "eval", "--method", "cmrin", "--candidates", "vlnms", "--vlnms-run",
                                     "never-applied", "--split", "testB", *c)
    assert "must be in (0, 1]" in fail(capsys, "vlnms", "--confidence-only", "--nms-threshold", "0", *c)
    assert "--min-confidence 1.5: must be in [0, 1)" in fail(capsys, "vlnms", "--confidence-only",
                                                             "--min-confidence", "1.5", *c)
    # No detection set: the features of the plain pipeline cache.
    plain = tmp_path / "plain"
    shutil.copytree(pipeline_cache, plain)
    msg = fail(capsys, "vlnms", "--confidence-only", "--cache", str(plain))
    assert "refground extract --detections" in msg
    assert "refground pseudo vlnms" in fail(capsys, "train", "vlnms", "--cache", str(plain))


def test_bucket_batches_cover_every_item_once():
    from refground.methods.vlnms.run import bucket_batches

    items = np.arange(100, 1100)
    sizes = np.random.default_rng(0).integers(10, 170, size=len(items))
    a = bucket_batches(items, sizes, 64, np.random.default_rng(5), pool=4)
    b = bucket_batches(items, sizes, 64, np.random.default_rng(5), pool=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)
    flat = np.concatenate(a)
    assert sorted(flat.tolist()) == items.tolist()
    assert all(len(x) <= 64 for x in a)
    # Padding: the largest set of a batch against a random batching of the same items.
    size_of = dict(zip(items.tolist(), sizes.tolist()))
    padded = sum(len(x) * max(size_of[i] for i in x.tolist()) for x in a)
    perm = np.random.default_rng(5).permutation(items)
    random = sum(64 * max(size_of[i] for i in perm[s:s + 64].tolist()) for s in range(0, len(perm), 64))
    assert padded < 0.8 * random


def test_runs_of_one_dataset_propose_and_match_on_another(vcache, tmp_path, capsys):
    """`refground vlnms --run synth/fc-bce --dataset other`: the run applied as trained to another world's
    detections (extracted with synth's detector), its proposal set tagged synth.fc-bce in other's folder; CMRIN
    of synth then ranks them with `--vlnms-run synth/fc-bce`."""
    from refground.data.store import dataset_dir
    from refground.data.synth import write_synthetic

    root = Path(shutil.copytree(vcache, tmp_path / "cache"))
    write_synthetic(dataset_dir("other", root), name="other", num_images=12, seed=5, image_size=128, workers=1)
    c = ["--cache", str(root)]
    err = fail(capsys, "vlnms", "--run", "synth/fc-bce", "--dataset", "other", "--split", "val", *c)
    assert "refground extract --dataset other --detector builtin:synth/default" in err
    run_json(capsys, "extract", "--dataset", "other", "--detector", "builtin:synth/default", "--detections",
             "--detection-threshold", "0.05", "--no-dense", "--max-proposals", "20", *c)
    res = run_json(capsys, "vlnms", "--run", "synth/fc-bce", "--dataset", "other", "--split", "val", "--top-n", "15",
                   *c)
    (split,) = res["splits"]
    assert res["tag"] == "synth.fc-bce" and split["status"] == "written"
    assert Path(split["path"]) == root / "other" / "vlnms" / "synth.fc-bce" / "val.h5"
    assert split["run_origin"]["dataset"] == "synth" and 0 <= split["recall@10"] <= 1
    assert not (root / "synth" / "vlnms" / "synth.fc-bce").exists()
    run_json(capsys, "graph", "--dataset", "other", "--features", "detector-synth.default", *c)
    out = run_json(capsys, "eval", "--method", "cmrin", "--run", "synth/cmrin", "--dataset", "other", "--candidates",
                   "vlnms", "--vlnms-run", "synth/fc-bce", "--top-n", "5", "--split", "val", *c)
    assert Path(out["predictions"]) == root / "other" / "predictions" / "cmrin" / "synth.cmrin" / \
        "val.vlnms-synth.fc-bce5.jsonl"
    assert 0 <= out["comprehension"]["all"]["precision@1"] <= 1
