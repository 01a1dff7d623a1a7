import base64

import numpy as np

from serve_app.core.vectors import cosine_matrix, cosine_pairwise, normalize, to_base64, truncate


def test_truncate_renormalises():
    rng = np.random.default_rng(0)
    v = normalize(rng.normal(size=(3, 64)).astype(np.float32))
    cut = truncate(v, 32)
    assert cut.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(cut, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(cut, v[:, :32] / np.linalg.norm(v[:, :32], axis=1, keepdims=True), rtol=1e-5)


def test_truncate_to_full_width_is_identity():
    v = np.eye(4, dtype=np.float32)
    assert truncate(v, None) is v
    assert truncate(v, 4) is v


def test_cosine_pairwise_and_matrix_agree():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))
    matrix = cosine_matrix(a, b)
    np.testing.assert_allclose(cosine_pairwise(a, b), np.diag(matrix), rtol=1e-6)
    assert matrix.shape == (5, 5)
    np.testing.assert_allclose(cosine_pairwise(a, a), 1.0, rtol=1e-6)


def test_base64_is_little_endian_float32():
    v = np.array([1.0, -2.5, 0.125], dtype=np.float32)
    decoded = np.frombuffer(base64.b64decode(to_base64(v)), dtype="<f4")
    np.testing.assert_array_equal(decoded, v)
