"""Reading the tables a job is given and writing its output atomically.

Inputs are CSV, XLSX or Parquet files, or a folder of such files (all one
format). Outputs are written to a hidden temporary file beside the target and
renamed into place only once complete, so a failed or stopped job never leaves
a half-written file under the output's name.
"""

from __future__ import annotations

import codecs
import contextlib
import math
import os
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import pyarrow as pa

from serve_app.core.cells import Blank, CellError, cell_text

FORMATS = {".csv": "csv", ".xlsx": "xlsx", ".parquet": "parquet"}


class JobInputError(Exception):
    """Input the job cannot use: the message is the sentence the user reads."""


def input_files(path: str | Path, output: str | Path | None = None) -> tuple[list[Path], str]:
    """The files behind `path` (a file, or a folder of one format) and that format. A folder's
    listing leaves out `output`: a job writing into its input folder, run again, would
    otherwise read its last output as more input. It also leaves out hidden files and
    the lock file Excel keeps beside an open workbook (`~$book.xlsx`)."""
    path = Path(path)
    if path.is_dir():
        skip = Path(output).resolve() if output is not None else None
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FORMATS
                       and not p.name.startswith((".", "~$")) and p.resolve() != skip)
        if not files:
            raise JobInputError(
                f"The folder {path} holds no .csv, .xlsx or .parquet file."
            )
    elif path.is_file():
        files = [path]
    else:
        raise JobInputError(f"The input {path} does not exist (or is not readable from this node).")
    formats = {FORMATS.get(p.suffix.lower()) for p in files}
    if None in formats:
        raise JobInputError(
            f"Cannot read {files[0]}: input files must end in .csv, .xlsx or .parquet."
        )
    if len(formats) > 1:
        raise JobInputError(f"The folder {path} mixes formats ({', '.join(sorted(formats))}); use one.")
    return files, formats.pop()


def output_format(path: str | Path, allowed: tuple[str, ...]) -> str:
    """The output format its extension names, if the command can write it."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt not in allowed:
        wanted = ", ".join(f".{a}" for a in allowed)
        raise JobInputError(f"The output {path} must end in {wanted}.")
    return fmt


def check_output(path: str | Path) -> None:
    """Refuse, before any work, an output the job could not write at the end: the name of
    a folder, or a path under a file or under a folder this user cannot write to. Missing
    folders on the way are made when the output is written."""
    path = Path(path)
    if path.is_dir():
        raise JobInputError(f"The output {path} is a folder: give the path of a file to write in it, "
                            f"such as {path / ('output' + path.suffix)}.")
    above = path.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise JobInputError(f"Cannot write {path}: {above} is a file, not a folder. Choose another --output.")
    if not os.access(above, os.W_OK | os.X_OK):
        raise JobInputError(f"Cannot write {path}: this user may not write in the folder {above}. "
                            "Choose another --output.")


def column_names(file: Path, fmt: str, sheet: str | None = None) -> list[str]:
    """The header of one input file, read without loading its rows (a CSV's first block,
    a sheet's first row), as the job's reader names the columns: repeats kept (pandas
    would rename them)."""
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(file).names)
        if fmt == "csv":
            from pyarrow import csv

            # As Ray Data's reader names them. A bad row among the first is for `check_csv`
            # to name.
            skip = csv_parse_options([file], invalid_row_handler=lambda _row: "skip")
            return list(csv.open_csv(file, parse_options=skip).schema.names)
        return sheet_header(file, sheet).names
    except JobInputError:
        raise
    except Exception as exc:
        raise JobInputError(f"Cannot read {file} as {fmt.upper()}: {exc}") from exc


def require_columns(files: list[Path], fmt: str, wanted: list[str], sheet: str | None = None,
                    adds: str | None = None) -> list[str]:
    """Fail at once, listing the columns a file has, when one it needs is missing; and when
    two columns share a name, or one already has the name of the column the job adds
    (`adds`): columns are matched by name across the files of a folder. Returns the
    files' column names, each once, in the order first seen."""
    names: dict[str, None] = {}
    for file in files:
        have = column_names(file, fmt, sheet)
        names.update(dict.fromkeys(have))
        missing = [c for c in wanted if c not in have]
        if missing:
            where, sheets = "", ""
            if fmt == "xlsx":  # the data may be on another sheet than the one read
                header = sheet_header(file, sheet)
                where = f" on its sheet {header.title!r}"
                if len(header.sheets) > 1:
                    sheets = (f" The workbook's sheets are: {', '.join(map(repr, header.sheets))}; "
                              "name the one to read with --sheet.")
            raise JobInputError(
                f"{file.name} has no column {', '.join(repr(m) for m in missing)}{where}. "
                f"Its columns are: {', '.join(repr(h) for h in have)}.{sheets}"
            )
        refuse_repeats(file, have)
        if adds is not None and adds in have:
            raise JobInputError(
                f"{file.name} already has a column {adds!r}, the one this job adds: rename or "
                "remove it first."
            )
    return list(names)


def refuse_repeats(file: Path, names: list[str]) -> None:
    """Refuse a file with two columns of one name (or two with none)."""
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        which = ", ".join("one with no name" if not n else repr(n) for n in repeated)
        raise JobInputError(
            f"{file.name} has more than one column named {which}: give each column a name "
            "of its own (columns are matched by name)."
        )


def count_rows(files: list[Path], fmt: str, sheet: str | None = None) -> int | None:
    """The rows of the files (None where a sheet does not say), found before any work. A CSV
    is read through once for it, so that a row the job's reader would fail on part way
    through the job (`check_csv`) is refused now."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return sum(pq.read_metadata(file).num_rows for file in files)
    if fmt == "csv":
        csv_parse_options(files)  # one separator for them all
        return sum(check_csv(file) for file in files)
    counts = [sheet_header(file, sheet).rows for file in files]
    return None if None in counts else sum(counts)


# --- CSV --------------------------------------------------------------------------

SEPARATORS = {",": "commas", ";": "semicolons", "\t": "tabs"}


def csv_separator(file: Path) -> str:
    """The character a CSV's fields are separated by (Excel's exports where the decimal mark
    is a comma use semicolons, and tab-separated text is often .csv): of comma, semicolon and
    tab, the first that splits each of the file's first rows (up to 64 KB) into the same
    number of fields, more than one; where none does, the one the header holds most of."""
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


def check_csv(file: Path) -> int:
    """Read a CSV through once, every column as bytes, and return its number of rows. A
    row with more or fewer fields than the header, or text that is not UTF-8 (a Windows
    "ANSI" export), is refused naming its row (the header is row 1) and what to do;
    the job's read tasks would fail on it with a traceback, part way through the job."""
    from pyarrow import csv

    names = column_names(file, "csv")
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
                    column.cast(pa.string())  # checks the bytes are UTF-8
                except pa.ArrowInvalid:  # rare: find the row, in Python
                    for i, value in enumerate(column.to_pylist()):
                        try:
                            value.decode("utf-8")
                        except UnicodeDecodeError as exc:
                            raise _not_utf8(file, value[exc.start], rows + i + 2, name) from None
                    raise
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
    the reader here widens a column's type as it goes."""
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
    return pa.schema([(n, types.get(n, pa.string())) for n in names])


