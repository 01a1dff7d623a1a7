"""Continuous batching logic, with a stand-in encoder (pure scheduling, no model)."""

import asyncio
import threading
import time

import numpy as np
import pytest

from serve_app.core.encoded import Encoded
from serve_app.model.scheduler import INLINE_TEXTS, ForwardScheduler


class FakeModel:
    """Encodes text "t<i>" as the vector [i]; records each pass and its thread count."""

    def __init__(self, delay_s: float = 0.0, fail_on: str | None = None) -> None:
        self.delay_s = delay_s
        self.fail_on = fail_on
        self.passes: list[tuple[int, int, str]] = []  # (texts, threads, thread name)
        self.lock = threading.Lock()

    def encode(self, texts, threads):
        with self.lock:
            self.passes.append((len(texts), threads(), threading.current_thread().name))
        time.sleep(self.delay_s)
        if self.fail_on in texts:
            raise RuntimeError("model exploded")
        vectors = np.array([[float(t[1:])] for t in texts], dtype=np.float32)
        return Encoded(vectors, [1] * len(texts), [False] * len(texts))


def run(coro):
    return asyncio.run(coro)


def test_a_lone_small_request_runs_inline_with_every_core():
    model = FakeModel()

    async def go():
        scheduler = ForwardScheduler(model.encode, workers=2, cpus=4, max_texts=128)
        scheduler.warm_up(["t0"])  # as the replica does: what a pass costs
        result = await scheduler.embed(["t1", "t2"])
        return scheduler, result

    scheduler, result = run(go())
    assert result.vectors[:, 0].tolist() == [1.0, 2.0]
    assert model.passes == [(1, 4, "MainThread"), (2, 4, "MainThread")]
    assert scheduler.passes_by_worker == [0, 0]


def test_requests_arriving_while_busy_share_passes_and_keep_their_order():
    model = FakeModel(delay_s=0.05)
    texts = [[f"t{10 * j + i}" for i in range(INLINE_TEXTS + 1)] for j in range(10)]

    async def go():
        scheduler = ForwardScheduler(model.encode, workers=2, cpus=2, max_texts=128)
        results = await asyncio.gather(*(scheduler.embed(t) for t in texts))
        return scheduler, results

    scheduler, results = run(go())
    for job, result in zip(texts, results, strict=True):
        assert result.vectors[:, 0].tolist() == [float(t[1:]) for t in job]
    assert len(model.passes) < len(texts)  # pooled
    assert scheduler.passes_by_worker[0] >= 1 and sum(scheduler.passes_by_worker) == len(model.passes)
    # Two passes at once split the two cores; a pass running alone has both.
    assert {threads for _, threads, _ in model.passes} <= {1, 2}
    assert any(threads == 1 for _, threads, _ in model.passes)


def test_a_pass_never_exceeds_max_texts_unless_one_request_is_bigger():
    model = FakeModel(delay_s=0.02)

    async def go():
        scheduler = ForwardScheduler(model.encode, workers=1, cpus=1, max_texts=12)
        await asyncio.gather(*(scheduler.embed([f"t{i}"] * 5) for i in range(6)))
        await scheduler.embed([f"t{i}" for i in range(30)])  # alone and oversized: one pass

    run(go())
    sizes = [n for n, _, _ in model.passes]
    assert all(n <= 12 for n in sizes[:-1]) and sizes[-1] == 30


def test_lone_requests_use_worker_zero_whose_threads_are_warm():
    model = FakeModel(delay_s=0.01)

    async def go():
        scheduler = ForwardScheduler(model.encode, workers=2, cpus=2, max_texts=128)
        for i in range(5):
            await scheduler.embed([f"t{i}"] * (INLINE_TEXTS + 1))
        return scheduler

    scheduler = run(go())
    assert scheduler.passes_by_worker == [5, 0]


def test_a_failing_pass_fails_its_requests_and_the_scheduler_goes_on():
    model = FakeModel(delay_s=0.02, fail_on="t666")

    async def go():
        scheduler = ForwardScheduler(model.encode, workers=1, cpus=1, max_texts=128)
        big = [f"t{i}" for i in range(INLINE_TEXTS + 1)]
        outcomes = await asyncio.gather(
            scheduler.embed(big), scheduler.embed(["t666"] + big), return_exceptions=True
        )
        after = await scheduler.embed(["t7"])
        return outcomes, after

    outcomes, after = run(go())
    assert any(isinstance(o, RuntimeError) for o in outcomes)
    assert after.vectors[0, 0] == 7.0


