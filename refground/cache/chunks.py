"""Resumable, shardable work on an artifact: fixed chunks of images, each committed atomically.

A long step (extraction) splits the dataset's images into fixed chunks (chunk ``k`` covers image rows
``[k * size, (k + 1) * size)``) and commits each finished chunk to ``<artifact>.partial/`` as one ``.npz``
file written under a temporary name and renamed. So:

- an interrupted run resumes at the first missing chunk and loses at most one chunk of work;
- the chunks, and therefore the final artifact, do not depend on where a run was interrupted or how the
  work was split: ``--shard K/N`` runs a contiguous block of chunks, N such runs (processes or machines
  writing into the same ``.partial`` folder, or folders copied together) fill disjoint chunks, and the
  final step assembles them;
- a ``.partial`` folder made for other inputs (another fingerprint) is discarded, never mixed in.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refground.errors import ArtifactError, UsageError

PARTIAL_SUFFIX = ".partial"
_CHUNK_RE = re.compile(r"^chunk-(\d{6})\.npz$")


def partial_dir(artifact: str | Path) -> Path:
    """``<artifact>.partial``: where the committed chunks of an unfinished artifact live."""
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + PARTIAL_SUFFIX)


def discard_partial(artifact: str | Path) -> None:
    """Delete the ``.partial`` folder of ``artifact`` (a forced run starts from scratch)."""
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

    def __str__(self) -> str:
        return f"{self.index + 1}/{self.count}"


class ChunkedJob:
    """The ``.partial`` folder of one artifact: which chunks are done, and their arrays.

    ``num_items`` items (image rows) in chunks of ``chunk_size``; ``fingerprint`` identifies the inputs
    (a folder holding another fingerprint is wiped on open).
    """

    def __init__(self, artifact: Path, fingerprint: str, num_items: int, chunk_size: int):
        self.artifact = Path(artifact)
        self.dir = partial_dir(self.artifact)
        self.fingerprint = fingerprint
        self.num_items = int(num_items)
        self.chunk_size = max(1, int(chunk_size))
        self.num_chunks = -(-self.num_items // self.chunk_size)
        job = {"fingerprint": fingerprint, "num_items": self.num_items, "chunk_size": self.chunk_size}
        meta = self.dir / "job.json"
        if self.dir.exists():
            try:
                same = json.loads(meta.read_text()) == job
            except (OSError, ValueError):
                same = False
            if not same:
                shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        if not meta.exists():
            tmp = self.dir / f".job.json.tmp-{uuid.uuid4().hex[:8]}"
            tmp.write_text(json.dumps(job, sort_keys=True))
            os.replace(tmp, meta)

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
        """Indices of committed chunks."""
        out = set()
        for p in self.dir.iterdir():
            m = _CHUNK_RE.match(p.name)
            if m:
                out.add(int(m.group(1)))
        return out

    def todo(self, shard: Shard = Shard()) -> list[int]:
        """Chunks of ``shard`` still to compute, in order."""
        done = self.done()
        return [k for k in self.shard_chunks(shard) if k not in done]

    def missing(self) -> list[int]:
        done = self.done()
        return [k for k in range(self.num_chunks) if k not in done]

    def save(self, k: int, arrays: dict[str, np.ndarray]) -> None:
        """Commit chunk ``k`` (temporary name, then rename: a killed run leaves no half chunk)."""
        final = self.chunk_path(k)
        tmp = self.dir / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                tmp.unlink()

    def load(self, k: int) -> np.lib.npyio.NpzFile:
        """The arrays of committed chunk ``k`` (lazy per key)."""
        try:
            return np.load(self.chunk_path(k), allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{self.chunk_path(k)}: unreadable chunk ({exc}); delete it and re-run") from None

    def chunks(self) -> Iterator[np.lib.npyio.NpzFile]:
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
    """(done, total) chunks of an artifact's ``.partial`` folder, or None when there is none."""
    d = partial_dir(artifact)
    try:
        job = json.loads((d / "job.json").read_text())
    except (OSError, ValueError):
        return None
    total = -(-int(job["num_items"]) // max(1, int(job["chunk_size"])))
    done = sum(1 for p in d.iterdir() if _CHUNK_RE.match(p.name))
    return done, total
