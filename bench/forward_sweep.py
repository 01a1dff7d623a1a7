"""The CPU forward path, raw, across settings: dtype, tokens per pass, workers x threads.

    python -m bench.qwen3_standin /tmp/qwen3-standin
    python bench/forward_sweep.py --model /tmp/qwen3-standin
    python bench/forward_sweep.py --model bundled:minilm --texts 2000

Each setting embeds the same corpus in process (no HTTP, no Ray), as the
service's replica does: the texts are split between `workers` threads, each
running its own forward passes on `threads` cores. Settings alternate over
rounds, because this machine's speed drifts over minutes; the table gives the
median of the rounds and each setting's ratio to float32 with the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from corpus import sentences  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--texts", type=int, default=192)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtypes", default="float32,bfloat16,bfloat16+pack,bfloat16+pack+rows",
                        help="+pack: linear weights packed for oneDNN (model.packing); "
                             "+rows: short texts share rows (model.rows)")
    parser.add_argument("--single", type=int, default=15, help="one-text passes per dtype and round")
    parser.add_argument("--batch-tokens", default="512,1024,2048,4096")
    parser.add_argument("--splits", default="1x2,2x1", help="workers x threads each")
    parser.add_argument("--json", type=Path)
    opts = parser.parse_args()

    from serve_app.core.modelinfo import resolve_model
    from serve_app.model.embedder import TextEmbedder
    from serve_app.model.hardware import default_cpu_threads

    spec = resolve_model(opts.model)
    corpus = sentences(opts.texts)
    cpus = default_cpu_threads()
    models = {}
    for name in opts.dtypes.split(","):
        dtype, *ways = name.split("+")
        models[name] = model = TextEmbedder(spec, dtype=dtype, cpu_threads=cpus,
                                            pack_cpu_weights="pack" in ways, share_rows="rows" in ways)
        if ways:
            print(f"{name}: {' '.join(model.speed_up())}", flush=True)
    for model in models.values():
        model.encode(corpus[:8])
    settings = [
        (dt, int(tokens), tuple(int(x) for x in split.split("x")))
        for dt in models
        for tokens in opts.batch_tokens.split(",")
        for split in opts.splits.split(",")
    ]
    if "float32" in models:  # float32 is only the baseline: one setting, the old default
        settings = [s for s in settings if s[0] != "float32" or s[1:] == (1024, (2, 1))]
    results: dict[str, list[float]] = {}
    single: dict[str, list[float]] = {}
    for r in range(opts.rounds):
        for dt, model in models.items():
            single.setdefault(dt, []).extend(one_text_ms(model, corpus[: opts.single], cpus))
        for dt, tokens, (workers, threads) in settings:
            model = models[dt]
            model.max_batch_tokens = tokens
            rate = run(model, corpus, workers, threads)
            key = f"{dt} {tokens} tokens {workers}x{threads}"
            results.setdefault(key, []).append(rate)
            print(f"  round {r + 1}: {key}: {rate:.2f} texts/s", flush=True)
    table = {key: statistics.median(v) for key, v in results.items()}
    base = table.get("float32 1024 tokens 2x1") or min(table.values())
    print(f"\nmodel {opts.model}, {cpus} CPUs, {opts.texts} texts, median of {opts.rounds} rounds")
    print(f"{'setting':34}{'texts/s':>10}{'x float32':>11}")
    for key, rate in sorted(table.items(), key=lambda kv: -kv[1]):
        print(f"{key:34}{rate:>10.2f}{rate / base:>11.2f}")
    if opts.single:
        print(f"\n{'one short text, p50':34}{'ms':>10}")
        for dt, times in single.items():
            print(f"{dt:34}{statistics.median(times):>10.1f}")
    if opts.json:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps({"model": opts.model, "rounds": results, "one_text_ms": single},
                                        indent=2))


def one_text_ms(model, texts: list[str], threads: int) -> list[float]:
    """Milliseconds per pass of one text, as a lone request runs (all cores)."""
    times = []
    for text in texts:
        started = time.perf_counter()
        model.encode([text], threads=lambda: threads)
        times.append((time.perf_counter() - started) * 1000)
    return times


def run(model, corpus: list[str], workers: int, threads: int) -> float:
    """Texts per second with the corpus split between `workers` threads of `threads` cores."""
    shares = [corpus[i::workers] for i in range(workers)]
    started = time.perf_counter()
    if workers == 1:
        model.encode(shares[0], threads=lambda: threads)
    else:
        pool = [threading.Thread(target=model.encode, args=(share,), kwargs={"threads": lambda: threads})
                for share in shares]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
    return len(corpus) / (time.perf_counter() - started)


if __name__ == "__main__":
    main()
