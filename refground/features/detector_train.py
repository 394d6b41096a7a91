"""Training and evaluation of the built-in detector (:mod:`refground.features.detector`).

Training reads the images of the train split once into one uint8 tensor (resized to the network input when
``input_size`` differs from the image side) and runs a seeded loop:

- dense head: every cell of the stride-8 map inside a ground-truth box and within ``center_radius`` strides
  of its centre is a positive for the smallest such box (FCOS centre sampling); objectness is trained with
  the quality focal loss (GFL: the target is the IoU of the cell's predicted box with its box, 0 for
  negatives), boxes with the IoU loss;
- region head: per image ``rois_per_image`` RoIs sampled from the dense proposals (after NMS), the
  ground-truth boxes and jittered copies of them, at most ``fg_fraction`` foreground (IoU >= 0.5);
  cross-entropy for the category (+ background) on all of them, for colour and size and smooth-L1 box
  refinement on the foreground.

Training runs through :func:`refground.train.fit`, the loop the methods use (run folder, epoch checkpoints,
resume, curve): AdamW with linear warm-up and cosine decay, computed from the global step so that a resumed
run follows the same schedule, gradient norm clipped at 10; every random draw of an epoch (image order,
flips, RoI sampling) comes from the epoch's torch generator of :func:`refground.train.epoch_rng`, so training
E epochs in one go or resuming after epoch k gives the same weights.

Measured choices for the default (synthetic world, 3500 train images of 256 px, 2 shared CPU cores):
images stay at 256 px (the hard categories are the small objects: circle vs hexagon, cross vs diamond, and
small objects lose most accuracy first); batches of 8 beat 16 (more steps in the same time: category
accuracy on val 92.0% vs 89.9% after 3 epochs) and 4 (93.3% but 40% slower); 4 epochs gain ~1.5 points of
category accuracy but cost a third more. Issue 16 (a 5-minute quickstart) measured the faster recipes on val
against 3 float32 epochs (referent recall@10 87.1, @100 98.9, category accuracy 91.5): 2 epochs lose 5.5
points of category accuracy (86.0; recall@10 86.0), and neither a higher peak rate with a shorter warm-up
(4e-3: 77.2; 3e-3 with 32 RoIs per image: 69.8), a lower one (1e-3: 83.5) nor batches of 6 (86.7) recover
it; 3 epochs with the backbone and FPN under bfloat16 autocast (:func:`training_precision`) give 87.3,
99.2 and 91.6 in about 20% less time (119-134 s against 147 s in the same session; a step A/B in
`refground bench quickstart-stages` is noisy here). That is the default: 3 epochs, about 2 minutes.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from refground import distributed
from refground.boxes import (box_convert, box_iou, clip_boxes_to_sizes, elementwise_box_iou, nms,
                             small_box_mask)
from refground.data.model import Dataset
from refground.errors import DataError, UsageError
from refground.eval.metrics import RECALL_NS
from refground.features.base import read_image
from refground.features.detector import (BuiltinDetector, DetectorConfig, DetectorModel, file_sha256,
                                         normalize_images)
from refground.progress import track
from refground.train import METRICS_FILE, MODEL_FILE, RunSpec, fit, write_json

STEP = "train-detector"
STEP_VERSION = 2  # 2: the run folder of refground.train (model.pt; checkpoint.pt without the config)


# -------------------------------------------------------------------------------------------- data


@dataclass
class TrainData:
    """A split in memory: ``images`` uint8[N, S, S, 3] (resized and padded network inputs), per image its
    content size, and the ground truth in network-input pixels, flat with ``offsets`` int64[N+1]:
    ``boxes`` float32[M, 4], ``cats``/``colors``/``sizes`` int64[M] (-1 where unknown)."""

    image_ids: list[int]
    images: Tensor
    content: list[tuple[int, int]]
    offsets: np.ndarray
    boxes: Tensor
    cats: Tensor
    colors: Tensor
    sizes: Tensor

    def __len__(self) -> int:
        return len(self.image_ids)


def split_image_ids(ds: Dataset, split: str) -> list[int]:
    """Image ids whose stored image split is ``split`` (exactly), in storage order."""
    return [int(i) for i, s in zip(ds.image_ids, ds.image_splits) if s == split]


def _attribute_index(ds: Dataset, name: str, vocab: Sequence[str], rows: np.ndarray) -> np.ndarray:
    values = ds.object_attributes.get(name)
    if values is None:
        return np.full(len(rows), -1, dtype=np.int64)
    pos = {v: k for k, v in enumerate(vocab)}
    return np.array([pos.get(values[r], -1) for r in rows], dtype=np.int64)


def load_images(ds: Dataset, image_ids: Sequence[int], workers: int = 2) -> list[np.ndarray]:
    """Decode the images (uint8[H, W, 3]) of ``image_ids`` with a small thread pool."""
    from refground.data.store import image_path

    paths = [image_path(ds, i) for i in image_ids]
    if workers <= 1 or len(paths) < 8:
        return [read_image(p) for p in paths]
    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(read_image, paths))


def load_train_data(ds: Dataset, split: str, config: DetectorConfig) -> TrainData:
    """Read a split's images and ground truth into memory at the network's input scale."""
    ids = split_image_ids(ds, split)
    if not ids:
        raise DataError(f"dataset {ds.name}: no images in split {split!r}")
    cat_pos = {c: k for k, c in enumerate(config.class_names)}
    ds_cats = np.array([cat_pos.get(c, -1) for c in ds.categories], dtype=np.int64)
    from refground.data.store import image_path

    side = _padded(config.input_size)
    # Each image is decoded straight into its slot of one array: fresh memory is slow to touch the first time
    # (measured 5.5 s for the 690 MB of the default world's train images on this project's VM), so the pixels
    # are written once, not decoded into a list and copied.
    images = np.zeros((len(ids), side, side, 3), dtype=np.uint8)
    content: list[tuple[int, int]] = [(0, 0)] * len(ids)
    scale = np.ones((len(ids), 4), dtype=np.float32)

    def place(k: int) -> None:
        img = read_image(image_path(ds, ids[k]))
        h, w = img.shape[:2]
        s = config.input_size / max(h, w)
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        if (nh, nw) != (h, w):
            f = F.interpolate(torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float(), size=(nh, nw),
                              mode="bilinear", align_corners=False, antialias=True)
            img = f[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        images[k, :nh, :nw] = img
        content[k] = (nh, nw)
        scale[k] = (nw / w, nh / h, nw / w, nh / h)

    with ThreadPoolExecutor(2) as ex:  # PNG decoding releases the GIL
        list(ex.map(place, range(len(ids))))
    # The objects of all the images at once: their dataset rows, image of each, known categories only.
    rows_of = [np.arange(ds.object_slice(i).start, ds.object_slice(i).stop) for i in ids]
    rows = np.concatenate(rows_of) if rows_of else np.zeros(0, dtype=np.int64)
    image_of = np.repeat(np.arange(len(ids)), [len(r) for r in rows_of])
    c = ds_cats[ds.object_categories[rows]]
    keep = c >= 0
    rows, image_of = rows[keep], image_of[keep]
    boxes = ds.object_boxes[rows].astype(np.float32) * scale[image_of]
    offsets = np.searchsorted(image_of, np.arange(len(ids) + 1)).astype(np.int64)
    return TrainData(ids, torch.from_numpy(images), content, offsets, torch.from_numpy(boxes.reshape(-1, 4)),
                     torch.from_numpy(c[keep]),
                     torch.from_numpy(_attribute_index(ds, "color", config.color_names, rows)),
                     torch.from_numpy(_attribute_index(ds, "size", config.size_names, rows)))


# ------------------------------------------------------------------------------------------ losses


def native_bfloat16() -> bool:
    """Whether this CPU has bfloat16 instructions (x86 ``avx512_bf16`` or ``amx_bf16`` on Linux), on which
    oneDNN's bfloat16 convolutions beat float32. Elsewhere (AVX2, older AVX-512, other systems) they are
    emulated and slower, so "auto" keeps float32 there."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def training_precision(config: DetectorConfig) -> str:
    """The precision the backbone and FPN train in: ``config.train_precision``, "auto" resolved to
    "bfloat16" on CPUs with native bfloat16 (:func:`native_bfloat16`) and "float32" elsewhere.

    Measured on the default world (2 cores with ``avx512_bf16``): training about 20% faster under bfloat16
    autocast (interleaved steps measured 27% once), and the val figures of the 3-epoch detector level with
    float32's (referent recall@10 87.3 vs 87.1, recall@100 99.2 vs 98.9, category accuracy 91.6 vs 91.5). Weights, optimizer and the heads stay
    float32; the run's manifest records the resolved precision."""
    if config.train_precision != "auto":
        return config.train_precision
    return "bfloat16" if native_bfloat16() else "float32"


