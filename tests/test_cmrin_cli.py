"""CMRIN as a pipeline step: candidates and batches, `refground train cmrin` (hit, resume, determinism) and
`refground eval --method cmrin` (predictions that re-score, proposals, one-line errors)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_CMRIN, fail, run_json, train_tiny_cmrin
from refground.eval.predictions import read_predictions
from refground.graph import spatial_relations
from refground.grounding.candidates import CandidateSpec, load_candidates, make_batch
from refground.grounding.queries import encode_queries
from refground.methods.cmrin.model import CMRINConfig
from refground.methods.cmrin.run import predictions_path, run_dir, train_cmrin
from refground.text.vocab import Vocabulary
from refground.train import load_weights


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture
def cache(pipeline_cache, tmp_path) -> Path:
    return Path(shutil.copytree(pipeline_cache, tmp_path / "cache"))


@pytest.fixture(scope="module")
def trained(pipeline_cache, tmp_path_factory) -> Path:
    """A cache copy with a tiny CMRIN run named "cmrin" (2 epochs)."""
    root = Path(shutil.copytree(pipeline_cache, tmp_path_factory.mktemp("cm") / "cache"))
    train_tiny_cmrin(root)
    return root


def features_file(root: Path) -> Path:
    return root / "synth" / "features" / "detector-default.h5"


# ------------------------------------------------------------------------------------------- vocabulary
def test_vocabulary_counts_more_than_five():
    tokens = [["a"] * 6, ["b"] * 5, ["C", "c", "c", "c", "c", "c", "c"]]
    v = Vocabulary.build(tokens)
    assert v.words == ["<pad>", "<unk>", "c", "a"]  # c seen 7 times (case folded), a 6, b 5 (dropped)
    assert v.encode(["A", "b", "c"]).tolist() == [3, 1, 2]


def test_vocabulary_roundtrip(tmp_path):
    v = Vocabulary.build([["x"] * 6 + ["y"] * 9])
    v.save(tmp_path / "v.json")
    assert Vocabulary.load(tmp_path / "v.json").words == v.words


# ---------------------------------------------------------------------------------- candidates, batches
def test_gt_candidates_match_dataset_and_graph(pipeline_cache, synth_ds):
    c = load_candidates(synth_ds, features_file(pipeline_cache), "gt")
    assert np.array_equal(c.offsets, synth_ds.image_object_offsets)
    assert np.array_equal(c.object_ids, synth_ds.object_ids)
    for r in (0, 5, len(synth_ds.image_ids) - 1):
        img = synth_ds.image(int(synth_ds.image_ids[r]))
        boxes = torch.as_tensor(synth_ds.object_boxes[c.offsets[r]:c.offsets[r + 1]])
        expected = spatial_relations(boxes, (img.height, img.width)).numpy()
        assert np.array_equal(c.relation_matrix(r), expected)
        # p_i = [cx/W, cy/H, w/W, h/H, wh/(WH)]
        b = boxes.numpy()
        sp = c.spatial[c.offsets[r]:c.offsets[r + 1]]
        np.testing.assert_allclose(sp[:, 0], (b[:, 0] + b[:, 2]) / 2 / img.width, rtol=1e-5)
        np.testing.assert_allclose(sp[:, 4], (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / (img.width * img.height),
                                   rtol=1e-4)


def test_proposal_candidates_are_the_top_n(pipeline_cache, synth_ds):
    from refground.cache import RaggedH5

    c = load_candidates(synth_ds, features_file(pipeline_cache), "proposals", top_n=5)
    with RaggedH5(features_file(pipeline_cache)) as f:
        for r in (0, 3, 11):
            full = f.image("proposals", "boxes", r)
            k = min(5, len(full))
            assert c.offsets[r + 1] - c.offsets[r] == k
            np.testing.assert_array_equal(c.boxes[c.offsets[r]:c.offsets[r + 1]], full[:k])
            img = synth_ds.image(int(synth_ds.image_ids[r]))
            expected = spatial_relations(torch.as_tensor(full[:k]), (img.height, img.width)).numpy()
            assert np.array_equal(c.relation_matrix(r), expected)
    assert (c.object_ids == -1).all()


def test_make_batch_matches_a_loop(pipeline_cache, synth_ds):
    c = load_candidates(synth_ds, features_file(pipeline_cache), "gt")
    vocab = Vocabulary.build(q.tokens for q in synth_ds.queries("train", "expression"))
    table = encode_queries(synth_ds, "val", vocab)
    index = np.array([0, len(table) - 1, 2])
    b = make_batch(table, c, index)
    for n, qi in enumerate(index):
        r = table.image_rows[qi]
        k = c.offsets[r + 1] - c.offsets[r]
        assert b.cand_mask[n].sum() == k and not b.cand_mask[n, k:].any()
        np.testing.assert_array_equal(b.features[n, :k].numpy(), c.features[c.offsets[r]:c.offsets[r + 1]])
        assert (b.features[n, k:] == 0).all() and (b.relations[n, k:] == 0).all() and (b.relations[n, :, k:] == 0).all()
        np.testing.assert_array_equal(b.relations[n, :k, :k].numpy(), c.relation_matrix(r))
        q = synth_ds.query(int(table.query_ids[qi]))
        assert b.targets[n] == synth_ds.object_row(q.referent_object_id) - synth_ds.image_object_offsets[r]
        words = b.words[n][b.words[n] != 0].tolist()
        assert words == vocab.encode(q.tokens).tolist()


def test_mirrored_relations_are_the_relations_of_mirrored_boxes():
    from refground.grounding.candidates import HFLIP_RELATION, VFLIP_RELATION

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(40, 2, generator=g) * 200
    wh = torch.rand(40, 2, generator=g) * 60 + 2
    boxes = torch.cat([xy, xy + wh], 1)
    size = (260, 300)
    rel = spatial_relations(boxes, size).numpy()
    h = boxes.clone()
    h[:, [0, 2]] = size[1] - boxes[:, [2, 0]]
    v = boxes.clone()
    v[:, [1, 3]] = size[0] - boxes[:, [3, 1]]
    # Random boxes never sit exactly on a sector boundary, where the tie rule is not mirror-symmetric.
    np.testing.assert_array_equal(HFLIP_RELATION[rel], spatial_relations(h, size).numpy())
    np.testing.assert_array_equal(VFLIP_RELATION[rel], spatial_relations(v, size).numpy())


def test_make_batch_mirrors_selected_queries(pipeline_cache, synth_ds):
    from refground.grounding.candidates import HFLIP_RELATION, HFLIP_WORDS, VFLIP_RELATION, VFLIP_WORDS, Flips
    from refground.grounding.queries import flip_word_map

    c = load_candidates(synth_ds, features_file(pipeline_cache), "gt")
    vocab = Vocabulary.build([["left", "right", "above", "below", "beneath", "the"] * 6])
    hw, vw = flip_word_map(vocab, HFLIP_WORDS), flip_word_map(vocab, VFLIP_WORDS)
    ids = vocab.index
    assert hw[ids["left"]] == ids["right"] and hw[ids["right"]] == ids["left"] and hw[ids["the"]] == ids["the"]
    assert vw[ids["above"]] == ids["below"] and vw[ids["below"]] == ids["above"] and vw[ids["beneath"]] == ids["above"]
    table = encode_queries(synth_ds, "train", vocab)
    index = np.arange(4)
    plain = make_batch(table, c, index)
    fl = Flips(np.array([True, False, True, False]), np.array([False, True, True, False]), hw, vw)
    m = make_batch(table, c, index, fl)
    valid = plain.cand_mask.numpy()
    for n in range(4):
        k = valid[n].sum()
        sp, msp = plain.spatial[n, :k].numpy(), m.spatial[n, :k].numpy()
        np.testing.assert_allclose(msp[:, 0], 1 - sp[:, 0] if fl.horizontal[n] else sp[:, 0], atol=1e-6)
        np.testing.assert_allclose(msp[:, 1], 1 - sp[:, 1] if fl.vertical[n] else sp[:, 1], atol=1e-6)
        np.testing.assert_array_equal(msp[:, 2:], sp[:, 2:])
        r = plain.relations[n].numpy()
        if fl.horizontal[n]:
            r = HFLIP_RELATION[r]
        if fl.vertical[n]:
            r = VFLIP_RELATION[r]
        np.testing.assert_array_equal(m.relations[n].numpy(), r)
        assert (m.spatial[n, k:] == 0).all()
    assert torch.equal(m.features, plain.features) and torch.equal(m.targets, plain.targets)
    assert torch.equal(m.words[3], plain.words[3])


# ------------------------------------------------------------------------------------------------ train
def test_train_writes_run_and_hits(cache, capsys, tmp_path):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY_CMRIN))
    res = run_json(capsys, "train", "cmrin", "--cache", str(cache), "--config", str(cfg), "--run", "t")
    run = Path(res["run"])
    assert res["cache_hit"] is False and res["best_epoch"] in (1, 2)
    for f in ("config.json", "vocab.json", "checkpoint.pt", "model.pt", "curve.json", "metrics.json", "manifest.json"):
        assert (run / f).is_file(), f
    assert json.loads((run / "manifest.json").read_text())["complete"] is True
    curve = json.loads((run / "curve.json").read_text())
    assert [r["epoch"] for r in curve["epochs"]] == [1, 2]
    assert 0 <= res["metrics"]["precision@1"] <= 1 and res["queries_per_s"] > 0
    again = run_json(capsys, "train", "cmrin", "--cache", str(cache), "--config", str(cfg), "--run", "t")
    assert again["cache_hit"] is True and again["metrics"] == res["metrics"]


def test_train_is_deterministic_and_resumes(cache, monkeypatch):
    import refground.train as T

    cfg = dict(TINY_CMRIN, epochs=3)
    a = train_cmrin("synth", cache, "a", CMRINConfig(**cfg), seed=3)
    real_track = T.track

    def interrupt_at_epoch_3(it, total=None, description=""):
        if "epoch 3/" in description:
            raise KeyboardInterrupt
        return real_track(it, total, description)

    monkeypatch.setattr(T, "track", interrupt_at_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train_cmrin("synth", cache, "b", CMRINConfig(**cfg), seed=3)
    assert json.loads((run_dir("synth", cache, "b") / "manifest.json").read_text())["complete"] is False
    monkeypatch.setattr(T, "track", real_track)
    b = train_cmrin("synth", cache, "b", CMRINConfig(**cfg), seed=3)
    assert b["resumed_from"] == 2 and b["epochs_trained_now"] == 1
    wa = load_weights(Path(a["run"]) / "model.pt")
    wb = load_weights(Path(b["run"]) / "model.pt")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["metrics"] == b["metrics"]
    c = train_cmrin("synth", cache, "c", CMRINConfig(**cfg), seed=4)
    wc = load_weights(Path(c["run"]) / "model.pt")
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_train_refuses_missing_or_stale_inputs(cache, capsys):
    (cache / "synth" / "graph" / "detector-default.h5").unlink()
    assert "refground graph" in fail(capsys, "train", "cmrin", "--cache", str(cache))
    m = cache / "synth" / "features" / "detector-default.h5.manifest.json"
    d = json.loads(m.read_text())
    d["complete"] = False
    m.write_text(json.dumps(d))
    assert "refground extract" in fail(capsys, "train", "cmrin", "--cache", str(cache))


def test_train_option_errors(cache, capsys):
    assert "variant" in fail(capsys, "train", "cmrin", "--cache", str(cache), "--variant", "nope")
    assert "--epochs" in fail(capsys, "train", "cmrin", "--cache", str(cache), "--epochs", "0")
    assert "layers" in fail(capsys, "train", "cmrin", "--cache", str(cache), "--variant", "instance", "--layers", "2")
    assert "--lr-decay-epochs" in fail(capsys, "train", "cmrin", "--cache", str(cache), "--lr-decay-epochs", "-1")
    assert "give a plain NAME" in fail(capsys, "train", "cmrin", "--cache", str(cache), "--run", "../x")


# ------------------------------------------------------------------------------------------------- eval
def test_eval_method_writes_predictions_that_rescore(trained, capsys, synth_ds):
    res = run_json(capsys, "eval", "--method", "cmrin", "--split", "val", "--cache", str(trained))
    path = predictions_path(run_dir("synth", trained, "cmrin"), "val", CandidateSpec())
    assert res["predictions"] == str(path) and path.is_file()
    comp = res["comprehension"]
    assert set(comp) >= {"all"} and 0 <= comp["all"]["precision@1"] <= 1
    assert comp["all"]["missing"] == 0
    # With ground-truth candidates the top box is one of the image's objects, the ranked list all of them.
    preds = read_predictions(path)
    for qid, p in list(preds.queries.items())[:5]:
        q = synth_ds.query(qid)
        objs = {tuple(np.float32(o.box).tolist()) for o in synth_ds.objects_of(q.image_id)}
        assert tuple(p.box) in objs and len(p.boxes) == len(objs)
    again = run_json(capsys, "eval", "--predictions", str(path), "--split", "val", "--cache", str(trained))
    assert again["comprehension"] == comp
    # The same figures from the scores: Precision@1 is the share of queries whose best-scored object is the referent.
    hits = [synth_ds.object_row(synth_ds.query(q).referent_object_id) in
            [synth_ds.object_row(o.id) for o in synth_ds.objects_of(synth_ds.query(q).image_id)
             if tuple(np.float32(o.box).tolist()) == tuple(p.box)] for q, p in preds.queries.items()]
    assert comp["all"]["precision@1"] == pytest.approx(np.mean(hits))


def test_eval_method_with_proposals(trained, capsys):
    res = run_json(capsys, "eval", "--method", "cmrin", "--split", "testB", "--candidates", "proposals",
                   "--top-n", "3", "--cache", str(trained))
    path = Path(res["predictions"])
    assert path.name == "testB.proposals3.jsonl"
    assert all(len(p.boxes) <= 3 for p in read_predictions(path).queries.values())
    assert res["comprehension"]["all"]["scored"] > 0


def test_eval_method_errors(trained, capsys, tmp_path):
    c = str(trained)
    assert "refground train cmrin" in fail(capsys, "eval", "--method", "cmrin", "--run", "missing", "--split", "val",
                                           "--cache", c)
    assert "--method" in fail(capsys, "eval", "--method", "nope", "--split", "val", "--cache", c)
    assert "not both" in fail(capsys, "eval", "--method", "cmrin", "--predictions", str(tmp_path / "p.jsonl"),
                              "--split", "val", "--cache", c)
    assert "expected one of: gt, proposals, vlnms" in fail(capsys, "eval", "--method", "cmrin", "--split", "val",
                                                           "--candidates", "boxes", "--cache", c)


def test_report_cmrin_ablation(trained, capsys):
    res = run_json(capsys, "report", "cmrin", "--cache", str(trained))
    assert [r["run"] for r in res["rows"]] == ["cmrin"]
    ev = run_json(capsys, "eval", "--method", "cmrin", "--split", "testA", "--cache", str(trained))
    assert res["rows"][0]["testA"] == ev["comprehension"]["all"]["precision@1"]
    md = Path(res["markdown_path"]).read_text()
    assert md.count("\n") == 5 and "(CMRIN)" in md and md.startswith("Precision@1 (%)")  # caption, table of one run
    assert "refground train cmrin" in fail(capsys, "report", "cmrin", "--runs", "nope", "--cache", str(trained))
