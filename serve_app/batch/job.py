"""The Ray Data pipelines behind `python -m serve_app.batch`.

Each command reads its table(s) with Ray Data, embeds through a pool of actors
that load the model once (`actors`: `EmbedRows`, the service's `TextEmbedder`, with
the service's GPU fraction), and writes one output file atomically (`output`). Row
order is kept, so row i of the output is row i of the input.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pyarrow as pa

from serve_app.batch.actors import EMBEDDING_TYPE, JobOptions, block_rows, embed_rows, texts_cut
from serve_app.batch.csvfiles import csv_parse_options, csv_schema
from serve_app.batch.output import atomic_output, write_table
from serve_app.batch.progress import Progress
from serve_app.batch.provenance import VectorsRecord, why_not_reusable
from serve_app.batch.search import top_k
from serve_app.batch.sheets import read_xlsx
from serve_app.batch.tables import (
    common_schema,
    conform,
    input_files,
    output_format,
    sheet_cannot_hold,
    text_or_none,
    texts_of,
)

logger = logging.getLogger(__name__)


def run_embed(input_path: str, column: str, output: str, opts: JobOptions) -> int:
    """Add an `embedding` column to every row; Parquet out. Returns the row count."""
    output_format(output, ("parquet",))
    prefix = _prefix(opts, opts.instruction, opts.prompt_name)
    dataset, schema, total = _read(input_path, [column], opts, output, rows=opts.input_rows)
    embedded = embed_rows(dataset, opts, "embed", [column], [prefix], total)
    progress = Progress(total, "Embedded", every_s=opts.progress_every)
    import pyarrow.parquet as pq

    # How the vectors were made, for a later search to use them as they are (`provenance`).
    record = VectorsRecord.of(opts.spec, opts.args, column, prefix, opts.dimensions)
    schema = schema.append(pa.field("embedding", EMBEDDING_TYPE))
    schema = schema.with_metadata({**(schema.metadata or {}), **record.to_metadata()})
    rows = 0
    # Written as the batches come; an input with no rows still gets every column.
    with atomic_output(output, opts.umask) as temporary, pq.ParquetWriter(temporary, schema) as writer:
        for batch in embedded.iter_batches(batch_format="pyarrow", batch_size=None):
            writer.write_table(conform(batch, schema))
            rows += batch.num_rows
            opts.texts_cut += texts_cut(batch)
            progress.add(batch.num_rows)
    return rows


def run_similarity(input_path: str, left: str, right: str, output: str, opts: JobOptions) -> int:
    """Add a `similarity` column (cosine of left and right); the output's format by extension."""
    fmt = output_format(output, ("csv", "xlsx", "parquet"))
    query_prefix = _prefix(opts, opts.instruction, opts.prompt_name)
    dataset, schema, total = _read(input_path, [left, right], opts, output, rows=opts.input_rows)
    scored = embed_rows(dataset, opts, "similarity", [left, right], [query_prefix, ""], total)
    progress = Progress(total, "Scored", every_s=opts.progress_every)
    table = _collect(scored, schema.append(pa.field("similarity", pa.float32())), opts, progress)
    with atomic_output(output, opts.umask) as temporary:
        write_table(table, temporary, fmt)
    return table.num_rows


def run_search(queries: str, query_column: str, corpus: str, corpus_column: str, k: int,
               output: str, opts: JobOptions) -> tuple[int, int, int, int]:
    """The k best corpus rows for each query, best first, with their scores. A corpus that
    is an embed job's output, its vectors made as this search would make them, is searched
    with those vectors; otherwise its texts are embedded too. Returns the rows written, the
    queries' and the corpus's rows, and the corpus rows embedded."""
    fmt = output_format(output, ("csv", "xlsx", "parquet"))
    query_prefix = _prefix(opts, opts.instruction, opts.prompt_name or (None if opts.instruction else "query"))
    document_prefix = _prefix(opts, None, "document")
    reuse = kept = _corpus_vectors_reusable(corpus, corpus_column, document_prefix, opts, output)
    corpus_ds, corpus_schema, _ = _read(corpus, [corpus_column], opts, output, keep=("embedding",) if kept else ())
    query_ds, query_schema, _ = _read(queries, [query_column], opts, output)
    corpus_table = _collect(corpus_ds, corpus_schema)
    query_table = _collect(query_ds, query_schema)
    query_texts = prefixed(query_table[query_column], query_prefix)
    if reuse and (unmade := _texts_without_vectors(corpus_table, corpus_column)):
        logger.warning("The corpus's 'embedding' column is not used: %d of its rows hold text but no "
                       "vector (added after its embed job?). Its texts are embedded again.", unmade)
        reuse = False
    if reuse:
        query_vectors, corpus_vectors = _embed_texts(query_texts, opts), corpus_table["embedding"]
    else:
        # Both sides' texts in one dataset, so one pool of actors loads the model once: a second
        # pool for the queries loaded it again (1.1 s for the bundled model, 2.1 s for the stand-in).
        vectors = _embed_texts([*prefixed(corpus_table[corpus_column], document_prefix), *query_texts], opts)
        corpus_vectors, query_vectors = vectors[: corpus_table.num_rows], vectors[corpus_table.num_rows :]
    if kept and fmt != "parquet":
        corpus_table = corpus_table.drop_columns(["embedding"])  # read for the search alone
    table = top_k(query_table, query_vectors, corpus_table, corpus_vectors, k,
                  dimensions=opts.dimensions or opts.spec.dimensions)
    with atomic_output(output, opts.umask) as temporary:
        write_table(table, temporary, fmt)
    return table.num_rows, query_table.num_rows, corpus_table.num_rows, 0 if reuse else corpus_table.num_rows


