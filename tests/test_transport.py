"""The Ray shell's own logic, without a cluster: how RayBackend treats Ray's failures.

A fake deployment handle stands in for Ray here (pure logic); tests/test_serve.py and
tests/test_faults.py drive the same code on a real cluster.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, OutOfMemoryError

from serve_app.core.encoded import Encoded
from serve_app.core.errors import ModelUnavailable
from serve_app.ray_shell import transport
from serve_app.ray_shell.transport import RayBackend

ANSWER = Encoded(np.zeros((1, 4), np.float32), [3], [False])


class FakeResponse:
    def __init__(self, outcome) -> None:
        self.outcome = outcome
        self.cancelled = False

    def __await__(self):
        return self._result().__await__()

    async def _result(self):
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        if isinstance(self.outcome, asyncio.Event):
            await self.outcome.wait()  # a request that is still being worked on
        return ANSWER

    def cancel(self) -> None:
        self.cancelled = True


class FakeHandle:
    """`handle.embed.remote(texts)` answering each call with the next outcome."""

    def __init__(self, *outcomes) -> None:
        self.outcomes = list(outcomes)
        self.responses: list[FakeResponse] = []
        self.embed = self

    def remote(self, texts):
        self.responses.append(FakeResponse(self.outcomes.pop(0)))
        return self.responses[-1]


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    monkeypatch.setattr(transport, "_RETRY_BACKOFF_S", 0.01, raising=False)


def embed(handle: FakeHandle):
    return asyncio.run(RayBackend(handle, timeout_s=30, app_name="app").embed(["text"]))


def test_a_lost_replica_is_retried_once():
    handle = FakeHandle(ActorDiedError(), "ok")
    assert embed(handle) is ANSWER
    handle = FakeHandle(ActorDiedError(), ActorDiedError(), "ok")
    with pytest.raises(ModelUnavailable) as caught:
        embed(handle)
    assert len(handle.responses) == 2 and caught.value.code == "replica_lost"


def test_failures_are_matched_by_type_not_by_name():
    class RenamedInANewRay(ActorUnavailableError):
        pass

    handle = FakeHandle(RenamedInANewRay("gone", None), "ok")
    assert embed(handle) is ANSWER and len(handle.responses) == 2


def test_work_that_may_have_killed_its_replica_for_memory_is_not_resent():
    died = ActorDiedError()
    died.error_msg = "The actor died because its worker was killed by the memory monitor."
    for failure in (OutOfMemoryError("Task was killed due to the node running low on memory."), died):
        handle = FakeHandle(failure, "ok")
        with pytest.raises(ModelUnavailable) as caught:
            embed(handle)
        assert len(handle.responses) == 1
        assert caught.value.code == "replica_out_of_memory" and "fewer or shorter" in caught.value.message


# The GCS's record of a replica that Ray's memory monitor killed (its DeathCause, as
# `ray._private.state.state.actor_table` gave it for the stand-in's replica on a node
# pushed past RAY_memory_usage_threshold), and of one that crashed.
OOM_RECORD = {"State": "DEAD", "DeathCause": 'oom_context {\n  error_message: "2 worker(s) were '
              'killed due to the node running low on memory. Memory on the node (IP: 192.0.2.2) '
              'was 11.84GB used / 23.54GB limit (0.502992)"\n}'}
CRASH_RECORD = {"State": "DEAD", "DeathCause": 'actor_died_error_context {\n  error_message: '
                '"The actor is dead because its worker process has died."\n}'}


@pytest.mark.parametrize("record, resent", [(OOM_RECORD, False), (CRASH_RECORD, True),
                                            ({"State": "ALIVE", "DeathCause": ""}, True), ({}, True)])
def test_over_grpc_a_replica_killed_for_memory_is_told_by_the_gcs_and_its_work_not_resent(
        monkeypatch, record, resent):
    """Over gRPC Ray's error says only "Actor is unavailable"; the GCS's record says why."""
    asked = []
    monkeypatch.setattr(transport, "_actor_record", lambda actor_id: asked.append(actor_id) or record)
    gone = ActorUnavailableError("Actor is unavailable.", bytes.fromhex("ab" * 16))
    handle = FakeHandle(gone, "ok")
    if resent:
        assert embed(handle) is ANSWER and len(handle.responses) == 2
    else:
        with pytest.raises(ModelUnavailable) as caught:
            embed(handle)
        assert len(handle.responses) == 1
        assert caught.value.code == "replica_out_of_memory"
    assert asked and asked[0] == "ab" * 16


def test_a_gcs_that_does_not_answer_holds_a_lost_chunk_no_longer_than_its_back_off(monkeypatch):
    released = threading.Event()

    def stuck(actor_id):  # a GCS slow under the same memory pressure
        released.wait(5)
        return OOM_RECORD

    class Handle(FakeHandle):
        def remote(self, texts):
            if self.responses:  # the resend: let the stuck lookup's thread go
                released.set()
            return super().remote(texts)

    monkeypatch.setattr(transport, "_actor_record", stuck)
    handle = Handle(ActorUnavailableError("Actor is unavailable.", bytes.fromhex("ab" * 16)), "ok")
    started = time.monotonic()
    assert embed(handle) is ANSWER  # the cause unknown in time: resent, as before
    assert time.monotonic() - started < 4.0  # the back-off here is 0.01-0.02 s; the GCS took 5


def test_a_cancelled_chunk_cancels_its_ray_request():
    async def scenario():
        handle = FakeHandle(asyncio.Event())
        task = asyncio.create_task(RayBackend(handle, 30, "app").embed(["text"]))
        deadline = time.monotonic() + 10
        while not handle.responses:
            assert not task.done() and time.monotonic() < deadline, "the request never reached Ray"
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return handle.responses[0]

    assert asyncio.run(scenario()).cancelled


def test_replica_state_does_not_block_the_event_loop(monkeypatch):
    release = threading.Event()

    class Blocking:
        def status(self):
            release.wait(30)  # a slow controller
            raise RuntimeError("controller unreachable")

    monkeypatch.setattr(transport, "serve", Blocking())
    backend = RayBackend(FakeHandle(), 30, "app")

    async def scenario():
        state = asyncio.create_task(backend.replica_state())
        started = time.monotonic()
        while not state.done() and time.monotonic() - started < 0.2:
            await asyncio.sleep(0.01)  # the loop turns while the controller call waits
        turned = time.monotonic() - started >= 0.2
        release.set()
        return turned, await state

    turned, state = asyncio.run(scenario())
    assert turned and state == "unknown"
