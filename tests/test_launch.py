"""`python -m serve_app`: the command it runs, the environment it runs it in, what it
refuses before starting, and how it stops."""

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import free_port, listening_sockets, processes_with, service_env, wait_for

from serve_app.ray_shell.launch import (
    FAST_SERVE_ENV,
    HAPROXY_FILES,
    RUN_VARIABLE,
    SIDE_PORTS,
    busy_ports,
    end_leftovers,
    front_environment,
    http_port,
    private_ray_token,
    processes_of_run,
    run,
    serve_run_command,
    tuned_environment,
)

REPO = Path(__file__).resolve().parents[1]


def test_without_a_config_file_the_service_stays_on_this_machine():
    command, temporary, _ = serve_run_command(["model=bundled:minilm", "gpu_fraction=0"])
    try:
        config = yaml.safe_load(temporary.read_text())
        assert command[-1] == str(temporary)
        # Not Ray's default: in HAProxy mode that is all interfaces.
        assert config["http_options"] == {"host": "127.0.0.1", "port": 8000}
        assert config["applications"][0]["import_path"] == "serve_app:build_app"
        assert config["applications"][0]["args"] == {"model": "bundled:minilm", "gpu_fraction": 0.0}
    finally:
        temporary.unlink()


def test_config_file_runs_as_it_is_without_overrides():
    command, temporary, _ = serve_run_command(["serve_config.yaml"])
    assert command[-1] == "serve_config.yaml" and temporary is None


def test_config_file_with_overrides_gets_a_checked_copy():
    command, temporary, _ = serve_run_command(["serve_config.yaml", "model=bundled:minilm", "port=8011"])
    try:
        config = yaml.safe_load(temporary.read_text())
        assert command[-1] == str(temporary)
        assert config["http_options"]["port"] == 8011
        args = config["applications"][0]["args"]
        assert args["model"] == "bundled:minilm"
        assert args["tasks"]["legal_search"].startswith("Given a legal question")  # kept
    finally:
        temporary.unlink()


def test_null_and_auto_on_the_command_line_unset_what_the_config_file_pins(tmp_path):
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    config["applications"][0]["args"].update(
        model_revision="0123456789abcdef0123456789abcdef01234567", gpu_fraction=0.5, max_replicas=2)
    path = tmp_path / "pinned.yaml"
    path.write_text(yaml.safe_dump(config))
    command, temporary, _ = serve_run_command([
        str(path), "model=bundled:minilm", "model_revision=null", "gpu_fraction=auto", "max_replicas=auto"])
    try:
        args = yaml.safe_load(temporary.read_text())["applications"][0]["args"]
        assert args["model"] == "bundled:minilm"
        assert not {"model_revision", "gpu_fraction", "max_replicas"} & set(args)  # their defaults
    finally:
        temporary.unlink()
    with pytest.raises(ValueError, match="dtype"):  # a setting whose auto is a word of its own
        serve_run_command(["serve_config.yaml", "dtype=automatic"])


def test_a_malformed_digest_beside_keys_stops_the_start_with_one_line(monkeypatch, capsys):
    from serve_app.ray_shell.launch import main

    monkeypatch.setenv("EMBED_API_KEYS", "alpha-key")
    monkeypatch.setenv("EMBED_API_KEY_DIGESTS", "alpha-key")  # a key where its digest goes
    for variable in SIDE_PORTS:  # set by the suite's own services: ports that may be taken
        monkeypatch.delenv(variable, raising=False)
    assert main(["model=bundled:minilm", f"port={free_port(side_ports=True)}"]) == 2
    assert capsys.readouterr().err == (
        "Error: EMBED_API_KEY_DIGESTS holds something that is not a hex SHA-256 digest.\n")


