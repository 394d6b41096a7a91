"""VL-NMS text-similarity pseudo ground truth: contexts vs a slow reference, precision/recall, the artifact
and the CLI."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys

import numpy as np
import pytest

from conftest import fail, run_json
from refground.data.model import Dataset, Image, Mention, Object, Query
from refground.errors import ArtifactError, UsageError
from refground.methods.vlnms.pseudo import (build_pseudo_vlnms, evaluate_pseudo, load_pseudo_vlnms, pseudo_contexts, pseudo_path,
                              read_pseudo)
from refground.text.nouns import NounLexicon, extract_nouns
from refground.text.wordvec import WordVectors, toolkit_vectors


def reference_contexts(ds, vectors, gamma):
    """Slow, obviously correct: every query, every object, every noun, cosine by hand."""
    lex = NounLexicon.for_dataset(ds)
    out = {}
    for q in ds.queries(task="expression"):
        nouns = extract_nouns(q.tokens, lex)
        ref = q.referent_object_id
        ctx, matched = [], False
        for o in ds.objects_of(q.image_id):
            best = -math.inf
            for n in nouns:
                a = vectors.vectors([n])[0].astype(np.float64)
                b = vectors.vectors([o.category])[0].astype(np.float64)
                best = max(best, float(a @ b))
            if best >= gamma - 1e-6:
                if o.id == ref:
                    matched = True
                else:
                    ctx.append(o.id)
        out[q.id] = (ctx, matched)
    return out


def random_vectors(ds, seed):
    """Random vectors over the world's words: cross-category similarities spread over [-1, 1]."""
    rng = np.random.default_rng(seed)
    words = [*ds.categories, "object", "shape", "thing", "one"]
    return WordVectors(words, rng.normal(size=(len(words), 3)), identity=f"random{seed}")


@pytest.mark.parametrize("gamma", [-1.0, 0.0, 0.4, 0.9, 1.0])
@pytest.mark.parametrize("kind", ["toolkit", "random"])
def test_matches_slow_reference(synth_ds, gamma, kind):
    vectors = toolkit_vectors(synth_ds) if kind == "toolkit" else random_vectors(synth_ds, 3)
    got = pseudo_contexts(synth_ds, vectors, gamma=gamma)
    ref = reference_contexts(synth_ds, vectors, gamma)
    assert list(got.query_ids) == list(ref)
    assert got.offsets[0] == 0 and got.offsets[-1] == len(got.object_ids)
    for row, qid in enumerate(got.query_ids.tolist()):
        ctx, matched = ref[qid]
        assert got.contexts(row).tolist() == ctx, (qid, gamma)
        assert bool(got.referent_matched[row]) == matched
    if gamma == -1.0:  # everything matches: every other object of the image is a context
        assert got.referent_matched.all()
        n_obj = [len(synth_ds.objects_of(synth_ds.query(q).image_id)) - 1 for q in got.query_ids.tolist()]
        assert np.diff(got.offsets).tolist() == n_obj


def test_split_and_options(synth_ds):
    vectors = toolkit_vectors(synth_ds)
    train = pseudo_contexts(synth_ds, vectors, split="train")
    assert set(train.query_ids.tolist()) == {q.id for q in synth_ds.queries("train", "expression")}
    with pytest.raises(UsageError, match="gamma"):
        pseudo_contexts(synth_ds, vectors, gamma=1.5)
    with pytest.raises(UsageError, match="parser"):
        pseudo_contexts(synth_ds, vectors, parser="nltk")


# ------------------------------------------------------------------------------------ hand-checked case
def tiny_dataset(with_context=True):
    """One image: A circle (referent), B square (mentioned context), C square, D star."""
    objs = [Object(1, 10, "circle", (0, 0, 10, 10)), Object(2, 10, "square", (20, 0, 30, 10)),
            Object(3, 10, "square", (40, 0, 50, 10)), Object(4, 10, "star", (0, 20, 10, 30))]
    role = "context" if with_context else "referent"
    queries = [
        Query(100, 10, "expression", "the circle left of the square",
              (Mention(0, 2, "referent", (1,), "circle"), *((Mention(4, 6, "context", (2,), "square"),)
                                                             if with_context else ())), kind="relation1",
              split="train"),
        Query(101, 10, "expression", "the circle", (Mention(0, 2, "referent", (1,), "circle"),), kind="category",
              split="train"),
        Query(102, 10, "expression", "the star above the circle",
              (Mention(0, 2, "referent", (4,), "star"), *((Mention(3, 5, role, (1,), "circle"),)
                                                           if with_context else ())), kind="relation1",
              split="val"),
        Query(103, 10, "caption", "a circle and a star", (Mention(0, 2, "referent", (1,), "circle"),),
              kind="caption", split="train"),
    ]
    return Dataset.from_records("tiny", [Image(10, "x.png", 64, 64, "train")], objs, queries,
                                categories=["circle", "square", "star"])


