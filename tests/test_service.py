"""EmbeddingService's request logic with a backend that fails on purpose (pure logic)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from conftest import BUNDLED

from serve_app.core.config import AppArgs
from serve_app.core.encoded import Encoded
from serve_app.core.errors import ModelUnavailable
from serve_app.core.modelinfo import resolve_model
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
        await asyncio.sleep(0)  # give any left-over sibling a turn to notice
        return backend.calls, backend.cancelled

    calls, cancelled = asyncio.run(scenario())
    assert calls == 3 and cancelled == 2
