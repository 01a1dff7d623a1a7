"""The Ray Data pipelines behind `python -m serve_app.batch`.

Each command reads its table(s) with Ray Data, embeds through a pool of actors
that load the model once (`EmbedRows`, the service's `TextEmbedder`, with the
service's GPU fraction), and writes one output file atomically. Row order is
kept, so row i of the output is row i of the input.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from serve_app.batch.csvfiles import csv_parse_options, csv_schema
from serve_app.batch.output import atomic_output, write_table
from serve_app.batch.sheets import read_xlsx
from serve_app.batch.tables import (
    common_schema,
    conform,
    input_files,
    output_format,
    text_or_none,
    texts_of,
)
from serve_app.core.config import AppArgs
from serve_app.core.modelinfo import ModelSpec

logger = logging.getLogger(__name__)

EMBEDDING_TYPE = pa.list_(pa.float32())


@dataclass
class JobOptions:
    """What every command shares: the model settings and how to run them."""

    args: AppArgs
    spec: ModelSpec  # resolved once, by the command line
    instruction: str | None = None
    prompt_name: str | None = None
    dimensions: int | None = None
    batch_size: int = 256
    actors: int | None = None
    sheet: str | None = None
    umask: int | None = None  # the user's, for the output, where the job runs under another
    _placement: tuple[float, str | None] | None = field(default=None, init=False, repr=False)

    def placement(self) -> tuple[float, str | None]:
        """Once Ray is up: the actors' GPU share and their warm-start `py_executable` (None:
        they start cold), decided on the first call and kept for the job. The driver calls
        it right after `ray.init`, so a zygote started before Ray gets its job then."""
        from serve_app.ray_shell.resources import resolve_gpu_fraction

        if self._placement is None:
            gpu_fraction = resolve_gpu_fraction(self.args.gpu_fraction)
            self._placement = gpu_fraction, warm_start_executable(self.args, self.spec, gpu_fraction)
        return self._placement


class EmbedRows:
    """A Ray Data actor: loads the model once, then adds embeddings or similarities to batches."""

    def __init__(self, args: dict, spec: dict, gpu_fraction: float) -> None:
        import time

        started = time.perf_counter()
        from serve_app.model.embedder import TextEmbedder
        from serve_app.model.hardware import default_cpu_threads, default_forward_workers
        from serve_app.model.scheduler import ForwardScheduler, home_thread
        from serve_app.ray_shell.warmstart import forked_from_zygote

        settings = AppArgs.model_validate(args)
        cpus = settings.cpu_threads or default_cpu_threads()
        # As in a replica: the model is loaded on the thread that runs worker 0's passes,
        # and each batch is dealt out to the forward workers (two on a CPU, each on its
        # share of the cores) by the replica's scheduler. One pass on both cores left them
        # idle at every thread barrier: 15-17% fewer rows a second (bench/NOTES.md). Being
        # a coroutine, __call__ gets several batches at once from Ray Data, on one event
        # loop: a worker that ends its part of one goes on to the next (README, batch jobs).
        home = home_thread()
        # The command line's spec, not each actor's own look-up: every actor runs the same
        # revision of a hub model.
        self.model = home.submit(TextEmbedder.from_settings, ModelSpec(**spec), settings, gpu_fraction,
                                 cpus).result()
        self.scheduler = ForwardScheduler(
            self.model.encode,
            workers=settings.forward_workers or default_forward_workers(self.model.device, cpus),
            cpus=cpus,
            max_texts=settings.max_batch_texts,
            home=home,
        )
        # A job runs for minutes: its CPU fast paths (packed weights, shared rows) go on
        # before the first batch, not beside it as in a replica.
        sentences = home.submit(lambda: [*self.model.speed_up(), self.model.settle_gpu_share()]).result()
        how = "forked from the warm-start process" if forked_from_zygote() else "cold start"
        said = " ".join(s if s.endswith(".") else f"{s}." for s in sentences if s)
        print(f"Model {self.model.spec.name} loaded in {time.perf_counter() - started:.1f} s ({how}). {said}",
              flush=True)

    async def __call__(self, batch: pa.Table, task: str, columns: list[str], prefixes: list[str],
                       dimensions: int | None = None) -> pa.Table:
        # Both columns of a similarity go in one call: one batch for the workers to share.
        vectors = await self.vectors([texts_of(batch[name]) for name in columns], prefixes, dimensions)
        if task == "embed":
            return batch.append_column("embedding", embedding_array(vectors[0]))
        return batch.append_column("similarity", pair_scores(*vectors))

    async def vectors(self, columns: list[list[str | None]], prefixes: list[str],
                      dimensions: int | None) -> list[list[np.ndarray | None]]:
        """Each column's vectors, None for blanks; each distinct text (with its column's
        prefix) is embedded once."""
        from serve_app.core.vectors import truncate

        unique: dict[str, int] = {}
        rows = [[None if text is None else unique.setdefault(prefix + text, len(unique)) for text in texts]
                for texts, prefix in zip(columns, prefixes, strict=True)]
        if not unique:
            return [[None] * len(texts) for texts in columns]
        matrix = truncate(await self.encode(list(unique)), dimensions)
        return [[None if row is None else matrix[row] for row in column] for column in rows]

    async def encode(self, texts: list[str]) -> np.ndarray:
        return (await self.scheduler.embed(texts)).vectors


def pair_scores(left: list[np.ndarray | None], right: list[np.ndarray | None]) -> pa.Array:
    """The cosine of each row's two vectors; null where either side had no text."""
    from serve_app.core.vectors import cosine_pairwise

    present = [i for i, (a, b) in enumerate(zip(left, right, strict=True)) if a is not None and b is not None]
    scores: list[float | None] = [None] * len(left)
    if present:
        computed = cosine_pairwise(np.stack([left[i] for i in present]), np.stack([right[i] for i in present]))
        for i, score in zip(present, computed.tolist(), strict=True):
            scores[i] = score
    return pa.array(scores, type=pa.float32())


