"""`refground pseudo vlnms`: text-similarity pseudo ground truth for contextual objects (VL-NMS Sec. 3.3)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from refground.cli.apps import pseudo_app
from refground.cli.console import emit, info, table
from refground.cli.options import CacheOpt, DatasetOpt, ForceOpt, JsonOpt, SeedOpt, SplitOpt


@pseudo_app.command("vlnms")
def vlnms(
    dataset: DatasetOpt = "synth",
    cache: CacheOpt = None,
    gamma: Annotated[float, typer.Option("--gamma", help="Cosine-similarity threshold between a noun and a "
                                         "category name, in [-1, 1] (paper: 0.4).")] = 0.4,
    word_vectors: Annotated[Optional[Path], typer.Option(
        "--word-vectors", help="GloVe-format text file (word and floats per line, .gz accepted); default: the "
        "toolkit's own count-based vectors from the training queries.", show_default=False)] = None,
    parser: Annotated[str, typer.Option("--parser", help="Noun extractor: toolkit (built-in heuristic tagger) or "
                                        "spacy (needs spaCy and en_core_web_sm installed).")] = "toolkit",
    split: SplitOpt = "all",
    force: ForceOpt = False,
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
) -> None:
    """Mark, for every referring expression, the ground-truth objects of its image whose category name is
    similar (cosine >= --gamma) to a noun of the expression: the pseudo contextual objects VL-NMS trains on
    (referent excluded). Writes pseudo/vlnms.h5 and pseudo/vlnms.json with their precision and recall
    against the recorded context mentions, overall and per query kind."""
    from refground.errors import UsageError
    from refground.pseudo.vlnms import build_pseudo_vlnms, check_options

    check_options(gamma, parser)
    if word_vectors is not None and not word_vectors.is_file():
        raise UsageError(f"{word_vectors}: word-vector file not found")
    res = build_pseudo_vlnms(dataset, cache, gamma=gamma, word_vectors=word_vectors, parser=parser, split=split,
                             seed=seed, force=force)
    if res["status"] == "hit":
        info(f"{res['path']}: complete and current; skipping (use --force to rebuild)")
    if res.get("note"):
        info(res["note"])
    cols = ["kind", "queries", "pseudo/query", "precision", "recall", "referent matched"]

    def row(kind: str, r: dict) -> list:
        return [kind, r["queries"], r["pseudo_per_query"] if r["pseudo_per_query"] is not None else "-",
                *[r[k] if r[k] is not None else "-" for k in ("precision", "recall", "referent_matched")]]

    rows = [row(k, r) for k, r in res["per_kind"].items()] + [row("all", res)]
    title = f"pseudo vlnms {dataset} (gamma {res['gamma']}, parser {res['parser']}, {res['seconds']} s)"
    emit(res, as_json, [table(title, cols, rows)], json_path=Path(res["path"]).with_suffix(".json"))
