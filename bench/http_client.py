"""The benchmark's HTTP client, run as its own process as real clients are.

    python bench/http_client.py throughput URL --concurrency 8 --per-request 16 --texts 2000
    python bench/http_client.py latency URL --requests 25 --offset 0
    python bench/http_client.py latency https://127.0.0.1:8443 --cafile ca.pem

Prints one JSON object. It asks for base64, as the official openai client does.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).parent))
from corpus import sentences, short_texts  # noqa: E402


def check(content: bytes, count: int) -> None:
    """The answer holds `count` vectors, the first decodable as base64 float32."""
    data = orjson.loads(content)["data"]
    assert len(data) == count
    np.frombuffer(base64.b64decode(data[0]["embedding"]), dtype="<f4")


def ok(reply: httpx.Response) -> bytes:
    reply.raise_for_status()
    return reply.content


def trust(cafile: str | None):
    """httpx's verify: the system's CAs, or the one CA file given."""
    import ssl

    return ssl.create_default_context(cafile=cafile) if cafile else True


async def throughput(url: str, texts: int, per_request: int, concurrency: int,
                     cafile: str | None = None) -> dict:
    """Texts a second over `concurrency` keep-alive connections.

    aiohttp rather than httpx: the client shares the server's cores in these runs, and
    httpx's async client spends 1.2-1.4 ms of CPU a request against aiohttp's 0.5 ms
    (bench/NOTES.md). Real clients run on other machines; this keeps the harness's share small.
    """
    import ssl

    import aiohttp

    corpus = sentences(texts)
    chunks = [corpus[i : i + per_request] for i in range(0, len(corpus), per_request)]
    connector = aiohttp.TCPConnector(
        limit=concurrency, ssl=ssl.create_default_context(cafile=cafile) if cafile else True)
    endpoint = f"{url.rstrip('/')}/v1/embeddings"  # the URL may hold a route prefix (/bench)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as client:

        async def post(chunk: list[str]) -> None:
            body = orjson.dumps({"input": chunk, "encoding_format": "base64"})
            async with client.post(endpoint, data=body,
                                   headers={"Content-Type": "application/json"}) as reply:
                if reply.status != 200:
                    raise RuntimeError(f"HTTP {reply.status}: {(await reply.text())[:300]}")
                check(await reply.read(), len(chunk))

        await asyncio.gather(*(post(chunk[:1]) for chunk in chunks[:concurrency]))  # open the connections
        queue: asyncio.Queue = asyncio.Queue()
        for chunk in chunks:
            queue.put_nowait(chunk)

        async def worker() -> None:
            while not queue.empty():
                await post(queue.get_nowait())

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return {"texts_per_s": len(corpus) / (time.perf_counter() - start)}


def latency(url: str, requests: int, offset: int, cafile: str | None = None) -> dict:
    """Milliseconds per request, and the server's own split from its Server-Timing header."""
    import re

    texts = short_texts(offset + requests + 5)
    out, ingress, model = [], [], []
    with httpx.Client(base_url=url, timeout=120, verify=trust(cafile)) as client:
        for text in texts[:5]:
            check(ok(client.post("/v1/embeddings", json={"input": text, "encoding_format": "base64"})), 1)
        for text in texts[offset + 5 :]:
            start = time.perf_counter()
            reply = client.post("/v1/embeddings", json={"input": text, "encoding_format": "base64"})
            out.append((time.perf_counter() - start) * 1000)
            check(ok(reply), 1)
            timing = dict(re.findall(r"(\w+);dur=([\d.]+)", reply.headers.get("server-timing", "")))
            ingress.append(float(timing.get("ingress", "nan")))
            model.append(float(timing.get("model", "nan")))
    return {"ms": out, "ingress_ms": ingress, "model_ms": model}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["throughput", "latency"])
    parser.add_argument("url")
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--per-request", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--cafile", help="trust this CA (PEM) for an https:// URL")
    opts = parser.parse_args()
    if opts.what == "throughput":
        result = asyncio.run(throughput(opts.url, opts.texts, opts.per_request, opts.concurrency, opts.cafile))
    else:
        result = latency(opts.url, opts.requests, opts.offset, opts.cafile)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
