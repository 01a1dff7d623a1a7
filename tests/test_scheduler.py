"""Continuous batching logic, with a stand-in encoder (pure scheduling, no model)."""

import asyncio
import threading
import time

import numpy as np
import pytest

from serve_app.core.encoded import Encoded
from serve_app.core.errors import ModelOutputError
from serve_app.model.scheduler import ForwardScheduler

GATE_TIMEOUT_S = 10  # a broken scheduler fails the test rather than hanging it


class FakeModel:
    """Encodes text "t<i>" as the vector [i]; records each pass and its thread count.

    A `gated` model's passes, once started, wait until the test lets them finish
    (`finish(n)`), so which jobs share a pass follows from the test's steps, not from
    how fast this machine is. With `pass_texts`, a call of more texts runs them in passes
    of that many, calling `between` between two, as TextEmbedder does.
    """

    def __init__(self, delay_s: float = 0.0, fail_on: str | None = None, gated: bool = False,
                 overflow_on: str | None = None, pass_texts: int | None = None) -> None:
        self.delay_s = delay_s
        self.pass_texts = pass_texts
        self.fail_on = fail_on
        self.overflow_on = overflow_on  # this text's vector is refused, as TextEmbedder does
        self.passes: list[tuple[int, int, str]] = []  # (texts, threads, thread name)
        self.texts: list[list[str]] = []  # each pass's texts
        self.lock = threading.Condition()
        self._finish = threading.Semaphore(0) if gated else None

    def encode(self, texts, threads, between=None):
        size = self.pass_texts or len(texts)
        parts = []
        for start in range(0, len(texts), size):
            if start and between is not None:
                between()
            parts.append(self._pass(texts[start:start + size], threads))
        if len(parts) == 1:
            return parts[0]
        return Encoded(np.concatenate([p.vectors for p in parts]), [1] * len(texts), [False] * len(texts))

    def _pass(self, texts, threads):
        with self.lock:
            self.passes.append((len(texts), threads(), threading.current_thread().name))
            self.texts.append(list(texts))
            self.lock.notify_all()
        if self._finish is not None and not self._finish.acquire(timeout=GATE_TIMEOUT_S):
            raise TimeoutError("the test never let this pass finish")
        time.sleep(self.delay_s)
        if self.fail_on in texts:
            raise RuntimeError("model exploded")
        if self.overflow_on in texts:
            rows = [i for i, t in enumerate(texts) if t == self.overflow_on]
            raise ModelOutputError.not_finite(rows, "float16", "cuda:0")
        vectors = np.array([[float(t[1:])] for t in texts], dtype=np.float32)
        return Encoded(vectors, [1] * len(texts), [False] * len(texts))

    def finish(self, passes: int = 1) -> None:
        """Let `passes` more gated passes (running or yet to start) return."""
        for _ in range(passes):
            self._finish.release()

    async def started(self, passes: int) -> None:
        """Return once `passes` passes have started, the event loop running meanwhile."""

        def wait() -> bool:
            with self.lock:
                return self.lock.wait_for(lambda: len(self.passes) >= passes, GATE_TIMEOUT_S)

        assert await asyncio.to_thread(wait), f"{len(self.passes)} passes started, not {passes}"


def numbered(*numbers: int) -> list[str]:
    return [f"t{i}" for i in numbers]


def values(result) -> list[float]:
    return result.vectors[:, 0].tolist()


