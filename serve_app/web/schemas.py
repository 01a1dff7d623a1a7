"""Request and response shapes: OpenAI's embeddings wire format plus our extensions.

The request models validate input; the response models document the answers
in the OpenAPI document (the routes build plain dicts for speed).
"""

from __future__ import annotations

from typing import Literal, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve_app.core.cells import has_content
from serve_app.core.encoded import Item, TokenIds
from serve_app.core.errors import InvalidRequest

MAX_INSTRUCTION_CHARS = 4000
MAX_IGNORED_NAMES = 20  # unknown fields named back in X-Ignored-Fields and the log
TextOrTexts = Union[str, list[str]]  # noqa: UP007 - a runtime alias pydantic reads
# OpenAI's `input` also takes token ids: one array, or a list of arrays.
EmbeddingInput = Union[str, list[str], list[int], list[list[int]]]  # noqa: UP007


class _Strict(BaseModel):
    # Unknown fields are refused; no silent type coercion (True is not 1).
    model_config = ConfigDict(extra="forbid", strict=True)


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings.

    Fields this server does not know (provider options that LiteLLM forwards, vLLM's
    `truncate_prompt_tokens`, Open WebUI's prefix field, a client's `extra_body`) are
    ignored, as vLLM, TEI, infinity and Ollama ignore them, and named back in the
    `X-Ignored-Fields` response header. The fields below are validated strictly.
    """

    model_config = ConfigDict(extra="allow", strict=True)

    input: EmbeddingInput = Field(
        description=(
            "A text or a list of texts to embed. Token-id arrays are refused unless the "
            "server sets accept_token_ids, and then taken as the served model's own ids."
        )
    )
    model: str | None = Field(
        None, description="The served model id or one of its aliases (see /v1/models)."
    )
    encoding_format: Literal["float", "base64"] | None = Field(
        None, description="float (the default) or base64 little-endian float32."
    )
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

    def ignored_fields(self) -> list[str]:
        """The unknown fields' names (at most MAX_IGNORED_NAMES, each printable and short)."""
        names = sorted(self.model_extra or {})
        shown = [_printable_name(name) for name in names[:MAX_IGNORED_NAMES]]
        if len(names) > MAX_IGNORED_NAMES:
            shown.append(f"... {len(names) - MAX_IGNORED_NAMES} more")
        return shown


def _printable_name(name: str) -> str:
    # A header value is latin-1 and one line; names are the client's, so escape them.
    safe = name.encode("ascii", "backslashreplace").decode("ascii")
    safe = "".join(ch if ch.isprintable() and ch != "," else "?" for ch in safe)
    return safe if len(safe) <= 64 else safe[:61] + "..."


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
    system_fingerprint: str = Field(
        description="The model version the vectors came from (weights, token limit, precision, "
        "device); clients that cache vectors key them by it. fp_mixed: two versions answered "
        "(during a rolling update); ask again."
    )


class SimilarityResponse(BaseModel):
    object: Literal["similarity"] = "similarity"
    mode: Literal["pairwise", "matrix"]
    data: list[float] | list[list[float]]
    model: str
    usage: Usage
    truncated_left: list[int]
    truncated_right: list[int]
    system_fingerprint: str = Field(
        description="The model version the vectors came from (weights, token limit, precision, "
        "device); clients that cache vectors key them by it. fp_mixed: two versions answered "
        "(during a rolling update); ask again."
    )


class ModelRuntime(BaseModel):
    device: str
    dtype: str
    reason: str = Field(description="Why, e.g. why dtype=auto chose bfloat16 on this CPU; before "
                        "any replica has answered, the configured values and a note saying so.")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    dimensions: int
    min_dimensions: int = Field(description="The smallest `dimensions` a request may ask for.")
    max_input_tokens: int
    runtime: ModelRuntime
    system_fingerprint: str = Field(
        description="The model version this server answers with, as its embeddings say.")
    revision: str | None = Field(None, description="A hub model's commit, which every replica loads.")
    aliases: list[str] | None = Field(None, description="Other names a request's `model` may give it.")
    alias_of: str | None = Field(None, description="On an alias's card: the served model's id.")


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
    api_keys: bool = Field(description="Whether API keys guard the API (EMBED_API_KEYS or EMBED_API_KEY_DIGESTS "
                           "where the app was built).")


