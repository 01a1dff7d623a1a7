"""Shared fixtures: the bundled model, a tiny Qwen3, the in-process app, one Ray cluster."""

from __future__ import annotations

import os

# No test may reach a model hub: these machines cannot, and CI must not try.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import socket  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

from serve_app.config import AppArgs  # noqa: E402
from serve_app.modelinfo import ModelSpec, resolve_model  # noqa: E402

BUNDLED = "bundled:minilm"


@pytest.fixture(scope="session")
def bundled_spec() -> ModelSpec:
    return resolve_model(BUNDLED)


@pytest.fixture(scope="session")
def bundled_embedder(bundled_spec):
    from serve_app.embedder import TextEmbedder

    return TextEmbedder(bundled_spec)


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory) -> Path:
    from tiny_qwen3 import build_tiny_qwen3

    return build_tiny_qwen3(tmp_path_factory.mktemp("models") / "tiny-qwen3")


def make_service(embedder, **overrides):
    from serve_app.service import EmbeddingService, LocalBackend

    args = AppArgs(model=embedder.spec.name, **overrides)
    return EmbeddingService(args, embedder.spec, LocalBackend(embedder))


@pytest.fixture(scope="session")
def app(bundled_embedder):
    from serve_app.api import create_app

    return create_app(make_service(bundled_embedder, max_inputs_per_request=64))


@pytest.fixture()
def http(app):
    """Starlette's TestClient: an httpx.Client that talks to the app in process."""
    from starlette.testclient import TestClient

    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture()
def openai_client(http):
    """The official OpenAI client, unchanged, pointed at the in-process app."""
    import openai

    return openai.OpenAI(base_url="http://testserver/v1", api_key="test-key", http_client=http)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
