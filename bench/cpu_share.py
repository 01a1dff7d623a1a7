"""Where a machine's CPU time went while a benchmark phase ran: per process group, from /proc.

    with cpu_share(APP_GROUPS) as share:
        run_the_load()
    print(describe(share.fractions()))

The served figures are ratios against raw passes on the same cores, so whatever else runs
there (the ingress, HAProxy, Ray's own processes, the benchmark's client) is taken from
the model. This says how much, and how long the cores stood idle.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds() -> dict[int, tuple[float, str]]:
    """CPU seconds (user and system) and command line of every process this user can read."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # it ended meanwhile
            continue
        name = stat[stat.find("(") + 1 : stat.rfind(")")]
        out[int(entry)] = (_stat_cpu_seconds(stat), command or name)
    return out


def thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds (user and system) per thread id of this process."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                out[tid] = _stat_cpu_seconds(f.read())
        except OSError:  # the thread ended meanwhile
            continue
    return out


def _stat_cpu_seconds(stat: str) -> float:
    """User plus system CPU seconds from a /proc stat line (the name may hold spaces)."""
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class CpuShare:
    """Seconds of CPU per group over `wall_s` on `cpus` cores (this process's, by default)."""

    cpus: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    wall_s: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, other: CpuShare) -> None:
        self.wall_s += other.wall_s
        for group, seconds in other.seconds.items():
            self.seconds[group] = self.seconds.get(group, 0.0) + seconds

    def fractions(self) -> dict[str, float]:
        """Each group's share of all the cores' time, and "idle" for what nobody used."""
        available = self.wall_s * self.cpus
        if not available:
            return {}
        shares = {group: seconds / available for group, seconds in self.seconds.items()}
        shares["idle"] = max(0.0, 1.0 - sum(shares.values()))
        return shares


@contextmanager
def cpu_share(groups: dict[str, str], children: str = "client") -> Iterator[CpuShare]:
    """Measure the block: processes whose command line contains a group's marker count to
    it, every other process to "other processes", and this process's children that ended
    in the block (a client run with subprocess) to `children`."""
    share = CpuShare()
    before, children_before = process_cpu_seconds(), _children_cpu_seconds()
    started = time.perf_counter()
    try:
        yield share
    finally:
        share.wall_s = time.perf_counter() - started
        after = process_cpu_seconds()
        share.seconds[children] = _children_cpu_seconds() - children_before
        for pid, (seconds, command) in after.items():
            spent = seconds - before.get(pid, (0.0, ""))[0]
            if spent <= 0:
                continue
            group = next((g for g, marker in groups.items() if marker in command),
                         "other processes")
            share.seconds[group] = share.seconds.get(group, 0.0) + spent


def describe(fractions: dict[str, float]) -> str:
    """CpuShare.fractions() as "model replica 81%, ingress 4%, ...", idle last."""
    fractions = dict(fractions)
    idle = fractions.pop("idle", 0.0)
    parts = [f"{group} {100 * value:.0f}%" for group, value in
             sorted(fractions.items(), key=lambda item: -item[1])]
    return ", ".join([*parts, f"idle {100 * idle:.0f}%"])
