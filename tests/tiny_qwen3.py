"""Build a tiny, randomly initialised Qwen3 embedding model on disk (no hub, no weights)."""

from __future__ import annotations

from pathlib import Path

EOS = "<|endoftext|>"
CORPUS = [
    "Given a web search query, retrieve relevant passages that answer the query",
    "The contract may be terminated by either party with thirty days notice.",
    "合同任何一方可提前三十天书面通知终止本合同。",
    "How do I reset my password? Click forgot password on the login page.",
    "Instruct: Query: documents, questions, answers, legal support research",
    "零一二三四五六七八九十 abcdefghijklmnopqrstuvwxyz 0123456789 .,;:!?'\"()[]{}",
]


def build_tokenizer(append_eos: bool = True):
    """A byte-level BPE tokenizer trained here; appends EOS like Qwen3-Embedding's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=[EOS, "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    if append_eos:
        eos_id = tok.token_to_id(EOS)
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {EOS}", pair=f"$A {EOS} $B:1 {EOS}:1", special_tokens=[(EOS, eos_id)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=EOS, padding_side="left",
        model_max_length=512,
    )


def build_tiny_qwen3(directory: Path, *, sentence_transformers: bool = True,
                     append_eos: bool = True, seed: int = 0) -> Path:
    """Save a 2-layer Qwen3 model and tokenizer; with ST files (last-token, normalise)."""
    import torch
    from transformers import Qwen3Config, Qwen3Model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(append_eos)
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    model = Qwen3Model(config)
    with torch.no_grad():
        # At the default init every text pools to nearly the same vector; larger
        # projections spread them apart, so a pooling or padding bug shows.
        for name, param in model.named_parameters():
            if name.endswith("proj.weight"):
                param.mul_(8.0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if sentence_transformers:
        write_st_files(directory, dimensions=64)
    return directory


def write_st_files(directory: Path, dimensions: int) -> None:
    """The sentence-transformers layout Qwen3-Embedding ships: last-token pooling, normalise."""
    from bench.qwen3_standin import write_sentence_transformers_files

    write_sentence_transformers_files(directory, dimensions, max_seq_length=512)