ONE_HOT = WordVectors(["circle", "square", "star"], np.eye(3), identity="onehot")


def test_precision_recall_hand_checked():
    ds = tiny_dataset()
    p = pseudo_contexts(ds, ONE_HOT, gamma=0.4)
    # 100: nouns circle, square -> B, C (A is the referent); 101: none; 102: star, circle -> A. Caption skipped.
    assert p.as_dict().keys() == {100, 101, 102}
    assert {k: v.tolist() for k, v in p.as_dict().items()} == {100: [2, 3], 101: [], 102: [1]}
    assert p.referent_matched.tolist() == [True, True, True]
    r = evaluate_pseudo(ds, p)
    assert r["has_context_mentions"] and "note" not in r
    assert (r["pseudo"], r["gold"], r["hits"]) == (3, 2, 2)
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == 1.0
    assert r["per_kind"]["relation1"]["precision"] == pytest.approx(2 / 3)
    assert r["per_kind"]["category"] == {"queries": 1, "pseudo": 0, "gold": 0, "hits": 0, "precision": None,
                                         "recall": None, "referent_matched": 1.0, "pseudo_per_query": 0.0}
    # "square" and "star" out of vocabulary (similarity 0): 100 loses B, 102 keeps A, 102's referent unmatched.
    p2 = pseudo_contexts(ds, WordVectors(["circle"], np.eye(1)), gamma=0.4)
    assert p2.referent_matched.tolist() == [True, True, False]
    r2 = evaluate_pseudo(ds, p2)
    assert (r2["pseudo"], r2["gold"], r2["hits"]) == (1, 2, 1)
    assert r2["precision"] == 1.0 and r2["recall"] == 0.5 and r2["referent_matched"] == pytest.approx(2 / 3)
    # Nothing predicted: precision undefined (None), recall 0.
    r3 = evaluate_pseudo(ds, pseudo_contexts(ds, ONE_HOT, gamma=1.0 + 0))
    assert r3["pseudo"] == 3  # gamma 1 still matches identical words
    r4 = evaluate_pseudo(ds, pseudo_contexts(ds, WordVectors(["x"], np.eye(1)), gamma=0.4))
    assert (r4["pseudo"], r4["recall"], r4["precision"]) == (0, 0.0, None)


def test_no_context_mentions_says_so():
    ds = tiny_dataset(with_context=False)
    r = evaluate_pseudo(ds, pseudo_contexts(ds, ONE_HOT))
    assert not r["has_context_mentions"]
    assert r["precision"] is None and r["recall"] is None and "no context mentions" in r["note"]


# ------------------------------------------------------------------------------------------ artifact
@pytest.fixture
def cache(synth_cache, tmp_path):
    root = tmp_path / "cache"
    shutil.copytree(synth_cache / "synth" / "dataset", root / "synth" / "dataset")
    return root


def test_artifact_hit_force_stale(cache, synth_ds):
    r = build_pseudo_vlnms("synth", cache)
    assert r["status"] == "written" and r["has_context_mentions"]
    path = pseudo_path("synth", cache)
    assert path == cache / "synth" / "pseudo" / "vlnms.h5" and path.exists()
    expected = pseudo_contexts(synth_ds, toolkit_vectors(synth_ds))
    loaded = load_pseudo_vlnms(path)
    assert loaded.keys() == expected.as_dict().keys()
    assert all(np.array_equal(loaded[q], v) for q, v in expected.as_dict().items())
    import h5py

    with h5py.File(path) as f:
        assert f["queries/ids"].dtype == np.int64 and f["objects/ids"].dtype == np.int64
        assert np.array_equal(f["queries/offsets"][()], expected.offsets)
        assert f.attrs["vectors"] == "toolkit" and f.attrs["gamma"] == 0.4 and f.attrs["parser"] == "toolkit"
    mtime = path.stat().st_mtime_ns
    again = build_pseudo_vlnms("synth", cache)
    assert again["status"] == "hit" and path.stat().st_mtime_ns == mtime
    assert {k: again[k] for k in ("precision", "recall")} == {k: r[k] for k in ("precision", "recall")}
    assert build_pseudo_vlnms("synth", cache, force=True)["status"] == "written"
    assert build_pseudo_vlnms("synth", cache, gamma=0.5)["status"] == "written"  # new parameters: a miss
    assert read_pseudo(path).gamma == 0.5
    # The dataset changes: the artifact is stale and refused, naming the step.
    mpath = cache / "synth" / "dataset" / "manifest.json"
    m = json.loads(mpath.read_text())
    m["params"]["seed"] = 12345
    mpath.write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=r"stale.*refground pseudo vlnms"):
        load_pseudo_vlnms(path)
    assert build_pseudo_vlnms("synth", cache, gamma=0.5)["status"] == "written"
    load_pseudo_vlnms(path)


