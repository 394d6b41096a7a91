"""BiCM's tables on a dataset (the paper's Tables 4-7 as analogues, per expression kind, lambda_t, timings) as
markdown, JSON and a PNG.

Every row is a run name of ``refground eval --method bicm``: the training-free rows ``class-name`` (the baseline of
Wang and Specia [25]), ``qam``, ``com``, ``com-class``, ``com-visual``, ``qam-com``, ``va-com``, ``qam-com-sf``,
``va-com-sf``, and the trained run ``run`` (default ``bicm``: QAM + COM + SF + KAM). Each row's predictions are
written or reused by :func:`refground.methods.bicm.run.predict_bicm_many` on the expression ``splits`` and the
caption ``phrase_split`` and scored once per split by :func:`refground.eval.evaluate.evaluate`: its
``comprehension`` section (Precision@1 per expression kind and ``all``) and ``phrase_grounding`` section (Acc:
IoU >= 0.5 with the phrase's true union box; PointIt) fill every table. A trained run that is missing is a row
saying so, with the commands that make it.

Box rules (Sec. 4.1): the paper's ``largest`` (the largest of the above-mean boxes) for expressions and
``union`` (of the above-mean boxes) for phrases; every row is also scored under ``argmax`` (the top box, for
expressions and phrases), since the two differ a lot here. ``predict_bicm_many`` writes a row's predictions to
one path whatever the rule, so the argmax files are written and scored first and the paper's rule last: what
stays on disk is what ``refground eval --method bicm`` reads by default.

* Table 4: class-name baseline, QAM, COM, QAM+COM, QAM+COM+SF, QAM+COM+SF+KAM; Precision@1 per expression split
  and phrase Acc / PointIt on ``phrase_split``, under the paper's rules and under argmax (a second table), and
  the paper's Flickr30K figure beside each row. Drawn as ``<stem>_table4.png`` (grouped bars, one panel per rule).
* Table 5: COM, QAM (VA) + COM, QAM (QA) + COM, QAM (VA) + COM + SF, QAM (QA) + COM + SF (VA: the vanilla
  attention map, QA: the query-aware one).
* Table 6: the class-name baseline and COM on class names only, on visual objects only, on both.
* Table 7: the pseudo labels' count and precision per Thr_k, read from the pseudo artifact's manifest
  (``refground pseudo bicm``); missing labels are a row saying so, with the command.
* Per expression kind: Precision@1 on the first split of class-name, COM, QAM+COM+SF and the trained run.
* lambda_t: QAM+COM+SF on the first split at lambda_t = 1000 (the paper's, Table 4's row), 100 and 10, under both
  rules (:func:`lambda_predictions` writes ``runs/bicm/qam-com-sf-lt<value>[-argmax]/predictions/<split>.jsonl``).
* Timings: ms per query of the module pass per (split, kind) (the modules artifacts' manifests) and the pseudo
  labels' seconds.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from refground.errors import ArtifactError, UsageError
from refground.tables import (
    COUNT,
    MS,
    PERCENT,
    SECONDS,
    TEXT,
    TableData,
    markdown_table,
    split_list,
    write_report,
)

KAM = "+kam"  # the placeholder of the trained run in the row lists (its name is the ``run`` option)
CLASS_NAME = "class-name"  # model.CLASS_NAME, repeated so that importing this module loads no torch
TABLE4 = (CLASS_NAME, "qam", "com", "qam-com", "qam-com-sf", KAM)
TABLE5 = ("com", "va-com", "qam-com", "va-com-sf", "qam-com-sf")
TABLE6 = (CLASS_NAME, "com-class", "com-visual", "com")
PER_KIND = (CLASS_NAME, "com", "qam-com-sf", KAM)
RULES = {"paper": ("largest", "union"), "argmax": ("argmax", "argmax")}  # (expression rule, phrase rule)
LAMBDAS = (1000.0, 100.0, 10.0)  # Sec. 4.1's lambda_t first (the default: Table 4's QAM+COM+SF row)
DEFAULT_LAMBDA = 1000.0
LABELS = {CLASS_NAME: "class-name baseline [25]", "qam": "QAM", "com": "COM", "qam-com": "QAM+COM",
          "qam-com-sf": "QAM+COM+SF", KAM: "QAM+COM+SF+KAM"}
TABLE5_LABELS = {"com": "COM", "va-com": "QAM (VA) + COM", "qam-com": "QAM (QA) + COM",
                 "va-com-sf": "QAM (VA) + COM + SF", "qam-com-sf": "QAM (QA) + COM + SF"}
TABLE6_LABELS = {CLASS_NAME: "class-name baseline [25]", "com-class": "COM: object class name",
                 "com-visual": "COM: visual object", "com": "COM: visual object + class name"}
# The paper's figures (Flickr30K Entities test, accuracy %; Table 7: trainval pseudo labels), beside ours.
PAPER4 = {CLASS_NAME: 53.25, "qam": 30.86, "com": 57.60, "qam-com": 58.43, "qam-com-sf": 60.15, KAM: 61.46}
PAPER5 = {"com": 57.60, "va-com": 57.85, "qam-com": 58.43, "va-com-sf": 57.97, "qam-com-sf": 60.15}
PAPER6 = {CLASS_NAME: 53.25, "com-class": 54.09, "com-visual": 40.29, "com": 57.60}
PAPER7 = {0.6: (6058, 64.2), 0.7: (5180, 68.5), 0.8: (4401, 70.4), 0.9: (3986, 74.7)}
PAPER_COLUMN = "paper (Flickr30K test)"
BARS_SIZE = (1280, 460)
RULES_NOTE = ("Precision@1 (P@1): share of expressions whose box has IoU >= 0.5 with the referent's box; phrase "
              "Acc: the same per caption phrase against the phrase's true union box; PointIt: share whose box "
              "centre lies in it. Paper's rules (Sec. 4.1): an expression's box is the largest of the boxes scored "
              "above the mean, a phrase's the union of them; argmax: the top box. The paper column is its "
              "Flickr30K Entities test accuracy (another dataset and detector: for the ordering, not the level).")


# ------------------------------------------------------------------------------------------------ runs
def lambda_name(lambda_t: float, rule: str = "largest") -> str:
    """The run folder of QAM+COM+SF at ``lambda_t`` under ``rule``: ``qam-com-sf-lt<value>`` (``-<rule>``
    appended for a rule other than ``largest``), e.g. ``qam-com-sf-lt100``."""
    value = f"{float(lambda_t):g}".replace("+", "")
    return f"qam-com-sf-lt{value}" + ("" if rule == "largest" else f"-{rule}")


def pseudo_state(dataset: str, cache: Any) -> dict[str, Any]:
    """The pseudo artifact of KAM: ``{"path", "present", "current", "extra", "note"}``: ``present`` when its
    manifest is complete and holds Table 7, ``current`` when its inputs are unchanged since (else ``note`` says
    why), ``extra`` the manifest's figures (``table7``, ``images``, ``seconds``, ...)."""
    from refground.cache import read_manifest_of, require
    from refground.methods.bicm.pseudo import pseudo_path

    path = pseudo_path(dataset, cache)
    m = read_manifest_of(path) if path.exists() else None
    present = bool(m is not None and m.complete and isinstance((m.extra or {}).get("table7"), list))
    out: dict[str, Any] = {"path": str(path), "present": present, "current": False,
                           "extra": dict(m.extra) if present else {}, "note": ""}
    if present:
        try:
            require(path, "refground pseudo bicm --force", check_parents=True)
            out["current"] = True
        except ArtifactError as exc:  # stale: the figures still describe the labels KAM would read until rebuilt
            out["note"] = str(exc)
    return out


