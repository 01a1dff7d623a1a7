"""What an embed job's vectors were made with, kept in its Parquet output, and whether a
search may use them as they are: embedding a corpus once and searching it many times
then costs only the queries' embedding."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa

from serve_app.core.config import AppArgs
from serve_app.core.modelinfo import ModelSpec

METADATA_KEY = b"sheet_embeddings.vectors"
# A local model directory's weights: their files' names, sizes and times stand for them.
_WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


@dataclass(frozen=True)
class VectorsRecord:
    """Everything an `embedding` column's vectors depend on."""

    model: str  # what the weights were loaded from: a directory or a hub id
    weights: str  # a hub model's commit, or a local directory's weight files' stamp
    max_input_tokens: int
    dtype: str  # as asked ("auto" decides by the machine, as the service does)
    column: str  # the text column embedded
    prefix: str  # the prompt put before each text
    dimensions: int  # the vectors' length (a Matryoshka cut, or the model's own)

    @classmethod
    def of(cls, spec: ModelSpec, args: AppArgs, column: str, prefix: str, dimensions: int | None) -> VectorsRecord:
        """The record of vectors of `column` made now, with these settings."""
        return cls(model=spec.source, weights=weights_stamp(spec), max_input_tokens=args.max_input_tokens,
                   dtype=args.dtype, column=column, prefix=prefix, dimensions=dimensions or spec.dimensions)

    def to_metadata(self) -> dict[bytes, bytes]:
        return {METADATA_KEY: json.dumps(asdict(self), ensure_ascii=False).encode()}

    @classmethod
    def from_schema(cls, schema: pa.Schema) -> VectorsRecord | None:
        """The record in a Parquet file's schema; None where there is none (another tool's
        file, or an embed job's from before records were kept) or it cannot be read."""
        raw = (schema.metadata or {}).get(METADATA_KEY)
        try:
            record = cls(**json.loads(raw)) if raw else None
        except (TypeError, ValueError):
            return None
        kinds = {"max_input_tokens": int, "dimensions": int}
        if record is None or not all(isinstance(getattr(record, name), kinds.get(name, str))
                                     for name in record.__dataclass_fields__):
            return None  # a value of the wrong kind: edited by hand, or by another tool
        return record


def weights_stamp(spec: ModelSpec) -> str:
    """A hub model's commit; for a local directory, a digest of its weight files' names,
    sizes and modification times (new weights saved under the same path change it)."""
    if spec.revision:
        return spec.revision
    folder = Path(spec.source) / spec.subfolder
    files = sorted({file for pattern in _WEIGHTS for file in folder.glob(pattern)})
    stats = [(file.name, file.stat().st_size, file.stat().st_mtime_ns) for file in files]
    return "local-" + hashlib.sha1(repr(stats).encode()).hexdigest()[:12]


def why_not_reusable(records: list[VectorsRecord | None], wanted: VectorsRecord) -> str | None:
    """None where every file's vectors are what a search would make (or longer Matryoshka
    vectors of them, which cut to the same); else why not, as a phrase."""
    if None in records:
        return "it holds no record of how its vectors were made"
    if len(lengths := sorted({record.dimensions for record in records})) > 1:
        return f"its files' vectors have different lengths ({', '.join(map(str, lengths))})"
    for record in records:
        if (record.model, record.weights) != (wanted.model, wanted.weights):
            return f"its vectors are of another model ({record.model})"
        if record.column != wanted.column:
            return f"its vectors are of the column {record.column!r}"
        if record.prefix != wanted.prefix:
            return "its vectors were made with another prompt"
        for name in ("dtype", "max_input_tokens"):
            if getattr(record, name) != getattr(wanted, name):
                return (f"its vectors were made with {name}={getattr(record, name)}, and this search's "
                        f"is {getattr(wanted, name)}")
        if record.dimensions < wanted.dimensions:
            return f"its vectors have {record.dimensions} dimensions, fewer than {wanted.dimensions}"
    return None
