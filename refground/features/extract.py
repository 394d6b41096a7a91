"""``refground extract``: proposals, region features, dense maps and CLIP embeddings for every image.

One pass over the dataset's images in fixed chunks (:class:`refground.cache.ChunkedJob`) fills up to three
artifacts at once:

- ``features/<name>.h5`` (:data:`FEATURES_FORMAT`)::

      images/ids int64[I], images/sizes int32[I, 2] (height, width)
      proposals/offsets int64[I + 1]; proposals/boxes float32[P, 4] xyxy pixels, scores float32[P],
        labels int32[P], class_scores float16[P, C], features float16[P, D]   (best first per image)
      objects/offsets int64[I + 1] (= the dataset's image_object_offsets); objects/ids int64[O],
        objects/features float16[O, D]                                          (ground-truth objects)
      detections/   only with ``detections=THRESHOLD`` (``--detections``): VL-NMS's detection set B, the
        detector's refined boxes *before* its final NMS with first-pass confidence >= THRESHOLD
        (at most the detector's post_nms_top_n per image), pooled exactly like the proposals:
        detections/offsets int64[I + 1]; detections/boxes float32[P, 4] xyxy pixels, scores float32[P]
        (re-pooled confidence, = max of class_scores, as for proposals), nms_scores float32[P] (the
        first-pass confidence the threshold and the detector's final NMS use; >= THRESHOLD),
        labels int32[P], class_scores float16[P, C], features float16[P, D]      (best first by scores)
      attrs: format, version, feature_dim, class_names (JSON), max_proposals, sources (JSON identities),
        detection_threshold (only with detections/), proposal_stage (only with ``first_stage``: "first")

  With ``first_stage`` (``--first-stage``, the built-in detector only) the proposals section holds the
  detector's *first-stage* boxes instead of its final detections
  (:meth:`~refground.features.detector.BuiltinDetector.propose_first_stage`: after the proposal NMS,
  unrefined, best first by objectness, which is ``scores``; ``labels`` / ``class_scores`` / ``features``
  from the region head on exactly these boxes), in the same layout, so every reader reads it; the attr
  ``proposal_stage = "first"`` and the fingerprint's parameters tell it from a final-stage artifact.

- ``dense/<name>.zarr`` (:mod:`refground.cache.zarrstore`): maps at strides 8/16/32 of every image resized
  to ``dense_size``;

- ``clip/<model>.h5`` (:data:`CLIP_FORMAT`)::

      images/ids int64[I], images/embedding float16[I, E]            (whole image)
      proposals/offsets, proposals/embedding float16[P, E]            (crops of the features artifact's proposals)
      objects/offsets, objects/embedding float16[O, E]                (crops of ground-truth boxes)
      queries/offsets, queries/ids int64[Q], queries/embedding float16[Q, E]   (queries grouped by image)
      categories/embedding float16[C, E] + attr category_names        (one prompt per dataset category)
      attrs: category_names, prompt, embed_dim, crop (JSON: the crop recipe :data:`CLIP_CROP`, see
        :func:`clip_crops`: proposals and objects are embedded from context-padded square crops)

Each artifact is assembled from its committed chunks when all are there, then its manifest is written;
``--shard K/N`` computes one block of chunks and leaves assembly to ``refground extract merge`` (or to the
last shard to finish). A shard holds the lock of its shard (:func:`refground.cache.chunks.shard_lock`), so
the shards of one split run side by side while a second run of the same chunks is refused; the assembly
holds the artifact's own lock (:func:`refground.cache.lock.artifact_lock`).
Features are stored as float16 (halves the cache; the models are trained in float32 from them).

The forward passes run on a fixed number of torch threads (``threads``, 1 by default; :func:`fixed_threads`):
CPU kernels split their sums by thread count, so without it two machines (or ``OMP_NUM_THREADS`` settings)
store different bytes, up to 1e-3 apart, under one fingerprint. A thread count other than 1 is part of the
fingerprint; the manifest's ``extra`` records the threads and the torch version the bytes came from.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refground.cache import ChunkedJob, Parent, RaggedH5, Shard, read_manifest_of, write_h5, write_manifest
from refground.cache.chunks import artifact_of, shard_lock
from refground.cache.lock import artifact_lock, is_locked
from refground.cache.zarrstore import write_zarr
from refground.data.model import Dataset
from refground.data.store import image_path
from refground.errors import ArtifactError, UsageError
from refground.features.base import (DENSE_STRIDES, ClipEncoder, DetectionSource, FeatureSource, Proposals,
                                     ProposalSource, read_image)
from refground.progress import track

FEATURES_FORMAT = "refground-features"
CLIP_FORMAT = "refground-clip"
DENSE_FORMAT = "refground-dense"
FORMAT_VERSION = 1
PLAN_FILE = "plan.json"
CLIP_PROMPT = "a photo of a {}."
# Arrays every committed chunk of a kind holds (a chunk without them is damaged and computed again).
CHUNK_KEYS = {
    "features": ("images.ids", "images.sizes", "proposals.counts", "proposals.boxes", "proposals.scores",
                 "proposals.labels", "objects.counts", "objects.ids"),
    "dense": ("images.ids",),
    "clip": ("images.ids", "images.embedding", "proposals.counts", "objects.counts", "queries.counts",
             "queries.ids"),
}


def fixed_threads(threads: int | None) -> contextlib.AbstractContextManager[int]:
    """Run the block on ``threads`` torch intra-op threads (None or 0: leave them as they are), then restore
    (:func:`refground.threads.use_threads`).

    Why: a CPU kernel (convolution, matmul, reduction) splits its sums by the thread count, so the same
    weights and image give outputs a few float ulps apart on 1 and on 2 threads, and float16 storage does
    not always round them together. A fixed count makes the bytes independent of the machine's cores and
    of ``OMP_NUM_THREADS`` (they still depend on the torch version and the CPU's instruction set)."""
    from refground.threads import use_threads

    return use_threads(int(threads) if threads else None)


def provenance(threads: int | None) -> dict[str, Any]:
    """What the bytes of an extracted artifact depend on beyond its fingerprint (for its manifest's extra)."""
    return {"threads": int(threads) if threads else torch.get_num_threads(), "torch": torch.__version__}


@dataclass
class Target:
    """One artifact a run fills: where it goes, its fingerprint and what its manifest will say."""

    kind: str  # "features" | "dense" | "clip"
    path: Path
    step: str
    params: dict[str, Any]
    parents: dict[str, Parent]
    fingerprint: str
    attrs: dict[str, Any] = field(default_factory=dict)
    job: ChunkedJob | None = None
    threads: int | None = None  # torch threads of the forward passes (recorded in the plan for `merge`)

    def open(self, num_images: int, chunk_size: int, shard: Shard | None = None, force: bool = False) -> ChunkedJob:
        """Open (or resume) the ``.partial`` folder and record the plan, so `extract merge` can finish it.

        ``shard``: the shard whose lock this process holds; ``force``: forget that shard's chunks and mark
        the job as a forced rebuild (:meth:`ChunkedJob.restart`); the plan is then written anew."""
        self.job = ChunkedJob(self.path, self.fingerprint, num_images, chunk_size,
                              required=CHUNK_KEYS.get(self.kind, ()), held=shard)
        if force:
            self.job.restart(shard or Shard())
        plan = self.job.dir / PLAN_FILE
        if force or not plan.exists():
            record = {"kind": self.kind, "path": str(self.path), "step": self.step, "params": self.params,
                      "parents": {k: vars(p) for k, p in self.parents.items()}, "fingerprint": self.fingerprint,
                      "attrs": self.attrs, "threads": self.threads}
            # A unique temporary name: the shards of a split write their (equal) plans side by side.
            tmp = plan.with_name(f".{PLAN_FILE}.tmp-{uuid.uuid4().hex[:8]}")
            try:
                tmp.write_text(json.dumps(record, sort_keys=True, indent=1))
                os.replace(tmp, plan)
            finally:
                tmp.unlink(missing_ok=True)
        return self.job


def _f16(t: torch.Tensor | np.ndarray) -> np.ndarray:
    a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    return a.astype(np.float16)


def _concat(parts: list[np.ndarray], tail: tuple[int, ...], dtype: Any) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros((0, *tail), dtype=dtype)


def crop(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The pixels of ``box`` (xyxy, rounded outwards, at least 1 x 1 and inside the image)."""
    h, w = image.shape[:2]
    x1 = int(np.clip(np.floor(box[0]), 0, w - 1))
    y1 = int(np.clip(np.floor(box[1]), 0, h - 1))
    x2 = int(np.clip(np.ceil(box[2]), x1 + 1, w))
    y2 = int(np.clip(np.ceil(box[3]), y1 + 1, h))
    return image[y1:y2, x1:x2]


# How the CLIP artifact's proposal and object crops are cut (:func:`clip_crops`). It is part of the CLIP
# artifact's fingerprint parameters (``crop``) and stored as its HDF5 attr ``crop``, so readers (the zero-shot
# evaluation) cut the same crops; bump ``version`` when the cutting changes in any other way.
CLIP_CROP: dict[str, Any] = {"version": 1, "context": 0.1, "square": True, "fill": "mean"}
# A crop window this many times the image's longer side is a broken box, not an object (refused rather than
# allocating gigabytes of fill).
MAX_CROP_FACTOR = 8


def clip_crop_windows(boxes: np.ndarray, context: float = 0.1, square: bool = True) -> np.ndarray:
    """The integer windows :func:`clip_crops` cuts: int64[N, 4] xyxy pixels, end exclusive (the crop of box i
    is ``[y1, y2) x [x1, x2)``, possibly reaching outside the image).

    Each box (float xyxy pixels, Tensor/array [N, 4]) is enlarged by ``context`` times its width on the left
    and on the right and ``context`` times its height above and below, then (``square``) made a square of
    the longer side around the same centre. A side of s pixels becomes ``max(1, ceil(s))`` pixels (within
    1e-6, so float noise never adds a pixel) and the window starts at the integer nearest to
    ``centre - side / 2`` (halves up)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not np.isfinite(b).all():
        raise UsageError("CLIP crops: boxes must be finite xyxy pixels")
    if not context >= 0:
        raise UsageError(f"CLIP crops: context must be >= 0, got {context}")
    w = np.maximum(b[:, 2] - b[:, 0], 0.0) * (1 + 2 * context)
    h = np.maximum(b[:, 3] - b[:, 1], 0.0) * (1 + 2 * context)
    if square:
        w = h = np.maximum(w, h)
    sw = np.maximum(1, np.ceil(w - 1e-6)).astype(np.int64)
    sh = np.maximum(1, np.ceil(h - 1e-6)).astype(np.int64)
    x1 = np.floor((b[:, 0] + b[:, 2]) / 2 - sw / 2 + 0.5).astype(np.int64)
    y1 = np.floor((b[:, 1] + b[:, 3]) / 2 - sh / 2 + 0.5).astype(np.int64)
    return np.stack([x1, y1, x1 + sw, y1 + sh], axis=1)


def clip_crops(image: np.ndarray, boxes: np.ndarray, context: float = 0.1, square: bool = True) -> list[np.ndarray]:
    """CLIP crops of ``boxes`` in ``image`` (uint8[H, W, 3]): one uint8[h, w, 3] per box (at least 1 x 1).

    The window of :func:`clip_crop_windows` (the box with ``context`` padding, square around its centre) is
    cut from the image; its part outside the image is filled with the image's mean colour (per channel,
    rounded). Why: the CLIP processor resizes the shortest side and centre-crops, which would cut the ends
    off an elongated box, and stretching it to a square would distort the object; a square window keeps the
    whole object, undistorted, with a little context around it. With the defaults this is the recipe
    :data:`CLIP_CROP` the CLIP artifact records; a reader reproduces its crops with
    ``clip_crops(image, boxes, context=crop["context"], square=crop["square"])`` from the attr ``crop``."""
    hh, ww = image.shape[:2]
    win = clip_crop_windows(boxes, context, square)
    sides = (win[:, 2:] - win[:, :2]).max(1) if len(win) else np.zeros(0, np.int64)
    if len(sides) and int(sides.max()) > MAX_CROP_FACTOR * max(hh, ww):
        bad = np.round(np.asarray(boxes, dtype=np.float64).reshape(-1, 4)[int(np.argmax(sides))], 1).tolist()
        raise UsageError(f"CLIP crops: box {bad} is far larger than its {hh}x{ww} image")
    fill = np.round(image.reshape(-1, image.shape[2]).mean(0)).astype(image.dtype) if image.size else None
    # The part of each window inside the image.
    ix1, iy1 = np.clip(win[:, 0], 0, ww), np.clip(win[:, 1], 0, hh)
    ix2, iy2 = np.clip(win[:, 2], 0, ww), np.clip(win[:, 3], 0, hh)
    out = []
    for (x1, y1, x2, y2), a, b, c, d in zip(win.tolist(), ix1.tolist(), iy1.tolist(), ix2.tolist(), iy2.tolist()):
        if x1 >= 0 and y1 >= 0 and x2 <= ww and y2 <= hh:
            out.append(np.ascontiguousarray(image[y1:y2, x1:x2]))
            continue
        piece = np.empty((y2 - y1, x2 - x1, image.shape[2]), dtype=image.dtype)
        piece[0] = fill  # one row, then that row everywhere: ~15x faster than broadcasting the 3-vector
        piece[1:] = piece[0]
        if c > a and d > b:
            piece[b - y1:d - y1, a - x1:c - x1] = image[b:d, a:c]
        out.append(piece)
    return out


def clip_crop(image: np.ndarray, box: np.ndarray, context: float = 0.1, square: bool = True) -> np.ndarray:
    """The CLIP crop (uint8[h, w, 3]) of one ``box`` (xyxy pixels) in ``image``: :func:`clip_crops`."""
    return clip_crops(image, np.asarray(box, dtype=np.float64).reshape(1, 4), context, square)[0]


def _recipe_crops(image: np.ndarray, boxes: np.ndarray) -> list[np.ndarray]:
    """:func:`clip_crops` under :data:`CLIP_CROP` (read at call time: the recipe the run's fingerprint holds)."""
    if CLIP_CROP.get("fill") != "mean":
        raise UsageError(f"CLIP crop recipe: fill must be 'mean', got {CLIP_CROP.get('fill')!r}")
    return clip_crops(image, boxes, float(CLIP_CROP["context"]), bool(CLIP_CROP["square"]))


class Extractor:
    """Computes the chunk arrays of the wanted artifacts for a run of image rows.

    ``proposals``: where boxes come from (None: read them from the complete features artifact
    ``existing`` — used when only CLIP embeddings are missing); ``features``: region features and dense
    maps (None: the proposals' own features, and no ground-truth object features);
    ``clip``: embeddings (None: no CLIP artifact); ``detections``: the confidence threshold of the
    features artifact's ``detections/`` section (None: no such section; needs a
    :class:`~refground.features.base.DetectionSource`); ``first_stage``: the proposals are the source's
    first-stage boxes (``propose_first_stage``, the built-in detector's) instead of its final detections.
    """

    def __init__(self, ds: Dataset, proposals: ProposalSource | None, features: FeatureSource | None,
                 clip: ClipEncoder | None, max_proposals: int, batch_size: int, dense_size: int,
                 existing: RaggedH5 | None = None, detections: float | None = None, first_stage: bool = False):
        self.ds, self.proposals, self.features, self.clip = ds, proposals, features, clip
        self.max_proposals, self.batch_size, self.dense_size = max_proposals, max(1, batch_size), dense_size
        self.existing = existing
        self.detections = detections
        self.first_stage = bool(first_stage)
        if detections is not None and proposals is not None and not isinstance(proposals, DetectionSource):
            raise UsageError(f"--detections: the proposal source {type(proposals).__name__} gives no pre-NMS "
                             "boxes; use the built-in detector (--detector builtin[:NAME])")
        if self.first_stage and detections is not None:
            raise UsageError("--first-stage and --detections: the first stage has no detection set; extract "
                             "--detections in a run without --first-stage")
        if self.first_stage and proposals is not None and not hasattr(proposals, "propose_first_stage"):
            raise UsageError(f"--first-stage: the proposal source {type(proposals).__name__} has no first stage; "
                             "use the built-in detector (--detector builtin[:NAME])")
        order = np.argsort(ds.image_ids)
        rows = np.searchsorted(ds.image_ids, ds.query_image_ids, sorter=order)
        q_rows = order[rows] if len(rows) else rows
        # Queries grouped by image row (stable), for the CLIP artifact's queries section.
        self.query_order = np.argsort(q_rows, kind="stable")
        self.query_offsets = np.searchsorted(q_rows[self.query_order], np.arange(ds.num_images + 1))

    @staticmethod
    def _arrays(p: Proposals) -> dict[str, np.ndarray | None]:
        out: dict[str, np.ndarray | None] = {
            "boxes": p.boxes.float().numpy(), "scores": p.scores.float().numpy(),
            "labels": p.labels.numpy().astype(np.int32), "class_scores": _f16(p.class_scores),
            "features": None if p.features is None else _f16(p.features)}
        if p.nms_scores is not None:
            out["nms_scores"] = p.nms_scores.float().numpy()
        return out

    def _proposals(self, images: list[np.ndarray], rows: range, with_detections: bool = False,
                   boxes: list[torch.Tensor] | None = None
                   ) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]] | None, list[torch.Tensor] | None]:
        """(proposal arrays, detection arrays or None, features of ``boxes`` or None) per image of ``rows``.

        With ``boxes`` and a proposal source that pools given boxes in its own pass (``propose_pooled``, the
        built-in detector), their features come from the same region-head call as the proposals'."""
        ds = self.ds
        if self.proposals is None:
            assert self.existing is not None and not with_detections
            out = []
            for r in rows:
                out.append({f: self.existing.image("proposals", f, r)
                            for f in ("boxes", "scores", "labels", "class_scores", "features")})
            return out, None, None
        ids = [int(ds.image_ids[r]) for r in rows]
        if self.first_stage:
            assert not with_detections
            if boxes is not None:
                props, feats = self.proposals.propose_first_stage_pooled(images, ids, self.max_proposals, boxes)
                return [self._arrays(p) for p in props], None, feats
            return [self._arrays(p) for p in self.proposals.propose_first_stage(images, ids, self.max_proposals)], \
                None, None
        if boxes is not None:
            props, dets, feats = self.proposals.propose_pooled(images, ids, self.max_proposals, boxes,
                                                               self.detections if with_detections else None)
            return [self._arrays(p) for p in props], None if dets is None else [self._arrays(d) for d in dets], feats
        if with_detections:
            props, dets = self.proposals.propose_with_detections(images, ids, self.max_proposals, self.detections)
            return [self._arrays(p) for p in props], [self._arrays(d) for d in dets], None
        props = self.proposals.propose(images, ids, self.max_proposals)
        return [self._arrays(p) for p in props], None, None

    def compute(self, rows: range, want: set[str]) -> dict[str, dict[str, np.ndarray]]:
        """Chunk arrays for image rows ``rows`` of each wanted artifact kind."""
        ds = self.ds
        acc: dict[str, dict[str, list[np.ndarray]]] = {k: {} for k in want}

        def add(kind: str, key: str, value: np.ndarray) -> None:
            acc[kind].setdefault(key, []).append(value)

        for b0 in range(rows.start, rows.stop, self.batch_size):
            brows = range(b0, min(b0 + self.batch_size, rows.stop))
            images = [read_image(image_path(ds, int(ds.image_ids[r]))) for r in brows]
            gt = [torch.as_tensor(ds.object_boxes[ds.image_object_offsets[r]:ds.image_object_offsets[r + 1]],
                                  dtype=torch.float32) for r in brows]
            with_dets = self.detections is not None and "features" in want
            # The built-in detector pools the ground-truth boxes in its proposal pass (one region-head call).
            one_pass = ("features" in want and self.features is not None and self.features is self.proposals
                        and hasattr(self.proposals,
                                    "propose_first_stage_pooled" if self.first_stage else "propose_pooled"))
            props, dets, pooled = self._proposals(images, brows, with_dets, gt if one_pass else None) \
                if want & {"features", "clip"} else ([], None, None)
            if "features" in want:
                if pooled is not None:
                    gf = [_f16(f) for f in pooled]
                elif self.features is not None:
                    # A source that is both (the built-in detector) already gave its proposals' features.
                    for group in (props, dets) if dets is not None else (props,):
                        if self.features is not self.proposals or any(p["features"] is None for p in group):
                            pf = self.features.region_features(images, [torch.as_tensor(p["boxes"]) for p in group])
                            for p, f in zip(group, pf):
                                p["features"] = _f16(f)
                    gf = [_f16(f) for f in self.features.region_features(images, gt)]
                else:
                    gf = None
                for r, p, im in zip(brows, props, images):
                    if p["features"] is None:
                        raise UsageError("the proposal source has no region features of its own: "
                                         "give a feature source (--backbone)")
                    add("features", "images.ids", np.array([ds.image_ids[r]], dtype=np.int64))
                    add("features", "images.sizes", np.array([im.shape[:2]], dtype=np.int32))
                    add("features", "proposals.counts", np.array([len(p["boxes"])], dtype=np.int64))
                    for f in ("boxes", "scores", "labels", "class_scores", "features"):
                        add("features", f"proposals.{f}", p[f])
                    sl = slice(ds.image_object_offsets[r], ds.image_object_offsets[r + 1])
                    add("features", "objects.counts", np.array([sl.stop - sl.start], dtype=np.int64))
                    add("features", "objects.ids", ds.object_ids[sl])
                if dets is not None:
                    for d in dets:
                        if d["features"] is None:
                            raise UsageError("--detections: the detections have no region features")
                        add("features", "detections.counts", np.array([len(d["boxes"])], dtype=np.int64))
                        for f in ("boxes", "scores", "nms_scores", "labels", "class_scores", "features"):
                            add("features", f"detections.{f}", d[f])
                if gf is not None:
                    for f in gf:
                        add("features", "objects.features", f)
            if "dense" in want:
                maps = self.features.dense_maps(images, self.dense_size)
                for r, m in zip(brows, maps):
                    add("dense", "images.ids", np.array([ds.image_ids[r]], dtype=np.int64))
                    for s in DENSE_STRIDES:
                        if s in m:
                            add("dense", f"s{s}.map", _f16(m[s])[None])
            if "clip" in want:
                self._clip(images, brows, props, gt, add)
        out: dict[str, dict[str, np.ndarray]] = {}
        for kind, arrays in acc.items():
            out[kind] = {k: np.concatenate(v) for k, v in arrays.items()}
        if "features" in out:
            d = out["features"]
            for key, tail, dtype in (("proposals.boxes", (4,), np.float32), ("proposals.scores", (), np.float32),
                                     ("proposals.labels", (), np.int32)):
                d.setdefault(key, np.zeros((0, *tail), dtype))
        return out

    def _clip(self, images: list[np.ndarray], brows: range, props: list[dict[str, np.ndarray]],
              gt: list[torch.Tensor], add: Callable[[str, str, np.ndarray], None]) -> None:
        ds, clip = self.ds, self.clip
        assert clip is not None
        add("clip", "images.ids", ds.image_ids[brows.start:brows.stop])
        add("clip", "images.embedding", _f16(clip.embed_images(images)))
        for r, im, p, g in zip(brows, images, props, gt):
            for section, boxes in (("proposals", p["boxes"]), ("objects", g.numpy())):
                add("clip", f"{section}.counts", np.array([len(boxes)], dtype=np.int64))
                if len(boxes):
                    add("clip", f"{section}.embedding", _f16(clip.embed_images(_recipe_crops(im, boxes))))
            qs = self.query_order[self.query_offsets[r]:self.query_offsets[r + 1]]
            add("clip", "queries.counts", np.array([len(qs)], dtype=np.int64))
            add("clip", "queries.ids", ds.query_ids[qs])
            if len(qs):
                add("clip", "queries.embedding", _f16(clip.embed_texts([ds.query_texts[q] for q in qs])))


