"""The HTTP API in process: the official openai client, the wire format, every error path."""

import json

import numpy as np
import openai
import pytest
from conftest import BUNDLED, make_service

from serve_app.core.vectors import normalize
from serve_app.web.api import IGNORED_HEADER, TRUNCATED_HEADER, create_app
from serve_app.web.requestlog import REQUEST_ID_HEADER

REQUEST_ID = REQUEST_ID_HEADER.decode()  # what RequestMiddleware adds to every response


def test_openai_client_embeds_a_list(openai_client, bundled_embedder):
    texts = ["The tenant pays rent monthly.", "租户按月支付租金。"]
    response = openai_client.embeddings.create(model=BUNDLED, input=texts)
    assert response.model == BUNDLED
    assert [d.index for d in response.data] == [0, 1]
    got = np.array([d.embedding for d in response.data])
    np.testing.assert_allclose(got, bundled_embedder.encode(texts).vectors, atol=1e-6)
    assert response.usage.prompt_tokens == response.usage.total_tokens > 0


def test_openai_client_embeds_a_single_string(openai_client):
    response = openai_client.embeddings.create(model=BUNDLED, input="hello")
    assert len(response.data) == 1 and len(response.data[0].embedding) == 384


def test_float_and_base64_carry_the_same_vector(openai_client):
    import base64

    as_float = openai_client.embeddings.create(model=BUNDLED, input="same", encoding_format="float")
    # With no encoding_format the client asks for base64 itself and decodes it.
    default = openai_client.embeddings.create(model=BUNDLED, input="same")
    np.testing.assert_allclose(as_float.data[0].embedding, default.data[0].embedding, rtol=1e-7)
    # Asked for explicitly, base64 comes back as the string: little-endian float32.
    raw = openai_client.embeddings.create(model=BUNDLED, input="same", encoding_format="base64")
    decoded = np.frombuffer(base64.b64decode(raw.data[0].embedding), dtype="<f4")
    np.testing.assert_allclose(as_float.data[0].embedding, decoded, rtol=1e-7)


def test_dimensions_truncate_and_renormalise(openai_client):
    full = openai_client.embeddings.create(model=BUNDLED, input="matryoshka", encoding_format="float")
    cut = openai_client.embeddings.create(
        model=BUNDLED, input="matryoshka", dimensions=64, encoding_format="float"
    )
    vector = np.array(cut.data[0].embedding)
    assert vector.shape == (64,)
    np.testing.assert_allclose(np.linalg.norm(vector), 1.0, rtol=1e-5)
    expected = normalize(np.array([full.data[0].embedding])[:, :64])[0]
    np.testing.assert_allclose(vector, expected, atol=1e-6)


def test_openai_client_lists_the_served_model_first(openai_client):
    models = openai_client.models.list()
    assert models.data[0].id == BUNDLED


def test_answers_and_the_model_card_name_one_model_version(http, openai_client):
    """system_fingerprint: what the Excel add-ins key their caches by, beside the model's name."""
    card = http.get("/v1/models").json()["data"][0]
    fingerprint = card["system_fingerprint"]
    assert fingerprint.startswith("fp_")
    assert http.post("/v1/embeddings", json={"input": ["a"]}).json()["system_fingerprint"] == fingerprint
    similarity = http.post("/v1/similarity", json={"left": ["a"], "right": ["b"]}).json()
    assert similarity["system_fingerprint"] == fingerprint
    assert openai_client.embeddings.create(model=card["id"], input="a").system_fingerprint == fingerprint


def test_duplicates_in_a_request_get_identical_vectors(http):
    body = http.post("/v1/embeddings", json={"input": ["a cat", "a dog", "a cat"]}).json()
    vectors = [d["embedding"] for d in body["data"]]
    assert vectors[0] == vectors[2] != vectors[1]


