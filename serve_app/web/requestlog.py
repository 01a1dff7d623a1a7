"""Per-request id, log line and metrics, as pure ASGI middleware.

Each request gets an id (the client's `X-Request-ID` when it sends a sane one,
else a new one), echoed in the response's `X-Request-ID`. One log line per
request says its id, route, status, number of texts and time; the texts
themselves are never logged (users embed confidential legal and customer text).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid

# Under "ray.serve" so that in a replica Ray Serve's handlers (log files, level INFO) take it.
logger = logging.getLogger("ray.serve.embeddings.requests")

REQUEST_ID_HEADER = b"x-request-id"
# A client's id is echoed only if it matches (the HAProxy front applies the same rule).
SANE_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
_SANE_ID = re.compile(SANE_ID_PATTERN.encode())
KNOWN_ROUTES = ("/v1/embeddings", "/v1/similarity", "/v1/models", "/health", "/openapi.json")
# The OpenAI paths without /v1 (a client whose base_url lacks it) are the same endpoints.
ALIASES = {"/embeddings": "/v1/embeddings", "/models": "/v1/models"}
# nginx's convention: the client went away before the answer (Serve cancels the handler).
CLIENT_CLOSED = 499


class RequestMiddleware:
    """Tags, times, counts and logs every HTTP request."""

    def __init__(self, app, metrics=None, log_requests: bool = True) -> None:
        self.app = app
        self.metrics = metrics
        self.log_requests = log_requests

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _request_id(scope)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status, answered = 500, False

        async def send_with_id(message) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status, answered = message["status"], True
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER, request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            if not answered:  # the client left first: not a server error
                status = CLIENT_CLOSED
                state.setdefault("error_code", "client_closed_request")
            raise
        finally:
            self._finish(scope, state, request_id, status, time.perf_counter() - started)

    def _finish(self, scope, state: dict, request_id: str, status: int, seconds: float) -> None:
        route = route_of(scope)
        if self.metrics is not None:
            self.metrics.inc("embed_requests_total", route=route, status=str(status))
            self.metrics.observe("embed_request_seconds", seconds, route=route)
            if status >= 400:
                code = state.get("error_code") or "none"
                self.metrics.inc("embed_errors_total", route=route, status=str(status), code=code)
        if self.log_requests:
            logger.info(
                "request_id=%s %s %s status=%d texts=%d ms=%.1f", request_id, scope.get("method", "-"),
                route, status, state.get("texts", 0), seconds * 1000,
            )


def app_path(scope) -> str:
    """The request's path inside the app (Serve mounts it under a route prefix)."""
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def route_of(scope) -> str:
    """The route a path belongs to; anything unknown is 'other' (bounded metric labels)."""
    path = app_path(scope)
    path = ALIASES.get(path, path)
    for route in KNOWN_ROUTES:
        if path == route or (route == "/v1/models" and path.startswith("/v1/models/")):
            return route
    return "other"


def _request_id(scope) -> str:
    for name, value in scope.get("headers", []):
        if name == REQUEST_ID_HEADER and _SANE_ID.match(value):
            return value.decode()
    return uuid.uuid4().hex
