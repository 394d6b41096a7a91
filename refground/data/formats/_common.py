"""Helpers shared by the format readers and writers: image copying, file fingerprints, the clip tolerance."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from refground.data.model import Dataset
from refground.errors import DataError, UsageError

# Real annotation tools leave boxes a fraction of a pixel past the border (float rounding in COCO
# polygons); up to this many pixels outside the image a box is clipped to the image (and counted),
# beyond it the box is an error.
CLIP_TOLERANCE = 1.0


def check_name(value: str, what: str) -> str:
    """A file-name component (no separators, not empty, not a dot name) or :class:`UsageError`."""
    if not value or value in (".", "..") or "/" in value or "\\" in value or "\0" in value:
        raise UsageError(f"invalid {what} {value!r}: expected a plain file-name component")
    return value


def file_fingerprint(*paths: Path) -> list[list[Any]]:
    """``[[path, size, mtime_ns], ...]`` of input files, so a re-import notices changed inputs."""
    out = []
    for p in paths:
        try:
            st = Path(p).stat()
            out.append([str(p), st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([str(p), -1, -1])
    return out


def copy_images(ds: Dataset, dest: Path) -> tuple[int, int]:
    """Hard-link (or copy) every image file of ``ds`` into ``dest`` keeping its relative file name.

    Files already there with the same size are left alone. Returns ``(copied, missing)``; missing counts
    images whose source file does not exist (e.g. a synthetic dataset generated without PNGs).
    """
    root = ds.meta.get("image_root")
    Path(dest).mkdir(parents=True, exist_ok=True)  # always there, so it can be given to an importer
    copied = missing = 0
    for file in ds.image_files:
        src = Path(root) / file if root else None
        if src is None or not src.is_file():
            missing += 1
            continue
        dst = Path(dest) / file
        if dst.is_file() and dst.stat().st_size == src.stat().st_size:
            copied += 1
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            try:
                os.link(src, tmp)
            except OSError:  # another file system, or links not allowed: copy instead
                shutil.copy2(src, tmp)
            os.replace(tmp, dst)
        finally:
            if tmp.exists():
                tmp.unlink()
        copied += 1
    return copied, missing


def read_text(path: Path, what: str = "file") -> str:
    """Text of ``path`` (UTF-8, replacing undecodable bytes) or a one-line :class:`DataError`."""
    try:
        return Path(path).read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