def _padded(input_size: int) -> int:
    return int(math.ceil(input_size / 32) * 32)


def _lr_at(step: int, total: int, config: DetectorConfig) -> float:
    """Linear warm-up, then cosine decay to 0 at ``total`` steps."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    t = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def _pad_gt(gt: list[Tensor], fill: float = 0.0) -> tuple[Tensor, Tensor]:
    g = max([len(x) for x in gt] + [1])
    out = torch.full((len(gt), g, 4), fill)
    valid = torch.zeros((len(gt), g), dtype=torch.bool)
    for b, x in enumerate(gt):
        out[b, : len(x)] = x
        valid[b, : len(x)] = True
    return out, valid


def assign_dense(locations: Tensor, gt: list[Tensor], radius: float) -> tuple[Tensor, Tensor]:
    """FCOS centre sampling. locations: Tensor[L, 2] (x, y); gt: B lists Tensor[G_b, 4] xyxy.

    Returns (pos bool[B, L], assigned gt index int64[B, L], -1 where negative): a cell is positive for the
    smallest box that contains it and whose centre is within ``radius`` pixels along x and y.
    """
    boxes, valid = _pad_gt(gt)  # [B, G, 4]
    x = locations[None, :, None, 0]
    y = locations[None, :, None, 1]
    x1, y1, x2, y2 = (boxes[:, None, :, i] for i in range(4))
    inside = (x > x1) & (x < x2) & (y > y1) & (y < y2)
    centre = box_convert(boxes, "xyxy", "cxcywh")
    near = ((x - centre[:, None, :, 0]).abs() < radius) & ((y - centre[:, None, :, 1]).abs() < radius)
    cand = inside & near & valid[:, None, :]
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    masked = torch.where(cand, area[:, None, :].expand_as(cand), torch.full_like(cand, float("inf"), dtype=area.dtype))
    best, idx = masked.min(dim=2)
    pos = torch.isfinite(best)
    return pos, torch.where(pos, idx, torch.full_like(idx, -1))


def quality_focal_loss(logits: Tensor, target: Tensor, beta: float = 2.0) -> Tensor:
    """GFL's quality focal loss, summed: BCE(logit, t) * |sigmoid(logit) - t|^beta with soft t in [0, 1]."""
    p = logits.sigmoid()
    return (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * (p - target).abs().pow(beta)).sum()


