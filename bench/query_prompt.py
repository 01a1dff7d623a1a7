"""Does a query prompt help a model find the right passage? Retrieval with and without one.

    python bench/query_prompt.py                                   # the bundled model
    python bench/query_prompt.py --model /models/Qwen3-Embedding-0.6B
    python bench/query_prompt.py --model bundled:minilm --instruction "Given a package summary, find its description"

Labelled pairs found offline on any Debian or Python machine: each installed package's
one-line summary is a query and its long description the passage to find, from dpkg's
status file and from the installed Python distributions' metadata. For each set it prints
recall@1, recall@10 and MRR@10 with the query sent as typed, with what the service puts in
front of it for `prompt_name: query` on this model, with Qwen3's default web-search
instruction, and with `--instruction` if given. Passages take no prompt, as the service's
documents take none.

The queries are short summaries, not questions, so absolute figures say little; the
difference between the rows of one set is what to read. Random weights (the stand-in)
retrieve nothing, so run it on real weights.
"""

from __future__ import annotations

import argparse
import email
import importlib.metadata
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
from dtype_parity import embed_all  # noqa: E402

DPKG_STATUS = Path("/var/lib/dpkg/status")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled:minilm", help="model directory, hub id or bundled:minilm")
    parser.add_argument("--instruction", help="another task to compare, in Qwen3's instruction format")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--min-words", type=int, default=15, help="shortest passage kept")
    opts = parser.parse_args()

    from serve_app.core.config import DEFAULT_QUERY_INSTRUCTION, AppArgs
    from serve_app.core.modelinfo import resolve_model
    from serve_app.core.prompts import format_instruction, prompt_prefix
    from serve_app.model.embedder import TextEmbedder

    spec = resolve_model(opts.model)
    args = AppArgs()
    service_query = prompt_prefix(spec, args, prompt_name="query")
    prefixes = {
        "as typed": "",
        "the service's 'query'": service_query,
        "Qwen3's default task": format_instruction(args.instruction_template, DEFAULT_QUERY_INSTRUCTION),
    }
    if opts.instruction:
        prefixes["--instruction"] = format_instruction(args.instruction_template, opts.instruction)
    sets = {"dpkg": dpkg_pairs(opts.min_words), "python": python_pairs(opts.min_words)}
    sets = {name: pairs for name, pairs in sets.items() if len(pairs) >= 20}
    if not sets:
        print("Fewer than 20 packages with a summary and a description here: nothing to measure.")
        return 1

    embedder = TextEmbedder(spec, dtype=opts.dtype)
    print(f"{opts.model} ({embedder.dtype}, {spec.pooling} pooling); "
          f"the service's prefix for prompt_name 'query' here: {service_query!r}")
    print(f"\n{'set':8}{'pairs':>6}  {'query prefix':24}{'R@1':>7}{'R@10':>7}{'MRR@10':>8}")
    for name, pairs in sets.items():
        passages = embed_all(embedder, [passage for _, passage in pairs])
        for label, prefix in prefixes.items():
            queries = embed_all(embedder, [prefix + summary for summary, _ in pairs])
            r1, r10, mrr = retrieval(queries, passages)
            print(f"{name:8}{len(pairs):>6}  {label:24}{r1:>7.3f}{r10:>7.3f}{mrr:>8.3f}", flush=True)
    return 0


def retrieval(queries: np.ndarray, passages: np.ndarray) -> tuple[float, float, float]:
    """Recall@1, recall@10 and MRR@10 when query i's passage is passage i."""
    from serve_app.core.vectors import cosine_matrix

    scores = cosine_matrix(queries, passages)
    own = np.diag(scores)[:, None]
    rank = (scores > own).sum(axis=1)  # passages scored above the right one; ties count for it
    return float(np.mean(rank == 0)), float(np.mean(rank < 10)), float(np.mean(np.where(rank < 10, 1 / (rank + 1), 0)))


def dpkg_pairs(min_words: int) -> list[tuple[str, str]]:
    """(summary, description) of each installed Debian package, one per summary."""
    if not DPKG_STATUS.exists():
        return []
    found: dict[str, str] = {}
    for stanza in DPKG_STATUS.read_text(errors="replace").split("\n\n"):
        match = re.search(r"^Description: (.*)\n((?: .*\n?)*)", stanza, re.M)
        if match:
            lines = [line.strip() for line in match.group(2).splitlines()]
            add(found, match.group(1), " ".join(line for line in lines if line != "."), min_words)
    return list(found.items())


def python_pairs(min_words: int, most_words: int = 200) -> list[tuple[str, str]]:
    """(summary, start of the long description) of each installed Python distribution."""
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        meta = dist.metadata
        body = meta.get_payload() if isinstance(meta, email.message.Message) else None
        body = body or meta.get("Description") or ""
        add(found, meta.get("Summary") or "", " ".join(body.split()[:most_words]), max(min_words, 30))
    return list(found.items())


def add(found: dict[str, str], summary: str, passage: str, min_words: int) -> None:
    summary = summary.strip()
    if summary and summary not in found and len(passage.split()) >= min_words:
        found[summary] = passage


if __name__ == "__main__":
    sys.exit(main())
