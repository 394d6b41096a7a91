"""The built-in CLIP: a small ``transformers.CLIPModel`` trained from scratch on an image / alt-text corpus.

It plays the part of the CLIP a user would download: trained elsewhere (``refground data synth --preset
web``: images and alt-text that share no image or sentence with the benchmark), then used through exactly the
code path of any CLIP folder (:class:`refground.features.hf.HFClip`, ``--clip builtin`` = ``--clip hf:PATH``).

The model: a ViT image tower (a [CLS] token and a patch grid, eager attention so the attention maps are
readable) and a causal text transformer (CLIP's, pooled at the end-of-text token), both projected to a joint
space; a tokenizer made from the corpus (:mod:`refground.features.clip_tokenizer`), a ``CLIPImageProcessor``
(shortest side to ``image_size``, centre crop, CLIP's mean and std). Training: CLIP's symmetric contrastive loss
with a learned temperature (the logit scale, clamped at 100 as CLIP does), over the batch's image-caption pairs;
where two pairs of a batch have the same caption text (short alt-text repeats: "clipart of a red circle")
each counts the other's image as a positive too (uniform soft targets over the matching ones), so the loss never
pushes apart images that the text cannot tell apart. With all captions distinct this is exactly CLIP's loss.
AdamW, linear warm-up then cosine decay, weight decay on matrices only, bfloat16 autocast on CPUs that have
it. Each epoch draws one of an image's captions at random.

The run folder (:mod:`refground.train`) holds, beside the loop's files, ``pretrained/``: the model of the
best epoch (corpus-val recall@1) saved with ``save_pretrained`` beside its processor, which
``CLIPModel.from_pretrained`` and ``AutoProcessor.from_pretrained`` load (written to a staging folder and
renamed before the run is marked complete).
"""

from __future__ import annotations

import math
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from refground.data.model import Dataset
from refground.errors import DataError, UsageError
from refground.progress import track
from refground.train import MODEL_FILE, RunSpec, fit, load_weights

STEP, STEP_VERSION = "train-clip", 1
CORPUS = "web"  # the dataset the built-in CLIP trains on by default (`refground data synth --preset web`)
PRETRAINED_DIR = "pretrained"
TOKENIZER_DIR = "tokenizer"
# OpenAI CLIP's normalisation constants (any fixed values would do; these make the folder look like a CLIP's).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_LOGIT_SCALE = math.log(100.0)
RECALL_KS = (1, 5, 10)
# Hard-negative groups: images whose captions name the same colour train in one batch (see epoch_batches).
GROUP_WORDS = ("red", "green", "blue", "yellow", "purple", "orange", "pink", "cyan")


