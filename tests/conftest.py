"""Shared fixtures: the bundled model, a tiny Qwen3, the in-process app, one Ray cluster, and a
fake embedding server for the add-in client."""

from __future__ import annotations

import contextlib
import os

# No test may reach a model hub: these machines cannot, and CI must not try.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import base64  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

from serve_app.core.config import AppArgs  # noqa: E402
from serve_app.core.modelinfo import ModelSpec, resolve_model  # noqa: E402

BUNDLED = "bundled:minilm"


@pytest.fixture(scope="session")
def bundled_spec() -> ModelSpec:
    return resolve_model(BUNDLED)


# The tests compare vectors across processes and batches to 1e-5, which float32 gives
# and bfloat16 (dtype=auto on a CPU with AVX512-BF16 or AMX) does not; the bfloat16
# path has tests of its own (parity bound, dtype choice, a served stand-in).
REFERENCE_DTYPE = "float32"


@pytest.fixture(scope="session")
def bundled_embedder(bundled_spec):
    from serve_app.model.embedder import TextEmbedder

    return TextEmbedder(bundled_spec, dtype=REFERENCE_DTYPE)


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory) -> Path:
    from tiny_qwen3 import build_tiny_qwen3

    return build_tiny_qwen3(tmp_path_factory.mktemp("models") / "tiny-qwen3")


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face hub cache under tmp_path, laid out as huggingface_hub reads it
    (snapshots/<commit>/ and refs/main; plain files, no blobs or tree listings).

    `hub_cache(repo_id, commit, model_dir)` copies a model into it as that commit's snapshot
    and points the `main` ref at it; `hub_cache.root` is the cache, which this process's
    huggingface_hub reads (a subprocess gets it as HF_HUB_CACHE, `hub_cache.env(hub)`).
    """
    import shutil

    import huggingface_hub.constants

    root = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))

    def add(repo_id: str, commit: str, model_dir: Path, *, main: bool = True, skip=()) -> Path:
        repo = root / ("models--" + repo_id.replace("/", "--"))
        snapshot = repo / "snapshots" / commit
        shutil.copytree(model_dir, snapshot, ignore=shutil.ignore_patterns(*skip))
        if main:
            (repo / "refs").mkdir(parents=True, exist_ok=True)
            (repo / "refs" / "main").write_text(commit)
        return snapshot

    def env(hub=None) -> dict[str, str]:
        """A subprocess's environment with this cache, online: `hub` (a FakeHub) as the hub,
        or, without one, a port on 127.0.0.1 that refuses every connection."""
        online = {k: v for k, v in os.environ.items()
                  if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        return {**online, "HF_HUB_CACHE": str(root),
                "HF_ENDPOINT": hub.url if hub else f"http://127.0.0.1:{refusing.getsockname()[1]}"}

    refusing = socket.socket()  # bound, never listening: connections to it are refused
    refusing.bind(("127.0.0.1", 0))
    add.root, add.env = root, env
    yield add
    refusing.close()


@pytest.fixture()
def fake_hub():
    from fakehub import FakeHub

    hub = FakeHub()
    yield hub
    hub.close()


@pytest.fixture(scope="session")
def standin_tokenizer():
    """Qwen3-Embedding's tokenizer, rebuilt from the Qwen BPE ranks (a few seconds)."""
    from bench.qwen3_standin import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def small_standin_dir(tmp_path_factory, standin_tokenizer) -> Path:
    """The Qwen3-Embedding stand-in with 2 layers and hidden size 128, the real tokenizer."""
    from bench.qwen3_standin import build_standin

    directory = tmp_path_factory.mktemp("models") / "qwen3-standin-small"
    return build_standin(directory, layers=2, hidden=128, tokenizer=standin_tokenizer)


