"""ReIR on the cache: the weak loader never exposes a phrase-box link, training resumes bit for bit, and the CLI
runs end to end (pseudo, train, eval, show, report); bad input is one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fail, run_json
from test_hostile_train import interrupt_in_epoch

from refground import progress

TINY = {"word_dim": 8, "dim": 16, "hidden_dim": 16, "decoder_dim": 16, "epochs": 2, "batch_size": 8,
        "lr_decay_epochs": 2, "max_proposals": 20}
FEATURES = "detector-default"  # the fixture's final proposals stand in for the first-stage set


@pytest.fixture(scope="module")
def reir_cache(pipeline_cache, tmp_path_factory) -> Path:
    """pipeline_cache plus the relation labels (`refground pseudo reir`, min count 1)."""
    from refground.methods.reir.pseudo import pseudo_reir

    root = Path(shutil.copytree(pipeline_cache, tmp_path_factory.mktemp("reir") / "cache"))
    pseudo_reir("synth", root, min_count=1)
    return root


def tables(cache: Path, ds=None, split: str = "train"):
    """The train CaptionTable of the cache's dataset (or of ``ds``) and its proposals, as training builds them."""
    from refground.data.store import load_named
    from refground.methods.reir.data import CaptionTable, CaptionView, ProposalTable
    from refground.methods.reir.pseudo import load_pseudo_reir, pseudo_path
    from refground.methods.reir.run import load_vectors
    from refground.text.vocab import Vocabulary

    ds = ds if ds is not None else load_named("synth", cache)
    view = CaptionView.of(ds)
    props = ProposalTable.read(cache / "synth" / "features" / f"{FEATURES}.h5", view, 20)
    rows = view.query_rows("train", "caption")
    vocab = Vocabulary.build((view.query_texts[k].split(" ") for k in rows.tolist()), min_count=1)
    vectors = load_vectors(view, vocab, None, 8)
    table = CaptionTable.build(view, split, vocab, vectors, props.class_names,
                               load_pseudo_reir(pseudo_path("synth", cache)), props)
    return table, props


def test_the_weak_view_holds_no_object_box_link_or_recorded_relation(reir_cache):
    from refground.data.store import load_named
    from refground.methods.reir.data import WEAK_COLUMNS, CaptionView

    view = CaptionView.of(load_named("synth", reir_cache))
    for forbidden in ("object_boxes", "object_ids", "object_masks", "mention_object_ids", "mention_object_offsets",
                      "relation_subjects", "relation_predicates", "object_categories", "query"):
        with pytest.raises(AttributeError, match="weak supervision"):
            getattr(view, forbidden)
    assert set(view.columns) == set(WEAK_COLUMNS)


