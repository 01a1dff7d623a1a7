"""Faults on the real Ray Serve app: a killed model replica, overload, metrics. (A redeploy
under load is tested through `serve deploy` on both fronts, in test_serve_deploy.py.)

Traffic goes to 127.0.0.1 only, from a bounded number of client threads that
stop by themselves.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter

import httpx
import pytest
from loadgen import TEXTS, Load

pytestmark = [pytest.mark.ray, pytest.mark.slow]

def replica_pid(app: str) -> int:
    from ray import serve

    handle = serve.get_deployment_handle("Embedder", app_name=app)
    return handle.describe.remote().result(timeout_s=60)["pid"]


def test_killed_model_replica_loses_no_request(serve_cluster):
    url = serve_cluster.deploy("faults", min_replicas=1, max_replicas=1, cache_max_mb=0)
    first = replica_pid("faults")
    with Load(url) as load:
        serve_cluster.wait_for(lambda: load.total >= 20, 60, "steady load")
        os.kill(first, signal.SIGKILL)  # the model process dies mid-load
        killed_at = load.total
        serve_cluster.wait_for(lambda: replica_pid("faults") != first, 90, "a new replica")
        serve_cluster.wait_for(lambda: load.total >= killed_at + 40, 90, "load after the restart")
    assert load.failures == [], load.failures[:5]
    assert load.statuses[200] == load.total
    serve_cluster.delete("faults")


def test_overload_is_503_with_retry_after_and_recovers(serve_cluster):
    url = serve_cluster.deploy(
        "overload", min_replicas=1, max_replicas=1, max_ongoing_requests=1, max_queued_requests=1,
        cache_max_mb=0,
    )
    big = [f"{t} {t} {t} {t}" for t in TEXTS]  # slow requests keep the replica busy
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        response = httpx.post(f"{url}/v1/embeddings", json={"input": big[i % 8 :] + [f"req {i}"]}, timeout=120)
        with lock:
            results.append(response)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    statuses = Counter(r.status_code for r in results)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[503] >= 1 and statuses[200] >= 1, statuses
    refused = next(r for r in results if r.status_code == 503)
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "overloaded"
    # It recovers by itself: once the burst is over, requests succeed again.
    assert httpx.post(f"{url}/v1/embeddings", json={"input": ["after"]}, timeout=60).status_code == 200
    serve_cluster.delete("overload")


def test_metrics_reach_ray_prometheus_endpoint(serve_cluster):
    url = serve_cluster.deploy("metered", min_replicas=1)
    for _ in range(3):
        httpx.post(f"{url}/v1/embeddings", json={"input": ["metered text", "other text"]}, timeout=60)
    httpx.post(f"{url}/v1/embeddings", json={"input": ""}, timeout=60)

    def value(text: str, name: str, *labels: str) -> float:
        for line in text.splitlines():
            if line.startswith(name + "{") and 'application="metered"' in line and all(label in line for label in labels):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def scrape() -> str | None:
        # Ray's agents export on intervals of seconds: wait until this app's counts are in.
        text = httpx.get(f"http://127.0.0.1:{serve_cluster.metrics_port}/metrics", timeout=10).text
        # Each count this test asserts must be in: processes export on their own clocks.
        ready = (value(text, "ray_embed_requests_total", 'status="200"') >= 3
                 and value(text, "ray_embed_cache_hits_total") >= 4
                 and value(text, "ray_embed_cache_misses_total") >= 2
                 and value(text, "ray_embed_texts_total") >= 2
                 and value(text, "ray_embed_errors_total", 'status="400"') >= 1
                 and "ray_embed_batch_texts_bucket" in text and "ray_embed_cold_starts_total" in text)
        return text if ready else None

    text = serve_cluster.wait_for(scrape, 90, "this app's metrics in Prometheus format", interval_s=1)
    # Requests 2 and 3 were answered from the shared cache: 2 texts each.
    assert value(text, "ray_embed_cache_hits_total") == 4
    assert value(text, "ray_embed_cache_misses_total") == 2
    assert value(text, "ray_embed_texts_total") == 2
    assert value(text, "ray_embed_errors_total", 'code="invalid_request_error"', 'status="400"') == 1
    serve_cluster.delete("metered")


def test_the_death_cause_of_a_lost_replica_is_read_from_the_gcs(serve_cluster):
    """Over gRPC a replica's death reaches the ingress with no cause (ActorUnavailableError);
    RayBackend reads it from the GCS to tell a memory kill, which it must not resend."""
    import asyncio

    import ray
    from ray.exceptions import ActorUnavailableError

    from serve_app.ray_shell import transport

    @ray.remote(num_cpus=0)
    class Probe:
        def ping(self) -> int:
            return os.getpid()

    probe = Probe.remote()
    ray.get(probe.ping.remote())
    unreachable = ActorUnavailableError("Actor is unavailable.", probe._actor_id.binary())
    assert unreachable.actor_id == probe._actor_id.hex()
    assert asyncio.run(transport.death_cause(unreachable, 0.2)) == ""  # alive: only unreachable
    ray.kill(probe)
    cause = asyncio.run(transport.death_cause(unreachable, 10.0))
    assert "ray.kill" in cause and not transport._oom_cause(cause), cause
