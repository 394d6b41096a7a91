"""Manifests and chained fingerprints: how a step knows whether its artifact is current.

Every artifact (an HDF5 file, a zarr folder, a run folder) carries a manifest, a small JSON file:

- for a file ``features/x.h5`` the sidecar ``features/x.h5.manifest.json``;
- for a ``.zarr`` store likewise ``dense/x.zarr.manifest.json``;
- for a plain folder (``runs/cmrin/default``) the file ``manifest.json`` inside it.

The manifest records the producing step and its parameters, its *parents* (what it was computed from,
each with the fingerprint it had then), the library version, the creation time and a complete flag. The
artifact's own fingerprint hashes the step, its parameters and its parents' fingerprints, so a change
anywhere upstream gives a new fingerprint: staleness is a cache miss, never a silent reuse (the
huggingface ``datasets`` scheme).

A parent is one of three kinds, each of which can be re-fingerprinted now to tell whether the artifact
went stale since it was made:

- ``dataset``: a dataset folder (fingerprint of its manifest's command, parameters and counts);
- ``artifact``: another artifact (the fingerprint in its manifest);
- ``file``: an input outside the cache (a checkpoint, a model folder, a detections file): sha256 of its
  bytes (a folder: of its files' names and bytes).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from refground import __version__
from refground.atomic import atomic_file
from refground.errors import ArtifactError

MANIFEST_SUFFIX = ".manifest.json"


def _canonical(obj: Any) -> str:
    """Canonical JSON (sorted keys, no spaces); floats by repr so 0.1 stays 0.1."""

    def norm(x: Any) -> Any:
        if isinstance(x, dict):
            return {str(k): norm(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [norm(v) for v in x]
        if isinstance(x, Path):
            return str(x)
        if isinstance(x, float) and not math.isfinite(x):
            return repr(x)
        return x

    return json.dumps(norm(obj), sort_keys=True, separators=(",", ":"))


def fingerprint(step: str, params: dict[str, Any], parents: dict[str, str]) -> str:
    """sha256 hex of ``step`` (name@version), ``params`` and the parents' fingerprints (role -> fp)."""
    return hashlib.sha256(_canonical({"step": step, "params": params, "parents": parents}).encode()).hexdigest()


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 hex of a file's bytes; of a folder: of its (relative name, file digest) pairs, hidden names
    skipped. Raises :class:`ArtifactError` if ``path`` does not exist."""
    path = Path(path)
    if path.is_dir():
        h = hashlib.sha256()
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            rel = p.relative_to(path)
            if any(part.startswith(".") for part in rel.parts):
                continue
            h.update(f"{rel.as_posix()}\0{file_digest(p)}\n".encode())
        return h.hexdigest()
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing input file") from None
    return h.hexdigest()


def dataset_fingerprint(ds_dir: str | Path) -> str:
    """Fingerprint of a dataset folder: its producing command, parameters and counts (the annotations
    are a deterministic function of them). Raises :class:`ArtifactError` for a missing/incomplete one."""
    from refground.data.store import read_manifest

    m = read_manifest(Path(ds_dir))
    return fingerprint("dataset", {k: m.get(k) for k in ("command", "params", "counts", "format_version")}, {})


def manifest_path(artifact: str | Path) -> Path:
    """Where the manifest of ``artifact`` lives: ``manifest.json`` inside a plain folder (a run), a
    sidecar ``<name>.manifest.json`` beside anything with a suffix (``.h5`` files, ``.zarr`` stores, which
    must hold nothing but zarr's own files)."""
    artifact = Path(artifact)
    if artifact.suffix == "":
        return artifact / "manifest.json"
    return artifact.with_name(artifact.name + MANIFEST_SUFFIX)


@dataclass
class Parent:
    """One input of an artifact. ``kind``: dataset | artifact | file; ``path``: where it lives (absolute or
    relative to the cache root of the artifact); ``fingerprint``: its fingerprint when the artifact was
    made."""

    kind: str
    path: str
    fingerprint: str


@dataclass
class Manifest:
    """The JSON record beside every artifact (see the module docstring)."""

    kind: str
    step: str
    params: dict[str, Any]
    parents: dict[str, Parent]
    fingerprint: str
    complete: bool = True
    library_version: str = __version__
    created: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        d = asdict(self)
        return json.dumps(d, indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        parents = {k: Parent(**v) for k, v in (d.get("parents") or {}).items()}
        return cls(kind=d["kind"], step=d["step"], params=d.get("params") or {}, parents=parents,
                   fingerprint=d["fingerprint"], complete=bool(d.get("complete")),
                   library_version=d.get("library_version", ""), created=d.get("created", ""),
                   extra=d.get("extra") or {})


def parent(kind: str, path: str | Path) -> Parent:
    """A :class:`Parent` of ``path`` with its current fingerprint."""
    return Parent(kind, str(path), current_fingerprint(kind, path))


def current_fingerprint(kind: str, path: str | Path) -> str:
    """The fingerprint ``path`` has now (see the module docstring for the kinds)."""
    if kind == "dataset":
        return dataset_fingerprint(path)
    if kind == "artifact":
        return require(path).fingerprint
    if kind == "file":
        return file_digest(path)
    raise ValueError(f"unknown parent kind {kind!r}")


def parent_fingerprints(parents: dict[str, Parent]) -> dict[str, str]:
    return {role: p.fingerprint for role, p in parents.items()}


def write_manifest(artifact: str | Path, *, step: str, params: dict[str, Any], parents: dict[str, Parent],
                   fingerprint: str, complete: bool = True, extra: dict[str, Any] | None = None,
                   kind: str = "") -> Manifest:
    """Write the manifest of ``artifact`` atomically (write the artifact first: the manifest with
    ``complete`` true is what makes it count). ``kind`` defaults to the folder the artifact sits in
    (features, dense, clip, graph, runs...). Returns the manifest."""
    kind = kind or Path(artifact).parent.name
    m = Manifest(kind=kind, step=step, params=params, parents=parents, fingerprint=fingerprint,
                 complete=complete, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 extra=extra or {})
    with atomic_file(manifest_path(artifact)) as fh:
        fh.write(m.to_json())
    return m


def read_manifest_of(artifact: str | Path) -> Manifest | None:
    """The manifest of ``artifact``, or None when there is none or it is unreadable."""
    p = manifest_path(artifact)
    try:
        return Manifest.from_dict(json.loads(p.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_current(artifact: str | Path, expected: str) -> bool:
    """Whether ``artifact`` exists, is complete and has fingerprint ``expected`` (so a step can skip)."""
    m = read_manifest_of(artifact)
    return m is not None and m.complete and m.fingerprint == expected and Path(artifact).exists()


def current_extra(artifact: str | Path, expected: str, force: bool = False) -> dict[str, Any] | None:
    """The manifest's ``extra`` figures of an artifact that is complete with fingerprint ``expected`` (a cache
    hit: ``{}`` when it recorded none), else None: the artifact must be (re)written. ``force`` never hits."""
    if force or not is_current(artifact, expected):
        return None
    m = read_manifest_of(artifact)
    return dict(m.extra) if m and m.extra else {}


def stale_parents(m: Manifest) -> list[str]:
    """Roles of the parents of ``m`` whose fingerprint changed (or that vanished) since it was made."""
    out = []
    for role, p in m.parents.items():
        try:
            now = current_fingerprint(p.kind, p.path)
        except ArtifactError:
            now = None
        if now != p.fingerprint:
            out.append(role)
    return out


def require(artifact: str | Path, remedy: str = "", check_parents: bool = False) -> Manifest:
    """The manifest of a complete ``artifact``; :class:`ArtifactError` naming ``remedy`` (the command to
    run) when it is missing, half-written or (with ``check_parents``) stale."""
    artifact = Path(artifact)
    hint = f"; run `{remedy}`" if remedy else "; re-run the step that made it"
    m = read_manifest_of(artifact)
    if m is None or not artifact.exists():
        from refground.cache.chunks import partial_dir

        state = "half-written (interrupted)" if partial_dir(artifact).exists() else "missing"
        raise ArtifactError(f"{artifact}: {state}{hint}")
    if not m.complete:
        raise ArtifactError(f"{artifact}: incomplete{hint}")
    if check_parents:
        stale = stale_parents(m)
        if stale:
            raise ArtifactError(f"{artifact}: stale (its {', '.join(stale)} changed since it was made){hint}")
    return m
