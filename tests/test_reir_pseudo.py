"""ReIR relation labels: the caption relation parser (toolkit heuristic, dependency rules, spaCy errors), the
``pseudo/reir.h5`` artifact (classes counted on train only, labels, cache hit, staleness) and its report
(precision/recall against a slow recount; labels blind to the recorded relations and objects)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from collections import Counter

import numpy as np
import pytest

from refground.data.model import Dataset, Image, Mention, Object, Query, Relation, split_matches
from refground.data.store import dataset_dir, load_named, save_dataset
from refground.data.synth.world import CAPTION_OPENERS, PLURALS, RELATION_WORDS
from refground.errors import ArtifactError, DataError, UsageError
from refground.methods.reir.pseudo import (build_pseudo_reir, load_pseudo_reir, pseudo_path, pseudo_reir,
                                           pseudo_relations)
from refground.text import nouns
from refground.text import relations as rel
from refground.text.relations import parse_relations, relations_from_parse


def spans_of(tokens: list[str], phrases: list[str]) -> list[tuple[int, int]]:
    """Token spans of ``phrases`` in ``tokens``, left to right (each phrase after the previous one)."""
    out, pos = [], 0
    for p in phrases:
        words = p.split(" ")
        for i in range(pos, len(tokens) - len(words) + 1):
            if tokens[i:i + len(words)] == words:
                out.append((i, i + len(words)))
                pos = i + len(words)
                break
        else:
            raise AssertionError(f"{p!r} not in {tokens}")
    return out


def parse(text: str, phrases: list[str]) -> list[tuple[str, str, str]]:
    toks = text.split(" ")
    return [(phrases[s], p, phrases[o]) for s, p, o in parse_relations(toks, spans_of(toks, phrases))]


# ------------------------------------------------------------------------------------- toolkit parser
ALL_RELATION_WORDS = [w for words in RELATION_WORDS.values() for w in words]


@pytest.mark.parametrize("opener", ["", *CAPTION_OPENERS])
@pytest.mark.parametrize("words", ALL_RELATION_WORDS)
def test_synthetic_grammar(opener, words):
    phrases = ["a red square", f"two {PLURALS['circle']}", "a star"]
    text = " ".join(filter(None, [opener, phrases[0], words, phrases[1], "and", phrases[2]]))
    assert parse(text, phrases) == [(phrases[0], words, phrases[1])]
    # A chain of relations, each to the phrase just before; "and" relates nothing.
    phrases = ["the small blue heart", "three green crosses", "a hexagon", "two diamonds"]
    text = " ".join(filter(None, [opener, phrases[0], "and", phrases[1], words, phrases[2], "above", phrases[3]]))
    assert parse(text, phrases) == [(phrases[1], words, phrases[2]), (phrases[2], "above", phrases[3])]


def test_free_english_examples():
    assert parse("A man in a blue shirt is holding a small dog .", ["A man", "a blue shirt", "a small dog"]) == [
        ("A man", "in", "a blue shirt"), ("A man", "is holding", "a small dog")]
    assert parse("Two dogs are playing on the grass next to a tree .", ["Two dogs", "the grass", "a tree"]) == [
        ("Two dogs", "are playing on", "the grass"), ("the grass", "next to", "a tree")]


@pytest.mark.parametrize("text, phrases, expected", [
    # A participle climbs the chain of prepositional attachments to the clause's subject.
    ("a man in a shirt with stripes holding a dog", ["a man", "a shirt", "stripes", "a dog"],
     [("a man", "in", "a shirt"), ("a shirt", "with", "stripes"), ("a man", "holding", "a dog")]),
    # A relative clause attaches to the phrase before it; the main verb to the clause's subject.
    ("A woman who is holding a baby stands next to a man .", ["A woman", "a baby", "a man"],
     [("A woman", "is holding", "a baby"), ("A woman", "stands next to", "a man")]),
    # A copula before a bare preposition is dropped ("is on" and "on" are one class).
    ("A cat is on a table", ["A cat", "a table"], [("A cat", "on", "a table")]),
    ("the circle that is left of the square", ["the circle", "the square"], [("the circle", "left of", "the square")]),
    # Coordination: before the main verb a conjunct shares its role; after it, a conjunct with a finite verb
    # starts a new clause.
    ("A man in a blue shirt and jeans is playing a guitar .", ["A man", "a blue shirt", "jeans", "a guitar"],
     [("A man", "in", "a blue shirt"), ("A man", "is playing", "a guitar")]),
    ("A man is holding a dog and a woman is petting a cat", ["A man", "a dog", "a woman", "a cat"],
     [("A man", "is holding", "a dog"), ("a woman", "is petting", "a cat")]),
    ("A man is sitting and reading a book", ["A man", "a book"], [("A man", "reading", "a book")]),
    ("A man has a beard", ["A man", "a beard"], [("A man", "has", "a beard")]),
    ("A dog is a poodle", ["A dog", "a poodle"], []),  # a lone copula: no relation
    # Punctuation: a comma is dropped, a sentence mark ends the clause.
    ("A man , in a shirt", ["A man", "a shirt"], [("A man", "in", "a shirt")]),
    ("A man sits . A dog runs on a beach", ["A man", "A dog", "a beach"], [("A dog", "runs on", "a beach")]),
    ("A MAN   In a shirt", ["A MAN", "a shirt"], [("A MAN", "in", "a shirt")]),
])
def test_free_english_rules(text, phrases, expected):
    toks = [t for t in text.split(" ") if t]
    got = [(phrases[s], p, phrases[o]) for s, p, o in parse_relations(toks, spans_of(toks, phrases))]
    assert got == expected


def test_edge_cases():
    toks = "a man in a shirt".split(" ")
    assert parse_relations(toks, []) == []
    assert parse_relations(toks, [(0, 2)]) == []  # one phrase
    assert parse_relations("a dog a cat".split(" "), [(0, 2), (2, 4)]) == []  # adjacent: no words between
    assert parse_relations(toks, [(0, 2), (1, 2)]) == []  # overlapping spans count as adjacent
    # Spans in any order: indices are the caller's.
    assert parse_relations(toks, [(3, 5), (0, 2)]) == [(1, "in", 0)]
    assert parse_relations("a dog , . a cat".split(" "), [(0, 2), (4, 6)]) == []
    with pytest.raises(DataError, match="phrase 1"):
        parse_relations(toks, [(0, 2), (3, 6)])
    with pytest.raises(DataError):
        parse_relations(toks, [(2, 2)])


def test_exact_on_the_synthetic_captions(synth_ds):
    """The synthetic world's captions state their relations in the grammar above: parsed == recorded."""
    n = 0
    for q in synth_ds.queries(task="caption"):
        got = parse_relations(q.tokens, [(m.start, m.end) for m in q.mentions])
        assert sorted(got) == sorted((r.subject, r.predicate, r.object) for r in q.relations), q.text
        n += len(got)
    assert n > 10


