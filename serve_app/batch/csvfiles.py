"""CSV inputs: which separator a file uses, and reading it through once before any work
so that what the job's readers would fail on part way is refused with its row."""

from __future__ import annotations

import codecs
import functools
from pathlib import Path

import pyarrow as pa

from serve_app.batch.errors import JobInputError

SEPARATORS = {",": "commas", ";": "semicolons", "\t": "tabs"}


def csv_header(file: Path) -> list[str]:
    """A CSV's column names as Ray Data's reader names them (repeats kept), from its first
    block. A bad row among the first is for `check_csv` to name."""
    from pyarrow import csv

    skip = csv_parse_options([file], invalid_row_handler=lambda _row: "skip")
    return list(csv.open_csv(file, parse_options=skip).schema.names)


def csv_top_rows(file: Path) -> list[list[str]]:
    """A CSV's first rows (10), split as its reader splits them: a sheet saved as CSV keeps
    the title rows above its table (`sheets.header_row`, `sheets.below_title`)."""
    import csv
    import io
    import itertools

    from serve_app.batch.sheets import HEADER_SEARCH_ROWS

    with open(file, "rb") as stream:
        head = stream.read(1 << 16).removeprefix(codecs.BOM_UTF8).decode("utf-8", "replace")
    rows = csv.reader(io.StringIO(head, newline=""), delimiter=csv_separator(file))
    return list(itertools.islice(rows, HEADER_SEARCH_ROWS))


def csv_separator(file: Path) -> str:
    """The character a CSV's fields are separated by (Excel's exports where the decimal mark
    is a comma use semicolons, and tab-separated text is often .csv): of comma, semicolon and
    tab, the first that splits each of the file's first rows (up to 64 KB) into the same
    number of fields, more than one; where none does, the one the header holds most of.
    Found once per version of the file: a job's checks and readers ask for it often."""
    stat = file.stat()
    return _separator(file, (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns))


@functools.lru_cache(maxsize=1024)
def _separator(file: Path, _version: tuple[int, ...]) -> str:
    header = _header_line(file)  # refuses a header that is not UTF-8
    with open(file, "rb") as stream:
        head = stream.read(1 << 16)
    complete = len(head) < 1 << 16
    rows = _separators_per_row(head.removeprefix(codecs.BOM_UTF8).decode("utf-8", "replace"))
    if not complete and len(rows) > 1:
        rows.pop()  # cut off part way
    for separator in SEPARATORS:
        if rows and rows[0][separator] > 0 and all(row[separator] == rows[0][separator] for row in rows):
            return separator
    counts = _separators_per_row(header)[0]
    return max(counts, key=counts.__getitem__)  # a tie goes to the comma


def _separators_per_row(text: str) -> list[dict[str, int]]:
    """How many of each separator every row of `text` holds outside quotes."""
    rows = [dict.fromkeys(SEPARATORS, 0)]
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        elif quoted:
            continue
        elif char == "\n":
            rows.append(dict.fromkeys(SEPARATORS, 0))
        elif char in SEPARATORS:
            rows[-1][char] += 1
    if len(rows) > 1 and not any(rows[-1].values()):
        rows.pop()  # the empty one after the last line break
    return rows


def csv_parse_options(files: list[Path], invalid_row_handler=None):
    """How the job's readers split the files' rows: by the one separator their headers use,
    and with line breaks allowed inside quoted cells (Alt+Enter in Excel). Without that,
    pyarrow cuts its 1 MB blocks at any line break, and a cut inside a cell failed the
    file ("Expected 2 columns, got 1")."""
    from pyarrow import csv

    found = {file: csv_separator(file) for file in files}
    if len(set(found.values())) > 1:
        kinds = "; ".join(f"{file.name} by {SEPARATORS[sep]}" for file, sep in found.items())
        raise JobInputError(f"The CSV files of one folder are separated differently ({kinds}): "
                            "save them all with one separator.")
    return csv.ParseOptions(delimiter=found.popitem()[1] if found else ",", newlines_in_values=True,
                            invalid_row_handler=invalid_row_handler)


def _header_line(file: Path) -> str:
    with open(file, "rb") as stream:
        line = stream.readline(1 << 20).removeprefix(codecs.BOM_UTF8)
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _not_utf8(file, line[exc.start], 1, None) from exc


def _not_utf8(file: Path, byte: int, row: int, column: str | None) -> JobInputError:
    where = f"row {row}, column {column!r}" if column is not None else "its header"
    return JobInputError(
        f"{file.name} is not UTF-8 text (byte 0x{byte:02X} in {where}): in Excel, save it as "
        "'CSV UTF-8 (Comma delimited)'; elsewhere, save it with the encoding UTF-8."
    )


