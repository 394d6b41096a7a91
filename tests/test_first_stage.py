"""The built-in detector's first-stage proposals (ReIR's RPN proposals) and `refground extract --first-stage`.

The detector-level tests check :meth:`BuiltinDetector.propose_first_stage` against a slow reference written
here from :meth:`DetectorModel.dense` (clip, top-k, small boxes out, a plain greedy NMS loop), and its
features / labels against :meth:`region_features` / :meth:`classify` of the same boxes; the artifact tests
check the name, the layout, the stage in attrs and manifest, cache hits, shards and the one-line errors.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from refground.boxes import box_iou
from refground.cache import RaggedH5
from refground.errors import UsageError
from refground.features.detector import BuiltinDetector, DetectorModel, prepare_images
from refground.features.pipeline import extract_dataset, first_stage_name, proposal_stage
from conftest import fail, run_json
from test_extract_detections import h5_arrays, manifest

RPN = Path("synth") / "features" / "detector-default-rpn.h5"
FINAL = Path("synth") / "features" / "detector-default.h5"


@pytest.fixture(scope="module")
def detector(pipeline_cache) -> BuiltinDetector:
    return BuiltinDetector.load(pipeline_cache / "synth" / "runs" / "detector" / "default")


@pytest.fixture(scope="module")
def images(synth_ds):
    """Four images (one chunk of the tiny config's inference_batch): one as stored (128 x 128), one cropped
    to 128 x 100, one upsampled to 256 x 200 and one to 192 x 192, so boxes are mapped back through scales
    other than 1 and clipped to non-square images."""
    from refground.data.store import image_path
    from refground.features.base import read_image

    ids = [int(i) for i in synth_ds.image_ids[:4]]
    ims = [read_image(image_path(synth_ds, i)) for i in ids]
    ims[1] = np.ascontiguousarray(ims[1][:, :100])
    ims[2] = np.ascontiguousarray(np.repeat(np.repeat(ims[2], 2, 0), 2, 1)[:, :200])
    ims[3] = np.ascontiguousarray(np.repeat(np.repeat(ims[3], 3, 0), 3, 1)[::2, ::2])
    return ids, ims


def greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> list[int]:
    """The obviously-correct loop: best first (ties: lower index), drop a box whose IoU with a kept one is
    above the threshold."""
    iou = box_iou(boxes, boxes).tolist()
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    kept: list[int] = []
    for i in order:
        if all(iou[i][j] <= threshold for j in kept):
            kept.append(i)
    return kept


def reference(detector: BuiltinDetector, ims: list[np.ndarray], max_proposals: int
              ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image (boxes in original pixels, objectness) of the first stage, computed step by step."""
    cfg, model = detector.config, detector.model
    batch, scales, sizes = prepare_images(ims, cfg.input_size)
    with torch.no_grad():
        p = model.maps(batch)[DetectorModel.STRIDE]
        logits, boxes = model.dense(p)
    out = []
    for b, im in enumerate(ims):
        h, w = sizes[b]
        bx = boxes[b].clone()
        bx[:, 0::2] = bx[:, 0::2].clamp(0, w)
        bx[:, 1::2] = bx[:, 1::2].clamp(0, h)
        obj = logits[b].sigmoid()
        top = obj.topk(min(cfg.pre_nms_top_n, len(obj))).indices
        bx, obj = bx[top], obj[top]
        big = ((bx[:, 2] - bx[:, 0]) >= cfg.min_box_size) & ((bx[:, 3] - bx[:, 1]) >= cfg.min_box_size)
        bx, obj = bx[big], obj[big]
        keep = greedy_nms(bx, obj, cfg.proposal_nms)[:min(max_proposals, cfg.post_nms_top_n)]
        bx, obj = bx[keep], obj[keep]
        sx, sy = float(scales[b, 0]), float(scales[b, 1])
        bx = bx / torch.tensor([sx, sy, sx, sy])
        ih, iw = im.shape[:2]
        bx[:, 0::2] = bx[:, 0::2].clamp(0, iw)
        bx[:, 1::2] = bx[:, 1::2].clamp(0, ih)
        out.append((bx, obj))
    return out


@pytest.mark.parametrize("max_proposals", [7, 1000])
def test_first_stage_matches_a_slow_reference(detector, images, max_proposals, torch_one_thread):
    ids, ims = images
    # Fresh copies: the backbone pass is cached per list of arrays.
    props = detector.propose_first_stage([im.copy() for im in ims], ids, max_proposals)
    ref = reference(detector, ims, max_proposals)
    cap = min(max_proposals, detector.config.post_nms_top_n)
    for p, (bx, obj), im in zip(props, ref, ims):
        assert 0 < len(p) <= cap and p.features.shape == (len(p), detector.feature_dim)
        torch.testing.assert_close(p.boxes, bx, rtol=0, atol=1e-4)
        torch.testing.assert_close(p.scores, obj, rtol=0, atol=1e-6)
        assert bool((p.scores.diff() <= 0).all()) and bool(((p.scores > 0) & (p.scores < 1)).all())
        assert float(p.boxes[:, 2].max()) <= im.shape[1] and float(p.boxes[:, 3].max()) <= im.shape[0]
        assert float(p.boxes.min()) >= 0 and p.nms_scores is None
        assert p.class_scores.shape == (len(p), len(detector.class_names))
        assert torch.equal(p.labels, p.class_scores.argmax(1))
    # Features and categories belong to exactly these boxes (pooled again, in another region-head call).
    boxes = [p.boxes for p in props]
    for p, f, c in zip(props, detector.region_features(ims, boxes), detector.classify(ims, boxes)):
        torch.testing.assert_close(p.features, f, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(p.class_scores, c["category"], rtol=1e-5, atol=1e-6)
        assert torch.equal(p.labels, c["category"].argmax(1))


def test_first_stage_is_the_rois_of_detect(detector, images, torch_one_thread):
    """The model's first stage is what detect refines: a smaller max_keep is a prefix of its RoIs, and
    detect's output does not change with the refactoring (its boxes are refined first-stage boxes)."""
    _, ims = images
    batch, _, sizes = prepare_images(ims, detector.config.input_size)
    with torch.no_grad():
        p = detector.model.maps(batch)[DetectorModel.STRIDE]
    full = detector.model.first_stage(p, sizes)
    part = detector.model.first_stage(p, sizes, 9)
    assert any(len(b) > 9 for b, _ in full)
    for (fb, fs), (pb, ps) in zip(full, part):
        assert len(fb) <= detector.config.post_nms_top_n
        assert torch.equal(pb, fb[:9]) and torch.equal(ps, fs[:9])
    # detect pools exactly these RoIs: its refined boxes come from the region head on them.
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, (b, _) in enumerate(full)])
    with torch.no_grad():
        refined = detector.model.refine(detector.model.region(p, rois)["deltas"], rois)
    for i, d in enumerate(detector.model.detect(p, sizes, 20)):
        mine = refined[rois[:, 0] == i]
        h, w = sizes[i]
        mine[:, 0::2] = mine[:, 0::2].clamp(0, w)
        mine[:, 1::2] = mine[:, 1::2].clamp(0, h)
        for box in d["boxes"]:
            assert bool((mine == box).all(1).any())


