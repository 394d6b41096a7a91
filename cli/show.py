"""`refground show`: a PNG of a query with its ground truth and, optionally, predictions."""

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


@app.command("show")
def show(
    dataset: DatasetOpt = "synth",
    query: Annotated[Optional[int], typer.Option("--query", "-q", help="Query id (default: pick by --split/--index).")] = None,
    split: SplitOpt = "val",
    index: Annotated[int, typer.Option("--index", help="Position of the query in --split when --query is not given.")] = 0,
    predictions: Annotated[Optional[Path], typer.Option("--predictions", "-p", help="Predictions file (JSON lines) to draw.")] = None,
    proposals: Annotated[int, typer.Option("--proposals", help="Draw the first N boxes of a ranked prediction as proposals.")] = 0,
    no_mask: Annotated[bool, typer.Option("--no-mask", help="Do not overlay ground-truth masks.")] = False,
    out: OutOpt = None,
    cache: CacheOpt = None,
) -> None:
    """Write a PNG: image, query text, ground-truth box and mask, context objects, predictions."""
    ds = load_named(dataset, cache)
    if query is None:
        rows = ds.query_rows(split)
        if not 0 <= index < len(rows):
            raise UsageError(f"--index {index} is outside split {split!r} ({len(rows)} queries)")
        q = ds.queries(split)[index]
    else:
        q = ds.query(query)
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