@pytest.mark.parametrize("address", [None, "auto", "http://127.0.0.1:8265"])
def test_the_service_starts_a_ray_of_its_own_even_beside_a_ray_start_cluster(address, monkeypatch, capsys):
    # `serve run` calls ray.init(), which joins the cluster a `ray start --head` left running
    # on this machine (the README starts one for batch jobs): the service would then run in
    # that cluster's environment, without this run's flags, ports, umask or stop.
    import serve_app.ray_shell.launch as launch

    given = {}
    monkeypatch.setattr(launch, "run", lambda command, env, started=None: given.update(env) or 0)
    for variable in SIDE_PORTS:  # set by the suite's own services: ports that may be taken
        monkeypatch.delenv(variable, raising=False)
    if address is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", address)
    assert launch.main(["model=bundled:minilm", f"port={free_port(side_ports=True)}"]) == 0
    assert given["RAY_ADDRESS"] == "local"  # ray.init("local"): a new cluster, whatever runs
    said = capsys.readouterr().err
    if address is None:
        assert "RAY_ADDRESS" not in said
    else:
        assert f"Note: RAY_ADDRESS={address} is left aside: this command starts a Ray of its own." in said


def test_a_bad_override_is_refused_before_anything_starts():
    with pytest.raises(ValueError, match="gpu_fraction"):
        serve_run_command(["serve_config.yaml", "gpu_fraction=3"])


def test_what_a_run_writes_is_this_users_alone(tmp_path):
    # Ray's token file, its session's files and the zygotes' logs are made by the run's
    # processes: with a shell's usual umask (022) every user of the machine could read them.
    written = tmp_path / "written-by-the-run"
    code = f"open({str(written)!r}, 'w').write('x')"
    handler = signal.getsignal(signal.SIGTERM)
    assert run([sys.executable, "-c", code], dict(os.environ)) == 0
    assert written.stat().st_mode & 0o777 == 0o600
    assert signal.getsignal(signal.SIGTERM) is handler  # run() puts the process's handlers back


def test_a_ray_token_left_readable_by_others_is_made_this_users_alone(tmp_path):
    token = tmp_path / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text("t")
    token.chmod(0o644)  # as Ray 2.60 writes it
    private_ray_token(tmp_path)
    assert token.stat().st_mode & 0o777 == 0o600


def test_haproxys_files_go_to_the_runs_private_folder_not_the_shared_tmp_one(tmp_path):
    base = tuned_environment({"PATH": os.environ["PATH"]})
    mine = Path(tempfile.mkdtemp(prefix="haproxy-"))  # as a run makes it
    try:
        env = front_environment(base, tmp_path, haproxy_files=mine)
    finally:
        mine.rmdir()
    assert {env[name] for name in HAPROXY_FILES} == {
        str(mine / "haproxy.cfg"), str(mine / "admin.sock"), str(mine), str(mine / "server-state"),
        str(mine / "metrics.sock")}
    deep = tmp_path / ("d" * 60)  # Ray's node id after it, HAProxy would refuse the socket's path
    assert not set(HAPROXY_FILES) & set(front_environment(base, tmp_path, haproxy_files=deep))


def test_tuned_environment_keeps_what_the_operator_set():
    env = tuned_environment({"RAY_SERVE_ENABLE_HA_PROXY": "0", "PATH": "/bin"})
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == FAST_SERVE_ENV["RAY_SERVE_THROUGHPUT_OPTIMIZED"]


def test_help_runs_without_ray():
    out = subprocess.run([sys.executable, "-m", "serve_app", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "python -m serve_app" in out.stdout


def test_side_ports_follow_the_service_port():
    assert {k: v for k, v in tuned_environment({}).items() if k in SIDE_PORTS} == {
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": "8500",  # Ray's defaults at Serve's default port
        "RAY_SERVE_HAPROXY_STATS_PORT": "8404",
        "RAY_SERVE_HAPROXY_METRICS_PORT": "9101",
    }
    second = tuned_environment({"RAY_SERVE_HAPROXY_STATS_PORT": "7000"}, port=8001)
    assert second["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"] == "8501"
    assert second["RAY_SERVE_HAPROXY_METRICS_PORT"] == "9102"
    assert second["RAY_SERVE_HAPROXY_STATS_PORT"] == "7000"  # the operator's value stays
    python_proxy = tuned_environment({"RAY_SERVE_ENABLE_HA_PROXY": "0"}, port=8001)
    assert not SIDE_PORTS.keys() & python_proxy.keys()


def test_http_port_comes_from_the_override_then_the_config_file(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"http_options": {"port": 8123}, "applications": []}))
    assert http_port([str(config)]) == 8123
    assert http_port([str(config), "port=8200"]) == 8200
    assert http_port(["model=bundled:minilm"]) == 8000


