"""Long inputs on the CPU: time and peak memory of one 8,192-token input, then of several.

    python bench/long_input.py --model /tmp/qwen3-standin
    python bench/long_input.py --model /tmp/qwen3-standin --tokens 8192 --many 4

Runs the service's TextEmbedder at its defaults (dtype=auto, the CPU token
budget, the fast paths a replica turns on once ready) in this process and reads the process's peak resident memory
(VmHWM) after loading, after one long input, and after a request of
`--many` long inputs: the token budget bounds every forward pass, so many
long inputs take longer but need no more memory than one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def peak_gb() -> float:
    """This process's peak resident memory so far, in GB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1e6
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--many", type=int, default=4)
    opts = parser.parse_args()

    from serve_app.core.modelinfo import resolve_model
    from serve_app.model.embedder import TextEmbedder
    from serve_app.model.hardware import default_cpu_threads

    embedder = TextEmbedder(resolve_model(opts.model), max_input_tokens=opts.tokens,
                            cpu_threads=default_cpu_threads())
    print(f"fast paths, as a replica turns them on: {'; '.join(embedder.speed_up())}", flush=True)
    embedder.encode(["warm up"])
    loaded = peak_gb()
    # " clause" is one token in Qwen's vocabulary; the embedder cuts at the limit.
    text = "The clause" + " clause" * opts.tokens
    rows = [("loaded, one short text", 0, 0.0, loaded)]
    for count in (1, opts.many):
        started = time.perf_counter()
        result = embedder.encode([f"{i} {text}" for i in range(count)])
        seconds = time.perf_counter() - started
        rows.append((f"{count} x {max(result.tokens):,} tokens", count, seconds, peak_gb()))
        print(f"  {rows[-1][0]}: {seconds:.1f} s, peak {rows[-1][3]:.2f} GB", flush=True)
    print(f"\n{opts.model} ({embedder.runtime.dtype}), token budget {embedder.max_batch_tokens}, "
          f"{default_cpu_threads()} CPUs")
    print(f"{'':28}{'seconds':>9}{'s/input':>9}{'peak GB':>9}")
    for name, count, seconds, peak in rows:
        per = f"{seconds / count:.1f}" if count else ""
        print(f"{name:28}{seconds:>9.1f}{per:>9}{peak:>9.2f}")


if __name__ == "__main__":
    sys.exit(main())
