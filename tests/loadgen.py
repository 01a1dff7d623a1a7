"""Bounded client load for the fault tests: threads that post to 127.0.0.1 until stopped."""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx

TEXTS = [f"Clause {i}: the tenant shall pay rent on day {i % 28 + 1}." for i in range(64)]


class Load:
    """`clients` threads sending small embedding requests until stopped; records every outcome."""

    def __init__(self, url: str, clients: int = 4, texts: int = 8, pause_s: float = 0.05) -> None:
        self.url = url
        self.statuses: Counter[int] = Counter()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i, texts, pause_s), daemon=True) for i in range(clients)
        ]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def _run(self, worker: int, texts: int, pause_s: float) -> None:
        with httpx.Client(timeout=120) as client:
            n = 0
            while not self._stop.is_set() and n < 2000:
                start = (worker * 7 + n) % (len(TEXTS) - texts)
                try:
                    response = client.post(f"{self.url}/v1/embeddings", json={"input": TEXTS[start : start + texts]})
                    self.statuses[response.status_code] += 1
                    if response.status_code != 200:
                        self.failures.append(f"{response.status_code} {response.text[:200]}")
                except httpx.HTTPError as exc:
                    self.statuses[0] += 1
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                n += 1
                time.sleep(pause_s)

    @property
    def total(self) -> int:
        return sum(self.statuses.values())
