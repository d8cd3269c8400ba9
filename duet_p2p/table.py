"""A small table for listings: aligned text in terminals, HTML in Jupyter, pandas on demand.

Cells often hold text a peer chose (a request's reason, a tag). Such text is made
printable where it enters (``duet_p2p.text.printable``); on top of that the text form
escapes any control character a cell still holds (no terminal escape sequences, no broken
lines) and the HTML form escapes everything.
"""

from __future__ import annotations

import html
import math
import time
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any

MAX_CELL_CHARS = 60
"""Text cells longer than this are cut with an ellipsis (the HTML form shows them whole)."""

_SIZE_UNITS = ("B", "KB", "MB", "GB", "TB", "PB")


def format_size(nbytes: int | float) -> str:
    """A byte count for people, in decimal units: ``1200000`` -> ``"1.2 MB"``."""
    value = float(nbytes)
    if not math.isfinite(value) or value < 0:
        return "?"
    if value < 1000:
        return f"{int(value)} B"
    for unit in _SIZE_UNITS[1:]:
        value /= 1000
        if value < 999.95 or unit == _SIZE_UNITS[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def format_clock(timestamp: float | None) -> str:
    """A ``time.time()`` value as local ``HH:MM:SS`` (empty for None)."""
    if timestamp is None:
        return ""
    return time.strftime("%H:%M:%S", time.localtime(timestamp))


def uid_label(identifier: str) -> str:
    """How an object or request ID is shown in listings: ``<UID:...>``."""
    return f"<UID:{identifier}>"


def safe_text(text: str) -> str:
    """``text`` with every non-printable character (newline, ESC, bidi overrides) escaped."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in text)


def cell_text(value: Any) -> str:
    """The text of one cell: None is empty, collections show as ``[a, b]``."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (set, frozenset)):
        return "[" + ", ".join(sorted(cell_text(v) for v in value)) + "]"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(cell_text(v) for v in value) + "]"
    if isinstance(value, float) and value.is_integer() and math.isfinite(value):
        return str(int(value))
    return str(value)


def _width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Table:
    """Rows under named columns, shown like a pandas frame with an index column."""

    def __init__(
        self,
        columns: Sequence[str],
        rows: Iterable[Sequence[object]],
        title: str | None = None,
        *,
        index: bool = True,
        empty_text: str | None = None,
        max_cell_chars: int = MAX_CELL_CHARS,
    ) -> None:
        self.columns: list[str] = [str(c) for c in columns]
        self.rows: list[list[object]] = [list(row) for row in rows]
        for row in self.rows:
            if len(row) != len(self.columns):
                raise ValueError(f"a row has {len(row)} cells for {len(self.columns)} columns")
        self.title = title
        self.index = index
        self.empty_text = empty_text
        self.max_cell_chars = max(2, max_cell_chars)

    def __len__(self) -> int:
        return len(self.rows)

    def _empty_message(self) -> str:
        if self.empty_text is not None:
            return self.empty_text
        return f"Empty table (columns: {', '.join(self.columns)})"

    def __str__(self) -> str:
        lines = [safe_text(self.title)] if self.title else []
        if not self.rows:
            lines.append(safe_text(self._empty_message()))
            return "\n".join(lines)
        grid = [[safe_text(c) for c in self.columns]]
        grid += [[_cut(safe_text(cell_text(v)), self.max_cell_chars) for v in r] for r in self.rows]
        right = [all(_is_number(r[i]) for r in self.rows) for i in range(len(self.columns))]
        if self.index:
            grid = [[""] + grid[0]] + [[str(i)] + row for i, row in enumerate(grid[1:])]
            right = [False] + right
        widths = [max(_width(row[i]) for row in grid) for i in range(len(grid[0]))]
        for row in grid:
            cells = []
            for text, width, align_right in zip(row, widths, right, strict=True):
                pad = " " * (width - _width(text))
                cells.append(pad + text if align_right else text + pad)
            lines.append("  ".join(cells).rstrip())
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        esc = _html_text
        parts = ['<div class="duet-table">']
        if not self.rows:
            if self.title:
                parts.append(f"<p><b>{esc(self.title)}</b></p>")
            parts.append(f"<p>{esc(self._empty_message())}</p></div>")
            return "".join(parts)
        parts.append("<table>")
        if self.title:
            parts.append(f"<caption>{esc(self.title)}</caption>")
        head = "<th></th>" if self.index else ""
        head += "".join(f"<th>{esc(c)}</th>" for c in self.columns)
        parts.append(f"<thead><tr>{head}</tr></thead><tbody>")
        for i, row in enumerate(self.rows):
            cells = f"<th>{i}</th>" if self.index else ""
            cells += "".join(f"<td>{esc(cell_text(v))}</td>" for v in row)
            parts.append(f"<tr>{cells}</tr>")
        parts.append("</tbody></table></div>")
        return "".join(parts)

    def to_pandas(self) -> Any:
        """The rows as a ``pandas.DataFrame`` (pandas is imported only now)."""
        try:
            import pandas
        except ImportError as exc:
            raise ModuleNotFoundError(
                "pandas is needed for DataFrame views: pip install 'duet_p2p[pandas]'",
                name="pandas",
            ) from exc
        frame = pandas.DataFrame(self.rows, columns=self.columns)
        if self.title:
            frame.attrs["title"] = self.title
        return frame

    @property
    def pandas(self) -> Any:
        """Same as ``to_pandas()``."""
        return self.to_pandas()


def _html_text(text: str) -> str:
    return html.escape(safe_text(text), quote=True)


class TableView:
    """Mixin for listings: define ``table()``; get text, HTML and pandas views from it."""

    def table(self) -> Table:
        raise NotImplementedError

    def __repr__(self) -> str:
        return str(self.table())

    def __str__(self) -> str:
        return str(self.table())

    def _repr_html_(self) -> str:
        return self.table()._repr_html_()

    @property
    def pandas(self) -> Any:
        """The listing as a pandas DataFrame."""
        return self.table().to_pandas()
