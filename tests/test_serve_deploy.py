"""`serve deploy` of an edited config under load, through the CLI and Ray's REST API."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import BUNDLED, free_port, wait_for
from loadgen import Load
from rayhead import RayHead

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def serve_config(port: int, **args) -> dict:
    return {
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": "embeddings",
            "route_prefix": "/",
            "import_path": "serve_app:build_app",
            "args": {"model": BUNDLED, "gpu_fraction": 0.0, "min_replicas": 1, "max_replicas": 1, **args},
        }],
    }


def serve_deploy(head: RayHead, config: Path) -> None:
    done = subprocess.run(
        [str(Path(sys.executable).with_name("serve")), "deploy", str(config),
         "-a", f"http://127.0.0.1:{head.dashboard_port}"],
        env=head.env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]


def max_input_tokens(url: str) -> int | None:
    try:
        return httpx.get(f"{url}/v1/models", timeout=5).json()["data"][0]["max_input_tokens"]
    except (httpx.HTTPError, KeyError, ValueError):
        return None


def ingress_replicas(head: RayHead) -> int | None:
    """How many replicas the app's ingress has, stopping ones included (Ray's REST API)."""
    try:
        details = httpx.get(f"http://127.0.0.1:{head.dashboard_port}/api/serve/applications/",
                            headers=head.headers, timeout=5).json()
        return len(details["applications"]["embeddings"]["deployments"]["Ingress"]["replicas"])
    except (httpx.HTTPError, KeyError, ValueError):
        return None


def proxy_env(proxy: str, port: int) -> dict[str, str]:
    """Serve's flags for each front: Ray's Python proxy, or what `python -m serve_app` sets up
    for a service on `port` (its side ports follow it, so the session's cluster is not hit)."""
    if proxy == "python":
        return {}
    from serve_app.ray_shell.launch import tuned_environment

    return tuned_environment({}, port=port)


@pytest.mark.parametrize("proxy", ["python", "haproxy"])
def test_serve_deploy_of_an_edited_config_under_load_fails_nothing(proxy, tmp_path_factory):
    # A short temp dir: Unix socket paths have a length limit.
    port = free_port(side_ports=True)
    head = RayHead(tmp_path_factory.mktemp("rh"), serve_env=proxy_env(proxy, port))
    try:
        url = f"http://127.0.0.1:{port}"
        config = tmp_path_factory.mktemp("config") / "serve_config.yaml"
        config.write_text(yaml.safe_dump(serve_config(port, max_input_tokens=256)))
        serve_deploy(head, config)
        wait_for(lambda: max_input_tokens(url) == 256, 180, "the first version to answer")

        with Load(url, clients=3) as load:
            wait_for(lambda: load.total >= 15, 60, "steady load")
            config.write_text(yaml.safe_dump(serve_config(port, max_input_tokens=128)))  # the edit
            serve_deploy(head, config)
            wait_for(lambda: max_input_tokens(url) == 128, 180, "the edited version to answer")
            # Past the old ingress's drain and stop, which HAProxy must have let go of by then.
            wait_for(lambda: ingress_replicas(head) == 1, 120, "the old ingress replica to stop")
            after = load.total
            wait_for(lambda: load.total >= after + 20, 60, "load on the edited version")
        assert load.failures == [], load.failures[:5]
        assert load.statuses[200] == load.total >= 35
    finally:
        head.stop()
