"""What a request asks of the model, independent of HTTP and of Ray.

`EmbeddingService` checks the model id and dimensions, applies prompts, sends
each distinct text once, in chunks no larger than a dynamic batch, and puts the
answers back in request order. A backend does the embedding: in process for
tests and tools, or through a Ray Serve handle to the `Embedder` deployment.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from serve_app.core.config import AppArgs
from serve_app.core.encoded import Encoded, Item, Runtime
from serve_app.core.errors import InvalidRequest, ModelNotFound
from serve_app.core.modelinfo import MIXED_FINGERPRINT, ModelSpec, fingerprint, model_version
from serve_app.core.prompts import prompt_prefix
from serve_app.core.vectors import truncate
from serve_app.web.cache import EmbeddingCache


class Backend(Protocol):
    """Something that embeds at most `max_batch_texts` prompt-prefixed texts at a time."""

    async def embed(self, texts: list[Item]) -> Encoded: ...


@dataclass
class Embeddings:
    """Answer for one list of texts, in request order."""

    vectors: np.ndarray
    tokens: list[int]
    truncated: list[int]  # indices
    model_ms: float = 0.0  # slowest forward pass this answer waited for
    versions: frozenset[str] = frozenset()  # the model versions its vectors came from

    @property
    def total_tokens(self) -> int:
        return int(sum(self.tokens))


class EmbeddingService:
    """The model-facing half of every route."""

    def __init__(self, args: AppArgs, spec: ModelSpec, backend: Backend, metrics=None) -> None:
        self.args = args
        self.spec = spec
        self.backend = backend
        self.metrics = metrics  # serve_app.ray_shell.metrics.Metrics, or None
        self.cache = EmbeddingCache(args.model_id, args.cache_max_mb * 1024 * 1024)
        # Only answers of these settings are cached: during a rolling update (a new model
        # revision under the same served name) replicas of the old ones still answer.
        self.version = model_version(spec, args.max_input_tokens, args.dtype, args.device)
        # What a named prompt stands for is this ingress's setting, not the model's, and the
        # add-ins cache query vectors by prompt name (`prompt_name: query`): a change of the
        # prompt settings must read to them as another version.
        self._prompts = json.dumps([args.instruction_template, args.query_instruction, args.tasks],
                                   sort_keys=True)
        self.fingerprint = self._fingerprint(self.version)
        self.runtime: Runtime | None = None  # as the last replica that answered reported it

    @property
    def model_id(self) -> str:
        return self.args.model_id

    def check_model(self, model: str | None) -> None:
        """Refuse a model name this server does not serve (404, as OpenAI does).

        No name, the served id, the model as configured and its aliases all mean the model.
        """
        if model is None or model in (self.model_id, self.args.model, *self.args.model_aliases):
            return
        raise ModelNotFound(
            f"The model '{model}' does not exist on this server. It serves '{self.model_id}'; "
            "send that name, or ask the operator to add yours to the setting model_aliases.",
            param="model",
            code="model_not_found",
        )

    def check_dimensions(self, dimensions: int | None) -> None:
        """Matryoshka sizes run from min_dimensions up to the model's own width."""
        if dimensions is None:
            return
        low, high = self.args.min_dimensions, self.spec.dimensions
        if not low <= dimensions <= high:
            raise InvalidRequest(
                f"'dimensions' must be between {low} and {high} (the full width of "
                f"'{self.model_id}'); got {dimensions}.",
                param="dimensions",
            )

    def prefix(self, instruction: str | None, prompt_name: str | None) -> str:
        return prompt_prefix(self.spec, self.args, instruction=instruction, prompt_name=prompt_name)

    async def embed(self, texts: list[Item], prefix: str = "", dimensions: int | None = None) -> Embeddings:
        """Embed `texts` behind `prefix`; each distinct text goes to the model once, if at all.

        Token-id inputs (`TokenIds`) take no prefix: a prompt is text.
        """
        unique: dict[str, int] = {}
        slots = [unique.setdefault(text, len(unique)) for text in texts]
        distinct = list(unique)
        if self.cache.max_bytes:
            keys = [self.cache.key(prefix, text) for text in distinct]
            found = [self.cache.get(key) for key in keys]
        else:  # cache off: no hashing on the hot path
            keys, found = [b""] * len(distinct), [None] * len(distinct)
        missing = [i for i, hit in enumerate(found) if hit is None]
        vectors = np.empty((len(distinct), self.spec.dimensions), dtype=np.float32)
        tokens = [0] * len(distinct)
        cut = [False] * len(distinct)
        for i, hit in enumerate(found):
            if hit is not None:
                vectors[i], tokens[i], cut[i] = hit.vector, hit.tokens, hit.truncated
        model_ms = 0.0
        # The cache holds only this ingress's own version.
        versions = {self.version} if len(missing) < len(distinct) else set()
        if missing:
            model_ms, answered = await self._embed_missing(
                distinct, missing, keys, prefix, vectors, tokens, cut)
            versions |= answered
        self._record(len(distinct) - len(missing), missing, tokens, cut)
        return Embeddings(
            vectors=truncate(vectors, dimensions)[slots],
            tokens=[tokens[s] for s in slots],
            truncated=[i for i, s in enumerate(slots) if cut[s]],
            model_ms=model_ms,
            versions=frozenset(versions),
        )

    def fingerprint_of(self, versions: frozenset[str]) -> str:
        """The system_fingerprint of an answer from these versions (none: the ingress's own)."""
        if versions <= {self.version}:
            return self.fingerprint
        if len(versions) > 1:
            return MIXED_FINGERPRINT  # during a rolling update: the clients ask again
        return self._fingerprint(next(iter(versions)))

    def _fingerprint(self, version: str) -> str:
        return fingerprint(f"{version} prompts={self._prompts}")

    async def _embed_missing(self, distinct, missing, keys, prefix, vectors, tokens, cut
                             ) -> tuple[float, set[str]]:
        size = self.args.max_batch_texts
        todo = [_prefixed(prefix, distinct[i]) for i in missing]
        parts = await _all_or_nothing(
            [self.backend.embed(todo[i : i + size]) for i in range(0, len(todo), size)]
        )
        position, versions = 0, set()
        self.runtime = parts[-1].runtime or self.runtime
        for part in parts:
            ours = part.version in (None, self.version)  # None: a model in this process
            versions.add(self.version if ours else part.version)
            for j in range(len(part.tokens)):
                i = missing[position]
                vectors[i], tokens[i], cut[i] = part.vectors[j], part.tokens[j], part.truncated[j]
                if ours:
                    self.cache.put(keys[i], part.vectors[j], part.tokens[j], part.truncated[j])
                position += 1
        return max(p.model_ms for p in parts), versions

    def _record(self, hits: int, missing: list[int], tokens: list[int], cut: list[bool]) -> None:
        if self.metrics is None:
            return
        self.metrics.inc("embed_cache_hits_total", hits)
        self.metrics.inc("embed_cache_misses_total", len(missing))
        self.metrics.inc("embed_texts_total", len(missing))
        self.metrics.inc("embed_tokens_total", sum(tokens[i] for i in missing))
        self.metrics.inc("embed_truncated_inputs_total", sum(cut[i] for i in missing))


def _prefixed(prefix: str, item: Item) -> Item:
    return prefix + item if isinstance(item, str) else item


async def _all_or_nothing(coroutines: list) -> list:
    """Results of all, in order; when one fails (or the caller is cancelled), the others are
    cancelled rather than left to occupy the model for an answer nobody will read."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failed = next((t for t in tasks if t in done and not t.cancelled() and t.exception()), None)
        if failed is not None:
            raise failed.exception()
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class LocalBackend:
    """Embeds in this process (tests, tools): one forward pass at a time, off the event loop."""

    def __init__(self, embedder) -> None:
        import threading

        self.embedder = embedder
        self._lock = threading.Lock()

    async def embed(self, texts: list[str]) -> Encoded:
        return await asyncio.to_thread(self._encode, texts)

    def _encode(self, texts: list[str]) -> Encoded:
        import time

        with self._lock:
            started = time.perf_counter()
            encoded = self.embedder.encode(texts)
        encoded.model_ms = (time.perf_counter() - started) * 1000
        return encoded
