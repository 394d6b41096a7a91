"""Write-then-rename helpers: nothing half-written is ever left where a later step would read it."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(final: Path, lock: bool = True) -> Iterator[Path]:
    """Yield a fresh staging folder next to ``final``; on success it replaces ``final`` in one rename.

    The writer's lock of ``final`` (:func:`refground.cache.lock.artifact_lock`) is held throughout, so a
    second writer is refused and ``cache verify --sweep`` leaves the staging folder alone. On an exception
    (SIGINT and SIGTERM included: the CLI turns both into one) the staging folder is removed and ``final``
    is left as it was. A kill between the two renames leaves the old copy as ``.NAME.old-*`` with no
    ``final``; ``cache verify --sweep`` puts it back. ``lock=False`` (a folder outside the cache, such as an
    export, where a lock file would be litter) skips the lock.
    """
    from refground.cache.lock import artifact_lock

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with artifact_lock(final) if lock else contextlib.nullcontext():
        stage = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
        stage.mkdir()
        try:
            yield stage
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(final, old)
        os.replace(stage, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(final: Path, mode: str = "w", **kwargs) -> Iterator:
    """Open a temporary file next to ``final`` for writing; rename it over ``final`` on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, mode, **kwargs) as fh:
            yield fh
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
