"""``refground report supervision``: the grounding methods side by side by how much supervision they see.

One table on one dataset: a row per method run (:data:`ROWS`), each named by its supervision level, with the
expressions' Precision@1 on ``splits`` and the caption phrases' Acc and PointIt on ``phrase_splits``. Every
figure comes the way ``refground eval --method M --run R --split S`` gets it (``cli/eval.py``
``resolve_predictions``): the method's ``predict`` through the registry (:mod:`refground.methods`) writes its
predictions file, or finds it current, and :func:`refground.eval.evaluate.evaluate` scores it with the defaults
(``multi_box="union"``, ``point_in="box"``). So a cell of this table equals the ``"all"`` figure of ``refground
eval`` on the same run, options and split:

* expressions: ``comprehension`` ``precision@1`` (for LTS, the predicted mask's bounding box: its predictions
  carry the box beside the mask, and the comprehension section scores that box);
* phrases: ``phrase_grounding`` ``accuracy`` and ``pointit``.

A row's method whose predictions lack a section gets ``None`` there (``-`` in the tables). A row never fails
the report: a method that is not registered is "not available"; a run without weights is "not trained", with
the command that trains it (:func:`refground.methods.train_command`; for VL-NMS + CMRIN also the ``refground
vlnms`` step that writes the proposal sets); any other user-facing error of its predict or scoring (a stale
input, a missing proposal set) is "not scored" with the error's one line, which names the step to re-run.

Outputs: markdown (default ``<cache>/<dataset>/report/supervision.md``), the figures as JSON beside it
(``<stem>.json``, in ``refground report``'s layout) and a grouped bar chart ``<stem>_bars.png``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from refground.errors import RefgroundError, UsageError
from refground.tables import PERCENT, TEXT, TableData, markdown_table, write_report

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL.Image import Image

    from refground.data.model import Dataset

SCORED, NOT_AVAILABLE, NOT_TRAINED, NOT_SCORED = "scored", "not available", "not trained", "not scored"
CONFIDENCE = "confidence"  # VL-NMS's tag of confidence-only NMS (vlnms.run.CONFIDENCE): a proposal set, no run
DEFAULT_SPLITS = "val,testA,testB"
DEFAULT_PHRASE_SPLITS = "test"  # synthetic captions are stored under testA/testB; "test" selects both
BARS_SIZE = (960, 440)  # pixels of the bar chart


@dataclass(frozen=True)
class RowSpec:
    """One row of the table: a method's run and the options of its ``predict``.

    ``run`` and the values of ``run_options`` are keys of the report's ``runs`` (the ``--<key>-run`` options);
    ``options`` are fixed predict options; ``trains``: whether the run is a trained one (the class-name baseline
    is computed, not trained: its failure is never "not trained"); ``proposals``: the ``runs`` key of the VL-NMS
    run whose query-aware proposal sets the row reads (its training and ``refground vlnms`` step are part of
    the row's "not trained" command); ``expressions`` / ``phrases``: which columns the row is predicted and
    scored for (a row's predictions are made for the splits of those columns only)."""

    key: str
    label: str
    supervision: str
    method: str
    run: str
    options: tuple[tuple[str, Any], ...] = ()
    run_options: tuple[tuple[str, str], ...] = ()
    trains: bool = True
    proposals: str | None = None
    expressions: bool = True
    phrases: bool = False
    note: str = ""

    def predict_options(self, runs: Mapping[str, str]) -> dict[str, Any]:
        """The keyword options of the row's ``predict`` job: the fixed ones and the run-valued ones."""
        return {**dict(self.options), **{name: runs[key] for name, key in self.run_options}}


ROWS: tuple[RowSpec, ...] = (
    RowSpec("baseline", "class-name baseline", "none (baseline)", "bicm", "baseline", trains=False, phrases=True,
            note="Wang & Specia's class-name baseline: the proposal whose detector class best matches the query; "
                 "nothing is trained."),
    RowSpec("cmrin", "CMRIN, detector top 10", "boxes paired", "cmrin", "cmrin",
            options=(("candidates", "proposals"), ("top_n", 10)),
            note="CMRIN choosing among the detector's 10 most confident proposals per image."),
    RowSpec("vlnms", "VL-NMS + CMRIN, top 10", "boxes paired", "cmrin", "cmrin",
            options=(("candidates", "vlnms"), ("top_n", 10)), run_options=(("vlnms_run", "vlnms"),),
            proposals="vlnms",
            note="CMRIN choosing among the first 10 query-aware proposals of the VL-NMS run."),
    RowSpec("reir", "ReIR", "captions only", "reir", "reir", expressions=False, phrases=True,
            note="ReIR grounds caption phrases (weak supervision from captions): no expression columns."),
    RowSpec("lts", "LTS, mask box", "masks paired", "lts", "lts",
            note="LTS segments; its Precision@1 is that of the predicted mask's bounding box."),
    RowSpec("bicm", "BiCM", "nothing paired", "bicm", "bicm", phrases=True,
            note="BiCM: images and queries from separate pools, the pairing removed."),
)
DEFAULT_RUNS: dict[str, str] = {"baseline": "class-name", "cmrin": "cmrin", "vlnms": "fc-bce", "reir": "reir",
                                "lts": "lts", "bicm": "bicm"}


# ------------------------------------------------------------------------------------------------ options
def parse_splits(text: str | Sequence[str], option: str, allow_empty: bool = False) -> tuple[str, ...]:
    """The split names of a comma-separated ``option`` value, each checked (``data.model.check_split_name``),
    duplicates dropped; none is a one-line UsageError unless ``allow_empty``."""
    from refground.data.model import check_split_name

    parts = text.split(",") if isinstance(text, str) else list(text)
    names = list(dict.fromkeys(s.strip() for s in parts if s.strip()))
    if not names and not allow_empty:
        raise UsageError(f"{option}: no split given (e.g. {DEFAULT_SPLITS})")
    return tuple(check_split_name(s) for s in names)


def resolve_runs(runs: Mapping[str, str | None] | None, rows: Sequence[RowSpec]) -> dict[str, str]:
    """:data:`DEFAULT_RUNS` with ``runs``' entries (None: the default) over them; a key no row uses, or an
    empty name, is a one-line UsageError."""
    keys = {k for r in rows for k in (r.run, *(v for _, v in r.run_options), r.proposals) if k}
    out = {k: v for k, v in DEFAULT_RUNS.items() if k in keys}
    for key, name in (runs or {}).items():
        if key not in keys:
            raise UsageError(f"unknown run key {key!r}; expected one of: {', '.join(sorted(keys))}")
        if name is None:
            continue
        if not str(name).strip():
            raise UsageError(f"--{key}-run: empty run name")
        out[key] = str(name).strip()
    missing = sorted(keys - set(out))
    if missing:
        raise UsageError(f"no run given for {', '.join(missing)}")
    return out


def default_markdown_path(dataset: str, cache: Any) -> Path:
    """``<cache>/<dataset>/report/supervision.md``."""
    from refground.data.store import dataset_dir

    return dataset_dir(dataset, cache).parent / "report" / "supervision.md"


def output_paths(markdown: Path) -> dict[str, Path]:
    """The files the report writes for markdown path ``markdown``: ``{"markdown", "json", "png"}``."""
    markdown = Path(markdown)
    return {"markdown": markdown, "json": markdown.with_suffix(".json"),
            "png": markdown.with_name(f"{markdown.stem}_bars.png")}


# ------------------------------------------------------------------------------------------------ scoring
def _has_weights(method: str, run: str, dataset: str, cache: Any) -> bool:
    """Whether run ``run`` of ``method`` (NAME, DATASET/NAME or a folder) holds trained weights (``model.pt``,
    which :func:`refground.train.complete_run` requires of every method's run)."""
    from refground.runs import resolve_run
    from refground.train import MODEL_FILE

    return (resolve_run(run, method, dataset, cache).path / MODEL_FILE).is_file()


def _train_command(method: str, dataset: str, run: str) -> str:
    from refground.methods import get_method, train_command

    try:
        variants = get_method(method).variants
    except UsageError:  # not registered: no variants to name
        variants = ()
    return train_command(method, dataset, run, variants)


def _vlnms_command(dataset: str, run: str, splits: Sequence[str]) -> str:
    """The ``refground vlnms`` command that writes the query-aware proposal sets of ``run`` on ``splits``."""
    where = f" --dataset {dataset}" if dataset != "synth" else ""
    who = "--confidence-only" if run == CONFIDENCE else f"--run {run}"
    return f"refground vlnms{where} {who} " + " ".join(f"--split {s}" for s in splits)


def _why_not(spec: RowSpec, runs: Mapping[str, str], dataset: str, cache: Any,
             splits: Sequence[str]) -> tuple[str, str]:
    """After a row's predict failed: ``(status, command)``. "not trained" with the commands that train the
    runs without weights (and write the VL-NMS proposal sets of ``splits`` the row reads); "not scored" with
    the ``refground vlnms`` command when the runs are trained but proposal sets are missing; else "not scored"
    and no command (the error's message says what to re-run)."""
    steps: list[str] = []
    if spec.trains and not _has_weights(spec.method, runs[spec.run], dataset, cache):
        steps.append(_train_command(spec.method, dataset, runs[spec.run]))
    make_sets = ""
    if spec.proposals is not None:
        from refground.grounding.candidates import query_proposals_path

        vl = runs[spec.proposals]
        if vl != CONFIDENCE and not _has_weights("vlnms", vl, dataset, cache):
            steps.append(_train_command("vlnms", dataset, vl))
            absent = list(splits)  # whatever sets exist belong to no trained run
        else:
            absent = [s for s in splits if not query_proposals_path(dataset, cache, vl, s).is_file()]
        make_sets = _vlnms_command(dataset, vl, absent) if absent else ""
    if steps:
        return NOT_TRAINED, " && ".join([*steps, *([make_sets] if make_sets else [])])
    return NOT_SCORED, make_sets


def _cells(figures: Mapping[str, Mapping[str, Any]], spec: RowSpec, splits: Sequence[str],
           phrase_splits: Sequence[str]) -> list[float | None]:
    """The row's figure cells in column order (:func:`columns`): None where the row has no such column or its
    predictions lack the section."""
    def get(split: str, section: str, key: str) -> float | None:
        return ((figures.get(split) or {}).get(section) or {}).get(key)

    out: list[float | None] = [get(s, "comprehension", "precision@1") if spec.expressions else None for s in splits]
    for s in phrase_splits:
        out += [get(s, "phrase_grounding", "accuracy") if spec.phrases else None,
                get(s, "phrase_grounding", "pointit") if spec.phrases else None]
    return out


def score_row(ds: Dataset, spec: RowSpec, runs: Mapping[str, str], dataset: str, cache: Any,
              splits: Sequence[str], phrase_splits: Sequence[str], force: bool = False) -> dict[str, Any]:
    """Predict (or reuse) and score one row: ``{"key", "label", "supervision", "method", "run", "options",
    "status", "command", "message", "figures": {split: {section: figures of "all"}}, "predictions": {split:
    {"path", "status"}}, "cells": [figure per column]}``. Never raises a user-facing error: those become the
    row's status and message."""
    from refground.eval.evaluate import evaluate
    from refground.eval.predictions import read_predictions
    from refground.methods import get_method, list_methods, method_kwargs

    run = runs[spec.run]
    options = spec.predict_options(runs)
    row: dict[str, Any] = {"key": spec.key, "label": spec.label, "supervision": spec.supervision,
                           "method": spec.method, "run": run, "options": options, "status": SCORED, "command": "",
                           "message": "", "figures": {}, "predictions": {}}
    wanted = list(dict.fromkeys([*(splits if spec.expressions else ()), *(phrase_splits if spec.phrases else ())]))
    try:
        method = get_method(spec.method, "predict")
    except UsageError:
        known = spec.method in {m.name for m in list_methods()}
        row.update(status=NOT_AVAILABLE, message=f"method {spec.method!r} " + ("has no predict" if known else
                                                                               "is not registered"))
    else:
        try:
            method_kwargs(method, "predict_options", options)  # the check `refground eval --method` makes
        except UsageError as exc:
            problem = str(exc)
        else:
            problem = ""
        if problem:
            row.update(status=NOT_AVAILABLE, message=problem)
        elif not wanted:
            row.update(status=NOT_SCORED, message="no split of the row's kind of query was asked for")
        else:
            try:
                # One call for all splits, as `refground eval --method` makes one per split: the method loads
                # its run and the dataset once.
                results = method.predict(dataset, cache, run, [(s, dict(options)) for s in wanted], force=force)
                for split, res in zip(wanted, results):
                    result = evaluate(ds, read_predictions(res["path"]), split)  # eval's defaults
                    row["figures"][split] = {name: dict(by_kind["all"]) for name, by_kind in result.sections.items()}
                    # What `eval --method` records of the run beside its figures (where the method reports it).
                    row["predictions"][split] = {"path": str(res["path"]), "status": res.get("status"),
                                                 **{k: res[k] for k in ("run_origin", "features", "unknown_words")
                                                    if k in res}}
            except RefgroundError as exc:
                status, command = _why_not(spec, runs, dataset, cache, splits)
                row.update(status=status, command=command, message=str(exc), figures={}, predictions={})
    row["cells"] = _cells(row["figures"], spec, splits, phrase_splits)
    return row


# ------------------------------------------------------------------------------------------------ tables
def columns(splits: Sequence[str], phrase_splits: Sequence[str]) -> list[str]:
    """The figure columns: ``<split> Precision@1`` per expression split, then ``<split> phrase Acc`` and
    ``<split> PointIt`` per phrase split."""
    return [f"{s} Precision@1" for s in splits] + [c for s in phrase_splits
                                                   for c in (f"{s} phrase Acc", f"{s} PointIt")]


def status_text(row: Mapping[str, Any], code: bool = False) -> str:
    """A row's status cell: the status alone ("scored", "not trained", ...), or with ``code`` (the markdown
    table) also "not trained: `COMMAND`", "not scored: `COMMAND`" or "not scored/not available: reason"."""
    if row["status"] == SCORED or not code:
        return row["status"]
    return f"{row['status']}: " + (f"`{row['command']}`" if row["command"] else row["message"])


def build_table(dataset: str, rows: Sequence[Mapping[str, Any]], splits: Sequence[str],
                phrase_splits: Sequence[str], code: bool = False) -> TableData:
    """The one table: a row per :func:`score_row` result (label, supervision, method, run, the figure cells,
    status); ``code``: the markdown table's status cells, with the command in backticks."""
    figure_cols = columns(splits, phrase_splits)
    out = []
    for r in rows:
        run = r["run"] + (f" (proposals {r['options']['vlnms_run']})" if "vlnms_run" in r["options"] else "")
        out.append([r["label"], r["supervision"], r["method"], run, *r["cells"], status_text(r, code)])
    return TableData(f"Grounding by supervision level on {dataset}: expressions' Precision@1, phrases' Acc and "
                     "PointIt", ["row", "supervision", "method", "run", *figure_cols, "status"], out,
                     [TEXT] * 4 + [PERCENT] * len(figure_cols) + [TEXT])


def todo_table(dataset: str, rows: Sequence[Mapping[str, Any]]) -> TableData | None:
    """The rows without figures and what makes them (the command, else the reason); None when every row is
    scored. The console prints it under the table (the markdown table holds the commands in its rows)."""
    todo = [[r["label"], r["status"], r["command"] or r["message"]] for r in rows if r["status"] != SCORED]
    if not todo:
        return None
    return TableData(f"Rows without figures on {dataset}", ["row", "status", "command or reason"], todo,
                     [TEXT, TEXT, TEXT])


def bars_figure(dataset: str, rows: Sequence[Mapping[str, Any]], splits: Sequence[str],
                phrase_splits: Sequence[str], size: tuple[int, int] = BARS_SIZE) -> Figure:
    """A grouped bar chart: a group per figure column, a bar per row with that figure (in %, colour per row
    in table order); "no data" when no row has a figure."""
    import matplotlib.style
    import numpy as np

    from refground.plots import NO_DATA, new_figure

    groups = columns(splits, phrase_splits)
    fig, (ax,) = new_figure(size)
    # matplotlib's default style for the drawing, as refground.plots draws (a user's matplotlibrc changes nothing).
    with matplotlib.style.context("default"):
        ax.set_title(f"Grounding by supervision level on {dataset}")
        ax.set_xlabel("split and figure")
        ax.set_ylabel("figure (%)")
        x = np.arange(len(groups), dtype=np.float64)
        width = 0.8 / max(1, len(rows))
        drawn = 0
        for k, r in enumerate(rows):
            have = [i for i, v in enumerate(r["cells"]) if v is not None]
            if not have:
                continue
            ax.bar(x[have] - 0.4 + width * (k + 0.5), [100.0 * r["cells"][i] for i in have], width,
                   label=f"{r['label']}: {r['supervision']}", color=f"C{k % 10}")
            drawn += 1
        ax.set_xticks(x, [g.replace(" ", "\n", 1) for g in groups])
        ax.set_ylim(0.0, 100.0)
        ax.grid(True, axis="y", alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, NO_DATA, transform=ax.transAxes, ha="center", va="center", color="0.4", fontsize=14)
        else:
            ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize="small",
                      frameon=False)
    return fig


def render_bars(dataset: str, rows: Sequence[Mapping[str, Any]], splits: Sequence[str],
                phrase_splits: Sequence[str]) -> Image:
    """:func:`bars_figure` as an RGB PIL image of :data:`BARS_SIZE` pixels."""
    from refground.plots import to_image

    return to_image(bars_figure(dataset, rows, splits, phrase_splits))


def render_markdown(dataset: str, table: TableData, rows: Sequence[Mapping[str, Any]],
                    specs: Sequence[RowSpec], splits: Sequence[str], phrase_splits: Sequence[str],
                    png: str) -> str:
    """The report's markdown: heading, what the columns mean, the table, a note per row, the chart."""
    where = []
    if splits:
        where.append(f"Precision@1 of the expressions on {', '.join(splits)}")
    if phrase_splits:
        where.append(f"phrase grounding Acc and PointIt of the caption phrases on {', '.join(phrase_splits)}")
    what = "; ".join(where)
    intro = (f"{what[0].upper()}{what[1:]} (%; the \"all\" row of `refground eval --method M --run R --split S` "
             "for each run: IoU >= 0.5, a plural phrase against its union box; PointIt: the box centre inside the "
             "ground truth). \"-\": the row's method does not ground that kind of query, or the row is not "
             "scored.")
    lines = [f"# Grounding by supervision level on {dataset}", "", intro, "", *markdown_table(table), ""]
    notes = {s.key: s.note for s in specs}
    lines += ["Rows:", ""]
    for r in rows:
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        text = f"- {r['label']} (`{r['method']}` run `{r['run']}`" + (f", {opts}" if opts else "") + "): "
        text += notes.get(r["key"]) or ""
        if r["status"] != SCORED and r["message"] and r["status"] != NOT_TRAINED:  # the table has the command
            text += f" {r['status'].capitalize()}: {r['message']}" + ("" if r["message"].endswith(".") else ".")
        lines.append(text)
    lines += ["", f"![figures by supervision level]({Path(png).name})", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ report
def supervision_report(dataset: str, cache: Any, out: Path | None, runs: Mapping[str, str | None] | None = None,
                       splits: str | Sequence[str] = DEFAULT_SPLITS,
                       phrase_splits: str | Sequence[str] = DEFAULT_PHRASE_SPLITS, force: bool = False,
                       rows: Sequence[RowSpec] | None = None) -> dict[str, Any]:
    """Write the supervision report of ``dataset``: markdown to ``out`` (default
    :func:`default_markdown_path`), JSON beside it (``<stem>.json``) and the bar chart ``<stem>_bars.png``.

    ``runs``: run names by key (``baseline``, ``cmrin``, ``vlnms``, ``reir``, ``lts``, ``bicm``; missing or
    None: :data:`DEFAULT_RUNS`); ``splits``: the expressions' splits (comma-separated or a sequence);
    ``phrase_splits``: the caption phrases' splits (may be empty); ``force``: recompute every row's
    predictions even when current; ``rows``: the rows (default :data:`ROWS`). A split without queries of its
    kind, or no split at all, is a one-line UsageError; a row's own trouble is its status (:func:`score_row`).
    Returns ``{"markdown_path", "tables": [TableData], "json": dict}``.
    """
    from refground.data.store import load_named
    from refground.progress import track
    from refground.runs import resolve_run
    from refground.viz import save_png

    specs = list(ROWS if rows is None else rows)
    expr_splits = parse_splits(splits, "--splits", allow_empty=True)
    cap_splits = parse_splits(phrase_splits, "--phrase-splits", allow_empty=True)
    if not expr_splits and not cap_splits:
        raise UsageError("--splits and --phrase-splits are both empty: the table would have no figure column")
    names = resolve_runs(runs, specs)
    for spec in specs:  # a malformed run name is the user's trouble, not a row's
        resolve_run(names[spec.run], spec.method, dataset, cache)
        if spec.proposals is not None and names[spec.proposals] != CONFIDENCE:
            resolve_run(names[spec.proposals], "vlnms", dataset, cache)
    ds = load_named(dataset, cache)
    for split_names, task, option in ((expr_splits, "expression", "--splits"),
                                      (cap_splits, "caption", "--phrase-splits")):
        for s in split_names:
            if not len(ds.query_rows(s, task)):
                raise UsageError(f"{option} {s}: dataset {dataset} has no {task} queries in split {s!r} "
                                 f"(its splits: {', '.join(ds.splits()) or 'none'})")

    results = [score_row(ds, spec, names, dataset, cache, expr_splits, cap_splits, force)
               for spec in track(specs, len(specs), "supervision report")]
    paths = output_paths(Path(out) if out is not None else default_markdown_path(dataset, cache))
    paths["markdown"].parent.mkdir(parents=True, exist_ok=True)
    save_png(render_bars(dataset, results, expr_splits, cap_splits), paths["png"])
    table = build_table(dataset, results, expr_splits, cap_splits)
    js: dict[str, Any] = {
        "dataset": dataset, "markdown_path": str(paths["markdown"]), "png": str(paths["png"]),
        "splits": list(expr_splits), "phrase_splits": list(cap_splits), "runs": names,
        "columns": columns(expr_splits, cap_splits), "rows": results,
        "table": {"title": table.title, "columns": table.columns, "rows": table.rows},
    }
    markdown = render_markdown(dataset, build_table(dataset, results, expr_splits, cap_splits, code=True), results,
                               specs, expr_splits, cap_splits, str(paths["png"]))
    js = write_report(paths["markdown"], markdown, js)  # the JSON lands at paths["json"]
    todo = todo_table(dataset, results)
    return {"markdown_path": str(paths["markdown"]), "tables": [table] + ([todo] if todo else []), "json": js}


__all__ = ["DEFAULT_PHRASE_SPLITS", "DEFAULT_RUNS", "DEFAULT_SPLITS", "NOT_AVAILABLE", "NOT_SCORED", "NOT_TRAINED",
           "ROWS", "SCORED", "RowSpec", "bars_figure", "build_table", "columns", "default_markdown_path",
           "output_paths", "parse_splits", "render_bars", "render_markdown", "resolve_runs", "score_row",
           "status_text", "supervision_report", "todo_table"]
