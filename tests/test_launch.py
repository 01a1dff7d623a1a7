"""`python -m serve_app`: the command it runs and the environment it runs it in."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from serve_app.launch import (
    FAST_SERVE_ENV,
    SIDE_PORTS,
    busy_ports,
    http_port,
    serve_run_command,
    tuned_environment,
)


def test_without_a_config_file_the_service_stays_on_this_machine():
    command, temporary = serve_run_command(["model=bundled:minilm", "gpu_fraction=0"])
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
    command, temporary = serve_run_command(["serve_config.yaml"])
    assert command[-1] == "serve_config.yaml" and temporary is None


def test_config_file_with_overrides_gets_a_checked_copy():
    command, temporary = serve_run_command(["serve_config.yaml", "model=bundled:minilm", "port=8011"])
    try:
        config = yaml.safe_load(temporary.read_text())
        assert command[-1] == str(temporary)
        assert config["http_options"]["port"] == 8011
        args = config["applications"][0]["args"]
        assert args["model"] == "bundled:minilm"
        assert args["tasks"]["legal_search"].startswith("Given a legal question")  # kept
    finally:
        temporary.unlink()


def test_a_bad_override_is_refused_before_anything_starts():
    with pytest.raises(ValueError, match="gpu_fraction"):
        serve_run_command(["serve_config.yaml", "gpu_fraction=3"])


def test_tuned_environment_keeps_what_the_operator_set():
    env = tuned_environment({"RAY_SERVE_ENABLE_HA_PROXY": "0", "PATH": "/bin"})
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == FAST_SERVE_ENV["RAY_SERVE_THROUGHPUT_OPTIMIZED"]


def test_help_runs_without_ray():
    out = subprocess.run([sys.executable, "-m", "serve_app", "--help"], capture_output=True, text=True)
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
    command, temporary = serve_run_command(["model=bundled:minilm", "port=8011"])
    try:
        config = yaml.safe_load(temporary.read_text())
        assert command[-1] == str(temporary)
        assert config["http_options"] == {"host": "127.0.0.1", "port": 8011}
        assert config["applications"][0]["import_path"] == "serve_app:build_app"
        assert config["applications"][0]["args"] == {"model": "bundled:minilm"}
    finally:
        temporary.unlink()


def test_busy_ports_are_named():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = tuned_environment({"RAY_SERVE_HAPROXY_STATS_PORT": str(port)}, port=port - 404)
        busy = busy_ports(env, port - 404)
    assert busy == [f"port {port}, for HAProxy's statistics page (RAY_SERVE_HAPROXY_STATS_PORT)"]


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


@pytest.mark.ray
@pytest.mark.slow
def test_the_start_command_serves_on_loopback_and_stops_on_sigterm_from_a_background_shell():
    import os
    import signal
    import time

    import httpx
    from conftest import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_SERVE_", "RAY_ADDRESS"))}
    service = subprocess.Popen(
        [sys.executable, "-m", "serve_app", "model=bundled:minilm", f"port={port}"],
        env={**env, "HF_HUB_OFFLINE": "1"},
        # As a shell starts a background job: SIGINT ignored, which the child inherits.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert service.poll() is None, "the service stopped during start-up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "no answer within 180 s"
            time.sleep(1)
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"input": "hi"}, timeout=60)
        assert reply.status_code == 200
        # Only on loopback (Ray's default in this mode would be every interface).
        rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
        listening = {row[1] for row in rows if row[3] == "0A"}  # state LISTEN
        assert f"0100007F:{port:04X}" in listening
        assert f"00000000:{port:04X}" not in listening
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=90) == 0
    finally:
        if service.poll() is None:
            service.kill()
    with pytest.raises(httpx.ConnectError):  # HAProxy went with it
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
