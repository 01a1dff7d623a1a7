"""The two Ray Serve deployments: the light HTTP `Ingress` and the `Embedder` model replica.

`Ingress` runs the Starlette app and never imports torch, so it stays up (and
answers /health) while `Embedder` scales to zero. `Embedder` loads the model in
its constructor and hands every request to its forward scheduler
(serve_app.model.scheduler), which pools the texts of requests that arrive while
the model is busy into shared passes and answers each request as soon as its own
texts are done. The app builder is in app.py, the handle calls and their failures
in transport.py.
"""

from __future__ import annotations

import logging
import threading
import time

from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.core.config import AppArgs
from serve_app.core.encoded import Item
from serve_app.core.errors import ModelOutputError
from serve_app.core.modelinfo import ModelSpec, model_version
from serve_app.ray_shell.metrics import Metrics
from serve_app.ray_shell.transport import Failure, RayBackend, handle_for_this_replica
from serve_app.ray_shell.warmstart import ensure_zygote, preload_for
from serve_app.web.api import create_app
from serve_app.web.service import EmbeddingService

logger = logging.getLogger("ray.serve")

APP_NAME = "embeddings"
# No access-log line per request (it costs a measurable part of a ~20 ms request on a
# 2-core machine, and request logs are the operator's choice); warnings still show.
_LOGGING = {"enable_access_log": False}
@serve.deployment(name="Embedder")
class Embedder:
    """One model replica: loads the model once, embeds requests in shared forward passes."""

    def __init__(self, args: dict, spec: dict, gpu_fraction: float) -> None:
        settings = AppArgs.model_validate(args)
        self._version = model_version(ModelSpec(**spec), settings.max_input_tokens, settings.dtype,
                                      settings.device)
        self._metrics = Metrics()
        self._scheduler = None  # a ForwardScheduler once the model is loaded
        self._heap = None  # its HeapTrimmer
        self._model = None
        self._failure: str | None = None
        self._failed_at = 0.0
        self._sped_up: list[str] | None = None  # what _speed_up did, once it is done
        self._health_period_s = settings.health_check_period_s
        started = time.perf_counter()
        age = _process_age_s()
        # The replica's start, step by step, for operators and the cold-start benchmark
        # (describe()): when its process started, and seconds per step since.
        self._startup = {"process_started_at": time.time() - age, "before_constructor_s": age}
        try:
            # Heavy imports live here, not at module level, so the ingress stays light.
            from serve_app.model.embedder import TextEmbedder
            from serve_app.model.hardware import default_cpu_threads, default_forward_workers
            from serve_app.model.heap import HeapTrimmer
            from serve_app.model.scheduler import ForwardScheduler, home_thread

            self._startup["imports_s"] = time.perf_counter() - started
            cpus = settings.cpu_threads or default_cpu_threads()
            # Loaded on the thread that then runs worker 0's passes: torch on a second
            # thread with several cores would slow every pass (see the scheduler).
            home = home_thread()
            loading = time.perf_counter()
            self._model = home.submit(
                TextEmbedder.from_settings, ModelSpec(**spec), settings, gpu_fraction, cpus
            ).result()
            self._startup["model_s"] = time.perf_counter() - loading
            self._startup["weights_s"] = self._model.load_s  # weights and tokenizer, side by side
            # Passes of many shapes leave the heap holding freed memory (heap.py).
            self._heap = HeapTrimmer()
            self._scheduler = ForwardScheduler(
                self._model.encode,
                workers=settings.forward_workers
                or default_forward_workers(self._model.device, cpus),
                cpus=cpus,
                max_texts=settings.max_batch_texts,
                wait_s=settings.batch_wait_timeout_s,
                on_pass=self._record_pass,
                on_idle=self._heap.when_idle,
                home=home,
            )
            # The first forward pass pays one-off kernel set-up.
            self._startup["first_pass_s"] = self._warm_up()
            # On a shared GPU: the kernels loaded count against this replica's share.
            if (share := home.submit(self._model.settle_gpu_share).result()) is not None:
                logger.info(share)
            # After the replica is ready, not before: packing the weights takes a second or
            # two of memory writes and the row check two passes, which would lengthen every
            # cold start; meanwhile the plain paths serve. On one core, for the reason above.
            threading.Thread(target=self._speed_up, name="speed-up", daemon=True).start()
        except Exception as exc:
            # The traceback (paths included) goes to the replica's log; clients get a
            # sentence without it, and check_health has Ray replace this replica.
            logger.exception("Model %s failed to load", spec.get("name"))
            self._failure = (
                f"The model '{settings.model_id}' failed to load on its replica "
                f"({type(exc).__name__}); the service is starting a new one. Retry shortly."
            )
            self._failed_at = time.monotonic()
        self._startup["constructor_s"] = time.perf_counter() - started
        self._startup["ready_at"] = time.time()
        ready_s = age + self._startup["constructor_s"]  # since the process started
        logger.info(
            "Embedder ready in %.2f s since its process started: %s", ready_s,
            ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.2f} s"
                      for k, v in self._startup.items() if k.endswith("_s")),
        )
        self._metrics.inc("embed_cold_starts_total")
        self._metrics.observe("embed_model_load_seconds", ready_s)

    def _warm_up(self) -> float:
        started = time.perf_counter()
        try:
            return self._scheduler.warm_up(["warm up"])
        except ModelOutputError as exc:
            # The model loaded, and its precision fails on some texts (float16 overflowing):
            # each such request gets that sentence. Marking the replica failed would have
            # Ray replace it for ever, every new one failing its warm-up the same way.
            logger.warning("The warm-up pass failed: %s", exc.message)
            return time.perf_counter() - started

    def _speed_up(self) -> None:
        try:
            sentences = self._model.speed_up(threads=1)
        except Exception as exc:  # the plain layers keep serving
            logger.exception("Turning on the CPU fast paths failed; the plain paths keep serving")
            sentences = [f"Turning on the CPU fast paths failed ({type(exc).__name__}); "
                         "the plain paths keep serving"]
        for sentence in sentences:
            logger.info(sentence)
        self._sped_up = sentences

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
            "weights_packed": bool(self._model and self._model.weights_packed),
            "elementwise_fused": bool(self._model and self._model.elementwise_fused),
            "rows_shared": bool(self._model and self._model.rows_shared),
            # None until the background turn-on of those fast paths has ended, then a
            # sentence on each (a replica serves at full speed from then on).
            "speed_up": self._sped_up,
            "gpu_share": self._model.gpu_share if self._model else None,  # MiB, on a shared GPU
            "failure": self._failure,
            "startup": self._startup,
            # Since the replica started (its warm-up pass aside); Prometheus has them too,
            # as embed_batch_texts_count and _sum.
            "forward_passes": int(self._metrics.count("embed_batch_texts_count")),
            "texts_embedded": int(self._metrics.count("embed_batch_texts_sum")),
            # Free heap pages given back as the replica went idle (heap.py).
            "heap_trims": self._heap.trims if self._heap else 0,
            "heap_trimmed_bytes": self._heap.trimmed_bytes if self._heap else 0,
        }

    def reconfigure(self, config: dict) -> None:
        """Live batch limits from the deployment's user_config."""
        if self._scheduler is not None:
            self._scheduler.max_texts = config["max_batch_texts"]
            self._scheduler.wait_s = config["batch_wait_timeout_s"]

    # No @serve.batch: it answers the requests it groups only when the whole group is
    # done, so a one-cell request that arrived beside a long column waited for all of
    # the column's passes. The scheduler pools waiting texts into shared passes itself
    # and answers each request when its own texts are done.
    async def embed(self, texts: list[Item]):
        # A replica whose start failed after its scheduler existed (its warm-up pass, say)
        # answers as one whose model never loaded: Ray is replacing it.
        if self._scheduler is None or self._failure is not None:
            return Failure(self._failure or "The model is not loaded.")
        encoded = await self._scheduler.embed(texts)
        encoded.version = self._version
        return encoded


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
        if not self._api_key_digests:
            logger.warning(
                "No API keys: anyone who can reach the service's port can use it. Keys come from "
                "EMBED_API_KEYS (or their digests, EMBED_API_KEY_DIGESTS) in the environment of the "
                "process that builds the app: for "
                "`python -m serve_app`, its own; for `serve deploy` to a running cluster, that of "
                "`ray start` on the head node. GET /health says whether keys are on (api_keys).")
        if warm_start:
            # Have the zygote import torch now, so the first cold start finds it ready.
            import os

            # It retires with the job: this ingress lives here as long as the application.
            ensure_zygote(preload_for(spec["model_type"]), os.getppid(), job_bound=True)
        app_name = serve.get_replica_context().app_name
        backend = RayBackend(handle_for_this_replica(embedder), settings.request_timeout_s,
                             app_name, settings.health_check_period_s)
        self._service = EmbeddingService(settings, ModelSpec(**spec), backend, Metrics())

    def __serve_build_asgi_app__(self):
        return create_app(self._service, self._api_key_digests)
