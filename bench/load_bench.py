"""Load on the served app: a team's peak, a stampede, and a model process killed under load.

    python bench/load_bench.py
    python bench/load_bench.py --json bench/results/load.json

Everything goes to 127.0.0.1, is bounded in count and time, and stops by itself:
  steady   20 requests/s for 60 s (open loop: a request starts every 50 ms whether
           or not earlier ones have answered), each with 1 new text (a cell
           recalculating), then again with 8 new texts each
  burst    200 concurrent clients, one 16-text request each; only 2xx/429/503 may
           come back, then the time until requests succeed again
  kill     10 requests/s for 30 s with the model replica's process SIGKILLed at 5 s
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from corpus import sentences  # noqa: E402
from served import served_app  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled:minilm")
    parser.add_argument("--port", type=int, default=8125)
    parser.add_argument("--rate", type=float, default=20)
    parser.add_argument("--duration", type=float, default=60)
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--json", type=Path)
    opts = parser.parse_args()

    results: dict = {}
    with served_app("load", opts.port, model=opts.model, min_replicas=1) as url:
        texts = iter(sentences(200_000, seed=5))
        results["steady_1"] = asyncio.run(open_loop(url, opts.rate, opts.duration, texts, 1))
        results["steady_8"] = asyncio.run(open_loop(url, opts.rate, opts.duration, texts, 8))
        results["burst"] = asyncio.run(burst(url, opts.burst, texts))
        results["kill"] = asyncio.run(open_loop(url, 10, 30, texts, 8, kill_at_s=5))
    report(results)
    if opts.json:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(results, indent=2))


async def send(client, url: str, batch: list[str]) -> tuple[int, float]:
    started = time.perf_counter()
    try:
        response = await client.post(f"{url}/v1/embeddings", json={"input": batch})
        status = response.status_code
    except Exception:  # a refused or dropped connection counts as a failure
        status = 0
    return status, time.perf_counter() - started


async def open_loop(url, rate, duration, texts, size, kill_at_s: float | None = None) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=500, max_keepalive_connections=100)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        tasks, started = [], time.perf_counter()
        killed = False
        for i in range(int(rate * duration)):
            due = started + i / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            if kill_at_s is not None and not killed and time.perf_counter() - started >= kill_at_s:
                await asyncio.to_thread(kill_model_replica)
                killed = True
            tasks.append(asyncio.create_task(send(client, url, [next(texts) for _ in range(size)])))
        outcomes = await asyncio.gather(*tasks)
    return summarise(outcomes, time.perf_counter() - started)


async def burst(url, clients, texts) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        started = time.perf_counter()
        outcomes = await asyncio.gather(
            *(send(client, url, [next(texts) for _ in range(16)]) for _ in range(clients))
        )
        finished = time.perf_counter()
        while True:  # recovery: the first ordinary request that succeeds after the stampede
            status, _ = await send(client, url, ["after the burst"])
            if status == 200 or time.perf_counter() - finished > 120:
                break
            await asyncio.sleep(0.5)
    result = summarise(outcomes, finished - started)
    result["allowed_only"] = set(result["statuses"]) <= {"200", "429", "503"}
    result["recovered_after_s"] = time.perf_counter() - finished
    return result


def kill_model_replica() -> None:
    from ray import serve

    handle = serve.get_deployment_handle("Embedder", app_name="load")
    os.kill(handle.describe.remote().result(timeout_s=30)["pid"], signal.SIGKILL)


def summarise(outcomes: list[tuple[int, float]], seconds: float) -> dict:
    statuses = Counter(str(status) for status, _ in outcomes)
    ok = sorted(latency for status, latency in outcomes if status == 200)

    def pct(q: float) -> float:
        return ok[min(len(ok) - 1, int(q * len(ok)))] * 1000 if ok else float("nan")

    return {
        "requests": len(outcomes),
        "statuses": dict(statuses),
        "errors": sum(n for s, n in statuses.items() if s != "200"),
        "seconds": seconds,
        "p50_ms": statistics.median(ok) * 1000 if ok else float("nan"),
        "p99_ms": pct(0.99),
        "max_ms": ok[-1] * 1000 if ok else float("nan"),
    }


def report(r: dict) -> None:
    print("\nphase    requests  statuses                     errors   p50 ms   p99 ms   max ms")
    for name in ("steady_1", "steady_8", "burst", "kill"):
        x = r[name]
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(x["statuses"].items()))
        print(f"{name:8} {x['requests']:8}  {statuses:28} {x['errors']:6} {x['p50_ms']:8.0f} "
              f"{x['p99_ms']:8.0f} {x['max_ms']:8.0f}")
    b = r["burst"]
    print(f"burst: only 2xx/429/503: {b['allowed_only']}; ordinary requests succeed again "
          f"{b['recovered_after_s']:.1f} s after it")


if __name__ == "__main__":
    main()