@pytest.fixture(scope="session")
def overflowing_standin_dir(tmp_path_factory, standin_tokenizer) -> Path:
    """The small stand-in with one layer's MLP output scaled up a million times: its
    residual stream outgrows float16's range (65,504), as Qwen models' massive
    activations do on some texts, and stays well inside bfloat16's and float32's."""
    import torch
    from safetensors.torch import load_file, save_file

    from bench.qwen3_standin import build_standin

    directory = tmp_path_factory.mktemp("models") / "qwen3-standin-overflowing"
    build_standin(directory, layers=2, hidden=128, tokenizer=standin_tokenizer)
    weights = load_file(directory / "model.safetensors")
    name = next(k for k in weights if k.endswith("layers.0.mlp.down_proj.weight"))
    weights[name] = (weights[name].float() * 1e6).to(torch.bfloat16)
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


@pytest.fixture(scope="session")
def unnormalised_dir(tmp_path_factory, bundled_spec) -> Path:
    """The bundled model without its Normalize module: vectors of any length, as many
    multilingual sentence-transformers models return them (files linked, not copied)."""
    import json

    source = Path(bundled_spec.source)
    directory = tmp_path_factory.mktemp("models") / "minilm-unnormalised"
    directory.mkdir()
    for item in source.iterdir():
        if item.name != "modules.json":
            (directory / item.name).symlink_to(item)
    modules = json.loads((source / "modules.json").read_text())
    kept = [m for m in modules if not m["type"].endswith("Normalize")]
    (directory / "modules.json").write_text(json.dumps(kept))
    return directory


def make_service(embedder, **overrides):
    from serve_app.web.service import EmbeddingService, LocalBackend

    args = AppArgs(model=embedder.spec.name, **overrides)
    return EmbeddingService(args, embedder.spec, LocalBackend(embedder))


@pytest.fixture(scope="session")
def app(bundled_embedder):
    from serve_app.web.api import create_app

    return create_app(make_service(bundled_embedder, max_inputs_per_request=64))


@pytest.fixture()
def http(app):
    """Starlette's TestClient: an httpx.Client that talks to the app in process."""
    from starlette.testclient import TestClient

    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture()
