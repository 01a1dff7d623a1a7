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
    Ray says the replica was killed for memory (in its error, or over gRPC in the
    GCS's record of the death): that chunk may be what killed it, and sending it again
    would take another replica (and everyone's work on it) down too. A cancelled chunk
    cancels its Ray request.
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
                backoff = _RETRY_BACKOFF_S * (1 + random.random())
                resend_at = time.monotonic() + backoff
                # The back-off is also the wait for the GCS to record why the replica died.
                if _killed_for_memory(exc) or _oom_cause(await death_cause(exc, backoff)):
                    raise ModelUnavailable(
                        "The model's replica ran out of memory on this request and was "
                        "restarted; send fewer or shorter texts per request.",
                        code="replica_out_of_memory",
                        retry_after_s=5,
                    ) from exc
                if attempt == _MAX_ATTEMPTS or resend_at >= deadline:
                    raise ModelUnavailable(
                        "The model's replica stopped twice while working on this request; "
                        "retry shortly.",
                        code="replica_lost",
                        retry_after_s=5,
                    ) from exc
                # Embedding is idempotent: work lost with a replica is sent once more.
                logger.warning("Replica lost mid-request (%s); resending after a %.1f s back-off",
                               type(exc).__name__, backoff)
                await asyncio.sleep(max(0.0, resend_at - time.monotonic()))
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
    """Whether Ray's error itself says that the replica was killed for lack of memory."""
    if isinstance(exc, OutOfMemoryError):
        return True
    text = str(exc).lower()
    return "memory monitor" in text or "out of memory" in text or "low on memory" in text


def _oom_cause(cause: str) -> bool:
    """Whether a death cause recorded by the GCS is Ray's memory monitor's."""
    return "oom_context" in cause


async def death_cause(exc: BaseException, wait_s: float) -> str:
    """The GCS's record of why the replica behind `exc` died; "" if it is alive or unknown.

    Over gRPC (Ray's throughput profile, which `python -m serve_app` sets) a replica that
    Ray's memory monitor killed reaches the ingress as `ActorUnavailableError("Actor is
    unavailable")`, with no cause: resent, the same work took the next replica down too
    (seen with the stand-in under memory pressure: two replicas and two controller
    restarts, then `replica_lost`). The raylet reports the death to the GCS within
    milliseconds of the kill, so this asks there, for up to `wait_s`; a replica still
    alive after that was only unreachable. Ray's private state accessor is the one
    reading that does not go through the dashboard; if it fails, the cause is unknown
    and the chunk is resent as before.
    """
    actor_id = getattr(exc, "actor_id", None)
    if not isinstance(actor_id, str) or not actor_id:
        return ""
    deadline = time.monotonic() + wait_s
    while True:
        try:  # a GCS slow under the same memory pressure holds no chunk past `wait_s`
            record = await asyncio.wait_for(asyncio.to_thread(_actor_record, actor_id),
                                            max(0.0, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001 - a cause we cannot read in time is an unknown cause
            logger.debug("Cannot read the death cause of actor %s", actor_id, exc_info=True)
            return ""
        if record.get("State") == "DEAD":
            return str(record.get("DeathCause") or "")
        if time.monotonic() + 0.1 >= deadline:
            return ""
        await asyncio.sleep(0.1)


def _actor_record(actor_id: str) -> dict:
    from ray._private.state import state

    return state.actor_table(actor_id)


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
