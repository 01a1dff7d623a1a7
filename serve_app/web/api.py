"""The HTTP API: thin Starlette routes that validate, call the service, shape the answer.

Every error leaves as OpenAI's envelope `{"error": {message, type, param, code}}`;
an unexpected exception is logged with its traceback and answered with a
generic 500 that reveals nothing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from serve_app.core.errors import (
    ClientClosed,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ServiceError,
)
from serve_app.core.vectors import cosine_matrix, cosine_pairwise, to_base64
from serve_app.web import excel, schemas
from serve_app.web.auth import APIKeyMiddleware
from serve_app.web.openapi import openapi_document
from serve_app.web.requestlog import RequestMiddleware
from serve_app.web.service import EmbeddingService

logger = logging.getLogger(__name__)

TRUNCATED_HEADER = "X-Truncated-Inputs"
IGNORED_HEADER = "X-Ignored-Fields"  # request fields this server does not know, ignored
MAX_MATRIX_CELLS = 1_000_000
_STARTED = int(time.time())


class JSONResponse(Response):
    """orjson-encoded JSON; numpy arrays serialise directly."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


async def embeddings(request: Request) -> Response:
    started = time.perf_counter()
    service: EmbeddingService = request.app.state.service
    body = schemas.parse(schemas.EmbeddingRequest, await read_json(request))
    ignored = body.ignored_fields()
    if ignored:  # names only: values may be anything, texts included
        logger.info("Ignored unknown request fields %s (request_id=%s)", ", ".join(ignored),
                    getattr(request.state, "request_id", "-"))
    service.check_model(body.model)
    service.check_dimensions(body.dimensions)
    args = service.args
    texts = schemas.embedding_inputs(
        body.input, max_items=args.max_inputs_per_request, max_chars=args.max_input_chars,
        accept_token_ids=args.accept_token_ids, vocab_size=service.spec.vocab_size,
    )
    request.state.texts = len(texts)
    as_text = isinstance(texts[0], str)
    if not as_text and (body.instruction or body.prompt_name):
        raise InvalidRequest(
            "'instruction' and 'prompt_name' apply to text; with token ids, send the prompt's "
            "tokens as part of each array.",
            param="instruction" if body.instruction else "prompt_name",
        )
    prefix = service.prefix(body.instruction, body.prompt_name) if as_text else ""
    result = await service.embed(texts, prefix, body.dimensions)
    encode = to_base64 if body.encoding_format == "base64" else _as_floats
    data = [
        {"object": "embedding", "index": i, "embedding": encode(vector)}
        for i, vector in enumerate(result.vectors)
    ]
    content = {
        "object": "list",
        "data": data,
        "model": service.model_id,
        "usage": {"prompt_tokens": result.total_tokens, "total_tokens": result.total_tokens},
        "truncated": result.truncated,
        "system_fingerprint": service.fingerprint_of(result.versions),
    }
    headers = _response_headers(len(result.truncated), started, result.model_ms)
    if ignored:
        headers[IGNORED_HEADER] = ", ".join(ignored)
    return JSONResponse(content, headers=headers)


