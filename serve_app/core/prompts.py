"""Which prompt goes in front of a text: instructions for queries, none for documents."""

from __future__ import annotations

from serve_app.core.config import DEFAULT_QUERY_INSTRUCTION, AppArgs
from serve_app.core.errors import InvalidRequest
from serve_app.core.modelinfo import ModelSpec


def prompt_prefix(
    spec: ModelSpec,
    args: AppArgs,
    *,
    instruction: str | None = None,
    prompt_name: str | None = None,
) -> str:
    """The text put before each input, from a free instruction or a named prompt."""
    instruction = (instruction or "").strip()
    if instruction and prompt_name:
        raise InvalidRequest(
            "Give either 'instruction' or 'prompt_name', not both.", param="instruction"
        )
    if instruction:
        return format_instruction(args.instruction_template, instruction)
    if not prompt_name:
        return ""
    if prompt_name == "document":
        return spec.prompts.get("document", "")
    if prompt_name in args.tasks:
        return format_instruction(args.instruction_template, args.tasks[prompt_name])
    if prompt_name in spec.prompts:
        return spec.prompts[prompt_name]
    if prompt_name == "query":
        return _fallback_query_prefix(spec, args)
    known = sorted({"query", "document", *args.tasks, *spec.prompts})
    raise InvalidRequest(
        f"Unknown prompt_name '{prompt_name}'. Known prompt names: {', '.join(known)}.",
        param="prompt_name",
        code="unknown_prompt_name",
    )


def _fallback_query_prefix(spec: ModelSpec, args: AppArgs) -> str:
    """A query's prefix for a model that names no query prompt.

    Last-token pooled embedders (Qwen3, gte-Qwen2, e5-mistral) are trained on
    'Instruct: ...\\nQuery:'; encoders (mean or CLS pooling) are not, and an instruction
    in front of their queries costs recall, so they get none unless the config gives one.
    """
    task = args.query_instruction
    if task is None and spec.pooling == "lasttoken":
        task = DEFAULT_QUERY_INSTRUCTION
    return format_instruction(args.instruction_template, task) if task else ""


def format_instruction(template: str, instruction: str) -> str:
    """Qwen3's query prefix, 'Instruct: {task}\\nQuery:'; braces in the task are kept as typed."""
    return template.replace("{instruction}", instruction)
