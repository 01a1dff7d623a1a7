"""Served against raw, in one run on one machine: throughput, single-text latency, cold start.

    python bench/serve_bench.py                       # bundled:minilm, the figures in the README
    python bench/serve_bench.py --untuned             # plain Ray Serve settings, for comparison
    python bench/serve_bench.py --json bench/results/serve.json
    python bench/serve_bench.py --model /tmp/qwen3-standin --texts 192 --rounds 2 \
        --raw-batches 128 --latency-requests 50 --infinity /path/to/venv/bin/infinity_emb

Raw is the same TextEmbedder in this process, no HTTP, no Ray. Served is the
Ray Serve app over HTTP on 127.0.0.1, driven by bench/http_client.py in its own
process (as real clients are), asking for base64 as the official openai client
does. Raw and served alternate, because this machine's speed drifts over
minutes. All traffic is local, bounded in count and time.

Raw is measured at the service's defaults (dtype=auto), in float32 (the old
default, the baseline of the real-model targets), and with two forward workers
of one thread each (the replica's split on a 2-core CPU); "best raw" is the
fastest of these. `--infinity` also serves the model with infinity-emb (torch
engine, in the dtype ours picks on this CPU unless `--infinity-dtype` says otherwise,
its own virtual environment) on the next port and drives it with the same client in
the same rounds.
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
import torch  # noqa: E402
from corpus import sentences, short_texts  # noqa: E402
from served import bench_environment, wait_for_speed_up  # noqa: E402


def wait_until_sped_up(app: str, raw_model) -> None:
    """Wait for the app's replica to turn on its fast paths, and check they are the raw model's."""
    described = wait_for_speed_up(app)
    want = {"weights_packed": raw_model.weights_packed, "rows_shared": raw_model.rows_shared,
            "elementwise_fused": raw_model.elementwise_fused}
    if {k: described[k] for k in want} != want:
        raise SystemExit(f"the served replica's fast paths are {described['speed_up']}, the raw model's {want}")
    print(f"served: the replica's fast paths are on as the raw model's: {want}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled:minilm")
    # A served round ends with its last requests draining (about one request's latency with
    # fewer than --concurrency in flight): 3% of a round of 2,000 texts of the bundled model,
    # which lasts under 2 s here (bench/NOTES.md). 8,000 keeps that under 1%, so the round
    # measures the steady state that raw's rounds do.
    parser.add_argument("--texts", type=int, default=8000,
                        help="texts a round, raw and served (default 8000)")
    parser.add_argument("--per-request", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5,
                        help="raw and served passes alternate this many times")
    parser.add_argument("--latency-requests", type=int, default=200)
    parser.add_argument("--cold-starts", type=int, default=3, help="0: skip the cold-start runs")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra AppArgs setting for the served app (repeatable); a dtype is also raw's")
    parser.add_argument("--untuned", action="store_true",
                        help="plain Ray Serve: without the environment python -m serve_app sets")
    parser.add_argument("--ray-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment for the local Ray cluster the bench starts (repeatable)")
    parser.add_argument("--raw-batches", default="16,64,128",
                        help="raw passes: texts per encode call (comma-separated)")
    parser.add_argument("--no-float32", action="store_true",
                        help="skip the float32 raw baseline (it takes a while on a large model)")
    parser.add_argument("--infinity", help="infinity_emb executable: serve the model with it too")
    parser.add_argument("--infinity-dtype", help="infinity's --dtype (default: the one dtype=auto picks here)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    opts = parser.parse_args()

    # Ray is imported before the tuned environment is set, on purpose: Ray reads its
    # settings at import, and under the throughput profile a handle's router runs on the
    # caller's event loop, which this driver's blocking calls (describe, status) do not
    # have. The cluster it starts, and so the app, gets the tuned environment.
    import ray
    from ray import serve

    from serve_app.core.config import AppArgs
    from serve_app.core.modelinfo import resolve_model
    from serve_app.model.embedder import TextEmbedder
    from serve_app.model.hardware import default_cpu_threads
    from serve_app.ray_shell.app import build_app

    corpus = sentences(opts.texts)
    singles = short_texts(opts.latency_requests + 20)
    # Every round sends the same corpus: the shared cache would answer rounds 2 to 5, so it
    # is off here; this measures the model path (`--set cache_max_mb=256` to see the cache).
    extra = {"cache_max_mb": 0, **dict(item.split("=", 1) for item in opts.set)}
    if not opts.untuned:
        os.environ.update(bench_environment(opts.port))  # Ray's side ports follow it
    os.environ.update(dict(item.split("=", 1) for item in opts.ray_env))
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": opts.port})
    base = f"http://127.0.0.1:{opts.port}"
    try:
        serve.run(build_app(AppArgs.model_validate({"model": opts.model, "min_replicas": 1, **extra})),
                  name="bench", route_prefix="/bench")
        spec = resolve_model(opts.model)
        # Raw runs in the dtype the served app is given (`--set dtype=float32` compares the
        # float32 path, as a CPU without fast bfloat16 runs it), else in auto's choice.
        raw_model = TextEmbedder(spec, dtype=extra.get("dtype", "auto"),
                                 cpu_threads=default_cpu_threads())
        print(f"raw: {' '.join(raw_model.speed_up())}", flush=True)  # as the replica does, once ready
        wait_until_sped_up("bench", raw_model)
        baseline = None
        if not opts.no_float32 and raw_model.dtype != torch.float32:
            baseline = TextEmbedder(spec, dtype="float32", cpu_threads=default_cpu_threads())
        # The peer runs in the dtype ours chose on this CPU (bfloat16 where it is fast, float32
        # elsewhere: emulated bfloat16 is several times slower), unless told otherwise.
        peer_dtype = opts.infinity_dtype or str(raw_model.dtype).removeprefix("torch.")
        peer = start_infinity(opts.infinity, opts.model, opts.port + 1, peer_dtype) if opts.infinity else None
        try:
            # The machine's speed drifts over minutes, so raw and served alternate.
            raw, served, infinity = compare(
                raw_model, baseline, f"{base}/bench", peer and peer[1], opts, corpus, singles
            )
        finally:
            if peer:
                stop(peer[0])
        served["replica_memory_gb"] = replica_memory_gb("bench")
        del raw_model, baseline
        gc.collect()
        serve.delete("bench")
        cold, steps = [], []
        if opts.cold_starts:
            quick = {"idle_timeout_s": 1, "downscale_delay_s": 1, "autoscaling_look_back_s": 2}
            serve.run(build_app(AppArgs.model_validate({"model": opts.model, **quick, **extra})),
                      name="cold", route_prefix="/cold")
            cold, steps = cold_starts(f"{base}/cold", opts.cold_starts)
            served["cold_replica_memory_gb"] = replica_memory_gb("cold")
    finally:
        serve.shutdown()
        ray.shutdown()
    results = {"model": opts.model, "cpus": os.cpu_count(), "texts": opts.texts,
               "infinity_dtype": peer_dtype if opts.infinity else None,
               "raw": raw, "served": served, "infinity": infinity, "cold_start_s": cold,
               "cold_start_steps_s": steps,
               "settings": extra,
               "ray_env": opts.ray_env, "tuned": not opts.untuned}
    report(results)
    if opts.json:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(results, indent=2))


# The served app's processes, by a marker in their command line (Ray names an actor's
# process after it); everything else on the machine is "other processes".
SERVED_GROUPS = {"model replica": "ServeReplica:bench:Embedder",
                 "ingress": "ServeReplica:bench:Ingress", "HAProxy": "haproxy"}


def compare(model, baseline, url: str, peer_url: str | None, opts, corpus: list[str],
            singles: list[str]):
    """Raw passes in this process, served passes from a client process, alternating."""
    from cpu_share import CpuShare, cpu_share
    from forward_sweep import run as split_run

    from serve_app.model.hardware import default_cpu_threads

    def client(*args: str, target: str = url) -> dict:
        out = subprocess.run(
            [sys.executable, str(Path(__file__).parent / "http_client.py"), *args, target],
            capture_output=True, text=True, check=True, timeout=1200,
        )
        return json.loads(out.stdout)

    load = ("throughput", "--texts", str(opts.texts), "--per-request", str(opts.per_request),
            "--concurrency", str(opts.concurrency))

    def raw_pass(size: int) -> float:
        start = time.perf_counter()
        for i in range(0, len(corpus), size):
            model.encode(corpus[i : i + size])
        return len(corpus) / (time.perf_counter() - start)

    for text in singles[:20]:
        model.encode([text])
    sizes = sorted({int(size) for size in opts.raw_batches.split(",")})
    raw_rounds: dict[int, list[float]] = {size: [] for size in sizes}
    split_rounds, float32_rounds, served_rounds, peer_rounds, matmul_rounds = [], [], [], [], []
    served_cpu = CpuShare()  # where the cores' time went in the served rounds
    for r in range(opts.rounds):
        matmul_rounds.append(matmul_gflops())
        for size in sizes:
            raw_rounds[size].append(raw_pass(size))
        split_rounds.append(split_run(model, corpus, 2, max(1, default_cpu_threads() // 2)))
        if baseline is not None:
            start = time.perf_counter()
            baseline.encode(corpus)
            float32_rounds.append(len(corpus) / (time.perf_counter() - start))
        with cpu_share(SERVED_GROUPS) as share:
            served_rounds.append(client(*load)["texts_per_s"])
        served_cpu.add(share)
        if peer_url:
            peer_rounds.append(client(*load, target=peer_url)["texts_per_s"])
        print(f"  round {r + 1}: raw " + ", ".join(f"{k}: {v[-1]:.1f}/s" for k, v in raw_rounds.items())
              + f", 2 workers: {split_rounds[-1]:.1f}/s"
              + (f", float32: {float32_rounds[-1]:.1f}/s" if float32_rounds else "")
              + f"; served {served_rounds[-1]:.1f}/s"
              + (f"; infinity {peer_rounds[-1]:.1f}/s" if peer_rounds else ""), flush=True)
    raw_lat, served_lat, ingress_ms, model_ms, peer_lat = [], [], [], [], []
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
        if peer_url:
            peer_lat += client("latency", "--requests", "25", "--offset", str(offset),
                               target=peer_url)["ms"]

    raw_by_size = {size: statistics.median(v) for size, v in raw_rounds.items()}
    best = {**{f"batches of {k}": v for k, v in raw_by_size.items()},
            "2 workers x 1 thread": statistics.median(split_rounds)}
    raw = {"dtype": model.runtime.dtype, "throughput_by_batch": raw_by_size,
           "throughput": max(raw_by_size.values()), "best": max(best.values()), "configs": best,
           "float32": statistics.median(float32_rounds) if float32_rounds else None,
           "float32_rounds": float32_rounds,
           "matmul_gflops": {dt: statistics.median(m[dt] for m in matmul_rounds)
                             for dt in matmul_rounds[0]},
           "p50_ms": float(np.percentile(raw_lat, 50)), "p95_ms": float(np.percentile(raw_lat, 95))}
    infinity = None
    if peer_url:
        infinity = {"throughput": statistics.median(peer_rounds), "rounds": peer_rounds,
                    "p50_ms": float(np.percentile(peer_lat, 50)),
                    "p95_ms": float(np.percentile(peer_lat, 95))}
    served = {"throughput": statistics.median(served_rounds), "rounds": served_rounds,
              "cpu_share": served_cpu.fractions(),
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
    return raw, served, infinity


def matmul_gflops() -> dict[str, float]:
    """This CPU's matrix-product speed per dtype (1,024 x 1,024 by 1,024 x 3,072, all cores)."""
    speeds = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 3072, dtype=dtype)
        a @ b
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        speeds[str(dtype).removeprefix("torch.")] = 10 * 2 * 1024 * 1024 * 3072 / (
            time.perf_counter() - start) / 1e9
    return speeds