# ---------------------------------------------------------------------------------- dependency rules
def test_relations_from_a_dependency_parse():
    """spaCy's rules on a hand-written parse (en_core_web_sm's analysis of the sentence), so they are tested
    without spaCy installed."""
    words = "A man in a blue shirt is holding a small dog .".split(" ")
    heads = [1, 7, 1, 5, 5, 2, 7, 7, 10, 10, 7, 7]
    deps = ["det", "nsubj", "prep", "det", "amod", "pobj", "aux", "ROOT", "det", "amod", "dobj", "punct"]
    pos = ["DET", "NOUN", "ADP", "DET", "ADJ", "NOUN", "AUX", "VERB", "DET", "ADJ", "NOUN", "PUNCT"]
    spans = [(0, 2), (3, 6), (8, 11)]
    assert relations_from_parse(words, heads, deps, pos, spans) == [(0, "in", 1), (0, "is holding", 2)]
    # "A cat is on a table": the copula is the root; "is on" -> "on".
    words = "A cat is on a table".split(" ")
    assert relations_from_parse(words, [1, 2, 2, 2, 5, 3], ["det", "nsubj", "ROOT", "prep", "det", "pobj"],
                                ["DET", "NOUN", "AUX", "ADP", "DET", "NOUN"], [(0, 2), (4, 6)]) == [(0, "on", 1)]
    # "A woman who is holding a baby": relcl -> the modified phrase; "a dog and a cat": conj, no relation.
    words = "A woman who is holding a baby and a dog".split(" ")
    heads = [1, 1, 4, 4, 1, 6, 4, 6, 9, 6]
    deps = ["det", "ROOT", "nsubj", "aux", "relcl", "det", "dobj", "cc", "det", "conj"]
    pos = ["DET", "NOUN", "PRON", "AUX", "VERB", "DET", "NOUN", "CCONJ", "DET", "NOUN"]
    assert relations_from_parse(words, heads, deps, pos, [(0, 2), (5, 7), (8, 10)]) == [(0, "is holding", 1)]


def test_spacy_missing_is_one_line_usage_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "spacy", None)  # import spacy -> ImportError
    monkeypatch.setattr(nouns, "_SPACY", {})
    with pytest.raises(UsageError, match="pip install spacy") as exc:
        rel.parse_relations_spacy("a man in a shirt", [(0, 2), (3, 5)])
    assert len(str(exc.value).splitlines()) == 1
    with pytest.raises(UsageError, match="pip install spacy"):
        build_pseudo_reir("synth", tmp_path, parser="spacy")


