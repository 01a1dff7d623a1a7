"""Continuous batching for the model replica: no wait when a worker is free, pooling when not.

A fixed wait for more requests (as @serve.batch has) costs every lone request
(an Excel cell recalculating) that many milliseconds. Here the wait is zero by
default; instead, texts that arrive while every worker is busy pile up, and the
next free worker takes all of them at once, sorted by length into cache-sized
forward passes. Each request is answered as soon as its own texts are done, not
when everything it shared passes with is. A request of a few texts (an Excel cell) goes
ahead of the larger ones waiting, in a pass of its own: when every worker is busy, the
first worker to reach a break in its call runs it there and then. The breaks are
between two passes of the call and, on a CPU, between two transformer blocks of a pass
(TextEmbedder.encode), so a cell waits for one block of a pass (tens of milliseconds
for a 0.6B model on one core), not for the rest of the pass (up to a second), nor for
the rest of a call of several passes, nor for a long column queued before it. A short
pass (a few cells' texts) is not broken into: it ends about as soon as the cell's own
pass would. Work whose caller was cancelled before its pass began is dropped; a pass
that has begun runs out.

On a CPU, two workers each run a pass on their share of the cores. Each worker is
one fixed thread, and torch never runs on any other with more than one thread:
with GNU OpenMP every thread that runs a parallel region keeps a team of its own,
and once the teams hold more threads than there are CPUs each of the hundreds of
parallel regions in a pass wakes its team from a sleep (bench/omp_team.py:
all-MiniLM-L6-v2's pass for one text 4.0 -> 7.6 ms). So the model is loaded and
warmed up on worker 0's thread (`home`), a lone request always goes to worker 0,
which takes every core the other workers leave it, and the other workers keep to
their fixed share (one thread on two cores, which starts no team at all). Thread
counts are per calling thread in torch, so each worker sets its own before every
pass, and again before every transformer block (TextEmbedder.encode): a pass
keeps to its share as the other worker starts or stops.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from serve_app.core.encoded import Encoded, Item
from serve_app.core.errors import ModelOutputError

MIN_SPLIT_TEXTS = 8  # per worker: smaller batches stay in one pass
# A request of fewer texts (a formula's cell, a search query) goes ahead of the larger ones
# waiting: it costs a pass a fraction of a second, where a long column queued before it
# would hold it for seconds.
QUICK_TEXTS = 8
# encode(texts, threads, between) -> Encoded: threads() is asked before every forward pass
# and block; between(), if not None, is called between two forward passes of the call and,
# on a CPU, before every block of a pass that is not short.
EncodeFn = Callable[[list[Item], Callable[[], int], Callable[[], None] | None], Encoded]
Outcome = tuple["_Job", "Encoded | BaseException"]


@dataclass
class _Job:
    texts: list[Item]
    future: asyncio.Future = field(repr=False)
    queued_at: float = field(default_factory=time.perf_counter)


class ForwardScheduler:
    """Runs encode jobs on `workers` threads; a free worker takes everything pending."""

    def __init__(
        self,
        encode: EncodeFn,
        *,
        workers: int,
        cpus: int,
        max_texts: int,
        wait_s: float = 0.0,
        on_pass: Callable[[int, float], None] | None = None,
        on_idle: Callable[[], None] | None = None,
        home: ThreadPoolExecutor | None = None,
    ) -> None:
        """`home`: the one-thread executor that loaded the model, which becomes worker 0
        (see the module's docstring); one of the scheduler's own if not given. `on_idle`:
        called on the event loop when a pass ends and no work is left."""
        self._encode = encode
        self._on_pass = on_pass  # (texts in the pass, seconds its oldest job waited)
        self._on_idle = on_idle
        self._cpus = cpus
        self.max_texts = max_texts
        # How long an idle scheduler waits for company before it starts a pass (the
        # batch_wait_timeout_s setting); 0: it starts at once.
        self.wait_s = wait_s
        self._gathering = False
        # The queues are read and taken from on the event loop and, between passes and
        # blocks, on the workers' threads.
        self._lock = threading.Lock()
        self._quick: deque[_Job] = deque()  # waiting requests of fewer than QUICK_TEXTS
        self._pending: deque[_Job] = deque()  # the rest, in arrival order
        self._busy = [False] * workers
        self._executors = [home or home_thread()] + [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"forward-{i}")
            for i in range(1, workers)
        ]
        self.batches = 0  # passes started, for tests and metrics
        self.passes_by_worker = [0] * workers

    async def embed(self, texts: list[Item]) -> Encoded:
        """Embed `texts`, sharing a pass with whatever else is waiting."""
        loop = asyncio.get_running_loop()
        # A request big enough for every worker is dealt out among them (every n-th text,
        # so each gets a like mix of lengths), which would otherwise keep one worker
        # busy alone.
        pieces = len(self._busy) if len(texts) >= MIN_SPLIT_TEXTS * len(self._busy) else 1
        jobs = [_Job(texts[i::pieces], loop.create_future()) for i in range(pieces)]
        with self._lock:
            (self._quick if len(texts) < QUICK_TEXTS else self._pending).extend(jobs)
        if self.wait_s and not any(self._busy):
            if not self._gathering:  # the first arrival waits for company
                self._gathering = True
                loop.call_later(self.wait_s, self._gathered)
        else:
            self._start_free_workers()
        if pieces == 1:
            return await jobs[0].future
        parts = await asyncio.gather(*(job.future for job in jobs), return_exceptions=True)
        failed = [part for part in parts if isinstance(part, BaseException)]
        overflowed = [(i, part) for i, part in enumerate(parts) if isinstance(part, ModelOutputError)]
        if failed and len(overflowed) == len(failed):  # rows of every piece, in the request's order
            rows = sorted(i + row * pieces for i, part in overflowed for row in part.rows)
            raise overflowed[0][1].for_rows(rows)
        if failed:
            raise failed[0]
        return _interleave(parts)

    def _gathered(self) -> None:
        self._gathering = False
        self._start_free_workers()

    def _live_pending(self) -> bool:
        """Whether work is waiting, once the jobs at the head whose callers were cancelled
        are dropped: nobody waits for them."""
        for queue in (self._quick, self._pending):
            while queue and queue[0].future.done():
                queue.popleft()
        return bool(self._quick or self._pending)

    def _next(self) -> deque[_Job]:
        """The queue the next job comes from: quick requests first."""
        return self._quick or self._pending

    def _start_free_workers(self) -> None:
        with self._lock:
            self._start_free_workers_locked()

    def _start_free_workers_locked(self) -> None:
        while not all(self._busy) and self._live_pending():
            worker = self._busy.index(False)  # the lowest free one: 0 may take every core
            # Share what is waiting among the free workers, so that no core idles while
            # one worker runs a long pass alone (a large model's pass takes seconds);
            # this is also what keeps the pieces embed() deals out on separate workers.
            waiting = sum(len(job.texts) for queue in (self._quick, self._pending)
                          for job in queue if not job.future.done())
            share = min(self.max_texts, -(-waiting // self._busy.count(False)))
            # Quick requests make a pass of their own, not the first of a large one.
            jobs, size = self._take(self._next(), share)
            self._busy[worker] = True
            self.batches += 1
            self._report(size, time.perf_counter() - jobs[0].queued_at)
            self.passes_by_worker[worker] += 1
            asyncio.get_running_loop().create_task(self._run(worker, jobs))

    def _take(self, queue: deque[_Job], share: int) -> tuple[list[_Job], int]:
        """Jobs for one pass from the head of `queue` (under the lock): the first live one,
        then more while the pass holds fewer than `share` texts and the next fits in
        `max_texts`; jobs whose callers were cancelled are dropped. The jobs and their texts."""
        jobs: list[_Job] = []
        size = 0
        while queue:
            if queue[0].future.done():
                queue.popleft()
                continue
            if jobs and (size >= share or size + len(queue[0].texts) > self.max_texts):
                break
            jobs.append(queue.popleft())
            size += len(jobs[-1].texts)
        return jobs, size

    def _report(self, texts: int, waited_s: float) -> None:
        if self._on_pass is not None:
            self._on_pass(texts, waited_s)

    def _timed(self, texts: list[Item], worker: int, take_quick: bool = True) -> Encoded:
        """One encode call on `worker`'s thread; with `take_quick`, quick requests that
        arrive meanwhile run between its passes, and on a CPU between two blocks of a pass
        that is not short (their time is not counted in its own)."""
        lent = [0.0]

        def between() -> None:
            lent[0] += self._quick_in_a_break(worker)

        started = time.perf_counter()
        encoded = self._encode(texts, lambda: self._threads(worker), between if take_quick else None)
        encoded.model_ms = (time.perf_counter() - started - lent[0]) * 1000
        return encoded

    def _quick_in_a_break(self, worker: int) -> float:
        """On `worker`'s thread, between two passes of its call or two blocks of a pass:
        run the quick requests waiting, in a pass of their own, and answer them; the
        seconds it took."""
        if not self._quick:  # a look without the lock: nearly always empty
            return 0.0
        started = time.perf_counter()
        with self._lock:
            jobs, size = self._take(self._quick, self.max_texts)
            if not jobs:
                return 0.0
            self.batches += 1
            self.passes_by_worker[worker] += 1
        loop = jobs[0].future.get_loop()
        loop.call_soon_threadsafe(self._report, size, started - jobs[0].queued_at)
        outcomes = self._outcomes(worker, jobs, take_quick=False)
        loop.call_soon_threadsafe(_settle, outcomes)
        return time.perf_counter() - started

    def warm_up(self, texts: list[str]) -> float:
        """One pass on worker 0 (it pays one-off kernel set-up), waited for; its seconds."""
        return self._executors[0].submit(self._timed, texts, 0).result().model_ms / 1000

    def _threads(self, worker: int) -> int:
        share = max(1, self._cpus // len(self._busy))
        if worker:
            return share
        others = sum(self._busy[1:])
        return max(1, self._cpus - share * others)

    async def _run(self, worker: int, jobs: list[_Job]) -> None:
        try:
            await self._pass(worker, jobs)
        finally:
            with self._lock:
                self._busy[worker] = False
                self._start_free_workers_locked()
            if self._on_idle is not None and not any(self._busy):
                self._on_idle()

    async def _pass(self, worker: int, jobs: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        try:
            outcomes = await loop.run_in_executor(self._executors[worker], self._outcomes, worker, jobs)
        except Exception as exc:  # the executor refused it (shut down)
            outcomes = [(job, exc) for job in jobs]
        _settle(outcomes)

    def _outcomes(self, worker: int, jobs: list[_Job], take_quick: bool = True) -> list[Outcome]:
        """On `worker`'s thread: encode the jobs' texts in one call; each job's answer or error."""
        texts = [text for job in jobs for text in job.texts]
        try:
            encoded = self._timed(texts, worker, take_quick)
        except ModelOutputError as exc:
            if len(jobs) > 1 and exc.rows:
                return self._without_the_failed(worker, jobs, exc, take_quick)
            return [(job, exc) for job in jobs]
        except Exception as exc:  # every caller in the pass hears about it
            return [(job, exc) for job in jobs]
        outcomes, start = [], 0
        for job in jobs:
            outcomes.append((job, encoded.slice(start, start + len(job.texts))))
            start += len(job.texts)
        return outcomes

    def _without_the_failed(
        self, worker: int, jobs: list[_Job], exc: ModelOutputError, take_quick: bool
    ) -> list[Outcome]:
        """Some texts of a shared pass gave inf or NaN (float16 overflowing on them): their
        requests fail, each told of its own, and the others run again in a pass of their own."""
        outcomes, clean, start = [], [], 0
        for job in jobs:
            mine = [row - start for row in exc.rows if start <= row < start + len(job.texts)]
            start += len(job.texts)
            if mine:
                outcomes.append((job, exc.for_rows(mine)))
            elif not job.future.done():
                clean.append(job)
        if clean:
            outcomes += self._outcomes(worker, clean, take_quick)
        return outcomes

    def shutdown(self) -> None:
        for executor in self._executors:
            executor.shutdown(wait=False, cancel_futures=True)


def _settle(outcomes: list[Outcome]) -> None:
    """On the event loop: answer each job still awaited."""
    for job, outcome in outcomes:
        if job.future.done():
            continue
        if isinstance(outcome, BaseException):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)


def home_thread() -> ThreadPoolExecutor:
    """The thread that loads a model and then runs worker 0's passes."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward-0")


def _interleave(parts: list[Encoded]) -> Encoded:
    """Undo the every-n-th split: part i holds texts i, i+n, i+2n, ..."""
    n, total = len(parts), sum(len(p.tokens) for p in parts)
    vectors = np.empty((total, parts[0].vectors.shape[1]), dtype=parts[0].vectors.dtype)
    tokens, truncated = [0] * total, [False] * total
    for i, part in enumerate(parts):
        vectors[i::n] = part.vectors
        tokens[i::n] = part.tokens
        truncated[i::n] = part.truncated
    return Encoded(vectors, tokens, truncated, max(p.model_ms for p in parts), parts[0].runtime)