def jitter_boxes(boxes: Tensor, copies: int, generator: torch.Generator) -> Tensor:
    """``copies`` random perturbations of each box (centre shift up to 30% of the side, log-scale +-0.35)."""
    if copies <= 0 or boxes.shape[0] == 0:
        return boxes.new_zeros((0, 4))
    c = box_convert(boxes, "xyxy", "cxcywh").repeat(copies, 1)
    u = torch.rand((c.shape[0], 4), generator=generator) * 2 - 1
    wh = c[:, 2:]
    ctr = c[:, :2] + 0.3 * u[:, :2] * wh
    wh = wh * torch.exp(0.35 * u[:, 2:])
    return box_convert(torch.cat([ctr, wh], dim=1), "cxcywh", "xyxy")


@dataclass
class Batch:
    x: Tensor  # [B, 3, S, S] normalised
    gt: list[Tensor]
    cats: list[Tensor]
    colors: list[Tensor]
    sizes: list[Tensor]
    content: list[tuple[int, int]]


def make_batch(data: TrainData, idx: Sequence[int], flip: Tensor | None) -> Batch:
    """Gather images idx (uint8 -> normalised float), flipping those where ``flip`` is True."""
    idx_t = torch.as_tensor(list(idx), dtype=torch.int64)
    x = normalize_images(data.images.index_select(0, idx_t).permute(0, 3, 1, 2))
    full = x.shape[-1]
    gt, cats, cols, sizes, content = [], [], [], [], []
    for j, k in enumerate(idx):
        s, e = int(data.offsets[k]), int(data.offsets[k + 1])
        b = data.boxes[s:e].clone()
        h, w = data.content[k]
        if flip is not None and bool(flip[j]):
            # The whole padded square is mirrored, so the content moves to the right edge.
            b = torch.stack([full - b[:, 2], b[:, 1], full - b[:, 0], b[:, 3]], dim=1)
            content.append((h, full))
        else:
            content.append((h, w))
        gt.append(b)
        cats.append(data.cats[s:e])
        cols.append(data.colors[s:e])
        sizes.append(data.sizes[s:e])
    if flip is not None and bool(flip.any()):
        x[flip] = x[flip].flip(-1)
    return Batch(x, gt, cats, cols, sizes, content)


