"""API keys: 401 in the OpenAI envelope without a valid key; /health stays open."""

import openai
import pytest
from conftest import BUNDLED, make_service
from starlette.testclient import TestClient

from serve_app.web.api import create_app
from serve_app.web.auth import key_digests_from_env, keys_as_digests


@pytest.fixture()
def guarded(bundled_embedder):
    digests = key_digests_from_env({"EMBED_API_KEYS": "alpha-key, beta-key ,"})
    with TestClient(create_app(make_service(bundled_embedder), digests)) as client:
        yield client


def test_digests_only_never_the_keys():
    digests = key_digests_from_env({"EMBED_API_KEYS": "secret-one,secret-two"})
    assert len(digests) == 2 and all(len(d) == 64 for d in digests)
    assert not any("secret" in d for d in digests)
    assert key_digests_from_env({}) == []


def test_a_launcher_passes_on_the_keys_digests_and_they_guard_the_api_as_the_keys_do(bundled_embedder):
    passed_on = keys_as_digests({"EMBED_API_KEYS": "alpha-key,beta-key", "PATH": "/bin"})
    assert "EMBED_API_KEYS" not in passed_on and "alpha" not in str(passed_on)
    assert key_digests_from_env(passed_on) == key_digests_from_env({"EMBED_API_KEYS": "alpha-key,beta-key"})
    with TestClient(create_app(make_service(bundled_embedder), key_digests_from_env(passed_on))) as client:
        assert client.get("/v1/models", headers={"Authorization": "Bearer beta-key"}).status_code == 200
        assert client.get("/v1/models", headers={"Authorization": "Bearer gamma-key"}).status_code == 401
    assert keys_as_digests({"PATH": "/bin"}) == {"PATH": "/bin"}
    with pytest.raises(ValueError, match="EMBED_API_KEY_DIGESTS"):
        key_digests_from_env({"EMBED_API_KEY_DIGESTS": "alpha-key"})  # a key where its digest goes


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "alpha-key"},
     {"Authorization": "Basic alpha-key"}, {"Authorization": "Bearer "}],
)
def test_every_route_but_health_and_openapi_needs_a_valid_key(guarded, headers):
    routes = [("POST", "/v1/embeddings"), ("POST", "/v1/similarity"), ("GET", "/v1/models"),
              ("POST", "/embeddings"), ("GET", "/models"), ("GET", "/no/such/route")]
    for method, path in routes:
        response = guarded.request(method, path, headers=headers, json={"input": "x"})
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["code"] == "invalid_api_key"


def test_each_configured_key_works_and_health_stays_open(guarded):
    for key in ("alpha-key", "beta-key"):
        reply = guarded.post("/v1/embeddings", headers={"Authorization": f"Bearer {key}"},
                             json={"input": "x"})
        assert reply.status_code == 200
    assert guarded.get("/health").status_code == 200
    assert guarded.get("/openapi.json").status_code == 200


def test_health_says_whether_keys_guard_the_api(guarded, http):
    # With `serve deploy` the keys are read on the cluster, not in the deploying shell: an
    # operator checks from afar that they took effect.
    assert guarded.get("/health").json()["api_keys"] is True
    assert http.get("/health").json()["api_keys"] is False


def test_official_client_sends_its_key(guarded):
    good = openai.OpenAI(base_url="http://testserver/v1", api_key="beta-key", http_client=guarded)
    assert len(good.embeddings.create(model=BUNDLED, input="x").data) == 1
    bad = openai.OpenAI(base_url="http://testserver/v1", api_key="nope", http_client=guarded,
                        max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.embeddings.create(model=BUNDLED, input="x")


def test_without_keys_everything_is_open(http):
    assert http.post("/v1/embeddings", json={"input": "x"}).status_code == 200
