"""Writing a job's output atomically: to a hidden temporary file beside the target,
renamed into place only once complete, so a failed or stopped job never leaves a
half-written file under the output's name."""

from __future__ import annotations

import codecs
import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa

from serve_app.batch.errors import STOPPED, JobInputError, JobStopped
from serve_app.batch.sheets import SHEET_ROWS, sheet_ready, too_many_rows


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
        try:
            folder.mkdir()
        except FileExistsError:  # made meanwhile by someone else: theirs, as it is
            continue
        _set_mode(folder, 0o777, umask)
    temporary = target.with_name(f".{target.stem}.partial-{os.getpid()}{target.suffix}")
    previous = _stop_on_sigterm(temporary)
    try:
        yield temporary
        _set_mode(temporary, 0o666, umask)
        os.replace(temporary, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _set_mode(path: Path, full: int, umask: int | None) -> None:
    """`path`'s mode as `umask` would have made it; best effort (a FAT drive has no modes)."""
    if umask is not None:
        with contextlib.suppress(OSError):
            os.chmod(path, full & ~umask, follow_symlinks=False)


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