def _known_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy over the rows whose target is known (>= 0); 0 (still in the graph) when none is."""
    if not bool((target >= 0).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, ignore_index=-1)


def sample_rois(model: DetectorModel, scores: Tensor, boxes: Tensor, batch: Batch, generator: torch.Generator
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The region head's training RoIs of a batch, for all its images at once.

    scores: Tensor[B, L] dense objectness (sigmoid), boxes: Tensor[B, L, 4] dense boxes (input pixels). Per
    image: the ``train_pre_nms_top_n`` most confident dense boxes, clipped, small ones dropped, NMS at
    ``proposal_nms``, the first ``train_proposals`` kept; with the ground-truth boxes and ``jitter_per_object``
    jittered copies of each they are the candidates (clipped, boxes under 1 px dropped); at most
    ``rois_per_image * fg_fraction`` foreground candidates (IoU >= 0.5 with a box of their image) are drawn at
    random, background ones fill up to ``rois_per_image``. Only the NMS runs per image (it is sequential).

    Returns (rois Tensor[R, 5] (image, x1, y1, x2, y2), category targets int64[R] (0 = background), colour
    and size targets int64[R] (-1: background or unknown), box-delta targets Tensor[R, 4] (meaningful on
    foreground rows), foreground bool[R]); rows grouped by image, foreground first.
    """
    c = model.config
    b_n, length = scores.shape
    content = torch.tensor(batch.content, dtype=torch.float32).reshape(b_n, 2)
    k = min(c.train_pre_nms_top_n, length)
    sc, top = scores.topk(k, dim=1)
    bx = clip_boxes_to_sizes(boxes.gather(1, top[..., None].expand(-1, -1, 4)).reshape(-1, 4),
                             content.repeat_interleave(k, dim=0)).reshape(b_n, k, 4)
    ok = small_box_mask(bx, c.min_box_size)
    props, props_img = [], []
    for b in range(b_n):
        rows = torch.nonzero(ok[b]).squeeze(1)
        kept = rows[nms(bx[b, rows], sc[b, rows], c.proposal_nms, max_keep=c.train_proposals)]
        props.append(bx[b, kept])
        props_img.append(torch.full((len(kept),), b, dtype=torch.int64))
    counts = torch.tensor([len(g) for g in batch.gt], dtype=torch.int64)
    gt_img = torch.repeat_interleave(torch.arange(b_n), counts)
    gt = torch.cat(batch.gt).reshape(-1, 4)
    cand = torch.cat([*props, gt, jitter_boxes(gt, c.jitter_per_object, generator)])
    cand_img = torch.cat([*props_img, gt_img, gt_img.repeat(max(c.jitter_per_object, 0))])
    cand = clip_boxes_to_sizes(cand, content[cand_img])
    keep = small_box_mask(cand, 1.0)
    cand, cand_img = cand[keep], cand_img[keep]
    if len(gt):
        iou = box_iou(cand, gt).masked_fill(cand_img[:, None] != gt_img[None, :], -1.0)  # own image's boxes only
        best, match = iou.max(dim=1)
    else:
        best, match = torch.full((len(cand),), -1.0), torch.zeros(len(cand), dtype=torch.int64)
    fg = best >= 0.5
    # A random subset per image and class: order by (image, background after foreground, random key), then
    # keep each group's first `quota` rows.
    key = torch.rand(len(cand), generator=generator)
    order = torch.from_numpy(np.lexsort((key.numpy(), (~fg).numpy(), cand_img.numpy())))
    group = cand_img[order] * 2 + (~fg[order]).long()
    sizes = torch.bincount(group, minlength=2 * b_n)
    n_fg = torch.clamp(sizes[0::2], max=int(c.rois_per_image * c.fg_fraction))
    n_bg = torch.minimum(sizes[1::2], c.rois_per_image - n_fg)
    quota = torch.stack([n_fg, n_bg], dim=1).reshape(-1)
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.arange(len(order)) - starts[group]
    sel = order[rank < quota[group]]
    m, is_fg, img = match[sel], fg[sel], cand_img[sel]
    rois = torch.cat([img[:, None].float(), cand[sel]], dim=1)
    if len(gt):
        cats, cols, sz = torch.cat(batch.cats), torch.cat(batch.colors), torch.cat(batch.sizes)
        cls_t = torch.where(is_fg, cats[m] + 1, torch.zeros_like(m))
        col_t = torch.where(is_fg, cols[m], torch.full_like(m, -1))
        size_t = torch.where(is_fg, sz[m], torch.full_like(m, -1))
        reg_t = model.box_coder.encode(gt[m], cand[sel])
    else:
        cls_t, col_t, size_t = torch.zeros_like(m), torch.full_like(m, -1), torch.full_like(m, -1)
        reg_t = torch.zeros((len(sel), 4))
    return rois, cls_t, col_t, size_t, reg_t, is_fg


