"""How far a job has got, said in one line every so often: rows done of all, the speed,
and the time left. Pure: the clock and the sink are given.

Ray Data's own progress (off in jobs) counted blocks and actors every 10 s in nine lines; an analyst
watching `ray job logs -f` wants to know when the sheet will be done.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

# The default pause between two lines, in seconds (`--progress-every`).
EVERY_S = 10.0


class Progress:
    """Counts the rows as their blocks come back; says `Embedded 2,048 of 20,000 rows
    (10%) in 12 s: 171 rows/s, about 1 min 45 s left.` at most every `every_s` seconds
    (0: after every block). `total` None: the count is said without a share or time left.
    The block that completes the total says nothing: the job's last line says what was
    written. The time is counted from the pipeline's start; the speed, from the first
    block on, once there is a second: the first block waits for the actors and the model
    to start (counted in, the first line of a 20,000-row job of the bundled model said
    1 min 50 s left of what took 55 s)."""

    def __init__(self, total: int | None, done: str = "Embedded", unit: str = "rows", *,
                 every_s: float = EVERY_S, say: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.done_word, self.unit = total, done, unit
        self.every_s = every_s
        self.say = say or logger.info
        self.clock = clock
        self.started = self.last_said = clock()
        self.rows = 0
        self.first: tuple[float, int] | None = None  # when the first block came, and its rows

    def add(self, rows: int) -> None:
        self.rows += rows
        now = self.clock()
        if self.first is None and rows:
            self.first = now, self.rows
        finished = self.total is not None and self.rows >= self.total
        if finished or now - self.last_said < self.every_s or not rows:
            return
        self.last_said = now
        self.say(self.line(now))

    def speed(self, now: float) -> float:
        """Rows a second: since the first block, once another has come; else since the start."""
        if self.first is not None and self.rows > self.first[1] and now > self.first[0]:
            return (self.rows - self.first[1]) / (now - self.first[0])
        return self.rows / (now - self.started) if now > self.started else 0.0

    def line(self, now: float) -> str:
        elapsed, rate = now - self.started, self.speed(now)
        speed = f"{rate:,.0f}" if rate >= 10 else f"{rate:.1f}"
        if self.total is None:
            return f"{self.done_word} {self.rows:,} {self.unit} in {duration(elapsed)}: {speed} {self.unit}/s."
        share = f"{100 * self.rows / self.total:.0f}%" if self.total else "100%"
        left = f", about {duration((self.total - self.rows) / rate)} left" if rate > 0 else ""
        return (f"{self.done_word} {self.rows:,} of {self.total:,} {self.unit} ({share}) in "
                f"{duration(elapsed)}: {speed} {self.unit}/s{left}.")


def duration(seconds: float) -> str:
    """`8 s`, `3 min 5 s`, `2 h 14 min`: as precise as a wait needs saying."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s" if seconds else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"
