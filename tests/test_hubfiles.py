"""A hub model's files on this machine: the pinned revision, loaded from the cache, fetched once.

Offline cases run here (the tests' default, HF_HUB_OFFLINE=1); those that reach a hub run
in a subprocess against `fake_hub` on 127.0.0.1, since huggingface_hub reads its endpoint
and offline switch from the environment when it is imported.
"""

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serve_app.core.errors import ModelLoadError
from serve_app.core.hubfiles import files_to_load, model_directory
from serve_app.core.modelinfo import resolve_model

REPO = "acme/tiny-qwen3"
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40
# A model's sentence-transformers files: what transformers' own download leaves out.
ST_FILES = ["modules.json", "config_sentence_transformers.json", "1_Pooling", "2_Normalize"]

# Resolve (optionally) and fetch in a fresh process: argv[1] is a hub id (argv[2] a revision)
# or a spec as JSON.
FETCH = """
import json, logging, sys
logging.basicConfig(level=logging.WARNING)
logging.getLogger("serve_app").setLevel(logging.INFO)
from dataclasses import asdict
from serve_app.core.errors import ModelLoadError
from serve_app.core.hubfiles import model_directory
from serve_app.core.modelinfo import ModelSpec, resolve_model
said = []
try:
    arg = sys.argv[1]
    revision = sys.argv[2] if len(sys.argv) > 2 else None
    spec = ModelSpec(**json.loads(arg)) if arg.startswith("{") else resolve_model(arg, revision)
    print(json.dumps({"spec": asdict(spec), "dir": model_directory(spec, say=said.append),
                      "said": said}))
except ModelLoadError as exc:
    print(json.dumps({"error": str(exc), "said": said}))
"""


def fetch(env: dict, model: str, *revision: str) -> dict:
    """What the fetch gave (its spec and directory, or its error), and its log as "log"."""
    done = subprocess.run([sys.executable, "-c", FETCH, model, *revision], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "log": done.stderr}


def asked_about(hub, repo: str = REPO) -> list[str]:
    return [request for request in hub.requests if repo in request]


# --- offline, in this process ----------------------------------------------------------


def test_a_hub_model_loads_from_the_revision_resolved_at_start_though_the_hub_moved_on(
        hub_cache, tiny_qwen3_dir):
    started_with = hub_cache(REPO, COMMIT_A, tiny_qwen3_dir)
    spec = resolve_model(REPO)
    assert spec.revision == COMMIT_A
    # A new revision reaches the cache after the service started (another program pulled
    # it); a replica that starts now must still run the weights the others run.
    hub_cache(REPO, COMMIT_B, tiny_qwen3_dir)
    assert model_directory(spec) == str(started_with)


def test_a_named_revision_is_served_though_main_points_elsewhere(hub_cache, tiny_qwen3_dir):
    pinned = hub_cache(REPO, COMMIT_A, tiny_qwen3_dir, main=False)
    hub_cache(REPO, COMMIT_B, tiny_qwen3_dir)
    assert resolve_model(REPO).revision == COMMIT_B
    spec = resolve_model(REPO, COMMIT_A)
    assert spec.revision == COMMIT_A and model_directory(spec) == str(pinned)


def test_a_revision_for_a_local_model_is_refused_with_a_sentence(tiny_qwen3_dir):
    with pytest.raises(ModelLoadError, match=r"model_revision \(a+\) is for a model from the Hugging Face Hub"):
        resolve_model(str(tiny_qwen3_dir), COMMIT_A)


def test_a_revision_this_machine_lacks_offline_is_named(hub_cache, tiny_qwen3_dir):
    hub_cache(REPO, COMMIT_A, tiny_qwen3_dir)
    with pytest.raises(ModelLoadError) as info:
        resolve_model(REPO, COMMIT_B)
    assert str(info.value).startswith(f"Cannot load model '{REPO}' at revision '{COMMIT_B}': ")


def test_a_model_cached_without_its_weights_offline_names_the_file_and_the_command(
        hub_cache, tiny_qwen3_dir):
    hub_cache(REPO, COMMIT_A, tiny_qwen3_dir, skip=["*.safetensors"])
    spec = resolve_model(REPO)  # its config files are enough to start
    with pytest.raises(ModelLoadError) as info:
        model_directory(spec)
    message = str(info.value)
    assert message.startswith(f"Cannot load model '{REPO}' at revision {COMMIT_A[:12]}: ")
    assert "lacks its weights (model.safetensors)" in message and "HF_HUB_OFFLINE" in message
    assert f"hf download {REPO} --revision {COMMIT_A}" in message


