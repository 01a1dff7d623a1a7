"""`python -m serve_app`: start a local Ray cluster tuned for this service and deploy it.

    python -m serve_app model=bundled:minilm          # offline, the bundled model
    python -m serve_app serve_config.yaml             # the config file as it is
    python -m serve_app serve_config.yaml port=8001 model=/models/qwen3   # with overrides
    python -m serve_app model=bundled:minilm port=8100   # a second instance beside the first

It runs `serve run` with the environment below (Ray reads these flags only when
a cluster starts, so a plain `serve run` cannot set them). It refuses, with one
line and before Ray starts, a config file that cannot work (a setting AppArgs
rejects, a model that cannot be found, an import path Python cannot find, YAML
that does not parse) or a port that is taken. Ctrl-C, SIGTERM (to it or to its
process group) and SIGHUP (the terminal closing) stop it gracefully, and every
port it opened is free again when it exits. Serve's HAProxy runs through
`haproxy_front`: the service answers 503 "starting" (not Ray's plain 404) until its
application is deployed, and HTTPS (tls_certfile=, tls_keyfile=) goes through HAProxy too.
"""

from __future__ import annotations

import contextlib
import copy
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from serve_app.ray_shell import haproxy_front
from serve_app.ray_shell.announce import LOOPBACK_HOSTS, announce_when_ready
from serve_app.ray_shell.preflight import (
    DEFAULT_PORT,
    checked_config,
    prepare_models,
    read_config,
    service_host,
    tls_files,
)
from serve_app.web.auth import keys_as_digests

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
    # A stopping ingress replica stays up this long (Serve's default: 30 s, for cloud load
    # balancers that address replicas themselves). Here only Serve's own HAProxy does, which
    # the controller reconfigures as soon as the replica stops; the default made every
    # Ctrl-C wait 34 s. tests/test_serve_deploy.py redeploys under load past this drain.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
}


# The ports Ray opens beside the service's own in HAProxy mode, as offsets from it: at Serve's
# default port 8000 they are Ray's defaults. Ray's are fixed numbers, and its fallback proxy
# binds with SO_REUSEPORT, so two instances on one machine would share it silently and
# answer each other's requests (404) whenever one has no replica running: at every scale
# from zero and during a redeploy.
SIDE_PORTS = {
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": (500, "Serve's fallback proxy"),
    "RAY_SERVE_HAPROXY_STATS_PORT": (404, "HAProxy's statistics page"),
    "RAY_SERVE_HAPROXY_METRICS_PORT": (1101, "HAProxy's metrics endpoint"),
}


# Where Ray puts HAProxy's files, by variable: each in the run's private folder for them ("":
# the folder itself).
HAPROXY_FILES = {
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
    "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "",
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
}


def _public_host(config: dict) -> str | None:
    """The host a config asks the service to listen on, where it is not loopback and HAProxy
    can be told it (an IPv4 address or a name; an IPv6 one stays with Ray)."""
    host = service_host(config)
    return None if host in LOOPBACK_HOSTS or ":" in host else host


def private_ray_token(home: Path | None = None) -> None:
    """Ray writes its cluster token (~/.ray/auth_token) readable by every user of the machine
    (0644), and with it anyone could run code in the cluster as this user, past the API keys.
    A run makes new files private (umask 077); this tightens one an earlier Ray left."""
    token = (home or Path.home()) / ".ray" / "auth_token"
    with contextlib.suppress(OSError):
        if token.stat().st_uid == os.getuid() and token.stat().st_mode & 0o077:
            token.chmod(0o600)


def tuned_environment(base: dict[str, str] | None = None, port: int = DEFAULT_PORT,
                      ray_proxy: bool = False) -> dict[str, str]:
    """`base` (default: this process's environment) with the tuned flags and side ports for
    a service on `port`, each unless already set. With `ray_proxy`, Ray's own proxy fronts
    the service instead of HAProxy (for a key file with a password, which HAProxy cannot
    be given)."""
    env = dict(os.environ if base is None else base)
    if ray_proxy:
        env["RAY_SERVE_ENABLE_HA_PROXY"] = "0"
    for key, value in FAST_SERVE_ENV.items():
        env.setdefault(key, value)
    if env["RAY_SERVE_ENABLE_HA_PROXY"] == "1":
        for key, (offset, _) in SIDE_PORTS.items():
            if 0 < port + offset < 65536:
                env.setdefault(key, str(port + offset))
    return env


