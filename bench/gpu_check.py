"""A GPU check, ready to run: fp16/bf16 parity, raw and served speed, replica memory, cold start.

    python bench/gpu_check.py --json bench/results/gpu.json    # on a machine with an NVIDIA GPU
    python bench/gpu_check.py --model /models/Qwen3-Embedding-0.6B  # real weights, no stand-in
    python bench/gpu_check.py --cpu-dry-run                    # the same paths on a CPU, tiny model

Without --model it builds the full-size Qwen3-Embedding-0.6B stand-in (bench/qwen3_standin.py,
random weights, ~1.19 GB) in a temporary directory, or in --model-dir (kept, and reused next time).

Raw is TextEmbedder in this process, one dtype at a time; float16 and bfloat16 vectors are compared
with float32 ones, text by text. Served is the Ray Serve app on 127.0.0.1 with four replicas at
gpu_fraction 0.25 sharing the card, driven by bench/http_client.py and a burst of long inputs (the
largest forward passes). Meanwhile nvidia-smi is sampled for each replica's memory, CUDA context
included, against its share: set_per_process_memory_fraction caps torch's allocator, not the
context, so each replica lowers its cap by what it holds outside the allocator
(serve_app/model/gpushare.py), and this process tries that cap itself at the end of the raw
part: an allocation up to it must succeed with the whole process inside its share, one past it
must be refused. Last, the cold start from zero replicas. Every loop is bounded by count and by
--budget-s, so the run fits in 8 minutes (Ray's shut-down comes on top).

--cpu-dry-run swaps in a CPU, a 2-layer stand-in, float32/bfloat16 and small counts, and skips only
the GPU memory check (replica RSS is sampled instead, through the same code). Exit status: 2 where
torch sees no CUDA GPU, 1 where a part failed or a target was missed, else 0.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
from corpus import sentences, short_texts  # noqa: E402

from serve_app.model.gpushare import (  # noqa: E402  (the replicas' own readings)
    gpu_memory_by_pid,
    nvidia_smi,
    process_gpu_mib,
)

PARITY_TARGET = 0.999  # least cosine of a reduced-precision vector with its float32 one
REPLICAS = 4
GPU_FRACTION = 0.25


@dataclass(frozen=True)
class Plan:
    """What one run measures, and how much of it."""

    device: str
    compared: tuple[str, ...]  # dtypes checked against float32
    layers: int  # of the stand-in
    hidden: int | None
    texts: int
    singles: int
    batch_tokens: tuple[int, ...]
    cold_starts: int
    long_chars: int  # per text of the long-input burst: four make one near-full forward pass
    served: dict = field(default_factory=dict)  # AppArgs fields for the served app


GPU = Plan("cuda", ("float16", "bfloat16"), 28, None, 2000, 100, (8192, 32768), 3, 30_000,
           {"gpu_fraction": GPU_FRACTION, "device": "cuda", "dtype": "auto"})
DRY_RUN = Plan("cpu", ("bfloat16",), 2, 128, 200, 20, (1024, 4096), 2, 4000,
               {"gpu_fraction": 0, "device": "cpu", "dtype": "float32", "cpu_threads": 1})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="an existing model directory instead of the stand-in")
    parser.add_argument("--model-dir", type=Path,
                        help="build the stand-in here, or reuse one there (default: a temp dir)")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="run every path on this CPU with a tiny stand-in; no GPU memory check")
    parser.add_argument("--budget-s", type=float, default=390,
                        help="every loop stops by then (start-up and shut-down come on top)")
    parser.add_argument("--port", type=int, default=8140,
                        help="Serve's HTTP port on 127.0.0.1 (Ray's side ports follow it)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    opts = parser.parse_args()
    plan = DRY_RUN if opts.cpu_dry_run else GPU
    started = time.monotonic()

    import torch

    if plan.device == "cuda" and not torch.cuda.is_available():
        if torch.version.cuda is None:
            print(f"torch {torch.__version__} is a CPU build, and this check needs a CUDA build of "
                  "torch (`pip install torch` gives one on Linux); or try --cpu-dry-run.")
        else:
            print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU here: check "
                  "the NVIDIA driver (nvidia-smi) and CUDA_VISIBLE_DEVICES.")
        sys.exit(2)
    results: dict = {"plan": asdict(plan), "torch": torch.__version__, "cpus": os.cpu_count()}
    if plan.device == "cuda":
        results.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(),
                       context_mib=context_mib())
        results["total_mib"] = torch.cuda.mem_get_info()[1] / 2**20
        results["compute_mode"] = compute_mode()
        if results["gpus"] > 1:
            print("  note: several GPUs are visible; CUDA_VISIBLE_DEVICES=0 measures one card")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        model = opts.model or str(standin(opts.model_dir or Path(scratch), plan))
        results["model"] = opts.model or f"Qwen3-Embedding-0.6B stand-in, {plan.layers} layers"
        results["raw"] = phase("raw", raw_phase, model, plan, started + 0.35 * opts.budget_s)
        save(opts.json, results)  # kept if the served part hangs and the run is killed
        refused = sharing_refused(results.get("compute_mode"))
        if refused:
            say(f"served: skipped: {refused}")
            results["served"] = {"error": refused}
        else:
            def keep(served: dict) -> None:  # each served step's figures, as they come
                save(opts.json, {**results, "served": served})

            results["served"] = phase("served", served_phase, model, plan, opts.port,
                                      started + opts.budget_s, keep)
    table = report(results)
    save(opts.json, {**results, "table": table})
    sys.exit(1 if any(row[3] == "NO" for row in table) else 0)


def left(deadline: float, most: float | None = None) -> float:
    """Seconds to wait for one step: what the budget has left (10 at least, so that a step
    begun just before the deadline still gets an answer), and no more than `most`."""
    seconds = max(10.0, deadline - time.monotonic())
    return seconds if most is None else min(most, seconds)


def save(path: Path | None, results: dict) -> None:
    """The figures so far as JSON, where --json asks for them."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2, default=float))


