import json

import pytest

from serve_app.core.errors import ModelLoadError
from serve_app.core.modelinfo import resolve_model


def test_bundled_alias_reads_its_sentence_transformers_config(bundled_spec):
    assert bundled_spec.model_type == "bert"
    assert bundled_spec.dimensions == 384
    assert bundled_spec.pooling == "mean"
    assert bundled_spec.normalize is True
    assert bundled_spec.padding_side == "right"
    assert bundled_spec.max_tokens == 256


def test_tiny_qwen3_reads_as_qwen3(tiny_qwen3_dir):
    spec = resolve_model(str(tiny_qwen3_dir))
    assert spec.model_type == "qwen3"
    assert spec.pooling == "lasttoken"
    assert spec.padding_side == "left"  # last-token pooling needs the real last token at -1
    assert spec.normalize is True
    assert spec.prompts["query"].startswith("Instruct: ")


def test_bare_qwen3_without_st_files_defaults_to_last_token(tmp_path, tiny_qwen3_dir):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (bare / name).write_bytes((tiny_qwen3_dir / name).read_bytes())
    spec = resolve_model(str(bare))
    assert (spec.pooling, spec.padding_side, spec.dimensions) == ("lasttoken", "left", 64)


def test_unknown_hub_model_offline_names_model_and_offline_alias():
    with pytest.raises(ModelLoadError) as info:
        resolve_model("Qwen/Qwen3-Embedding-0.6B")
    message = str(info.value)
    assert "Qwen/Qwen3-Embedding-0.6B" in message
    assert "bundled:minilm" in message


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no such directory"):
        resolve_model(str(tmp_path / "nowhere" / "model"))


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_unsupported_st_module_is_refused(tmp_path, tiny_qwen3_dir):
    modules = json.loads((tiny_qwen3_dir / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    model = tmp_path / "dense"
    model.mkdir()
    (model / "modules.json").write_text(json.dumps(modules))
    (model / "config.json").write_text((tiny_qwen3_dir / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="Dense"):
        resolve_model(str(model))


def test_new_style_pooling_config_is_read(tmp_path, tiny_qwen3_dir):
    model = tmp_path / "newstyle"
    (model / "1_Pooling").mkdir(parents=True)
    (model / "config.json").write_text((tiny_qwen3_dir / "config.json").read_text())
    (model / "modules.json").write_text((tiny_qwen3_dir / "modules.json").read_text())
    (model / "1_Pooling" / "config.json").write_text(
        json.dumps({"embedding_dimension": 64, "pooling_mode": "cls", "include_prompt": True})
    )
    assert resolve_model(str(model)).pooling == "cls"
