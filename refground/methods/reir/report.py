"""ReIR's tables on a dataset (the paper's Tables 2 and 3 as analogues, per phrase kind, and Fig. 4) as markdown,
JSON and a PNG.

Each row is a run ``runs/reir/<name>`` (by default the run named after its variant, trained with ``refground
train reir --variant <variant>``), placed by its ``config.json`` (:func:`~refground.methods.reir.model.
variant_of_config`), not by its name: ``--runs reir-e4`` puts ``reir-e4`` in the full model's rows, labelled
with the variant's paper label and the run name in parentheses. A variant without a complete run is listed as
not trained, with the command that trains it. The class-name baseline (run name ``class-name``: the proposal
whose detector class best matches the phrase head, nothing trained) is always the first row. Every run's
predictions are written or reused by :func:`refground.methods.reir.run.predict_reir_many` and scored once per
split by :func:`refground.eval.evaluate.evaluate`, whose ``phrase_grounding`` section (``accuracy``: IoU >= 0.5
with the phrase's true union box, and ``pointit``, per phrase kind and ``all``) fills every table.

* Table 2: Acc and PointIt per split of the class-name baseline, the ablation rows in the paper's order
  (baseline, +TSD, +TSD +STR w/o x_q, +TSD +STR, +TSD +VOGN&RC, all w/o attention, all), runs of no variant,
  and the upper bound, with the paper's marks TSD, STR, VOGN&RC read from each run's config.
* Upper bound: the full model, the upper bound and the gap between them (points) per split.
* Table 3: the full model with K = 3, 5, 10 top proposals per phrase.
* Per phrase kind: Acc and PointIt of the class-name baseline, the main run and the upper bound per split and
  phrase kind (``singular``, ``plural``, ``needs-relation`` in the synthetic world; whatever the evaluator
  reports).
* Fig. 4: Acc at IoU thresholds 0.5, 0.6, 0.7, 0.8 and the mean IoU of the predicted box against the true
  (union) box, for ``iou_run`` (with L_reg) and ``no_reg_run`` (without), from the predictions with the metric
  module's functions (:func:`iou_figures`); drawn as ``<stem>_iou.png``.

The main run is ``reir`` when it is among the runs and trained, else the first trained run of variant ``reir``,
else the first trained run that is no upper bound.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from refground.errors import ArtifactError
from refground.tables import PERCENT, TEXT, TableData, markdown_table, split_list, write_report

TABLE2 = ("baseline", "tsd", "tsd-str-noq", "tsd-str", "tsd-vogn", "uniform", "reir")
TABLE3 = ("reir-k3", "reir", "reir-k10")
UPPER = "upper-bound"
CLASS_NAME = "class-name"  # run.py's CLASS_NAME_RUN, repeated so that importing this module loads no torch
LABELS = {"baseline": "baseline (coarse level, L_rec + L_rank)", "tsd": "+TSD", "tsd-str-noq": "+TSD +STR (w/o x_q)",
          "tsd-str": "+TSD +STR", "tsd-vogn": "+TSD +VOGN&RC", "uniform": "all, w/o attention",
          "reir": "ReIR (all)", "reir-k3": "ReIR, K = 3", "reir-k10": "ReIR, K = 10",
          "upper-bound": "upper bound (+ supervised cross-entropy)"}
CLASS_NAME_LABEL = "class-name baseline (no training)"
MARKS = ("TSD", "STR", "VOGN&RC")
IOU_THRESHOLDS = (0.5, 0.6, 0.7, 0.8)
CHECK = "✓"
TABLE2_NOTE = ("Rows: the paper's Table 2 ablation, each run placed by its config (its name in parentheses where "
               "it differs from its variant's). TSD: two-stage (coarse top-K, fine level); STR: self-taught "
               "regression (w/o x_q: F_reg reads x_o only); VOGN&RC: the visual object graph and the relation "
               "loss (uniform: eq. 7's attention replaced by 1/|N(i)|). Acc: share of phrases whose box has IoU "
               ">= 0.5 with the phrase's true (union) box; PointIt: share whose box centre lies in it.")
UPPER_NOTE = ("The upper bound is the full network plus a cross-entropy on the proposal that best covers each "
              "phrase's true box (supervised; not in the paper): how far weak supervision is from it.")
IOU_NOTE = ("Acc@t: share of phrases whose predicted box has IoU >= t with the phrase's true (union) box; mean IoU "
            "over all phrases with a true box (a missing prediction counts as IoU 0).")


# ------------------------------------------------------------------------------------------------ placement
def train_command(dataset: str, name: str) -> str:
    """The command that trains run ``name`` (a variant's name trains that variant)."""
    from refground.methods import train_command as command
    from refground.methods.reir import VARIANTS

    return command("reir", dataset, name, VARIANTS)


def marks(config: dict[str, Any]) -> dict[str, str]:
    """The paper's Table 2 marks of a config (a run's ``config.json`` dict; missing fields take
    :class:`~refground.methods.reir.model.ReIRConfig`'s defaults): TSD (``two_stage``), STR (``regression``;
    ``w/o x_q`` when F_reg does not read the phrase), VOGN&RC (``graph``; ``uniform`` without eq. 7's
    attention)."""
    def on(key: str) -> bool:
        return bool(config.get(key, True))

    return {"TSD": CHECK if on("two_stage") else "",
            "STR": (CHECK if on("reg_query") else "w/o x_q") if on("regression") else "",
            "VOGN&RC": (CHECK if on("graph_attention") else "uniform") if on("graph") else ""}


def placed_variant(config: Any) -> str | None:
    """:func:`~refground.methods.reir.model.variant_of_config` of a config.json content; None for no dict."""
    from refground.methods.reir.model import variant_of_config

    return variant_of_config(config) if isinstance(config, dict) else None


def row_label(st: dict[str, Any]) -> str:
    """A run's row label: its variant's paper label with the run name in parentheses when it differs from the
    variant's name; the run name for a run of no variant; `` (not trained)`` appended when it is not trained.
    ``st``: :func:`run_status`."""
    run, v = st["run"], st.get("variant")
    label = run if v is None else LABELS[v] + ("" if run == v else f" ({run})")
    return label if st["trained"] else f"{label} (not trained)"


def run_status(dataset: str, cache: Any, name: str) -> dict[str, Any]:
    """``{"run", "trained", "config", "variant", "command"}``: whether ``runs/reir/<name>`` is a complete run
    (:func:`refground.train.complete_run`: a complete manifest, config and weights), its config dict (the
    variant's defaults when not trained and ``name`` is a variant; else None), the variant that config stands
    for (None when none) and the command that trains (or resumes) it."""
    from refground.methods.reir import VARIANTS
    from refground.methods.reir.model import variant_config
    from refground.runs import resolve_run
    from refground.train import CONFIG_FILE, complete_run, read_json

    path = resolve_run(name, "reir", dataset, cache).path
    try:
        complete_run(path, "reir")
        config = read_json(path / CONFIG_FILE)
    except ArtifactError:
        config = None
    trained = isinstance(config, dict)
    if not trained:
        config = variant_config(name).to_dict() if name in VARIANTS else None
    return {"run": name, "trained": trained, "config": config, "variant": placed_variant(config),
            "command": train_command(dataset, name)}


def main_run(status: dict[str, dict[str, Any]]) -> str | None:
    """The run of the per-kind table: ``reir`` when trained, else the first trained run of variant ``reir``,
    else the first trained run that is no upper bound (None when none is). ``status``: per run name,
    :func:`run_status`."""
    trained = [n for n, st in status.items() if st["trained"]]
    if "reir" in trained:
        return "reir"
    return next((n for n in trained if status[n].get("variant") == "reir"),
                next((n for n in trained if status[n].get("variant") != UPPER), None))


def upper_run(status: dict[str, dict[str, Any]]) -> str | None:
    """The trained upper-bound run: ``upper-bound`` when trained, else the first trained run of that variant."""
    trained = [n for n, st in status.items() if st["trained"]]
    if UPPER in trained:
        return UPPER
    return next((n for n in trained if status[n].get("variant") == UPPER), None)


# ------------------------------------------------------------------------------------------------ Fig. 4
def phrase_boxes(ds: Any, preds: Any, split: str) -> tuple[list[Any], list[np.ndarray], list[str]]:
    """Every phrase of ``split``'s captions that links at least one object (the phrases the evaluator scores):
    its predicted box from ``preds`` (a :class:`~refground.eval.predictions.Predictions`; None where it has no
    line), its true boxes float64[k, 4] and its kind (the mention's, else the query's), in dataset order."""
    boxes: list[Any] = []
    truth: list[np.ndarray] = []
    kinds: list[str] = []
    for q in ds.queries(split, "caption"):
        for m_idx, m in enumerate(q.mentions):
            if not m.object_ids:
                continue
            p = preds.phrases.get((q.id, m_idx))
            boxes.append(p.top_box if p is not None else None)
            truth.append(ds.object_boxes[[ds.object_row(o) for o in m.object_ids]].astype(np.float64).reshape(-1, 4))
            kinds.append(m.kind or q.kind)
    return boxes, truth, kinds


def iou_figures(boxes: list[Any], truth: list[np.ndarray], thresholds: tuple[float, ...] = IOU_THRESHOLDS
                ) -> dict[str, Any]:
    """Fig. 4's figures of P phrases: ``boxes`` P predicted boxes (xyxy; None = no prediction, IoU 0, a miss),
    ``truth`` P arrays float[k_i, 4] (k_i >= 1) of true boxes, scored against their union box
    (:func:`refground.eval.metrics.union_boxes`, :func:`~refground.eval.metrics.matched_box_iou`,
    :func:`~refground.eval.metrics.box_accuracy_hits`: IoU >= t is a hit). Returns ``{"phrases", "missing",
    "mean_iou", "acc@<t>" for each t}`` (shares in [0, 1]; None over no phrase)."""
    from refground.eval.metrics import box_accuracy_hits, matched_box_iou, union_boxes

    out: dict[str, Any] = {"phrases": len(truth), "missing": sum(b is None for b in boxes)}
    if not truth:
        return {**out, "mean_iou": None, **{f"acc@{t:g}": None for t in thresholds}}
    have = np.array([b is not None for b in boxes], dtype=bool)
    pred = np.array([b if b is not None else (0.0, 0.0, 0.0, 0.0) for b in boxes], dtype=np.float64).reshape(-1, 4)
    gt = union_boxes(truth)
    ious = np.where(have, matched_box_iou(pred, gt), 0.0)
    out["mean_iou"] = float(ious.mean())
    for t in thresholds:
        out[f"acc@{t:g}"] = float((box_accuracy_hits(pred, gt, t) & have).mean())
    return out


def iou_curve(ds: Any, preds: Any, split: str, thresholds: tuple[float, ...] = IOU_THRESHOLDS) -> dict[str, Any]:
    """:func:`iou_figures` of a predictions file's phrases on ``split`` (:func:`phrase_boxes`)."""
    boxes, truth, _ = phrase_boxes(ds, preds, split)
    return iou_figures(boxes, truth, thresholds)


def render_iou_plot(iou: dict[str, Any], splits: tuple[str, ...], title: str) -> Any:
    """Fig. 4 as a PIL image: Acc (%) against the IoU threshold, a line per run and split (``iou``:
    :func:`reir_report`'s ``iou`` JSON)."""
    from refground.plots import line_chart

    thresholds = iou["thresholds"]
    series: dict[str, tuple[list[float], list[float | None]]] = {}
    for side in ("with_reg", "without_reg"):
        entry = iou[side]
        for split in splits:
            figs = (entry.get("figures") or {}).get(split)
            if not figs:
                continue
            ys = [None if figs.get(f"acc@{t:g}") is None else 100.0 * figs[f"acc@{t:g}"] for t in thresholds]
            what = "with L_reg" if side == "with_reg" else "without L_reg"
            series[f"{what} ({entry['run']}), {split}"] = (list(thresholds), ys)
    return line_chart(series, title, "IoU threshold", "Acc (%)", size=(760, 420), y_range=(0.0, 100.0),
                      x_ticks=thresholds)


# ------------------------------------------------------------------------------------------------ scoring
def score_runs(ds: Any, dataset: str, cache: Any, names: list[str], splits: tuple[str, ...],
               keep: tuple[str, ...] = ()) -> tuple[dict[str, dict[str, Any]], dict[tuple[str, str], Any]]:
    """Predict (or reuse the predictions of) every run of ``names`` (``class-name``: the baseline) on ``splits``
    and score each once: ``{run: {split: {"phrase_grounding": {kind: figures}, "predictions": path}}}``, and the
    parsed :class:`~refground.eval.predictions.Predictions` of the runs in ``keep`` per (run, split)."""
    from refground.eval.evaluate import evaluate
    from refground.eval.predictions import read_predictions
    from refground.methods.reir import run as reir_run

    out: dict[str, dict[str, Any]] = {}
    kept: dict[tuple[str, str], Any] = {}
    for name in names:
        out[name] = {}
        for split, res in zip(splits, reir_run.predict_reir_many(dataset, cache, name, list(splits))):
            preds = read_predictions(res["path"])
            figs = evaluate(ds, preds, split, sections=("phrase_grounding",)).to_dict()
            out[name][split] = {"phrase_grounding": figs.get("phrase_grounding", {}), "predictions": res["path"]}
            if name in keep:
                kept[(name, split)] = preds
    return out, kept


def _pg(scores: dict[str, Any], run: str | None, split: str, kind: str = "all") -> dict[str, Any]:
    if run is None:
        return {}
    return (((scores.get(run) or {}).get(split) or {}).get("phrase_grounding") or {}).get(kind) or {}


def _diff(a: Any, b: Any) -> float | None:
    return None if a is None or b is None else float(a) - float(b)


# ------------------------------------------------------------------------------------------------ tables
def table2_order(status: dict[str, dict[str, Any]]) -> list[str]:
    """Table 2's runs: those of the ablation variants in the paper's order, then runs of no variant, then the
    upper bound's (each group in ``status`` order); Table 3's K = 3 and 10 runs are not in it."""
    order = [n for v in TABLE2 for n, st in status.items() if st["variant"] == v]
    order += [n for n, st in status.items() if st["variant"] is None]
    return order + [n for n, st in status.items() if st["variant"] == UPPER]


def build_tables(dataset: str, status: dict[str, dict[str, Any]], scores: dict[str, dict[str, Any]],
                 splits: tuple[str, ...], main: str | None, upper: str | None, iou: dict[str, Any]
                 ) -> list[tuple[str, TableData, str]]:
    """Every table as ``(markdown heading, TableData, note under it)``, in report order. ``status``: per run
    name, :func:`run_status`; ``scores``: :func:`score_runs` of the trained runs and ``class-name``; ``iou``:
    the Fig. 4 JSON of :func:`reir_report`."""
    out: list[tuple[str, TableData, str]] = []
    fig_cols = [f"{s} {f}" for s in splits for f in ("Acc", "PointIt")]

    def figs(run: str | None) -> list[Any]:
        return [_pg(scores, run, s).get(k) for s in splits for k in ("accuracy", "pointit")]

    rows = [[CLASS_NAME_LABEL, "", "", "", *figs(CLASS_NAME)]]
    for n in table2_order(status):
        st = status[n]
        m = marks(st["config"]) if st["config"] else dict.fromkeys(MARKS, "?")
        rows.append([row_label(st), *(m[k] for k in MARKS), *figs(n if st["trained"] else None)])
    out.append(("Table 2: ablation", TableData(f"ReIR ablation (Table 2) on {dataset}: phrase grounding (%)",
                                               ["run", *MARKS, *fig_cols], rows,
                                               [TEXT] * (1 + len(MARKS)) + [PERCENT] * len(fig_cols)), TABLE2_NOTE))

    if main is not None and upper is not None:
        gap = [_diff(u, r) for u, r in zip(figs(upper), figs(main))]
        rows = [[row_label(status[main]), *figs(main)], [row_label(status[upper]), *figs(upper)],
                ["gap: upper bound - full model (points)", *gap]]
        out.append(("Upper bound against the full model",
                    TableData(f"ReIR upper bound on {dataset} (%)", ["run", *fig_cols], rows,
                              [TEXT] + [PERCENT] * len(fig_cols)),
                    UPPER_NOTE))

    present = [n for v in TABLE3 for n, st in status.items() if st["variant"] == v]
    if len({status[n]["variant"] for n in present}) >= 2:  # a comparison needs two of its rows
        rows = [[int((status[n]["config"] or {}).get("top_k", 5)), row_label(status[n]),
                 *figs(n if status[n]["trained"] else None)] for n in present]
        out.append(("Table 3: number of top proposals K",
                    TableData(f"ReIR K top proposals per phrase (Table 3) on {dataset} (%)", ["K", "run", *fig_cols],
                              rows, [None, TEXT] + [PERCENT] * len(fig_cols)), ""))

    cols_of = [(CLASS_NAME, "class-name")]
    if main is not None:
        cols_of.append((main, main))
    if upper is not None:
        cols_of.append((upper, upper))
    rows = []
    for split in splits:
        kinds: list[str] = []
        for run, _ in cols_of:
            kinds += [k for k in (((scores.get(run) or {}).get(split) or {}).get("phrase_grounding") or {})
                      if k not in kinds]
        for kind in kinds:
            first = next((_pg(scores, r, split, kind) for r, _ in cols_of if _pg(scores, r, split, kind)), {})
            rows.append([split, kind, first.get("phrases"),
                         *(_pg(scores, r, split, kind).get(k) for r, _ in cols_of for k in ("accuracy", "pointit"))])
    cols = ["split", "kind", "phrases", *(f"{lab} {f}" for _, lab in cols_of for f in ("Acc", "PointIt"))]
    out.append(("Per phrase kind", TableData(f"ReIR on {dataset} per phrase kind (%)", cols, rows,
                                             [TEXT, TEXT, None] + [PERCENT] * (2 * len(cols_of))),
                "Kinds as the evaluator reports them (the mention's kind where it has one)."))

    t_cols = [f"Acc@{t:g}" for t in iou["thresholds"]]
    rows = []
    for side, what in (("with_reg", "with L_reg"), ("without_reg", "without L_reg")):
        entry = iou[side]
        for split in splits:
            f = (entry.get("figures") or {}).get(split) or {}
            rows.append([f"{what} ({entry['run']})" + ("" if entry["trained"] else " (not trained)"), split,
                         *(f.get(f"acc@{t:g}") for t in iou["thresholds"]), f.get("mean_iou")])
    out.append(("Fig. 4: accuracy at IoU thresholds, with and without L_reg",
                TableData(f"ReIR Fig. 4 on {dataset} (%)", ["run", "split", *t_cols, "mean IoU"], rows,
                          [TEXT, TEXT] + [PERCENT] * (len(t_cols) + 1)),
                IOU_NOTE + (f" {iou['note']}" if iou.get("note") else "")))

    missing = [st for st in status.values() if not st["trained"]]
    if missing:
        out.append(("Runs not trained", TableData(f"ReIR runs not trained on {dataset}", ["run", "command"],
                                                  [[st["run"], st["command"]] for st in missing], [TEXT, TEXT]), ""))
    return out


def render_markdown(dataset: str, tables: list[tuple[str, TableData, str]], png: str | None) -> str:
    lines = [f"# ReIR on {dataset}", ""]
    for heading, t, note in tables:
        lines += [f"### {heading}", "", *markdown_table(t), ""]
        if note:
            lines += [note, ""]
        if heading.startswith("Fig. 4") and png:
            lines += [f"![Fig. 4: Acc at IoU thresholds]({Path(png).name})", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ report
def reir_report(dataset: str, cache: Any, out: Path | None, runs: str | None = None, splits: str = "val,test",
                iou_run: str = "reir", no_reg_run: str = "tsd-vogn") -> dict[str, Any]:
    """Write ReIR's report: markdown to ``out`` (default ``<cache>/<dataset>/report/reir.md``), its figures as
    JSON beside it (``<stem>.json``, written as ``refground report`` writes it) and Fig. 4's plot
    ``<stem>_iou.png``.

    ``runs``: comma-separated run names, any names: each lands in the rows of the variant its config stands for
    (default: the runs named after every variant; those without a complete run are listed as not trained with
    the command that trains them); the class-name baseline is always scored. ``splits``: comma-separated split
    names. ``iou_run`` / ``no_reg_run``: Fig. 4's runs with and without L_reg (scored too when not among
    ``runs``). Missing or stale proposals or relation labels are the one-line ArtifactError of the predict step.
    Returns ``{"markdown_path", "tables": [TableData], "json": dict}``."""
    from refground.data.store import dataset_dir, load_dataset
    from refground.methods.reir import VARIANTS
    from refground.train import run_names
    from refground.viz import save_png

    split_names = split_list(splits)
    names = [n for n in dict.fromkeys(run_names(runs) or VARIANTS) if n != CLASS_NAME]
    status = {n: run_status(dataset, cache, n) for n in names}
    extra = {n: run_status(dataset, cache, n) for n in dict.fromkeys((iou_run, no_reg_run)) if n not in status}
    main, upper = main_run(status), upper_run(status)
    trained = [n for n in names if status[n]["trained"]]
    trained += [n for n, st in extra.items() if st["trained"]]
    ds = load_dataset(dataset_dir(dataset, cache))
    scores, kept = score_runs(ds, dataset, cache, [CLASS_NAME, *trained], split_names, keep=(iou_run, no_reg_run))

    every = {**status, **extra}
    notes = []
    iou: dict[str, Any] = {"thresholds": list(IOU_THRESHOLDS)}
    for side, name, want in (("with_reg", iou_run, True), ("without_reg", no_reg_run, False)):
        st = every[name]
        config = st["config"] or {}
        entry: dict[str, Any] = {"run": name, "trained": st["trained"], "variant": st["variant"],
                                 "regression": bool(config.get("regression", True)) if st["config"] else None}
        if st["trained"]:
            entry["figures"] = {s: iou_curve(ds, kept[(name, s)], s) for s in split_names}
            if entry["regression"] is not want:  # e.g. --iou-run names a run of another variant
                notes.append(f"Run {name!r} (the {'with' if want else 'without'} L_reg curve) "
                             f"{'has no' if want else 'has'} self-taught regression by its config.")
        else:
            notes.append(f"Run {name!r} is not trained: `{st['command']}`.")
        iou[side] = entry
    iou["note"] = " ".join(notes)
    tables = build_tables(dataset, status, scores, split_names, main, upper, iou)

    path = Path(out) if out is not None else dataset_dir(dataset, cache).parent / "report" / "reir.md"
    png_path = path.with_name(f"{path.stem}_iou.png")
    png: str | None = None
    if any(iou[side].get("figures") for side in ("with_reg", "without_reg")):
        title = f"ReIR Fig. 4 on {dataset}: Acc against the IoU threshold"
        png = str(save_png(render_iou_plot(iou, split_names, title), png_path))
    iou["png"] = png

    js: dict[str, Any] = {
        "dataset": dataset, "markdown_path": str(path), "png": png, "splits": list(split_names), "main_run": main,
        "upper_run": upper,
        "baseline": {"run": CLASS_NAME, "label": CLASS_NAME_LABEL, "figures": scores.get(CLASS_NAME)},
        "runs": {n: {**status[n], "label": LABELS.get(status[n]["variant"] or ""),
                     "marks": marks(status[n]["config"]) if status[n]["config"] else None,
                     "figures": scores.get(n)} for n in names},
        "iou": iou,
        "tables": [{"title": t.title, "columns": t.columns, "rows": t.rows} for _, t, _ in tables],
    }
    js = write_report(path, render_markdown(dataset, tables, png), js)
    return {"markdown_path": str(path), "tables": [t for _, t, _ in tables], "json": js}


__all__ = ["IOU_THRESHOLDS", "LABELS", "TABLE2", "TABLE3", "build_tables", "iou_curve", "iou_figures", "main_run",
           "marks", "phrase_boxes", "placed_variant", "reir_report", "render_iou_plot", "render_markdown",
           "row_label", "run_status", "score_runs", "table2_order", "train_command", "upper_run"]
