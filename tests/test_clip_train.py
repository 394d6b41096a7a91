"""The built-in CLIP: corpus tokenizer, contrastive loss and recall against slow references, a tiny training run
(seeded, resumable, a cache hit, loadable with from_pretrained), and `--clip builtin` on the HFClip code path."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from refground.errors import ArtifactError
from refground.features.clip_tokenizer import corpus_words, write_clip_vocab
from refground.features.clip_train import (PRETRAINED_DIR, ClipTrainConfig, contrastive_loss, retrieval_recall,
                                           train_clip)

TINY = ClipTrainConfig(image_size=32, patch_size=8, vision_width=16, vision_layers=1, vision_heads=2, text_width=16,
                       text_layers=1, text_heads=2, context_length=16, projection_dim=8, epochs=2, batch_size=8,
                       warmup_steps=2, min_word_count=1, bf16=False)


# ------------------------------------------------------------------------------------------- tokenizer


def test_corpus_words_counts_and_orders() -> None:
    words = corpus_words(["A red star, a red circle.", "two stars"], min_count=1)
    assert words[:2] == ["a", "red"]  # most frequent first
    assert set(words) == {"a", "red", "star", ",", "circle", ".", "two", "stars"}
    assert corpus_words(["a b", "a"], min_count=2) == ["a"]


def test_corpus_words_are_single_tokens(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    write_clip_vocab(tmp_path, ["red", "star", "hexagon"])
    tok = CLIPTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    ids = tok("Red star hexagon")["input_ids"]
    assert len(ids) == 2 + 3  # BOS, one token per known word, EOS
    assert tok.convert_ids_to_tokens(ids[1:-1]) == ["red</w>", "star</w>", "hexagon</w>"]
    unknown = tok("zebra")["input_ids"]
    assert len(unknown) == 2 + 5  # spelled byte by byte
    assert tok.decode(unknown, skip_special_tokens=True).strip() == "zebra"


# ------------------------------------------------------------------------------------------------ loss


def test_contrastive_loss_is_clips_loss_when_captions_differ() -> None:
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    scale = torch.tensor(math.log(1 / 0.07))
    ours = contrastive_loss(img, txt, scale, torch.arange(6))
    logits = scale.exp() * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
    ref = 0.5 * (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.t(), torch.arange(6)))
    assert torch.allclose(ours, ref, atol=1e-6)


def test_contrastive_loss_shares_targets_between_equal_captions() -> None:
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    key = torch.tensor([7, 3, 7, 5])
    scale = torch.tensor(1.3)
    logits = scale.exp() * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
    total = 0.0
    for direction in (logits, logits.t()):
        for i in range(4):
            matches = [j for j in range(4) if key[i] == key[j]]
            logp = F.log_softmax(direction[i], dim=0)
            total += -sum(float(logp[j]) for j in matches) / len(matches) / 4
    assert abs(float(contrastive_loss(img, txt, scale, key)) - total / 2) < 1e-5


def test_retrieval_recall_against_a_loop() -> None:
    g = torch.Generator().manual_seed(2)
    images = F.normalize(torch.randn(7, 4, generator=g), dim=-1)
    caption_image = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6, 6, 2])
    texts = F.normalize(images[caption_image] + 0.9 * torch.randn(10, 4, generator=g), dim=-1)
    rec = retrieval_recall(images, texts, caption_image, (1, 3))
    for k in (1, 3):
        t2i = [int(caption_image[m]) in (texts[m] @ images.t()).argsort(descending=True)[:k].tolist()
               for m in range(10)]
        i2t = [any(int(caption_image[m]) == i for m in (images[i] @ texts.t()).argsort(descending=True)[:k].tolist())
               for i in range(7)]
        assert rec[f"text_to_image@{k}"] == pytest.approx(sum(t2i) / 10)
        assert rec[f"image_to_text@{k}"] == pytest.approx(sum(i2t) / 7)


# ---------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A tiny captioned dataset (the synthetic world's captions stand in for the web corpus here)."""
    from refground.data.synth import write_synthetic

    root = tmp_path_factory.mktemp("clipcache")
    ds = write_synthetic(root / "web" / "dataset", "web", num_images=40, image_size=64, workers=1)
    return root, ds


def _train(root: Path, ds: object, run: str = "default", **kw: object) -> dict:
    return train_clip(ds, root / "web" / "runs" / "clip" / run, TINY, seed=0, dataset_dir=root / "web" / "dataset",
                      **kw)


