"""`refground extract --detections`: VL-NMS's pre-NMS detection set B in the features artifact.

The detector-level tests check B against the detector's own final NMS (B holds every pre-NMS box at or above
the threshold, so the NMS of B keeps exactly the final boxes at or above it); the artifact tests check the
layout, that the proposals are byte-identical to a run without the option, fingerprints, shards and errors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from refground.boxes import nms
from refground.cache import RaggedH5
from refground.errors import UsageError
from refground.features.base import DetectionSource, Proposals
from refground.features.detector import BuiltinDetector, DetectorModel
from refground.features.pipeline import extract_dataset
from conftest import fail, run_json

FIELDS = ("boxes", "scores", "labels", "class_scores", "features")


def h5_arrays(path: Path) -> dict[str, np.ndarray]:
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if hasattr(obj, "shape") else None)
    return out


def manifest(path: Path) -> dict:
    from refground.cache.manifest import manifest_path

    return json.loads(manifest_path(path).read_text())


@pytest.fixture(scope="module")
def detector(pipeline_cache) -> BuiltinDetector:
    return BuiltinDetector.load(pipeline_cache / "synth" / "runs" / "detector" / "default")


@pytest.fixture(scope="module")
def images(synth_ds):
    from refground.data.store import image_path
    from refground.features.base import read_image

    ids = [int(i) for i in synth_ds.image_ids[:6]]
    return ids, [read_image(image_path(synth_ds, i)) for i in ids]


@pytest.fixture(scope="module")
def threshold(detector, images) -> float:
    """A threshold that splits the tiny detector's pre-NMS boxes (0.05 keeps nearly all of them)."""
    ids, ims = images
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, dets = detector.propose_with_detections([im.copy() for im in ims], ids, 20, 1e-6)
    finally:
        torch.set_num_threads(threads)
    return float(torch.cat([d.nms_scores for d in dets]).median())


def test_builtin_detector_is_a_detection_source(detector):
    assert isinstance(detector, DetectionSource)
    assert Proposals(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64),
                     torch.zeros(0, 3)).nms_scores is None


def test_model_detect_b_is_the_pre_nms_set(detector, images, threshold, torch_one_thread):
    ids, ims = images
    maps, _, sizes = detector._maps([im.copy() for im in ims])
    p = maps[DetectorModel.STRIDE]
    cfg = detector.config
    plain = detector.model.detect(p, sizes, 20)
    everything = detector.model.detect(p, sizes, 20, 1e-9)
    with_b = detector.model.detect(p, sizes, 20, threshold)
    for a, e, r in zip(plain, everything, with_b):
        # The final boxes are unchanged and are the first rows of the union.
        assert torch.equal(r["boxes"], a["boxes"]) and torch.equal(r["scores"], a["scores"])
        assert torch.equal(r["union_boxes"][r["final_index"]], a["boxes"])
        # B = the full pre-NMS set (the reference: threshold ~0) filtered by first-pass confidence.
        ub, us = e["union_boxes"][e["det_index"]], e["det_scores"]
        assert len(us) <= cfg.post_nms_top_n
        ref = us >= threshold
        b = r["union_boxes"][r["det_index"]]
        assert torch.equal(b, ub[ref]) and torch.equal(r["det_scores"], us[ref])
        assert bool((r["det_scores"] >= threshold).all()) and bool((r["det_scores"].diff() <= 0).all())
        # Every final box is a pre-NMS box; the union holds no duplicate rows.
        for box in a["boxes"]:
            assert bool((ub == box).all(1).any())
        assert len(r["union_boxes"]) == len(torch.unique(torch.cat([r["final_index"], r["det_index"]])))
        # NMS of B by first-pass confidence keeps exactly the final boxes at or above the threshold.
        keep = nms(b, r["det_scores"], cfg.final_nms)[:20]
        want = a["boxes"][a["scores"] >= threshold]
        assert torch.equal(b[keep], want)