def run_status(dataset: str, cache: Any, run: str, pseudo_present: bool) -> dict[str, Any]:
    """``{"run", "trained", "command"}`` of the +KAM rows' run: trained when ``runs/bicm/<run>`` is a complete
    run (config and weights; a training-free row name counts as trained: nothing to train); ``command`` the
    commands that make it (``refground pseudo bicm && refground train bicm`` without pseudo labels)."""
    from refground.methods import train_command
    from refground.methods.bicm import VARIANTS
    from refground.runs import resolve_run
    from refground.train import complete_run

    flag = f" --dataset {dataset}" if dataset != "synth" else ""
    train = f"refground train bicm{flag}" if run == "bicm" else train_command("bicm", dataset, run, VARIANTS)
    command = train if pseudo_present else f"refground pseudo bicm{flag} && {train}"
    if run in VARIANTS and run != "bicm":
        return {"run": run, "trained": True, "command": ""}
    try:
        complete_run(resolve_run(run, "bicm", dataset, cache).path, "bicm")
        trained = True
    except ArtifactError:
        trained = False
    return {"run": run, "trained": trained, "command": "" if trained else command}


# ------------------------------------------------------------------------------------------------ scoring
def score_rows(ds: Any, dataset: str, cache: Any, names: list[str], splits: tuple[str, ...], phrase_split: str,
               rule: str, phrase_rule: str) -> dict[str, dict[str, Any]]:
    """Predict (or reuse the predictions of) every row of ``names`` under (``rule``, ``phrase_rule``) on
    ``splits`` and ``phrase_split`` and score each file once: ``{name: {split: {"comprehension": {kind: figures},
    "phrase_grounding": {kind: figures}, "predictions": path}}}`` (comprehension on the expression splits,
    phrase grounding on ``phrase_split``; "" for none)."""
    from refground.eval.evaluate import evaluate
    from refground.eval.predictions import read_predictions
    from refground.methods.bicm import run as bicm_run

    every = list(dict.fromkeys([*splits, *([phrase_split] if phrase_split else [])]))
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        out[name] = {}
        results = []
        for split in every:  # each split predicts only the kinds its columns score
            kinds = (("expression",) if split in splits else ()) + (("phrase",) if split == phrase_split else ())
            results += bicm_run.predict_bicm_many(dataset, cache, name, [split], box_rule=rule,
                                                  phrase_box_rule=phrase_rule, kinds=kinds)
        for split, res in zip(every, results):
            sections = (("comprehension",) if split in splits else ()) + \
                (("phrase_grounding",) if split == phrase_split else ())
            figs = evaluate(ds, read_predictions(res["path"]), split, sections=sections).to_dict()
            out[name][split] = {"comprehension": figs.get("comprehension", {}),
                                "phrase_grounding": figs.get("phrase_grounding", {}), "predictions": res["path"]}
    return out


