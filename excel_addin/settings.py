"""Where the embedding service is and how the formulas reach it: the settings (environment,
then the xlwings config), what HTTPS answers are checked against, and the one-sentence
error a cell shows (`ServiceError`)."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, fields, replace
from typing import Any

DEFAULTS = {"server_url": "http://127.0.0.1:8000", "timeout_s": 300.0}
ENV = {
    "server_url": "EMBED_SERVER_URL",
    "api_key": "EMBED_API_KEY",
    "timeout_s": "EMBED_TIMEOUT_S",
    "instruction": "EMBED_INSTRUCTION",
    "ca_file": "EMBED_CA_FILE",
}


class ServiceError(Exception):
    """A failure the cell shows as one sentence: what failed and what to check."""


@dataclass(frozen=True)
class Settings:
    server_url: str = DEFAULTS["server_url"]
    api_key: str | None = None
    timeout_s: float = DEFAULTS["timeout_s"]  # longer than a cold start of the model
    instruction: str | None = None
    chunk_size: int = 512
    chunk_chars: int = 2_000_000
    requests_in_flight: int = 2  # a long column's chunks out at once
    cache_mb: int = 512
    model_ttl_s: float = 30.0  # how long the served model's name is trusted unasked
    # A busy server (429, 503) is asked again after its Retry-After, as the Office add-in
    # does: at most max_retries times, each wait at most max_retry_wait_s (2 min in all).
    max_retries: int = 4
    max_retry_wait_s: float = 30.0
    ca_file: str | None = None  # a CA certificate (PEM) to trust instead of the computer's

    def __repr__(self) -> str:
        # The key must not reach a log or a traceback: shown only as set or not.
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.api_key:
            shown["api_key"] = "***"
        return f"Settings({', '.join(f'{name}={value!r}' for name, value in shown.items())})"


def load_settings(environ: dict[str, str] | None = None, user_config: dict[str, str] | None = None) -> Settings:
    """Settings from the environment, overridden by the xlwings config (keys in lower case)."""
    environ = os.environ if environ is None else environ
    if user_config is None:
        user_config = _xlwings_user_config()
    values: dict[str, Any] = {}
    for field, name in ENV.items():
        raw = user_config.get(name.lower(), environ.get(name))
        if raw is not None and str(raw).strip():
            values[field] = str(raw).strip()
    if "timeout_s" in values:
        try:
            values["timeout_s"] = float(values["timeout_s"])
        except ValueError:
            raise ServiceError(
                f"EMBED_TIMEOUT_S must be a number of seconds, not '{values['timeout_s']}'."
            ) from None
    if "server_url" in values:
        values["server_url"] = values["server_url"].rstrip("/")
    return replace(Settings(), **values)


def trust(ca_file: str | None) -> ssl.SSLContext:
    """What HTTPS answers are checked against: `ca_file` if set, else the computer's own
    trust store (Windows' certificate store, the Mac's keychain), where an office installs
    its CA (`certutil -addstore Root`), not the certificates bundled with Python's
    packages, which know only public CAs."""
    if ca_file:
        try:
            return ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ServiceError(f"EMBED_CA_FILE {ca_file} is not a readable CA certificate (PEM): {exc}.") from None
    try:
        import truststore
    except ImportError:  # a desk updated with --no-deps from before it was needed
        raise ServiceError(
            "HTTPS needs the truststore package on this computer: py -m pip install truststore "
            "(or set EMBED_CA_FILE to the office's CA certificate)."
        ) from None
    return truststore.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def certificate_refusal(exc: BaseException) -> str | None:
    """Why the server's certificate was refused, if that is what failed the connection."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ssl.SSLCertVerificationError):
            return exc.verify_message or str(exc)
        if isinstance(exc, ssl.SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(exc):
            return str(exc)
        exc = exc.__cause__ or exc.__context__
    return None


def _xlwings_user_config() -> dict[str, str]:
    try:
        from xlwings.utils import read_user_config

        return read_user_config()
    except Exception:  # no xlwings config, or an unreadable one: environment only
        return {}
