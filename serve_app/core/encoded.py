"""What crosses between the ingress and a model replica: inputs that are not text
(`TokenIds`), and the answer (vectors, token counts, where and how it ran).

They are pickled by Ray across the process boundary, so they live here, in the
light room, and import nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TokenIds:
    """An input given as the served model's own token ids (`accept_token_ids`), not text.

    The replica wraps them in the special tokens its tokenizer adds to a text (unless
    they are there already) and cuts them to the same limit, so the ids of a text
    embed as that text does.
    """

    ids: tuple[int, ...]


Item = str | TokenIds  # what a replica is asked to embed


@dataclass(frozen=True)
class Runtime:
    """Where and in what precision a replica runs its model, and why (shown by /v1/models)."""

    device: str  # "cpu", "cuda:0"
    dtype: str  # "bfloat16", "float32", "float16"
    reason: str  # one sentence, e.g. why dtype=auto chose bfloat16 on this CPU


@dataclass
class Encoded:
    """A model's answer for a list of texts, in input order.

    It lives in the light room, not beside the model, because the ingress
    unpickles it: the ingress process must never import torch.
    """

    vectors: np.ndarray  # float32, (n, dimensions); unit length when the model normalises
    tokens: list[int]  # tokens fed to the model per text, prompt and special tokens included
    truncated: list[bool]  # whether a text was cut to the token limit
    model_ms: float = 0.0  # time in the forward pass that produced these (shared by its batch)
    runtime: Runtime | None = None  # the replica's device and precision
    version: str | None = None  # the replica's model_version (core.modelinfo); None in process

    def slice(self, start: int, end: int) -> Encoded:
        return Encoded(
            self.vectors[start:end], self.tokens[start:end], self.truncated[start:end],
            self.model_ms, self.runtime, self.version,
        )