def test_port_without_a_config_file_goes_to_http_options_not_the_app():
    command, temporary, _ = serve_run_command(["model=bundled:minilm", "port=8011"])
    try:
        config = yaml.safe_load(temporary.read_text())
        assert command[-1] == str(temporary)
        assert config["http_options"] == {"host": "127.0.0.1", "port": 8011}
        assert config["applications"][0]["import_path"] == "serve_app:build_app"
        assert config["applications"][0]["args"] == {"model": "bundled:minilm"}
    finally:
        temporary.unlink()



def test_tls_files_go_to_haproxy_or_else_to_rays_proxy(tmp_path):
    for name in ("cert.pem", "key.pem"):
        (tmp_path / name).write_text("-----BEGIN TEST-----\n")
    args = ["model=bundled:minilm", f"tls_certfile={tmp_path / 'cert.pem'}", f"tls_keyfile={tmp_path / 'key.pem'}"]
    # HAProxy ends TLS: the replicas behind it get no certificate.
    command, temporary, https = serve_run_command(args)
    try:
        config = yaml.safe_load(temporary.read_text())
        assert https == (str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"))
        assert "ssl_certfile" not in config["http_options"] and "ssl_keyfile" not in config["http_options"]
        assert "tls_certfile" not in config["applications"][0]["args"]
    finally:
        temporary.unlink()
    # Without HAProxy (RAY_SERVE_ENABLE_HA_PROXY=0), Ray's own proxy serves HTTPS.
    command, temporary, https = serve_run_command(args, haproxy_https=False)
    try:
        config = yaml.safe_load(temporary.read_text())
        assert https is None
        assert config["http_options"]["ssl_certfile"] == str(tmp_path / "cert.pem")
        assert config["http_options"]["ssl_keyfile"] == str(tmp_path / "key.pem")
    finally:
        temporary.unlink()
    assert tuned_environment({"RAY_SERVE_ENABLE_HA_PROXY": "1"}, ray_proxy=True)["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    assert tuned_environment({})["RAY_SERVE_ENABLE_HA_PROXY"] == "1"


def test_tls_files_that_cannot_work_stop_the_start_with_a_sentence(tmp_path):
    (tmp_path / "cert.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    (tmp_path / "key.der").write_bytes(b"\x30\x82binary")
    cases = {
        "needs both tls_certfile and tls_keyfile": [f"tls_certfile={tmp_path / 'cert.pem'}"],
        "Cannot read ssl_keyfile": [f"tls_certfile={tmp_path / 'cert.pem'}", f"tls_keyfile={tmp_path / 'nope.pem'}"],
        "is not a PEM file": [f"tls_certfile={tmp_path / 'cert.pem'}", f"tls_keyfile={tmp_path / 'key.der'}"],
    }
    for message, overrides in cases.items():
        with pytest.raises(ValueError, match=message):
            serve_run_command(["model=bundled:minilm", *overrides])

def test_busy_ports_are_named():
    # Every port in play comes from below the ephemeral range (free_port), so only the one
    # this test takes can be busy: a port derived from an ephemeral one could be any
    # connection's, as it once was in CI.
    port = free_port(side_ports=True)
    env = tuned_environment({}, port=port)
    stats = int(env["RAY_SERVE_HAPROXY_STATS_PORT"])
    assert busy_ports(env, port) == []
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", stats))
        taken.listen()
        busy = busy_ports(env, port)
    assert busy == [f"port {stats}, for HAProxy's statistics page (RAY_SERVE_HAPROXY_STATS_PORT)"]


def test_a_second_instance_on_a_taken_port_stops_with_a_sentence():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "serve_app", "model=bundled:minilm", f"port={port}"],
            capture_output=True, text=True, timeout=60,
        )
    assert out.returncode == 2
    assert f"already in use: port {port}, for the service" in out.stderr
    assert "Traceback" not in out.stderr


def launch(*args: str, timeout_s: float = 60, **env: str) -> subprocess.CompletedProcess:
    """`python -m serve_app ARGS` to its end, with `env` added to the tests' environment;
    one still running after `timeout_s` is stopped (Ctrl-C) and fails the test."""
    service = subprocess.Popen(
        [sys.executable, "-m", "serve_app", *args], env=service_env(**env),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        out, err = service.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        service.send_signal(signal.SIGINT)
        out, err = service.communicate(timeout=120)
        pytest.fail(f"still running after {timeout_s} s; its last output: {err[-1500:]}")
    return subprocess.CompletedProcess(service.args, service.returncode, out, err)


def config_file(tmp_path: Path, edit) -> Path:
    """serve_config.yaml with the bundled model on a free port, changed by `edit(config, args)`."""
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    config["http_options"]["port"] = free_port(side_ports=True)
    args = config["applications"][0]["args"]
    args["model"] = "bundled:minilm"
    edit(config, args)
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def test_a_misspelt_setting_in_the_config_file_stops_the_start_with_one_line(tmp_path):
    path = config_file(tmp_path, lambda _, args: args.update(max_input_tokenz=args.pop("max_input_tokens")))
    out = launch(str(path))
    assert out.returncode == 2
    assert one_line(out.stderr) == (
        "Error: 'max_input_tokenz' is not a setting (did you mean 'max_input_tokens'?), in "
        f"application 'embeddings' in {path}. The settings are those of "
        "serve_app.core.config.AppArgs; the README's Configuration section lists them."
    )


@pytest.mark.parametrize(
    "broken, expected",
    [
        ("yaml", "is not valid YAML at line 3, column 1: expected ',' or ']'"),
        ("import_path", "import_path 'serve_ap:build_app' names a module Python cannot find here"),
        ("model", "Cannot load model '/no/such/model'"),
        ("value", "gpu_fraction: Input should be less than or equal to 1 (got 3), in application"),
    ],
)
def test_a_config_file_that_cannot_start_stops_the_start_with_one_line(tmp_path, broken, expected):
    edits = {
        "import_path": lambda config, _: config["applications"][0].update(import_path="serve_ap:build_app"),
        "model": lambda _, args: args.update(model="/no/such/model"),
        "value": lambda _, args: args.update(gpu_fraction=3),
    }
    path = config_file(tmp_path, edits.get(broken, lambda *_: None))
    if broken == "yaml":
        path.write_text("applications:\n  - name: [embeddings\n")
    out = launch(str(path))
    assert out.returncode == 2
    assert expected in one_line(out.stderr)


def test_a_hub_model_whose_weights_this_machine_cannot_get_stops_the_start_with_one_line(
        tmp_path, hub_cache, tiny_qwen3_dir):
    # Its config files are cached (enough to read the model), its weights are not, and the
    # hub is out of reach: no replica could ever load it, so nothing starts.
    hub_cache("acme/tiny-qwen3", "f" * 40, tiny_qwen3_dir, skip=["*.safetensors"])
    path = config_file(tmp_path, lambda _, args: args.update(model="acme/tiny-qwen3"))
    out = launch(str(path), HF_HUB_CACHE=str(hub_cache.root))
    assert out.returncode == 2
    line = one_line(out.stderr)
    assert line.startswith("Error: Cannot load model 'acme/tiny-qwen3' at revision ffffffffffff")
    assert "lacks its weights (model.safetensors)" in line


def test_the_start_pins_a_hub_model_to_the_revision_it_fetched(hub_cache, tiny_qwen3_dir):
    # serve run's app builder resolves the model again: pinned, it cannot find a newer main.
    from serve_app.ray_shell.preflight import prepare_models

    hub_cache("acme/tiny-qwen3", "a" * 40, tiny_qwen3_dir)
    ours = {"import_path": "serve_app:build_app"}
    data = {"applications": [{**ours, "args": {"model": "acme/tiny-qwen3"}},
                             {**ours, "name": "b", "args": {"model": "bundled:minilm"}}]}
    assert prepare_models(data) is True
    assert data["applications"][0]["args"]["model_revision"] == "a" * 40
    assert "model_revision" not in data["applications"][1]["args"]
    assert prepare_models(data) is False  # already pinned: nothing to rewrite


def test_what_a_run_leaves_behind_is_ended_and_nothing_else():
    token = secrets.token_hex(8)
    # In their own sessions, as the HAProxy in a Ray worker's: no signal to ours reaches them.
    stubborn = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "print('ignoring SIGTERM', flush=True); time.sleep(300)")
    left = subprocess.Popen([sys.executable, "-c", stubborn], start_new_session=True,
                            env={**os.environ, RUN_VARIABLE: token}, stdout=subprocess.PIPE)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"],
                             start_new_session=True, env={**os.environ, RUN_VARIABLE: token + "0"})
    try:
        assert left.stdout.readline() == b"ignoring SIGTERM\n"
        assert processes_of_run(token) == [left.pid]
        assert end_leftovers(token, grace_s=1) == [left.pid]
        assert left.wait(timeout=10) == -signal.SIGKILL  # it ignored SIGTERM
        assert other.poll() is None
    finally:
        left.kill()
        other.kill()
        other.wait()


