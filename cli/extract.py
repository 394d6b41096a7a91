"""`refground extract` (and `extract merge`): proposals, region features, dense maps, CLIP embeddings."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from refground.cli.apps import app
from refground.cli.console import emit, info, table
from refground.cli.options import CacheOpt, DatasetOpt, ForceOpt, JsonOpt, SeedOpt

extract_app = typer.Typer(help="Extract proposals, region features, dense maps and CLIP embeddings into the cache.",
                          invoke_without_command=True)
app.add_typer(extract_app, name="extract")

ClipOpt = Annotated[str, typer.Option("--clip", help="CLIP model folder (hf:PATH or PATH, saved with "
                                      "save_pretrained): also write clip/<model>.h5.")]


@extract_app.callback()
def extract(
    ctx: typer.Context,
    dataset: DatasetOpt = "synth",
    cache: CacheOpt = None,
    detector: Annotated[str, typer.Option("--detector", help="Proposal source: builtin[:NAME] (a `refground train "
                                          "detector` run of this dataset; builtin:DATASET/NAME another dataset's, "
                                          "written as features/detector-DATASET.NAME.h5; builtin:PATH a run "
                                          "folder), hf:PATH (transformers object detector), "
                                          "mattnet:FILE (MAttNet detections JSON) or none.")] = "builtin",
    backbone: Annotated[str, typer.Option("--backbone", help="Region-feature source: builtin[:NAME] or hf:PATH "
                                          "(transformers AutoBackbone; RoIAlign over its map). Default: the "
                                          "detector's own.")] = "",
    clip: ClipOpt = "",
    max_proposals: Annotated[Optional[int], typer.Option("--max-proposals", help="Proposals kept per image "
                                                         "(after NMS, best first). Default: 100, or 50 with "
                                                         "--first-stage.", show_default=False)] = None,
    dense: Annotated[Optional[bool], typer.Option("--dense/--no-dense", help="Also write dense maps at strides "
                                                  "8/16/32 to dense/<name>.zarr. Default: on, off with "
                                                  "--first-stage.", show_default=False)] = None,
    dense_size: Annotated[int, typer.Option("--dense-size", help="Side the image is resized to for dense maps "
                                            "(0: the dataset's own square size, else 512).")] = 0,
    name: Annotated[str, typer.Option("--features", help="Features artifact written: features/<name>.h5, the name every reader's --features takes (default: from the detector, e.g. "
                                      "detector-default).")] = "",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 16,
    chunk_size: Annotated[int, typer.Option("--chunk-size", help="Images per committed chunk (the unit of "
                                            "resume and sharding; part of the job, keep it across shards).")] = 64,
    shard: Annotated[str, typer.Option("--shard", help="K/N: compute the K-th of N disjoint blocks (N processes or "
                                       "machines sharing the cache folder), then `refground extract merge`.")] = "",
    detections: Annotated[bool, typer.Option("--detections/--no-detections", help="Also store the detector's "
                                             "pre-NMS boxes with confidence >= --detection-threshold (with "
                                             "features and class scores, in the features artifact's detections/ "
                                             "section), which `refground vlnms` re-ranks. Built-in detector "
                                             "only.")] = False,
    detection_threshold: Annotated[float, typer.Option("--detection-threshold", help="With --detections: the "
                                                       "confidence a pre-NMS box needs to be stored, in (0, 1) "
                                                       "(VL-NMS's delta).")] = 0.05,
    first_stage: Annotated[bool, typer.Option("--first-stage", help="Write the proposals from the built-in "
                                              "detector's first stage instead of its final detections: its "
                                              "boxes after the proposal NMS, unrefined, best first by "
                                              "objectness (the scores), with the region head's categories and "
                                              "features of exactly these boxes (ReIR's RPN proposals), to "
                                              "features/<detector name>-rpn.h5 (e.g. detector-default-rpn). "
                                              "Writes only that artifact (no dense maps, CLIP or "
                                              "--detections).")] = False,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Processes that fill the chunks side by side, "
                                                   "one thread each by default (default: min(2, CPUs); fewer when "
                                                   "there are under 4 chunks each); the bytes do not depend on it.",
                                                   show_default=False)] = None,
    threads: Annotated[int, typer.Option("--threads", help="Torch threads of the forward passes. 1 (the default) "
                                         "gives bytes that do not depend on the machine's cores or "
                                         "OMP_NUM_THREADS; more is faster on many cores, "
                                         "but the bytes then depend on the count (it becomes part of the "
                                         "artifacts' fingerprints). For speed with the same bytes, run --shard "
                                         "K/N processes side by side instead.")] = 1,
    force: ForceOpt = False,
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
) -> None:
    """Write, for every image, up to N proposals (boxes, confidences, labels, class scores) with a region
    feature each and the same features for every ground-truth object (features/<name>.h5), dense maps
    (dense/<name>.zarr), and with --clip CLIP embeddings of images, crops, queries and category names.
    With --detections the features artifact also holds the detector's pre-NMS boxes (VL-NMS's set B).
    With --first-stage the proposals are the built-in detector's first-stage boxes (features/<name>-rpn.h5).
    Resumes after an interruption; skips artifacts that are complete and current (--force redoes them; with
    --shard K/N only the K-th block, so every shard of a forced job runs with --force, and the last one, or
    `extract merge`, replaces the artifact)."""
    if ctx.invoked_subcommand is not None:
        return
    from refground.errors import UsageError
    from refground.features.pipeline import default_workers, extract_dataset

    if not 0.0 < detection_threshold < 1.0:
        raise UsageError(f"--detection-threshold {detection_threshold}: must be in (0, 1), e.g. 0.05")
    res = extract_dataset(dataset, cache, detector=detector, backbone=backbone, clip=clip,
                          max_proposals=max_proposals, dense=dense, dense_size=dense_size, name=name,
                          batch_size=batch_size, chunk_size=chunk_size, shard=shard, force=force, seed=seed,
                          detections=detection_threshold if detections else None, threads=threads,
                          workers=workers if workers is not None else default_workers(), first_stage=first_stage)
    if res.get("cache_hit"):
        info("all artifacts complete and current: cache hit (use --force to recompute)")
    rows = [(kind, a["status"], a["path"]) for kind, a in res["artifacts"].items()]
    figures = [("seconds", res["seconds"])]
    for key in ("images_computed", "images_per_second", "proposals_per_image", "detections_per_image",
                "feature_dim"):
        if res.get(key) is not None:
            figures.append((key.replace("_", " "), res[key]))
    if res.get("pending"):
        info(f"shard {res['shard']} done; when every shard is, run `refground extract merge --dataset {dataset}`")
    emit(res, as_json, [table(f"extract {dataset} ({res['name']})", ["kind", "status", "path"], rows),
                        table("figures", ["name", "value"], figures)])


@extract_app.command("merge")
def merge(dataset: DatasetOpt = "synth", cache: CacheOpt = None, clip: ClipOpt = "", as_json: JsonOpt = False) -> None:
    """Assemble artifacts filled by `refground extract --shard K/N` runs once every shard is done."""
    from refground.features.pipeline import merge as merge_shards

    res = merge_shards(dataset, cache, clip=clip)
    emit(res, as_json, [table(f"merged ({dataset})", ["path"], [(p,) for p in res["merged"]])])
