"""Linear weights packed for oneDNN: same embeddings, plain layers kept on any failure,
memory given back, safe beside running passes."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from bench.corpus import sentences
from serve_app.core.modelinfo import resolve_model
from serve_app.core.vectors import cosine_pairwise
from serve_app.model.embedder import TextEmbedder
from serve_app.model.packing import PackedLinear, can_pack, pack_linears

TEXTS = ["The contract may be terminated with thirty days notice.", "合同可提前三十天终止。",
         *sentences(30)]

needs_onednn_bf16 = pytest.mark.skipif(
    can_pack(torch.nn.Linear(2, 2), torch.device("cpu"), torch.bfloat16) is not None,
    reason="this CPU or torch has no oneDNN bfloat16 linear op to pack for",
)


def _linear_kinds(model: torch.nn.Module) -> tuple[int, int]:
    modules = list(model.modules())
    return (sum(type(m) is torch.nn.Linear for m in modules),
            sum(isinstance(m, PackedLinear) for m in modules))


def test_only_bfloat16_weights_on_a_cpu_are_packed(small_standin_dir):
    model = TextEmbedder(resolve_model(str(small_standin_dir)), dtype="float32")
    assert model.pack_weights() == (
        "Linear weights not packed: float32 weights (only bfloat16 ones are packed)"
    )
    assert not model.weights_packed and _linear_kinds(model.model)[1] == 0
    assert can_pack(model.model, torch.device("cuda"), torch.bfloat16) == "not on a CPU"
    off = TextEmbedder(resolve_model(str(small_standin_dir)), dtype="bfloat16", pack_cpu_weights=False)
    assert off.pack_weights() == "Linear weights not packed: pack_cpu_weights is off"
    assert _linear_kinds(off.model)[1] == 0


@needs_onednn_bf16
@pytest.mark.parametrize("name", ["bundled", "standin"])
def test_packed_layers_give_the_plain_models_embeddings(name, bundled_spec, small_standin_dir):
    spec = bundled_spec if name == "bundled" else resolve_model(str(small_standin_dir))
    model = TextEmbedder(spec, dtype="bfloat16")
    plain = model.encode(TEXTS).vectors
    linears = _linear_kinds(model.model)[0]
    assert model.pack_weights().startswith(f"Packed {linears} linear layers")
    assert model.weights_packed and _linear_kinds(model.model) == (0, linears)
    assert cosine_pairwise(plain, model.encode(TEXTS).vectors).min() >= 0.9999
    assert model.pack_weights() == "Linear weights already packed"


@needs_onednn_bf16
def test_a_packing_that_fails_its_check_leaves_every_layer_plain(small_standin_dir):
    model = TextEmbedder(resolve_model(str(small_standin_dir)), dtype="bfloat16")
    plain = model.encode(TEXTS).vectors
    linears = _linear_kinds(model.model)[0]
    from serve_app.model.embedder import _blocks

    layers, _ = pack_linears(model.model, _blocks(model.model), check=lambda: False)
    assert layers == 0 and _linear_kinds(model.model) == (linears, 0)
    np.testing.assert_array_equal(model.encode(TEXTS).vectors, plain)


@needs_onednn_bf16
def test_packing_beside_running_passes_changes_no_answer(small_standin_dir):
    model = TextEmbedder(resolve_model(str(small_standin_dir)), dtype="bfloat16")
    reference = model.encode(TEXTS).vectors
    answers, stop = [], threading.Event()

    def keep_embedding() -> None:
        while not stop.is_set():
            answers.append(model.encode(TEXTS).vectors)

    worker = threading.Thread(target=keep_embedding)
    worker.start()
    try:
        model.pack_weights()
        wanted = len(answers) + 2  # at least two whole passes after packing
        deadline = time.monotonic() + 120  # a pass that deadlocks with packing fails, not hangs
        while len(answers) < wanted and worker.is_alive() and time.monotonic() < deadline:
            worker.join(timeout=0.05)
    finally:
        stop.set()
        worker.join(timeout=60)
    assert model.weights_packed and len(answers) >= wanted
    for vectors in answers:
        assert cosine_pairwise(reference, vectors).min() >= 0.9999


def _mapped_rss_kb(path_suffix: str) -> int:
    """Resident kB of this process's mappings of files ending in `path_suffix`."""
    total, inside = 0, False
    with open("/proc/self/smaps", encoding="utf-8") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header
                inside = len(fields) >= 6 and fields[5].endswith(path_suffix)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


@needs_onednn_bf16
@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc")
def test_packing_gives_back_the_plain_weights_pages(small_standin_dir):
    model = TextEmbedder(resolve_model(str(small_standin_dir)), dtype="bfloat16")
    linear_kb = sum(m.weight.numel() * 2 for m in model.model.modules()
                    if type(m) is torch.nn.Linear) // 1024
    for parameter in model.model.parameters():  # every weight read, as passes read them
        parameter.float().sum()
    before = _mapped_rss_kb(".safetensors")
    if before < linear_kb:
        pytest.skip("this torch copies the weights out of the file instead of mapping them")
    model.pack_weights()
    after = _mapped_rss_kb(".safetensors")
    # All but the pages shared with neighbouring tensors at each weight's two ends.
    assert before - after >= linear_kb - 8 * _linear_kinds(model.model)[1]