async def similarity(request: Request) -> Response:
    started = time.perf_counter()
    service: EmbeddingService = request.app.state.service
    body = schemas.parse(schemas.SimilarityRequest, await read_json(request))
    service.check_model(body.model)
    service.check_dimensions(body.dimensions)
    limit, chars = service.args.max_inputs_per_request, service.args.max_input_chars
    left = schemas.texts_of(body.left, "left", limit, chars)
    right = schemas.texts_of(body.right, "right", limit, chars)
    request.state.texts = len(left) + len(right)
    if body.mode == "pairwise" and len(left) != len(right) and 1 not in (len(left), len(right)):
        raise InvalidRequest(
            f"Pairwise similarity needs lists of the same length (or one text on a side); "
            f"got {len(left)} left and {len(right)} right. Use mode='matrix' for all pairs.",
            param="right",
        )
    if body.mode == "matrix" and len(left) * len(right) > MAX_MATRIX_CELLS:
        raise InvalidRequest(
            f"A {len(left)} x {len(right)} matrix exceeds {MAX_MATRIX_CELLS} cells; "
            "send fewer texts per request.",
            param="right",
        )
    query_prefix = service.prefix(body.instruction, body.prompt_name)
    right_prefix = query_prefix if body.instruction_applies_to == "both" else ""
    a = await service.embed(left, query_prefix, body.dimensions)
    b = await service.embed(right, right_prefix, body.dimensions)
    if body.mode == "matrix":
        scores = cosine_matrix(a.vectors, b.vectors)
    else:
        n = max(len(left), len(right))
        scores = cosine_pairwise(_repeat(a.vectors, n), _repeat(b.vectors, n))
    tokens = a.total_tokens + b.total_tokens
    content = {
        "object": "similarity",
        "mode": body.mode,
        "data": scores.astype(np.float64),
        "model": service.model_id,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "truncated_left": a.truncated,
        "truncated_right": b.truncated,
        "system_fingerprint": service.fingerprint_of(a.versions | b.versions),
    }
    headers = _response_headers(
        len(a.truncated) + len(b.truncated), started, a.model_ms + b.model_ms
    )
    return JSONResponse(content, headers=headers)


async def list_models(request: Request) -> Response:
    """The served model first, then one card per alias."""
    service: EmbeddingService = request.app.state.service
    cards = [_model_card(service)]
    cards += [_model_card(service, alias) for alias in service.args.model_aliases]
    return JSONResponse({"object": "list", "data": cards})


async def get_model(request: Request) -> Response:
    service: EmbeddingService = request.app.state.service
    name = request.path_params["model"]
    service.check_model(name)
    return JSONResponse(_model_card(service, name if name in service.args.model_aliases else None))


async def health(request: Request) -> Response:
    """Liveness of the HTTP layer; it never calls (or wakes) the model."""
    service: EmbeddingService = request.app.state.service
    replica_state = getattr(service.backend, "replica_state", None)
    state = await replica_state() if replica_state is not None else "in-process"
    return JSONResponse({"status": "ok", "model": service.model_id, "replicas": state,
                         "api_keys": request.app.state.keyed})


async def openapi(request: Request) -> Response:
    return JSONResponse(request.app.state.openapi)


async def read_json(request: Request) -> Any:
    """The body as JSON, refusing bodies over the configured size before reading them whole."""
    limit = request.app.state.service.args.max_request_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:  # gone mid-upload: not a server error (and no one reads this)
        raise ClientClosed("The client closed the connection before its request was read.",
                           code="client_closed_request") from None
    raw = b"".join(chunks)
    if not raw.strip():
        raise InvalidRequest("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(
            f"The request body is not valid JSON ({exc}).", code="invalid_json"
        ) from None


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"The request body exceeds the limit of {limit} bytes; send fewer or shorter texts per request.",
        code="request_too_large",
    )


def _model_card(service: EmbeddingService, alias: str | None = None) -> dict:
    card = {
        "id": alias or service.model_id,
        "object": "model",
        "created": _STARTED,
        "owned_by": "embedding-service",
        "dimensions": service.spec.dimensions,
        "min_dimensions": service.args.min_dimensions,  # the smallest Matryoshka cut allowed
        "max_input_tokens": min(service.args.max_input_tokens, service.spec.max_tokens),
        "runtime": _runtime(service),
        "system_fingerprint": service.fingerprint,  # as every answer of this version says
    }
    if service.spec.revision is not None:  # a hub model: the commit every replica loads
        card["revision"] = service.spec.revision
    if alias is not None:
        card["alias_of"] = service.model_id
    elif service.args.model_aliases:
        card["aliases"] = list(service.args.model_aliases)
    return card


def _runtime(service: EmbeddingService) -> dict:
    """Device and precision as the last replica that answered reported them."""
    if service.runtime is not None:
        return asdict(service.runtime)
    return {"device": service.args.device, "dtype": service.args.dtype,
            "reason": "Each model replica decides when it loads; none has answered yet."}


def _as_floats(vector: np.ndarray) -> np.ndarray:
    return vector


def _repeat(vectors: np.ndarray, n: int) -> np.ndarray:
    return np.repeat(vectors, n, axis=0) if len(vectors) == 1 and n > 1 else vectors


