"""What `python -m serve_app` checks before anything starts, so that a start that cannot
succeed stops at once with one line: `serve run` would log the error and run on with no
application (Serve builds a config file's applications in its controller)."""

from __future__ import annotations

import difflib
from pathlib import Path

from serve_app.core.config import AppArgs

DEFAULT_PORT = 8000  # Serve's
# The import paths of this service's builder; their args are AppArgs.
OUR_BUILDERS = ("serve_app:build_app", "serve_app.ray_shell.deployments:build_app")


def service_host(config: dict) -> str:
    """The host a Serve config has the service listen on; one that names none gets Ray's
    default, every interface."""
    return str((config.get("http_options") or {}).get("host") or "0.0.0.0")


def read_config(path: str) -> dict:
    """A Serve config file's contents, or a ValueError that says in one line why it has none."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}.") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "it does not parse"
        raise ValueError(f"{path} is not valid YAML{where}: {problem}.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a Serve config file: it holds no `key: value` mapping.")
    return data


def checked_config(config: str | None, overrides: dict[str, str]) -> dict:
    """What `serve run` gets: `config` (or a one-app config on 127.0.0.1:8000) with
    `overrides` (port= and host= to HTTP, the rest to the first application), its
    applications' import paths found and this service's args validated by AppArgs."""
    if config is None:
        # Written out rather than `serve run serve_app:build_app`: in HAProxy mode Ray's
        # default host is all interfaces, and this service stays on this machine unless
        # told otherwise (host=0.0.0.0), like serve_config.yaml.
        app = {"name": "embeddings", "route_prefix": "/", "import_path": OUR_BUILDERS[0]}
        data = {"http_options": {"host": "127.0.0.1", "port": DEFAULT_PORT}, "applications": [app]}
    else:
        data = read_config(config)
    rewritten = config is None or bool(overrides)  # serve run gets a copy, args normalised
    overrides = dict(overrides)
    http = data.setdefault("http_options", {})
    if "host" in overrides:
        http["host"] = overrides.pop("host")
    if "port" in overrides:
        http["port"] = _port_number(overrides.pop("port"))
    for ours, ray_name in TLS_SETTINGS.items():
        if ours in overrides:
            http[ray_name] = str(Path(overrides.pop(ours)).expanduser().resolve())
    _check_tls(http, config or "the command line")
    source = config or "the command line"
    apps = data.get("applications")
    if not isinstance(apps, list) or not apps or not all(isinstance(a, dict) for a in apps):
        raise ValueError(
            f"{source} names no applications: a Serve config file lists them under "
            "`applications:`, each with an import_path (see serve_config.yaml)."
        )
    for index, app in enumerate(apps):
        where = f"application {app.get('name', index + 1)!r} in {source}"
        ours = app.get("import_path") in OUR_BUILDERS
        if not ours:
            _check_import_path(app, where)
        if index == 0 and rewritten:
            args = _app_args({**(app.get("args") or {}), **overrides}, where)
            app["args"] = args.model_dump(exclude_defaults=True)
        elif ours:
            _app_args(app.get("args") or {}, where)
    return data


# tls_certfile= and tls_keyfile= on the command line are Ray Serve's http_options.
TLS_SETTINGS = {"tls_certfile": "ssl_certfile", "tls_keyfile": "ssl_keyfile"}


def tls_files(data: dict) -> tuple[str, str] | None:
    """A checked config's certificate and key files, when it serves HTTPS."""
    http = data.get("http_options") or {}
    if not http.get("ssl_certfile"):
        return None
    return http["ssl_certfile"], http["ssl_keyfile"]


def _check_tls(http: dict, source: str) -> None:
    """Both files or neither, each readable, else one line saying which."""
    given = {name: http.get(name) for name in TLS_SETTINGS.values()}
    if not any(given.values()):
        return
    if not all(given.values()):
        raise ValueError(
            f"HTTPS needs both tls_certfile and tls_keyfile (ssl_certfile and ssl_keyfile in "
            f"http_options), in {source}."
        )
    for name, path in given.items():
        try:
            with open(path, "rb") as f:
                head = f.read(64)
        except OSError as exc:
            raise ValueError(f"Cannot read {name} {path}: {exc.strerror}.") from None
        if b"-----BEGIN" not in head:
            raise ValueError(f"{name} {path} is not a PEM file (it should begin with -----BEGIN).")


def _port_number(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"port={value} is not a port number; give one such as port=8001.") from None


def _app_args(values: object, where: str) -> AppArgs:
    """`values` as AppArgs, or a ValueError naming each bad key, in one line."""
    from pydantic import ValidationError

    try:
        return AppArgs.model_validate(values)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            key = ".".join(str(part) for part in error["loc"])
            if error["type"] == "extra_forbidden":
                close = difflib.get_close_matches(key, list(AppArgs.model_fields), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"{key!r} is not a setting{hint}")
            else:
                message = error["msg"].removeprefix("Value error, ")
                given = error.get("input")
                if key and isinstance(given, (str, int, float)):
                    message += f" (got {given!r})"
                problems.append(f"{key}: {message}" if key else message)
        raise ValueError(
            f"{'; '.join(problems)}, in {where}. The settings are those of "
            "serve_app.core.config.AppArgs; the README's Configuration section lists them."
        ) from None


def _check_import_path(app: dict, where: str) -> None:
    """A ValueError unless Python can find the module of `app`'s import path (an app whose
    code comes with its runtime_env is left to Ray)."""
    import importlib.util

    path = app.get("import_path")
    if not isinstance(path, str) or not path:
        raise ValueError(f"{where} has no import_path (this service's is {OUR_BUILDERS[0]}).")
    if path.split(".")[0].split(":")[0] == "serve_app":
        raise ValueError(
            f"import_path {path!r} is not this service's builder, in {where}: use {OUR_BUILDERS[0]}."
        )
    if app.get("runtime_env"):
        return
    module = path.split(":")[0] if ":" in path else path.rpartition(".")[0]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ValueError(
            f"import_path {path!r} names a module Python cannot find here ({module}), in {where}. "
            f"This service's is {OUR_BUILDERS[0]}."
        )


def prepare_models(data: dict) -> bool:
    """Find each model of this service's apps, fetch a hub model's files to this machine,
    and pin it in `data` to the revision fetched; whether anything was pinned.

    A model that cannot be found, or whose files cannot be had, is a ValueError in the
    loader's words (`serve run` would log it and run on with no application). The files
    come here, where the replicas will run, with the download's progress in the terminal,
    rather than inside the first request; the pin (`model_revision`) keeps the app from
    finding a newer `main` when it resolves the model again.
    """
    from serve_app.core.errors import ModelLoadError
    from serve_app.core.hubfiles import model_directory, say_on_stderr
    from serve_app.core.modelinfo import resolve_model

    pinned = False
    for app in data.get("applications") or []:
        if app.get("import_path") in OUR_BUILDERS:
            args = AppArgs.model_validate(app.get("args") or {})
            try:
                spec = resolve_model(args.model, args.model_revision)
                model_directory(spec, say=say_on_stderr)
            except ModelLoadError as exc:
                raise ValueError(str(exc)) from None
            if spec.revision is not None and spec.revision != args.model_revision:
                app.setdefault("args", {})["model_revision"] = spec.revision
                pinned = True
    return pinned