def lambda_predictions(inp: Any, split: str, lambda_t: float, rule: str = "largest", force: bool = False
                       ) -> dict[str, Any]:
    """Write (or find current) the predictions of QAM+COM+SF at ``lambda_t`` under box ``rule`` on the expressions
    of ``split``: ``runs/bicm/<lambda_name>/predictions/<split>.jsonl``, one ``{"query_id", "box"}`` line per
    expression, with a manifest (the config in its fingerprint). ``inp``: a
    :class:`refground.methods.bicm.run.Inputs`. Returns ``{"path", "status"}`` (``hit`` or ``written``)."""
    from refground.cache import write_manifest
    from refground.cache.lock import claim_current
    from refground.cache.manifest import parent_fingerprints
    from refground.eval.predictions import write_predictions
    from refground.methods.bicm import run as bicm_run
    from refground.methods.bicm.model import variant_config

    cfg = variant_config("qam-com-sf", lambda_t=float(lambda_t), kam=False)
    path = bicm_run.predictions_path(bicm_run.run_dir(inp.dataset, inp.cache, lambda_name(lambda_t, rule)), split)
    params = {"variant": "qam-com-sf", "box_rule": rule, "features": inp.features, "config": cfg.to_dict(),
              "split": split, "kind": "expression"}
    parents = inp.parents()
    with contextlib.ExitStack() as locks:
        path.parent.mkdir(parents=True, exist_ok=True)
        ((fp, hit),) = claim_current(locks, [(path, params)], bicm_run.PREDICT_STEP, parent_fingerprints(parents),
                                     force)
        if hit is not None:
            return {"path": str(path), "status": "hit"}
        _, texts, _, _ = bicm_run.eval_pairs(inp.ds, split, "expression")
        if not texts:
            raise UsageError(f"dataset {inp.dataset}: no expressions in split {split!r} for the lambda_t table")
        ms, qids, _ = bicm_run.split_scores(inp, split, "expression", cfg.thr_a)
        boxes, _ = bicm_run.predict_boxes(inp, ms, texts, "qam-com-sf", cfg, rule)
        lines = [{"query_id": int(q), "box": [round(float(v), 3) for v in b]}
                 for q, b in zip(qids.tolist(), boxes.numpy())]
        write_predictions(path, lines)
        write_manifest(path, step=bicm_run.PREDICT_STEP, params=params, parents=parents, fingerprint=fp,
                       kind="predictions", extra={"expressions": len(lines), "lambda_t": float(lambda_t)})
    return {"path": str(path), "status": "written"}


