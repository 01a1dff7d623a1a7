"""What this machine runs the model on: the device, the precision (by what the CPU or GPU
reports and a probe of a few milliseconds), and how many threads and passes it takes."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# dtype=auto keeps bfloat16 on a CPU that reports bfloat16 units unless a bfloat16 product
# runs below this fraction of float32's speed there (see choose_dtype).
MIN_BF16_SPEEDUP = 0.7


def pick_device(device: str, gpu_fraction: float | None = None) -> torch.device:
    """auto: the GPU where this process sees one, unless Ray gave it no share of one.

    `gpu_fraction` is the share a replica or batch actor asked Ray for (None outside Ray).
    Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for an actor that asked for no GPU, so a
    replica with gpu_fraction 0 on a GPU node sees a card it did not reserve and that no cap
    holds it to; it runs on the CPU, as its resources say. device=cuda is taken as asked.
    """
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        if gpu_fraction == 0:
            logger.info("A GPU is visible, but this process asked Ray for no share of one "
                        "(gpu_fraction 0): running on the CPU.")
            return torch.device("cpu")
        return torch.device("cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for, but this process sees no CUDA GPU")
    return torch.device(device)


def cpu_bf16_features() -> list[str]:
    """The CPU features, as torch reports them, that run bfloat16 matrix products natively."""
    checks = {"AMX": "_is_amx_tile_supported", "AVX512-BF16": "_is_avx512_bf16_supported"}
    found = []
    for name, check in checks.items():
        try:
            if getattr(torch.cpu, check)():
                found.append(name)
        except (AttributeError, RuntimeError):  # an older torch without the check
            pass
    return found


@torch.inference_mode()
def half_matmul_speedup(
    half: torch.dtype = torch.bfloat16, rows: int = 64, width: int = 512, repeats: int = 5
) -> float:
    """How many times faster a matrix product in `half` (bfloat16 or float16) runs here
    than a float32 one: a probe of a few milliseconds on one thread, the two dtypes taken
    in turn and each at its best. One thread, because a product on several waits for
    whichever of them the OS has parked: beside a starting ingress both dtypes measured
    5-50x slow, in any ratio."""
    x, w = torch.randn(rows, width), torch.randn(width, width)
    pairs = [(x.to(dtype), w.to(dtype)) for dtype in (torch.float32, half)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for a, b in pairs:
            torch.nn.functional.linear(a, b)  # oneDNN builds its kernel on the first call
        best = [float("inf"), float("inf")]
        for _ in range(repeats):
            for i, (a, b) in enumerate(pairs):
                started = time.perf_counter()
                torch.nn.functional.linear(a, b)
                best[i] = min(best[i], time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return best[0] / max(best[1], 1e-9)


def choose_dtype(
    dtype: str,
    device: torch.device,
    features: Callable[[], list[str]] = cpu_bf16_features,
    speedup: Callable[[torch.dtype], float] = half_matmul_speedup,
) -> tuple[torch.dtype, str]:
    """The precision to run the model in, and one sentence saying why."""
    if dtype != "auto":
        chosen = DTYPES[dtype]
        if device.type != "cpu" or chosen == torch.float32:
            return chosen, f"dtype={dtype} was set"
        # Half precision is no speed-up on a CPU that emulates it: float16 products ran at
        # 0.23x float32's speed in this probe on the AVX512-BF16 machine (no AVX512-FP16;
        # 0.30x at the model's sizes), bfloat16 ones at 0.23x where oneDNN is capped. The
        # setting stands; the operator hears of it.
        ratio = speedup(chosen)
        if ratio >= 1.0:
            return chosen, f"dtype={dtype} was set (its matrix products ran {ratio:.1f}x float32's speed here)"
        reason = (
            f"dtype={dtype} was set, but a {dtype} matrix product ran at {ratio:.2f}x "
            f"float32's speed on this CPU, so the model runs slower than in float32; "
            "dtype: auto picks the fastest precision this CPU runs natively"
        )
        logger.warning(reason)
        return chosen, reason
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "dtype=auto: bfloat16, which this GPU supports natively"
        return torch.float16, (
            "dtype=auto: float16, since this GPU has no native bfloat16 (should a text overflow "
            "float16's range, its request fails saying so; dtype: float32 then)"
        )
    native = features()
    if native:
        # The units can be there and still unused: with oneDNN capped below them
        # (ONEDNN_MAX_CPU_ISA=AVX2) on an AVX512-BF16 CPU, bfloat16 is emulated, 0.23x
        # float32's speed in this probe and 1 against 216 GFLOP/s at the model's sizes,
        # while torch still reports the units; where they work the probe gives 3-3.5x.
        # Only a clear loss turns bfloat16 down (it also halves the weights' memory).
        ratio = speedup(torch.bfloat16)
        units = " and ".join(native)
        if ratio < MIN_BF16_SPEEDUP:
            return torch.float32, (
                f"dtype=auto: float32: torch reports {units} on this CPU, but a bfloat16 "
                f"matrix product ran at {ratio:.2f}x float32's speed here (is oneDNN capped, "
                "e.g. by ONEDNN_MAX_CPU_ISA?)"
            )
        return torch.bfloat16, (
            f"dtype=auto: bfloat16, since torch reports {units} on this CPU "
            f"(a bfloat16 matrix product ran {ratio:.1f}x float32's speed here)"
        )
    return torch.float32, (
        "dtype=auto: float32, since torch reports neither AMX nor AVX512-BF16 on this CPU "
        "(bfloat16 would be emulated, and slower)"
    )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def default_batch_tokens(device: torch.device) -> int:
    """Padded tokens per forward pass: measured best on a 2-core CPU; GPUs want big passes.

    On a CPU 1,024 serves best for all-MiniLM-L6-v2 and for Qwen3-Embedding-0.6B
    alike: raw, 2,048 is a few percent faster for the wide model, but served,
    shorter passes let requests finish and the two workers refill sooner
    (8.4 against 7.9 texts/s at 8 clients, 10.1 against 8.8 at 16).
    """
    return 32768 if device.type == "cuda" else 1024


def tokenize_on_the_calling_thread() -> None:
    """Have Hugging Face `tokenizers` encode a batch on the thread that asks, in this process.

    By default it encodes batches on a Rust (rayon) pool of a thread per core, whose threads
    spin on sched_yield for a while after every batch. Where the forward passes run on the
    CPU they already use every core, so the pool only takes turns from them: in a served
    all-MiniLM-L6-v2 replica on 2 cores its two threads were runnable a fifth of the time,
    and the forward threads blocked 6% of it. Tokenising is a small part of a CPU pass
    (128 texts: 4-6 ms on one thread, 3 ms on the pool, against hundreds for the pass). An
    operator's own TOKENIZERS_PARALLELISM is kept; `tokenizers` reads it at every batch.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def default_forward_workers(device: torch.device, cpus: int) -> int:
    """Parallel forward passes per replica: two on a multi-core CPU, one on a GPU."""
    return 2 if device.type == "cpu" and cpus >= 2 else 1


def default_cpu_threads() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1
