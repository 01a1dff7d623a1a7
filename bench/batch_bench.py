"""Rows per second of the `embed` job against raw in-process forward passes, one run.

    python bench/batch_bench.py
    python bench/batch_bench.py --rows 20000 --json bench/results/batch.json

Raw is `TextEmbedder.encode` in this process over the same texts, in the job's
batch size, with every core. The job is `python -m serve_app.batch embed` run as
a user runs it (a new process that starts a local Ray), reading a Parquet file
and writing one; its Ray start-up is reported apart from its work.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from corpus import sentences  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--model", default="bundled:minilm")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--json", type=Path)
    opts = parser.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = sentences(opts.rows, seed=11)
    folder = Path(tempfile.mkdtemp(prefix="batch-bench-"))
    source, target = folder / "rows.parquet", folder / "embedded.parquet"
    pq.write_table(pa.table({"row": list(range(len(texts))), "text": texts}), source)

    # This machine's speed drifts over minutes: raw runs before and after the job.
    raw_before = run_raw(texts, opts)
    job = run_job(source, target, opts)
    raw_after = run_raw(texts, opts)
    raw_s = (raw_before + raw_after) / 2
    out = pq.read_table(target)
    assert out.num_rows == len(texts) and out["row"].to_pylist() == list(range(len(texts)))

    results = {
        "rows": len(texts),
        "raw_rows_per_s": len(texts) / raw_s,
        "raw_rows_per_s_before_after": [len(texts) / raw_before, len(texts) / raw_after],
        "job_rows_per_s": len(texts) / job["work_s"],
        "job_work_s": job["work_s"],
        "ray_start_s": job["ray_start_s"],
        "process_s": job["process_s"],
    }
    results["ratio"] = results["job_rows_per_s"] / results["raw_rows_per_s"]
    report(results)
    if opts.json:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(results, indent=2))


def run_job(source: Path, target: Path, opts) -> dict:
    command = [
        sys.executable, "-m", "serve_app.batch", "embed", "--input", str(source),
        "--column", "text", "--output", str(target), "--model", opts.model,
        "--batch-size", str(opts.batch_size),
    ]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    process_s = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"the job failed:\n{done.stderr[-3000:]}")
    found = re.search(r"Ray start-up ([\d.]+) s, embedding and writing ([\d.]+) s", done.stdout)
    return {"ray_start_s": float(found[1]), "work_s": float(found[2]), "process_s": process_s}


_RAW = None


def run_raw(texts: list[str], opts) -> float:
    from serve_app.embedder import TextEmbedder, default_cpu_threads
    from serve_app.modelinfo import resolve_model

    global _RAW
    if _RAW is None:
        _RAW = TextEmbedder(resolve_model(opts.model), cpu_threads=default_cpu_threads())
        _RAW.encode(["warm up"])
    model = _RAW
    started = time.perf_counter()
    for i in range(0, len(texts), opts.batch_size):
        model.encode(texts[i : i + opts.batch_size])
    return time.perf_counter() - started


def report(r: dict) -> None:
    print(f"\nembed job over {r['rows']} rows (Parquet in, Parquet out)")
    before, after = r["raw_rows_per_s_before_after"]
    print(f"  raw forward passes   {r['raw_rows_per_s']:8.1f} rows/s  (before the job {before:.1f}, after {after:.1f})")
    print(f"  job                  {r['job_rows_per_s']:8.1f} rows/s  ({r['ratio']:.2f} x raw; "
          f"{r['job_work_s']:.1f} s incl. model load)")
    print(f"  Ray start-up          {r['ray_start_s']:7.1f} s  (whole process {r['process_s']:.1f} s)")


if __name__ == "__main__":
    main()
