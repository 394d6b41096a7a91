"""What is in a cache root, and whether it is sound (`refground cache ls` / `refground cache verify`).

A cache root holds one folder per dataset; inside, ``dataset/`` and one folder per artifact kind::

    <root>/<dataset>/{dataset, features, dense, clip, graph, pseudo}/...   runs/<method>/<name>/
    <root>/<dataset>/vlnms/<tag>/<split>.h5                                 (query-aware proposals)
    <root>/<dataset>/bicm/<clip model>/<split>-<kind>.h5                    (BiCM's module scores)
    <root>/<dataset>/index/<clip model>/<section>-<type>[-s<S>]/             (faiss indexes, `refground retrieve`)

Besides complete artifacts it may hold ``.partial`` folders (interrupted or sharded extraction: resumable,
never read by a later step), hidden ``.<name>.lock`` files (the writers' locks, :mod:`refground.cache.lock`)
and hidden ``.<name>.tmp-*`` / ``.<name>.old-*`` leftovers of a process killed while writing or swapping
(never read). ``verify --sweep`` deletes a leftover only when no live process holds the lock of its
artifact (else it is the working folder of a running job: ``in use``), and puts an ``.old-*`` copy back
when it is the only copy left (a kill between the two renames of :func:`refground.atomic.atomic_dir`).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from refground.cache.chunks import PARTIAL_SUFFIX, partial_progress
from refground.cache.lock import LOCK_SUFFIX, is_locked
from refground.cache.manifest import MANIFEST_SUFFIX, read_manifest_of, stale_parents
from refground.errors import ArtifactError

KINDS = ("features", "dense", "clip", "graph", "pseudo")
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<what>tmp|old)-[0-9a-f]{8}$")


def _hidden_lock(p: Path) -> bool:
    return p.name.startswith(".") and p.name.endswith(LOCK_SUFFIX)


@dataclass
class Entry:
    """One thing found in the cache. ``status``: complete | incomplete | partial | leftover | in use |
    stale | damaged (the last three only after :func:`verify`)."""

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
            out += [(kind, p) for p in sorted(d.iterdir()) if not p.name.endswith(MANIFEST_SUFFIX)
                    and not _hidden_lock(p)]
    # Query-aware proposal sets (`refground vlnms`): vlnms/<tag>/<split>.h5, each with a sidecar manifest; the
    # <split>.jsonl beside it is an export of the same boxes for `refground eval`, not an artifact.
    qp = ds_root / "vlnms"
    if qp.is_dir():
        for tag in sorted(p for p in qp.iterdir() if p.is_dir()):
            out += [(f"vlnms/{tag.name}", p) for p in sorted(tag.iterdir()) if not p.name.endswith(MANIFEST_SUFFIX)
                    and not _hidden_lock(p) and p.suffix != ".jsonl"]
    # BiCM's module scores per split (`refground eval --method bicm`): bicm/<clip model>/<split>-<kind>.h5.
    bm = ds_root / "bicm"
    if bm.is_dir():
        for model in sorted(p for p in bm.iterdir() if p.is_dir() and not p.name.startswith(".")):
            out += [(f"bicm/{model.name}", p) for p in sorted(model.iterdir()) if not p.name.endswith(MANIFEST_SUFFIX)
                    and not _hidden_lock(p)]
    # Retrieval indexes (`refground retrieve`): index/<clip model>/<section>-<type>[-s<S>]/, folders with a manifest.
    idx = ds_root / "index"
    if idx.is_dir():
        for model in sorted(p for p in idx.iterdir() if p.is_dir() and not p.name.startswith(".")):
            out += [(f"index/{model.name}", p) for p in sorted(model.iterdir()) if not _hidden_lock(p)]
    runs = ds_root / "runs"
    if runs.is_dir():
        for method in sorted(p for p in runs.iterdir() if p.is_dir()):
            out += [(f"runs/{method.name}", p) for p in sorted(method.iterdir()) if not _hidden_lock(p)]
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
                preds = _predictions_only(p)
                if preds is not None:  # a training-free row (a baseline): its predictions files are the artifacts
                    done = all((m := read_manifest_of(f)) is not None and m.complete for f in preds)
                    entries.append(Entry(ds_root.name, kind, p.name, p, "complete" if done else "incomplete",
                                         _size(p), detail=f"predictions only ({len(preds)} files; nothing trained)"))
                    continue
                entries.append(Entry(ds_root.name, kind, p.name, p, "incomplete", _size(p), detail="no manifest"))
                continue
            m = read_manifest_of(p)
            status = "complete" if m is not None and m.complete else "incomplete"
            entries.append(Entry(ds_root.name, kind, p.name, p, status, _size(p), m.created if m else "",
                                 m.fingerprint if m else "", detail=m.step if m else "no manifest"))
    return entries


def _predictions_only(run: Path) -> list[Path] | None:
    """The predictions files of a run folder that holds nothing but ``predictions/`` (a training-free row such as a
    class-name baseline, which `refground eval --method M --run ROW` writes), else None."""
    visible = [q for q in run.iterdir() if not q.name.startswith(".")]
    if [q.name for q in visible] != ["predictions"] or not visible[0].is_dir():
        return None
    files = [q for q in sorted(visible[0].iterdir()) if q.suffix == ".jsonl" and not q.name.startswith(".")]
    return files or None


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


def leftover_target(path: Path) -> Path:
    """The artifact a ``.NAME.tmp-*`` / ``.NAME.old-*`` leftover belongs to (a manifest's temporary file
    belongs to the artifact the manifest describes)."""
    name = _LEFTOVER.match(path.name).group("name")
    if name.endswith(MANIFEST_SUFFIX):
        name = name[:-len(MANIFEST_SUFFIX)]
    return path.with_name(name)


def sweep_leftover(e: Entry) -> None:
    """Delete one leftover unless a live process holds its artifact's lock (status ``in use``); an ``.old-*``
    folder whose artifact is missing is the only copy left, so it is renamed back instead."""
    target = leftover_target(e.path)
    if is_locked(target):
        e.status, e.detail = "in use", f"a running job holds {target.name}'s lock; kept"
        return
    if _LEFTOVER.match(e.path.name).group("what") == "old" and not target.exists():
        os.replace(e.path, target)
        e.detail = f"restored as {target.name} (the only copy)"
        return
    if e.path.is_dir():
        shutil.rmtree(e.path, ignore_errors=True)
    else:
        e.path.unlink(missing_ok=True)
    e.detail = "deleted"


def _check_dataset(path: Path, deep: bool) -> list[str]:
    from refground.data.store import dataset_problems, read_manifest

    try:
        return dataset_problems(path, read_manifest(path), everything=True, deep=deep)
    except ArtifactError as exc:
        return [str(exc)]


def retrain_command(run: Path, cache: Path | None = None) -> str:
    """``refground train <method> --run <name> --force`` for the run folder ``run``
    (``<cache>/<dataset>/runs/<method>/<name>``): the command that rewrites it from scratch (with ``--cache``
    when given; ``--dataset`` unless it is the default one)."""
    run = Path(run)
    method = run.parent.name if run.parent.parent.name == "runs" else "<method>"
    dataset = run.parent.parent.parent.name
    where = f" --dataset {dataset}" if method != "<method>" and dataset not in ("", "synth") else ""
    where += f" --cache {cache}" if cache is not None else ""
    return f"refground train {method}{where} --run {run.name} --force"


def remedy(e: Entry, root: Path) -> str:
    """The command that rewrites the artifact of entry ``e`` (a damaged or stale one) from its manifest."""
    where = f"--dataset {e.dataset} --cache {root}"
    if e.kind == "dataset":
        from refground.data.store import dataset_remedy, read_manifest

        try:
            return dataset_remedy(e.path, read_manifest(e.path))
        except ArtifactError:
            return f"refground data synth {where} --force"
    if e.kind.startswith("runs/"):
        return retrain_command(e.path, root)
    m = read_manifest_of(e.path)
    step, params = (m.step, m.params) if m else ("", {})
    stem = Path(e.name).stem
    if step.startswith("extract.features"):
        opts = " ".join(f"--{o} {params[k]}" for k, o in (("detector", "detector"), ("backbone", "backbone"),
                                                           ("max_proposals", "max-proposals")) if k in params)
        return f"refground extract {where} --features {stem} {opts} --force"
    if e.kind in ("features", "dense", "clip"):
        return f"refground extract {where} --force (with the options that made {e.name})"
    if e.kind == "graph":
        return f"refground graph {where} --features {stem} --force"
    if e.kind.startswith("vlnms/"):
        return f"refground vlnms --run {e.kind[6:]} --split {stem} {where} --force"
    if e.kind.startswith("bicm/"):
        split = stem.rsplit("-", 1)[0]
        return f"refground eval --method bicm --run com --split {split} {where} --force"
    if e.kind == "pseudo":
        return f"refground pseudo {stem.split('-')[0]} {where} --force"
    if e.kind.startswith("index/"):
        from refground.retrieval.store import rebuild_command

        return rebuild_command(e.path, root)
    return f"the step that made it ({step or 'unknown'}) with --force"


def verify(root: Path, sweep: bool = False, deep: bool = False) -> list[Entry]:
    """:func:`list_cache` plus checks: parents still current (else ``stale``); files as they were made (sizes
    and sampled hashes, ``deep``: sha256 of every byte), readable and their arrays consistent with their
    offsets (else ``damaged``). With ``sweep``, leftovers whose lock is free are deleted (see
    :func:`sweep_leftover`)."""
    entries = list_cache(root)
    for e in entries:
        if e.status == "leftover" and sweep:
            sweep_leftover(e)
        if e.status != "complete":
            continue
        if e.kind == "dataset":
            e.problems += _check_dataset(e.path, deep)
        else:
            m = read_manifest_of(e.path)
            stale = stale_parents(m) if m else []
            if stale:
                e.status = "stale"
                e.problems.append(f"changed since made: {', '.join(stale)}")
            if m is not None:
                e.problems += m.content_problems(deep)
            if not e.problems:
                if e.path.suffix == ".h5":
                    e.problems += _check_h5(e.path)
                elif e.path.suffix == ".zarr":
                    e.problems += _check_zarr(e.path)
                elif e.kind.startswith("index/"):
                    from refground.retrieval.store import index_problems

                    e.problems += index_problems(e.path)
        if e.problems and e.status == "complete":
            e.status = "damaged"
    return entries
