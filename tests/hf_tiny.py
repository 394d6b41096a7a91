"""Tiny randomly initialised transformers models saved to a folder, for tests (nothing is downloaded).

Each ``make_tiny_X(path, **small_overrides) -> path`` seeds torch (``seed``, default 0, so the same call
writes the same weights), builds the model from a small config (keyword overrides go into that config),
and writes it with ``save_pretrained`` together with its processor, so that the folder loads exactly like a
real checkpoint with ``from_pretrained(path, local_files_only=True)``. Creating one and running it on a few
small images takes well under a second.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

# Words the tiny CLIP tokenizer has whole-word tokens for (others are spelled out byte by byte).
TINY_WORDS = ("a", "the", "red", "blue", "cat", "dog", "ball", "left", "right", "of", "person", "car")
DETR_PROCESSOR_SIZE = {"shortest_edge": 64, "longest_edge": 96}


def _resnet_config(out_features: Sequence[str], **overrides: Any):
    from transformers import ResNetConfig

    kw: dict[str, Any] = dict(num_channels=3, embedding_size=8, hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1],
                              layer_type="basic", out_features=list(out_features))
    kw.update(overrides)
    return ResNetConfig(**kw)


def _labels(num_labels: int, labels: Sequence[str] | None) -> dict[str, Any]:
    names = list(labels) if labels is not None else [f"class{i}" for i in range(num_labels)]
    if len(names) != num_labels:
        raise ValueError(f"{len(names)} labels for num_labels={num_labels}")
    return {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


def _save(path: Path, model, *processors) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(path)
    for p in processors:
        p.save_pretrained(path)
    return path


def _detr_like(path: Path, config_cls: str, model_cls: str, proc_cls: str, num_labels: int,
               labels: Sequence[str] | None, seed: int, backbone_out: Sequence[str], defaults: dict[str, Any],
               overrides: dict[str, Any]) -> Path:
    import transformers

    torch.manual_seed(seed)
    kw: dict[str, Any] = dict(backbone_config=_resnet_config(backbone_out), num_queries=10, encoder_layers=1,
                              decoder_layers=1, encoder_ffn_dim=32, decoder_ffn_dim=32, d_model=16,
                              encoder_attention_heads=2, decoder_attention_heads=2, num_labels=num_labels,
                              **_labels(num_labels, labels))
    kw.update(defaults)
    kw.update(overrides)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kw))
    return _save(path, model, getattr(transformers, proc_cls)(size=DETR_PROCESSOR_SIZE))


def make_tiny_detr(path: Path, num_labels: int = 3, labels: Sequence[str] | None = None, seed: int = 0,
                   **small_overrides: Any) -> Path:
    """DETR (softmax with a no-object class) on a 4-stage ResNet of 8-16 channels (no timm), 10 queries,
    d_model 16; processor resizes to shortest edge 64 / longest 96. ``labels``: id2label names."""
    return _detr_like(path, "DetrConfig", "DetrForObjectDetection", "DetrImageProcessor", num_labels, labels, seed,
                      ["stage4"], {}, small_overrides)


def make_tiny_conditional_detr(path: Path, num_labels: int = 3, labels: Sequence[str] | None = None, seed: int = 0,
                               **small_overrides: Any) -> Path:
    """Conditional DETR (sigmoid class scores), same tiny sizes as :func:`make_tiny_detr`."""
    return _detr_like(path, "ConditionalDetrConfig", "ConditionalDetrForObjectDetection",
                      "ConditionalDetrImageProcessor", num_labels, labels, seed, ["stage4"], {}, small_overrides)


def make_tiny_deformable_detr(path: Path, num_labels: int = 3, labels: Sequence[str] | None = None, seed: int = 0,
                              **small_overrides: Any) -> Path:
    """Deformable DETR (sigmoid, multi-scale); d_model 32 (its GroupNorm needs 32 groups) and 2 decoder
    layers (transformers 5 cannot tie the box heads of a 1-layer decoder)."""
    return _detr_like(path, "DeformableDetrConfig", "DeformableDetrForObjectDetection", "DeformableDetrImageProcessor",
                      num_labels, labels, seed, ["stage2", "stage3", "stage4"],
                      {"d_model": 32, "decoder_layers": 2, "encoder_n_points": 2, "decoder_n_points": 2},
                      small_overrides)


def make_tiny_yolos(path: Path, num_labels: int = 3, labels: Sequence[str] | None = None, seed: int = 0,
                    **small_overrides: Any) -> Path:
    """YOLOS (ViT with 5 detection tokens, hidden 16, 1 layer); processor as :func:`make_tiny_detr`."""
    from transformers import YolosConfig, YolosForObjectDetection, YolosImageProcessor

    torch.manual_seed(seed)
    kw: dict[str, Any] = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                              image_size=[64, 96], patch_size=16, num_detection_tokens=5, num_labels=num_labels,
                              **_labels(num_labels, labels))
    kw.update(small_overrides)
    return _save(path, YolosForObjectDetection(YolosConfig(**kw)), YolosImageProcessor(size=DETR_PROCESSOR_SIZE))


def make_tiny_backbone(path: Path, seed: int = 0, image_mean: Sequence[float] | None = None,
                       image_std: Sequence[float] | None = None, **small_overrides: Any) -> Path:
    """ResNetBackbone (stem stride 4; stages 1-4 at strides 4, 8, 16, 32 with 8, 8, 16, 16 channels;
    ``out_features`` stage2-4) and a ConvNext-style image processor with the given mean/std (default
    ImageNet's)."""
    from transformers import ConvNextImageProcessor, ResNetBackbone

    torch.manual_seed(seed)
    model = ResNetBackbone(_resnet_config(["stage2", "stage3", "stage4"], **small_overrides))
    kw = {}
    if image_mean is not None:
        kw["image_mean"] = list(image_mean)
    if image_std is not None:
        kw["image_std"] = list(image_std)
    return _save(path, model, ConvNextImageProcessor(**kw))


# ------------------------------------------------------------------------------------ CLIP tokenizer


def write_tiny_clip_vocab(path: Path, words: Sequence[str] = TINY_WORDS) -> tuple[int, int]:
    """The library's corpus BPE (:func:`refground.features.clip_tokenizer.write_clip_vocab`) over ``words``:
    each of them one token, other words byte by byte. Returns ``(bos_id, eos_id)``."""
    from refground.features.clip_tokenizer import write_clip_vocab

    return write_clip_vocab(path, words)


def _clip_parts(path: Path, text_overrides: dict[str, Any], vision_overrides: dict[str, Any]):
    """(tokenizer, text_config kwargs, vision_config kwargs) for the tiny CLIP-family models."""
    from transformers import CLIPTokenizer

    bos, eos = write_tiny_clip_vocab(path)
    tok = CLIPTokenizer.from_pretrained(path, local_files_only=True, model_max_length=16)
    text = dict(vocab_size=eos + 1, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    text.update(text_overrides)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    vision.update(vision_overrides)
    return tok, text, vision


def make_tiny_clip(path: Path, seed: int = 0, projection_dim: int = 8, text_config: dict[str, Any] | None = None,
                   vision_config: dict[str, Any] | None = None, **small_overrides: Any) -> Path:
    """CLIPModel (text and vision towers of hidden 16, 1 layer; 32x32 images in 8x8 patches, 16 text
    positions; projection ``projection_dim``) with a CLIPProcessor: the hand-written tiny BPE of
    :func:`write_tiny_clip_vocab` (vocab.json + merges.txt) and an image processor resizing the shortest
    edge to 32 and centre-cropping 32x32."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    path = Path(path)
    tok, text, vision = _clip_parts(path, text_config or {}, vision_config or {})
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim,
                                 **small_overrides))
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}), tokenizer=tok)
    return _save(path, model, proc)


def _calm_box_head(model) -> None:
    """Random box heads saturate the sigmoid (every box in a corner): shrink the last layer so the boxes
    stay near OWL's patch-grid priors, spread over the image like a trained model's."""
    with torch.no_grad():
        model.box_head.dense2.weight.mul_(0.01)
        model.box_head.dense2.bias.zero_()


def make_tiny_owlvit(path: Path, seed: int = 0, **small_overrides: Any) -> Path:
    """OWL-ViT (open-vocabulary: logits over text queries; 4x4 = 16 patch boxes) with the tiny tokenizer and
    an image processor resizing to 32x32; projection dim = text hidden size (its class head needs that);
    the box head's last layer is shrunk so boxes sit near the patch-grid priors."""
    from transformers import OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessor, OwlViTProcessor

    path = Path(path)
    tok, text, vision = _clip_parts(path, {}, {})
    torch.manual_seed(seed)
    model = OwlViTForObjectDetection(OwlViTConfig(text_config=text, vision_config=vision, projection_dim=16,
                                                  **small_overrides))
    _calm_box_head(model)
    ip = OwlViTImageProcessor(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32})
    return _save(path, model, OwlViTProcessor(image_processor=ip, tokenizer=tok))


def make_tiny_owlv2(path: Path, seed: int = 0, **small_overrides: Any) -> Path:
    """OWLv2 as :func:`make_tiny_owlvit`; its image processor pads each image to a square (bottom/right)
    before resizing to 32x32 and needs scipy or torchvision at run time."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    path = Path(path)
    tok, text, vision = _clip_parts(path, {}, {})
    torch.manual_seed(seed)
    model = Owlv2ForObjectDetection(Owlv2Config(text_config=text, vision_config=vision, projection_dim=16,
                                                **small_overrides))
    _calm_box_head(model)
    return _save(path, model, Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 32, "width": 32}),
                                             tokenizer=tok))
