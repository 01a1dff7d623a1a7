"""The OpenAPI 3.1 document the app publishes at /openapi.json, built from the schemas."""

from __future__ import annotations

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from serve_app.web import schemas

_ERRORS = {
    "400": "Invalid input: an empty text (on /v1/similarity also a blank one), wrong types, dimensions out of range, too many inputs.",
    "401": "Missing or wrong API key (when keys are configured).",
    "404": "Unknown model.",
    "405": "Wrong method; the Allow header names the right one.",
    "413": "Request body over the size limit.",
    "500": "The model gave inf or NaN for a text (code model_output_not_finite: float16 is too "
           "narrow for it), or an internal fault (a generic message; details in the log).",
    "503": "Overloaded or model unavailable; retry after the Retry-After header.",
}


def openapi_document(model_id: str) -> dict:
    """Paths and component schemas for every route."""
    models: list[type[BaseModel]] = [
        schemas.EmbeddingRequest,
        schemas.EmbeddingResponse,
        schemas.SimilarityRequest,
        schemas.SimilarityResponse,
        schemas.ModelList,
        schemas.ModelCard,
        schemas.ErrorResponse,
        schemas.Health,
    ]
    _, top = models_json_schema(
        [(m, "validation" if m.__name__.endswith("Request") else "serialization") for m in models],
        ref_template="#/components/schemas/{model}",
    )
    embeddings = _post(
        "Embed texts (OpenAI-compatible). Unknown request fields are ignored and named in "
        "the X-Ignored-Fields response header.",
        "EmbeddingRequest", "EmbeddingResponse",
    )
    embeddings["post"]["responses"]["200"]["headers"] = {
        "X-Ignored-Fields": {
            "description": "Request fields this server does not know and ignored, comma-separated.",
            "schema": {"type": "string"},
        },
        "X-Truncated-Inputs": {
            "description": "How many inputs were cut to max_input_tokens.",
            "schema": {"type": "string"},
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Embedding service",
            "version": "0.1.0",
            "description": f"OpenAI-compatible text embeddings; serving '{model_id}'.",
        },
        "paths": {
            "/v1/embeddings": embeddings,
            "/embeddings": embeddings,  # the same, for clients whose base URL lacks /v1
            "/v1/similarity": _post(
                "Cosine similarity between two lists of texts, pairwise or as a matrix.",
                "SimilarityRequest",
                "SimilarityResponse",
            ),
            "/v1/models": _get("The served model, first, then one card per alias.", "ModelList"),
            "/models": _get("The same as /v1/models.", "ModelList"),
            "/v1/models/{model}": {
                **_get("One model by id.", "ModelCard"),
                "parameters": [
                    {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
            },
            "/health": _get("Liveness; never wakes a scaled-to-zero model.", "Health", errors=False),
        },
        "components": {"schemas": top["$defs"]},
    }


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _responses(ok: str, errors: bool) -> dict:
    responses = {"200": {"description": "OK", "content": {"application/json": {"schema": _ref(ok)}}}}
    if errors:
        for status, text in _ERRORS.items():
            responses[status] = {
                "description": text,
                "content": {"application/json": {"schema": _ref("ErrorResponse")}},
            }
    return responses


def _post(summary: str, request: str, response: str) -> dict:
    return {
        "post": {
            "summary": summary,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref(request)}},
            },
            "responses": _responses(response, errors=True),
        }
    }


def _get(summary: str, response: str, errors: bool = True) -> dict:
    return {"get": {"summary": summary, "responses": _responses(response, errors)}}
