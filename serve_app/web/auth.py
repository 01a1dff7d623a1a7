"""Optional API keys: `Authorization: Bearer <key>` on every route but two.

Keys come from EMBED_API_KEYS (comma-separated) in the environment of the process
that builds the app, never from a config file. Only their SHA-256 digests travel
to the replicas (Ray keeps a deployment's arguments in its own store), and a
presented key is compared against every digest in constant time. Keys are never
logged. Only /health, /openapi.json and the Office add-in's files under /excel/ stay
open; everything else, /v1 and the /embeddings and /models that clients without /v1
in their base URL call, needs a key.
"""

from __future__ import annotations

import hashlib
import hmac
import os

import orjson

from serve_app.core.errors import Unauthorized
from serve_app.web.requestlog import app_path

API_KEYS_ENV = "EMBED_API_KEYS"
OPEN_PATHS = frozenset({"/health", "/openapi.json"})
OPEN_PREFIXES = ("/excel/",)  # the Office add-in's manifest and static files: no secrets


def key_digests_from_env(environ: dict[str, str] | None = None) -> list[str]:
    """Hex SHA-256 digests of the keys in EMBED_API_KEYS; empty when unset (no auth)."""
    raw = (os.environ if environ is None else environ).get(API_KEYS_ENV, "")
    return sorted({_digest(key.strip()) for key in raw.split(",") if key.strip()})


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class APIKeyMiddleware:
    """Pure ASGI middleware: 401 in the OpenAI envelope unless a configured key is presented."""

    def __init__(self, app, digests: list[str]) -> None:
        self.app = app
        self.digests = [bytes.fromhex(d) for d in digests]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self.digests or not _protected(scope):
            await self.app(scope, receive, send)
            return
        if self._valid(_bearer(scope)):
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})["error_code"] = "invalid_api_key"
        error = Unauthorized(
            "Missing or invalid API key. Send it as 'Authorization: Bearer <key>' "
            "(in Excel: EMBED_API_KEY).",
            code="invalid_api_key",
        )
        body = orjson.dumps(error.to_dict())
        await send({
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b"Bearer"),
            ],
        })
        await send({"type": "http.response.body", "body": body})

    def _valid(self, presented: str | None) -> bool:
        if presented is None:
            return False
        candidate = hashlib.sha256(presented.encode("utf-8")).digest()
        # No early exit: the time taken does not depend on which key matched.
        matched = False
        for digest in self.digests:
            matched |= hmac.compare_digest(candidate, digest)
        return matched


def _protected(scope) -> bool:
    path = app_path(scope)
    return path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES)


def _bearer(scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None
