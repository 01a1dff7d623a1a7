"""`python -m serve_app`: start a local Ray cluster tuned for this service and deploy it.

    python -m serve_app model=bundled:minilm          # offline, the bundled model
    python -m serve_app serve_config.yaml             # the config file as it is
    python -m serve_app serve_config.yaml port=8001 model=/models/qwen3   # with overrides
    python -m serve_app model=bundled:minilm port=8100   # a second instance beside the first

It runs `serve run` with the environment below (Ray reads these flags only when
a cluster starts, so a plain `serve run` cannot set them), refuses to start if
a port it would open is taken, and stops it gracefully on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

# Measured on a 2-core CPU machine (README, bench/serve_bench.py): single-text p50 went from
# +34 ms over the raw model to +10 ms, throughput from 0.62x to 0.98x of raw.
FAST_SERVE_ENV = {
    # HTTP goes through HAProxy straight to the ingress replica's own server, instead of
    # through the Python proxy actor and an extra actor call per request.
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # Ray's throughput profile: gRPC between deployments, user code and routers on the
    # replica's main loop.
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # ... but keep Serve's own messages (start-up, warnings) on the terminal.
    "RAY_SERVE_LOG_TO_STDERR": "1",
}


# The ports Ray opens beside the service's own in HAProxy mode, as offsets from it: at Serve's
# default port 8000 they are Ray's defaults. Ray's are fixed numbers, and its fallback proxy
# binds with SO_REUSEPORT, so two instances on one machine would share it silently and
# answer each other's requests (404) whenever one has no replica running: at every scale
# from zero and during a redeploy.
DEFAULT_PORT = 8000
SIDE_PORTS = {
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": (500, "Serve's fallback proxy"),
    "RAY_SERVE_HAPROXY_STATS_PORT": (404, "HAProxy's statistics page"),
    "RAY_SERVE_HAPROXY_METRICS_PORT": (1101, "HAProxy's metrics endpoint"),
}


def tuned_environment(base: dict[str, str] | None = None, port: int = DEFAULT_PORT) -> dict[str, str]:
    """`base` (default: this process's environment) with the tuned flags and side ports for
    a service on `port`, each unless already set."""
    env = dict(os.environ if base is None else base)
    for key, value in FAST_SERVE_ENV.items():
        env.setdefault(key, value)
    if env["RAY_SERVE_ENABLE_HA_PROXY"] == "1":
        for key, (offset, _) in SIDE_PORTS.items():
            if 0 < port + offset < 65536:
                env.setdefault(key, str(port + offset))
    return env


def busy_ports(env: dict[str, str], port: int) -> list[str]:
    """What is already listening on the ports this service would open, in words."""
    wanted = {port: "the service"}
    if env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        for key, (_, what) in SIDE_PORTS.items():
            if key in env:
                wanted.setdefault(int(env[key]), f"{what} ({key})")
    busy = []
    for number, what in wanted.items():
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine
            try:
                probe.bind(("0.0.0.0", number))
            except OSError:
                busy.append(f"port {number}, for {what}")
    return busy


def _split(argv: list[str]) -> tuple[str | None, dict[str, str]]:
    """Our arguments: the config file, if one is named, and the key=value overrides."""
    config = next((a for a in argv if a.endswith((".yaml", ".yml"))), None)
    return config, dict(a.split("=", 1) for a in argv if "=" in a)


def http_port(argv: list[str]) -> int:
    """The port the service will listen on: `port=`, else the config file's, else Serve's."""
    config, overrides = _split(argv)
    if "port" in overrides:
        return int(overrides["port"])
    if config is not None:
        import yaml

        data = yaml.safe_load(Path(config).read_text()) or {}
        return int((data.get("http_options") or {}).get("port", DEFAULT_PORT))
    return DEFAULT_PORT


def serve_run_command(argv: list[str]) -> tuple[list[str], Path | None]:
    """The `serve run` command for our arguments, and a temporary config file if one was made."""
    config, overrides = _split(argv)
    base = [sys.executable, "-m", "ray.serve.scripts", "run"]
    if config is not None and not overrides:
        return base + [config], None
    return base + [str(path := _with_overrides(config, overrides))], path


def _with_overrides(config: str | None, overrides: dict[str, str]) -> Path:
    """A copy of `config` (or a one-app config on 127.0.0.1:8000) whose first application
    takes `overrides` (port= and host= go to HTTP)."""
    import yaml

    from serve_app.config import AppArgs

    if config is None:
        # Written out rather than `serve run serve_app:build_app`: in HAProxy mode Ray's
        # default host is all interfaces, and this service stays on this machine unless
        # told otherwise (host=0.0.0.0), like serve_config.yaml.
        app = {"name": "embeddings", "route_prefix": "/", "import_path": "serve_app:build_app"}
        data = {"http_options": {"host": "127.0.0.1", "port": DEFAULT_PORT}, "applications": [app]}
    else:
        data = yaml.safe_load(Path(config).read_text())
    http = data.setdefault("http_options", {})
    for key in ("port", "host"):
        if key in overrides:
            value = overrides.pop(key)
            http[key] = int(value) if key == "port" else value
    app = data["applications"][0]
    app["args"] = AppArgs.model_validate({**(app.get("args") or {}), **overrides}).model_dump(
        exclude_defaults=True
    )
    handle, name = tempfile.mkstemp(prefix="serve_config-", suffix=".yaml")
    with os.fdopen(handle, "w") as f:
        yaml.safe_dump(data, f)
    return Path(name)


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0
    try:
        port = http_port(argv)
        env = tuned_environment(port=port)
        if busy := busy_ports(env, port):
            print(
                f"Error: already in use: {'; '.join(busy)}. Is another instance running on this "
                "machine? Start this one with port=N (Ray's side ports follow it), or set the "
                "variable named to a free port.",
                file=sys.stderr,
            )
            return 2
        command, temporary = serve_run_command(argv)
    except (ValueError, OSError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    children: list[subprocess.Popen] = []

    def graceful(signum, _frame):
        # serve run shuts the cluster down cleanly (HAProxy included) on SIGINT only.
        for child in children:
            child.send_signal(signal.SIGINT)

    # Handlers first: a caught signal is reset to its default in the child, while an
    # ignored one stays ignored, and a shell starting us in the background ignores SIGINT.
    signal.signal(signal.SIGTERM, graceful)
    signal.signal(signal.SIGINT, graceful)
    children.append(child := subprocess.Popen(command, env=env))
    try:
        return child.wait()
    finally:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
