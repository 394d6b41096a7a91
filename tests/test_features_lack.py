"""What a features artifact lacks is said in one line, with the `refground extract` options that supply it,
before any work starts: extract warns (or refuses) up front, and every consumer checks the sections it reads
before it loads the dataset or a model. The printed remedies are run as printed and repair the chain."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from conftest import TINY_CMRIN, fail, run_json
from hf_tiny import make_tiny_detr
from refground.cli.main import main
from refground.errors import ArtifactError

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def world(pipeline_cache, tmp_path_factory) -> dict:
    """A copy of the pipeline cache (tiny built-in detector, its features without detections) plus a
    features artifact from a tiny transformers DETR alone (no backbone) and one with no proposals."""
    import torch

    root = tmp_path_factory.mktemp("lack")
    cache = root / "cache"
    shutil.copytree(pipeline_cache, cache)
    detr = make_tiny_detr(root / "models" / "detr", labels=["circle", "square", "N/A"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from refground.features.pipeline import extract_dataset
        from refground.graph_artifact import build_graphs

        extract_dataset("synth", cache, detector=f"hf:{detr}", dense=False, max_proposals=5)
        extract_dataset("synth", cache, detector="none", backbone="builtin", dense=False, name="gtonly")
        build_graphs("synth", cache, features="gtonly")
    finally:
        torch.set_num_threads(threads)
    return {"cache": cache, "detr": detr, "features": cache / "synth" / "features"}


def _remedy(err: str) -> list[str]:
    """The backquoted `refground extract ...` command of an error line, as CLI arguments."""
    m = re.search(r"`refground (extract[^`]*)`", err)
    assert m, err
    return m.group(1).split()


def test_contents_read_from_keys(world):
    from refground.features.contents import features_contents, require_sections

    c = features_contents(world["features"] / "hf-detr.h5")
    assert (c.object_features, c.proposal_features, c.detections) == (False, True, False)
    assert 0 < c.proposals <= 5 * 24 and c.detector.startswith("hf:") and c.backbone == ""
    g = features_contents(world["features"] / "gtonly.h5")
    assert (g.object_features, g.proposals, g.detector) == (True, 0, "none")
    assert require_sections(world["features"] / "detector-default.h5", ("object_features", "proposals"), "x").proposals > 0
    with pytest.raises(ValueError):
        require_sections(world["features"] / "hf-detr.h5", ("objects",), "x")
    with pytest.raises(ArtifactError, match=r"missing; run `refground extract --detections"):
        require_sections(world["features"] / "nope.h5", ("detections",), "x")


def test_extract_warns_before_writing_without_object_features(world, tmp_path, capsys):
    c = str(world["cache"])
    rc = main(["extract", "--cache", c, "--detector", f"hf:{world['detr']}", "--no-dense", "--max-proposals", "3",
               "--features", "warned", "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 0
    assert "warning:" in err and "warned.h5 will have no ground-truth object features" in err
    assert "--backbone" in err and "`refground train cmrin`" in err
    # The warning comes before the work: it is the first thing said.
    assert err.lstrip().startswith("warning:")
    # A built-in detector pools given boxes: nothing to warn about.
    rc = main(["extract", "--cache", c, "--no-dense", "--max-proposals", "3", "--features", "quiet", "--workers", "1"])
    assert rc == 0 and "warning" not in capsys.readouterr().err


def test_mattnet_without_backbone_is_refused_before_any_work(world, synth_ds, tmp_path, capsys):
    from refground.data.formats.mattnet import write_mattnet_detections

    im = synth_ds.images()[0]
    path = tmp_path / "dets.json"
    write_mattnet_detections(path, [{"det_id": 0, "image_id": im.id, "box": [1.0, 2.0, 10.0, 10.0], "category_id": 1,
                                     "category_name": "circle", "score": 0.9}])
    err = fail(capsys, "extract", "--cache", str(world["cache"]), "--detector", f"mattnet:{path}", "--no-dense")
    assert "boxes only" in err and "--backbone" in err
    assert not list(world["features"].glob("mattnet-dets*"))  # neither the artifact nor a .partial folder


def test_train_cmrin_names_the_backbone_and_the_remedy_repairs_it(world, tmp_path, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(world["cache"], cache)
    c = str(cache)
    err = fail(capsys, "train", "cmrin", "--cache", c, "--features", "hf-detr", "--epochs", "1", "--run", "r")
    assert "hf-detr.h5 has no ground-truth object features" in err and "cannot pool given boxes" in err
    assert "`refground train cmrin`" in err
    assert not (cache / "synth" / "runs" / "cmrin" / "r").exists()  # refused before the run folder was made
    # The dataset has a built-in detector run, so the remedy names it and runs as printed.
    args = _remedy(err)
    assert "--backbone" in args and "builtin" in args and "--features" in args
    assert main([*args, "--cache", c, "--workers", "1"]) == 0
    capsys.readouterr()
    run_json(capsys, "graph", "--cache", c, "--features", "hf-detr")
    cfg = tmp_path / "tiny.json"
    cfg.write_text(__import__("json").dumps({**TINY_CMRIN, "epochs": 1}))
    res = run_json(capsys, "train", "cmrin", "--cache", c, "--features", "hf-detr", "--config", str(cfg), "--run", "r")
    assert res["metrics"]["best_epoch"] == 1


def test_proposals_candidates_without_proposals(world, synth_ds):
    from refground.grounding.candidates import load_candidates

    path = world["features"] / "gtonly.h5"
    assert len(load_candidates(synth_ds, path, "gt")) == synth_ds.num_images  # what it has still loads
    with pytest.raises(ArtifactError) as e:
        load_candidates(synth_ds, path, "proposals", top_n=5)
    msg = str(e.value)
    assert "has no proposals (made with --detector none" in msg and "--candidates proposals" in msg
    assert "--detector builtin" in msg and "--features gtonly" in msg and "\n" not in msg


def test_eval_proposals_on_an_artifact_without_proposals(world, tmp_path, capsys):
    """Was `internal error: IndexError` (exit 1) after the run and dataset were loaded."""
    cache = tmp_path / "cache"
    shutil.copytree(world["cache"], cache)
    c = str(cache)
    cfg = tmp_path / "tiny.json"
    cfg.write_text(__import__("json").dumps({**TINY_CMRIN, "epochs": 1}))
    run_json(capsys, "graph", "--cache", c, "--features", "gtonly")
    run_json(capsys, "train", "cmrin", "--cache", c, "--features", "gtonly", "--config", str(cfg), "--run", "g")
    err = fail(capsys, "eval", "--cache", c, "--method", "cmrin", "--run", "g", "--split", "testA",
               "--candidates", "proposals")
    assert "gtonly.h5 has no proposals" in err and "--candidates proposals" in err
    assert not list((cache / "synth" / "runs" / "cmrin" / "g").glob("predictions/testA.proposals*"))
    # The remedy, as printed, gives the artifact proposals; after `graph` the same eval runs.
    assert main([*_remedy(err), "--cache", c, "--workers", "1"]) == 0
    capsys.readouterr()
    run_json(capsys, "graph", "--cache", c, "--features", "gtonly")
    res = run_json(capsys, "eval", "--cache", c, "--method", "cmrin", "--run", "g", "--split", "testA",
                   "--candidates", "proposals", "--force")
    assert 0.0 <= res["comprehension"]["all"]["precision@1"] <= 1.0


@pytest.mark.parametrize("features, why", [("hf-detr", "only the built-in detector gives them"),
                                           ("detector-default", "extracted without --detections")])
def test_vlnms_steps_name_the_detections_option(world, features, why, capsys):
    c = str(world["cache"])
    for args in (["train", "vlnms", "--features", features, "--no-pseudo"],
                 ["vlnms", "--features", features, "--confidence-only"]):
        err = fail(capsys, *args, "--cache", c)
        assert f"{features}.h5 has no pre-NMS detections ({why}" in err and "--detections" in err, err


def test_vlnms_remedy_runs_as_printed(world, tmp_path, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(world["cache"], cache)
    c = str(cache)
    err = fail(capsys, "vlnms", "--cache", c, "--confidence-only", "--split", "val")
    args = _remedy(err)
    assert "--detections" in args and "--force" not in args
    assert main([*args, "--cache", c, "--workers", "1"]) == 0
    capsys.readouterr()
    res = run_json(capsys, "vlnms", "--cache", c, "--confidence-only", "--split", "val")
    assert res  # the proposal set of val was written
    assert Path(cache / "synth" / "vlnms" / "confidence" / "val.h5").is_file()


def test_detr_with_an_hf_backbone_runs_the_chain(world, tmp_path, capsys):
    """The issue's case: a transformers DETR gives the proposals and a transformers backbone the region features
    (of the proposals and the ground-truth objects): extract, graph, train cmrin and eval all run."""
    import json

    from hf_tiny import make_tiny_backbone

    cache = tmp_path / "cache"
    shutil.copytree(world["cache"], cache)
    c = str(cache)
    backbone = make_tiny_backbone(tmp_path / "models" / "resnet")
    res = run_json(capsys, "extract", "--cache", c, "--detector", f"hf:{world['detr']}", "--backbone",
                   f"hf:{backbone}", "--no-dense", "--max-proposals", "5", "--features", "detr-resnet", "--workers", "1")
    assert res and (cache / "synth" / "features" / "detr-resnet.h5").is_file()
    from refground.features.contents import features_contents

    got = features_contents(cache / "synth" / "features" / "detr-resnet.h5")
    assert got.object_features and got.proposal_features and got.proposals > 0
    run_json(capsys, "graph", "--cache", c, "--features", "detr-resnet")
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({**TINY_CMRIN, "epochs": 1}))
    train = run_json(capsys, "train", "cmrin", "--cache", c, "--features", "detr-resnet", "--config", str(cfg),
                     "--run", "detr")
    assert train["metrics"]["best_epoch"] == 1
    for candidates in ("gt", "proposals"):
        out = run_json(capsys, "eval", "--method", "cmrin", "--run", "detr", "--split", "val", "--candidates",
                       candidates, "--top-n", "5", "--cache", c)
        assert 0.0 <= out["comprehension"]["all"]["precision@1"] <= 1.0
