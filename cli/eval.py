"""``refground eval``: score a predictions file against a dataset split (table + JSON file)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from refground.cli.console import check_out_file, emit, info, table
from refground.cli.methods import method_kwargs, with_method_options
from refground.cli.options import CacheOpt, DatasetOpt, JsonOpt, RunOpt, SplitOpt, ThreadsOpt
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


EvalOutOpt = Annotated[
    Optional[Path],
    typer.Option("--out", "-o", help="JSON file of the figures (default: beside the predictions file, "
                 "<stem>.eval-<split>.json). Never the predictions file; an existing file only if it is an earlier "
                 "figures file, or with --force.", show_default=False),
]
EvalForceOpt = Annotated[
    bool,
    typer.Option("--force", help="With --method: recompute the run's predictions even if they are current. "
                 "With --out: overwrite an existing file that is not an earlier figures file."),
]
MethodOpt = Annotated[
    Optional[str],
    typer.Option("--method", "-m", help="Score a trained run of a registered method instead of a file. Its "
                 "predictions on the split are computed (or reused when current) first.", show_default=False),
]


def resolve_predictions(predictions: Optional[Path], method: Optional[str] = None, run: Optional[str] = None,
                        dataset: str = "synth", cache: Optional[Path] = None, split: str = "val",
                        force: bool = False, **options: Any) -> tuple[Path, dict[str, Any]]:
    """The predictions file to score: ``--predictions``, or those of a method's run (computed if needed; the
    method's own options, None when not given, are passed to its ``predict``); and what the method reports of
    them for the figures file (``{"run": origin, "features", "unknown_words"}``, where it reports them)."""
    from refground.methods import get_method, list_methods

    if predictions is not None and method is not None:
        raise UsageError("give either --predictions FILE or --method NAME, not both")
    if method is None:
        if predictions is None:
            names = ", ".join(m.name for m in list_methods("predict"))
            raise UsageError(f"give the predictions file with --predictions FILE, or a run with --method ({names})")
        method_kwargs(None, "predict_options", options)  # a method's option without --method is an error
        return predictions, {}
    m = get_method(method, "predict")
    res = m.predict(dataset, cache, run, [(split, method_kwargs(m, "predict_options", options))], force=force)[0]
    if res["status"] == "written":
        info(f"wrote {res['path']}" + (f" ({res['queries']} queries, {res['ms_per_query']} ms per query)"
                                       if "ms_per_query" in res else ""))
    about = {"method": method, **{key: res[key] for key in ("run_origin", "features", "unknown_words") if key in res}}
    words = res.get("unknown_words")
    if words and words.get("unknown_tokens"):
        from refground.tables import pct

        info(f"{words['unknown_tokens']} of {words['tokens']} words ({pct(words['unknown_token_rate'])}%) in "
             f"{words['queries_with_unknown']} of {words['queries']} queries are not in the run's vocabulary")
    return Path(res["path"]), about


def default_json_path(predictions: Path, split: str) -> Path:
    """``<dir>/<stem>.eval-<split>.json`` beside the predictions file."""
    return predictions.with_name(f"{predictions.stem}.eval-{split}.json")


def eval_body(
    split: SplitOpt,
    predictions: PredictionsOpt = None,
    method: MethodOpt = None,
    run: RunOpt = None,
    dataset: DatasetOpt = "synth",
    multi_box: MultiBoxOpt = "union",
    point_in: PointInOpt = "box",
    out: EvalOutOpt = None,
    cache: CacheOpt = None,
    force: EvalForceOpt = False,
    threads: ThreadsOpt = "auto",
    as_json: JsonOpt = False,
    **options: Any,
) -> None:
    """Score predictions (comprehension, segmentation, proposal recall, phrase grounding) on a split.

    Queries of the split without a prediction count as misses and are reported as "missing". With --method
    the predictions of a trained run are written first (runs/<method>/<run>/predictions/<split>.<candidates>
    .jsonl; for another dataset's run --run DATASET/NAME, <dataset>/predictions/<method>/DATASET.NAME/; --force
    recomputes them) and then scored the same way; the figures JSON then records the run's origin and the words
    of the split its vocabulary never saw (run.unknown_words).

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
    if out is not None:  # before any scoring (or computing a run's predictions): a refusal costs nothing
        check_out_file(out, inputs=[predictions], force=force)
    from refground.threads import parse_threads, use_threads

    with use_threads(parse_threads(threads)):
        path, about = resolve_predictions(predictions, method, run, dataset, cache, split, force, **options)
        json_path = out or default_json_path(path, split)
        check_out_file(json_path, inputs=[path], force=force)
        preds = read_predictions(path)
        ds = load_named(dataset, cache)
        result = evaluate(ds, preds, split, multi_box=multi_box, point_in=point_in)
    if not as_json:
        c = result.counts
        info(f"{ds.name} {split}: {c['expressions']} expressions, {c['captions']} captions "
             f"({c['phrases']} phrases with boxes); {c['predictions_in_split']} of {c['predictions']} "
             "predictions in the split; missing predictions count as misses")
    tables = [table(t.title, t.columns, t.rows, t.kinds) for t in result.tables()]
    figures = result.to_dict()
    if about:  # which run made the predictions, from where, and the words it never saw
        figures["run"] = about
    emit(figures, as_json, tables, json_path, inputs=[path], force=force)


def eval_command() -> Any:
    """``refground eval`` with the predict options of every registered method (each given option must be one
    of the chosen method's)."""
    return with_method_options(eval_body, "predict")