def score_lambdas(ds: Any, inp: Any, split: str, lambdas: tuple[float, ...] = LAMBDAS
                  ) -> dict[str, dict[str, Any]]:
    """Precision@1 (``all``) of QAM+COM+SF on ``split`` at every lambda_t of ``lambdas`` other than the default
    (those come from Table 4's row) under both rules: ``{lambda_name: {"lambda_t", "rule", "precision@1",
    "predictions"}}``."""
    from refground.eval.evaluate import comprehension_of

    out: dict[str, dict[str, Any]] = {}
    for lt in lambdas:
        if float(lt) == DEFAULT_LAMBDA:
            continue
        for rule in (RULES["paper"][0], RULES["argmax"][0]):
            res = lambda_predictions(inp, split, lt, rule)
            figs = comprehension_of(ds, res["path"], split)["all"]
            out[lambda_name(lt, rule)] = {"lambda_t": float(lt), "rule": rule,
                                          "precision@1": figs.get("precision@1"), "predictions": res["path"]}
    return out


def timings(inp: Any, splits: list[str], pseudo: dict[str, Any]) -> list[dict[str, Any]]:
    """The measured times: per (split, query kind) whose modules artifact exists
    (:func:`refground.methods.bicm.run.modules_path`), its pairs, seconds and ms per query (QAM + COM + SF scores,
    once for every row); then the pseudo labels' pass (seconds over the train images)."""
    from refground.cache import read_manifest_of, stale_parents
    from refground.methods.bicm import run as bicm_run
    from refground.methods.bicm.data import QUERY_KINDS

    rows: list[dict[str, Any]] = []
    for split in splits:
        for kind in QUERY_KINDS:
            path = bicm_run.modules_path(inp, split, kind)
            m = read_manifest_of(path) if path.exists() else None
            if m is None or not m.complete or stale_parents(m):  # a stale one timed other inputs
                continue
            e = m.extra or {}
            rows.append({"stage": "modules (QAM + COM + SF)", "split": split, "kind": kind, "pairs": e.get("pairs"),
                         "seconds": e.get("seconds"), "ms_per_query": e.get("ms_per_query")})
    if pseudo["present"]:
        e = pseudo["extra"]
        n, s = e.get("images"), e.get("seconds")
        rows.append({"stage": "pseudo labels (nearest query + modules)", "split": "train", "kind": "image",
                     "pairs": n, "seconds": s,
                     "ms_per_query": round(1000 * float(s) / n, 3) if n and s is not None else None})
    return rows


