"""`python -m serve_app`: the command it runs and the environment it runs it in."""

import subprocess
import sys

import pytest
import yaml

from serve_app.launch import FAST_SERVE_ENV, serve_run_command, tuned_environment


def test_import_path_mode_passes_typed_args():
    command, temporary = serve_run_command(["model=bundled:minilm", "gpu_fraction=0"])
    assert command[-3:] == ["serve_app:build_app", "model=bundled:minilm", "gpu_fraction=0"]
    assert temporary is None


def test_config_file_runs_as_it_is_without_overrides():
    command, temporary = serve_run_command(["serve_config.yaml"])
    assert command[-1] == "serve_config.yaml" and temporary is None


def test_config_file_with_overrides_gets_a_checked_copy():
    command, temporary = serve_run_command(["serve_config.yaml", "model=bundled:minilm", "port=8011"])
    try:
        config = yaml.safe_load(temporary.read_text())
        assert command[-1] == str(temporary)
        assert config["http_options"]["port"] == 8011
        args = config["applications"][0]["args"]
        assert args["model"] == "bundled:minilm"
        assert args["tasks"]["legal_search"].startswith("Given a legal question")  # kept
    finally:
        temporary.unlink()


def test_a_bad_override_is_refused_before_anything_starts():
    with pytest.raises(ValueError, match="gpu_fraction"):
        serve_run_command(["serve_config.yaml", "gpu_fraction=3"])


def test_tuned_environment_keeps_what_the_operator_set():
    env = tuned_environment({"RAY_SERVE_ENABLE_HA_PROXY": "0", "PATH": "/bin"})
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == FAST_SERVE_ENV["RAY_SERVE_THROUGHPUT_OPTIMIZED"]


def test_help_runs_without_ray():
    out = subprocess.run([sys.executable, "-m", "serve_app", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "python -m serve_app" in out.stdout