def test_a_sharded_model_missing_a_shard_names_it(hub_cache, tiny_qwen3_dir):
    snapshot = hub_cache(REPO, COMMIT_A, tiny_qwen3_dir)
    (snapshot / "model.safetensors").rename(snapshot / "model-00001-of-00002.safetensors")
    shards = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (snapshot / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
    with pytest.raises(ModelLoadError, match="lacks its model-00002-of-00002.safetensors,"):
        model_directory(resolve_model(REPO))


def test_one_safetensors_file_is_enough_beside_a_pytorch_index(hub_cache, tiny_qwen3_dir):
    # Repos that moved to safetensors often keep the old index; transformers reads
    # model.safetensors first, and so does the check.
    snapshot = hub_cache(REPO, COMMIT_A, tiny_qwen3_dir)
    (snapshot / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {"a": "pytorch_model-00001-of-00002.bin"}}))
    assert model_directory(resolve_model(REPO)) == str(snapshot)


def test_a_local_directory_loads_from_itself(tiny_qwen3_dir):
    spec = resolve_model(str(tiny_qwen3_dir))
    assert spec.revision is None
    assert model_directory(spec) == str(tiny_qwen3_dir)


def test_files_to_load_are_one_set_of_weights_and_what_the_loaders_read():
    listed = [
        "README.md", "modules.json", "config_sentence_transformers.json", "1_Pooling/config.json",
        "0_Transformer/config.json", "0_Transformer/tokenizer.json", "0_Transformer/merges.txt",
        "0_Transformer/model.safetensors", "0_Transformer/model.fp16.safetensors",
        "0_Transformer/pytorch_model.bin", "checkpoint-10/model.safetensors",
        "onnx/model.onnx", "onnx/deeper/tokenizer.json",
    ]
    assert files_to_load(listed, "0_Transformer") == [
        "0_Transformer/config.json", "0_Transformer/merges.txt",
        "0_Transformer/model.safetensors", "0_Transformer/tokenizer.json",
        "1_Pooling/config.json", "config_sentence_transformers.json", "modules.json",
    ]
    legacy = ["config.json", "tokenizer.json", "pytorch_model-00001-of-00002.bin",
              "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json"]
    assert files_to_load(legacy) == sorted(legacy)


# --- with a hub, in a subprocess -------------------------------------------------------


def test_a_machine_without_the_model_fetches_the_pinned_revision_once_then_asks_nothing(
        hub_cache, fake_hub, tiny_qwen3_dir):
    fake_hub.serve(REPO, COMMIT_A, tiny_qwen3_dir)
    first = fetch(hub_cache.env(fake_hub), REPO)
    assert first["spec"]["revision"] == COMMIT_A
    assert first["said"] and "Fetching acme/tiny-qwen3" in first["said"][0]
    fetched = {p.relative_to(first["dir"]).as_posix() for p in Path(first["dir"]).rglob("*")
               if p.is_file()}
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= fetched
    before = len(fake_hub.requests)
    again = fetch(hub_cache.env(fake_hub), json.dumps(first["spec"]))
    assert again["dir"] == first["dir"] and again["said"] == []
    assert fake_hub.requests[before:] == []


