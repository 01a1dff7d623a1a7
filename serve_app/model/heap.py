"""Give the C heap's free pages back to the system when a replica goes idle.

Each forward pass allocates and frees activations of its own sizes. glibc keeps
what is freed (in the main heap and in one arena per thread) for reuse instead of
returning it, so a replica that has seen passes of many shapes (lone texts, full
batches, long inputs) stays at the resident size of the largest mix it has met:
the Qwen3-Embedding-0.6B stand-in went from 1.4 to 2.4 GB over a few minutes of
varied requests, though its passes need far less at any one time
(bench/NOTES.md). `malloc_trim(0)` hands every free whole page back to the
kernel: 0.57 GB of those 2.4 in 23 ms.

`HeapTrimmer.when_idle` is called as the forward scheduler runs out of work; it
trims on a thread of its own, so neither the event loop nor a worker waits for it,
and only once the replica has grown by `growth_bytes` since the last trim, so a
steady stream of similar requests never pays for one. Where the C library has no
`malloc_trim` (not glibc), it does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

GROWTH_BYTES = 32 << 20
_PAGE = os.sysconf("SC_PAGE_SIZE")


@functools.cache
def libc() -> ctypes.CDLL:
    """This process's C library."""
    return ctypes.CDLL(None, use_errno=True)


def resident_bytes() -> int:
    """This process's resident memory, from /proc (0 where there is none)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none."""
    try:
        trim = libc().malloc_trim
    except AttributeError:
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


class HeapTrimmer:
    """Trims the heap on its own thread when the replica idles after growing."""

    def __init__(self, growth_bytes: int = GROWTH_BYTES,
                 trim: Callable[[int], int] | None = None,
                 resident: Callable[[], int] = resident_bytes) -> None:
        self.growth_bytes = growth_bytes
        self._trim = trim if trim is not None else malloc_trim()
        self._resident = resident
        self._baseline = resident()  # resident size after the last trim (or at start)
        self._running = False
        self._thread: ThreadPoolExecutor | None = None
        self.trims = 0
        self.trimmed_bytes = 0  # given back, summed over the trims

    def when_idle(self) -> None:
        if self._trim is None or self._running:
            return
        if self._resident() - self._baseline < self.growth_bytes:
            return
        self._running = True
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="heap-trim")
        self._thread.submit(self._run)

    def _run(self) -> None:
        before = self._resident()
        try:
            self._trim(0)
        finally:
            self._baseline = self._resident()
            self.trims += 1
            self.trimmed_bytes += max(0, before - self._baseline)
            self._running = False