def training_losses(model: DetectorModel, batch: Batch, generator: torch.Generator) -> dict[str, Tensor]:
    """All losses of one batch (a dict of scalar tensors; "total" is their weighted sum)."""
    c = model.config
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=training_precision(c) == "bfloat16"):
        p = model.maps(batch.x)[model.STRIDE].float()
    logits, boxes = model.dense(p)  # [B, L], [B, L, 4]
    loc = model.locations(p)
    pos, assigned = assign_dense(loc, batch.gt, c.center_radius * model.STRIDE)
    num_pos = max(1, int(pos.sum()))
    b_idx, l_idx = torch.nonzero(pos, as_tuple=True)
    gt_padded, _ = _pad_gt(batch.gt)
    target_boxes = gt_padded[b_idx, assigned[b_idx, l_idx]]
    pred_pos = boxes[b_idx, l_idx]
    iou = elementwise_box_iou(pred_pos, target_boxes)
    quality = torch.zeros_like(logits)
    quality[b_idx, l_idx] = iou.detach().clamp(min=0.0)
    loss_obj = quality_focal_loss(logits, quality) / num_pos
    loss_dense_box = (1.0 - iou).sum() / num_pos

    # ------------------------------------------------------------------ RoIs for the region head
    rois_t, cls_t, col_t, size_t, reg_t, fg_t = sample_rois(model, logits.detach().sigmoid(), boxes.detach(), batch,
                                                            generator)
    out = model.region(p, rois_t)
    loss_cls = F.cross_entropy(out["cls"], cls_t)
    loss_color = _known_cross_entropy(out["color"], col_t)
    loss_size = _known_cross_entropy(out["size"], size_t)
    loss_box = F.smooth_l1_loss(out["deltas"][fg_t], reg_t[fg_t], beta=1.0 / 9, reduction="sum") / max(1, len(cls_t))
    total = loss_obj + loss_dense_box + loss_cls + loss_color + loss_size + loss_box
    return {"total": total, "objectness": loss_obj, "dense_box": loss_dense_box, "cls": loss_cls,
            "color": loss_color, "size": loss_size, "box": loss_box}


# ----------------------------------------------------------------------------------------- training


def _make_optimizer(model: DetectorModel, config: DetectorConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, prm in model.named_parameters():
        (no_decay if prm.ndim <= 1 else decay).append(prm)
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, foreach=True)


