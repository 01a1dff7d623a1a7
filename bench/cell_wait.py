"""How long a single cell waits while a long column computes, against a lone cell.

    python bench/cell_wait.py --model /tmp/qwen3-standin
    python bench/cell_wait.py --model bundled:minilm --rows 20000 --json bench/results/cell_wait.json

One app on 127.0.0.1 (bench/served.py, one model replica). For each add-in, the xlwings
formulas (called as xlwings calls them, each formula on a thread of its own) and the
Office add-in in headless Chromium (unless --no-browser), in one run:

1. lone cells: --lone single =EMBED_SIM cells, one after another, on the idle replica;
2. a column alone: an =EMBED_SIM column over --rows row pairs;
3. a column over as many other row pairs, with a single cell every --period seconds
   from 3 s on while it computes.

Every text is new, so no cache answers. It prints the cells' wait in step 3 against the
lone cells' median, and the column's texts/s in step 3 against step 2: the replica runs
a cell between two transformer blocks of the column's pass, so the cell should wait
about as long as a lone one, and cost the column no more than its own texts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from corpus import sentences  # noqa: E402
from excel_bench import CALCULATE, office_page  # noqa: E402
from served import served_app  # noqa: E402

FIRST_CELL_S = 3.0  # the column's requests are all out by then


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="/tmp/qwen3-standin")
    parser.add_argument("--rows", type=int, default=1536, help="row pairs per column")
    parser.add_argument("--period", type=float, default=1.5, help="seconds between cells")
    parser.add_argument("--lone", type=int, default=10, help="lone cells first")
    parser.add_argument("--port", type=int, default=8128)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--no-browser", action="store_true", help="skip the Office add-in")
    opts = parser.parse_args()

    texts = sentences(8 * opts.rows, seed=23)
    results = {"model": opts.model, "rows": opts.rows, "period_s": opts.period}
    with served_app("sheet", opts.port, model=opts.model, min_replicas=1) as url:
        results["xlwings"] = measure_xlwings(url, texts[: 4 * opts.rows], opts)
        if not opts.no_browser:
            results["office"] = measure_office(url, texts[4 * opts.rows :], opts)
    report(results)
    if opts.json:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(results, indent=2))


def measure_xlwings(url: str, texts: list[str], opts) -> dict:
    os.environ["EMBED_SERVER_URL"] = url
    from excel_addin import udfs

    rows = opts.rows

    def cell(name: str) -> float:
        start = time.perf_counter()
        value = udfs.embed_sim([[f"{name}, one side"]], [[f"{name}, the other side"]])
        assert isinstance(value, float), value
        return time.perf_counter() - start

    def column(part: int) -> float:
        left = [[t] for t in texts[2 * part * rows : (2 * part + 1) * rows]]
        right = [[t] for t in texts[(2 * part + 1) * rows : (2 * part + 2) * rows]]
        start = time.perf_counter()
        values = udfs.embed_sim(left, right)
        assert len(values) == rows and all(isinstance(v[0], float) for v in values), values[:3]
        return time.perf_counter() - start

    udfs.embed_sim([["warm up"]], [["the connection"]])
    lone = [cell(f"xlwings lone cell {k}") for k in range(opts.lone)]
    alone_s = column(0)
    with ThreadPoolExecutor(max_workers=64) as pool:
        started = time.perf_counter()
        running = pool.submit(column, 1)
        cells = []
        while True:
            due = started + FIRST_CELL_S + opts.period * len(cells)
            wait([running], timeout=max(0.0, due - time.perf_counter()))
            if running.done():
                break
            cells.append(pool.submit(cell, f"xlwings cell {len(cells)} beside the column"))
        busy_s = running.result()
        waits = [c.result() for c in cells]
    return summary(rows, lone, alone_s, busy_s, waits)


# Lone cells one after another, then the column alone (CALCULATE), then the column with a
# cell every `period` s while it computes; each cell is its own call, as in Excel.
LONE_CELLS = """
async (count) => {
  const fn = window.__registered["EMBED_SIM"];
  const waits = [];
  for (let k = 0; k < count; k += 1) {
    const start = performance.now();
    await fn([[`office lone cell ${k}, one side`]], [[`office lone cell ${k}, the other side`]],
             null, { address: "Sheet1!Z1" });
    waits.push((performance.now() - start) / 1000);
  }
  return waits;
}
"""

COLUMN_WITH_CELLS = """
async ([left, right, firstCell, period]) => {
  const fn = window.__registered["EMBED_SIM"];
  const start = performance.now();
  const calls = await window.__embedSimColumn(left, right);
  let done = false;
  const column = Promise.all(calls).then(() => { done = true; return (performance.now() - start) / 1000; });
  const cells = [];
  for (let k = 0; ; k += 1) {
    const due = start + 1000 * (firstCell + period * k);
    while (!done && performance.now() < due) await new Promise((r) => setTimeout(r, 20));
    if (done) break;
    const sent = performance.now();
    cells.push(fn([[`office cell ${k} beside the column, one side`]],
                  [[`office cell ${k} beside the column, the other side`]], null, { address: "Sheet1!Z1" })
      .then(() => (performance.now() - sent) / 1000));
  }
  return { seconds: await column, waits: await Promise.all(cells) };
}
"""


def measure_office(url: str, texts: list[str], opts) -> dict:
    rows = opts.rows
    with office_page(url) as page:
        page.evaluate(CALCULATE, [["warm up"], ["the connection"]])
        lone = page.evaluate(LONE_CELLS, opts.lone)
        alone = page.evaluate(CALCULATE, [texts[:rows], texts[rows : 2 * rows]])
        busy = page.evaluate(
            COLUMN_WITH_CELLS, [texts[2 * rows : 3 * rows], texts[3 * rows : 4 * rows], FIRST_CELL_S, opts.period]
        )
    assert len(alone["values"]) == rows and all(isinstance(v, float) for v in alone["values"])
    return summary(rows, lone, alone["seconds"], busy["seconds"], busy["waits"])


def summary(rows: int, lone: list[float], alone_s: float, busy_s: float, waits: list[float]) -> dict:
    if not waits:
        raise SystemExit(f"The column took {busy_s:.1f} s, too short for a cell: raise --rows.")
    return {
        "lone_p50_s": statistics.median(lone),
        "column_alone_texts_per_s": 2 * rows / alone_s,
        "column_with_cells_texts_per_s": 2 * rows / busy_s,
        "cells": len(waits),
        "cell_p50_s": statistics.median(waits),
        "cell_p90_s": statistics.quantiles(waits, n=10)[-1] if len(waits) > 1 else waits[0],
        "cell_max_s": max(waits),
    }


def report(r: dict) -> None:
    print(f"\nSingle =EMBED_SIM cells every {r['period_s']} s while a column of {r['rows']} row "
          f"pairs computes ({r['model']})")
    print(f"{'add-in':9} {'lone cell p50':>14} {'cells p50':>10} {'p90':>7} {'max':>7} "
          f"{'max/lone':>9} {'column texts/s':>15} {'with cells':>11}")
    for name in ("xlwings", "office"):
        if name not in r:
            continue
        x = r[name]
        print(f"{name:9} {x['lone_p50_s'] * 1000:11.0f} ms {x['cell_p50_s'] * 1000:7.0f} ms "
              f"{x['cell_p90_s'] * 1000:4.0f} ms {x['cell_max_s'] * 1000:4.0f} ms "
              f"{x['cell_max_s'] / x['lone_p50_s']:8.1f}x {x['column_alone_texts_per_s']:15.1f} "
              f"{x['column_with_cells_texts_per_s']:7.1f} ({x['column_with_cells_texts_per_s'] / x['column_alone_texts_per_s']:.2f}x)"
              f"  [{x['cells']} cells]")


if __name__ == "__main__":
    main()