# ------------------------------------------------------------------------------------------------ tables
def _comp(scores: dict[str, Any], name: str, split: str, kind: str = "all") -> dict[str, Any]:
    return ((((scores.get(name) or {}).get(split) or {}).get("comprehension") or {}).get(kind)) or {}


def _phrase(scores: dict[str, Any], name: str, split: str) -> dict[str, Any]:
    return ((((scores.get(name) or {}).get(split) or {}).get("phrase_grounding") or {}).get("all")) or {}


def row_label(name: str, labels: dict[str, str], status: dict[str, Any]) -> str:
    """The row label of ``name`` in a table of ``labels``; the trained run's label names the run, and says how to
    make it when it is not trained."""
    if name != KAM:
        return labels[name]
    label = f"{labels[KAM]} ({status['run']})"
    return label if status["trained"] else f"{label}: not trained: {status['command']}"


def figure_cells(scores: dict[str, Any], name: str | None, splits: tuple[str, ...], phrase_split: str
                 ) -> list[Any]:
    """Precision@1 per split, then phrase Acc and PointIt on ``phrase_split`` (None where not scored)."""
    cells: list[Any] = [_comp(scores, name, s).get("precision@1") if name else None for s in splits]
    if phrase_split:
        pg = _phrase(scores, name, phrase_split) if name else {}
        cells += [pg.get("accuracy"), pg.get("pointit")]
    return cells


def figure_columns(splits: tuple[str, ...], phrase_split: str) -> list[str]:
    """The columns of :func:`figure_cells`."""
    cols = [f"{s} P@1" for s in splits]
    return cols + ([f"{phrase_split} phrase Acc", f"{phrase_split} PointIt"] if phrase_split else [])


