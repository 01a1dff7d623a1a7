"""Calls from the ingress to the `Embedder` deployment, and what Ray's failures become.

A chunk whose replica went away is resent once, after a short back-off, unless Ray
says the replica was killed for memory. Ray's failures are matched by type. The calls
go over gRPC or as Ray actor calls as the ingress's own Ray settings say, not as the
process that built the app happened to be set up (`handle_for_this_replica`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass

from ray import serve
from ray.exceptions import OutOfMemoryError, RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
from ray.serve.handle import DeploymentHandle

from serve_app.core.encoded import Item
from serve_app.core.errors import ModelUnavailable, Overloaded

logger = logging.getLogger("ray.serve")

# Ray failures that mean "this replica went away", so the request can go to another
# (ActorDiedError and ActorUnavailableError are RayActorErrors).
_REPLICA_LOST = (RayActorError, ReplicaUnavailableError)
_MAX_ATTEMPTS = 2  # one resend
_RETRY_BACKOFF_S = 0.5  # times 1 to 2, so that callers that lost one replica spread out


@dataclass
class Failure:
    """What a replica whose model failed to load answers instead of an embedding."""

    message: str


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

    async def embed(self, texts: list[Item]):
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


def handle_for_this_replica(handle: DeploymentHandle) -> DeploymentHandle:
    """`handle`, sending over gRPC or as Ray actor calls as this replica's Ray settings say.

    A handle carries its transport from the process that built the app: the driver of
    `serve run`, a benchmark, or Serve's controller for `serve deploy`. A driver whose
    environment lacks RAY_SERVE_THROUGHPUT_OPTIMIZED (or imported Ray before setting it)
    builds handles that use actor calls, even on a cluster started for gRPC; so the
    ingress decides by its own environment, which is the cluster's: Ray's
    RAY_SERVE_USE_GRPC_BY_DEFAULT, on under the throughput profile.
    """
    from ray.serve._private import constants  # read at the call: Ray sets it at import

    return handle.options(_by_reference=not constants.RAY_SERVE_USE_GRPC_BY_DEFAULT)


async def _await(response):
    return await response
