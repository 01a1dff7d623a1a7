"""Limits, CORS, request ids and logs, the shared cache, a bad-input battery and fuzzing.

All in process, against the real Starlette app over the bundled model.
"""

from __future__ import annotations

import asyncio
import json
import logging

import numpy as np
import pytest
import schemathesis
from conftest import make_service
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from starlette.testclient import TestClient

from serve_app.core.config import AppArgs
from serve_app.ray_shell.metrics import Metrics
from serve_app.web.api import create_app
from serve_app.web.cache import EmbeddingCache


def client_for(embedder, **overrides) -> TestClient:
    service = make_service(embedder, **overrides)
    service.metrics = Metrics()
    return TestClient(create_app(service), raise_server_exceptions=False)


class CountingBackend:
    """The real model behind a counter of texts sent to it."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self.texts = 0

    async def embed(self, texts):
        self.texts += len(texts)
        return await self.backend.embed(texts)


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in body["error"]["message"]
    return body["error"]


# --- limits ---------------------------------------------------------------------


def test_too_many_characters_is_400_before_the_model(bundled_embedder):
    with client_for(bundled_embedder, max_input_chars=50) as http:
        counter = CountingBackend(http.app.state.service.backend)
        http.app.state.service.backend = counter
        error = error_of(http.post("/v1/embeddings", json={"input": ["fine", "x" * 51]}), 400)
        assert error["param"] == "input[1]" and error["code"] == "input_too_long"
        assert "51 characters; at most 50" in error["message"]
        error_of(http.post("/v1/similarity", json={"left": "a", "right": ["y" * 60]}), 400)
        assert counter.texts == 0


def test_too_many_inputs_is_400_and_big_body_is_413(bundled_embedder):
    with client_for(bundled_embedder, max_inputs_per_request=3, max_request_bytes=2048) as http:
        assert error_of(http.post("/v1/embeddings", json={"input": ["a"] * 4}), 400)["code"] == "too_many_inputs"
        assert error_of(http.post("/v1/embeddings", json={"input": ["a" * 3000]}), 413)["code"] == "request_too_large"


# --- CORS -----------------------------------------------------------------------


def preflight(http, origin: str):
    return http.options("/v1/embeddings", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    })


def test_cors_is_closed_by_default(http):
    response = http.post("/v1/embeddings", json={"input": "x"}, headers={"Origin": "https://evil.example"})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers
    assert "access-control-allow-origin" not in preflight(http, "https://evil.example").headers


def test_cors_opens_only_to_listed_origins(bundled_embedder):
    origin = "https://sheets.example.com"
    with client_for(bundled_embedder, cors_origins=f"{origin}, https://other.example") as http:
        allowed = preflight(http, origin)
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == origin
        assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
        answer = http.post("/v1/embeddings", json={"input": "x"}, headers={"Origin": origin})
        assert answer.headers["access-control-allow-origin"] == origin
        refused = preflight(http, "https://evil.example")
        assert refused.status_code == 400
        assert "access-control-allow-origin" not in refused.headers
        # The official openai client in a browser sends headers of its own, per version.
        sdk = http.options("/v1/embeddings", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type,x-stainless-lang,"
                                              "x-stainless-retry-count,x-stainless-timeout,openai-project"})
        assert sdk.status_code == 200, sdk.text
        assert "x-stainless-retry-count" in sdk.headers["access-control-allow-headers"].lower()


# --- request ids, logs, metrics ---------------------------------------------------


def test_request_ids_and_log_lines_never_contain_the_text(bundled_embedder, caplog):
    secret = "Client Müller owes 12,000 EUR under clause 7"
    with client_for(bundled_embedder) as http, caplog.at_level(logging.INFO):
        mine = http.post("/v1/embeddings", json={"input": [secret, secret]}, headers={"X-Request-ID": "abc-123"})
        fresh = http.post("/v1/embeddings", json={"input": ""})
        junk = http.get("/health", headers={"X-Request-ID": "bad id with spaces\n"})
    assert mine.headers["x-request-id"] == "abc-123"
    assert len(fresh.headers["x-request-id"]) == 32 and fresh.status_code == 400
    assert junk.headers["x-request-id"] != "bad id with spaces\n"
    lines = [r.getMessage() for r in caplog.records if r.name == "ray.serve.embeddings.requests"]
    assert any("request_id=abc-123" in line and "/v1/embeddings status=200 texts=2" in line for line in lines)
    assert any(f"request_id={fresh.headers['x-request-id']}" in line and "status=400" in line for line in lines)
    assert not any(secret in r.getMessage() for r in caplog.records)


def test_metrics_count_requests_errors_texts_and_cache(bundled_embedder):
    with client_for(bundled_embedder) as http:
        metrics = http.app.state.service.metrics
        http.post("/v1/embeddings", json={"input": ["one", "two", "one"]})
        http.post("/v1/embeddings", json={"input": ["two", "three"]})
        http.post("/v1/embeddings", json={"input": []})
        http.post("/v1/embeddings", json={"input": ["a"], "model": "nope"})
        http.post("/embeddings", json={"input": ["four"]})  # a base_url without /v1: the same route
    assert metrics.count("embed_requests_total", route="/v1/embeddings", status="200") == 3
    assert metrics.count("embed_requests_total", route="other") == 0
    assert metrics.count("embed_errors_total", route="/v1/embeddings", status="400", code="invalid_request_error") == 1
    assert metrics.count("embed_errors_total", route="/v1/embeddings", status="404", code="model_not_found") == 1
    assert metrics.count("embed_texts_total") == 4  # one, two, three, four: each embedded once
    assert metrics.count("embed_cache_hits_total") == 1 and metrics.count("embed_cache_misses_total") == 4
    assert metrics.count("embed_tokens_total") > 0


class WaitingBackend:
    """A model that has not answered yet: the request waits in the app until cancelled."""

    def __init__(self) -> None:
        self.called = asyncio.Event()

    async def embed(self, texts):
        self.called.set()
        await asyncio.Event().wait()


def test_a_request_whose_client_left_is_counted_as_499_not_as_a_server_error(bundled_embedder, caplog):
    # Serve cancels the ingress's handler when the client disconnects; that counted as a
    # 500 in embed_errors_total, beside real faults.
    from serve_app.web.service import EmbeddingService

    backend = WaitingBackend()
    service = EmbeddingService(AppArgs(model=bundled_embedder.spec.name), bundled_embedder.spec, backend,
                               Metrics())
    app = create_app(service)
    body = json.dumps({"input": ["a text"]}).encode()

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        raise AssertionError(f"nothing is answered: {message}")

    async def leave_while_waiting():
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/embeddings", "raw_path": b"/v1/embeddings",
                 "query_string": b"", "root_path": "", "client": ("127.0.0.1", 5000),
                 "server": ("127.0.0.1", 8000), "headers": [(b"content-type", b"application/json")]}
        request = asyncio.ensure_future(app(scope, receive, send))
        await asyncio.wait_for(backend.called.wait(), 10)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request

    with caplog.at_level(logging.INFO):
        asyncio.run(leave_while_waiting())
    metrics = service.metrics
    assert metrics.count("embed_requests_total", route="/v1/embeddings", status="499") == 1
    assert metrics.count("embed_errors_total", route="/v1/embeddings", status="499",
                         code="client_closed_request") == 1
    assert metrics.count("embed_requests_total", route="/v1/embeddings", status="500") == 0
    assert any("/v1/embeddings status=499" in r.getMessage() for r in caplog.records)


def test_a_client_that_left_mid_upload_is_counted_as_499_not_as_a_server_error(bundled_embedder, caplog):
    service = make_service(bundled_embedder)
    service.metrics = Metrics()
    app = create_app(service)
    arriving = [{"type": "http.request", "body": b'{"input": "par', "more_body": True},
                {"type": "http.disconnect"}]
    sent = []

    async def receive():
        return arriving.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/embeddings", "raw_path": b"/v1/embeddings",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 5000),
             "server": ("127.0.0.1", 8000),
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")]}
    with caplog.at_level(logging.INFO):
        asyncio.run(app(scope, receive, send))
    metrics = service.metrics
    assert metrics.count("embed_errors_total", route="/v1/embeddings", status="499",
                         code="client_closed_request") == 1
    assert metrics.count("embed_requests_total", route="/v1/embeddings", status="500") == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- the shared cache -------------------------------------------------------------


def test_cache_serves_repeats_and_every_dimension_from_one_entry(bundled_embedder):
    with client_for(bundled_embedder) as http:
        counter = CountingBackend(http.app.state.service.backend)
        http.app.state.service.backend = counter
        column = ["Termination requires 30 days' notice.", "租金每月支付。", "Refunds within 14 days."]
        first = http.post("/v1/embeddings", json={"input": column}).json()
        again = http.post("/v1/embeddings", json={"input": column[::-1]}).json()
        short = http.post("/v1/embeddings", json={"input": column, "dimensions": 64}).json()
        assert counter.texts == 3  # the second and third requests cost the model nothing
        assert again["data"][2]["embedding"] == first["data"][0]["embedding"]
        assert again["usage"] == first["usage"]
        cut = np.asarray(first["data"][0]["embedding"][:64])
        np.testing.assert_allclose(short["data"][0]["embedding"], cut / np.linalg.norm(cut), atol=1e-6)
        http.post("/v1/embeddings", json={"input": column[:1], "instruction": "Find the clause"})
        assert counter.texts == 4  # a query embedding is a different entry


class VersionedBackend(CountingBackend):
    """The real model, answering as a replica of the given settings does."""

    def __init__(self, backend, version: str) -> None:
        super().__init__(backend)
        self.version = version

    async def embed(self, texts):
        encoded = await super().embed(texts)
        encoded.version = self.version
        return encoded


def test_answers_of_other_model_settings_are_not_cached(bundled_embedder):
    # A rolling update to a new model revision under the same served name: the new ingress
    # hears from replicas of the old revision too. Their vectors were cached under the new
    # settings' keys and served long after the update.
    with client_for(bundled_embedder) as http:
        service = http.app.state.service
        service.backend = VersionedBackend(service.backend, "Qwen/Qwen3-Embedding-0.6B@old-commit ...")
        for _ in range(2):
            assert http.post("/v1/embeddings", json={"input": "Rent is due monthly."}).status_code == 200
        assert service.backend.texts == 2  # not cached: asked again
        service.backend = VersionedBackend(service.backend.backend, service.version)
        for _ in range(2):
            http.post("/v1/embeddings", json={"input": "Rent is due monthly."})
        assert service.backend.texts == 1  # its own settings' answer is cached


def test_cache_is_bounded_in_bytes_and_can_be_off():
    cache = EmbeddingCache("m", max_bytes=10 * (384 * 4 + 200))
    for i in range(25):
        cache.put(cache.key("", f"text {i}"), np.ones(384, np.float32), 3, False)
    assert len(cache) == 10 and cache.bytes_used <= cache.max_bytes
    assert cache.get(cache.key("", "text 0")) is None  # least recently used went first
    assert cache.get(cache.key("", "text 24")).tokens == 3
    assert cache.key("a", "bc") != cache.key("ab", "c")  # parts cannot run into each other
    off = EmbeddingCache("m", max_bytes=0)
    off.put(off.key("", "x"), np.ones(4, np.float32), 1, False)
    assert off.get(off.key("", "x")) is None and len(off) == 0


# --- a bad-input battery ---------------------------------------------------------

BATTERY = [
    ("malformed json", b'{"input": ["a", }', "application/json"),
    ("truncated json", b'{"input": "abc', "application/json"),
    ("not json at all", b"input=hello", "application/x-www-form-urlencoded"),
    ("json array body", b'["hello"]', "application/json"),
    ("json string body", b'"hello"', "application/json"),
    ("null body", b"null", "application/json"),
    ("empty body", b"", "application/json"),
    ("number input", b'{"input": 42}', "application/json"),
    ("object input", b'{"input": {"text": "a"}}', "application/json"),
    ("token ids", b'{"input": [[1, 2, 3]]}', "application/json"),
    ("nested garbage", b'{"input": [["a", ["b", {"c": [null]}]]]}', "application/json"),
    ("null in list", b'{"input": ["a", null]}', "application/json"),
    ("bool dimensions", b'{"input": "a", "dimensions": true}', "application/json"),
    ("string dimensions", b'{"input": "a", "dimensions": "64"}', "application/json"),
    ("float dimensions", b'{"input": "a", "dimensions": 64.5}', "application/json"),
    ("huge dimensions", b'{"input": "a", "dimensions": 99999999999999999999999}', "application/json"),
    ("negative dimensions", b'{"input": "a", "dimensions": -1}', "application/json"),
    ("bad encoding", b'{"input": "a", "encoding_format": "int8"}', "application/json"),
    ("unknown field beside a bad one", b'{"input": "a", "temperature": 0.2, "dimensions": 0}',
     "application/json"),
    ("token ids (not accepted)", b'{"input": [101, 102]}', "application/json"),
    ("mixed texts and ids", b'{"input": ["a", [1, 2]]}', "application/json"),
    ("bool token ids", b'{"input": [true, false]}', "application/json"),
    ("deep nesting", b'{"input": ' + b"[" * 5000 + b"]" * 5000 + b"}", "application/json"),
    ("invalid utf-8", b'{"input": "\xff\xfe bad"}', "application/json"),
    ("lone surrogate", b'{"input": "\\ud800"}', "application/json"),
    ("empty string", b'{"input": ["ok", ""]}', "application/json"),
    ("similarity of only control characters", b'{"left": "\\u0000\\u0001", "right": "a"}', "application/json"),
    ("similarity of whitespace only", b'{"left": ["ok"], "right": [" \\t\\n "]}', "application/json"),
    ("huge string", b'{"input": "' + b"a" * 120_000 + b'"}', "application/json"),
    ("huge list", b'{"input": [' + b",".join([b'"a"'] * 3000) + b"]}", "application/json"),
    ("huge instruction", b'{"input": "a", "instruction": "' + b"i" * 5000 + b'"}', "application/json"),
    ("bad prompt name", b'{"input": "a", "prompt_name": "nope"}', "application/json"),
    ("similarity garbage", b'{"left": 1, "right": [true]}', "application/json"),
]


@pytest.mark.parametrize(("name", "body", "content_type"), BATTERY, ids=[b[0] for b in BATTERY])
def test_bad_input_battery_gets_4xx_envelopes(http, name, body, content_type):
    path = "/v1/similarity" if name.startswith("similarity") else "/v1/embeddings"
    response = http.post(path, content=body, headers={"Content-Type": content_type})
    assert 400 <= response.status_code < 500, (name, response.status_code, response.text[:300])
    error_of(response, response.status_code)
    assert http.get("/health").json()["status"] == "ok"


def test_control_characters_inside_text_are_embedded_not_refused(http):
    response = http.post("/v1/embeddings", json={"input": ["tab\there", "bell\x07 and nul\x00 inside"]})
    assert response.status_code == 200
    assert len(response.json()["data"]) == 2


def test_blank_texts_are_embedded_as_openai_does_and_only_an_empty_one_is_refused(http):
    # Clients send " " for an empty document so that one does not fail the whole request.
    response = http.post("/v1/embeddings", json={"input": ["a text", " ", "\t\n", "\u200b", "\u0000\u0001"]})
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 5
    error = error_of(http.post("/v1/embeddings", json={"input": ["a text", ""]}), 400)
    assert error["param"] == "input[1]" and "empty string" in error["message"]


def test_emoji_newer_than_pythons_unicode_tables_and_private_use_characters_are_content(http):
    # U+1FAE8 (Unicode 15) and U+1FAE9 (16) are unassigned in Python 3.11's tables; U+E000
    # is private use. OpenAI embeds them; /v1/similarity refused them as "blank".
    texts = ["\U0001FAE8", "\U0001FAE9", "\ue000"]
    assert http.post("/v1/embeddings", json={"input": texts}).status_code == 200
    response = http.post("/v1/similarity", json={"left": texts, "right": ["a", "b", "c"]})
    assert response.status_code == 200, response.text


# --- fuzzing against the published OpenAPI document --------------------------------


def test_fuzzed_requests_never_get_a_5xx(app):
    """Schemathesis generates valid and invalid requests for every published operation."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/embeddings", "POST /v1/similarity", "GET /v1/models", "GET /health"}
    calls = 0
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def check(case) -> None:
                nonlocal calls
                calls += 1
                response = case.call()
                assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])
                if response.status_code >= 400:
                    assert set(response.json()["error"]) == {"message", "type", "param", "code"}

            try:
                check()
            except Unsatisfiable:  # nothing to make invalid (GET /health has no input)
                assert mode is GenerationMode.NEGATIVE
    assert calls >= 100
