"""``refground train clip``: train the built-in CLIP on its own image / alt-text corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from refground.cli.console import emit, info, table
from refground.cli.options import CacheOpt, ForceOpt, JsonOpt, ResumeOpt, SeedOpt, ThreadsOpt, read_config_file


def train_clip_command(
    dataset: Annotated[str, typer.Option("--dataset", "--corpus", "-d", help="The corpus to train on: a dataset "
                                         "of captioned images (default `web`, made by `refground data synth "
                                         "--preset web`; never the benchmark).")] = "web",
    cache: CacheOpt = None,
    run: Annotated[str, typer.Option("--run", help="Run name: the run folder is <cache>/<corpus>/runs/clip/<run>/, "
                                     "its model in pretrained/ (what `refground extract --clip builtin:<run>` "
                                     "reads).")] = "default",
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Training epochs (default 34).",
                                                  show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Image-caption pairs per step, each "
                                                      "the others' negatives (default 64).",
                                                      show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak AdamW learning rate (default 0.0015).",
                                                show_default=False)] = None,
    config_file: Annotated[Optional[Path], typer.Option("--config", help="JSON file of ClipTrainConfig fields "
                                                        "(e.g. a run's config.json); the options above override "
                                                        "it.", show_default=False)] = None,
    seed: SeedOpt = 0,
    threads: ThreadsOpt = "auto",
    resume: ResumeOpt = True,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train the built-in CLIP from scratch on the CPU: a transformers CLIPModel (a small ViT with a [CLS]
    token, a small text transformer, a tokenizer made from the corpus), CLIP's symmetric contrastive loss with
    a learned temperature. The epoch with the best corpus-val recall@1 is saved with save_pretrained beside its
    processor, so CLIPModel / AutoProcessor.from_pretrained load it and `--clip builtin` reads it like any CLIP
    folder. Skips a complete run with the same config, seed and corpus; resumes an interrupted one."""
    from refground.data.store import dataset_dir, load_dataset
    from refground.features.clip_train import ClipTrainConfig, train_clip
    from refground.runs import local_run_name
    from refground.threads import parse_threads, use_threads
    from refground.train import check_training_fields, config_of

    overrides = check_training_fields(epochs=epochs, batch_size=batch_size, lr=lr)
    base = read_config_file(config_file, "CLIP config") if config_file is not None else {}
    config = config_of(ClipTrainConfig.from_dict, {**base, **overrides}, str(config_file or "CLIP config"))
    ds_dir = dataset_dir(dataset, cache)
    out_dir = ds_dir.parent / "runs" / "clip" / local_run_name(run, "clip", dataset)
    if not (ds_dir / "manifest.json").is_file():
        from refground.errors import ArtifactError

        named = "" if dataset == "web" else f" --dataset {dataset}"
        raise ArtifactError(f"{ds_dir}: no corpus here; make one with `refground data synth --preset web{named}`")
    ds = load_dataset(ds_dir)
    with use_threads(parse_threads(threads)):
        result = train_clip(ds, out_dir, config, seed=seed, resume=resume, force=force, dataset_dir=ds_dir)
    if result["cache_hit"]:
        info(f"{out_dir}: complete with the same config, seed and corpus; cache hit, skipping (use --force to "
             "retrain)")
    elif result.get("resumed_from"):
        info(f"{out_dir}: resumed after epoch {result['resumed_from']}")
    m = result.get("metrics") or {}
    rows = [(f"recall@{k}", m.get(f"text_to_image@{k}"), m.get(f"image_to_text@{k}")) for k in (1, 5, 10)]
    facts = [("model folder", result.get("pretrained")), ("best epoch", m.get("best_epoch")),
             ("temperature", m.get("temperature")), ("vocabulary", m.get("vocab_size")),
             ("parameters", m.get("parameters")), ("training seconds", result.get("train_seconds")),
             ("training pairs/s", result.get("queries_per_s"))]
    tables = [table(f"built-in CLIP {run!r} on {dataset} {m.get('split', 'val')} ({m.get('images', '?')} images, "
                    f"{m.get('captions', '?')} captions): retrieval",
                    ["metric", "caption -> image", "image -> caption"], rows),
              table(f"built-in CLIP {run!r}", ["", "value"], [(k, v if v is not None else "-") for k, v in facts])]
    emit({"dataset": dataset, "name": run, **{k: v for k, v in result.items() if k != "curve"}}, as_json, tables)