def start_infinity(executable: str, model: str, port: int, dtype: str):
    """infinity-emb serving `model` on 127.0.0.1:`port` (torch engine, `dtype`); (process, URL)."""
    import httpx

    from serve_app.core.modelinfo import resolve_model

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"}
    command = [executable, "v2", "--model-id", resolve_model(model).source,
               "--served-model-name", "peer", "--engine", "torch", "--device", "cpu",
               "--dtype", dtype, "--host", "127.0.0.1", "--port", str(port),
               "--url-prefix", "/v1", "--batch-size", "32", "--no-bettertransformer",
               "--no-compile", "--no-vector-disk-cache", "--no-model-warmup"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"infinity_emb exited with {process.returncode}: {' '.join(command)}")
        try:
            # /health is not under --url-prefix
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                print(f"  infinity-emb ready on {url}", flush=True)
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(process)
    raise RuntimeError("infinity_emb did not become ready within 300 s")


def stop(process) -> None:
    import signal

    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def replica_memory_gb(app: str) -> dict:
    """The Embedder replica's resident and peak memory (GB), from /proc."""
    from ray import serve

    pid = serve.get_deployment_handle("Embedder", app_name=app).describe.remote().result()["pid"]
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[{"VmRSS": "rss", "VmHWM": "peak"}[key]] = int(value.split()[0]) / 1e6
    return fields