def embedding_array(vectors: list[np.ndarray | None]) -> pa.Array:
    """A list<float32> column with nulls where there was no text."""
    return pa.array([None if v is None else v.astype(np.float32) for v in vectors], type=EMBEDDING_TYPE)


# --- the commands --------------------------------------------------------------


def run_embed(input_path: str, column: str, output: str, opts: JobOptions) -> int:
    """Add an `embedding` column to every row; Parquet out. Returns the row count."""
    output_format(output, ("parquet",))
    prefix = _prefix(opts, opts.instruction, opts.prompt_name)
    dataset, schema = _read(input_path, [column], opts, output)
    embedded = _embed(dataset, opts, "embed", [column], [prefix])
    import pyarrow.parquet as pq

    schema = schema.append(pa.field("embedding", EMBEDDING_TYPE))
    rows = 0
    # Written as the batches come; an input with no rows still gets every column.
    with atomic_output(output, opts.umask) as temporary, pq.ParquetWriter(temporary, schema) as writer:
        for batch in embedded.iter_batches(batch_format="pyarrow", batch_size=None):
            writer.write_table(conform(batch, schema))
            rows += batch.num_rows
    return rows


def run_similarity(input_path: str, left: str, right: str, output: str, opts: JobOptions) -> int:
    """Add a `similarity` column (cosine of left and right); the output's format by extension."""
    fmt = output_format(output, ("csv", "xlsx", "parquet"))
    query_prefix = _prefix(opts, opts.instruction, opts.prompt_name)
    dataset, schema = _read(input_path, [left, right], opts, output)
    scored = _embed(dataset, opts, "similarity", [left, right], [query_prefix, ""])
    table = _collect(scored, schema.append(pa.field("similarity", pa.float32())))
    with atomic_output(output, opts.umask) as temporary:
        write_table(table, temporary, fmt)
    return table.num_rows


