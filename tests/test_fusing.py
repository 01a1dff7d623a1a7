"""Fused RMSNorms and MLP activations (serve_app/model/fusing.py): what each gives against
the module it replaces, the model's embeddings, and the model left as it was on a failure."""

from __future__ import annotations

import pytest
import torch
from test_packing import TEXTS, needs_onednn_bf16
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from serve_app.core.modelinfo import resolve_model
from serve_app.core.vectors import cosine_pairwise
from serve_app.model.embedder import TextEmbedder
from serve_app.model.fusing import FusedMLP, FusedRMSNorm, fuse_elementwise


def _kinds(model: torch.nn.Module) -> tuple[int, int, int]:
    modules = list(model.modules())
    return (sum(isinstance(m, FusedRMSNorm) for m in modules), sum(isinstance(m, FusedMLP) for m in modules),
            sum(type(m) is Qwen3RMSNorm for m in modules))


@pytest.mark.parametrize("shape", [(1, 7, 1024), (1, 7, 16, 128)])
def test_the_fused_norm_gives_transformers_rmsnorm_within_bfloat16s_rounding(shape):
    seeded = torch.Generator().manual_seed(1)
    norm = Qwen3RMSNorm(shape[-1], eps=1e-6)
    norm.weight.data = torch.randn(shape[-1], generator=seeded)
    norm = norm.to(torch.bfloat16)
    # Rows of very different sizes: each row's own scale is what is tested.
    sizes = torch.logspace(-2, 3, shape[1]).view(1, -1, *[1] * (len(shape) - 2))
    x = (torch.randn(shape, generator=seeded) * sizes).to(torch.bfloat16)
    want, got = norm(x), FusedRMSNorm(norm)(x)
    assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape
    # Against the exact norm (float64): bfloat16 keeps 8 bits, and the fused norm rounds
    # twice more than transformers' (its norm and its scale), each at most 0.4%. Measured:
    # 1.3-1.5x transformers' mean error, 1.4-1.6x its largest; a weight 5% off: 25x.
    exact = norm.weight.double() * x.double() * x.double().pow(2).mean(-1, keepdim=True).add(1e-6).rsqrt()

    def errors(result: torch.Tensor) -> torch.Tensor:
        return (result.double() - exact).abs() / exact.abs().clamp_min(1e-3)

    theirs, ours = errors(want), errors(got)
    assert ours.mean() <= 2 * theirs.mean(), (ours.mean(), theirs.mean())
    assert ours.max() <= 3 * theirs.max() <= 0.03, (ours.max(), theirs.max())


@needs_onednn_bf16
def test_the_models_norms_and_mlps_are_fused_and_its_embeddings_kept(small_standin_dir):
    model = TextEmbedder(resolve_model(str(small_standin_dir)), dtype="bfloat16")
    model.pack_weights()
    plain = model.encode(TEXTS).vectors
    layers = len(model.model.layers)
    assert _kinds(model.model) == (0, 0, 4 * layers + 1)  # 4 a block (q and k too), the last
    said = model.fuse_elementwise()
    assert said.startswith(f"Fused {4 * layers + 1} RMSNorms and {layers} MLP activations"), said
    assert model.elementwise_fused and _kinds(model.model) == (4 * layers + 1, layers, 0)
    assert cosine_pairwise(plain, model.encode(TEXTS).vectors).min() >= 0.999
    assert model.fuse_elementwise() == "Elementwise work already fused"


@needs_onednn_bf16
def test_a_fusion_that_fails_its_check_leaves_every_module_as_it_was(small_standin_dir):
    model = TextEmbedder(resolve_model(str(small_standin_dir)), dtype="bfloat16")
    model.pack_weights()
    before = [(name, type(m)) for name, m in model.model.named_modules()]
    assert fuse_elementwise(model.model, torch.bfloat16, check=lambda: False) == (0, 0)
    assert [(name, type(m)) for name, m in model.model.named_modules()] == before


class OffsetRMSNorm(torch.nn.Module):
    """Gemma's kind: it scales by (1 + weight), so it only looks like Qwen's."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((width,), 0.5))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        h = x.float()
        return ((h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)) * (1 + self.weight.float())).to(x.dtype)


def test_a_norm_that_only_looks_alike_is_left_as_it_is():
    model = torch.nn.Sequential(OffsetRMSNorm(64)).to(torch.bfloat16)
    assert fuse_elementwise(model, torch.bfloat16, check=lambda: True) == (0, 0)
    assert type(model[0]) is OffsetRMSNorm


def test_without_packed_weights_nothing_is_fused(small_standin_dir, bundled_spec):
    plain = TextEmbedder(resolve_model(str(small_standin_dir)), dtype="float32")
    plain.pack_weights()
    assert plain.fuse_elementwise() == "Elementwise work not fused: it needs the packed linear weights"
    assert _kinds(plain.model)[:2] == (0, 0)


@needs_onednn_bf16
def test_a_model_without_rmsnorm_or_gated_mlp_says_so(bundled_spec):
    model = TextEmbedder(bundled_spec, dtype="bfloat16")
    model.pack_weights()
    assert model.fuse_elementwise() == (
        "Elementwise work not fused: the model has no RMSNorm or gated SiLU MLP that fits")
