"""Console output for the CLI: tables and messages on stdout/stderr, rich progress bars, JSON output."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from refground import progress
from refground.atomic import atomic_file

err = Console(stderr=True, highlight=False, soft_wrap=True)


def out() -> Console:
    """A stdout console created per call, so test harnesses that swap sys.stdout see the output.

    Piped output (logs, CI) gets 140 columns instead of rich's 80 so wide tables stay readable."""
    console = Console(highlight=False, soft_wrap=True)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(highlight=False, soft_wrap=True, width=140)
    return console


def _rich_tracker(iterable: Iterable, total: int | None, description: str) -> Iterable:
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=err, transient=False, disable=not err.is_terminal) as bar:
        task = bar.add_task(description or "working", total=total)
        for item in iterable:
            yield item
            bar.advance(task)


def install_progress() -> None:
    """Route the library's progress reports to rich bars on stderr (only drawn on a terminal)."""
    progress.set_tracker(_rich_tracker)


def info(message: str) -> None:
    """A status line on stderr (stdout stays clean for --json)."""
    sys.stdout.flush()  # keep the order of the two streams when both go to one pipe
    err.print(message)


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    """A rich table; floats are shown with 4 significant decimals."""
    t = Table(title=title)
    for c in columns:
        t.add_column(str(c), justify="right" if c not in ("name", "split", "kind", "metric") else "left")
    for r in rows:
        t.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in r])
    return t


def emit(result: dict[str, Any], as_json: bool, tables: Sequence[Table] = (), json_path: Path | None = None) -> None:
    """Print ``tables`` (or, with ``--json``, ``result`` as one JSON object) and write ``json_path``."""
    if json_path is not None:
        with atomic_file(Path(json_path)) as fh:
            json.dump(result, fh, indent=2, sort_keys=True)
    if as_json:
        print(json.dumps(result, sort_keys=True))
    else:
        console = out()
        for t in tables:
            console.print(t)
        if json_path is not None:
            info(f"wrote {json_path}")
