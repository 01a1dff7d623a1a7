"""bench/cpu_share.py: the CPU time of real processes, counted to the right group."""

from __future__ import annotations

import subprocess
import sys

from bench.cpu_share import cpu_share, describe

# Spins for `seconds` of its own CPU time, whatever else the machine is doing.
SPIN = "import time\nend = time.process_time() + {seconds}\nwhile time.process_time() < end: pass\n"


def test_a_marked_process_and_an_ended_child_are_counted_to_their_groups():
    marker = "cpu-share-test-marker"
    spinner = subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=30), marker])
    try:
        with cpu_share({"marked": marker}) as share:
            subprocess.run([sys.executable, "-c", SPIN.format(seconds=0.4)], check=True)
    finally:
        spinner.kill()
        spinner.wait()
    # The child ran 0.4 s of CPU and ended inside the block: the "client" group; the
    # marked process spun for the whole block, on one core at most.
    assert 0.35 <= share.seconds["client"] < 1.5
    assert share.seconds["marked"] >= 0.2
    assert share.seconds["marked"] <= share.wall_s * 1.05 + 0.2  # /proc read on both sides of wall_s
    line = describe(share.fractions())
    assert line.startswith(("marked ", "client ")) and line.split(", ")[-1].startswith("idle ")
