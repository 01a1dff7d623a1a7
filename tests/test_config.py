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
