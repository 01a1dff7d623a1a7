"""Several short texts in one row of a forward pass, instead of each padded to the longest.

A pass of texts of mixed lengths padded to its longest computes 30-40% padding
on the bench corpus (13-51 tokens a text). Here texts are laid end to end in
rows of at least `ROW_TOKENS` tokens, each attending only to itself (a
block-diagonal mask, causal for decoder models), with positions that restart at
every text, so each text's vector is what it is alone.

Only attention needs the rows. Everything else in a block (the linear layers,
most of the work, and the norms and activations) runs on the pass's tokens laid
flat, as one row of a batch of one (padded only to a multiple of `FLAT_MULTIPLE`
tokens): the model is given the flat tokens, and
its attention (`rows_attention`, registered with transformers under
`ATTENTION`) spreads queries, keys and values into the rows, attends under the
block mask and takes the real tokens back. Rows of 64 leave padding, 14% of a
16-text call of the bench corpus, that the linear layers would otherwise compute.

Only for models whose attention goes through transformers' attention interface
with sdpa; the embedder checks the result against the padded path on a few texts
before it turns this on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

# Rows at least this long (a text longer than this gets a row of its own length).
# Longer rows leave less padding but cost attention that grows with the row's square.
# The replica's scheduler in process on the stand-in, 8 clients of 16 texts: padding
# 13.4-14.3 texts/s; rows of 32: 16.6, 48: 17.4, 64: 18.5-19.5, 96: 18.5, 128: 14.9-17.9.
# With only attention in the rows (Sapphire Rapids slice, 2 workers x 1 thread, calls of
# 16 / 128 texts, against 64): 48: 0.94x / 0.93x, 96: 0.96x / 0.99x, 128: 0.96x / 0.98x.
ROW_TOKENS = 64


def plan_passes(lengths: list[int], budget: int, row_tokens: int = ROW_TOKENS) -> list[list[list[int]]]:
    """Texts (by index) grouped into passes of rows, each pass at most `budget` tokens.

    Longest first: a pass's rows are as long as its first text (or `row_tokens`),
    and every later text goes into the first row with room for it (first fit, which
    on lengths sorted from long to short wastes little); a pass holds
    max(1, budget // row length) rows.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    passes: list[list[list[int]]] = []
    while order:
        width = max(row_tokens, lengths[order[0]])
        room = [width] * max(1, budget // width)
        rows: list[list[int]] = [[] for _ in room]
        shortest = lengths[order[-1]]
        left = []
        for n, i in enumerate(order):
            if max(room) < shortest:  # full: nothing left can fit
                left.extend(order[n:])
                break
            for r, free in enumerate(room):
                if lengths[i] <= free:
                    rows[r].append(i)
                    room[r] -= lengths[i]
                    break
            else:
                left.append(i)
        passes.append([row for row in rows if row])
        order = left
    return passes


def padded_passes(lengths: list[int], budget: int) -> list[list[list[int]]]:
    """The same texts one to a row, padded: longest first, as many rows of the pass's
    longest as fit `budget` (at least one)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    passes = []
    start = 0
    while start < len(order):
        rows = max(1, budget // max(lengths[order[start]], 1))
        passes.append([[i] for i in order[start : start + rows]])
        start += rows
    return passes


# A pass's flat tokens are padded to a multiple of this. Every distinct token count is a
# new shape for oneDNN's kernels and the allocator: on the stand-in, two threads of mixed
# calls (8-112 texts, 60 s) left a process at 1.79 GB with the rows padded whole, 2.33
# unpadded, 1.89 at multiples of 16, 1.70 at 32, 1.64 at 64; the served replica 1.93,
# 2.00-2.01, 1.92-1.95 (16) and 1.89-1.91 (32). Padding costs throughput (2 workers,
# calls of 16 texts): 1.4% at 16, 3.2% at 32, 5% at 64.
FLAT_MULTIPLE = 16

# The model's attention implementation while rows are shared: sdpa, except in a pass
# given a `RowLayout`.
ATTENTION = "sdpa_shared_rows"


@dataclass
class RowLayout:
    """A pass's texts laid flat for the model, and where each token sits in the rows
    attention sees."""

    input_ids: torch.Tensor  # (1, tokens): every text's ids, end to end, row by row
    positions: torch.Tensor  # (1, tokens): restarting at 0 with every text
    spread: torch.Tensor  # (rows * width,): the flat token in each slot of the rows
    real: torch.Tensor  # the slots that hold flat tokens (not row padding), in flat order
    mask: torch.Tensor  # (rows, 1, width, width), boolean: which slots each slot attends to
    spans: list[tuple[int, int]]  # each text's tokens in the flat order

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float | None) -> torch.Tensor:
        """Attention over the rows for flat (1, heads, tokens, dim) states; (1, tokens,
        heads, dim) back, as transformers' attention functions give it."""
        rows, width = self.mask.shape[0], self.mask.shape[-1]
        heads, dim = query.shape[1], query.shape[3]

        def in_rows(states: torch.Tensor) -> torch.Tensor:
            flat = states[0].transpose(0, 1)  # (tokens, heads, dim)
            laid = flat.index_select(0, self.spread).view(rows, width, states.shape[1], dim)
            return laid.transpose(1, 2)

        out = torch.nn.functional.scaled_dot_product_attention(
            in_rows(query), in_rows(key), in_rows(value), attn_mask=self.mask, scale=scaling,
            enable_gqa=key.shape[1] != heads,
        )
        return out.transpose(1, 2).reshape(rows * width, heads, dim).index_select(0, self.real)[None]

    def text_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """For pooling each text over its own tokens (embedder.pool): a (texts, longest)
        index into the flat tokens and the mask of those that are the text's."""
        starts, ends = torch.tensor(self.spans, dtype=torch.long).unbind(1)
        offsets = torch.arange(int((ends - starts).max()))
        mask = offsets < (ends - starts)[:, None]
        return torch.where(mask, starts[:, None] + offsets, 0), mask.long()


def layout_rows(rows: list[list[list[int]]], causal: bool, pad_id: int = 0, multiple: int = 1) -> RowLayout:
    """The layout of rows given as lists of token-id lists (texts in order of appearance).

    `multiple`: the flat tokens are padded to a multiple of it, with a row of `pad_id`
    that attends to itself only and is pooled into nothing.
    """
    total = sum(len(ids) for row in rows for ids in row)
    if extra := -total % multiple:
        rows = [*rows, [[pad_id] * extra]]
    width = max(sum(len(ids) for ids in row) for row in rows)
    spread = torch.zeros((len(rows), width), dtype=torch.long)
    owner = torch.full((len(rows), width), -1, dtype=torch.long)  # which text a slot is of
    ids: list[int] = []
    positions: list[int] = []
    spans: list[tuple[int, int]] = []
    for r, row in enumerate(rows):
        slot = 0
        for text in row:
            start = len(ids)
            ids.extend(text)
            positions.extend(range(len(text)))
            spread[r, slot : slot + len(text)] = torch.arange(start, len(ids))
            owner[r, slot : slot + len(text)] = len(spans)
            spans.append((start, len(ids)))
            slot += len(text)
    if extra:
        spans.pop()  # the padding's
    mask = (owner[:, :, None] == owner[:, None, :]) & (owner[:, :, None] >= 0)
    if causal:
        mask &= torch.ones((width, width), dtype=torch.bool).tril()
    # A padding slot attends to itself: a query with nothing to attend to gives NaN,
    # which would reach real tokens through the values it multiplies (0 * NaN).
    mask |= torch.eye(width, dtype=torch.bool)
    return RowLayout(
        input_ids=torch.tensor([ids], dtype=torch.long),
        positions=torch.tensor([positions], dtype=torch.long),
        spread=spread.view(-1),
        real=(owner.view(-1) >= 0).nonzero().squeeze(1),
        mask=mask[:, None],
        spans=spans,
    )


def rows_attention(module, query, key, value, attention_mask, *, shared_rows: RowLayout | None = None,
                   **kwargs):
    """transformers' attention function while rows are shared: sdpa's own for a pass
    without a layout (a padded one), attention over the rows for a pass with one."""
    if shared_rows is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    # What the rows cannot honour: the check in share_rows() finds a model that asks for it.
    for name in ("sliding_window", "softcap", "position_bias", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"shared rows do not support attention with {name}")
    return shared_rows.attend(query, key, value, kwargs.get("scaling")), None


def register_attention() -> None:
    """Make `ATTENTION` known to transformers: its function, and sdpa's masks for the
    padded passes (once a model uses it, every pass asks for both)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTENTION, rows_attention)
    AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
