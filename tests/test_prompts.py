from dataclasses import replace

import pytest

from serve_app.core.config import DEFAULT_QUERY_INSTRUCTION, AppArgs
from serve_app.core.errors import InvalidRequest
from serve_app.core.prompts import prompt_prefix


def test_instruction_uses_qwen3_format(bundled_spec):
    prefix = prompt_prefix(bundled_spec, AppArgs(), instruction="Find the clause")
    assert prefix == "Instruct: Find the clause\nQuery:"


def test_documents_take_no_prompt(bundled_spec):
    assert prompt_prefix(bundled_spec, AppArgs()) == ""
    assert prompt_prefix(bundled_spec, AppArgs(), prompt_name="document") == ""


def test_query_uses_the_models_own_prompt_when_it_names_one(tiny_qwen3_dir):
    from serve_app.core.modelinfo import resolve_model

    spec = resolve_model(str(tiny_qwen3_dir))
    assert prompt_prefix(spec, AppArgs(), prompt_name="query") == spec.prompts["query"]


def test_query_on_an_encoder_without_a_query_prompt_takes_none(bundled_spec):
    # all-MiniLM-L6-v2 names no query prompt; Qwen3's instruction in front of its queries
    # cut recall@1 from 0.62 to 0.37 (bench/query_prompt.py), so a query is sent as typed.
    assert not bundled_spec.prompts and bundled_spec.pooling == "mean"
    assert prompt_prefix(bundled_spec, AppArgs(), prompt_name="query") == ""


def test_query_on_a_last_token_model_without_a_query_prompt_takes_qwen3s_task(tiny_qwen3_dir):
    from serve_app.core.modelinfo import resolve_model

    bare = replace(resolve_model(str(tiny_qwen3_dir)), prompts={})  # no sentence-transformers files
    assert prompt_prefix(bare, AppArgs(), prompt_name="query") == (
        f"Instruct: {DEFAULT_QUERY_INSTRUCTION}\nQuery:"
    )


def test_a_configured_query_task_applies_to_any_model_without_a_query_prompt(bundled_spec):
    args = AppArgs(query_instruction="Retrieve support answers")
    assert prompt_prefix(bundled_spec, args, prompt_name="query") == (
        "Instruct: Retrieve support answers\nQuery:"
    )


def test_named_task_from_config(bundled_spec):
    args = AppArgs(tasks={"legal": "Given a legal question, find the governing clause"})
    assert prompt_prefix(bundled_spec, args, prompt_name="legal") == (
        "Instruct: Given a legal question, find the governing clause\nQuery:"
    )


def test_braces_in_an_instruction_are_kept(bundled_spec):
    prefix = prompt_prefix(bundled_spec, AppArgs(), instruction="match {x} and {instruction}")
    assert prefix == "Instruct: match {x} and {instruction}\nQuery:"


def test_unknown_prompt_name_lists_the_known_ones(bundled_spec):
    with pytest.raises(InvalidRequest, match="Known prompt names: document, query") as info:
        prompt_prefix(bundled_spec, AppArgs(), prompt_name="legall")
    assert info.value.param == "prompt_name"


def test_instruction_and_prompt_name_together_are_refused(bundled_spec):
    with pytest.raises(InvalidRequest, match="not both"):
        prompt_prefix(bundled_spec, AppArgs(), instruction="x", prompt_name="query")
