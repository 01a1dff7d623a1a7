"""The Hugging Face Hub's download routes on 127.0.0.1, for the fetch path the real hub would take.

The real hub is out of reach on the machines the tests run on; this answers the few routes
huggingface_hub's `model_info`, `snapshot_download` and `hf_hub_download` use (a revision's
info, its file tree, a file's HEAD and GET) for model directories served as repos at one
commit each, and logs every request.
"""

from __future__ import annotations

import hashlib
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from conftest import serve_in_background


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, tuple[str, Path]] = {}  # repo id: (commit, directory)
        self.requests: list[str] = []  # "GET /api/models/...", in order
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _HubHandler)
        self._http.daemon_threads = True
        self._http.hub = self
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}"
        serve_in_background(self._http)

    def serve(self, repo_id: str, commit: str, directory: Path) -> None:
        self.repos[repo_id] = (commit, directory)

    def files(self, repo_id: str) -> dict[str, Path]:
        root = self.repos[repo_id][1]
        return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._route(head=False)

    def do_HEAD(self) -> None:
        self._route(head=True)

    def _route(self, head: bool) -> None:
        hub: FakeHub = self.server.hub
        hub.requests.append(f"{self.command} {self.path}")
        path = unquote(urlsplit(self.path).path)
        for repo_id, (commit, _) in hub.repos.items():
            if path == f"/api/models/{repo_id}":  # model_info without a revision: main's
                return self._info(hub, repo_id, commit, "", head)
            for route, answer in ((f"/api/models/{repo_id}/revision/", self._info),
                                  (f"/api/models/{repo_id}/tree/", self._tree),
                                  (f"/{repo_id}/resolve/", self._file)):
                if path.startswith(route):
                    revision, _, rest = path[len(route):].partition("/")
                    if revision not in ("main", commit):
                        return self._send(404, b"", {"X-Error-Code": "RevisionNotFound"}, head)
                    return answer(hub, repo_id, commit, rest, head)
        self._send(404, b"", {"X-Error-Code": "RepoNotFound"}, head)

    def _info(self, hub: FakeHub, repo_id: str, commit: str, _rest: str, head: bool) -> None:
        siblings = [{"rfilename": name} for name in hub.files(repo_id)]
        self._json({"id": repo_id, "modelId": repo_id, "sha": commit, "siblings": siblings}, head)

    def _tree(self, hub: FakeHub, repo_id: str, _commit: str, _rest: str, head: bool) -> None:
        entries = [{"type": "file", "path": name, "size": p.stat().st_size, "oid": _blob_id(p.read_bytes())}
                   for name, p in hub.files(repo_id).items()]
        self._json(entries, head)

    def _file(self, hub: FakeHub, repo_id: str, commit: str, name: str, head: bool) -> None:
        path = hub.files(repo_id).get(name)
        if path is None:
            return self._send(404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}, head)
        data = path.read_bytes()
        self._send(200, data, {"X-Repo-Commit": commit, "ETag": f'"{_blob_id(data)}"',
                               "Content-Type": "application/octet-stream"}, head)

    def _json(self, content, head: bool) -> None:
        self._send(200, json.dumps(content).encode(), {"Content-Type": "application/json"}, head)

    def _send(self, status: int, body: bytes, headers: dict[str, str], head: bool) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, *args) -> None:  # quiet test output
        pass


def _blob_id(data: bytes) -> str:
    """Git's id of a file's contents, as the hub reports it for files kept outside LFS."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
