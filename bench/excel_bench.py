"""An =EMBED_SIM column over 10,000 row pairs: first calculation and cached recalculation.

    python bench/excel_bench.py
    python bench/excel_bench.py --rows 10000 --json bench/results/excel.json

The formula is called as xlwings calls it (one column argument of 10,000 rows
each side) against the Ray Serve app on 127.0.0.1. The first calculation is
compared with the served throughput of bench/serve_bench.py's client, measured
in the same run; the recalculation must send no embedding request (at most one
GET /v1/models, which checks the served model has not changed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from corpus import sentences  # noqa: E402
from served import served_app  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--model", default="bundled:minilm")
    parser.add_argument("--port", type=int, default=8124)
    parser.add_argument("--json", type=Path)
    opts = parser.parse_args()

    with served_app("sheet", opts.port, model=opts.model, min_replicas=1) as url:
        results = measure(url, opts.rows)
    report(results)
    if opts.json:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(results, indent=2))


def measure(url: str, rows: int) -> dict:
    os.environ["EMBED_SERVER_URL"] = url
    from excel_addin import udfs
    from excel_addin.client import get_client, load_settings

    texts = sentences(2 * rows, seed=7)
    left = [[t] for t in texts[:rows]]  # a column as xlwings passes it (ndim=2)
    right = [[t] for t in texts[rows:]]
    udfs.embed_sim([["warm up"]], [["the connection"]])
    client = get_client(load_settings())

    before = client.requests
    start = time.perf_counter()
    first = udfs.embed_sim(left, right)
    first_s = time.perf_counter() - start
    first_requests = client.requests - before
    assert isinstance(first, list) and len(first) == rows, first

    before, checks_before = client.requests, client.model_checks
    start = time.perf_counter()
    again = udfs.embed_sim(left, right)
    recalc_s = time.perf_counter() - start
    assert again == first

    served = json.loads(subprocess.run(
        [sys.executable, str(Path(__file__).parent / "http_client.py"), "throughput", url],
        capture_output=True, text=True, check=True,
    ).stdout)["texts_per_s"]
    return {
        "rows": rows,
        "distinct_texts": 2 * rows,
        "first_s": first_s,
        "first_texts_per_s": 2 * rows / first_s,
        "first_requests": first_requests,
        "recalc_s": recalc_s,
        "recalc_requests": client.requests - before,
        "recalc_model_checks": client.model_checks - checks_before,
        "served_texts_per_s": served,
    }


def report(r: dict) -> None:
    print(f"\n=EMBED_SIM over {r['rows']} row pairs ({r['distinct_texts']} distinct texts)")
    print(f"  first calculation   {r['first_s']:7.1f} s  {r['first_texts_per_s']:6.0f} texts/s  "
          f"{r['first_requests']} requests  "
          f"({r['first_texts_per_s'] / r['served_texts_per_s']:.2f} x served throughput "
          f"{r['served_texts_per_s']:.0f}/s, same run)")
    print(f"  recalculation       {r['recalc_s']:7.2f} s  {r['recalc_requests']} requests  "
          f"({r['recalc_model_checks']} GET /v1/models)")


if __name__ == "__main__":
    main()
