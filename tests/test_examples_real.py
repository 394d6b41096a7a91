"""The real-data recipes (`examples/refcoco.sh`, `examples/flickr30k.sh`) run unchanged on the fixture world
written in the real formats (`refground data export`): each imports it back, extracts with a built-in detector
trained on another dataset of the cache (`builtin:synth/default`), and ends in evaluation figures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_CMRIN
from refground.cli.main import main
from refground.data.store import load_named

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _env() -> dict[str, str]:
    """The environment of a user's shell: this interpreter's `refground` on PATH, one torch thread (tiny ops on
    a shared machine), no cache root from the caller."""
    env = {k: v for k, v in os.environ.items() if k != "REFGROUND_CACHE"}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def _script(name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(EXAMPLES / name), *map(str, args)], env=env or _env(), capture_output=True,
                          text=True, timeout=300)


@pytest.fixture()
def world(pipeline_cache, tmp_path, capsys) -> dict:
    """A writable copy of the pipeline cache (dataset synth with its tiny detector run) and synth written as
    refer (RefCOCO, unc) and Flickr30K Entities files."""
    cache = tmp_path / "cache"
    shutil.copytree(pipeline_cache, cache)
    refer, flickr = tmp_path / "refer", tmp_path / "flickr"
    assert main(["data", "export", "--cache", str(cache), "--format", "refer", "--corpus", "refcoco", "--split-by",
                 "unc", "--out-dir", str(refer)]) == 0
    assert main(["data", "export", "--cache", str(cache), "--format", "flickr30k", "--out-dir", str(flickr)]) == 0
    capsys.readouterr()
    return {"cache": cache, "refer": refer, "flickr": flickr, "tmp": tmp_path}


def test_refcoco_recipe_round_trip(world, synth_ds):
    cfg = world["tmp"] / "tiny.json"
    cfg.write_text(json.dumps({**TINY_CMRIN, "epochs": 1}))
    env = {**_env(), "CMRIN_ARGS": f"--config {cfg}"}
    p = _script("refcoco.sh", "--refer", world["refer"], "--images", world["refer"] / "images", "--detector",
                "builtin:synth/default", "--cache", world["cache"], "--dataset", "rt", "--epochs", "1", env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    # The commands are echoed as they run.
    assert "+ refground data import-refcoco --root" in p.stderr and "+ refground train cmrin" in p.stderr
    rt = load_named("rt", world["cache"])
    assert (rt.num_images, rt.num_objects) == (synth_ds.num_images, synth_ds.num_objects)
    expressions = [q for q in synth_ds.queries("all", "expression")]
    assert len(rt.queries("all", "expression")) == len(expressions) and not rt.queries("all", "caption")
    for split in ("testA", "testB"):
        assert len(rt.queries(split, "expression")) == len(synth_ds.queries(split, "expression"))
    root = world["cache"] / "rt"
    # Extracted on rt with the detector trained on synth, under the name the recipe gave every step.
    assert (root / "features" / "detector-synth.default.h5").is_file()
    assert (root / "graph" / "detector-synth.default.h5").is_file()
    run = root / "runs" / "cmrin" / "cmrin"
    assert json.loads((run / "metrics.json").read_text())["best_epoch"] == 1
    for split in ("testA", "testB"):
        for tag in ("gt", "proposals10"):
            figures = json.loads((run / "predictions" / f"{split}.{tag}.eval-{split}.json").read_text())
            c = figures["comprehension"]["all"]
            assert c["queries"] == len(rt.queries(split, "expression")) and c["missing"] == 0
            assert 0.0 <= c["precision@1"] <= 1.0


def test_flickr30k_recipe_round_trip(world, synth_ds):
    p = _script("flickr30k.sh", "--root", world["flickr"], "--images", world["flickr"] / "flickr30k_images",
                "--detector", "builtin:synth/default", "--cache", world["cache"], "--dataset", "fl")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "+ refground data import-flickr30k --root" in p.stderr
    fl = load_named("fl", world["cache"])
    assert (fl.num_images, fl.num_objects) == (synth_ds.num_images, synth_ds.num_objects)
    caps = synth_ds.queries("all", "caption")
    assert len(fl.queries("all", "caption")) == len(caps) and not fl.queries("all", "expression")
    root = world["cache"] / "fl"
    assert (root / "graph" / "detector-synth.default.h5").is_file()
    pred = root / "predictions" / "top-proposal" / "detector-synth.default.jsonl"
    figures = json.loads(pred.with_name(f"{pred.stem}.eval-test.json").read_text())
    g = figures["phrase_grounding"]["all"]
    phrases = sum(1 for q in synth_ds.queries("test", "caption") for m in q.mentions if m.object_ids)
    assert g["phrases"] == phrases > 0 and g["missing"] == 0
    assert 0.0 <= g["accuracy"] <= 1.0 and 0.0 <= g["pointit"] <= 1.0
    # The baseline is what it says: every phrase gets its image's most confident proposal.
    from refground.cache import RaggedH5
    from refground.structures import RaggedBoxes

    with RaggedH5(root / "features" / "detector-synth.default.h5") as f:
        props = RaggedBoxes.read(f, "proposals")
    line = json.loads(pred.read_text().splitlines()[0])
    q = fl.query(line["query_id"])
    np.testing.assert_allclose(line["box"], props.group(fl.image_row(q.image_id))[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("script, args, message", [
    ("refcoco.sh", ["--refer", "r", "--images", "i"], "give --refer DIR --images DIR --detector SPEC"),
    ("refcoco.sh", ["--refer", "r", "--images", "i", "--detector", "hf:/models/detr"], "--backbone"),
    ("refcoco.sh", ["--refer", "r", "--images", "i", "--detector", "yolo:x"], "expected hf:PATH"),
    ("refcoco.sh", ["--refer"], "--refer needs a value"),
    ("flickr30k.sh", ["--root", "r", "--images", "i", "--detector", "mattnet:d.json"], "boxes only"),
    ("flickr30k.sh", ["--nope", "x"], "unknown option --nope"),
])
def test_recipes_refuse_bad_arguments_before_any_step(script, args, message):
    p = _script(script, *args)
    assert p.returncode == 2 and message in p.stderr and "+ refground" not in p.stderr, p.stderr
