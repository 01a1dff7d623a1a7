"""The HAProxy front (serve_app.ray_shell.haproxy_front): Ray's own configuration, rendered
from Ray's template as its HAProxy manager renders it, edited by us and run by the real
HAProxy binary that Ray uses, answering real HTTP(S) clients. No Ray cluster is started.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest
from conftest import free_port, listening_sockets, wait_for

from serve_app.ray_shell import haproxy_front
from serve_app.ray_shell.launch import front_environment, tuned_environment


def ray_config(directory: Path, port: int, routes: bool) -> Path:
    """The configuration Ray 2.60's HAProxy manager writes: before any application has a
    route, or with one application at /app (a replica address that nothing serves)."""
    from ray.serve._private.haproxy import BackendConfig, HAProxyApi, HAProxyConfig, ServerConfig
    from ray.serve.config import HTTPOptions

    config = HAProxyConfig(
        http_options=HTTPOptions(host="127.0.0.1", port=port),
        socket_path=str(directory / "admin.sock"), server_state_base=str(directory),
        server_state_file=str(directory / "state"), metrics_socket_path=str(directory / "metrics.sock"),
        stats_port=free_port(), metrics_port=free_port(),
    )
    api = HAProxyApi(cfg=config, config_file_path=str(directory / "haproxy.cfg"))
    if routes:
        api.set_backend_configs({"app": BackendConfig(
            name="app", path_prefix="/app", app_name="app",
            servers=[ServerConfig(name="r1", host="127.0.0.1", port=free_port())])})
    api._generate_config_file_internal()
    return directory / "haproxy.cfg"


@pytest.fixture
def run_haproxy(tmp_path):
    """Start HAProxy the way Ray does (its binary path from RAY_SERVE_HAPROXY_BINARY_PATH,
    here our front's script), wait until it answers; stopped afterwards."""
    started = []

    def start(config: Path, env: dict[str, str], base: str, verify=True) -> None:
        process = subprocess.Popen([env["RAY_SERVE_HAPROXY_BINARY_PATH"], "-db", "-f", str(config), "-dR"],
                                   env=env, stdout=subprocess.DEVNULL, stderr=(tmp_path / "stderr").open("w"))
        started.append(process)

        def answers() -> bool:
            assert process.poll() is None, (tmp_path / "stderr").read_text()
            try:
                httpx.get(base + "/health", timeout=2, verify=verify)
                return True
            except httpx.HTTPError:
                return False

        wait_for(answers, 30, "HAProxy to answer")

    yield start
    for process in started:
        process.kill()
        process.wait()


def front(tmp_path: Path, tls: tuple[str, str] | None = None) -> dict[str, str]:
    directory = tmp_path / "the front"  # a space, as a TMPDIR may have
    directory.mkdir()
    return front_environment(tuned_environment({"PATH": os.environ["PATH"]}), directory, tls)


def assert_envelope(reply: httpx.Response, status: int, code: str) -> dict:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == "application/json"
    body = reply.json()
    assert set(body) == {"error"} and body["error"]["code"] == code
    assert {"message", "type", "param", "code"} <= set(body["error"])
    return body["error"]


def test_a_service_still_starting_answers_503_with_retry_after_in_the_openai_envelope(tmp_path, run_haproxy):
    port = free_port()
    config = ray_config(tmp_path, port, routes=False)
    base = f"http://127.0.0.1:{port}"
    run_haproxy(config, front(tmp_path), base)

    reply = httpx.post(f"{base}/v1/embeddings", json={"input": "a lease"}, timeout=10)
    error = assert_envelope(reply, 503, "starting")
    assert "starting" in error["message"] and error["type"] == "service_unavailable_error"
    assert reply.headers["retry-after"] == str(haproxy_front.RETRY_AFTER_S)
    uuid.UUID(reply.headers["x-request-id"])  # a fresh id for a client that sent none
    # The client's own id comes back when it is sane, as the API does; else a fresh one.
    mine = httpx.get(f"{base}/health", headers={"X-Request-ID": "sheet-7:row-12"}, timeout=10)
    assert mine.status_code == 503 and mine.headers["x-request-id"] == "sheet-7:row-12"
    odd = httpx.get(f"{base}/v1/models", headers={"X-Request-ID": "a b<script>"}, timeout=10)
    assert odd.status_code == 503 and odd.headers["x-request-id"] != "a b<script>"
    uuid.UUID(odd.headers["x-request-id"])


def test_the_official_openai_client_reads_the_starting_answer(tmp_path, run_haproxy):
    import openai

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    run_haproxy(ray_config(tmp_path, port, routes=False), front(tmp_path), base)
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.APIStatusError) as caught:
        client.embeddings.create(model="m", input=["a lease"])
    assert caught.value.status_code == 503
    assert caught.value.code == "starting" and "starting" in caught.value.message


