"""Adapters from transformers models in a local folder to the extraction protocols of :mod:`.base`.

* :class:`HFDetector` -- any transformers object detector (DETR, Conditional/Deformable DETR, RT-DETR,
  YOLOS, ...) and the open-vocabulary OWL-ViT / OWLv2, as a :class:`~refground.features.base.ProposalSource`;
* :class:`HFBackbone` -- any transformers backbone (ResNet, ConvNeXt, Swin, ...) as a
  :class:`~refground.features.base.FeatureSource`;
* :class:`HFClip` -- CLIP (or a CLIP-like dual encoder) as a :class:`~refground.features.base.ClipEncoder`.

Models are only ever loaded from a folder written by ``save_pretrained`` (``local_files_only=True``): this
toolkit never downloads. transformers is imported inside the constructors, so importing this module is
cheap. A missing folder, or a folder holding another kind of model, is a one-line
:class:`~refground.errors.DataError` naming the folder.

Every adapter runs in eval mode without gradients, and an image's outputs never depend on the other images
of the call: images are batched only with images of the same size (so no padding enters a batch).
``identity()`` holds the sha256 of the weight files (``weights``) and of the configuration / processor /
tokenizer files (``config``), so a changed checkpoint or preprocessing makes older artifacts stale.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from refground import boxes as B
from refground.errors import DataError, UsageError
from refground.features.base import DENSE_STRIDES, Proposals

# Detectors whose classes are text queries given at construction (same outputs: logits over queries,
# pred_boxes, class_embeds).
OPEN_VOCABULARY = ("owlvit", "owlv2")
# Weight files, as save_pretrained writes them (single or sharded).
WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin", "tf_model*.h5", "flax_model*.msgpack")
# Everything else in the folder that changes outputs: architecture, label map, preprocessing, tokenizer.
CONFIG_GLOBS = ("*.json", "*.txt", "*.model")
# ImageNet statistics: the normalisation of a backbone folder that has no preprocessor_config.json.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------- helpers


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers' own progress bars and warnings (the library never prints), then restore."""
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def _folder_config(path: str | Path, what: str) -> tuple[Path, Any]:
    """``(folder, config)`` of a local transformers model folder, or a one-line DataError."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DataError(f"{folder}: {what} folder not found")
    if not (folder / "config.json").is_file():
        raise DataError(f"{folder} is not a transformers {what} (no config.json)")
    from transformers import AutoConfig

    try:
        with _quiet():
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{folder}/config.json: unreadable transformers config ({_first_line(exc)})") from None
    return folder, config


def _load(what: str, folder: Path, fn, *args, **kwargs):
    """Call a transformers loader; turn its failures (corrupt weights, missing files, a missing optional
    package) into one-line DataErrors naming the folder."""
    try:
        with _quiet():
            return fn(folder, *args, local_files_only=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 -- corrupt safetensors, missing files, missing packages, ...
        raise DataError(f"{folder}: cannot load the {what} ({type(exc).__name__}: {_first_line(exc)})") from None


def _digest(folder: Path, globs: Sequence[str], required: bool) -> str:
    """sha256 of the matching files: the file's own sha256 when there is one (what ``sha256sum`` prints),
    else the sha256 of the sorted ``name\\0digest`` lines."""
    from refground.cache.manifest import file_digest

    files = sorted({p for g in globs for p in folder.glob(g) if p.is_file()})
    if not files:
        if required:
            raise DataError(f"{folder}: no weight files (model.safetensors or pytorch_model.bin)")
        return ""
    if len(files) == 1:
        return file_digest(files[0])
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}\0{file_digest(p)}\n".encode())
    return h.hexdigest()


class _Identity:
    """Shared identity(): digests computed on first use (hashing GBs of weights takes a moment)."""

    kind = ""
    folder: Path
    model_type: str

    def _identity_params(self) -> dict[str, Any]:
        return {}

    def identity(self) -> dict[str, Any]:
        """JSON-able dict of everything the outputs depend on (see the module docstring)."""
        cached = getattr(self, "_identity_cache", None)
        if cached is None:
            cached = {"kind": self.kind, "model_type": self.model_type, "path": str(self.folder.resolve()),
                      "weights": _digest(self.folder, WEIGHT_GLOBS, True),
                      "config": _digest(self.folder, CONFIG_GLOBS, False)}
            self._identity_cache = cached
        return {**cached, **self._identity_params()}


def _same_size_groups(images: Sequence[np.ndarray], batch_size: int) -> list[list[int]]:
    """Indices of ``images`` in batches of at most ``batch_size`` images of one size, first-seen order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(tuple(im.shape), []).append(i)
    return [idx[k:k + batch_size] for idx in groups.values() for k in range(0, len(idx), batch_size)]


