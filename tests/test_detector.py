"""The built-in detector: model shapes, the ProposalSource / FeatureSource contract, training determinism,
checkpoints, resume after an interruption, evaluation against an oracle, and the CLI command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from refground import progress
from refground.boxes import box_iou
from refground.features.base import DENSE_STRIDES, FeatureSource, ProposalSource
from refground.errors import ArtifactError
from refground.features.detector import BuiltinDetector, DetectorConfig, DetectorModel, file_sha256
from refground.features.detector_train import (assign_dense, evaluate_detector, load_images, load_train_data,
                                               make_batch, split_image_ids, train_detector, training_losses)
from refground.train import CHECKPOINT_FILE, MODEL_FILE, load_weights


def tiny_config(**kw) -> DetectorConfig:
    base = dict(input_size=128, widths=[8, 16, 16, 16], depths=[0, 1, 0, 0], fpn_channels=16, head_channels=16,
                roi_size=3, feature_dim=32, pre_nms_top_n=120, post_nms_top_n=60, epochs=2, batch_size=8,
                warmup_steps=2, rois_per_image=16, train_proposals=16, inference_batch=4)
    base.update(kw)
    return DetectorConfig(**base)


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def tiny_run(synth_ds, tmp_path_factory):
    """A tiny detector trained 2 epochs (seed 0) on the 24-image fixture; (run folder, result)."""
    out = tmp_path_factory.mktemp("det") / "run"
    result = train_detector(synth_ds, out, tiny_config(), seed=0)
    return out, result


@pytest.fixture(scope="module")
def val_images(synth_ds):
    ids = split_image_ids(synth_ds, "train")[:3] + split_image_ids(synth_ds, "val")
    return ids, load_images(synth_ds, ids)


# ------------------------------------------------------------------------------------------- model


def test_forward_backward_shapes(synth_ds):
    torch.manual_seed(0)
    cfg = tiny_config()
    model = DetectorModel(cfg)
    x = torch.randn(2, 3, 128, 128)
    maps = model.maps(x)
    assert {s: tuple(m.shape) for s, m in maps.items()} == {8: (2, 16, 16, 16), 16: (2, 16, 8, 8), 32: (2, 16, 4, 4)}
    logits, boxes = model.dense(maps[8])
    assert logits.shape == (2, 256) and boxes.shape == (2, 256, 4)
    assert bool((boxes[..., 2:] > boxes[..., :2]).all())  # ltrb distances are positive
    rois = torch.tensor([[0, 10.0, 10, 40, 50], [1, 0, 0, 128, 128]])
    out = model.region(maps[8], rois)
    assert out["feature"].shape == (2, 32) and out["cls"].shape == (2, 9)
    assert out["color"].shape == (2, 8) and out["size"].shape == (2, 3) and out["deltas"].shape == (2, 4)

    data = load_train_data(synth_ds, "train", cfg)
    assert data.images.dtype == torch.uint8 and data.images.shape[1:] == (128, 128, 3)
    batch = make_batch(data, [0, 1, 2], torch.tensor([False, True, False]))
    losses = training_losses(model, batch, torch.Generator().manual_seed(0))
    assert all(torch.isfinite(v) for v in losses.values())
    losses["total"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_flip_mirrors_boxes_with_the_image(synth_ds):
    data = load_train_data(synth_ds, "train", tiny_config())
    plain = make_batch(data, [0], None)
    flipped = make_batch(data, [0], torch.tensor([True]))
    assert torch.equal(flipped.x[0], plain.x[0].flip(-1))
    b, f = plain.gt[0], flipped.gt[0]
    assert torch.allclose(f[:, 0], 128 - b[:, 2]) and torch.allclose(f[:, 2], 128 - b[:, 0])
    assert torch.equal(f[:, 1::2], b[:, 1::2])


def _assign_reference(loc, gt, radius):
    pos = torch.zeros(len(gt), len(loc), dtype=torch.bool)
    idx = torch.full((len(gt), len(loc)), -1)
    for b, boxes in enumerate(gt):
        for i, (x, y) in enumerate(loc.tolist()):
            best = None
            for j, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
                cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
                if x1 < x < x2 and y1 < y < y2 and abs(x - cx) < radius and abs(y - cy) < radius:
                    area = (x2 - x1) * (y2 - y1)
                    if best is None or area < best[0]:
                        best = (area, j)
            if best is not None:
                pos[b, i], idx[b, i] = True, best[1]
    return pos, idx


def test_assign_dense_matches_loop():
    g = torch.Generator().manual_seed(3)
    loc = torch.rand(40, 2, generator=g) * 64
    xy = torch.rand(6, 2, generator=g) * 48
    boxes = torch.cat([xy, xy + 4 + torch.rand(6, 2, generator=g) * 30], 1)
    gt = [boxes, boxes[:0], boxes[2:4], torch.tensor([[0.0, 0, 64, 64], [10, 10, 20, 20]])]
    pos, idx = assign_dense(loc, gt, radius=12.0)
    ref_pos, ref_idx = _assign_reference(loc, gt, 12.0)
    assert torch.equal(pos, ref_pos) and torch.equal(idx, ref_idx)
    assert not pos[1].any() and pos.any()


# ------------------------------------------------------------------------------------------ contract


def test_propose_contract(tiny_run, val_images):
    ids, images = val_images
    det = BuiltinDetector.load(tiny_run[0])
    assert isinstance(det, ProposalSource) and isinstance(det, FeatureSource)
    assert det.class_names == list(tiny_config().class_names) and det.feature_dim == 32
    props = det.propose(images, ids, 20)
    assert len(props) == len(images)
    for p, im in zip(props, images):
        h, w = im.shape[:2]
        k = len(p)
        assert 1 <= k <= 20
        assert p.boxes.shape == (k, 4) and p.boxes.dtype == torch.float32
        assert bool((p.scores[:-1] >= p.scores[1:]).all())
        assert bool((p.boxes[:, 0] >= 0).all() and (p.boxes[:, 2] <= w).all() and (p.boxes[:, 1] >= 0).all()
                    and (p.boxes[:, 3] <= h).all() and (p.boxes[:, 2:] > p.boxes[:, :2]).all())
        assert p.class_scores.shape == (k, 8) and p.features.shape == (k, 32)
        assert torch.equal(p.scores, p.class_scores.max(1).values) and torch.equal(p.labels, p.class_scores.argmax(1))
        assert bool((p.class_scores.sum(1) <= 1 + 1e-5).all() and (p.scores > 0).all())
        # After the final NMS no two proposals overlap more than its threshold.
        iou = box_iou(p.boxes, p.boxes).fill_diagonal_(0)
        assert float(iou.max()) <= det.config.final_nms + 1e-6
    assert all(len(p) <= 5 for p in det.propose(images, ids, 5))


def test_region_features_are_the_proposal_features(tiny_run, val_images, synth_ds):
    ids, images = val_images
    det = BuiltinDetector.load(tiny_run[0])
    props = det.propose(images, ids, 30)
    feats = det.region_features(images, [p.boxes for p in props])
    for p, f in zip(props, feats):
        assert f.shape == p.features.shape
        torch.testing.assert_close(f, p.features, rtol=1e-5, atol=1e-5)
    # Ground-truth boxes: a fresh detector (no cached backbone), each image alone, gives the same vectors.
    gts = [torch.from_numpy(synth_ds.object_boxes[synth_ds.object_slice(i)].astype(np.float32)) for i in ids]
    batched = det.region_features(images, gts)
    fresh = BuiltinDetector.load(tiny_run[0])
    for im, gt, f in zip(images, gts, batched):
        alone = fresh.region_features([im], [gt])[0]
        assert alone.shape == (len(gt), 32)
        torch.testing.assert_close(alone, f, rtol=1e-5, atol=1e-5)
    probs = det.classify(images, gts)
    for pr, gt in zip(probs, gts):
        assert pr["category"].shape == (len(gt), 8) and pr["color"].shape == (len(gt), 8)
        torch.testing.assert_close(pr["category"].sum(1) + pr["background"], torch.ones(len(gt)))
        torch.testing.assert_close(pr["size"].sum(1), torch.ones(len(gt)))
    assert det.region_features(images[:1], [torch.zeros((0, 4))])[0].shape == (0, 32)


def test_backbone_runs_once_per_batch(tiny_run, val_images):
    ids, images = val_images
    det = BuiltinDetector.load(tiny_run[0])
    calls = []
    original = det.model.maps
    det.model.maps = lambda x: calls.append(x.shape[0]) or original(x)
    props = det.propose(images, ids, 10)
    det.region_features(images, [p.boxes for p in props])
    det.dense_maps(images, 128)
    assert sum(calls) == len(images)
    det.region_features(list(images[:2]), [p.boxes for p in props[:2]])  # another batch: computed anew
    assert sum(calls) == len(images) + 2


def test_dense_map_shapes(tiny_run, val_images):
    ids, images = val_images
    det = BuiltinDetector.load(tiny_run[0])
    assert det.dense_channels == {8: 16, 16: 16, 32: 16}
    for size in (128, 96):
        maps = det.dense_maps(images[:2], size)
        assert len(maps) == 2
        for m in maps:
            assert sorted(m) == sorted(DENSE_STRIDES)
            for s in DENSE_STRIDES:
                assert m[s].shape == (16, size // s, size // s) and m[s].dtype == torch.float32
    wide = np.zeros((100, 160, 3), dtype=np.uint8)  # other sizes and aspect ratios are resized to size x size
    m = det.dense_maps([wide], 128)[0]
    assert m[8].shape == (16, 16, 16)
    p = det.propose([wide], [0], 10)[0]
    assert bool((p.boxes[:, 2] <= 160).all() and (p.boxes[:, 3] <= 100).all())


def test_run_folder_round_trip_and_identity(tiny_run, val_images, tmp_path):
    run, _ = tiny_run
    ids, images = val_images
    state = load_weights(run / CHECKPOINT_FILE)  # for resuming: the last epoch's model and optimizer
    assert state["epoch"] == 2 and "optimizer" in state
    weights = load_weights(run / MODEL_FILE)  # the weights to use: the last epoch's
    assert state_equal(weights, state["model"])
    a, b = BuiltinDetector.load(run), BuiltinDetector.load(run / MODEL_FILE)
    assert state_equal(a.model.state_dict(), weights)
    pa, pb = a.propose(images, ids, 15), b.propose(images, ids, 15)
    for x, y in zip(pa, pb):
        assert torch.equal(x.boxes, y.boxes) and torch.equal(x.features, y.features)
    ident = a.identity()
    assert ident["kind"] == "builtin-detector" and ident["weights"] == file_sha256(run / MODEL_FILE)
    assert ident["config"]["feature_dim"] == 32 and json.dumps(ident)
    saved = json.loads((run / "config.json").read_text())
    assert DetectorConfig.from_dict(saved) == tiny_config()
    # Without model.pt (or config.json), or with unreadable weights: a one-line ArtifactError.
    for keep in (MODEL_FILE, "config.json"):  # a folder with only one of the two
        bad = tmp_path / f"only-{keep}"
        bad.mkdir()
        (bad / keep).write_bytes((run / keep).read_bytes())
        with pytest.raises(ArtifactError, match="no trained detector here"):
            BuiltinDetector.load(bad)
    bad = tmp_path / "garbled"
    bad.mkdir()
    (bad / "config.json").write_bytes((run / "config.json").read_bytes())
    (bad / MODEL_FILE).write_bytes(b"not a torch file")
    with pytest.raises(ArtifactError, match="model.pt: unreadable .*run `refground train detector --run garbled") as exc:
        BuiltinDetector.load(bad)
    assert "\n" not in str(exc.value)


# ----------------------------------------------------------------------------------------- training


def test_training_is_seeded_and_resumes_exactly(tiny_run, synth_ds, tmp_path):
    run, result = tiny_run
    straight = load_weights(run / MODEL_FILE)
    assert result["cache_hit"] is False and result["resumed_from"] == 0
    # Same seed, new folder: the same weights.
    again = train_detector(synth_ds, tmp_path / "again", tiny_config(), seed=0, evaluate=False)
    assert state_equal(load_weights(tmp_path / "again" / MODEL_FILE), straight)
    assert again["steps"] == result["steps"]
    # Interrupt in the middle of epoch 2 (the tracker raises before its second step), then resume: epoch 2
    # is redone from its start after epoch 1's checkpoint, and the weights are those of the straight run.
    steps_per_epoch = result["steps"] // 2
    assert steps_per_epoch >= 2

    def interrupting(iterable, total, description):
        for k, item in enumerate(iterable):
            if "epoch 2/" in description and k == 1:
                raise KeyboardInterrupt
            yield item

    progress.set_tracker(interrupting)
    try:
        with pytest.raises(KeyboardInterrupt):
            train_detector(synth_ds, tmp_path / "resumed", tiny_config(), seed=0)
    finally:
        progress.set_tracker(None)
    interrupted = tmp_path / "resumed"
    assert load_weights(interrupted / CHECKPOINT_FILE)["epoch"] == 1
    assert json.loads((interrupted / "manifest.json").read_text())["complete"] is False
    assert not state_equal(load_weights(interrupted / MODEL_FILE), straight)  # epoch 1's weights
    res = train_detector(synth_ds, interrupted, tiny_config(), seed=0)
    assert res["resumed_from"] == 1 and res["epochs_trained_now"] == 1 and res["steps"] == result["steps"]
    assert state_equal(load_weights(interrupted / MODEL_FILE), straight)
    assert state_equal(load_weights(interrupted / CHECKPOINT_FILE)["model"], straight)
    curve = json.loads((interrupted / "curve.json").read_text())
    assert [e["epoch"] for e in curve["epochs"]] == [1, 2]
    terms = {"objectness", "dense_box", "cls", "color", "size", "box"}
    assert all(terms | {"loss", "seconds"} <= set(e) for e in curve["epochs"])

    def timeless(c):
        return {**c, "epochs": [{k: v for k, v in e.items() if k != "seconds"} for e in c["epochs"]]}

    assert timeless(curve) == timeless(json.loads((run / "curve.json").read_text()))  # same losses as straight
    # Another seed gives other weights.
    other = tiny_config(epochs=1)
    train_detector(synth_ds, tmp_path / "seed1", other, seed=1, evaluate=False)
    train_detector(synth_ds, tmp_path / "seed0", other, seed=0, evaluate=False)
    assert not state_equal(load_weights(tmp_path / "seed1" / MODEL_FILE), load_weights(tmp_path / "seed0" / MODEL_FILE))


def test_run_folder_and_cache_hit(tiny_run, synth_ds):
    run, result = tiny_run
    for f in ("config.json", "checkpoint.pt", "model.pt", "curve.json", "metrics.json", "manifest.json"):
        assert (run / f).is_file(), f
    assert not (run / "vocab.json").exists()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["fingerprint"] == result["fingerprint"]
    assert "dataset" in manifest["parents"]
    m = json.loads((run / "metrics.json").read_text())
    assert m == json.loads(json.dumps(result["metrics"]))
    for key in ("referent_recall", "context_recall"):
        vals = [m[key][n] for n in ("1", "3", "5", "10", "20", "100")]
        assert all(0 <= v <= 1 for v in vals if v == v) and vals == sorted(vals)
    before = {f: file_sha256(run / f) for f in (CHECKPOINT_FILE, MODEL_FILE, "manifest.json")}
    hit = train_detector(synth_ds, run, tiny_config(), seed=0)
    assert hit["cache_hit"] is True and hit["metrics"] == m and hit["fingerprint"] == result["fingerprint"]
    assert hit["train_images_per_s"] == result["train_images_per_s"]
    assert {f: file_sha256(run / f) for f in before} == before  # a hit writes nothing


# ---------------------------------------------------------------------------------------- evaluation


class OracleDetector:
    """Proposes exactly the ground-truth boxes (in a fixed shuffled order) and classifies them correctly."""

    def __init__(self, ds, keep_every: int = 1):
        self.ds = ds
        self.class_names = list(tiny_config().class_names)
        self.color_names = list(tiny_config().color_names)
        self.size_names = list(tiny_config().size_names)
        self.boxes_of = {}
        self.keep_every = keep_every

    def _gt(self, image_id):
        sl = self.ds.object_slice(image_id)
        return torch.from_numpy(self.ds.object_boxes[sl].astype(np.float32)), sl

    def propose(self, images, image_ids, max_proposals):
        from refground.features.base import Proposals

        out = []
        for i in image_ids:
            boxes, _ = self._gt(i)
            boxes = boxes[:: self.keep_every][:max_proposals]
            k = len(boxes)
            cs = torch.full((k, 8), 0.1)
            out.append(Proposals(boxes, cs.max(1).values, torch.zeros(k, dtype=torch.int64), cs))
        return out

    def classify(self, images, boxes):
        out = []
        for b in boxes:
            # The boxes are the ground truth of an image: find it by matching (the oracle knows the answers).
            row = int(np.flatnonzero((np.abs(self.ds.object_boxes - b[0].numpy()).sum(1) < 1e-3))[0])
            sl = slice(row, row + len(b))
            cat = torch.tensor([self.class_names.index(self.ds.categories[c]) for c in self.ds.object_categories[sl]])
            col = torch.tensor([self.color_names.index(c) for c in self.ds.object_attributes["color"][sl]])
            size = torch.tensor([self.size_names.index(c) for c in self.ds.object_attributes["size"][sl]])
            out.append({"category": torch.nn.functional.one_hot(cat, 8).float(),
                        "color": torch.nn.functional.one_hot(col, 8).float(),
                        "size": torch.nn.functional.one_hot(size, 3).float()})
        return out


def test_evaluate_detector_with_an_oracle(synth_ds):
    m = evaluate_detector(synth_ds, OracleDetector(synth_ds), "val", max_n=(1, 100))
    assert m["referent_recall"]["100"] == 1.0 and m["category_accuracy"] == 1.0
    assert m["color_accuracy"] == 1.0 and m["size_accuracy"] == 1.0
    queries = synth_ds.queries("val", "expression")
    assert m["expressions"] == len(queries) and m["images"] == len({q.image_id for q in queries})
    n_obj = sum(len(synth_ds.objects_of(i)) for i in {q.image_id for q in queries})
    assert m["mean_proposals"] == n_obj / m["images"] and m["gt_objects"] == n_obj
    # Recall@1 by hand: the first ground-truth object of the image is the only proposal.
    firsts = {i: synth_ds.object_slice(i).start for i in {q.image_id for q in queries}}
    expected = np.mean([synth_ds.object_row(q.referent_object_id) == firsts[q.image_id] for q in queries])
    assert m["referent_recall"]["1"] == pytest.approx(expected)
    # Keeping every other object loses exactly the others (boxes of an image are distinct).
    half = evaluate_detector(synth_ds, OracleDetector(synth_ds, keep_every=2), "val", max_n=(100,))
    kept = np.mean([(synth_ds.object_row(q.referent_object_id) - firsts[q.image_id]) % 2 == 0 for q in queries])
    assert half["referent_recall"]["100"] == pytest.approx(kept)


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_trains_then_skips(synth_cache, capsys, tmp_path):
    import shutil

    import refground.cli.train_detector  # noqa: F401  (registers the command; cli/main.py imports it too)
    from refground.cli.main import main

    # A private copy of the session dataset: the run folder must not appear in other tests' shared cache.
    cache = tmp_path / "cache"
    shutil.copytree(synth_cache / "synth" / "dataset", cache / "synth" / "dataset")
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(tiny_config(epochs=3).to_dict()))
    args = ["train", "detector", "--cache", str(cache), "--dataset", "synth", "--run", "cli",
            "--config", str(cfg), "--epochs", "1", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    run = cache / "synth" / "runs" / "detector" / "cli"
    assert out["cache_hit"] is False and out["run"] == str(run) and (run / MODEL_FILE).is_file()
    assert json.loads((run / "config.json").read_text()) == tiny_config(epochs=1).to_dict()
    assert set(out["metrics"]["referent_recall"]) == {"1", "3", "5", "10", "20", "100"}
    assert main(args[:-1]) == 0
    cap = capsys.readouterr()
    assert "cache hit" in cap.err and "recall@100" in cap.out
    assert main(args + ["--force"]) == 0
    assert json.loads(capsys.readouterr().out)["cache_hit"] is False
    assert main(["train", "detector", "--cache", str(cache), "--epochs", "0"]) == 2
    assert "--epochs 0" in capsys.readouterr().err
    cfg.write_text(json.dumps({"no_such_field": 1}))
    assert main(args + ["--force"]) == 2
    err = capsys.readouterr().err
    assert "no_such_field" in err and len(err.strip().splitlines()) == 1


def test_cli_help_states_the_config_defaults():
    from typer.testing import CliRunner

    from refground.cli.main import build_app

    out = CliRunner().invoke(build_app(), ["train", "detector", "--help"], env={"COLUMNS": "200"}).output
    d = DetectorConfig()
    for text in (f"default {d.epochs})", f"default {d.input_size};", f"default {d.batch_size})", f"default {d.lr})"):
        assert text in " ".join(out.split()), text

