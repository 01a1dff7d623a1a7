"""The line `python -m serve_app` prints once the service answers (serve_app/ray_shell/announce.py)."""

import http.server
import socket
import subprocess
import sys

import pytest
from conftest import serve_in_background, wait_for

from serve_app.ray_shell.announce import announce_when_ready, ready_message


def config(host="127.0.0.1", **args) -> dict:
    app = {"name": "embeddings", "route_prefix": "/", "import_path": "serve_app:build_app",
           "args": {"model": "bundled:minilm", **args}}
    return {"http_options": {"host": host, "port": 8000}, "applications": [app]}


def test_on_loopback_it_says_the_address_this_machine_only_and_how_to_open_it():
    text = ready_message(config(), 8000, False, {"model": "bundled:minilm", "api_keys": False})
    assert "Ready: http://127.0.0.1:8000/v1 answers OpenAI embedding requests for bundled:minilm." in text
    assert "this machine only (host 127.0.0.1); no API key is asked for" in text
    assert "host=0.0.0.0 opens it to other PCs" in text
    assert "EMBED_SERVER_URL=http://127.0.0.1:8000 " in text
    assert "http://127.0.0.1:8000/excel/manifest.xml" in text


def test_a_config_file_that_names_no_host_is_announced_on_every_interface_as_ray_binds_it():
    unnamed = config()
    del unnamed["http_options"]["host"]
    text = ready_message(unnamed, 8000, False, {"model": "bundled:minilm", "api_keys": False})
    assert "other machines too (host 0.0.0.0)" in text and "this machine only" not in text


def test_on_every_interface_it_names_this_host_and_warns_when_no_key_is_asked_for():
    without = ready_message(config("0.0.0.0"), 8001, False, {"model": "m", "api_keys": False})
    assert f"http://{socket.gethostname()}:8001/v1" in without
    assert "other machines too (host 0.0.0.0); no API key is asked for: anyone who can reach" in without
    keyed = ready_message(config("0.0.0.0"), 8001, True, {"model": "m", "api_keys": True})
    assert keyed.splitlines()[1].startswith("Ready: https://")
    assert "an API key is required (EMBED_API_KEYS)." in keyed and "anyone" not in keyed


def test_it_says_whether_the_model_scales_to_zero_and_after_how_long():
    idle = ready_message(config(idle_timeout_s=120), 8000, False, {"model": "m"})
    assert "loads on the first request (seconds) and unloads after 120 s without one" in idle
    kept = ready_message(config(min_replicas=1), 8000, False, {"model": "m"})
    assert "stays loaded (1 replica(s) at least" in kept and "unloads" not in kept


def test_a_route_prefix_is_part_of_every_address():
    data = config()
    data["applications"][0]["route_prefix"] = "/embed/"
    text = ready_message(data, 8000, False, {"model": "m"})
    assert "http://127.0.0.1:8000/embed/v1 " in text
    assert "EMBED_SERVER_URL=http://127.0.0.1:8000/embed " in text


class Health(http.server.BaseHTTPRequestHandler):
    """503 "starting" for the first two requests, then /health's 200: the model replica
    starting for two more, then running."""

    asked: list[str] = []

    def do_GET(self):
        Health.asked.append(self.path)
        up = len(Health.asked) > 2
        replicas = "1 running" if len(Health.asked) > 4 else "1 starting"
        body = (b'{"status": "ok", "model": "from-health", "api_keys": false, "replicas": "%s"}'
                % replicas.encode()) if up else b"{}"
        self.send_response(200 if up else 503)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def health_server():
    Health.asked = []
    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    serve_in_background(server)
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_it_is_printed_once_when_health_first_answers_200(health_server, capsys):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        thread = announce_when_ready(child, config(), health_server, False, interval_s=0.05)
        thread.join(timeout=30)
        assert not thread.is_alive()
    finally:
        child.kill()
        child.wait()
    err = capsys.readouterr().err
    assert err.count("Ready: ") == 1
    assert f"http://127.0.0.1:{health_server}/v1 answers OpenAI embedding requests for from-health." in err
    assert Health.asked == ["/health"] * 3  # two 503s, then the 200


def test_a_model_kept_loaded_is_waited_for_before_it_is_printed(health_server, capsys):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        thread = announce_when_ready(child, config(min_replicas=1), health_server, False, interval_s=0.05)
        thread.join(timeout=30)
        assert not thread.is_alive()
    finally:
        child.kill()
        child.wait()
    assert capsys.readouterr().err.count("Ready: ") == 1
    assert len(Health.asked) == 5  # two 503s, two 200s with the replica starting, one running


def test_nothing_is_printed_when_the_service_ends_before_it_answers(capsys):
    with socket.socket() as held:  # bound, never listening: refused
        held.bind(("127.0.0.1", 0))
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        thread = announce_when_ready(child, config(), held.getsockname()[1], False, interval_s=0.05)
        wait_for(lambda: not thread.is_alive(), 30, "the watcher to give up")
    child.wait()
    assert "Ready" not in capsys.readouterr().err


def test_a_config_of_other_applications_only_gets_no_announcement():
    data = config()
    data["applications"][0]["import_path"] = "someone_else:app"
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    assert announce_when_ready(child, data, 8000, False) is None
    child.wait()
