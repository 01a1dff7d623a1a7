"""Optional API keys: `Authorization: Bearer <key>` on every route but two.

Keys come from EMBED_API_KEYS (comma-separated) in the environment of the process
that builds the app, never from a config file, or as their hex SHA-256 digests from
EMBED_API_KEY_DIGESTS: `python -m serve_app` turns the one into the other before it
starts anything, so the keys themselves are in no process of the cluster. Only digests
travel to the replicas (Ray keeps a deployment's arguments in its own store), and a
presented key is compared against every digest in constant time. Keys are never
logged. Only /health, /openapi.json and the Office add-in's files under /excel/ stay
open; everything else, /v1 and the /embeddings and /models that clients without /v1
in their base URL call, needs a key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import sys

import orjson

from serve_app.core.errors import Unauthorized
from serve_app.web.requestlog import app_path

API_KEYS_ENV = "EMBED_API_KEYS"
DIGESTS_ENV = "EMBED_API_KEY_DIGESTS"
OPEN_PATHS = frozenset({"/health", "/openapi.json"})
OPEN_PREFIXES = ("/excel/",)  # the Office add-in's manifest and static files: no secrets


def key_digests_from_env(environ: dict[str, str] | None = None) -> list[str]:
    """Hex SHA-256 digests of the keys in EMBED_API_KEYS and those in EMBED_API_KEY_DIGESTS;
    empty when neither is set (no auth)."""
    environ = os.environ if environ is None else environ
    keys = environ.get(API_KEYS_ENV, "")
    digests = {_digest(key.strip()) for key in keys.split(",") if key.strip()}
    for given in environ.get(DIGESTS_ENV, "").split(","):
        if given.strip():
            if not re.fullmatch(r"[0-9a-f]{64}", given.strip().lower()):
                raise ValueError(f"{DIGESTS_ENV} holds something that is not a hex SHA-256 digest.")
            digests.add(given.strip().lower())
    return sorted(digests)


def keys_as_digests(environ: dict[str, str]) -> dict[str, str]:
    """`environ` with EMBED_API_KEYS replaced by their digests (EMBED_API_KEY_DIGESTS): what
    the processes a launcher starts need, without the keys for them to leak (every process
    of a Ray cluster inherits its environment, and /proc shows it to the same user)."""
    if not environ.get(API_KEYS_ENV):
        return environ
    environ = dict(environ)
    environ[DIGESTS_ENV] = ",".join(key_digests_from_env(environ))
    del environ[API_KEYS_ENV]
    return environ


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


if __name__ == "__main__":
    # `python -m serve_app.web.auth < KEYS_FILE`: the keys' digests, comma-separated, for
    # EMBED_API_KEY_DIGESTS where a cluster starts (cluster.yaml), so its processes get no key.
    print(",".join(key_digests_from_env({API_KEYS_ENV: sys.stdin.read().replace("\n", ",")})))
