"""CMRIN (Yang et al., "Cross-Modal Relationship Inference for Grounding Referring Expressions", CVPR 2019).

``model.py`` the paper's modules (eqs. 1-9, Table 2 variants), ``run.py`` training and prediction on the
cache, ``report.py`` the Table 2 analogue, ``figures.py`` Figure 4. Registered as :data:`METHOD`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refground.methods import Method, Option

VARIANTS = ("instance", "global-2", "guided-2", "fusion-1", "fusion-3", "cmrin")
FEATURES = Option("features", str, "detector-default", "Features artifact to read (features/<name>.h5, with its graph "
                  "artifact graph/<name>.h5).")
CANDIDATE_OPTIONS = (
    Option("candidates", str, "gt", "Candidate boxes: 'gt' (ground-truth objects), 'proposals' (the detector's top "
           "--top-n per image by confidence) or 'vlnms' (the top --top-n query-aware proposals of `refground vlnms` "
           "from the run --vlnms-run).", choices=("gt", "proposals", "vlnms")),
    Option("top_n", int, 10, "With --candidates proposals/vlnms: candidates per image or per query."),
    Option("vlnms_run", str, "fc-bce", "With --candidates vlnms: the query-aware proposal set ('confidence' for "
           "confidence-only NMS)."),
)


PREDICT_FEATURES = Option("features", str, None, "Features artifact to read (default: the run's own; for another "
                          "dataset's run, this dataset's features from the run's extractor).")


def _spec(dataset: str, cache: Any, candidates: str = "gt", top_n: int = 10, vlnms_run: str = "fc-bce") -> Any:
    """The CandidateSpec of the candidate options; ``--vlnms-run DATASET/NAME`` (another dataset's VL-NMS run
    applied here) becomes the tag of its proposal set, ``DATASET.NAME``."""
    from refground.grounding.candidates import CandidateSpec
    from refground.runs import applied_tag

    run = applied_tag(vlnms_run, "vlnms", dataset, cache) if candidates == "vlnms" else ""
    return CandidateSpec(candidates, int(top_n), run)


def train(dataset: str, cache: Any, run: str | None, *, variant: str | None = None, config: dict | None = None,
          overrides: dict | None = None, seed: int = 0, resume: bool = True, force: bool = False,
          layers: int | None = None, lr_decay_epochs: int | None = None, features: str = "detector-default"
          ) -> dict[str, Any]:
    from refground.methods.cmrin.model import CMRINConfig, variant_config
    from refground.methods.cmrin.run import train_cmrin
    from refground.train import check_training_fields, config_of

    fields = {**(overrides or {}), **check_training_fields(layers=layers, lr_decay_epochs=lr_decay_epochs)}
    if config is not None:  # a --config file replaces the variant
        cfg = config_of(CMRINConfig.from_dict, {**config, **fields}, "CMRIN config")
    else:
        cfg = variant_config(variant or "cmrin", **fields)
    return train_cmrin(dataset, cache, run or variant or "cmrin", cfg, features=features, seed=seed, resume=resume,
                       force=force)


def train_tables(result: dict[str, Any]) -> list[Any]:
    from refground.tables import TableData

    m = result.get("metrics") or {}
    rows = [[k.split("/", 1)[1] if "/" in k else "all", v] for k, v in m.items() if k.startswith("precision@1")]
    tables = [TableData(f"cmrin {result.get('name')!r}: val Precision@1 (ground-truth objects), best epoch "
                        f"{m.get('best_epoch')}", ["kind", "precision@1"], rows)]
    curve = (result.get("curve") or {}).get("epochs") or []
    if curve:
        tables.append(TableData("training curve", ["epoch", "loss", "val precision@1", "seconds"],
                                [[r["epoch"], r["loss"], r.get("val_precision@1", "-"), r["seconds"]] for r in curve]))
    return tables


def _split_features(opts: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The candidate options of ``opts`` and its ``features`` (None: the run's choice)."""
    opts = dict(opts)
    return opts, opts.pop("features", None)


