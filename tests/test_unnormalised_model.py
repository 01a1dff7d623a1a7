"""A model without a Normalize module: every similarity the product shows is a cosine.

The API, the xlwings formulas and the batch job share one kernel (serve_app.core.vectors);
with unit vectors a dot product would do, and these tests make sure nothing relies on it.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pytest
from conftest import REFERENCE_DTYPE, make_service, wait_for

from serve_app.core.modelinfo import resolve_model

TEXTS = [
    "How much notice is needed to terminate the lease?",
    "Either party may terminate this lease with thirty days' written notice.",
    "The football match ended two to one after extra time.",
    "合同终止的条件是什么？",
]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a @ b.T) / np.outer(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def raw_embedder(unnormalised_dir):
    from serve_app.model.embedder import TextEmbedder

    embedder = TextEmbedder(resolve_model(str(unnormalised_dir)), dtype=REFERENCE_DTYPE)
    norms = np.linalg.norm(embedder.encode(TEXTS).vectors, axis=1)
    assert not np.allclose(norms, 1.0, atol=0.05), "the test model must not normalise"
    return embedder


@pytest.fixture(scope="module")
def raw_vectors(raw_embedder) -> dict[str, np.ndarray]:
    return dict(zip(TEXTS, raw_embedder.encode(TEXTS).vectors, strict=True))


@pytest.fixture(scope="module")
def raw_server(raw_embedder):
    """The service over the unnormalised model on a loopback port, in this process."""
    import uvicorn

    from serve_app.web.api import create_app

    app = create_app(make_service(raw_embedder))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 30, "the test server to listen")
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_similarity_endpoint_gives_cosines(raw_server, raw_vectors):
    import httpx

    body = {"left": TEXTS[:2], "right": TEXTS[1:3], "mode": "matrix"}
    scores = np.array(httpx.post(f"{raw_server}/v1/similarity", json=body, timeout=60).json()["data"])
    expected = cosines(np.stack([raw_vectors[t] for t in TEXTS[:2]]), np.stack([raw_vectors[t] for t in TEXTS[1:3]]))
    np.testing.assert_allclose(scores, expected, atol=1e-5)


def test_excel_formulas_give_cosines(raw_server, raw_vectors, monkeypatch):
    from excel_addin import udfs

    monkeypatch.setenv("EMBED_SERVER_URL", raw_server)
    for name in ("EMBED_API_KEY", "EMBED_INSTRUCTION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("excel_addin.settings._xlwings_user_config", lambda: {})
    a, b, c = (raw_vectors[t] for t in TEXTS[:3])
    expected = cosines(np.stack([a, a]), np.stack([b, c]))

    pairs = udfs.embed_sim([[TEXTS[0]], [TEXTS[0]]], [[TEXTS[1]], [TEXTS[2]]])
    assert [row[0] for row in pairs] == pytest.approx(np.diag(expected).tolist(), abs=1e-5)
    matrix = udfs.sim_matrix([[TEXTS[0]]], [[TEXTS[1]], [TEXTS[2]]])
    assert matrix[0] == pytest.approx(expected[0].tolist(), abs=1e-5)
    found = udfs.semantic_search(TEXTS[0], [[TEXTS[1]], [TEXTS[2]]], 2)
    assert {text: score for text, score in found} == pytest.approx(
        {TEXTS[1]: expected[0, 0], TEXTS[2]: expected[0, 1]}, abs=1e-5
    )


def test_batch_job_scores_are_cosines(unnormalised_dir, raw_vectors):
    from serve_app.batch.actors import EmbedRows
    from serve_app.batch.search import top_k
    from serve_app.core.config import AppArgs

    args = AppArgs(model=str(unnormalised_dir), dtype=REFERENCE_DTYPE)
    rows = EmbedRows(args.model_dump(), asdict(resolve_model(args.model)), 0.0)
    batch = pa.table({"q": [TEXTS[0], TEXTS[0], None], "d": [TEXTS[1], TEXTS[2], TEXTS[3]]})
    scored = asyncio.run(rows(batch, "similarity", ["q", "d"], ["", ""]))["similarity"].to_pylist()
    a, b, c = (raw_vectors[t] for t in TEXTS[:3])
    assert scored[:2] == pytest.approx([cosines(a[None], b[None])[0, 0], cosines(a[None], c[None])[0, 0]], abs=1e-5)
    assert scored[2] is None

    queries, corpus = pa.table({"q": [TEXTS[0]]}), pa.table({"d": TEXTS[1:]})
    best = top_k(queries, pa.array([raw_vectors[TEXTS[0]].tolist()]), corpus,
                 pa.array([raw_vectors[t].tolist() for t in TEXTS[1:]]), 3)
    expected = cosines(raw_vectors[TEXTS[0]][None], np.stack([raw_vectors[t] for t in TEXTS[1:]]))[0]
    assert best["score"].to_pylist() == pytest.approx(sorted(expected, reverse=True), abs=1e-5)