def test_propose_with_detections(detector, images, threshold, torch_one_thread):
    ids, ims = images
    # Fresh copies each time: the backbone pass is cached per list of arrays.
    before = detector.propose([im.copy() for im in ims], ids, 20)
    props, dets = detector.propose_with_detections([im.copy() for im in ims], ids, 20, threshold)
    again = detector.propose([im.copy() for im in ims], ids, 20)
    assert sum(len(d) for d in dets) > 0
    for b, p, g, d in zip(before, props, again, dets):
        for f in FIELDS:  # byte-identical to propose, with the option and without
            assert torch.equal(getattr(b, f), getattr(p, f)) and torch.equal(getattr(b, f), getattr(g, f))
        assert p.nms_scores is None and b.nms_scores is None
        assert bool((d.nms_scores >= threshold).all()) and bool((d.scores.diff() <= 0).all())
        assert torch.equal(d.scores, d.class_scores.max(1).values) and torch.equal(d.labels, d.class_scores.argmax(1))
        # A box in both sets has identical vectors.
        same = (d.boxes[:, None, :] == p.boxes[None, :, :]).all(-1)
        di, pi = same.nonzero(as_tuple=True)
        assert len(di) > 0
        assert torch.equal(d.features[di], p.features[pi]) and torch.equal(d.class_scores[di], p.class_scores[pi])
    # The features are those of exactly these boxes (region_features pools them again, in other batches).
    ref = detector.region_features(ims, [d.boxes for d in dets])
    for d, r in zip(dets, ref):
        torch.testing.assert_close(d.features, r, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        detector.propose_with_detections(ims, ids, 20, 1.0)


@pytest.fixture(scope="module")
def extracted(pipeline_cache, threshold, tmp_path_factory):
    """Copies of the pipeline cache: ``plain`` (features without the option, as the fixture made them) and
    ``with`` (features re-extracted through the CLI with --detections)."""
    base = tmp_path_factory.mktemp("dets")
    plain = base / "plain"
    shutil.copytree(pipeline_cache, plain)
    with_dets = base / "with"
    shutil.copytree(pipeline_cache, with_dets)
    return plain, with_dets


def test_artifact_layout_and_fingerprints(extracted, threshold, synth_ds, capsys, torch_one_thread):
    plain, with_dets = extracted
    feats = Path("synth") / "features" / "detector-default.h5"
    # Off: the existing artifact is current (same fingerprint), a cache hit that loads no model.
    hit = extract_dataset("synth", plain, dense=False, max_proposals=20)
    assert hit["cache_hit"] and hit["artifacts"]["features"]["status"] == "hit"
    m0 = manifest(plain / feats)
    assert "detections" not in m0["params"]
    res = run_json(capsys, "extract", "--cache", str(with_dets), "--no-dense", "--max-proposals", "20", "--detections",
                   "--detection-threshold", repr(threshold))
    assert res["artifacts"]["features"]["status"] == "written" and res["detections_per_image"] > 0
    m1 = manifest(with_dets / feats)
    assert m1["params"]["detections"] == threshold and m1["fingerprint"] != m0["fingerprint"]
    assert {k: v for k, v in m1["params"].items() if k != "detections"} == m0["params"]
    a, b = h5_arrays(plain / feats), h5_arrays(with_dets / feats)
    # Everything the artifact had is byte-identical; only detections/ is new.
    assert set(b) - set(a) == {f"detections/{f}" for f in ("offsets", "nms_scores", *FIELDS)}
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    with RaggedH5(with_dets / feats) as f:
        assert f.attr("detection_threshold") == threshold
        n_img, c, d = synth_ds.num_images, len(f.attr("class_names")), f.attr("feature_dim")
        off = f.offsets["detections"]
        p = int(off[-1])
        assert off.dtype == np.int64 and off.shape == (n_img + 1,) and off[0] == 0 and np.all(np.diff(off) >= 0)
        expect = {"boxes": (np.float32, (p, 4)), "scores": (np.float32, (p,)), "nms_scores": (np.float32, (p,)),
                  "labels": (np.int32, (p,)), "class_scores": (np.float16, (p, c)),
                  "features": (np.float16, (p, d))}
        for k, (dtype, shape) in expect.items():
            arr = f.file["detections"][k]
            assert arr.dtype == dtype and arr.shape == shape, k
        assert np.all(f.table("detections", "nms_scores") >= np.float32(threshold))
        for row in range(n_img):
            s = f.image("detections", "scores", row)
            assert np.all(np.diff(s) <= 0)
            bx, pb = f.image("detections", "boxes", row), f.image("proposals", "boxes", row)
            same = (bx[:, None, :] == pb[None, :, :]).all(-1)
            di, pi = same.nonzero()
            for k in ("features", "class_scores", "scores", "labels"):
                assert np.array_equal(f.image("detections", k, row)[di], f.image("proposals", k, row)[pi])
        assert p > 0 and int(np.diff(off).max()) <= 60  # tiny config: post_nms_top_n 60
    # On again with the same threshold: a hit; another threshold: a miss.
    assert extract_dataset("synth", with_dets, dense=False, max_proposals=20, detections=threshold)["cache_hit"]
    from refground.cache import is_current

    assert not is_current(plain / feats, m1["fingerprint"]) and is_current(with_dets / feats, m1["fingerprint"])


def test_shards_give_the_same_artifact(extracted, threshold, capsys, torch_one_thread, tmp_path):
    _, with_dets = extracted
    feats = Path("synth") / "features" / "detector-default.h5"
    c = shutil.copytree(with_dets, tmp_path / "c")
    (c / feats).unlink()
    args = ["extract", "--cache", str(c), "--no-dense", "--max-proposals", "20", "--chunk-size", "8", "--detections",
            "--detection-threshold", repr(threshold)]
    r1 = run_json(capsys, *args, "--shard", "2/2")
    assert r1["artifacts"]["features"]["status"] == "pending"
    r2 = run_json(capsys, *args)  # resumes: computes only the missing chunks, then assembles
    assert r2["artifacts"]["features"]["status"] == "written" and r2["images_computed"] < 24
    a, b = h5_arrays(with_dets / feats), h5_arrays(c / feats)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("value", ["0", "1", "-0.1", "1.5"])
def test_bad_threshold_is_a_one_line_error(pipeline_cache, capsys, value):
    err = fail(capsys, "extract", "--cache", str(pipeline_cache), "--detections", "--detection-threshold", value)
    assert "--detection-threshold" in err and "(0, 1)" in err
    with pytest.raises(UsageError):
        extract_dataset("synth", pipeline_cache, detections=float(value))


def test_sources_without_pre_nms_boxes(pipeline_cache, tmp_path, capsys, synth_ds):
    folder = tmp_path / "detr"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(UsageError, match="--detections"):
        extract_dataset("synth", pipeline_cache, detector=f"hf:{folder}", detections=0.05)
    dets = tmp_path / "dets.json"
    dets.write_text("[]")
    err = fail(capsys, "extract", "--cache", str(pipeline_cache), "--detector", f"mattnet:{dets}", "--detections")
    assert "--detections" in err and "built-in detector" in err
    err = fail(capsys, "extract", "--cache", str(pipeline_cache), "--detector", "none", "--backbone", "builtin",
               "--detections")
    assert "--detections" in err
    # A library caller handing the extractor any other proposal source.
    from refground.features.extract import Extractor
    from refground.features.pipeline import _NoProposals

    with pytest.raises(UsageError, match="--detections"):
        Extractor(synth_ds, _NoProposals(), None, None, 20, 4, 128, detections=0.05)


def test_help_explains_the_options():
    from typer.testing import CliRunner

    from refground.cli.main import app

    res = CliRunner().invoke(app, ["extract", "--help"], env={"COLUMNS": "200", "TERM": "dumb"})
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    assert "--detections" in text and "--detection-threshold" in text and "pre-NMS" in text
    assert "refground vlnms" in text and "0.05" in text


def test_separate_backbone_pools_the_detections_too(extracted, threshold, torch_one_thread):
    """--backbone gives region features for the proposals, the objects and the detections alike."""
    _, with_dets = extracted
    res = extract_dataset("synth", with_dets, backbone="builtin", dense=False, max_proposals=20,
                          detections=threshold)
    path = Path(res["artifacts"]["features"]["path"])
    assert path.name == "detector-default+detector-default.h5"
    own = with_dets / "synth" / "features" / "detector-default.h5"
    with RaggedH5(path) as f, RaggedH5(own) as g:
        assert np.array_equal(f.table("detections", "boxes"), g.table("detections", "boxes"))
        # The same weights, pooled again in other batches by the backbone source.
        np.testing.assert_allclose(f.table("detections", "features").astype(np.float32),
                                   g.table("detections", "features").astype(np.float32), atol=2e-3)
