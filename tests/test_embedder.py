"""The model path against sentence-transformers, the reference implementation."""

import asyncio
import json
import logging
import os
import subprocess
import sys
import threading
from dataclasses import asdict

import numpy as np
import pytest
import torch

from bench.corpus import sentences
from serve_app.core.modelinfo import resolve_model
from serve_app.model.embedder import TextEmbedder, _blocks, pool
from serve_app.model.hardware import (
    choose_dtype,
    cpu_bf16_features,
    half_matmul_speedup,
    tokenize_on_the_calling_thread,
)
from serve_app.model.scheduler import ForwardScheduler

TEXTS = [
    "The lessee shall pay rent on the first day of each month.",
    "租户应于每月第一天支付租金。",
    "How do I reset my password?",
    "x",
    "Termination for convenience requires thirty days' written notice to the other party, "
    "and any fees paid in advance shall be refunded pro rata.",
    "合同一方违约的，应当承担继续履行、采取补救措施或者赔偿损失等违约责任。",
    "   padded with spaces   ",
    "Emoji and symbols: ✓ § ¶ € 123.45",
]


def cosine_rows(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


@pytest.fixture(scope="module")
def st_bundled(bundled_spec):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(bundled_spec.source, device="cpu")


@pytest.fixture(scope="module")
def tiny(tiny_qwen3_dir):
    return TextEmbedder(resolve_model(str(tiny_qwen3_dir)), dtype="float32")


@pytest.fixture(scope="module")
def st_tiny(tiny_qwen3_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(tiny_qwen3_dir), device="cpu")


def test_bundled_matches_sentence_transformers(bundled_embedder, st_bundled):
    ours = bundled_embedder.encode(TEXTS).vectors
    reference = st_bundled.encode(TEXTS, batch_size=3)
    assert ours.shape == (len(TEXTS), 384)
    assert cosine_rows(ours, reference).min() >= 0.9999


def test_tiny_qwen3_matches_sentence_transformers_last_token(tiny, st_tiny):
    ours = tiny.encode(TEXTS).vectors
    reference = st_tiny.encode(TEXTS, batch_size=3)
    assert cosine_rows(ours, reference).min() >= 0.9999
    # The check means something only if different texts give clearly different vectors.
    similarity = ours @ ours.T
    assert similarity[~np.eye(len(TEXTS), dtype=bool)].max() < 0.95


def test_tiny_qwen3_query_prompt_matches_sentence_transformers(tiny, st_tiny):
    prompt = tiny.spec.prompts["query"]
    ours = tiny.encode([prompt + t for t in TEXTS]).vectors
    reference = st_tiny.encode(TEXTS, prompt_name="query")
    assert cosine_rows(ours, reference).min() >= 0.9999


def test_qwen3_inputs_end_with_eos_and_pad_left(tiny):
    ids, _ = tiny.tokenize(["short", "a much longer text than the other one"])
    eos = tiny.tokenizer.eos_token_id
    assert all(row[-1] == eos for row in ids)
    # Padded on the left, so that the last position of every row is its last token.
    padded = tiny.tokenizer.pad({"input_ids": ids}, return_attention_mask=True)["attention_mask"]
    assert padded[0][0] == 0 and padded[0][-1] == 1 and all(padded[1])


def test_eos_is_appended_when_the_tokenizer_does_not(tmp_path):
    from tiny_qwen3 import build_tiny_qwen3

    directory = build_tiny_qwen3(tmp_path / "no-eos", append_eos=False)
    embedder = TextEmbedder(resolve_model(str(directory)), max_input_tokens=16)
    ids, truncated = embedder.tokenize(["hello there", "word " * 100])
    eos = embedder.tokenizer.eos_token_id
    assert [row[-1] for row in ids] == [eos, eos]
    assert len(ids[1]) == 16 and truncated == [False, True]


def test_results_do_not_depend_on_batch_company(bundled_embedder):
    alone = np.stack([bundled_embedder.encode([t]).vectors[0] for t in TEXTS])
    together = bundled_embedder.encode(TEXTS).vectors
    assert cosine_rows(alone, together).min() >= 0.99999


def test_a_pass_takes_its_new_thread_share_at_the_next_block(bundled_embedder):
    """When another worker starts (or ends) during a long pass, the running pass moves to
    its new share of the cores at its next transformer block, not when it ends."""
    import torch

    answers = iter([2] + [1] * 100)  # the pass starts alone; then a second worker starts
    seen = []
    last = bundled_embedder.model.encoder.layer[-1]
    handle = last.register_forward_pre_hook(lambda _m, _a: seen.append(torch.get_num_threads()))
    try:
        bundled_embedder.encode(["a lease of the ground floor"], lambda: next(answers))
    finally:
        handle.remove()
        bundled_embedder.encode(["reset"], lambda: 1)
    assert seen == [1]
    assert bundled_embedder._thread_state.source is None  # nothing kept after the call


@pytest.mark.parametrize("name", ["bundled", "standin"])
def test_between_runs_between_passes_and_before_every_block_and_may_embed_there(
    name, bundled_spec, small_standin_dir
):
    """`between` runs between two passes of a call and, on a CPU, before each transformer
    block of a pass of a quarter of the token budget or more (here every pass), and may
    embed there itself (the scheduler runs a cell's text there while a column's pass
    waits): both answers are what they would be alone, the call re-reads its thread share
    after each, and a call made there has no `between` of its own. The stand-in runs as a
    replica runs it: packed, fused, short texts sharing rows."""
    spec = bundled_spec if name == "bundled" else resolve_model(str(small_standin_dir))
    model = TextEmbedder(spec, dtype="float32", max_batch_tokens=64)
    if name == "standin":
        model.speed_up()
        assert model.rows_shared
    column, cell = sentences(8, seed=3), "a cell's own text"
    assert min(model.encode(column).tokens) >= 16  # every pass holds a quarter of 64 or more
    column_alone, cell_alone = model.encode(column).vectors, model.encode([cell]).vectors
    blocks = _blocks(model.model)
    outer, inner = (lambda: 1), (lambda: 1)
    sources, nested = [], []
    handle = blocks[-1].register_forward_pre_hook(lambda _m, _a: sources.append(model._thread_state.source))
    try:
        result = model.encode(column, outer, lambda: nested.append(model.encode([cell], inner)))
    finally:
        handle.remove()
    passes = sources.count(outer)
    assert passes >= 2 and len(nested) == passes - 1 + passes * len(blocks)
    # Each call made there is one pass of its own: it did not run `between` again.
    assert sources.count(inner) == len(nested)
    assert sources[-1] is outer
    assert model._thread_state.source is None and model._thread_state.between is None
    np.testing.assert_allclose(result.vectors, column_alone, atol=1e-5)
    for answer in nested:
        np.testing.assert_allclose(answer.vectors, cell_alone, atol=1e-5)


@pytest.mark.parametrize("running", ["column", "long text", "cell"])
def test_the_scheduler_runs_a_cell_inside_a_long_pass_and_after_a_short_one(running, bundled_spec,
                                                                            bundled_embedder):
    """A cell sent while a long pass runs (a column's, or one long text's, which is a quick
    request too) is embedded and answered inside that pass, between two of its blocks; one
    sent while a short pass runs (another cell's) waits for it to end. Every answer is the
    vector it has alone."""
    model = TextEmbedder(bundled_spec, dtype="float32", max_batch_tokens=512)  # short: under 128 tokens
    first = {"column": sentences(8, seed=5), "long text": [" ".join(sentences(8, seed=6))],
             "cell": ["another cell's text"]}[running]
    cell = ["a cell's own text"]
    blocks, events = _blocks(model.model), []
    first_started, cell_queued = threading.Event(), threading.Event()

    def started(_module, args):
        events.append(("start", tuple(args[0].shape[:2])))
        if not first_started.is_set():  # the first pass waits in its first block for the cell
            first_started.set()
            assert cell_queued.wait(10), "the test never sent its cell"

    hooks = [blocks[0].register_forward_pre_hook(started),
             blocks[-1].register_forward_hook(lambda _m, args, _o: events.append(("end", tuple(args[0].shape[:2]))))]

    async def go():
        scheduler = ForwardScheduler(model.encode, workers=1, cpus=1, max_texts=64)
        running_call = asyncio.ensure_future(scheduler.embed(first))
        assert await asyncio.to_thread(first_started.wait, 10), "the first pass never began"
        sent = asyncio.ensure_future(scheduler.embed(cell))
        await asyncio.sleep(0)  # the cell has reached the scheduler's queue
        cell_queued.set()
        return await asyncio.wait_for(running_call, 10), await asyncio.wait_for(sent, 10)

    try:
        first_answer, cell_answer = asyncio.run(go())
    finally:
        for hook in hooks:
            hook.remove()
    tokens = bundled_embedder.encode(first).tokens
    assert (sum(tokens) >= 128) == (running != "cell")
    mine, its = (len(first), max(tokens)), (1, bundled_embedder.encode(cell).tokens[0])  # one pass each
    if running == "cell":
        assert events == [("start", mine), ("end", mine), ("start", its), ("end", its)]
    else:
        assert events == [("start", mine), ("start", its), ("end", its), ("end", mine)]
    np.testing.assert_allclose(first_answer.vectors, bundled_embedder.encode(first).vectors, atol=1e-5)
    np.testing.assert_allclose(cell_answer.vectors, bundled_embedder.encode(cell).vectors, atol=1e-5)


def test_token_budget_splits_batches_without_changing_results(bundled_spec, bundled_embedder):
    small = TextEmbedder(bundled_spec, dtype="float32", max_batch_tokens=64)
    np.testing.assert_allclose(
        small.encode(TEXTS).vectors, bundled_embedder.encode(TEXTS).vectors, atol=1e-5
    )


def test_truncation_is_reported_and_capped(bundled_spec):
    embedder = TextEmbedder(bundled_spec, max_input_tokens=12)
    result = embedder.encode(["short text", "long " * 50, "exactly " * 10])
    assert result.truncated == [False, True, False]
    assert result.tokens[1] == 12
    assert max(result.tokens) <= 12


def test_model_limit_caps_the_configured_limit(bundled_embedder):
    # all-MiniLM-L6-v2 reads at most 256 tokens, whatever max_input_tokens says.
    assert bundled_embedder.max_tokens == 256
    result = bundled_embedder.encode(["word " * 1000])
    assert result.truncated == [True] and result.tokens == [256]


def test_vectors_are_unit_length_float32(bundled_embedder):
    result = bundled_embedder.encode(TEXTS)
    assert result.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, rtol=1e-5)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads threads' CPU time in /proc")
