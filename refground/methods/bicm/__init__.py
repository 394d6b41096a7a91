"""BiCM (Shi, Hayat, Cai, "Unpaired Referring Expression Grounding via Bidirectional Cross-Modal Matching",
Neurocomputing 2023): grounding from a pool of images and a separate pool of queries, with a CLIP's knowledge.

``data.py`` the unpaired pools (the only way the training side reaches the dataset) and the detector's proposals,
``model.py`` the paper's modules (QAM, COM, SF, KAM, the box rules, the ablation rows), ``modules.py`` QAM + COM +
SF on images and texts, ``pseudo.py`` KAM's pseudo labels (`refground pseudo bicm`, Table 7), ``run.py`` KAM's
training, the class-name baseline and predictions, ``report.py`` Tables 4-7, ``figures.py`` the qualitative
figure. Registered as :data:`METHOD`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refground.methods import Method, Option

VARIANTS = ("class-name", "qam", "com", "com-class", "com-visual", "qam-com", "va-com", "qam-com-sf", "va-com-sf",
            "bicm")  # model.VARIANTS, kept here so `refground --help` does not import torch
BOX_RULES = ("largest", "union", "argmax")
FEATURES = Option("features", str, "detector-default", "The detector's proposals (features/<name>.h5, top 100 "
                  "per image with class names), which the CLIP artifact must have embedded.")
CLIP = Option("clip", str, None, "The CLIP artifact to read (clip/<name>.h5; default: the only one).")


def train(dataset: str, cache: Any, run: str | None, *, variant: str | None = None, config: dict | None = None,
          overrides: dict | None = None, seed: int = 0, resume: bool = True, force: bool = False,
          features: str = "detector-default", clip: str | None = None, thr_k: float | None = None
          ) -> dict[str, Any]:
    from refground.methods.bicm.model import BiCMConfig, variant_config
    from refground.methods.bicm.run import train_bicm
    from refground.train import config_of

    fields = dict(overrides or {})
    if thr_k is not None:
        fields["thr_k"] = thr_k
    if config is not None:
        cfg = config_of(BiCMConfig.from_dict, {**config, **fields}, "BiCM config")
    else:
        cfg = variant_config(variant or "bicm", **fields)
    return train_bicm(dataset, cache, run or variant or "bicm", cfg, features=features, clip=clip, seed=seed,
                      resume=resume, force=force)


def train_tables(result: dict[str, Any]) -> list[Any]:
    from refground.tables import TableData

    m = result.get("metrics") or {}
    tables = [TableData(f"bicm {result.get('name')!r}: KAM on pseudo labels", ["figure", "value"],
                        [[k, m.get(k)] for k in ("pseudo_labels", "train_pairs", "held_out", "thr_k",
                                                 "pseudo_val_agreement") if k in m])]
    curve = (result.get("curve") or {}).get("epochs") or []
    if curve:
        tables.append(TableData("training curve (agreement with held-out pseudo labels; no benchmark truth)",
                                ["epoch", "loss", "held-out agreement", "seconds"],
                                [[r["epoch"], r["loss"], r.get("pseudo_val_agreement", "-"), r["seconds"]]
                                 for r in curve]))
    return tables


def predict(dataset: str, cache: Any, run: str | None, jobs: list[tuple[str, dict[str, Any]]], *,
            force: bool = False) -> list[dict[str, Any]]:
    from refground.methods.bicm.run import predict_bicm_many

    opts: dict[str, Any] = {}
    for _, o in jobs:
        opts.update({k: v for k, v in o.items() if v is not None})
    return predict_bicm_many(dataset, cache, run or "bicm", [split for split, _ in jobs],
                             box_rule=opts.get("box_rule", "largest"),
                             phrase_box_rule=opts.get("phrase_box_rule", "union"),
                             features=opts.get("features"), clip=opts.get("clip"), force=force)


def show(dataset: str, cache: Any, run: str | None, query_id: int, out: Path, **options: Any) -> dict[str, Any]:
    """The query-aware attention map, P_t, the top COM boxes and the final choice (the paper's Fig. 4)."""
    from refground.methods.bicm.figures import show_bicm

    return show_bicm(dataset, cache, run or "bicm", query_id, out, **options)


def report(dataset: str, cache: Any, out: Path | None, **options: Any) -> dict[str, Any]:
    """Tables 4-7 analogues (markdown + JSON + PNG)."""
    from refground.methods.bicm.report import bicm_report

    return bicm_report(dataset, cache, out, **options)


def pseudo(dataset: str, cache: Any, *, seed: int = 0, force: bool = False, features: str = "detector-default",
           clip: str | None = None, queries: str = "expression", thr_a: float = 0.7, lambda_t: float = 1000.0
           ) -> dict[str, Any]:
    """Each train image's nearest query of the query pool, QAM + COM + SF on the pair, the best box and its fused
    score; Table 7 (count and precision of the labels above Thr_k)."""
    from refground.methods.bicm.pseudo import pseudo_bicm

    return pseudo_bicm(dataset, cache, seed=seed, force=force, features=features, clip=clip, kind=queries,
                       thr_a=thr_a, lambda_t=lambda_t)


METHOD = Method(
    name="bicm",
    paper="Shi, Hayat, Cai: Unpaired Referring Expression Grounding via Bidirectional Cross-Modal Matching "
          "(Neurocomputing 2023)",
    task="comprehension",
    summary="BiCM: unpaired grounding (no image-query pair, no box) with a CLIP: query-aware attention maps, "
            "cross-modal object matching, similarity fusion, and an MLP adapted on pseudo labels.",
    variants=VARIANTS,
    train=train,
    train_options=(FEATURES, CLIP, Option("thr_k", float, None, "Keep the pseudo labels whose fused score passes "
                                                               "this (Thr_k; default 0.9, the paper's).")),
    train_tables=train_tables,
    predict=predict,
    predict_options=(
        Option("box_rule", str, None, "How an expression's box is chosen from the scores: largest (the largest "
               "above-mean box, the paper's), union, argmax.", choices=BOX_RULES),
        Option("phrase_box_rule", str, None, "The same for caption phrases (default union, the paper's rule for "
               "phrases that may name several objects).", choices=BOX_RULES),
        Option("clip", str, None, "The CLIP artifact to read (default: the only one)."),
    ),
    show=show,
    show_options=(Option("top_k", int, None, "COM boxes to draw (default 5)."),
                  Option("box_rule", str, None, "How the final box is chosen (default: largest for expressions, "
                         "union for phrases).", choices=BOX_RULES)),
    report=report,
    report_options=(
        Option("splits", str, "val,testB", "Comma-separated expression splits of the tables."),
        Option("phrase_split", str, "test", "The split of the phrase columns."),
        Option("run", str, "bicm", "The trained run of the +KAM rows."),
    ),
    pseudo=pseudo,
    pseudo_options=(
        FEATURES, CLIP,
        Option("queries", str, "expression", "The query pool: the train split's expressions or its caption "
               "phrases.", choices=("expression", "phrase")),
        Option("thr_a", float, 0.7, "Thr_a: P_t is cut from the normalised map at this value."),
        Option("lambda_t", float, 1000.0, "lambda_t of eq. 10 in the fused score that picks and thresholds the "
               "pseudo labels."),
    ),
)