def predict(dataset: str, cache: Any, run: str | None, jobs: list[tuple[str, dict[str, Any]]], *,
            force: bool = False) -> list[dict[str, Any]]:
    from refground.methods.cmrin.run import predict_cmrin_many

    split_opts = [(split, *_split_features(opts)) for split, opts in jobs]
    features = {f for _, _, f in split_opts}
    if len(features) > 1:
        raise ValueError("one features artifact per predict call")
    return predict_cmrin_many(dataset, cache, run or "cmrin",
                              [(split, _spec(dataset, cache, **opts)) for split, opts, _ in split_opts], force,
                              features.pop() if features else None)


def show(dataset: str, cache: Any, run: str | None, query_id: int, out: Path, show_mask: bool = True,
         **options: Any) -> dict[str, Any]:
    """Figure 4 for one query: ground truth, the vertex-gate map and the matching-score map."""
    from refground.data.store import load_named
    from refground.methods.cmrin.figures import render_cmrin_figure
    from refground.methods.cmrin.run import explain_query
    from refground.viz import save_png

    run = run or "cmrin"
    ds = load_named(dataset, cache)
    options, features = _split_features(options)
    ex = explain_query(dataset, cache, run, query_id, _spec(dataset, cache, **options), features)
    image = render_cmrin_figure(ds, ex["query"], ex["boxes"], ex["scores"], ex.get("vertex_gates"),
                                candidates=ex["candidates"], show_mask=show_mask)
    save_png(image, out)
    return {"path": str(out), "message": f"cmrin run {run}, query {query_id}, {len(ex['boxes'])} {ex['candidates']} "
                                         "candidates"}


def report(dataset: str, cache: Any, out: Path | None, runs: str | None = None) -> dict[str, Any]:
    """Table 2 over the trained variants (markdown + JSON)."""
    from refground.atomic import atomic_file
    from refground.data.store import dataset_dir
    from refground.methods.cmrin.report import KINDS, ablation_table
    from refground.tables import EVAL_SPLITS, PERCENT, TEXT, TableData
    from refground.train import run_names

    res = ablation_table(dataset, cache, run_names(runs))
    path = out or dataset_dir(dataset, cache).parent / "report" / "cmrin_ablation.md"
    with atomic_file(path) as fh:
        fh.write(res["markdown"])
    cols = [*EVAL_SPLITS, *[f"{s}/{k}" for s in EVAL_SPLITS for k in KINDS]]
    rows = [[r["run"], *[r.get(c) for c in cols]] for r in res["rows"]]
    table = TableData(f"CMRIN ablation (Table 2) on {dataset}: Precision@1 (%), ground-truth objects", ["run", *cols],
                      rows, [TEXT, *[PERCENT] * len(cols)])
    return {"markdown_path": str(path), "tables": [table],
            "json": {"dataset": dataset, "markdown_path": str(path), "rows": res["rows"]}}


METHOD = Method(
    name="cmrin",
    paper="Yang, Li, Yu: Cross-Modal Relationship Inference for Grounding Referring Expressions (CVPR 2019)",
    task="comprehension",
    summary="CMRIN: cross-modal relationship extractor + gated graph convolutions over the spatial relation graph.",
    variants=VARIANTS,
    train=train,
    train_options=(
        Option("layers", int, None, "Gated graph convolutions (overrides the variant's)."),
        Option("lr_decay_epochs", int, None, "Divide the learning rate by 10 after this many epochs (default 7; "
               "0: never)."),
        FEATURES,
    ),
    train_tables=train_tables,
    predict=predict,
    predict_options=(*CANDIDATE_OPTIONS, PREDICT_FEATURES),
    show=show,
    show_options=(*CANDIDATE_OPTIONS, PREDICT_FEATURES),
    report=report,
    report_options=(Option("runs", str, None, "Comma-separated run names (default: every Table 2 variant with a "
                           "trained run: instance, global-2, guided-2, fusion-1, fusion-3, cmrin)."),),
)
