"""The speed paths of issue 16 compute what the paths they replace computed.

- extraction pools the ground-truth boxes in the proposal pass (:meth:`BuiltinDetector.propose_pooled`), the
  detector's evaluation classifies them there (:meth:`BuiltinDetector.propose_classified`): both against the
  separate passes (:meth:`propose`, :meth:`region_features`, :meth:`classify`);
- :func:`load_train_data` builds its ground truth for all images at once: against the per-image loop it
  replaced (kept in the quickstart-stages benchmark as its baseline).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from refground.data.store import image_path
from refground.features.base import read_image
from refground.features.detector import BuiltinDetector, DetectorConfig, DetectorModel
from refground.bench.stages_bench import reference_ground_truth
from refground.features.detector_train import load_train_data, split_image_ids


def _detector(seed: int = 0) -> BuiltinDetector:
    from test_detector import tiny_config

    torch.manual_seed(seed)
    return BuiltinDetector(DetectorModel(tiny_config()))


def _images_and_boxes(ds, k: int = 5):
    ids = [int(i) for i in ds.image_ids[:k]]
    images = [read_image(image_path(ds, i)) for i in ids]
    boxes = [torch.from_numpy(ds.object_boxes[ds.object_slice(i)].astype(np.float32)) for i in ids]
    boxes[1] = boxes[1][:0]  # an image with no given box
    return ids, images, boxes


def _same_proposals(a, b) -> None:
    assert len(a) == len(b)
    for p, q in zip(a, b):
        assert torch.equal(p.boxes, q.boxes) and torch.equal(p.labels, q.labels)
        torch.testing.assert_close(p.scores, q.scores, rtol=0, atol=1e-6)
        torch.testing.assert_close(p.features, q.features, rtol=0, atol=1e-5)


@pytest.mark.parametrize("threshold", [None, 0.05])
def test_proposals_and_given_boxes_pooled_in_one_pass_match_separate_passes(synth_ds, torch_one_thread, threshold):
    det = _detector()
    ids, images, boxes = _images_and_boxes(synth_ds)
    props, dets, feats = det.propose_pooled(images, ids, 20, boxes, threshold)
    if threshold is None:
        ref_props, ref_dets = det.propose(images, ids, 20), None
        assert dets is None
    else:
        ref_props, ref_dets = det.propose_with_detections(images, ids, 20, threshold)
        _same_proposals(dets, ref_dets)
    _same_proposals(props, ref_props)
    ref_feats = det.region_features(images, boxes)
    assert [f.shape for f in feats] == [(len(b), det.feature_dim) for b in boxes]
    for f, r in zip(feats, ref_feats):
        torch.testing.assert_close(f, r, rtol=0, atol=1e-5)


def test_proposals_and_classification_in_one_pass_match_separate_passes(synth_ds, torch_one_thread):
    det = _detector(1)
    ids, images, boxes = _images_and_boxes(synth_ds)
    props, probs = det.propose_classified(images, ids, 10, boxes)
    _same_proposals(props, det.propose(images, ids, 10))
    for got, ref in zip(probs, det.classify(images, boxes)):
        assert set(got) == set(ref)
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("input_size", [128, 96])
def test_training_ground_truth_built_at_once_matches_a_per_image_loop(synth_ds, input_size):
    # "hexagon" left out of the classes: its objects must be dropped from every image.
    config = DetectorConfig(input_size=input_size,
                            class_names=[c for c in DetectorConfig().class_names if c != "hexagon"])
    data = load_train_data(synth_ds, "train", config)
    offsets, boxes, cats, cols, sizes = reference_ground_truth(synth_ds, config, split_image_ids(synth_ds, "train"))
    assert np.array_equal(data.offsets, offsets)
    assert torch.equal(data.boxes, torch.from_numpy(boxes))
    for got, ref in ((data.cats, cats), (data.colors, cols), (data.sizes, sizes)):
        assert got.dtype == torch.int64 and torch.equal(got, torch.from_numpy(ref))
    assert len(cats) < sum(synth_ds.object_slice(i).stop - synth_ds.object_slice(i).start for i in data.image_ids)


def test_quickstart_stages_benchmark_measures_every_stage(tmp_path):
    from refground.bench.stages_bench import bench_quickstart_stages

    rows = {r.name: r for r in bench_quickstart_stages(True, 0)}
    for name in ("stage.mm_probe", "stage.synth", "stage.detector.load", "stage.detector.step",
                 "stage.detector.gflops", "stage.extract", "stage.graph", "stage.cmrin.step", "stage.cmrin.gflops"):
        assert name in rows and rows[name].figure > 0, name
    for name in ("stage.detector.step", "stage.extract", "stage.synth", "stage.detector.load"):
        assert rows[name].baseline > 0 and rows[name].ratio > 0, name
    # The FLOP rows compare with the mm probe of the same run: a fraction of it.
    assert rows["stage.detector.gflops"].baseline == rows["stage.mm_probe"].figure
    for stage, parts in (("detector", ("data", "forward", "backward", "optimizer")),
                         ("extract", ("decode", "backbone", "proposals", "io")),
                         ("cmrin", ("data", "forward", "backward", "optimizer"))):
        shares = [rows[f"stage.{stage}.share.{p}"].figure for p in (*parts, "other")]
        assert all(0 <= v <= 1 for v in shares) and abs(sum(shares) - 1) < 0.01, (stage, shares)
        assert rows[f"stage.{stage}.share.forward" if stage != "extract" else "stage.extract.share.proposals"].figure > 0


def _sampling_inputs(synth_ds, **config):
    from refground.features.detector_train import make_batch
    from test_detector import tiny_config

    torch.manual_seed(0)
    model = DetectorModel(tiny_config(**config))
    data = load_train_data(synth_ds, "train", model.config)
    batch = make_batch(data, list(range(6)), torch.tensor([False, True, False, True, False, False]))
    batch.gt[2] = batch.gt[2][:0]  # an image without objects
    batch.cats[2], batch.colors[2], batch.sizes[2] = (t[:0] for t in (batch.cats[2], batch.colors[2], batch.sizes[2]))
    with torch.no_grad():
        logits, boxes = model.dense(model.maps(batch.x)[model.STRIDE])
    return model, logits.sigmoid(), boxes, batch


def _by_image(out):
    """Per image, the sorted rows of (roi coordinates, targets): comparable whatever the order of the rows."""
    rois, cls_t, col_t, size_t, reg_t, fg = out
    rows = torch.cat([rois, cls_t[:, None].float(), col_t[:, None].float(), size_t[:, None].float(),
                      torch.where(fg[:, None], reg_t, torch.zeros_like(reg_t)), fg[:, None].float()], dim=1)
    return {int(b): sorted(map(tuple, rows[rois[:, 0] == b].tolist())) for b in rois[:, 0].unique()}


def test_batched_roi_sampling_takes_what_the_per_image_loop_took(synth_ds, torch_one_thread):
    from refground.bench.stages_bench import reference_sample_rois
    from refground.features.detector_train import sample_rois

    # No jitter and room for every candidate: no random choice left, so both give the same RoIs and targets.
    model, scores, boxes, batch = _sampling_inputs(synth_ds, jitter_per_object=0, rois_per_image=10_000,
                                                   fg_fraction=1.0)
    gen = torch.Generator().manual_seed(0)
    new, old = sample_rois(model, scores, boxes, batch, gen), reference_sample_rois(model, scores, boxes, batch, gen)
    assert _by_image(new) == _by_image(old)
    rois, fg = new[0], new[5]
    for b in rois[:, 0].unique():  # grouped by image, foreground first
        f = fg[rois[:, 0] == b]
        assert not (f[1:] & ~f[:-1]).any()


def test_batched_roi_sampling_respects_the_quotas(synth_ds, torch_one_thread):
    from refground.features.detector_train import sample_rois

    model, scores, boxes, batch = _sampling_inputs(synth_ds, rois_per_image=8, fg_fraction=0.25, jitter_per_object=3)
    rois, cls_t, col_t, size_t, reg_t, fg = sample_rois(model, scores, boxes, batch, torch.Generator().manual_seed(1))
    counts = torch.bincount(rois[:, 0].long(), minlength=6)
    fg_counts = torch.bincount(rois[fg, 0].long(), minlength=6)
    assert (counts <= 8).all() and (fg_counts <= 2).all() and fg_counts.sum() > 0
    assert fg_counts[2] == 0 and (cls_t[rois[:, 0] == 2] == 0).all()  # the image without objects: background only
    assert ((cls_t > 0) == fg).all() and (col_t[~fg] == -1).all() and (size_t[~fg] == -1).all()
    # Another seed draws another subset of the same candidates.
    other = sample_rois(model, scores, boxes, batch, torch.Generator().manual_seed(2))[0]
    assert not torch.equal(other, rois)


def test_a_deferred_detector_evaluation_keeps_the_extracted_features_current(pipeline_cache, tmp_path,
                                                                            torch_one_thread):
    # The quickstart trains the detector without its val evaluation; `refground train detector` writes the
    # figures into the run folder later. What was extracted with the detector must stay current: the run's
    # parent fingerprint covers its config and weights, not its metrics or curve.
    import json
    import shutil

    from refground.data.store import dataset_dir, load_dataset
    from refground.features.detector_train import train_detector
    from refground.features.pipeline import features_path, require_features

    root = tmp_path / "cache"
    shutil.copytree(pipeline_cache, root)
    run = root / "synth" / "runs" / "detector" / "default"
    config = json.loads((run / "config.json").read_text())
    (run / "metrics.json").write_text("{}")  # as trained with evaluate=False
    require_features(features_path("synth", root))
    ds_dir = dataset_dir("synth", root)
    seed = json.loads((run / "manifest.json").read_text())["params"]["seed"]
    from refground.features.detector import DetectorConfig

    result = train_detector(load_dataset(ds_dir), run, DetectorConfig.from_dict(config), seed=seed, dataset_dir=ds_dir)
    assert result["cache_hit"] and result["metrics"]["referent_recall"]  # evaluated now, and written
    assert json.loads((run / "metrics.json").read_text())["referent_recall"] == result["metrics"]["referent_recall"]
    require_features(features_path("synth", root))  # still current: no re-extraction, no stale CMRIN inputs
    again = train_detector(load_dataset(ds_dir), run, DetectorConfig.from_dict(config), seed=seed,
                           dataset_dir=ds_dir, evaluate=False)  # the quickstart's next run: a plain cache hit
    assert again["cache_hit"] and again["metrics"] == result["metrics"]
    assert json.loads((run / "metrics.json").read_text())["referent_recall"] == result["metrics"]["referent_recall"]


def test_referent_recall_from_the_features_is_the_detectors_own(pipeline_cache, torch_one_thread):
    # The quickstart reads the detector's recall from the extracted proposals instead of running it again.
    from refground.data.store import load_named
    from refground.features.detector_train import evaluate_detector, features_referent_recall
    from refground.features.pipeline import features_path

    ds = load_named("synth", pipeline_cache)
    own = evaluate_detector(ds, BuiltinDetector.load(pipeline_cache / "synth" / "runs" / "detector" / "default"))
    read = features_referent_recall(ds, features_path("synth", pipeline_cache), "val")
    assert {str(n): v for n, v in read.items()} == own["referent_recall"]


def test_referent_recall_from_the_features_ranks_each_images_proposals(synth_ds, tmp_path):
    # Proposals = each image's ground-truth boxes in storage order: the referent is found at its rank in its image.
    from refground.cache import write_h5
    from refground.features.detector_train import features_referent_recall

    ds = synth_ds
    offs = ds.image_object_offsets
    path = tmp_path / "f.h5"
    write_h5(path, [{"images.ids": ds.image_ids, "proposals.counts": np.diff(offs),
                     "proposals.boxes": ds.object_boxes.astype(np.float32)}], {})
    read = features_referent_recall(ds, path, "val", (1, 2, 100))
    queries = ds.queries("val", "expression")
    rank = [ds.object_row(q.referent_object_id) - ds.object_slice(q.image_id).start for q in queries]
    assert read[1] == pytest.approx(np.mean([r < 1 for r in rank])) and 0 < read[1] < 1
    assert read[2] == pytest.approx(np.mean([r < 2 for r in rank]))
    assert read[100] == 1.0
