"""Does a model keep its vectors in a lower precision? Per-text cosine against float32.

    python bench/dtype_parity.py --model /models/Qwen3-Embedding-0.6B
    python bench/dtype_parity.py --model bundled:minilm --dtypes bfloat16
    python bench/dtype_parity.py --model /models/Qwen3-Embedding-0.6B --device cuda --dtypes float16,bfloat16

Embeds the benchmark corpus (English and Chinese legal and support sentences,
with and without the query instruction) in float32 and in each dtype given,
through the service's own TextEmbedder with the fast paths a replica turns on
(packed weights, fused norms and activations, shared rows: as it serves them;
`--no-fast-paths` for the plain model), and prints the lowest and mean
cosine per dtype, and how many texts gave inf or NaN (which the service refuses
with a 500). Exits 1 if any is below --bound (0.999) or gave inf or NaN: then set
`dtype: float32` (or the dtype that passed) for that model instead of `auto`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
from corpus import sentences, short_texts  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model directory, hub id or bundled:minilm")
    parser.add_argument("--dtypes", default="bfloat16", help="compared with float32, comma-separated")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--texts", type=int, default=200)
    parser.add_argument("--bound", type=float, default=0.999)
    parser.add_argument("--no-fast-paths", dest="fast_paths", action="store_false",
                        help="compare the plain model, without the replica's CPU fast paths")
    opts = parser.parse_args()

    from serve_app.core.modelinfo import resolve_model
    from serve_app.model.embedder import TextEmbedder

    spec = resolve_model(opts.model)
    query = spec.prompts.get("query", "")
    texts = sentences(opts.texts) + [query + t for t in short_texts(opts.texts // 4)]
    vectors = {}
    for dtype in ["float32", *opts.dtypes.split(",")]:
        started = time.perf_counter()
        embedder = TextEmbedder(spec, device=opts.device, dtype=dtype)
        fast_paths = embedder.speed_up() if opts.fast_paths else ["fast paths off"]
        vectors[dtype] = embed_all(embedder, texts)
        print(f"  {dtype}: {len(texts)} texts in {time.perf_counter() - started:.1f} s; "
              f"{'; '.join(fast_paths)}", flush=True)
        del embedder
    reference = vectors.pop("float32")
    if np.isnan(reference).any():
        print(f"float32 itself gave inf or NaN for {int(np.isnan(reference).any(axis=1).sum())} "
              "texts: the weights may be damaged; nothing to compare with.")
        return 1
    spread = reference @ reference.T
    off_diagonal = spread[~np.eye(len(texts), dtype=bool)].mean()
    print(f"\n{opts.model}: {len(texts)} texts; mean cosine between different texts "
          f"{off_diagonal:.3f} (near 1 would make this check meaningless)")
    print(f"{'dtype':10}{'min cosine':>12}{'mean cosine':>13}  vs float32 (bound {opts.bound})")
    failed = False
    for dtype, got in vectors.items():
        refused = int(np.isnan(got).any(axis=1).sum())
        cosine = (got * reference).sum(axis=1) / (
            np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1)
        )
        kept = cosine[~np.isnan(cosine)]
        low, mean = (kept.min(), kept.mean()) if len(kept) else (np.nan, np.nan)
        verdict = "ok" if not refused and low >= opts.bound else "BELOW THE BOUND"
        if refused:  # the service answers these texts with a 500 saying so
            verdict = f"{refused} of {len(texts)} texts gave inf or NaN"
        failed = failed or verdict != "ok"
        print(f"{dtype:10}{low:>12.5f}{mean:>13.5f}  {verdict}")
    return 1 if failed else 0


def embed_all(embedder, texts: list[str], chunk: int = 32) -> np.ndarray:
    """The texts' vectors; a row of NaN for each text whose vector the embedder refused
    (inf or NaN, as float16 gives where a model's activations outgrow its range)."""
    from serve_app.core.errors import ModelOutputError

    rows = []
    for start in range(0, len(texts), chunk):
        part = texts[start : start + chunk]
        try:
            rows.append(embedder.encode(part).vectors)
        except ModelOutputError as exc:  # it names the refused rows; the rest run again
            vectors = np.full((len(part), embedder.spec.dimensions), np.nan, dtype=np.float32)
            kept = [i for i in range(len(part)) if i not in exc.rows]
            if kept:
                vectors[kept] = embedder.encode([part[i] for i in kept]).vectors
            rows.append(vectors)
    return np.concatenate(rows)


if __name__ == "__main__":
    sys.exit(main())
