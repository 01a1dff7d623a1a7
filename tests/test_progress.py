"""A batch job's progress line: when it is said, and what it says (a fake clock)."""

from __future__ import annotations

import pytest

from serve_app.batch.actors import block_rows
from serve_app.batch.progress import Progress, duration


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def progress(total, every_s=10.0, **kwargs):
    clock, said = Clock(), []
    return Progress(total, every_s=every_s, say=said.append, clock=clock, **kwargs), clock, said


def blocks(counter: Progress, clock: Clock, *arrivals: tuple[float, int]) -> None:
    """Blocks coming back: each (seconds after the one before, rows)."""
    for seconds, rows in arrivals:
        clock.now += seconds
        counter.add(rows)


def test_a_line_comes_once_the_pause_has_passed_with_the_share_speed_and_time_left():
    counter, clock, said = progress(20_000)
    blocks(counter, clock, (4, 1_024))
    assert said == []  # 4 s in: too soon
    blocks(counter, clock, (8, 1_024))
    # The speed is the second block's 1,024 rows in the 8 s since the first came.
    assert said == ["Embedded 2,048 of 20,000 rows (10%) in 12 s: 128 rows/s, about 2 min 20 s left."]
    blocks(counter, clock, (5, 1_024))
    assert len(said) == 1  # 5 s after the last line
    blocks(counter, clock, (5, 1_024))
    assert said[-1] == "Embedded 4,096 of 20,000 rows (20%) in 22 s: 171 rows/s, about 1 min 33 s left."


def test_the_speed_leaves_out_the_wait_for_the_first_block():
    # The first block waited 30 s for the model; the next came 2 s later.
    counter, clock, said = progress(20_000, every_s=0)
    blocks(counter, clock, (30, 1_024), (2, 1_024))
    assert said == ["Embedded 1,024 of 20,000 rows (5%) in 30 s: 34 rows/s, about 9 min 16 s left.",
                    "Embedded 2,048 of 20,000 rows (10%) in 32 s: 512 rows/s, about 35 s left."]


def test_the_last_block_says_nothing_since_the_jobs_last_line_says_what_was_written():
    counter, clock, said = progress(2_048, every_s=0)
    blocks(counter, clock, (3, 1_024), (3, 1_024))
    assert said == ["Embedded 1,024 of 2,048 rows (50%) in 3 s: 341 rows/s, about 3 s left."]


def test_no_pause_says_every_block_and_a_block_of_no_rows_says_nothing():
    counter, clock, said = progress(30, every_s=0, done="Scored")
    blocks(counter, clock, (0, 0), (20, 10), (20, 10))
    assert said == ["Scored 10 of 30 rows (33%) in 20 s: 0.5 rows/s, about 40 s left.",
                    "Scored 20 of 30 rows (67%) in 40 s: 0.5 rows/s, about 20 s left."]


def test_without_a_total_it_says_the_count_and_speed_alone():
    counter, clock, said = progress(None, done="Embedded", unit="texts")
    blocks(counter, clock, (90, 5_400))
    assert said == ["Embedded 5,400 texts in 1 min 30 s: 60 texts/s."]


@pytest.mark.parametrize(("seconds", "said"), [
    (0, "0 s"), (8.4, "8 s"), (59.6, "1 min"), (185, "3 min 5 s"), (3_600, "1 h"),
    (8_040, "2 h 14 min"), (-1, "0 s"),
])
def test_durations_are_as_precise_as_a_wait_needs(seconds, said):
    assert duration(seconds) == said


@pytest.mark.parametrize(("rows", "actors", "block"), [
    (20_000, 1, 1_000),  # 20 blocks of at most four batches (1,024 rows), evened out
    (40, 1, 14),         # batches of 4 below: three blocks of 14, 13 and 13
    (1_500, 8, 300),     # a small table: a block for each actor while each holds a batch ...
    (1_000, 4, 334),     # ... and none under a batch, which Ray Data would bundle with the next
    (1_000, 16, 334),
    (100, 4, 100),       # less than a batch: one block
    (None, 4, 1_024),    # rows not known: four batches
])
def test_a_block_is_four_batches_at_most_and_at_least_one_where_the_actors_are_many(rows, actors, block):
    batch_size = 4 if rows == 40 else 256
    assert block_rows(rows, batch_size, actors) == block
