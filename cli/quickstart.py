"""``refground quickstart``: the main job, end to end on the embedded default (see refground.quickstart)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from refground.cli.apps import app
from refground.cli.console import emit, info, table
from refground.cli.options import CacheOpt, JsonOpt, SeedOpt, ThreadsOpt, read_config_file
from refground.tables import COUNT, FLOAT, PERCENT, SECONDS, TEXT


@app.command("quickstart")
def quickstart(
    cache: CacheOpt = None,
    seed: SeedOpt = 0,
    cmrin_epochs: Annotated[Optional[int], typer.Option("--cmrin-epochs", help="CMRIN training epochs (default: "
                                                        "the quickstart schedule, see README).",
                                                        show_default=False)] = None,
    top_n: Annotated[int, typer.Option("--top-n", help="Detector proposals per image for the proposal "
                                       "evaluation.")] = 10,
    num_images: Annotated[int, typer.Option("--num-images", help="Images of the synthetic world.")] = 5000,
    image_size: Annotated[int, typer.Option("--image-size", help="Image side in pixels.")] = 256,
    detector_config: Annotated[Optional[Path], typer.Option("--detector-config", help="JSON file of detector config "
                                                            "fields (default: the built-in detector's).",
                                                            show_default=False)] = None,
    cmrin_config: Annotated[Optional[Path], typer.Option("--cmrin-config", help="JSON file of CMRIN config fields "
                                                         "(default: the full model; --cmrin-epochs overrides its "
                                                         "epochs).", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Redo every step: regenerate, retrain the detector and "
                                        "CMRIN in place (needed when this cache holds runs of other settings), "
                                        "re-extract, re-evaluate.")] = False,
    threads: ThreadsOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Generate the default synthetic dataset, train the built-in detector, extract region features, build the
    spatial relation graphs, train CMRIN, evaluate it on val/testA/testB with ground-truth objects and with the
    detector's top-N proposals, and write a report (markdown + PNGs) under <cache>/synth/report/. Each step is
    skipped when its artifact is already current, so running it again only re-reads the results."""
    from refground.errors import UsageError
    from refground.features.detector import DetectorConfig
    from refground.methods.cmrin.model import CMRINConfig
    from refground.quickstart import QUICK_EPOCHS, run_quickstart
    from refground.train import config_of

    if cmrin_epochs is not None and cmrin_epochs < 1:
        raise UsageError(f"--cmrin-epochs {cmrin_epochs}: must be at least 1")
    if top_n < 1:
        raise UsageError(f"--top-n {top_n}: must be at least 1")
    det = config_of(DetectorConfig.from_dict, read_config_file(detector_config, "detector config"),
                    str(detector_config)) if detector_config else None
    cm = None
    if cmrin_config is not None:
        fields = read_config_file(cmrin_config, "CMRIN config")
        cm = config_of(CMRINConfig.from_dict, {**fields, **({"epochs": cmrin_epochs} if cmrin_epochs else {})},
                       str(cmrin_config))
    steps = iter(range(1, 8))
    from refground.threads import parse_threads

    result = run_quickstart(cache, seed=seed, cmrin_epochs=cmrin_epochs or QUICK_EPOCHS, top_n=top_n,
                            on_step=lambda name: info(f"[{next(steps)}/7] {name}"), images=num_images,
                            image_size=image_size, detector_config=det, cmrin_config=cm, force=force,
                            threads=parse_threads(threads))
    kinds = [k for k in result["precision"].get("val", {})]
    rows = [(s, *[result["precision"][s].get(k, "-") for k in kinds]) for s in result["precision"]]
    drop = [(s, result["precision"][s].get("all"), result["proposals"][s].get("all"),
             result["precision"][s].get("all", 0) - result["proposals"][s].get("all", 0)) for s in result["precision"]]
    # The columns are expression kinds and candidate sets: their kind is Precision@1, not inferable by name.
    tables = [table("CMRIN Precision@1 (%), ground-truth objects as candidates", ["split", *kinds], rows,
                    [TEXT, *[PERCENT] * len(kinds)]),
              table(f"Precision@1 (%) with the detector's top {result['top_n']} proposals",
                    ["split", "gt", "proposals", "drop"], drop, [TEXT, PERCENT, PERCENT, PERCENT]),
              table("stages: seconds and throughput (README, \"Time\", gives the expected figures)",
                    ["step", "seconds", "throughput", "unit", "threads", "status"],
                    [(s["step"], s["seconds"], s.get("throughput"), s.get("unit", ""), s.get("threads"), s["status"])
                     for s in result["steps"]], [TEXT, SECONDS, FLOAT, TEXT, COUNT, TEXT])]
    emit(result, as_json, tables)
    if not as_json:
        info(f"report: {result['report']} ({result['seconds']} s in all)")
