"""Loading a model's tokenizer: fast, from its tokenizer.json, where that says everything."""

from __future__ import annotations

from transformers import AutoTokenizer

# tokenizer_config.json keys with which transformers may change what tokenizer.json says
# (whatever their value); add_prefix_space only when true (Qwen's files say false).
_TOKENIZER_ADJUSTMENTS = ("add_bos_token", "add_eos_token", "legacy", "auto_map")


_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                   "mask_token")


def load_tokenizer(source: str, padding_side: str):
    """The model's fast tokenizer, from its tokenizer.json where that says everything.

    AutoTokenizer parses tokenizer.json again in Python and, for some classes,
    rebuilds the tokenizer from its vocabulary: about 1 s for Qwen's 151k tokens,
    holding the interpreter lock while the weights load. The Rust parser takes
    0.3-0.4 s and releases it. Tokenizers whose config asks transformers to adjust
    them (BOS/EOS flags, prefix spaces, custom code) go through AutoTokenizer.
    """
    import json
    from pathlib import Path

    from transformers import PreTrainedTokenizerFast

    tokenizer_json = Path(source) / "tokenizer.json"
    try:
        config = json.loads((Path(source) / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # a hub id, or no readable config: the general way
        config = None
    if (not isinstance(config, dict) or not tokenizer_json.is_file()
            or any(key in config for key in _TOKENIZER_ADJUSTMENTS)
            or config.get("add_prefix_space")):
        return AutoTokenizer.from_pretrained(source, padding_side=padding_side)
    specials = {}
    for key in _SPECIAL_TOKENS:
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            specials[key] = value
    # tokenizer_file, not a Tokenizer object: transformers deep-copies an object (a
    # second parse), while a file goes straight to the Rust parser.
    return PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_json), padding_side=padding_side,
        model_max_length=config.get("model_max_length", 1_000_000), **specials,
    )
