"""An =EMBED_SIM column over 10,000 row pairs: first calculation and cached recalculation.

    python bench/excel_bench.py
    python bench/excel_bench.py --rows 10000 --json bench/results/excel.json

The formula is called as xlwings calls it (one column argument of 10,000 rows
each side) against the Ray Serve app on 127.0.0.1. The first calculation is
compared with the served throughput of bench/serve_bench.py's client, measured
in the same run; the recalculation must send no embedding request (at most one
GET /v1/models, which checks the served model has not changed).

Then the Office add-in (excel_addin/office) does the same in headless Chromium,
loaded from the same app: 10,000 separate =EMBED_SIM(A_i, B_i) cells, each its own
call, handed over in slices as Excel does. Its first calculation is compared with
the xlwings add-in's (target: at least 0.9x its texts/s), and its recalculation
must take at most 1 s and send nothing. `--no-browser` skips it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
    parser.add_argument("--no-browser", action="store_true", help="skip the Office add-in")
    opts = parser.parse_args()

    with served_app("sheet", opts.port, model=opts.model, min_replicas=1) as url:
        results = measure(url, opts.rows)
        if not opts.no_browser:
            # Fresh texts: the service's own cache must not serve the add-in what xlwings asked.
            results["office"] = measure_office(url, opts.rows)
    report(results)
    if opts.json:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(results, indent=2))


def measure(url: str, rows: int) -> dict:
    os.environ["EMBED_SERVER_URL"] = url
    from excel_addin import udfs
    from excel_addin.client import get_client
    from excel_addin.settings import load_settings

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


# Counts what the page sends, before any of the add-in's scripts run; fakes Office.js.
COUNT_REQUESTS = """
window.__sent = { embeddings: 0, models: 0 };
const realFetch = window.fetch.bind(window);
window.fetch = (url, options) => {
  if (String(url).endsWith("/v1/embeddings")) window.__sent.embeddings += 1;
  if (String(url).endsWith("/v1/models")) window.__sent.models += 1;
  return realFetch(url, options);
};
window.Office = { onReady: () => Promise.resolve({ host: "Excel" }) };
window.__registered = {};
class CustomFunctionsError extends Error {
  constructor(code, message) { super(message || code); this.code = code; }
}
window.CustomFunctions = {
  Error: CustomFunctionsError, ErrorCode: { invalidValue: "#VALUE!", notAvailable: "#N/A" },
  associate: (id, fn) => { window.__registered[id] = fn; },
};
"""
# window.__embedSimColumn(left, right): a column handed over as Excel does.
EMBED_SIM_COLUMN = (Path(__file__).parent / "office_column.js").read_text(encoding="utf-8")

CALCULATE = """
async ([left, right]) => {
  const before = { ...window.__sent };
  const start = performance.now();
  const calls = await window.__embedSimColumn(left, right);
  const values = (await Promise.all(calls)).map((v) => v[0][0]);
  return { seconds: (performance.now() - start) / 1000, values,
           embeddings: window.__sent.embeddings - before.embeddings,
           models: window.__sent.models - before.models };
}
"""


@contextmanager
def office_page(url: str) -> Iterator:
    """A headless Chromium page with the Office add-in's task pane from `url` loaded and
    connected, Office.js faked by COUNT_REQUESTS (its functions in `window.__registered`),
    and EMBED_SIM_COLUMN installed."""
    import shutil

    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=shutil.which("chromium"),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page()
            page.add_init_script(COUNT_REQUESTS + EMBED_SIM_COLUMN)
            page.route("https://appsforoffice.microsoft.com/**",
                       lambda route: route.fulfill(body="", content_type="text/javascript"))
            page.goto(f"{url}/excel/taskpane.html")
            page.wait_for_function("document.getElementById('status').textContent === 'connected'")
            yield page
        finally:
            browser.close()


def measure_office(url: str, rows: int) -> dict:
    texts = sentences(2 * rows, seed=8)
    left, right = texts[:rows], texts[rows:]
    with office_page(url) as page:
        page.evaluate(CALCULATE, [["warm up"], ["the connection"]])
        first = page.evaluate(CALCULATE, [left, right])
        again = page.evaluate(CALCULATE, [left, right])
    assert len(first["values"]) == rows and all(isinstance(v, float) for v in first["values"])
    assert again["values"] == first["values"]
    return {
        "first_s": first["seconds"],
        "first_texts_per_s": 2 * rows / first["seconds"],
        "first_requests": first["embeddings"],
        "recalc_s": again["seconds"],
        "recalc_requests": again["embeddings"],
        "recalc_model_checks": again["models"],
    }


def report(r: dict) -> None:
    print(f"\n=EMBED_SIM over {r['rows']} row pairs ({r['distinct_texts']} distinct texts)")
    print(f"  first calculation   {r['first_s']:7.1f} s  {r['first_texts_per_s']:6.0f} texts/s  "
          f"{r['first_requests']} requests  "
          f"({r['first_texts_per_s'] / r['served_texts_per_s']:.2f} x served throughput "
          f"{r['served_texts_per_s']:.0f}/s, same run)")
    print(f"  recalculation       {r['recalc_s']:7.2f} s  {r['recalc_requests']} requests  "
          f"({r['recalc_model_checks']} GET /v1/models)")
    if "office" in r:
        o = r["office"]
        print(f"Office add-in in Chromium, {r['rows']} separate cells")
        print(f"  first calculation   {o['first_s']:7.1f} s  {o['first_texts_per_s']:6.0f} texts/s  "
              f"{o['first_requests']} requests  "
              f"({o['first_texts_per_s'] / r['first_texts_per_s']:.2f} x the xlwings add-in, same run)")
        print(f"  recalculation       {o['recalc_s']:7.2f} s  {o['recalc_requests']} requests  "
              f"({o['recalc_model_checks']} GET /v1/models)")


if __name__ == "__main__":
    main()
