"""Resumable, shardable work on an artifact: fixed chunks of images, each committed atomically.

A long step (extraction) splits the dataset's images into fixed chunks (chunk ``k`` covers image rows
``[k * size, (k + 1) * size)``) and commits each finished chunk to ``<artifact>.partial/`` as one ``.npz``
file written under a temporary name and renamed. So:

- an interrupted run resumes at the first missing chunk and loses at most one chunk of work;
- the chunks, and therefore the final artifact, do not depend on where a run was interrupted or how the
  work was split: ``--shard K/N`` runs a contiguous block of chunks, N such runs (processes or machines
  writing into the same ``.partial`` folder, or folders copied together) fill disjoint chunks, and the
  final step assembles them;
- a ``.partial`` folder made for other inputs (another fingerprint) is discarded, never mixed in, but never
  while a live process is filling it (:func:`shard_lock`);
- a committed chunk that cannot be read back (cut short by a full disk or a copy, or missing arrays) is
  not done: it is deleted with a warning and computed again (:meth:`ChunkedJob.todo`,
  :meth:`ChunkedJob.missing`);
- a forced run (``--force``) forgets only the chunks of its own shard and marks the job as a forced
  rebuild (``"forced": true`` in ``job.json``), so the other shards' fresh chunks survive and the old
  complete artifact is not taken for current (:func:`rebuild_pending`) until the job is assembled.

Folder layout::

    <artifact>.partial/job.json              {"fingerprint", "num_items", "chunk_size"[, "forced"]}
    <artifact>.partial/chunk-000000.npz ...  one per committed chunk
    <artifact>.partial/.shard-K-of-N.lock    held by the process filling shard K/N (refground.cache.lock)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import uuid
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from refground.errors import ArtifactError, UsageError

PARTIAL_SUFFIX = ".partial"
JOB_FILE = "job.json"
_CHUNK_RE = re.compile(r"^chunk-(\d{6})\.npz$")
_SHARD_LOCK_RE = re.compile(r"^\.shard-(\d+)-of-(\d+)\.lock$")
# What reading a damaged .npz raises: a cut-short zip (BadZipFile, EOFError), a file that is no archive
# (ValueError), an unreadable file (OSError), an array the archive lacks (KeyError).
UNREADABLE = (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError)

log = logging.getLogger(__name__)


def partial_dir(artifact: str | Path) -> Path:
    """``<artifact>.partial``: where the committed chunks of an unfinished artifact live."""
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + PARTIAL_SUFFIX)


def artifact_of(partial: str | Path) -> Path:
    """The artifact a ``.partial`` folder is filling (``x.h5.partial`` -> ``x.h5``, in the same folder, so a
    moved cache assembles where it is now)."""
    partial = Path(partial)
    name = partial.name[:-len(PARTIAL_SUFFIX)] if partial.name.endswith(PARTIAL_SUFFIX) else partial.name
    return partial.with_name(name)


def discard_partial(artifact: str | Path) -> None:
    """Delete the ``.partial`` folder of ``artifact`` (no check for live writers: see :class:`ChunkedJob`)."""
    shutil.rmtree(partial_dir(artifact), ignore_errors=True)


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based index; the CLI spells it ``K/N`` with K in 1..N)."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str | None) -> Shard:
        """``"K/N"`` (1 <= K <= N) -> Shard(K - 1, N); None or "" -> the whole job."""
        if not text:
            return cls()
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not m or not (1 <= int(m.group(1)) <= int(m.group(2))):
            raise UsageError(f"--shard {text!r}: expected K/N with 1 <= K <= N, e.g. 2/4")
        return cls(int(m.group(1)) - 1, int(m.group(2)))

    @property
    def whole(self) -> bool:
        return self.count == 1

    @property
    def lock_name(self) -> str:
        """``shard-K-of-N``: the name whose lock (``.shard-K-of-N.lock`` in the ``.partial`` folder) the
        process filling this shard holds."""
        return f"shard-{self.index + 1}-of-{self.count}"

    def command(self) -> str:
        """How a user started the process filling this shard (for messages)."""
        return "refground extract" + ("" if self.whole else f" --shard {self}")

    def __str__(self) -> str:
        return f"{self.index + 1}/{self.count}"


def live_shards(artifact: str | Path, exclude: Shard | None = None) -> list[Shard]:
    """The shards of ``artifact``'s ``.partial`` folder that a live process (this one included, except for
    ``exclude``) is filling now, by their locks."""
    from refground.cache.lock import is_locked

    d = partial_dir(artifact)
    out = []
    try:
        names = sorted(p.name for p in d.iterdir())
    except OSError:
        return []
    for name in names:
        m = _SHARD_LOCK_RE.match(name)
        if not m:
            continue
        shard = Shard(int(m.group(1)) - 1, int(m.group(2)))
        if shard != exclude and is_locked(d / shard.lock_name):
            out.append(shard)
    return out


@contextlib.contextmanager
def shard_lock(artifact: str | Path, shard: Shard = Shard()) -> Iterator[None]:
    """Hold the lock of ``shard`` of ``artifact``'s job for the block (a whole run is shard 1/1).

    Shards of one split (the same N) run side by side: they fill disjoint chunks. Refused with one line
    (:class:`ArtifactError`, exit 2) when another process fills the same shard, or any shard of another
    split (its chunks overlap this one's: a second unsharded run while one runs, say).
    """
    from refground.cache.lock import artifact_lock, lock_path

    artifact = Path(artifact)
    name = partial_dir(artifact) / shard.lock_name
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(artifact_lock(name))
        except ArtifactError:
            raise ArtifactError(f"{artifact}: another `{shard.command()}` is writing it now (lock "
                                f"{lock_path(name)} held); wait for it to finish") from None
        other = [s for s in live_shards(artifact, exclude=shard) if s.count != shard.count]
        if other:
            split = "" if other[0].whole else f", or run the shards of its split (--shard K/{other[0].count})"
            raise ArtifactError(f"{artifact}: `{other[0].command()}` is writing it now and its chunks overlap "
                                f"`{shard.command()}`'s; wait for it to finish{split}")
        yield


def _read_job(d: Path) -> dict[str, Any] | None:
    try:
        job = json.loads((d / JOB_FILE).read_text())
    except (OSError, ValueError):
        return None
    return job if isinstance(job, dict) else None


def rebuild_pending(artifact: str | Path, fingerprint: str) -> bool:
    """Whether a forced rebuild of ``artifact`` with ``fingerprint`` is under way (some ``--force --shard``
    runs done, others not): then the complete artifact beside it is the old one and no cache hit."""
    job = _read_job(partial_dir(artifact))
    return job is not None and job.get("fingerprint") == fingerprint and bool(job.get("forced"))


class ChunkArrays:
    """The arrays of one committed chunk, read lazily by name like an ``NpzFile``; a read that fails (a
    damaged archive) deletes the chunk and raises a one-line :class:`ArtifactError` naming it."""

    def __init__(self, job: ChunkedJob, k: int, npz: Any):
        self._job, self._k, self._npz = job, k, npz

    def keys(self) -> list[str]:
        return list(self._npz.files)

    def __contains__(self, key: object) -> bool:
        return key in self._npz.files

    def __getitem__(self, key: str) -> np.ndarray:
        try:
            return self._npz[key]
        except UNREADABLE as exc:
            raise self._job.unreadable(self._k, exc) from None

    def close(self) -> None:
        self._npz.close()

    def __enter__(self) -> ChunkArrays:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ChunkedJob:
    """The ``.partial`` folder of one artifact: which chunks are done, and their arrays.

    ``num_items`` items (image rows) in chunks of ``chunk_size``; ``fingerprint`` identifies the inputs
    (a folder holding another fingerprint is emptied on open, unless a live process fills it: then
    :class:`ArtifactError`). ``required``: array names every chunk must hold (a chunk without them is not
    done). ``held``: the shard whose lock this process holds (:func:`shard_lock`), not counted as another
    live writer.
    """

    def __init__(self, artifact: Path, fingerprint: str, num_items: int, chunk_size: int,
                 required: Iterable[str] = (), held: Shard | None = None):
        self.artifact = Path(artifact)
        self.dir = partial_dir(self.artifact)
        self.fingerprint = fingerprint
        self.num_items = int(num_items)
        self.chunk_size = max(1, int(chunk_size))
        self.num_chunks = -(-self.num_items // self.chunk_size)
        self.required = frozenset(required)
        self._valid: set[int] = set()  # chunks checked (or written) by this object
        job = self._identity()
        if self.dir.exists():
            recorded = _read_job(self.dir)
            # Extra keys ("forced") do not make another job; the identity keys do. No record and no chunks:
            # a folder a concurrent shard of this job has just made (its lock first), nothing to discard.
            if (recorded is None and self.done()) or \
                    (recorded is not None and any(recorded.get(key) != v for key, v in job.items())):
                busy = live_shards(self.artifact, exclude=held)
                if busy:
                    raise ArtifactError(f"{self.artifact}: `{busy[0].command()}` is filling it with other inputs "
                                        "or options now; wait for it to finish, then run this again")
                self._clear()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_job(job, replace=False)

    def _identity(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "num_items": self.num_items, "chunk_size": self.chunk_size}

    def _write_job(self, job: dict[str, Any], replace: bool) -> None:
        """Write ``job.json`` atomically; without ``replace`` only where there is none (a link, which fails on an
        existing name: a concurrent shard's ``forced`` mark is never overwritten by a plain record)."""
        meta = self.dir / JOB_FILE
        if not replace and meta.exists():
            return
        tmp = self.dir / f".{JOB_FILE}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            tmp.write_text(json.dumps(job, sort_keys=True))
            if replace:
                os.replace(tmp, meta)
            else:
                with contextlib.suppress(FileExistsError):
                    os.link(tmp, meta)
        finally:
            tmp.unlink(missing_ok=True)

    def _clear(self) -> None:
        """Empty the folder, keeping the lock files (a lock file in use must stay where its holder has it)."""
        for p in self.dir.iterdir():
            if _SHARD_LOCK_RE.match(p.name):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)

    @property
    def forced(self) -> bool:
        """Whether this job is a forced rebuild (see :func:`rebuild_pending`)."""
        job = _read_job(self.dir)
        return bool(job and job.get("forced"))

    def restart(self, shard: Shard = Shard()) -> None:
        """``--force`` for ``shard``: delete its committed chunks (only its own: other shards of the job may
        have just made theirs) and mark the job as a forced rebuild. Call it holding :func:`shard_lock`."""
        for k in self.shard_chunks(shard):
            self.chunk_path(k).unlink(missing_ok=True)
            self._valid.discard(k)
        self._write_job({**self._identity(), "forced": True}, replace=True)

    def chunk_range(self, k: int) -> tuple[int, int]:
        """Item rows ``[start, stop)`` of chunk ``k``."""
        return k * self.chunk_size, min((k + 1) * self.chunk_size, self.num_items)

    def shard_chunks(self, shard: Shard) -> range:
        """The contiguous block of chunk indices of ``shard``."""
        lo = shard.index * self.num_chunks // shard.count
        hi = (shard.index + 1) * self.num_chunks // shard.count
        return range(lo, hi)

    def chunk_path(self, k: int) -> Path:
        return self.dir / f"chunk-{k:06d}.npz"

    def done(self) -> set[int]:
        """Indices of committed chunks (by name; :meth:`todo` and :meth:`missing` also check they read)."""
        out = set()
        for p in self.dir.iterdir():
            m = _CHUNK_RE.match(p.name)
            if m:
                out.add(int(m.group(1)))
        return out

    def problem(self, k: int) -> str | None:
        """Why committed chunk ``k`` cannot be used, or None. Cheap: opens the archive's directory (at its end,
        so a file cut short fails here) and compares the array names with ``required``; the arrays
        themselves are checked (CRC) when read."""
        try:
            z = np.load(self.chunk_path(k), allow_pickle=False)
        except UNREADABLE as exc:
            return f"{type(exc).__name__}: {exc}"
        if not isinstance(z, np.lib.npyio.NpzFile):
            return "not an .npz archive"
        with z:
            names = set(z.files)
        if not names:
            return "no arrays"
        lacking = sorted(self.required - names)
        return f"lacks {', '.join(lacking)}" if lacking else None

    def _usable(self, k: int) -> bool:
        """Whether committed chunk ``k`` reads; a damaged one is deleted with a warning (it is then missing,
        and the run that owns it computes it again)."""
        if k in self._valid:
            return True
        why = self.problem(k)
        if why is None:
            self._valid.add(k)
            return True
        self.discard(k, why)
        return False

    def discard(self, k: int, why: str, warn: bool = True) -> None:
        """Delete damaged chunk ``k`` (with a one-line warning naming it, unless an error will say so)."""
        if warn:
            log.warning("%s: unreadable chunk (%s); deleted, it will be computed again", self.chunk_path(k), why)
        self.chunk_path(k).unlink(missing_ok=True)
        self._valid.discard(k)

    def unreadable(self, k: int, exc: BaseException) -> ArtifactError:
        """Delete chunk ``k``, whose arrays failed to read, and return the one-line error to raise."""
        why = f"{type(exc).__name__}: {exc}"
        self.discard(k, why, warn=False)
        return ArtifactError(f"{self.chunk_path(k)}: unreadable chunk ({why}); deleted it: run `refground extract` "
                             "again with the same options (and --shard, if sharded) to compute it again")

    def todo(self, shard: Shard = Shard()) -> list[int]:
        """Chunks of ``shard`` still to compute, in order (damaged committed chunks included)."""
        done = self.done()
        return [k for k in self.shard_chunks(shard) if not (k in done and self._usable(k))]

    def missing(self) -> list[int]:
        """Chunks not committed, or committed but unreadable (those are deleted), in order."""
        done = self.done()
        return [k for k in range(self.num_chunks) if not (k in done and self._usable(k))]

    def save(self, k: int, arrays: dict[str, np.ndarray]) -> None:
        """Commit chunk ``k`` (temporary name, then rename: a killed run leaves no half chunk)."""
        final = self.chunk_path(k)
        tmp = self.dir / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
            os.replace(tmp, final)
            self._valid.add(k)
        finally:
            if tmp.exists():
                tmp.unlink()

    def load(self, k: int) -> ChunkArrays:
        """The arrays of committed chunk ``k`` (lazy per key). An unreadable chunk is deleted and raises a
        one-line :class:`ArtifactError` (a rerun computes it again)."""
        path = self.chunk_path(k)
        try:
            z = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise ArtifactError(f"{path}: chunk missing; run `refground extract` again with the same options "
                                "(and --shard, if sharded)") from None
        except UNREADABLE as exc:
            raise self.unreadable(k, exc) from None
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise self.unreadable(k, ValueError("not an .npz archive"))
        return ChunkArrays(self, k, z)

    def chunks(self) -> Iterator[ChunkArrays]:
        """Every chunk in order; :class:`ArtifactError` naming the missing shards if any is absent."""
        self.require_all()
        for k in range(self.num_chunks):
            with self.load(k) as z:
                yield z

    def require_all(self, remedy: str = "") -> None:
        missing = self.missing()
        if missing:
            raise ArtifactError(f"{self.dir}: {len(missing)} of {self.num_chunks} chunks missing (first: "
                                f"{missing[0]}); finish the shards" + (f" with `{remedy}`" if remedy else ""))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def partial_progress(artifact: Path) -> tuple[int, int] | None:
    """(done, total) chunks of an artifact's ``.partial`` folder, or None when there is none (done counts
    committed chunk files; they are checked when the job resumes or is assembled)."""
    d = partial_dir(artifact)
    job = _read_job(d)
    if job is None:
        return None
    try:
        total = -(-int(job["num_items"]) // max(1, int(job["chunk_size"])))
    except (KeyError, TypeError, ValueError):
        return None
    done = sum(1 for p in d.iterdir() if _CHUNK_RE.match(p.name))
    return done, total