def test_tiny_training_is_loadable_and_a_cache_hit(corpus: tuple[Path, object]) -> None:
    from transformers import AutoProcessor, CLIPModel

    root, ds = corpus
    first = _train(root, ds)
    run = root / "web" / "runs" / "clip" / "default"
    assert not first["cache_hit"] and first["best_epoch"] in (1, 2)
    assert 0.0 <= first["metrics"]["recall@1"] <= 1.0
    model = CLIPModel.from_pretrained(run / PRETRAINED_DIR, local_files_only=True)
    proc = AutoProcessor.from_pretrained(run / PRETRAINED_DIR, local_files_only=True)
    assert type(proc).__name__ == "CLIPProcessor" and type(model.config).__name__ == "CLIPConfig"
    assert model.config.vision_config.image_size == 32 and proc.image_processor.crop_size["height"] == 32
    tok = proc.tokenizer(["a red circle"], return_tensors="pt", padding=True)
    assert model.get_text_features(**tok).pooler_output.shape[-1] == TINY.projection_dim
    # the saved weights are the kept epoch's
    kept = torch.load(run / "model.pt", weights_only=True)
    assert torch.equal(model.state_dict()["logit_scale"], kept["logit_scale"])
    assert torch.equal(model.state_dict()["visual_projection.weight"], kept["visual_projection.weight"])
    again = _train(root, ds)
    assert again["cache_hit"] and again["pretrained"] == str(run / PRETRAINED_DIR)


def test_resume_is_bit_identical(corpus: tuple[Path, object], torch_one_thread: None) -> None:
    from test_hostile_train import interrupt_in_epoch

    from refground import progress

    root, ds = corpus
    a = _train(root, ds, run="A")
    progress.set_tracker(interrupt_in_epoch(2))
    try:
        with pytest.raises(KeyboardInterrupt):
            _train(root, ds, run="B")
    finally:
        progress.set_tracker(None)
    runs = root / "web" / "runs" / "clip"
    assert json.loads((runs / "B" / "manifest.json").read_text())["complete"] is False
    assert not (runs / "B" / PRETRAINED_DIR).exists()
    torch.manual_seed(123)
    b = _train(root, ds, run="B")
    assert b["resumed_from"] == 1
    assert [e["loss"] for e in a["curve"]["epochs"]] == [e["loss"] for e in b["curve"]["epochs"]]
    assert (runs / "A" / PRETRAINED_DIR / "model.safetensors").read_bytes() == \
        (runs / "B" / PRETRAINED_DIR / "model.safetensors").read_bytes()


def test_builtin_clip_spec_resolves_to_the_run(corpus: tuple[Path, object]) -> None:
    from refground.features.hf import HFClip
    from refground.features.sources import resolve

    root, ds = corpus
    _train(root, ds)
    spec = resolve("builtin", "clip", root / "synth" / "runs")
    assert spec.name == "clip-default" and spec.path == root / "web" / "runs" / "clip" / "default" / PRETRAINED_DIR
    clip = spec.load(None)
    assert isinstance(clip, HFClip)
    emb = clip.embed_texts(["a red circle", "a blue star"])
    assert emb.shape == (2, TINY.projection_dim) and torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    with pytest.raises(ArtifactError, match="refground train clip --run nope"):
        resolve("builtin:nope", "clip", root / "synth" / "runs")


def test_train_clip_cli(corpus: tuple[Path, object], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import fail, run_json

    root, _ = corpus
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY.to_dict()))
    js = run_json(capsys, "train", "clip", "--cache", str(root), "--config", str(cfg), "--run", "cli", "--seed", "1")
    assert js["dataset"] == "web" and js["name"] == "cli" and not js["cache_hit"]
    assert Path(js["pretrained"]) == root / "web" / "runs" / "clip" / "cli" / PRETRAINED_DIR
    assert set(js["metrics"]) >= {"text_to_image@1", "image_to_text@10", "recall@1", "temperature"}
    assert run_json(capsys, "train", "clip", "--cache", str(root), "--config", str(cfg), "--run", "cli",
                    "--seed", "1")["cache_hit"]
    assert "--preset web" in fail(capsys, "train", "clip", "--cache", str(tmp_path / "empty"))
    assert "--force" in fail(capsys, "train", "clip", "--cache", str(root), "--config", str(cfg), "--run", "cli",
                             "--seed", "2")
    assert "--batch-size" in fail(capsys, "train", "clip", "--cache", str(root), "--batch-size", "0")


def test_text_groups_and_hard_negative_batches() -> None:
    from refground.features.clip_train import GROUP_WORDS, epoch_batches, text_groups

    texts = ["a red star", "Blue circles and a red heart", "photo of a shape", "greenish thing", "pink-ish icon"]
    expect = []
    for t in texts:  # the first colour word in reading order, whole words only
        words = [w for w in t.lower().replace("-", " ").split() if w in GROUP_WORDS]
        expect.append(GROUP_WORDS.index(words[0]) if words else len(GROUP_WORDS))
    assert text_groups(texts).tolist() == expect
    groups = torch.tensor([k % 3 for k in range(96)])
    for hard in (0.0, 0.5, 1.0):
        b = epoch_batches(groups, 8, hard, torch.Generator().manual_seed(0))
        assert b.shape == (12, 8) and len(set(b.flatten().tolist())) == 96
        pure = sum(len(set(groups[row].tolist())) == 1 for row in b)
        assert pure >= int(hard * 12) - 2  # grouped rows hold one group (a few straddle a group boundary)
        if hard == 0.0:
            assert pure <= 2
        again = epoch_batches(groups, 8, hard, torch.Generator().manual_seed(0))
        assert torch.equal(b, again)
