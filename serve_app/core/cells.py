"""What a spreadsheet cell becomes before it is embedded: pure, no I/O.

xlwings hands a formula's arguments over as a scalar (one cell), a list (a row
or column) or a list of lists (a block; what `ndim=2` always gives). Blank
cells arrive as None, numbers as float, dates as datetime, and error cells as
their text ("#N/A") when the argument is declared with `err_to_str=True`, or as
COM error codes when it is not.
"""

from __future__ import annotations

import datetime as dt
import math
import unicodedata
from dataclasses import dataclass
from typing import Any

ERROR_TEXTS = frozenset({
    "#N/A", "#DIV/0!", "#NAME?", "#NULL!", "#NUM!", "#REF!", "#VALUE!", "#SPILL!",
    "#CALC!", "#GETTING_DATA", "#FIELD!", "#BLOCKED!", "#CONNECT!", "#BUSY!", "#UNKNOWN!",
    "#PYTHON!", "#N/A waiting...",
})
# COM's codes for cell errors, for arguments read without err_to_str.
COM_ERRORS = frozenset({
    -2146826281, -2146826246, -2146826259, -2146826288, -2146826252, -2146826265, -2146826273,
})


# The date of Excel's serial number 0: xlwings reads a cell holding only a time (14:24) as
# that day at that time.
EXCEL_DAY_ZERO = dt.date(1899, 12, 30)


@dataclass(frozen=True)
class Blank:
    """A blank cell: gives a blank result, costs no request."""


@dataclass(frozen=True)
class CellError:
    """An Excel error value in an input: gives #N/A in that position only."""

    text: str


BLANK = Blank()
Cell = str | Blank | CellError


def cell_text(value: Any) -> Cell:
    """The text Excel shows for `value` (1024, not 1024.0; dates as ISO dates), or a marker."""
    if value is None:
        return BLANK
    if isinstance(value, str):
        if value in ERROR_TEXTS:
            return CellError(value)
        return value if has_content(value) else BLANK
    if isinstance(value, bool):  # before int: bool is an int
        return "TRUE" if value else "FALSE"
    if isinstance(value, int) and value in COM_ERRORS:
        return CellError("#N/A")
    if isinstance(value, dt.datetime):
        if value.date() == EXCEL_DAY_ZERO:  # a time of day: Excel's serial 0.x, as xlwings reads it
            return value.time().isoformat(timespec="seconds")
        if value.time() == dt.time(0, 0):
            return value.date().isoformat()
        return value.replace(tzinfo=None).isoformat(sep=" ", timespec="seconds")
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, dt.time):
        return value.isoformat(timespec="seconds")
    if isinstance(value, (int, float)):
        return number_text(float(value))
    return str(value)


# Unicode categories that show nothing: control, format (a zero-width space, a soft hyphen,
# a byte-order mark), surrogates, and the separators (every whitespace character is one of
# these or a control). Private-use and unassigned characters count as content: an emoji newer
# than this Python's Unicode tables is unassigned here, and is the text's whole point.
NOTHING_SHOWN = frozenset({"Cc", "Cf", "Cs", "Zs", "Zl", "Zp"})


def has_content(text: str) -> bool:
    """Whether a text holds a character outside `NOTHING_SHOWN`: a cell without one is
    blank, and /v1/similarity refuses such a text. As cells.js's hasContent."""
    stripped = text.strip()
    if not stripped:
        return False
    if stripped[0].isprintable():  # the common case, decided by one character
        return True
    return any(unicodedata.category(ch) not in NOTHING_SHOWN for ch in stripped)


def number_text(x: float) -> str:
    """A number as Excel's General format shows it: 1024, 0.5, 1.23457E+15."""
    if math.isnan(x) or math.isinf(x):
        return "#NUM!"
    if x == int(x) and abs(x) < 1e15:
        return str(int(x))
    text = f"{x:.15g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        return f"{float(mantissa):.6g}E{int(exponent):+03d}"
    return text


def as_grid(value: Any) -> list[list[Any]]:
    """Any argument shape (scalar, row or column list, block) as a list of rows."""
    if isinstance(value, (list, tuple)):
        if not value:
            return [[]]
        if isinstance(value[0], (list, tuple)):
            return [list(row) for row in value]
        return [list(value)]
    return [[value]]


def flatten(grid: list[list[Any]]) -> list[Any]:
    """Cells of a block in reading order (row by row)."""
    return [cell for row in grid for cell in row]


def shape(grid: list[list[Any]]) -> tuple[int, int]:
    return len(grid), len(grid[0]) if grid else 0
