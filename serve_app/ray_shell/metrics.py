"""The service's metrics, exported through Ray's metrics system (Prometheus format).

Ray Serve adds the application, deployment and replica tags, and each node's
metrics agent serves them at `http://NODE:METRICS_EXPORT_PORT/metrics` with the
`ray_` prefix (e.g. `ray_embed_requests_total`). Outside Ray (tests, tools) the
Ray instruments record nothing; every count is also kept in `snapshot` so the
process itself can be asked.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

_SECONDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300]
_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


class Metrics:
    """Counters and histograms for one process (the ingress or a model replica)."""

    def __init__(self) -> None:
        from ray.serve import metrics

        def counter(name: str, description: str, tags: tuple[str, ...] = ()):
            return metrics.Counter(name, description=description, tag_keys=tags)

        def histogram(name: str, description: str, boundaries: list[float], tags: tuple[str, ...] = ()):
            return metrics.Histogram(name, description=description, boundaries=boundaries, tag_keys=tags)

        self._instruments: dict[str, Any] = {
            "embed_requests_total": counter(
                "embed_requests_total", "HTTP requests by route and status.", ("route", "status")),
            "embed_errors_total": counter(
                "embed_errors_total", "HTTP errors by route, status and error code.", ("route", "status", "code")),
            "embed_request_seconds": histogram(
                "embed_request_seconds", "Time from request to response in the ingress.", _SECONDS, ("route",)),
            "embed_texts_total": counter("embed_texts_total", "Texts sent to the model (after the cache)."),
            "embed_tokens_total": counter("embed_tokens_total", "Tokens the model embedded."),
            "embed_truncated_inputs_total": counter(
                "embed_truncated_inputs_total", "Inputs cut to max_input_tokens."),
            "embed_cache_hits_total": counter("embed_cache_hits_total", "Texts answered from the shared cache."),
            "embed_cache_misses_total": counter("embed_cache_misses_total", "Texts the cache did not hold."),
            "embed_batch_texts": histogram("embed_batch_texts", "Texts per forward pass.", _SIZES),
            "embed_queue_wait_seconds": histogram(
                "embed_queue_wait_seconds", "Time texts waited in the replica for a forward pass.", _SECONDS),
            "embed_cold_starts_total": counter("embed_cold_starts_total", "Model replicas started."),
            "embed_model_load_seconds": histogram(
                "embed_model_load_seconds", "Time a replica took to load its model.", _SECONDS),
        }
        self.snapshot: Counter[tuple] = Counter()

    def inc(self, name: str, value: float = 1, **tags: str) -> None:
        if value:
            self._instruments[name].inc(value, tags=tags or None)
            self.snapshot[(name, *sorted(tags.items()))] += value

    def observe(self, name: str, value: float, **tags: str) -> None:
        self._instruments[name].observe(value, tags=tags or None)
        # As a Prometheus histogram exports it: observations in `_count`, their total in `_sum`.
        self.snapshot[(name + "_count", *sorted(tags.items()))] += 1
        self.snapshot[(name + "_sum", *sorted(tags.items()))] += value

    def count(self, name: str, **tags: str) -> float:
        """The total recorded under `name` with these tags (all tags when none given)."""
        if tags:
            return self.snapshot[(name, *sorted(tags.items()))]
        return sum(v for k, v in self.snapshot.items() if k[0] == name)
