"""Runs across datasets: ``--run NAME | DATASET/NAME | PATH`` and ``--detector builtin:DATASET/NAME``; a run
trained on one dataset extracting, predicting and evaluating on another, with its own vocabulary."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import TINY_CMRIN, fail, run_json, train_tiny_cmrin
from refground.errors import UsageError
from refground.runs import is_path_spec, local_run_name, resolve_run

pytestmark = pytest.mark.usefixtures("torch_one_thread")


# ------------------------------------------------------------------------------------------- spelling
@pytest.mark.parametrize("spec, is_path", [("cmrin", False), ("synth/cmrin", False), ("./cmrin", True),
                                           ("/abs/run", True), ("a/b/c", True), ("~/run", True),
                                           ("../x", True), ("x/.hidden", True), (".cmrin", True)])
def test_run_spelling(spec, is_path):
    assert is_path_spec(spec) is is_path


def test_resolve_run_forms(tmp_path):
    own = resolve_run("cmrin", "cmrin", "synth", tmp_path)
    assert own.local and own.path == tmp_path / "synth" / "runs" / "cmrin" / "cmrin" and own.tag == "cmrin"
    other = resolve_run("synth/full", "cmrin", "other", tmp_path)
    assert not other.local and other.dataset == "synth" and other.tag == "synth.full"
    assert other.path == tmp_path / "synth" / "runs" / "cmrin" / "full"
    same = resolve_run("synth/full", "cmrin", "synth", tmp_path)
    assert same.local and same.tag == "full"
    outside = resolve_run(str(tmp_path / "models" / "best"), "cmrin", "synth", tmp_path)
    assert outside.dataset is None and not outside.local and outside.tag.startswith("best@")
    # The same folder name elsewhere is another tag: two outside runs never share what they write.
    assert resolve_run(str(tmp_path / "m2" / "best"), "cmrin", "synth", tmp_path).tag != outside.tag
    # A folder in a cache's layout is that dataset's run (only where <x>/dataset is a dataset folder).
    (tmp_path / "synth" / "dataset").mkdir(parents=True)
    inside = resolve_run(str(tmp_path / "synth" / "runs" / "cmrin" / "x"), "cmrin", "synth", tmp_path)
    assert inside.local and inside.tag == "x"
    lookalike = resolve_run(str(tmp_path / "nocache" / "runs" / "cmrin" / "x"), "cmrin", "synth", tmp_path)
    assert lookalike.dataset is None and lookalike.tag.startswith("x@")


def test_training_writes_only_its_own_dataset():
    assert local_run_name("synth/x", "cmrin", "synth") == "x"
    with pytest.raises(UsageError, match="--dataset other --run x"):
        local_run_name("other/x", "cmrin", "synth")
    with pytest.raises(UsageError, match="plain NAME"):
        local_run_name("/tmp/x", "cmrin", "synth")


# ------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def two_worlds(pipeline_cache, tmp_path_factory) -> Path:
    """The pipeline cache (dataset synth: tiny detector, features, graphs) with a tiny CMRIN run, plus a second
    synthetic world "other" (another seed, 12 images) with nothing extracted."""
    from refground.data.store import dataset_dir
    from refground.data.synth import write_synthetic

    root = Path(shutil.copytree(pipeline_cache, tmp_path_factory.mktemp("across") / "cache"))
    write_synthetic(dataset_dir("other", root), name="other", num_images=12, seed=7, image_size=128, workers=1)
    train_tiny_cmrin(root)
    return root


def test_run_of_one_dataset_extracts_predicts_and_evaluates_on_another(two_worlds, capsys):
    c = str(two_worlds)
    # No features of the other world yet: the error names the extract command with the run's detector.
    err = fail(capsys, "eval", "--method", "cmrin", "--run", "synth/cmrin", "--dataset", "other", "--split", "val",
               "--cache", c)
    assert "refground extract --dataset other --detector builtin:synth/default" in err
    res = run_json(capsys, "extract", "--dataset", "other", "--detector", "builtin:synth/default", "--no-dense",
                   "--max-proposals", "20", "--cache", c)
    feats = two_worlds / "other" / "features" / "detector-synth.default.h5"
    assert feats.is_file(), res
    man = json.loads((feats.parent / "detector-synth.default.h5.manifest.json").read_text())
    assert man["params"]["detector"] == "builtin:synth/default"
    # The manifest records where the detector came from: the other dataset's run, by a path inside the cache.
    assert Path(man["parents"]["detector"]["path"]).parts[-4:] == ("synth", "runs", "detector", "default")
    run_json(capsys, "graph", "--dataset", "other", "--features", "detector-synth.default", "--cache", c)
    out = run_json(capsys, "eval", "--method", "cmrin", "--run", "synth/cmrin", "--dataset", "other", "--split",
                   "val", "--cache", c)
    pred = Path(out["predictions"])
    assert pred.parent == two_worlds / "other" / "predictions" / "cmrin" / "synth.cmrin"
    assert 0.0 <= out["comprehension"]["all"]["precision@1"] <= 1.0
    run = out["run"]
    assert run["run_origin"]["dataset"] == "synth" and run["features"] == "detector-synth.default"
    words = run["unknown_words"]
    assert words["queries"] == out["counts"]["expressions"] and 0 <= words["unknown_tokens"] <= words["tokens"]
    # The figures file beside the predictions holds the same record.
    saved = json.loads(pred.with_name(f"{pred.stem}.eval-val.json").read_text())
    assert saved["run"] == run
    # A second eval is a cache hit and still reports the unknown words.
    again = run_json(capsys, "eval", "--method", "cmrin", "--run", "synth/cmrin", "--dataset", "other", "--split",
                     "val", "--cache", c)
    assert again["run"]["unknown_words"] == words
    assert again["comprehension"] == out["comprehension"]
    # The run's own dataset is untouched: nothing was written into the run folder for the other world.
    assert not (two_worlds / "synth" / "runs" / "cmrin" / "cmrin" / "predictions").exists()


def test_unknown_words_counts(synth_ds):
    from refground.grounding.transfer import split_unknown_words, unknown_words
    from refground.text.vocab import Vocabulary

    v = Vocabulary.build([["the", "red", "ball"]], min_count=1)
    res = unknown_words([["The", "blue", "ball"], ["red", "ball"], ["blue", "cube", "cube"]], v)
    assert res["tokens"] == 8 and res["unknown_tokens"] == 4 and res["queries_with_unknown"] == 2
    assert res["top_unknown"] == [["blue", 2], ["cube", 2]] and res["distinct_unknown"] == 2
    full = split_unknown_words(synth_ds, "val", Vocabulary.of_split(synth_ds, "val", 1))
    assert full["unknown_tokens"] == 0 and full["tokens"] > 0


def test_training_into_another_datasets_run_is_refused(two_worlds, capsys):
    err = fail(capsys, "train", "cmrin", "--dataset", "other", "--run", "synth/cmrin", "--cache", str(two_worlds))
    assert "--dataset synth --run cmrin" in err


def test_the_runs_own_vocabulary_counts_the_unknown_words(two_worlds, capsys):
    """A run whose vocabulary keeps only frequent words: the words of the other world it lacks are counted
    against *its* vocab.json (recomputed here from the files), and the predictions' manifest names the run."""
    from refground.cache.manifest import read_manifest_of
    from refground.data.store import load_named
    from refground.methods.cmrin.model import CMRINConfig
    from refground.methods.cmrin.run import train_cmrin
    from refground.text.vocab import Vocabulary

    c = str(two_worlds)
    train_cmrin("synth", two_worlds, "rare", CMRINConfig(**{**TINY_CMRIN, "min_word_count": 12}), seed=0)
    vocab = set(Vocabulary.load(two_worlds / "synth" / "runs" / "cmrin" / "rare" / "vocab.json").words)
    other = load_named("other", two_worlds)
    tokens = [w.lower() for q in other.queries("val", "expression") for w in q.tokens if w]
    missing = [w for w in tokens if w not in vocab]
    assert missing, "the fixture needs words the run never kept"
    if not (two_worlds / "other" / "graph" / "detector-synth.default.h5").exists():
        run_json(capsys, "extract", "--dataset", "other", "--detector", "builtin:synth/default", "--no-dense",
                 "--max-proposals", "20", "--cache", c)
        run_json(capsys, "graph", "--dataset", "other", "--features", "detector-synth.default", "--cache", c)
    out = run_json(capsys, "eval", "--method", "cmrin", "--run", "synth/rare", "--dataset", "other", "--split", "val",
                   "--cache", c)
    words = out["run"]["unknown_words"]
    assert (words["tokens"], words["unknown_tokens"]) == (len(tokens), len(missing))
    assert words["distinct_unknown"] == len(set(missing))
    assert words["top_unknown"][0][1] == max(missing.count(w) for w in set(missing))
    pred = Path(out["predictions"])
    man = read_manifest_of(pred)  # parent paths inside the cache are stored relative to the manifest
    assert Path(man.parents["run"].path).resolve() == \
        (two_worlds / "synth" / "runs" / "cmrin" / "rare" / "model.pt").resolve()
    assert man.extra["run_origin"]["fingerprint"] == \
        json.loads((two_worlds / "synth" / "runs" / "cmrin" / "rare" / "manifest.json").read_text())["fingerprint"]


