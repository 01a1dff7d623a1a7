"""XLSX: reading one sheet of a workbook as a table, and what a worksheet can hold of the
output (its rows, its characters)."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import pyarrow as pa

from serve_app.batch.errors import JobInputError, refuse_repeats
from serve_app.batch.sheetxml import scan_sheet
from serve_app.core.cells import Blank, CellError, cell_text
from serve_app.core.numformat import integer_formats_among, shown_integer

logger = logging.getLogger(__name__)


class SheetHeader(NamedTuple):
    """A worksheet's column names (its header row), its name, the workbook's sheets, its
    rows below the header as the sheet's recorded size gives them (None if it gives none),
    and which row the header is (1: the first)."""

    names: list[str]
    title: str
    sheets: list[str]
    rows: int | None
    row: int = 1
    top: list[list[str]] = []  # the texts of its first rows (10 where columns were asked for)


# How far down a sheet its header is looked for, below a title and notes.
HEADER_SEARCH_ROWS = 10


def sheet_header(file: Path, sheet: str | None, wanted: Sequence[str] = ()) -> SheetHeader:
    """One sheet's header row (the first sheet unless named), as it stands: a blank cell
    is a column with no name; blanks after the last name are no columns. The header is the
    first row, unless that lacks a `wanted` name and a row below (within the first 10) has
    them all with nothing above it but a title, notes and blank rows (`header_row`)."""
    import openpyxl

    book = openpyxl.load_workbook(file, read_only=True, data_only=True)
    try:
        if sheet is not None and sheet not in book.sheetnames:
            raise JobInputError(
                f"{file.name} has no sheet {sheet!r}. Its sheets are: {', '.join(map(repr, book.sheetnames))}."
            )
        worksheet = book[sheet] if sheet is not None else book.worksheets[0]
        top = [[_header_text(cell.value, getattr(cell, "number_format", None)) for cell in cells]
               for cells in worksheet.iter_rows(max_row=HEADER_SEARCH_ROWS if wanted else 1)]
        row = header_row(top, wanted)
        names = top[row - 1] if top else []
        while names and names[-1] == "":
            names.pop()
        rows = worksheet.max_row - row if worksheet.max_row else None
        return SheetHeader(names, worksheet.title, list(book.sheetnames), rows, row, top)
    finally:
        book.close()


def header_row(top: list[list[str]], wanted: Sequence[str]) -> int:
    """Which of a sheet's first rows (their cells' texts) is its header: see `sheet_header`.
    The rows above a header of n names hold at most n / 2 cells each (a title and its date,
    a note); above a header of one name, at most one, and the row just above is blank: in a
    one-column table every row is one cell, and a data cell that reads as the column asked
    for is no header. Nor is a data row below a header of the first row that lacks a name."""
    if not top or set(wanted) <= set(top[0]):
        return 1
    filled = [sum(1 for name in names if name) for names in top]
    for row, names in enumerate(top, 1):
        if set(wanted) <= set(names):
            return row if _titles_above(filled, row) else 1
    return 1


def _titles_above(filled: list[int], row: int) -> bool:
    """Whether the rows above `row` (each by its filled cells) are a title, notes and
    blanks for a header of that row's width: see `header_row`."""
    above, width = filled[: row - 1], filled[row - 1]
    if width > 1:
        return all(n <= width // 2 for n in above)
    return bool(above) and above[-1] == 0 and all(n <= 1 for n in above)


def below_title(top: list[list[str]]) -> int | None:
    """The row of a table's header below a title, as `header_row` would take it, whatever
    it names: the first of two names or more, where that is not the first row and every
    row above holds at most half as many cells. For a sentence where the columns a job
    asks for are not found: the header a user sees may name them otherwise ("Question")."""
    if not (top and top[0] and top[0][0]):  # a title starts in A1; a blank A1 is an index's header
        return None
    filled = [sum(1 for name in names if name) for names in top]
    for row, width in enumerate(filled, 1):
        if width > 1:
            return row if row > 1 and _titles_above(filled, row) else None
    return None


def said_header_row(file: Path, header: SheetHeader, wanted: Sequence[str]) -> None:
    """A line when the header is not the sheet's first row."""
    if header.row > 1:
        logger.warning("%s, sheet %r: the header is row %d, the first to name %s; the %s above it %s not read.",
                       file.name, header.title, header.row, " and ".join(map(repr, wanted)),
                       "row" if header.row == 2 else f"{header.row - 1} rows", "is" if header.row == 2 else "are")


def refuse_unsaved_formulas(file: Path, header: SheetHeader, wanted: list[str]) -> None:
    """Refuse a sheet whose text columns hold formulas with no saved result: the job reads
    what a formula last gave, as saved with the workbook, and a program that writes
    formulas without calculating them (openpyxl does) saves none, so those rows read as
    blank. Such cells in other columns are written out blank, said as a warning."""
    from openpyxl.utils.cell import get_column_letter

    unsaved: dict[str, list[str]] = {}
    for column, row in scan_sheet(file, header.title).unsaved:
        if row > header.row:  # the header's own and above: names and a title, read as they are
            # Right of the last name, a column is read as one with no name.
            name = header.names[column - 1] if column <= len(header.names) else ""
            unsaved.setdefault(name, []).append(f"{get_column_letter(column)}{row}")
    if not unsaved:
        return

    def cells(name: str) -> str:
        refs = unsaved[name]
        listed = ", ".join(refs[:3]) + (f" and {len(refs) - 3:,} more" if len(refs) > 3 else "")
        return f"{len(refs):,} {'cell' if len(refs) == 1 else 'cells'} of {repr(name) if name else 'a column with no name'} ({listed})"

    def why(names: list[str]) -> str:
        one = len(names) == 1 and len(unsaved[names[0]]) == 1
        return (f"{'; '.join(map(cells, names))} {'holds' if one else 'hold'} a formula with no saved result: the "
                "workbook was last written by a program that does not calculate (Excel, LibreOffice and Google "
                "Sheets save results).")

    if texts := [name for name in wanted if name in unsaved]:
        raise JobInputError(f"{file.name}, sheet {header.title!r}: {why(texts)} Open it in Excel, save it, and "
                            "run the job again.")
    logger.warning("%s, sheet %r: %s The output has them blank.", file.name, header.title, why(list(unsaved)))


def _header_text(cell: Any, number_format: str | None = None) -> str:
    """A header cell's name: its text, numbers and dates as shown (in a format that pads
    with zeros, as it pads them); blank or an error: ""."""
    if cell is None or isinstance(cell, str):
        return cell or ""
    if (shown := shown_integer(cell, number_format)) is not None:
        return shown
    text = cell_text(cell)
    return "" if isinstance(text, Blank | CellError) else text


def read_xlsx(file: Path, sheet: str | None, wanted: Sequence[str] = ()):
    """One sheet of a workbook (the first unless named) as a pandas frame, its columns
    named as its header row names them (`sheet_header`, which finds it below a title where
    the job's columns, `wanted`, are there). Its cells are read as a CSV's are: text stays
    text ("NA", "None", "null" too; pandas' default makes those blanks), and only empty
    cells are blank."""
    header = sheet_header(file, sheet, wanted)
    names = header.names
    frame = pd.read_excel(file, sheet_name=sheet or 0, engine="openpyxl", header=header.row - 1,
                          keep_default_na=False, na_values=[""])
    # pandas makes the frame as wide as the sheet's widest row, a title's or a note's above
    # the header included: a column right of the last name with nothing below the header is
    # no column (a note in E1 above a two-column table made one, and two refused the file).
    while len(frame.columns) > len(names) and frame.iloc[:, -1].isna().all():
        frame = frame.iloc[:, :-1]
    # pandas renames repeated and blank headers ("doc.1", "Unnamed: 2"); a column of data
    # right of the last header is one with no name.
    width = len(frame.columns)
    frame.columns = names[:width] + [""] * (width - len(names))
    refuse_repeats(file, list(frame.columns))
    if integer_formats_among(_number_formats(file)):
        _show_formatted_numbers(frame, file, sheet, header.row)
    _fill_merged_cells(frame, file, header.title, header.row)
    return frame


def _fill_merged_cells(frame: pd.DataFrame, file: Path, title: str, header_row: int = 1) -> None:
    """A merged range below the header shows its top cell in every row it covers, and so
    it is read: its first column's blank cells below the top get the top's value (Excel
    keeps it in the top cell alone, so those rows were blank, with no embedding or score).
    Across columns the value stays in the first, as a title over a table's columns does."""
    from openpyxl.utils.cell import get_column_letter

    filled = []
    ranges = sorted(scan_sheet(file, title).merged, key=lambda bounds: (bounds[1], bounds[0]))  # top to bottom
    for first_column, first_row, last_column, last_row in ranges:
        column, top = first_column - 1, first_row - header_row - 1  # frame row 0 is the one below the header
        if top < 0 or last_row == first_row or column >= frame.shape[1] or top >= len(frame):
            continue  # the header's own or a title's, one row high, or beyond the data read
        value = frame.iat[top, column]
        end = min(last_row - header_row, len(frame))
        blanks = [row for row in range(top + 1, end) if pd.isna(frame.iat[row, column])]
        if pd.isna(value) or not blanks:
            continue
        frame.iloc[blanks, column] = value
        filled.append(f"{get_column_letter(first_column)}{first_row}:{get_column_letter(last_column)}{last_row}")
    if filled:
        one = len(filled) == 1
        shown = ", ".join(filled[:5]) + (f" and {len(filled) - 5:,} more" if len(filled) > 5 else "")
        logger.warning("%s, sheet %r: the text of %s merged %s (%s) is read into every row %s covers, "
                       "as the sheet shows it.", file.name, title, f"{len(filled):,}", "cell" if one else "cells",
                       shown, "it" if one else "each one")


def _number_formats(file: Path) -> list[str]:
    """The number formats a workbook's cells may have beyond Excel's built-in ones (its
    stylesheet's list; conditional formats' are left out), read without loading it: most
    workbooks have none that `shown_integer` renders, and are read once."""
    import zipfile
    from xml.etree import ElementTree

    with zipfile.ZipFile(file) as archive:
        parts = [name for name in archive.namelist() if name.lower().endswith("styles.xml")]
        codes = []
        for part in parts:
            for listing in ElementTree.fromstring(archive.read(part)):
                if listing.tag.endswith("}numFmts"):
                    codes += [code for element in listing if (code := element.get("formatCode"))]
        return codes


def _show_formatted_numbers(frame: pd.DataFrame, file: Path, sheet: str | None, header_row: int = 1) -> None:
    """Whole numbers in a format that shows them otherwise (a ZIP code's 00000: 2134 shows
    02134) become the text they show, and their columns text: what the cell shows is what
    is embedded and written back. Cells are matched to the frame by row and column, and
    checked to hold the frame's number; on any mismatch the frame is left as it is."""
    import openpyxl

    shown: dict[int, dict[int, str]] = {}  # column: {row: text}
    book = openpyxl.load_workbook(file, read_only=True, data_only=True)
    try:
        worksheet = book[sheet] if sheet is not None else book.worksheets[0]
        worksheet.reset_dimensions()  # as pandas reads it: a sheet's recorded size can be wrong
        for row, cells in enumerate(worksheet.iter_rows(min_row=header_row + 1)):
            for column, cell in enumerate(cells):
                text = shown_integer(cell.value, cell.number_format) if cell.data_type == "n" else None
                if text is None:
                    continue
                if row >= len(frame) or column >= frame.shape[1] or frame.iat[row, column] != cell.value:
                    logger.warning("%s: its cells did not line up with the sheet as read (row %d, column %d); "
                                   "numbers in formats such as 00000 are read as General shows them.",
                                   file.name, row + header_row + 1, column + 1)
                    return
                shown.setdefault(column, {})[row] = text
    finally:
        book.close()
    for column, texts in shown.items():
        values = frame.iloc[:, column].astype(object).tolist()
        frame.isetitem(column, [texts.get(row, value) for row, value in enumerate(values)])


SHEET_ROWS = 1_048_576  # an Excel worksheet's rows, its header's included


def too_many_rows(rows: int, at_most: bool = False) -> str:
    """The sentence for an output too long for a worksheet."""
    return (f"The output would have {'up to ' if at_most else ''}{rows:,} rows, more than an Excel "
            f"sheet holds ({SHEET_ROWS - 1:,} below its header): write it as .csv or .parquet instead.")


# Characters a worksheet cannot hold (openpyxl's IllegalCharacterError): control
# characters other than tab, line feed and carriage return.
_NOT_IN_A_SHEET = r"[\x00-\x08\x0B\x0C\x0E-\x1F]"


CELL_CHARACTERS = 32_767  # the most an Excel cell holds; openpyxl cuts longer text there


def sheet_ready(table: pa.Table) -> pa.Table:
    """`table` as a worksheet can hold it: control characters dropped from its text (a
    vertical tab from old exports failed the whole write), and dates and times with a
    time zone as the clock showed them there (Excel's have no zone). Text too long for a
    cell is refused, not cut (openpyxl cut it with only a warning)."""
    import pyarrow.compute as pc

    columns = []
    for name, column in zip(table.column_names, table.columns, strict=True):
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            column = pc.replace_substring_regex(column, pattern=_NOT_IN_A_SHEET, replacement="")
            _refuse_long_cells(name, column)
        elif pa.types.is_timestamp(column.type) and column.type.tz is not None:
            column = pc.local_timestamp(column)
        columns.append(column)
    names = [re.sub(_NOT_IN_A_SHEET, "", name) for name in table.column_names]
    return pa.Table.from_arrays(columns, names=names)


def _refuse_long_cells(name: str, column: pa.ChunkedArray) -> None:
    """Refuse, naming the first, a cell longer than Excel holds."""
    first = first_too_long(column)
    if first is not None:  # the sheet's row: the header is row 1
        raise too_long_for_a_cell(f"Row {first[0] + 2} of the output", name, first[1])


def first_too_long(column: pa.Array | pa.ChunkedArray) -> tuple[int, int] | None:
    """The index and length of the first text longer than an Excel cell holds, counted as
    Excel counts, in UTF-16 units (an emoji beyond U+FFFF is two); None if there is none.
    UTF-8 takes at least as many bytes as UTF-16 units, so most columns need only their
    byte lengths."""
    import pyarrow.compute as pc

    if (pc.max(pc.binary_length(column)).as_py() or 0) <= CELL_CHARACTERS:
        return None
    units = pc.add(pc.utf8_length(column), pc.count_substring_regex(column, r"[\x{10000}-\x{10FFFF}]"))
    first = pc.index(pc.greater(units, CELL_CHARACTERS), True).as_py()
    return None if first < 0 else (first, units[first].as_py())


def too_long_for_a_cell(where: str, column: str, length: int) -> JobInputError:
    """The sentence for a text too long for the output's worksheet."""
    return JobInputError(
        f"{where}, column {column!r}, holds {length:,} characters, more than an Excel cell "
        f"holds ({CELL_CHARACTERS:,}): write the output as .csv or .parquet instead, or "
        "shorten that text."
    )
