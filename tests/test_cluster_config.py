"""cluster.yaml must pass Ray's own cluster-launcher validation."""

import copy

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config


def load(path="cluster.yaml"):
    with open(path) as f:
        return yaml.safe_load(f)


def test_cluster_yaml_passes_ray_validation():
    validate_config(prepare_config(load()))


def test_gpu_workers_scale_to_zero_and_head_has_no_gpu():
    config = load()
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = [t for t in config["available_node_types"].values() if t["resources"].get("GPU")]
    assert gpu_types and all(t["min_workers"] == 0 for t in gpu_types)


def test_the_heads_dashboard_and_job_api_listen_on_loopback_only():
    # Reached through `ray dashboard cluster.yaml` (an SSH forward), as the README says: on
    # the network it would be one more door, guarded by Ray's token alone.
    start = " ".join(load()["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in start


def test_the_head_gives_ray_the_keys_digests_not_the_keys(tmp_path):
    # Every Ray process on the head inherits `ray start`'s environment; the app needs only
    # the digests. The head's own command, run as its shell runs it, over a keys file.
    import re
    import subprocess
    import sys
    from pathlib import Path

    from serve_app.web.auth import key_digests_from_env

    start = " ".join(load()["head_start_ray_commands"])
    assert "EMBED_API_KEYS" not in start
    given = re.search(r'EMBED_API_KEY_DIGESTS="(\$\(.*?\))";', start).group(1)
    bin_dir = tmp_path / "bin"  # the node's python3 is the one the project is installed in
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    env = {"HOME": str(tmp_path), "PATH": f"{bin_dir}:/usr/bin:/bin"}
    (tmp_path / ".embeddings-api-keys").write_text("alpha-key,beta-key\n")
    digests = subprocess.run(["bash", "-c", f"echo {given}"], env=env, capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[1], check=True).stdout.strip()
    assert digests.split(",") == key_digests_from_env({"EMBED_API_KEYS": "alpha-key,beta-key"})
    (tmp_path / ".embeddings-api-keys").unlink()  # no keys file: no keys, and nothing printed
    quiet = subprocess.run(["bash", "-c", f"echo {given}"], env=env, capture_output=True, text=True, check=True)
    assert (quiet.stdout.strip(), quiet.stderr) == ("", "")


def test_validation_would_catch_a_broken_config():
    # The check above is only worth something if Ray rejects a bad file.
    import pytest

    broken = copy.deepcopy(load())
    broken["head_node_type"] = "no-such-type"
    with pytest.raises(ValueError):
        validate_config(prepare_config(broken))


def test_cluster_serve_config_pins_a_gpu_fraction():
    from ray.serve.schema import ServeDeploySchema

    from serve_app.core.config import AppArgs

    schema = ServeDeploySchema.model_validate(load("serve_config.cluster.yaml"))
    args = AppArgs.model_validate(schema.applications[0].args)
    # GPU workers start at zero, so auto-detection would see no GPU; the fraction is explicit.
    assert args.gpu_fraction == 0.25


def test_every_node_starts_with_the_serve_flags_and_token_auth():
    from serve_app.ray_shell.launch import FAST_SERVE_ENV

    config = load()
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        start = " ".join(commands)
        assert "RAY_AUTH_MODE=token" in start
        for key, value in FAST_SERVE_ENV.items():
            assert f"{key}={value}" in start
