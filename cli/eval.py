"""``refground eval``: score a predictions file against a dataset split (table + JSON file)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from refground.cli.apps import app
from refground.cli.console import emit, info, table
from refground.cli.options import CacheOpt, DatasetOpt, ForceOpt, JsonOpt, OutOpt, SplitOpt
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


MethodOpt = Annotated[
    Optional[str],
    typer.Option("--method", "-m", help="Score a trained run of a method instead of a file: cmrin. Its "
                 "predictions on the split are computed (or reused when current) first.", show_default=False),
]
RunOpt = Annotated[Optional[str], typer.Option("--run", help="Run name under runs/<method>/ (default: the "
                                               "method's name, e.g. cmrin).", show_default=False)]
CandidatesOpt = Annotated[
    str,
    typer.Option("--candidates", help="With --method: candidate boxes, 'gt' (ground-truth objects), 'proposals' "
                 "(the detector's top --top-n per image by confidence) or 'vlnms' (the top --top-n query-aware "
                 "proposals of `refground vlnms`, from the run --vlnms-run)."),
]
TopNOpt = Annotated[int, typer.Option("--top-n", help="With --candidates proposals/vlnms: proposals per image "
                                      "or per query.")]
VlnmsRunOpt = Annotated[str, typer.Option("--vlnms-run", help="With --candidates vlnms: the VL-NMS run whose "
                                          "proposals to use ('confidence' for confidence-only NMS on the same "
                                          "detections).")]
CANDIDATES = ("gt", "proposals", "vlnms")
METHODS = ("cmrin",)


def resolve_predictions(predictions: Optional[Path], method: Optional[str] = None, run: Optional[str] = None,
                        dataset: str = "synth", cache: Optional[Path] = None, split: str = "val",
                        candidates: str = "gt", top_n: int = 10, force: bool = False, vlnms_run: str = "fc-bce"
                        ) -> Path:
    """The predictions file to score: ``--predictions``, or those of a method's run (computed if needed)."""
    if predictions is not None and method is not None:
        raise UsageError("give either --predictions FILE or --method NAME, not both")
    if method is None:
        if predictions is None:
            raise UsageError("give the predictions file with --predictions FILE, or a run with --method cmrin")
        return predictions
    if method not in METHODS:
        raise UsageError(f"--method {method!r}: expected one of: {', '.join(METHODS)}")
    from refground.models.cmrin_run import VLNMS_PREFIX, predict_cmrin

    if candidates not in CANDIDATES:
        raise UsageError(f"--candidates {candidates!r}: expected one of: {', '.join(CANDIDATES)}")
    source = VLNMS_PREFIX + vlnms_run if candidates == "vlnms" else candidates
    res = predict_cmrin(dataset, cache, run or method, split, source, top_n, force=force)
    if res["status"] == "written":
        info(f"wrote {res['path']} ({res['queries']} queries, {res['ms_per_query']} ms per query)")
    return Path(res["path"])


def default_json_path(predictions: Path, split: str) -> Path:
    """``<dir>/<stem>.eval-<split>.json`` beside the predictions file."""
    return predictions.with_name(f"{predictions.stem}.eval-{split}.json")


@app.command("eval")
def eval_command(
    split: SplitOpt,
    predictions: PredictionsOpt = None,
    method: MethodOpt = None,
    run: RunOpt = None,
    candidates: CandidatesOpt = "gt",
    top_n: TopNOpt = 10,
    vlnms_run: VlnmsRunOpt = "fc-bce",
    dataset: DatasetOpt = "synth",
    multi_box: MultiBoxOpt = "union",
    point_in: PointInOpt = "box",
    out: OutOpt = None,
    cache: CacheOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Score predictions (comprehension, segmentation, proposal recall, phrase grounding) on a split.

    Queries of the split without a prediction count as misses and are reported as "missing". With --method
    the predictions of a trained run are written first (runs/<method>/<run>/predictions/<split>.<candidates>
    .jsonl; --force recomputes them) and then scored the same way.

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
    path = resolve_predictions(predictions, method, run, dataset, cache, split, candidates, top_n, force,
                               vlnms_run)
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
