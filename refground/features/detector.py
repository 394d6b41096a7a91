"""The built-in two-stage detector of the synthetic world (a small bottom-up-attention-style Faster R-CNN).

Stage one is an anchor-free dense head (FCOS / GFL style) on the stride-8 level of a small FPN: every cell
of the map proposes one box (``(input_size / 8)^2`` initial boxes per image, 1024 at 256 px), scored by a
quality-focal objectness; the best ``pre_nms_top_n`` go through NMS and the best ``post_nms_top_n`` become
RoIs. Stage two is a region head on RoIAlign features of the same level: two fully connected layers (the
second, "fc7", is the region feature vector that later stages consume) and, as bottom-up attention does on
Visual Genome, a category classifier (categories + background), attribute classifiers (here colour and
size), and class-agnostic box refinement. The confidence of a region is its largest non-background class
probability. Refined boxes go through a second, class-agnostic NMS; the kept boxes are pooled again so that
a proposal's features and class scores belong to exactly the box returned (``region_features`` of the same
boxes gives the same vectors). :meth:`BuiltinDetector.propose_first_stage` gives the first stage's boxes
instead (after the proposal NMS, unrefined, by objectness: the RPN proposals ReIR uses), classified and
pooled the same way.

Images of any size are resized (aspect kept) so that the longer side is ``input_size`` and padded to a
square; boxes are mapped back to the pixels of the original image. All box math is
:mod:`refground.boxes`.

A trained detector is a run folder of ``refground train detector`` (:mod:`refground.train` layout): its
weights are ``model.pt`` and its :class:`DetectorConfig` is ``config.json``; nothing else in the folder
(``checkpoint.pt`` is only for resuming training) is read to load it.

Public API: :class:`DetectorConfig`, :class:`DetectorModel`, :class:`BuiltinDetector`,
:func:`prepare_images`, :func:`normalize_images`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from refground.boxes import BoxCoder, clip_boxes_to_image, nms, remove_small_boxes, roi_align
from refground.errors import ArtifactError, DataError
from refground.features.base import DENSE_STRIDES, Proposals
from refground.train import CONFIG_FILE, MODEL_FILE, load_weights, read_json

KIND = "builtin-detector"

# Fixed input normalisation (trained from scratch, so any fixed affine map works; this one puts uint8
# pixels roughly in [-2, 2]). Padding is 0 after normalisation, i.e. mid-grey.
PIXEL_MEAN = 127.5
PIXEL_STD = 64.0


def _default_classes() -> list[str]:
    from refground.data.synth.world import CATEGORIES
    return list(CATEGORIES)


def _default_colors() -> list[str]:
    from refground.data.synth.world import COLOR_NAMES
    return list(COLOR_NAMES)


def _default_sizes() -> list[str]:
    from refground.data.synth.world import SIZES
    return list(SIZES)


@dataclass
class DetectorConfig:
    """Every hyper-parameter of the detector and its training (saved as ``config.json`` in the run folder).

    Architecture and inference parameters are part of the model's identity; training parameters describe how
    the weights were made (they go into the run's fingerprint too).
    """

    # -------------------------------------------------------------- vocabulary (heads' output spaces)
    class_names: list[str] = field(default_factory=_default_classes)
    color_names: list[str] = field(default_factory=_default_colors)
    size_names: list[str] = field(default_factory=_default_sizes)
    # ------------------------------------------------------------------------------- architecture
    input_size: int = 256  # longer image side fed to the network (images are resized, aspect kept)
    widths: list[int] = field(default_factory=lambda: [32, 64, 96, 128])  # stage widths at strides 4, 8, 16, 32
    depths: list[int] = field(default_factory=lambda: [1, 1, 1, 1])  # extra 3x3 convs per stage
    fpn_channels: int = 64  # channels of the FPN levels (the dense maps) at strides 8, 16, 32
    head_channels: int = 64  # hidden channels of the dense (proposal) head
    roi_size: int = 5  # RoIAlign output side on the stride-8 level (objects span 1.5-7 cells)
    roi_sampling_ratio: int = 1  # bilinear samples per RoI bin and axis (bins are under one cell)
    feature_dim: int = 256  # fc6 / fc7 width; fc7 is the region feature vector
    box_weights: list[float] = field(default_factory=lambda: [10.0, 10.0, 5.0, 5.0])  # R-CNN delta weights
    # ---------------------------------------------------------------------------------- inference
    pre_nms_top_n: int = 600  # dense boxes (by objectness) that enter the first NMS
    proposal_nms: float = 0.7  # IoU threshold of the first (dense) NMS
    # RoIs per image that the region head scores. 150 (was 300): on the default world's val split the same
    # referent recall (@10 87.4 vs 87.3, @100 99.2 both) and category accuracy, 82 final proposals per image on
    # average instead of 100, and inference 1.5x as fast (the region head on the RoIs was most of it).
    post_nms_top_n: int = 150
    final_nms: float = 0.5  # IoU threshold of the class-agnostic NMS on refined boxes
    min_box_size: float = 2.0  # refined boxes smaller than this (pixels of the network input) are dropped
    inference_batch: int = 16  # images per forward pass at inference
    # ----------------------------------------------------------------------------------- training
    epochs: int = 3  # about 3 minutes on 2 CPU cores for 3500 images of 256 px
    batch_size: int = 8  # smaller batches (more steps in the same time) learn the categories faster
    lr: float = 2e-3  # peak AdamW learning rate (linear warm-up, cosine decay to 0)
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    center_radius: float = 1.5  # dense-head positives: cells within this many strides of a box centre
    rois_per_image: int = 64  # RoIs sampled per image for the region head
    fg_fraction: float = 0.5  # at most this share of sampled RoIs are foreground (IoU >= 0.5)
    train_pre_nms_top_n: int = 200  # dense boxes (by objectness) that enter the NMS of the RoI sampler
    train_proposals: int = 48  # dense proposals (after NMS) per image offered to the RoI sampler
    jitter_per_object: int = 2  # jittered copies of each ground-truth box offered to the RoI sampler
    flip: bool = True  # random horizontal flips
    # Backbone and FPN under CPU autocast while training: "bfloat16", "float32", or "auto" (bfloat16 where the
    # CPU has native bfloat16 instructions, see refground.features.detector_train.training_precision).
    train_precision: str = "auto"

    def __post_init__(self) -> None:
        if len(self.widths) != 4 or len(self.depths) != 4:
            raise ValueError(f"widths and depths must give 4 stages (strides 4, 8, 16, 32), got {self.widths}, "
                             f"{self.depths}")
        if self.input_size < 32:
            raise ValueError(f"input_size must be at least 32, got {self.input_size}")
        if self.train_precision not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"train_precision must be auto, float32 or bfloat16, got {self.train_precision!r}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DetectorConfig":
        """Build from a dict (unknown keys are an error, missing keys take the defaults)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown detector config keys: {', '.join(unknown)}")
        return cls(**d)

    def architecture(self) -> dict[str, Any]:
        """The parameters that define the network and its outputs: not how it was trained (that is in the
        weights' digest), nor the inference batch size."""
        other = {"epochs", "batch_size", "lr", "weight_decay", "warmup_steps", "center_radius", "rois_per_image",
                 "fg_fraction", "train_pre_nms_top_n", "train_proposals", "jitter_per_object", "flip",
                 "inference_batch"}
        return {k: v for k, v in self.to_dict().items() if k not in other}


# ------------------------------------------------------------------------------------------ images


def normalize_images(x: Tensor) -> Tensor:
    """uint8 or float pixels Tensor[B, 3, H, W] in [0, 255] -> float32 network input."""
    return (x.float() - PIXEL_MEAN) / PIXEL_STD


def _padded_side(input_size: int) -> int:
    return int(math.ceil(input_size / 32) * 32)


def prepare_images(images: list[np.ndarray], input_size: int) -> tuple[Tensor, Tensor, list[tuple[int, int]]]:
    """Resize (aspect kept, longer side ``input_size``) and pad a list of uint8[H, W, 3] images.

    Returns (batch Tensor[B, 3, S, S] normalised float32 with S = input_size rounded up to a multiple of 32,
    scales Tensor[B, 2] (sx, sy): network-input pixels per original pixel, sizes [(h, w)] of the resized
    images inside the padded batch).
    """
    side = _padded_side(input_size)
    batch = torch.zeros((len(images), 3, side, side), dtype=torch.float32)
    scales = torch.ones((len(images), 2), dtype=torch.float32)
    sizes = []
    for i, img in enumerate(images):
        if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3:
            raise DataError(f"image {i}: expected uint8[H, W, 3], got {getattr(img, 'shape', type(img))}")
        h, w = img.shape[:2]
        t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
        s = input_size / max(h, w)
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        if (nh, nw) != (h, w):
            t = F.interpolate(t, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        batch[i, :, :nh, :nw] = normalize_images(t[0])
        scales[i, 0], scales[i, 1] = nw / w, nh / h
        sizes.append((nh, nw))
    return batch, scales, sizes


# ------------------------------------------------------------------------------------------- model


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Backbone(nn.Module):
    """A 4x4 stride-4 "patchify" stem (no full-resolution layers: they cost most on a CPU and the smallest
    objects are ~10 px), then stride-2 3x3 convs to strides 8, 16, 32; ``depths[k]`` extra 3x3 convs per
    stage."""

    def __init__(self, widths: list[int], depths: list[int]) -> None:
        super().__init__()
        stem = nn.Sequential(nn.Conv2d(3, widths[0], 4, 4, 0, bias=False), nn.BatchNorm2d(widths[0]),
                             nn.ReLU(inplace=True))
        stages, cin = [], widths[0]
        for k, (w, d) in enumerate(zip(widths, depths)):
            layers = [stem] if k == 0 else [_conv_bn(cin, w, 2)]
            layers += [_conv_bn(w, w) for _ in range(d)]
            stages.append(nn.Sequential(*layers))
            cin = w
        self.stages = nn.ModuleList(stages)

    def forward(self, x: Tensor) -> dict[int, Tensor]:
        out = {}
        for k, stage in enumerate(self.stages):
            x = stage(x)
            out[4 * 2 ** k] = x
        return {s: out[s] for s in DENSE_STRIDES}


class FPN(nn.Module):
    """Top-down pathway over strides 8, 16, 32: lateral 1x1 convs and nearest upsampling; a 3x3 conv (+ BN,
    ReLU) smooths the stride-8 level, the one both heads read. The coarser levels stay the plain top-down
    sums: they are trained through the stride-8 level, and a smoothing conv on them would get no gradient."""

    def __init__(self, in_channels: list[int], channels: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.smooth = _conv_bn(channels, channels)

    def forward(self, feats: dict[int, Tensor]) -> dict[int, Tensor]:
        strides = sorted(feats)
        out: dict[int, Tensor] = {}
        top = None
        for k in reversed(range(len(strides))):
            s = strides[k]
            lat = self.lateral[k](feats[s])
            if top is not None:
                lat = lat + F.interpolate(top, size=lat.shape[-2:], mode="nearest")
            top = lat
            out[s] = lat
        out[strides[0]] = self.smooth(out[strides[0]])
        return out


class DenseHead(nn.Module):
    """One box per cell of the stride-8 level: objectness logit and (l, t, r, b) distances from the cell
    centre, ``exp(t) * 2 * stride`` pixels."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        # 1x1 tower: the FPN's 3x3 smoothing already mixes neighbours, and a 3x3 conv at stride 8 is the most
        # expensive layer of this network on a CPU.
        self.tower = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True))
        self.objectness = nn.Conv2d(hidden, 1, 1)
        self.ltrb = nn.Conv2d(hidden, 4, 1)
        # Start with a low objectness everywhere (RetinaNet prior 0.01) so the many negatives do not swamp
        # the first steps.
        nn.init.constant_(self.objectness.bias, -math.log(99.0))
        nn.init.normal_(self.ltrb.weight, std=0.01)
        nn.init.zeros_(self.ltrb.bias)

    def forward(self, p: Tensor) -> tuple[Tensor, Tensor]:
        """p: Tensor[B, C, H, W] -> (logits Tensor[B, H*W], log-distances Tensor[B, H*W, 4])."""
        h = self.tower(p)
        logits = self.objectness(h).flatten(1)
        ltrb = self.ltrb(h).flatten(2).transpose(1, 2)
        return logits, ltrb


class RegionHead(nn.Module):
    """RoIAlign -> fc6 -> fc7 (the region feature) -> category (+ background), colour, size, box deltas.

    fc6 also sees the box's width, height and sqrt(area) relative to the input side: RoIAlign normalises the
    scale away, and size is one of the attributes expressions use.
    """

    GEOMETRY = 3

    def __init__(self, channels: int, roi_size: int, dim: int, classes: int, colors: int, sizes: int) -> None:
        super().__init__()
        self.fc6 = nn.Linear(channels * roi_size * roi_size + self.GEOMETRY, dim)
        self.fc7 = nn.Linear(dim, dim)
        self.cls = nn.Linear(dim, classes + 1)  # index 0 = background
        self.color = nn.Linear(dim, colors)
        self.size = nn.Linear(dim, sizes)
        self.box = nn.Linear(dim, 4)
        nn.init.normal_(self.box.weight, std=0.001)
        nn.init.zeros_(self.box.bias)

    def forward(self, pooled: Tensor, geometry: Tensor) -> dict[str, Tensor]:
        x = torch.cat([pooled.flatten(1), geometry], dim=1)
        x = F.relu(self.fc6(x), inplace=True)
        feat = F.relu(self.fc7(x), inplace=True)
        return {"feature": feat, "cls": self.cls(feat), "color": self.color(feat), "size": self.size(feat),
                "deltas": self.box(feat)}


class DetectorModel(nn.Module):
    """Backbone + FPN + dense proposal head + region head. Boxes are in network-input pixels."""

    STRIDE = 8  # the level the dense head and RoIAlign work on

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.backbone = Backbone(list(c.widths), list(c.depths))
        self.fpn = FPN(list(c.widths[1:]), c.fpn_channels)
        self.dense_head = DenseHead(c.fpn_channels, c.head_channels)
        self.region_head = RegionHead(c.fpn_channels, c.roi_size, c.feature_dim, c.num_classes,
                                      len(c.color_names), len(c.size_names))
        self.box_coder = BoxCoder(c.box_weights)

    # ---------------------------------------------------------------------------------- pieces
    def maps(self, x: Tensor) -> dict[int, Tensor]:
        """x: Tensor[B, 3, S, S] normalised -> FPN levels {8, 16, 32: Tensor[B, C, S/stride, S/stride]}."""
        return self.fpn(self.backbone(x))

    def locations(self, p: Tensor) -> Tensor:
        """Centres (x, y) of the cells of a stride-8 map, Tensor[H*W, 2] in input pixels (row-major)."""
        h, w = p.shape[-2:]
        ys = (torch.arange(h, dtype=torch.float32) + 0.5) * self.STRIDE
        xs = (torch.arange(w, dtype=torch.float32) + 0.5) * self.STRIDE
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)

    def dense(self, p: Tensor) -> tuple[Tensor, Tensor]:
        """Dense head on the stride-8 map: (logits Tensor[B, L], boxes Tensor[B, L, 4] xyxy input pixels)."""
        logits, ltrb = self.dense_head(p)
        loc = self.locations(p)
        dist = torch.exp(ltrb.clamp(max=6.0)) * (2.0 * self.STRIDE)
        boxes = torch.cat([loc - dist[..., :2], loc + dist[..., 2:]], dim=-1)
        return logits, boxes

    def region(self, p: Tensor, rois: Tensor) -> dict[str, Tensor]:
        """Region head on RoIs Tensor[K, 5] (batch index, x1, y1, x2, y2 in input pixels) of the stride-8 map."""
        c = self.config
        pooled = roi_align(p, rois, c.roi_size, spatial_scale=1.0 / self.STRIDE,
                           sampling_ratio=c.roi_sampling_ratio, aligned=True)
        # Sizes relative to the input side, i.e. to the longer side of the original image.
        wh = (rois[:, 3:5] - rois[:, 1:3]).clamp(min=0) / float(c.input_size)
        geometry = torch.cat([wh, (wh[:, :1] * wh[:, 1:]).sqrt()], dim=1)
        return self.region_head(pooled, geometry)

    def refine(self, deltas: Tensor, rois: Tensor) -> Tensor:
        """Apply region-head deltas Tensor[K, 4] to rois Tensor[K, 5] -> boxes Tensor[K, 4]."""
        return self.box_coder.decode(deltas, rois[:, 1:])

    # ------------------------------------------------------------------------------ inference
    @torch.no_grad()
    def first_stage(self, p: Tensor, sizes: list[tuple[int, int]], max_keep: int | None = None
                    ) -> list[tuple[Tensor, Tensor]]:
        """Stage one on a batch's stride-8 map p Tensor[B, C, H, W]: the RoIs that :meth:`detect` gives the
        region head.

        Per image, the dense boxes clipped to the image's content ``sizes[b]`` (h, w), the best
        ``pre_nms_top_n`` by objectness, boxes under ``min_box_size`` removed, then the proposal NMS
        (``proposal_nms``) keeping at most ``post_nms_top_n`` (and at most ``max_keep``, i.e. the first
        ``max_keep`` of them). Returns per image ``(boxes Tensor[R, 4] xyxy input pixels, objectness
        Tensor[R])``, ordered by decreasing objectness (ties: the NMS's stable order).
        """
        c = self.config
        limit = c.post_nms_top_n if max_keep is None else min(c.post_nms_top_n, max(0, int(max_keep)))
        logits, boxes = self.dense(p)
        scores = logits.sigmoid()
        out = []
        for b in range(p.shape[0]):
            bx = clip_boxes_to_image(boxes[b], sizes[b])
            k = min(c.pre_nms_top_n, bx.shape[0])
            top = scores[b].topk(k).indices
            bx, sc = bx[top], scores[b][top]
            ok = remove_small_boxes(bx, c.min_box_size)
            bx, sc = bx[ok], sc[ok]
            # nms(max_keep=k) is exactly nms(...)[:k]: a smaller limit takes the first RoIs of detect's.
            keep = nms(bx, sc, c.proposal_nms, max_keep=limit) if limit > 0 else torch.zeros(0, dtype=torch.int64)
            out.append((bx[keep], sc[keep]))
        return out

    @torch.no_grad()
    def detect(self, p: Tensor, sizes: list[tuple[int, int]], max_proposals: int,
               detection_threshold: float | None = None) -> list[dict[str, Tensor]]:
        """Two-stage inference on a batch's stride-8 map p Tensor[B, C, H, W].

        sizes: (h, w) of each image's content in the padded input. Returns per image the final boxes
        ``"boxes"`` Tensor[K, 4] (input pixels, clipped, after the class-agnostic NMS, ordered by first-pass
        confidence, K <= max_proposals) and their first-pass confidences ``"scores"`` Tensor[K]. The caller
        re-pools them for features and scores.

        With ``detection_threshold`` (VL-NMS's delta) each result also describes the detection set B: the
        refined boxes (clipped, small ones removed) *before* the final NMS whose first-pass confidence is
        >= the threshold, best first (stable), at most ``post_nms_top_n``. So that a box in both sets is
        pooled once, both are given as rows of ``"union_boxes"`` Tensor[U, 4] (the final boxes first, in
        order, then the other boxes of B): ``"final_index"`` LongTensor[K] (= arange(K)), ``"det_index"``
        LongTensor[P] and ``"det_scores"`` Tensor[P] (first-pass confidences of B, non-increasing).
        """
        c = self.config
        rois, per_image = [], []
        for b, (bx, _) in enumerate(self.first_stage(p, sizes)):
            rois.append(torch.cat([torch.full((bx.shape[0], 1), float(b)), bx], dim=1))
            per_image.append(bx.shape[0])
        rois_t = torch.cat(rois) if rois else torch.zeros((0, 5))
        out = self.region(p, rois_t)
        prob = out["cls"].softmax(dim=1)
        conf = prob[:, 1:].max(dim=1).values
        refined = self.refine(out["deltas"], rois_t)
        results = []
        start = 0
        for b, n in enumerate(per_image):
            bx = clip_boxes_to_image(refined[start:start + n], sizes[b])
            sc = conf[start:start + n]
            start += n
            ok = remove_small_boxes(bx, c.min_box_size)
            bx, sc = bx[ok], sc[ok]
            keep = nms(bx, sc, c.final_nms, max_keep=max_proposals)
            r = {"boxes": bx[keep], "scores": sc[keep]}
            if detection_threshold is not None:
                det = torch.nonzero(sc >= detection_threshold).flatten()
                det = det[torch.sort(sc[det], descending=True, stable=True).indices][: c.post_nms_top_n]
                union = torch.cat([keep, det[~torch.isin(det, keep)]])
                pos = torch.full((bx.shape[0],), -1, dtype=torch.int64)
                pos[union] = torch.arange(union.shape[0])
                r.update(union_boxes=bx[union], final_index=torch.arange(keep.shape[0]), det_index=pos[det],
                         det_scores=sc[det])
            results.append(r)
        return results


# ---------------------------------------------------------------------------------------- adapter


def file_sha256(path: str | Path) -> str:
    """sha256 hex of a file's bytes (:func:`refground.cache.file_digest`, the one definition)."""
    from refground.cache.manifest import file_digest

    return file_digest(path)


def resolve_run(path: str | Path) -> Path:
    """A detector run folder, or a file in one (e.g. its ``model.pt``) -> the folder, which must hold the
    weights ``model.pt`` and the config ``config.json``; else a one-line ArtifactError."""
    path = Path(path)
    run = path if path.is_dir() else path.parent
    if not (run / MODEL_FILE).is_file() or not (run / CONFIG_FILE).is_file():
        raise ArtifactError(f"{run}: no trained detector here ({MODEL_FILE} and {CONFIG_FILE}); "
                            "run `refground train detector`")
    return run


class BuiltinDetector:
    """The trained detector as a :class:`~refground.features.base.ProposalSource` and
    :class:`~refground.features.base.FeatureSource`.

    ``Proposals.class_scores`` are the softmax probabilities of the object classes with the background
    column dropped and *not* renormalised, so ``scores == class_scores.max(1)`` (the Faster R-CNN /
    bottom-up-attention confidence) and ``1 - class_scores.sum(1)`` is the background probability.

    The backbone output of the last batch is cached (keyed on the identity of the image arrays, which the
    cache holds on to so that their ids cannot be reused), so ``propose``, ``region_features`` and
    ``dense_maps`` on the same list of images run the backbone once.
    """

    def __init__(self, model: DetectorModel, weights_sha256: str = "") -> None:
        self.model = model.eval()
        self.config = model.config
        self.weights_sha256 = weights_sha256
        self.class_names = list(self.config.class_names)
        self.color_names = list(self.config.color_names)
        self.size_names = list(self.config.size_names)
        self.feature_dim = int(self.config.feature_dim)
        self.dense_channels = {s: int(self.config.fpn_channels) for s in DENSE_STRIDES}
        self._cache_key: tuple | None = None
        self._cache_images: list[np.ndarray] = []
        self._cache: tuple[dict[int, Tensor], Tensor, list[tuple[int, int]]] | None = None

    @classmethod
    def load(cls, path: str | Path) -> "BuiltinDetector":
        """From a run folder (``<cache>/<dataset>/runs/detector/<name>/``, or a file in it): the model of its
        ``config.json`` with the weights of its ``model.pt`` (see :func:`resolve_run`)."""
        run = resolve_run(path)
        remedy = "re-run `refground train detector --force`"
        cfg = read_json(run / CONFIG_FILE)
        if not isinstance(cfg, dict):
            raise ArtifactError(f"{run / CONFIG_FILE}: unreadable detector config; {remedy}")
        try:
            state = load_weights(run / MODEL_FILE, remedy=f"refground train detector --run {run.name} --force")
        except ArtifactError:  # load_weights names the file and the repair already
            raise
        except Exception as exc:  # unpickling errors come in many types
            first = (str(exc).splitlines() or [""])[0]
            raise ArtifactError(f"{run / MODEL_FILE}: unreadable weights ({type(exc).__name__}: {first}); "
                                f"{remedy}") from None
        try:
            model = DetectorModel(DetectorConfig.from_dict(cfg))
            model.load_state_dict(state)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ArtifactError(f"{run}: weights or config do not fit this version of the detector "
                                f"({str(exc).splitlines()[0]}); {remedy}") from None
        return cls(model, file_sha256(run / MODEL_FILE))

    def identity(self) -> dict[str, Any]:
        return {"kind": KIND, "weights": self.weights_sha256, "config": self.config.architecture()}

    # ---------------------------------------------------------------------------------- backbone
    def _maps(self, images: list[np.ndarray]) -> tuple[dict[int, Tensor], Tensor, list[tuple[int, int]]]:
        """FPN maps of the whole list (computed in chunks of ``inference_batch``), cached for the last list."""
        key = tuple(id(im) for im in images)
        if self._cache is not None and key == self._cache_key:
            return self._cache
        self._cache, self._cache_key, self._cache_images = None, None, []
        batch, scales, sizes = prepare_images(images, self.config.input_size)
        self._cache = (self._run_maps(batch), scales, sizes)
        self._cache_key, self._cache_images = key, list(images)
        return self._cache

    def _run_maps(self, batch: Tensor) -> dict[int, Tensor]:
        """FPN levels of a normalised batch Tensor[B, 3, S, S], in chunks of ``inference_batch`` images."""
        chunk = max(1, self.config.inference_batch)
        parts: dict[int, list[Tensor]] = {s: [] for s in DENSE_STRIDES}
        with torch.no_grad():
            for s0 in range(0, batch.shape[0], chunk):
                m = self.model.maps(batch[s0:s0 + chunk])
                for s in DENSE_STRIDES:
                    parts[s].append(m[s])
        empty = torch.zeros((0, self.config.fpn_channels, 1, 1))
        return {s: torch.cat(v) if v else empty for s, v in parts.items()}

    def _pool(self, p: Tensor, boxes: list[Tensor], scales: Tensor) -> dict[str, Tensor]:
        """Region head on per-image boxes in original pixels (mapped to input pixels by ``scales``)."""
        rois = []
        for b, bx in enumerate(boxes):
            bx = torch.as_tensor(bx, dtype=torch.float32).reshape(-1, 4)
            s = scales[b].repeat(2)  # (sx, sy, sx, sy)
            rois.append(torch.cat([torch.full((bx.shape[0], 1), float(b)), bx * s], dim=1))
        rois_t = torch.cat(rois) if rois else torch.zeros((0, 5))
        with torch.no_grad():
            return self.model.region(p, rois_t)

    # ------------------------------------------------------------------------------- protocols
    def propose(self, images: list[np.ndarray], image_ids: list[int], max_proposals: int) -> list[Proposals]:
        """At most ``max_proposals`` proposals per image after NMS, sorted by decreasing confidence.

        boxes are xyxy pixels of each original image; features are the fc7 vectors of exactly these boxes.
        """
        return self._propose(images, image_ids, max_proposals, None)[0]

    def propose_with_detections(self, images: list[np.ndarray], image_ids: list[int], max_proposals: int,
                                detection_threshold: float = 0.05) -> tuple[list[Proposals], list[Proposals]]:
        """``(proposals, detections)`` per image: the proposals are exactly :meth:`propose`'s; the detections
        are VL-NMS's set B, the refined boxes *before* the final class-agnostic NMS whose first-pass
        confidence (the score that NMS uses) is >= ``detection_threshold``, at most ``post_nms_top_n``.

        Both are re-pooled the same way (one RoIAlign + region-head call per inference batch over the union
        of the two sets, so a box in both gets the same vectors) and sorted by decreasing re-pooled score
        (stable: ties keep the first-pass order). ``detections.scores`` are re-pooled (like the proposals'),
        so a few (about 0.5% on the default world) fall below the threshold, which applies to the first-pass
        confidence; that one is ``detections.nms_scores`` (always >= the threshold). Because B holds every
        pre-NMS box at or above the threshold, the class-agnostic NMS of B by ``nms_scores`` keeps exactly
        the final proposals whose first-pass confidence is >= the threshold.
        """
        if not 0.0 < float(detection_threshold) < 1.0:
            raise ValueError(f"detection_threshold must be in (0, 1), got {detection_threshold}")
        props, dets, _ = self._propose(images, image_ids, max_proposals, float(detection_threshold))
        assert dets is not None
        return props, dets

    @staticmethod
    def _sorted(bx: Tensor, cs: Tensor, feat: Tensor, first: Tensor | None = None) -> Proposals:
        """Proposals of boxes with re-pooled class scores and features, best first (stable sort);
        ``first``: the first-pass confidences, kept as ``nms_scores``."""
        n = bx.shape[0]
        scores, labels = cs.max(dim=1) if n else (cs.new_zeros(0), torch.zeros(0, dtype=torch.int64))
        # Stable sort: ties keep the NMS order.
        order = torch.sort(scores, descending=True, stable=True).indices
        return Proposals(boxes=bx[order].contiguous(), scores=scores[order].contiguous(),
                         labels=labels[order].contiguous(), class_scores=cs[order].contiguous(),
                         features=feat[order].contiguous(),
                         nms_scores=None if first is None else first[order].contiguous())

    @staticmethod
    def _first_stage(bx: Tensor, cs: Tensor, feat: Tensor, objectness: Tensor) -> Proposals:
        """Proposals of first-stage boxes with their pooled class scores and features, kept in the first
        stage's order (``scores`` = objectness, non-increasing)."""
        labels = cs.max(dim=1).indices if bx.shape[0] else torch.zeros(0, dtype=torch.int64)
        return Proposals(boxes=bx.contiguous(), scores=objectness.float().contiguous(), labels=labels.contiguous(),
                         class_scores=cs.contiguous(), features=feat.contiguous())

    def propose_pooled(self, images: list[np.ndarray], image_ids: list[int], max_proposals: int,
                       boxes: list[Tensor], detection_threshold: float | None = None
                       ) -> tuple[list[Proposals], list[Proposals] | None, list[Tensor]]:
        """:meth:`propose` (or :meth:`propose_with_detections` with a threshold) and :meth:`region_features`
        of ``boxes`` (per image Tensor[K_i, 4] xyxy original pixels) in one pass: the given boxes are pooled
        in the same region-head call as the proposals, so extraction runs the head once per batch instead of
        twice. Returns ``(proposals, detections or None, features Tensor[K_i, feature_dim] per image)``."""
        if len(boxes) != len(images):
            raise ValueError(f"{len(images)} images but {len(boxes)} box lists")
        props, dets, heads = self._propose(images, image_ids, max_proposals, detection_threshold, boxes)
        return props, dets, [h["feature"].contiguous() for h in heads]

    def propose_classified(self, images: list[np.ndarray], image_ids: list[int], max_proposals: int,
                           boxes: list[Tensor]) -> tuple[list[Proposals], list[dict[str, Tensor]]]:
        """:meth:`propose` and :meth:`classify` of ``boxes`` in one pass (see :meth:`propose_pooled`)."""
        if len(boxes) != len(images):
            raise ValueError(f"{len(images)} images but {len(boxes)} box lists")
        props, _, heads = self._propose(images, image_ids, max_proposals, None, boxes)
        return props, [self._probabilities(h) for h in heads]

    def propose_first_stage(self, images: list[np.ndarray], image_ids: list[int],
                            max_proposals: int) -> list[Proposals]:
        """The first stage's proposals (ReIR's RPN proposals): per image the dense boxes after the proposal
        NMS, not refined by the region head (:meth:`DetectorModel.first_stage`: the first ``max_proposals``
        of the RoIs that :meth:`propose` refines, so at most ``min(max_proposals, post_nms_top_n)``).

        boxes: Tensor[K, 4] xyxy pixels of each original image (clipped to it); scores: the first-stage
        objectness (sigmoid), non-increasing (the proposals keep the first stage's order, ties as its NMS
        ordered them); class_scores / labels: the region head's classification of exactly these boxes
        (object classes, background dropped, not renormalised, as for :meth:`propose`; labels = argmax);
        features: their fc7 vectors, pooled as :meth:`propose` pools (:meth:`region_features` of the same
        boxes gives the same vectors). ``nms_scores`` is None: ``scores`` is what the NMS ranked by.
        """
        return self._propose(images, image_ids, max_proposals, None, first_stage=True)[0]

    def propose_first_stage_pooled(self, images: list[np.ndarray], image_ids: list[int], max_proposals: int,
                                   boxes: list[Tensor]) -> tuple[list[Proposals], list[Tensor]]:
        """:meth:`propose_first_stage` and :meth:`region_features` of ``boxes`` (per image Tensor[K_i, 4] xyxy
        original pixels) in one region-head pass (see :meth:`propose_pooled`). Returns ``(proposals,
        features Tensor[K_i, feature_dim] per image)``."""
        if len(boxes) != len(images):
            raise ValueError(f"{len(images)} images but {len(boxes)} box lists")
        props, _, heads = self._propose(images, image_ids, max_proposals, None, boxes, first_stage=True)
        return props, [h["feature"].contiguous() for h in heads]

    def _propose(self, images: list[np.ndarray], image_ids: list[int], max_proposals: int,
                 threshold: float | None, extra: list[Tensor] | None = None, first_stage: bool = False
                 ) -> tuple[list[Proposals], list[Proposals] | None, list[dict[str, Tensor]]]:
        """Proposals (and detections with a threshold) of a list of images, and the region-head outputs
        (:meth:`DetectorModel.region`'s dict) of the ``extra`` boxes per image, pooled in the same call.
        ``first_stage``: the proposals are the first stage's (:meth:`propose_first_stage`; no threshold)."""
        if len(image_ids) != len(images):
            raise ValueError(f"{len(images)} images but {len(image_ids)} image ids")
        if first_stage and threshold is not None:
            raise ValueError("the first stage has no detection set: no detection_threshold with first_stage")
        maps, scales, sizes = self._maps(images)
        p = maps[DetectorModel.STRIDE]
        chunk = max(1, self.config.inference_batch)
        # Boxes pooled per image (original pixels): the final boxes, or with a threshold the union of the
        # final boxes and B; index[i] = (final rows, detection rows) into them.
        pooled: list[Tensor] = []
        index: list[tuple[Tensor, Tensor, Tensor]] = []
        objectness: list[Tensor] = []  # first stage: the scores of the pooled boxes
        for s0 in range(0, len(images), chunk):
            if first_stage:
                dets = [{"boxes": bx, "scores": sc} for bx, sc in
                        self.model.first_stage(p[s0:s0 + chunk], sizes[s0:s0 + chunk], max_proposals)]
                objectness += [d["scores"] for d in dets]
            else:
                dets = self.model.detect(p[s0:s0 + chunk], sizes[s0:s0 + chunk], max_proposals, threshold)
            for j, d in enumerate(dets):
                s = scales[s0 + j].repeat(2)
                h, w = images[s0 + j].shape[:2]
                if threshold is None:
                    pooled.append(clip_boxes_to_image(d["boxes"] / s, (h, w)))
                else:
                    pooled.append(clip_boxes_to_image(d["union_boxes"] / s, (h, w)))
                    index.append((d["final_index"], d["det_index"], d["det_scores"]))
        out: list[Proposals] = []
        dets_out: list[Proposals] = []
        extra_out: list[dict[str, Tensor]] = []
        given = [torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4) for b in extra] if extra is not None \
            else [torch.zeros((0, 4))] * len(images)
        for s0 in range(0, len(images), chunk):
            sl = slice(s0, s0 + chunk)
            heads = self._pool(p[sl], [torch.cat([bx, g]) for bx, g in zip(pooled[sl], given[sl])], scales[sl])
            prob = heads["cls"].softmax(dim=1)[:, 1:]
            start = 0
            for j, bx in enumerate(pooled[sl]):
                n = bx.shape[0]
                cs = prob[start:start + n]
                feat = heads["feature"][start:start + n]
                k = given[s0 + j].shape[0]
                extra_out.append({key: v[start + n:start + n + k] for key, v in heads.items()})
                start += n + k
                if first_stage:
                    out.append(self._first_stage(bx, cs, feat, objectness[s0 + j]))
                elif threshold is None:
                    out.append(self._sorted(bx, cs, feat))
                else:
                    fi, di, first = index[s0 + j]
                    out.append(self._sorted(bx[fi], cs[fi], feat[fi]))
                    dets_out.append(self._sorted(bx[di], cs[di], feat[di], first))
        return out, (dets_out if threshold is not None else None), extra_out

    def _heads(self, images: list[np.ndarray], boxes: list[Tensor]) -> list[dict[str, Tensor]]:
        if len(boxes) != len(images):
            raise ValueError(f"{len(images)} images but {len(boxes)} box lists")
        maps, scales, _ = self._maps(images)
        p = maps[DetectorModel.STRIDE]
        chunk = max(1, self.config.inference_batch)
        out = []
        for s0 in range(0, len(images), chunk):
            sl = slice(s0, s0 + chunk)
            heads = self._pool(p[sl], boxes[sl], scales[sl])
            start = 0
            for bx in boxes[sl]:
                n = int(torch.as_tensor(bx).reshape(-1, 4).shape[0])
                out.append({k: v[start:start + n] for k, v in heads.items()})
                start += n
        return out

    def region_features(self, images: list[np.ndarray], boxes: list[Tensor]) -> list[Tensor]:
        """fc7 features Tensor[K_i, feature_dim] of each image's boxes Tensor[K_i, 4] (xyxy original pixels)."""
        return [h["feature"].contiguous() for h in self._heads(images, boxes)]

    def classify(self, images: list[np.ndarray], boxes: list[Tensor]) -> list[dict[str, Tensor]]:
        """Per image {"category": Tensor[K, C] (object classes, background dropped, not renormalised),
        "background": Tensor[K], "color": Tensor[K, 8], "size": Tensor[K, 3]} probabilities for given boxes."""
        return [self._probabilities(h) for h in self._heads(images, boxes)]

    @staticmethod
    def _probabilities(h: dict[str, Tensor]) -> dict[str, Tensor]:
        prob = h["cls"].softmax(dim=1)
        return {"category": prob[:, 1:].contiguous(), "background": prob[:, 0].contiguous(),
                "color": h["color"].softmax(dim=1), "size": h["size"].softmax(dim=1)}

    def dense_maps(self, images: list[np.ndarray], size: int) -> list[dict[int, Tensor]]:
        """Per image {stride: Tensor[fpn_channels, size // stride, size // stride]} of the FPN levels computed
        on the image resized to ``size`` x ``size`` (reuses the cached pass when that is the same input)."""
        if size < 32:
            raise ValueError(f"dense map size must be at least 32, got {size}")
        # Square images resized to input_size (a multiple of 32: no padding) are exactly the propose() input.
        if size == self.config.input_size and size % 32 == 0 and all(im.shape[0] == im.shape[1] for im in images):
            maps, _, _ = self._maps(images)
        else:
            resized = [normalize_images(self._resize_square(im, size)) for im in images]
            maps = self._run_maps(torch.stack(resized) if resized else torch.zeros((0, 3, size, size)))
        return [{s: maps[s][i, :, : size // s, : size // s].contiguous() for s in DENSE_STRIDES}
                for i in range(len(images))]

    @staticmethod
    def _resize_square(img: np.ndarray, size: int) -> Tensor:
        t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
        if t.shape[-2:] != (size, size):
            t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return t[0]


__all__ = ["BuiltinDetector", "DetectorConfig", "DetectorModel", "file_sha256", "normalize_images",
           "prepare_images", "resolve_run"]