def front_environment(env: dict[str, str], directory: Path,
                      certificate: tuple[str, str] | None = None,
                      haproxy_files: Path | None = None) -> dict[str, str]:
    """`env` with Serve's HAProxy run through `haproxy_front` (503 while starting, HTTPS),
    its files written to `directory` (private: it may hold a copy of the TLS key);
    `certificate`: the (certificate, key) files for HTTPS; `haproxy_files`: a private folder
    for HAProxy's own files. Unchanged where Ray's own proxy fronts the service."""
    if env.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
        return env
    env = dict(env)
    # The operator's own HAProxy if they named one; a front of ours already set up (an
    # environment passed down) names the real binary behind it.
    real = (env.get(haproxy_front.REAL_BINARY_VARIABLE) or env.get("RAY_SERVE_HAPROXY_BINARY_PATH")
            or haproxy_front.real_binary())
    script = directory / "haproxy"
    script.write_text(
        "#!/bin/sh\n"
        f"exec {shlex.quote(sys.executable)} -I {shlex.quote(haproxy_front.__file__)} \"$@\"\n"
    )
    script.chmod(0o700)
    env.update({"RAY_SERVE_HAPROXY_BINARY_PATH": str(script), haproxy_front.REAL_BINARY_VARIABLE: real})
    # HAProxy's files (its configuration, admin socket, state) in a private folder rather
    # than Ray's /tmp/haproxy-serve, which every user shares and whoever made it first owns
    # (and could swap the configuration of another's HAProxy in). Ray adds the node's id (56
    # characters) to each path, and HAProxy takes socket paths of at most 97 bytes: under a
    # long TMPDIR, Ray's place stays.
    if haproxy_files is not None and len(str(haproxy_files)) + 1 + 56 + len("/metrics.sock") <= 97:
        for variable, name in HAPROXY_FILES.items():
            env.setdefault(variable, str(haproxy_files / name) if name else str(haproxy_files))
    elif haproxy_files is not None:
        print(f"Note: HAProxy's files go to Ray's shared /tmp/haproxy-serve: {haproxy_files} is too long "
              "a path for its sockets (a shorter TMPDIR keeps them private).", file=sys.stderr)
    if certificate is not None:
        # HAProxy takes the certificate and its key in one file.
        pem = directory / "certificate-and-key.pem"
        pem.touch(mode=0o600)
        pem.write_bytes(b"\n".join(Path(name).read_bytes().strip() for name in certificate) + b"\n")
        env[haproxy_front.CERTIFICATE_VARIABLE] = str(pem)
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
    if stray := [a for a in argv if "=" not in a and not a.endswith((".yaml", ".yml"))]:
        raise ValueError(
            f"unexpected argument {stray[0]!r}: give a config file (NAME.yaml) and "
            "key=value settings, e.g. python -m serve_app serve_config.yaml port=8001."
        )
    config = next((a for a in argv if a.endswith((".yaml", ".yml"))), None)
    return config, dict(a.split("=", 1) for a in argv if "=" in a)


def http_port(argv: list[str]) -> int:
    """The port the service will listen on: `port=`, else the config file's, else Serve's."""
    config, overrides = _split(argv)
    if "port" in overrides:
        return int(overrides["port"])
    if config is not None:
        return int((read_config(config).get("http_options") or {}).get("port", DEFAULT_PORT))
    return DEFAULT_PORT


