"""HTTP to the embedding service for the formulas: chunks, dedupe, a cache, retries of a busy
server, readable errors.

Vectors are cached at full width, keyed by model, prompt (instruction) and text (one client per
server URL), so recalculating a sheet whose texts did not change sends no embedding
request, and a Matryoshka `dimensions` is cut here from the cached vector. Only texts not
in the cache are sent, each once, in chunks of at most `chunk_size` texts, up to
`requests_in_flight` (2) at a time; a text another formula is already fetching is awaited,
not sent again.

Which model the server runs (its name and `system_fingerprint`, which changes with the
weights or settings under the same name) is learnt from every embeddings answer and,
when no answer has named it for `model_ttl_s` (30 s) and the cache holds some of a
calculation's texts, from GET /v1/models, which the ingress answers without waking the
model. So a sheet that is fully cached costs at most one small GET per 30 s, and after the
server changes model its vectors are fetched afresh within 30 s. If that GET fails, the
formula shows the error rather than vectors of a model that may be gone. A calculation
none of whose texts is cached (a cell just typed) skips the GET: its answer names the model.

Formulas run in threads (xlwings' async mode); the lock guards only the bookkeeping,
never an HTTP call, so a one-cell formula does not wait behind a 10,000-row column.
"""

from __future__ import annotations

import base64
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from typing import Any

import httpx
import numpy as np
from cachetools import LRUCache

from excel_addin.settings import ServiceError, Settings, certificate_refusal, load_settings, trust
from serve_app.core.vectors import truncate

# The model an answer came from: its name, and its version (system_fingerprint, "" where the
# server does not say it): a same-name revision or setting change gives other vectors.
Served = tuple[str, str]
# What goes before a text, as the request's own fields: (("instruction", task),),
# (("prompt_name", "query"),) or () for none.
Prompt = tuple[tuple[str, str], ...]
Key = tuple[Served, Prompt, str]  # (model, prompt, text)
MIXED = "fp_mixed"  # the system_fingerprint of an answer from two versions (a rolling update)


