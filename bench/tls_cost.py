"""What HTTPS costs: the same service over HTTP and over HTTPS, through HAProxy and through Ray's proxy.

    python bench/tls_cost.py
    python bench/tls_cost.py --model /tmp/qwen3-standin --texts 200

Starts `python -m serve_app` twice on this machine, once plainly and once with a
certificate made for the run (tls_certfile=, tls_keyfile=), and measures each with the
same client (bench/http_client.py): one short text at a time (p50, p90) and throughput
with 8 clients. HTTPS runs through HAProxy, which `python -m serve_app` gives the
certificate (serve_app/ray_shell/haproxy_front.py); a third run measures HTTPS through
Ray's own proxy (RAY_SERVE_ENABLE_HA_PROXY=0), the front before that change.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

BENCH = Path(__file__).parent
sys.path.insert(0, str(BENCH))
REPO = BENCH.parent


def certificate(directory: Path) -> tuple[str, str, str]:
    """A throw-away CA and a certificate for 127.0.0.1 signed by it: (ca, cert, key)."""
    from certificates import make_certificate

    ca, cert, key, _ = make_certificate(directory)
    return str(ca), str(cert), str(key)


def start(args: list[str], url: str, cafile: str | None, log: Path, env: dict[str, str]) -> subprocess.Popen:
    service = subprocess.Popen([sys.executable, "-m", "serve_app", *args], cwd=REPO, env={**os.environ, **env},
                               stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    verify = __import__("ssl").create_default_context(cafile=cafile) if cafile else True
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if service.poll() is not None:
            raise SystemExit(f"the service stopped: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/v1/models", verify=verify, timeout=5).status_code == 200:
                return service
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit("the service did not start within 300 s")


def stop(service: subprocess.Popen) -> None:
    os.killpg(service.pid, signal.SIGTERM)
    try:
        service.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(service.pid, signal.SIGKILL)


def client(what: str, url: str, cafile: str | None, *extra: str) -> dict:
    command = [sys.executable, str(BENCH / "http_client.py"), what, url, *extra]
    if cafile:
        command += ["--cafile", cafile]
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def measure(url: str, cafile: str | None, opts) -> dict:
    ms = client("latency", url, cafile, "--requests", str(opts.requests))["ms"]
    texts_per_s = client("throughput", url, cafile, "--texts", str(opts.texts))["texts_per_s"]
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "texts_per_s": texts_per_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled:minilm")
    parser.add_argument("--port", type=int, default=8130)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--json", type=Path)
    opts = parser.parse_args()

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        ca, cert, key = certificate(Path(tmp))
        common = [f"model={opts.model}", f"port={opts.port}", "min_replicas=1"]
        tls = common + [f"tls_certfile={cert}", f"tls_keyfile={key}"]
        https = f"https://127.0.0.1:{opts.port}"
        runs = {
            "http (HAProxy)": (common, f"http://127.0.0.1:{opts.port}", None, {}),
            "https (HAProxy)": (tls, https, ca, {}),
            "https (Ray's proxy)": (tls, https, ca, {"RAY_SERVE_ENABLE_HA_PROXY": "0"}),
        }
        for name, (args, url, cafile, env) in runs.items():
            service = start(args, url, cafile, Path(tmp) / "service.log", env)
            try:
                results[name] = measure(url, cafile, opts)
            finally:
                stop(service)
    plain = results["http (HAProxy)"]
    print(f"\n{opts.model}: one short text at a time ({opts.requests} requests), then "
          f"{opts.texts} texts from 8 clients")
    print(f"  {'':22} {'p50 ms':>8} {'p90 ms':>8} {'texts/s':>9}")
    for name, r in results.items():
        print(f"  {name:22} {r['p50_ms']:8.1f} {r['p90_ms']:8.1f} {r['texts_per_s']:9.1f}")
    for name in ("https (HAProxy)", "https (Ray's proxy)"):
        secure = results[name]
        print(f"  {name} costs {secure['p50_ms'] - plain['p50_ms']:+.1f} ms per short text (p50) and "
              f"runs at {secure['texts_per_s'] / plain['texts_per_s']:.2f}x the throughput of http")
    if opts.json:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
