"""Helpers shared by the format readers and writers: image copying, export-target checks, file fingerprints,
text decoding, the clip tolerance."""

from __future__ import annotations

import codecs
import filecmp
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from refground.data.model import Dataset
from refground.errors import DataError, UsageError, check_parent_folders

# Real annotation tools leave boxes a fraction of a pixel past the border (float rounding in COCO
# polygons); up to this many pixels outside the image a box is clipped to the image (and counted),
# beyond it the box is an error.
CLIP_TOLERANCE = 1.0

# What an export refusal tells the user to do (the CLI option names).
FORCE_HINT = ("pass --force to write over it (only the files export writes are replaced; every other file is "
              "kept) or choose another --out-dir")


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


# ------------------------------------------------------------------------------------------ export targets
def check_out_root(out_root: Path) -> Path:
    """``out_root`` if it is a folder or can be made one, else a one-line :class:`UsageError` (an existing
    file there, or a file where one of its parent folders should be)."""
    out_root = Path(out_root)
    if out_root.exists() and not out_root.is_dir():
        raise UsageError(f"{out_root}: exists and is not a folder; --out-dir must name a folder (new or existing)")
    check_parent_folders(out_root, "--out-dir")
    return out_root


def _safe_relative(file: str, ds: Dataset) -> PurePosixPath:
    """An image's relative file name, refused when it would land outside the export's image folder."""
    rel = PurePosixPath(file.replace("\\", "/"))
    if not file or rel.is_absolute() or ".." in rel.parts or Path(file).is_absolute():
        raise DataError(f"dataset {ds.name}: image file name {file!r} is not a relative path inside the image "
                        "folder; it cannot be exported")
    return rel


def _same_content(src: Path, dst: Path) -> bool:
    """Whether ``dst`` holds ``src``'s bytes. A copy we made (``copy2``) has the source's size and mtime, so
    a re-export compares two stats, not the bytes of every image."""
    s, d = src.stat(), dst.stat()
    if s.st_size != d.st_size:
        return False
    if s.st_mtime_ns == d.st_mtime_ns:
        return True
    return filecmp.cmp(src, dst, shallow=False)


class ImagePlan:
    """Which image files of ``ds`` an export copies into ``dest`` (see :func:`plan_images`).

    ``copy``: ``(src, dst)`` pairs to write; ``current``: files already there with the same content;
    ``missing``: images whose source file does not exist; ``collision``: the first ``dst`` holding other
    bytes than its source (None if none); ``blocked``: the first ``dst`` that is not a regular file (a
    folder), which even ``force`` does not remove.
    """

    def __init__(self) -> None:
        self.copy: list[tuple[Path, Path]] = []
        self.current = 0
        self.missing = 0
        self.collision: Path | None = None
        self.blocked: Path | None = None


def plan_images(ds: Dataset, dest: Path) -> ImagePlan:
    """Check every image file of ``ds`` against ``dest`` before anything is written.

    A file in ``dest`` that is a hard link to its source (exports before copies were the rule) is planned
    for replacement by a copy, so editing the export can no longer edit the cache.
    """
    root = ds.meta.get("image_root")
    plan = ImagePlan()
    if Path(dest).exists() and not Path(dest).is_dir():
        plan.blocked = Path(dest)
        return plan
    for file in ds.image_files:
        rel = _safe_relative(file, ds)
        src = Path(root) / file if root else None
        if src is None or not src.is_file():
            plan.missing += 1
            continue
        dst = Path(dest).joinpath(*rel.parts)
        parent = next((Path(dest).joinpath(*rel.parts[:k]) for k in range(1, len(rel.parts))
                       if Path(dest).joinpath(*rel.parts[:k]).is_file()), None)
        if parent is not None:  # a file where the image's sub-folder belongs
            plan.blocked = plan.blocked or parent
            continue
        if dst.is_symlink():  # not something export writes; replacing it replaces the link, not its target
            plan.collision = plan.collision or dst
        elif dst.exists() and not dst.is_file():
            plan.blocked = plan.blocked or dst
            continue
        elif dst.exists() and not os.path.samefile(src, dst):
            if _same_content(src, dst):
                plan.current += 1
                continue
            plan.collision = plan.collision or dst
        plan.copy.append((src, dst))
    return plan


def check_images(plan: ImagePlan, force: bool) -> None:
    """A one-line :class:`UsageError` for a planned image copy that would destroy a file that is not ours."""
    if plan.blocked is not None:
        raise UsageError(f"{plan.blocked}: is in the way of an exported image file (not a file); move it away or "
                         "choose another --out-dir")
    if plan.collision is not None and not force:
        raise UsageError(f"{plan.collision}: exists with other content than the dataset's image of that name; "
                         + FORCE_HINT)


def copy_images(ds: Dataset, dest: Path, force: bool = False, plan: ImagePlan | None = None) -> tuple[int, int]:
    """Copy every image file of ``ds`` into ``dest`` keeping its relative file name.

    Copies, never hard links: an exported file is the user's to edit, and a link would edit the cache too.
    Files already there with the same content are left alone; another file of the same name is a
    :class:`UsageError` unless ``force`` (then it is replaced; nothing else in ``dest`` is touched).
    Returns ``(copied, missing)``: ``copied`` counts the image files now in ``dest`` (written or already
    current), ``missing`` the images whose source file does not exist (e.g. a synthetic dataset generated
    without PNGs).
    """
    plan = plan or plan_images(ds, dest)
    check_images(plan, force)
    Path(dest).mkdir(parents=True, exist_ok=True)  # always there, so it can be given to an importer
    for src, dst in plan.copy:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            shutil.copy2(src, tmp)  # copy2 keeps the mtime: a re-export then sees the file is current
            os.replace(tmp, dst)
        finally:
            if tmp.exists():
                tmp.unlink()
    return len(plan.copy) + plan.current, plan.missing


# ------------------------------------------------------------------------------------------ reading
def missing_image_files(image_root: Path, files: Iterable[str]) -> tuple[int, str | None]:
    """``(count, first)``: how many of ``files`` (relative names) do not exist under ``image_root``, and the
    first of them (None when all exist). An import stores image paths without reading the images, so this
    is the only place a wrong ``--images`` folder shows before extraction."""
    count, first = 0, None
    root = Path(image_root)
    for f in files:
        if not (root / f).is_file():
            count += 1
            first = first if first is not None else f
    return count, first


def decode_text(data: bytes) -> tuple[str, bool, int]:
    """``(text, had_bom, latin1_lines)``: ``data`` as UTF-8, a leading byte-order mark dropped.

    A line that is not valid UTF-8 is decoded as latin-1 (every byte is a character, so nothing is lost or
    replaced) and counted: old annotation files were often written in latin-1.
    """
    bom = data.startswith(codecs.BOM_UTF8)
    if bom:
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8"), bom, 0
    except UnicodeDecodeError:
        pass
    lines, latin1 = [], 0
    for chunk in data.split(b"\n"):
        try:
            lines.append(chunk.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(chunk.decode("latin-1"))
            latin1 += 1
    return "\n".join(lines), bom, latin1


def read_text(path: Path, what: str = "file", counts: Counter | None = None) -> str:
    """Text of ``path`` (see :func:`decode_text`) or a one-line :class:`DataError`.

    ``counts`` (optional) is increased by ``bom_files``, ``latin1_files`` and ``latin1_lines``.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected a {what}") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    text, bom, latin1 = decode_text(data)
    if counts is not None:
        counts["bom_files"] += int(bom)
        counts["latin1_files"] += int(latin1 > 0)
        counts["latin1_lines"] += latin1
    return text