class EmbedClient:
    """Embeds texts through the service, remembering every vector it was given."""

    def __init__(
        self,
        settings: Settings,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.requests = 0  # embedding requests (POST /v1/embeddings) sent, for tests and benchmarks
        self.model_checks = 0  # GET /v1/models sent to learn which model answers
        headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        self._http = httpx.Client(
            base_url=settings.server_url,
            timeout=httpx.Timeout(settings.timeout_s, connect=10.0),
            headers=headers,
            transport=transport,
            verify=trust(settings.ca_file) if settings.server_url.startswith("https:") else True,
        )
        self._clock = clock
        self._sleep = sleep
        # The lock guards the cache, the pending fetches, the model and the counters, and is
        # never held over an HTTP call: a one-cell formula must not wait behind a long column.
        self._lock = threading.Lock()
        self._cache: LRUCache = LRUCache(
            maxsize=settings.cache_mb * 1024 * 1024, getsizeof=lambda v: v.nbytes
        )
        self._pending: dict[Key, Future] = {}  # texts some thread is fetching now
        self._model: Served | None = None
        self._min_dimensions = 1  # the smallest Matryoshka cut the server allows, once known
        self._model_seen = -math.inf  # clock() when an answer last named the model

    def __repr__(self) -> str:
        return f"EmbedClient({self.settings!r})"

    def vectors(
        self, texts: list[str], instruction: str | None = None, dimensions: int | None = None,
        prompt_name: str | None = None,
    ) -> dict[str, np.ndarray]:
        """Vectors for the distinct `texts`, from the cache where possible; an instruction,
        else a named prompt of the server's (`query`), goes before each."""
        prompt: Prompt = ((("instruction", instruction),) if instruction
                          else (("prompt_name", prompt_name),) if prompt_name else ())
        distinct = list(dict.fromkeys(texts))
        model = self._served_model(distinct, prompt)
        for _ in range(3):
            found = self._lookup_or_fetch(distinct, prompt, model)
            models = {answered for answered, _ in found.values()}
            if models <= {model}:
                if dimensions is not None and found:
                    self._check_dimensions(dimensions, len(next(iter(found.values()))[1]), model[0])
                return {t: _cut(v, dimensions) for t, (_, v) in found.items()}
            # The server changed model during this call. One sheet must not mix two models'
            # vectors, so look up again under the model it now serves (what this call fetched
            # from it is cached already).
            model = self._served_model()
        names = sorted({name for name, _ in models})
        raise ServiceError(
            f"The embedding server at {self.settings.server_url} answered with several models or "
            f"versions of {', '.join(names)} during one calculation (it may be updating). "
            "Recalculate once it serves one."
        )

    def info(self) -> dict:
        """The served model and its width, or ServiceError."""
        with self._lock:
            self.model_checks += 1
        body = self._call("GET", "/v1/models")
        try:
            card = body["data"][0]
            name = card["id"]
        except (KeyError, IndexError, TypeError):
            raise ServiceError(_not_this_service(self.settings.server_url, "its JSON lists no model")) from None
        served = self._learn((name, card.get("system_fingerprint") or ""))
        with self._lock:
            self._min_dimensions = card.get("min_dimensions") or 1
        return {"model": name, "dimensions": card.get("dimensions"), "served": served,
                "max_input_tokens": card.get("max_input_tokens")}

    def _check_dimensions(self, dimensions: int, width: int, name: str) -> None:
        """As the server checks a request's `dimensions`: the cache holds full vectors, so a
        cut wider than the model would silently give the full width."""
        low = self._min_dimensions
        if not low <= dimensions <= width:
            raise ValueError(
                f"dimensions must be between {low} and {width} for {name}, not {dimensions}.")

    def _served_model(self, texts: list[str] = (), prompt: Prompt = ()) -> Served:
        """The model the server answers with: remembered for `model_ttl_s`, then asked again,
        unless none of `texts` is cached under the model last known. Those are all sent, and
        their answers name the model (`vectors` looks up again if it changed), so asking
        first would only add a round trip to a cell just typed."""
        with self._lock:
            if self._clock() - self._model_seen < self.settings.model_ttl_s:
                return self._model
            known = self._model
            if known is not None and texts and not any((known, prompt, t) in self._cache for t in texts):
                return known
        return self.info()["served"]

    def _learn(self, model: Served) -> Served:
        """Remember the model an answer named."""
        with self._lock:
            self._model, self._model_seen = model, self._clock()
        return model

    def _lookup_or_fetch(
        self, texts: list[str], prompt: Prompt, model: Served
    ) -> dict[str, tuple[Served, np.ndarray]]:
        """(answering model, vector) for each text: cached, fetched here, or awaited from the
        thread already fetching it. Vectors are kept here, not read back from the cache, which
        may have evicted them before the call ends."""
        found: dict[str, tuple[Served, np.ndarray]] = {}
        awaited: dict[str, Future] = {}
        mine: dict[str, Future] = {}
        with self._lock:
            for text in texts:
                key = (model, prompt, text)
                vector = self._cache.get(key)
                if vector is not None:
                    found[text] = (model, vector)
                elif key in self._pending:
                    awaited[text] = self._pending[key]
                else:
                    mine[text] = self._pending[key] = Future()
        try:
            for chunk, (answered, vectors, keep) in self._fetch_chunks(list(mine), prompt):
                with self._lock:
                    for text, vector in zip(chunk, vectors, strict=True):
                        if keep and vector.nbytes <= self._cache.maxsize:  # else LRUCache raises
                            self._cache[(answered, prompt, text)] = vector
                        del self._pending[(model, prompt, text)]
                        mine.pop(text).set_result((answered, vector))
                        found[text] = (answered, vector)
        except BaseException as exc:
            # Whoever waits for a text this call did not get gets the same error, not a hang.
            with self._lock:
                for text in mine:
                    self._pending.pop((model, prompt, text), None)
            for future in mine.values():
                future.set_exception(exc)
            raise
        # Only now wait for other threads: each thread fetches all it owns before it waits,
        # so two calls waiting on each other's texts cannot deadlock.
        for text, future in awaited.items():
            try:
                found[text] = future.result()
            except ServiceError as exc:
                raise ServiceError(str(exc)) from None
        return {text: found[text] for text in texts}

    def _fetch_chunks(self, texts: list[str], prompt: Prompt):
        """(chunk, `_fetch`'s answer) for each chunk of `texts`, in order, with up to
        `requests_in_flight` requests out at once: the server has the next chunk while this
        one's answer travels, so its forward workers do not idle between chunks (sent one
        at a time, each chunk's slower half left the other worker waiting). A chunk goes out
        only once the chunk that many before it was answered, so after a failure at most
        the ones already out are still answered."""
        chunks = list(self._chunks(texts))
        if len(chunks) <= 1:  # nothing to send, or a cell's call (most often): no thread for it
            for chunk in chunks:
                yield chunk, self._fetch(chunk, prompt)
            return
        upcoming = iter(chunks)
        window = max(1, self.settings.requests_in_flight)
        pool = ThreadPoolExecutor(window, thread_name_prefix="embed-chunk")
        try:
            out = deque((chunk, pool.submit(self._fetch, chunk, prompt)) for chunk in islice(upcoming, window))
            while out:
                chunk, answer = out.popleft()
                answered = answer.result()
                if (following := next(upcoming, None)) is not None:
                    out.append((following, pool.submit(self._fetch, following, prompt)))
                yield chunk, answered
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

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

    def _fetch(self, texts: list[str], prompt: Prompt
               ) -> tuple[Served, list[np.ndarray], bool]:
        """The answering model, one vector per text in order, and whether to keep them: an
        answer of two versions is neither cached nor taken as the served model, so the
        calculation asks again (`vectors`)."""
        payload: dict[str, Any] = {"input": texts, "encoding_format": "base64", **dict(prompt)}
        with self._lock:
            self.requests += 1
        body = self._call("POST", "/v1/embeddings", json=payload)
        url = self.settings.server_url
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise ServiceError(_not_this_service(url, "its JSON holds no embeddings"))
        if len(data) != len(texts):
            raise ServiceError(
                f"The embedding server at {url} answered {len(data)} "
                f"vectors for {len(texts)} texts. Check that EMBED_SERVER_URL is this service."
            )
        try:
            vectors = [_decode(item["embedding"]) for item in data]
        except (KeyError, TypeError, ValueError):  # not base64 float32 (binascii.Error is a ValueError)
            raise ServiceError(_not_this_service(url, "its embeddings are not base64 vectors")) from None
        answered = (body.get("model"), body.get("system_fingerprint") or "")
        if answered[1] == MIXED:
            return answered, vectors, False
        return self._learn(answered), vectors, True

    def _call(self, method: str, path: str, **kwargs) -> dict:
        """One HTTP call's JSON; 429 and 503 asked again after Retry-After; failures as ServiceError."""
        for attempt in range(self.settings.max_retries + 1):
            response = self._send(method, path, **kwargs)
            if not _worth_retrying(response) or attempt == self.settings.max_retries:
                break
            self._sleep(_retry_wait_s(response, self.settings.max_retry_wait_s))
        url = self.settings.server_url
        if response.status_code == 200:
            try:
                return response.json()
            except ValueError:
                content_type = response.headers.get("content-type") or "no content type"
                raise ServiceError(_not_this_service(url, f"it sent {content_type}, not JSON")) from None
        raise ServiceError(self._failure(response, path))

    def _failure(self, response: httpx.Response, path: str) -> str:
        """The sentence for an answer other than 200."""
        url, status, error = self.settings.server_url, response.status_code, _server_error(response)
        message = error["message"] if error and "message" in error else f"HTTP {status}."
        if status == 401 and not self.settings.api_key:
            return (f"The embedding server at {url} needs an API key. Set EMBED_API_KEY to the key "
                    "your admin gave you (in the xlwings config or the environment).")
        if status == 401:
            return f"The embedding server at {url} refused the API key. Check EMBED_API_KEY."
        if status == 404 and error is None:
            # Ray Serve's front answers 404 in plain text until the application is deployed.
            return (f"Nothing answers at {url}{path} yet: the embedding service may still be "
                    "starting (recalculate in a few seconds), or EMBED_SERVER_URL names the wrong address.")
        if status in (429, 503):
            return f"The embedding server is busy or unavailable: {message} Recalculate to retry."
        if 400 <= status < 500:
            return f"The embedding server refused the request: {message}"
        return f"The embedding server at {url} failed ({status}): {message}"

    def _send(self, method: str, path: str, **kwargs) -> httpx.Response:
        """The server's answer, whatever its status; no answer at all as ServiceError."""
        url = self.settings.server_url
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.ConnectTimeout:
            # No connection within 10 s (an unreachable host), not a server slow to answer.
            raise ServiceError(_unreachable(url)) from None
        except httpx.ConnectError as exc:
            untrusted = certificate_refusal(exc)
            if untrusted is not None:
                raise ServiceError(
                    f"The embedding server at {url} has a certificate this computer does not trust "
                    f"({untrusted}). Install the office's CA certificate as a trusted root, or set "
                    "EMBED_CA_FILE to it."
                ) from None
            raise ServiceError(_unreachable(url)) from None
        except httpx.TimeoutException:
            raise ServiceError(
                f"The embedding server at {url} did not answer within {self.settings.timeout_s:g} s. "
                "It may be starting or busy; recalculate to try again, or raise EMBED_TIMEOUT_S."
            ) from None
        except httpx.HTTPError as exc:
            raise ServiceError(f"The request to the embedding server at {url} failed: {exc}.") from None

    def close(self) -> None:
        self._http.close()


def _not_this_service(url: str, what: str) -> str:
    """A 200 answer that is not the service's: `what` says how (an HTML page, other JSON)."""
    return (f"The server at {url} answered, but not as the embedding service does ({what}). "
            "Check that EMBED_SERVER_URL is the embedding service's address.")


def _unreachable(url: str) -> str:
    return f"Cannot reach the embedding server at {url}. Is it running? If it runs elsewhere, set EMBED_SERVER_URL."


def _retry_wait_s(response: httpx.Response, cap_s: float) -> float:
    """Seconds to wait before asking a busy server again: its Retry-After (in seconds), else
    1 s, at most `cap_s`; client.js's retryAfterMs."""
    try:
        seconds = float(response.headers.get("retry-after", ""))
    except ValueError:  # absent, or an HTTP date
        seconds = 0.0
    return min(cap_s, seconds if math.isfinite(seconds) and seconds > 0 else 1.0)


# A 503 not to send again: the request itself may be what the replica died of (memory).
NOT_RETRIED = frozenset({"replica_out_of_memory"})


def _worth_retrying(response: httpx.Response) -> bool:
    """429 and 503, but not one whose code says the request is the cause (client.js's rule)."""
    if response.status_code not in (429, 503):
        return False  # a 200's body (megabytes of vectors) is not parsed here
    return (_server_error(response) or {}).get("code") not in NOT_RETRIED


def _server_error(response: httpx.Response) -> dict | None:
    """The answer's OpenAI error envelope (`error`), or None where it is not one (as
    client.js's serverError reads it)."""
    try:
        error = response.json().get("error")
    except Exception:
        return None
    return error if isinstance(error, dict) else None


def _decode(embedding: str) -> np.ndarray:
    """A base64 vector as the service sends it: little-endian float32."""
    return np.frombuffer(base64.b64decode(embedding), dtype="<f4")


def _cut(vector: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Matryoshka: the first `dimensions` values, re-normalised (the server's own kernel)."""
    return truncate(vector[None, :], dimensions)[0]


_clients: dict[Settings, EmbedClient] = {}
_clients_lock = threading.Lock()


def get_client(settings: Settings | None = None) -> EmbedClient:
    """One client (and cache) per distinct settings, kept for the life of Excel's Python."""
    settings = settings or load_settings()
    with _clients_lock:
        if settings not in _clients:
            _clients[settings] = EmbedClient(settings)
        return _clients[settings]
