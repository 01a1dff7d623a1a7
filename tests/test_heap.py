"""Giving the C heap's free pages back when a replica idles (serve_app.model.heap)."""

import threading

from conftest import wait_for

from serve_app.model.heap import HeapTrimmer, malloc_trim, resident_bytes


class Recorder:
    """A trim that records its calls and the thread they ran on."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.release = threading.Event()

    def __call__(self, pad: int) -> int:
        self.calls.append(threading.current_thread().name)
        self.release.wait(10)
        return 1


def test_a_trim_runs_on_its_own_thread_only_after_the_replica_has_grown():
    resident = [1000 << 20]
    trim = Recorder()
    trimmer = HeapTrimmer(growth_bytes=32 << 20, trim=trim, resident=lambda: resident[0])
    resident[0] += 31 << 20
    trimmer.when_idle()
    assert trim.calls == [] and trimmer.trims == 0  # grown less than growth_bytes
    resident[0] += 1 << 20
    trimmer.when_idle()
    trimmer.when_idle()  # while the first runs: not a second
    wait_for(lambda: trim.calls, 10, "the trim to start")
    assert trim.calls[0].startswith("heap-trim")
    resident[0] -= 20 << 20  # what the trim gave back
    trim.release.set()
    wait_for(lambda: trimmer.trims == 1, 10, "the trim to end")
    assert len(trim.calls) == 1 and trimmer.trimmed_bytes == 20 << 20
    resident[0] += 31 << 20  # grown since the last trim, not since the start: not yet
    trimmer.when_idle()
    assert len(trim.calls) == 1


def test_without_malloc_trim_nothing_is_done():
    trimmer = HeapTrimmer(growth_bytes=0, resident=lambda: 1 << 40)
    trimmer._trim = None  # as on a C library other than glibc
    trimmer.when_idle()
    assert trimmer.trims == 0


def test_freed_heap_pages_are_given_back_to_the_system():
    trim = malloc_trim()
    assert trim is not None  # glibc, as on every machine this runs on
    # Earlier tests leave free memory on the heap, which the blocks below would reuse
    # without growing: hand it back first, so that they grow the process.
    trim(0)
    trimmer = HeapTrimmer(growth_bytes=16 << 20)
    # 128 MiB in blocks below glibc's mmap threshold, so on the heap; every other one
    # freed leaves 64 MiB of holes that glibc keeps for reuse, resident.
    blocks = [bytearray(64 << 10) for _ in range(2048)]
    del blocks[::2]
    grown = resident_bytes()
    trimmer.when_idle()
    wait_for(lambda: trimmer.trims == 1, 10, "the trim")
    assert resident_bytes() < grown - (32 << 20)
    assert trimmer.trimmed_bytes >= 32 << 20
    del blocks
