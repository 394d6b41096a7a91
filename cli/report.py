"""``refground report``: tables that compare runs (the CMRIN Table 2 analogue)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from refground.cli.apps import app
from refground.cli.console import emit, table
from refground.cli.options import CacheOpt, DatasetOpt, JsonOpt, OutOpt

report_app = typer.Typer(help="Reports that compare runs.", no_args_is_help=True)
app.add_typer(report_app, name="report")


@report_app.command("cmrin-ablation")
def cmrin_ablation(
    dataset: DatasetOpt = "synth",
    cache: CacheOpt = None,
    runs: Annotated[Optional[str], typer.Option("--runs", help="Comma-separated run names (default: every Table 2 "
                                                "variant with a trained run: instance, global-2, guided-2, fusion-1, "
                                                "fusion-3, cmrin).", show_default=False)] = None,
    out: OutOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Table 2 on the synthetic world: Precision@1 of each CMRIN variant with ground-truth objects as candidates
    on val/testA/testB, overall and on the first- and second-order relation expressions. Writes the markdown
    table to --out (default <cache>/<dataset>/report/cmrin_ablation.md) and the figures beside it as JSON."""
    from refground.ablation import KINDS, SPLITS, ablation_table
    from refground.atomic import atomic_file
    from refground.data.store import dataset_dir

    names = tuple(r.strip() for r in runs.split(",") if r.strip()) if runs else None
    res = ablation_table(dataset, cache, names)
    path = out or dataset_dir(dataset, cache).parent / "report" / "cmrin_ablation.md"
    with atomic_file(path) as fh:
        fh.write(res["markdown"])
    cols = [*SPLITS, *[f"{s}/{k}" for s in SPLITS for k in KINDS]]
    rows = [(r["run"], *[r.get(c, "-") for c in cols]) for r in res["rows"]]
    emit({"dataset": dataset, "markdown_path": str(path), "rows": res["rows"]}, as_json,
         [table(f"CMRIN ablation (Table 2) on {dataset}: Precision@1, ground-truth objects", ["run", *cols], rows)],
         path.with_suffix(".json"))


@report_app.command("vlnms")
def vlnms_report(
    dataset: DatasetOpt = "synth",
    cache: CacheOpt = None,
    runs: Annotated[Optional[str], typer.Option("--runs", help="Comma-separated VL-NMS runs (default: every trained "
                                                "run among fc-bce, fc-rank, trans-bce and their -nopseudo twins).",
                                                show_default=False)] = None,
    cmrin_run: Annotated[str, typer.Option("--cmrin-run", help="CMRIN run used as the second stage.")] = "cmrin",
    timing_images: Annotated[int, typer.Option("--timing-images", help="Images timed for Table 6.")] = 64,
    min_confidence: Annotated[float, typer.Option("--min-confidence", help="Detection floor of the "
                                                  "confidence-only and VL-NMS proposals (`refground vlnms "
                                                  "--min-confidence`).")] = 0.0,
    out: OutOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The VL-NMS tables on the synthetic world: Table 1 (referent and context-object recall@N of the detector's
    proposals, confidence-only NMS and each VL-NMS run), Table 2 (CMRIN Precision@1 with ground-truth objects,
    plain top-10 and VL-NMS top-10), Table 4 (with and without pseudo ground truth) and Table 6 (time per image).
    Proposals and CMRIN predictions that are missing are computed first. Writes markdown to --out (default
    <cache>/<dataset>/report/vlnms.md), the figures as JSON and a recall@N PNG per split beside it."""
    from refground.atomic import atomic_file
    from refground.data.store import dataset_dir
    from refground.errors import UsageError
    from refground.vlnms_report import SPLITS, recall_plot, vlnms_tables

    if timing_images < 1:
        raise UsageError(f"--timing-images {timing_images}: must be at least 1")
    names = tuple(r.strip() for r in runs.split(",") if r.strip()) if runs else None
    res = vlnms_tables(dataset, cache, names, cmrin_run, timing_images=timing_images, min_confidence=min_confidence)
    path = out or dataset_dir(dataset, cache).parent / "report" / "vlnms.md"
    pngs = [str(recall_plot(res, s, path.with_name(f"{path.stem}_recall_{s}.png"))) for s in SPLITS]
    with atomic_file(path) as fh:
        fh.write(res["markdown"] + "\n" + "\n".join(f"![recall@N]({Path(p).name})" for p in pngs) + "\n")
    rows = [(res["labels"][tag], *[f"{100 * per.get(s, {}).get('recall@10', float('nan')):.1f}" for s in SPLITS])
            for tag, per in res["recall"].items()]
    prec = [(res["labels"].get(k, k), *[f"{100 * per.get(s, float('nan')):.1f}" for s in SPLITS])
            for k, per in res["precision"].items()]
    emit({"dataset": dataset, "markdown_path": str(path), "pngs": pngs,
          **{k: v for k, v in res.items() if k != "markdown"}}, as_json,
         [table("referent recall@10 (%)", ["proposals", *SPLITS], rows),
          table(f"CMRIN {cmrin_run!r} Precision@1 (%), top 10", ["candidates", *SPLITS], prec)],
         path.with_suffix(".json"))
