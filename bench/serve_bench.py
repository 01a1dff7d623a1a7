"""Served against raw, in one run on one machine: throughput, single-text latency, cold start.

    python bench/serve_bench.py                       # bundled:minilm, the figures in the README
    python bench/serve_bench.py --untuned             # plain Ray Serve settings, for comparison
    python bench/serve_bench.py --json bench/results/serve.json

Raw is the same TextEmbedder in this process, no HTTP, no Ray. Served is the
Ray Serve app over HTTP on 127.0.0.1, driven by bench/http_client.py in its own
process (as real clients are), asking for base64 as the official openai client
does. Raw and served alternate, because this machine's speed drifts over
minutes. All traffic is local, bounded in count and time.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
from corpus import sentences, short_texts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled:minilm")
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--per-request", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5,
                        help="raw and served passes alternate this many times")
    parser.add_argument("--latency-requests", type=int, default=200)
    parser.add_argument("--cold-starts", type=int, default=3)
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra AppArgs setting for the served app (repeatable)")
    parser.add_argument("--untuned", action="store_true",
                        help="plain Ray Serve: without the environment python -m serve_app sets")
    parser.add_argument("--ray-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment for the local Ray cluster the bench starts (repeatable)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    opts = parser.parse_args()

    import ray
    from ray import serve

    from serve_app.config import AppArgs
    from serve_app.deployments import build_app
    from serve_app.embedder import TextEmbedder, default_cpu_threads
    from serve_app.modelinfo import resolve_model

    corpus = sentences(opts.texts)
    singles = short_texts(opts.latency_requests + 20)
    # Every round sends the same corpus: the shared cache would answer rounds 2 to 5, so it
    # is off here; this measures the model path (`--set cache_max_mb=256` to see the cache).
    extra = {"cache_max_mb": 0, **dict(item.split("=", 1) for item in opts.set)}
    if not opts.untuned:
        from serve_app.launch import tuned_environment

        os.environ.update(tuned_environment(port=opts.port))  # Ray's side ports follow it
    os.environ.update(dict(item.split("=", 1) for item in opts.ray_env))
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": opts.port})
    base = f"http://127.0.0.1:{opts.port}"
    try:
        serve.run(build_app(AppArgs.model_validate({"model": opts.model, "min_replicas": 1, **extra})),
                  name="bench", route_prefix="/bench")
        raw_model = TextEmbedder(resolve_model(opts.model), cpu_threads=default_cpu_threads())
        # The machine's speed drifts over minutes, so raw and served alternate.
        raw, served = compare(raw_model, f"{base}/bench", opts, corpus, singles)
        del raw_model
        gc.collect()
        serve.delete("bench")
        quick = {"idle_timeout_s": 1, "downscale_delay_s": 1, "autoscaling_look_back_s": 2}
        serve.run(build_app(AppArgs.model_validate({"model": opts.model, **quick, **extra})),
                  name="cold", route_prefix="/cold")
        cold = cold_starts(f"{base}/cold", opts.cold_starts)
    finally:
        serve.shutdown()
        ray.shutdown()
    results = {"model": opts.model, "cpus": os.cpu_count(), "texts": opts.texts,
               "raw": raw, "served": served, "cold_start_s": cold, "settings": extra,
               "ray_env": opts.ray_env, "tuned": not opts.untuned}
    report(results)
    if opts.json:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(results, indent=2))


def compare(model, url: str, opts, corpus: list[str], singles: list[str]):
    """Raw passes in this process, served passes from a client process, alternating."""

    def client(*args: str) -> dict:
        out = subprocess.run(
            [sys.executable, str(Path(__file__).parent / "http_client.py"), *args, url],
            capture_output=True, text=True, check=True, timeout=600,
        )
        return json.loads(out.stdout)

    def raw_pass(size: int) -> float:
        start = time.perf_counter()
        for i in range(0, len(corpus), size):
            model.encode(corpus[i : i + size])
        return len(corpus) / (time.perf_counter() - start)

    for text in singles[:20]:
        model.encode([text])
    sizes = sorted({opts.per_request, 64, 128})
    raw_rounds: dict[int, list[float]] = {size: [] for size in sizes}
    served_rounds: list[float] = []
    for r in range(opts.rounds):
        for size in sizes:
            raw_rounds[size].append(raw_pass(size))
        served_rounds.append(client(
            "throughput", "--texts", str(opts.texts), "--per-request", str(opts.per_request),
            "--concurrency", str(opts.concurrency),
        )["texts_per_s"])
        print(f"  round {r + 1}: raw " + ", ".join(f"{k}: {v[-1]:.0f}/s" for k, v in raw_rounds.items())
              + f"; served {served_rounds[-1]:.0f}/s", flush=True)
    raw_lat, served_lat, ingress_ms, model_ms = [], [], [], []
    texts = singles[20:]
    for offset in range(0, len(texts), 25):  # alternate blocks of 25
        for text in texts[offset : offset + 25]:
            start = time.perf_counter()
            model.encode([text])
            raw_lat.append((time.perf_counter() - start) * 1000)
        block = client("latency", "--requests", "25", "--offset", str(offset))
        served_lat += block["ms"]
        ingress_ms += block["ingress_ms"]
        model_ms += block["model_ms"]

    raw_by_size = {size: statistics.median(v) for size, v in raw_rounds.items()}
    raw = {"throughput_by_batch": raw_by_size, "throughput": max(raw_by_size.values()),
           "p50_ms": float(np.percentile(raw_lat, 50)), "p95_ms": float(np.percentile(raw_lat, 95))}
    served = {"throughput": statistics.median(served_rounds), "rounds": served_rounds,
              "p50_ms": float(np.percentile(served_lat, 50)),
              "p95_ms": float(np.percentile(served_lat, 95)),
              # Medians of the server's Server-Timing split for the same requests.
              "split_ms": {
                  "outside the ingress (client, HAProxy or proxy, HTTP)":
                      float(np.median(np.array(served_lat) - np.array(ingress_ms))),
                  "ingress, except the model (validation, handle hop, batching)":
                      float(np.median(np.array(ingress_ms) - np.array(model_ms))),
                  "model forward pass": float(np.median(model_ms)),
              }}
    return raw, served


def cold_starts(url: str, count: int) -> list[float]:
    """Seconds from request to answer, each time after the model has scaled to zero."""
    import httpx
    from ray import serve

    def replicas() -> dict:
        states = serve.status().applications["cold"].deployments["Embedder"].replica_states
        return {k: v for k, v in states.items() if v}

    times = []
    for i in range(count):
        deadline = time.monotonic() + 120
        while replicas():
            if time.monotonic() > deadline:
                raise RuntimeError("the model never scaled to zero")
            time.sleep(0.5)
        time.sleep(3)  # well past the last replica, as after a real idle period
        start = time.perf_counter()
        reply = httpx.post(f"{url}/v1/embeddings", json={"input": f"cold start {i}"}, timeout=120)
        reply.raise_for_status()
        times.append(time.perf_counter() - start)
        print(f"  cold start {i + 1}: {times[-1]:.2f} s", flush=True)
    return times


def report(r: dict) -> None:
    raw, served, cold = r["raw"], r["served"], r["cold_start_s"]
    rows = [
        ("throughput (texts/s)", f"{raw['throughput']:.0f}", f"{served['throughput']:.0f}",
         f"{served['throughput'] / raw['throughput']:.2f} x raw"),
        ("single text p50 (ms)", f"{raw['p50_ms']:.1f}", f"{served['p50_ms']:.1f}",
         f"+{served['p50_ms'] - raw['p50_ms']:.1f} ms"),
        ("single text p95 (ms)", f"{raw['p95_ms']:.1f}", f"{served['p95_ms']:.1f}",
         f"+{served['p95_ms'] - raw['p95_ms']:.1f} ms"),
        ("cold start (s)", "", f"{statistics.median(cold):.2f}",
         "median of " + ", ".join(f"{c:.2f}" for c in cold)),
    ]
    print(f"\nmodel {r['model']}, {r['cpus']} CPUs, {r['texts']} texts; raw (median of rounds) by batch: "
          + ", ".join(f"{k}: {v:.0f}/s" for k, v in raw["throughput_by_batch"].items()))
    print(f"{'':24}{'raw':>10}{'served':>10}  comparison")
    for name, a, b, c in rows:
        print(f"{name:24}{a:>10}{b:>10}  {c}")
    print("served single text, median split (ms): " + "; ".join(
        f"{k} {v:.1f}" for k, v in served["split_ms"].items()))


if __name__ == "__main__":
    main()
