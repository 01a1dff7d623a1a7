"""The replica's forward scheduler in process (no Ray, no HTTP), with and without the
per-block thread check, alternating: does a running pass taking its new share of the
cores at each transformer block pay?

    python bench/thread_share.py --model /tmp/qwen3-standin --texts 128 --rounds 2
    python bench/thread_share.py --texts 2048 --rounds 3          # bundled:minilm

8 clients send 16 texts each until the corpus is done; texts/s per variant and round.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))

from corpus import sentences  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled:minilm")
    parser.add_argument("--texts", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-request", type=int, default=16)
    opts = parser.parse_args()

    from serve_app.core.modelinfo import resolve_model
    from serve_app.model.embedder import TextEmbedder, _blocks
    from serve_app.model.hardware import default_cpu_threads
    from serve_app.model.scheduler import ForwardScheduler

    cpus = default_cpu_threads()
    embedder = TextEmbedder(resolve_model(opts.model), cpu_threads=cpus)
    blocks = _blocks(embedder.model)
    hooks = [dict(block._forward_pre_hooks) for block in blocks]
    texts = sentences(opts.texts)
    embedder.encode(texts[:4])

    def per_block_check(on: bool) -> None:
        for block, own in zip(blocks, hooks, strict=True):
            block._forward_pre_hooks.clear()
            if on:
                block._forward_pre_hooks.update(own)

    async def run() -> float:
        scheduler = ForwardScheduler(embedder.encode, workers=2, cpus=cpus, max_texts=128)
        queue = [texts[i:i + opts.per_request] for i in range(0, len(texts), opts.per_request)]

        async def client() -> None:
            while queue:
                await scheduler.embed(queue.pop())

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(opts.clients)))
        scheduler.shutdown()
        return len(texts) / (time.perf_counter() - started)

    for number in range(1, opts.rounds + 1):
        for on in (False, True):
            per_block_check(on)
            print(f"round {number}, per-block thread check {'on ' if on else 'off'}: "
                  f"{asyncio.run(run()):.2f} texts/s", flush=True)


if __name__ == "__main__":
    main()
