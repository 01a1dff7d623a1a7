"""Reading the tables a job is given and writing its output atomically.

Inputs are CSV, XLSX or Parquet files, or a folder of such files (all one
format). Outputs are written to a hidden temporary file beside the target and
renamed into place only once complete, so a failed or stopped job never leaves
a half-written file under the output's name.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from serve_app.core.cells import Blank, CellError, cell_text

FORMATS = {".csv": "csv", ".xlsx": "xlsx", ".parquet": "parquet"}


class JobInputError(Exception):
    """Input the job cannot use: the message is the sentence the user reads."""


def input_files(path: str | Path, output: str | Path | None = None) -> tuple[list[Path], str]:
    """The files behind `path` (a file, or a folder of one format) and that format. A folder's
    listing leaves out `output`: a job writing into its input folder, run again, would
    otherwise read its last output as more input."""
    path = Path(path)
    if path.is_dir():
        skip = Path(output).resolve() if output is not None else None
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FORMATS
                       and not p.name.startswith(".") and p.resolve() != skip)
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


def column_names(file: Path, fmt: str, sheet: str | None = None) -> list[str]:
    """The header of one input file, read without loading its rows (a CSV's first block),
    as the job's reader names the columns: repeats kept (pandas would rename them)."""
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(file).names)
        if fmt == "csv":
            from pyarrow import csv

            return list(csv.open_csv(file).schema.names)  # as Ray Data's reader names them
        return [str(c) for c in read_xlsx(file, sheet, nrows=0).columns]
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
            raise JobInputError(
                f"{file.name} has no column {', '.join(repr(m) for m in missing)}. "
                f"Its columns are: {', '.join(repr(h) for h in have)}."
            )
        repeated = sorted({name for name in have if have.count(name) > 1})
        if repeated:
            which = ", ".join("one with no name" if not n else repr(n) for n in repeated)
            raise JobInputError(
                f"{file.name} has more than one column named {which}: give each column a name "
                "of its own (columns are matched by name)."
            )
        if adds is not None and adds in have:
            raise JobInputError(
                f"{file.name} already has a column {adds!r}, the one this job adds: rename or "
                "remove it first."
            )
    return list(names)


def csv_schema(file: Path, text_columns: list[str]) -> pa.Schema:
    """A CSV file's column types as read from all of its rows: the text columns as text,
    the rest inferred. Ray Data's reader infers types from a file's first block (about
    1 MB) and then fails on a later cell that does not fit ("A7" below a run of numbers);
    the reader here widens a column's type as it goes."""
    from pyarrow import csv

    try:
        first = csv.open_csv(file).schema  # the first block's names and types
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
            inferred = csv.read_csv(file, convert_options=csv.ConvertOptions(include_columns=others))
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


def read_xlsx(file: Path, sheet: str | None, nrows: int | None = None):
    """One sheet of a workbook (the first unless named) as a pandas frame."""
    try:
        return pd.read_excel(file, sheet_name=sheet or 0, nrows=nrows, engine="openpyxl")
    except ValueError as exc:
        if sheet and "not found" in str(exc).lower():
            import openpyxl

            names = openpyxl.load_workbook(file, read_only=True).sheetnames
            raise JobInputError(
                f"{file.name} has no sheet {sheet!r}. Its sheets are: {', '.join(map(repr, names))}."
            ) from exc
        raise


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
def atomic_output(target: str | Path) -> Iterator[Path]:
    """A temporary path beside `target`, renamed onto it only if the block succeeds.

    SIGTERM (what `ray job stop` sends first) removes the temporary file at once,
    says so, and raises `JobStopped`: Ray sends SIGKILL 3 s later, and unwinding a
    Ray Data pipeline on a busy machine can take longer than that.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.stem}.partial-{os.getpid()}{target.suffix}")
    previous = _stop_on_sigterm(temporary)
    try:
        yield temporary
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


def write_table(table: pa.Table, path: Path, fmt: str) -> None:
    """Write `table` in `fmt` to `path` (already a temporary path)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, path)
    elif fmt == "csv":
        from pyarrow import csv

        csv.write_csv(table, path)  # keeps integer columns with nulls as integers
    else:
        # Nullable integers stay integers in the sheet (rank 1, not 1.0).
        nullable = {pa.int64(): pd.Int64Dtype(), pa.int32(): pd.Int32Dtype()}
        table.to_pandas(types_mapper=nullable.get).to_excel(path, index=False, engine="openpyxl")