def run_search(queries: str, query_column: str, corpus: str, corpus_column: str, k: int,
               output: str, opts: JobOptions) -> tuple[int, int, int]:
    """The k best corpus rows for each query, best first, with their scores. Returns the
    rows written, and the queries' and the corpus's rows (what was embedded)."""
    fmt = output_format(output, ("csv", "xlsx", "parquet"))
    query_prefix = _prefix(opts, opts.instruction, opts.prompt_name or (None if opts.instruction else "query"))
    document_prefix = _prefix(opts, None, "document")
    corpus_ds, corpus_schema = _read(corpus, [corpus_column], opts, output)
    query_ds, query_schema = _read(queries, [query_column], opts, output)
    corpus_table = _collect(corpus_ds, corpus_schema)
    query_table = _collect(query_ds, query_schema)
    # Both sides' texts in one dataset, so one pool of actors loads the model once: a second
    # pool for the queries loaded it again (1.1 s for the bundled model, 2.1 s for the stand-in).
    texts = [*prefixed(corpus_table[corpus_column], document_prefix),
             *prefixed(query_table[query_column], query_prefix)]
    vectors = _embed_texts(texts, opts)
    corpus_table = corpus_table.append_column("embedding", vectors[: corpus_table.num_rows])
    query_table = query_table.append_column("embedding", vectors[corpus_table.num_rows :])
    table = top_k(query_table, corpus_table, k)
    with atomic_output(output, opts.umask) as temporary:
        write_table(table, temporary, fmt)
    return table.num_rows, query_table.num_rows, corpus_table.num_rows


def prefixed(column: pa.ChunkedArray, prefix: str) -> list[str | None]:
    """A column's texts with its side's prompt prefix; blanks stay None (no vector)."""
    return [None if text is None else prefix + text for text in texts_of(column)]


def _embed_texts(texts: list[str | None], opts: JobOptions) -> pa.Array:
    """The texts' embeddings, in order (null where None), through one pool of actors."""
    import ray

    if not texts:
        return pa.array([], type=EMBEDDING_TYPE)
    table = pa.table({"text": pa.array(texts, type=pa.string())})
    dataset = ray.data.from_arrow(_blocks(table, opts.batch_size * 4))
    embedded = _collect(_embed(dataset, opts, "embed", ["text"], [""]),
                        table.schema.append(pa.field("embedding", EMBEDDING_TYPE)))
    return embedded["embedding"].combine_chunks()


# What a search adds after the queries' columns, before the corpus's (as corpus_NAME).
SEARCH_ADDS = ("rank", "score", "corpus_row")


def search_clashes(query_columns: list[str], corpus_columns: list[str]) -> list[str]:
    """A phrase for each name a search's output would hold twice; none when all are unique."""
    whose = {name: ["the queries' column"] for name in query_columns}
    for name in SEARCH_ADDS:
        whose.setdefault(name, []).append("the search's own")
    for name in corpus_columns:
        whose.setdefault(f"corpus_{name}", []).append(f"the corpus's column {name!r}")
    return [f"two columns named {name!r} ({' and '.join(sources)})"
            for name, sources in whose.items() if len(sources) > 1]


def top_k(queries: pa.Table, corpus: pa.Table, k: int, chunk: int = 256) -> pa.Table:
    """Rows (query columns, rank, score, corpus_row, corpus columns), best match first."""
    from serve_app.core.vectors import cosine_matrix

    corpus_vectors = corpus["embedding"].to_pylist()
    usable = np.array([i for i, v in enumerate(corpus_vectors) if v is not None], dtype=np.int64)
    matrix = (np.asarray([corpus_vectors[i] for i in usable], dtype=np.float32)
              if len(usable) else np.zeros((0, 1), dtype=np.float32))
    query_vectors = queries["embedding"].to_pylist()
    k = min(k, len(usable))
    query_rows, ranks, scores, corpus_rows = [], [], [], []
    for start in range(0, len(query_vectors), chunk):
        block = query_vectors[start : start + chunk]
        present = [i for i, v in enumerate(block) if v is not None]
        best = np.zeros((len(block), k), dtype=np.int64)
        best_scores = np.zeros((len(block), k), dtype=np.float32)
        if present and k:
            sims = cosine_matrix(np.asarray([block[i] for i in present], dtype=np.float32), matrix)
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            top_scores = np.take_along_axis(sims, top, axis=1)
            order = np.argsort(-top_scores, axis=1, kind="stable")
            best[present] = np.take_along_axis(top, order, axis=1)
            best_scores[present] = np.take_along_axis(top_scores, order, axis=1)
        for i, vector in enumerate(block):
            if vector is None or not k:  # a blank query keeps its row, with nulls
                query_rows.append(start + i)
                ranks.append(None)
                scores.append(None)
                corpus_rows.append(None)
                continue
            for rank in range(k):
                query_rows.append(start + i)
                ranks.append(rank + 1)
                scores.append(float(best_scores[i, rank]))
                corpus_rows.append(int(usable[best[i, rank]]))
    out = queries.drop_columns(["embedding"]).take(pa.array(query_rows, type=pa.int64()))
    rank, score, corpus_row = SEARCH_ADDS
    out = out.append_column(rank, pa.array(ranks, type=pa.int32()))
    out = out.append_column(score, pa.array(scores, type=pa.float32()))
    out = out.append_column(corpus_row, pa.array(corpus_rows, type=pa.int64()))
    matched = corpus.drop_columns(["embedding"]).take(pa.array(corpus_rows, type=pa.int64()))
    for name in matched.column_names:
        out = out.append_column(f"corpus_{name}", matched[name])
    return out


