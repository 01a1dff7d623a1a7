"""What `python -m serve_app` says once the service answers: where it is, who may reach
it, and how its model comes and goes.

Ray's own start-up lines fill a screen and none of them says that the service is up or at
which address; someone who started it needs that line to point Excel or an OpenAI client
at it. The launcher asks the service's own /health (never wakes the model) on loopback until
it answers, then prints this once.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request

from serve_app.core.config import AppArgs
from serve_app.ray_shell.preflight import OUR_BUILDERS, service_host

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
EVERY_INTERFACE = {"0.0.0.0", "::", ""}


def _host_and_app(config: dict) -> tuple[str, dict | None]:
    """The host the service listens on, and its application (the first of ours; None
    where the config file runs only other applications)."""
    host = service_host(config)
    apps = config.get("applications") or []
    return host, next((a for a in apps if a.get("import_path") in OUR_BUILDERS), None)


def _url(https: bool, host: str, port: int, app: dict) -> str:
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    prefix = (app.get("route_prefix") or "/").rstrip("/")
    return f"{'https' if https else 'http'}://{host}:{port}{prefix}"


def ready_message(config: dict, port: int, https: bool, health: dict) -> str:
    """The lines printed once the service answers: `config` as `serve run` got it,
    `health` the service's /health answer."""
    host, app = _host_and_app(config)
    args = AppArgs.model_validate(app.get("args") or {})
    base = _url(https, socket.gethostname() if host in EVERY_INTERFACE else host, port, app)
    lines = [f"\nReady: {base}/v1 answers OpenAI embedding requests for {health.get('model', args.model)}."]
    keys = ("an API key is required (EMBED_API_KEYS)" if health.get("api_keys")
            else "no API key is asked for")
    if host in LOOPBACK_HOSTS:
        lines.append(f"  Who can reach it: this machine only (host {host}); {keys}. host=0.0.0.0 "
                     "opens it to other PCs (set EMBED_API_KEYS first).")
    else:
        anyone = "" if health.get("api_keys") else ": anyone who can reach this port can use it"
        lines.append(f"  Who can reach it: other machines too (host {host or 'every interface'}); "
                     f"{keys}{anyone}.")
    if args.min_replicas:
        lines.append(f"  The model stays loaded ({args.min_replicas} replica(s) at least, min_replicas).")
    else:
        lines.append(f"  The model loads on the first request (seconds) and unloads after "
                     f"{args.idle_timeout_s:g} s without one (min_replicas: 0).")
    lines.append(f"  Excel: EMBED_SERVER_URL={base} for the xlwings formulas; the Office add-in's "
                 f"manifest is {base}/excel/manifest.xml. Stop with Ctrl-C.")
    return "\n".join(lines)


def read_health(url: str, timeout_s: float = 2.0) -> dict | None:
    """The service's /health answer, or None while it does not answer 200."""
    # Our own service on this machine: its certificate may name another host, or be one
    # the operator's machine does not trust; /health carries nothing secret.
    context = ssl._create_unverified_context() if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(url, timeout=timeout_s, context=context) as reply:
            return json.loads(reply.read()) if reply.status == 200 else None
    except (OSError, ValueError):  # not listening yet, 503 "starting", a partial answer
        return None


def announce_when_ready(child: subprocess.Popen, config: dict, port: int, https: bool,
                        interval_s: float = 0.5) -> threading.Thread | None:
    """Print `ready_message` to stderr once the service answers, from a daemon thread that
    gives up when `child` (serve run) ends; None where the config runs none of ours."""
    host, app = _host_and_app(config)
    if app is None:
        return None
    local = "127.0.0.1" if host in EVERY_INTERFACE | {"localhost"} else host
    url = _url(https, local, port, app) + "/health"
    # A model kept loaded is waited for too ("1 running" rather than "1 starting"); one that
    # scales to zero loads on the first request, which the message says.
    kept = AppArgs.model_validate(app.get("args") or {}).min_replicas > 0

    def ready(health: dict | None) -> bool:
        return health is not None and (not kept or "running" in str(health.get("replicas")))

    def watch() -> None:
        while child.poll() is None:
            if ready(health := read_health(url)):
                if child.poll() is None:
                    with contextlib.suppress(OSError):  # a terminal that closed
                        print(ready_message(config, port, https, health), file=sys.stderr, flush=True)
                return
            time.sleep(interval_s)

    thread = threading.Thread(target=watch, name="announce-ready", daemon=True)
    thread.start()
    return thread
