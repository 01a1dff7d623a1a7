"""The Ray Serve shell: a light HTTP ingress and the `Embedder` model deployment.

`Ingress` runs the Starlette app and never imports torch, so it stays up (and
answers /health) while `Embedder` scales to zero. `Embedder` loads the model in
its constructor and batches requests dynamically with `@serve.batch`, counting
texts rather than requests.
"""

# No `from __future__ import annotations` here: Ray Serve reads build_app's
# annotation at run time to turn `key=value` arguments into AppArgs.
import asyncio
import logging
import random
import time
from dataclasses import asdict, dataclass

import click
from ray import serve
from ray.exceptions import OutOfMemoryError, RayActorError
from ray.serve import Application
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
from ray.serve.handle import DeploymentHandle

from serve_app.api import create_app
from serve_app.auth import key_digests_from_env
from serve_app.config import AppArgs
from serve_app.errors import ModelLoadError, ModelUnavailable, Overloaded
from serve_app.metrics import Metrics
from serve_app.modelinfo import ModelSpec, resolve_model
from serve_app.resources import resolve_gpu_fraction, resolve_max_replicas
from serve_app.scheduler import ForwardScheduler
from serve_app.service import EmbeddingService
from serve_app.warmstart import ensure_zygote, preload_for, py_executable, warm_start_enabled

logger = logging.getLogger("ray.serve")

APP_NAME = "embeddings"
# No access-log line per request (it costs a measurable part of a ~20 ms request on a
# 2-core machine, and request logs are the operator's choice); warnings still show.
_LOGGING = {"enable_access_log": False}
# Ray failures that mean "this replica went away", so the request can go to another
# (ActorDiedError and ActorUnavailableError are RayActorErrors).
_REPLICA_LOST = (RayActorError, ReplicaUnavailableError)
_MAX_ATTEMPTS = 2  # one resend
_RETRY_BACKOFF_S = 0.5  # times 1 to 2, so that callers that lost one replica spread out


@dataclass
class Failure:
    """What a replica whose model failed to load answers instead of an embedding."""

    message: str


def count_texts(chunks: list[list[str]]) -> int:
    """@serve.batch's batch size, in texts rather than requests."""
    return sum(len(chunk) for chunk in chunks)


