"""LTS (Jing et al., "Locate then Segment: A Strong Pipeline for Referring Image Segmentation", CVPR 2021).

``model.py`` the paper's modules (eqs. 1-13, Tables 2, 4 and 5 as variants), ``data.py`` dense maps and mask
targets, ``run.py`` training and prediction on the cache, ``report.py`` the ablation tables and the grid of
successes and failures, ``figures.py`` Figure 4. Registered as :data:`METHOD`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refground.methods import Method, Option

VARIANTS = ("fusion", "filter", "fusion-filter", "fusion-seg", "filter-seg", "fusion-filter-seg", "lts",
            "lts-trans", "lts-n2", "lts-n3", "lts-wordfilter")
DENSE = Option("dense", str, "detector-default", "Dense maps to read (dense/<name>.zarr, from `refground extract "
               "--dense`).")


def train(dataset: str, cache: Any, run: str | None, *, variant: str | None = None, config: dict | None = None,
          overrides: dict | None = None, seed: int = 0, resume: bool = True, force: bool = False,
          lr_decay_epochs: int | None = None, dense: str = "detector-default", word_vectors: Path | None = None
          ) -> dict[str, Any]:
    from refground.methods.lts.model import LTSConfig, variant_config
    from refground.methods.lts.run import train_lts
    from refground.train import check_training_fields, config_of

    fields = dict(overrides or {})
    if lr_decay_epochs is not None:
        fields.update(check_training_fields(lr_decay_epochs=lr_decay_epochs))
    elif "epochs" in fields and (config is None or "lr_decay_epochs" not in config):
        # The paper's step at epoch 30 of 45: 2/3 of whatever number of epochs is asked for.
        fields["lr_decay_epochs"] = max(1, round(2 * int(fields["epochs"]) / 3))
    if config is not None:  # a --config file replaces the variant
        cfg = config_of(LTSConfig.from_dict, {**config, **fields}, "LTS config")
    else:
        cfg = variant_config(variant or "lts", **fields)
    return train_lts(dataset, cache, run or variant or "lts", cfg, dense=dense, word_vectors=word_vectors, seed=seed,
                     resume=resume, force=force)


def train_tables(result: dict[str, Any]) -> list[Any]:
    from refground.tables import TableData

    m = result.get("metrics") or {}
    keys = ("overall_iou", "mean_iou", "prec@0.5", "prec@0.7", "prec@0.9", "loc_acc")
    tables = [TableData(f"lts {result.get('name')!r}: val segmentation, best epoch {m.get('best_epoch')}",
                        ["figure", "value"], [[k, m.get(k)] for k in keys if k in m])]
    curve = (result.get("curve") or {}).get("epochs") or []
    if curve:
        tables.append(TableData("training curve", ["epoch", "loss", "val overall IoU", "val loc acc", "seconds"],
                                [[r["epoch"], r["loss"], r.get("val_overall_iou", "-"), r.get("val_loc_acc", "-"),
                                  r["seconds"]] for r in curve]))
    return tables


def predict(dataset: str, cache: Any, run: str | None, jobs: list[tuple[str, dict[str, Any]]], *,
            force: bool = False) -> list[dict[str, Any]]:
    from refground.methods.lts.run import predict_lts_many

    return predict_lts_many(dataset, cache, run or "lts", [split for split, _ in jobs], force)


def show(dataset: str, cache: Any, run: str | None, query_id: int, out: Path, show_mask: bool = True,
         **options: Any) -> dict[str, Any]:
    """Figure 4 for one query: image and expression, the H_mask heatmap, the predicted mask, the ground truth."""
    from refground.data.store import load_named
    from refground.methods.lts.figures import render_lts_figure
    from refground.methods.lts.run import explain_query
    from refground.viz import save_png

    run = run or "lts"
    ds = load_named(dataset, cache)
    ex = explain_query(dataset, cache, run, query_id)
    save_png(render_lts_figure(ds, ex), out)
    return {"path": str(out), "message": f"lts run {run}, query {query_id}"}


def report(dataset: str, cache: Any, out: Path | None, runs: str | None = None, splits: str = "val,testA,testB",
           cmrin_run: str = "cmrin") -> dict[str, Any]:
    """Tables 2, 4 and 5 over the trained variants, the box Precision@1 beside CMRIN's, and a PNG grid of
    successes and failures per kind (markdown + JSON + PNG)."""
    from refground.methods.lts.report import lts_report

    return lts_report(dataset, cache, out, runs, splits, cmrin_run)


METHOD = Method(
    name="lts",
    paper="Jing, Kong, Wang, Wang, Li, Tan: Locate then Segment: A Strong Pipeline for Referring Image "
          "Segmentation (CVPR 2021)",
    task="segmentation",
    summary="LTS: multi-level fusion, relevance filtering (or a transformer) to locate, ASPP to segment.",
    variants=VARIANTS,
    train=train,
    train_options=(
        Option("lr_decay_epochs", int, None, "Divide the learning rate by 10 from this epoch on (default: 2/3 of "
               "the epochs, the paper's 30 of 45; 0: never)."),
        DENSE,
        Option("word_vectors", Path, None, "GloVe-format text file to initialise the word embeddings (default: "
               "the toolkit's own vectors of the dataset)."),
    ),
    train_tables=train_tables,
    predict=predict,
    show=show,
    report=report,
    report_options=(
        Option("runs", str, None, "Comma-separated run names (default: the runs named after the variants); each "
               "run lands in the tables of the variant its config.json matches."),
        Option("splits", str, "val,testA,testB", "Comma-separated splits of the tables."),
        Option("cmrin_run", str, "cmrin", "The CMRIN run whose Precision@1 (ground-truth objects and top-10 "
               "proposals) stands beside LTS's mask box ('' to leave it out)."),
    ),
)
