"""Console output for the CLI: tables and messages on stdout/stderr, rich progress bars, JSON output."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from refground import progress
from refground.atomic import atomic_file
from refground.errors import UsageError, check_parent_folders
from refground.tables import TableData, format_table

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


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]],
          kinds: Sequence[str | None] | None = None) -> Table:
    """A rich table; each value is shown by its column's kind (``refground.tables``: given in ``kinds``,
    else inferred from the column's name), text left-aligned and numbers right-aligned."""
    f = format_table(TableData(title, list(columns), [list(r) for r in rows], list(kinds) if kinds else None))
    t = Table(title=f.title)
    for name, unit, right in zip(f.headers, f.units, f.right):
        # The unit on a line of its own: the columns stay as narrow as their names.
        t.add_column(Text(f"{name}\n({unit})" if unit else name), justify="right" if right else "left",
                     vertical="bottom")
    for r in f.rows:
        t.add_row(*[Text(c) for c in r])  # Text: a "[...]" in a path or a name is no rich markup
    return t


def _dump_json(result: dict[str, Any]) -> str:
    """How :func:`emit` writes a JSON file (and how :func:`is_emitted_json` recognises one)."""
    return json.dumps(result, indent=2, sort_keys=True)


# A figures file is small; anything much bigger at an --out path is some other file.
_MAX_EMITTED_BYTES = 64 << 20


def is_emitted_json(path: Path) -> bool:
    """Whether ``path`` is a JSON file :func:`emit` wrote: a JSON object whose text is exactly its own
    re-serialisation (2-space indent, sorted keys). Other files -- a user's notes, a run's config.json, a
    predictions file -- fail this test, so ``--out`` never overwrites them by accident."""
    try:
        if Path(path).stat().st_size > _MAX_EMITTED_BYTES:
            return False
        text = Path(path).read_text(encoding="utf-8")
        obj = json.loads(text)
    except (OSError, ValueError):
        return False
    return isinstance(obj, dict) and _dump_json(obj) == text


def is_png(path: Path) -> bool:
    """Whether ``path`` starts with the PNG signature (a picture ``show`` may overwrite)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(8) == b"\x89PNG\r\n\x1a\n"
    except OSError:
        return False


def check_out_file(path: Path, *, inputs: Sequence[Path | None] = (), ours: Callable[[Path], bool] = is_emitted_json,
                   force: bool | None = None, suffixes: Sequence[str] = (), option: str = "--out") -> Path:
    """``path`` if a command may write its output file there, else a one-line :class:`UsageError` (exit 2).

    Refused: an existing folder (or a file where a parent folder belongs); a suffix not in ``suffixes``
    (when given); any of ``inputs``, the files the command reads (compared by identity, so symlinks and
    hard links count; ``force`` does not change this); and an existing file that ``ours`` does not
    recognise as an earlier output of the same kind, unless ``force`` (None: the command has no --force,
    the user must delete the file or choose another path).
    """
    path = Path(path)
    if path.is_dir():
        example = path / ("out" + (suffixes[0] if suffixes else ".json"))
        raise UsageError(f"{path}: is a folder; {option} must name a file (e.g. {example})")
    check_parent_folders(path, option)
    if suffixes and path.suffix.lower() not in suffixes:
        raise UsageError(f"{path}: {option} must end in {' or '.join(suffixes)} (this command writes only that)")
    if not (path.exists() or path.is_symlink()):
        return path
    for src in inputs:
        if src is None:
            continue
        same = Path(src).exists() and path.exists() and os.path.samefile(path, src)
        if same or path.resolve() == Path(src).resolve():
            same_as = "" if str(src) == str(path) else f" ({src})"
            raise UsageError(f"{path}: is the input file this command reads{same_as}; choose another {option}")
    if not ours(path) and not force:
        way = "pass --force to overwrite it" if force is not None else "delete it"
        raise UsageError(f"{path}: exists and is not an output of this command; {way} or choose another {option}")
    return path


def emit(result: dict[str, Any], as_json: bool, tables: Sequence[Table] = (), json_path: Path | None = None, *,
         inputs: Sequence[Path | None] = (), force: bool | None = None) -> None:
    """Print ``tables`` (or, with ``--json``, ``result`` as one JSON object) and write ``json_path``.

    ``json_path`` is checked first (:func:`check_out_file`): never a folder or one of ``inputs``, and an
    existing file only if an earlier :func:`emit` wrote it or ``force`` is true (None: the command has no
    --force option).
    """
    if json_path is not None:
        check_out_file(Path(json_path), inputs=inputs, force=force)
        with atomic_file(Path(json_path)) as fh:
            fh.write(_dump_json(result))
    if as_json:
        print(json.dumps(result, sort_keys=True))
    else:
        console = out()
        for t in tables:
            console.print(t)
        if json_path is not None:
            info(f"wrote {json_path}")


@contextlib.contextmanager
def library_warnings() -> Iterator[None]:
    """Show the library's ``logging`` warnings (logger ``refground``: a damaged chunk deleted and computed again...) as
    status lines on stderr, for every command."""

    class _ToConsole(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            info(f"warning: {record.getMessage()}")

    handler = _ToConsole(logging.WARNING)
    logger = logging.getLogger("refground")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