async def queued(*coroutines):
    """Tasks for `coroutines`, each of which has reached the scheduler when this returns."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    await asyncio.sleep(0)  # one turn of the loop: each task runs up to its first wait
    return tasks


def run(coro):
    return asyncio.run(coro)


def test_the_warm_up_and_a_lone_small_request_run_on_worker_zero_with_every_core():
    model = FakeModel()

    async def go():
        scheduler = ForwardScheduler(model.encode, workers=2, cpus=4, max_texts=128)
        scheduler.warm_up(["t0"])  # as the replica does, on the thread that loaded the model
        result = await scheduler.embed(["t1", "t2"])
        return scheduler, result

    scheduler, result = run(go())
    assert result.vectors[:, 0].tolist() == [1.0, 2.0]
    assert [(n, threads) for n, threads, _ in model.passes] == [(1, 4), (2, 4)]
    assert all(name.startswith("forward-0") for _, _, name in model.passes)
    assert scheduler.passes_by_worker == [1, 0]


def test_a_given_home_thread_becomes_worker_zero():
    from serve_app.model.scheduler import home_thread

    home = home_thread()
    loaded_on = home.submit(lambda: threading.current_thread().name).result()  # "the model"
    model = FakeModel()

    async def go():
        scheduler = ForwardScheduler(model.encode, workers=2, cpus=2, max_texts=128, home=home)
        await scheduler.embed(["t1"])
        scheduler.shutdown()

    run(go())
    assert model.passes == [(1, 2, loaded_on)]


def test_worker_zero_takes_what_the_others_leave_and_the_others_keep_their_share():
    scheduler = ForwardScheduler(FakeModel().encode, workers=2, cpus=4, max_texts=128)
    shares = {}
    for busy in ([True, False], [True, True], [False, True]):
        scheduler._busy = busy
        shares[tuple(busy)] = (scheduler._threads(0), scheduler._threads(1))
    assert shares[(True, False)][0] == 4  # alone: every core
    assert shares[(True, True)] == (2, 2)
    assert shares[(False, True)][1] == 2  # worker 1 alone still keeps to its share
    two_cores = ForwardScheduler(FakeModel().encode, workers=2, cpus=2, max_texts=128)
    two_cores._busy = [False, True]
    assert two_cores._threads(1) == 1  # one thread: it starts no OpenMP team of its own
    scheduler.shutdown(), two_cores.shutdown()


def test_requests_arriving_while_busy_share_passes_and_keep_their_order():
    model = FakeModel(gated=True)
    size = 5
    texts = [[f"t{10 * j + i}" for i in range(size)] for j in range(10)]

    async def go():
        scheduler = ForwardScheduler(model.encode, workers=2, cpus=2, max_texts=128)
        tasks = await queued(*(scheduler.embed(t) for t in texts))
        await model.started(2)  # the first two requests keep both workers busy ...
        model.finish(1)
        await model.started(3)  # ... so the eight that came meanwhile share the next pass
        model.finish(2)
        results = await asyncio.wait_for(asyncio.gather(*tasks), GATE_TIMEOUT_S)
        model.finish(1)
        alone = await scheduler.embed(numbered(*range(size)))
        return scheduler, results, alone

    scheduler, results, alone = run(go())
    for job, result in zip(texts, results, strict=True):
        assert values(result) == [float(t[1:]) for t in job]
    assert sorted(model.texts[2]) == sorted(t for job in texts[2:] for t in job)
    assert values(alone) == [float(i) for i in range(size)]
    # Passes that run side by side split the two cores; a pass running alone has both.
    assert [(n, threads) for n, threads, _ in model.passes] == [(size, 1), (size, 1), (8 * size, 1), (size, 2)]
    assert model.passes[-1][2].startswith("forward-0")  # a lone pass goes to worker 0
    assert sum(scheduler.passes_by_worker) == len(model.passes)


def test_a_pass_never_exceeds_max_texts_unless_one_request_is_bigger():
    model = FakeModel(gated=True)

    async def go():
        scheduler = ForwardScheduler(model.encode, workers=1, cpus=1, max_texts=12)
        tasks = await queued(*(scheduler.embed([f"t{i}"] * 5) for i in range(6)))
        await model.started(1)  # the first request runs; the other five wait, 25 texts
        model.finish(5)
        results = await asyncio.wait_for(asyncio.gather(*tasks), GATE_TIMEOUT_S)
        oversized = await scheduler.embed([f"t{i}" for i in range(30)])  # alone: one pass
        return results, oversized

    results, oversized = run(go())
    assert [values(r) for r in results] == [[float(i)] * 5 for i in range(6)]
    assert values(oversized) == [float(i) for i in range(30)]
    # Whole requests only: 5 + 5 fit under 12, a third would not.
    assert [n for n, _, _ in model.passes] == [5, 10, 10, 5, 30]


def test_a_few_texts_go_ahead_of_a_long_column_waiting_in_a_pass_of_their_own():
    # A formula's cell sent while a long column's requests queue: answered after the pass
    # that is running, not after every request queued before it.
    model = FakeModel(gated=True)

    async def go():
        scheduler = ForwardScheduler(model.encode, workers=1, cpus=1, max_texts=64)
        column = [numbered(*range(100 * j, 100 * j + 32)) for j in range(3)]
        tasks = await queued(*(scheduler.embed(texts) for texts in column))
        cells = await queued(scheduler.embed(["t7"]), scheduler.embed(["t8", "t9"]))
        await model.started(1)  # the column's first request runs; the rest wait
        model.finish(3)
        done = await asyncio.wait_for(asyncio.gather(*tasks, *cells), GATE_TIMEOUT_S)
        return column, done

    column, done = run(go())
    assert model.texts == [column[0], ["t7", "t8", "t9"], column[1] + column[2]]
    assert [values(r) for r in done[3:]] == [[7.0], [8.0, 9.0]]


def test_a_few_texts_run_between_two_passes_of_a_busy_workers_long_call():
    # A cell sent while the only worker is inside a call of several passes (a column's
    # 128 texts on one core: three or four passes, seconds) is answered after the pass
    # that is running, not after the whole call; the call then goes on.
    model = FakeModel(gated=True, pass_texts=4)

    async def go():
        scheduler = ForwardScheduler(model.encode, workers=1, cpus=1, max_texts=64)
        column = await queued(scheduler.embed(numbered(*range(1, 13))))
        await model.started(1)  # the column's first pass runs
        cell, cancelled = await queued(scheduler.embed(["t20"]), scheduler.embed(["t21"]))
        cancelled.cancel()
        model.finish(1)
        await model.started(2)  # between the column's passes: the cell's own pass
        model.finish(1)
        answer = await asyncio.wait_for(cell, GATE_TIMEOUT_S)
        assert not column[0].done()  # the cell did not wait for the call to end
        model.finish(2)
        return answer, await asyncio.wait_for(column[0], GATE_TIMEOUT_S), scheduler

    cell, column, scheduler = run(go())
    assert values(cell) == [20.0] and values(column) == [float(i) for i in range(1, 13)]
    assert model.texts == [numbered(1, 2, 3, 4), ["t20"], numbered(5, 6, 7, 8), numbered(9, 10, 11, 12)]
    assert scheduler.batches == 2 and scheduler.passes_by_worker == [2]


def test_lone_requests_use_worker_zero_whose_threads_are_warm():
    model = FakeModel()  # each request awaits the last: the workers are always free

    async def go():
        scheduler = ForwardScheduler(model.encode, workers=2, cpus=2, max_texts=128)
        for i in range(5):
            await scheduler.embed([f"t{i}"] * 5)
        return scheduler

    scheduler = run(go())
    assert scheduler.passes_by_worker == [5, 0]


def test_a_failing_pass_fails_its_requests_and_the_scheduler_goes_on():
    model = FakeModel(fail_on="t666", gated=True)
    size = 5
    before = numbered(*range(size))
    poisoned, beside_it = ["t666", *numbered(*range(11, 10 + size))], numbered(*range(20, 20 + size))
    after_a, after_b = numbered(*range(30, 30 + size)), numbered(*range(40, 40 + size))

    async def go():
        scheduler = ForwardScheduler(model.encode, workers=1, cpus=1, max_texts=128)
        first = await queued(scheduler.embed(before))
        await model.started(1)  # pass 1: `before` alone
        failing = await queued(scheduler.embed(poisoned), scheduler.embed(beside_it))
        model.finish(1)
        await model.started(2)  # pass 2: the poisoned request and the one beside it
        later = await queued(scheduler.embed(after_a), scheduler.embed(after_b))
        model.finish(2)  # pass 2 raises; pass 3 takes the requests that queued meanwhile
        outcomes = await asyncio.wait_for(
            asyncio.gather(*first, *failing, *later, return_exceptions=True), GATE_TIMEOUT_S
        )
        model.finish(1)
        after = await scheduler.embed(["t7"])
        return outcomes, after

    (ok_before, bad, bad_beside, ok_a, ok_b), after = run(go())
    assert model.texts == [before, poisoned + beside_it, after_a + after_b, ["t7"]]
    assert isinstance(bad, RuntimeError) and isinstance(bad_beside, RuntimeError)
    assert values(ok_before) == [float(t[1:]) for t in before]
    assert values(ok_a) == [float(t[1:]) for t in after_a]
    assert values(ok_b) == [float(t[1:]) for t in after_b]
    assert values(after) == [7.0]


def test_texts_that_overflow_fail_only_their_own_requests_in_a_shared_pass():
    model = FakeModel(overflow_on="t666", gated=True)

    async def go():
        scheduler = ForwardScheduler(model.encode, workers=1, cpus=1, max_texts=128)
        first = await queued(scheduler.embed(numbered(1)))
        await model.started(1)  # pass 1 holds the worker while three requests queue
        shared = await queued(scheduler.embed(numbered(2, 3)),
                              scheduler.embed(["t666", "t4", "t666"]),
                              scheduler.embed(numbered(5)))
        model.finish(3)  # pass 1; pass 2, shared, refused; pass 3, without the failed one
        return await asyncio.wait_for(
            asyncio.gather(*first, *shared, return_exceptions=True), GATE_TIMEOUT_S)

    one, before, failed, after = run(go())
    assert model.texts == [["t1"], ["t2", "t3", "t666", "t4", "t666", "t5"], ["t2", "t3", "t5"]]
    assert isinstance(failed, ModelOutputError) and failed.rows == (0, 2)
    assert failed.message.startswith("The model gave inf or NaN values for 2 texts, running in float16")
    assert values(one) == [1.0] and values(before) == [2.0, 3.0] and values(after) == [5.0]


def test_a_request_dealt_out_to_two_workers_counts_its_overflowing_texts_in_both_pieces():
    model = FakeModel(overflow_on="t666")
    texts = numbered(*range(20))
    texts[3] = texts[10] = "t666"  # piece 1 holds the odd positions, piece 0 the even ones

    async def go():
        scheduler = ForwardScheduler(model.encode, workers=2, cpus=2, max_texts=128)
        return await scheduler.embed(texts)

    with pytest.raises(ModelOutputError) as caught:
        run(go())
    assert len(model.texts) == 2  # both pieces ran, and both failed
    assert caught.value.rows == (3, 10)
    assert caught.value.message.startswith("The model gave inf or NaN values for 2 texts,")


def test_a_lone_failing_request_hears_of_its_failure():
    model = FakeModel(fail_on="t1")

    async def go():
        scheduler = ForwardScheduler(model.encode, workers=1, cpus=1, max_texts=8)
        await scheduler.embed(["t1"])

    with pytest.raises(RuntimeError, match="exploded"):
        run(go())


def test_waiting_requests_are_shared_among_free_workers():
    async def scenario():
        model = FakeModel()  # both passes are handed out at once, before either runs
        scheduler = ForwardScheduler(model.encode, workers=2, cpus=2, max_texts=128)
        scheduler._busy = [True, True]  # both workers busy while eight requests queue up
        tasks = [asyncio.create_task(scheduler.embed([f"t{i}"] * 8)) for i in range(8)]
        await asyncio.sleep(0)
        assert len(scheduler._pending) == 8
        scheduler._busy = [False, False]
        scheduler._start_free_workers()
        results = await asyncio.gather(*tasks)
        assert [r.vectors[0, 0] for r in results] == [float(i) for i in range(8)]
        return model

    model = run(scenario())
    # 64 texts waiting, two free workers: 32 each, not 64 on one and none on the other.
    assert sorted(size for size, _, _ in model.passes) == [32, 32]


def test_one_large_batch_is_dealt_out_to_every_worker_and_keeps_its_order():
    async def scenario():
        model = FakeModel(gated=True)
        scheduler = ForwardScheduler(model.encode, workers=2, cpus=2, max_texts=128)
        task = asyncio.ensure_future(scheduler.embed([f"t{i}" for i in range(40)]))
        await model.started(2)  # both halves run at once: each asked for its threads
        model.finish(2)
        result = await asyncio.wait_for(task, GATE_TIMEOUT_S)
        return model, scheduler, result

    model, scheduler, result = run(scenario())
    assert result.vectors[:, 0].tolist() == [float(i) for i in range(40)]
    assert sorted(size for size, _, _ in model.passes) == [20, 20]
    assert scheduler.passes_by_worker == [1, 1]
    assert {threads for _, threads, _ in model.passes} == {1}  # each on its half of the cores


# --- nothing runs on the event loop, and work nobody waits for -------------------


def test_no_pass_runs_on_the_event_loop():
    """Not even a lone short text: the loop's thread would keep an OpenMP team of its
    own beside worker 0's (see the scheduler's docstring), and meanwhile the replica
    answers no health check."""
    model = FakeModel()
    long_text = "t" + "0" * 40_000  # as long in bytes as ~8,192 tokens

    async def go():
        scheduler = ForwardScheduler(model.encode, workers=2, cpus=2, max_texts=128)
        await scheduler.embed(["t1"])
        await scheduler.embed(["t2"])
        await scheduler.embed([long_text] * 4)

    run(go())
    assert len(model.passes) == 3
    assert all(name.startswith("forward-0") for _, _, name in model.passes)


def test_work_whose_caller_was_cancelled_is_dropped_before_its_pass():
    gate = threading.Event()
    model = FakeModel()
    started = threading.Event()

    def gated(texts, threads, between):
        started.set()
        gate.wait(30)
        return model.encode(texts, threads, between)

    async def go():
        scheduler = ForwardScheduler(gated, workers=1, cpus=2, max_texts=128)
        first = asyncio.create_task(scheduler.embed(["t1"]))
        assert await asyncio.to_thread(started.wait, GATE_TIMEOUT_S), "the first pass never started"
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


def test_an_idle_scheduler_with_a_wait_gathers_what_arrives_meanwhile_into_one_pass():
    """batch_wait_timeout_s: the first request on an idle scheduler waits that long for
    company, and everything that came meanwhile shares its pass. Without a wait, the
    first would have run alone, at once."""
    model = FakeModel()

    async def go():
        scheduler = ForwardScheduler(model.encode, workers=2, cpus=2, max_texts=128, wait_s=0.05)
        first = await queued(scheduler.embed(numbered(1)))
        assert model.passes == []  # waiting for company
        later = await queued(scheduler.embed(numbered(2, 3)), scheduler.embed(numbered(4)))
        return await asyncio.wait_for(asyncio.gather(*first, *later), GATE_TIMEOUT_S)

    results = run(go())
    assert [values(r) for r in results] == [[1.0], [2.0, 3.0], [4.0]]
    # Gathered, then shared between the two free workers; none ran alone.
    assert sorted(t for texts in model.texts for t in texts) == numbered(1, 2, 3, 4)
    assert len(model.passes) == 2 and numbered(1) not in model.texts
    assert all(name.startswith("forward-") for _, _, name in model.passes)


def test_cancelled_work_is_dropped_when_several_workers_start_at_once():
    """With a wait, both workers start together when it ends; a request cancelled during
    the wait is not given to the second worker as a pass of its own, nor does a cancelled
    one keep later work out of a pass."""
    model = FakeModel()

    async def go():
        scheduler = ForwardScheduler(model.encode, workers=2, cpus=2, max_texts=4, wait_s=0.05)
        first, dropped, last = await queued(
            scheduler.embed(numbered(1, 2, 3, 4)), scheduler.embed(numbered(5, 6, 7, 8)),
            scheduler.embed(numbered(9)))
        dropped.cancel()
        done = await asyncio.wait_for(asyncio.gather(first, last), GATE_TIMEOUT_S)
        with pytest.raises(asyncio.CancelledError):
            await dropped
        return done

    results = run(go())
    assert [values(r) for r in results] == [[1.0, 2.0, 3.0, 4.0], [9.0]]
    assert sorted(model.texts) == [numbered(1, 2, 3, 4), numbered(9)]  # 5-8 never ran


def test_on_idle_is_called_when_the_last_pass_ends_and_not_while_one_runs():
    model = FakeModel(gated=True)
    idle_calls = []

    async def go():
        scheduler = ForwardScheduler(model.encode, workers=2, cpus=2, max_texts=128,
                                     on_idle=lambda: idle_calls.append(len(model.passes)))
        tasks = await queued(scheduler.embed(numbered(1)), scheduler.embed(numbered(2)))
        await model.started(2)  # both workers busy
        model.finish(1)
        await asyncio.wait_for(asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED), GATE_TIMEOUT_S)
        during = list(idle_calls)  # one pass ended while the other still ran
        model.finish(1)
        await asyncio.wait_for(asyncio.gather(*tasks), GATE_TIMEOUT_S)
        return during

    during = run(go())
    assert during == []
    assert idle_calls == [2]  # once, as the second (last) pass ended
