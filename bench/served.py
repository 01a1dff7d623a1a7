"""The served app for the benchmarks: a local Ray, Serve in its production mode, one app."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def served_app(name: str, port: int, **args) -> Iterator[str]:
    """Start Ray and Serve on 127.0.0.1:`port`, run build_app(AppArgs(**args)) at /`name`; yield its URL."""
    import ray
    from ray import serve

    from serve_app.core.config import AppArgs
    from serve_app.ray_shell.app import build_app
    from serve_app.ray_shell.launch import tuned_environment

    # Set after Ray is imported, on purpose: the cluster started below (and so the app) gets
    # the tuned environment, while this driver keeps Ray's defaults, which its blocking
    # handle calls need (under the throughput profile a handle's router runs on the
    # caller's event loop). Ray's side ports follow the port.
    os.environ.update(tuned_environment(port=port))
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(AppArgs(**args)), name=name, route_prefix=f"/{name}")
        yield f"http://127.0.0.1:{port}/{name}"
    finally:
        serve.shutdown()
        ray.shutdown()