def test_named_query_prompt_and_instruction_on_the_bundled_model(http):
    plain = http.post("/v1/embeddings", json={"input": "rent due date"}).json()
    query = http.post(
        "/v1/embeddings", json={"input": "rent due date", "prompt_name": "query"}
    ).json()
    same = http.post(
        "/v1/embeddings",
        json={"input": "rent due date",
              "instruction": "Given a web search query, retrieve relevant passages that answer the query"},
    ).json()
    # The bundled model names no query prompt and pools by mean: a query goes as typed,
    # while an instruction, asked for by name, is applied.
    assert query["data"][0]["embedding"] == plain["data"][0]["embedding"]
    assert query["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    assert same["data"][0]["embedding"] != plain["data"][0]["embedding"]
    assert same["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]


def test_truncation_is_reported_in_body_and_header(http):
    response = http.post("/v1/embeddings", json={"input": ["short", "long " * 400]})
    assert response.status_code == 200
    assert response.json()["truncated"] == [1]
    assert response.headers[TRUNCATED_HEADER] == "1"
    short = http.post("/v1/embeddings", json={"input": "short"})
    assert short.json()["truncated"] == [] and short.headers[TRUNCATED_HEADER] == "0"


def test_similarity_pairwise_column(http):
    body = http.post(
        "/v1/similarity",
        json={
            "left": ["The cat sits on the mat.", "The contract ends in May.", "identical text"],
            "right": ["A cat is sitting on a mat.", "Football scores from the weekend.", "identical text"],
        },
    ).json()
    related, unrelated, identical = body["data"]
    assert related > unrelated + 0.3
    assert identical == pytest.approx(1.0, abs=1e-5)
    assert body["mode"] == "pairwise" and body["usage"]["total_tokens"] > 0


def test_similarity_one_text_broadcasts_against_a_column(http):
    body = http.post(
        "/v1/similarity", json={"left": "cat", "right": ["cat", "kitten", "mortgage"]}
    ).json()
    assert len(body["data"]) == 3
    assert body["data"][0] == pytest.approx(1.0, abs=1e-5)
    assert body["data"][1] > body["data"][2]


def test_similarity_matrix_matches_pairwise(http):
    left, right = ["cat", "law"], ["kitten", "statute", "pasta"]
    matrix = http.post("/v1/similarity", json={"left": left, "right": right, "mode": "matrix"}).json()
    assert np.array(matrix["data"]).shape == (2, 3)
    pair = http.post("/v1/similarity", json={"left": ["law"], "right": ["statute"]}).json()
    assert matrix["data"][1][1] == pytest.approx(pair["data"][0], abs=1e-6)


def test_similarity_instruction_applies_to_left_only_by_default(http):
    base = {"left": ["rent due"], "right": ["rent due"], "instruction": "Find the clause"}
    left_only = http.post("/v1/similarity", json=base).json()["data"][0]
    both = http.post("/v1/similarity", json={**base, "instruction_applies_to": "both"}).json()["data"][0]
    assert both == pytest.approx(1.0, abs=1e-5)
    assert left_only < 0.999


def error_of(response, status):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text
    return body["error"]


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": ["fine", ""]}, "input[1]"),
        ({"input": 42}, "input"),
        ({"input": ["fine", 7]}, "input[1]"),
        ({"input": [[1, 2, 3]]}, "input"),  # token ids: refused unless accept_token_ids
        ({"input": [1, 2, 3]}, "input"),
        ({"input": [[1, "two"]]}, "input[0][1]"),
        ({"input": [1.5, 2]}, "input[0]"),
        ({"input": {"text": "x"}}, "input"),
        ({"input": None}, "input"),
        ({}, "input"),
        ({"input": "x", "dimensions": 8}, "dimensions"),
        ({"input": "x", "dimensions": 4096}, "dimensions"),
        ({"input": "x", "dimensions": "64"}, "dimensions"),
        ({"input": "x", "dimensions": True}, "dimensions"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "x", "dimensions": 8, "surprise": 1}, "dimensions"),  # known fields stay strict
        ({"input": "x", "prompt_name": "nope"}, "prompt_name"),
        ({"input": "x", "prompt_name": "query", "instruction": "y"}, "instruction"),
        ({"input": ["x"] * 65}, "input"),
    ],
)
def test_bad_embedding_requests_are_400_with_a_readable_message(http, payload, param):
    error = error_of(http.post("/v1/embeddings", json=payload), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"][0].isupper() or error["message"][0] == "'"


@pytest.mark.parametrize(
    "payload",
    [
        {"left": ["a", "b"], "right": ["a", "b", "c"]},
        {"left": [], "right": ["a"]},
        {"left": ["a"], "right": [" "]},
        {"left": "a", "right": "b", "mode": "cosine"},
    ],
)
def test_bad_similarity_requests_are_400(http, payload):
    error_of(http.post("/v1/similarity", json=payload), 400)


def test_unknown_model_is_404(openai_client):
    with pytest.raises(openai.NotFoundError) as info:
        openai_client.embeddings.create(model="text-embedding-3-small", input="x")
    assert info.value.body["code"] == "model_not_found"
    assert BUNDLED in info.value.body["message"]


def test_malformed_bodies_are_400(http):
    assert error_of(http.post("/v1/embeddings", content=b"{not json"), 400)["code"] == "invalid_json"
    assert error_of(http.post("/v1/embeddings", content=b""), 400)["code"] == "invalid_json"
    error_of(http.post("/v1/embeddings", content=b'{"input": "\xff\xfe"}'), 400)
    error_of(http.post("/v1/embeddings", content=b'["a list"]'), 400)


def test_oversized_body_is_413_before_it_is_read(bundled_embedder):
    from starlette.testclient import TestClient

    app = create_app(make_service(bundled_embedder, max_request_bytes=2048))
    with TestClient(app) as client:
        error = error_of(client.post("/v1/embeddings", json={"input": "x" * 5000}), 413)
        assert "2048 bytes" in error["message"]
        # Without a Content-Length header, the streamed body is counted as it arrives, and
        # refused once past the limit, not read to its end. (TestClient reads a streamed body
        # whole before the app sees it: the app is called as a server calls it.)
        received, replies = [], []

        async def receive():
            received.append(1)
            return {"type": "http.request", "body": b'{"input": "' + b"y" * 1000, "more_body": len(received) < 50}

        async def send(message):
            replies.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/embeddings", "raw_path": b"/v1/embeddings", "root_path": "",
                 "query_string": b"", "headers": [(b"content-type", b"application/json")],
                 "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 50000)}
        client.portal.call(app, scope, receive, send)
        assert replies[0]["status"] == 413
        assert len(received) == 3, len(received)  # 3 x 1,011 bytes: past 2,048, and no further


def test_unknown_route_and_wrong_method(http):
    assert error_of(http.get("/v2/embeddings"), 404)["message"].startswith("No route")
    # Not a bare redirect to http://, which behind the HTTPS front would be the wrong scheme.
    slash = http.post("/v1/embeddings/", json={"input": "a"}, follow_redirects=False)
    assert error_of(slash, 404)["message"] == (
        "No route /v1/embeddings/ (did you mean /v1/embeddings?); see /openapi.json.")
    assert error_of(http.get("/v2/nothing/"), 404)["message"] == "No route /v2/nothing/; see /openapi.json."
    wrong = http.get("/v1/embeddings")
    error_of(wrong, 405)
    assert wrong.headers["allow"] == "POST"  # as RFC 9110 asks of a 405


def test_unexpected_failures_are_a_generic_500(bundled_spec):
    from starlette.testclient import TestClient

    from serve_app.core.config import AppArgs
    from serve_app.web.service import EmbeddingService

    class Broken:
        async def embed(self, texts):
            raise RuntimeError("secret internal detail")

    args = AppArgs(model=BUNDLED, cors_origins=["https://sheet.example"])
    app = create_app(EmbeddingService(args, bundled_spec, Broken()))
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post("/v1/embeddings", json={"input": "x"},
                               headers={"X-Request-ID": "req-42", "Origin": "https://sheet.example"})
        error = error_of(response, 500)
        assert "secret" not in response.text and error["type"] == "server_error"
        # Answered inside the middleware: the client can quote the id, a browser can read it.
        assert response.headers["x-request-id"] == "req-42"
        assert response.headers["access-control-allow-origin"] == "https://sheet.example"


def test_a_model_that_overflows_in_float16_gets_a_500_that_says_so_not_nan_vectors(
    overflowing_standin_dir,
):
    from starlette.testclient import TestClient

    from serve_app.core.modelinfo import resolve_model
    from serve_app.model.embedder import TextEmbedder

    spec = resolve_model(str(overflowing_standin_dir))
    texts = ["The tenant pays rent monthly.", "租户按月支付租金。"]
    # The same weights in float32 give finite unit vectors: it is float16's range that fails.
    assert np.isfinite(TextEmbedder(spec, dtype="float32").encode(texts).vectors).all()
    service = make_service(TextEmbedder(spec, dtype="float16"), cache_max_mb=8)
    with TestClient(create_app(service), raise_server_exceptions=False) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="k", http_client=http,
                               max_retries=0)
        for _ in range(2):  # the second time too: nothing was cached
            with pytest.raises(openai.InternalServerError) as caught:
                client.embeddings.create(model=spec.name, input=texts)
            error = caught.value.body
            assert error["code"] == "model_output_not_finite", error
            assert error["message"].startswith(
                "The model gave inf or NaN values for 2 texts, running in float16 on cpu:")
            assert "set dtype: bfloat16 where the hardware runs it, or float32" in error["message"]
        # As floats, NaN would have gone out as JSON nulls.
        response = http.post("/v1/embeddings", json={"input": texts[0], "encoding_format": "float"})
        assert error_of(response, 500)["code"] == "model_output_not_finite"


