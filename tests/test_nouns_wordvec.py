"""Noun extraction (the toolkit heuristic, the optional spaCy path) and word vectors (GloVe files, toolkit)."""

from __future__ import annotations

import hashlib
import sys

import numpy as np
import pytest

from refground.errors import DataError, UsageError
from refground.text.nouns import NounLexicon, default_lexicon, extract_nouns, extract_nouns_spacy
from refground.text.wordvec import WordVectors, load_glove, toolkit_vectors


@pytest.mark.parametrize("text, nouns", [
    ("the star object that is to the left of the medium green triangle", ["star", "object", "triangle"]),
    ("the one that is the large diamond on the left", ["one", "diamond"]),
    ("three stars and a pink heart and the crosses", ["star", "heart", "cross"]),
    ("a cyan diamond over the small square", ["diamond", "square"]),
    ("the leftmost red hexagon", ["hexagon"]),
    ("", []),
])
def test_synthetic_sentences(text, nouns):
    assert extract_nouns(text.split(" ")) == nouns


REAL = NounLexicon.from_names(["person", "traffic light", "zebra", "bus", "umbrella"])


@pytest.mark.parametrize("text, nouns", [
    ("man holding an umbrella on the left", ["man", "umbrella"]),
    ("the guy in red shirt near the traffic light", ["guy", "shirt", "traffic light"]),
    ("Zebras behind the fence", ["zebra", "fence"]),
    ("woman who is standing next to the bus", ["woman", "bus"]),
    ("left most zebra", ["zebra"]),
    ("the one in white", ["one"]),  # "white" is a colour, never a noun
])
def test_real_style_sentences(text, nouns):
    assert extract_nouns(text.split(" "), REAL) == nouns


def test_without_head_rule_only_lexicon_nouns():
    lex = NounLexicon.from_names(["zebra"], head_rule=False)
    assert extract_nouns("the zebra near the fence".split(), lex) == ["zebra"]


def test_every_fixture_mention_head_is_extracted(synth_ds):
    """Each mention of the synthetic world names its category: the extractor finds it, and nothing
    outside the world's lexicon (captions' openers "a picture of", "an image with" are real nouns)."""
    lex = NounLexicon.for_dataset(synth_ds)
    allowed = set(synth_ds.categories) | {"object", "shape", "thing", "one", "item", "picture", "image"}
    checked = 0
    for q in synth_ds.queries():
        toks = q.tokens
        assert set(extract_nouns(toks, lex)) <= allowed, q.text
        for m in q.mentions:
            assert m.type in extract_nouns(toks[m.start:m.end], lex), (q.text, m)
            checked += 1
    assert checked > 100


def test_default_lexicon_is_the_synthetic_world():
    lex = default_lexicon()
    assert "hexagon" in lex.nouns and lex.plurals["crosses"] == "cross"


def test_spacy_missing_is_one_line_usage_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "spacy", None)  # import spacy -> ImportError
    from refground.text import nouns

    nouns._SPACY.clear()
    with pytest.raises(UsageError, match="pip install spacy") as exc:
        extract_nouns_spacy("the man on the left")
    assert "\n" not in str(exc.value)


# ------------------------------------------------------------------------------------------------- GloVe
def write(path, text):
    path.write_text(text)
    return path


def test_glove_reader(tmp_path):
    p = write(tmp_path / "g.txt", "traffic 1 0 0\nlight 0 1 0\ncar 0 0 2\nCar 5 5 5\nzebra 1 1 0\n")
    wv = load_glove(p)
    assert wv.words == ["traffic", "light", "car", "zebra"]  # first occurrence of a word wins
    assert wv.dim == 3 and wv.matrix.dtype == np.float32
    assert np.allclose(np.linalg.norm(wv.matrix, axis=1), 1)
    assert wv.identity == hashlib.sha256(p.read_bytes()).hexdigest()
    s = wv.similarity(["car", "zebra", "unknownword", "traffic light"], ["car", "traffic light"])
    assert s.shape == (4, 2)
    assert s[0, 0] == pytest.approx(1) and s[0, 1] == pytest.approx(0)
    assert s[2].tolist() == [0, 0]  # out of vocabulary -> 0
    assert s[1, 1] == pytest.approx(1)  # zebra (1,1,0) is the mean direction of traffic and light
    assert s[3, 1] == pytest.approx(1)


def test_glove_restrict_header_and_gz(tmp_path):
    import gzip

    p = tmp_path / "g.txt.gz"
    with gzip.open(p, "wt") as fh:
        fh.write("3 2\na 1 0\nb 0 1\nc 1 1\n")
    wv = load_glove(p, restrict_to={"b", "c"})
    assert wv.words == ["b", "c"]


@pytest.mark.parametrize("body, line", [
    ("a 1 0\nb 0 x\n", 2),       # non-numeric value in a kept line
    ("a 1 0\nb 0\nc 1 1\n", 2),   # too few values
    ("a 1 0\nb 1 0\nc nan 1\n", 3),
])
def test_glove_malformed_line_names_file_and_line(tmp_path, body, line):
    p = write(tmp_path / "bad.txt", body)
    with pytest.raises(DataError, match=rf"bad\.txt:{line}:") as exc:
        load_glove(p)
    assert "\n" not in str(exc.value)


def test_glove_missing_and_empty(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        load_glove(tmp_path / "nope.txt")
    with pytest.raises(DataError, match="no word vectors"):
        load_glove(write(tmp_path / "empty.txt", "\n"))


# ------------------------------------------------------------------------------------------- toolkit
def test_toolkit_vectors_deterministic_and_discriminative(synth_ds):
    a = toolkit_vectors(synth_ds)
    b = toolkit_vectors(synth_ds)
    assert a.words == b.words and np.array_equal(a.matrix, b.matrix)
    assert a.identity == "toolkit" and toolkit_vectors(synth_ds, dim=5).dim == 5
    s = a.similarity(synth_ds.categories, synth_ds.categories)
    assert np.allclose(np.diag(s), 1, atol=1e-5)  # a category name and the same noun: similarity 1
    off = s[~np.eye(len(s), dtype=bool)]
    assert off.max() < 0.4  # grounded contexts tell the categories apart
    assert a.similarity(["zzz"], ["circle"])[0, 0] == 0


def test_wordvectors_phrase_mean_and_shapes():
    wv = WordVectors(["a", "b"], np.array([[2, 0], [0, 3]]))
    v = wv.vectors(["a b", "a_b", "c", "a"])
    assert np.allclose(v[0], [2 ** -0.5, 2 ** -0.5]) and np.allclose(v[0], v[1])
    assert np.all(v[2] == 0) and np.allclose(v[3], [1, 0])
    assert wv.similarity([], ["a"]).shape == (0, 1)
