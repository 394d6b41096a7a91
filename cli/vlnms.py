"""``refground vlnms``: query-aware proposals from a trained VL-NMS run (or confidence-only NMS)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from refground.cli.apps import app
from refground.cli.console import emit, table
from refground.cli.options import CacheOpt, DatasetOpt, ForceOpt, JsonOpt, ThreadsOpt
from refground.data.model import check_split_name
from refground.errors import UsageError


@app.command("vlnms")
def vlnms_command(
    dataset: DatasetOpt = "synth",
    cache: CacheOpt = None,
    run: Annotated[Optional[str], typer.Option("--run", help="VL-NMS run whose relatedness scores fuse with the "
                                               "detector confidence: NAME (runs/vlnms/NAME), DATASET/NAME (another "
                                               "dataset's, applied as trained; its proposals go to "
                                               "vlnms/DATASET.NAME/) or a run folder.", show_default=False)] = None,
    confidence_only: Annotated[bool, typer.Option("--confidence-only", help="No run: plain NMS on the detector "
                                                  "confidence over the same pre-NMS detections (the baseline).")
                               ] = False,
    splits: Annotated[Optional[list[str]], typer.Option("--split", "-s", help="Split(s) to write (repeatable; "
                                                        "default val, testA, testB).", show_default=False)] = None,
    top_n: Annotated[int, typer.Option("--top-n", help="Proposals kept per query (second stages read the first "
                                       "N of them).")] = 100,
    nms_threshold: Annotated[float, typer.Option("--nms-threshold", help="IoU threshold of the per-class NMS on "
                                                 "the fused score s = r x c.")] = 0.5,
    class_agnostic: Annotated[bool, typer.Option("--class-agnostic", help="Let boxes of different classes "
                                                 "suppress each other.")] = False,
    min_confidence: Annotated[float, typer.Option("--min-confidence", help="Drop detections whose detector "
                                                  "confidence c is below this before the NMS (a detection "
                                                  "threshold; 0 keeps every stored detection).")] = 0.0,
    features: Annotated[Optional[str], typer.Option("--features", help="Features artifact with pre-NMS detections "
                                                    "(default: the run's).", show_default=False)] = None,
    force: ForceOpt = False,
    threads: ThreadsOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Write the top --top-n query-aware proposals of every expression query of each split to
    <cache>/<dataset>/vlnms/<run>/<split>.h5 (boxes, fused scores, region features: what a second stage such
    as `refground eval --method cmrin --candidates vlnms --vlnms-run <run>` reads) and <split>.jsonl (ranked
    boxes for `refground eval --predictions`). Prints the referent and context-object recall@N and the time
    per image."""
    from refground.eval.metrics import RECALL_NS
    from refground.methods.vlnms.run import run_vlnms
    if (run is None) == (not confidence_only):
        raise UsageError("give a trained run with --run NAME, or --confidence-only (not both)")
    for s in splits or []:
        check_split_name(s)
    from refground.threads import parse_threads, use_threads

    with use_threads(parse_threads(threads)):
        results = run_vlnms(dataset, cache, run, tuple(splits or ("val", "testA", "testB")), top_n, nms_threshold,
                            class_agnostic, features, force, min_confidence)
    rows = []
    for r in results:
        rows.append([r["split"], r["status"]]
                    + [r.get(f"recall@{n}") for n in RECALL_NS]
                    + [r.get(f"context_recall@{n}") for n in (5, 10, 20)]
                    + [r.get("ms_per_image")])
    cols = (["split", "status"] + [f"R@{n}" for n in RECALL_NS] + ["ctx R@5", "ctx R@10", "ctx R@20"]
            + ["ms/image"])
    tag = results[0]["tag"] if results else run
    emit({"dataset": dataset, "tag": tag, "splits": results}, as_json,
         [table(f"vlnms {tag}: recall of the referent and of context objects (%)", cols, rows)])