def wait_until_serving(service: subprocess.Popen, port: int, timeout_s: float = 180) -> None:
    def answers() -> bool:
        assert service.poll() is None, "the service stopped during start-up"
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(answers, timeout_s, f"the service to answer on port {port}", interval_s=1)


def answers_until_serving(service: subprocess.Popen, port: int, timeout_s: float = 180,
                          key: str | None = None) -> list[httpx.Response]:
    """Every HTTP answer to a one-text embeddings request (with `key`, if given), sent again
    and again from the start, up to and including the first 200."""
    answers = []
    headers = {"Authorization": f"Bearer {key}"} if key else {}

    def served() -> bool:
        assert service.poll() is None, "the service stopped during start-up"
        try:
            reply = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"input": "hi"}, timeout=30,
                               headers=headers)
        except httpx.HTTPError:  # not listening yet, or held while the replica starts
            return False
        answers.append(reply)
        return reply.status_code == 200

    wait_for(served, timeout_s, f"the service to answer on port {port}", interval_s=0.1)
    return answers


@pytest.mark.ray
@pytest.mark.slow
def test_the_start_command_answers_503_until_ready_says_where_serves_on_loopback_and_stops_on_sigterm_soon(
        tmp_path):
    port = free_port(side_ports=True)
    started_at = time.time()
    env = service_env()
    del env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"]  # the service's own drain
    key = f"launch-key-{secrets.token_hex(8)}"
    env["EMBED_API_KEYS"] = key
    log = tmp_path / "stderr.log"
    service = subprocess.Popen(
        [sys.executable, "-m", "serve_app", "model=bundled:minilm", f"port={port}"],
        env=env,
        # As a shell starts a background job: SIGINT ignored, which the child inherits.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        stdout=subprocess.DEVNULL, stderr=log.open("wb"),
    )
    try:
        answers = answers_until_serving(service, port, key=key)
        # The key reached the app as its digest only: no process the launcher started holds it.
        assert processes_with("EMBED_API_KEYS", key) == [service.pid]
        assert httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"input": "hi"}, timeout=30).status_code == 401
        # Before the application is deployed: 503 "starting" in the envelope, never a 404.
        assert len(answers) >= 2, "no answer came before the service was ready"
        for reply in answers[:-1]:
            assert (reply.status_code, reply.json()["error"]["code"]) == (503, "starting"), reply.text
            assert reply.headers["retry-after"] and reply.headers["x-request-id"]
        assert answers[-1].status_code == 200
        # Among Ray's lines, one says where the service is and who may reach it.
        ready = f"Ready: http://127.0.0.1:{port}/v1 answers OpenAI embedding requests for bundled:minilm."
        wait_for(lambda: ready in log.read_text(errors="replace"), 30, "the ready line")
        assert log.read_text(errors="replace").count("Ready: ") == 1
        assert "Who can reach it: this machine only (host 127.0.0.1)" in log.read_text(errors="replace")
        # Only on loopback (Ray's default in this mode would be every interface).
        # HAProxy's statistics page and metrics too (Ray binds them to every interface)...
        listening = listening_sockets()
        for where in (port, port + 404, port + 1101):
            assert {a for a, p in listening if p == where} == {"127.0.0.1"}, where
        # ...and its admin socket is this user's alone, in the run's private folder.
        # This run's: written since the test began, binding this very port (a machine's /tmp
        # keeps other runs' folders, whose ports may be this one or begin with its digits).
        binds = re.compile(rf"\bbind 127\.0\.0\.1:{port}\b")
        sockets = [s for s in Path(tempfile.gettempdir()).glob("haproxy-*/*/admin.sock")
                   if s.lstat().st_mtime >= started_at and binds.search((s.parent / "haproxy.cfg").read_text())]
        assert len(sockets) == 1 and sockets[0].stat().st_mode & 0o777 == 0o600
        assert sockets[0].parent.parent.name != "haproxy-serve"  # Ray's folder, shared by every user
        service.send_signal(signal.SIGTERM)
        # Serve's default 30 s drain of the ingress made a stop take 34 s; with the
        # service's 5 s it takes about 12 s on 2 cores (30: room for a loaded machine).
        assert service.wait(timeout=30) == 0
    finally:
        if service.poll() is None:
            service.kill()
    with pytest.raises(httpx.ConnectError):  # HAProxy went with it
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)