def test_first_stage_pooled_with_given_boxes_matches_separate_passes(detector, images, synth_ds, torch_one_thread):
    ids, ims = images
    ims = [ims[0], ims[1]]  # scale 1: the dataset's boxes fit these images
    boxes = [torch.from_numpy(synth_ds.object_boxes[synth_ds.object_slice(i)].astype(np.float32)) for i in ids[:2]]
    boxes[1] = boxes[1][:0]  # an image with no given box
    props, feats = detector.propose_first_stage_pooled([im.copy() for im in ims], ids[:2], 20, boxes)
    alone = detector.propose_first_stage([im.copy() for im in ims], ids[:2], 20)
    for p, q in zip(props, alone):
        assert torch.equal(p.boxes, q.boxes) and torch.equal(p.scores, q.scores) and torch.equal(p.labels, q.labels)
        torch.testing.assert_close(p.features, q.features, rtol=0, atol=1e-5)
    for f, r, b in zip(feats, detector.region_features(ims, boxes), boxes):
        assert f.shape == (len(b), detector.feature_dim)
        torch.testing.assert_close(f, r, rtol=0, atol=1e-5)
    with pytest.raises(ValueError):
        detector.propose_first_stage_pooled(ims, ids[:2], 20, boxes[:1])


@pytest.fixture(scope="module")
def rpn_cache(pipeline_cache, tmp_path_factory):
    """A copy of the pipeline cache with features/detector-default-rpn.h5 written through the library (the
    CLI's path, one process)."""
    root = tmp_path_factory.mktemp("rpn") / "cache"
    shutil.copytree(pipeline_cache, root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = extract_dataset("synth", root, first_stage=True)
    finally:
        torch.set_num_threads(threads)
    assert res["artifacts"] == {"features": {"path": str(root / RPN), "status": "written"}}
    return root


def test_artifact_layout_stage_and_content(rpn_cache, pipeline_cache, detector, synth_ds, torch_one_thread):
    from refground.data.store import image_path
    from refground.features.base import read_image
    from refground.features.contents import extract_command, features_contents

    path = rpn_cache / RPN
    assert first_stage_name() == "detector-default-rpn" and first_stage_name("detector-x") == "detector-x-rpn"
    m = manifest(path)
    assert m["params"]["proposal_stage"] == "first" and m["params"]["max_proposals"] == 50
    assert m["fingerprint"] != manifest(pipeline_cache / FINAL)["fingerprint"]
    assert proposal_stage(path) == "first" and proposal_stage(rpn_cache / FINAL) == "final"
    assert features_contents(path).stage == "first" and features_contents(rpn_cache / FINAL).stage == "final"
    assert extract_command(path) == "refground extract --first-stage --features detector-default-rpn --force"
    assert not (rpn_cache / "synth" / "dense" / "detector-default-rpn.zarr").exists()
    # The final-stage artifact is untouched and still current.
    assert h5_arrays(rpn_cache / FINAL).keys() == h5_arrays(pipeline_cache / FINAL).keys()
    assert extract_dataset("synth", rpn_cache, dense=False, max_proposals=20)["cache_hit"]
    # 8 images: forward passes in the same groups of inference_batch (4) as the extraction's, so the same bytes.
    ids = [int(i) for i in synth_ds.image_ids[:8]]
    ims = [read_image(image_path(synth_ds, i)) for i in ids]
    want = detector.propose_first_stage(ims, ids, 50)
    with RaggedH5(path) as f:
        assert f.attr("proposal_stage") == "first" and f.attr("max_proposals") == 50
        assert set(f.file) == {"images", "proposals", "objects"}
        counts = f.counts("proposals")
        assert counts.shape == (synth_ds.num_images,) and counts.max() <= min(50, detector.config.post_nms_top_n)
        assert counts.min() > 0
        for k, (dtype, tail) in {"boxes": (np.float32, (4,)), "scores": (np.float32, ()),
                                 "labels": (np.int32, ()), "class_scores": (np.float16, (len(detector.class_names),)),
                                 "features": (np.float16, (detector.feature_dim,))}.items():
            arr = f.file["proposals"][k]
            assert arr.dtype == dtype and arr.shape == (int(counts.sum()), *tail), k
        for row, p in enumerate(want):
            assert np.array_equal(f.image("proposals", "boxes", row), p.boxes.numpy())
            assert np.array_equal(f.image("proposals", "scores", row), p.scores.numpy())
            assert np.array_equal(f.image("proposals", "labels", row), p.labels.numpy().astype(np.int32))
            np.testing.assert_allclose(f.image("proposals", "features", row).astype(np.float32), p.features.numpy(),
                                       rtol=2e-3, atol=2e-3)
        # The ground-truth objects as in the final-stage artifact.
        with RaggedH5(pipeline_cache / FINAL) as g:
            assert np.array_equal(f.table("objects", "ids"), g.table("objects", "ids"))
            np.testing.assert_allclose(f.table("objects", "features").astype(np.float32),
                                       g.table("objects", "features").astype(np.float32), atol=2e-3)


def test_cli_writes_then_hits_and_max_proposals_is_a_new_artifact(rpn_cache, tmp_path, capsys, torch_one_thread):
    c = shutil.copytree(rpn_cache, tmp_path / "c")
    before = h5_arrays(c / RPN)
    res = run_json(capsys, "extract", "--cache", str(c), "--first-stage")
    assert res["cache_hit"] and res["artifacts"]["features"] == {"path": str(c / RPN), "status": "hit"}
    res = run_json(capsys, "extract", "--cache", str(c), "--first-stage", "--max-proposals", "5",
                   "--features", "rpn5")
    assert res["artifacts"]["features"]["status"] == "written" and res["proposals_per_image"] <= 5
    with RaggedH5(c / "synth" / "features" / "rpn5.h5") as f:
        assert f.counts("proposals").max() == 5 and f.attr("proposal_stage") == "first"
        # The first 5 of each image are the 50-proposal artifact's first 5.
        with RaggedH5(c / RPN) as g:
            for row in range(3):
                assert np.array_equal(f.image("proposals", "boxes", row), g.image("proposals", "boxes", row)[:5])
    after = h5_arrays(c / RPN)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_shards_resume_to_the_same_artifact(rpn_cache, tmp_path, capsys, torch_one_thread):
    c = shutil.copytree(rpn_cache, tmp_path / "c")
    (c / RPN).unlink()
    args = ["extract", "--cache", str(c), "--first-stage", "--chunk-size", "8"]
    r1 = run_json(capsys, *args, "--shard", "2/2")
    assert r1["artifacts"]["features"]["status"] == "pending"
    r2 = run_json(capsys, *args)  # resumes: computes only the missing chunks, then assembles
    assert r2["artifacts"]["features"]["status"] == "written" and r2["images_computed"] < 24
    a, b = h5_arrays(rpn_cache / RPN), h5_arrays(c / RPN)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert run_json(capsys, *args)["cache_hit"]


def test_worker_processes_write_the_same_artifact(rpn_cache, tmp_path, capsys, torch_one_thread):
    """--workers passes the stage on to the spawned processes (8 chunks of 3 images: 2 workers)."""
    one, two = (shutil.copytree(rpn_cache, tmp_path / n) for n in ("one", "two"))
    for c in (one, two):
        (c / RPN).unlink()
    r2 = run_json(capsys, "extract", "--cache", str(two), "--first-stage", "--chunk-size", "3", "--workers", "2")
    assert r2["workers"] == 2 and r2["artifacts"]["features"]["status"] == "written"
    run_json(capsys, "extract", "--cache", str(one), "--first-stage", "--chunk-size", "3", "--workers", "1")
    a, b = h5_arrays(one / RPN), h5_arrays(two / RPN)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert manifest(one / RPN)["fingerprint"] == manifest(two / RPN)["fingerprint"] == manifest(rpn_cache / RPN)["fingerprint"]


def test_sources_without_a_first_stage_and_other_outputs_are_one_line(pipeline_cache, tmp_path, capsys):
    folder = tmp_path / "detr"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    dets = tmp_path / "dets.json"
    dets.write_text("[]")
    base = ["extract", "--cache", str(pipeline_cache), "--first-stage"]
    for spec in (f"hf:{folder}", f"mattnet:{dets}"):
        err = fail(capsys, *base, "--detector", spec)
        assert "--first-stage" in err and "built-in detector" in err
    err = fail(capsys, *base, "--detector", "none", "--backbone", "builtin")
    assert "--first-stage" in err
    for extra in (["--dense"], ["--detections"], ["--clip", str(folder)]):
        err = fail(capsys, *base, *extra)
        assert "--first-stage" in err and extra[0] in err
    with pytest.raises(UsageError, match="--first-stage"):
        extract_dataset("synth", pipeline_cache, detector=f"hf:{folder}", first_stage=True)
    # A library caller handing the extractor a source without a first stage.
    from refground.data.store import load_named
    from refground.features.extract import Extractor
    from refground.features.pipeline import _NoProposals

    with pytest.raises(UsageError, match="--first-stage"):
        Extractor(load_named("synth", pipeline_cache), _NoProposals(), None, None, 20, 4, 128, first_stage=True)


def test_help_explains_the_option():
    from typer.testing import CliRunner

    from refground.cli.main import app

    res = CliRunner().invoke(app, ["extract", "--help"], env={"COLUMNS": "200", "TERM": "dumb"})
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    assert "--first-stage" in text and "-rpn" in text and "50 with --first-stage" in text