def say(message: str) -> None:
    """One progress line, at once."""
    print(message, flush=True)


def phase(name: str, run, *args) -> dict:
    """The figures run(out, *args) put in `out`, and what went wrong if it failed part way."""
    say(f"{name}:")
    out: dict = {}
    try:
        run(out, *args)
    except Exception as exc:  # one failed part must not lose the figures already taken
        import traceback

        traceback.print_exc()
        last = (str(exc).strip().splitlines() or [""])[-1]  # Ray's errors end with the cause
        out["error"] = f"{type(exc).__name__}: {last}"
    return out


def standin(directory: Path, plan: Plan) -> Path:
    """The Qwen3-Embedding stand-in in `directory`, built unless one is already there."""
    from qwen3_standin import build_standin

    if (directory / "config.json").exists():
        say(f"using the model already in {directory}")
        return directory
    start = time.perf_counter()
    build_standin(directory, layers=plan.layers, hidden=plan.hidden)
    say(f"built the stand-in ({plan.layers} layers) in {directory} "
        f"in {time.perf_counter() - start:.0f} s")
    return directory


def context_mib() -> float | None:
    """GPU memory of this process holding only a CUDA context (torch's own blocks taken off)."""
    import torch

    torch.zeros(1, device="cuda")
    mine = process_gpu_mib(os.getpid())
    if mine is None:
        say("  nvidia-smi lists no process with this pid (a container's PID namespace?)")
        return None
    return mine - torch.cuda.memory_reserved() / 2**20


def raw_phase(out: dict, model: str, plan: Plan, deadline: float) -> None:
    """Per dtype in this process: texts/s at each batch budget, single-text latency, parity."""
    import torch

    from serve_app.core.errors import ModelOutputError
    from serve_app.core.modelinfo import resolve_model
    from serve_app.core.vectors import cosine_pairwise
    from serve_app.model.embedder import TextEmbedder

    spec = resolve_model(model)
    corpus, singles = sentences(plan.texts), short_texts(plan.singles)
    reference = None
    for dtype in ("float32", *plan.compared):
        embedder = TextEmbedder(spec, device=plan.device, dtype=dtype)
        try:
            row, vectors = _raw_run(embedder, corpus, singles, plan.batch_tokens, deadline)
        except ModelOutputError as exc:  # float16 overflowing: the service refuses such texts
            row, vectors = {"not_finite": exc.message}, None
            say(f"  {dtype}: {exc.message}")
        if dtype == "float32":
            reference = vectors
        elif vectors is not None and reference is not None:
            cos = cosine_pairwise(reference, vectors)
            row.update(cos_min=float(cos.min()), cos_mean=float(cos.mean()))
        out[dtype] = row
        if vectors is not None:
            say(f"  {dtype}: " + ", ".join(f"{k} tokens {v:.0f}/s" for k, v in row["texts_per_s"].items())
                + f"; single p50 {row['p50_ms']:.1f} ms"
                + (f"; cosine min {row['cos_min']:.5f}" if "cos_min" in row else ""))
        del embedder
        gc.collect()
        if plan.device == "cuda":
            torch.cuda.empty_cache()  # the served replicas get the card, less this context
    if plan.device == "cuda":
        out["cap"] = cap_probe(GPU_FRACTION)
        say(f"  cap at {GPU_FRACTION:g}: {out['cap']['sentence']} Up to it: "
            f"{out['cap']['within']}; past it: {out['cap']['beyond']}.")