def test_training_batches_do_not_change_when_every_link_and_box_is_scrambled(reir_cache):
    """The loader reads no phrase-box link and no box of the caption's image: scrambling the dataset's objects,
    their boxes and categories, the mentions' objects and the recorded relations leaves every training batch
    unchanged. (A loader that read any of them, e.g. through toolkit vectors grounded on mention objects, or
    ground-truth candidates, fails here.)"""
    from refground.data.store import load_named

    ds = load_named("synth", reir_cache)
    clean, props = tables(reir_cache, ds)
    rng = np.random.default_rng(0)
    ds.mention_object_ids = rng.permutation(ds.mention_object_ids)
    ds.object_boxes = rng.uniform(0, 100, ds.object_boxes.shape)
    ds.object_categories = rng.permutation(ds.object_categories)
    ds.relation_subjects = rng.permutation(ds.relation_subjects)
    ds.relation_predicates = list(rng.permutation(np.array(ds.relation_predicates, dtype=object)))
    scrambled, _ = tables(reir_cache, ds)
    idx = np.arange(len(clean))
    a, b = clean.batch(props, idx), scrambled.batch(props, idx)
    for field in ("words", "spans", "phrase_words", "phrase_mask", "feats", "boxes", "prop_mask", "sizes",
                  "classes", "class_sim", "image_index", "edges", "edge_labels"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert a.targets is None


def test_grounded_word_vectors_would_leak_and_are_not_used(reir_cache):
    """The toolkit's default vectors learn from mention-object links; ReIR's are built without them (a check
    that the scramble test above can fail: the grounded vectors do change)."""
    from refground.data.store import load_named
    from refground.text.wordvec import toolkit_vectors

    ds = load_named("synth", reir_cache)
    before = toolkit_vectors(ds).matrix.copy()
    ds.mention_object_ids = np.random.default_rng(0).permutation(ds.mention_object_ids)
    assert not np.allclose(before, toolkit_vectors(ds).matrix)


def test_class_name_baseline_picks_the_best_matching_class_then_confidence():
    from refground.methods.reir.data import CaptionTable, ProposalTable
    from refground.methods.reir.run import class_name_boxes

    props = ProposalTable(image_ids=np.array([1]), boxes=np.arange(12, dtype=np.float32).reshape(1, 3, 4),
                          feats=np.zeros((1, 3, 2), np.float16), classes=np.array([[0, 1, 1]]),
                          scores=np.array([[0.9, 0.2, 0.7]], np.float32), mask=np.ones((1, 3), bool),
                          sizes=np.array([[50.0, 50.0]], np.float32), class_names=["circle", "square"])
    z = np.zeros((1, 2), np.int64)
    table = CaptionTable(np.array([7]), np.array([0]), z, np.zeros((1, 2, 2), np.int64), np.zeros((1, 2, 1), np.int64),
                         np.ones((1, 2), bool), np.array([2]), np.array([[[1.0, 0.2], [0.1, 0.8]]], np.float32),
                         np.zeros(2, np.int64), np.zeros((0, 2), np.int64), np.zeros(0, np.int64))
    boxes = class_name_boxes(table, props)
    assert boxes[0, 0].tolist() == props.boxes[0, 0].tolist()  # circle: the one circle
    assert boxes[0, 1].tolist() == props.boxes[0, 2].tolist()  # square: two squares, the more confident one


@pytest.fixture
def cache(reir_cache, tmp_path) -> Path:
    return Path(shutil.copytree(reir_cache, tmp_path / "cache"))


def test_resume_is_bit_identical(cache, torch_one_thread):
    from refground.methods.reir.model import variant_config
    from refground.methods.reir.run import run_dir, train_reir
    from refground.train import CHECKPOINT_FILE, MODEL_FILE, load_weights

    cfg = dict(TINY, reg_warmup_epochs=1)
    a = train_reir("synth", cache, "A", variant_config("reir", **cfg), features=FEATURES, seed=3)
    progress.set_tracker(interrupt_in_epoch(2))
    try:
        with pytest.raises(KeyboardInterrupt):
            train_reir("synth", cache, "B", variant_config("reir", **cfg), features=FEATURES, seed=3)
    finally:
        progress.set_tracker(None)
    assert json.loads((run_dir("synth", cache, "B") / "manifest.json").read_text())["complete"] is False
    torch.manual_seed(123)
    b = train_reir("synth", cache, "B", variant_config("reir", **cfg), features=FEATURES, seed=3)
    assert b["resumed_from"] == 1
    wa = load_weights(Path(a["run"]) / CHECKPOINT_FILE)["model"]
    wb = load_weights(Path(b["run"]) / CHECKPOINT_FILE)["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (Path(a["run"]) / MODEL_FILE).read_bytes() == (Path(b["run"]) / MODEL_FILE).read_bytes()
    assert [e["loss"] for e in a["curve"]["epochs"]] == [e["loss"] for e in b["curve"]["epochs"]]


def test_cli_pseudo_train_eval_show(cache, tmp_path, capsys):
    from refground.cli.main import main
    from refground.data.store import load_named

    c = ("--cache", str(cache))
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    ps = run_json(capsys, "pseudo", "reir", *c, "--min-count", "1")
    assert ps["status"] in ("hit", "written")
    res = run_json(capsys, "train", "reir", *c, "--config", str(cfg), "--features", FEATURES, "--threads", "1",
                   "--epochs", "1")
    assert res["cache_hit"] is False and Path(res["run"]) == cache / "synth" / "runs" / "reir" / "reir"
    assert 0 <= res["metrics"]["accuracy"] <= 1
    ev = run_json(capsys, "eval", "--method", "reir", "--split", "val", *c, "--threads", "1")
    pg = ev["phrase_grounding"]["all"]
    assert pg["phrases"] > 0 and pg["scored"] == pg["phrases"] and 0 <= pg["accuracy"] <= 1
    lines = [json.loads(line) for line in Path(ev["predictions"]).read_text().splitlines()]
    assert lines and set(lines[0]) == {"query_id", "mention", "box"}
    base = run_json(capsys, "eval", "--method", "reir", "--run", "class-name", "--split", "val", *c,
                    "--features", FEATURES)
    assert base["phrase_grounding"]["all"]["phrases"] == pg["phrases"]
    qid = load_named("synth", cache).queries("val", "caption")[0].id
    png = tmp_path / "x.png"
    assert main(["show", "--method", "reir", "--query", str(qid), "--out", str(png), *c]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_inputs_are_one_line_naming_the_step(pipeline_cache, tmp_path, capsys):
    cache = Path(shutil.copytree(pipeline_cache, tmp_path / "cache"))
    err = fail(capsys, "train", "reir", "--cache", str(cache), "--epochs", "1")
    assert "refground extract --first-stage" in err
    err = fail(capsys, "train", "reir", "--cache", str(cache), "--epochs", "1", "--features", FEATURES)
    assert "refground pseudo reir" in err


def test_malformed_captions_are_one_line(reir_cache, tmp_path):
    from refground.data.store import load_named
    from refground.errors import DataError

    ds = load_named("synth", reir_cache)
    rows = ds.query_rows("train", "caption")
    j = int(ds.query_mention_offsets[rows[0]])
    ds.mention_ends = ds.mention_ends.copy()
    ds.mention_ends[j] = 999  # a phrase span out of range
    with pytest.raises(DataError, match="spans tokens"):
        tables(reir_cache, ds)

    ds = load_named("synth", reir_cache)
    assert ds.query_tasks[-1] == 1  # the dataset's last query is a caption (of the last image)
    ds.query_mention_offsets = ds.query_mention_offsets.copy()
    ds.query_mention_offsets[-1] = ds.query_mention_offsets[-2]  # an empty caption: no phrase at all
    with pytest.raises(DataError, match="has no phrases"):
        tables(reir_cache, ds, "all")
