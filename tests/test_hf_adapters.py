"""The transformers adapters (refground.features.hf) on tiny random models built by tests/hf_tiny.py."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import hf_tiny  # noqa: E402
from test_boxes import roi_align_expected  # noqa: E402

from refground.boxes import box_iou, clip_boxes_to_image  # noqa: E402
from refground.errors import DataError, UsageError  # noqa: E402
from refground.features.base import ClipEncoder, FeatureSource, ProposalSource  # noqa: E402
from refground.features.hf import HFBackbone, HFClip, HFDetector  # noqa: E402

DETECTORS = ("detr", "conditional_detr", "deformable_detr", "yolos", "owlvit")
OWL_QUERIES = ["cat", "red dog", "ball"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: on a shared 2-core machine torch's intra-op threads cost 30x more than the
    ops (1 s vs 0.03 s per forward pass). One thread for this module only; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Lazily built tiny model folders, one per name, shared by the module."""
    root = tmp_path_factory.mktemp("hf")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = getattr(hf_tiny, f"make_tiny_{name}")(root / name)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def images():
    """Two sizes (80x50 and 40x90) and a second 80x50 image."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (50, 80, 3), dtype=np.uint8), rng.integers(0, 256, (90, 40, 3), dtype=np.uint8),
            rng.integers(0, 256, (50, 80, 3), dtype=np.uint8)]


def detector(built, name: str, **kw) -> HFDetector:
    if name.startswith("owl"):
        kw.setdefault("class_names", OWL_QUERIES)
    return HFDetector(built(name), **kw)


def assert_same(a, b):
    assert len(a) == len(b)
    for pa, pb in zip(a, b):
        for f in ("boxes", "scores", "labels", "class_scores", "features"):
            x, y = getattr(pa, f), getattr(pb, f)
            assert (x is None) == (y is None)
            if x is not None:
                assert torch.equal(x, y), f


# ------------------------------------------------------------------------------------------ detectors


@pytest.mark.parametrize("name", DETECTORS)
def test_detector_contract(built, images, name):
    det = detector(built, name, nms_threshold=1.0)
    assert isinstance(det, ProposalSource)
    every = det.propose(images, [1, 2, 3], max_proposals=1000)
    top = det.propose(images, [1, 2, 3], max_proposals=4)
    c = len(det.class_names)
    for im, p, q in zip(images, every, top):
        h, w = im.shape[:2]
        assert len(p) >= 4  # 5 to 16 queries, NMS off: (almost) all kept
        assert len(q) == 4
        assert p.boxes.dtype == p.scores.dtype == p.class_scores.dtype == torch.float32
        assert p.labels.dtype == torch.int64
        assert p.boxes.shape == (len(p), 4) and p.class_scores.shape == (len(p), c)
        assert p.features is not None and p.features.dtype == torch.float32 and p.features.shape[0] == len(p)
        # best first; scores/labels are the max/argmax of class_scores, probabilities
        assert torch.all(p.scores[:-1] >= p.scores[1:])
        assert torch.equal(p.scores, p.class_scores.max(1).values)
        assert torch.equal(p.labels, p.class_scores.argmax(1))
        assert p.class_scores.min() >= 0 and p.class_scores.sum(1).max() <= c + 1e-6
        # inside the original image, positive area
        assert p.boxes[:, 0].min() >= 0 and p.boxes[:, 1].min() >= 0
        assert p.boxes[:, 2].max() <= w and p.boxes[:, 3].max() <= h
        assert torch.all(p.boxes[:, 2] > p.boxes[:, 0]) and torch.all(p.boxes[:, 3] > p.boxes[:, 1])
        # max_proposals cuts the same ranking
        assert torch.equal(q.boxes, p.boxes[:4]) and torch.equal(q.features, p.features[:4])
    assert det.propose(images, [1, 2, 3], 0)[1].boxes.shape == (0, 4)
    assert det.propose(images, [1, 2, 3], 0)[1].class_scores.shape == (0, c)


@pytest.mark.parametrize("name", DETECTORS)
def test_detector_deterministic_and_batch_independent(built, images, name):
    det = detector(built, name, nms_threshold=1.0, batch_size=2)
    both = det.propose(images, [1, 2, 3], 6)
    assert_same(both, det.propose(images, [1, 2, 3], 6))
    # an image batched with none of its own size (no padding from the others): exactly the same alone
    assert_same(both[1:2], det.propose(images[1:2], [2], 6))
    # same-size images share a forward pass: equal up to float rounding of the batched kernels
    alone = det.propose(images[2:3], [3], 6)[0]
    assert len(alone) == len(both[2])
    assert torch.allclose(alone.scores, both[2].scores, atol=1e-5)


@pytest.mark.parametrize("name", ["detr", "yolos", "owlvit"])
def test_detector_matches_processor_post_processing(built, images, name):
    """Boxes in original pixels and scores agree with transformers' own post_process_object_detection
    (target_sizes = each image's size), which these families share the score definition with."""
    det = detector(built, name, nms_threshold=1.0)
    ours = det.propose(images[:2], [1, 2], 1000)
    for im, p in zip(images[:2], ours):
        h, w = im.shape[:2]
        inputs = dict(det.processor(images=[im], return_tensors="pt"))
        if name == "owlvit":
            text = det.processor(text=[OWL_QUERIES], return_tensors="pt")
            inputs.update(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
        with torch.no_grad():
            out = det.model(**inputs)
        post = getattr(det.processor, "image_processor", det.processor).post_process_object_detection
        ref = post(out, threshold=-1.0, target_sizes=[(h, w)])[0]
        boxes = clip_boxes_to_image(ref["boxes"], (h, w))
        order = torch.sort(ref["scores"], descending=True, stable=True).indices
        assert len(p) == len(order)
        assert torch.allclose(p.boxes, boxes[order], atol=1e-4)
        assert torch.allclose(p.scores, ref["scores"][order], atol=1e-6)
        assert torch.equal(p.labels, ref["labels"][order])


def test_detr_scores_drop_no_object_and_na_labels(built, images, tmp_path):
    path = hf_tiny.make_tiny_detr(tmp_path / "coco_like", num_labels=4, labels=["N/A", "person", "n/a", "car"])
    det = HFDetector(path, nms_threshold=1.0)
    assert det.class_names == ["person", "car"]
    p = det.propose(images[:1], [1], 1000)[0]
    inputs = det.processor(images=images[:1], return_tensors="pt")
    with torch.no_grad():
        out = det.model(**inputs)
    probs = out.logits[0].softmax(-1)  # 4 classes + no-object
    assert probs.shape[1] == 5
    expected = probs[:, [1, 3]]
    order = torch.sort(expected.max(1).values, descending=True, stable=True).indices
    assert torch.allclose(p.class_scores, expected[order], atol=1e-6)
    assert torch.allclose(p.features, out.last_hidden_state[0][order], atol=1e-6)
    assert torch.all(p.class_scores.sum(1) < 1)  # the no-object (and N/A) mass is not renormalised away


def test_sigmoid_family_class_scores(built, images):
    det = detector(built, "conditional_detr", nms_threshold=1.0)
    p = det.propose(images[:1], [1], 1000)[0]
    with torch.no_grad():
        out = det.model(**det.processor(images=images[:1], return_tensors="pt"))
    assert out.logits.shape[-1] == 3  # no no-object column: focal-loss sigmoid per class
    probs = out.logits[0].sigmoid()
    order = torch.sort(probs.max(1).values, descending=True, stable=True).indices
    assert torch.allclose(p.class_scores, probs[order], atol=1e-6)
    assert torch.allclose(p.features, out.last_hidden_state[0][order], atol=1e-6)


def test_importing_the_module_does_not_import_transformers():
    code = "import sys, refground.features.hf; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_yolos_features_are_detection_tokens(built, images):
    det = detector(built, "yolos", nms_threshold=1.0)
    p = det.propose(images[:1], [1], 1000)[0]
    with torch.no_grad():
        out = det.model(**det.processor(images=images[:1], return_tensors="pt"))
    tokens = out.last_hidden_state[0, -5:]  # 5 detection tokens close the sequence
    probs = out.logits[0].softmax(-1)[:, :-1]
    order = torch.sort(probs.max(1).values, descending=True, stable=True).indices
    assert p.features.shape == (5, 16)
    assert torch.allclose(p.features, tokens[order], atol=1e-6)


def test_detector_nms_and_score_threshold(built, images):
    det = detector(built, "deformable_detr", nms_threshold=0.3)
    for p in det.propose(images, [1, 2, 3], 1000):
        iou = box_iou(p.boxes, p.boxes)
        same = p.labels[:, None] == p.labels[None, :]
        off = ~torch.eye(len(p), dtype=torch.bool)
        assert not torch.any((iou > 0.3) & same & off)
    all_scores = torch.cat([p.scores for p in detector(built, "deformable_detr", nms_threshold=1.0)
                            .propose(images, [1, 2, 3], 1000)])
    cut = float(all_scores.median())
    kept = detector(built, "deformable_detr", nms_threshold=1.0, score_threshold=cut).propose(images, [1, 2, 3], 1000)
    assert sum(len(p) for p in kept) == int((all_scores >= cut).sum())
    assert all(torch.all(p.scores >= cut) for p in kept)


def test_open_vocabulary_and_closed_set_options(built):
    with pytest.raises(UsageError, match="open-vocabulary: give class_names"):
        HFDetector(built("owlvit"))
    with pytest.raises(UsageError, match="class_names only applies"):
        HFDetector(built("detr"), class_names=["cat"])
    with pytest.raises(UsageError, match="distinct non-empty"):
        HFDetector(built("owlvit"), class_names=["cat", "cat"])
    det = HFDetector(built("owlvit"), class_names=["dog"])
    assert det.class_names == ["dog"] and det.identity()["class_names"] == ["dog"]


def test_owlv2_boxes_scale_to_the_padded_square(built, images):
    if importlib.util.find_spec("scipy") is None and importlib.util.find_spec("torchvision") is None:
        # Without either, the OWLv2 image processor cannot resize: the adapter says so at construction.
        with pytest.raises(DataError, match="owlv2 image processor cannot run here") as err:
            detector(built, "owlv2")
        assert "\n" not in str(err.value)
        return
    det = detector(built, "owlv2", nms_threshold=1.0)
    for im, p in zip(images[:2], det.propose(images[:2], [1, 2], 1000)):
        h, w = im.shape[:2]
        s = max(h, w)
        inputs = dict(det.processor(images=[im], return_tensors="pt"))
        text = det.processor(text=[OWL_QUERIES], return_tensors="pt")
        with torch.no_grad():
            out = det.model(**inputs, input_ids=text["input_ids"], attention_mask=text["attention_mask"])
        post = det.processor.image_processor.post_process_object_detection
        ref = post(out, threshold=-1.0, target_sizes=[(s, s)])[0]
        boxes = clip_boxes_to_image(ref["boxes"], (h, w))
        ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        order = torch.sort(ref["scores"][ok], descending=True, stable=True).indices
        assert torch.allclose(p.boxes, boxes[ok][order], atol=1e-4)


# ------------------------------------------------------------------------------------------ identity


def test_identity_tracks_weights_and_parameters(built, tmp_path):
    det = detector(built, "detr")
    ident = det.identity()
    assert ident["kind"] == "hf-detector" and ident["model_type"] == "detr"
    assert ident["path"] == str(built("detr").resolve())
    assert ident["weights"] == hashlib.sha256((built("detr") / "model.safetensors").read_bytes()).hexdigest()
    assert (ident["score_threshold"], ident["nms_threshold"]) == (0.0, 0.5)
    json.dumps(ident)
    assert detector(built, "detr").identity() == ident
    assert detector(built, "detr", nms_threshold=0.6).identity() != ident
    same = HFDetector(hf_tiny.make_tiny_detr(tmp_path / "same", seed=0)).identity()
    other = HFDetector(hf_tiny.make_tiny_detr(tmp_path / "other", seed=1)).identity()
    assert same["weights"] == ident["weights"] and same["config"] == ident["config"]
    assert other["weights"] != ident["weights"]
    bb = HFBackbone(built("backbone")).identity()
    assert bb["kind"] == "hf-backbone" and (bb["level_stride"], bb["pool"]) == (16, 7)
    assert HFBackbone(built("backbone"), level_stride=8).identity() != bb
    clip = HFClip(built("clip")).identity()
    assert clip["kind"] == "hf-clip" and clip["model_type"] == "clip"
    assert HFClip(hf_tiny.make_tiny_clip(tmp_path / "clip1", seed=1)).identity()["weights"] != clip["weights"]


# ------------------------------------------------------------------------------------- bad folders


def test_bad_folders_are_one_line_data_errors(built, tmp_path):
    def check(fn, path, fragment):
        with pytest.raises(DataError) as err:
            fn(path)
        msg = str(err.value)
        assert str(path) in msg and fragment in msg and "\n" not in msg, msg

    for cls in (HFDetector, HFBackbone, HFClip):
        check(cls, tmp_path / "missing", "folder not found")
    (tmp_path / "empty").mkdir()
    check(HFDetector, tmp_path / "empty", "is not a transformers object detector (no config.json)")
    check(HFDetector, built("clip"), "is not a transformers object detector (config model_type=clip)")
    check(HFDetector, built("backbone"), "is not a transformers object detector (config model_type=resnet)")
    check(HFBackbone, built("detr"), "is not a transformers backbone (config model_type=detr)")
    check(HFClip, built("backbone"), "is not a transformers CLIP-like model (config model_type=resnet)")
    check(HFClip, built("detr"), "is not a transformers CLIP-like model (config model_type=detr)")
    gd = tmp_path / "gdino"
    gd.mkdir()
    (gd / "config.json").write_text(json.dumps({"model_type": "grounding-dino"}))
    check(HFDetector, gd, "grounding-dino detectors are not supported")
    bad = tmp_path / "badjson"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    check(HFDetector, bad, "unreadable transformers config")
    broken = tmp_path / "broken"
    shutil.copytree(built("detr"), broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    check(HFDetector, broken, "cannot load the detector")
    noweights = tmp_path / "noweights"
    shutil.copytree(built("detr"), noweights)
    loaded = HFDetector(noweights)
    (noweights / "model.safetensors").unlink()
    check(HFDetector, noweights, "cannot load the detector")
    check(lambda p: loaded.identity(), noweights, "no weight files")


# ------------------------------------------------------------------------------------------ backbone


def expected_region_feature(fmap: torch.Tensor, box, stride: int, pool: int = 7, ratio: int = 2) -> torch.Tensor:
    """Slow reference: the plain-loop RoIAlign of tests/test_boxes.py (aligned, 1/stride), mean-pooled."""
    rois = torch.tensor([[0.0, *map(float, box)]], dtype=torch.float64)
    pooled = roi_align_expected(fmap[None].double(), rois, (pool, pool), 1.0 / stride, ratio, True)
    return pooled[0].mean((1, 2)).to(fmap.dtype)


def _normalised(im: np.ndarray, folder: Path) -> torch.Tensor:
    cfg = json.loads((folder / "preprocessor_config.json").read_text())
    x = torch.from_numpy(im).permute(2, 0, 1)[None].float() * cfg["rescale_factor"]
    return (x - torch.tensor(cfg["image_mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["image_std"]).view(1, 3, 1, 1)


@pytest.mark.parametrize("stride", [8, 16])
def test_backbone_region_features_against_reference(built, images, tmp_path, stride):
    folder = hf_tiny.make_tiny_backbone(tmp_path / "bb", image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])
    bb = HFBackbone(folder, level_stride=stride, pool=7)
    assert isinstance(bb, FeatureSource)
    assert bb.strides == [4, 8, 16, 32] and bb.dense_channels == {8: 8, 16: 16, 32: 16}
    assert bb.feature_dim == {8: 8, 16: 16}[stride]
    boxes = [torch.tensor([[0.0, 0.0, 80.0, 50.0], [10.5, 3.0, 33.0, 41.0], [60.0, 40.0, 61.0, 41.0]]),
             torch.zeros(0, 4), torch.tensor([[5.0, 5.0, 20.0, 30.0]])]
    feats = bb.region_features(images, boxes)
    assert [tuple(f.shape) for f in feats] == [(3, bb.feature_dim), (0, bb.feature_dim), (1, bb.feature_dim)]
    assert all(f.dtype == torch.float32 for f in feats)
    level = {8: 1, 16: 2}[stride]  # stage2, stage3 of the stride-4 ResNet stem
    for im, bx, f in zip(images, boxes, feats):
        with torch.no_grad():
            fmap = bb.model(_normalised(im, folder)).feature_maps[level][0]
        for k in range(len(bx)):
            assert torch.allclose(f[k], expected_region_feature(fmap, bx[k].tolist(), stride), atol=1e-5)
    # deterministic; an image's features do not depend on the others
    again = bb.region_features(images[2:], boxes[2:])
    assert torch.equal(again[0], feats[2])


def test_backbone_max_side_and_options(built, images):
    plain = HFBackbone(built("backbone"))
    boxes = [torch.tensor([[4.0, 10.0, 30.0, 80.0]])]
    ref = plain.region_features(images[1:2], boxes)[0]
    assert torch.equal(HFBackbone(built("backbone"), max_side=90).region_features(images[1:2], boxes)[0], ref)
    small = HFBackbone(built("backbone"), max_side=45).region_features(images[1:2], boxes)[0]
    assert small.shape == ref.shape and torch.isfinite(small).all() and not torch.equal(small, ref)
    with pytest.raises(UsageError, match="no stride-64 feature map"):
        HFBackbone(built("backbone"), level_stride=64)


@pytest.mark.parametrize("size", [64, 100])
def test_backbone_dense_maps(built, images, size):
    folder = built("backbone")
    bb = HFBackbone(folder, batch_size=2)
    maps = bb.dense_maps(images, size)
    assert len(maps) == 3
    for im, m in zip(images, maps):
        assert sorted(m) == [8, 16, 32]
        for s, t in m.items():
            assert t.shape == (bb.dense_channels[s], size // s, size // s) and t.dtype == torch.float32
        x = F.interpolate(torch.from_numpy(im).permute(2, 0, 1)[None].float(), size=(size, size), mode="bilinear",
                          align_corners=False, antialias=True)
        with torch.no_grad():
            ref = bb.model(_normalised(x[0].permute(1, 2, 0).numpy(), folder)).feature_maps
        for level, s in ((1, 8), (2, 16), (3, 32)):
            n = size // s
            assert torch.allclose(m[s], ref[level][0, :, :n, :n], atol=1e-5)  # cropped bottom/right
    assert torch.allclose(bb.dense_maps(images[1:2], size)[0][16], maps[1][16], atol=1e-5)


# ---------------------------------------------------------------------------------------------- CLIP


def test_tiny_clip_vocab_has_whole_words(built):
    clip = HFClip(built("clip"))
    tok = clip.processor.tokenizer
    assert tok.tokenize("a red cat left of the dog") == ["a</w>", "red</w>", "cat</w>", "left</w>", "of</w>",
                                                         "the</w>", "dog</w>"]
    assert tok.tokenize("zebra")[-1] == "a</w>"  # unknown words are spelled out, never <unk>


def test_clip_embeddings(built, images):
    clip = HFClip(built("clip"), batch_size=2)
    assert isinstance(clip, ClipEncoder)
    assert clip.embed_dim == 8
    crops = images + [images[0][10:20, 5:40], np.zeros((1, 1, 3), dtype=np.uint8)]
    img = clip.embed_images(crops)
    texts = ["a red cat", "the dog left of the ball", "zebra!", "a " * 40]
    txt = clip.embed_texts(texts)
    assert img.shape == (5, 8) and txt.shape == (4, 8)
    assert img.dtype == txt.dtype == torch.float32
    assert torch.allclose(img.norm(dim=1), torch.ones(5), atol=1e-5)
    assert torch.allclose(txt.norm(dim=1), torch.ones(4), atol=1e-5)
    # the projection of transformers' own forward, normalised; batch size does not matter
    inputs = clip.processor(text=texts[:3], images=crops, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = clip.model(**inputs)
    assert torch.allclose(img, F.normalize(out.image_embeds, dim=-1), atol=1e-5)
    assert torch.allclose(txt[:3], F.normalize(out.text_embeds, dim=-1), atol=1e-5)
    big = HFClip(built("clip"), batch_size=64)
    assert torch.allclose(big.embed_images(crops), img, atol=1e-6)
    assert torch.allclose(big.embed_texts(texts), txt, atol=1e-6)
    assert torch.equal(clip.embed_texts(texts), txt)
    assert clip.embed_images([]).shape == (0, 8) and clip.embed_texts([]).shape == (0, 8)


def test_clip_vision_attentions(built, images):
    clip = HFClip(built("clip"))
    att = clip.vision_attentions(images)
    assert att.shape == (3, 2, 17, 17) and att.dtype == torch.float32  # 2 heads, 1 + 4x4 patches
    assert torch.allclose(att.sum(-1), torch.ones(3, 2, 17), atol=1e-5)
