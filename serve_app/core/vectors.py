"""Vector arithmetic on returned embeddings: Matryoshka cuts, cosine, wire encodings.

The one similarity kernel: `/v1/similarity`, both Excel add-ins and the batch job
score with these functions. They normalise their inputs, because a model without a
Normalize module returns vectors of any length, and a dot product of those is not a
cosine.
"""

from __future__ import annotations

import base64

import numpy as np


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def truncate(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Matryoshka: keep the first `dimensions` values, then re-normalise."""
    if dimensions is None or dimensions >= vectors.shape[1]:
        return vectors
    return normalize(vectors[:, :dimensions])


def cosine_pairwise(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Cosine similarity of row i of `left` with row i of `right`, within [-1, 1]."""
    scores = np.einsum("ij,ij->i", normalize(np.atleast_2d(left)), normalize(np.atleast_2d(right)))
    return np.clip(scores, -1.0, 1.0)  # rounding can reach 1 + 1e-7


def cosine_matrix(left: np.ndarray, right: np.ndarray, right_normalized: bool = False) -> np.ndarray:
    """Cosine similarity of every row of `left` with every row of `right`, within [-1, 1].
    `right_normalized`: its rows are unit length already (a search's corpus, normalised once
    for every block of queries rather than again for each)."""
    right = np.atleast_2d(right) if right_normalized else normalize(np.atleast_2d(right))
    return np.clip(normalize(np.atleast_2d(left)) @ right.T, -1.0, 1.0)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors."""
    return float(cosine_pairwise(a, b)[0])


def to_base64(vector: np.ndarray) -> str:
    """OpenAI's base64 encoding: little-endian float32 bytes."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