def _texts_without_vectors(corpus: pa.Table, column: str) -> int:
    """The rows of an embed job's output with text but no vector: rows added to it later
    would never be found."""
    import pyarrow.compute as pc

    texts = pa.array([text is not None for text in texts_of(corpus[column])])
    return pc.sum(pc.and_(texts, pc.is_null(corpus["embedding"]))).as_py() or 0


def _corpus_vectors_reusable(corpus: str, column: str, prefix: str, opts: JobOptions, output: str) -> bool:
    """Whether a Parquet corpus holds an embed job's vectors of `column` made as this search
    would make them (the same model, weights, prompt and settings); says which, and why not
    where it holds vectors this search cannot use."""
    files, fmt = input_files(corpus, output)
    if fmt != "parquet":
        return False
    import pyarrow.parquet as pq

    schemas = [pq.read_schema(file) for file in files]
    if not all("embedding" in schema.names for schema in schemas):
        return False
    wanted = VectorsRecord.of(opts.spec, opts.args, column, prefix, opts.dimensions)
    why_not = why_not_reusable([VectorsRecord.from_schema(schema) for schema in schemas], wanted)
    if why_not:
        logger.warning("The corpus's 'embedding' column is not used: %s. Its texts are embedded again.", why_not)
        return False
    logger.warning("The corpus's own vectors are used (an embed job's, of the column %r, made with this "
                   "search's model, prompt and settings): only the queries are embedded.", column)
    return True


def prefixed(column: pa.ChunkedArray, prefix: str) -> list[str | None]:
    """A column's texts with its side's prompt prefix; blanks stay None (no vector)."""
    return [None if text is None else prefix + text for text in texts_of(column)]


def _embed_texts(texts: list[str | None], opts: JobOptions) -> pa.Array:
    """The texts' embeddings, in order (null where None), through one pool of actors."""
    import ray

    if not texts:
        return pa.array([], type=EMBEDDING_TYPE)
    table = pa.table({"text": pa.array(texts, type=pa.string())})
    dataset = ray.data.from_arrow(_blocks(table, block_rows(len(texts), opts.batch_size, opts.pool_size())))
    progress = Progress(len(texts), "Embedded", "texts", every_s=opts.progress_every)
    embedded = _collect(embed_rows(dataset, opts, "embed", ["text"], [""], len(texts)),
                        table.schema.append(pa.field("embedding", EMBEDDING_TYPE)), opts, progress)
    return embedded["embedding"].combine_chunks()


# --- Ray Data plumbing ----------------------------------------------------------


def _prefix(opts: JobOptions, instruction: str | None, prompt_name: str | None) -> str:
    from serve_app.core.prompts import prompt_prefix

    return prompt_prefix(opts.spec, opts.args, instruction=instruction, prompt_name=prompt_name)


# Reading a file is a moment's work beside embedding it. A read task asking for a whole
# CPU waited for ever once the model actors held every CPU (`--actors 2` on two cores):
# the actors waited for rows, the read for a CPU.
READ_CPUS = 0


