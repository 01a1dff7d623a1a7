"""Continuous batching for the model replica: no wait when a worker is free, pooling when not.

A fixed wait for more requests (as @serve.batch has) costs every lone request
(an Excel cell recalculating) that many milliseconds. Here the wait is zero by
default; instead, texts that arrive while every worker is busy pile up, and the
next free worker takes all of them at once, sorted by length into cache-sized
forward passes. Each request is answered as soon as its own texts are done, not
when everything it shared passes with is. Work whose caller was cancelled before
its pass began is dropped; a pass that has begun runs out.

On a CPU, two workers each run a pass on half the cores; a worker that runs
alone takes all of them. Thread counts are per calling thread in torch, so each
worker sets its own before every pass, and again before every transformer block
(TextEmbedder.encode): a pass keeps to its share as the other worker starts or
stops. Each worker is one fixed thread, and a lone request always goes to worker
0: another thread's OpenMP team would still be spinning from its last pass
(measured: +3.4 ms per request).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from serve_app.core.encoded import Encoded, Item

INLINE_TEXTS = 4
# A lone request runs on the event loop only if its pass should take at most this long:
# meanwhile the replica answers no health check and takes in no request.
INLINE_MS = 20.0
MIN_SPLIT_TEXTS = 8  # per worker: smaller batches stay in one pass
# encode(texts, threads) -> Encoded; threads() is asked before every forward pass and block.
EncodeFn = Callable[[list[Item], Callable[[], int]], Encoded]


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
    ) -> None:
        self._encode = encode
        self._on_pass = on_pass  # (texts in the pass, seconds its oldest job waited)
        self._cpus = cpus
        self.max_texts = max_texts
        # How long an idle scheduler waits for company before it starts a pass (the
        # batch_wait_timeout_s setting); 0: it starts at once.
        self.wait_s = wait_s
        self._gathering = False
        self._pending: deque[_Job] = deque()
        self._busy = [False] * workers
        self._executors = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"forward-{i}")
            for i in range(workers)
        ]
        self.batches = 0  # passes started, for tests and metrics
        self.passes_by_worker = [0] * workers
        self.inline_passes = 0
        # Forward-pass milliseconds per UTF-8 byte of input, learnt from every timed pass;
        # None until the first. Bytes bound tokens from above for byte-level BPE and
        # WordPiece alike, so the estimate errs towards the thread.
        self.ms_per_byte: float | None = None

    async def embed(self, texts: list[Item]) -> Encoded:
        """Embed `texts`, sharing a pass with whatever else is waiting."""
        if not self.wait_s and not any(self._busy) and not self._pending and self._runs_inline(texts):
            # A lone short request runs right here: no hand-off to a thread and back.
            self.batches += 1
            self.inline_passes += 1
            self._report(len(texts), 0.0)
            return self._timed(texts)
        loop = asyncio.get_running_loop()
        # A request big enough for every worker is dealt out among them (every n-th text,
        # so each gets a like mix of lengths), which would otherwise keep one worker
        # busy alone.
        pieces = len(self._busy) if len(texts) >= MIN_SPLIT_TEXTS * len(self._busy) else 1
        jobs = [_Job(texts[i::pieces], loop.create_future()) for i in range(pieces)]
        self._pending.extend(jobs)
        if self.wait_s and not any(self._busy):
            if not self._gathering:  # the first arrival waits for company
                self._gathering = True
                loop.call_later(self.wait_s, self._gathered)
        else:
            self._start_free_workers()
        if pieces == 1:
            return await jobs[0].future
        parts = await asyncio.gather(*(job.future for job in jobs), return_exceptions=True)
        for part in parts:
            if isinstance(part, BaseException):
                raise part
        return _interleave(parts)

    def _gathered(self) -> None:
        self._gathering = False
        self._start_free_workers()

    def _runs_inline(self, texts: list[Item]) -> bool:
        """Few texts whose pass, by what earlier passes cost, blocks the loop only briefly."""
        if len(texts) > INLINE_TEXTS or self.ms_per_byte is None:
            return False
        return _utf8_bytes(texts) * self.ms_per_byte <= INLINE_MS

    def _start_free_workers(self) -> None:
        while self._pending and self._pending[0].future.done():
            self._pending.popleft()  # its caller was cancelled: nobody waits for this work
        while self._pending and not all(self._busy):
            worker = self._busy.index(False)  # the lowest free one: its threads are warm
            # Share what is waiting among the free workers, so that no core idles while
            # one worker runs a long pass alone (a large model's pass takes seconds);
            # this is also what keeps the pieces embed() deals out on separate workers.
            waiting = sum(len(job.texts) for job in self._pending)
            share = min(self.max_texts, -(-waiting // self._busy.count(False)))
            jobs = [self._pending.popleft()]
            size = len(jobs[0].texts)
            while self._pending and size < share and size + len(self._pending[0].texts) <= self.max_texts:
                job = self._pending.popleft()
                if not job.future.done():
                    size += len(job.texts)
                    jobs.append(job)
            self._busy[worker] = True
            self.batches += 1
            self._report(size, time.perf_counter() - jobs[0].queued_at)
            self.passes_by_worker[worker] += 1
            asyncio.get_running_loop().create_task(self._run(worker, jobs))

    def _report(self, texts: int, waited_s: float) -> None:
        if self._on_pass is not None:
            self._on_pass(texts, waited_s)

    def _timed(self, texts: list[Item]) -> Encoded:
        started = time.perf_counter()
        encoded = self._encode(texts, self._threads)
        encoded.model_ms = (time.perf_counter() - started) * 1000
        cost = encoded.model_ms / max(1, _utf8_bytes(texts))
        # A moving average; two workers may write it at once, and either value will do.
        self.ms_per_byte = cost if self.ms_per_byte is None else 0.7 * self.ms_per_byte + 0.3 * cost
        return encoded

    def warm_up(self, texts: list[str]) -> float:
        """One pass on this thread (it pays one-off kernel set-up); its seconds."""
        return self._timed(texts).model_ms / 1000

    def _threads(self) -> int:
        return max(1, self._cpus // max(1, sum(self._busy)))

    async def _run(self, worker: int, jobs: list[_Job]) -> None:
        texts = [text for job in jobs for text in job.texts]
        loop = asyncio.get_running_loop()
        try:
            encoded = await loop.run_in_executor(self._executors[worker], self._timed, texts)
        except Exception as exc:  # every caller in the pass hears about it
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
        else:
            start = 0
            for job in jobs:
                if not job.future.done():
                    job.future.set_result(encoded.slice(start, start + len(job.texts)))
                start += len(job.texts)
        finally:
            self._busy[worker] = False
            self._start_free_workers()

    def shutdown(self) -> None:
        for executor in self._executors:
            executor.shutdown(wait=False, cancel_futures=True)


def _utf8_bytes(texts: list[Item]) -> int:
    # A token id stands for about four bytes of text.
    return sum(len(text.encode("utf-8", "surrogatepass")) if isinstance(text, str)
               else 4 * len(text.ids) for text in texts)


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