def serve_run_command(argv: list[str], haproxy_https: bool = True
                      ) -> tuple[list[str], Path | None, tuple[str, str] | None]:
    """The `serve run` command for our arguments, a temporary config file if one was made,
    and the certificate and key HAProxy is to serve HTTPS with.

    The configuration it gets is checked first (`checked_config`): a ValueError, in one line,
    rather than a `serve run` that logs the error and runs on with no application. With
    `haproxy_https` (HAProxy fronts the service), an HTTPS config's certificate and key are
    taken out of http_options for HAProxy: it ends TLS, and the replicas behind it answer
    plain HTTP on loopback. A key with a password stays with Ray's own proxy.
    """
    config, overrides = _split(argv)
    data = checked_config(config, overrides)
    tls = tls_files(data)
    http = data.get("http_options") or {}
    if tls is not None and haproxy_https and not http.get("ssl_keyfile_password"):
        del http["ssl_certfile"], http["ssl_keyfile"]
    else:
        tls = None
    base = [sys.executable, "-m", "ray.serve.scripts", "run"]
    if config is not None and not overrides and tls is None:
        return base + [config], None, None
    copy = write_config(data)
    return base + [str(copy)], copy, tls


def write_config(data: dict, path: Path | None = None) -> Path:
    """`data` as a Serve config file: at `path`, else in a new temporary file."""
    import yaml

    if path is None:
        handle, name = tempfile.mkstemp(prefix="serve_config-", suffix=".yaml")
        os.close(handle)
        path = Path(name)
    path.write_text(yaml.safe_dump(data))
    return path


# Every process this run starts (serve run, Ray's daemons and workers, the HAProxy a worker
# starts, warm-start zygotes) inherits this variable, with a random value unique to the run,
# in its environment; /proc shows it, so what a run left behind can be told from anything
# else. It trusts only that: a process of this user carrying the value, which only the
# run's own processes know. Where there is no /proc (macOS) nothing is found, and a stop
# relies on serve run's graceful shutdown alone.
RUN_VARIABLE = "SHEET_EMBEDDINGS_RUN"


def processes_of_run(token: str) -> list[int]:
    """The live processes (Linux /proc) whose environment carries this run's token."""
    mark = f"{RUN_VARIABLE}={token}".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            environ = (proc / "environ").read_bytes()
        except OSError:  # ended meanwhile, or another user's
            continue
        if mark in environ.split(b"\0") and int(proc.name) != os.getpid():
            found.append(int(proc.name))
    return found


def end_leftovers(token: str, grace_s: float = 10.0) -> list[int]:
    """End what is left of a run after `serve run` exited, SIGTERM then SIGKILL; the pids.

    On a graceful stop nothing is left. When `serve run` dies without shutting Serve down
    (SIGTERM or SIGHUP straight to it, a crash, SIGKILL), the HAProxy that Serve's manager
    actor started outlives it, in the worker's own session, holding the service's port.
    """
    ended = []
    for signum in (signal.SIGTERM, signal.SIGKILL):
        if not (pids := processes_of_run(token)):
            break
        ended = sorted({*ended, *pids})
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)
        deadline = time.monotonic() + grace_s
        while processes_of_run(token) and time.monotonic() < deadline:
            time.sleep(0.1)
    return ended


def _stop_with_parent(parent: int):
    """A preexec_fn: the child gets SIGINT (serve run's graceful stop) if the launcher dies,
    even by SIGKILL; it runs in its own session, so nothing else would tell it (Linux)."""
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (AttributeError, OSError):
        return None
    PR_SET_PDEATHSIG = 1

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGINT), 0, 0, 0)
        if os.getppid() != parent:  # the launcher died before the line above
            os._exit(1)

    return preexec