def cold_starts(url: str, count: int) -> tuple[list[float], list[dict]]:
    """Seconds from request to answer, each time after the model has scaled to zero; and
    each one's steps, from the replica's own account of its start (describe())."""
    import httpx
    from ray import serve

    embedder = serve.get_deployment_handle("Embedder", app_name="cold")

    def replicas() -> dict:
        states = serve.status().applications["cold"].deployments["Embedder"].replica_states
        return {k: v for k, v in states.items() if v}

    times, steps = [], []
    for i in range(count):
        deadline = time.monotonic() + 120
        while replicas():
            if time.monotonic() > deadline:
                raise RuntimeError("the model never scaled to zero")
            time.sleep(0.5)
        time.sleep(3)  # well past the last replica, as after a real idle period
        sent, start = time.time(), time.perf_counter()
        reply = httpx.post(f"{url}/v1/embeddings", json={"input": f"cold start {i}"}, timeout=120)
        reply.raise_for_status()
        times.append(time.perf_counter() - start)
        steps.append(cold_start_steps(embedder.describe.remote().result()["startup"], sent, times[-1]))
        print(f"  cold start {i + 1}: {times[-1]:.2f} s (" + ", ".join(
            f"{k} {v:.2f}" for k, v in steps[-1].items()) + ")", flush=True)
    return times, steps


