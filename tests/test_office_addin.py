"""The Office add-in (excel_addin/office): one cell rule set with the Python add-in, its
metadata in step with the xlwings formulas, its files and manifest served by the service,
and its formulas under Node's test runner against the real service (tests/office/)."""

from __future__ import annotations

import ast
import json
import os
import random
import shutil
import socket
import subprocess
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import EXCEL_KEY, make_service
from starlette.testclient import TestClient

from serve_app.core.cells import BLANK, CellError, cell_text, number_text
from serve_app.web.api import create_app
from serve_app.web.auth import key_digests_from_env

REPO = Path(__file__).resolve().parent.parent
OFFICE = REPO / "excel_addin" / "office"
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="Node.js 20 is not installed (see the README)")


def node(*args: str, stdin: str | None = None, env: dict | None = None, timeout: float = 120):
    return subprocess.run([NODE, *args], input=stdin, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def python_cell(value) -> dict:
    cell = cell_text(value["error"] if isinstance(value, dict) else value)
    if cell is BLANK:
        return {"blank": True}
    if isinstance(cell, CellError):
        return {"error": cell.text}
    return {"text": cell}


def javascript_cells(values: list) -> list[dict]:
    done = node("tests/office/cell_rules.js", stdin=json.dumps(values))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# --- one rule set, two languages -------------------------------------------------------------


@needs_node
def test_cell_rules_are_one_rule_set_in_python_and_javascript():
    cases = json.loads((REPO / "tests" / "cell_cases.json").read_text(encoding="utf-8"))["cases"]
    values = [case["value"] for case in cases]
    expected = [case["expect"] for case in cases]
    assert [python_cell(v) for v in values] == expected
    assert javascript_cells(values) == expected


@needs_node
def test_numbers_read_the_same_in_python_and_javascript():
    # Excel's General format to 15 digits, ties to even on the exact binary value
    # (664325886470744.5 shows as ...744), exponents as E+18.
    rng = random.Random(7)
    numbers = [rng.uniform(-1e6, 1e6) for _ in range(600)]
    numbers += [10 ** rng.uniform(-12, 25) * rng.choice((1, -1)) for _ in range(600)]
    numbers += [rng.randint(1, 10**17) + 0.5 for _ in range(400)]
    numbers += [rng.randint(1, 10**8) * 2.0 ** rng.randint(-60, 60) for _ in range(400)]
    assert javascript_cells(numbers) == [{"text": number_text(x)} for x in numbers]


def test_argument_checks_give_the_sentences_both_addins_share(monkeypatch):
    # The Office add-in's half is in tests/office/functions.test.js: TRUE, an error value,
    # a fraction, a word, a range where one cell goes, each the same sentence in both.
    from excel_addin import udfs

    cases = json.loads((REPO / "tests" / "cell_cases.json").read_text(encoding="utf-8"))["arguments"]
    with socket.socket() as refusing:  # bound, never listening: a request sent would fail otherwise
        refusing.bind(("127.0.0.1", 0))
        monkeypatch.setenv("EMBED_SERVER_URL", f"http://127.0.0.1:{refusing.getsockname()[1]}")
        monkeypatch.setattr("excel_addin.settings._xlwings_user_config", lambda: {})
        got = [getattr(udfs, case["function"].lower())(*python_args(case["args"])) for case in cases]
    assert got == [case["message"] for case in cases]


# --- the metadata, in step with the code and with the xlwings formulas --------------------------


def xlwings_formulas() -> dict[str, dict]:
    """Each xlwings formula's parameters (name, optional, doc) and docstring, from udfs.py."""
    tree = ast.parse((REPO / "excel_addin" / "udfs.py").read_text(encoding="utf-8"))
    formulas = {}
    for fn in tree.body:
        if not isinstance(fn, ast.FunctionDef) or not any(
                isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "func" for d in fn.decorator_list):
            continue
        docs = {}
        for d in fn.decorator_list:
            if isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "arg":
                docs[d.args[0].value] = next(k.value.value for k in d.keywords if k.arg == "doc")
        names = [a.arg for a in fn.args.args]
        optional = names[len(names) - len(fn.args.defaults):] if fn.args.defaults else []
        func = next(d for d in fn.decorator_list if isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "func")
        formulas[fn.name.upper()] = {
            "doc": ast.get_docstring(fn),
            "parameters": [(n, n in optional, docs[n]) for n in names],
            "options": {k.arg: k.value.value for k in func.keywords if isinstance(k.value, ast.Constant)},
        }
    return formulas


def test_every_xlwings_formula_runs_in_a_thread_so_excel_stays_usable_while_it_waits():
    # Without async_mode, Excel's window freezes for as long as the formula waits on the
    # network: EMBED_INFO up to the 10 s connect timeout when the server is unreachable.
    for name, formula in xlwings_formulas().items():
        assert formula["options"].get("async_mode") == "threading", name


def test_functions_json_describes_the_xlwings_formulas_argument_for_argument():
    metadata = json.loads((OFFICE / "functions.json").read_text(encoding="utf-8"))
    office = {f["id"]: f for f in metadata["functions"]}
    desktop = xlwings_formulas()
    assert set(office) == set(desktop) == {"EMBED_SIM", "SIM_MATRIX", "SEMANTIC_SEARCH", "EMBED", "EMBED_INFO"}
    for name, formula in desktop.items():
        assert office[name]["name"] == name
        assert office[name]["description"] == formula["doc"]
        got = [(p["name"], p.get("optional", False), p["description"]) for p in office[name]["parameters"]]
        assert got == formula["parameters"], name


# --- served by the service ----------------------------------------------------------------------

PUBLIC = "https://embeddings.office.test:8443"


@pytest.fixture(scope="module")
def office_app(bundled_embedder):
    digests = key_digests_from_env({"EMBED_API_KEYS": "office-key"})
    service = make_service(bundled_embedder, public_url=PUBLIC)
    with TestClient(create_app(service, digests)) as client:
        yield client


def test_manifest_parses_points_only_at_the_public_https_origin_and_lists_the_functions(office_app):
    reply = office_app.get("/excel/manifest.xml")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("application/xml")
    root = ET.fromstring(reply.content)
    ns = {"o": "http://schemas.microsoft.com/office/appforoffice/1.1",
          "v": "http://schemas.microsoft.com/office/taskpaneappversionoverrides",
          "bt": "http://schemas.microsoft.com/office/officeappbasictypes/1.0"}
    assert uuid.UUID(root.find("o:Id", ns).text).version == 5
    urls = [e.get("DefaultValue") for e in root.iter() if (e.get("DefaultValue") or "").startswith(("http", "{"))]
    assert urls and all(u.startswith(PUBLIC + "/excel/") for u in urls), urls
    for url in set(urls):  # every file the manifest names is served, without a key
        assert office_app.get(url.removeprefix(PUBLIC)).status_code == 200, url
    resources = {e.get("id"): e.get("DefaultValue") for e in root.iter(f"{{{ns['bt']}}}Url")}
    metadata = office_app.get(resources["Functions.Metadata.Url"].removeprefix(PUBLIC)).json()
    assert [f["id"] for f in metadata["functions"]] == [
        "EMBED_SIM", "SIM_MATRIX", "SEMANTIC_SEARCH", "EMBED", "EMBED_INFO"]
    runtime = root.find(".//v:Runtime", ns)
    assert runtime.get("lifetime") == "long" and runtime.get("resid") == "Shared.Url"
    assert root.find(".//o:Set[@Name='SharedRuntime']", ns) is not None


def test_addin_files_need_no_key_the_api_still_does_and_nothing_else_is_served(office_app):
    for name in ("taskpane.html", "functions.js", "functions.json", "cells.js", "client.js", "icon-32.png"):
        reply = office_app.get(f"/excel/{name}")
        assert reply.status_code == 200 and reply.content == (OFFICE / name).read_bytes()
    assert office_app.get("/excel/manifest.xml").status_code == 200
    for path in ("/excel/udfs.py", "/excel/../serve_app/core/config.py", "/excel/%2e%2e/README.md"):
        assert office_app.get(path).status_code in (401, 404), path
    assert office_app.get("/v1/models").status_code == 401
    assert office_app.get("/v1/models", headers={"Authorization": "Bearer office-key"}).status_code == 200


def test_manifest_without_public_url_names_the_address_it_was_asked_at(http):
    root = ET.fromstring(http.get("https://embeddings.lan/excel/manifest.xml").content)
    urls = {e.get("DefaultValue") for e in root.iter() if (e.get("DefaultValue") or "").startswith("http")}
    assert urls and all(u.startswith("https://embeddings.lan/excel/") for u in urls)


# --- the formulas in Node, against the running service --------------------------------------------


def python_grid(value):
    """The Python add-in's answer as the Office add-in's: a grid ([[v]] for one cell)."""
    if not isinstance(value, list):
        value = [[value]]
    grid = value if value and isinstance(value[0], list) else [value]
    return [[python_value(v) for v in row] for row in grid]


def python_value(value):
    """One cell in the Office add-in's plain form: "" for blank, {"error"} for #N/A."""
    if value is None:
        return ""
    if value == "#N/A":
        return {"error": "#N/A"}
    return value


def python_args(value):
    if isinstance(value, list):
        return [python_args(v) for v in value]
    return value["error"] if isinstance(value, dict) else value


CASES = [  # (function, arguments with {"error"} marking an error cell, as JSON)
    ("EMBED_SIM", [[["Termination requires 30 days' notice."]], [["Either party may end the lease."]]]),
    ("EMBED_SIM", [[["合同终止"], [None], [1024.0], [{"error": "#N/A"}], [True], ["  "]],
                   [["租约终止"], ["anything"], ["1024"], ["x"], ["TRUE"], ["y"]]]),
    ("EMBED_SIM", [[["How do I reset my password?"]],
                   [["Steps to reset a forgotten password"], ["Refund policy"], [None]],
                   "Given a question, find the support article that answers it"]),
    ("SIM_MATRIX", [[["rent"], ["notice"]], [["lease payment", "termination", None]]]),
    ("SEMANTIC_SEARCH", ["reset password", [["Refunds within 14 days"], ["Steps to reset a password"],
                                            ["Rent is due monthly"], [None], ["Steps to reset a password"]], 2]),
    ("EMBED", [[["a lease"], [None], [{"error": "#REF!"}]], 32]),
]


@needs_node
@pytest.mark.ray
@pytest.mark.slow
def test_the_addin_in_node_gives_the_python_addins_values_and_its_request_counts(sheet_env, tmp_path):
    from excel_addin import udfs

    expected = [{"function": name, "args": args,
                 "python": python_grid(getattr(udfs, name.lower())(*python_args(args)))}
                for name, args in CASES]
    (tmp_path / "expected.json").write_text(json.dumps({"cases": expected}), encoding="utf-8")
    with socket.socket() as refusing:  # bound, never listening: connections to it are refused
        refusing.bind(("127.0.0.1", 0))
        done = node("--test", "--test-reporter=tap", "tests/office/", timeout=300, env={
            "ADDIN_SERVER": sheet_env["open"], "ADDIN_EXPECTED": str(tmp_path / "expected.json"),
            "ADDIN_KEYED_SERVER": sheet_env["keyed"], "ADDIN_KEY": EXCEL_KEY,
            "ADDIN_REFUSING_SERVER": f"http://127.0.0.1:{refusing.getsockname()[1]}"})
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "# skipped 0" in done.stdout and "# fail 0" in done.stdout