def common_schema(schemas: list[pa.Schema]) -> pa.Schema:
    """One type for each column across the input files, which infer their own (a folder of
    exports): a column blank in one file takes the others' type; whole numbers of two widths
    take the wider; whole and decimal numbers make decimals; any other disagreement, or a
    column blank everywhere, makes text. The
    columns in the order they are first met."""
    found: dict[str, list[pa.DataType]] = {}
    for schema in schemas:
        for field in schema:
            found.setdefault(field.name, []).append(field.type)
    return pa.schema([(name, _one_type(types)) for name, types in found.items()])


def _one_type(types: list[pa.DataType]) -> pa.DataType:
    kinds = {t for t in types if not pa.types.is_null(t)}
    if len(kinds) == 1:
        return kinds.pop()
    if kinds and all(pa.types.is_integer(t) for t in kinds):  # int32 and int64: the wider
        return pa.int64() if any(pa.types.is_signed_integer(t) for t in kinds) else pa.uint64()
    if kinds and all(pa.types.is_integer(t) or pa.types.is_floating(t) for t in kinds):
        return pa.float64()
    return pa.string()


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with `schema`'s columns, in its order and types; a column it lacks (a file
    of the folder without it) is null."""
    columns = [table[field.name].cast(field.type) if field.name in table.column_names
               else pa.nulls(table.num_rows, field.type) for field in schema]
    return pa.Table.from_arrays(columns, schema=schema)


# --- XLSX -------------------------------------------------------------------------


class SheetHeader(NamedTuple):
    """A worksheet's column names (its first row), its name, the workbook's sheets, and its
    rows below the header as the sheet's recorded size gives them (None if it gives none)."""

    names: list[str]
    title: str
    sheets: list[str]
    rows: int | None


def sheet_header(file: Path, sheet: str | None) -> SheetHeader:
    """One sheet's header row (the first sheet unless named), as it stands: a blank cell
    is a column with no name; blanks after the last name are no columns."""
    import openpyxl

    book = openpyxl.load_workbook(file, read_only=True, data_only=True)
    try:
        if sheet is not None and sheet not in book.sheetnames:
            raise JobInputError(
                f"{file.name} has no sheet {sheet!r}. Its sheets are: {', '.join(map(repr, book.sheetnames))}."
            )
        worksheet = book[sheet] if sheet is not None else book.worksheets[0]
        first = next(worksheet.iter_rows(max_row=1, values_only=True), ())
        names = [cell if isinstance(cell, str) else text_or_none(cell) or "" for cell in first]
        while names and names[-1] == "":
            names.pop()
        rows = worksheet.max_row - 1 if worksheet.max_row else None
        return SheetHeader(names, worksheet.title, list(book.sheetnames), rows)
    finally:
        book.close()


