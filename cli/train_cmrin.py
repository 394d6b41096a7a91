"""``refground train cmrin``: train CMRIN (or one of its Table 2 ablation variants) on ground-truth objects."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from refground.cli.apps import train_app
from refground.cli.console import emit, info, table
from refground.cli.options import (CacheOpt, DatasetOpt, ForceOpt, JsonOpt, ResumeOpt, SeedOpt, config_from,
                                   training_overrides)

FeaturesOpt = Annotated[str, typer.Option("--features", help="Features artifact to read (features/<name>.h5, with "
                                          "its graph artifact graph/<name>.h5).")]


@train_app.command("cmrin")
def train_cmrin_command(
    dataset: DatasetOpt = "synth",
    cache: CacheOpt = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Run name: <cache>/<dataset>/runs/cmrin/<name>/ "
                                                "(default: the variant's name).", show_default=False)] = None,
    variant: Annotated[str, typer.Option("--variant", help="Table 2 row: instance, global-2, guided-2, fusion-1, "
                                         "fusion-3 or cmrin (2 gated graph convolutions with fusion).")] = "cmrin",
    layers: Annotated[Optional[int], typer.Option("--layers", help="Gated graph convolutions (overrides the "
                                                  "variant's).", show_default=False)] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Training epochs (default 10).",
                                                  show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Queries per step (default 64, as in "
                                                      "the paper).", show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Adam learning rate (default 5e-4, as in the paper).",
                                                show_default=False)] = None,
    lr_decay_epochs: Annotated[Optional[int], typer.Option("--lr-decay-epochs", help="Divide the learning rate by "
                                                           "10 after this many epochs (default 7; 0: never).",
                                                           show_default=False)] = None,
    features: FeaturesOpt = "detector-default",
    config_file: Annotated[Optional[Path], typer.Option("--config", help="JSON file of CMRIN config fields (e.g. "
                                                        "a run's config.json) instead of --variant; the options above "
                                                        "override it.",
                                                        show_default=False)] = None,
    seed: SeedOpt = 0,
    resume: ResumeOpt = True,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train CMRIN on the train split with ground-truth objects as candidates (triplet loss with online hard
    negatives, Adam); keep the epoch with the best val Precision@1. Writes config.json, vocab.json,
    checkpoint.pt, model.pt, curve.json and metrics.json into the run folder; skips a complete run with the
    same config, seed and inputs."""
    from refground.models.cmrin import CMRINConfig, variant_config
    from refground.models.cmrin_run import train_cmrin

    overrides = training_overrides(layers=layers, epochs=epochs, batch_size=batch_size, lr=lr,
                                   lr_decay_epochs=lr_decay_epochs)
    if config_file is not None:
        config = config_from(CMRINConfig.from_dict, config_file, "CMRIN config", overrides)
    else:
        config = variant_config(variant, **overrides)
    run_name = name or variant
    result = train_cmrin(dataset, cache, run_name, config, features=features, seed=seed, resume=resume, force=force)
    if result["cache_hit"]:
        info(f"{result['run']}: complete with the same config, seed and inputs; cache hit, skipping "
             "(use --force to retrain)")
    elif result.get("resumed_from"):
        info(f"{result['run']}: resumed after epoch {result['resumed_from']}")
    m = result.get("metrics") or {}
    rows = [(k.split("/", 1)[1] if "/" in k else "all", v) for k, v in m.items() if k.startswith("precision@1")]
    tables = [table(f"cmrin {run_name!r}: val Precision@1 (ground-truth objects), best epoch {m.get('best_epoch')}",
                    ["kind", "precision@1"], rows)]
    curve = (result.get("curve") or {}).get("epochs") or []
    if curve:
        tables.append(table("training curve", ["epoch", "loss", "val precision@1", "seconds"],
                            [(r["epoch"], r["loss"], r.get("val_precision@1", "-"), r["seconds"]) for r in curve]))
    emit({"dataset": dataset, **{k: v for k, v in result.items() if k != "curve"}}, as_json, tables)