def build_tables(dataset: str, scores: dict[str, dict[str, dict[str, Any]]], status: dict[str, Any],
                 splits: tuple[str, ...], phrase_split: str, lambdas: dict[str, dict[str, Any]],
                 pseudo: dict[str, Any], times: list[dict[str, Any]]) -> list[tuple[str, TableData, str]]:
    """Every table as ``(markdown heading, TableData, note under it)``, in report order. ``scores``: per rule
    (``paper``, ``argmax``) :func:`score_rows` of every row name, the trained run under :data:`KAM`; ``status``:
    :func:`run_status`; ``lambdas``: :func:`score_lambdas`; ``pseudo``: :func:`pseudo_state`; ``times``:
    :func:`timings`."""
    out: list[tuple[str, TableData, str]] = []
    paper, arg = scores["paper"], scores["argmax"]
    cols = figure_columns(splits, phrase_split)
    n = len(cols)
    trained = status["trained"]

    def name_of(row: str) -> str | None:
        return row if row != KAM else (KAM if trained else None)

    rows = [[row_label(r, LABELS, status), *figure_cells(paper, name_of(r), splits, phrase_split), PAPER4[r] / 100]
            for r in TABLE4]
    out.append(("Table 4: main components (paper's box rules)",
                TableData(f"BiCM components (Table 4) on {dataset}, paper's rules (%)", ["row", *cols, PAPER_COLUMN],
                          rows, [TEXT] + [PERCENT] * (n + 1)), RULES_NOTE))
    rows = [[row_label(r, LABELS, status), *figure_cells(arg, name_of(r), splits, phrase_split)] for r in TABLE4]
    out.append(("Table 4: main components (argmax)",
                TableData(f"BiCM components (Table 4) on {dataset}, argmax (%)", ["row", *cols], rows,
                          [TEXT] + [PERCENT] * n),
                "The same rows with the top-scored box as every query's answer (expressions and phrases)."))

    argmax_cols = [f"{s} P@1 (argmax)" for s in splits]
    for heading, title, names, labels, ref, note in (
            ("Table 5: top-down maps", "BiCM top-down maps (Table 5)", TABLE5, TABLE5_LABELS, PAPER5,
             ("VA: the vanilla visual attention map (the head mean of the [CLS] attention); QA: the query-aware "
              "map (eqs. 4-5). P_t is cut from the row's map, and SF reads the same map.")),
            ("Table 6: bottom-up information", "BiCM bottom-up information (Table 6)", TABLE6, TABLE6_LABELS, PAPER6,
             "COM only: S^BU = S^CQ (class name), S^PQ (visual object) or their sum (eq. 8).")):
        rows = [[labels[r], *figure_cells(paper, r, splits, phrase_split),
                 *(_comp(arg, r, s).get("precision@1") for s in splits), ref[r] / 100] for r in names]
        out.append((heading, TableData(f"{title} on {dataset} (%)", ["row", *cols, *argmax_cols, PAPER_COLUMN], rows,
                                       [TEXT] + [PERCENT] * (n + len(splits) + 1)), note))

    rows = []
    if pseudo["present"]:
        for r in pseudo["extra"]["table7"]:
            ref = PAPER7.get(round(float(r["thr_k"]), 2), (None, None))
            prec = r.get("precision")
            rows.append([r["thr_k"], r.get("labels"), r.get("judged"), prec, ref[0],
                         None if ref[1] is None else ref[1] / 100])
        e = pseudo["extra"]
        note = (f"{e.get('images')} train images, each paired with its nearest query of the pool "
                f"({e.get('distinct_queries')} distinct); a label is kept when its fused score S_r passes Thr_k. "
                f"Precision: share of the judged labels whose box has IoU >= 0.5 with an object the query denotes "
                f"(judged after the labels are fixed; {100 * float(e.get('judged_all') or 0):.1f}% of all labels "
                "judged). "
                "The paper's columns: Flickr30K Entities trainval.")
        if pseudo["note"]:
            note += f" Stale: {pseudo['note']}"
    else:
        flag = f" --dataset {dataset}" if dataset != "synth" else ""
        rows.append([f"no pseudo labels: refground pseudo bicm{flag}", None, None, None, None, None])
        note = f"{pseudo['path']} is missing or incomplete."
    out.append(("Table 7: pseudo label threshold Thr_k",
                TableData(f"BiCM pseudo labels (Table 7) on {dataset}",
                          ["Thr_k", "pseudo labels", "judged", "precision", "paper: labels", "paper: precision"], rows,
                          [TEXT, COUNT, COUNT, PERCENT, COUNT, PERCENT]), note))

    split = splits[0]
    kind_rows = [r for r in PER_KIND if name_of(r) is not None]
    kinds: list[str] = []
    for r in kind_rows:
        kinds += [k for k in (((paper.get(r) or {}).get(split) or {}).get("comprehension") or {}) if k not in kinds]
    rows = []
    for kind in kinds:
        count = next((_comp(paper, r, split, kind).get("queries") for r in kind_rows if _comp(paper, r, split, kind)),
                     None)
        rows.append([kind, count, *(_comp(paper, r, split, kind).get("precision@1") for r in kind_rows)])
    note = "" if trained else f"The trained run {status['run']!r} is not trained: `{status['command']}`."
    out.append((f"Per expression kind ({split}, paper's rule)",
                TableData(f"BiCM Precision@1 per expression kind on {dataset} {split} (%)",
                          ["kind", "queries", *(row_label(r, LABELS, status) for r in kind_rows)], rows,
                          [TEXT, COUNT] + [PERCENT] * len(kind_rows)), note))

    rows = []
    for lt in LAMBDAS:
        if lt == DEFAULT_LAMBDA:
            got = [_comp(s, "qam-com-sf", split).get("precision@1") for s in (paper, arg)]
        else:
            got = [(lambdas.get(lambda_name(lt, rule)) or {}).get("precision@1")
                   for rule in (RULES["paper"][0], RULES["argmax"][0])]
        rows.append([int(lt) if float(lt).is_integer() else lt, *got])
    out.append((f"lambda_t sensitivity (QAM+COM+SF, {split})",
                TableData(f"BiCM QAM+COM+SF at lambda_t on {dataset} {split}: Precision@1 (%)",
                          ["lambda_t", "P@1 (largest)", "P@1 (argmax)"], rows, [TEXT, PERCENT, PERCENT]),
                ("S_r = S^BU + lambda_t S^TD (eq. 10); 1000 is the paper's (Table 4's row). S^TD reads the raw "
                 "map (means of 1e-4 to 1e-2), so lambda_t sets how much the top-down map counts beside S^BU.")))

    rows = [[t["stage"], t["split"], t["kind"], t["pairs"], t["seconds"], t["ms_per_query"]] for t in times]
    out.append(("Measured timings",
                TableData(f"BiCM measured timings on {dataset}", ["stage", "split", "kind", "pairs", "seconds",
                                                                  "ms per query"], rows,
                          [TEXT, TEXT, TEXT, COUNT, SECONDS, MS]),
                "From the artifacts' manifests: the time of the pass that made them (one CLIP vision pass per image, "
                "one backward pass per query; every row of Tables 4-6 reads the same scores). Pseudo labels: ms per "
                "train image." if rows else "No modules artifact yet."))
    return out


