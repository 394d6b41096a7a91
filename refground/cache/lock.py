"""One writer per artifact: an OS file lock (the ``filelock`` package) beside each artifact.

Every step that writes an artifact (a dataset folder, an HDF5 file, a zarr store, a run folder, an export
folder) holds :func:`artifact_lock` of it from its first write to its last rename. So

- a second process that would write the same artifact (the same command run twice, or with other
  parameters) is refused with one line instead of racing it (last writer wins, silently);
- ``refground cache verify --sweep`` can tell a leftover of a killed process (its lock is free: the OS
  released it with the process) from the working folder of a live one (its lock is held), and leaves the
  latter alone.

The lock file is ``.<name>.lock`` beside the artifact (hidden, so listings and folder digests skip it).
Locks are re-entrant within a process (one lock object per path), so a step may hold the lock of its
artifact while a helper it calls (:func:`refground.atomic.atomic_dir`, ``write_h5``) takes it again.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from refground.errors import ArtifactError

LOCK_SUFFIX = ".lock"
_LOCKS: dict[str, FileLock] = {}
_GUARD = threading.Lock()


def lock_path(artifact: str | Path) -> Path:
    """``<parent>/.<name>.lock``: the lock file of ``artifact``."""
    artifact = Path(artifact)
    return artifact.with_name(f".{artifact.name}{LOCK_SUFFIX}")


def _lock_of(artifact: str | Path) -> FileLock:
    p = lock_path(Path(artifact).absolute())
    with _GUARD:
        lock = _LOCKS.get(str(p))
        if lock is None:
            lock = _LOCKS[str(p)] = FileLock(str(p))
    return lock


@contextlib.contextmanager
def artifact_lock(artifact: str | Path) -> Iterator[None]:
    """Hold the writer's lock of ``artifact`` for the block; a one-line :class:`ArtifactError` (exit 2) when
    another process holds it. Never waits: the other writer may run for hours."""
    artifact = Path(artifact)
    artifact.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock_of(artifact)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ArtifactError(f"{artifact}: another process is writing it now (lock {lock_path(artifact)} held); "
                            "wait for it to finish, or write elsewhere (another --run or --cache)") from None
    try:
        yield
    finally:
        lock.release()


def is_locked(artifact: str | Path) -> bool:
    """Whether a live process (this one included) holds the writer's lock of ``artifact``."""
    p = lock_path(Path(artifact).absolute())
    if not p.exists():
        return False
    own = _LOCKS.get(str(p))
    if own is not None and own.is_locked:
        return True
    probe = FileLock(str(p))
    try:
        probe.acquire(timeout=0)
    except Timeout:
        return True
    probe.release()
    return False


__all__ = ["LOCK_SUFFIX", "artifact_lock", "is_locked", "lock_path"]


def claim_current(locks: contextlib.ExitStack, jobs: list[tuple[Path, dict]], step: str, parent_fps: dict,
                  force: bool = False) -> list[tuple[str, dict | None]]:
    """For each ``(artifact path, params)`` of ``jobs``: hold its writer lock in ``locks`` (for the caller's whole
    block, so the check and the write are one), compute its fingerprint (``step``, ``params``, the parents'
    fingerprints) and look for a current copy. Returns ``(fingerprint, manifest extra of a cache hit or None)``
    per job, in order: None means the artifact must be (re)written (``force`` never hits)."""
    from refground.cache.manifest import current_extra, fingerprint

    out: list[tuple[str, dict | None]] = []
    for path, params in jobs:
        locks.enter_context(artifact_lock(Path(path)))
        fp = fingerprint(step, params, parent_fps)
        out.append((fp, current_extra(path, fp, force)))
    return out
