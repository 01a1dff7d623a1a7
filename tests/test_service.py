"""EmbeddingService's request logic with a backend that fails on purpose (pure logic)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from conftest import BUNDLED

from serve_app.core.config import AppArgs
from serve_app.core.encoded import Encoded
from serve_app.core.errors import ModelUnavailable
from serve_app.core.modelinfo import MIXED_FINGERPRINT, resolve_model
from serve_app.web.service import EmbeddingService


class HalfBroken:
    """The first chunk fails at once; every other chunk waits until it is cancelled."""

    def __init__(self) -> None:
        self.calls = 0
        self.cancelled = 0

    async def embed(self, texts: list[str]) -> Encoded:
        self.calls += 1
        if self.calls == 1:
            raise ModelUnavailable("replica lost", code="replica_lost")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return Encoded(np.zeros((len(texts), 4), np.float32), [1] * len(texts), [False] * len(texts))


def test_a_failing_chunk_cancels_its_siblings_and_its_error_is_the_answer():
    backend = HalfBroken()
    args = AppArgs(model=BUNDLED, max_batch_texts=2, cache_max_mb=0)
    service = EmbeddingService(args, resolve_model(BUNDLED), backend)

    async def scenario():
        with pytest.raises(ModelUnavailable, match="replica lost"):
            await service.embed([f"text {i}" for i in range(6)])
        deadline = time.monotonic() + 5  # the siblings' cancellation, as they notice it
        while backend.cancelled < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return backend.calls, backend.cancelled

    calls, cancelled = asyncio.run(scenario())
    assert calls == 3 and cancelled == 2


class Versioned:
    """Answers each chunk as a replica of the next version in `versions` would (a rolling update)."""

    def __init__(self, versions: list[str | None]) -> None:
        self.versions = list(versions)
        self.calls = 0

    async def embed(self, texts: list[str]) -> Encoded:
        version = self.versions[self.calls % len(self.versions)]
        self.calls += 1
        encoded = Encoded(np.ones((len(texts), 384), np.float32), [1] * len(texts), [False] * len(texts))
        encoded.version = version
        return encoded


def test_the_fingerprint_follows_the_prompt_settings_and_nothing_else_of_the_ingress():
    # The add-ins cache query vectors by prompt name; what `query` stands for is a setting.
    spec = resolve_model(BUNDLED)

    def fp(**settings) -> str:
        return EmbeddingService(AppArgs(model=BUNDLED, **settings), spec, Versioned([None])).fingerprint

    base = fp()
    assert fp(cache_max_mb=0, max_batch_texts=8) == base
    changed = [fp(query_instruction="Find the article"), fp(tasks={"legal": "Find the clause"}),
               fp(instruction_template="Task: {instruction}\nQuery: ")]
    assert len({base, *changed}) == 4


def test_an_answer_names_the_model_version_its_vectors_came_from():
    """system_fingerprint lets clients that cache vectors (the Excel add-ins) tell a same-name
    revision change; an answer holding two versions says so, and only its own are cached."""
    args = AppArgs(model=BUNDLED, max_batch_texts=2)
    other_args = AppArgs(model=BUNDLED, max_batch_texts=2, max_input_tokens=128)
    spec = resolve_model(BUNDLED)
    ours = EmbeddingService(args, spec, Versioned([None])).version
    theirs = EmbeddingService(other_args, spec, Versioned([None])).version
    assert ours != theirs  # another token limit: other vectors for long texts

    def answer(versions, texts):
        service = EmbeddingService(args, spec, Versioned(versions))
        result = asyncio.run(service.embed(texts))
        return service, service.fingerprint_of(result.versions)

    service, fp = answer([ours], ["a", "b"])
    assert fp == service.fingerprint and fp.startswith("fp_") and len(fp) == 13
    assert answer([None], ["a"])[1] == service.fingerprint  # a model in this process is ours
    service, fp = answer([theirs], ["a", "b"])
    assert fp != service.fingerprint  # an old replica answered all
    assert fp == EmbeddingService(other_args, spec, Versioned([None])).fingerprint
    asked_again = asyncio.run(service.embed(["a"]))  # not cached
    assert service.fingerprint_of(asked_again.versions) == fp
    service, fp = answer([ours, theirs], ["a", "b", "c", "d"])  # chunks from both versions
    assert fp == MIXED_FINGERPRINT
    # Its own chunk was cached (the other's was not): asked again, those texts are all its own.
    own = asyncio.run(service.embed(["a", "b"]))
    assert service.fingerprint_of(own.versions) == service.fingerprint
