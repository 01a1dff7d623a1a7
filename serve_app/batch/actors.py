"""The model actors of a batch job (`EmbedRows`: the service's `TextEmbedder` and forward
workers, loaded once per actor), how many there are, where they start (a warm-start
zygote), and the options every command shares (`JobOptions`)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

from serve_app.batch.errors import JobInputError
from serve_app.batch.progress import EVERY_S
from serve_app.batch.tables import texts_of
from serve_app.core.config import AppArgs
from serve_app.core.modelinfo import ModelSpec

logger = logging.getLogger(__name__)

EMBEDDING_TYPE = pa.list_(pa.float32())
# Per row, how many of its texts were longer than the model reads (each embedded from its
# start): the actors add it, the driver counts it (`texts_cut`) and never writes it.
CUT_COLUMN = "__texts_cut__"


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
    input_rows: tuple[int | None, ...] | None = None  # each input file's (embed, similarity), counted before Ray
    progress_every: float = EVERY_S  # seconds between two progress lines at most (0: every block)
    texts_cut: int = field(default=0, init=False)  # texts longer than the model reads, so far
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

    def pool_size(self) -> int:
        """The model actors: `--actors`, else one per GPU share or per CPU node (once Ray is up)."""
        return self.actors or _default_actors(self.placement()[0])


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
        vectors, cut = await self.vectors([texts_of(batch[name]) for name in columns], prefixes, dimensions)
        if task == "embed":
            batch = batch.append_column("embedding", embedding_array(vectors[0]))
        else:
            batch = batch.append_column("similarity", pair_scores(*vectors))
        return batch.append_column(CUT_COLUMN, pa.array(cut, type=pa.int32()))

    async def vectors(self, columns: list[list[str | None]], prefixes: list[str],
                      dimensions: int | None) -> tuple[list[list[np.ndarray | None]], list[int]]:
        """Each column's vectors, None for blanks, and how many of each row's texts were
        longer than the model reads; each distinct text (with its column's prefix) is
        embedded once."""
        from serve_app.core.vectors import truncate

        unique: dict[str, int] = {}
        rows = [[None if text is None else unique.setdefault(prefix + text, len(unique)) for text in texts]
                for texts, prefix in zip(columns, prefixes, strict=True)]
        height = len(columns[0]) if columns else 0
        if not unique:
            return [[None] * len(texts) for texts in columns], [0] * height
        encoded = await self.scheduler.embed(list(unique))
        matrix = truncate(encoded.vectors, dimensions)
        cut = [sum(column[i] is not None and bool(encoded.truncated[column[i]]) for column in rows)
               for i in range(height)]
        return [[None if row is None else matrix[row] for row in column] for column in rows], cut

    async def encode(self, texts: list[str]) -> np.ndarray:
        return (await self.scheduler.embed(texts)).vectors


def texts_cut(batch: pa.Table) -> int:
    """How many of a batch's texts the actors embedded from their start only (`CUT_COLUMN`)."""
    if CUT_COLUMN not in batch.column_names:
        return 0
    import pyarrow.compute as pc

    return pc.sum(batch[CUT_COLUMN]).as_py() or 0


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


def block_rows(rows: int | None, batch_size: int, actors: int) -> int:
    """The rows of a block the actors are handed: four batches at most, fewer where the
    table is too small for every actor to get a batch. Ray Data read a CSV or Parquet file
    in blocks of 1 MiB or more (5,000 rows of short texts): the job's progress moved in
    steps of 5,000 rows, and a fifth actor of a 20,000-row file had nothing to do. `rows`
    None (a sheet that does not say): four batches."""
    if not rows:
        return batch_size * 4
    # No block under a batch: Ray Data bundles smaller blocks up to a batch for an actor,
    # so two of 250 rows (1,000 rows for four actors) went to one actor together.
    blocks = max(-(-rows // (batch_size * 4)), min(max(1, rows // batch_size), actors))
    return -(-rows // blocks)


def embed_rows(dataset, opts: JobOptions, task: str, columns: list[str], prefixes: list[str],
               rows: int | None = None):
    """`dataset` (of `rows` rows, where known) with the task's column added by a pool of
    `EmbedRows` actors. On a cluster, a job on GPUs without `--actors` starts with the
    actors that fit now (at least one) and adds more as GPU nodes join, up to one a block
    (`block_rows`). Otherwise the pool is fixed: on CPUs an actor uses every core of its
    node, and no node joins a Ray the job started for itself."""
    from ray.data import ActorPoolStrategy

    gpu_fraction, warm = opts.placement()
    actors = opts.pool_size()
    # Sized when the job starts, a cluster that scales its GPU nodes from zero (cluster.yaml)
    # had no GPU: one actor, on a quarter of one GPU, for the whole job.
    grows = opts.actors is None and gpu_fraction > 0 and not _ray_of_its_own()
    most = max(actors, -(-rows // block_rows(rows, opts.batch_size, actors))) if grows and rows else None
    if grows:
        logger.info("Embedding with %s to start, and more as the cluster's GPUs allow (up to %s), "
                    "%g GPU each, %d rows a batch", _count(actors, "actor"),
                    f"{most:,}" if most else "one a block", gpu_fraction, opts.batch_size)
        compute = ActorPoolStrategy(min_size=actors, max_size=most)
    else:
        logger.info("Embedding with %s, %s GPU each, %d rows a batch", _count(actors, "actor"),
                    f"{gpu_fraction:g}" if gpu_fraction else "no", opts.batch_size)
        compute = ActorPoolStrategy(size=actors)
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
        compute=compute,
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
    """A line when the cluster cannot hold every actor now: the job runs on those that start.
    Where none can, on a Ray the job started for itself (which no node joins), it fails."""
    import ray

    have = ray.cluster_resources()
    short = {name: (each, have.get(name, 0.0))
             for name, each in (("CPU", cpus_each), ("GPU", gpus_each))
             if each and actors * each > have.get(name, 0.0) + 1e-9}
    if not short:
        return

    def needs(place: str) -> str:
        return "; ".join(f"{_count(actors * each, name)} ({each:g} each), and {place} has {total:g} now"
                         for name, (each, total) in short.items())

    fit = min(int(total / each + 1e-9) for each, total in short.values())
    own = _ray_of_its_own()
    if fit:
        logger.warning("%s %s. The job runs on the %d that fit%s.", _count(actors, "actor"),
                       _need(actors, needs("this cluster")), fit,
                       "" if own else ", and more start if nodes join")
    elif own:
        fixes = {"GPU": "run it with --gpu-fraction 0 to embed on this machine's CPU, or submit it to "
                        "a cluster with GPUs (ray job submit)",
                 "CPU": f"set replica_cpus (in --config) to {have.get('CPU', 0.0):g} or fewer"}
        raise JobInputError(
            f"{_count(actors, 'actor')} {_need(actors, needs('this machine'))}, "
            f"so none can start on the Ray this job started for itself: "
            + "; ".join(fixes[name] for name in short) + ".")
    else:
        logger.warning("%s %s. None can start until nodes join: on a cluster that adds none, stop "
                       "the job (Ctrl-C or ray job stop).", _count(actors, "actor"),
                       _need(actors, needs("this cluster")))


def _ray_of_its_own() -> bool:
    """Whether this driver started the Ray it runs on (`python -m serve_app.batch` with no
    cluster to join) rather than joining one: no node joins such a Ray. Ray says so only
    on its node object; where that is missing, False (the job waits, as on a cluster)."""
    from ray._private import worker

    return getattr(getattr(worker, "_global_node", None), "head", False) is True


def _count(amount: float, unit: str) -> str:
    return f"{amount:g} {unit}" + ("" if amount == 1 else "s")


def _need(actors: int, what: str) -> str:
    return f"{'needs' if actors == 1 else 'need'} {what}"


def _default_actors(gpu_fraction: float) -> int:
    """One actor per GPU share on GPU clusters; one per node on CPU clusters (it uses every core)."""
    import ray

    if gpu_fraction > 0:
        return max(1, int(ray.cluster_resources().get("GPU", 0) / gpu_fraction))
    return max(1, sum(1 for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU")))