def finalise(partial: Path, categories: list[str] | None = None,
             clip: ClipEncoder | None = None) -> Path:
    """Assemble a ``.partial`` folder whose chunks are all committed into its artifact and write the
    manifest (the last step of a run, or `refground extract merge` after ``--shard`` runs), holding the
    artifact's lock throughout.

    ``categories``: the names to embed for a CLIP artifact (default: its recorded ``category_names``).
    Returns the artifact path (beside the folder, wherever the cache is now). :class:`ArtifactError` if
    chunks are missing or unreadable (an unreadable one is deleted, so the run that owns it redoes it), or
    another process is assembling it.
    """
    partial = Path(partial)
    path = artifact_of(partial)
    with artifact_lock(path):
        if not partial.exists():
            m = read_manifest_of(path)
            if m is not None and m.complete:
                return path  # another shard that finished at the same time assembled it meanwhile
        try:
            plan = json.loads((partial / PLAN_FILE).read_text())
            job_meta = json.loads((partial / "job.json").read_text())
            num_items, chunk_size = int(job_meta["num_items"]), int(job_meta["chunk_size"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(f"{partial}: no readable plan ({exc}); re-run `refground extract`") from None
        threads = plan.get("threads")
        job = ChunkedJob(path, plan["fingerprint"], num_items, chunk_size, required=CHUNK_KEYS.get(plan["kind"], ()))
        job.require_all("refground extract --shard K/N for the missing shards")
        attrs = dict(plan["attrs"])
        with fixed_threads(threads):
            if plan["kind"] == "dense":
                write_zarr(path, job, attrs)
            else:
                extra: list[dict[str, np.ndarray]] = []
                if plan["kind"] == "clip":
                    # Category-name embeddings are computed once, at assembly (they belong to no image).
                    names = list(categories) if categories is not None else attrs.get("category_names") or []
                    if clip is None and names:
                        raise ArtifactError(f"{partial}: CLIP category embeddings need the model; run `refground "
                                            "extract merge` with the same --clip")
                    if names:
                        extra.append({"categories.embedding":
                                      _f16(clip.embed_texts([CLIP_PROMPT.format(n) for n in names]))})
                write_h5(path, job, attrs, extra=extra)
        parents = {k: Parent(**v) for k, v in plan["parents"].items()}
        write_manifest(path, step=plan["step"], params=plan["params"], parents=parents,
                       fingerprint=plan["fingerprint"], kind=plan["kind"],
                       extra={"images": num_items, **provenance(threads)})
        job.remove()
    return path


def run(ds: Dataset, targets: list[Target], extractor: Extractor, chunk_size: int, shard: Shard = Shard(),
        force: bool = False, threads: int | None = None) -> dict[str, Any]:
    """Compute the missing chunks of ``shard`` for every target, then (when all are there) assemble them.

    Holds each target's shard lock throughout (:func:`refground.cache.chunks.shard_lock`: a second process
    on the same chunks is refused). ``force``: redo this shard's chunks even where committed (the other
    shards' are kept: they may be fresh from their own forced runs), and mark the job a forced rebuild so
    the old artifact is no cache hit for the remaining shards. ``threads``: torch threads of the forward
    passes (:func:`fixed_threads`; None: as set). Returns ``{"chunks_computed", "images_computed",
    "finalised": [paths], "pending": [paths]}``.
    """
    with contextlib.ExitStack() as locks:
        for t in targets:
            locks.enter_context(shard_lock(t.path, shard))
            t.threads = threads
            t.open(ds.num_images, chunk_size, shard=shard, force=force)
        jobs = {t.kind: t.job for t in targets}
        first = targets[0].job
        # todo() also deletes (with a warning) committed chunks of this shard that no longer read.
        todo = sorted(set().union(*(set(j.todo(shard)) for j in jobs.values())))
        images = 0
        with fixed_threads(threads):
            for k in track(todo, total=len(todo),
                           description=f"extract {ds.name}" + ("" if shard.whole else f" {shard}")):
                lo, hi = first.chunk_range(k)
                want = {kind for kind, j in jobs.items() if not j.chunk_path(k).exists()}
                arrays = extractor.compute(range(lo, hi), want)
                for kind in want:
                    jobs[kind].save(k, arrays[kind])
                images += hi - lo
        finalised, pending = [], []
        for t in targets:
            # Another shard that finished at the same time may be assembling it now: it will finish it.
            if t.job.missing() or is_locked(t.path):
                pending.append(str(t.path))
            else:
                finalised.append(str(finalise(t.job.dir, categories=ds.categories, clip=extractor.clip)))
    return {"chunks_computed": len(todo), "images_computed": images, "finalised": finalised, "pending": pending}