def cold_start_steps(startup: dict, sent: float, total_s: float) -> dict[str, float]:
    """A cold start's seconds per step: from the request to the replica's process (the
    autoscaler, Ray's scheduling, the fork), the replica's own steps, then to the answer."""
    steps = {
        "request to replica process": startup["process_started_at"] - sent,
        "process to constructor": startup["before_constructor_s"],
        "imports": startup.get("imports_s", 0.0),
        "weights and tokenizer": startup.get("weights_s", 0.0),
        "other model set-up": startup.get("model_s", 0.0) - startup.get("weights_s", 0.0),
        "first pass": startup.get("first_pass_s", 0.0),
    }
    steps["rest of the constructor"] = startup["constructor_s"] - sum(
        startup.get(k, 0.0) for k in ("imports_s", "model_s", "first_pass_s"))
    steps["ready to answer"] = sent + total_s - startup["ready_at"]  # the steps add up to total_s
    return steps


def report(r: dict) -> None:
    raw, served, cold, peer = r["raw"], r["served"], r["cold_start_s"], r.get("infinity")
    rate = served["throughput"]
    rows = [
        ("throughput (texts/s)", f"{raw['throughput']:.1f}", f"{rate:.1f}",
         f"{rate / raw['throughput']:.2f} x raw, {rate / raw['best']:.2f} x best raw"
         f" ({raw['best']:.1f})"),
        ("single text p50 (ms)", f"{raw['p50_ms']:.1f}", f"{served['p50_ms']:.1f}",
         f"+{served['p50_ms'] - raw['p50_ms']:.1f} ms"),
        ("single text p95 (ms)", f"{raw['p95_ms']:.1f}", f"{served['p95_ms']:.1f}",
         f"+{served['p95_ms'] - raw['p95_ms']:.1f} ms"),
    ]
    if cold:
        rows.append(("cold start (s)", "", f"{statistics.median(cold):.2f}",
                     "median of " + ", ".join(f"{c:.2f}" for c in cold)))
    if raw["float32"]:
        rows.insert(1, ("float32 raw (texts/s)", f"{raw['float32']:.1f}", "",
                        f"served = {rate / raw['float32']:.2f} x float32 raw"))
        mm = raw["matmul_gflops"]
        rows.insert(2, ("matmul GFLOP/s f32/bf16", f"{mm['float32']:.0f}", f"{mm['bfloat16']:.0f}",
                        f"bfloat16 = {mm['bfloat16'] / mm['float32']:.2f} x float32 on this CPU"))
    if peer:
        rows.append(("infinity-emb texts/s", "", f"{peer['throughput']:.1f}",
                     f"ours {rate / peer['throughput']:.2f} x infinity"))
        rows.append(("infinity-emb p50 (ms)", "", f"{peer['p50_ms']:.1f}",
                     f"ours {served['p50_ms'] - peer['p50_ms']:+.1f} ms"))
    for key, label in (("replica_memory_gb", "replica memory (GB)"),
                       ("cold_replica_memory_gb", "cold replica memory (GB)")):
        if served.get(key):
            memory = served[key]
            rows.append((label, "", f"{memory['rss']:.2f}", f"peak {memory['peak']:.2f}"))
    print(f"\nmodel {r['model']} ({raw['dtype']}), {r['cpus']} CPUs, {r['texts']} texts; "
          "raw (median of rounds): " + ", ".join(f"{k}: {v:.1f}/s" for k, v in raw["configs"].items()))
    print(f"{'':26}{'raw':>10}{'served':>10}  comparison")
    for name, a, b, c in rows:
        print(f"{name:26}{a:>10}{b:>10}  {c}")
    if served.get("cpu_share"):
        from cpu_share import describe

        print(f"served rounds, share of the CPUs' time: {describe(served['cpu_share'])}")
    print("served single text, median split (ms): " + "; ".join(
        f"{k} {v:.1f}" for k, v in served["split_ms"].items()))
    if r.get("cold_start_steps_s"):
        steps = r["cold_start_steps_s"]
        print("cold start, median steps (s): " + "; ".join(
            f"{k} {statistics.median(step[k] for step in steps):.2f}" for k in steps[0]))


if __name__ == "__main__":
    main()
