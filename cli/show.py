"""`refground show`: a PNG of a query with its ground truth and, optionally, predictions or a method's maps.

With ``--method NAME`` the registered method draws its own maps for the query from a trained run (CMRIN:
Figure 4, ground truth, vertex-gate and matching-score maps; VL-NMS: the query-aware proposals); the
method's own options are those of the registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from refground.cli.console import check_out_file, info, is_png
from refground.cli.methods import method_kwargs, with_method_options
from refground.cli.options import CacheOpt, DatasetOpt, RunOpt, SplitOpt
from refground.data.store import cache_root, load_named
from refground.errors import UsageError
from refground.viz import render_query, save_png

ShowOutOpt = Annotated[Optional[Path], typer.Option(
    "--out", "-o", help="PNG file to write (must end in .png; an existing file only if it is a PNG, or with "
    "--force). Default: <cache>/<dataset>/show/.", show_default=False)]
ShowForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing --out file that is not a PNG.")]


def _check_png_out(path: Path, predictions: Optional[Path], force: bool) -> Path:
    """Where show may write: a .png path, never a folder or the predictions file, an existing file only if
    it is a PNG (an earlier picture) or with --force."""
    return check_out_file(path, inputs=[predictions], ours=is_png, force=force, suffixes=(".png",))


def show_body(
    dataset: DatasetOpt = "synth",
    query: Annotated[Optional[int], typer.Option("--query", "-q", help="Query id (default: pick by --split/--index).")] = None,
    split: SplitOpt = "val",
    index: Annotated[int, typer.Option("--index", help="Position of the query in --split when --query is not given.")] = 0,
    predictions: Annotated[Optional[Path], typer.Option("--predictions", "-p", help="Predictions file (JSON lines) to draw.")] = None,
    proposals: Annotated[int, typer.Option("--proposals", help="Draw the first N boxes of a ranked prediction as proposals.")] = 0,
    no_mask: Annotated[bool, typer.Option("--no-mask", help="Do not overlay ground-truth masks.")] = False,
    method: Annotated[Optional[str], typer.Option("--method", help="Draw a registered method's own maps from a "
                                                  "trained run (e.g. cmrin: Figure 4). --index then counts "
                                                  "expression queries only.", show_default=False)] = None,
    run: RunOpt = None,
    out: ShowOutOpt = None,
    cache: CacheOpt = None,
    force: ShowForceOpt = False,
    **options: Any,
) -> None:
    """Write a PNG: image, query text, ground-truth box and mask, context objects, predictions; with
    --method NAME, the method's own maps from a trained run (cmrin: the paper's Figure 4)."""
    from refground.methods import get_method

    if out is not None:  # before loading anything: a refused path costs nothing
        _check_png_out(out, predictions, force)
    m = get_method(method, "show") if method is not None else None
    kwargs = method_kwargs(m, "show_options", options)
    ds = load_named(dataset, cache)
    # a method shows the queries of its task: captions for phrase grounding, expressions for the others
    task = None if m is None else "caption" if m.task == "phrase grounding" else "expression"
    if query is None:
        rows = ds.query_rows(split, task)
        if not 0 <= index < len(rows):
            what = f"{task} queries" if task else "queries"
            raise UsageError(f"--index {index} is outside split {split!r} ({len(rows)} {what})")
        q = ds.queries(split, task)[index]
    else:
        q = ds.query(query)
    if m is not None:
        if predictions is not None or proposals:
            raise UsageError("--predictions/--proposals cannot be combined with --method (the run scores the query)")
        default = cache_root(cache) / dataset / "show" / f"{m.name}_{run or m.name}_query_{q.id}.png"
        path = _check_png_out(out or default, predictions, force)
        res = m.show(dataset, cache, run, q.id, path, show_mask=not no_mask, **kwargs)
        info(f"wrote {res['path']} ({res['message']})")
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
    path = _check_png_out(out or cache_root(cache) / dataset / "show" / f"query_{q.id}.png", predictions, force)
    save_png(image, path)
    info(f"wrote {path}")


def show_command() -> Any:
    """``refground show`` with the show options of every registered method."""
    return with_method_options(show_body, "show")