def test_server_stays_healthy_after_bad_input(http, bundled_embedder):
    garbage = http.post("/v1/embeddings", content=b"\x00\x01garbage")
    error = error_of(garbage, 400)
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_json"
    too_many = http.post("/v1/embeddings", json={"input": ["x"] * 1000})
    error = error_of(too_many, 400)
    assert error["type"] == "invalid_request_error" and error["param"] == "input"
    assert "at most 64" in error["message"]  # the limit it broke, so the caller knows what to send
    ids = [r.headers.get(REQUEST_ID) for r in (garbage, too_many)]
    assert all(ids) and ids[0] != ids[1]  # each failure can be found in the server's log

    assert http.get("/health").json()["status"] == "ok"
    good = http.post("/v1/embeddings", json={"input": ["still works", "and again"]})
    assert good.status_code == 200 and good.headers.get(REQUEST_ID)
    got = np.array([d["embedding"] for d in good.json()["data"]])
    np.testing.assert_allclose(got, bundled_embedder.encode(["still works", "and again"]).vectors, atol=1e-6)


def test_openapi_document_describes_every_route(http):
    doc = http.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) >= {"/v1/embeddings", "/v1/similarity", "/v1/models", "/health"}
    schemas = doc["components"]["schemas"]
    assert {"EmbeddingRequest", "EmbeddingResponse", "SimilarityRequest", "ErrorResponse"} <= set(schemas)
    assert "input" in schemas["EmbeddingRequest"]["properties"]
    json.dumps(doc)  # plain JSON, nothing unserialisable