# ----------------------------------------------------------------------------------------- run folder


def _dataset_dir_of(ds: Dataset) -> Path | None:
    """The dataset folder of a dataset loaded from the store (its image root's parent), if it is one."""
    root = ds.meta.get("image_root")
    if not root:
        return None
    d = Path(root).parent
    return d if (d / "manifest.json").is_file() else None


def run_spec(ds: Dataset, out_dir: str | Path, config: DetectorConfig, seed: int,
             dataset_dir: Path | None = None) -> RunSpec:
    """The :class:`~refground.train.RunSpec` of a detector run: the config, the seed and the dataset it reads."""
    from refground.cache import parent

    params = {"config": config.to_dict(), "seed": int(seed), "train_split": "train", "eval_split": "val"}
    ds_dir = dataset_dir if dataset_dir is not None else _dataset_dir_of(ds)
    parents = {"dataset": parent("dataset", ds_dir)} if ds_dir is not None else {}
    return RunSpec(Path(out_dir), f"{STEP}@{STEP_VERSION}", params, parents, "runs/detector")


def train_detector(ds: Dataset, out_dir: str | Path, config: DetectorConfig | None = None, seed: int = 0,
                   resume: bool = True, force: bool = False, dataset_dir: Path | None = None,
                   evaluate: bool = True) -> dict[str, Any]:
    """Train the built-in detector on ``ds``'s train split into the run folder ``out_dir`` and evaluate it
    on the val split.

    The run folder is :mod:`refground.train`'s: ``config.json`` (the :class:`DetectorConfig`), ``model.pt``
    (the weights after the last epoch: what :meth:`BuiltinDetector.load` reads), ``checkpoint.pt`` (model,
    optimizer, epoch, steps; rewritten atomically after every epoch, for resuming), ``curve.json`` (loss
    every 20 steps with the learning rate; per epoch the mean of each loss term), ``metrics.json`` (the
    figures of :func:`evaluate_detector` on val; empty without ``evaluate``) and ``manifest.json`` (complete
    flag last). A complete run with the same fingerprint (config, seed, dataset) is a cache hit unless
    ``force`` (one trained without ``evaluate`` is evaluated then, when ``evaluate``: the quickstart defers the
    evaluation, whose proposal recall it reads from the extracted features); an interrupted run with the same
    fingerprint resumes after its last finished epoch when ``resume``.

    Returns {"run", "cache_hit", "fingerprint", "epochs", "resumed_from", "train_seconds",
    "train_images_per_s", "load_seconds", "seconds", "metrics"}.
    """
    t_start = time.perf_counter()
    config = config or DetectorConfig()
    if config.epochs < 1 or config.batch_size < 1:
        raise UsageError(f"epochs and batch size must be at least 1, got {config.epochs} and {config.batch_size}")
    spec = run_spec(ds, out_dir, config, seed, dataset_dir)
    # One writer per run folder, from the cache-hit check to the complete manifest (released on any error).
    with spec.lock():
        return _train_locked(ds, spec, config, seed, resume, force, evaluate, t_start)


