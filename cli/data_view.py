"""`refground data stats`: what a dataset holds."""

from __future__ import annotations

from refground.cli.apps import data_app
from refground.cli.console import emit, table
from refground.cli.options import CacheOpt, DatasetOpt, JsonOpt, OutOpt
from refground.data.stats import dataset_stats
from refground.data.store import load_named


@data_app.command("stats")
def stats(dataset: DatasetOpt = "synth", cache: CacheOpt = None, as_json: JsonOpt = False, out: OutOpt = None) -> None:
    """Counts per split and expression kind, objects per image, expression lengths (tokens)."""
    s = dataset_stats(load_named(dataset, cache))
    overview = table(f"{s['dataset']}", ["metric", "value"], [
        ("images", s["images"]), ("objects", s["objects"]), ("expressions", s["expressions"]),
        ("captions", s["captions"]),
        ("objects / image (min, mean, max)", "{min}, {mean}, {max}".format(**s["objects_per_image"])),
        ("expression tokens (min, mean, max)", "{min}, {mean}, {max}".format(**s["expression_length"])),
        ("caption tokens (min, mean, max)", "{min}, {mean}, {max}".format(**s["caption_length"])),
        ("relation share of expressions", s["relation_share"]),
        ("second-order share of expressions", s["second_order_share"]),
    ])
    splits = table("per split", ["split", "images", "expressions", "captions"],
                   [(k, v["images"], v["expressions"], v["captions"]) for k, v in s["splits"].items()])
    kinds = table("per expression kind", ["kind", "count", "share", "mean tokens"],
                  [(k, v["count"], v["share"], v["length"]["mean"]) for k, v in s["kinds"].items()])
    emit(s, as_json, [overview, splits, kinds], out)
