"""``refground train detector``: train the built-in two-stage detector on a dataset's train split."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from refground.cli.console import emit, info, table
from refground.cli.options import (CacheOpt, DatasetOpt, ForceOpt, JsonOpt, ResumeOpt, SeedOpt, ThreadsOpt,
                                   read_config_file)


def train_detector_command(
    dataset: DatasetOpt = "synth",
    cache: CacheOpt = None,
    run: Annotated[str, typer.Option("--run", help="Run name: the run folder is "
                                     "<cache>/<dataset>/runs/detector/<run>/ (what `refground extract --detector "
                                     "builtin:<run>` reads).")] = "default",
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Training epochs (default 3).",
                                                  show_default=False)] = None,
    input_size: Annotated[Optional[int], typer.Option("--input-size", help="Longer image side fed to the network "
                                                      "(default 256; images are resized, aspect kept).",
                                                      show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Images per training step (default 8).",
                                                      show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak AdamW learning rate (default 0.002).",
                                                show_default=False)] = None,
    config_file: Annotated[Optional[Path], typer.Option("--config", help="JSON file of DetectorConfig fields "
                                                        "(e.g. a run's config.json); the options above override "
                                                        "it.", show_default=False)] = None,
    seed: SeedOpt = 0,
    threads: ThreadsOpt = "auto",
    resume: ResumeOpt = True,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train the built-in detector (small CNN + FPN, dense proposal head, RoIAlign region head with category,
    colour and size classifiers and box refinement) from scratch on the CPU, then report proposal recall and
    attribute accuracy on the val split. Skips a complete run with the same config, seed and dataset. Under
    `torchrun --nproc-per-node N --no-python -- refground train detector ...` the N processes train it together."""
    from refground.cli.methods import training_processes
    from refground.data.store import dataset_dir, load_dataset
    from refground.features.detector import DetectorConfig
    from refground.features.detector_train import train_detector
    from refground.runs import local_run_name
    from refground.train import check_training_fields, config_of

    overrides = check_training_fields(epochs=epochs, input_size=input_size, batch_size=batch_size, lr=lr)
    base = read_config_file(config_file, "detector config") if config_file is not None else {}
    config = config_of(DetectorConfig.from_dict, {**base, **overrides}, str(config_file or "detector config"))
    ds_dir = dataset_dir(dataset, cache)
    out_dir = ds_dir.parent / "runs" / "detector" / local_run_name(run, "detector", dataset)
    ds = load_dataset(ds_dir)
    from refground.threads import parse_threads, use_threads

    count = parse_threads(threads)
    with training_processes() as main, use_threads(count):  # under torchrun: DDP, rank 0 writes and prints
        result = train_detector(ds, out_dir, config, seed=seed, resume=resume, force=force, dataset_dir=ds_dir)
    if not main:
        return
    if result["cache_hit"]:
        info(f"{out_dir}: complete with the same config, seed and dataset; cache hit, skipping "
             "(use --force to retrain)")
    elif result.get("resumed_from"):
        info(f"{out_dir}: resumed after epoch {result['resumed_from']}")
    m = result.get("metrics") or {}
    rows = []
    for n, r in (m.get("referent_recall") or {}).items():
        rows.append((f"recall@{n}", r, (m.get("context_recall") or {}).get(n, float("nan"))))
    figures = [("category accuracy", m.get("category_accuracy")), ("colour accuracy", m.get("color_accuracy")),
               ("size accuracy", m.get("size_accuracy")), ("mean proposals / image", m.get("mean_proposals")),
               ("inference images/s", m.get("images_per_s")),
               ("training seconds", result.get("train_seconds")),
               ("training images/s", result.get("train_images_per_s"))]
    tables = [table(f"detector {run!r} on {dataset} {m.get('split', 'val')}: proposal recall (IoU >= 0.5)",
                    ["metric", "referent recall", "context recall"], rows),
              table(f"detector {run!r}: accuracy on ground-truth boxes, speed", ["metric", "value"],
                    [(k, v if v is not None else "-") for k, v in figures])]
    emit({"dataset": dataset, "name": run, **result}, as_json, tables)