def test_a_repo_of_pytorch_model_bin_weights_is_fetched_with_them(
        hub_cache, fake_hub, tiny_qwen3_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    repo = shutil.copytree(tiny_qwen3_dir, tmp_path / "bin-repo")
    torch.save(load_file(repo / "model.safetensors"), repo / "pytorch_model.bin")
    (repo / "model.safetensors").unlink()
    fake_hub.serve(REPO, COMMIT_A, repo)
    fetched = fetch(hub_cache.env(fake_hub), REPO)
    assert "error" not in fetched, fetched
    assert (Path(fetched["dir"]) / "pytorch_model.bin").is_file()


def test_a_revision_fetched_without_its_extra_files_loads_offline(
        hub_cache, fake_hub, tiny_qwen3_dir, tmp_path):
    # The repo also keeps a checkpoint the service does not load. The start fetches what it
    # needs; the next start, offline, must find that enough (huggingface_hub's own check of
    # a snapshot against its tree listing would call it incomplete).
    repo = shutil.copytree(tiny_qwen3_dir, tmp_path / "repo")
    (repo / "checkpoint-10").mkdir()
    shutil.copy(repo / "model.safetensors", repo / "checkpoint-10" / "model.safetensors")
    fake_hub.serve(REPO, COMMIT_A, repo)
    online = fetch(hub_cache.env(fake_hub), REPO)
    assert not (Path(online["dir"]) / "checkpoint-10").exists()
    offline = fetch({**hub_cache.env(), "HF_HUB_OFFLINE": "1"}, REPO)
    assert offline.get("dir") == online["dir"], offline


def test_an_unreachable_hub_stops_a_fetch_at_once_with_one_sentence(hub_cache, tiny_qwen3_dir):
    hub_cache(REPO, COMMIT_A, tiny_qwen3_dir, skip=["*.safetensors"])
    started = time.monotonic()
    out = fetch(hub_cache.env(), REPO)  # the hub's port refuses connections
    assert time.monotonic() - started < 15  # no retries with back-off (23 s before)
    assert out["said"] == []  # nothing announced that did not happen
    assert "the hub could not be reached" in out["error"] and "weights (model.safetensors)" in out["error"]


def test_a_hub_that_takes_the_connection_but_never_answers_does_not_hold_the_start(
        hub_cache, tiny_qwen3_dir):
    # A stalled proxy: connections are accepted (the kernel's backlog) and nothing comes back.
    # The start waits the metadata timeout once, then serves what the cache has.
    hub_cache(REPO, COMMIT_A, tiny_qwen3_dir)
    with socket.socket() as stalled:
        stalled.bind(("127.0.0.1", 0))
        stalled.listen(16)
        env = {**hub_cache.env(), "HF_HUB_ETAG_TIMEOUT": "1",
               "HF_ENDPOINT": f"http://127.0.0.1:{stalled.getsockname()[1]}"}
        started = time.monotonic()
        out = fetch(env, REPO)
        assert time.monotonic() - started < 15  # the 1 s metadata timeout once, not retries
        pinned = fetch(env, REPO, COMMIT_A)  # as the app builder resolves it after the start
    assert out.get("spec", {}).get("revision") == COMMIT_A, out
    assert out["said"] == []
    assert pinned.get("dir") == out["dir"], pinned


def test_a_transformer_in_a_subfolder_reads_the_same_spec_before_and_after_the_fetch(
        hub_cache, fake_hub, tiny_qwen3_dir, tmp_path):
    repo = tmp_path / "st-repo"
    shutil.copytree(tiny_qwen3_dir, repo / "0_Transformer",
                    ignore=shutil.ignore_patterns("modules.json", "config_sentence_transformers.json",
                                                  "1_Pooling", "2_Normalize"))
    for name in ("config_sentence_transformers.json", "1_Pooling", "2_Normalize"):
        copy = shutil.copytree if (tiny_qwen3_dir / name).is_dir() else shutil.copy
        copy(tiny_qwen3_dir / name, repo / name)
    modules = json.loads((tiny_qwen3_dir / "modules.json").read_text())
    modules[0]["path"] = "0_Transformer"
    (repo / "modules.json").write_text(json.dumps(modules))
    (repo / "0_Transformer" / "sentence_bert_config.json").write_text('{"max_seq_length": 128}')
    fake_hub.serve(REPO, COMMIT_A, repo)
    first = fetch(hub_cache.env(fake_hub), REPO)
    assert first["spec"]["subfolder"] == "0_Transformer"
    assert first["dir"].endswith(f"{COMMIT_A}/0_Transformer")
    assert first["spec"]["max_tokens"] == 128
    again = fetch({**hub_cache.env(), "HF_HUB_OFFLINE": "1"}, REPO)
    assert again["spec"] == first["spec"]
    before = len(fake_hub.requests)
    pinned = fetch(hub_cache.env(fake_hub), REPO, COMMIT_A)  # its modules.json is cached
    assert pinned["spec"] == first["spec"] and fake_hub.requests[before:] == []



def cls_pooled(tiny_qwen3_dir: Path, tmp_path: Path) -> Path:
    """tiny-qwen3 as a repo whose sentence-transformers files pool the first token, unlike
    its model type's default (the last token)."""
    repo = shutil.copytree(tiny_qwen3_dir, tmp_path / "cls-repo")
    pooling = repo / "1_Pooling" / "config.json"
    pooling.write_text(json.dumps({**json.loads(pooling.read_text()),
                                   "pooling_mode_lasttoken": False, "pooling_mode_cls_token": True}))
    return repo


def test_a_pinned_commit_cached_without_its_sentence_transformers_files_fetches_them(
        hub_cache, fake_hub, tiny_qwen3_dir, tmp_path):
    # The cache holds the commit's config.json (as transformers' own download leaves it),
    # not its modules.json: a spec read from that pools as the model type does, not as the
    # model says.
    repo = cls_pooled(tiny_qwen3_dir, tmp_path)
    hub_cache(REPO, COMMIT_A, repo, skip=ST_FILES)
    fake_hub.serve(REPO, COMMIT_A, repo)
    out = fetch(hub_cache.env(fake_hub), REPO, COMMIT_A)
    assert out.get("spec", {}).get("pooling") == "cls", out
    assert out["spec"]["prompts"]["query"].startswith("Instruct: ")


def test_a_pinned_commit_of_a_repo_without_modules_json_asks_the_hub_only_at_its_first_start(
        hub_cache, fake_hub, tiny_qwen3_dir, tmp_path):
    plain = shutil.copytree(tiny_qwen3_dir, tmp_path / "plain-repo",
                            ignore=shutil.ignore_patterns(*ST_FILES))
    fake_hub.serve(REPO, COMMIT_A, plain)
    first = fetch(hub_cache.env(fake_hub), REPO, COMMIT_A)
    assert first.get("spec", {}).get("pooling") == "lasttoken", first
    before = len(fake_hub.requests)
    again = fetch(hub_cache.env(fake_hub), REPO, COMMIT_A)
    assert again["spec"] == first["spec"]
    assert fake_hub.requests[before:] == []  # the hub's "no modules.json" is remembered
    assert "modules.json" not in first["log"] + again["log"]


def test_a_cache_that_may_lack_modules_json_starts_and_says_so_where_the_hub_cannot_tell(
        hub_cache, fake_hub, tiny_qwen3_dir, tmp_path):
    hub_cache(REPO, COMMIT_A, cls_pooled(tiny_qwen3_dir, tmp_path), skip=ST_FILES)
    offline = {**hub_cache.env(), "HF_HUB_OFFLINE": "1"}
    starts = [(offline, ()), (offline, (COMMIT_A,)),
              (hub_cache.env(), (COMMIT_A,)),  # a hub that refuses connections
              (hub_cache.env(fake_hub), (COMMIT_A,))]  # one that no longer serves the repo
    for env, revision in starts:
        out = fetch(env, REPO, *revision)
        assert out.get("spec", {}).get("pooling") == "lasttoken", out  # all it can know
        assert "no modules.json" in out["log"] and "pooling from its model type" in out["log"], out["log"]


def test_a_cached_listing_that_names_missing_files_still_starts_offline(
        hub_cache, fake_hub, tiny_qwen3_dir):
    # A download of some of the files (`hf download REPO --exclude modules.json ...`) leaves
    # the repo's file listing in the cache; huggingface_hub then calls the snapshot
    # incomplete offline.
    fake_hub.serve(REPO, COMMIT_A, tiny_qwen3_dir)
    skipped = ["modules.json", "config_sentence_transformers.json", "1_Pooling/*", "2_Normalize/*"]
    partial = ("from huggingface_hub import snapshot_download; "
               f"snapshot_download({REPO!r}, ignore_patterns={skipped!r})")
    subprocess.run([sys.executable, "-c", partial], env=hub_cache.env(fake_hub), check=True,
                   capture_output=True, timeout=120)
    for revision in ((), (COMMIT_A,)):
        out = fetch({**hub_cache.env(), "HF_HUB_OFFLINE": "1"}, REPO, *revision)
        assert out.get("spec", {}).get("pooling") == "lasttoken", out
        assert "no modules.json" in out["log"], out["log"]