def test_once_an_application_has_a_route_an_unknown_path_is_404_in_the_envelope(tmp_path, run_haproxy):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    run_haproxy(ray_config(tmp_path, port, routes=True), front(tmp_path), base)
    reply = httpx.post(f"{base}/nowhere/v1/embeddings", json={"input": "x"}, timeout=10)
    assert_envelope(reply, 404, "not_found")
    assert "retry-after" not in reply.headers and reply.headers["x-request-id"]


def test_https_is_served_by_haproxy_with_the_same_answers(tmp_path, run_haproxy):
    from bench.certificates import make_certificate

    ca, cert, key, _ = make_certificate(tmp_path)
    port = free_port()
    base = f"https://127.0.0.1:{port}"
    env = front(tmp_path, (str(cert), str(key)))
    pem = Path(env[haproxy_front.CERTIFICATE_VARIABLE])
    assert pem.stat().st_mode & 0o077 == 0  # the key's copy is the user's alone
    trust = ssl.create_default_context(cafile=str(ca))
    run_haproxy(ray_config(tmp_path, port, routes=False), env, base, verify=trust)
    reply = httpx.post(f"{base}/v1/embeddings", json={"input": "a lease"}, verify=trust, timeout=10)
    assert_envelope(reply, 503, "starting")
    with pytest.raises(httpx.HTTPError):  # plain HTTP on the HTTPS port gets nothing
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)


def test_the_admin_socket_is_this_users_alone_and_the_side_ports_listen_where_the_service_does(
        tmp_path, run_haproxy):
    port = free_port()
    config = ray_config(tmp_path, port, routes=False)
    side = {}
    section = None
    for line in config.read_text().split("\n"):
        section = line.strip() if line and not line[0].isspace() else section
        if section in ("frontend prometheus", "listen stats") and line.strip().startswith("bind "):
            side[section] = int(line.split()[1].rsplit(":", 1)[1])
    assert set(side) == {"frontend prometheus", "listen stats"}
    run_haproxy(config, front(tmp_path), f"http://127.0.0.1:{port}")
    assert (tmp_path / "admin.sock").stat().st_mode & 0o777 == 0o600  # Ray asks for 666
    listening = listening_sockets()
    for name, where in [*side.items(), ("the service", port)]:
        assert {a for a, p in listening if p == where} == {"127.0.0.1"}, name  # Ray's sides: every interface


def test_edits_are_made_once_and_each_is_in_the_configuration(tmp_path):
    text = ray_config(tmp_path, free_port(), routes=False).read_text()
    edited, notes = haproxy_front.edit_config(text, "/etc/service/both.pem")
    assert notes == []
    assert "status 404" not in edited and "status 503" in edited
    assert 'ssl crt "/etc/service/both.pem"' in edited
    assert "http-request set-header X-Forwarded-Proto https" in edited
    assert haproxy_front.edit_config(edited, "/etc/service/both.pem") == (edited, [])
    # The host asked for (Ray's own is loopback then): the public bind alone listens there,
    # HTTPS on it, and the side ports follow it.
    port = free_port()
    opened, _ = haproxy_front.edit_config(ray_config(tmp_path, port, routes=False).read_text(),
                                          "/etc/service/both.pem", "0.0.0.0")
    assert f'bind 0.0.0.0:{port} ssl crt "/etc/service/both.pem"' in opened
    assert "bind 127.0.0.1:" not in opened


def test_a_template_without_the_lines_is_left_as_it_is_with_a_note():
    text = "global\n    daemon\nfrontend other\n    bind :1\n"
    edited, notes = haproxy_front.edit_config(text, "/x.pem")
    assert edited == text
    assert len(notes) == 3 and "admin socket" in notes[0] and "HTTPS not set up" in notes[1]
    assert "404 rule" in notes[2]


def test_the_front_script_execs_the_real_binary_with_the_edited_file(tmp_path):
    config = ray_config(tmp_path, free_port(), routes=False)
    env = front(tmp_path)
    checked = subprocess.run([env["RAY_SERVE_HAPROXY_BINARY_PATH"], "-c", "-f", str(config)],
                             env=env, capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    assert "status 503" in config.read_text()
    assert env[haproxy_front.REAL_BINARY_VARIABLE] != env["RAY_SERVE_HAPROXY_BINARY_PATH"]


def test_ray_proxy_mode_is_left_alone(tmp_path):
    env = tuned_environment({"RAY_SERVE_ENABLE_HA_PROXY": "0"})
    assert front_environment(env, tmp_path) == env


def test_a_front_set_up_twice_still_runs_the_real_binary(tmp_path):
    """An environment that already has a front (a service started from another's shell)
    must not make the front exec itself."""
    first = front(tmp_path)
    (tmp_path / "again").mkdir()
    second = front_environment(first, tmp_path / "again")
    assert second[haproxy_front.REAL_BINARY_VARIABLE] == first[haproxy_front.REAL_BINARY_VARIABLE]
    config = ray_config(tmp_path, free_port(), routes=False)
    checked = subprocess.run([second["RAY_SERVE_HAPROXY_BINARY_PATH"], "-c", "-f", str(config)],
                             env=second, capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