def test_artifact_incomplete_and_missing(cache):
    path = pseudo_path("synth", cache)
    with pytest.raises(ArtifactError, match=r"missing.*refground pseudo vlnms"):
        load_pseudo_vlnms(path)
    build_pseudo_vlnms("synth", cache)
    mpath = path.with_name(path.name + ".manifest.json")
    m = json.loads(mpath.read_text())
    m["complete"] = False
    mpath.write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=r"incomplete.*refground pseudo vlnms"):
        load_pseudo_vlnms(path)
    assert build_pseudo_vlnms("synth", cache)["status"] == "written"  # not current: redone


def test_artifact_with_glove_file(cache, synth_ds, tmp_path):
    glove = tmp_path / "g.txt"
    lines = [f"{c} " + " ".join("1" if j == i else "0" for j in range(8)) for i, c in enumerate(synth_ds.categories)]
    glove.write_text("\n".join(lines) + "\n")
    r = build_pseudo_vlnms("synth", cache, word_vectors=glove)
    assert r["vectors"] == hashlib.sha256(glove.read_bytes()).hexdigest()
    p = read_pseudo(pseudo_path("synth", cache))
    assert p.vectors == r["vectors"]
    # One-hot category vectors: exactly the same-category objects, as with the toolkit vectors here.
    ref = reference_contexts(synth_ds, WordVectors(list(synth_ds.categories), np.eye(8)), 0.4)
    assert {q: v.tolist() for q, v in p.as_dict().items()} == {q: c for q, (c, _) in ref.items()}
    glove.write_text("\n".join(lines[::-1]) + "\n")  # the vector file changes: stale
    with pytest.raises(ArtifactError, match="stale"):
        read_pseudo(pseudo_path("synth", cache))


# ------------------------------------------------------------------------------------------------ CLI
def test_cli(cache, capsys, tmp_path, monkeypatch):
    from refground.cli.main import main

    res = run_json(capsys, "pseudo", "vlnms", "--cache", str(cache))
    assert res["status"] == "written" and 0 < res["precision"] <= 1 and res["recall"] == 1.0
    assert json.loads((cache / "synth" / "pseudo" / "vlnms.json").read_text()) == res
    assert run_json(capsys, "pseudo", "vlnms", "--cache", str(cache))["status"] == "hit"
    assert main(["pseudo", "vlnms", "--cache", str(cache), "--gamma", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "precision" in out and "relation2" in out
    assert "--gamma" in fail(capsys, "pseudo", "vlnms", "--cache", str(cache), "--gamma", "1.5")
    assert "parser" in fail(capsys, "pseudo", "vlnms", "--cache", str(cache), "--parser", "nltk")
    assert "not found" in fail(capsys, "pseudo", "vlnms", "--cache", str(cache), "--word-vectors",
                               str(tmp_path / "nope.txt"))
    bad = tmp_path / "bad.txt"
    bad.write_text("circle 1 0\nsquare 0 oops\n")
    assert "bad.txt:2:" in fail(capsys, "pseudo", "vlnms", "--cache", str(cache), "--word-vectors", str(bad))
    monkeypatch.setitem(sys.modules, "spacy", None)
    from refground.text import nouns

    nouns._SPACY.clear()
    assert "pip install spacy" in fail(capsys, "pseudo", "vlnms", "--cache", str(cache), "--parser", "spacy")
    assert "refground" in fail(capsys, "pseudo", "vlnms", "--cache", str(tmp_path / "empty"))
