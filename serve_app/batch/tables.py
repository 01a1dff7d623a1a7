"""The tables a job is given: which files, in which format, with which columns, and
their cells as the texts a job embeds.

Inputs are CSV, XLSX or Parquet files, or a folder of such files (all one format);
`csvfiles` and `sheets` read the first two, `output` writes what a job makes.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from serve_app.batch.csvfiles import check_csv, csv_header, csv_parse_options, csv_top_rows
from serve_app.batch.errors import JobInputError, refuse_repeats
from serve_app.batch.sheets import (
    below_title,
    first_too_long,
    header_row,
    refuse_unsaved_formulas,
    said_header_row,
    sheet_header,
    too_long_for_a_cell,
)
from serve_app.core.cells import Blank, CellError, cell_text

# What a job writes, by extension, and what it reads: those, and a macro-enabled workbook
# (.xlsm, as xlwings users keep theirs) read as any workbook; never written, as the job's
# output would hold no macros.
OUTPUT_FORMATS = {".csv": "csv", ".xlsx": "xlsx", ".parquet": "parquet"}
FORMATS = {**OUTPUT_FORMATS, ".xlsm": "xlsx"}
_READABLE = ".csv, .xlsx, .xlsm or .parquet"


def input_files(path: str | Path, output: str | Path | None = None) -> tuple[list[Path], str]:
    """The files behind `path` (a file, or a folder of one format) and that format. A folder's
    listing leaves out `output`: a job writing into its input folder, run again, would
    otherwise read its last output as more input; an input file that is `output` is refused,
    since the job would replace it with its re-typed copy. A folder's listing also leaves out
    hidden files and the lock file Excel keeps beside an open workbook (`~$book.xlsx`)."""
    path = Path(path)
    skip = Path(output).resolve() if output is not None else None
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FORMATS
                       and not p.name.startswith((".", "~$")) and p.resolve() != skip)
        if not files:
            raise JobInputError(f"The folder {path} holds no {_READABLE} file.")
    elif path.is_file():
        if path.resolve() == skip:
            raise JobInputError(f"--output {output} is this job's input: give another file to write, "
                                "and the input stays as it is.")
        files = [path]
    else:
        raise JobInputError(f"The input {path} does not exist (or is not readable from this node).")
    formats = {FORMATS.get(p.suffix.lower()) for p in files}
    if None in formats:
        raise JobInputError(
            f"Cannot read {files[0]}: input files must end in {_READABLE}."
        )
    if len(formats) > 1:
        raise JobInputError(f"The folder {path} mixes formats ({', '.join(sorted(formats))}); use one.")
    return files, formats.pop()


def output_format(path: str | Path, allowed: tuple[str, ...]) -> str:
    """The output format its extension names, if the command can write it."""
    suffix = Path(path).suffix.lower()
    fmt = OUTPUT_FORMATS.get(suffix)
    if fmt not in allowed:
        wanted = ", ".join(f".{a}" for a in allowed)
        why = " (the output holds no macros)" if suffix == ".xlsm" and "xlsx" in allowed else ""
        raise JobInputError(f"The output {path} must end in {wanted}{why}.")
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


def column_names(file: Path, fmt: str, sheet: str | None = None, wanted: Sequence[str] = ()) -> list[str]:
    """The header of one input file, read without loading its rows (a CSV's first block,
    a sheet's first row), as the job's reader names the columns: repeats kept (pandas
    would rename them)."""
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(file).names)
        if fmt == "csv":
            return csv_header(file)
        return sheet_header(file, sheet, wanted).names
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
        have = column_names(file, fmt, sheet, wanted)
        names.update(dict.fromkeys(have))
        missing = [c for c in wanted if c not in have]
        if missing:
            raise _missing(file, fmt, sheet, wanted, missing, have)
        refuse_repeats(file, have)
        if fmt == "xlsx":
            header = sheet_header(file, sheet, wanted)
            said_header_row(file, header, wanted)
            refuse_unsaved_formulas(file, header, wanted)
        if adds is not None and adds in have:
            raise JobInputError(
                f"{file.name} already has a column {adds!r}, the one this job adds: rename or "
                "remove it first."
            )
    return list(names)


def _missing(file: Path, fmt: str, sheet: str | None, wanted: list[str], missing: list[str],
             have: list[str]) -> JobInputError:
    """The sentence for columns a file lacks: the columns it has, and where the data may be
    instead (a workbook's other sheets; the header below a title, which a CSV is not read
    from, and which names the columns otherwise where a sheet's is not found either)."""
    more = ""
    if fmt == "xlsx":
        header = sheet_header(file, sheet, wanted)
        top, more = header.top, f" on its sheet {header.title!r}"
    else:
        try:
            top = csv_top_rows(file) if fmt == "csv" else []
        except csv.Error:  # Python 3.10's reader refuses a NUL: no hint, the sentence stands
            top = []
    text = (f"{file.name} has no {'columns' if len(missing) > 1 else 'column'} "
            f"{' and '.join(repr(m) for m in missing)}{more}. Its columns are: {', '.join(map(repr, have))}.")
    hint = ""
    if fmt == "csv" and (row := header_row(top, wanted)) > 1:
        # A sheet with a title, saved as CSV: its header is found below the title in the
        # workbook, but Ray Data reads a CSV from its first row.
        hint = f" Its row {row} names {'them' if len(missing) > 1 else 'it'}, below a title"
    elif (row := below_title(top)) is not None:
        hint = f" Its row {row}, below a title, names: {', '.join(repr(n) for n in top[row - 1] if n)}"
    if hint:
        text += hint + ("." if fmt == "xlsx" else
                        f": a CSV is read from its first row, so delete the {'1 row' if row == 2 else f'{row - 1:,} rows'} "
                        "above that one (or give the job the workbook it was saved from, where the header is found "
                        "below a title), and run it again.")
    if fmt == "xlsx" and len(header.sheets) > 1:  # the data may be on another sheet than the one read
        text += (f" The workbook's sheets are: {', '.join(map(repr, header.sheets))}; name the one to read "
                 "with --sheet.")
    return JobInputError(text)


def file_rows(files: list[Path], fmt: str, sheet: str | None = None, to_sheet: bool = False,
              wanted: Sequence[str] = ()) -> list[int | None]:
    """Each file's rows (None where a sheet does not say), found before any work. A CSV
    is read through once for it, so that a row the job's reader would fail on part way
    through the job (`check_csv`) is refused now. `to_sheet` (the output is a workbook):
    a CSV's or Parquet file's text longer than a sheet's cell holds is refused now too,
    not as the output is written, after the work (a workbook's own cells cannot be)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        if to_sheet:
            for file in files:
                _refuse_long_parquet_cells(file)
        return [pq.read_metadata(file).num_rows for file in files]
    if fmt == "csv":
        csv_parse_options(files)  # one separator for them all
        return [check_csv(file, to_sheet) for file in files]
    return [sheet_header(file, sheet, wanted).rows for file in files]


def _refuse_long_parquet_cells(file: Path) -> None:
    """A Parquet file's first text longer than a sheet's cell holds, refused with its row
    (counted from 1); its text columns are read a row group at a time."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(file)
    texts = [field.name for field in parquet.schema_arrow
             if pa.types.is_string(field.type) or pa.types.is_large_string(field.type)]
    if not texts:
        return
    rows = 0
    for batch in parquet.iter_batches(columns=texts):
        for name, column in zip(batch.schema.names, batch.columns, strict=True):
            if (long := first_too_long(column)) is not None:
                raise too_long_for_a_cell(f"{file.name} row {rows + long[0] + 1}", name, long[1])
        rows += batch.num_rows


def sheet_cannot_hold(schemas: list[pa.Schema]) -> list[str]:
    """The columns of Parquet inputs (their schemas) that a CSV or a worksheet cannot hold,
    which such an output leaves out: lists (an embed job's vectors), structs and maps.
    pyarrow's CSV writer failed on them after all of the job's work, and a workbook got
    numpy's text for a vector, cut with "..." past 1,000 numbers."""
    return list({field.name: None for schema in schemas for field in schema if pa.types.is_nested(field.type)})


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
