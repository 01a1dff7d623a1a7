"""Where a hub model's files are on this machine: its pinned revision in the Hugging Face cache.

Given a hub id, transformers asks the hub about every file at every load, the optional ones
a repo lacks included, and retries each for 23 s where the hub cannot be reached: a cold
start of the stand-in from a full cache took 163 s on an office server without internet.
A replica instead loads the revision the service pinned at start (`ModelSpec.revision`)
from a local directory, and asks the hub nothing when the files are there; the start (or
a new cluster node's first replica) fetches them once. No torch here.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path

from serve_app.core.errors import ModelLoadError
from serve_app.core.modelinfo import ModelSpec, ask_hub, cached_folder, first_line

logger = logging.getLogger(__name__)

# Of the transformer's folder, what from_pretrained and the tokenizer read: configs,
# vocabularies, templates, and one set of weights (safetensors, else pytorch_model.bin),
# not the variants and checkpoints some repos keep beside them.
_SAFETENSORS = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")
_BIN = re.compile(r"pytorch_model(-\d{5}-of-\d{5})?\.bin|pytorch_model\.bin\.index\.json")
_READ = re.compile(r"[^/]+\.(json|txt|model|tiktoken|jinja)")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model")


def model_directory(spec: ModelSpec, say: Callable[[str], None] = logger.info) -> str:
    """The local directory `spec` loads from; a hub model's files are fetched there once."""
    if spec.revision is None:
        return spec.source
    from huggingface_hub import constants, snapshot_download

    config = f"{spec.subfolder}/config.json" if spec.subfolder else "config.json"
    directory = cached_folder(spec.source, spec.revision, config)  # the transformer's folder
    missing = _missing_files(directory)
    if not missing:
        return str(directory)
    if constants.HF_HUB_OFFLINE:
        raise ModelLoadError(_not_cached(
            spec, missing, "HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, so the hub was "
            "not asked; unset it for one start to fetch them"))
    try:
        info = ask_hub(spec.source, spec.revision)  # not retried: no hub fails here at once
    except Exception as exc:
        raise ModelLoadError(_not_cached(
            spec, missing, f"the hub could not be reached ({first_line(exc)})")) from exc
    wanted = files_to_load([f.rfilename for f in info.siblings or []], spec.subfolder)
    say(f"Fetching {spec.source} (revision {spec.revision[:12]}, {len(wanted)} files) into "
        "this machine's Hugging Face cache, once; the model loads from there.")
    try:
        folder = Path(snapshot_download(spec.source, revision=spec.revision, allow_patterns=wanted))
    except Exception as exc:  # the hub went away mid-way, or refused a file
        raise ModelLoadError(_not_cached(
            spec, missing, f"fetching them failed ({first_line(exc)})")) from exc
    directory = folder / spec.subfolder
    if missing := _missing_files(directory):
        raise ModelLoadError(
            f"Model '{spec.name}' at revision {spec.revision[:12]} lacks {', '.join(missing)} "
            f"in its repository{f' (folder {spec.subfolder})' if spec.subfolder else ''}: this "
            "service loads transformers models with safetensors or pytorch_model.bin weights "
            "and a tokenizer."
        )
    return str(directory)


def files_to_load(listed: list[str], subfolder: str = "") -> list[str]:
    """Of a repo's files, those a replica reads: the transformer folder's configs, tokenizer
    and one set of weights, and the sentence-transformers modules' configs."""
    prefix = f"{subfolder}/" if subfolder else ""
    here = {f[len(prefix):]: f for f in listed if f.startswith(prefix) and "/" not in f[len(prefix):]}
    weights = ([f for name, f in here.items() if _SAFETENSORS.fullmatch(name)]
               or [f for name, f in here.items() if _BIN.fullmatch(name)])
    read = [f for name, f in here.items() if _READ.fullmatch(name)]
    modules = [f for f in listed if f.count("/") <= 1 and f.endswith(".json")]
    return sorted(set(weights + read + modules))


def say_on_stderr(line: str) -> None:
    """Tell the person at the terminal, where a command line fetches before Ray starts."""
    print(line, file=sys.stderr, flush=True)


def _missing_files(directory: Path | None) -> list[str]:
    """What a directory lacks of a loadable model, in transformers' order of weights."""
    if directory is None:
        return ["config.json", "weights", "tokenizer"]
    missing = [] if (directory / "config.json").is_file() else ["config.json"]
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (directory / single).is_file():
            break
        shards = _shards(directory / index)
        if shards is not None:
            missing += [name for name in shards if not (directory / name).is_file()]
            break
    else:
        missing.append("weights (model.safetensors)")
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        missing.append("tokenizer (tokenizer.json)")
    return missing


def _shards(index: Path) -> list[str] | None:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, ValueError, AttributeError):
        return None
    return sorted(set(weight_map.values())) if isinstance(weight_map, dict) else None


def _not_cached(spec: ModelSpec, missing: list[str], why: str) -> str:
    return (
        f"Cannot load model '{spec.name}' at revision {spec.revision[:12]}: this machine's "
        f"Hugging Face cache lacks its {', '.join(missing)}, and {why}. Run `hf download "
        f"{spec.source} --revision {spec.revision}` on this machine, or pass a local model "
        "directory as model=PATH."
    )
