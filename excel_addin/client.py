"""HTTP to the embedding service for the formulas: chunks, dedupe, a cache, readable errors.

Vectors are cached at full width, keyed by server, model, instruction and text,
so recalculating a sheet whose texts did not change sends no request, and a
Matryoshka `dimensions` is cut here from the cached vector. Only texts not in
the cache are sent, each once, in chunks of at most `chunk_size` texts.
"""

from __future__ import annotations

import base64
import os
import threading
from dataclasses import dataclass, replace
from typing import Any

import httpx
import numpy as np
from cachetools import LRUCache

DEFAULTS = {"server_url": "http://127.0.0.1:8000", "timeout_s": 300.0}
ENV = {
    "server_url": "EMBED_SERVER_URL",
    "api_key": "EMBED_API_KEY",
    "timeout_s": "EMBED_TIMEOUT_S",
    "instruction": "EMBED_INSTRUCTION",
}


class ServiceError(Exception):
    """A failure the cell shows as one sentence: what failed and what to check."""


@dataclass(frozen=True)
class Settings:
    server_url: str = DEFAULTS["server_url"]
    api_key: str | None = None
    timeout_s: float = DEFAULTS["timeout_s"]  # longer than a cold start of the model
    instruction: str | None = None
    chunk_size: int = 512
    chunk_chars: int = 2_000_000
    cache_mb: int = 512


def load_settings(environ: dict[str, str] | None = None, user_config: dict[str, str] | None = None) -> Settings:
    """Settings from the environment, overridden by the xlwings config (keys in lower case)."""
    environ = os.environ if environ is None else environ
    if user_config is None:
        user_config = _xlwings_user_config()
    values: dict[str, Any] = {}
    for field, name in ENV.items():
        raw = user_config.get(name.lower(), environ.get(name))
        if raw is not None and str(raw).strip():
            values[field] = str(raw).strip()
    if "timeout_s" in values:
        try:
            values["timeout_s"] = float(values["timeout_s"])
        except ValueError:
            raise ServiceError(
                f"EMBED_TIMEOUT_S must be a number of seconds, not '{values['timeout_s']}'."
            ) from None
    if "server_url" in values:
        values["server_url"] = values["server_url"].rstrip("/")
    return replace(Settings(), **values)


def _xlwings_user_config() -> dict[str, str]:
    try:
        from xlwings.utils import read_user_config

        return read_user_config()
    except Exception:  # no xlwings config, or an unreadable one: environment only
        return {}


class EmbedClient:
    """Embeds texts through the service, remembering every vector it was given."""

    def __init__(self, settings: Settings, transport: httpx.BaseTransport | None = None) -> None:
        self.settings = settings
        self.requests = 0  # HTTP requests sent, for tests and benchmarks
        headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        self._http = httpx.Client(
            base_url=settings.server_url,
            timeout=httpx.Timeout(settings.timeout_s, connect=10.0),
            headers=headers,
            transport=transport,
            event_hooks={"request": [self._count]},
        )
        self._cache: LRUCache = LRUCache(
            maxsize=settings.cache_mb * 1024 * 1024, getsizeof=lambda v: v.nbytes
        )
        self._model: str | None = None
        self._lock = threading.Lock()

    def _count(self, _request: httpx.Request) -> None:
        self.requests += 1

    def vectors(
        self, texts: list[str], instruction: str | None = None, dimensions: int | None = None
    ) -> dict[str, np.ndarray]:
        """Unit vectors for the distinct `texts`, from the cache where possible."""
        instruction = instruction or None
        with self._lock:
            missing = [t for t in dict.fromkeys(texts) if (instruction, t) not in self._cache]
            for chunk in self._chunks(missing):
                self._fetch(chunk, instruction)
            full = {t: self._cache[(instruction, t)] for t in dict.fromkeys(texts)}
        return {t: _cut(v, dimensions) for t, v in full.items()}

    def info(self) -> dict:
        """The served model and its width, or ServiceError."""
        body = self._call("GET", "/v1/models")
        card = body["data"][0]
        return {"model": card["id"], "dimensions": card.get("dimensions")}

    def _chunks(self, texts: list[str]):
        chunk: list[str] = []
        chars = 0
        for text in texts:
            if chunk and (len(chunk) >= self.settings.chunk_size or chars + len(text) > self.settings.chunk_chars):
                yield chunk
                chunk, chars = [], 0
            chunk.append(text)
            chars += len(text)
        if chunk:
            yield chunk

    def _fetch(self, texts: list[str], instruction: str | None) -> None:
        payload: dict[str, Any] = {"input": texts, "encoding_format": "base64"}
        if instruction:
            payload["instruction"] = instruction
        body = self._call("POST", "/v1/embeddings", json=payload)
        if body.get("model") != self._model:
            # Another model now answers at this address: what we remembered is stale.
            self._cache.clear()
            self._model = body.get("model")
        for text, item in zip(texts, body["data"], strict=True):
            vector = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
            self._cache[(instruction, text)] = vector

    def _call(self, method: str, path: str, **kwargs) -> dict:
        url = self.settings.server_url
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.ConnectError:
            raise ServiceError(
                f"Cannot reach the embedding server at {url}. Is it running? "
                "If it runs elsewhere, set EMBED_SERVER_URL."
            ) from None
        except httpx.TimeoutException:
            raise ServiceError(
                f"The embedding server at {url} did not answer within {self.settings.timeout_s:.0f} s. "
                "It may be starting or busy; recalculate to try again, or raise EMBED_TIMEOUT_S."
            ) from None
        except httpx.HTTPError as exc:
            raise ServiceError(f"The request to the embedding server at {url} failed: {exc}.") from None
        if response.status_code == 200:
            return response.json()
        message = _server_message(response)
        if response.status_code == 401:
            raise ServiceError(
                f"The embedding server at {url} refused the API key. Check EMBED_API_KEY."
            )
        if response.status_code in (429, 503):
            raise ServiceError(f"The embedding server is busy or unavailable: {message} Recalculate to retry.")
        if 400 <= response.status_code < 500:
            raise ServiceError(f"The embedding server refused the request: {message}")
        raise ServiceError(f"The embedding server at {url} failed ({response.status_code}): {message}")

    def close(self) -> None:
        self._http.close()


def _server_message(response: httpx.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except Exception:
        return f"HTTP {response.status_code}."


def _cut(vector: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Matryoshka: the first `dimensions` values, re-normalised (as the server does)."""
    if not dimensions or dimensions >= vector.shape[0]:
        return vector
    head = vector[:dimensions]
    return head / max(float(np.linalg.norm(head)), 1e-12)


_clients: dict[Settings, EmbedClient] = {}
_clients_lock = threading.Lock()


def get_client(settings: Settings | None = None) -> EmbedClient:
    """One client (and cache) per distinct settings, kept for the life of Excel's Python."""
    settings = settings or load_settings()
    with _clients_lock:
        if settings not in _clients:
            _clients[settings] = EmbedClient(settings)
        return _clients[settings]