@serve.deployment(name="Embedder")
class Embedder:
    """One model replica: loads the model once, embeds dynamic batches of texts."""

    def __init__(self, args: dict, spec: dict, gpu_fraction: float) -> None:
        settings = AppArgs.model_validate(args)
        self._metrics = Metrics()
        self._scheduler: ForwardScheduler | None = None
        self._model = None
        self._failure: str | None = None
        self._failed_at = 0.0
        self._health_period_s = settings.health_check_period_s
        started = time.perf_counter()
        try:
            # Heavy imports live here, not at module level, so the ingress stays light.
            from serve_app.embedder import (
                TextEmbedder,
                default_cpu_threads,
                default_forward_workers,
            )

            cpus = settings.cpu_threads or default_cpu_threads()
            self._model = TextEmbedder.from_settings(ModelSpec(**spec), settings, gpu_fraction, cpus)
            self._scheduler = ForwardScheduler(
                self._model.encode,
                workers=settings.forward_workers
                or default_forward_workers(self._model.device, cpus),
                cpus=cpus,
                max_texts=settings.max_batch_texts,
                on_pass=self._record_pass,
            )
            # The first forward pass pays one-off kernel set-up, and tells the scheduler
            # what a pass costs here (whether a short request may run on the loop).
            logger.info("First forward pass %.2f s", self._scheduler.warm_up(["warm up"]))
        except Exception as exc:
            # The traceback (paths included) goes to the replica's log; clients get a
            # sentence without it, and check_health has Ray replace this replica.
            logger.exception("Model %s failed to load", spec.get("name"))
            self._failure = (
                f"The model '{settings.model_id}' failed to load on its replica "
                f"({type(exc).__name__}); the service is starting a new one. Retry shortly."
            )
            self._failed_at = time.monotonic()
        logger.info(
            "Embedder ready: constructor %.2f s, process start-up before it %.2f s",
            time.perf_counter() - started, _process_age_s() - (time.perf_counter() - started),
        )
        self._metrics.inc("embed_cold_starts_total")
        self._metrics.observe("embed_model_load_seconds", _process_age_s())

    def check_health(self) -> None:
        """Ray's health check: a replica whose model failed to load reports unhealthy.

        Ray then replaces it, after one period of grace and three failed checks
        (`health_check_period_s` each): the back-off between attempts, during which
        requests get a quick 503 with Retry-After rather than waiting. A transient failure (a file still being
        copied, memory briefly short) thus heals by itself.
        """
        # Healthy for one period first: Ray checks a replica as it starts, and one that
        # fails then is retried in a tight loop with requests held; this way they get
        # the 503 meanwhile.
        if self._failure is not None and time.monotonic() - self._failed_at >= self._health_period_s:
            raise RuntimeError(self._failure)

    def _record_pass(self, texts: int, waited_s: float) -> None:
        self._metrics.observe("embed_batch_texts", texts)
        self._metrics.observe("embed_queue_wait_seconds", waited_s)

    def describe(self) -> dict:
        """Where this replica runs and what it holds (for operators and tests)."""
        import os

        import ray

        context = ray.get_runtime_context()
        return {
            "pid": os.getpid(),
            "node_id": context.get_node_id(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "device": str(self._model.device) if self._model else None,
            "loaded": self._model is not None,
            "failure": self._failure,
        }

    def reconfigure(self, config: dict) -> None:
        """Live batch limits from the deployment's user_config."""
        self.embed.set_max_batch_size(config["max_batch_texts"])
        self.embed.set_batch_wait_timeout_s(config["batch_wait_timeout_s"])
        if self._scheduler is not None:
            self._scheduler.max_texts = config["max_batch_texts"]

    # @serve.batch groups requests that arrive together; the scheduler behind it decides
    # when they run, so batches are passed on at once (many may wait there).
    @serve.batch(
        max_batch_size=64, batch_wait_timeout_s=0.0, max_concurrent_batches=64,
        batch_size_fn=count_texts,
    )
    async def embed(self, chunks: list[list[str]]) -> list:
        if self._scheduler is None:
            return [Failure(self._failure or "The model is not loaded.")] * len(chunks)
        encoded = await self._scheduler.embed([text for chunk in chunks for text in chunk])
        results, start = [], 0
        for chunk in chunks:
            results.append(encoded.slice(start, start + len(chunk)))
            start += len(chunk)
        return results


def _process_age_s() -> float:
    """Seconds since this process started (Linux; 0 elsewhere)."""
    try:
        import os
        from pathlib import Path

        stat = Path(f"/proc/{os.getpid()}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


class RayBackend:
    """Sends chunks to `Embedder` through a deployment handle, translating Ray's failures.

    A chunk whose replica went away is resent once, after a short back-off, unless
    Ray says the replica was killed for memory: that chunk may be what killed it,
    and sending it again would take another replica (and everyone's work on it)
    down too. A cancelled chunk cancels its Ray request.
    """

    def __init__(self, handle: DeploymentHandle, timeout_s: float, app_name: str,
                 health_check_period_s: float = 10.0) -> None:
        self.handle = handle
        self.timeout_s = timeout_s
        self.app_name = app_name
        self.health_check_period_s = health_check_period_s
        self._state: tuple[float, str] = (0.0, "unknown")
        self._state_lock = asyncio.Lock()

    async def embed(self, texts: list[str]):
        deadline = time.monotonic() + self.timeout_s
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            response = self.handle.embed.remote(texts)
            try:
                result = await asyncio.wait_for(_await(response), deadline - time.monotonic())
            except asyncio.CancelledError:
                response.cancel()  # the client left, or a sibling chunk failed
                raise
            except BackPressureError as exc:
                raise Overloaded(
                    "The embedding service is at capacity; retry shortly.",
                    code="overloaded",
                    retry_after_s=2,
                ) from exc
            except TimeoutError:
                response.cancel()
                raise ModelUnavailable(
                    f"The model did not answer within {self.timeout_s:.0f} s "
                    "(request_timeout_s); it may still be starting. Retry shortly.",
                    code="model_timeout",
                    retry_after_s=10,
                ) from None
            except DeploymentUnavailableError as exc:
                raise ModelUnavailable(
                    "The model could not be started on any replica; the operator should "
                    "check the service's log.",
                    code="model_unavailable",
                    retry_after_s=60,
                ) from exc
            except (*_REPLICA_LOST, OutOfMemoryError) as exc:
                if _killed_for_memory(exc):
                    raise ModelUnavailable(
                        "The model's replica ran out of memory on this request and was "
                        "restarted; send fewer or shorter texts per request.",
                        code="replica_out_of_memory",
                        retry_after_s=5,
                    ) from exc
                backoff = _RETRY_BACKOFF_S * (1 + random.random())
                if attempt == _MAX_ATTEMPTS or time.monotonic() + backoff >= deadline:
                    raise ModelUnavailable(
                        "The model's replica stopped twice while working on this request; "
                        "retry shortly.",
                        code="replica_lost",
                        retry_after_s=5,
                    ) from exc
                # Embedding is idempotent: work lost with a replica is sent once more.
                logger.warning("Replica lost mid-request (%s); retrying in %.1f s",
                               type(exc).__name__, backoff)
                await asyncio.sleep(backoff)
                continue
            if isinstance(result, Failure):
                raise ModelUnavailable(
                    result.message, code="model_unavailable",
                    retry_after_s=4 * self.health_check_period_s,
                )
            return result
        raise AssertionError("unreachable")

    async def replica_state(self) -> str:
        """Running Embedder replicas, from the controller (cached; never wakes the model).

        `serve.status()` blocks on a controller call, so it runs on a thread: the
        ingress's event loop keeps serving while it waits.
        """
        async with self._state_lock:
            checked, state = self._state
            if time.monotonic() - checked < 2.0:
                return state
            state = await asyncio.to_thread(self._replica_state_now)
            self._state = (time.monotonic(), state)
            return state

    def _replica_state_now(self) -> str:
        try:
            status = serve.status().applications[self.app_name].deployments["Embedder"]
            states = {k: v for k, v in status.replica_states.items() if v}
            running = states.pop("RUNNING", 0)
            if running:
                return f"{running} running"
            if states:
                return ", ".join(f"{v} {k.lower()}" for k, v in sorted(states.items()))
            return "scaled to zero"
        except Exception:  # status is informative only
            return "unknown"


def _killed_for_memory(exc: BaseException) -> bool:
    """Whether Ray reports that the replica was killed for lack of memory."""
    if isinstance(exc, OutOfMemoryError):
        return True
    text = str(exc).lower()
    return "memory monitor" in text or "out of memory" in text or "low on memory" in text


async def _await(response):
    return await response


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """The HTTP front: validation, prompts, chunking; no torch."""

    def __init__(
        self,
        embedder: DeploymentHandle,
        args: dict,
        spec: dict,
        warm_start: bool = False,
        api_key_digests: list[str] | None = None,
    ) -> None:
        settings = AppArgs.model_validate(args)
        self._api_key_digests = api_key_digests or []
        if warm_start:
            # Have the zygote import torch now, so the first cold start finds it ready.
            import os

            ensure_zygote(preload_for(spec["model_type"]), os.getppid())
        app_name = serve.get_replica_context().app_name
        backend = RayBackend(embedder, settings.request_timeout_s, app_name,
                             settings.health_check_period_s)
        self._service = EmbeddingService(settings, ModelSpec(**spec), backend, Metrics())

    def __serve_build_asgi_app__(self):
        return create_app(self._service, self._api_key_digests)


class StartupError(ModelLoadError, click.ClickException):
    """A model that cannot be loaded; Ray's CLI prints it as one line, no traceback."""

    def __init__(self, message: str) -> None:
        ModelLoadError.__init__(self, message)
        click.ClickException.__init__(self, message)


def build_app(args: AppArgs) -> Application:
    """The Serve application for `serve run serve_app:build_app` and serve_config.yaml."""
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args or {})
    try:
        spec = resolve_model(args.model)
    except ModelLoadError as exc:
        raise StartupError(str(exc)) from None
    gpu = resolve_gpu_fraction(args.gpu_fraction)
    autoscaling = {
        "min_replicas": args.min_replicas,
        "max_replicas": resolve_max_replicas(args.max_replicas, gpu),
        "initial_replicas": args.initial_replicas,
        "target_ongoing_requests": args.target_ongoing_requests,
        "upscale_delay_s": args.upscale_delay_s,
        "downscale_delay_s": args.downscale_delay_s,
        "downscale_to_zero_delay_s": args.idle_timeout_s,
        "look_back_period_s": args.autoscaling_look_back_s,
        "metrics_interval_s": args.autoscaling_metrics_interval_s,
    }
    actor_options: dict = {"num_cpus": args.replica_cpus, "num_gpus": gpu}
    warm = warm_start_enabled(args.warm_start, gpu)
    if warm:
        actor_options["runtime_env"] = {"py_executable": py_executable(spec.model_type)}
    embedder = Embedder.options(
        ray_actor_options=actor_options,
        autoscaling_config=autoscaling,
        max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests,
        user_config={
            "max_batch_texts": args.max_batch_texts,
            "batch_wait_timeout_s": args.batch_wait_timeout_s,
        },
        health_check_period_s=args.health_check_period_s,
        graceful_shutdown_timeout_s=30,
        logging_config=_LOGGING,
    ).bind(args.model_dump(), asdict(spec), gpu)
    return Ingress.options(
        num_replicas=args.ingress_replicas,
        ray_actor_options={"num_cpus": 0},
        # The ingress only awaits; let it hold many requests while the model works.
        max_ongoing_requests=max(256, args.max_ongoing_requests * 4),
        logging_config=_LOGGING,
    ).bind(embedder, args.model_dump(), asdict(spec), warm, key_digests_from_env())
