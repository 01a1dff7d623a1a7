"""`python -m serve_app`: start a local Ray cluster tuned for this service and deploy it.

    python -m serve_app model=bundled:minilm          # offline, the bundled model
    python -m serve_app serve_config.yaml             # the config file as it is
    python -m serve_app serve_config.yaml port=8001 model=/models/qwen3   # with overrides

It runs `serve run` with the environment below (Ray reads these flags only when
a cluster starts, so a plain `serve run` cannot set them), and stops it
gracefully on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import os
import signal
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


def tuned_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) with the tuned flags, unless already set."""
    env = dict(os.environ if base is None else base)
    for key, value in FAST_SERVE_ENV.items():
        env.setdefault(key, value)
    return env


def serve_run_command(argv: list[str]) -> tuple[list[str], Path | None]:
    """The `serve run` command for our arguments, and a temporary config file if one was made."""
    config = next((a for a in argv if a.endswith((".yaml", ".yml"))), None)
    overrides = dict(a.split("=", 1) for a in argv if "=" in a)
    base = [sys.executable, "-m", "ray.serve.scripts", "run"]
    if config is None:
        return base + ["serve_app:build_app", *(f"{k}={v}" for k, v in overrides.items())], None
    if not overrides:
        return base + [config], None
    return base + [str(path := _with_overrides(Path(config), overrides))], path


def _with_overrides(config: Path, overrides: dict[str, str]) -> Path:
    """A copy of `config` whose first application takes `overrides` (port= and host= go to HTTP)."""
    import yaml

    from serve_app.config import AppArgs

    data = yaml.safe_load(config.read_text())
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
        command, temporary = serve_run_command(argv)
    except (ValueError, OSError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    child = subprocess.Popen(command, env=tuned_environment())

    def graceful(signum, _frame):
        # serve run shuts the cluster down cleanly (HAProxy included) on SIGINT only.
        child.send_signal(signal.SIGINT)

    signal.signal(signal.SIGTERM, graceful)
    signal.signal(signal.SIGINT, graceful)
    try:
        return child.wait()
    finally:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
