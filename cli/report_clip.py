"""``refground report clip``: what a CLIP knows of a grounding dataset it never saw (zero-shot figures)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from refground.cli.console import check_out_file, emit
from refground.cli.options import CacheOpt, DatasetOpt, JsonOpt, OutOpt


def report_clip_command(
    dataset: DatasetOpt = "synth",
    cache: CacheOpt = None,
    clip: Annotated[str, typer.Option("--clip", help="The CLIP: builtin[:NAME] (`refground train clip`) or "
                                      "hf:PATH (any CLIP folder saved with save_pretrained).")] = "builtin",
    split: Annotated[str, typer.Option("--split", help="The split to measure on.")] = "val",
    max_images: Annotated[Optional[int], typer.Option("--max-images", help="Only the first N images of the split "
                                                      "(a quick look).", show_default=False)] = None,
    out: OutOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Zero-shot figures of a CLIP on a dataset: ground-truth crops classified by category and by colour with
    prompts, caption -> image recall@1/5/10, expression -> its image's objects recall@1 against chance, and
    the share of expressions whose gradient-weighted [CLS] attention map (BiCM's QAM signal) peaks inside the
    referent box, per kind. Markdown to --out (default <cache>/report/clip.md), JSON beside it, a PNG of
    attention maps."""
    from refground.cli.methods import render
    from refground.errors import UsageError
    from refground.features.clip_zeroshot import report_clip

    if max_images is not None and max_images < 1:
        raise UsageError(f"--max-images {max_images}: must be at least 1")
    if out is not None:
        check_out_file(out, ours=lambda p: p.suffix.lower() == ".md", suffixes=(".md",))
    res = report_clip(dataset, cache, clip, split, out, max_images)
    emit(res["json"], as_json, render(res["tables"]), Path(res["markdown_path"]).with_suffix(".json"))
