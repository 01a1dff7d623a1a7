"""A batch search against a corpus embedded once, beside the same search embedding it again.

    python bench/search_bench.py --model /tmp/qwen3-standin --corpus 1000 --queries 20

An `embed` job writes the corpus's vectors (`corpus.parquet`, with the record of how they
were made); then `search` runs, alternately, against the plain corpus (`corpus.csv`: every
corpus row is embedded again) and against the embed job's output (only the queries are
embedded), twice each, each a process that starts a Ray of its own. The two must find the
same rows. Then the ranking alone (`top_k`) over a corpus the size of a 200,000-row Qwen3
job (200,000 vectors of 1,024) for 50 queries: its time and the memory it added.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
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
    parser.add_argument("--model", default="bundled:minilm")
    parser.add_argument("--corpus", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--rank-rows", type=int, default=200_000, help="corpus vectors for the ranking alone")
    opts = parser.parse_args()

    import pandas as pd

    folder = Path(tempfile.mkdtemp(prefix="search-bench-"))
    pd.DataFrame({"doc": sentences(opts.corpus, seed=5)}).to_csv(folder / "corpus.csv", index=False)
    pd.DataFrame({"q": sentences(opts.queries, seed=6)}).to_csv(folder / "q.csv", index=False)
    embed = job(["embed", "--input", folder / "corpus.csv", "--column", "doc",
                 "--output", folder / "corpus.parquet"], opts)
    print(f"embed job, {opts.corpus} corpus rows: {embed['process_s']:.1f} s "
          f"(Ray start-up {embed['ray_start_s']:.1f} s)")
    runs: dict[str, list[dict]] = {"csv": [], "parquet": []}
    for _ in range(2):
        for kind in runs:
            output = folder / f"hits-{kind}.parquet"
            runs[kind].append(job(["search", "--queries", folder / "q.csv", "--query-column", "q",
                                   "--corpus", folder / f"corpus.{kind}", "--corpus-column", "doc",
                                   "--k", str(opts.k), "--output", output], opts))
    same_rows(folder / "hits-csv.parquet", folder / "hits-parquet.parquet")
    print(f"\nsearch of {opts.queries} queries in {opts.corpus} corpus rows, {opts.model}")
    print(f"{'corpus':<30} {'rows embedded':>13} {'process s':>10} {'work s':>8}")
    for kind, label in (("csv", "corpus.csv (embedded again)"), ("parquet", "the embed job's output")):
        for run in runs[kind]:
            print(f"{label:<30} {run['embedded']:>13} {run['process_s']:>10.1f} {run['work_s']:>8.1f}")
    ratio = [a["process_s"] / b["process_s"] for a, b in zip(runs["csv"], runs["parquet"], strict=True)]
    print(f"the embed job's output is searched {min(ratio):.1f}x-{max(ratio):.1f}x as fast, start to end")
    rank_alone(opts.rank_rows, 1024, 50, opts.k)


def job(argv: list, opts) -> dict:
    command = [sys.executable, "-m", "serve_app.batch", *map(str, argv), "--model", opts.model]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "RAY_AUTH_MODE": ""})
    process_s = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"the job failed:\n{done.stderr[-3000:]}")
    found = re.search(r"Ray start-up ([\d.]+) s, \w+ and \w+ ([\d.]+) s", done.stdout)
    embedded = re.search(r"\((\d+) rows embedded", done.stdout)
    return {"process_s": process_s, "ray_start_s": float(found[1]), "work_s": float(found[2]),
            "embedded": int(embedded[1]) if embedded else None}


def same_rows(first: Path, second: Path) -> None:
    import pyarrow.parquet as pq

    columns = ["q", "rank", "corpus_row"]
    a, b = pq.read_table(first, columns=columns), pq.read_table(second, columns=columns)
    if a.to_pylist() != b.to_pylist():
        sys.exit("the two searches found different rows")


def rank_alone(rows: int, dimensions: int, queries: int, k: int) -> None:
    import numpy as np
    import pyarrow as pa

    from serve_app.batch.search import top_k

    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((rows, dimensions), dtype=np.float32)
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel()), dimensions).cast(pa.list_(pa.float32()))
    del matrix
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    top_k(pa.table({"q": list(range(queries))}), vectors.slice(0, queries),
          pa.table({"row": list(range(rows))}), vectors, k)
    took = time.perf_counter() - started
    added = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    print(f"\nranking alone: {queries} queries in {rows:,} vectors of {dimensions}: {took:.2f} s, "
          f"peak memory +{added:.0f} MB (the vectors: {rows * dimensions * 4 / 2**20:.0f} MB)")


if __name__ == "__main__":
    main()
