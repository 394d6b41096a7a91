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

A parent is one of four kinds, each of which can be re-fingerprinted now to tell whether the artifact
went stale since it was made:

- ``dataset``: a dataset folder (fingerprint of its manifest's command, parameters and counts);
- ``artifact``: another artifact (the fingerprint in its manifest);
- ``file``: an input outside the cache (a checkpoint, a model folder, a detections file): sha256 of its
  bytes (a folder: of its files' names and bytes);
- ``run``: a trained run folder used as a model (the built-in detector): sha256 of the files that make its
  outputs, ``config.json`` and ``model.pt`` (:data:`RUN_MODEL_FILES`), so its curve, metrics or a later
  evaluation written beside them do not make what was extracted with it stale.

A parent inside the same cache root is recorded by its path relative to the manifest's folder, so a cache
can be copied or moved as a whole (an input outside the cache keeps its absolute path).

A complete manifest also records the *content* of every file the artifact covers (``files``: relative
name -> size, sampled hash, sha256; computed once when the manifest is written). :func:`is_current` and
:func:`require` compare sizes and sampled hashes (cheap: a few 64 KiB blocks per file), so an edited,
truncated or deleted file is neither a cache hit nor read by a later step; ``refground cache verify
--deep`` re-hashes every byte.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
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


RUN_MODEL_FILES = ("config.json", "model.pt")  # what a "run" parent's fingerprint covers
SAMPLE_BLOCK = 1 << 16
SAMPLE_BLOCKS = 8


def sample_digest(path: str | Path, size: int | None = None) -> str:
    """blake2b hex of a file's size and ``SAMPLE_BLOCKS`` blocks of ``SAMPLE_BLOCK`` bytes at evenly spaced
    offsets (first and last included): all of a file up to 512 KiB, a cheap probe of a larger one (which
    ``verify --deep`` re-hashes whole). Raises OSError when the file cannot be read."""
    path = Path(path)
    size = path.stat().st_size if size is None else size
    h = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as fh:
        if size <= SAMPLE_BLOCK * SAMPLE_BLOCKS:
            h.update(fh.read())
        else:
            last = size - SAMPLE_BLOCK
            for i in range(SAMPLE_BLOCKS):
                fh.seek(last * i // (SAMPLE_BLOCKS - 1))
                h.update(fh.read(SAMPLE_BLOCK))
    return h.hexdigest()


def covered_files(artifact: str | Path) -> dict[str, Path]:
    """The files an artifact covers, by name relative to its manifest's folder: a file artifact itself; every
    file under a folder artifact except hidden ones (locks, staging leftovers), manifests, and what later
    steps put beside a run's own files: artifacts with their own sidecar manifest, anything under
    ``predictions/``, evaluation JSONs (``*.eval-*.json``) and pictures (``*.png``)."""
    artifact = Path(artifact)
    if artifact.is_file():
        return {artifact.name: artifact}
    if not artifact.is_dir():
        return {}
    base = manifest_path(artifact).parent
    out = {}
    for p in sorted(q for q in artifact.rglob("*") if q.is_file()):
        rel = p.relative_to(artifact)
        if any(part.startswith(".") for part in rel.parts) or p.name == "manifest.json" \
                or p.name.endswith(MANIFEST_SUFFIX) or manifest_path(p).exists() or "predictions" in rel.parts[:-1] \
                or ".eval-" in p.name or p.suffix == ".png":
            continue
        out[p.relative_to(base).as_posix()] = p
    return out


def content_record(files: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """``{name: {"size", "sample", "sha256"}}`` of ``files`` (see :func:`sample_digest`)."""
    out = {}
    for name, p in files.items():
        size = p.stat().st_size
        out[name] = {"size": size, "sample": sample_digest(p, size), "sha256": file_digest(p)}
    return out


def content_problems(base: str | Path, record: dict[str, dict[str, Any]], deep: bool = False) -> list[str]:
    """What no longer matches ``record`` (from :func:`content_record`) under ``base``: one entry per file,
    ``"<path>: missing" | "<path>: N bytes, M when made" | "<path>: content changed"``. ``deep`` compares
    the sha256 of every byte instead of the sampled hash."""
    base = Path(base)
    problems = []
    for name, rec in record.items():
        p = base / name
        try:
            size = p.stat().st_size
        except OSError:
            problems.append(f"{p}: missing")
            continue
        if size != rec.get("size"):
            problems.append(f"{p}: {size} bytes, {rec.get('size')} when made")
            continue
        try:
            same = file_digest(p) == rec.get("sha256") if deep else sample_digest(p, size) == rec.get("sample")
        except (OSError, ArtifactError):
            same = False
        if not same:
            problems.append(f"{p}: content changed since it was made")
    return problems


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
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The folder the manifest was read from. ``files`` names resolve against it, and read_manifest_of resolves
    # relative parent paths against it, so ``parents`` always hold usable paths.
    base: str = field(default="", compare=False)

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("base")
        return json.dumps(d, indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any], base: str | Path = "") -> Manifest:
        parents = {k: Parent(**v) for k, v in (d.get("parents") or {}).items()}
        if base:  # relative parent paths (see portable_parents) resolve against the manifest's folder
            for p in parents.values():
                if not Path(p.path).is_absolute():
                    p.path = os.path.normpath(Path(base) / p.path)
        return cls(kind=d["kind"], step=d["step"], params=d.get("params") or {}, parents=parents,
                   fingerprint=d["fingerprint"], complete=bool(d.get("complete")),
                   library_version=d.get("library_version", ""), created=d.get("created", ""),
                   extra=d.get("extra") or {}, files=d.get("files") or {}, base=str(base))


    def content_problems(self, deep: bool = False) -> list[str]:
        """Files of the artifact that are missing or differ from what was recorded when it was made."""
        return content_problems(self.base, self.files, deep) if self.base else []


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
    if kind == "run":
        h = hashlib.sha256()
        for name in RUN_MODEL_FILES:
            h.update(f"{name}\0{file_digest(Path(path) / name)}\n".encode())
        return h.hexdigest()
    raise ValueError(f"unknown parent kind {kind!r}")


def parent_fingerprints(parents: dict[str, Parent]) -> dict[str, str]:
    return {role: p.fingerprint for role, p in parents.items()}


def cache_root_of(path: str | Path) -> Path | None:
    """The cache root above ``path``: the parent of the nearest ancestor folder ``<root>/<dataset>`` that holds
    a ``dataset/`` folder; None when ``path`` is not inside a cache."""
    path = Path(os.path.abspath(path))
    for a in path.parents:
        if (a / "dataset").is_dir() and a.parent != a:
            return a.parent
    return None


def portable_parents(artifact: str | Path, parents: dict[str, Parent]) -> dict[str, Parent]:
    """``parents`` with the path of each one inside ``artifact``'s cache root made relative to the
    manifest's folder (so the cache can be moved or copied); others stay as given."""
    root = cache_root_of(artifact)
    if root is None:
        return dict(parents)
    base = Path(os.path.abspath(manifest_path(artifact).parent))
    out = {}
    for role, p in parents.items():
        full = Path(os.path.abspath(p.path))
        inside = root == full or root in full.parents
        out[role] = Parent(p.kind, os.path.relpath(full, base) if inside else p.path, p.fingerprint)
    return out


def write_manifest(artifact: str | Path, *, step: str, params: dict[str, Any], parents: dict[str, Parent],
                   fingerprint: str, complete: bool = True, extra: dict[str, Any] | None = None,
                   kind: str = "") -> Manifest:
    """Write the manifest of ``artifact`` atomically (write the artifact first: the manifest with
    ``complete`` true is what makes it count, and records the content of every file the artifact covers).
    ``kind`` defaults to the folder the artifact sits in (features, dense, clip, graph, runs...). Parents
    inside the cache are recorded relative to the manifest's folder. Returns the manifest."""
    kind = kind or Path(artifact).parent.name
    files = content_record(covered_files(artifact)) if complete else {}
    m = Manifest(kind=kind, step=step, params=params, parents=portable_parents(artifact, parents),
                 fingerprint=fingerprint, complete=complete,
                 created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), extra=extra or {}, files=files,
                 base=str(manifest_path(artifact).parent))
    with atomic_file(manifest_path(artifact)) as fh:
        fh.write(m.to_json())
    return m


def read_manifest_of(artifact: str | Path) -> Manifest | None:
    """The manifest of ``artifact``, or None when there is none or it is unreadable."""
    p = manifest_path(artifact)
    try:
        return Manifest.from_dict(json.loads(p.read_text()), base=p.parent)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def is_current(artifact: str | Path, expected: str) -> bool:
    """Whether ``artifact`` exists, is complete, has fingerprint ``expected`` and its files are as they were
    made (sizes and sampled hashes), so a step can skip it."""
    m = read_manifest_of(artifact)
    return (m is not None and m.complete and m.fingerprint == expected and Path(artifact).exists()
            and not m.content_problems())


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
    damaged = m.content_problems()
    if damaged:
        more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
        raise ArtifactError(f"{damaged[0]}{more}{hint}" + ("" if remedy else f" (`{m.step}`)"))
    if check_parents:
        stale = stale_parents(m)
        if stale:
            raise ArtifactError(f"{artifact}: stale (its {', '.join(stale)} changed since it was made){hint}")
    return m