def cap_probe(fraction: float) -> dict:
    """The replicas' cap, tried in this process (which holds no model now): the share less
    what the process holds outside torch's allocator; filling the allocator up to the cap
    must succeed with the whole process (nvidia-smi's figure) inside the share, and one
    allocation past the cap must be refused. The card is given back uncapped after."""
    import torch

    from serve_app.model.gpushare import MIB, hold_to_gpu_share, settle_gpu_share

    device = torch.device("cuda", torch.cuda.current_device())
    hold_to_gpu_share(fraction, device)
    share = settle_gpu_share(fraction, device)
    out = {**share.as_dict()}

    def attempt(mib: float) -> str:
        """Fill the allocator to `mib` in one block: what happened, and the process's MiB meanwhile."""
        want = int(mib * MIB) - torch.cuda.memory_reserved(device)
        try:
            block = torch.empty(max(want, 0), dtype=torch.uint8, device=device)
        except torch.cuda.OutOfMemoryError:
            return "refused"
        out.setdefault("process_mib", process_gpu_mib(os.getpid()))
        del block
        return "allowed"

    try:
        out["within"] = attempt(share.cap_mib - 64)
        torch.cuda.empty_cache()
        out["beyond"] = attempt(share.cap_mib + 256)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()
    return out


def _raw_run(embedder, corpus: list[str], singles: list[str], batch_tokens, deadline: float):
    """One dtype's texts/s at each batch budget and single-text latency; and its vectors."""
    rates = {}
    for tokens in batch_tokens:
        embedder.max_batch_tokens = tokens
        # Untimed: a pass of a new size loads its kernels (CUDA loads them lazily) and
        # grows the allocator's pool.
        embedder.encode(corpus[:256])
        start = time.perf_counter()
        vectors = embedder.encode(corpus).vectors
        rates[tokens] = len(corpus) / (time.perf_counter() - start)
    ms = []
    for text in singles:
        if ms and time.monotonic() > deadline:
            break
        start = time.perf_counter()
        embedder.encode([text])
        ms.append((time.perf_counter() - start) * 1000)
    row = {"texts_per_s": rates, "p50_ms": float(np.percentile(ms, 50)),
           "p95_ms": float(np.percentile(ms, 95)), "singles": len(ms)}
    return row, vectors