# ------------------------------------------------------------------------------------------------ figure
def bars_figure(dataset: str, tables: list[TableData]) -> Any:
    """Table 4 as grouped bars, one panel per table of ``tables`` (the paper's rules, argmax): a group per figure
    column, a bar per row (in %, colour per row); a panel without figures says "no data"."""
    import matplotlib.style
    import numpy as np

    from refground.plots import NO_DATA, new_figure

    fig, axes = new_figure(BARS_SIZE, len(tables))
    with matplotlib.style.context("default"):
        for p, (ax, t) in enumerate(zip(axes, tables)):
            groups = [c for c in t.columns[1:] if c != PAPER_COLUMN]
            ax.set_title(t.title.replace(f" on {dataset}", "").replace(" (%)", ""), fontsize="medium")
            ax.set_xlabel("split and figure")
            ax.set_ylabel("figure (%)")
            x = np.arange(len(groups), dtype=np.float64)
            width = 0.8 / max(1, len(t.rows))
            drawn = 0
            for k, row in enumerate(t.rows):
                vals = row[1:1 + len(groups)]
                have = [i for i, v in enumerate(vals) if v is not None]
                label = str(row[0]).split(": not trained")[0] + (" (not trained)" if ": not trained" in str(row[0])
                                                                  else "")
                if have:
                    ax.bar(x[have] - 0.4 + width * (k + 0.5), [100.0 * vals[i] for i in have], width, label=label,
                           color=f"C{k % 10}")
                    drawn += 1
            ax.set_xticks(x, [g.replace(" ", "\n", 1) for g in groups])
            ax.set_ylim(0.0, 100.0)
            ax.grid(True, axis="y", alpha=0.3)
            if not drawn:
                ax.text(0.5, 0.5, NO_DATA, transform=ax.transAxes, ha="center", va="center", color="0.4",
                        fontsize=14)
            elif p == len(tables) - 1:
                ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize="small",
                          frameon=False)
    return fig


def render_bars(dataset: str, tables: list[TableData]) -> Any:
    """:func:`bars_figure` as an RGB PIL image of :data:`BARS_SIZE` pixels."""
    from refground.plots import to_image

    return to_image(bars_figure(dataset, tables))


