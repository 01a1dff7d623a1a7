"""Command line of the batch job: `python -m serve_app.batch {embed,similarity,search} ...`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from serve_app.batch.errors import JobInputError, JobStopped
from serve_app.batch.progress import EVERY_S
from serve_app.core.config import AppArgs, config_args
from serve_app.core.errors import ModelLoadError, ServiceError

if TYPE_CHECKING:
    from serve_app.batch.actors import JobOptions


def parser() -> argparse.ArgumentParser:
    """The job's arguments, with the help text `--help` prints."""
    top = argparse.ArgumentParser(
        prog="python -m serve_app.batch",
        description="Embed, compare or search CSV/XLSX/Parquet tables on a Ray cluster.",
    )
    commands = top.add_subparsers(dest="command", required=True)

    embed = commands.add_parser("embed", help="add an 'embedding' column (Parquet output)")
    embed.add_argument("--input", required=True, help="a .csv/.xlsx/.xlsm/.parquet file or a folder of them")
    embed.add_argument("--column", required=True, help="the column to embed")
    embed.add_argument("--output", required=True, help="the .parquet file to write")

    sim = commands.add_parser("similarity", help="add a 'similarity' column: cosine of two columns")
    sim.add_argument("--input", required=True, help="a .csv/.xlsx/.xlsm/.parquet file or a folder of them")
    sim.add_argument("--left", required=True, help="the column the instruction applies to (queries)")
    sim.add_argument("--right", required=True, help="the column compared with it (documents)")
    sim.add_argument("--output", required=True, help=".xlsx, .csv or .parquet, by extension")

    search = commands.add_parser("search", help="the k best corpus rows for each query")
    search.add_argument("--queries", required=True)
    search.add_argument("--query-column", required=True)
    search.add_argument("--corpus", required=True)
    search.add_argument("--corpus-column", required=True)
    search.add_argument("--k", type=int, default=5)
    search.add_argument("--output", required=True, help=".xlsx, .csv or .parquet, by extension")

    for command in (embed, sim, search):
        group = command.add_argument_group("model and resources")
        group.add_argument("--config", help="take model settings from this Ray Serve config (serve_config.yaml)")
        group.add_argument("--model", help="default: the service's (Qwen/Qwen3-Embedding-0.6B); offline: bundled:minilm")
        group.add_argument("--model-revision", help="a hub model's commit, branch or tag (default: the config's, else main)")
        group.add_argument("--instruction", help="task instruction for query-side texts (Qwen3 'Instruct: ...')")
        group.add_argument("--prompt-name", help="query, document or a task named in the config")
        group.add_argument("--dimensions", type=int, help="Matryoshka dimensions (truncate, re-normalise)")
        group.add_argument("--max-input-tokens", type=int)
        group.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"],
                           help="auto (default): bfloat16 where the CPU or GPU runs it natively")
        group.add_argument("--gpu-fraction", type=float, help="GPU share per actor; default as the service")
        group.add_argument("--actors", type=int, help="model actors; default one per node (CPU) or "
                           "per GPU share, more as a cluster's GPU nodes join")
        group.add_argument("--batch-size", type=int, default=256, help="rows per model call (default 256)")
        group.add_argument("--sheet", help="worksheet of .xlsx/.xlsm inputs; default the first. Its header is "
                                           "its first row, or the row below a title that names the columns")
        group.add_argument("--progress-every", type=float, default=EVERY_S, metavar="SECONDS",
                           help=f"say how far the job has got at most this often (default {EVERY_S:g}; "
                                "0: after every block of rows)")
    return top


def settings(opts: argparse.Namespace) -> AppArgs:
    """The model settings: the config file's, then the flags given."""
    overrides = {
        key: value
        for key, value in {
            "model": opts.model,
            "model_revision": opts.model_revision,
            "max_input_tokens": opts.max_input_tokens,
            "gpu_fraction": opts.gpu_fraction,
            "dtype": opts.dtype,
        }.items()
        if value is not None
    }
    if opts.model is not None and opts.model_revision is None:
        overrides["model_revision"] = None  # the config's pin is for the config's model
    if opts.config:
        return config_args(opts.config, overrides)
    return AppArgs.model_validate(overrides)


def main(argv: list[str] | None = None) -> int:
    opts = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        rows, output, timing = run(opts)
    except JobStopped:
        return 2  # already said, as the signal arrived
    except (JobInputError, ModelLoadError, ServiceError, ValueError) as exc:
        if _a_bug_in_a_task(exc):
            raise  # its traceback is what helps
        print(f"error: {_message(exc)}", file=sys.stderr)
        return 2
    if cut := _texts_cut(timing):
        logging.warning("%s Split long texts (into paragraphs, say) to have all of them read.", cut)
    print(summary(opts, rows, output, timing))
    return 0