def served_phase(out: dict, model: str, plan: Plan, port: int, deadline: float, keep) -> None:
    """Four replicas sharing the device over HTTP: throughput, latency, memory; then cold start."""
    from ray import serve
    from served import served_app

    from serve_app.core.config import AppArgs
    from serve_app.ray_shell.app import build_app
    from serve_app.ray_shell.launch import busy_ports, tuned_environment
    from serve_app.ray_shell.resources import visible_gpus

    busy = busy_ports(tuned_environment(port=port), port)
    if busy:
        raise RuntimeError(f"{'; '.join(busy)} already in use: pass another --port.")
    if plan.device == "cuda" and visible_gpus() < 1:  # else serve.run would wait forever
        raise RuntimeError("torch sees a GPU but Ray does not; check CUDA_VISIBLE_DEVICES.")
    # The cache would hide the model; a CPU apiece for the replicas and one for the client.
    args = {"model": model, "cache_max_mb": 0,
            "replica_cpus": min(1.0, (os.cpu_count() or 1) / (REPLICAS + 1)), **plan.served}
    if plan.device == "cuda":  # the card's use before the replicas, for a fallback below
        out["card_before_mib"] = gpu_usage()["device"]
    with served_app("gpu", port, min_replicas=REPLICAS, max_replicas=REPLICAS, **args) as url:
        replicas = describe_replicas("gpu", REPLICAS, deadline)
        out["replicas"] = replicas
        say(f"  {len(replicas)} replicas: " + ", ".join(
            f"pid {r['pid']} on {r['device']} (GPU {','.join(r['gpu_ids']) or '-'})"
            for r in replicas))
        pids = [r["pid"] for r in replicas]
        read = gpu_usage if plan.device == "cuda" else lambda: rss_usage(pids)
        with sampling(read) as peaks:
            out["peak_mib"] = peaks  # filled in while the traffic runs
            out["throughput"] = client(url, deadline, "throughput", "--texts", str(plan.texts),
                                       "--per-request", "16", "--concurrency", str(4 * REPLICAS))
            say(f"  throughput {out['throughput']['texts_per_s']:.0f} texts/s")
            keep(out)
            out["long"] = long_burst(url, 2 * REPLICAS, plan.long_chars, deadline)
            say(f"  long inputs: {out['long']['answered']} of {out['long']['sent']} answered")
            keep(out)
            ms = client(url, deadline, "latency", "--requests", str(plan.singles))["ms"]
        out["p50_ms"], out["p95_ms"] = float(np.percentile(ms, 50)), float(np.percentile(ms, 95))
        out["runtime"] = served_runtime(url)
        say(f"  single p50 {out['p50_ms']:.1f} ms; peak MiB " + ", ".join(
            f"{k}: {v:.0f}" for k, v in out["peak_mib"].items()))
        keep(out)
        serve.delete("gpu")
        quick = {"idle_timeout_s": 1, "downscale_delay_s": 1, "autoscaling_look_back_s": 2}
        serve.run(build_app(AppArgs(**args, **quick)), name="cold", route_prefix="/cold")
        cold_starts(url.rsplit("/", 1)[0] + "/cold", plan.cold_starts, deadline,
                    out.setdefault("cold_start_s", []))


def long_burst(url: str, requests: int, chars: int, deadline: float) -> dict:
    """Requests of four long texts each, all at once: the largest forward passes a replica runs."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    text = " ".join(sentences(chars // 40))[:chars]

    def send(i: int) -> int:
        body = {"input": [f"{i}.{j} {text}" for j in range(4)], "encoding_format": "base64"}
        return httpx.post(f"{url}/v1/embeddings", json=body, timeout=left(deadline, 120)).status_code

    with ThreadPoolExecutor(requests) as pool:
        codes = list(pool.map(send, range(requests)))
    return {"sent": requests, "answered": codes.count(200), "chars": chars,
            "failed_with": sorted({c for c in codes if c != 200})}


def describe_replicas(app: str, count: int, deadline: float) -> list[dict]:
    """describe() of each Embedder replica of `app`, asked in rounds until all have answered."""
    from ray import serve

    handle = serve.get_deployment_handle("Embedder", app_name=app)
    found: dict[int, dict] = {}
    for _ in range(10):
        for reply in [handle.describe.remote() for _ in range(4 * count)]:
            info = reply.result(timeout_s=left(deadline, 60))
            found[info["pid"]] = info
        if len(found) >= count or time.monotonic() > deadline:
            break
    failed = [r["failure"] for r in found.values() if r.get("failure")]
    if failed:
        raise RuntimeError(failed[0])
    return sorted(found.values(), key=lambda r: r["pid"])


def compute_mode() -> str | None:
    """The GPU's compute mode as nvidia-smi reports it (Default, Exclusive_Process, Prohibited)."""
    lines = (nvidia_smi("--query-gpu=compute_mode", "--format=csv,noheader") or "").strip().splitlines()
    return lines[0] if lines else None


def sharing_refused(mode: str | None) -> str | None:
    """Why replicas cannot share a card in this compute mode, or None where they can."""
    if mode and mode.strip().lower().startswith(("exclusive", "prohibited")):
        return (f"the GPU's compute mode is {mode.strip()}, which lets at most one process use "
                f"it, so {REPLICAS} replicas cannot share it; `nvidia-smi -c DEFAULT` (as root) "
                "allows sharing")
    return None


def gpu_usage() -> dict:
    """Per-pid MiB from nvidia-smi, and the whole card's use under "device" (torch's view)."""
    import torch

    free, total = torch.cuda.mem_get_info()
    return {**gpu_memory_by_pid(), "device": (total - free) / 2**20}


