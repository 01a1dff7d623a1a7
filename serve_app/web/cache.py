"""The shared embedding cache: a team embedding the same reference column pays once.

It lives in the ingress, in front of the model, so every client of the service
shares it. Entries are keyed by a hash of (model, prompt prefix, text); the
prefix is the instruction as applied, so a query and a document embedding of
the same text are different entries. Vectors are kept at full dimension and cut
per request, so one entry serves every Matryoshka `dimensions`. The cache is
bounded in bytes and evicts the least recently used entries.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from cachetools import LRUCache

from serve_app.core.encoded import Item, TokenIds

_ENTRY_OVERHEAD = 200  # bytes per entry beyond the vector: key, tuple, LRU bookkeeping


@dataclass(frozen=True)
class Cached:
    vector: np.ndarray  # float32, full dimension, read-only
    tokens: int
    truncated: bool


class EmbeddingCache:
    """A bytes-bounded LRU of embeddings; `hits` and `misses` count lookups."""

    def __init__(self, model: str, max_bytes: int) -> None:
        self.model = model
        self.max_bytes = max_bytes
        self._entries: LRUCache = LRUCache(maxsize=max(1, max_bytes), getsizeof=_size)
        self.hits = 0
        self.misses = 0

    def key(self, prefix: str, text: Item) -> bytes:
        digest = hashlib.blake2b(digest_size=20)
        if isinstance(text, TokenIds):  # a marker no text part can carry, then the ids
            parts = (self.model, prefix, b"\xff", np.asarray(text.ids, dtype="<i8").tobytes())
        else:
            parts = (self.model, prefix, text)
        for part in parts:
            data = part if isinstance(part, bytes) else part.encode("utf-8", "surrogatepass")
            digest.update(len(data).to_bytes(8, "little"))  # no ambiguity between parts
            digest.update(data)
        return digest.digest()

    def get(self, key: bytes) -> Cached | None:
        if not self.max_bytes:
            return None
        found = self._entries.get(key)
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found

    def put(self, key: bytes, vector: np.ndarray, tokens: int, truncated: bool) -> None:
        if not self.max_bytes:
            return
        stored = np.array(vector, dtype=np.float32, copy=True)
        stored.flags.writeable = False
        self._entries[key] = Cached(stored, int(tokens), bool(truncated))

    @property
    def bytes_used(self) -> int:
        return int(self._entries.currsize)

    def __len__(self) -> int:
        return len(self._entries)


def _size(entry: Cached) -> int:
    return entry.vector.nbytes + _ENTRY_OVERHEAD
