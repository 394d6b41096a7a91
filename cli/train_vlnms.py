"""``refground train vlnms``: train VL-NMS's relatedness module (FC or Transformer; BCE or ranking loss)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from refground.cli.apps import train_app
from refground.cli.console import emit, info, table
from refground.cli.options import (CacheOpt, DatasetOpt, ForceOpt, JsonOpt, ResumeOpt, SeedOpt, config_from,
                                   training_overrides)
from refground.errors import UsageError


@train_app.command("vlnms")
def train_vlnms_command(
    dataset: DatasetOpt = "synth",
    cache: CacheOpt = None,
    variant: Annotated[Optional[str], typer.Option("--variant", help="Relatedness module: 'fc' (VL-NMS-FC, "
                                                   "eqs. 1-2; the default) or 'trans' (VL-NMS-Trans, eq. 3, with "
                                                   "the box-regression head).", show_default=False)] = None,
    loss: Annotated[Optional[str], typer.Option("--loss", help="Classification loss: 'bce' (eq. 4; the default) "
                                                "or 'rank' (eq. 5, sampling after splitting into q-value buckets).",
                                                show_default=False)] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Run name: <cache>/<dataset>/runs/vlnms/<name>/ "
                                                "(default: <variant>-<loss>, '-nopseudo' appended without pseudo "
                                                "ground truth).", show_default=False)] = None,
    pseudo: Annotated[bool, typer.Option("--pseudo/--no-pseudo", help="Use the pseudo ground truth of contextual "
                                         "objects (`refground pseudo vlnms`) as foreground besides the referent; "
                                         "--no-pseudo trains on the referent alone (Table 4).")] = True,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Training epochs.", show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Queries per step.",
                                                      show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Adam learning rate.", show_default=False)] = None,
    nms_threshold: Annotated[float, typer.Option("--nms-threshold", help="IoU threshold of the per-class "
                                                 "fused-score NMS used to select the best epoch on val.")] = 0.5,
    features: Annotated[str, typer.Option("--features", help="Features artifact with pre-NMS detections "
                                          "(`refground extract --detections`).")] = "detector-default",
    config_file: Annotated[Optional[Path], typer.Option("--config", help="JSON file of VL-NMS config fields (e.g. "
                                                        "a run's config.json); the options above override it.",
                                                        show_default=False)] = None,
    seed: SeedOpt = 0,
    resume: ResumeOpt = True,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train the relatedness module on the train split: every pre-NMS detection of the query's image is a
    positive when its IoU with the referent or a pseudo contextual object exceeds 0.5. Keeps the epoch with
    the best val referent recall@10 of the fused-score NMS. Writes config.json, vocab.json, checkpoint.pt,
    model.pt, curve.json and metrics.json; skips a complete run with the same config, seed and inputs."""
    from refground.models.vlnms import VLNMSConfig
    from refground.models.vlnms_run import train_vlnms

    overrides = training_overrides(variant=variant, loss=loss, epochs=epochs, batch_size=batch_size, lr=lr)
    if not 0 < nms_threshold <= 1:
        raise UsageError(f"--nms-threshold {nms_threshold}: must be in (0, 1]")
    config = config_from(VLNMSConfig.from_dict, config_file, "VL-NMS config", overrides)
    run_name = name or f"{config.variant}-{config.loss}" + ("" if pseudo else "-nopseudo")
    result = train_vlnms(dataset, cache, run_name, config, features=features, pseudo=pseudo, seed=seed,
                         resume=resume, force=force, nms_threshold=nms_threshold)
    if result["cache_hit"]:
        info(f"{result['run']}: complete with the same config, seed and inputs; cache hit, skipping "
             "(use --force to retrain)")
    elif result.get("resumed_from"):
        info(f"{result['run']}: resumed after epoch {result['resumed_from']}")
    m = result.get("metrics") or {}
    rows = [(k, v) for k, v in m.items() if "recall@" in k]
    tables = [table(f"vlnms {run_name!r}: val recall of the fused-score NMS, best epoch {m.get('best_epoch')}",
                    ["figure", "value"], rows)]
    curve = (result.get("curve") or {}).get("epochs") or []
    if curve:
        tables.append(table("training curve", ["epoch", "loss", "val recall@10", "val context_recall@10", "seconds"],
                            [(r["epoch"], r["loss"], r.get("val_recall@10", "-"), r.get("val_context_recall@10", "-"),
                              r["seconds"]) for r in curve]))
    emit({"dataset": dataset, **{k: v for k, v in result.items() if k != "curve"}}, as_json, tables)