def summary(opts: argparse.Namespace, rows: int, output: str, timing: dict) -> str:
    """The job's last line: what it wrote, where, and how long it took."""
    work = max(timing["work_s"], 1e-9)
    what, doing, speed = "", "embedding and writing", f"{rows / work:,.1f} rows/s"
    if opts.command == "search":  # it writes k rows a query: its speed is of the rows it embedded
        embedded = timing["queries"] + timing["corpus_embedded"]
        own = ", by the vectors its file holds," if timing["corpus"] and not timing["corpus_embedded"] else ""
        what = (f" (the {opts.k:,} best of {timing['corpus']:,} corpus rows{own} for each of "
                f"{timing['queries']:,} queries)")
        doing, speed = "embedding and searching", f"{embedded:,} rows embedded, {embedded / work:,.1f} rows/s"
    if timing["left_out"]:
        what += f", without {', '.join(map(repr, timing['left_out']))} (lists, which it cannot hold)"
    cut = _texts_cut(timing)
    return (f"Wrote {rows:,} rows to {output}{what}: Ray start-up {timing['ray_start_s']:.1f} s, "
            f"{doing} {work:.1f} s ({speed}).{' ' + cut if cut else ''}")


def _texts_cut(timing: dict) -> str:
    """The sentence for texts longer than the model reads, or ""."""
    if not (count := timing.get("texts_cut", 0)):
        return ""
    return (f"{count:,} {'text was' if count == 1 else 'texts were'} longer than the model reads "
            f"({timing['max_tokens']:,} tokens): only {'its start' if count == 1 else 'the start of each'} "
            "was embedded.")


def run(opts: argparse.Namespace) -> tuple[int, str, dict[str, float]]:
    """Check the arguments and the model, then run the command on Ray."""
    from serve_app.batch.actors import JobOptions
    from serve_app.core.hubfiles import model_directory, say_on_stderr
    from serve_app.core.modelinfo import resolve_model

    output = _absolute_output(opts.output)
    # The flags' own checks, before the files are read through.
    if opts.batch_size < 1:
        raise JobInputError(f"--batch-size must be at least 1, not {opts.batch_size}.")
    if not opts.progress_every >= 0:  # NaN too
        raise JobInputError(f"--progress-every must be 0 seconds or more, not {opts.progress_every:g}.")
    left_out, input_rows = _check_inputs(opts, output)
    args = settings(opts)
    spec = resolve_model(args.model, args.model_revision)  # fails here, before Ray starts
    dimensions = _dimensions(opts.dimensions, args, spec.dimensions)
    # A hub model's weights, fetched here (with progress) rather than by every actor at once.
    model_directory(spec, say=say_on_stderr)
    # What the job starts from here is this user's alone, as under `python -m serve_app`: a
    # Ray of its own (its token, session files and logs, which hold the texts of any error),
    # the zygote, the workers. The model's files fetched above keep the user's umask (a hub
    # cache may be shared), as do the output and the folders made for it (`atomic_output`).
    user_umask = os.umask(0o077)
    job = JobOptions(
        args=args,
        spec=spec,
        instruction=opts.instruction,
        prompt_name=opts.prompt_name,
        dimensions=dimensions,
        batch_size=opts.batch_size,
        actors=opts.actors,
        sheet=opts.sheet,
        umask=user_umask,
        input_rows=input_rows,
        progress_every=opts.progress_every,
    )
    try:
        rows, output, timing = _on_ray(opts, output, job)
    finally:
        os.umask(user_umask)
    return rows, output, {**timing, "left_out": left_out}


def _on_ray(opts: argparse.Namespace, output: str, job: JobOptions) -> tuple[int, str, dict[str, float]]:
    """The command, on a Ray of its own or the one it is submitted to."""
    from serve_app.batch.actors import prepare_warm_start
    from serve_app.batch.job import run_embed, run_search, run_similarity

    prepare_warm_start(job.args, job.spec)  # the actors' zygote imports torch while Ray starts
    import ray

    from serve_app.ray_shell.launch import private_ray_token

    started = time.perf_counter()
    private_ray_token()
    ray.init(logging_level=logging.WARNING, configure_logging=False)
    ray_start_s = time.perf_counter() - started
    job.placement()  # the zygote gets its job now, not once the first dataset is planned (0.4 s later)
    started = time.perf_counter()
    timing = {"ray_start_s": ray_start_s}
    if opts.command == "embed":
        rows = run_embed(opts.input, opts.column, output, job)
    elif opts.command == "similarity":
        rows = run_similarity(opts.input, opts.left, opts.right, output, job)
    else:
        rows, queries, corpus, corpus_embedded = run_search(opts.queries, opts.query_column, opts.corpus,
                                                            opts.corpus_column, opts.k, output, job)
        timing.update(queries=queries, corpus=corpus, corpus_embedded=corpus_embedded)
    timing["work_s"] = time.perf_counter() - started
    timing.update(texts_cut=job.texts_cut, max_tokens=min(job.args.max_input_tokens, job.spec.max_tokens))
    return rows, output, timing