def run(command: list[str], env: dict[str, str],
        started: Callable[[subprocess.Popen], object] | None = None) -> int:
    """Run `serve run`, stop it gracefully on SIGINT, SIGTERM or SIGHUP, end what it leaves;
    `started` is given its process once it runs."""
    token = secrets.token_hex(8)
    child: subprocess.Popen | None = None
    pending = False  # a signal came before serve run had started

    def graceful(signum, _frame):
        # serve run shuts the cluster down cleanly (HAProxy included) on SIGINT only; on
        # SIGTERM Ray's driver handler exits at once, leaving HAProxy running.
        nonlocal pending
        if child is None:
            pending = True
        else:
            child.send_signal(signal.SIGINT)

    # Handlers first: a caught signal is reset to its default in the child, while an
    # ignored one stays ignored, and a shell starting us in the background ignores SIGINT.
    before = {signum: signal.signal(signum, graceful) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        # Its own session: a signal to our process group (a process manager's SIGTERM, the
        # terminal's SIGINT or SIGHUP) reaches only us, and serve run gets one SIGINT from
        # us instead of dying on the group's signal along with Ray's daemons.
        # umask 077: what the run writes (Ray's token file, its session's files and logs, the
        # zygotes' logs) is this user's alone, not readable by every user of an office server.
        child = subprocess.Popen(
            command, env={**env, RUN_VARIABLE: token}, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_stop_with_parent(os.getpid()), umask=0o077,
        )
        if pending:
            child.send_signal(signal.SIGINT)
        elif started is not None:
            started(child)
        return child.wait()
    finally:
        if ended := end_leftovers(token):
            with contextlib.suppress(OSError):  # a terminal that closed
                print(f"Stopped what serve run left running: pids {ended}.", file=sys.stderr)
        for signum, handler in before.items():  # as they were: run() may be called again
            signal.signal(signum, handler)


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0
    temporary = front = haproxy_files = None
    try:
        try:
            haproxy = tuned_environment()["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
            command, temporary, https = serve_run_command(argv, haproxy_https=haproxy)
            config = read_config(command[-1])
            if prepare_models(config):  # a hub model, pinned to the revision just fetched
                temporary = write_config(config, temporary)
                command[-1] = str(temporary)
            port = http_port(argv)
        except (ValueError, OSError) as exc:
            print(f"Error: {exc}", file=sys.stderr)
            return 2
        # HTTPS still in http_options: Ray's own proxy serves it.
        env = tuned_environment(port=port, ray_proxy=tls_files(config) is not None)
        try:
            env = keys_as_digests(env)
        except ValueError as exc:  # a malformed EMBED_API_KEY_DIGESTS
            print(f"Error: {exc}", file=sys.stderr)
            return 2
        if env.get("RAY_ADDRESS", "local") not in ("", "local"):
            print(f"Note: RAY_ADDRESS={env['RAY_ADDRESS']} is left aside: this command starts a Ray "
                  "of its own. To run the service on that cluster, `serve deploy` a config file "
                  "to it (README, 'GPUs and clusters').", file=sys.stderr)
        # A Ray of its own, always: `serve run` would join a cluster that `ray start` left
        # running on this machine, where none of this run's settings, ports or stop apply.
        env["RAY_ADDRESS"] = "local"
        announced = config
        if env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and (host := _public_host(config)):
            # Ray binds its replicas' ports and its fallback proxy to this host too, in plain
            # HTTP: they stay on loopback, and only HAProxy's public bind listens there.
            config = copy.deepcopy(config)
            config.setdefault("http_options", {})["host"] = "127.0.0.1"
            temporary = write_config(config, temporary)
            command[-1] = str(temporary)
            env[haproxy_front.HOST_VARIABLE] = host
        if busy := busy_ports(env, port):
            print(
                f"Error: already in use: {'; '.join(busy)}. Is another instance running on this "
                "machine? Start this one with port=N (Ray's side ports follow it), or set the "
                "variable named to a free port.",
                file=sys.stderr,
            )
            return 2
        front = Path(tempfile.mkdtemp(prefix="sheet-embeddings-front-"))
        haproxy_files = Path(tempfile.mkdtemp(prefix="haproxy-"))  # short: see front_environment
        try:
            env = front_environment(env, front, https, haproxy_files)
        except OSError as exc:
            print(f"Error: cannot set up the HTTP front: {exc}", file=sys.stderr)
            return 2
        private_ray_token()
        secure = bool(https or tls_files(config))
        if secure:
            via = "HAProxy" if https else "Ray's own proxy"
            print(f"HTTPS on port {port}, through {via}.", file=sys.stderr)
        return run(command, env, started=lambda child: announce_when_ready(child, announced, port, secure))
    finally:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        for folder in (front, haproxy_files):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