# ------------------------------------------------------------------------------------------ artifact
@pytest.fixture
def cache(synth_cache, tmp_path):
    root = tmp_path / "cache"
    shutil.copytree(synth_cache / "synth" / "dataset", root / "synth" / "dataset")
    return root


def recount(ds, min_count):
    """Slow and obvious: parse every caption record, count the train split's predicates."""
    parsed = {q.id: parse_relations(q.tokens, [(m.start, m.end) for m in q.mentions])
              for q in ds.queries(task="caption")}
    train = Counter(p for q in ds.queries("train", "caption") for _, p, _ in parsed[q.id])
    everywhere = Counter(p for t in parsed.values() for _, p, _ in t)
    classes = sorted((p for p, c in train.items() if c > min_count), key=lambda p: (-train[p], p))
    return parsed, classes, train, everywhere


def slow_figures(ds, parsed, split):
    hits = n_pred = n_gold = pair_hits = n_pair_pred = n_pair_gold = 0
    for q in ds.queries(task="caption"):
        if not split_matches(q.split, split):
            continue
        gold = {(r.subject, r.predicate, r.object) for r in q.relations}
        pred = set(parsed[q.id])
        hits += len(gold & pred)
        n_pred += len(pred)
        n_gold += len(gold)
        gp, pp = {(s, o) for s, _, o in gold}, {(s, o) for s, _, o in pred}
        pair_hits += len(gp & pp)
        n_pair_pred += len(pp)
        n_pair_gold += len(gp)
    return (hits / n_pred if n_pred else None, hits / n_gold if n_gold else None,
            pair_hits / n_pair_pred if n_pair_pred else None, pair_hits / n_pair_gold if n_pair_gold else None)


def test_artifact_labels_and_figures(cache, synth_ds):
    # The rarest training predicate's count: it is not "more than" itself, so at least one class is dropped.
    min_count = min(recount(synth_ds, 0)[2].values())
    r = build_pseudo_reir("synth", cache, min_count=min_count)
    assert r["status"] == "written"
    path = pseudo_path("synth", cache)
    assert path == cache / "synth" / "pseudo" / "reir.h5" and path.exists()
    parsed, classes, train, everywhere = recount(synth_ds, min_count)
    assert min_count in train.values() and not set(classes) & {p for p, c in train.items() if c == min_count}
    assert classes and r["classes"] == classes and r["classes_kept"] == len(classes)
    assert r["counts"] == {p: train[p] for p in classes}
    assert train != everywhere  # the other splits' captions would count differently
    p = load_pseudo_reir(path)
    caption_ids = [q.id for q in synth_ds.queries(task="caption")]
    assert p.query_ids.tolist() == caption_ids and p.num_classes == len(classes) + 1
    assert p.offsets[0] == 0 and p.offsets[-1] == len(p.label) == r["relations"]
    unkept = 0
    for qid in caption_ids:
        assert p.triples(qid) == parsed[qid]
        s, o, lab = p.edges(qid)
        assert s.tolist() == [t[0] for t in parsed[qid]] and o.tolist() == [t[2] for t in parsed[qid]]
        expected = [classes.index(t[1]) + 1 if t[1] in classes else 0 for t in parsed[qid]]
        assert lab.tolist() == expected
        unkept += expected.count(0)
    assert unkept > 0  # some predicates are too rare at this size: their edges keep label 0
    import h5py

    with h5py.File(path) as f:
        assert f["queries/ids"].dtype == np.int64 and f["relations/offsets"].dtype == np.int64
        assert all(f[f"relations/{k}"].dtype == np.int32 for k in ("subject", "object", "label"))
        assert json.loads(f.attrs["classes"]) == classes and f.attrs["min_count"] == min_count
        assert f.attrs["parser"] == "toolkit" and json.loads(f.attrs["counts"]) == r["counts"]
    # Precision and recall equal a slow recount (exact on the synthetic world).
    for split in ("train", "val", "test", "all"):
        st = r["splits"][split]
        assert (st["precision"], st["recall"], st["pair_precision"], st["pair_recall"]) == pytest.approx(
            slow_figures(synth_ds, parsed, split)), split
    assert r["splits"]["all"]["precision"] == 1.0 and r["splits"]["all"]["recall"] == 1.0
    assert r["splits"]["train"]["captions"] == len(synth_ds.queries("train", "caption"))
    # Nothing is frequent enough: no class, every edge 0, and the figures say so.
    none = build_pseudo_reir("synth", cache, min_count=10_000)
    assert none["status"] == "written" and none["classes"] == [] and "classes_note" in none
    assert (load_pseudo_reir(path).label == 0).all()