def _read(path: str, columns: list[str], opts: JobOptions, output: str, keep: tuple[str, ...] = (),
          rows: tuple[int | None, ...] | None = None):
    """A Ray dataset over the input file(s), the schema every row is read with (one type per
    column for all the files, `common_schema`), and its rows where known. The files'
    columns were checked before Ray started. `keep`: columns of lists to read even for a
    CSV or XLSX output. `rows`, each file's, counted before Ray: the dataset is cut into
    blocks of `block_rows` for the actors (read as Ray Data chooses without it)."""
    import ray

    # A dataset takes a copy of Ray Data's current context when it is made (set later, as
    # it once was, preserve_order changed nothing and rows came out of order), so the
    # job's settings go in here, before the read.
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    # An actor's own error (a ServiceError saying what to do) reaches the command line as
    # itself, not wrapped in Ray Data's UserCodeException, which keeps only its traceback.
    context.raise_original_map_exception = True
    # Ray Data's second Parquet reader lists files in a task of one CPU and reads footers
    # in actors of their own, which waited for ever for a CPU the model actors held, and
    # started up to 32 Python processes beside the model's; the first reads as CSV does.
    context.use_datasource_v2 = False
    # The job says how far it has got in a line of its own (`Progress`). Ray Data's, nine
    # lines every 10 s where the output is no terminal (as under `ray job submit`), buried
    # it: a 200,000-row job's log would hold hundreds of them. Its one-time notice that
    # they are off tells a user to edit code that is not theirs, so it is left out too.
    context.enable_progress_bars = False
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    files, fmt = input_files(path, output)
    files = [f.resolve() for f in files]  # read tasks run elsewhere than the driver's cwd
    total = None if rows is None or None in rows else sum(rows)
    blocks = None
    if total is not None and fmt != "xlsx":
        # Ray Data reads each file in a task of its own and cuts every task's rows into the
        # same number of blocks: as many as the longest file needs.
        block = block_rows(total, opts.batch_size, opts.pool_size())
        blocks = len(files) * max(1, *(-(-each // block) for each in rows))
    if fmt == "parquet":
        import pyarrow.parquet as pq

        schemas = [pq.read_schema(f) for f in files]
        full = schema = common_schema(schemas)
        columns = None
        if output_format(output, ("csv", "xlsx", "parquet")) != "parquet":
            # Vectors and other lists a CSV or a sheet cannot hold are left out (said before Ray);
            # `_collect` and `conform` keep only the schema's columns.
            left_out = set(sheet_cannot_hold(schemas)) - set(keep)
            schema = pa.schema([field for field in schema if field.name not in left_out])
            # Not read at all where every file has every column left: Ray Data's reader keeps
            # only the asked-for columns its first file has, and a column the first file of a
            # folder lacked came out null in every file.
            if left_out and all(set(schema.names) <= set(each.names) for each in schemas):
                columns = schema.names
        return ray.data.read_parquet([str(f) for f in files], columns=columns, num_cpus=READ_CPUS,
                                     schema=schema if columns else full, override_num_blocks=blocks), schema, total
    if fmt == "csv":
        from pyarrow import csv

        # Text columns are read verbatim (no "007" -> 7); the rest with the types their
        # whole files give them.
        schema = common_schema([csv_schema(f, columns) for f in files])
        convert = csv.ConvertOptions(column_types=dict(zip(schema.names, schema.types, strict=True)))
        return ray.data.read_csv([str(f) for f in files], parse_options=csv_parse_options(files),
                                 convert_options=convert, num_cpus=READ_CPUS, override_num_blocks=blocks), schema, total
    # A workbook is read whole here, before any row goes to the actors: 9 s for 100,000 rows
    # of 3 columns on 2 cores, and a sheet holds ten times that, so it is said.
    what = files[0].name if len(files) == 1 else f"{len(files):,} workbooks in {Path(path).name}"
    logger.info("Reading %s%s: a workbook is read whole before its rows are embedded.", what,
                f" ({total:,} rows)" if total is not None else "")
    started = time.perf_counter()
    sheets, schema = sheet_blocks(files, opts.sheet, columns, opts.batch_size,
                                  opts.pool_size() if rows is not None else 1)
    read = sum(block.num_rows for block in sheets)
    logger.info("Read %s rows in %.1f s.", f"{read:,}", time.perf_counter() - started)
    return ray.data.from_arrow(sheets), schema, read


def sheet_blocks(files: list[Path], sheet: str | None, columns: list[str], batch_size: int,
                 actors: int) -> tuple[list[pa.Table], pa.Schema]:
    """The sheets' rows in blocks of `block_rows` for all their rows, with one schema
    (`common_schema`): the blocks go to the actors in turn, and the progress counts them."""
    sheets = [pa.Table.from_pandas(_arrow_safe(read_xlsx(f, sheet, columns), columns), preserve_index=False)
              for f in files]
    schema = common_schema([table.schema for table in sheets])
    rows = block_rows(sum(table.num_rows for table in sheets), batch_size, actors)
    return [block for table in sheets for block in _blocks(conform(table, schema), rows)], schema


def _blocks(table: pa.Table, rows: int) -> list[pa.Table]:
    """`table` in blocks of `rows` rows (a table with none: one empty block), for the
    actors of a cluster to share out."""
    return [table.slice(start, rows) for start in range(0, table.num_rows, rows)] or [table]


def _arrow_safe(frame, columns: list[str]):
    """A sheet's frame with text columns as text and mixed-type columns as text too."""
    frame = frame.copy()
    for name in frame.columns:
        values = frame[name]
        mixed = values.dtype == object and len({type(v) for v in values.dropna()}) > 1
        if name in columns or mixed:
            # Cells keep what they hold (whitespace too); only non-text values become text.
            frame[name] = [v if isinstance(v, str) else text_or_none(v) for v in values]
    frame.columns = [str(c) for c in frame.columns]
    return frame


def _collect(dataset, schema: pa.Schema, counted: JobOptions | None = None,
             progress: Progress | None = None) -> pa.Table:
    """All of `dataset`'s rows, with `schema`: Ray Data hands an input with no rows to no
    actor, so no batch would say what columns the result has. The texts the actors cut
    are added to `counted`'s; the rows, as they come, to `progress`."""
    batches = []
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        batches.append(batch)
        if progress is not None:
            progress.add(batch.num_rows)
    if counted is not None:
        counted.texts_cut += sum(texts_cut(batch) for batch in batches)
    if not batches:
        return schema.empty_table()
    return conform(pa.concat_tables(batches, promote_options="default"), schema)
