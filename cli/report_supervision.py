"""``refground report supervision``: the grounding methods side by side by supervision level (one table)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from refground.cli.console import check_out_file, emit, is_png
from refground.cli.options import CacheOpt, DatasetOpt, JsonOpt, OutOpt, ThreadsOpt


def _run_opt(flag: str, what: str) -> Any:
    return typer.Option(flag, help=f"The {what} run (NAME, DATASET/NAME or a run folder).")


def report_supervision_command(
    dataset: DatasetOpt = "synth",
    cache: CacheOpt = None,
    splits: Annotated[str, typer.Option("--splits", help="Comma-separated splits of the expressions' "
                                        "Precision@1 columns ('' for none).")] = "val,testA,testB",
    phrase_splits: Annotated[str, typer.Option("--phrase-splits", help="Comma-separated splits of the caption "
                                               "phrases' Acc and PointIt columns ('' for none; 'test' selects "
                                               "testA and testB).")] = "test",
    baseline_run: Annotated[str, _run_opt("--baseline-run", "class-name baseline's (method bicm; nothing "
                                          "trained)")] = "class-name",
    cmrin_run: Annotated[str, _run_opt("--cmrin-run", "CMRIN")] = "cmrin",
    vlnms_run: Annotated[str, typer.Option("--vlnms-run", help="The VL-NMS run whose query-aware proposal sets "
                                           "(`refground vlnms`) CMRIN chooses among in the VL-NMS + CMRIN row "
                                           "('confidence': confidence-only NMS).")] = "fc-bce",
    reir_run: Annotated[str, _run_opt("--reir-run", "ReIR")] = "reir",
    lts_run: Annotated[str, _run_opt("--lts-run", "LTS")] = "lts",
    bicm_run: Annotated[str, _run_opt("--bicm-run", "BiCM")] = "bicm",
    out: OutOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Recompute every run's predictions even if they are "
                                        "current.")] = False,
    threads: ThreadsOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """The methods side by side by supervision level on one dataset: the class-name baseline (none), CMRIN on
    the detector's top 10 and on VL-NMS's top 10 (boxes paired), ReIR (captions only), LTS's mask box (masks
    paired) and BiCM (nothing paired); expressions' Precision@1 per --splits, phrases' Acc and PointIt per
    --phrase-splits, each figure as `refground eval --method M --run R --split S` gives it (predictions
    written or reused). A run that is missing is a row saying "not trained" with the command that trains it.
    Markdown to --out (default <cache>/<dataset>/report/supervision.md), JSON beside it, a bar chart
    <stem>_bars.png."""
    from refground.cli.methods import render
    from refground.eval.supervision import default_markdown_path, output_paths, parse_splits, supervision_report
    from refground.threads import parse_threads, use_threads

    parse_splits(splits, "--splits", allow_empty=True)  # option errors before anything is read or written
    parse_splits(phrase_splits, "--phrase-splits", allow_empty=True)
    # The three files, checked before any prediction is computed: a refusal costs nothing. Only an earlier
    # report's files are overwritten (any markdown at --out, as `report <method>` does).
    paths = output_paths(out if out is not None else default_markdown_path(dataset, cache))
    check_out_file(paths["markdown"], ours=lambda p: p.suffix.lower() == ".md", suffixes=(".md",))
    check_out_file(paths["json"])
    check_out_file(paths["png"], ours=is_png, option="--out (its chart beside it)")
    runs = {"baseline": baseline_run, "cmrin": cmrin_run, "vlnms": vlnms_run, "reir": reir_run, "lts": lts_run,
            "bicm": bicm_run}
    with use_threads(parse_threads(threads)):
        res = supervision_report(dataset, cache, out, runs, splits, phrase_splits, force)
    emit(res["json"], as_json, render(res["tables"]), Path(res["markdown_path"]).with_suffix(".json"))
