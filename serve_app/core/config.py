"""The application's settings: one typed model, built once at the entry points.

`serve run serve_app:build_app key=value ...`, the `args:` block of
`serve_config.yaml`, the batch job's command line and the tests all build an
`AppArgs`; nothing deeper in the code reads the environment for settings.
"""

from __future__ import annotations

import json
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_MODEL = "Qwen/Qwen3-Embedding-0.6B"
OFFLINE_MODEL_ALIAS = "bundled:minilm"

# Qwen3-Embedding's instruction format, from its model card: the instruction
# and the query are joined with no space after "Query:".
DEFAULT_INSTRUCTION_TEMPLATE = "Instruct: {instruction}\nQuery:"
DEFAULT_QUERY_INSTRUCTION = (
    "Given a web search query, retrieve relevant passages that answer the query"
)


def _unset_word(field: Any, value: Any) -> Any:
    """`value` for AppArgs._unset_words: None where it says so for `field`, else as it is."""
    if field is None or not isinstance(value, str) or type(None) not in get_args(field.annotation):
        return value
    word = value.strip().lower()
    if word in ("null", "none") or (word == "auto" and str not in get_args(field.annotation)):
        return None
    return value


class AppArgs(BaseModel):
    """Every setting of the service, with the defaults a new user gets."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # --- the model ---------------------------------------------------------
    model: str = Field(
        DEFAULT_MODEL,
        description="Hugging Face model id, local model directory, or 'bundled:minilm'.",
    )
    model_revision: str | None = Field(
        None,
        description=(
            "For a hub model: the commit, branch or tag to serve. Unset, the service pins "
            "whatever `main` is when it starts; a commit keeps vectors comparable across "
            "restarts and with batch jobs run with the same config."
        ),
    )
    served_model_name: str | None = Field(
        None, description="The id clients send as `model`; defaults to `model`."
    )
    model_aliases: list[str] = Field(
        default_factory=list,
        description=(
            "Other names accepted in `model` and listed by /v1/models, for clients that "
            "insist on an OpenAI model name (e.g. text-embedding-3-small)."
        ),
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description=(
            "auto: the GPU where the replica has a share of one (gpu_fraction above 0), else "
            "the CPU, also on a GPU node."
        ),
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description=(
            "auto: bfloat16 on a CPU where torch reports AMX or AVX512-BF16, else float32; "
            "bfloat16 on a GPU that supports it, else float16. Pooling stays float32."
        ),
    )
    max_input_tokens: int = Field(
        8192, ge=8, description="Inputs longer than this are truncated (and reported)."
    )
    cpu_threads: int | None = Field(
        None, ge=1, description="torch threads on a CPU replica; default: all CPUs."
    )
    pack_cpu_weights: bool = Field(
        True,
        description=(
            "On a CPU running bfloat16, lay out the linear layers' weights for oneDNN once, "
            "in the background after the replica is ready, instead of at every call "
            "(one short text about a third faster for Qwen3-Embedding-0.6B, the same embeddings), "
            "and fuse RMSNorms and MLP activations around them (model.fusing)."
        ),
    )
    share_rows: bool = Field(
        True,
        description=(
            "On a CPU, lay short texts end to end in rows of a forward pass, each attending "
            "only to itself, instead of padding each to the longest (checked against padding "
            "once the replica is ready)."
        ),
    )
    forward_workers: int | None = Field(
        None,
        ge=1,
        description=(
            "Forward passes a replica (or a batch job's actor) runs at once. Default on a CPU: "
            "2, each with half the threads (no core idles at a thread barrier); 1 on a GPU."
        ),
    )

    # --- prompts -----------------------------------------------------------
    instruction_template: str = DEFAULT_INSTRUCTION_TEMPLATE
    query_instruction: str | None = Field(
        None,
        description=(
            "The task for prompt_name='query' when the model has no query prompt of its own. "
            "None: Qwen3's web-search task for last-token (instruction-following) models, "
            "and nothing for encoders such as all-MiniLM-L6-v2, whose retrieval it hurts."
        ),
    )
    tasks: dict[str, str] = Field(
        default_factory=dict,
        description="Named instructions, usable as prompt_name (e.g. legal_search).",
    )

    # --- request limits ----------------------------------------------------
    max_inputs_per_request: int = Field(2048, ge=1)
    max_input_chars: int = Field(
        100_000, ge=1, description="Longest text accepted, in characters (400 beyond it)."
    )
    max_request_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    accept_token_ids: bool = Field(
        False,
        description=(
            "Take `input` given as token-id arrays as the served model's own ids (as vLLM "
            "and TEI do). Off: such input is a 400 saying what to change in the client, "
            "since clients that send ids (LangChain's default) send another model's tokens."
        ),
    )
    min_dimensions: int = Field(32, ge=1)

    # --- the shared cache, access, logs ------------------------------------
    cache_max_mb: int = Field(
        256, ge=0, description="Ingress embedding cache, shared by all clients; 0 turns it off."
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Browser origins allowed to call the API (CORS); none by default.",
    )
    log_requests: bool = Field(
        True, description="One log line per request: id, route, status, texts, ms; never the text."
    )
    public_url: str | None = Field(
        None,
        description=(
            "The address PCs reach the service at (https://embeddings.office.lan:8443), "
            "written into the Excel add-in's manifest (/excel/manifest.xml); default: the "
            "address each request came in on (https where a proxy in front ended TLS and "
            "said so in X-Forwarded-Proto, as the service's own HAProxy does)."
        ),
    )

    # --- batching ----------------------------------------------------------
    max_batch_texts: int = Field(
        128, ge=1, description="Most texts in one forward pass's pool (serve_app.model.scheduler)."
    )
    batch_wait_timeout_s: float = Field(
        0.0,
        ge=0,
        description=(
            "How long an idle model replica waits for more requests before a forward "
            "pass. 0: none; requests that arrive while the model is busy are pooled "
            "anyway (serve_app.model.scheduler)."
        ),
    )
    max_batch_tokens: int | None = Field(
        None,
        ge=64,
        description=(
            "Most padded tokens in one forward pass; default 1024 on a CPU (small "
            "passes stay in cache), 32768 on a GPU."
        ),
    )

    # --- Ray Serve: resources and autoscaling ------------------------------
    gpu_fraction: float | None = Field(
        None,
        ge=0,
        le=1,
        description="GPU share per replica; default 0.25 where the cluster has GPUs, else 0.",
    )
    replica_cpus: float = Field(1.0, ge=0)
    min_replicas: int = Field(0, ge=0)
    max_replicas: int | None = Field(
        None, ge=1, description=(
            "Default: as many as fit on one GPU (4 at gpu_fraction 0.25, 3 at 0.3), 1 on a CPU; "
            "never below min_replicas or initial_replicas.")
    )
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(4.0, gt=0)
    max_ongoing_requests: int = Field(64, ge=1)
    max_queued_requests: int = Field(
        512, ge=-1, description="Requests held per caller beyond capacity; -1: unbounded."
    )
    idle_timeout_s: float = Field(
        300.0, ge=0, description="Seconds without traffic before the model scales to zero."
    )
    upscale_delay_s: float = Field(3.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)
    autoscaling_look_back_s: float = Field(
        10.0, gt=0, description="Window over which load is averaged for scaling decisions."
    )
    autoscaling_metrics_interval_s: float = Field(
        0.25, gt=0, description="How often callers report their queue to the autoscaler."
    )
    request_timeout_s: float = Field(
        300.0, gt=0, description="Longest a request waits for the model, cold start included."
    )
    health_check_period_s: float = Field(
        10.0, gt=0,
        description=(
            "How often Ray checks each model replica; one whose model failed to load is "
            "replaced after three failed checks."
        ),
    )
    ingress_replicas: int = Field(1, ge=1)
    warm_start: Literal["auto", "on", "off"] = Field(
        "auto",
        description=(
            "Fork model replicas (and batch-job actors) from a process that already "
            "imported torch (cold start ~2 s instead of ~6 s on a 2-core CPU). auto: on "
            "for CPU replicas; GPU replicas stay off until verified on a GPU."
        ),
    )

    @field_validator("tasks", mode="before")
    @classmethod
    def _tasks_from_json(cls, value: Any) -> Any:
        # `serve run ... tasks='{"legal": "..."}'` hands the dict over as a string.
        if isinstance(value, str):
            return json.loads(value) if value.strip() else {}
        return value

    @field_validator("cors_origins", "model_aliases", mode="before")
    @classmethod
    def _list_from_text(cls, value: Any) -> Any:
        # `python -m serve_app cors_origins=https://a.example,https://b.example`
        if isinstance(value, str):
            return [o.strip() for o in value.split(",") if o.strip()]
        return value

    @field_validator("public_url")
    @classmethod
    def _public_url_is_an_origin(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().rstrip("/")
        if not value.startswith(("https://", "http://")) or any(c in value for c in ' "<>'):
            raise ValueError("public_url must be an address such as https://embeddings.office.lan:8443")
        return value

    @field_validator("instruction_template")
    @classmethod
    def _template_has_slot(cls, value: str) -> str:
        if "{instruction}" not in value:
            raise ValueError("instruction_template must contain '{instruction}'")
        return value

    @model_validator(mode="before")
    @classmethod
    def _unset_words(cls, values: Any) -> Any:
        """Strings from `key=value` (python -m serve_app, serve run) as the config file's
        `null` would be: `null` or `none` for a setting that may be unset, and `auto` for one
        whose automatic choice is its unset value (gpu_fraction, max_replicas...), so the
        command line can undo what a file pins."""
        if not isinstance(values, dict):
            return values
        return {key: _unset_word(cls.model_fields.get(key), value) for key, value in values.items()}

    @model_validator(mode="after")
    def _aliases_are_other_names(self) -> AppArgs:
        if self.model_id in self.model_aliases:
            raise ValueError(f"model_aliases must not repeat the served id '{self.model_id}'")
        return self

    @model_validator(mode="after")
    def _replica_bounds(self) -> AppArgs:
        if self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        if self.initial_replicas is not None and self.initial_replicas < self.min_replicas:
            raise ValueError("initial_replicas must not be below min_replicas")
        if (self.max_replicas is not None and self.initial_replicas is not None
                and self.initial_replicas > self.max_replicas):
            raise ValueError("initial_replicas must not exceed max_replicas")
        if self.max_queued_requests == 0:  # Ray's own rule: -1 or a positive number
            raise ValueError("max_queued_requests must be -1 (unbounded) or at least 1, not 0")
        return self

    @property
    def model_id(self) -> str:
        """The id the API publishes and expects in `model`."""
        return self.served_model_name or self.model


def config_args(path: str, overrides: dict[str, Any] | None = None) -> AppArgs:
    """The `args:` of the first application in a Ray Serve config file, plus overrides."""
    from pathlib import Path

    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    apps = data.get("applications") or [{}]
    return AppArgs.model_validate({**(apps[0].get("args") or {}), **(overrides or {})})
