"""`refground extract` end to end with tiny random transformers models and a MAttNet detections file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from hf_tiny import make_tiny_backbone, make_tiny_clip, make_tiny_detr, make_tiny_yolos
from refground.cache import RaggedH5, read_manifest_of
from refground.cli.main import main


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def hf_cache(synth_cache, tmp_path_factory):
    """A private copy of the fixture cache (these tests write artifacts) and tiny model folders."""
    root = tmp_path_factory.mktemp("hfcli")
    shutil.copytree(synth_cache / "synth" / "dataset", root / "cache" / "synth" / "dataset")
    models = root / "models"
    return {"cache": root / "cache", "detr": make_tiny_detr(models / "detr", labels=["circle", "square", "N/A"]),
            "yolos": make_tiny_yolos(models / "yolos"), "backbone": make_tiny_backbone(models / "resnet"),
            "clip": make_tiny_clip(models / "clip")}


def _extract(capsys, *args) -> dict:
    rc = main(["extract", *args, "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)


def test_hf_detector_backbone_and_clip_end_to_end(hf_cache, synth_ds, capsys):
    c = str(hf_cache["cache"])
    res = _extract(capsys, "--cache", c, "--detector", f"hf:{hf_cache['detr']}", "--backbone",
                   f"hf:{hf_cache['backbone']}", "--clip", f"hf:{hf_cache['clip']}", "--max-proposals", "5", "--chunk-size", "10")
    name = "hf-detr+hf-resnet"
    assert res["name"] == name and res["images_computed"] == synth_ds.num_images
    assert {k: v["status"] for k, v in res["artifacts"].items()} == {"features": "written", "dense": "written",
                                                                       "clip": "written"}
    root = hf_cache["cache"] / "synth"
    with RaggedH5(root / "features" / f"{name}.h5") as f:
        assert f.attr("class_names") == ["circle", "square"]  # the N/A label is dropped
        counts = f.counts("proposals")
        assert counts.max() <= 5 and counts.sum() > 0
        boxes = f.table("proposals", "boxes")
        assert np.all(boxes[:, 2] <= 128) and np.all(boxes[:, :2] >= 0)
        assert f.table("proposals", "features").shape[1] == f.table("objects", "features").shape[1] == 16
        assert len(f.table("objects", "features")) == synth_ds.num_objects
        src = f.attr("sources")
        assert src["detector"]["kind"] == "hf-detector" and src["backbone"]["kind"] == "hf-backbone"
    with RaggedH5(root / "clip" / "hf-clip.h5") as cf:
        assert cf.table("images", "embedding").shape == (synth_ds.num_images, 8)
        assert cf.table("categories", "embedding").shape == (len(synth_ds.categories), 8)
        assert len(cf.table("proposals", "embedding")) == int(counts.sum())
        e = cf.table("queries", "embedding").astype(np.float32)
        np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=2e-3)
    m = read_manifest_of(root / "clip" / "hf-clip.h5")
    assert set(m.parents) == {"dataset", "clip", "features"}
    # The same command again is a cache hit for all three.
    again = _extract(capsys, "--cache", c, "--detector", f"hf:{hf_cache['detr']}", "--backbone",
                     f"hf:{hf_cache['backbone']}", "--clip", f"hf:{hf_cache['clip']}", "--max-proposals", "5", "--chunk-size", "10")
    assert again["cache_hit"] and all(a["status"] == "hit" for a in again["artifacts"].values())


def test_hf_detector_alone_uses_its_query_embeddings(hf_cache, capsys):
    res = _extract(capsys, "--cache", str(hf_cache["cache"]), "--detector", f"hf:{hf_cache['yolos']}", "--max-proposals", "3")
    assert set(res["artifacts"]) == {"features"}  # no feature source: no dense maps
    with RaggedH5(hf_cache["cache"] / "synth" / "features" / "hf-yolos.h5") as f:
        assert f.table("proposals", "features").shape[1] == 16
        assert not f.has("objects", "features")  # ground-truth features need a --backbone


def test_mattnet_detections_with_a_backbone(hf_cache, synth_ds, tmp_path, capsys):
    from refground.data.formats.mattnet import write_mattnet_detections

    dets, k = [], 0
    for im in synth_ds.images()[:10]:
        for j in range(3):
            dets.append({"det_id": k, "image_id": im.id, "box": [4.0 + j, 5.0, 30.0, 20.0 + j], "category_id": 1 + j % 2,
                         "category_name": ["circle", "square"][j % 2], "score": 0.9 - 0.1 * j})
            k += 1
    path = tmp_path / "dets.json"
    write_mattnet_detections(path, dets)
    res = _extract(capsys, "--cache", str(hf_cache["cache"]), "--detector", f"mattnet:{path}", "--backbone",
                   f"hf:{hf_cache['backbone']}", "--no-dense")
    with RaggedH5(hf_cache["cache"] / "synth" / "features" / f"{res['name']}.h5") as f:
        counts = f.counts("proposals")
        assert counts[:10].tolist() == [3] * 10 and counts[10:].sum() == 0
        np.testing.assert_allclose(f.image("proposals", "boxes", 0)[0], [4, 5, 34, 25])  # xywh -> xyxy
        np.testing.assert_allclose(f.image("proposals", "scores", 0), [0.9, 0.8, 0.7], atol=1e-6)


def test_bad_specs_are_one_line_errors(hf_cache, tmp_path, capsys):
    c = str(hf_cache["cache"])
    for args, msg in (
        (["--detector", "yolo:x"], "expected builtin"),
        (["--detector", f"hf:{tmp_path / 'none'}"], "is not a folder"),
        (["--detector", f"mattnet:{tmp_path / 'none.json'}"], "is not a file"),
        (["--detector", "builtin:nope"], "run `refground train detector --run nope`"),
        (["--detector", "none"], "needs a --backbone"),
        (["--detector", "none", "--backbone", "x"], "expected builtin"),
        (["--shard", "3/2"], "--shard"),
        (["--max-proposals", "0"], "at least 1"),
    ):
        rc = main(["extract", "--cache", c, *args])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and err.count("\n") == 1, (args, err)
