"""The ``refground extract`` step as a library call: resolve sources, decide what is current, run, merge.

Artifact names: ``features/<name>.h5`` and ``dense/<name>.zarr`` with ``name`` the detector's short name
(``detector-default``, ``hf-<folder>``, ``mattnet-<file stem>``; with a separate ``--backbone`` its name
is appended after ``+``), ``clip/<clip name>.h5``. Fingerprints chain the dataset, the input files
(checkpoint, model folders, detections file) and the parameters (:mod:`refground.cache.manifest`).

``first_stage`` (``--first-stage``, the built-in detector only) writes the features artifact from the
detector's first-stage proposals (ReIR's RPN proposals, :meth:`BuiltinDetector.propose_first_stage`) under
``<detector name>-rpn`` (:func:`first_stage_name`; e.g. ``features/detector-default-rpn.h5``), 50 per image
unless ``max_proposals`` says otherwise; its fingerprint parameters and attrs carry ``proposal_stage =
"first"`` (:func:`proposal_stage` reads it back). Nothing else is written with it: the dense maps do not
depend on the stage, and a CLIP artifact (named after the CLIP model alone) would stand for one stage only.

``--force`` redoes the chunks of this run's shard only (:meth:`refground.cache.ChunkedJob.restart`): the
shards of a forced sharded job each redo their own, and the complete artifact made before is no cache hit
while the forced job is pending (:func:`refground.cache.chunks.rebuild_pending`); the last shard (or
`refground extract merge`) replaces it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from refground.cache import (Parent, RaggedH5, Shard, fingerprint, is_current, parent, partial_progress,
                             require)
from refground.cache.chunks import partial_dir, rebuild_pending
from refground.cache.manifest import parent_fingerprints
from refground.data.store import dataset_dir, load_dataset
from refground.errors import ArtifactError, UsageError
from refground.features import extract as X
from refground.features.base import DENSE_STRIDES
from refground.features.contents import lacks_object_features
from refground.features.sources import resolve

log = logging.getLogger("refground")

FEATURES_STEP = "extract.features@1"
DENSE_STEP = "extract.dense@1"
CLIP_STEP = "extract.clip@1"
DEFAULT_MAX_PROPOSALS = 100  # proposals per image of the final stage when not given
FIRST_STAGE_MAX_PROPOSALS = 50  # with first_stage: ReIR's M (the RPN's top 50)
FIRST_STAGE_SUFFIX = "-rpn"  # features name of the first stage: <detector name>-rpn


def artifact_paths(root: Path, name: str, clip_name: str = "") -> dict[str, Path]:
    return {"features": root / "features" / f"{name}.h5", "dense": root / "dense" / f"{name}.zarr",
            "clip": root / "clip" / f"{clip_name}.h5"}


def features_path(dataset: str, cache: Any, name: str = "detector-default") -> Path:
    """Where the features artifact ``name`` of ``dataset`` lives."""
    return artifact_paths(dataset_dir(dataset, cache).parent, name)["features"]


def first_stage_name(detector_name: str = "detector-default") -> str:
    """The features name `refground extract --first-stage` gives the detector named ``detector_name`` (the
    name of its final-stage features, e.g. ``detector-default`` -> ``detector-default-rpn``)."""
    return f"{detector_name}{FIRST_STAGE_SUFFIX}"


def proposal_stage(path: str | Path) -> str:
    """Which stage the proposals of the complete features artifact ``path`` come from: ``"first"`` (made with
    ``--first-stage``) or ``"final"``; reads its manifest only (one-line :class:`ArtifactError` naming
    `refground extract` when it is missing or incomplete)."""
    m = require(Path(path), "refground extract")
    return str((m.params or {}).get("proposal_stage", "final"))


def require_features(path: Path) -> None:
    """:class:`ArtifactError` naming `refground extract` unless ``path`` is a complete, current features
    artifact (its dataset and model inputs unchanged)."""
    require(path, "refground extract", check_parents=True)


def extract_dataset(dataset: str, cache: Any = None, detector: str = "builtin", backbone: str = "",
                    clip: str = "", max_proposals: int | None = None, dense: bool | None = None,
                    dense_size: int = 0, name: str = "", batch_size: int = 16, chunk_size: int = 64,
                    shard: str = "", force: bool = False, seed: int = 0, detections: float | None = None,
                    threads: int = 1, workers: int = 1, warn: bool = True,
                    first_stage: bool = False) -> dict[str, Any]:
    """Fill (or find current) the features, dense and CLIP artifacts of ``dataset``. Returns a summary:
    per artifact its path and status (``hit``, ``written``, ``pending`` for shards), counts and timing.

    ``workers``: processes that fill the chunks side by side (each one shard, on ``threads`` threads), then
    one assembles: the bytes do not depend on it. Fewer are started when there are fewer than
    ``MIN_CHUNKS_PER_WORKER`` chunks per worker (starting one costs seconds); ignored with ``shard``.

    ``threads``: torch threads of the forward passes (``--threads``). The default 1 makes the bytes
    independent of the machine's cores and ``OMP_NUM_THREADS``; another count is faster on many cores but
    its bytes differ (by float16 rounding), so it is part of the artifacts' fingerprints.

    ``warn``: log (logger ``refground``) what the features artifact about to be written will lack, before the
    work (off in the worker processes of ``workers``: their parent says it once).

    ``detections``: a confidence threshold in (0, 1) (VL-NMS's delta, 0.05 in the paper) to also store the
    detector's pre-NMS boxes at or above it in the features artifact's ``detections/`` section (built-in
    detector only); None (default) leaves the artifact, and its fingerprint, as without the option.

    ``first_stage``: the proposals are the built-in detector's first-stage boxes (see the module docstring);
    ``max_proposals`` defaults to :data:`DEFAULT_MAX_PROPOSALS`, or :data:`FIRST_STAGE_MAX_PROPOSALS` with
    ``first_stage``; ``dense`` defaults to True, or False with ``first_stage`` (which writes only the
    features artifact: ``dense=True``, ``clip`` or ``detections`` with it are a :class:`UsageError`)."""
    t0 = time.perf_counter()
    if max_proposals is None:
        max_proposals = FIRST_STAGE_MAX_PROPOSALS if first_stage else DEFAULT_MAX_PROPOSALS
    if dense is None:
        dense = not first_stage
    if first_stage:
        # Said before anything is resolved or loaded.
        if dense:
            raise UsageError("--first-stage writes only the features artifact (dense maps do not depend on the "
                             "stage): drop --dense, or extract them in a run without --first-stage")
        if clip:
            raise UsageError("--first-stage with --clip: the CLIP artifact is named after the model alone, so it "
                             "can stand for one stage only; extract --clip in a run without --first-stage")
        if detections is not None:
            raise UsageError("--first-stage with --detections: the first stage has no detection set; extract "
                             "--detections in a run without --first-stage")
    if max_proposals < 1:
        raise UsageError(f"--max-proposals {max_proposals}: must be at least 1")
    if detections is not None and not 0.0 < float(detections) < 1.0:
        raise UsageError(f"--detection-threshold {detections}: must be in (0, 1), e.g. 0.05")
    if chunk_size < 1 or batch_size < 1:
        raise UsageError("--chunk-size and --batch-size must be at least 1")
    if threads < 1:
        raise UsageError(f"--threads {threads}: must be at least 1 (1, the default, gives bytes that do "
                         "not depend on the thread count)")
    if workers < 1:
        raise UsageError(f"--workers {workers}: must be at least 1")
    sh = Shard.parse(shard)
    ds_dir = dataset_dir(dataset, cache)
    ds_parent = parent("dataset", ds_dir)
    root = ds_dir.parent
    runs = root / "runs"
    det = resolve(detector, "detector", runs)
    bb = resolve(backbone, "backbone", runs) if backbone else None
    feat = bb if bb is not None else (det if det.kind in ("builtin",) else None)
    if det.kind == "none" and feat is None:
        raise UsageError("--detector none needs a --backbone for ground-truth object features")
    if detections is not None and det.kind != "builtin":
        raise UsageError(f"--detections: --detector {det.spec or 'none'} gives no pre-NMS boxes; only the built-in "
                         "detector (--detector builtin[:NAME]) does")
    if first_stage and det.kind != "builtin":
        raise UsageError(f"--first-stage: --detector {det.spec or 'none'} has no first stage; only the built-in "
                         "detector (--detector builtin[:NAME]) proposes in two stages")
    det_name = first_stage_name(det.name) if first_stage else det.name
    name = name or (det_name if det.kind != "none" else feat.name) + (f"+{bb.name}" if bb and det.kind != "none" else "")
    clip_spec = resolve(clip, "clip", runs) if clip else None
    paths = artifact_paths(root, name, clip_spec.name if clip_spec else "")

    targets: list[X.Target] = []
    status: dict[str, Any] = {}
    f_params = {"detector": det.spec, "backbone": backbone, "max_proposals": max_proposals,
                "format_version": X.FORMAT_VERSION}
    if detections is not None:
        # Only when on: artifacts made without the option keep their fingerprints.
        f_params["detections"] = float(detections)
    if first_stage:
        # Only when on, like detections: a first-stage artifact is never current for a final-stage request
        # (nor the other way round), whatever its name.
        f_params["proposal_stage"] = "first"
    # Bytes made on other thread counts differ: another artifact state. Only when not 1, so artifacts made
    # with the default keep their fingerprints.
    t_params = {"threads": int(threads)} if threads != 1 else {}
    f_params.update(t_params)
    f_parents = {"dataset": ds_parent, **({"detector": det.parent} if det.parent else {}),
                 **({"backbone": bb.parent} if bb else {})}
    f_fp = fingerprint(FEATURES_STEP, f_params, parent_fingerprints(f_parents))
    wanted = {"features": (FEATURES_STEP, f_params, f_parents, f_fp)}
    if dense and feat is not None:
        d_params = {"dense_size": dense_size, "format_version": X.FORMAT_VERSION, **t_params}
        d_parents = {"dataset": ds_parent, "backbone": feat.parent}
        wanted["dense"] = (DENSE_STEP, d_params, d_parents, fingerprint(DENSE_STEP, d_params,
                                                                         parent_fingerprints(d_parents)))
    if clip_spec is not None:
        c_parents = {"dataset": ds_parent, "clip": clip_spec.parent,
                     "features": Parent("artifact", str(paths["features"]), f_fp)}
        # The crop recipe (context padding, square window, mean fill): crops cut another way are another artifact.
        c_params = {"format_version": X.FORMAT_VERSION, "prompt": X.CLIP_PROMPT, "crop": dict(X.CLIP_CROP),
                    **t_params}
        wanted["clip"] = (CLIP_STEP, c_params, c_parents, fingerprint(CLIP_STEP, c_params,
                                                                      parent_fingerprints(c_parents)))
    for kind, (step, params, parents, fp) in wanted.items():
        path = paths[kind]
        # A forced rebuild under way (another shard ran with --force) makes the old artifact no hit.
        if not force and is_current(path, fp) and not rebuild_pending(path, fp):
            status[kind] = {"path": str(path), "status": "hit"}
            continue
        targets.append(X.Target(kind, path, step, params, parents, fp))
        status[kind] = {"path": str(path), "status": "todo"}
    result: dict[str, Any] = {"dataset": dataset, "name": name, "artifacts": status, "shard": str(sh)}
    if not targets:
        result["seconds"] = round(time.perf_counter() - t0, 3)
        result["cache_hit"] = True
        return result

    if "features" in {t.kind for t in targets} and feat is None:
        # Said before any model or image is loaded: the user learns it now, not after the extraction.
        if det.kind == "mattnet":
            raise UsageError(f"--detector {det.spec}: MAttNet detections are boxes only; add --backbone hf:PATH (a "
                             "transformers backbone) or builtin[:NAME] (a built-in detector run) for their features")
        why = lacks_object_features(paths["features"], det, bb)
        if why and warn:
            log.warning(why)
    ds = load_dataset(ds_dir)
    chunks = -(-ds.num_images // chunk_size)
    workers = min(workers, max(1, chunks // MIN_CHUNKS_PER_WORKER)) if sh.whole else 1
    if workers > 1:
        args = dict(dataset=dataset, cache=cache, detector=detector, backbone=backbone, clip=clip,
                    max_proposals=max_proposals, dense=dense, dense_size=dense_size, name=name,
                    batch_size=batch_size, chunk_size=chunk_size, force=force, seed=seed, detections=detections,
                    threads=threads, warn=False, first_stage=first_stage)
        ran = _run_workers(args, workers, [t.path for t in targets], clip)
        for t in targets:
            status[t.kind]["status"] = "written"
        seconds = time.perf_counter() - t0
        result.update(ran, seconds=round(seconds, 3), cache_hit=False,
                      images_per_second=round(ran["images_computed"] / seconds, 2) if seconds > 0 else None)
        if "features" in status:
            result.update(_features_figures(paths["features"]))
        return result
    torch.manual_seed(seed)
    det_model = det.load(ds) if det.kind != "none" else _NoProposals()
    feat_model = feat.load(ds) if feat is not None else None
    clip_model = clip_spec.load(ds) if clip_spec is not None else None
    size = dense_size or _default_dense_size(ds)
    class_names = list(getattr(det_model, "class_names", []) or [])
    for t in targets:
        t.attrs = {"format": {"features": X.FEATURES_FORMAT, "dense": X.DENSE_FORMAT, "clip": X.CLIP_FORMAT}[t.kind],
                   "version": X.FORMAT_VERSION, "dataset": dataset, "name": name}
        if t.kind == "features":
            t.attrs.update(class_names=class_names, max_proposals=max_proposals,
                           feature_dim=int(getattr(feat_model or det_model, "feature_dim", 0) or 0),
                           sources={"detector": det_model.identity(),
                                    "backbone": feat_model.identity() if feat_model is not None else None})
            if detections is not None:
                t.attrs["detection_threshold"] = float(detections)
            if first_stage:
                t.attrs["proposal_stage"] = "first"
        elif t.kind == "dense":
            t.attrs.update(strides=[s for s in DENSE_STRIDES if s in feat_model.dense_channels],
                           size=size, channels={str(k): v for k, v in feat_model.dense_channels.items()})
        else:
            t.attrs.update(category_names=list(ds.categories), prompt=X.CLIP_PROMPT,
                           embed_dim=int(clip_model.embed_dim), crop=dict(t.params["crop"]))
    existing = None
    if "features" not in {t.kind for t in targets} and "clip" in {t.kind for t in targets}:
        existing = RaggedH5(paths["features"])
    extractor = X.Extractor(ds, None if existing is not None else det_model, feat_model, clip_model,
                            max_proposals, batch_size, size, existing=existing,
                            detections=float(detections) if detections is not None else None,
                            first_stage=first_stage)
    try:
        ran = X.run(ds, targets, extractor, chunk_size, sh, force=force, threads=threads)
    finally:
        if existing is not None:
            existing.close()
    for t in targets:
        status[t.kind]["status"] = "written" if str(t.path) in ran["finalised"] else "pending"
        if status[t.kind]["status"] == "pending":
            status[t.kind]["progress"] = partial_progress(t.path)
    seconds = time.perf_counter() - t0
    result.update(ran, seconds=round(seconds, 3), cache_hit=False,
                  images_per_second=round(ran["images_computed"] / seconds, 2) if seconds > 0 else None)
    if "features" in status and status["features"]["status"] != "pending":
        result.update(_features_figures(paths["features"]))
    return result


MIN_CHUNKS_PER_WORKER = 4


def default_workers() -> int:
    """``--workers`` when not given: min(2, CPUs), like ``data synth``'s."""
    import os

    return max(1, min(2, os.cpu_count() or 1))


def _features_figures(path: Path) -> dict[str, Any]:
    """Proposals (and detections) per image and the feature width of a features artifact."""
    out: dict[str, Any] = {}
    with RaggedH5(path) as f:
        counts = f.counts("proposals")
        out["proposals_per_image"] = round(float(counts.mean()), 2) if len(counts) else 0.0
        out["feature_dim"] = int(f.file["objects"]["features"].shape[1]) if f.has("objects", "features") else 0
        if f.has("detections", "offsets"):
            dc = f.counts("detections")
            out["detections_per_image"] = round(float(dc.mean()), 2) if len(dc) else 0.0
    return out


def _worker(args: dict[str, Any]) -> dict[str, Any]:
    """One worker process of :func:`_run_workers`: its shard's chunks (the last one to finish assembles)."""
    res = extract_dataset(**args)
    return {"chunks_computed": int(res.get("chunks_computed", 0)), "images_computed": int(res.get("images_computed", 0))}


def _run_workers(args: dict[str, Any], workers: int, paths: list[Path], clip: str) -> dict[str, Any]:
    """Fill every chunk with ``workers`` processes, shard ``k/workers`` each (spawned: a fresh interpreter
    has no threads a fork could deadlock on), then make sure the artifacts are assembled (two shards that
    finish at the same instant may both leave that to a merge). Returns the summed chunk/image counts."""
    import multiprocessing

    jobs = [{**args, "shard": f"{k + 1}/{workers}"} for k in range(workers)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        parts = pool.map(_worker, jobs)
    if any(not Path(p).exists() or partial_dir(p).exists() for p in paths):
        merge(args["dataset"], args["cache"], clip=clip)
    return {"chunks_computed": sum(p["chunks_computed"] for p in parts),
            "images_computed": sum(p["images_computed"] for p in parts), "workers": workers}


class _NoProposals:
    """``--detector none``: an empty proposal list per image (ground-truth features only)."""

    class_names: list[str] = []

    def identity(self) -> dict[str, Any]:
        return {"kind": "none"}

    def propose(self, images, image_ids, max_proposals):
        from refground.features.base import Proposals

        z = torch.zeros
        return [Proposals(z(0, 4), z(0), z(0, dtype=torch.int64), z(0, 0), z(0, 0)) for _ in images]


def _default_dense_size(ds: Any) -> int:
    """The common image side when all images are the same square size, else 512 (a multiple of 32)."""
    import numpy as np

    if len(ds.image_width) and np.all(ds.image_width == ds.image_width[0]) and np.all(
            ds.image_height == ds.image_width[0]) and ds.image_width[0] % 32 == 0:
        return int(ds.image_width[0])
    return 512


def merge(dataset: str, cache: Any = None, clip: str = "") -> dict[str, Any]:
    """Assemble every ``.partial`` artifact of ``dataset`` whose shards are all done (`extract merge`)."""
    root = dataset_dir(dataset, cache).parent
    clip_model = resolve(clip, "clip", root / "runs").load(None) if clip else None
    done, waiting = [], []
    for kind in ("features", "dense", "clip"):
        for partial in sorted((root / kind).glob("*.partial")):
            if not (partial / X.PLAN_FILE).exists():
                continue
            prog = partial_progress(partial.with_name(partial.name[:-len(".partial")]))
            if prog and prog[0] < prog[1]:
                waiting.append({"path": str(partial), "chunks_done": prog[0], "chunks": prog[1]})
                continue
            done.append(str(X.finalise(partial, clip=clip_model)))
    if not done and not waiting:
        raise ArtifactError(f"{root}: nothing to merge (no .partial artifacts); run `refground extract --shard K/N`")
    if waiting:
        w = waiting[0]
        raise ArtifactError(f"{w['path']}: {w['chunks'] - w['chunks_done']} of {w['chunks']} chunks missing; "
                            "finish the remaining `refground extract --shard K/N` runs first")
    return {"dataset": dataset, "merged": done}