def test_the_model_cards_fields_are_all_in_the_openapi_document(lenient):
    doc = lenient.get("/openapi.json").json()
    published = set(doc["components"]["schemas"]["ModelCard"]["properties"])
    for card in lenient.get("/v1/models").json()["data"]:  # the served model's, then an alias's
        assert set(card) <= published, set(card) - published
    assert set(doc["components"]["schemas"]["ModelRuntime"]["properties"]) == {"device", "dtype", "reason"}


def test_health_does_not_touch_the_model(bundled_spec):
    from starlette.testclient import TestClient

    from serve_app.core.config import AppArgs
    from serve_app.web.service import EmbeddingService

    class Counting:
        calls = 0

        async def embed(self, texts):
            Counting.calls += 1
            raise AssertionError("health must not embed")

    app = create_app(EmbeddingService(AppArgs(model=BUNDLED), bundled_spec, Counting()))
    with TestClient(app) as client:
        assert client.get("/health").json()["status"] == "ok"
    assert Counting.calls == 0


def test_models_say_which_dtype_the_model_runs_in_and_why(bundled_embedder):
    from conftest import make_service
    from starlette.testclient import TestClient

    from serve_app.web.api import create_app

    with TestClient(create_app(make_service(bundled_embedder))) as http:
        before = http.get("/v1/models").json()["data"][0]["runtime"]
        assert before["dtype"] == "auto" and "none has answered yet" in before["reason"]
        assert http.post("/v1/embeddings", json={"input": "a"}).status_code == 200
        after = http.get("/v1/models").json()["data"][0]["runtime"]
    assert after == {"device": "cpu", "dtype": "float32", "reason": "dtype=float32 was set"}