def openai_client(http):
    """The official OpenAI client, unchanged, pointed at the in-process app."""
    import openai

    return openai.OpenAI(base_url="http://testserver/v1", api_key="test-key", http_client=http)


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.25):
    """`predicate()`'s first true value, polled until `timeout_s`; else a failed assertion."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


class MapBatchesRecorder:
    """A stand-in for a Ray dataset that keeps what `map_batches` was asked (pure logic)."""

    def map_batches(self, fn, **kwargs):
        self.fn, self.kwargs = fn, kwargs
        return self


def serve_in_background(server) -> threading.Thread:
    """A socketserver's serve_forever on a daemon thread, checking for shutdown every 50 ms
    (its default, 0.5 s, was each test server's stop: 11 s of the run)."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return thread


def command_lines() -> dict[int, list[str]]:
    """Every process's arguments, by pid (processes that end meanwhile are left out)."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            found[int(proc.name)] = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
    return found


def listening_sockets(pids: list[int] | None = None) -> set[tuple[str, int]]:
    """(address, port) of the TCP sockets listening on this machine (Linux /proc/net), or of
    those that `pids` hold."""
    import ipaddress

    inodes = None
    if pids is not None:
        inodes = set()
        for pid in pids:
            with contextlib.suppress(OSError):  # ended meanwhile
                for fd in Path(f"/proc/{pid}/fd").iterdir():
                    with contextlib.suppress(OSError):
                        if (target := os.readlink(fd)).startswith("socket:["):
                            inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A" and (inodes is None or fields[9] in inodes):  # LISTEN
                address, port = fields[1].split(":")
                raw = bytes.fromhex(address)
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # host-order words
                found.add((str(ipaddress.ip_address(raw)), int(port, 16)))
    return found


def processes_with(variable: str, value: str) -> list[int]:
    """The processes whose environment (as they started) has `variable` set to `value`."""
    mark = f"{variable}={value}".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if mark in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:  # ended meanwhile, or another user's
            continue
    return found


def cmdline(pid: int) -> str:
    """One process's command line, its arguments joined by spaces."""
    return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()


def zygotes_of(parent_pid: int) -> list[int]:
    """The warm-start zygotes serving the workers of `parent_pid` (a raylet)."""
    return [pid for pid, args in command_lines().items() if "--zygote" in args and str(parent_pid) in args]


def early_zygotes() -> dict[int, tuple[int, list[str]]]:
    """The zygotes drivers started before Ray, which name no raylet: by pid, each one's
    driver (`--owner=`) and arguments. The process a driver starts forks its zygote and
    exits; it is left out."""
    found = {}
    for pid, args in command_lines().items():
        if "--zygote" in args and any(a.startswith("--channel=") for a in args):
            owner = int(next(a for a in args if a.startswith("--owner=")).split("=", 1)[1])
            if _parent_of(pid) != owner:
                found[pid] = (owner, args)
    return found


def _parent_of(pid: int) -> int | None:
    try:
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


# Test servers get ports from a range no one else hands out: above Ray's worker ports
# (10002-19999), below Serve's direct-ingress HTTP ports (30000-31000) and the kernel's
# ephemeral range, with room for a service's side ports (up to +1101). A port from bind(0),
# once released, can go to any process's bind(0) or outgoing connection before the test's
# server binds it (HAProxy's bind then failed: "Address already in use"); one from here
# only to another explicit choice, and this session hands none out twice.
_TEST_PORTS = range(20000, min(28800, max(_ephemeral_low() - 1200, 21000)))
_handed_out: set[int] = set()


def service_env(**extra: str) -> dict[str, str]:
    """For a `python -m serve_app` a test starts: this environment without the session
    cluster's Ray, Serve and front settings (its side ports, its HAProxy front), offline.
    A stop waits out the ingress's draining period: 1 s here (the service's is 5 s), as for
    the session's cluster."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_SERVE_", "RAY_ADDRESS", "SHEET_EMBEDDINGS_"))}
    return {**env, "HF_HUB_OFFLINE": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1", **extra}


def free_port(side_ports: bool = False) -> int:
    """A port nothing is bound to; with `side_ports`, the ports Ray opens beside a service
    on it in HAProxy mode (serve_app.ray_shell.launch.SIDE_PORTS) are free too."""
    import random

    from serve_app.ray_shell.launch import SIDE_PORTS, busy_ports, tuned_environment

    offsets = [0, *(offset for offset, _ in SIDE_PORTS.values())]
    for _ in range(1000):
        port = random.SystemRandom().choice(_TEST_PORTS)
        wanted = {port + offset for offset in offsets}
        env = tuned_environment({}, port=port) if side_ports else {}
        if not wanted & _handed_out and not busy_ports(env, port):
            _handed_out.update(wanted)
            return port
    raise RuntimeError(f"no free port in {_TEST_PORTS}")


class ServeCluster:
    """The session's Ray cluster with Serve on a free loopback port."""

    def __init__(self, port: int, metrics_port: int) -> None:
        self.port = port
        self.metrics_port = metrics_port  # Ray's Prometheus endpoint on this node
        self.lasting: set[str] = set()  # session fixtures' apps, kept between tests

    def url(self, app: str) -> str:
        return f"http://127.0.0.1:{self.port}/{app}"

    def deploy(self, app: str, **overrides) -> str:
        """Run build_app(AppArgs(...)) as Serve application `app` at /app; returns its URL."""
        from ray import serve

        from serve_app.ray_shell.app import build_app

        settings = {"model": BUNDLED, "gpu_fraction": 0.0, "dtype": REFERENCE_DTYPE, **overrides}
        serve.run(build_app(AppArgs(**settings)), name=app, route_prefix=f"/{app}")
        return self.url(app)

    def replicas(self, app: str) -> dict[str, int]:
        from ray import serve

        status = serve.status().applications[app].deployments["Embedder"]
        return {k: v for k, v in status.replica_states.items() if v}

    def wait_for(self, predicate, timeout_s: float, what: str, interval_s: float = 0.25):
        return wait_for(predicate, timeout_s, what, interval_s)

    def delete(self, app: str) -> None:
        from ray import serve

        serve.delete(app)


@pytest.fixture(scope="session")
def serve_cluster(tmp_path_factory):
    """One local Ray cluster for every Ray test; its node declares one logical GPU."""
    import ray
    from ray import serve

    from serve_app.ray_shell.launch import front_environment, tuned_environment

    # The production mode (HAProxy ingress through our front, Ray's throughput profile),
    # with Ray's side ports (fallback proxy, HAProxy's stats and metrics) following the
    # service's free port, so a development server on this machine cannot clash with the tests.
    port = free_port(side_ports=True)
    os.environ.update(front_environment(tuned_environment(port=port), tmp_path_factory.mktemp("front")))
    # Each test deletes its app; in production an ingress drains 5 s before it stops.
    os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "1"
    metrics_port = free_port()
    ray.init(
        _metrics_export_port=metrics_port,
        num_cpus=4,
        num_gpus=1,  # logical only: CPU torch sees no CUDA, Ray still accounts fractions
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield ServeCluster(port, metrics_port)
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(autouse=True)
def _apps_left_behind_are_deleted(request):
    """A Ray test deletes its app at its end; one that fails before that would leave its
    replicas holding the cluster's CPUs, and the next deploy would wait for them with no
    end in sight. Only for tests that use the cluster: others never start it."""
    if "serve_cluster" not in request.fixturenames:
        yield
        return
    from ray import serve

    cluster = request.getfixturevalue("serve_cluster")
    yield
    for app in sorted(set(serve.status().applications) - cluster.lasting):
        cluster.delete(app)


EXCEL_KEY = "excel-test-key"
# The names LangChain, LlamaIndex, Haystack, Chroma and Weaviate send by default.
CLIENT_ALIASES = ["text-embedding-3-small", "text-embedding-ada-002"]


@pytest.fixture(scope="session")
def excel_servers(serve_cluster):
    """Two warm apps for the spreadsheet and client-library tests: one open, with the
    OpenAI names as aliases; one that needs EXCEL_KEY and takes token ids."""
    serve_cluster.lasting.update({"excel", "excel-keyed"})
    open_url = serve_cluster.deploy("excel", min_replicas=1, model_aliases=CLIENT_ALIASES)
    os.environ["EMBED_API_KEYS"] = EXCEL_KEY  # read by build_app, as in production
    try:
        keyed_url = serve_cluster.deploy("excel-keyed", min_replicas=1, accept_token_ids=True)
    finally:
        del os.environ["EMBED_API_KEYS"]
    yield {"open": open_url, "keyed": keyed_url}
    serve_cluster.delete("excel")
    serve_cluster.delete("excel-keyed")


@pytest.fixture()
def sheet_env(monkeypatch, excel_servers):
    """Formulas pointed at the open app, as EMBED_SERVER_URL would in Excel."""
    for name in ("EMBED_API_KEY", "EMBED_TIMEOUT_S", "EMBED_INSTRUCTION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EMBED_SERVER_URL", excel_servers["open"])
    # No xlwings user config on CI machines; make sure a developer's does not leak in.
    monkeypatch.setattr("excel_addin.settings._xlwings_user_config", lambda: {})
    return excel_servers


class FakeClock:
    """A monotonic clock the test moves by hand (`clock.now += 31`)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeEmbeddingServer:
    """OpenAI-shaped /v1/embeddings and /v1/models on 127.0.0.1, for the add-in client's logic.

    A vector is a fixed function of (model, instruction, text); a request carrying a text in
    `hold` waits until `release` is set, then one carrying a text in `fail` is answered 503.
    """

    def __init__(self, model: str = "fake-model-a", dimensions: int = 8,
                 tls: tuple[Path, Path] | None = None) -> None:
        """`tls`: (certificate, key) files, to answer HTTPS."""
        self.model = model
        self.fingerprint: str | None = None  # system_fingerprint, as our service sends it
        self.answer_fingerprints: list[str] = []  # the next answers' own, if other (fp_mixed)
        self.dimensions = dimensions
        self.hold: set[str] = set()
        self.fail: set[str] = set()
        self.release = threading.Event()
        self.seen: list[dict] = []  # every request: path, input texts, Authorization header
        self._arrived = threading.Condition()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHandler)
        self._http.daemon_threads = True
        self._http.fake = self
        scheme = "http"
        if tls is not None:
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*map(str, tls))
            self._http.socket = context.wrap_socket(self._http.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self._http.server_address[1]}"
        self._thread = serve_in_background(self._http)

    def vector(self, text: str, instruction: str | None = None, model: str | None = None):
        name = f"{model or self.model}\0{self.fingerprint}\0{instruction}\0{text}".encode()
        seed = int.from_bytes(hashlib.sha256(name).digest()[:8], "little")
        v = np.random.default_rng(seed).standard_normal(self.dimensions)
        return (v / np.linalg.norm(v)).astype("<f4")

    def carrying(self, text: str) -> int:
        """How many embedding requests carried `text`."""
        with self._arrived:
            return sum(text in r["input"] for r in self.seen)

    def wait_for_request(self, carrying: str, timeout_s: float = 10.0) -> None:
        """Return once a request carrying `carrying` has arrived (it may still be held)."""
        with self._arrived:
            if not self._arrived.wait_for(lambda: any(carrying in r["input"] for r in self.seen), timeout_s):
                raise AssertionError(f"no request carrying {carrying!r} arrived within {timeout_s} s")

    def record(self, entry: dict) -> None:
        with self._arrived:
            self.seen.append(entry)
            self._arrived.notify_all()

    def close(self) -> None:
        self.release.set()
        self._http.shutdown()
        self._http.server_close()


class _FakeHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        fake = self.server.fake
        fake.record({"path": self.path, "input": [], "authorization": self.headers.get("Authorization")})
        if self.path != "/v1/models":
            return self._answer(404, {"error": {"message": "Not found."}})
        card = {"id": fake.model, "object": "model", "dimensions": fake.dimensions}
        if fake.fingerprint:
            card["system_fingerprint"] = fake.fingerprint
        self._answer(200, {"object": "list", "data": [card]})

    def do_POST(self) -> None:
        fake = self.server.fake
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        texts, instruction = body["input"], body.get("instruction")
        fake.record({"path": self.path, "input": texts, "authorization": self.headers.get("Authorization"),
                     "instruction": instruction, "prompt_name": body.get("prompt_name")})
        if fake.hold.intersection(texts):
            fake.release.wait(timeout=30)  # a test that never releases must not hang the run
        if fake.fail.intersection(texts):
            return self._answer(503, {"error": {"message": "The model is restarting."}})
        model = fake.model  # read after the hold: a change meanwhile is what it answers with
        data = [
            {"object": "embedding", "index": i,
             "embedding": base64.b64encode(fake.vector(t, instruction, model).tobytes()).decode()}
            for i, t in enumerate(texts)
        ]
        answer = {"object": "list", "model": model, "data": data}
        if fake.answer_fingerprints:
            answer["system_fingerprint"] = fake.answer_fingerprints.pop(0)
        elif fake.fingerprint:
            answer["system_fingerprint"] = fake.fingerprint
        self._answer(200, answer)

    def _answer(self, status: int, content: dict) -> None:
        raw = json.dumps(content).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args) -> None:  # quiet test output
        pass


@pytest.fixture()
def fake_server():
    server = FakeEmbeddingServer()
    yield server
    server.close()


@pytest.fixture()
def fake_nvidia_smi(tmp_path, monkeypatch):
    """install(listing): an `nvidia-smi` printing `listing` is the only program on PATH
    (None: there is none), for bench/gpu_check.py's readings on a machine without a GPU."""

    def install(listing: str | None) -> None:
        bin_dir = tmp_path / "fake-bin"
        bin_dir.mkdir(exist_ok=True)
        if listing is not None:
            script = bin_dir / "nvidia-smi"
            script.write_text(f"#!/bin/sh\nprintf '%s' '{listing}'\n")
            script.chmod(0o755)
        monkeypatch.setenv("PATH", str(bin_dir))

    return install
