"""`refground retrieve`: search the CLIP embeddings with faiss (text -> images / regions / objects, image -> queries)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from refground.cli.apps import app
from refground.cli.console import check_out_file, emit, info, is_png, table
from refground.cli.options import CacheOpt, DatasetOpt, JsonOpt, SeedOpt, ThreadsOpt
from refground.errors import UsageError


def _section(images: bool, regions: bool, objects: bool, queries: bool) -> str | None:
    chosen = [name for name, on in (("images", images), ("regions", regions), ("objects", objects),
                                    ("queries", queries)) if on]
    if len(chosen) > 1:
        raise UsageError(f"choose one of --images, --regions, --objects, --queries (got {', '.join('--' + c for c in chosen)})")
    return chosen[0] if chosen else None


@app.command("retrieve")
def retrieve_command(
    text: Annotated[str | None, typer.Argument(help="The query text, e.g. \"the red star left of a circle\" "
                                                  "(embedded with the CLIP model that made the artifact).",
                                                  show_default=False)] = None,
    image: Annotated[int | None, typer.Option("--image", help="Search with the stored embedding of this image id "
                                                 "instead of a text (default target: --queries, the stored "
                                                 "queries that best describe it).", show_default=False)] = None,
    images: Annotated[bool, typer.Option("--images", help="Search whole images (the default for a text).")] = False,
    regions: Annotated[bool, typer.Option("--regions", help="Search region crops: the proposals of the features "
                                          "artifact the CLIP artifact was cut from.")] = False,
    objects: Annotated[bool, typer.Option("--objects", help="Search crops of the ground-truth objects.")] = False,
    queries: Annotated[bool, typer.Option("--queries", help="Search the dataset's stored queries (the default for "
                                          "--image).")] = False,
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Hits to return.")] = 10,
    index: Annotated[str, typer.Option("--index", help="flat: exact inner-product search (faiss IndexFlatIP); ivf: "
                                       "approximate, faster on large sets (IndexIVFFlat).")] = "flat",
    nprobe: Annotated[int | None, typer.Option("--nprobe", help="ivf: cells to visit per search (default: an "
                                                  "eighth of them, at least 8); more = better recall, slower.",
                                                  show_default=False)] = None,
    nlist: Annotated[int | None, typer.Option("--nlist", help="ivf: k-means cells per shard (default: 4 sqrt(N), "
                                                 "at most N/39).", show_default=False)] = None,
    shards: Annotated[int, typer.Option("--shards", help="Split the index into N files over contiguous rows, "
                                        "searched one at a time (memory-mapped) and merged exactly.")] = 1,
    clip: Annotated[str | None, typer.Option("--clip", help="CLIP artifact (clip/<MODEL>.h5) by model name "
                                                "(default: the only one).", show_default=False)] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write a PNG strip of the hits (must end in "
                                                ".png; an existing file only if it is a PNG).",
                                                show_default=False)] = None,
    build: Annotated[bool, typer.Option("--build", help="Only build (or find current) the index; no query.")] = False,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Rebuild the index even if it is current.")] = False,
    dataset: DatasetOpt = "synth",
    cache: CacheOpt = None,
    seed: SeedOpt = 0,
    threads: ThreadsOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Search the CLIP embeddings of a dataset with a faiss index (built on first use and cached under
    <cache>/<dataset>/index/<clip model>/). A text searches whole images (--images), region crops (--regions),
    ground-truth objects (--objects) or the stored queries (--queries); --image ID searches with a stored
    image's embedding (by default against the queries: which ones best describe it). Prints a table (or
    --json), and --out writes a PNG strip of the hits. --seed seeds the IVF training sample and k-means;
    --threads sets faiss's threads (the index does not depend on them)."""
    from refground.retrieval.store import IndexSpec
    from refground.threads import parse_threads

    threads = parse_threads(threads)
    section = _section(images, regions, objects, queries)
    spec = IndexSpec(type=index, nlist=nlist, shards=shards, seed=seed)
    if build:
        if text is not None or image is not None:
            raise UsageError("--build builds the index only: give no query text or --image")
        return _build(dataset, cache, clip, section or "images", spec, rebuild, threads, as_json)
    if out is not None:  # before any work: a refused path costs nothing
        check_out_file(out, ours=is_png, suffixes=(".png",))
    from refground.retrieval.search import retrieve

    res = retrieve(dataset, cache, text=text, image_id=image, section=section, top_k=top_k, spec=spec,
                   nprobe=nprobe, clip=clip, force=rebuild, threads=threads)
    payload = res.as_dict()
    if out is not None:
        from refground.data.store import load_named
        from refground.retrieval.strip import render_strip
        from refground.viz import save_png

        save_png(render_strip(load_named(dataset, cache), res), out)
        payload["png"] = str(out)
    if res.index["status"] == "written" and not as_json:
        info(f"built {res.index['path']} ({res.index['ntotal']} vectors, {res.index['seconds']} s)")
    what = f'"{res.text}"' if res.text is not None else f"image {res.image_id}"
    title = f"{what} -> {res.section} ({res.clip}, {res.index['type']}" + \
        (f", {res.index['shards']} shards" if res.index["shards"] > 1 else "") + ")"
    if res.section == "queries":
        columns, kinds = ["rank", "score", "image", "query", "text"], ["count", "float", "count", "count", "text"]
        rows = [(h.rank, h.score, h.image_id, h.query_id, h.text) for h in res.hits]
    elif res.section == "images":
        columns, kinds = ["rank", "score", "image"], ["count", "float", "count"]
        rows = [(h.rank, h.score, h.image_id) for h in res.hits]
    else:
        label = "object" if res.section == "objects" else "region"
        columns, kinds = ["rank", "score", "image", label, "box (xyxy)"], ["count", "float", "count", "text", "text"]
        rows = [(h.rank, h.score, h.image_id,
                 f"{h.object_id} ({h.category})" if res.section == "objects" else str(h.region),
                 ", ".join(f"{v:.1f}" for v in h.box or ())) for h in res.hits]
    emit(payload, as_json, [table(title, columns, rows, kinds)])
    if out is not None and not as_json:
        info(f"wrote {out}")


def _build(dataset: str, cache: Path | None, clip: str | None, section: str, spec, rebuild: bool,
           threads: int | str, as_json: bool) -> None:
    from refground.retrieval.index import faiss_threads
    from refground.retrieval.store import build_index_artifact, clip_artifact

    with faiss_threads(threads):
        res = build_index_artifact(clip_artifact(dataset, cache, clip), section, spec, force=rebuild)
    if res["status"] == "hit" and not as_json:
        info(f"{res['path']}: complete and current; skipping (use --rebuild to rebuild)")
    rows = [(k.replace("_", " "), ", ".join(map(str, v)) if isinstance(v, list) else v) for k, v in res.items()]
    emit(res, as_json, [table(f"index {dataset}", ["name", "value"], rows)])
