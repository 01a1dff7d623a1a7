"""Short texts sharing rows of a forward pass: the plan, the inputs, and the same vectors
as padding gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.corpus import sentences
from serve_app.core.modelinfo import resolve_model
from serve_app.model.embedder import TextEmbedder
from serve_app.model.rows import plan_passes, row_inputs

LENGTHS = [13, 51, 30, 900, 8, 64, 65, 2000, 20, 20, 20, 47, 3, 33] * 3


@pytest.mark.parametrize("budget", [64, 300, 1024])
def test_a_plan_places_every_text_once_within_the_budget(budget):
    passes = plan_passes(LENGTHS, budget, row_tokens=64)
    placed = sorted(i for rows in passes for row in rows for i in row)
    assert placed == list(range(len(LENGTHS)))
    for rows in passes:
        width = max(64, max(LENGTHS[i] for row in rows for i in row))
        assert all(sum(LENGTHS[i] for i in row) <= width for row in rows)
        assert len(rows) == 1 or len(rows) * width <= budget


def test_a_plan_shares_rows_among_short_texts_longest_first():
    passes = plan_passes([10, 40, 30, 20, 100], budget=256, row_tokens=64)
    # The 100-token text sets the rows at 100 tokens (two fit the budget); the rest fill one.
    assert passes == [[[4], [1, 2, 3, 0]]]


def test_row_inputs_keep_each_text_to_itself():
    input_ids, mask, positions, segments = row_inputs([[[5, 6, 7], [8, 9]], [[1]]], pad_id=0, causal=True)
    assert input_ids.tolist() == [[5, 6, 7, 8, 9], [1, 0, 0, 0, 0]]
    assert positions.tolist() == [[0, 1, 2, 0, 1], [0, 0, 0, 0, 0]]
    assert [(s.row, s.start, s.end) for s in segments] == [(0, 0, 3), (0, 3, 5), (1, 0, 1)]
    first = mask[0, 0].int().tolist()
    assert first[3] == [0, 0, 0, 1, 0] and first[4] == [0, 0, 0, 1, 1]  # causal, own text only
    assert first[2] == [1, 1, 1, 0, 0]
    padding = mask[1, 0].int().tolist()
    assert padding[2] == [0, 0, 1, 0, 0]  # a pad attends to itself only: no NaN
    both_ways = row_inputs([[[5, 6], [7]]], pad_id=0, causal=False)[1][0, 0].int().tolist()
    assert both_ways == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]


TEXTS = [*sentences(40), "合同任何一方可提前三十天书面通知终止本合同。" * 6, "ok", "x " * 150]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["bundled", "standin"])
def test_shared_rows_give_the_vectors_padding_gives(name, dtype, bundled_spec, small_standin_dir):
    spec = bundled_spec if name == "bundled" else resolve_model(str(small_standin_dir))
    model = TextEmbedder(spec, dtype=dtype, pack_cpu_weights=False)
    padded = model.encode(TEXTS)
    assert model.share_rows().startswith("Short texts share rows of a pass")
    shared = model.encode(TEXTS)
    cosines = (padded.vectors * shared.vectors).sum(1)  # both unit length
    assert cosines.min() >= (0.9999 if dtype == "float32" else 0.999)
    assert shared.tokens == padded.tokens


def test_rows_stay_off_when_they_would_change_an_embedding(bundled_spec, monkeypatch):
    import serve_app.model.rows as rows

    model = TextEmbedder(bundled_spec, dtype="float32")
    # A wrong guess of the model's attention (BERT attends both ways, not causally).
    real = rows.row_inputs
    monkeypatch.setattr(rows, "row_inputs", lambda r, pad_id, causal: real(r, pad_id, True))
    assert model.share_rows().startswith("Rows not shared: they changed an embedding")
    assert not model.rows_shared
    off = TextEmbedder(bundled_spec, dtype="float32", share_rows=False)
    assert off.share_rows() == "Rows not shared: share_rows is off" and not off.rows_shared
    assert not torch.isnan(torch.from_numpy(model.encode(TEXTS).vectors)).any()
    np.testing.assert_allclose(np.linalg.norm(model.encode(["a"]).vectors, axis=1), 1, atol=1e-5)
