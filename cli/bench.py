"""`refground bench`: run registered benchmarks; a table and a JSON file of measured ratios."""

from __future__ import annotations

import platform
from typing import Annotated, Optional

import typer

from refground.bench import list_benchmarks, run_benchmarks
from refground.cli.apps import app
from refground.cli.console import emit, info, table
from refground.cli.options import CacheOpt, DatasetOpt, JsonOpt, OutOpt, SeedOpt
from refground.data.store import cache_root
from refground.tables import FLOAT, RATIO, TEXT, format_value, unit_kind


@app.command("bench")
def bench(
    names: Annotated[Optional[list[str]], typer.Argument(help="Benchmarks to run (default: all). See --list.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Small sizes: seconds instead of minutes.")] = False,
    list_: Annotated[bool, typer.Option("--list", help="List the registered benchmarks and exit.")] = False,
    seed: SeedOpt = 0,
    out: OutOpt = None,
    cache: CacheOpt = None,
    dataset: DatasetOpt = "synth",
    queries: Annotated[Optional[int], typer.Option("--queries", help="Queries timed by the benchmarks that read a "
                                                   "cached dataset (bicm: default 50, 5 with --quick).",
                                                   show_default=False)] = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure our implementations against simple baselines, side by side in one run. Benchmarks that read a
    cached dataset (bicm: --dataset in --cache, which must hold its CLIP artifact) run only when named."""
    if list_:
        for n in list_benchmarks():
            print(n)
        return
    results = run_benchmarks(list(names or []), quick=quick, seed=seed,
                             options={"dataset": dataset, "cache": cache, "queries": queries})
    payload = {"quick": quick, "seed": seed, "machine": platform.machine(), "python": platform.python_version(),
               "results": [r.as_dict() for r in results]}
    # A row's figure and baseline are in its own unit: formatted here, by that unit's kind.
    rows = [(r.name, format_value(r.figure, unit_kind(r.unit)), r.unit, format_value(r.baseline, unit_kind(r.unit)),
             r.ratio) for r in results]
    t = table("refground bench" + (" (quick)" if quick else ""), ["name", "figure", "unit", "baseline", "ratio"], rows,
              [TEXT, FLOAT, TEXT, FLOAT, RATIO])
    emit(payload, as_json, [t], out or cache_root(cache) / "bench" / ("bench-quick.json" if quick else "bench.json"))
    if not as_json:  # notes are sentences: under the table, not squeezed into a column
        for r in results:
            if r.note:
                info(f"  {r.name}: {r.note}")
