import pytest
from pydantic import ValidationError

from serve_app.core.config import DEFAULT_MODEL, AppArgs


def test_defaults_serve_qwen3_with_scale_to_zero():
    args = AppArgs()
    assert args.model == DEFAULT_MODEL
    assert args.model_id == DEFAULT_MODEL
    assert args.min_replicas == 0
    assert args.max_input_tokens == 8192


def test_served_name_overrides_model_id():
    assert AppArgs(model="bundled:minilm", served_model_name="minilm").model_id == "minilm"


def test_null_and_auto_as_strings_unset_what_may_be_unset():
    # From key=value on the command line, where a file would say `null`.
    args = AppArgs.model_validate({
        "model": "bundled:minilm", "model_revision": "null", "gpu_fraction": "auto", "max_replicas": "AUTO",
        "max_batch_tokens": "none", "dtype": "auto", "served_model_name": "auto"})
    assert (args.model_revision, args.gpu_fraction, args.max_replicas, args.max_batch_tokens) == (None,) * 4
    assert args.dtype == "auto" and args.served_model_name == "auto"  # words of their own there
    with pytest.raises(ValidationError, match="max_replicas"):
        AppArgs.model_validate({"max_replicas": "automatic"})


def test_every_setting_is_in_the_readmes_configuration_table():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Configuration"):]
    section = section[: section.index("\n## ", 1)]
    assert [name for name in AppArgs.model_fields if f"`{name}`" not in section] == []


def test_cli_strings_are_typed():
    # `serve run serve_app:build_app key=value` passes every value as a string.
    args = AppArgs.model_validate(
        {"model": "bundled:minilm", "gpu_fraction": "0.5", "max_batch_texts": "16",
         "tasks": '{"legal": "Find the clause that answers the question"}'}
    )
    assert args.gpu_fraction == 0.5
    assert args.max_batch_texts == 16
    assert args.tasks == {"legal": "Find the clause that answers the question"}


@pytest.mark.parametrize(
    "bad",
    [
        {"gpu_fraction": 1.5},
        {"min_replicas": 3, "max_replicas": 2},
        {"initial_replicas": 3, "max_replicas": 2},  # Ray refused it inside build_app
        {"max_queued_requests": 0},  # Ray's rule: -1 or a positive number
        {"max_batch_texts": 0},
        {"instruction_template": "no slot here"},
        {"unknown_setting": 1},
    ],
)
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValidationError):
        AppArgs(**bad)
