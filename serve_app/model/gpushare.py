"""One GPU shared by several replicas: each holds itself, CUDA context included, to its share.

Ray hands out fractions of a GPU (`gpu_fraction`: 0.25 puts four replicas on a card) but
does not police memory. torch's per-process cap (`set_per_process_memory_fraction`) bounds
only what its caching allocator holds; the CUDA context, cuBLAS's handles and the kernels
loaded on first use sit outside it, some hundreds of MiB per process. Capped at the bare
fraction, four replicas of a 12 GB card (an RTX 3060) would each hold 3 GB in tensors plus
their context, more than the card has once all four are busy. So a replica caps its
allocator at the whole share first (the model loads under it), then, once its first pass has
loaded the kernels, reads what the process holds on the card outside the allocator (from
`nvidia-smi`, the driver's own tool) and lowers the cap by that much.

Where that cannot be read (no `nvidia-smi`, or a container whose process ids the driver
does not show), the cap stays at the whole share and the replica says so.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import asdict, dataclass

import torch

MIB = 2**20


@dataclass(frozen=True)
class GpuShare:
    """What a process holds itself to on its GPU, in MiB."""

    share_mib: float  # gpu_fraction of the card
    outside_mib: float | None  # the process's memory outside torch's allocator; None: unread
    cap_mib: float  # what the allocator may hold
    sentence: str

    def as_dict(self) -> dict:
        return asdict(self)


def hold_to_gpu_share(fraction: float, device: torch.device) -> None:
    """Cap this process's CUDA allocator at `fraction` of the card, before the model loads."""
    # torch refuses a device without an index (a plain "cuda"); None means the current one.
    torch.cuda.set_per_process_memory_fraction(float(fraction), device.index)


def settle_gpu_share(fraction: float, device: torch.device) -> GpuShare:
    """Lower the allocator's cap by what this process holds outside it, so that the whole
    process fits in `fraction` of the card. Called once the first pass has run."""
    total_mib = torch.cuda.get_device_properties(device).total_memory / MIB
    process_mib = process_gpu_mib(os.getpid())
    outside = None
    if process_mib is not None:
        outside = max(0.0, process_mib - torch.cuda.memory_reserved(device) / MIB)
    share = allocator_share(fraction, total_mib, outside, torch.cuda.memory_allocated(device) / MIB)
    torch.cuda.set_per_process_memory_fraction(share.cap_mib / total_mib, device.index)
    torch.cuda.empty_cache()  # cached blocks above the new cap go back to the card
    return share


def allocator_share(fraction: float, total_mib: float, outside_mib: float | None,
                    in_use_mib: float = 0.0) -> GpuShare:
    """The allocator's cap for a process allowed `fraction` of a card of `total_mib` that
    holds `outside_mib` outside the allocator (None: not known) and has `in_use_mib` of
    tensors live (the weights)."""
    share = fraction * total_mib
    if outside_mib is None:
        return GpuShare(share, None, share, (
            f"GPU share {share:.0f} MiB ({fraction:g} of {total_mib:.0f} MiB): the allocator is capped at "
            "all of it, since this process's memory outside the allocator (its CUDA context) could not "
            "be read from nvidia-smi; the process may exceed its share by that much."))
    if outside_mib >= share:
        return GpuShare(share, outside_mib, share, (
            f"GPU share {share:.0f} MiB ({fraction:g} of {total_mib:.0f} MiB) is less than this process "
            f"holds outside torch's allocator ({outside_mib:.0f} MiB: the CUDA context and kernels): raise "
            "gpu_fraction. The allocator is capped at the whole share."))
    cap = share - outside_mib
    if cap < in_use_mib * 1.25:  # no room left for a pass's activations: every one would fail
        return GpuShare(share, outside_mib, share, (
            f"GPU share {share:.0f} MiB ({fraction:g} of {total_mib:.0f} MiB) less this process's "
            f"{outside_mib:.0f} MiB of CUDA context leaves too little beside the model's "
            f"{in_use_mib:.0f} MiB: raise gpu_fraction. The allocator is capped at the whole share."))
    return GpuShare(share, outside_mib, cap, (
        f"GPU share {share:.0f} MiB ({fraction:g} of {total_mib:.0f} MiB): {outside_mib:.0f} MiB of CUDA "
        f"context and kernels, so torch's allocator is capped at {cap:.0f} MiB."))


def process_gpu_mib(pid: int) -> float | None:
    """MiB `pid` holds on the GPUs, context included, as `nvidia-smi` reports it; None where
    it cannot say (no nvidia-smi, or a container's process ids)."""
    return gpu_memory_by_pid().get(pid)


def nvidia_smi(*args: str) -> str | None:
    """What `nvidia-smi ARGS` prints, or None where it is missing or fails."""
    try:
        return subprocess.run(["nvidia-smi", *args], capture_output=True, text=True,
                              check=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def gpu_memory_by_pid() -> dict[int, float]:
    """MiB per process on the GPUs, CUDA context included, as nvidia-smi reports it."""
    out = nvidia_smi("--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits") or ""
    usage: dict[int, float] = {}
    for line in out.splitlines():
        pid, _, mib = line.partition(",")
        try:
            usage[int(pid)] = usage.get(int(pid), 0.0) + float(mib)
        except ValueError:  # "[N/A]" under some drivers and containers
            continue
    return usage
