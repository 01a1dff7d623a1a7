"""What an embed job records of its vectors, and when a search may use them as they are."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pyarrow as pa
import pytest

from serve_app.batch.provenance import VectorsRecord, weights_stamp, why_not_reusable
from serve_app.batch.search import top_k
from serve_app.core.config import AppArgs
from serve_app.core.modelinfo import resolve_model


@pytest.fixture
def record(small_standin_dir) -> VectorsRecord:
    return VectorsRecord.of(resolve_model(str(small_standin_dir)), AppArgs(), "doc", "", None)


def test_a_record_survives_a_parquet_schema_and_a_foreign_or_broken_one_reads_as_none(record):
    schema = pa.schema([("doc", pa.string())]).with_metadata({b"pandas": b"{}", **record.to_metadata()})
    assert VectorsRecord.from_schema(schema) == record
    assert VectorsRecord.from_schema(pa.schema([("doc", pa.string())])) is None
    broken = schema.with_metadata({b"sheet_embeddings.vectors": b'{"model": "x"}'})
    assert VectorsRecord.from_schema(broken) is None
    wrong_kind = schema.with_metadata({b"sheet_embeddings.vectors": json.dumps(
        {**dataclasses.asdict(record), "dimensions": "1024"}).encode()})
    assert VectorsRecord.from_schema(wrong_kind) is None
    assert VectorsRecord.from_schema(schema.with_metadata({b"sheet_embeddings.vectors": b"[1, 2]"})) is None


def test_vectors_are_reused_only_when_made_as_the_search_would_make_them(record):
    assert why_not_reusable([record, record], record) is None
    # Longer Matryoshka vectors of the same model cut to the same; shorter ones cannot grow.
    assert why_not_reusable([dataclasses.replace(record, dimensions=record.dimensions * 2)], record) is None
    cases = {
        "model": "/models/other", "weights": "local-0123456789ab", "column": "title",
        "prefix": "Instruct: x\nQuery:", "dtype": "float32", "max_input_tokens": 512,
        "dimensions": record.dimensions // 2,
    }
    for name, value in cases.items():
        why = why_not_reusable([record, dataclasses.replace(record, **{name: value})], record)
        assert why is not None, name
    assert why_not_reusable([record, None], record) == "it holds no record of how its vectors were made"
    # A folder of two embed jobs' outputs, cut to two lengths: each alone would do.
    longer = dataclasses.replace(record, dimensions=record.dimensions * 2)
    assert why_not_reusable([record, longer], record) == (
        f"its files' vectors have different lengths ({record.dimensions}, {record.dimensions * 2})")
    assert why_not_reusable([dataclasses.replace(record, dtype="float32")], record) == (
        "its vectors were made with dtype=float32, and this search's is auto")


def test_new_weights_saved_under_the_same_directory_change_its_stamp(tmp_path):
    spec = resolve_model("bundled:minilm")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"a" * 10)
    local = dataclasses.replace(spec, source=str(folder), revision=None)
    before = weights_stamp(local)
    assert before.startswith("local-") and weights_stamp(local) == before
    (folder / "model.safetensors").write_bytes(b"b" * 10)  # new weights of the same size
    stat = (folder / "model.safetensors").stat()
    os.utime(folder / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert weights_stamp(local) != before
    assert weights_stamp(dataclasses.replace(local, revision="abc123")) == "abc123"  # a hub commit


def test_a_search_cuts_longer_corpus_vectors_to_the_queries_dimensions():
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((5, 8)).astype(np.float32)
    query = corpus[3, :4] + 0.01  # near row 3 in the first four dimensions only
    vectors = pa.array(list(corpus), type=pa.list_(pa.float32()))
    out = top_k(pa.table({"q": ["q"]}), pa.array([query], type=pa.list_(pa.float32())),
                pa.table({"doc": list("abcde")}), vectors, k=1, dimensions=4).to_pydict()
    assert out["corpus_row"] == [3] and out["score"][0] == pytest.approx(
        float(query @ corpus[3, :4] / np.linalg.norm(query) / np.linalg.norm(corpus[3, :4])), abs=1e-6)


def test_rows_added_to_an_embed_jobs_output_without_vectors_are_counted():
    from serve_app.batch.job import _texts_without_vectors

    corpus = pa.table({"doc": ["a", "  ", None, "added later", "b"],
                       "embedding": pa.array([[1.0], None, None, None, [2.0]], type=pa.list_(pa.float32()))})
    assert _texts_without_vectors(corpus, "doc") == 1  # blanks have no vector by design
    assert _texts_without_vectors(corpus.slice(0, 3), "doc") == 0
