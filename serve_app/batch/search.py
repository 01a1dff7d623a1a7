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
          k: int, chunk: int = 256) -> pa.Table:
    """Rows (query columns, rank, score, corpus_row, corpus columns), best match first; the
    vectors are the tables' rows' (None for a blank). The tables' own columns all pass
    through, an embed job's `embedding` too."""
    from serve_app.core.vectors import cosine_matrix

    corpus_vectors = corpus_vectors.to_pylist()
    usable = np.array([i for i, v in enumerate(corpus_vectors) if v is not None], dtype=np.int64)
    matrix = (np.asarray([corpus_vectors[i] for i in usable], dtype=np.float32)
              if len(usable) else np.zeros((0, 1), dtype=np.float32))
    query_vectors = query_vectors.to_pylist()
    k = min(k, len(usable))
    query_rows, ranks, scores, corpus_rows = [], [], [], []
    for start in range(0, len(query_vectors), chunk):
        block = query_vectors[start : start + chunk]
        present = [i for i, v in enumerate(block) if v is not None]
        best = np.zeros((len(block), k), dtype=np.int64)
        best_scores = np.zeros((len(block), k), dtype=np.float32)
        if present and k:
            sims = cosine_matrix(np.asarray([block[i] for i in present], dtype=np.float32), matrix)
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            top_scores = np.take_along_axis(sims, top, axis=1)
            order = np.argsort(-top_scores, axis=1, kind="stable")
            best[present] = np.take_along_axis(top, order, axis=1)
            best_scores[present] = np.take_along_axis(top_scores, order, axis=1)
        for i, vector in enumerate(block):
            if vector is None or not k:  # a blank query keeps its row, with nulls
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