def render_markdown(dataset: str, tables: list[tuple[str, TableData, str]], png: str | None,
                    notes: list[str] | None = None) -> str:
    lines = [f"# BiCM on {dataset}", "", *(f"{n}\n" for n in notes or [])]
    for heading, t, note in tables:
        lines += [f"### {heading}", "", *markdown_table(t), ""]
        if note:
            lines += [note, ""]
        if heading.startswith("Table 4: main components (argmax)") and png:
            lines += [f"![Table 4 as bars]({Path(png).name})", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ report
def bicm_report(dataset: str, cache: Any, out: Path | None, splits: str = "val,testB", phrase_split: str = "test",
                run: str = "bicm") -> dict[str, Any]:
    """Write BiCM's report: markdown to ``out`` (default ``<cache>/<dataset>/report/bicm.md``), its figures as JSON
    beside it (``<stem>.json``, written as ``refground report`` writes it) and Table 4's bars ``<stem>_table4.png``.

    ``splits``: comma-separated expression splits (the first one also gives the per-kind and lambda_t tables);
    ``phrase_split``: the split of the phrase columns ("" for none); ``run``: the trained run of the +KAM rows
    (missing: a row with the commands that make it). Missing or stale proposals or CLIP embeddings are the
    one-line ArtifactError of the predict step. Returns ``{"markdown_path", "tables": [TableData], "json": dict}``.
    """
    from refground.data.store import dataset_dir, load_dataset
    from refground.methods.bicm import run as bicm_run
    from refground.viz import save_png

    split_names = split_list(splits)
    phrase = split_list(phrase_split)[0] if phrase_split and phrase_split.strip() else ""
    pseudo = pseudo_state(dataset, cache)
    status = run_status(dataset, cache, run, pseudo["present"])
    names = [r for r in (*TABLE4, *TABLE5, *TABLE6) if r != KAM] + ([run] if status["trained"] else [])
    names = list(dict.fromkeys(names))
    ds = load_dataset(dataset_dir(dataset, cache))
    notes = []
    if phrase and not len(ds.query_rows(phrase, "caption")):  # e.g. RefCOCO: no captions, so no phrase columns
        notes.append(f"Split {phrase!r} has no caption phrases: no phrase columns.")
        phrase = ""
    scores: dict[str, dict[str, dict[str, Any]]] = {}
    for key in ("argmax", "paper"):
        rule, phrase_rule = RULES[key]
        got = score_rows(ds, dataset, cache, names, split_names, phrase, rule, phrase_rule)
        if status["trained"]:
            got[KAM] = got[run]
        scores[key] = got

    inp = bicm_run.Inputs(dataset, cache)
    lambdas = score_lambdas(ds, inp, split_names[0])
    times = timings(inp, list(dict.fromkeys([*split_names, *([phrase] if phrase else [])])), pseudo)
    tables = build_tables(dataset, scores, status, split_names, phrase, lambdas, pseudo, times)

    path = Path(out) if out is not None else dataset_dir(dataset, cache).parent / "report" / "bicm.md"
    png = str(save_png(render_bars(dataset, [t for _, t, _ in tables[:2]]), path.with_name(f"{path.stem}_table4.png")))

    def figures_of(key: str) -> dict[str, Any]:
        return {n: v for n, v in scores[key].items() if n != KAM}

    js: dict[str, Any] = {
        "dataset": dataset, "markdown_path": str(path), "png": png, "splits": list(split_names),
        "phrase_split": phrase, "run": status, "rules": {k: {"expression": r[0], "phrase": r[1]}
                                                        for k, r in RULES.items()},
        "figures": {k: figures_of(k) for k in RULES}, "lambda_t": lambdas,
        "pseudo": {**{k: pseudo[k] for k in ("path", "present", "current", "note")},
                   "table7": pseudo["extra"].get("table7")},
        "notes": notes,
        "timings": times,
        "tables": [{"title": t.title, "columns": t.columns, "rows": t.rows} for _, t, _ in tables],
    }
    js = write_report(path, render_markdown(dataset, tables, png, notes), js)
    return {"markdown_path": str(path), "tables": [t for _, t, _ in tables], "json": js}


__all__ = [
    "LABELS",
    "LAMBDAS",
    "PER_KIND",
    "RULES",
    "TABLE4",
    "TABLE5",
    "TABLE6",
    "bars_figure",
    "bicm_report",
    "build_tables",
    "lambda_name",
    "lambda_predictions",
    "pseudo_state",
    "render_bars",
    "render_markdown",
    "row_label",
    "run_status",
    "score_lambdas",
    "score_rows",
    "timings",
]