class Terminal:
    """A pseudo-terminal that a command runs in as its session's controlling terminal, as
    in a terminal window; `close()` hangs it up, as closing the window does."""

    def __init__(self) -> None:
        self.fd, self.tty = os.openpty()
        self.output = bytearray()
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._drain, daemon=True)

    def popen(self, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        import fcntl
        import termios

        process = subprocess.Popen(
            command, env=env, stdin=self.tty, stdout=self.tty, stderr=self.tty,
            start_new_session=True, preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )
        os.close(self.tty)
        self._reader.start()
        return process

    def _drain(self) -> None:  # a full terminal would block the command's writes
        import select

        while not self._closed.is_set():
            if select.select([self.fd], [], [], 0.1)[0]:
                try:
                    self.output += os.read(self.fd, 65536)
                except OSError:
                    return

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._reader.join()
            os.close(self.fd)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigterm_to_its_process_group", "its_terminal_closing"])
def test_every_port_the_service_opened_is_free_after_it_stops(how):
    port = free_port(side_ports=True)
    ports = tuned_environment({}, port=port)  # the service's and Ray's side ports
    # Every process of this start (Ray's, HAProxy) inherits the variable: what is left shows.
    test_run = secrets.token_hex(8)
    command = [sys.executable, "-m", "serve_app", "model=bundled:minilm", f"port={port}"]
    if how == "sigterm_to_its_process_group":
        command.append("host=0.0.0.0")  # and, while it runs, only HAProxy listens there
    env = service_env(SHEET_EMBEDDINGS_TEST_RUN=test_run)
    terminal = Terminal() if how == "its_terminal_closing" else None
    if terminal is not None:
        service = terminal.popen(command, env)
    else:  # its own process group, as a process manager starts a service
        service = subprocess.Popen(command, env=env, start_new_session=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_serving(service, port)
        if "host=0.0.0.0" in command:
            # Ray binds its replicas' HTTP ports and its fallback proxy to the service's host:
            # plain HTTP to the network, also when HAProxy serves HTTPS. They stay on loopback.
            listeners = listening_sockets(processes_with("SHEET_EMBEDDINGS_TEST_RUN", test_run))
            assert ("0.0.0.0", port) in listeners
            behind = {(a, p) for a, p in listeners if 30000 <= p <= 31000 or p == port + 500}
            assert len(behind) >= 2 and {a for a, _ in behind} == {"127.0.0.1"}, behind
        if terminal is not None:
            terminal.close()  # the terminal sends SIGHUP
        else:
            os.killpg(service.pid, signal.SIGTERM)  # the launcher, serve run, Ray's daemons
        stopped = service.wait(timeout=120)
        wait_for(lambda: not processes_with("SHEET_EMBEDDINGS_TEST_RUN", test_run), 60,
                 "every process of the service to end")
        assert busy_ports(ports, port) == []
        if terminal is None:  # Serve's own shutdown, as on SIGTERM to the launcher alone
            assert stopped == 0
    finally:
        if terminal is not None:
            terminal.close()
        for pid in processes_with("SHEET_EMBEDDINGS_TEST_RUN", test_run):
            os.kill(pid, signal.SIGKILL)