def _check_inputs(opts: argparse.Namespace, output: str) -> tuple[list[str], tuple[int | None, ...] | None]:
    """Everything that can be wrong with the files, found before Ray starts. Returns the
    input columns a CSV or XLSX output leaves out (vectors), said now, and the rows of each
    file of an embed's or a similarity's input (None where a sheet does not say)."""
    import pyarrow.parquet as pq

    from serve_app.batch.search import search_clashes
    from serve_app.batch.sheets import SHEET_ROWS, too_many_rows
    from serve_app.batch.tables import (
        check_output,
        file_rows,
        input_files,
        output_format,
        require_columns,
        sheet_cannot_hold,
    )

    fmt = output_format(output, ("parquet",) if opts.command == "embed" else ("csv", "xlsx", "parquet"))
    check_output(output)
    if opts.command == "search":
        if opts.k < 1:
            raise JobInputError(f"--k must be at least 1, not {opts.k}.")
        checks = [(opts.queries, [opts.query_column], None), (opts.corpus, [opts.corpus_column], None)]
    elif opts.command == "similarity":
        checks = [(opts.input, [opts.left, opts.right], "similarity")]
    else:
        checks = [(opts.input, [opts.column], "embedding")]
    names, rows, left_out = [], [], []
    for side, (path, columns, adds) in enumerate(checks):
        files, input_fmt = input_files(path, output)  # refuses an input that is the output
        names.append(require_columns(files, input_fmt, columns, opts.sheet, adds))
        if fmt != "parquet" and input_fmt == "parquet" and (
                lists := sheet_cannot_hold([pq.read_schema(file) for file in files])):
            # Named as the output would have named them: a search's corpus columns as corpus_NAME.
            corpus_side = opts.command == "search" and side == 1
            left_out += [f"corpus_{name}" if corpus_side else name for name in lists]
            listed = ", ".join(map(repr, lists))
            logging.warning("The output leaves out %s of %s: a .%s cannot hold a column of lists "
                            "(vectors). Write the output as .parquet to keep it.",
                            listed, Path(path).name, fmt)
        # Reads a CSV through (its bad rows) and, for a workbook output, any text too long for it.
        rows.append(file_rows(files, input_fmt, opts.sheet, to_sheet=fmt == "xlsx", wanted=columns))
    if opts.command == "search" and (clashes := search_clashes(*names)):
        raise JobInputError(f"The search's output would have {' and '.join(clashes)}: rename that "
                            "column of the queries or the corpus first.")
    totals = [None if None in each else sum(each) for each in rows]
    if fmt == "xlsx" and None not in totals:
        # A search writes k rows a query, at most one a corpus row, and at least one.
        written = totals[0] * max(1, min(opts.k, totals[1])) if opts.command == "search" else totals[0]
        if written >= SHEET_ROWS:
            raise JobInputError(too_many_rows(written, at_most=opts.command == "search"))
    return left_out, None if opts.command == "search" else tuple(rows[0])


def _dimensions(dimensions: int | None, args: AppArgs, full: int) -> int | None:
    if dimensions is None:
        return None
    if not args.min_dimensions <= dimensions <= full:
        raise JobInputError(
            f"--dimensions must be between {args.min_dimensions} and {full} for {args.model}, not {dimensions}."
        )
    return dimensions


def _absolute_output(path: str) -> str:
    """An absolute output path; a relative one inside a job's uploaded working dir would vanish."""
    if not os.path.isabs(path) and "runtime_resources" in os.getcwd():
        raise JobInputError(
            f"Give --output as an absolute path (for example $PWD/{path}): this job runs in a "
            "temporary copy of the working directory, which Ray deletes afterwards."
        )
    return str(Path(path).expanduser().resolve())


def _a_bug_in_a_task(exc: Exception) -> bool:
    """A ValueError raised inside a Ray task or actor (Ray hands back the actor's own
    error, `raise_original_map_exception`), as against our errors, which say what to do."""
    from_ray = type(exc).__module__ == "ray.exceptions"
    return from_ray and not isinstance(exc, (JobInputError, ModelLoadError, ServiceError))


def _message(exc: Exception) -> str:
    return getattr(exc, "message", None) or str(exc)


if __name__ == "__main__":
    sys.exit(main())