def test_cache_hit_and_stale(cache):
    r = pseudo_reir("synth", cache, min_count=2)
    assert r["status"] == "written" and r["json"]["classes_kept"] == r["classes_kept"]
    assert [t.columns[0] for t in r["tables"]] == ["figure", "split", "class"]
    path = pseudo_path("synth", cache)
    mtime = path.stat().st_mtime_ns
    again = build_pseudo_reir("synth", cache, min_count=2, seed=7)  # the seed changes nothing
    assert again["status"] == "hit" and path.stat().st_mtime_ns == mtime
    assert again["splits"] == r["splits"] and again["classes"] == r["classes"]
    assert build_pseudo_reir("synth", cache, min_count=2, force=True)["status"] == "written"
    assert build_pseudo_reir("synth", cache, min_count=3)["status"] == "written"  # new parameters: a miss
    assert load_pseudo_reir(path).min_count == 3
    mpath = cache / "synth" / "dataset" / "manifest.json"
    m = json.loads(mpath.read_text())
    m["params"]["seed"] = 12345
    mpath.write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=r"stale.*refground pseudo reir"):
        load_pseudo_reir(path)
    assert build_pseudo_reir("synth", cache, min_count=3)["status"] == "written"
    load_pseudo_reir(path)


def test_missing_and_bad_options(cache):
    with pytest.raises(ArtifactError, match=r"missing.*refground pseudo reir"):
        load_pseudo_reir(pseudo_path("synth", cache))
    with pytest.raises(UsageError, match="parser"):
        build_pseudo_reir("synth", cache, parser="nltk")
    for bad in (-1, 2.5, True):
        with pytest.raises(UsageError, match="min-count"):
            build_pseudo_reir("synth", cache, min_count=bad)
    p = build_pseudo_reir("synth", cache, min_count=2)
    with pytest.raises(ArtifactError, match="no parsed relations"):
        load_pseudo_reir(p["path"]).edges(-5)


def test_no_captions_is_a_usage_error(tmp_path):
    ds = Dataset.from_records("tiny", [Image(1, "x.png", 32, 32, "train")], [Object(1, 1, "circle", (0, 0, 8, 8))],
                              [Query(1, 1, "expression", "the circle", (Mention(0, 2, "referent", (1,)),),
                                     split="train")], categories=["circle"])
    save_dataset(ds, dataset_dir("tiny", tmp_path))
    with pytest.raises(UsageError, match="no caption queries"):
        build_pseudo_reir("tiny", tmp_path)


def test_labels_blind_to_recorded_relations_and_objects(cache, synth_ds, tmp_path):
    """Scramble every caption's recorded relations and its mentions' objects: the labels stay the same (the
    parser never reads them); only the report's figures, which compare with them, change."""
    rng = np.random.default_rng(0)
    object_ids = synth_ds.object_ids.tolist()
    queries = []
    for q in synth_ds.queries():
        if q.task != "caption":
            queries.append(q)
            continue
        n = len(q.mentions)
        mentions = tuple(dataclasses.replace(m, object_ids=tuple(int(v) for v in rng.choice(object_ids, 2)))
                         for m in q.mentions)
        relations = tuple(Relation(int(rng.integers(n)), "zz under", int(rng.integers(n))) for _ in range(n))
        queries.append(dataclasses.replace(q, mentions=mentions, relations=relations))
    scrambled = Dataset.from_records("synth", synth_ds.images(), synth_ds.objects(), queries, synth_ds.categories,
                                     synth_ds.meta)
    other = tmp_path / "scrambled"
    save_dataset(scrambled, dataset_dir("synth", other), params={"scrambled": True})
    a = build_pseudo_reir("synth", cache, min_count=2)
    b = build_pseudo_reir("synth", other, min_count=2)
    pa, pb = load_pseudo_reir(a["path"]), load_pseudo_reir(b["path"])
    for k in ("query_ids", "offsets", "subject", "object", "label", "predicate"):
        assert np.array_equal(getattr(pa, k), getattr(pb, k)), k
    assert (pa.predicates, pa.classes, pa.counts) == (pb.predicates, pb.classes, pb.counts)
    assert a["splits"]["all"]["precision"] == 1.0 and b["splits"]["all"]["precision"] < 0.5
    # And the in-memory path agrees with the artifact.
    mem = pseudo_relations(load_named("synth", other), min_count=2)
    assert np.array_equal(mem.label, pa.label) and mem.classes == pa.classes
