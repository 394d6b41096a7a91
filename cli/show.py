"""`refground show`: a PNG of a query with its ground truth and, optionally, predictions or a method's maps.

With ``--method cmrin`` it draws CMRIN's Figure 4 for the query from a trained run: ground truth, the
vertex-gate ("attention score") map and the matching-score map (:func:`refground.viz.render_cmrin_figure`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from refground.cli.apps import app
from refground.cli.console import info
from refground.cli.options import CacheOpt, DatasetOpt, OutOpt, SplitOpt
from refground.data.store import cache_root, load_named
from refground.errors import UsageError
from refground.viz import render_query, save_png

METHODS = ("cmrin",)


@app.command("show")
def show(
    dataset: DatasetOpt = "synth",
    query: Annotated[Optional[int], typer.Option("--query", "-q", help="Query id (default: pick by --split/--index).")] = None,
    split: SplitOpt = "val",
    index: Annotated[int, typer.Option("--index", help="Position of the query in --split when --query is not given.")] = 0,
    predictions: Annotated[Optional[Path], typer.Option("--predictions", "-p", help="Predictions file (JSON lines) to draw.")] = None,
    proposals: Annotated[int, typer.Option("--proposals", help="Draw the first N boxes of a ranked prediction as proposals.")] = 0,
    no_mask: Annotated[bool, typer.Option("--no-mask", help="Do not overlay ground-truth masks.")] = False,
    method: Annotated[Optional[str], typer.Option("--method", help="Draw a method's own maps from a trained run: "
                                                  "cmrin (Figure 4: ground truth, vertex-gate map, matching-score "
                                                  "map). --index then counts expression queries only.",
                                                  show_default=False)] = None,
    run: Annotated[str, typer.Option("--run", help="With --method: the run name (<cache>/<dataset>/runs/<method>/"
                                     "<run>/).")] = "cmrin",
    candidates: Annotated[str, typer.Option("--candidates", help="With --method: score the ground-truth objects "
                                            "(gt) or the detector's proposals (proposals).")] = "gt",
    top_n: Annotated[int, typer.Option("--top-n", help="With --candidates proposals: the first N proposals.")] = 10,
    out: OutOpt = None,
    cache: CacheOpt = None,
) -> None:
    """Write a PNG: image, query text, ground-truth box and mask, context objects, predictions; with
    --method cmrin, the paper's Figure 4 (vertex-gate and matching-score maps) from a trained run."""
    if method is not None and method not in METHODS:
        raise UsageError(f"--method {method!r}: unknown method; expected one of: {', '.join(METHODS)}")
    ds = load_named(dataset, cache)
    task = "expression" if method is not None else None
    if query is None:
        rows = ds.query_rows(split, task)
        if not 0 <= index < len(rows):
            what = "expression queries" if task else "queries"
            raise UsageError(f"--index {index} is outside split {split!r} ({len(rows)} {what})")
        q = ds.queries(split, task)[index]
    else:
        q = ds.query(query)
    if method is not None:
        _show_method(ds, q, dataset, cache, method, run, candidates, top_n, predictions, proposals, no_mask, out)
        return
    pred_boxes: list = []
    pred_mask = None
    prop: list = []
    if predictions is not None:
        from refground.eval.predictions import read_predictions

        preds = read_predictions(predictions)
        if q.task == "caption":  # one prediction per phrase: draw each phrase's top box
            pred_boxes = [p.top_box for (qid, _), p in sorted(preds.phrases.items()) if qid == q.id and p.top_box]
        elif q.id in preds.queries:
            p = preds.queries[q.id]
            ranked = list(p.ranked)
            pred_boxes, pred_mask = ranked[:1], p.mask
            prop = ranked[1:proposals] if proposals else []
        if not pred_boxes and pred_mask is None:
            raise UsageError(f"{predictions}: no prediction for query {q.id}")
    image = render_query(ds, q, pred_boxes, pred_mask, prop, show_mask=not no_mask)
    path = out or cache_root(cache) / dataset / "show" / f"query_{q.id}.png"
    save_png(image, path)
    info(f"wrote {path}")


def _show_method(ds, q, dataset: str, cache: Optional[Path], method: str, run: str, candidates: str, top_n: int,
                 predictions: Optional[Path], proposals: int, no_mask: bool, out: Optional[Path]) -> None:
    from refground.models.cmrin_run import explain_query
    from refground.viz import render_cmrin_figure

    if predictions is not None or proposals:
        raise UsageError("--predictions/--proposals cannot be combined with --method (the run scores the query)")
    if candidates not in ("gt", "proposals"):
        raise UsageError(f"--candidates {candidates!r}: expected gt or proposals")
    if top_n < 1:
        raise UsageError(f"--top-n {top_n}: must be at least 1")
    ex = explain_query(dataset, cache, run, q.id, candidates, top_n)
    image = render_cmrin_figure(ds, ex["query"], ex["boxes"], ex["scores"], ex.get("vertex_gates"),
                                candidates=ex["candidates"], show_mask=not no_mask)
    path = out or cache_root(cache) / dataset / "show" / f"{method}_{run}_query_{q.id}.png"
    save_png(image, path)
    info(f"wrote {path} ({method} run {run}, query {q.id}, {len(ex['boxes'])} {ex['candidates']} candidates)")