def _response_headers(truncated: int, started: float, model_ms: float) -> dict[str, str]:
    # Server-Timing: forward-pass time and the whole time in this process, so a client
    # (or browser dev tools) can tell model time from queueing and transport.
    total_ms = (time.perf_counter() - started) * 1000
    return {
        TRUNCATED_HEADER: str(truncated),
        "Server-Timing": f"model;dur={model_ms:.1f}, ingress;dur={total_ms:.1f}",
    }


async def service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    request.state.error_code = exc.code or exc.error_type
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    return JSONResponse(exc.to_dict(), status_code=exc.status_code, headers=headers)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        path = request.url.path
        bare = path.rstrip("/")
        hint = f" (did you mean {bare}?)" if bare != path and bare in _ROUTE_PATHS else ""
        error: ServiceError = NotFound(f"No route {path}{hint}; see /openapi.json.")
    elif exc.status_code == 405:
        error = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}.")
    else:
        error = InvalidRequest(str(exc.detail))
        error.status_code = exc.status_code
    response = await service_error(request, error)
    response.headers.update(exc.headers or {})  # a 405's Allow
    return response


class UnexpectedErrorMiddleware:
    """Answers an unexpected exception with the generic 500 envelope, inside the other
    middleware, so that it still carries the request id and CORS headers. (Starlette's
    own handler for `Exception` runs outside all middleware.)"""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            request = Request(scope)
            logger.exception(
                "Unhandled error on %s %s (request_id=%s)", request.method, request.url.path,
                scope.get("state", {}).get("request_id", "-"),
            )
            if started:  # too late for an answer of our own
                raise
            error = ServiceError("The server hit an internal error; the request was not completed.")
            response = await service_error(request, error)
            await response(scope, receive, send)


ROUTES = [
    Route("/v1/embeddings", embeddings, methods=["POST"]),
    Route("/v1/similarity", similarity, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", get_model, methods=["GET"]),
    # For clients given a base URL without /v1, as TEI and infinity answer them.
    Route("/embeddings", embeddings, methods=["POST"]),
    Route("/models", list_models, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    # The Office add-in: its manifest and files, open like /health (serve_app.web.excel).
    Route(f"{excel.PREFIX}/manifest.xml", excel.manifest, methods=["GET"]),
    Route(excel.PREFIX + "/{name}", excel.addin_file, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
]


_ROUTE_PATHS = frozenset(route.path for route in ROUTES if "{" not in route.path)

def create_app(service: EmbeddingService, api_key_digests: list[str] | None = None) -> Starlette:
    """The ASGI app over a service (in process or through Ray); keys, if any, guard /v1."""
    middleware = []
    if service.args.cors_origins:
        # Outermost, so a browser's preflight is answered before the key check.
        middleware.append(Middleware(
            CORSMiddleware,
            allow_origins=service.args.cors_origins,
            allow_methods=["GET", "POST"],
            # Any request header: the origin list is the gate (and keys, where set). The
            # official openai client sends X-Stainless-* headers, whose set changes with
            # its versions, and OpenAI-Organization/-Project where configured.
            allow_headers=["*"],
            expose_headers=["X-Request-ID", TRUNCATED_HEADER, IGNORED_HEADER, "Retry-After"],
            max_age=600,
        ))
    middleware += [
        Middleware(RequestMiddleware, metrics=service.metrics, log_requests=service.args.log_requests),
        Middleware(APIKeyMiddleware, digests=api_key_digests or []),
        Middleware(UnexpectedErrorMiddleware),  # innermost: the others see its answer
    ]
    app = Starlette(
        routes=ROUTES,
        middleware=middleware,
        exception_handlers={
            ServiceError: service_error,
            HTTPException: http_error,
        },
    )
    # Starlette would answer /v1/embeddings/ with a bare 307 to an http:// address, which
    # behind the HTTPS front points at the wrong scheme; a 404 that names the route instead.
    app.router.redirect_slashes = False
    app.state.service = service
    app.state.keyed = bool(api_key_digests)  # /health says so: an operator can check from afar
    app.state.openapi = openapi_document(service.model_id)
    return app
