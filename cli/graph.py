"""`refground graph`: spatial relation graphs (CMRIN Sec. 3.1.1) over ground-truth objects and proposals."""

from __future__ import annotations

from typing import Annotated

import typer

from refground.cli.apps import app
from refground.cli.console import emit, info, table
from refground.cli.options import CacheOpt, DatasetOpt, ForceOpt, JsonOpt, SeedOpt


@app.command("graph")
def graph(
    dataset: DatasetOpt = "synth",
    cache: CacheOpt = None,
    features: Annotated[str, typer.Option("--features", help="Features artifact whose proposals get graphs too "
                                          "(features/<name>.h5); empty for ground-truth objects only.")
                        ] = "detector-default",
    force: ForceOpt = False,
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
) -> None:
    """Label every ordered pair of boxes of every image with one of CMRIN's 11 spatial relations (inside,
    cover, overlap, 8 directions; 0 = none) and write graph/<features>.h5. The graph is a pure function of
    the boxes: --seed is recorded for uniformity, nothing is random."""
    from refground.graph_artifact import build_graphs

    res = build_graphs(dataset, cache, features=features, force=force)
    if res["status"] == "hit":
        info(f"{res['path']}: complete and current; skipping (use --force to rebuild)")
    rows = [(k.replace("_", " "), v) for k, v in res.items() if k not in ("dataset",)]
    emit(res, as_json, [table(f"graph {dataset}", ["name", "value"], rows)])
