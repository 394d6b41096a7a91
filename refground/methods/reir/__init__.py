"""ReIR (Liu, Wan, Ma, He, "Relation-aware Instance Refinement for Weakly Supervised Visual Grounding", CVPR 2021).

``model.py`` the paper's modules and losses (eqs. 1-17, Tables 2 and 3 as variants), ``data.py`` what weak
supervision may read (captions, phrase spans, parsed relations, the detector's first-stage proposals) and
nothing else, ``pseudo.py`` the relation labels (`refground pseudo reir`), ``run.py`` training, the class-name
baseline and predictions, ``report.py`` the ablation tables and Fig. 4, ``figures.py`` the caption figure.
Registered as :data:`METHOD`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refground.methods import Method, Option

VARIANTS = ("baseline", "tsd", "tsd-str-noq", "tsd-str", "tsd-vogn", "uniform", "reir", "reir-k3", "reir-k10",
            "upper-bound")
FEATURES = Option("features", str, "detector-default-rpn", "Proposals to read (features/<name>.h5: the detector's "
                  "first-stage boxes, from `refground extract --first-stage`).")


def train(dataset: str, cache: Any, run: str | None, *, variant: str | None = None, config: dict | None = None,
          overrides: dict | None = None, seed: int = 0, resume: bool = True, force: bool = False,
          features: str = "detector-default-rpn", word_vectors: Path | None = None) -> dict[str, Any]:
    from refground.methods.reir.model import ReIRConfig, variant_config
    from refground.methods.reir.run import train_reir
    from refground.train import config_of

    fields = dict(overrides or {})
    if "epochs" in fields and (config is None or "lr_decay_epochs" not in config) and "lr_decay_epochs" not in fields:
        # The paper's steps at 32k and 40k of 80k iterations: the x0.1 step after 2/3 of whatever is asked for.
        fields["lr_decay_epochs"] = max(1, round(2 * int(fields["epochs"]) / 3))
    if config is not None:  # a --config file replaces the variant
        cfg = config_of(ReIRConfig.from_dict, {**config, **fields}, "ReIR config")
    else:
        cfg = variant_config(variant or "reir", **fields)
    return train_reir(dataset, cache, run or variant or "reir", cfg, features=features, word_vectors=word_vectors,
                      seed=seed, resume=resume, force=force)


def train_tables(result: dict[str, Any]) -> list[Any]:
    from refground.tables import TableData

    m = result.get("metrics") or {}
    tables = [TableData(f"reir {result.get('name')!r}: val phrase grounding, best epoch {m.get('best_epoch')}",
                        ["figure", "value"], [[k, m.get(k)] for k in ("accuracy", "pointit") if k in m])]
    curve = (result.get("curve") or {}).get("epochs") or []
    if curve:
        tables.append(TableData("training curve", ["epoch", "loss", "val Acc (%)", "val PointIt (%)", "seconds"],
                                [[r["epoch"], r["loss"], r.get("val_accuracy", "-"), r.get("val_pointit", "-"),
                                  r["seconds"]] for r in curve]))
    return tables


def predict(dataset: str, cache: Any, run: str | None, jobs: list[tuple[str, dict[str, Any]]], *,
            force: bool = False) -> list[dict[str, Any]]:
    from refground.methods.reir.run import predict_reir_many

    features = next((o.get("features") for _, o in jobs if o.get("features")), None)
    return predict_reir_many(dataset, cache, run or "reir", [split for split, _ in jobs], features, force)


def show(dataset: str, cache: Any, run: str | None, query_id: int, out: Path, **options: Any) -> dict[str, Any]:
    """A caption's phrases, each with its chosen box and its top-K candidates, beside the true boxes."""
    from refground.methods.reir.figures import render_reir_figure
    from refground.methods.reir.run import explain_caption
    from refground.viz import save_png

    run = run or "reir"
    ex = explain_caption(dataset, cache, run, query_id)
    save_png(render_reir_figure(ex), out)
    return {"path": str(out), "message": f"reir run {run}, caption {query_id}"}


def report(dataset: str, cache: Any, out: Path | None, runs: str | None = None, splits: str = "val,test",
           iou_run: str = "reir", no_reg_run: str = "tsd-vogn") -> dict[str, Any]:
    """Tables 2 and 3 over the trained variants, the class-name baseline and the upper bound, per phrase kind, and
    Fig. 4 (Acc at IoU 0.5-0.8 with and without L_reg) as markdown + JSON + PNG."""
    from refground.methods.reir.report import reir_report

    return reir_report(dataset, cache, out, runs, splits, iou_run, no_reg_run)


def pseudo(dataset: str, cache: Any, *, seed: int = 0, force: bool = False, parser: str = "toolkit",
           min_count: int = 100) -> dict[str, Any]:
    """The relation labels of every caption (parsed from its text and phrase spans), classes kept from the train
    split's counts, and the parser's precision and recall against the dataset's recorded relations."""
    from refground.methods.reir.pseudo import pseudo_reir

    return pseudo_reir(dataset, cache, seed=seed, force=force, parser=parser, min_count=min_count)


METHOD = Method(
    name="reir",
    paper="Liu, Wan, Ma, He: Relation-aware Instance Refinement for Weakly Supervised Visual Grounding (CVPR 2021)",
    task="phrase grounding",
    summary="ReIR: weakly supervised phrase grounding from captions, coarse-to-fine matching, self-taught "
            "regression, a visual object graph over the parsed relations.",
    variants=VARIANTS,
    train=train,
    train_options=(
        FEATURES,
        Option("word_vectors", Path, None, "GloVe-format text file for the word embeddings and eq. 3's E_ext "
               "(default: the toolkit's own vectors of the dataset's sentences, built without phrase-box links)."),
    ),
    train_tables=train_tables,
    predict=predict,
    predict_options=(Option("features", str, None, "Proposals to ground on (default: the run's own; the "
                                                   "class-name baseline: detector-default-rpn)."),),
    show=show,
    report=report,
    report_options=(
        Option("runs", str, None, "Comma-separated run names (default: the runs named after the variants); each "
               "run lands in the rows of the variant its config.json matches."),
        Option("splits", str, "val,test", "Comma-separated splits of the tables."),
        Option("iou_run", str, "reir", "The run of Fig. 4's 'with L_reg' curve."),
        Option("no_reg_run", str, "tsd-vogn", "The run of Fig. 4's 'without L_reg' curve (the full model without "
               "self-taught regression)."),
    ),
    pseudo=pseudo,
    pseudo_options=(
        Option("parser", str, "toolkit", "Relation parser: the toolkit's own ('toolkit') or spaCy's dependency "
               "parse ('spacy', when installed).", choices=("toolkit", "spacy")),
        Option("min_count", int, 100, "Keep the relations seen more than this many times in the training captions "
               "(the paper: 100 on Flickr30K, 88 classes)."),
    ),
)
