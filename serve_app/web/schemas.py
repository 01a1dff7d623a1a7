"""Request and response shapes: OpenAI's embeddings wire format plus our extensions.

The request models validate input; the response models document the answers
in the OpenAPI document (the routes build plain dicts for speed).
"""

from __future__ import annotations

from typing import Literal, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve_app.core.errors import InvalidRequest

MAX_INSTRUCTION_CHARS = 4000
TextOrTexts = Union[str, list[str]]  # noqa: UP007 - a runtime alias pydantic reads


class _Strict(BaseModel):
    # Unknown fields are refused as OpenAI does; no silent type coercion (True is not 1).
    model_config = ConfigDict(extra="forbid", strict=True)


class EmbeddingRequest(_Strict):
    """POST /v1/embeddings."""

    input: TextOrTexts = Field(description="A text or a list of texts to embed.")
    model: str | None = Field(None, description="The served model id (see /v1/models).")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(
        None, description="Matryoshka: keep the first N dimensions, re-normalised."
    )
    user: str | None = Field(None, max_length=256)
    instruction: str | None = Field(
        None,
        max_length=MAX_INSTRUCTION_CHARS,
        description="Task for query embeddings: 'Instruct: {instruction}\\nQuery:' is prepended.",
    )
    prompt_name: str | None = Field(
        None, max_length=128, description="'query', 'document', or a task named in the config."
    )


class SimilarityRequest(_Strict):
    """POST /v1/similarity."""

    left: TextOrTexts
    right: TextOrTexts
    mode: Literal["pairwise", "matrix"] = Field(
        "pairwise",
        description="pairwise: left[i] with right[i] (one text broadcasts); matrix: all pairs.",
    )
    model: str | None = None
    dimensions: int | None = None
    instruction: str | None = Field(None, max_length=MAX_INSTRUCTION_CHARS)
    prompt_name: str | None = Field(None, max_length=128)
    instruction_applies_to: Literal["left", "both"] = Field(
        "left", description="Queries on the left take the instruction; 'both' for symmetric tasks."
    )
    user: str | None = Field(None, max_length=256)


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="Floats, or base64 little-endian float32.")


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage
    truncated: list[int] = Field(
        description="Indices of inputs cut to max_input_tokens (also in X-Truncated-Inputs)."
    )


class SimilarityResponse(BaseModel):
    object: Literal["similarity"] = "similarity"
    mode: Literal["pairwise", "matrix"]
    data: list[float] | list[list[float]]
    model: str
    usage: Usage
    truncated_left: list[int]
    truncated_right: list[int]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    dimensions: int
    max_input_tokens: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    replicas: str = Field(description="Whether the model is loaded; /health never wakes it.")


Model = TypeVar("Model", bound=BaseModel)


def parse(model: type[Model], payload: object) -> Model:
    """Validate a decoded JSON body, turning pydantic's errors into one readable 400."""
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise InvalidRequest(_describe(exc), param=_param(exc)) from None


def texts_of(value: TextOrTexts, field: str, max_items: int, max_chars: int | None = None) -> list[str]:
    """The texts of an `input`-like field, refusing empty, blank and oversized ones."""
    texts = [value] if isinstance(value, str) else value
    if not texts:
        raise InvalidRequest(f"'{field}' must not be an empty list.", param=field)
    if len(texts) > max_items:
        raise InvalidRequest(
            f"'{field}' has {len(texts)} texts; at most {max_items} are allowed per request. "
            "Split the list into several requests.",
            param=field,
            code="too_many_inputs",
        )
    for i, text in enumerate(texts):
        where = field if isinstance(value, str) else f"{field}[{i}]"
        if not _has_content(text):
            raise InvalidRequest(
                f"'{where}' is empty or only whitespace or control characters; every text must "
                "contain something to embed.",
                param=where,
            )
        if max_chars is not None and len(text) > max_chars:
            raise InvalidRequest(
                f"'{where}' has {len(text)} characters; at most {max_chars} are allowed.",
                param=where,
                code="input_too_long",
            )
    return texts


def _has_content(text: str) -> bool:
    """Whether a text holds anything but whitespace and control characters."""
    stripped = text.strip()
    if not stripped:
        return False
    if stripped[0].isprintable():  # the common case, decided by one character
        return True
    return any(ch.isprintable() and not ch.isspace() for ch in stripped)


def _first(exc: ValidationError) -> dict:
    """The most specific error: for a union, the branch that got furthest (input[3], not input)."""
    return max(exc.errors(), key=lambda error: len(error.get("loc", ())))


def _param(exc: ValidationError) -> str | None:
    loc = _first(exc).get("loc", ())
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part in ("str", "list[str]", "function-after", "literal"):
            continue  # pydantic's union-branch labels, not field names
        else:
            name += ("." if name else "") + str(part)
    return name or None


def _describe(exc: ValidationError) -> str:
    first = _first(exc)
    param = _param(exc)
    if first["type"] == "extra_forbidden":
        return f"Unrecognized request argument supplied: '{param}'."
    if first["type"] == "missing":
        return f"Missing required argument: '{param}'."
    if param in ("input", "left", "right"):
        return f"'{param}' must be a string or a list of strings."
    if (param or "").startswith(("input[", "left[", "right[")):
        return f"'{param}' must be a string (token-id arrays are not supported; send text)."
    return f"Invalid value for '{param}': {first['msg']}."