Model = TypeVar("Model", bound=BaseModel)


def parse(model: type[Model], payload: object) -> Model:
    """Validate a decoded JSON body, turning pydantic's errors into one readable 400."""
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise InvalidRequest(_describe(exc), param=_param(exc)) from None


def texts_of(value: TextOrTexts, field: str, max_items: int, max_chars: int | None = None,
             blank_ok: bool = False) -> list[str]:
    """The texts of an `input`-like field, refusing empty and oversized ones, and blank ones
    (only whitespace, control or format characters) unless `blank_ok`."""
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
        if not text:
            raise InvalidRequest(f"'{where}' is an empty string; every text must contain something to embed.",
                                 param=where)
        if not blank_ok and not has_content(text):
            raise InvalidRequest(
                f"'{where}' is only whitespace, control or invisible format characters; every text "
                "must contain something to compare.",
                param=where,
            )
        if max_chars is not None and len(text) > max_chars:
            raise InvalidRequest(
                f"'{where}' has {len(text)} characters; at most {max_chars} are allowed.",
                param=where,
                code="input_too_long",
            )
    return texts


def embedding_inputs(
    value: EmbeddingInput, *, max_items: int, max_chars: int, accept_token_ids: bool,
    vocab_size: int | None,
) -> list[Item]:
    """The texts, or token-id arrays as `TokenIds`, of an embeddings `input`."""
    if isinstance(value, str) or not value or isinstance(value[0], str):
        # Blank texts are embedded, as OpenAI's API does: clients send " " for an empty
        # document (BERTopic, for one) so that one does not fail the whole request.
        return texts_of(value, "input", max_items, max_chars, blank_ok=True)
    arrays = [value] if isinstance(value[0], int) else value
    if not accept_token_ids:
        raise InvalidRequest(
            "'input' holds token ids, not text. This server embeds text: token ids from a "
            "client are usually another model's (LangChain's OpenAIEmbeddings sends OpenAI's "
            "cl100k ids unless created with check_embedding_ctx_length=False), and would "
            "give wrong vectors. Send the texts themselves; if these are the served model's "
            "own ids, the operator can set accept_token_ids.",
            param="input",
            code="token_ids_not_supported",
        )
    if len(arrays) > max_items:
        raise InvalidRequest(
            f"'input' has {len(arrays)} token arrays; at most {max_items} are allowed per "
            "request. Split the list into several requests.",
            param="input",
            code="too_many_inputs",
        )
    high = vocab_size if vocab_size is not None else 2**31
    items = []
    for i, ids in enumerate(arrays):
        where = "input" if arrays is not value else f"input[{i}]"
        if not ids:
            raise InvalidRequest(f"'{where}' is an empty token array.", param=where)
        if len(ids) > max_chars:
            raise InvalidRequest(
                f"'{where}' has {len(ids)} token ids; at most {max_chars} are allowed.",
                param=where,
                code="input_too_long",
            )
        bad = next((t for t in ids if not 0 <= t < high), None)
        if bad is not None:
            raise InvalidRequest(
                f"'{where}' holds the token id {bad}; the served model's ids run from 0 to "
                f"{high - 1}.",
                param=where,
            )
        items.append(TokenIds(tuple(ids)))
    return items


def _first(exc: ValidationError) -> dict:
    """The most specific error: for a union, the branch that got furthest (input[3], not input)."""
    return max(exc.errors(), key=lambda error: len(error.get("loc", ())))


def _param(exc: ValidationError) -> str | None:
    loc = _first(exc).get("loc", ())
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part in ("str", "function-after", "literal") or str(part).startswith("list["):
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
    if (param or "").startswith(("left[", "right[")):
        return f"'{param}' must be a string."
    if (param or "").startswith("input["):
        return f"'{param}' must be a string; a list holds texts only, or token ids only."
    return f"Invalid value for '{param}': {first['msg']}."