def check_csv(file: Path, to_sheet: bool = False) -> int:
    """Read a CSV through once, every column as bytes, and return its number of rows. A
    row with more or fewer fields than the header, or text that is not UTF-8 (a Windows
    "ANSI" export), is refused naming its row (the header is row 1) and what to do;
    the job's read tasks would fail on it with a traceback, part way through the job.
    `to_sheet` (the output is a workbook): a cell longer than a sheet's cell holds, which
    would fail the job only as it writes, after all of its work, is refused now too."""
    from pyarrow import csv

    from serve_app.batch.sheets import first_too_long, too_long_for_a_cell

    names = csv_header(file)
    invalid = []

    def first_invalid(row) -> str:
        invalid.append(row)
        return "error"

    rows = 0
    parse = csv_parse_options([file], first_invalid)
    try:
        reader = csv.open_csv(
            file,
            read_options=csv.ReadOptions(use_threads=False),  # rows are numbered only in one thread
            parse_options=parse,
            convert_options=csv.ConvertOptions(column_types=dict.fromkeys(names, pa.binary())),
        )
        for batch in reader:
            for name, column in zip(batch.schema.names, batch.columns, strict=True):
                try:
                    text = column.cast(pa.string())  # checks the bytes are UTF-8
                except pa.ArrowInvalid:  # rare: find the row, in Python
                    for i, value in enumerate(column.to_pylist()):
                        try:
                            value.decode("utf-8")
                        except UnicodeDecodeError as exc:
                            raise _not_utf8(file, value[exc.start], rows + i + 2, name) from None
                    raise
                if to_sheet and (long := first_too_long(text)) is not None:
                    raise too_long_for_a_cell(f"{file.name} row {rows + long[0] + 2}", name, long[1])
            rows += batch.num_rows
    except pa.ArrowInvalid as exc:
        if not invalid:
            raise JobInputError(f"Cannot read {file} as CSV: {exc}") from exc
        row = invalid[0]
        if row.actual_columns > row.expected_columns:
            fix = f"put quotes around a value that holds a {SEPARATORS[parse.delimiter][:-1]}"
        else:
            fix = "add the missing fields (empty ones will do), or close a quote left open above it"
        raise JobInputError(
            f"{file.name} has {row.actual_columns} fields in row {row.number}, where its header has "
            f"{row.expected_columns} (the row begins {row.text[:60]!r}): {fix}."
        ) from exc
    return rows


def csv_schema(file: Path, text_columns: list[str]) -> pa.Schema:
    """A CSV file's column types as read from all of its rows: the text columns as text,
    the rest inferred. Ray Data's reader infers types from a file's first block (about
    1 MB) and then fails on a later cell that does not fit ("A7" below a run of numbers);
    the reader here widens a column's type as it goes. A column of numbers whose text a
    number would not give back (`00123`, a 20-digit account number) stays text."""
    from pyarrow import csv

    parse = csv_parse_options([file])
    try:
        first = csv.open_csv(file, parse_options=parse).schema  # the first block's names and types
    except pa.ArrowInvalid as exc:
        raise JobInputError(f"Cannot read {file} as CSV: {exc}") from exc
    # A column that is text in the first block stays text, whatever follows; only the others
    # (numbers, dates, blanks: small) are read through the whole file.
    names = first.names
    others = [field.name for field in first
              if field.name not in text_columns and not pa.types.is_string(field.type)]
    types = {}
    if others:  # only those columns are converted; the rest are merely parsed over
        try:
            inferred = csv.read_csv(file, parse_options=parse,
                                    convert_options=csv.ConvertOptions(include_columns=others))
        except pa.ArrowInvalid as exc:
            raise JobInputError(f"Cannot read {file} as CSV: {exc}") from exc
        types = {field.name: field.type for field in inferred.schema}
        numeric = [name for name, kind in types.items() if _is_number(kind)]
        if numeric:
            for name in _not_written_as_numbers(file, parse, numeric):
                types[name] = pa.string()
    return pa.schema([(n, types.get(n, pa.string())) for n in names])


def _is_number(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind)


# What a number does not write back: a plus sign, a leading zero (`00123`) or hex (`0x10`),
# which pyarrow reads as numbers, and more significant digits than a float64 (or an Excel
# cell) holds, 15 (trailing zeros count: a column that errs is kept as text, losing nothing).
_NOT_A_NUMBERS_TEXT = r"^\s*\+|^\s*-?0[0-9xX]|[1-9](\.?[0-9]){15}"


def _not_written_as_numbers(file: Path, parse, columns: list[str]) -> list[str]:
    """Which of `columns` (read as numbers) hold a value the numbers would not give back:
    an identifier with leading zeros (`00123`), an account number longer than a float or an
    Excel cell holds, `+5` or `0x10`. Those the job keeps as text, exactly as the file
    holds them. (0.2 s for the read and 0.17 s a column of 1.5 million numbers, here.)"""
    import pyarrow.compute as pc
    from pyarrow import csv

    try:
        written = csv.read_csv(file, parse_options=parse, convert_options=csv.ConvertOptions(
            include_columns=columns, column_types=dict.fromkeys(columns, pa.string()),
            strings_can_be_null=True))  # the inferring read's blanks and `NA`s are nulls here too
    except pa.ArrowInvalid as exc:
        raise JobInputError(f"Cannot read {file} as CSV: {exc}") from exc
    return [name for name in columns
            if pc.any(pc.match_substring_regex(written.column(name), _NOT_A_NUMBERS_TEXT)).as_py()]
