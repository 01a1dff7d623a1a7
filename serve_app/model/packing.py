"""Linear weights laid out once for the CPU's matrix units, instead of at every call.

torch's bfloat16 `Linear` on a CPU hands oneDNN a plain row-major weight, and
oneDNN reorders it into its blocked layout on every call: for a short text that
reorder is a large part of the work (the weights are read twice, once to copy
them). Packing each weight once (what inductor's weight freezing and IPEX do)
measured, on the Qwen3-Embedding-0.6B stand-in on the 2-core AVX512-BF16 machine,
one short text 150.6 -> 103.0 ms raw and throughput 17.9 -> 18.6 texts/s, with
bit-identical embeddings (`bench/forward_sweep.py`, `bfloat16` against `bfloat16+pack`).

The ops are torch's own (`torch.ops.mkldnn`), though private ones; so a packed
layer is checked against the plain one when packing starts, and any failure
leaves the model as it was. Packing runs block by block and gives back each
plain weight's memory as it goes (for weights mapped from a safetensors file,
by telling the kernel the pages are not needed), so the replica's peak stays
about one block above its steady state.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import sys
import time
from collections.abc import Callable

import torch

from serve_app.model.heap import libc

logger = logging.getLogger(__name__)


class PackedLinear(torch.nn.Module):
    """A bfloat16 `Linear` whose weight oneDNN has reordered for this CPU once."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        # The batch-size hint only picks oneDNN's preferred layout; any row count works.
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        out = torch.ops.mkldnn._linear_pointwise(rows, self.packed_weight, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)


def can_pack(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if `model`'s linear layers can be packed here, else why not (one phrase)."""
    if device.type != "cpu":
        return "not on a CPU"
    if dtype != torch.bfloat16:
        return f"{str(dtype).removeprefix('torch.')} weights (only bfloat16 ones are packed)"
    if not torch.backends.mkldnn.is_available():
        return "this torch is built without oneDNN"
    if not any(isinstance(m, torch.nn.Linear) for m in model.modules()):
        return "the model has no linear layers"
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return "oneDNN reports no bfloat16 support on this CPU"
    except (AttributeError, RuntimeError):
        return "this torch has no oneDNN bfloat16 linear op"
    return None


def pack_linears(
    model: torch.nn.Module,
    groups: list[torch.nn.Module],
    check: Callable[[], bool],
) -> tuple[int, float]:
    """Replace every `Linear` in `model` by a `PackedLinear`, group by group.

    `groups` are the model's blocks (packed in order, each one's plain weights
    released before the next); linear layers outside them go last. `check()`
    runs after the first group is packed and must say the model still gives what
    it gave before; if it does not, or packing fails, that group is put back and
    nothing more is packed. Returns the number of layers packed and the seconds taken.
    """
    started = time.perf_counter()
    mapped = _file_mappings()
    scopes = [*groups, model]  # the model last: whatever linear layers are left
    packed = 0
    for index, scope in enumerate(scopes):
        done: list[tuple[torch.nn.Module, str, torch.nn.Linear]] = []
        try:
            for parent, name, linear in list(_linears(scope)):
                layer = PackedLinear(linear)
                if packed == 0 and not done:  # the op itself, on the first layer
                    check_replacement(layer, linear, (3, linear.in_features), linear.weight.dtype, 2e-2)
                setattr(parent, name, layer)
                done.append((parent, name, linear))
            if index == 0 and not check():
                raise RuntimeError("the packed model's embedding differs from the plain one's")
        except Exception as exc:  # a private op changed or refused: stay as we were
            for parent, name, linear in done:
                setattr(parent, name, linear)
            logger.warning("Linear weights left unpacked (%s: %s)", type(exc).__name__, exc)
            return packed, time.perf_counter() - started
        for _, _, linear in done:
            _release(linear.weight, mapped)
        packed += len(done)
    return packed, time.perf_counter() - started


def _linears(scope: torch.nn.Module):
    for parent in list(scope.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                yield parent, name, child


def check_replacement(new: torch.nn.Module, old: torch.nn.Module, shape: tuple[int, ...],
                      dtype: torch.dtype, tolerance: float, scale: float = 1.0) -> None:
    """`new` against the module it replaces on seeded random rows of `shape` (times `scale`):
    a RuntimeError where they differ by more than `tolerance`, relative and of the largest
    value (the packed layers here, the fused modules in `model.fusing`)."""
    seeded = torch.Generator().manual_seed(0)  # not the process's own random state
    rows = (torch.randn(shape, generator=seeded) * scale).to(dtype)
    with torch.inference_mode():
        want, got = old(rows).float(), new(rows).float()
    if got.shape != want.shape or not torch.allclose(
            got, want, rtol=tolerance, atol=tolerance * float(want.abs().max())):
        raise RuntimeError(f"the replacement {type(new).__name__} disagrees with {type(old).__name__}")


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges this process has mapped from files (safetensors weights among them)."""
    if not sys.platform.startswith("linux"):
        return []
    ranges = []
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            for line in maps:
                fields = line.split()
                # address perms offset dev inode [path]; inode 0 is anonymous memory
                if len(fields) >= 6 and fields[4] != "0" and fields[5].endswith(".safetensors"):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    ranges.append((start, end))
    except OSError:
        return []
    return ranges


_MADV_DONTNEED = 4  # Linux's value


def _release(weight: torch.Tensor, mapped: list[tuple[int, int]]) -> None:
    """Give back the resident pages of a plain weight that lives in a mapped file.

    A weight torch allocated is freed when its last reference goes. One read from a
    safetensors file stays resident as long as anything else from that file is
    mapped (the embedding table is); MADV_DONTNEED drops this weight's pages from
    the process, and should anything read them again, the kernel reads them back
    from the file. Loaded weights are never written, so what is read back is what
    was there: safe even while a pass that began before the swap still uses them.
    """
    start = weight.data_ptr()
    end = start + weight.numel() * weight.element_size()
    if not any(low <= start and end <= high for low, high in mapped):
        return
    page = mmap.PAGESIZE
    first = -(-start // page) * page  # whole pages only: the neighbours' edges stay
    last = end // page * page
    if last > first:
        libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)
