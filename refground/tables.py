"""Plain tables that library code returns and the CLI renders, and the one percentage format of reports."""

from __future__ import annotations

from typing import Any, NamedTuple

# The held-out splits every report shows (refer semantics: testA includes testAB).
EVAL_SPLITS = ("val", "testA", "testB")


class TableData(NamedTuple):
    """A rich-free table: title, column names, rows of plain values (None shown as "-")."""

    title: str
    columns: list[str]
    rows: list[list[Any]]


def pct(value: Any) -> str:
    """A share in [0, 1] as a percentage with one decimal ("-" for None or NaN)."""
    if value is None or value != value:
        return "-"
    return f"{100 * value:.1f}"


__all__ = ["EVAL_SPLITS", "TableData", "pct"]