def test_a_cpu_embedder_tokenizes_batches_on_the_calling_thread():
    # tokenizers' own pool would spin beside the forward passes, which use every core. Its
    # threads are started with the tokenizer, so what is checked is who does the work.
    script = (
        "import threading\n"
        "from bench.corpus import sentences\n"
        "from bench.cpu_share import thread_cpu_seconds\n"
        "from serve_app.core.modelinfo import resolve_model\n"
        "from serve_app.model.embedder import TextEmbedder\n"
        "embedder = TextEmbedder(resolve_model('bundled:minilm'), device='cpu')\n"
        "texts = sentences(2000)\n"
        "embedder.tokenize(texts)\n"
        "me, before = str(threading.get_native_id()), thread_cpu_seconds()\n"
        "for _ in range(20):\n"
        "    embedder.tokenize(texts)\n"
        "after = thread_cpu_seconds()\n"
        "print(after[me] - before[me], sum(after[t] - before.get(t, 0) for t in after if t != me))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, check=True, timeout=120).stdout.split()
    calling, others = float(out[-2]), float(out[-1])  # CPU seconds
    assert calling > 0 and others <= max(0.02, calling / 10), (calling, others)


@pytest.mark.parametrize("hub", ["reachable", "unreachable"])
def test_a_hub_model_in_the_local_cache_loads_without_asking_the_hub(
        hub, hub_cache, fake_hub, tiny_qwen3_dir):
    # Every cold start from zero loads the model again. It must not ask the hub about
    # files it has (nor about optional ones the repo never had), and an office server that
    # lost its internet must not wait on the hub (transformers retried each file for 23 s).
    hub_cache("acme/tiny-qwen3", "c" * 40, tiny_qwen3_dir)
    fake_hub.serve("acme/tiny-qwen3", "c" * 40, tiny_qwen3_dir)
    spec = resolve_model("acme/tiny-qwen3")  # as the service's start pinned it
    script = (
        "import json, sys\n"
        "from serve_app.core.modelinfo import ModelSpec\n"
        "from serve_app.model.embedder import TextEmbedder\n"
        "print(TextEmbedder(ModelSpec(**json.loads(sys.argv[1]))).encode(['hello']).vectors.shape)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(asdict(spec))], capture_output=True, text=True,
        env=hub_cache.env(fake_hub if hub == "reachable" else None), timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "64)"
    assert [r for r in fake_hub.requests if "acme/tiny-qwen3" in r] == []


def test_an_operators_own_tokenizers_parallelism_is_kept(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    tokenize_on_the_calling_thread()
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"


def _auto_on_a_cpu_reporting_bf16_units(speedup: float):
    """choose_dtype("auto") where torch reports AVX512-BF16 and the probe measures `speedup`."""
    return choose_dtype("auto", torch.device("cpu"), features=lambda: ["AVX512-BF16"],
                        speedup=lambda dtype: speedup)


def test_a_replica_with_no_gpu_share_runs_on_the_cpu_though_it_sees_a_gpu(monkeypatch, bundled_spec):
    # Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for an actor that asked for no GPU, so such a
    # replica on a GPU node sees the card; it must not take a GPU that Ray did not give it.
    from serve_app.core.config import AppArgs
    from serve_app.model.hardware import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    settings = AppArgs(model="bundled:minilm")  # device: auto
    embedder = TextEmbedder.from_settings(bundled_spec, settings, gpu_fraction=0.0, cpu_threads=1)
    assert embedder.device.type == "cpu"
    assert embedder.encode(["still answers"]).vectors.shape == (1, 384)
    # With a share, or outside Ray (no share asked), auto still means the GPU.
    assert pick_device("auto", 0.25).type == "cuda"
    assert pick_device("auto", None).type == "cuda"
    assert pick_device("cuda", 0.0).type == "cuda"


def test_auto_dtype_is_bfloat16_where_the_cpu_runs_it_natively():
    dtype, reason = _auto_on_a_cpu_reporting_bf16_units(4.2)
    assert dtype == torch.bfloat16
    assert "AVX512-BF16" in reason and "4.2x" in reason


def test_auto_dtype_is_float32_on_a_cpu_without_bfloat16_units():
    def never_asked():
        raise AssertionError("no probe where torch reports no bfloat16 units")

    dtype, reason = choose_dtype("auto", torch.device("cpu"), features=lambda: [],
                                 speedup=never_asked)
    assert dtype == torch.float32
    assert "neither AMX nor AVX512-BF16" in reason


def test_auto_dtype_is_float32_where_the_units_are_reported_but_bfloat16_runs_slower():
    dtype, reason = _auto_on_a_cpu_reporting_bf16_units(0.25)
    assert dtype == torch.float32
    assert "AVX512-BF16" in reason and "0.25x" in reason


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_the_half_precision_probe_gives_the_callers_thread_count_back(half):
    # The replica's home thread runs it between setting its own count and its first pass.
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert half_matmul_speedup(half) > 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not cpu_bf16_features(), reason="this CPU has no bfloat16 units to hide")
def test_auto_dtype_is_float32_when_onednn_is_capped_below_the_cpus_bfloat16_units():
    # torch still reports the units; only a product shows that bfloat16 is emulated.
    script = ("import torch\nfrom serve_app.model.hardware import choose_dtype, cpu_bf16_features\n"
              "print(bool(cpu_bf16_features()), choose_dtype('auto', torch.device('cpu'))[0])")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, check=True, timeout=120).stdout.split()
    assert out == ["True", "torch.float32"]


def test_a_set_dtype_wins_over_the_cpu_check():
    def never_asked():
        raise AssertionError("the CPU check runs only for dtype=auto")

    assert choose_dtype("float32", torch.device("cpu"), features=never_asked)[0] == torch.float32


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_set_half_dtype_that_runs_slower_than_float32_on_this_cpu_is_kept_and_warned_of(
    dtype, caplog,
):
    probed = []

    def slow(half):
        probed.append(half)
        return 0.3

    with caplog.at_level(logging.WARNING, logger="serve_app.model.hardware"):
        chosen, reason = choose_dtype(dtype, torch.device("cpu"), speedup=slow)
    assert chosen == getattr(torch, dtype) and probed == [chosen]  # the setting stands
    assert reason == (f"dtype={dtype} was set, but a {dtype} matrix product ran at 0.30x float32's "
                      "speed on this CPU, so the model runs slower than in float32; dtype: auto "
                      "picks the fastest precision this CPU runs natively")
    assert reason in caplog.text
    fast, quiet = choose_dtype(dtype, torch.device("cpu"), speedup=lambda half: 4.2)
    assert quiet == f"dtype={dtype} was set (its matrix products ran 4.2x float32's speed here)"


def test_replica_reports_the_dtype_it_chose_and_why(bundled_spec):
    embedder = TextEmbedder(bundled_spec)  # dtype=auto, on this machine's CPU
    expected = torch.bfloat16 if cpu_bf16_features() else torch.float32
    assert embedder.dtype == expected
    runtime = embedder.encode(["a"]).runtime
    assert (runtime.device, runtime.dtype) == ("cpu", str(expected).removeprefix("torch."))
    assert runtime.reason.startswith("dtype=auto: ")


PARITY_TEXTS = [*TEXTS, *sentences(40)]


@pytest.mark.parametrize("model", ["bundled", "standin"])
def test_bfloat16_stays_within_cosine_0999_of_float32(model, bundled_spec, small_standin_dir):
    spec = bundled_spec if model == "bundled" else resolve_model(str(small_standin_dir))
    full = TextEmbedder(spec, dtype="float32").encode(PARITY_TEXTS).vectors
    half = TextEmbedder(spec, dtype="bfloat16").encode(PARITY_TEXTS).vectors
    assert half.dtype == np.float32  # pooling and normalisation stay in float32
    assert cosine_rows(full, half).min() >= 0.999
    # Meaningful only if the texts' vectors differ clearly from one another.
    similarity = full @ full.T
    assert similarity[~np.eye(len(PARITY_TEXTS), dtype=bool)].mean() < 0.9


def test_standin_inputs_end_with_one_endoftext(small_standin_dir):
    # Qwen3-Embedding's tokenizer appends <|endoftext|> (151643) itself, while its
    # eos_token is <|im_end|> (151645): nothing more may be appended.
    embedder = TextEmbedder(resolve_model(str(small_standin_dir)), max_input_tokens=16)
    ids, truncated = embedder.tokenize(["hello there", "word " * 100])
    assert [row[-1] for row in ids] == [151643, 151643]
    assert all(151645 not in row for row in ids)
    assert len(ids[1]) == 16 and truncated == [False, True]


def test_long_inputs_are_embedded_in_passes_the_token_budget_bounds(small_standin_dir):
    embedder = TextEmbedder(
        resolve_model(str(small_standin_dir)), max_input_tokens=8192, max_batch_tokens=1024
    )
    widths = []
    forward = embedder._forward
    embedder._forward = lambda rows: (widths.append((len(rows), max(map(len, rows)))), forward(rows))[1]
    texts = ["clause " * 9000, "notice " * 3000, "party " * 700, "a short one", "another short one"]
    result = embedder.encode(texts)
    assert result.truncated == [True, False, False, False, False]
    assert result.tokens[0] == 8192
    # Every pass holds at most the budget, or one input longer than it alone.
    assert all(rows == 1 or rows * width <= 1024 for rows, width in widths)
    assert sum(rows for rows, _ in widths) == len(texts)
    assert np.isfinite(result.vectors).all()


@pytest.mark.parametrize("side", ["left", "right"])
def test_pooling_modes_pick_the_right_tokens(side):
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    if side == "right":
        mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
        first, last = [0.0, 4.0], [1.0, 7.0]
        mean = [0.5, 5.5]
    else:
        mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
        first, last = [2.0, 4.0], [3.0, 7.0]
        mean = [2.5, 5.5]
    assert pool(hidden, mask, "cls")[:, 0].tolist() == first
    assert pool(hidden, mask, "lasttoken")[:, 0].tolist() == last
    assert pool(hidden, mask, "mean")[:, 0].tolist() == mean
    assert pool(hidden, mask, "max")[:, 0].tolist() == last


@pytest.mark.parametrize("model", ["bundled", "standin", "tiny"])
def test_fast_tokenizer_load_matches_autotokenizer(model, bundled_spec, small_standin_dir,
                                                   tiny_qwen3_dir):
    from transformers import AutoTokenizer

    from serve_app.model.tokenizer import load_tokenizer

    spec = {"bundled": bundled_spec, "standin": resolve_model(str(small_standin_dir)),
            "tiny": resolve_model(str(tiny_qwen3_dir))}[model]
    ours = load_tokenizer(spec.source, spec.padding_side)
    reference = AutoTokenizer.from_pretrained(spec.source, padding_side=spec.padding_side)
    texts = [*TEXTS, *sentences(50), "[CLS] <|im_start|> <|endoftext|> literal specials"]
    assert ours(texts)["input_ids"] == reference(texts)["input_ids"]
    for attr in ("eos_token_id", "pad_token_id", "padding_side"):
        assert getattr(ours, attr) == getattr(reference, attr), attr


def test_tokenizers_transformers_adjusts_load_the_general_way(tmp_path, tiny_qwen3_dir,
                                                              monkeypatch):
    import json
    import shutil

    from transformers import AutoTokenizer

    from serve_app.model import tokenizer

    directory = tmp_path / "flagged"
    shutil.copytree(tiny_qwen3_dir, directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "add_eos_token": True}))
    calls = []
    general = AutoTokenizer.from_pretrained
    monkeypatch.setattr(tokenizer.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: calls.append(a[0]) or general(*a, **k))
    tokenizer.load_tokenizer(str(tiny_qwen3_dir), "left")
    assert calls == []  # nothing to adjust: tokenizer.json alone
    tokenizer.load_tokenizer(str(directory), "left")
    assert calls == [str(directory)]


