"""The Office add-in in a real browser, from the service over HTTPS.

`python -m serve_app ... tls_certfile=... tls_keyfile=...` serves the add-in and the API on
one HTTPS origin, with a certificate this test makes. Headless Chromium (Debian's) opens
the task pane page from it, trusting only that certificate's key, with Office's runtime
stubbed (office.js cannot be fetched here): the page registers the formulas as Excel
would, computes a column of cells, and shows the server's status.
"""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import free_port, service_env, wait_for

from bench.certificates import make_certificate

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (see the README)"),
]

# What office.js gives an add-in's page, as far as the add-in uses it.
OFFICE_STUB = """
window.__registered = {};
window.Office = { onReady: () => Promise.resolve({ host: "Excel" }) };
const stored = {};
window.OfficeRuntime = { storage: {
  getItem: async (k) => (k in stored ? stored[k] : null),
  setItem: async (k, v) => { stored[k] = String(v); },
  removeItem: async (k) => { delete stored[k]; },
} };
window.__stored = stored;
class CustomFunctionsError extends Error {
  constructor(code, message) { super(message || code); this.code = code; this.type = "Error"; }
}
window.CustomFunctions = {
  Error: CustomFunctionsError,
  ErrorCode: { invalidValue: "#VALUE!", notAvailable: "#N/A" },
  associate: (id, fn) => { window.__registered[id.toUpperCase()] = fn; },
};
"""

# A column of =EMB.EMBED_SIM(A_i, B_i) cells, each its own call, in slices as Excel makes them
# (the benchmarks' helper): each cell's score, or its error.
EMBED_SIM_COLUMN = (REPO / "bench" / "office_column.js").read_text(encoding="utf-8")
COMPUTE_COLUMN = """
async ([left, right]) => Promise.all((await window.__embedSimColumn(left, right))
  .map((call) => call.then((v) => v[0][0], (e) => `${e.code}: ${e.message}`)))
"""


def trusting(ca: Path) -> ssl.SSLContext:
    """A client context that trusts the test's CA, as the office's PCs trust theirs."""
    return ssl.create_default_context(cafile=str(ca))


@pytest.fixture(scope="module")
def https_service(tmp_path_factory):
    """`python -m serve_app` on a free port, with HTTPS and the bundled model."""
    directory = tmp_path_factory.mktemp("tls")
    ca, cert, key, spki = make_certificate(directory)
    port = free_port(side_ports=True)
    command = [sys.executable, "-m", "serve_app", "model=bundled:minilm", f"port={port}",
               f"tls_certfile={cert}", f"tls_keyfile={key}", "min_replicas=1"]
    log = (directory / "service.log").open("w")
    service = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True, env=service_env())
    base = f"https://127.0.0.1:{port}"

    def ready() -> bool:
        assert service.poll() is None, (directory / "service.log").read_text()[-3000:]
        try:
            return httpx.get(f"{base}/v1/models", verify=trusting(ca), timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, 240, "the HTTPS service to answer")
        yield {"base": base, "ca": trusting(ca), "spki": spki, "log": directory / "service.log"}
    finally:
        os.killpg(service.pid, signal.SIGTERM)
        try:
            service.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(service.pid, signal.SIGKILL)
            service.wait()
        log.close()


def test_https_serves_the_api_and_refuses_plain_http(https_service):
    base, ca = https_service["base"], https_service["ca"]
    reply = httpx.post(f"{base}/v1/embeddings", json={"input": "a lease"}, verify=ca, timeout=60)
    assert reply.status_code == 200 and len(reply.json()["data"][0]["embedding"]) == 384
    with pytest.raises(httpx.HTTPError):
        httpx.get(base.replace("https://", "http://") + "/health", timeout=10)
    with pytest.raises(httpx.ConnectError):  # a certificate nobody trusts is refused
        httpx.get(f"{base}/health", timeout=10)
    assert "HTTPS on port" in https_service["log"].read_text()
    # HAProxy ends TLS and hands the replica plain HTTP; the manifest still names the
    # https:// address (Office loads add-ins over HTTPS only).
    manifest = httpx.get(f"{base}/excel/manifest.xml", verify=ca, timeout=10).text
    assert f"{base}/excel/" in manifest and base.replace("https://", "http://") not in manifest


def test_chromium_runs_the_addin_from_the_service_over_https(https_service):
    from playwright.sync_api import sync_playwright

    base, ca = https_service["base"], https_service["ca"]
    left = [f"Question {i % 40}: how much notice ends the lease?" for i in range(300)]
    right = [f"Clause {i % 30}: either party may terminate with notice" for i in range(300)]
    expected = httpx.post(f"{base}/v1/similarity", json={"left": left, "right": right},
                          verify=ca, timeout=120).json()["data"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  # Trust exactly the test's server key, as a PC trusts the office's CA.
                  f"--ignore-certificate-errors-spki-list={https_service['spki']}"],
        )
        try:
            page = browser.new_page()
            blocked = []
            page.route("https://appsforoffice.microsoft.com/**",
                       lambda route: route.fulfill(body=OFFICE_STUB + EMBED_SIM_COLUMN,
                                                   content_type="text/javascript"))
            page.route(lambda url: not url.startswith((base, "https://appsforoffice.microsoft.com/")),
                       lambda route: (blocked.append(route.request.url), route.abort()))
            page.goto(f"{base}/excel/taskpane.html")
            page.wait_for_function("document.getElementById('status').textContent === 'connected'",
                                   timeout=60_000)
            assert sorted(page.evaluate("Object.keys(window.__registered)")) == [
                "EMBED", "EMBED_INFO", "EMBED_SIM", "SEMANTIC_SEARCH", "SIM_MATRIX"]
            assert page.text_content("#model") == "bundled:minilm"
            assert page.text_content("#dimensions") == "384"
            scores = page.evaluate(COMPUTE_COLUMN, [left, right])
            assert all(isinstance(s, float) for s in scores), scores[:3]
            assert max(abs(s - e) for s, e in zip(scores, expected, strict=True)) <= 1e-5
            page.wait_for_function("document.getElementById('cached').textContent === '70'",
                                   timeout=10_000)  # 40 + 30 distinct texts
            page.fill("#api-key", "a-key-for-later")
            page.click("button[type=submit]")
            page.wait_for_function("window.__stored['sheet-embeddings.api-key'] === 'a-key-for-later'")
            assert blocked == []
        finally:
            browser.close()