@dataclass
class ClipTrainConfig:
    """The built-in CLIP's architecture and training (saved as ``config.json`` in the run folder)."""

    image_size: int = 48
    patch_size: int = 6
    vision_width: int = 96
    vision_layers: int = 4
    vision_heads: int = 4
    text_width: int = 96
    text_layers: int = 2
    text_heads: int = 4
    context_length: int = 20
    projection_dim: int = 128
    epochs: int = 34
    batch_size: int = 64
    lr: float = 1.5e-3
    weight_decay: float = 0.1
    warmup_steps: int = 300
    min_word_count: int = 2
    hard_negatives: float = 0.5
    bf16: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClipTrainConfig":
        """Build from a dict (unknown keys are an error, missing keys take the defaults)."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown CLIP config keys: {', '.join(unknown)}")
        cfg = cls(**d)
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        if cfg.vision_width % cfg.vision_heads or cfg.text_width % cfg.text_heads:
            raise ValueError("the widths must be multiples of their head counts")
        if not 0.0 <= cfg.hard_negatives <= 1.0:
            raise ValueError(f"hard_negatives {cfg.hard_negatives} must be in [0, 1]")
        return cfg


def clip_model_config(cfg: ClipTrainConfig, vocab_size: int, bos: int, eos: int):
    """The ``transformers.CLIPConfig`` of ``cfg`` (eager attention, so the attention maps can be read)."""
    from transformers import CLIPConfig

    text = {"vocab_size": vocab_size, "hidden_size": cfg.text_width, "intermediate_size": 4 * cfg.text_width,
            "num_hidden_layers": cfg.text_layers, "num_attention_heads": cfg.text_heads,
            "max_position_embeddings": cfg.context_length, "bos_token_id": bos, "eos_token_id": eos,
            "pad_token_id": eos}
    vision = {"hidden_size": cfg.vision_width, "intermediate_size": 4 * cfg.vision_width,
              "num_hidden_layers": cfg.vision_layers, "num_attention_heads": cfg.vision_heads,
              "image_size": cfg.image_size, "patch_size": cfg.patch_size}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.projection_dim)
    config._attn_implementation = "eager"
    return config


def image_processor(cfg: ClipTrainConfig):
    """The ``CLIPImageProcessor`` of the built-in CLIP: shortest side to ``image_size`` (bicubic), centre crop."""
    from refground.features.hf import _quiet

    with _quiet():  # transformers 5 warns, on import, that it falls back to its PIL backend without torchvision
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor(size={"shortest_edge": cfg.image_size},
                                  crop_size={"height": cfg.image_size, "width": cfg.image_size},
                                  image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD))


# ---------------------------------------------------------------------------------------------- corpus


@dataclass
class Corpus:
    """One split of the corpus in memory.

    ``pixels``: uint8[N, 3, S, S], the images resized and centre-cropped by the processor (before scaling and
    normalisation: :func:`normalise` finishes the processor's work per batch); ``input_ids`` / ``attention_mask``:
    int64[M, L] every caption tokenised (padded to L = context length); ``caption_image``: int64[M] the image
    row of each caption; ``caption_key``: int64[M] one id per distinct caption text; ``offsets``: int64[N + 1],
    the captions of image i are rows ``offsets[i]:offsets[i+1]`` (grouped by image); ``image_group``: int64[N]
    the hard-negative group of each image (:func:`text_groups` of its first caption)."""

    pixels: Tensor
    input_ids: Tensor
    attention_mask: Tensor
    caption_image: Tensor
    caption_key: Tensor
    offsets: Tensor
    image_group: Tensor

    @property
    def num_images(self) -> int:
        return int(self.pixels.shape[0])


def normalise(pixels: Tensor) -> Tensor:
    """uint8[B, 3, S, S] -> float32 pixel values as the processor gives them (rescaled, mean/std normalised)."""
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


def caption_texts(ds: Dataset, split: str) -> tuple[list[int], list[list[str]]]:
    """The image ids of ``split`` that have captions, in storage order, and each one's caption texts."""
    by_image: dict[int, list[str]] = {}
    for q in ds.queries(split, "caption"):
        if not q.text.strip():
            raise DataError(f"dataset {ds.name}: caption {q.query_id} is empty")
        by_image.setdefault(q.image_id, []).append(q.text)
    ids = [int(i) for i, s in zip(ds.image_ids, ds.image_splits) if s == split and int(i) in by_image]
    return ids, [by_image[i] for i in ids]


def load_corpus(ds: Dataset, split: str, tokenizer: Any, processor: Any, cfg: ClipTrainConfig,
                keys: dict[str, int] | None = None) -> Corpus:
    """Read ``split``'s images and captions into a :class:`Corpus` (images through ``processor`` in blocks).
    ``keys``: the text -> key map to extend (so keys agree across splits)."""
    from refground.features.detector_train import load_images

    ids, texts = caption_texts(ds, split)
    if not ids:
        raise DataError(f"dataset {ds.name}: no captioned images in split {split!r} (make the corpus with "
                        "`refground data synth --preset web`)")
    blocks = []
    block = 256
    for a in track(range(0, len(ids), block), total=(len(ids) + block - 1) // block,
                   description=f"read corpus {split}"):
        images = load_images(ds, ids[a:a + block])
        px = processor(images=images, return_tensors="pt", do_rescale=False, do_normalize=False)["pixel_values"]
        blocks.append(px.round().clamp(0, 255).to(torch.uint8))
    flat = [t for ts in texts for t in ts]
    tok = tokenizer(flat, padding="max_length", truncation=True, max_length=cfg.context_length,
                    return_tensors="pt")
    keys = {} if keys is None else keys
    key = torch.tensor([keys.setdefault(t, len(keys)) for t in flat], dtype=torch.int64)
    counts = torch.tensor([len(ts) for ts in texts], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    return Corpus(torch.cat(blocks), tok["input_ids"].long(), tok["attention_mask"].long(),
                  torch.repeat_interleave(torch.arange(len(ids)), counts), key, offsets,
                  torch.from_numpy(text_groups([ts[0] for ts in texts])))


def text_groups(texts: Sequence[str], words: Sequence[str] = GROUP_WORDS) -> np.ndarray:
    """int64[len(texts)]: the index in ``words`` of the first of them a text uses (``len(words)``: none). The
    hard-negative groups: read from the caption alone, as a web crawler could."""
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b")
    index = {w: k for k, w in enumerate(words)}
    return np.array([index[m.group(1)] if (m := pattern.search(t.lower())) else len(words) for t in texts],
                    dtype=np.int64)


def epoch_batches(groups: Tensor, batch_size: int, hard: float, gen: torch.Generator) -> Tensor:
    """One epoch's batches of image rows, int64[steps, batch_size] (the last partial batch dropped): a share
    ``hard`` of the images is sorted by group (``groups`` int64[N]) before cutting, so those batches hold
    images whose captions name one colour and must be told apart by the rest (shape, count, size, layout);
    the others are random. Batch order shuffled."""
    n = len(groups)
    order = torch.randperm(n, generator=gen)
    k = int(round(hard * n))
    if k:
        grouped = order[:k][torch.argsort(groups[order[:k]], stable=True)]
        order = torch.cat([grouped, order[k:]])
    steps = n // batch_size
    cut = order[:steps * batch_size].view(steps, batch_size)
    return cut[torch.randperm(steps, generator=gen)]


# ------------------------------------------------------------------------------------------------ loss


def contrastive_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, text_key: Tensor) -> Tensor:
    """CLIP's symmetric contrastive loss over a batch of B image-caption pairs.

    image_emb, text_emb: Tensor[B, E] (normalised inside); logit_scale: the log temperature (scalar);
    text_key: int64[B] a caption-text id per pair. Targets: pair i's caption matches image j when their texts
    are equal (itself always), uniformly over the matches; all distinct gives CLIP's cross-entropy on the
    diagonal. Returns the mean of the image->text and text->image cross-entropies."""
    img = F.normalize(image_emb.float(), dim=-1)
    txt = F.normalize(text_emb.float(), dim=-1)
    logits = logit_scale.float().exp() * img @ txt.t()  # [B images, B texts]
    same = (text_key[:, None] == text_key[None, :]).float()
    target = same / same.sum(dim=1, keepdim=True)
    per_image = -(target * F.log_softmax(logits, dim=1)).sum(dim=1)
    per_text = -(target * F.log_softmax(logits.t(), dim=1)).sum(dim=1)
    return 0.5 * (per_image.mean() + per_text.mean())


# ------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def embed_corpus(model: Any, corpus: Corpus, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """(image embeddings Tensor[N, E], caption embeddings Tensor[M, E]), L2-normalised float32."""
    was_training = model.training
    model.eval()
    imgs, txts = [], []
    for a in range(0, corpus.num_images, batch_size):
        imgs.append(model.get_image_features(pixel_values=normalise(corpus.pixels[a:a + batch_size])))
    for a in range(0, len(corpus.input_ids), batch_size):
        txts.append(model.get_text_features(input_ids=corpus.input_ids[a:a + batch_size],
                                            attention_mask=corpus.attention_mask[a:a + batch_size]))
    model.train(was_training)
    pooled = [getattr(t, "pooler_output", t) for t in imgs], [getattr(t, "pooler_output", t) for t in txts]
    return F.normalize(torch.cat(pooled[0]).float(), dim=-1), F.normalize(torch.cat(pooled[1]).float(), dim=-1)


def retrieval_recall(image_emb: Tensor, text_emb: Tensor, caption_image: Tensor,
                     ks: tuple[int, ...] = RECALL_KS) -> dict[str, float]:
    """Recall@k both ways between N images and M captions (``caption_image[m]`` the image of caption m):
    ``text_to_image@k`` the share of captions whose image is among its k most similar images, ``image_to_text@k``
    the share of images with one of their captions among the k most similar captions."""
    sim = text_emb @ image_emb.t()  # [M, N]
    own = sim.gather(1, caption_image[:, None])
    t2i_rank = (sim > own).sum(dim=1)  # images strictly above the caption's own image
    sim_i = sim.t()  # [N, M]
    is_own = caption_image[None, :] == torch.arange(image_emb.shape[0])[:, None]
    best_own = sim_i.masked_fill(~is_own, -math.inf).max(dim=1).values
    i2t_rank = ((sim_i > best_own[:, None]) & ~is_own).sum(dim=1)
    out = {}
    for k in ks:
        out[f"text_to_image@{k}"] = float((t2i_rank < k).float().mean())
        out[f"image_to_text@{k}"] = float((i2t_rank < k).float().mean())
    return out


# -------------------------------------------------------------------------------------------- training


def run_spec(out_dir: str | Path, config: ClipTrainConfig, seed: int, dataset_dir: Path) -> RunSpec:
    """The :class:`~refground.train.RunSpec` of a CLIP run: config, seed and the corpus it reads."""
    from refground.cache import parent

    params = {"config": config.to_dict(), "seed": int(seed), "train_split": "train", "eval_split": "val"}
    return RunSpec(Path(out_dir), f"{STEP}@{STEP_VERSION}", params, {"dataset": parent("dataset", dataset_dir)},
                   "runs/clip")


def _lr_at(step: int, total: int, cfg: ClipTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def _optimizer(model: torch.nn.Module, cfg: ClipTrainConfig) -> torch.optim.Optimizer:
    # Weight decay on matrices only (not on biases, norms, embeddings' scale or the temperature), as CLIP.
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)


def bf16_available() -> bool:
    """Whether bfloat16 autocast is worth it on this CPU (native bfloat16 dot products)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def train_clip(corpus_ds: Dataset, out_dir: str | Path, config: ClipTrainConfig | None = None, seed: int = 0,
               resume: bool = True, force: bool = False, dataset_dir: Path | None = None) -> dict[str, Any]:
    """Train the built-in CLIP on ``corpus_ds``'s train split (images with captions) into run folder ``out_dir``;
    select the epoch by corpus-val recall@1 (mean of both directions) and save it with ``save_pretrained`` into
    ``out_dir/pretrained``. A complete run with the same fingerprint (config, seed, corpus) is a cache hit;
    an interrupted one resumes from its last finished epoch. Returns the summary (``metrics``: the corpus-val
    recall of the kept epoch, ``pretrained``: the folder)."""
    t_start = time.perf_counter()
    config = config or ClipTrainConfig()
    if config.epochs < 1 or config.batch_size < 2:
        raise UsageError(f"epochs must be at least 1 and the batch at least 2 (a contrastive loss needs "
                         f"negatives), got {config.epochs} and {config.batch_size}")
    if dataset_dir is None:
        raise UsageError("train_clip needs the corpus's dataset folder (its fingerprint is the run's input)")
    spec = run_spec(out_dir, config, seed, dataset_dir)
    with spec.lock():
        result = spec.start(spec.out_dir.name, force, t_start)
        if result["cache_hit"] and (spec.out_dir / PRETRAINED_DIR / "config.json").is_file():
            result["pretrained"] = str(spec.out_dir / PRETRAINED_DIR)
            return result
        return _train_locked(corpus_ds, spec, config, seed, resume, force, t_start, result)


def _train_locked(ds: Dataset, spec: RunSpec, cfg: ClipTrainConfig, seed: int, resume: bool, force: bool,
                  t_start: float, result: dict[str, Any]) -> dict[str, Any]:
    from transformers import CLIPModel

    from refground.features.clip_tokenizer import build_clip_tokenizer

    out = spec.out_dir
    state = spec.begin(cfg.to_dict(), None, resume, force)
    train_ids, train_texts = caption_texts(ds, "train")
    if not train_ids:
        raise DataError(f"dataset {ds.name}: no captioned train images (make the corpus with `refground data "
                        "synth --preset web`)")
    # The tokenizer is made from the training captions alone (words seen min_word_count times).
    tokenizer = build_clip_tokenizer(out / TOKENIZER_DIR, [t for ts in train_texts for t in ts],
                                     cfg.context_length, cfg.min_word_count)
    processor = image_processor(cfg)
    bos, eos = tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
    torch.manual_seed(seed)
    model = CLIPModel(clip_model_config(cfg, len(tokenizer), bos, eos))
    optimizer = _optimizer(model, cfg)
    t_load = time.perf_counter()
    keys: dict[str, int] = {}
    train = load_corpus(ds, "train", tokenizer, processor, cfg, keys)
    val = load_corpus(ds, "val", tokenizer, processor, cfg, keys)
    load_seconds = time.perf_counter() - t_load
    n = train.num_images
    per_epoch = max(1, n // cfg.batch_size)  # the last partial batch is dropped: fewer negatives would be noise
    total_steps = per_epoch * cfg.epochs
    use_bf16 = bool(cfg.bf16) and bf16_available()

    def batches(gen: torch.Generator) -> list[Tensor]:
        order = epoch_batches(train.image_group, cfg.batch_size, cfg.hard_negatives, gen)
        counts = (train.offsets[1:] - train.offsets[:-1])[order]
        pick = (torch.rand(order.shape, generator=gen) * counts).long()  # one caption per image, at random
        return list(train.offsets[order] + pick)

    def train_step(rows: Tensor, gen: torch.Generator) -> tuple[Tensor, int]:
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
        images = normalise(train.pixels[train.caption_image[rows]])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            img = model.get_image_features(pixel_values=images)
            txt = model.get_text_features(input_ids=train.input_ids[rows], attention_mask=train.attention_mask[rows])
        img, txt = getattr(img, "pooler_output", img), getattr(txt, "pooler_output", txt)
        loss = contrastive_loss(img, txt, model.logit_scale, train.caption_key[rows])
        return loss, len(rows)

    def evaluate() -> dict[str, Any]:
        ie, te = embed_corpus(model, val)
        rec = retrieval_recall(ie, te, val.caption_image)
        figures = {f"val_{k}": round(v, 4) for k, v in rec.items()}
        figures["val_recall@1"] = round(0.5 * (rec["text_to_image@1"] + rec["image_to_text@1"]), 4)
        figures["temperature"] = round(float(model.logit_scale.exp()), 3)
        return figures

    fr = fit(model, optimizer, spec, epochs=cfg.epochs, seed=seed, batches=batches, train_step=train_step,
             evaluate=evaluate, select="val_recall@1", state=state, description="clip",
             lr_at_step=lambda step: _lr_at(step, total_steps, cfg), batch_rng="torch")
    model.load_state_dict(load_weights(out / MODEL_FILE))
    save_pretrained(model, tokenizer, processor, out / PRETRAINED_DIR)
    best = next((r for r in fr.curve["epochs"] if r["epoch"] == fr.best_epoch), fr.curve["epochs"][-1])
    metrics = {"corpus": ds.name, "split": "val", "images": val.num_images, "captions": len(val.input_ids),
               "best_epoch": fr.best_epoch, **{k.removeprefix("val_"): v for k, v in best.items()
                                               if k.startswith("val_")},
               "temperature": best.get("temperature"), "vocab_size": len(tokenizer),
               "parameters": sum(p.numel() for p in model.parameters())}
    summary = spec.finish(fr, cfg.epochs, (cfg.epochs - fr.resumed_from) * per_epoch * cfg.batch_size, metrics)
    result.update(summary)
    result.update(pretrained=str(out / PRETRAINED_DIR), load_seconds=round(load_seconds, 2), bf16=use_bf16,
                  train_images=n, seconds=round(time.perf_counter() - t_start, 3))
    return result


def save_pretrained(model: Any, tokenizer: Any, processor: Any, folder: Path) -> Path:
    """Write ``model`` and a ``CLIPProcessor`` (``processor`` + ``tokenizer``) with ``save_pretrained`` into a
    staging folder beside ``folder``, then rename it into place (a crash leaves no half-written model)."""
    from transformers import CLIPProcessor

    folder = Path(folder)
    stage = folder.with_name(folder.name + ".partial")
    shutil.rmtree(stage, ignore_errors=True)
    model.save_pretrained(stage)
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(stage)
    shutil.rmtree(folder, ignore_errors=True)
    stage.rename(folder)
    return folder


__all__ = ["ClipTrainConfig", "Corpus", "PRETRAINED_DIR", "caption_texts", "clip_model_config", "contrastive_loss",
           "embed_corpus", "image_processor", "load_corpus", "normalise", "retrieval_recall",
           "run_spec", "save_pretrained", "train_clip"]