def read_xlsx(file: Path, sheet: str | None):
    """One sheet of a workbook (the first unless named) as a pandas frame, its columns
    named as its header row names them. Its cells are read as a CSV's are: text stays
    text ("NA", "None", "null" too; pandas' default makes those blanks), and only empty
    cells are blank."""
    names = sheet_header(file, sheet).names
    frame = pd.read_excel(file, sheet_name=sheet or 0, engine="openpyxl",
                          keep_default_na=False, na_values=[""])
    # pandas renames repeated and blank headers ("doc.1", "Unnamed: 2"); a column of data
    # right of the last header is one with no name.
    width = len(frame.columns)
    frame.columns = names[:width] + [""] * (width - len(names))
    refuse_repeats(file, list(frame.columns))
    return frame


def text_or_none(value: Any) -> str | None:
    """What a table cell embeds as: its text (numbers and dates as shown), None when blank."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    with contextlib.suppress(TypeError, ValueError):
        if pd.isna(value):
            return None
    if hasattr(value, "to_pydatetime"):  # pandas Timestamp
        value = value.to_pydatetime()
    cell = cell_text(value)
    if isinstance(cell, Blank | CellError):
        return None
    return cell


def texts_of(column: pa.ChunkedArray | pa.Array) -> list[str | None]:
    """A column's cells as texts, blanks as None."""
    return [text_or_none(v) for v in column.to_pylist()]


@contextlib.contextmanager
def atomic_output(target: str | Path, umask: int | None = None) -> Iterator[Path]:
    """A temporary path beside `target`, renamed onto it only if the block succeeds; with
    `umask`, the file and the folders made for it get the modes that umask gives.

    SIGTERM (what `ray job stop` sends first) removes the temporary file at once,
    says so, and raises `JobStopped`: Ray sends SIGKILL 3 s later, and unwinding a
    Ray Data pipeline on a busy machine can take longer than that.
    """
    target = Path(target)
    for folder in reversed([f for f in (target.parent, *target.parent.parents) if not f.exists()]):
        folder.mkdir(exist_ok=True)
        if umask is not None:
            folder.chmod(0o777 & ~umask)
    temporary = target.with_name(f".{target.stem}.partial-{os.getpid()}{target.suffix}")
    previous = _stop_on_sigterm(temporary)
    try:
        yield temporary
        if umask is not None:
            temporary.chmod(0o666 & ~umask)
        os.replace(temporary, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


STOPPED = "The job was stopped before it finished; no output was written."


class JobStopped(Exception):
    """The job was asked to stop (SIGTERM); its message has already been printed."""


def _stop_on_sigterm(temporary: Path):
    def stop(_signum, _frame):
        # An open writer keeps writing to the unlinked file; nothing is left under any name.
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        print(f"error: {STOPPED}", file=sys.stderr, flush=True)
        raise JobStopped(STOPPED)

    try:
        return signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        return None


SHEET_ROWS = 1_048_576  # an Excel worksheet's rows, its header's included


def write_table(table: pa.Table, path: Path, fmt: str) -> None:
    """Write `table` in `fmt` to `path` (already a temporary path)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, path)
    elif fmt == "csv":
        from pyarrow import csv

        # With a byte-order mark: Excel opens a CSV without one in the machine's old code
        # page ("café" shows as "cafÃ©"). pyarrow, and so Ray Data and this job, read past it.
        with open(path, "wb") as out:
            out.write(codecs.BOM_UTF8)
            csv.write_csv(table, out)  # keeps integer columns with nulls as integers
    else:
        if table.num_rows >= SHEET_ROWS:
            raise JobInputError(too_many_rows(table.num_rows))
        # Nullable integers stay integers in the sheet (rank 1, not 1.0).
        nullable = {pa.int64(): pd.Int64Dtype(), pa.int32(): pd.Int32Dtype()}
        sheet_ready(table).to_pandas(types_mapper=nullable.get).to_excel(path, index=False, engine="openpyxl")


def too_many_rows(rows: int, at_most: bool = False) -> str:
    """The sentence for an output too long for a worksheet."""
    return (f"The output would have {'up to ' if at_most else ''}{rows:,} rows, more than an Excel "
            f"sheet holds ({SHEET_ROWS - 1:,} below its header): write it as .csv or .parquet instead.")


# Characters a worksheet cannot hold (openpyxl's IllegalCharacterError): control
# characters other than tab, line feed and carriage return.
_NOT_IN_A_SHEET = r"[\x00-\x08\x0B\x0C\x0E-\x1F]"


def sheet_ready(table: pa.Table) -> pa.Table:
    """`table` as a worksheet can hold it: control characters dropped from its text (a
    vertical tab from old exports failed the whole write), and dates and times with a
    time zone as the clock showed them there (Excel's have no zone)."""
    import pyarrow.compute as pc

    columns = []
    for column in table.columns:
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            column = pc.replace_substring_regex(column, pattern=_NOT_IN_A_SHEET, replacement="")
        elif pa.types.is_timestamp(column.type) and column.type.tz is not None:
            column = pc.local_timestamp(column)
        columns.append(column)
    names = [re.sub(_NOT_IN_A_SHEET, "", name) for name in table.column_names]
    return pa.Table.from_arrays(columns, names=names)