def test_the_model_card_names_a_hub_models_pinned_revision(bundled_embedder, bundled_spec):
    from dataclasses import replace

    from starlette.testclient import TestClient

    from serve_app.core.config import AppArgs
    from serve_app.web.service import EmbeddingService, LocalBackend

    spec = replace(bundled_spec, name="acme/minilm", revision="d" * 40)
    service = EmbeddingService(AppArgs(model=spec.name), spec, LocalBackend(bundled_embedder))
    with TestClient(create_app(service)) as http:
        card = http.get("/v1/models").json()["data"][0]
    assert card["id"] == "acme/minilm" and card["revision"] == "d" * 40


# --- what the tools people already use send (issue: LangChain, LlamaIndex, ...) -----------


@pytest.fixture(scope="module")
def lenient(bundled_embedder):
    """An app with aliases and token ids accepted, as an operator would set them."""
    from starlette.testclient import TestClient

    service = make_service(bundled_embedder, model_aliases=["text-embedding-3-small", "ada"],
                           accept_token_ids=True)
    with TestClient(create_app(service), raise_server_exceptions=False) as client:
        yield client


def test_unknown_fields_are_ignored_named_in_a_header_and_logged_without_values(http, caplog):
    plain = http.post("/v1/embeddings", json={"input": ["a contract", "a lease"]})
    assert IGNORED_HEADER not in plain.headers
    extra = {"truncate_prompt_tokens": 8, "request_id": "secret-value-17", "input_type": "query"}
    with caplog.at_level("INFO", logger="serve_app.web.api"):
        reply = http.post("/v1/embeddings", json={"input": ["a contract", "a lease"], **extra})
    assert reply.status_code == 200, reply.text
    assert reply.headers[IGNORED_HEADER] == "input_type, request_id, truncate_prompt_tokens"
    assert reply.json()["data"] == plain.json()["data"]
    lines = [r.getMessage() for r in caplog.records if "Ignored unknown request fields" in r.getMessage()]
    assert len(lines) == 1 and "truncate_prompt_tokens" in lines[0]
    assert "secret-value-17" not in caplog.text and "query" not in lines[0]


def test_ignored_field_names_are_bounded_and_safe_for_a_header(http):
    names = {f"x{i:02d}": i for i in range(25)} | {"é\r\nX-Evil: 1": 0}
    reply = http.post("/v1/embeddings", json={"input": "a", **names})
    assert reply.status_code == 200
    shown = reply.headers[IGNORED_HEADER].split(", ")
    assert len(shown) == 21 and shown[-1] == "... 6 more"
    assert "X-Evil" not in reply.headers