def _train_locked(ds: Dataset, spec: RunSpec, config: DetectorConfig, seed: int, resume: bool, force: bool,
                  evaluate: bool, t_start: float) -> dict[str, Any]:
    """:func:`train_detector` once the run folder's lock is held."""
    result = spec.start(spec.out_dir.name, force, t_start)  # refuses a complete run of other settings
    if result["cache_hit"]:
        result.update(epochs=config.epochs, resumed_from=config.epochs)
        if evaluate and not result.get("metrics") and distributed.is_main():
            # Trained without its evaluation (the quickstart's deferral): evaluate the saved weights now.
            from refground.cache.manifest import read_manifest_of

            metrics = evaluate_detector(ds, BuiltinDetector.load(spec.out_dir), "val")
            write_json(spec.out_dir / METRICS_FILE, metrics)
            # The manifest records every file's content: record the new metrics, or the run reads as edited.
            spec.mark(complete=True, extra=read_manifest_of(spec.out_dir).extra)
            result["metrics"] = metrics
        return result

    state = spec.begin(config.to_dict(), None, resume, force)
    torch.manual_seed(seed)
    model = DetectorModel(config)
    optimizer = _make_optimizer(model, config)
    start_epoch = int(state["epoch"]) if state is not None else 0

    t_load = time.perf_counter()
    n = len(split_image_ids(ds, "train"))
    steps_per_epoch = max(1, n // config.batch_size)  # the last partial batch is dropped (BN wants full ones)
    total_steps = steps_per_epoch * config.epochs
    # A run interrupted during its final evaluation has nothing left to train: do not load the images.
    data = load_train_data(ds, "train", config) if start_epoch < config.epochs else None
    load_seconds = time.perf_counter() - t_load

    def batches(gen: torch.Generator) -> list[list[int]]:
        order = torch.randperm(n, generator=gen)
        return [order[i * config.batch_size:(i + 1) * config.batch_size].tolist() for i in range(steps_per_epoch)]

    def train_step(idx: list[int], gen: torch.Generator) -> tuple[Tensor, int, dict[str, Tensor]]:
        flip = torch.rand(len(idx), generator=gen) < 0.5 if config.flip else None
        losses = training_losses(model, make_batch(data, idx, flip), gen)
        total = losses.pop("total")
        return total, len(idx), {k: v.detach() for k, v in losses.items()}

    fr = fit(model, optimizer, spec, epochs=config.epochs, seed=seed, batches=batches, train_step=train_step,
             state=state, description="detector", lr_at_step=lambda step: _lr_at(step, total_steps, config),
             clip_grad_norm=10.0, batch_rng="torch")
    trained_images = (config.epochs - fr.resumed_from) * steps_per_epoch * min(config.batch_size, n)
    data = None  # the training images are not needed for the evaluation

    def final_metrics() -> dict[str, Any]:  # rank 0 alone evaluates and writes, every rank gets the figures
        metrics = evaluate_detector(ds, BuiltinDetector(model, file_sha256(spec.out_dir / MODEL_FILE)), "val") \
            if evaluate else {}
        write_json(spec.out_dir / METRICS_FILE, metrics)
        return metrics

    metrics = distributed.on_main(final_metrics)
    extra = {"train_seconds": round(fr.train_seconds, 2), "load_seconds": round(load_seconds, 2),
             "train_images_per_s": round(trained_images / max(fr.train_seconds, 1e-9), 2),
             "epochs_trained_now": config.epochs - fr.resumed_from, "steps": fr.steps,
             "threads": torch.get_num_threads(), "world_size": distributed.world_size(),
             "train_precision": training_precision(config)}
    spec.mark(complete=True, extra=extra)
    result.update(epochs=config.epochs, resumed_from=fr.resumed_from, metrics=metrics,
                  seconds=round(time.perf_counter() - t_start, 3), **extra)
    return result


# ----------------------------------------------------------------------------------------- evaluation


def referent_targets(ds: Dataset, queries: Sequence[Any]) -> list[np.ndarray]:
    """Per query its referent's box, float64[1, 4] (the targets of the detector's referent recall)."""
    return [ds.object_boxes[[ds.object_row(q.referent_object_id)]] for q in queries]


def features_referent_recall(ds: Dataset, features: Path, split: str = "val",
                             max_n: Sequence[int] = RECALL_NS) -> dict[int, float]:
    """The referent recall@N of :func:`evaluate_detector`, read from a features artifact's proposals (best
    first) instead of running the detector: for the artifact the detector extracted, the same boxes and so the
    same figures. ``{N: recall}``."""
    from refground.cache import RaggedH5
    from refground.eval.metrics import proposal_recall

    queries = ds.queries(split, "expression")
    with RaggedH5(features) as f:
        boxes, off = f.table("proposals", "boxes"), f.offsets["proposals"]
        row = {int(i): k for k, i in enumerate(f.table("images", "ids"))}
    props = [boxes[off[row[q.image_id]]:off[row[q.image_id] + 1]] for q in queries]
    return proposal_recall(props, referent_targets(ds, queries), tuple(int(n) for n in max_n))


def evaluate_detector(ds: Dataset, detector: BuiltinDetector, split: str = "val",
                      max_n: Sequence[int] = RECALL_NS, batch_size: int = 16) -> dict[str, Any]:
    """Proposal recall and attribute accuracy of a detector on ``split``.

    Images: those of the split's expression queries. Referent recall@N: share of expressions whose referent
    is covered (IoU >= 0.5) by one of the first N proposals of its image; context recall@N: the same for the
    other objects the expression mentions (:func:`refground.eval.metrics.proposal_recall`). Category /
    colour / size accuracy: arg-max of :meth:`BuiltinDetector.classify` on every ground-truth box of those
    images (attributes where the dataset has them). Also mean proposals per image and inference images/s
    (``propose`` plus ``classify``, decoding excluded).
    """
    from refground.eval.metrics import proposal_recall

    ns = tuple(int(n) for n in max_n)
    queries = ds.queries(split, "expression")
    image_ids = list(dict.fromkeys(q.image_id for q in queries))
    cat_pos = {c: k for k, c in enumerate(detector.class_names)}
    ds_cats = np.array([cat_pos.get(c, -1) for c in ds.categories], dtype=np.int64)
    proposals: dict[int, np.ndarray] = {}
    hits = {"category": [0, 0], "color": [0, 0], "size": [0, 0]}
    seconds = 0.0
    num_props = 0
    batches = [image_ids[i:i + batch_size] for i in range(0, len(image_ids), batch_size)]
    for ids in track(batches, total=len(batches), description=f"evaluate detector on {split}"):
        images = load_images(ds, ids)
        gts = [torch.from_numpy(ds.object_boxes[ds.object_slice(i)].astype(np.float32)) for i in ids]
        t0 = time.perf_counter()
        if hasattr(detector, "propose_classified"):  # one region-head pass for proposals and given boxes
            props, probs = detector.propose_classified(images, ids, max(ns), gts)
        else:
            props, probs = detector.propose(images, ids, max(ns)), detector.classify(images, gts)
        seconds += time.perf_counter() - t0
        for i, p, pr in zip(ids, props, probs):
            proposals[i] = p.boxes.numpy()
            num_props += len(p)
            sl = ds.object_slice(i)
            rows = np.arange(sl.start, sl.stop)
            truth = {"category": ds_cats[ds.object_categories[sl]],
                     "color": _attribute_index(ds, "color", detector.color_names, rows),
                     "size": _attribute_index(ds, "size", detector.size_names, rows)}
            for key, t in truth.items():
                pred = pr[key].argmax(dim=1).numpy() if len(rows) else np.zeros(0, dtype=np.int64)
                known = t >= 0
                hits[key][0] += int((pred[known] == t[known]).sum())
                hits[key][1] += int(known.sum())
    q_props = [proposals[q.image_id] for q in queries]
    ref_recall = proposal_recall(q_props, referent_targets(ds, queries), ns)
    ctx_targets = []
    for q in queries:
        ctx = sorted({o for m in q.mentions if m.role == "context" for o in m.object_ids} - {q.referent_object_id})
        ctx_targets.append(ds.object_boxes[[ds.object_row(o) for o in ctx]].reshape(-1, 4))
    ctx_recall = proposal_recall(q_props, ctx_targets, ns)

    def acc(key: str) -> float:
        right, total = hits[key]
        return right / total if total else float("nan")

    return {
        "split": split,
        "images": len(image_ids),
        "expressions": len(queries),
        "context_objects": int(sum(len(t) for t in ctx_targets)),
        "referent_recall": {str(n): ref_recall[n] for n in ns},
        "context_recall": {str(n): ctx_recall[n] for n in ns},
        "category_accuracy": acc("category"),
        "color_accuracy": acc("color"),
        "size_accuracy": acc("size"),
        "gt_objects": hits["category"][1],
        "mean_proposals": num_props / max(1, len(image_ids)),
        "images_per_s": len(image_ids) / seconds if seconds > 0 else float("nan"),
    }


__all__ = ["STEP", "TrainData", "evaluate_detector", "features_referent_recall", "load_train_data",
           "referent_targets", "run_spec", "sample_rois", "train_detector", "training_losses"]
