"""Text embeddings over HTTP on Ray Serve: `serve run serve_app:build_app`."""

from __future__ import annotations


def __getattr__(name: str):
    # Lazy, so `import serve_app.core.config` (the batch job, the tests) does not pull in Ray Serve.
    if name == "build_app":
        from serve_app.ray_shell.app import build_app

        return build_app
    raise AttributeError(f"module 'serve_app' has no attribute {name!r}")
