"""What extraction needs from a model: proposals, region features, dense maps, CLIP embeddings.

Every model that feeds ``refground extract`` (the built-in detector, the transformers adapters, imported
MAttNet detections) implements one or more of the three protocols below, so the extraction loop, the
artifact layout and every later step are the same whatever produced the numbers.

Conventions for all of them:
- images are ``np.ndarray`` uint8[H, W, 3] RGB, one per image, sizes may differ within a batch;
- boxes are float32 xyxy in absolute pixels of *that* image (not of a resized copy);
- ``identity()`` returns a JSON-able dict of everything the output depends on (model kind, a digest of
  the weights, parameters): it goes into the artifact fingerprint, so a changed checkpoint or parameter
  makes the old artifact stale;
- methods are deterministic (eval mode, no dropout) and return CPU float32 tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from refground.errors import DataError

# Dense maps are written for these strides (the FPN levels LTS-style segmentation reads).
DENSE_STRIDES = (8, 16, 32)


@dataclass
class Proposals:
    """One image's proposals, sorted by decreasing ``scores``.

    boxes: Tensor[K, 4] float32 xyxy pixels; scores: Tensor[K] float32 confidence in [0, 1];
    labels: Tensor[K] int64 index into the source's ``class_names``; class_scores: Tensor[K, C] float32
    (per-class probabilities, C = len(class_names)); features: Tensor[K, D] float32 or None when the
    source has no region features of its own (then a FeatureSource computes them from the boxes);
    nms_scores: Tensor[K] float32 or None, the confidence the source's own NMS and thresholds ranked the
    boxes by, where that differs from ``scores`` (the built-in detector's detection set B: its first-pass
    confidence, before re-pooling).
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    class_scores: torch.Tensor
    features: torch.Tensor | None = None
    nms_scores: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


@runtime_checkable
class ProposalSource(Protocol):
    """Anything that proposes boxes: a detector, or detections imported from a file."""

    class_names: list[str]

    def identity(self) -> dict[str, Any]: ...

    def propose(self, images: list[np.ndarray], image_ids: list[int], max_proposals: int) -> list[Proposals]:
        """At most ``max_proposals`` proposals per image (after the source's own NMS), best first."""
        ...


@runtime_checkable
class DetectionSource(Protocol):
    """A proposal source that can also give the detection set B of VL-NMS: its boxes *before* its final
    NMS, filtered by confidence (the built-in detector; not transformers detectors or imported files)."""

    def propose_with_detections(self, images: list[np.ndarray], image_ids: list[int], max_proposals: int,
                                detection_threshold: float) -> tuple[list[Proposals], list[Proposals]]:
        """``(proposals, detections)`` per image: the proposals exactly as ``propose`` gives them, and the
        pre-NMS boxes with confidence >= ``detection_threshold`` with the same kind of features and class
        scores (``nms_scores`` set), best first."""
        ...


@runtime_checkable
class FeatureSource(Protocol):
    """Anything that turns (image, boxes) into region features, and an image into dense maps."""

    feature_dim: int
    # Channels of the dense map per stride in DENSE_STRIDES; empty when the source has no dense maps.
    dense_channels: dict[int, int]

    def identity(self) -> dict[str, Any]: ...

    def region_features(self, images: list[np.ndarray], boxes: list[torch.Tensor]) -> list[torch.Tensor]:
        """Tensor[K_i, feature_dim] float32 for each image's boxes (Tensor[K_i, 4] xyxy pixels)."""
        ...

    def dense_maps(self, images: list[np.ndarray], size: int) -> list[dict[int, torch.Tensor]]:
        """Per image, ``{stride: Tensor[C_stride, size // stride, size // stride]}`` computed on the image
        resized to ``size`` x ``size`` (fixed shapes, so maps of a dataset stack into one array)."""
        ...


@runtime_checkable
class ClipEncoder(Protocol):
    """A joint image-text embedding model. Embeddings are L2-normalised float32."""

    embed_dim: int

    def identity(self) -> dict[str, Any]: ...

    def embed_images(self, images: list[np.ndarray]) -> torch.Tensor:
        """Tensor[B, embed_dim] for whole images or crops (any sizes)."""
        ...

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Tensor[B, embed_dim]."""
        ...


def read_image(path: str | Path) -> np.ndarray:
    """An image file as uint8[H, W, 3] RGB (greyscale and RGBA are converted)."""
    from PIL import Image as PILImage

    try:
        with PILImage.open(path) as im:
            return np.array(im.convert("RGB"))  # writable: models may normalise in place
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable image ({exc})") from None