def test_run_folder_path_and_chosen_features_keep_apart(two_worlds, capsys):
    """--run PATH applies a run folder; --features other than the run's own writes its own predictions file."""
    c = str(two_worlds)
    run = two_worlds / "synth" / "runs" / "cmrin" / "cmrin"
    own = run_json(capsys, "eval", "--method", "cmrin", "--run", str(run), "--split", "val", "--cache", c)
    assert Path(own["predictions"]) == run / "predictions" / "val.gt.jsonl"  # a path to a local run is the run
    run_json(capsys, "extract", "--features", "again", "--no-dense", "--max-proposals", "20", "--cache", c)
    run_json(capsys, "graph", "--features", "again", "--cache", c)
    chosen = run_json(capsys, "eval", "--method", "cmrin", "--run", "cmrin", "--split", "val", "--features", "again",
                      "--cache", c)
    assert Path(chosen["predictions"]) == run / "predictions" / "val.gt.again.jsonl"
    assert chosen["run"]["features"] == "again"
    # The run's own predictions are still there and still current (a hit, not rewritten).
    again = run_json(capsys, "eval", "--method", "cmrin", "--run", "cmrin", "--split", "val", "--cache", c)
    assert again["predictions"] == own["predictions"] and again["comprehension"] == own["comprehension"]


def test_a_missing_run_of_another_dataset_names_its_training(two_worlds, capsys):
    err = fail(capsys, "eval", "--method", "cmrin", "--run", "other/nope", "--split", "val", "--cache",
               str(two_worlds))
    assert "refground train cmrin --dataset other --run nope" in err


def test_a_missing_chosen_features_artifact_names_its_dataset(two_worlds, capsys):
    err = fail(capsys, "eval", "--method", "cmrin", "--run", "synth/cmrin", "--dataset", "other", "--split", "val",
               "--features", "nope", "--cache", str(two_worlds))
    assert "nope.h5: missing; run `refground extract --dataset other --features nope --no-dense`" in err
