"""What is in a cache root, and whether it is sound (`refground cache ls` / `refground cache verify`).

A cache root holds one folder per dataset; inside, ``dataset/`` and one folder per artifact kind::

    <root>/<dataset>/{dataset, features, dense, clip, graph, pseudo}/...   runs/<method>/<name>/

Besides complete artifacts it may hold ``.partial`` folders (interrupted or sharded extraction: resumable,
never read by a later step) and hidden ``.<name>.tmp-*`` / ``.<name>.old-*`` leftovers of a process killed
while writing or swapping (never read; ``verify --sweep`` deletes them).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from refground.cache.chunks import PARTIAL_SUFFIX, partial_progress
from refground.cache.manifest import MANIFEST_SUFFIX, read_manifest_of, stale_parents
from refground.errors import ArtifactError

KINDS = ("features", "dense", "clip", "graph", "pseudo")
_LEFTOVER = re.compile(r"^\..+\.(tmp|old)-[0-9a-f]{8}$")


@dataclass
class Entry:
    """One thing found in the cache. ``status``: complete | incomplete | partial | leftover | stale |
    damaged (the last two only after :func:`verify`)."""

    dataset: str
    kind: str
    name: str
    path: Path
    status: str
    size: int = 0
    created: str = ""
    fingerprint: str = ""
    detail: str = ""
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "kind": self.kind, "name": self.name, "path": str(self.path),
                "status": self.status, "size": self.size, "created": self.created,
                "fingerprint": self.fingerprint[:12], "detail": self.detail, "problems": self.problems}


def _size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(q.stat().st_size for q in p.rglob("*") if q.is_file())


def _artifacts(ds_root: Path) -> list[tuple[str, Path]]:
    out: list[tuple[str, Path]] = [("dataset", ds_root / "dataset")] if (ds_root / "dataset").exists() else []
    for kind in KINDS:
        d = ds_root / kind
        if d.is_dir():
            out += [(kind, p) for p in sorted(d.iterdir()) if not p.name.endswith(MANIFEST_SUFFIX)]
    runs = ds_root / "runs"
    if runs.is_dir():
        for method in sorted(p for p in runs.iterdir() if p.is_dir()):
            out += [(f"runs/{method.name}", p) for p in sorted(method.iterdir())]
    return out


def list_cache(root: Path) -> list[Entry]:
    """Every artifact, partial job and leftover under ``root`` (no checks beyond the manifest flag)."""
    from refground.data.store import read_manifest

    root = Path(root)
    if not root.is_dir():
        raise ArtifactError(f"{root}: no cache here (run `refground data synth` first, or pass --cache)")
    entries = []
    for ds_root in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for lo in sorted(ds_root.iterdir()):
            if _LEFTOVER.match(lo.name):
                entries.append(Entry(ds_root.name, "dataset", lo.name, lo, "leftover", _size(lo)))
        for kind, p in _artifacts(ds_root):
            if _LEFTOVER.match(p.name):
                entries.append(Entry(ds_root.name, kind, p.name, p, "leftover", _size(p)))
                continue
            if p.name.endswith(PARTIAL_SUFFIX):
                prog = partial_progress(p.with_name(p.name[:-len(PARTIAL_SUFFIX)]))
                detail = f"{prog[0]}/{prog[1]} chunks" if prog else "no job"
                entries.append(Entry(ds_root.name, kind, p.name[:-len(PARTIAL_SUFFIX)], p, "partial", _size(p),
                                     detail=detail))
                continue
            if kind == "dataset":
                try:
                    m = read_manifest(p)
                    e = Entry(ds_root.name, kind, ds_root.name, p, "complete", _size(p), m.get("created", ""),
                              detail=f"{m.get('counts', {}).get('images', '?')} images")
                except ArtifactError:
                    e = Entry(ds_root.name, kind, ds_root.name, p, "incomplete", _size(p))
                entries.append(e)
                continue
            if p.is_dir() and kind.startswith("runs/") and not (p / "manifest.json").exists():
                entries.append(Entry(ds_root.name, kind, p.name, p, "incomplete", _size(p), detail="no manifest"))
                continue
            m = read_manifest_of(p)
            status = "complete" if m is not None and m.complete else "incomplete"
            entries.append(Entry(ds_root.name, kind, p.name, p, status, _size(p), m.created if m else "",
                                 m.fingerprint if m else "", detail=m.step if m else "no manifest"))
    return entries


def _check_h5(path: Path) -> list[str]:
    from refground.cache.h5store import RaggedH5

    problems = []
    try:
        with RaggedH5(path) as f:
            for section, off in f.offsets.items():
                if len(off) == 0 or off[0] != 0 or np.any(np.diff(off) < 0):
                    problems.append(f"{section}/offsets not a non-decreasing run from 0")
                    continue
                for fld, dset in f.file[section].items():
                    if fld != "offsets" and dset.shape[0] != off[-1]:
                        problems.append(f"{section}/{fld} has {dset.shape[0]} rows, offsets say {off[-1]}")
    except ArtifactError as exc:
        problems.append(str(exc))
    return problems


def _check_zarr(path: Path) -> list[str]:
    from refground.cache.zarrstore import open_dense

    try:
        g = open_dense(path)
        n = g["image_ids"].shape[0]
        return [f"{k} has {g[k].shape[0]} rows, expected {n}" for k in g.array_keys() if g[k].shape[0] != n]
    except (ArtifactError, KeyError) as exc:
        return [str(exc)]


def verify(root: Path, sweep: bool = False) -> list[Entry]:
    """:func:`list_cache` plus checks: parents still current (else ``stale``), files readable and their
    arrays consistent with their offsets (else ``damaged``). With ``sweep``, leftovers are deleted."""
    entries = list_cache(root)
    for e in entries:
        if e.status == "leftover" and sweep:
            if e.path.is_dir():
                shutil.rmtree(e.path, ignore_errors=True)
            else:
                e.path.unlink(missing_ok=True)
            e.detail = "deleted"
        if e.status != "complete" or e.kind == "dataset":
            continue
        m = read_manifest_of(e.path)
        stale = stale_parents(m) if m else []
        if stale:
            e.status = "stale"
            e.problems.append(f"changed since made: {', '.join(stale)}")
        if e.path.suffix == ".h5":
            e.problems += _check_h5(e.path)
        elif e.path.suffix == ".zarr":
            e.problems += _check_zarr(e.path)
        if e.problems and e.status == "complete":
            e.status = "damaged"
    return entries
