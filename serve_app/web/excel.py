"""The Office add-in, served by the service itself: its files under /excel/ and a manifest.

An office's admin uploads `GET /excel/manifest.xml` once (Microsoft 365 admin centre,
Integrated apps) and every user, on Windows, Mac or Excel on the web, gets the
formulas. The manifest, the add-in's files and the API share one origin, so the
browser needs no CORS. The files are static and hold no secret: they need no API key
(Office fetches them without one); the API keeps its rules.

The manifest's addresses are `public_url` when it is set (what PCs on the LAN reach,
https://...), else the address the request came in on.
"""

from __future__ import annotations

import importlib.util
import uuid
from pathlib import Path
from xml.sax.saxutils import quoteattr

from starlette.requests import Request
from starlette.responses import FileResponse, Response

from serve_app.core.errors import NotFound

PREFIX = "/excel"
# The add-in's files, by name: nothing else under /excel/ is served.
FILES = {
    "taskpane.html": "text/html; charset=utf-8",
    "taskpane.js": "text/javascript; charset=utf-8",
    "functions.js": "text/javascript; charset=utf-8",
    "functions.json": "application/json",
    "cells.js": "text/javascript; charset=utf-8",
    "client.js": "text/javascript; charset=utf-8",
    "icon-16.png": "image/png",
    "icon-32.png": "image/png",
    "icon-64.png": "image/png",
    "icon-80.png": "image/png",
}
MANIFEST_VERSION = "1.0.0.0"  # raise it whenever the manifest's content changes


def office_dir() -> Path:
    """Where the add-in's files are installed (excel_addin/office), found without importing it."""
    spec = importlib.util.find_spec("excel_addin")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("The excel_addin package is not installed beside serve_app.")
    return Path(next(iter(spec.submodule_search_locations))) / "office"


async def addin_file(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in FILES:
        raise NotFound(f"No add-in file {PREFIX}/{name}; the manifest is {PREFIX}/manifest.xml.")
    headers = {"Cache-Control": "no-cache"}  # revalidated, so an update reaches every desk
    return FileResponse(office_dir() / name, media_type=FILES[name], headers=headers)


async def manifest(request: Request) -> Response:
    """The add-in's XML manifest, pointing at this service's public address."""
    public_url = request.app.state.service.args.public_url
    base = (public_url or str(_as_reached(request))).rstrip("/")
    xml = render_manifest(base)
    return Response(xml, media_type="application/xml", headers={
        "Content-Disposition": 'attachment; filename="sheet-embeddings-manifest.xml"'})


def _as_reached(request: Request):
    """The address the request came in on, https where a proxy in front ended TLS: the
    service's own HAProxy (with tls_certfile) or an operator's, says so in
    X-Forwarded-Proto. Whoever sends that header only changes the manifest they get."""
    proto = request.headers.get("x-forwarded-proto", "").strip().lower()
    if proto in ("http", "https"):
        return request.base_url.replace(scheme=proto)
    return request.base_url


def render_manifest(base: str) -> str:
    """The manifest for an add-in served at `base` (its files at base + /excel/)."""
    template = (office_dir() / "manifest.xml").read_text(encoding="utf-8")
    # One id per deployment, stable across restarts: two services (say a test and a
    # production one) can be installed side by side.
    addin_id = uuid.uuid5(uuid.NAMESPACE_URL, base + PREFIX)
    url = quoteattr(base + PREFIX)[1:-1]
    return (template.replace("{ID}", str(addin_id)).replace("{VERSION}", MANIFEST_VERSION)
            .replace("{URL}", url))