def _check_images(images: Sequence[np.ndarray]) -> None:
    for im in images:
        if not (isinstance(im, np.ndarray) and im.ndim == 3 and im.shape[2] == 3 and im.dtype == np.uint8
                and im.shape[0] > 0 and im.shape[1] > 0):
            shape = getattr(im, "shape", None)
            dtype = getattr(im, "dtype", type(im).__name__)
            raise ValueError(f"images must be uint8[H, W, 3] RGB arrays, got {dtype} of shape {shape}")


def _pooled(out: Any) -> torch.Tensor:
    """transformers 5 returns a model output with the projection in ``pooler_output``; 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# ------------------------------------------------------------------------------------------ detector


class HFDetector(_Identity):
    """A transformers object detector from a local folder as a ProposalSource.

    Args:
        path: folder written by ``save_pretrained`` holding the model and its image processor
            (``preprocessor_config.json``; for OWL-ViT/OWLv2 the processor with its tokenizer).
        score_threshold: proposals with score below this are dropped before NMS.
        nms_threshold: IoU threshold of the per-class NMS (:func:`refground.boxes.batched_nms`);
            1.0 keeps every box.
        class_names: the text queries of an open-vocabulary detector (OWL-ViT, OWLv2), e.g. the dataset's
            category names; not accepted for closed-set detectors, whose classes come from the config.
        batch_size: images per forward pass (only images of the same size share one).
        device: torch device to run on; outputs are CPU tensors.

    Class names of closed-set detectors are ``config.id2label`` in id order, *without* the labels named
    "N/A" or "" (COCO DETR checkpoints keep the 11 unused COCO ids as "N/A"): their columns are dropped, so
    ``labels`` index real categories only.

    Per proposal (one per decoder query / detection token / OWL patch):

    * ``class_scores``: DETR-style models with a no-object class (``logits`` has ``num_labels + 1``
      columns: DETR, YOLOS, Table Transformer) take the softmax over all columns and drop the no-object
      column, so a row holds P(object of class c) and sums to 1 - P(no object) -- the confidence the
      model was trained to give (a softmax without the no-object column would rate every empty query at
      least 1/C). Models trained with a sigmoid (focal) loss (Conditional/Deformable DETR, RT-DETR,
      OWL-ViT, OWLv2: ``num_labels`` columns) take the sigmoid of each logit.
    * ``scores`` = max of ``class_scores``, ``labels`` = its argmax.
    * ``boxes``: ``pred_boxes`` (normalised cxcywh) converted with :func:`refground.boxes.box_convert` and
      scaled to the original image (OWLv2 with padding: to the padded square of side max(H, W) that its
      processor resizes, so the scale is that side); clipped to the image, zero-area boxes dropped.
    * ``features``: the query's embedding -- the decoder's ``last_hidden_state`` (DETR family), the
      detection tokens' last hidden state (YOLOS), the per-box class embedding ``class_embeds`` (OWL-ViT,
      OWLv2: the vector compared with the text queries); None for a model without any of these.

    Then ``score >= score_threshold``, per-class NMS, sorted by decreasing score (ties: query order), at
    most ``max_proposals``.
    """

    kind = "hf-detector"

    def __init__(self, path: str | Path, score_threshold: float = 0.0, nms_threshold: float = 0.5,
                 class_names: Sequence[str] | None = None, batch_size: int = 8, device: str = "cpu") -> None:
        folder, config = _folder_config(path, "object detector")
        from transformers.models.auto import modeling_auto

        self.folder, self.model_type = folder, str(config.model_type)
        self.open_vocabulary = self.model_type in OPEN_VOCABULARY
        zero_shot = modeling_auto.MODEL_FOR_ZERO_SHOT_OBJECT_DETECTION_MAPPING_NAMES
        if self.model_type in zero_shot and not self.open_vocabulary:
            raise DataError(f"{folder}: {self.model_type} detectors are not supported (open-vocabulary detectors: "
                            f"{', '.join(OPEN_VOCABULARY)})")
        if not self.open_vocabulary and self.model_type not in modeling_auto.MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES:
            raise DataError(f"{folder} is not a transformers object detector (config model_type={self.model_type})")
        if not 0.0 <= nms_threshold <= 1.0:
            raise UsageError(f"nms_threshold must be in [0, 1], got {nms_threshold}")
        if batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {batch_size}")
        self.score_threshold, self.nms_threshold = float(score_threshold), float(nms_threshold)
        self.batch_size, self.device = int(batch_size), torch.device(device)

        import transformers

        if self.open_vocabulary:
            if not class_names:
                raise UsageError(f"{folder}: {self.model_type} is open-vocabulary: give class_names "
                                 "(the text queries, e.g. the dataset's category names)")
            names = [str(c) for c in class_names]
            if any(not c.strip() for c in names) or len(set(names)) != len(names):
                raise UsageError(f"class_names must be distinct non-empty strings, got {names}")
            self.class_names = names
            self._keep = torch.arange(len(names))
            self.processor = _load("processor", folder, transformers.AutoProcessor.from_pretrained)
            self.model = _load("detector", folder, transformers.AutoModelForZeroShotObjectDetection.from_pretrained)
            with _quiet():
                text = self.processor(text=[names], truncation=True, return_tensors="pt")
            self._text = {k: v for k, v in text.items() if k in ("input_ids", "attention_mask")}
            # OWLv2 pads each image to a square (bottom/right) before resizing: boxes are relative to it.
            self._square = bool(getattr(getattr(self.processor, "image_processor", None), "do_pad", False)) \
                and self.model_type == "owlv2"
        else:
            if class_names is not None:
                raise UsageError(f"{folder}: class_names only applies to open-vocabulary detectors "
                                 f"({', '.join(OPEN_VOCABULARY)}); {self.model_type} takes its classes from "
                                 "config.json")
            labels = [str(config.id2label.get(i, "")) for i in range(int(config.num_labels))]
            keep = [i for i, name in enumerate(labels) if name.strip() and name.strip().upper() != "N/A"]
            if not keep:
                raise DataError(f"{folder}/config.json: id2label has no class names (all N/A)")
            self.class_names = [labels[i] for i in keep]
            self._keep = torch.tensor(keep, dtype=torch.int64)
            self.processor = _load("image processor", folder, transformers.AutoImageProcessor.from_pretrained)
            self.model = _load("detector", folder, transformers.AutoModelForObjectDetection.from_pretrained)
            self._text = {}
            self._square = False
        try:  # fail here, not in the middle of an extraction, when the processor lacks a package
            with _quiet():
                self.processor(images=[np.zeros((8, 8, 3), dtype=np.uint8)], return_tensors="pt")
        except ImportError as exc:
            raise DataError(f"{folder}: the {self.model_type} image processor cannot run here "
                            f"({_first_line(exc)})") from None
        self.num_labels = int(config.num_labels) if not self.open_vocabulary else len(self.class_names)
        self._detection_tokens = getattr(config, "num_detection_tokens", None)  # YOLOS
        self.model.to(self.device).eval()

    def _identity_params(self) -> dict[str, Any]:
        out: dict[str, Any] = {"score_threshold": self.score_threshold, "nms_threshold": self.nms_threshold}
        if self.open_vocabulary:
            out["class_names"] = list(self.class_names)
        return out

    # ------------------------------------------------------------------------------------ inference
    def _forward(self, batch: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(class probabilities [B, Q, C], normalised cxcywh boxes [B, Q, 4], features [B, Q, D] or None)."""
        with _quiet():
            inputs = self.processor(images=batch, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        if self.open_vocabulary:
            n = len(batch)  # the model takes batch_size * num_queries rows of text
            inputs.update({k: v.repeat(n, 1).to(self.device) for k, v in self._text.items()})
        with torch.no_grad():
            out = self.model(**inputs)
        logits = out.logits.float()
        if logits.shape[-1] == self.num_labels + 1:  # softmax with a trailing no-object class
            probs = logits.softmax(-1)[..., :-1]
        else:
            probs = logits.sigmoid()
        probs = probs[..., self._keep.to(probs.device)]
        feats = None
        if self.open_vocabulary:
            feats = out.class_embeds
        elif getattr(out, "last_hidden_state", None) is not None:
            h = out.last_hidden_state
            if self._detection_tokens:  # YOLOS: the detection tokens close the sequence
                h = h[:, -int(self._detection_tokens):]
            feats = h if h.shape[1] == logits.shape[1] else None
        return probs.cpu(), out.pred_boxes.float().cpu(), (feats.float().cpu() if feats is not None else None)

    def _select(self, probs: torch.Tensor, rel: torch.Tensor, feats: torch.Tensor | None,
                height: int, width: int, max_proposals: int) -> Proposals:
        """One image: [Q, C] probabilities, [Q, 4] normalised cxcywh boxes -> Proposals."""
        ref_h, ref_w = (max(height, width),) * 2 if self._square else (height, width)
        scale = torch.tensor([ref_w, ref_h, ref_w, ref_h], dtype=torch.float32)
        boxes = B.clip_boxes_to_image(B.box_convert(rel, "cxcywh", "xyxy") * scale, (height, width))
        scores, labels = probs.max(-1)
        ok = torch.nonzero((B.box_area(boxes) > 0) & (scores >= self.score_threshold)).squeeze(1)
        keep = ok[B.batched_nms(boxes[ok], scores[ok], labels[ok], self.nms_threshold)][:max_proposals]
        return Proposals(boxes=boxes[keep].float().contiguous(), scores=scores[keep].float().contiguous(),
                         labels=labels[keep].long().contiguous(), class_scores=probs[keep].float().contiguous(),
                         features=feats[keep].float().contiguous() if feats is not None else None)

    def propose(self, images: list[np.ndarray], image_ids: list[int], max_proposals: int) -> list[Proposals]:
        """Per image, at most ``max_proposals`` proposals, best first (see the class docstring).

        images: uint8[H, W, 3] RGB, any sizes; image_ids: one per image (unused by the model: outputs depend
        on the pixels only). Boxes are float32 xyxy pixels of each original image.
        """
        if len(image_ids) != len(images):
            raise ValueError(f"{len(images)} images but {len(image_ids)} image ids")
        if max_proposals < 0:
            raise UsageError(f"max_proposals must be >= 0, got {max_proposals}")
        _check_images(images)
        out: list[Proposals | None] = [None] * len(images)
        for idx in _same_size_groups(images, self.batch_size):
            probs, rel, feats = self._forward([images[i] for i in idx])
            for j, i in enumerate(idx):
                h, w = images[i].shape[:2]
                out[i] = self._select(probs[j], rel[j], feats[j] if feats is not None else None, h, w,
                                      max_proposals)
        return out  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ backbone


class HFBackbone(_Identity):
    """A transformers backbone (``AutoBackbone`` family) from a local folder as a FeatureSource.

    Args:
        path: folder written by ``save_pretrained`` (a ``*Backbone`` model, or a classification /
            base checkpoint of a family that has one, e.g. ResNet, ConvNeXt, Swin).
        level_stride: stride of the feature map that region features are pooled from.
        pool: RoIAlign output size before the mean.
        max_side: region features only: an image whose longer side exceeds this is first downscaled to it
            (boxes scaled with it); None runs every image at its own size.
        batch_size: images per forward pass of :meth:`dense_maps`.
        device: torch device to run on; outputs are CPU tensors.

    Every stage of the backbone is requested (``out_features`` = all stages after the stem; a per-stage
    norm the checkpoint lacks starts at its identity init), and each map's stride is measured once with a
    probe forward pass (input side / map side). ``dense_channels`` lists the strides of
    :data:`~refground.features.base.DENSE_STRIDES` the backbone has (a ViT-like backbone with a single
    stride of 14 or 16 has fewer; missing strides are simply absent); where several stages share a
    stride, the deepest is used.

    Preprocessing: pixels / 255, normalised with ``image_mean``/``image_std`` of the folder's image
    processor (ImageNet statistics when the folder has none). No resize for region features, so boxes stay
    in original pixels: :func:`refground.boxes.roi_align` on the ``level_stride`` map with
    ``spatial_scale = 1 / level_stride``, ``aligned=True``, ``sampling_ratio=2``, ``pool x pool`` bins,
    then the mean over the bins: Tensor[K, C], C = ``feature_dim``. Dense maps use a bilinear
    (antialiased) resize to ``size x size``; a map larger than ``size // stride`` (``size`` not a multiple
    of the stride) is cropped to it at the bottom/right.
    """

    kind = "hf-backbone"

    def __init__(self, path: str | Path, level_stride: int = 16, pool: int = 7, max_side: int | None = None,
                 batch_size: int = 8, device: str = "cpu") -> None:
        folder, config = _folder_config(path, "backbone")
        from transformers.models.auto import modeling_auto

        self.folder, self.model_type = folder, str(config.model_type)
        class_name = modeling_auto.MODEL_FOR_BACKBONE_MAPPING_NAMES.get(self.model_type)
        stages = list(getattr(config, "stage_names", None) or [])
        if class_name is None or not stages:
            raise DataError(f"{folder} is not a transformers backbone (config model_type={self.model_type})")
        if pool < 1 or batch_size < 1 or (max_side is not None and max_side < 1):
            raise UsageError(f"pool, batch_size and max_side must be >= 1, got {pool}, {batch_size}, {max_side}")
        import transformers

        # AutoBackbone.from_pretrained asks the Hub whether the path is a repo (transformers 5.x), so the
        # concrete class is loaded directly.
        config.out_features = stages[1:] if len(stages) > 1 else stages
        cls = getattr(transformers, class_name)
        self.model = _load("backbone", folder, cls.from_pretrained, config=config).to(device).eval()
        self.device = torch.device(device)
        self.level_stride, self.pool, self.max_side = int(level_stride), int(pool), max_side
        self.batch_size = int(batch_size)

        mean, std, scale = IMAGENET_MEAN, IMAGENET_STD, 1 / 255
        if (folder / "preprocessor_config.json").is_file():
            proc = _load("image processor", folder, transformers.AutoImageProcessor.from_pretrained)
            if getattr(proc, "do_normalize", True) and getattr(proc, "image_mean", None) is not None:
                mean, std = tuple(proc.image_mean), tuple(proc.image_std)
            elif not getattr(proc, "do_normalize", True):
                mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
            if getattr(proc, "do_rescale", True):
                scale = float(getattr(proc, "rescale_factor", 1 / 255))
            else:
                scale = 1.0
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self._scale = scale

        # Measure each output's stride on a probe input: the model's own image size where it declares one
        # (position embeddings), else 64 px (cheap; a multiple of 32).
        side = getattr(config, "image_size", None)
        side = side if isinstance(side, int) and side % 32 == 0 else 64
        with torch.no_grad():
            maps = self.model(torch.zeros(1, 3, side, side, device=self.device)).feature_maps
        self._level: dict[int, int] = {}  # stride -> index into feature_maps (deepest wins)
        channels: dict[int, int] = {}
        for k, fm in enumerate(maps):
            stride = side / fm.shape[-1]
            if abs(stride - round(stride)) < 1e-6 and abs(side / fm.shape[-2] - stride) < 1e-6:
                self._level[int(round(stride))] = k
                channels[int(round(stride))] = int(fm.shape[1])
        if self.level_stride not in self._level:
            raise UsageError(f"{folder}: the backbone has no stride-{self.level_stride} feature map "
                             f"(strides: {sorted(self._level)})")
        self.strides = sorted(self._level)
        self.feature_dim = channels[self.level_stride]
        self.dense_channels = {s: channels[s] for s in DENSE_STRIDES if s in channels}

    def _identity_params(self) -> dict[str, Any]:
        return {"level_stride": self.level_stride, "pool": self.pool, "max_side": self.max_side}

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8-valued float [N, 3, H, W] -> normalised input."""
        return (x * self._scale - self._mean) / self._std

    @staticmethod
    def _tensor(im: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)[None].float()

    def region_features(self, images: list[np.ndarray], boxes: list[torch.Tensor]) -> list[torch.Tensor]:
        """Tensor[K_i, feature_dim] float32 per image; boxes: Tensor[K_i, 4] xyxy pixels of that image."""
        if len(images) != len(boxes):
            raise ValueError(f"{len(images)} images but {len(boxes)} box tensors")
        _check_images(images)
        out = []
        for im, bx in zip(images, boxes):
            bx = torch.as_tensor(bx, dtype=torch.float32).reshape(-1, 4)
            if len(bx) == 0:
                out.append(torch.zeros(0, self.feature_dim))
                continue
            x = self._tensor(im)
            h, w = im.shape[:2]
            if self.max_side is not None and max(h, w) > self.max_side:
                f = self.max_side / max(h, w)
                nh, nw = max(1, round(h * f)), max(1, round(w * f))
                x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
                bx = bx * torch.tensor([nw / w, nh / h, nw / w, nh / h])
            with torch.no_grad():
                fmap = self.model(self._normalise(x).to(self.device)).feature_maps[self._level[self.level_stride]]
            rois = B.roi_align(fmap.float(), [bx.to(fmap.device)], self.pool, spatial_scale=1.0 / self.level_stride,
                               sampling_ratio=2, aligned=True)
            out.append(rois.mean(dim=(2, 3)).cpu().contiguous())
        return out

    def dense_maps(self, images: list[np.ndarray], size: int) -> list[dict[int, torch.Tensor]]:
        """Per image ``{stride: Tensor[C_stride, size // stride, size // stride]}`` for the strides of
        ``dense_channels``, on the image resized to ``size x size``."""
        if size < max(self.dense_channels, default=1):
            raise UsageError(f"dense map size must be >= {max(self.dense_channels, default=1)}, got {size}")
        _check_images(images)
        out: list[dict[int, torch.Tensor]] = []
        for k in range(0, len(images), self.batch_size):
            x = torch.cat([F.interpolate(self._tensor(im), size=(size, size), mode="bilinear", align_corners=False,
                                         antialias=True) for im in images[k:k + self.batch_size]])
            with torch.no_grad():
                maps = self.model(self._normalise(x).to(self.device)).feature_maps
            per_stride = {}
            for s in self.dense_channels:
                fm, n = maps[self._level[s]].float(), size // s
                if fm.shape[-1] < n or fm.shape[-2] < n:
                    fm = F.interpolate(fm, size=(n, n), mode="bilinear", align_corners=False)
                per_stride[s] = fm[:, :, :n, :n].cpu()
            out.extend({s: per_stride[s][j].contiguous() for s in per_stride} for j in range(x.shape[0]))
        return out


# ---------------------------------------------------------------------------------------------- CLIP


class HFClip(_Identity):
    """CLIP (or a CLIP-like dual encoder with ``get_image_features``/``get_text_features``: SigLIP,
    ALIGN-style models) from a local folder as a ClipEncoder.

    Args:
        path: folder with the model and its processor (tokenizer + image processor).
        batch_size: images or texts per forward pass.
        device: torch device to run on; outputs are CPU tensors.

    Loaded with ``attn_implementation="eager"`` so :meth:`vision_attentions` can return attention maps.
    Images of any size go through the processor (resize + centre crop for CLIP); texts are padded per
    batch (SigLIP: to ``max_length``, as it was trained) and truncated to the text model's positions.
    Embeddings are the projected pooled outputs, L2-normalised float32; ``embed_dim`` is the projection dim.
    """

    kind = "hf-clip"

    def __init__(self, path: str | Path, batch_size: int = 32, device: str = "cpu") -> None:
        folder, config = _folder_config(path, "CLIP model")
        self.folder, self.model_type = folder, str(config.model_type)
        if getattr(config, "text_config", None) is None or getattr(config, "vision_config", None) is None:
            raise DataError(f"{folder} is not a transformers CLIP-like model (config model_type={self.model_type})")
        if batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {batch_size}")
        import transformers

        self.model = _load("CLIP model", folder, transformers.AutoModel.from_pretrained, attn_implementation="eager")
        if not (hasattr(self.model, "get_image_features") and hasattr(self.model, "get_text_features")):
            raise DataError(f"{folder} is not a transformers CLIP-like model (config model_type={self.model_type}: "
                            "no joint image-text embedding)")
        self.processor = _load("CLIP processor", folder, transformers.AutoProcessor.from_pretrained)
        if any(getattr(self.processor, part, None) is None for part in ("tokenizer", "image_processor")):
            raise DataError(f"{folder}: the CLIP processor needs a tokenizer and an image processor")
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.batch_size = int(batch_size)
        positions = getattr(config.text_config, "max_position_embeddings", None)
        model_max = getattr(self.processor.tokenizer, "model_max_length", None) or positions
        self.max_length = int(min(x for x in (positions, model_max) if x) if (positions or model_max) else 77)
        self._padding = "max_length" if self.model_type.startswith("siglip") else True
        dim = getattr(config, "projection_dim", None)
        self.embed_dim = int(dim) if dim else int(self.embed_texts(["a"]).shape[1])

    def _pixels(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        with _quiet():
            pixels = self.processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        return pixels.to(self.device)

    def embed_images(self, images: list[np.ndarray]) -> torch.Tensor:
        """Tensor[B, embed_dim] float32, L2-normalised; images uint8[H, W, 3] RGB of any sizes."""
        _check_images(images)
        parts = [torch.zeros(0, getattr(self, "embed_dim", 0))]
        for k in range(0, len(images), self.batch_size):
            with torch.no_grad():
                emb = _pooled(self.model.get_image_features(pixel_values=self._pixels(images[k:k + self.batch_size])))
            parts.append(F.normalize(emb.float(), dim=-1).cpu())
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def tokens(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``input_ids`` (and ``attention_mask`` where the tokenizer makes one) of ``texts`` on the model's
        device: padded per call (SigLIP: to ``max_length``), truncated to the text model's positions."""
        with _quiet():
            tok = self.processor.tokenizer(list(texts), padding=self._padding, truncation=True,
                                           max_length=self.max_length, return_tensors="pt")
        return {key: v.to(self.device) for key, v in tok.items() if key in ("input_ids", "attention_mask")}

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Tensor[B, embed_dim] float32, L2-normalised."""
        parts = [torch.zeros(0, getattr(self, "embed_dim", 0))]
        for k in range(0, len(texts), self.batch_size):
            tok = self.tokens(texts[k:k + self.batch_size])
            with torch.no_grad():
                emb = _pooled(self.model.get_text_features(**tok))
            parts.append(F.normalize(emb.float(), dim=-1).cpu())
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def vision_attentions(self, images: list[np.ndarray]) -> torch.Tensor:
        """The vision tower's last-layer attention: Tensor[B, heads, T, T] float32 (T = 1 + patches for
        CLIP: row 0 is the class token's attention over the class token and the patch grid)."""
        _check_images(images)
        vision = getattr(self.model, "vision_model", None)
        if vision is None:
            raise UsageError(f"{self.folder}: {self.model_type} has no vision_model to read attentions from")
        parts = []
        for k in range(0, len(images), self.batch_size):
            with torch.no_grad():
                out = vision(pixel_values=self._pixels(images[k:k + self.batch_size]), output_attentions=True)
            parts.append(out.attentions[-1].float().cpu())
        return torch.cat(parts) if parts else torch.zeros(0)
