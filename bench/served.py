"""The served app for the benchmarks: a local Ray, Serve in its production mode, one app."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def served_app(name: str, port: int, **args) -> Iterator[str]:
    """Start Ray and Serve on 127.0.0.1:`port`, run build_app(AppArgs(**args)) at /`name`; yield its URL."""
    import ray
    from ray import serve

    from serve_app.core.config import AppArgs
    from serve_app.ray_shell.app import build_app

    # Set after Ray is imported, on purpose: the cluster started below (and so the app) gets
    # the tuned environment, while this driver keeps Ray's defaults, which its blocking
    # handle calls need (under the throughput profile a handle's router runs on the
    # caller's event loop). Ray's side ports follow the port.
    os.environ.update(bench_environment(port))
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(AppArgs(**args)), name=name, route_prefix=f"/{name}")
        print(f"the replica's fast paths: {'; '.join(wait_for_speed_up(name)['speed_up'])}", flush=True)
        yield f"http://127.0.0.1:{port}/{name}"
    finally:
        serve.shutdown()
        ray.shutdown()


def bench_environment(port: int) -> dict[str, str]:
    """This process's environment with the service's tuned Ray settings for `port`, but a 1 s
    drain of a stopping ingress (the service's is 5 s, Serve's 30 s): a benchmark's app takes
    no traffic when it is deleted, and each delete and the shut-down wait out the drain."""
    from serve_app.ray_shell.launch import tuned_environment

    drain = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}
    return tuned_environment({**drain, **os.environ}, port=port)


def wait_for_speed_up(app: str, timeout_s: float = 120.0) -> dict:
    """Wait until the app's replica has turned on its CPU fast paths (it does so in the
    background once ready, serving meanwhile on the plain ones); its describe() then, whose
    "speed_up" says what it did, a sentence each."""
    from ray import serve

    handle = serve.get_deployment_handle("Embedder", app_name=app)
    deadline = time.monotonic() + timeout_s
    while True:
        described = handle.describe.remote().result(timeout_s=30)
        if described["speed_up"] is not None:
            return described
        if described["failure"]:
            raise SystemExit(described["failure"])
        if time.monotonic() > deadline:
            raise SystemExit(f"the served replica had not turned on its fast paths after {timeout_s:.0f} s")
        time.sleep(0.2)
