"""Several short texts in one row of a forward pass, instead of each padded to the longest.

A pass of texts of mixed lengths padded to its longest computes 30-40% padding
on the bench corpus (13-51 tokens a text). Here texts are laid end to end in
rows of at least `ROW_TOKENS` tokens, each attending only to itself (a
block-diagonal mask, causal for decoder models), with positions that restart at
every text, so each text's vector is what it is alone. The linear layers, most
of the work, then run on real tokens only.

Only for attention implementations that take a 4-D mask (sdpa, eager); the
embedder checks the result against the padded path on a few texts before it
turns this on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Rows at least this long (a text longer than this gets a row of its own length).
# Longer rows leave less padding but cost attention that grows with the row's square.
# The replica's scheduler in process on the stand-in, 8 clients of 16 texts: padding
# 13.4-14.3 texts/s; rows of 32: 16.6, 48: 17.4, 64: 18.5-19.5, 96: 18.5, 128: 14.9-17.9.
ROW_TOKENS = 64


@dataclass
class Segment:
    text: int  # the text's index in the caller's list
    row: int
    start: int
    end: int


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


def row_inputs(
    rows: list[list[list[int]]], pad_id: int, causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[Segment]]:
    """input_ids, a (rows, 1, L, L) boolean mask, position ids and where each text lies,
    for rows given as lists of token-id lists (text indices in order of appearance)."""
    width = max(sum(len(ids) for ids in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    owner = torch.full((len(rows), width), -1, dtype=torch.long)  # which text a token is of
    segments: list[Segment] = []
    for r, row in enumerate(rows):
        start = 0
        for ids in row:
            end = start + len(ids)
            input_ids[r, start:end] = torch.tensor(ids, dtype=torch.long)
            positions[r, start:end] = torch.arange(len(ids))
            owner[r, start:end] = len(segments)
            segments.append(Segment(len(segments), r, start, end))
            start = end
    mask = (owner[:, :, None] == owner[:, None, :]) & (owner[:, :, None] >= 0)
    if causal:
        mask &= torch.ones((width, width), dtype=torch.bool).tril()
    # A padding token attends to itself: a query with nothing to attend to gives NaN,
    # which would reach real tokens through the values it multiplies (0 * NaN).
    mask |= torch.eye(width, dtype=torch.bool)
    return input_ids, mask[:, None], positions, segments


def segment_masks(segments: list[Segment], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For pooling each text over its own tokens (embedder.pool): the row each lies in,
    and a (texts, width) mask of its tokens in that row."""
    rows = torch.tensor([s.row for s in segments], dtype=torch.long)
    masks = torch.zeros((len(segments), width), dtype=torch.long)
    for n, s in enumerate(segments):
        masks[n, s.start:s.end] = 1
    return rows, masks
