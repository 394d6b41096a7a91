"""``refground report``: tables that compare runs (the CMRIN Table 2 analogue)."""

from __future__ import annotations

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