# --- Ray Data plumbing ----------------------------------------------------------


def _prefix(opts: JobOptions, instruction: str | None, prompt_name: str | None) -> str:
    from serve_app.core.prompts import prompt_prefix

    return prompt_prefix(opts.spec, opts.args, instruction=instruction, prompt_name=prompt_name)


# Reading a file is a moment's work beside embedding it. A read task asking for a whole
# CPU waited for ever once the model actors held every CPU (`--actors 2` on two cores):
# the actors waited for rows, the read for a CPU.
READ_CPUS = 0


def _read(path: str, columns: list[str], opts: JobOptions, output: str):
    """A Ray dataset over the input file(s), and the schema every row is read with: one
    type per column for all the files (`common_schema`). Their columns were checked
    before Ray started."""
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
    files, fmt = input_files(path, output)
    files = [f.resolve() for f in files]  # read tasks run elsewhere than the driver's cwd
    if fmt == "parquet":
        import pyarrow.parquet as pq

        schema = common_schema([pq.read_schema(f) for f in files])
        return ray.data.read_parquet([str(f) for f in files], num_cpus=READ_CPUS, schema=schema), schema
    if fmt == "csv":
        from pyarrow import csv

        # Text columns are read verbatim (no "007" -> 7); the rest with the types their
        # whole files give them.
        schema = common_schema([csv_schema(f, columns) for f in files])
        convert = csv.ConvertOptions(column_types=dict(zip(schema.names, schema.types, strict=True)))
        return ray.data.read_csv([str(f) for f in files], parse_options=csv_parse_options(files),
                                 convert_options=convert, num_cpus=READ_CPUS), schema
    blocks, schema = sheet_blocks(files, opts.sheet, columns, opts.batch_size * 4)
    return ray.data.from_arrow(blocks), schema


def sheet_blocks(files: list[Path], sheet: str | None, columns: list[str],
                 rows: int) -> tuple[list[pa.Table], pa.Schema]:
    """The sheets' rows in blocks of `rows` rows, all with one schema (`common_schema`): the
    blocks go to the actors in turn, and Ray Data's progress counts them."""
    sheets = [pa.Table.from_pandas(_arrow_safe(read_xlsx(f, sheet), columns), preserve_index=False)
              for f in files]
    schema = common_schema([table.schema for table in sheets])
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


def _embed(dataset, opts: JobOptions, task: str, columns: list[str], prefixes: list[str]):
    from ray.data import ActorPoolStrategy

    gpu_fraction, warm = opts.placement()
    actors = opts.actors or _default_actors(gpu_fraction)
    logger.info("Embedding with %d actor(s), %s GPU each, %d rows a batch",
                actors, gpu_fraction or "no", opts.batch_size)
    _say_if_the_actors_do_not_fit(actors, opts.args.replica_cpus, gpu_fraction)
    remote_args = {}
    if warm is not None:
        remote_args["runtime_env"] = {"py_executable": warm}
    return dataset.map_batches(
        EmbedRows,
        fn_constructor_kwargs={
            "args": opts.args.model_dump(),
            "spec": asdict(opts.spec),
            "gpu_fraction": gpu_fraction,
        },
        fn_kwargs={"task": task, "columns": columns, "prefixes": prefixes,
                   "dimensions": opts.dimensions},
        batch_size=opts.batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=actors),
        num_cpus=opts.args.replica_cpus,
        num_gpus=gpu_fraction or None,
        **remote_args,
    )