def test_inline_failure_is_raised_to_the_caller():
    model = FakeModel(fail_on="t1")

    async def go():
        scheduler = ForwardScheduler(model.encode, workers=1, cpus=1, max_texts=8)
        await scheduler.embed(["t1"])

    with pytest.raises(RuntimeError, match="exploded"):
        run(go())


def test_waiting_requests_are_shared_among_free_workers():
    async def scenario():
        model = FakeModel(delay_s=0.05)
        scheduler = ForwardScheduler(model.encode, workers=2, cpus=2, max_texts=128)
        scheduler._busy = [True, True]  # both workers busy while eight requests queue up
        tasks = [asyncio.create_task(scheduler.embed([f"t{i}"] * 4)) for i in range(8)]
        await asyncio.sleep(0)
        assert len(scheduler._pending) == 8
        scheduler._busy = [False, False]
        scheduler._start_free_workers()
        results = await asyncio.gather(*tasks)
        assert [r.vectors[0, 0] for r in results] == [float(i) for i in range(8)]
        return model

    model = run(scenario())
    # 32 texts waiting, two free workers: 16 each, not 32 on one and none on the other.
    assert sorted(size for size, _, _ in model.passes) == [16, 16]


def test_one_large_batch_is_dealt_out_to_every_worker_and_keeps_its_order():
    async def scenario():
        model = FakeModel(delay_s=0.05)
        scheduler = ForwardScheduler(model.encode, workers=2, cpus=2, max_texts=128)
        result = await scheduler.embed([f"t{i}" for i in range(40)])
        return model, scheduler, result

    model, scheduler, result = run(scenario())
    assert result.vectors[:, 0].tolist() == [float(i) for i in range(40)]
    assert sorted(size for size, _, _ in model.passes) == [20, 20]
    assert scheduler.passes_by_worker == [1, 1]
    assert {threads for _, threads, _ in model.passes} == {1}  # each on its half of the cores


# --- which work runs on the event loop, and work nobody waits for -----------------


def test_a_few_long_texts_never_run_on_the_event_loop():
    model = FakeModel()
    long_text = "t" + "0" * 40_000  # as long in bytes as ~8,192 tokens

    async def go():
        scheduler = ForwardScheduler(model.encode, workers=2, cpus=2, max_texts=128)
        scheduler.ms_per_byte = 0.01  # as learnt for a small model: 100 bytes a millisecond
        await scheduler.embed(["t1"])
        await scheduler.embed([long_text] * INLINE_TEXTS)
        return scheduler

    scheduler = run(go())
    threads = [name for _, _, name in model.passes]
    assert threads[0] == "MainThread"  # a short text still skips the hand-off
    assert threads[1].startswith("forward-")  # four long ones go to a worker thread
    assert scheduler.inline_passes == 1


def test_nothing_runs_inline_before_a_pass_was_timed():
    model = FakeModel()

    async def go():
        scheduler = ForwardScheduler(model.encode, workers=1, cpus=2, max_texts=128)
        await scheduler.embed(["t1"])
        return scheduler

    scheduler = run(go())
    assert model.passes[0][2].startswith("forward-") and scheduler.ms_per_byte is not None


def test_work_whose_caller_was_cancelled_is_dropped_before_its_pass():
    gate = threading.Event()
    model = FakeModel()
    started = threading.Event()

    def gated(texts, threads):
        started.set()
        gate.wait(30)
        return model.encode(texts, threads)

    async def go():
        scheduler = ForwardScheduler(gated, workers=1, cpus=2, max_texts=128)
        first = asyncio.create_task(scheduler.embed(["t1"]))
        while not started.is_set():
            await asyncio.sleep(0.001)
        second = asyncio.create_task(scheduler.embed(["t2", "t3"]))
        await asyncio.sleep(0)  # it is queued behind the busy worker
        second.cancel()
        gate.set()
        await first
        third = await scheduler.embed(["t4"])  # the scheduler goes on
        with pytest.raises(asyncio.CancelledError):
            await second
        return third

    third = run(go())
    encoded = [n for n, _, _ in model.passes]
    assert encoded == [1, 1] and third.vectors[0, 0] == 4.0  # t2, t3 never reached the model
