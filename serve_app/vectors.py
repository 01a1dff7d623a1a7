"""Vector arithmetic on returned embeddings: Matryoshka cuts, cosine, wire encodings."""

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
    """Cosine similarity of row i of `left` with row i of `right`."""
    return np.einsum("ij,ij->i", normalize(left), normalize(right))


def cosine_matrix(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Cosine similarity of every row of `left` with every row of `right`."""
    return normalize(left) @ normalize(right).T


def to_base64(vector: np.ndarray) -> str:
    """OpenAI's base64 encoding: little-endian float32 bytes."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