def rss_usage(pids: list[int]) -> dict:
    """Resident memory per pid, in MiB: the dry run's stand-in for GPU memory."""
    usage = {}
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        kib = [line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")]
        usage[pid] = int(kib[0]) / 1024 if kib else 0.0
    return usage


@contextmanager
def sampling(read, interval_s: float = 0.25):
    """Peak of each value read() returns, sampled in a thread while the block runs."""
    peaks: dict = {}
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            for key, value in read().items():
                peaks[key] = max(peaks.get(key, 0.0), value)
            stop.wait(interval_s)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield peaks
    finally:
        stop.set()
        thread.join(timeout=15)


def client(url: str, deadline: float, *args: str) -> dict:
    """bench/http_client.py in its own process, as real clients are; its JSON answer."""
    out = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "http_client.py"), *args, url],
        capture_output=True, text=True, check=True, timeout=left(deadline),
    )
    return json.loads(out.stdout)


def served_runtime(url: str) -> dict | None:
    """Device and dtype the replicas report through /v1/models, where the API has them."""
    import httpx

    models = httpx.get(f"{url}/v1/models", timeout=30).json().get("data") or [{}]
    return models[0].get("runtime")


def cold_starts(url: str, count: int, deadline: float, times: list[float]) -> None:
    """Seconds from request to answer after scaling to zero, as serve_bench's, into `times`."""
    import httpx
    from ray import serve

    def running() -> bool:
        states = serve.status().applications["cold"].deployments["Embedder"].replica_states
        return any(states.values())

    while len(times) < count and time.monotonic() < deadline - 30:  # a cold start takes ~20 s
        while running() and time.monotonic() < deadline:
            time.sleep(0.5)
        if running():
            break
        time.sleep(3)  # well past the last replica, as after a real idle period
        start = time.perf_counter()
        reply = httpx.post(f"{url}/v1/embeddings", json={"input": f"cold start {len(times)}"},
                           timeout=left(deadline, 120))
        reply.raise_for_status()
        times.append(time.perf_counter() - start)
        say(f"  cold start {len(times)}: {times[-1]:.2f} s")


def rows(r: dict) -> list[tuple[str, str, str, str]]:
    """The table: what, measured, target, met."""
    raw, served = r["raw"], r["served"]
    runs = {k: v for k, v in raw.items() if isinstance(v, dict)}
    out = []
    for dtype, row in runs.items():
        if "not_finite" in row and dtype == "float32":  # no reference to compare with
            out.append(("float32, the reference", "inf or NaN on bench texts (refused)",
                        "finite", "NO"))
        elif "not_finite" in row:  # the embedder refused its vectors: inf or NaN
            out.append((f"parity {dtype} vs float32", "inf or NaN on bench texts (refused)",
                        f"min >= {PARITY_TARGET}", "NO"))
        elif "cos_min" in row:
            out.append((f"parity {dtype} vs float32",
                        f"min {row['cos_min']:.5f}, mean {row['cos_mean']:.5f}",
                        f"min >= {PARITY_TARGET}", verdict(row["cos_min"] >= PARITY_TARGET)))
    for dtype, row in runs.items():
        if "texts_per_s" not in row:
            continue
        rates = ", ".join(f"{v:.0f} @{k}" for k, v in row["texts_per_s"].items())
        out += [(f"raw {dtype} texts/s @ batch tokens", rates, "", ""),
                (f"raw {dtype} single p50 / p95", ms(row), "", "")]
    if "cap" in raw:
        out += cap_rows(raw["cap"])
    if "replicas" in served:
        gpus = sorted({g for rep in served["replicas"] for g in rep["gpu_ids"]}) or ["none"]
        out.append(("replicas up, from describe()", f"{len(served['replicas'])}, on GPU ids "
                    + ", ".join(gpus), f"{REPLICAS}", verdict(len(served["replicas"]) == REPLICAS)))
    if "throughput" in served:
        dtype = (served.get("runtime") or {}).get("dtype", r["plan"]["served"]["dtype"])
        out.append((f"served texts/s ({len(served['replicas'])} replicas, {dtype})",
                    f"{served['throughput']['texts_per_s']:.0f}", "", ""))
    if "long" in served:
        long = served["long"]
        out.append((f"long inputs, 4 x {long['chars']} chars", f"{long['answered']} of "
                    f"{long['sent']} answered {long['failed_with'] or ''}", "all answered",
                    verdict(long["answered"] == long["sent"])))
    if "p50_ms" in served:
        out.append(("served single p50 / p95", ms(served), "", ""))
    if "peak_mib" in served:
        out += memory_rows(r)
    if served.get("cold_start_s"):
        cold = served["cold_start_s"]
        out.append(("cold start, zero replicas -> answer", f"{statistics.median(cold):.2f} s "
                    "(median of " + ", ".join(f"{c:.1f}" for c in cold) + ")", "", ""))
    for name, part in (("raw", raw), ("served", served)):
        if "error" in part:
            out.append((f"{name}: FAILED", "see below", "", "NO"))
    return out


