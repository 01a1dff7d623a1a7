"""A search's ranking: the k best corpus rows for each query, from vectors already made,
and the names its output adds."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

# What a search adds after the queries' columns, before the corpus's (as corpus_NAME).
SEARCH_ADDS = ("rank", "score", "corpus_row")


def search_clashes(query_columns: list[str], corpus_columns: list[str]) -> list[str]:
    """A phrase for each name a search's output would hold twice; none when all are unique."""
    whose = {name: ["the queries' column"] for name in query_columns}
    for name in SEARCH_ADDS:
        whose.setdefault(name, []).append("the search's own")
    for name in corpus_columns:
        whose.setdefault(f"corpus_{name}", []).append(f"the corpus's column {name!r}")
    return [f"two columns named {name!r} ({' and '.join(sources)})"
            for name, sources in whose.items() if len(sources) > 1]


def top_k(queries: pa.Table, query_vectors: pa.Array, corpus: pa.Table, corpus_vectors: pa.Array,
          k: int, chunk: int = 256, dimensions: int | None = None) -> pa.Table:
    """Rows (query columns, rank, score, corpus_row, corpus columns), best match first; the
    vectors are the tables' rows' (None for a blank). The tables' own columns all pass
    through, an embed job's `embedding` too. `dimensions`: longer corpus vectors (an embed
    job's) are cut to it, Matryoshka's way, as the queries' were."""
    from serve_app.core.vectors import cosine_matrix, normalize

    usable, matrix = as_matrix(corpus_vectors)
    matrix = normalize(matrix[:, :dimensions])  # once, not for every block of queries
    with_vector, queries_matrix = as_matrix(query_vectors)
    position = np.full(len(query_vectors), -1, dtype=np.int64)  # a query's row in queries_matrix
    position[with_vector] = np.arange(len(with_vector))
    k = min(k, len(usable))
    query_rows, ranks, scores, corpus_rows = [], [], [], []
    for start in range(0, len(query_vectors), chunk):
        rows = position[start : start + chunk]
        block = [None if row < 0 else row for row in rows.tolist()]
        present = [i for i, row in enumerate(block) if row is not None]
        best = np.zeros((len(block), k), dtype=np.int64)
        best_scores = np.zeros((len(block), k), dtype=np.float32)
        if present and k:
            sims = cosine_matrix(queries_matrix[rows[present]], matrix, right_normalized=True)
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            top_scores = np.take_along_axis(sims, top, axis=1)
            order = np.argsort(-top_scores, axis=1, kind="stable")
            best[present] = np.take_along_axis(top, order, axis=1)
            best_scores[present] = np.take_along_axis(top_scores, order, axis=1)
        for i, row in enumerate(block):
            if row is None or not k:  # a blank query keeps its row, with nulls
                query_rows.append(start + i)
                ranks.append(None)
                scores.append(None)
                corpus_rows.append(None)
                continue
            for rank in range(k):
                query_rows.append(start + i)
                ranks.append(rank + 1)
                scores.append(float(best_scores[i, rank]))
                corpus_rows.append(int(usable[best[i, rank]]))
    out = queries.take(pa.array(query_rows, type=pa.int64()))
    rank, score, corpus_row = SEARCH_ADDS
    out = out.append_column(rank, pa.array(ranks, type=pa.int32()))
    out = out.append_column(score, pa.array(scores, type=pa.float32()))
    out = out.append_column(corpus_row, pa.array(corpus_rows, type=pa.int64()))
    matched = corpus.take(pa.array(corpus_rows, type=pa.int64()))
    for name in matched.column_names:
        out = out.append_column(f"corpus_{name}", matched[name])
    return out


def as_matrix(vectors: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """The rows that have a vector, and those vectors as one float32 matrix, straight from
    Arrow's buffers (`flatten` leaves the nulls out), a chunk at a time (one list array
    holds at most 2**31 numbers: 2.1 million vectors of 1,024). As Python lists, 50,000
    vectors of 1,024 took 6.5 s and 2.4 GB; Arrow's filter of the nulls first, 5 s for
    200,000. Vectors of two lengths are refused: flattened, they would fold into rows of
    neither."""
    import pyarrow.compute as pc

    chunks = vectors.chunks if isinstance(vectors, pa.ChunkedArray) else [vectors]
    rows, parts, start = [], [], 0
    for chunk in chunks:
        rows.append(start + np.flatnonzero(chunk.is_valid().to_numpy(zero_copy_only=False)))
        parts.append(chunk.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False))
        start += len(chunk)
    valid = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    if not len(valid):
        return valid, np.zeros((0, 1), dtype=np.float32)
    lengths = pc.min_max(pc.list_value_length(vectors)).as_py()
    if lengths["min"] != lengths["max"]:
        raise ValueError(f"vectors of two lengths ({lengths['min']} and {lengths['max']}) cannot be ranked together")
    return valid, np.concatenate(parts).reshape(len(valid), lengths["max"])
