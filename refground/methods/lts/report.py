"""LTS's tables on a dataset (the paper's Tables 2, 4 and 5 as analogues), its mask box beside CMRIN, and a grid of
successes and failures per expression kind.

Each row is a run ``runs/lts/<name>`` (by default the run named after its variant, trained with ``refground
train lts --variant <variant>``); a variant without a complete run is listed as not trained, with the command
that trains it. A run is placed by its ``config.json``, not by its name (:func:`variant_of_config`): ``--runs
fusion-e3,lts-e3`` puts ``fusion-e3`` in Table 2's Fusion row and ``lts-e3`` in Tables 2, 4 and 5's LTS rows,
labelled with the variant's paper label and the run name in parentheses where the two differ. Every run is
scored once per split: its predictions are written or reused through the method registry (like ``refground eval
--method lts``) and scored by :func:`refground.eval.evaluate.evaluate`, whose ``segmentation`` section (overall
IoU, mean IoU, prec@X, and ``loc_acc`` where the evaluator reports it) and ``comprehension`` section (Precision@1
of the predicted mask's bounding box) fill every table.

* Table 2: per split, overall IoU, mean IoU, prec@0.5..0.9 (and localisation accuracy) of the runs of the
  ablation variants fusion ... lts and of the runs of no variant, with the paper's marks: Fusion, Filter (the
  localisation module), Seg, L_loc, read from each run's ``config.json``.
* Table 4: LTS (relevance filter) against LTS-Trans (transformer localisation), overall IoU per split.
* Table 5: n = 1, 2, 3 relevance filters and word filters, overall IoU per split.
* Comprehension: the main run's mask-box Precision@1 beside CMRIN's with ground-truth objects and with the
  detector's top-10 proposals as candidates (through ``get_method("cmrin").predict``).
* Per kind: the main run's overall IoU, prec@0.5 and localisation accuracy per expression kind and split.
* The grid (PNG): for the main run on the first split, per kind, the first few successes (IoU > 0.5, the
  definition of prec@0.5) and failures by query id, drawn from the predictions' masks.

The main run is ``lts`` when it is among the runs and trained, else the first trained run of variant ``lts``,
else the first trained run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from refground.errors import ArtifactError, DataError
from refground.tables import PERCENT, TEXT, TableData, markdown_table, split_list, write_report

TABLE2 = ("fusion", "filter", "fusion-filter", "fusion-seg", "filter-seg", "fusion-filter-seg", "lts")
TABLE4 = ("lts", "lts-trans")
TABLE5 = ("lts", "lts-n2", "lts-n3", "lts-wordfilter")
LABELS = {"fusion": "Fusion", "filter": "Filter", "fusion-filter": "Fusion + Filter", "fusion-seg": "Fusion + Seg",
          "filter-seg": "Filter + Seg", "fusion-filter-seg": "Fusion + Filter + Seg",
          "lts": "LTS (Fusion + Filter + Seg + L_loc)", "lts-trans": "LTS-Trans", "lts-n2": "LTS, n = 2",
          "lts-n3": "LTS, n = 3", "lts-wordfilter": "LTS-WordFilter"}
TABLE4_LABELS = {"lts": "LTS (relevance filter)", "lts-trans": "LTS-Trans (transformer)"}
TABLE5_LABELS = {"lts": "LTS, n = 1", "lts-n2": "LTS, n = 2", "lts-n3": "LTS, n = 3",
                 "lts-wordfilter": "LTS-WordFilter"}
SEG_KEYS = ("overall_iou", "mean_iou", "prec@0.5", "prec@0.6", "prec@0.7", "prec@0.8", "prec@0.9")
SEG_COLUMNS = {"overall_iou": "overall IoU", "mean_iou": "mean IoU", "loc_acc": "loc acc"}
MARKS = ("Fusion", "Filter", "Seg", "L_loc")
GRID_PER_SIDE = 3  # successes and failures per kind in the grid
CHECK = "✓"
TABLE2_NOTE = ("Rows: the paper's Table 2 ablation, each run placed by its config (its name in parentheses "
               "where it differs from its variant's). Filter: the localisation module (a relevance "
               "filter; n = k: k filters; words: word filters; trans: transformer). Overall IoU = sum of "
               "intersections / sum of unions; prec@X = share of queries with IoU > X.")


# ------------------------------------------------------------------------------------------------ parsing
def train_command(dataset: str, name: str) -> str:
    """The command that trains run ``name`` (a variant's name trains that variant)."""
    from refground.methods import train_command as command
    from refground.methods.lts.model import VARIANTS

    return command("lts", dataset, name, VARIANTS)


def marks(config: dict[str, Any]) -> dict[str, str]:
    """The paper's Table 2 marks of a config (a run's ``config.json`` dict): Fusion (eq. 5's text factor),
    Filter (the localisation module: a check for one relevance filter, ``n = k`` for several, ``words`` for word
    filters, ``trans`` for the transformer, empty for none), Seg (the segmentation module), L_loc (eq. 12's loss
    in the objective: a localisation module and ``loc_weight`` > 0)."""
    loc = config.get("localization", "filter")
    if loc == "none":
        filt = ""
    elif loc == "transformer":
        filt = "trans"
    elif config.get("word_filter"):
        filt = "words"
    elif int(config.get("num_filters", 1)) > 1:
        filt = f"n = {int(config['num_filters'])}"
    else:
        filt = CHECK
    return {"Fusion": CHECK if config.get("fusion", True) else "", "Filter": filt,
            "Seg": CHECK if config.get("seg", True) else "",
            "L_loc": CHECK if loc != "none" and float(config.get("loc_weight", 0.0)) > 0 else ""}


# Config fields that tell the variants apart (architecture and loss); sizes, schedule and the input options (coords,
# pooled_fine, trans_pool, ...) do not change which row of the paper a run stands for.
VARIANT_FIELDS = ("fusion", "localization", "num_filters", "word_filter", "seg")


def _variant_key(config: dict[str, Any], defaults: dict[str, Any]) -> tuple[Any, ...]:
    """The fields that tell variants apart, and whether L_loc is on; a field the config lacks (an older
    config.json) takes its default."""
    merged = {**defaults, **config}
    return (*(merged[k] for k in VARIANT_FIELDS), float(merged["loc_weight"]) > 0)


def variant_of_config(config: dict[str, Any] | None) -> str | None:
    """The variant (:data:`~refground.methods.lts.model.VARIANTS`) a config dict (a run's ``config.json``)
    stands for: the first whose :func:`~refground.methods.lts.model.variant_config` agrees on fusion,
    localization, num_filters, word_filter, seg and whether loc_weight is above 0 (fields a config lacks take
    :class:`LTSConfig`'s defaults; every other field is ignored). None for no config, one that matches no variant,
    or one with values of the wrong type."""
    from refground.methods.lts.model import VARIANTS, LTSConfig, variant_config

    if not isinstance(config, dict):
        return None
    defaults = LTSConfig().to_dict()
    try:
        key = _variant_key(config, defaults)
    except (TypeError, ValueError):  # e.g. loc_weight "x": a hand-edited file is no variant, not a crash
        return None
    for v in VARIANTS:
        if _variant_key(variant_config(v).to_dict(), defaults) == key:
            return v
    return None


def row_label(st: dict[str, Any], labels: dict[str, str] | None = None) -> str:
    """A run's row label: its variant's paper label (from ``labels``, else :data:`LABELS`) with the run name in
    parentheses when it differs from the variant's name; the run name for a run of no variant; `` (not
    trained)`` appended when it is not trained. ``st``: :func:`run_status`."""
    run, v = st["run"], st.get("variant")
    if v is None:
        label = run
    else:
        label = (labels or {}).get(v) or LABELS[v]
        label += "" if run == v else f" ({run})"
    return label if st["trained"] else f"{label} (not trained)"


def main_run(status: dict[str, dict[str, Any]]) -> str | None:
    """The run of the per-kind table, the grid and the CMRIN comparison: ``lts`` when trained, else the first
    trained run of variant ``lts``, else the first trained run (None when none is). ``status``: per run name in
    report order, :func:`run_status`."""
    trained = [n for n, st in status.items() if st["trained"]]
    if "lts" in trained:
        return "lts"
    return next((n for n in trained if status[n].get("variant") == "lts"), trained[0] if trained else None)


# ------------------------------------------------------------------------------------------------ scoring
def run_status(dataset: str, cache: Any, name: str) -> dict[str, Any]:
    """``{"run", "trained", "config", "variant", "command"}``: whether ``runs/lts/<name>`` holds a trained run
    (its weights and config; a complete manifest is the predict step's check), its config dict (the variant's
    defaults when not trained and ``name`` is a variant; else None), the variant that config stands for
    (:func:`variant_of_config`; None when none) and the command that trains it."""
    from refground.methods.lts.model import VARIANTS, variant_config
    from refground.runs import resolve_run
    from refground.train import CONFIG_FILE, MODEL_FILE, read_json

    path = resolve_run(name, "lts", dataset, cache).path
    config = read_json(path / CONFIG_FILE) if (path / MODEL_FILE).is_file() else None
    trained = isinstance(config, dict)
    if not trained:
        config = variant_config(name).to_dict() if name in VARIANTS else None
    return {"run": name, "trained": trained, "config": config, "variant": variant_of_config(config),
            "command": train_command(dataset, name)}


def score_runs(ds: Any, dataset: str, cache: Any, names: list[str], splits: tuple[str, ...],
               keep: tuple[str, str] | None = None) -> tuple[dict[str, dict[str, Any]], Any]:
    """Predict (or reuse the predictions of) every run of ``names`` on ``splits`` and score them once:
    ``{run: {split: {"segmentation": {kind: figures}, "comprehension": {kind: figures}, "predictions": path}}}``.
    With ``keep`` = (run, split), also returns that file's parsed :class:`Predictions` (else None), so the grid
    reads it only once."""
    from refground.eval.evaluate import evaluate
    from refground.eval.predictions import read_predictions
    from refground.methods import get_method

    method = get_method("lts", "predict")
    out: dict[str, dict[str, Any]] = {}
    kept = None
    for name in names:
        out[name] = {}
        for split, res in zip(splits, method.predict(dataset, cache, name, [(s, {}) for s in splits])):
            preds = read_predictions(res["path"])
            figs = evaluate(ds, preds, split, sections=("segmentation", "comprehension")).to_dict()
            comp = figs.get("comprehension", {})
            if not comp and figs.get("segmentation"):  # every mask empty, so no box: every query a miss
                comp = {"all": {"precision@1": 0.0, "note": "no mask predicted, so no box"}}
            out[name][split] = {"segmentation": figs.get("segmentation", {}), "comprehension": comp,
                                "predictions": res["path"]}
            if keep == (name, split):
                kept = preds
    return out, kept


def cmrin_precision(ds: Any, dataset: str, cache: Any, cmrin_run: str, splits: tuple[str, ...]
                    ) -> tuple[dict[str, dict[str, float | None]], str]:
    """CMRIN's Precision@1 per split with ground-truth objects (``"gt"``) and with the detector's top-10
    proposals (``"proposals"``) as candidates, and a note ("" when scored). ``cmrin_run`` "" or a run that does
    not exist, or an input CMRIN cannot read, gives ``{}`` and the note saying why."""
    from refground.eval.evaluate import comprehension_of
    from refground.methods import get_method
    from refground.runs import resolve_run
    from refground.train import MODEL_FILE

    if not cmrin_run:
        return {}, "CMRIN left out (--cmrin-run '')"
    if not (resolve_run(cmrin_run, "cmrin", dataset, cache).path / MODEL_FILE).is_file():
        return {}, f"no CMRIN run {cmrin_run!r}: train it with `refground train cmrin --run {cmrin_run}`"
    jobs: list[tuple[str, dict[str, Any]]] = [(s, {"candidates": "gt"}) for s in splits]
    jobs += [(s, {"candidates": "proposals", "top_n": 10}) for s in splits]
    try:
        results = get_method("cmrin", "predict").predict(dataset, cache, cmrin_run, jobs)
    except ArtifactError as exc:  # e.g. the features CMRIN reads are stale: LTS's own tables still stand
        return {}, f"CMRIN run {cmrin_run!r} not scored: {exc}"
    out: dict[str, dict[str, float | None]] = {"gt": {}, "proposals": {}}
    for (split, opts), res in zip(jobs, results):
        out[opts["candidates"]][split] = comprehension_of(ds, res["path"], split)["all"]["precision@1"]
    return out, ""


# ------------------------------------------------------------------------------------------------ grid
def grid_examples(ds: Any, preds: Any, split: str, per_side: int = GRID_PER_SIDE) -> list[dict[str, Any]]:
    """For each expression kind of ``split`` (in the dataset's kind order), the first ``per_side`` successes
    (IoU > 0.5) and failures (IoU <= 0.5) by query id: ``[{"kind", "successes": [(query_id, iou)], "failures":
    [...]}]``. A query without a prediction is a failure with an empty mask; one whose referent has no mask is
    skipped. Queries are scored in id order only until every kind has its examples."""
    from refground.data.model import KIND_ORDER
    from refground.eval.metrics import iou_from_counts, mask_intersection_union
    from refground.methods.lts.data import referent_masks

    rows = ds.query_rows(split, "expression")
    ids = np.asarray(ds.query_ids)[rows]
    kinds = [ds.query_kinds[int(r)] or "all" for r in rows.tolist()]  # real data has kind ""
    picked: dict[str, dict[str, list[tuple[int, float]]]] = {k: {"successes": [], "failures": []} for k in kinds}
    open_kinds = set(picked)
    for k in np.argsort(ids, kind="stable").tolist():
        if not open_kinds:
            break
        got = picked[kinds[k]]
        if kinds[k] not in open_kinds:
            continue
        try:
            gt = referent_masks(ds, rows[k:k + 1])[0]
        except DataError:  # no referent mask: nothing to score
            continue
        p = preds.queries.get(int(ids[k]))
        pred = p.mask if p is not None and p.mask is not None else np.zeros(tuple(gt["size"]), dtype=bool)
        iou = float(iou_from_counts(*mask_intersection_union([pred], [gt]))[0])
        side = got["successes"] if iou > 0.5 else got["failures"]
        if len(side) < per_side:
            side.append((int(ids[k]), iou))
        if len(got["successes"]) >= per_side and len(got["failures"]) >= per_side:
            open_kinds.discard(kinds[k])
    known = [k for k in KIND_ORDER if k in picked]
    return [{"kind": k, **picked[k]} for k in known + sorted(set(picked) - set(known))]


def render_examples(ds: Any, preds: Any, examples: list[dict[str, Any]], title: str,
                    per_side: int = GRID_PER_SIDE) -> Any:
    """The grid PNG (a PIL image) of :func:`grid_examples`' choice: predicted masks decoded from ``preds``,
    ground truth from the dataset."""
    from refground import masks as rmasks
    from refground.methods.lts.data import referent_masks
    from refground.methods.lts.figures import example_panel, render_grid

    def panel(qid: int, iou: float) -> Any:
        q = ds.query(qid)
        gt = rmasks.decode(referent_masks(ds, np.array([ds.query_row(qid)]))[0])
        p = preds.queries.get(qid)
        pred = rmasks.decode(p.mask) if p is not None and p.mask is not None else np.zeros_like(gt)
        return example_panel(ds, q, pred, gt, iou)

    rows = [(e["kind"], [panel(*x) for x in e["successes"]], [panel(*x) for x in e["failures"]]) for e in examples]
    return render_grid(rows, title, per_side)


# ------------------------------------------------------------------------------------------------ tables
def _seg(scores: dict[str, Any], run: str, split: str, kind: str = "all") -> dict[str, Any]:
    return ((scores.get(run) or {}).get(split) or {}).get("segmentation", {}).get(kind) or {}


def build_tables(dataset: str, status: dict[str, dict[str, Any]], scores: dict[str, dict[str, Any]],
                 splits: tuple[str, ...], main: str | None, cmrin: dict[str, dict[str, float | None]],
                 cmrin_note: str, cmrin_run: str) -> list[tuple[str, TableData, str]]:
    """Every table as ``(markdown heading, TableData, note under it)``, in report order. ``status``: per run
    name in report order, :func:`run_status` (its ``variant`` places the run's rows); ``scores``:
    :func:`score_runs` of the trained ones."""
    out: list[tuple[str, TableData, str]] = []
    loc = any("loc_acc" in _seg(scores, r, s) for r in scores for s in splits)
    keys = [*SEG_KEYS, *(["loc_acc"] if loc else [])]
    variant = {n: st["variant"] if "variant" in st else variant_of_config(st.get("config"))
               for n, st in status.items()}
    status = {n: {**st, "variant": variant[n]} for n, st in status.items()}
    t2 = [n for n in status if variant[n] in TABLE2 or variant[n] is None]  # the ablation rows, runs of no variant
    if t2:
        for split in splits:
            rows = []
            for n in t2:
                st = status[n]
                m = marks(st["config"]) if st["config"] else dict.fromkeys(MARKS, "?")
                label = row_label(st)
                seg = _seg(scores, n, split)
                rows.append([label, *(m[k] for k in MARKS), *(seg.get(k) for k in keys)])
            cols = ["run", *MARKS, *(SEG_COLUMNS.get(k, k) for k in keys)]
            out.append((f"Table 2: ablation, {split}",
                        TableData(f"LTS ablation (Table 2) on {dataset}, {split} (%)", cols, rows,
                                  [TEXT] * (1 + len(MARKS)) + [PERCENT] * len(keys)),
                        TABLE2_NOTE))
    for title, names, labels in (("Table 4: relevance filter against transformer, overall IoU", TABLE4,
                                  TABLE4_LABELS),
                                 ("Table 5: number and kind of relevance filters, overall IoU", TABLE5,
                                  TABLE5_LABELS)):
        present = [n for v in names for n in status if variant[n] == v]  # the table's row order, then --runs'
        if len({variant[n] for n in present}) < 2:  # a comparison needs two of its rows (--runs may leave them out)
            continue
        rows = [[row_label(status[n], labels),
                 *(_seg(scores, n, s).get("overall_iou") for s in splits)] for n in present]
        out.append((title, TableData(f"LTS {title.split(':')[0]} on {dataset}: overall IoU (%)", ["run", *splits],
                                     rows, [TEXT] + [PERCENT] * len(splits)), ""))
    missing = [st for st in status.values() if not st["trained"]]
    if missing:
        out.append(("Runs not trained", TableData(f"LTS runs not trained on {dataset}", ["run", "command"],
                                                  [[st["run"], st["command"]] for st in missing], [TEXT, TEXT]),
                    ""))
    # LTS's mask box against CMRIN's choice among candidates.
    title = "Comprehension: Precision@1 of LTS's mask box against CMRIN"
    rows = []
    if main is not None:
        rows.append([f"LTS {main!r}: bounding box of the predicted mask",
                     *(((scores[main].get(s) or {}).get("comprehension", {}).get("all") or {}).get("precision@1")
                       for s in splits)])
    else:
        rows.append(["LTS: no trained run", *[None] * len(splits)])
    if cmrin:
        rows.append([f"CMRIN {cmrin_run!r}, ground-truth objects", *(cmrin["gt"].get(s) for s in splits)])
        rows.append([f"CMRIN {cmrin_run!r}, detector top-10 proposals",
                     *(cmrin["proposals"].get(s) for s in splits)])
    else:
        rows.append([cmrin_note, *[None] * len(splits)])
    out.append((title, TableData(f"{title} on {dataset} (%)", ["method", *splits], rows,
                                 [TEXT] + [PERCENT] * len(splits)),
                "Precision@1: share of queries whose box has IoU >= 0.5 with the referent's box."))
    if main is not None:
        rows = []
        for split in splits:
            by_kind = ((scores[main].get(split) or {}).get("segmentation") or {})
            for kind, figs in by_kind.items():
                rows.append([split, kind, figs.get("queries"), figs.get("overall_iou"), figs.get("prec@0.5"),
                             figs.get("loc_acc")])
        cols = ["split", "kind", "queries", "overall IoU", "prec@0.5", "loc acc"]
        kinds = [TEXT, TEXT, None, PERCENT, PERCENT, PERCENT]
        if not loc:
            cols, kinds, rows = cols[:-1], kinds[:-1], [r[:-1] for r in rows]
        out.append((f"Per expression kind: run {main!r}",
                    TableData(f"LTS {main!r} on {dataset} per expression kind", cols, rows, kinds),
                    "loc acc: share of queries whose localisation heatmap's maximum lies in the referent mask."
                    if loc else ""))
    return out


def render_markdown(dataset: str, tables: list[tuple[str, TableData, str]], grid: str | None, grid_note: str
                    ) -> str:
    lines = [f"# LTS on {dataset}", ""]
    for heading, t, note in tables:
        lines += [f"### {heading}", "", *markdown_table(t), ""]
        if note:
            lines += [note, ""]
    lines += ["### Successes and failures", ""]
    lines += [grid_note, ""] if grid_note else []
    if grid:
        lines += [f"![successes and failures]({Path(grid).name})", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ report
def lts_report(dataset: str, cache: Any, out: Path | None, runs: str | None = None,
               splits: str = "val,testA,testB", cmrin_run: str = "cmrin") -> dict[str, Any]:
    """Write LTS's report: markdown to ``out`` (default ``<cache>/<dataset>/report/lts.md``), its figures as JSON
    beside it (``<stem>.json``, written as ``refground report`` writes it) and the grid PNG ``<stem>_grid.png``.

    ``runs``: comma-separated run names, any names: each lands in the tables of the variant its config stands
    for (default: the runs named after every variant of Tables 2, 4 and 5; those without a trained run are listed
    as not trained with the command that trains them); ``splits``: comma-separated split names;
    ``cmrin_run``: the CMRIN run beside LTS's mask box ("" to leave it out). No trained run among ``runs`` is a
    one-line ArtifactError. Returns ``{"markdown_path", "tables": [TableData], "json": dict}``.
    """
    from refground.data.store import dataset_dir, load_dataset
    from refground.methods.lts.model import VARIANTS
    from refground.train import run_names
    from refground.viz import save_png

    split_names = split_list(splits)
    names = list(dict.fromkeys(run_names(runs) or VARIANTS))
    status = {n: run_status(dataset, cache, n) for n in names}
    trained = [n for n in names if status[n]["trained"]]
    if not trained:
        raise ArtifactError(f"no trained LTS runs among {', '.join(names)}; train them with `refground train lts "
                            "--variant NAME`" + (f" (NAME in {', '.join(VARIANTS)})" if runs is None else ""))
    main = main_run(status) or trained[0]
    ds = load_dataset(dataset_dir(dataset, cache))
    scores, main_preds = score_runs(ds, dataset, cache, trained, split_names, keep=(main, split_names[0]))
    cmrin, cmrin_note = cmrin_precision(ds, dataset, cache, cmrin_run, split_names)
    tables = build_tables(dataset, status, scores, split_names, main, cmrin, cmrin_note, cmrin_run)

    path = Path(out) if out is not None else dataset_dir(dataset, cache).parent / "report" / "lts.md"
    grid_path = path.with_name(f"{path.stem}_grid.png")
    examples = grid_examples(ds, main_preds, split_names[0])
    grid: str | None = None
    if any(e["successes"] or e["failures"] for e in examples):
        title = (f"LTS run {main!r} on {dataset} {split_names[0]}: first {GRID_PER_SIDE} successes and failures "
                 "per kind by query id (red = prediction, green outline = ground truth)")
        grid = str(save_png(render_examples(ds, main_preds, examples, title), grid_path))
        grid_note = (f"Run `{main}` on {split_names[0]}: per expression kind the first {GRID_PER_SIDE} queries by id "
                     "with IoU > 0.5 and with IoU <= 0.5.")
    else:
        grid_note = f"No query of {split_names[0]} has a ground-truth mask: no grid."

    js: dict[str, Any] = {
        "dataset": dataset, "markdown_path": str(path), "png": grid, "splits": list(split_names), "main_run": main,
        "runs": {n: {**status[n], "label": LABELS.get(status[n]["variant"] or ""),
                     "marks": marks(status[n]["config"]) if status[n]["config"] else None,
                     "figures": scores.get(n)} for n in names},
        "cmrin": {"run": cmrin_run, "precision@1": cmrin, "note": cmrin_note},
        "grid": {"split": split_names[0], "examples": examples},
        "tables": [{"title": t.title, "columns": t.columns, "rows": t.rows} for _, t, _ in tables],
    }
    if grid is not None:
        js["grid"]["path"] = grid
    js = write_report(path, render_markdown(dataset, tables, grid, grid_note), js)
    return {"markdown_path": str(path), "tables": [t for _, t, _ in tables], "json": js}


__all__ = ["GRID_PER_SIDE", "LABELS", "TABLE2", "TABLE4", "TABLE5", "build_tables", "cmrin_precision",
           "grid_examples", "lts_report", "main_run", "marks", "render_examples", "render_markdown", "row_label",
           "run_status", "score_runs", "split_list", "train_command", "variant_of_config"]
