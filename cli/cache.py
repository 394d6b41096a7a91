"""`refground cache ls` and `refground cache verify`: what is in the artifact cache, and is it sound."""

from __future__ import annotations

from typing import Annotated

import typer

from refground.cli.apps import cache_app
from refground.cli.console import emit, table
from refground.cli.options import CacheOpt, JsonOpt
from refground.data.store import cache_root
from refground.errors import ArtifactError
from refground.tables import BYTES, SECONDS, TEXT, format_value


def _rows(entries) -> list[tuple]:
    return [(e.dataset, e.kind, e.name, e.status, e.size, e.created, e.fingerprint[:12],
             "; ".join(e.problems) or e.detail) for e in entries]


COLUMNS = ["dataset", "kind", "name", "status", "size", "created", "fingerprint", "detail"]
KINDS = [TEXT, TEXT, TEXT, TEXT, BYTES, TEXT, TEXT, TEXT]  # "detail" may read "24 images": still text


@cache_app.command("ls")
def ls(cache: CacheOpt = None, as_json: JsonOpt = False) -> None:
    """List datasets, artifacts (features, dense, clip, graph, pseudo, runs), resumable partial jobs and
    leftovers of killed processes, with status, size and fingerprint."""
    from refground.cache.listing import list_cache

    root = cache_root(cache)
    entries = list_cache(root)
    emit({"root": str(root), "entries": [e.as_dict() for e in entries]}, as_json,
         [table(f"cache {root}", COLUMNS, _rows(entries), KINDS)])


@cache_app.command("verify")
def verify(
    cache: CacheOpt = None,
    sweep: Annotated[bool, typer.Option("--sweep", help="Delete leftovers of killed processes "
                                        "(.NAME.tmp-*/.NAME.old-*) whose lock no live process holds (a running "
                                        "job's working folder stays); an .old-* copy that is the only one left "
                                        "is put back; partial jobs stay (they resume).")] = False,
    deep: Annotated[bool, typer.Option("--deep", help="Re-hash every byte of every file (sha256) instead of "
                                       "comparing sizes and a sampled hash (a few 64 KiB blocks per file).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Check every artifact and dataset: manifest complete; inputs unchanged since it was made (else stale:
    re-run the step); files as they were written (sizes and hashes recorded in the manifest; else damaged);
    HDF5/zarr readable with arrays consistent with their offsets. Exits 2 if anything is wrong."""
    import time

    from refground.cache.listing import remedy, verify as verify_cache

    root = cache_root(cache)
    t0 = time.perf_counter()
    entries = verify_cache(root, sweep=sweep, deep=deep)
    seconds = time.perf_counter() - t0
    bad = [e for e in entries if e.status in ("stale", "damaged", "incomplete")
           or (e.status == "leftover" and not sweep)]
    emit({"root": str(root), "ok": not bad, "deep": deep, "seconds": round(seconds, 3),
          "entries": [e.as_dict() for e in entries]}, as_json,
         [table(f"cache {root} (checked in {format_value(seconds, SECONDS)} s{', deep' if deep else ''})", COLUMNS,
                _rows(entries), KINDS)])
    if bad:
        e = bad[0]
        raise ArtifactError(f"{len(bad)} problem(s); first: {e.path}: {e.status}"
                            + (f" ({'; '.join(e.problems)})" if e.problems else "")
                            + ("; run `refground cache verify --sweep`" if e.status == "leftover" else
                               f"; run `{remedy(e, root)}`"))