def prepare_warm_start(args: AppArgs, spec: ModelSpec) -> None:
    """Before Ray starts: the actors' zygote imports torch and transformers meanwhile.

    It gets the job once Ray is up (`JobOptions.placement`), or exits if warm start
    turns out not to apply. The GPU check here is of this machine only; the cluster's
    comes later.
    """
    from serve_app.ray_shell.resources import resolve_gpu_fraction
    from serve_app.ray_shell.warmstart import early_zygote, preload_for, warm_start_enabled

    # An explicit share is taken as given: its check (and warning) is the cluster's, later.
    gpu_fraction = resolve_gpu_fraction(None) if args.gpu_fraction is None else args.gpu_fraction
    if warm_start_enabled(args.warm_start, gpu_fraction):
        early_zygote(preload_for(spec.model_type))


def warm_start_executable(args: AppArgs, spec: ModelSpec, gpu_fraction: float) -> str | None:
    """Start the embedding actors through a warm-start zygote: their `py_executable`, or None.

    The zygote, started before Ray (`prepare_warm_start`) or else here, imports Ray,
    torch and transformers (3.4 s on 2 cores) while Ray starts and Ray Data plans the job;
    each actor on this node is then forked from it with all of that done. The zygote belongs to
    this job (Ray's core library fixes a process's job id when loaded) and exits with
    this driver. Actors on other nodes start the ordinary way. None where it does not
    apply: GPU actors (as for the service), `warm_start=off`, or a job whose runtime
    environment brings its own interpreter (pip, uv, conda, a container).
    """
    from serve_app.ray_shell.warmstart import (
        driver_zygote,
        drop_early_zygotes,
        py_executable,
        warm_start_enabled,
    )

    if not warm_start_enabled(args.warm_start, gpu_fraction) or set(_job_runtime_env()) & _OWN_INTERPRETER:
        drop_early_zygotes()  # one started before Ray (`prepare_warm_start`) is not needed
        return None
    driver_zygote(spec.model_type)
    return py_executable(spec.model_type, new_zygote=False)


_OWN_INTERPRETER = {"pip", "uv", "conda", "container", "image_uri", "py_executable"}


def _job_runtime_env() -> dict:
    """This job's runtime environment: what `ray job submit` and `ray.init` gave it."""
    import ray

    return dict(ray.get_runtime_context().runtime_env)


def _say_if_the_actors_do_not_fit(actors: int, cpus_each: float, gpus_each: float) -> None:
    """A line when the cluster cannot hold every actor now: the job runs on those that start."""
    import ray

    have = ray.cluster_resources()
    short = {name: (each, have.get(name, 0.0))
             for name, each in (("CPU", cpus_each), ("GPU", gpus_each))
             if each and actors * each > have.get(name, 0.0) + 1e-9}
    if not short:
        return
    needs = "; ".join(f"{_count(actors * each, name)} ({each:g} each), and this cluster has "
                      f"{total:g} now" for name, (each, total) in short.items())
    fit = min(int(total / each + 1e-9) for each, total in short.values())
    if fit:
        logger.warning("%d actors need %s. The job runs on the %d that fit, and more start if "
                       "nodes join.", actors, needs, fit)
    else:
        logger.warning("%d actors need %s. None can start until nodes join: on a cluster that "
                       "adds none, stop the job (Ctrl-C or ray job stop).", actors, needs)


def _count(amount: float, unit: str) -> str:
    return f"{amount:g} {unit}" + ("" if amount == 1 else "s")


def _default_actors(gpu_fraction: float) -> int:
    """One actor per GPU share on GPU clusters; one per node on CPU clusters (it uses every core)."""
    import ray

    if gpu_fraction > 0:
        return max(1, int(ray.cluster_resources().get("GPU", 0) / gpu_fraction))
    return max(1, sum(1 for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU")))


def _collect(dataset, schema: pa.Schema) -> pa.Table:
    """All of `dataset`'s rows, with `schema`: Ray Data hands an input with no rows to no
    actor, so no batch would say what columns the result has."""
    batches = list(dataset.iter_batches(batch_format="pyarrow", batch_size=None))
    if not batches:
        return schema.empty_table()
    return conform(pa.concat_tables(batches, promote_options="default"), schema)
