"""Less elementwise work around the packed linear layers of a bfloat16 model on a CPU.

With the matrix products on AMX, a Qwen3 pass of 16 texts spent 29% of its time in
elementwise ops (torch profiler, one thread): each RMSNorm makes a float32 copy of
its input and five passes over it (4 norms a block), and the MLP's SiLU and product
are two more passes over its widest activations. Two replacements, each checked
against the module it replaces on random rows before it is swapped in:

- `FusedRMSNorm`: the norm summed in float32 inside `vector_norm` straight from the
  bfloat16 input (no float32 copy), the scaling done in bfloat16. Two roundings more
  than transformers' (the norm's and the scale's), of the size bfloat16 already rounds
  every product to.
- `FusedMLP`: `down(silu(gate(x)) * up(x))` with the SiLU and the product applied
  by oneDNN to the products' float32 results as they are written (post-ops of
  `_linear_pointwise`, as inductor's CPU fusions use them), for an MLP whose
  linears are packed (`model.packing`).

The ops are torch's own; the oneDNN ones are private, hence the checks, and any
failure leaves the model as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from serve_app.model.packing import PackedLinear, check_replacement

logger = logging.getLogger(__name__)


class FusedRMSNorm(torch.nn.Module):
    """An RMSNorm (`weight * x / rms(x)`) computed in the input's dtype, its norm summed
    in float32."""

    def __init__(self, norm: torch.nn.Module) -> None:
        super().__init__()
        self.weight = norm.weight
        self.eps = float(norm.variance_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The norm is summed in float32 inside the op (four times as fast as asking it for
        # a float32 result, which copies the input to float32 first) and rounded once.
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).float()
        scale = torch.rsqrt(norm.square_().div_(x.shape[-1]).add_(self.eps)).to(x.dtype)
        return x * scale * self.weight


class FusedMLP(torch.nn.Module):
    """A gated MLP, `down(silu(gate(x)) * up(x))`, over packed linears with the SiLU and
    the product as oneDNN post-ops."""

    def __init__(self, mlp: torch.nn.Module) -> None:
        super().__init__()
        self.gate, self.up, self.down = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.gate.in_features)
        linear = torch.ops.mkldnn._linear_pointwise
        gated = linear(rows, self.gate.packed_weight, self.gate.bias, "swish", [], "")
        product = linear.binary(rows, gated, self.up.packed_weight, self.up.bias, "mul")
        return self.down(product).reshape(*x.shape[:-1], -1)


def is_rms_norm(module: torch.nn.Module) -> bool:
    """Whether `module` looks like transformers' RMSNorm (its result is checked anyway)."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith("RMSNorm") and isinstance(weight, torch.Tensor)
            and weight.dim() == 1 and isinstance(getattr(module, "variance_epsilon", None), float))


def is_packed_silu_mlp(module: torch.nn.Module) -> bool:
    """Whether `module` is a gated SiLU MLP whose three linears are packed."""
    act = getattr(module, "act_fn", None)
    return (all(isinstance(getattr(module, name, None), PackedLinear)
                for name in ("gate_proj", "up_proj", "down_proj"))
            and (isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"))


def fuse_elementwise(model: torch.nn.Module, dtype: torch.dtype, check: Callable[[], bool]) -> tuple[int, int]:
    """Swap in `FusedRMSNorm` and `FusedMLP` wherever each gives what its module gave on
    random rows; then `check()` must say the model still gives what it gave, or every
    module is put back. The numbers of norms and MLPs swapped. Safe while other threads
    run passes: a module is swapped whole."""
    found = [(parent, name, child) for parent in list(model.modules())
             for name, child in list(parent.named_children())]
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
    for parent, name, child in found:
        if is_rms_norm(child):
            fused, width = FusedRMSNorm(child), child.weight.shape[0]
        elif is_packed_silu_mlp(child):
            fused, width = FusedMLP(child), child.gate_proj.in_features
        else:
            continue
        try:
            check_replacement(fused, child, (1, 5, width), dtype, 3e-2, scale=4)
        except Exception as exc:  # a private op changed, or a module that only looked alike
            logger.warning("%s left as it is (%s: %s)", type(child).__name__, type(exc).__name__, exc)
            continue
        setattr(parent, name, fused)
        swapped.append((parent, name, child))
    if swapped and not check():
        for parent, name, child in swapped:
            setattr(parent, name, child)
        logger.warning("Elementwise work left unfused: the fused model's embeddings differ")
        return 0, 0
    mlps = sum(isinstance(getattr(parent, name), FusedMLP) for parent, name, _ in swapped)
    return len(swapped) - mlps, mlps
