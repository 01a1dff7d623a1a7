"""The HTTP room: the Starlette app (routes, OpenAI schemas, keys, request log, OpenAPI)
and the request logic behind it (EmbeddingService, its cache).

It imports only the light room (serve_app.core): no torch and no Ray, so it runs in the
ingress, in process for tests and tools, and behind any backend that embeds.
"""
