"""``refground eval``: score a predictions file against a dataset split (table + JSON file)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from refground.cli.apps import app
from refground.cli.console import emit, info, table
from refground.cli.options import CacheOpt, DatasetOpt, JsonOpt, OutOpt, SplitOpt
from refground.data.model import check_split_name
from refground.data.store import load_named
from refground.errors import UsageError

PredictionsOpt = Annotated[
    Optional[Path],
    typer.Option("--predictions", "-p", help="Predictions file: JSON lines keyed by query id "
                 "(see refground.eval.predictions for the format).", show_default=False),
]
MultiBoxOpt = Annotated[
    str,
    typer.Option("--multi-box", help="Phrases with several boxes: 'union' scores against their union box, "
                 "'any' hits if IoU >= 0.5 with any of them."),
]
PointInOpt = Annotated[
    str,
    typer.Option("--point-in", help="PointIt region: 'box' (union of the ground-truth boxes) or 'mask' "
                 "(the ground-truth mask where one exists)."),
]


def resolve_predictions(predictions: Optional[Path]) -> Path:
    """The predictions file to score. (Later options such as ``--method/--run`` resolve it from a run.)"""
    if predictions is None:
        raise UsageError("give the predictions file with --predictions FILE")
    return predictions


def default_json_path(predictions: Path, split: str) -> Path:
    """``<dir>/<stem>.eval-<split>.json`` beside the predictions file."""
    return predictions.with_name(f"{predictions.stem}.eval-{split}.json")


@app.command("eval")
def eval_command(
    split: SplitOpt,
    predictions: PredictionsOpt = None,
    dataset: DatasetOpt = "synth",
    multi_box: MultiBoxOpt = "union",
    point_in: PointInOpt = "box",
    out: OutOpt = None,
    cache: CacheOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Score predictions (comprehension, segmentation, proposal recall, phrase grounding) on a split.

    Queries of the split without a prediction count as misses and are reported as "missing".

    Prints a table per section (an "all" row and one row per expression kind) and writes the figures as JSON
    to --out (default: beside the predictions file, <stem>.eval-<split>.json).
    """
    check_split_name(split)
    # Imported here: the metrics pull in torch, which would cost every other command a second at start-up.
    from refground.eval.evaluate import evaluate
    from refground.eval.metrics import MULTI_BOX, POINT_IN
    from refground.eval.predictions import read_predictions

    if multi_box not in MULTI_BOX:
        raise UsageError(f"--multi-box must be one of: {', '.join(MULTI_BOX)} (got {multi_box!r})")
    if point_in not in POINT_IN:
        raise UsageError(f"--point-in must be one of: {', '.join(POINT_IN)} (got {point_in!r})")
    path = resolve_predictions(predictions)
    preds = read_predictions(path)
    ds = load_named(dataset, cache)
    result = evaluate(ds, preds, split, multi_box=multi_box, point_in=point_in)
    if not as_json:
        c = result.counts
        info(f"{ds.name} {split}: {c['expressions']} expressions, {c['captions']} captions "
             f"({c['phrases']} phrases with boxes); {c['predictions_in_split']} of {c['predictions']} "
             "predictions in the split; missing predictions count as misses")
    tables = [table(t.title, t.columns, t.rows) for t in result.tables()]
    emit(result.to_dict(), as_json, tables, out or default_json_path(path, split))
