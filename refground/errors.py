"""Errors that reach the user as one clear line (the CLI prints ``error: <message>`` and exits non-zero).

Library code raises these for anything a user can fix: missing or malformed files, unknown split names,
empty queries, boxes outside the image, stale or half-written artifacts. Anything else is a bug and the
CLI says so (with the traceback under ``--debug``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any


class RefgroundError(Exception):
    """Base class for user-facing errors. ``str(err)`` is the whole message: one line, names the file."""

    exit_code = 2


class DataError(RefgroundError):
    """An input file or annotation is missing, malformed or inconsistent."""


class ArtifactError(RefgroundError):
    """A cached artifact is missing, incomplete or stale; the message names the step to re-run."""


class UsageError(RefgroundError):
    """An option value is invalid (unknown split, bad range, empty query)."""


def check_choice(name: str, value: Any, choices: Collection[Any]) -> None:
    """UsageError unless ``value`` is one of ``choices`` (a config field naming one of a few options)."""
    if value not in choices:
        raise UsageError(f"{name} must be one of {choices}, got {value!r}")


def check_known_fields(cls: type, d: Mapping[str, Any], what: str) -> None:
    """UsageError naming the keys of ``d`` that are not fields of the dataclass ``cls`` (``what``: e.g.
    "CMRIN config")."""
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise UsageError(f"unknown {what} field(s): {', '.join(unknown)}")


def check_parent_folders(path: Path, option: str) -> None:
    """UsageError when the nearest existing ancestor of ``path`` is a file, not a folder (``path`` could never be
    written there); ``option`` names the option that gave it (``--out``, ``--out-dir``)."""
    for parent in Path(path).parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{path}: {parent} is a file, not a folder; choose another {option}")
            return
