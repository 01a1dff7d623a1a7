"""One short text's raw forward pass on the thread that loaded the model vs on another thread.

    python bench/omp_team.py                       # bundled:minilm
    python bench/omp_team.py --model /tmp/qwen3-standin --texts 30

Why: the replica's model pass measured slower than the same pass raw (all-MiniLM-L6-v2
14.3 vs 7.5 ms). The replica then ran torch on several threads (its constructor, the
speed-up thread, the event loop's inline path, one per forward worker). With GNU
OpenMP (torch's CPU build here) every such thread that ran a parallel region keeps
its own team; once the teams hold more threads than there are CPUs, libgomp cuts
its spin-wait to a few hundred cycles (its "throttled" spin count), so each of the
hundreds of parallel regions in a pass wakes its team from a futex sleep.

Three variants, each embedding the same texts one at a time with 2 threads: a
model loaded and run on one thread while no other thread has run torch (the fix's
shape: all of the replica's torch calls on one thread); a model loaded on the main
thread and run there (once the first variant's thread has ended); and that model
run on a second thread (the replica's case before the fix: now it loads the model on
forward worker 0's thread, and no other thread runs torch on more than one core; see
serve_app/model/scheduler.py). Per variant: p50 ms and
CPU seconds of the busiest threads of the process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))

from corpus import short_texts  # noqa: E402
from cpu_share import thread_cpu_seconds  # noqa: E402


def _measure(model, texts: list[str], threads: int) -> tuple[float, list[float]]:
    for text in texts[:5]:  # the first passes on a thread set its team up
        model.encode([text], lambda: threads)
    before = thread_cpu_seconds()
    ms = []
    for text in texts[5:]:
        started = time.perf_counter()
        model.encode([text], lambda: threads)
        ms.append((time.perf_counter() - started) * 1000)
    after = thread_cpu_seconds()
    busiest = sorted((after[t] - before.get(t, 0.0) for t in after), reverse=True)[:3]
    return statistics.median(ms), [round(s, 2) for s in busiest]


def _on_thread(fn):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", fn()))
    thread.start()
    thread.join()
    return result["value"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="bundled:minilm")
    parser.add_argument("--texts", type=int, default=110)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from serve_app.core.modelinfo import resolve_model
    from serve_app.model.embedder import TextEmbedder

    texts = short_texts(args.texts)

    def load():
        model = TextEmbedder(resolve_model(args.model), cpu_threads=args.threads)
        model.speed_up()
        return model

    # First, while no other thread of the process has run torch: the fix's shape.
    rows = [
        (
            "loaded and run on one thread alone",
            *_on_thread(lambda: _measure(load(), texts, args.threads)),
        )
    ]
    model = load()  # on the main thread, as the replica's constructor thread
    rows.append(("loaded on a thread, run on it", *_measure(model, texts, args.threads)))
    rows.append(
        (
            "loaded on a thread, run on another",
            *_on_thread(lambda: _measure(model, texts, args.threads)),
        )
    )
    base = rows[0][1]
    print(f"{args.model}, {len(texts) - 5} texts one at a time, {args.threads} threads")
    print(f"{'variant':38} {'p50 ms':>7} {'ratio':>6}  busiest threads' CPU s")
    for name, p50, cpu in rows:
        print(f"{name:38} {p50:7.1f} {p50 / base:6.2f}  {cpu}")


if __name__ == "__main__":
    main()
