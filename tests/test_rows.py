"""Short texts sharing rows of a forward pass: the plan, the layout, and the same vectors
as padding gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.corpus import sentences
from serve_app.core.modelinfo import resolve_model
from serve_app.model.embedder import TextEmbedder
from serve_app.model.rows import layout_rows, plan_passes

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


def test_a_layout_lays_the_texts_flat_and_keeps_each_to_itself_in_the_rows():
    layout = layout_rows([[[5, 6, 7], [8, 9]], [[1]]], causal=True)
    assert layout.input_ids.tolist() == [[5, 6, 7, 8, 9, 1]]  # no padding
    assert layout.positions.tolist() == [[0, 1, 2, 0, 1, 0]]
    assert layout.spans == [(0, 3), (3, 5), (5, 6)]
    # Spread into rows of 5 slots and taken back, the flat order is what it was.
    assert layout.spread[layout.real].tolist() == list(range(6))
    assert layout.spread.view(2, 5)[1, 0] == 5
    first = layout.mask[0, 0].int().tolist()
    assert first[3] == [0, 0, 0, 1, 0] and first[4] == [0, 0, 0, 1, 1]  # causal, own text only
    assert first[2] == [1, 1, 1, 0, 0]
    padding = layout.mask[1, 0].int().tolist()
    assert padding[2] == [0, 0, 1, 0, 0]  # a pad attends to itself only: no NaN
    both_ways = layout_rows([[[5, 6], [7]]], causal=False).mask[0, 0].int().tolist()
    assert both_ways == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]


def test_a_layout_pads_the_flat_tokens_with_a_row_that_keeps_to_itself():
    layout = layout_rows([[[5, 6, 7], [8, 9]]], causal=True, pad_id=0, multiple=8)
    assert layout.input_ids.tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    assert layout.spans == [(0, 3), (3, 5)]  # the padding is pooled into nothing
    assert layout.spread[layout.real].tolist() == list(range(8))
    padding = layout.mask[1, 0].int().tolist()
    assert padding[:3] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]
    assert layout_rows([[[5, 6, 7, 8]]], causal=True, multiple=4).input_ids.shape == (1, 4)


def test_rows_attention_equals_each_text_attending_alone():
    from serve_app.model.rows import rows_attention

    texts = [[1] * 5, [2] * 3, [3] * 7, [4] * 2]
    layout = layout_rows([[texts[0], texts[1]], [texts[2]], [texts[3]]], causal=True)
    tokens = layout.input_ids.shape[1]
    seeded = torch.Generator().manual_seed(0)
    query = torch.randn(1, 4, tokens, 8, generator=seeded)
    key, value = (torch.randn(1, 2, tokens, 8, generator=seeded) for _ in range(2))  # grouped
    out, _ = rows_attention(None, query, key, value, None, shared_rows=layout, scaling=None)
    assert out.shape == (1, tokens, 4, 8)
    for start, end in layout.spans:
        alone = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end].repeat_interleave(2, 1),
            value[:, :, start:end].repeat_interleave(2, 1), is_causal=True,
        )
        torch.testing.assert_close(out[0, start:end], alone[0].transpose(0, 1))


TEXTS = [*sentences(40), "合同任何一方可提前三十天书面通知终止本合同。" * 6, "ok", "x " * 150]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["bundled", "standin"])
def test_shared_rows_give_the_vectors_padding_gives(name, dtype, bundled_spec, small_standin_dir):
    spec = bundled_spec if name == "bundled" else resolve_model(str(small_standin_dir))
    model = TextEmbedder(spec, dtype=dtype, pack_cpu_weights=False)
    long_pair = ["x " * 150, "y " * 100]  # a row each: the padded path, with a padding mask
    padded, padded_pair = model.encode(TEXTS), model.encode(long_pair)
    assert model.share_rows().startswith("Short texts share rows of a pass")
    shared = model.encode(TEXTS)
    cosines = (padded.vectors * shared.vectors).sum(1)  # both unit length
    assert cosines.min() >= (0.9999 if dtype == "float32" else 0.999)
    assert shared.tokens == padded.tokens
    # Under the rows' attention implementation, padded passes are what they were.
    np.testing.assert_allclose(model.encode(long_pair).vectors, padded_pair.vectors, atol=1e-6)


def test_rows_stay_off_when_they_would_change_an_embedding(bundled_spec, monkeypatch):
    import serve_app.model.rows as rows

    model = TextEmbedder(bundled_spec, dtype="float32")
    # A wrong guess of the model's attention (BERT attends both ways, not causally).
    real = rows.layout_rows
    monkeypatch.setattr(rows, "layout_rows", lambda r, causal, **kw: real(r, True, **kw))
    assert model.share_rows().startswith("Rows not shared: they changed an embedding")
    assert not model.rows_shared
    off = TextEmbedder(bundled_spec, dtype="float32", share_rows=False)
    assert off.share_rows() == "Rows not shared: share_rows is off" and not off.rows_shared
    assert not torch.isnan(torch.from_numpy(model.encode(TEXTS).vectors)).any()
    np.testing.assert_allclose(np.linalg.norm(model.encode(["a"]).vectors, axis=1), 1, atol=1e-5)


def test_a_shared_pass_runs_its_blocks_on_its_tokens_laid_flat(small_standin_dir):
    from serve_app.model.embedder import _blocks
    from serve_app.model.rows import FLAT_MULTIPLE

    model = TextEmbedder(resolve_model(str(small_standin_dir)), pack_cpu_weights=False)
    assert model.share_rows().startswith("Short texts share rows of a pass")
    seen = []

    def record(_module, args, kwargs):
        seen.append(tuple((args[0] if args else kwargs["hidden_states"]).shape[:2]))

    _blocks(model.model)[0].register_forward_pre_hook(record, with_kwargs=True)
    texts = ["Reset password", "How do I export last quarter's invoices to a spreadsheet?", "ok", *TEXTS[:5]]
    encoded = model.encode(texts)
    assert len(seen) == 1  # one pass: one row of every text's tokens, padded to the multiple only
    assert seen[0] == (1, -(-sum(encoded.tokens) // FLAT_MULTIPLE) * FLAT_MULTIPLE)


def test_rows_stay_off_for_attention_other_than_sdpa_and_after_a_failed_check(bundled_spec, monkeypatch):
    import serve_app.model.rows as rows

    model = TextEmbedder(bundled_spec, dtype="float32")
    model.model.config._attn_implementation = "eager"
    assert model.share_rows() == "Rows not shared: the model runs eager attention (shared rows need sdpa)"
    model.model.config._attn_implementation = "sdpa"
    monkeypatch.setattr(rows.RowLayout, "attend", lambda *args: 1 / 0)
    assert model.share_rows().startswith("Rows not shared: they failed on this model (ZeroDivisionError")
    assert not model.rows_shared
    assert model.model.config._attn_implementation == "sdpa"  # padded passes as before
    np.testing.assert_allclose(np.linalg.norm(model.encode(TEXTS).vectors, axis=1), 1, atol=1e-5)