def cap_rows(cap: dict) -> list[tuple[str, str, str, str]]:
    """The cap tried in this process: the whole process inside its share up to the cap, and
    refused past it."""
    target = f"<= {cap['share_mib']:.0f} MiB"
    held = cap.get("process_mib")
    return [
        cap_row(f"cap at {GPU_FRACTION:g}: context + allocator", cap, cap["share_mib"]),
        ("filled up to the cap: the process", f"{mib_text(held)} ({cap['within']})", target,
         "unknown" if held is None and cap["within"] == "allowed"
         else verdict(cap["within"] == "allowed" and held <= cap["share_mib"])),
        ("one allocation past the cap", cap["beyond"], "refused", verdict(cap["beyond"] == "refused")),
    ]


def cap_row(label: str, cap: dict, share: float) -> tuple[str, str, str, str]:
    """A cap as gpushare set it (its `gpu_share`): what it holds outside the allocator plus the
    allocator's cap, against the share; unknown where the outside could not be read."""
    outside = cap.get("outside_mib")
    measured = f"{'unread' if outside is None else f'{outside:.0f}'} + {cap['cap_mib']:.0f} MiB"
    met = "unknown" if outside is None else verdict(outside + cap["cap_mib"] <= share + 1)
    return label, measured, f"<= {share:.0f} MiB", met


def memory_rows(r: dict) -> list[tuple[str, str, str, str]]:
    """Peak memory of each replica under load against its share of the card."""
    served, peaks = r["served"], r["served"]["peak_mib"]
    pids = [replica["pid"] for replica in served["replicas"]]
    if r["plan"]["device"] != "cuda":
        return [(f"replica {pid} peak RSS (not GPU)", mib_text(peaks.get(pid)),
                 "GPU share: skipped", "skipped") for pid in pids]
    share, context = GPU_FRACTION * r["total_mib"], r.get("context_mib")
    target = f"<= {share:.0f} MiB"
    out = [("CUDA context alone", mib_text(context), "not under the cap", "")]
    caps = {replica["pid"]: replica.get("gpu_share") for replica in served["replicas"]}
    for pid in pids:
        mib = peaks.get(pid)
        beyond = f" ({mib - context:.0f} beyond it)" if mib and context else ""
        out.append((f"replica {pid} peak, context incl.", mib_text(mib) + beyond, target,
                    verdict(mib <= share) if mib else "unknown"))
        if caps.get(pid):  # what the replica set: its cap, less what it holds outside it
            out.append(cap_row(f"replica {pid} cap: context + allocator", caps[pid], share))
    if not any(peaks.get(pid) for pid in pids) and "device" in peaks:
        # No per-process figures (nvidia-smi in a container): the card's growth, shared out.
        mean = (peaks["device"] - served.get("card_before_mib", 0.0)) / max(len(pids), 1)
        out.append(("card's growth / replicas", mib_text(mean), target, verdict(mean <= share)))
    return out


def mib_text(mib: float | None) -> str:
    """MiB for the table."""
    return f"{mib:.0f} MiB" if mib else "not measured"


def verdict(ok: bool) -> str:
    """The table's "met" column."""
    return "yes" if ok else "NO"


def ms(row: dict) -> str:
    """p50 / p95 for the table."""
    return f"{row['p50_ms']:.1f} / {row['p95_ms']:.1f} ms"


def report(r: dict) -> list[tuple[str, str, str, str]]:
    """Print the one table, after the progress lines; return its rows."""
    where = f"{r.get('gpu', 'CPU dry run')}, {r['cpus']} CPUs, torch {r['torch']}"
    if r.get("compute_mode"):
        where += f", compute mode {r['compute_mode']}"
    print(f"\nmodel {r['model']} on {where}")
    table = rows(r)
    width = max(len(row[0]) for row in table) + 2
    print(f"{'':{width}}{'measured':42}{'target':24}met")
    for name, value, target, met in table:
        print(f"{name:{width}}{value:42}{target:24}{met}")
    for name in ("raw", "served"):
        if "error" in r[name]:
            print(f"{name} failed: {r[name]['error']}")
    return table


if __name__ == "__main__":
    main()
