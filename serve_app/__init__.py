"""Text embeddings over HTTP on Ray Serve: `serve run serve_app:build_app`."""

from __future__ import annotations


def __getattr__(name: str):
    # Lazy, so `import serve_app.config` (the batch job, the tests) does not pull in Ray Serve.
    if name == "build_app":
        from serve_app.deployments import build_app

        return build_app
    raise AttributeError(f"module 'serve_app' has no attribute {name!r}")
