"""VL-NMS ("VL-NMS: Breaking Proposal Bottlenecks in Two-Stage Visual-Language Matching").

``model.py`` the relatedness modules (FC and Transformer) and losses, ``pseudo.py`` the pseudo ground truth
of contextual objects (Sec. 3.3), ``run.py`` training and the query-aware proposals, ``report.py`` Tables 1,
2, 4 and 6. Registered as :data:`METHOD`; ``refground vlnms`` writes the proposals any second stage reads
through :mod:`refground.grounding.candidates`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refground.methods import Method, Option

VARIANTS = ("fc", "trans")
FEATURES = Option("features", str, "detector-default", "Features artifact with pre-NMS detections (`refground "
                  "extract --detections`).")
PROPOSAL_OPTIONS = (
    Option("top_n", int, 100, "Query-aware proposals kept per query."),
    Option("min_confidence", float, 0.0, "Drop detections whose detector confidence is below this before the NMS "
           "(a detection threshold; 0 keeps every stored detection)."),
)


def train(dataset: str, cache: Any, run: str | None, *, variant: str | None = None, config: dict | None = None,
          overrides: dict | None = None, seed: int = 0, resume: bool = True, force: bool = False,
          loss: str | None = None, pseudo: bool = True, nms_threshold: float = 0.5,
          features: str = "detector-default") -> dict[str, Any]:
    from refground.errors import UsageError
    from refground.methods.vlnms.model import VLNMSConfig
    from refground.methods.vlnms.run import train_vlnms
    from refground.train import config_of

    if not 0 < nms_threshold <= 1:
        raise UsageError(f"--nms-threshold {nms_threshold}: must be in (0, 1]")
    fields = {**(config or {}), **(overrides or {}),
              **{k: v for k, v in (("variant", variant), ("loss", loss)) if v is not None}}
    cfg = config_of(VLNMSConfig.from_dict, fields, "VL-NMS config")
    name = run or f"{cfg.variant}-{cfg.loss}" + ("" if pseudo else "-nopseudo")
    return train_vlnms(dataset, cache, name, cfg, features=features, pseudo=pseudo, seed=seed, resume=resume,
                       force=force, nms_threshold=nms_threshold)


def train_tables(result: dict[str, Any]) -> list[Any]:
    from refground.tables import TableData

    m = result.get("metrics") or {}
    rows = [[k, v] for k, v in m.items() if "recall@" in k]
    tables = [TableData(f"vlnms {result.get('name')!r}: val recall of the fused-score NMS, best epoch "
                        f"{m.get('best_epoch')}", ["figure", "value"], rows)]
    curve = (result.get("curve") or {}).get("epochs") or []
    if curve:
        cols = ["epoch", "loss", "val recall@10", "val context_recall@10", "seconds"]
        tables.append(TableData("training curve", cols, [
            [r["epoch"], r["loss"], r.get("val_recall@10", "-"), r.get("val_context_recall@10", "-"), r["seconds"]]
            for r in curve]))
    return tables


def predict(dataset: str, cache: Any, run: str | None, jobs: list[tuple[str, dict[str, Any]]], *,
            force: bool = False) -> list[dict[str, Any]]:
    """The query-aware proposals of each split (``run`` 'confidence': confidence-only NMS); the predictions
    file is the ranked boxes ``<split>.jsonl`` beside the proposal set, scored for proposal recall."""
    from refground.methods.vlnms.run import CONFIDENCE, run_vlnms

    def options_of(opts: dict[str, Any]) -> tuple[int, float]:
        return int(opts.get("top_n", 100)), float(opts.get("min_confidence", 0.0))

    name = run or "fc-bce"
    # One run_vlnms call per option set: it loads the dataset, the detections and the run once for all splits.
    by_options: dict[tuple[int, float], list[str]] = {}
    for split, opts in jobs:
        by_options.setdefault(options_of(opts), []).append(split)
    done: dict[tuple[str, tuple[int, float]], dict[str, Any]] = {}
    for (top_n, floor), splits in by_options.items():
        for res in run_vlnms(dataset, cache, None if name == CONFIDENCE else name, tuple(dict.fromkeys(splits)),
                             top_n=top_n, min_confidence=floor, force=force):
            done[(res["split"], (top_n, floor))] = {**res, "path": str(Path(res["path"]).with_suffix(".jsonl"))}
    return [done[(split, options_of(opts))] for split, opts in jobs]


def show(dataset: str, cache: Any, run: str | None, query_id: int, out: Path, show_mask: bool = True,
         top_n: int = 10, min_confidence: float = 0.0) -> dict[str, Any]:
    """The query with its first ``top_n`` query-aware proposals (the best in red, the others in yellow)."""
    from refground.data.store import load_named
    from refground.errors import UsageError
    from refground.eval.predictions import read_predictions
    from refground.viz import render_query, save_png

    ds = load_named(dataset, cache)
    q = ds.query(query_id)
    if q.task != "expression":
        raise UsageError(f"query {query_id} is a caption; VL-NMS proposes boxes for referring expressions")
    res = predict(dataset, cache, run, [(q.split, {"min_confidence": min_confidence})])[0]
    pred = read_predictions(Path(res["path"])).queries.get(q.id)
    ranked = list(pred.ranked)[:top_n] if pred is not None else []
    if not ranked:
        raise UsageError(f"{res['path']}: no proposals for query {q.id}")
    save_png(render_query(ds, q, ranked[:1], None, ranked[1:], show_mask=show_mask), out)
    return {"path": str(out), "message": f"vlnms run {run or 'fc-bce'}, query {q.id}, top {len(ranked)} proposals"}


def report(dataset: str, cache: Any, out: Path | None, runs: str | None = None, cmrin_run: str = "cmrin",
           timing_images: int = 64, min_confidence: float = 0.0) -> dict[str, Any]:
    """Tables 1, 2, 4 and 6 (markdown + JSON) and a recall@N PNG per split."""
    from refground.atomic import atomic_file
    from refground.data.store import dataset_dir
    from refground.errors import UsageError
    from refground.methods.vlnms.report import recall_plot, vlnms_tables
    from refground.tables import EVAL_SPLITS, PERCENT, TEXT, TableData
    from refground.train import run_names

    if timing_images < 1:
        raise UsageError(f"--timing-images {timing_images}: must be at least 1")
    res = vlnms_tables(dataset, cache, run_names(runs), cmrin_run, timing_images=timing_images,
                       min_confidence=min_confidence)
    path = out or dataset_dir(dataset, cache).parent / "report" / "vlnms.md"
    pngs = [str(recall_plot(res, s, path.with_name(f"{path.stem}_recall_{s}.png"))) for s in EVAL_SPLITS]
    with atomic_file(path) as fh:
        fh.write(res["markdown"] + "\n" + "\n".join(f"![recall@N]({Path(p).name})" for p in pngs) + "\n")
    rows = [[res["labels"][tag], *[per.get(s, {}).get("recall@10") for s in EVAL_SPLITS]]
            for tag, per in res["recall"].items()]
    prec = [[res["labels"].get(k, k), *[per.get(s) for s in EVAL_SPLITS]] for k, per in res["precision"].items()]
    kinds = [TEXT, *[PERCENT] * len(EVAL_SPLITS)]  # split names say nothing of the figure
    return {"markdown_path": str(path),
            "tables": [TableData("referent recall@10 (%)", ["proposals", *EVAL_SPLITS], rows, kinds),
                       TableData(f"CMRIN {cmrin_run!r} Precision@1 (%), top 10", ["candidates", *EVAL_SPLITS], prec,
                                 kinds)],
            "json": {"dataset": dataset, "markdown_path": str(path), "pngs": pngs,
                     **{k: v for k, v in res.items() if k != "markdown"}}}


def pseudo(dataset: str, cache: Any, *, seed: int = 0, force: bool = False, gamma: float = 0.4,
           word_vectors: Path | None = None, parser: str = "toolkit", split: str = "all") -> dict[str, Any]:
    """Pseudo ground truth of contextual objects by text similarity (Sec. 3.3)."""
    from refground.data.model import check_split_name
    from refground.errors import UsageError
    from refground.methods.vlnms.pseudo import build_pseudo_vlnms, check_options
    from refground.tables import SECONDS, TableData, format_value

    check_options(gamma, parser)
    check_split_name(split)
    if word_vectors is not None and not Path(word_vectors).is_file():
        raise UsageError(f"{word_vectors}: word-vector file not found")
    res = build_pseudo_vlnms(dataset, cache, gamma=gamma, word_vectors=word_vectors, parser=parser, split=split,
                             seed=seed, force=force)

    def row(kind: str, r: dict) -> list:
        return [kind, r["queries"], r["pseudo_per_query"] if r["pseudo_per_query"] is not None else "-",
                *[r[k] if r[k] is not None else "-" for k in ("precision", "recall", "referent_matched")]]

    rows = [row(k, r) for k, r in res["per_kind"].items()] + [row("all", res)]
    title = (f"pseudo vlnms {dataset} (gamma {res['gamma']}, parser {res['parser']}, "
             f"{format_value(res['seconds'], SECONDS)} s)")
    table = TableData(title, ["kind", "queries", "pseudo/query", "precision", "recall", "referent matched"], rows)
    return {**res, "tables": [table], "json": res}


METHOD = Method(
    name="vlnms",
    paper="Zhang, Wang, Liu, Zhu, Luo: VL-NMS: Breaking Proposal Bottlenecks in Two-Stage Visual-Language Matching "
          "(ACM TOMM 2023)",
    task="proposals",
    summary="VL-NMS: query-aware proposals (relatedness x confidence, fused-score NMS) for any second stage.",
    variants=VARIANTS,
    train=train,
    train_options=(
        Option("loss", str, None, "Classification loss: 'bce' (eq. 4; the default) or 'rank' (eq. 5).",
               choices=("bce", "rank")),
        Option("pseudo", bool, True, "Use the pseudo ground truth of contextual objects (`refground pseudo vlnms`) "
               "as foreground besides the referent; --no-pseudo trains on the referent alone (Table 4).",
               flag="--pseudo/--no-pseudo"),
        Option("nms_threshold", float, 0.5, "IoU threshold of the fused-score NMS used to select the best epoch."),
        FEATURES,
    ),
    train_tables=train_tables,
    predict=predict,
    predict_options=PROPOSAL_OPTIONS,
    show=show,
    show_options=(Option("top_n", int, 10, "Proposals drawn."), PROPOSAL_OPTIONS[1]),
    report=report,
    report_options=(
        Option("runs", str, None, "Comma-separated VL-NMS runs (default: every trained run among fc-bce, fc-rank, "
               "trans-bce and their -nopseudo twins)."),
        Option("cmrin_run", str, "cmrin", "CMRIN run used as the second stage."),
        Option("timing_images", int, 64, "Images timed for Table 6."),
        PROPOSAL_OPTIONS[1],
    ),
    pseudo=pseudo,
    pseudo_options=(
        Option("gamma", float, 0.4, "Cosine-similarity threshold between a noun and a category name, in [-1, 1] "
               "(paper: 0.4)."),
        Option("word_vectors", Path, None, "GloVe-format text file (word and floats per line, .gz accepted); "
               "default: the toolkit's own count-based vectors from the training queries."),
        Option("parser", str, "toolkit", "Noun extractor: toolkit (built-in heuristic tagger) or spacy (needs "
               "spaCy and en_core_web_sm installed)."),
        Option("split", str, "all", "Split whose expressions get pseudo ground truth."),
    ),
)