def test_aliases_are_accepted_listed_and_answered_with_the_served_id(lenient):
    models = lenient.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == [BUNDLED, "text-embedding-3-small", "ada"]
    assert models[0]["aliases"] == ["text-embedding-3-small", "ada"]
    assert models[1]["alias_of"] == BUNDLED and models[1]["dimensions"] == 384
    assert lenient.get("/v1/models/ada").json()["alias_of"] == BUNDLED
    by_name = {}
    for name in (BUNDLED, "text-embedding-3-small", None):
        body = lenient.post("/v1/embeddings", json={"input": "rent", "model": name}).json()
        assert body["model"] == BUNDLED
        by_name[name] = body["data"][0]["embedding"]
    assert by_name[BUNDLED] == by_name["text-embedding-3-small"] == by_name[None]


def test_other_model_names_are_404_naming_the_served_id_and_the_setting(lenient):
    error = error_of(lenient.post("/v1/embeddings", json={"input": "x", "model": "text-embedding-ada-002"}), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert BUNDLED in error["message"] and "model_aliases" in error["message"]


def test_dimensions_wider_than_the_model_is_400_naming_its_width(lenient):
    # Weaviate sends dimensions 1536 with text-embedding-3-small unless told otherwise.
    error = error_of(lenient.post("/v1/embeddings", json={
        "input": "x", "model": "text-embedding-3-small", "dimensions": 1536}), 400)
    assert error["param"] == "dimensions" and "384 (the full width" in error["message"]


def test_embeddings_without_v1_answer_like_v1(http):
    texts = {"input": ["a lease", "租约"]}
    v1, bare = http.post("/v1/embeddings", json=texts), http.post("/embeddings", json=texts)
    assert bare.status_code == 200 and bare.json() == v1.json()
    assert http.get("/models").json() == http.get("/v1/models").json()
    doc = http.get("/openapi.json").json()
    assert doc["paths"]["/embeddings"] == doc["paths"]["/v1/embeddings"]
    assert doc["components"]["schemas"]["EmbeddingRequest"]["additionalProperties"] is True


def test_token_ids_by_default_are_400_saying_what_to_change_in_the_client(http):
    for body in ({"input": [[9707, 1879], [3923]]}, {"input": [9707, 1879]}):
        error = error_of(http.post("/v1/embeddings", json=body), 400)
        assert error["code"] == "token_ids_not_supported" and error["param"] == "input"
        assert "check_embedding_ctx_length=False" in error["message"]
        assert "accept_token_ids" in error["message"]


def test_accepted_token_ids_embed_as_their_text_with_limits_and_truncation(lenient, bundled_embedder):
    tokenizer = bundled_embedder.tokenizer
    text = "The lessee shall pay rent monthly"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    as_text = lenient.post("/v1/embeddings", json={"input": text}).json()
    for body in ({"input": ids}, {"input": [ids]}, {"input": [tokenizer(text)["input_ids"]]}):
        reply = lenient.post("/v1/embeddings", json=body).json()
        np.testing.assert_allclose(reply["data"][0]["embedding"], as_text["data"][0]["embedding"], atol=1e-5)
        assert reply["usage"] == as_text["usage"]
    long_ids = tokenizer("word " * 300, add_special_tokens=False)["input_ids"]  # model limit: 256
    reply = lenient.post("/v1/embeddings", json={"input": [ids, long_ids]})
    assert reply.json()["truncated"] == [1] and reply.headers[TRUNCATED_HEADER] == "1"
    assert reply.json()["usage"]["prompt_tokens"] == as_text["usage"]["prompt_tokens"] + 256
    bad = error_of(lenient.post("/v1/embeddings", json={"input": [[5, 30522]]}), 400)
    assert bad["param"] == "input[0]" and "0 to 30521" in bad["message"]
    assert error_of(lenient.post("/v1/embeddings", json={"input": [[]]}), 400)["param"] == "input[0]"
    assert error_of(lenient.post("/v1/embeddings", json={"input": ids, "instruction": "Find"}),
                    400)["param"] == "instruction"