@pytest.mark.parametrize("model", ["bundled", "standin", "tiny"])
def test_token_ids_of_a_text_embed_as_that_text(model, bundled_embedder, small_standin_dir, tiny):
    # With or without the special tokens the tokenizer adds ([CLS]/[SEP] for MiniLM,
    # <|endoftext|> for Qwen3-Embedding, the model's EOS appended for the tiny Qwen3).
    from serve_app.core.encoded import TokenIds

    embedder = {"bundled": bundled_embedder, "tiny": tiny,
                "standin": TextEmbedder(resolve_model(str(small_standin_dir)), dtype="float32")}[model]
    texts = TEXTS[:4]
    as_text = embedder.encode(texts)
    plain = [TokenIds(tuple(embedder.tokenizer(t, add_special_tokens=False)["input_ids"])) for t in texts]
    marked = [TokenIds(tuple(embedder.tokenizer(t)["input_ids"])) for t in texts]
    for items in (plain, marked):
        assert embedder.tokenize(items)[0] == embedder.tokenize(texts)[0]
        got = embedder.encode(items)
        np.testing.assert_allclose(got.vectors, as_text.vectors, atol=1e-5)
        assert got.tokens == as_text.tokens and got.truncated == [False] * 4


def test_token_ids_are_cut_to_the_limit_like_text(small_standin_dir):
    from serve_app.core.encoded import TokenIds

    embedder = TextEmbedder(resolve_model(str(small_standin_dir)), max_input_tokens=16)
    text = "word " * 100
    ids = TokenIds(tuple(embedder.tokenizer(text, add_special_tokens=False)["input_ids"]))
    rows, cut = embedder.tokenize([ids, "short", text])
    assert rows[0] == rows[2] and len(rows[0]) == 16 and rows[0][-1] == 151643
    assert cut == [True, False, True]


def test_the_cpu_fast_paths_say_when_the_model_gives_inf_or_nan(overflowing_standin_dir):
    # A batch actor turns them on in its constructor: an overflowing model must not kill it
    # there, nor be said to have failed the row check.
    embedder = TextEmbedder(resolve_model(str(overflowing_standin_dir)), dtype="float16")
    assert embedder.speed_up() == [
        "Linear weights not packed: float16 weights (only bfloat16 ones are packed)",
        "Elementwise work not fused: it needs the packed linear weights",
        "Rows not shared: the model gives inf or NaN in float16 (its requests say so)",
    ]
    assert not embedder.rows_shared
