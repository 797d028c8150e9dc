"""Plain-text tables for the CLI: whole tables, and tables printed a row at a time.

A whole table sizes each column to its widest cell. A streamed table (receipts
arriving during ``cancel --wait``) cannot see rows to come, so it fixes each
column's width up front from a generous minimum and keeps it for every row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _cell(row: Mapping[str, Any], column: str) -> str:
    return str(row.get(column, ""))


def _line(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Rows as an aligned plain-text table with an upper-case header line."""
    widths = [max([len(c)] + [len(_cell(r, c)) for r in rows]) for c in columns]
    lines = [_line([c.upper() for c in columns], widths)]
    lines += [_line([_cell(r, c) for c in columns], widths) for r in rows]
    return "\n".join(lines)


class StreamingTable:
    """A table printed row by row whose columns line up across rows.

    Each column is as wide as the larger of its header and its minimum width. A
    cell wider than its column widens that column for the rows that follow, and
    the row is still printed whole (never truncated).

    Args:
        columns: the column names, in order.
        min_widths: the minimum width of each named column (others: their header).
    """

    def __init__(self, columns: Sequence[str], min_widths: Mapping[str, int] | None = None) -> None:
        self.columns = tuple(columns)
        minimums = min_widths or {}
        self._widths = [max(len(c), minimums.get(c, 0)) for c in self.columns]

    def header(self) -> str:
        """The header line."""
        return _line([c.upper() for c in self.columns], self._widths)

    def row(self, row: Mapping[str, Any]) -> str:
        """One row as a line padded to the table's column widths."""
        cells = [_cell(row, c) for c in self.columns]
        self._widths = [max(w, len(cell)) for w, cell in zip(self._widths, cells, strict=True)]
        return _line(cells, self._widths)
