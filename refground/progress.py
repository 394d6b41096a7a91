"""Progress hook: the library reports progress through :func:`track`, never by printing.

By default :func:`track` is a plain pass-through; the CLI installs a rich progress bar with
:func:`set_tracker`. Worker processes keep the pass-through.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
Tracker = Callable[[Iterable, "int | None", str], Iterable]

_tracker: Tracker | None = None


def set_tracker(tracker: Tracker | None) -> None:
    """Install ``tracker(iterable, total, description) -> iterable`` (None restores the pass-through)."""
    global _tracker
    _tracker = tracker


def track(iterable: Iterable[T], total: int | None = None, description: str = "") -> Iterator[T]:
    """Iterate over ``iterable`` while reporting progress through the installed tracker."""
    if _tracker is None:
        yield from iterable
    else:
        yield from _tracker(iterable, total, description)
