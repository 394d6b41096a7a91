"""Plain tables that library code returns and the CLI renders, and the one place that decides how a figure is
shown to people.

A column has a *kind* (:data:`KINDS`); :func:`column_kind` infers it from the column's name, and a
:class:`TableData` may name kinds explicitly where a name is ambiguous. :func:`format_value` turns one value
into text by its kind; :func:`format_table` lays out a whole table (header text, cells, alignment) for the
CLI's rich tables, and the markdown reports use :func:`format_value` / :func:`pct` for their cells. JSON output
never goes through here: it keeps the machine-precise values (shares as fractions in [0, 1]).

The rules:

* ``percent``: a share in [0, 1] (Precision@1, accuracy, recall@N, IoU means, prec@X, PointIt, shares) as a
  percentage with one decimal and no sign: 0.88744 -> ``88.7``; the header says ``(%)`` under the name
  unless the column name or the table title already has a ``%`` (a name/value table: after the name).
* ``seconds`` and ``ms``: one decimal with thousands separators (12.3456 -> ``12.3``); a non-zero time
  that one decimal would show as ``0.0`` gets two significant digits instead (0.004 -> ``0.004``): a
  measured time is never shown as nothing.
* ``count``: an integer with thousands separators (``12,345``).
* ``float`` (losses, learning rates, scores, rates such as images/s): 4 significant digits, thousands
  separators from 1,000 on, scientific notation below 0.001.
* ``ratio``: a speed-up, one decimal and ``x`` (``62.7x``); ``bytes``: ``467.8 KB``.
* ``text``: as given. ``auto``: ints as counts, floats as floats, anything else as text.
* ``by-row`` (a ``value`` column of a name/value table): each cell takes the kind of its row's name, e.g.
  ``("category accuracy", 0.91)`` -> ``category accuracy (%)`` | ``91.0``.
* ``None`` and NaN show as ``-``; strings pass through unchanged (already formatted, or ``-``).
* Text columns are left-aligned, numeric ones right-aligned; an ``auto``/``by-row`` column is right-aligned
  when it holds any number.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any, NamedTuple

# The held-out splits every report shows (refer semantics: testA includes testAB).
EVAL_SPLITS = ("val", "testA", "testB")

TEXT, PERCENT, SECONDS, MS, COUNT, FLOAT, RATIO, BYTES, AUTO, BY_ROW = (
    "text", "percent", "seconds", "ms", "count", "float", "ratio", "bytes", "auto", "by-row")
KINDS = (TEXT, PERCENT, SECONDS, MS, COUNT, FLOAT, RATIO, BYTES, AUTO, BY_ROW)
NUMERIC_KINDS = frozenset({PERCENT, SECONDS, MS, COUNT, FLOAT, RATIO, BYTES})
SIGNIFICANT_DIGITS = 4

# Ordered: the first rule that matches a normalised name (lower case, "_" as space) decides. Rates come before
# times ("images/s" is no duration), thresholds before shares ("iou threshold" is no IoU mean).
_RULES: tuple[tuple[str, str], ...] = (
    (r"%", PERCENT),
    (r"/ ?s\b|\bper s(ec|econd)?\b", FLOAT),
    (r"^ms\b|\bms$|\(ms\)|\bms per\b|\bmilliseconds?\b", MS),
    (r"\bseconds?\b(?!-)|^s$|\(s\)", SECONDS),  # not "second-order"
    (r"threshold|\bgamma\b", FLOAT),
    (r"^ratio$|\bspeed-?up\b", RATIO),
    (r"precision|recall|accuracy|pointit|\bshare\b|hit rate|\bprec@|\b[rp]@\d|\biou\b|referent matched", PERCENT),
    (r"^(epochs?|queries|scored|missing|referents|context objects|images|objects|expressions|captions|phrases"
     r"|phrases without boxes|count|no gt mask|images computed|feature dim|predictions|predictions in split"
     r"|predictions outside split)$", COUNT),
    (r"\bloss\b|\blr\b|learning rate|\bscore\b|\bmean\b", FLOAT),
    (r"^value$", BY_ROW),
    (r"^(name|split|kind|metric|figure|status|path|dataset|run|unit|created|fingerprint|detail|section|label)$",
     TEXT),
)
_COMPILED = tuple((re.compile(pattern), kind) for pattern, kind in _RULES)


class TableData(NamedTuple):
    """A rich-free table: title, column names, rows of plain values (None shown as "-"), and optionally the
    kind of each column (:data:`KINDS`; a None entry, or no list, means :func:`column_kind` of its name)."""

    title: str
    columns: list[str]
    rows: list[list[Any]]
    kinds: list[str | None] | None = None


class FormattedTable(NamedTuple):
    """A table laid out for people: header texts, the unit under each header ("%" or ""), cell texts, and
    which columns are right-aligned."""

    title: str
    headers: list[str]
    units: list[str]
    rows: list[list[str]]
    right: list[bool]


def column_kind(name: str) -> str:
    """The kind of a column (or of a name/value table's row) from its name: ``precision@1`` -> ``percent``,
    ``seconds`` -> ``seconds``, ``ms/image`` -> ``ms``, ``queries`` -> ``count``, ``loss`` -> ``float``,
    ``value`` -> ``by-row``, ``kind`` -> ``text``; ``auto`` for names it does not know."""
    norm = str(name).lower().replace("_", " ").strip()
    for pattern, kind in _COMPILED:
        if pattern.search(norm):
            return kind
    return AUTO


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _one_decimal(value: float, suffix: str = "", tiny: bool = False) -> str:
    text = f"{value:,.1f}"
    if text == "-0.0":
        text = "0.0"
    if text == "0.0" and tiny and value != 0:
        text = f"{value:.2g}"  # a real but tiny time: "0.0" would read as no time at all
    return text + suffix


def _significant(value: float, digits: int = SIGNIFICANT_DIGITS) -> str:
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    if magnitude < -3:
        return f"{value:.{digits - 1}e}"
    return f"{value:,.{max(0, digits - 1 - magnitude)}f}"


def _bytes(value: float) -> str:
    units = ("B", "KB", "MB", "GB", "TB")
    i = 0
    while abs(value) >= 1024 and i < len(units) - 1:
        value /= 1024
        i += 1
    return f"{value:.0f} B" if i == 0 else f"{value:.1f} {units[i]}"


def format_value(value: Any, kind: str = AUTO) -> str:
    """``value`` as text by ``kind`` (see the module's rules); None and NaN are ``-``, strings pass through."""
    if value is None:
        return "-"
    if not _is_number(value) or kind == TEXT:
        return str(value)
    if isinstance(value, numbers.Integral) and kind not in (PERCENT, SECONDS, MS, RATIO, BYTES):
        return f"{int(value):,}"
    v = float(value)
    if math.isnan(v):
        return "-"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if kind == PERCENT:
        return _one_decimal(100 * v)
    if kind in (SECONDS, MS):
        return _one_decimal(v, tiny=True)
    if kind == RATIO:
        return _one_decimal(v, "x")
    if kind == BYTES:
        return _bytes(v)
    if kind == COUNT and v.is_integer():
        return f"{int(v):,}"
    return _significant(v)


def pct(value: Any) -> str:
    """A share in [0, 1] as a percentage with one decimal ("-" for None or NaN): ``format_value(v, "percent")``."""
    return format_value(value, PERCENT)


def header_text(name: str) -> str:
    """A column's header for people: underscores as spaces, so that a long name can wrap."""
    return str(name).replace("_", " ")


def column_unit(name: str, kind: str, title: str = "") -> str:
    """The unit a header shows: ``%`` for a percentage column, unless its name or the table's title already
    says ``%``; else nothing (counts, seconds and ms say what they are in their names)."""
    return "%" if kind == PERCENT and "%" not in str(name) and "%" not in title else ""


def table_kinds(t: TableData) -> list[str]:
    """The kind of every column of ``t``: its explicit kind, else :func:`column_kind` of its name."""
    given = list(t.kinds or [])
    given += [None] * (len(t.columns) - len(given))
    return [k or column_kind(c) for k, c in zip(given, t.columns)]


def format_table(t: TableData) -> FormattedTable:
    """Lay out ``t`` for people (see the module's rules); the values in ``t`` are left untouched."""
    kinds = table_kinds(t)
    by_row = BY_ROW in kinds
    rows: list[list[str]] = []
    for row in t.rows:
        label_kind = column_kind(str(row[0])) if by_row and row else TEXT
        cells = []
        for i, value in enumerate(row):
            kind = kinds[i] if i < len(kinds) else AUTO
            cells.append(format_value(value, label_kind if kind == BY_ROW else kind))
        if by_row and cells and column_unit(cells[0], label_kind, t.title):
            cells[0] += " (%)"
        rows.append(cells)
    right = []
    for i, kind in enumerate(kinds):
        if kind in (AUTO, BY_ROW):
            right.append(any(_is_number(r[i]) for r in t.rows if i < len(r)))
        else:
            right.append(kind in NUMERIC_KINDS)
    return FormattedTable(t.title, [header_text(c) for c in t.columns],
                          [column_unit(c, k, t.title) for c, k in zip(t.columns, kinds)], rows, right)


def unit_kind(unit: str) -> str:
    """The kind of a figure measured in ``unit`` ("s", "ms", "ms/image", "images/s", ...)."""
    kind = column_kind(unit)
    return kind if kind in NUMERIC_KINDS else FLOAT



def write_report(markdown_path: Any, markdown: str, figures: dict[str, Any]) -> dict[str, Any]:
    """Write a report: ``markdown`` to ``markdown_path`` and ``figures`` as JSON beside it (``<stem>.json``), each
    atomically. Returns the figures as written (plain lists and str keys), so what a command prints with
    ``--json`` equals the file, in the layout of ``cli.console.emit`` (which may re-write the file)."""
    import json
    from pathlib import Path

    from refground.atomic import atomic_file

    path = Path(markdown_path)
    js = json.loads(json.dumps(figures))
    with atomic_file(path.with_suffix(".json")) as fh:
        fh.write(json.dumps(js, indent=2, sort_keys=True))
    with atomic_file(path) as fh:
        fh.write(markdown)
    return js

__all__ = ["AUTO", "BYTES", "BY_ROW", "COUNT", "EVAL_SPLITS", "FLOAT", "FormattedTable", "KINDS", "MS",
           "NUMERIC_KINDS", "PERCENT", "RATIO", "SECONDS", "TEXT", "TableData", "column_kind", "column_unit",
           "format_table", "format_value", "header_text", "pct", "table_kinds", "unit_kind", "write_report"]


def markdown_table(t: TableData) -> list[str]:
    """The lines of ``t`` as a markdown table (no title: the caller's heading names it; every percent header says
    "(%)"), cells formatted like the console's."""
    f = format_table(t._replace(title=""))
    head = [h + (f" ({u})" if u else "") for h, u in zip(f.headers, f.units)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if r else "---" for r in f.right) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in f.rows]
    return lines


def split_list(splits: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The split names of a comma-separated ``--splits`` value (or a sequence), each checked; none is a
    one-line UsageError."""
    from refground.data.model import check_split_name
    from refground.errors import UsageError

    names = [s.strip() for s in splits.split(",")] if isinstance(splits, str) else [str(s).strip() for s in splits]
    names = list(dict.fromkeys(s for s in names if s))
    if not names:
        raise UsageError("--splits: no split given (e.g. val,testA,testB)")
    return tuple(check_split_name(s) for s in names)
