"""The rooms of the package import only downwards, and only the model room imports torch.

Heavy imports belong to the model replica; importing them elsewhere slows every
cold start and every Excel recalculation. The rules (README, "Layout"):

    core        light types and rules            imports nothing of ours
    model       torch, transformers              core
    web         the HTTP app, no torch, no Ray    core
    ray_shell   deployments, launcher, zygote    core, web; model only inside functions
    batch       the Ray Data job                 core, ray_shell; model only inside functions
    excel_addin the desktop formulas             core
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

LIGHT = [
    "serve_app",
    "serve_app.core.config",
    "serve_app.core.cells",
    "serve_app.web.api",
    "serve_app.web.service",
    "serve_app.ray_shell.app",
    "serve_app.ray_shell.deployments",
    "serve_app.ray_shell.launcher",  # runs before every warm-started worker
    "excel_addin",
    "excel_addin.client",
    "excel_addin.settings",
    "excel_addin.udfs",
    "excel_addin.demo",
]


@pytest.mark.parametrize("module", LIGHT)
def test_module_imports_without_torch(module):
    code = (
        f"import sys, pickle; import {module}; "
        "from serve_app.core.encoded import Encoded; import numpy as np; "
        # The ingress unpickles the replica's answers: that must stay light too.
        "pickle.loads(pickle.dumps(Encoded(np.zeros((1, 2), np.float32), [1], [False]))); "
        "heavy = [m for m in ('torch', 'transformers', 'sentence_transformers') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "", f"{module} imported {out.stdout.strip()}"


ROOT = Path(__file__).resolve().parents[1]
# room -> (rooms it may import at module level, rooms it may import inside functions only)
RULES = {
    "serve_app.core": ({"serve_app.core"}, set()),
    "serve_app.model": ({"serve_app.core", "serve_app.model"}, set()),
    "serve_app.web": ({"serve_app.core", "serve_app.web"}, set()),
    "serve_app.ray_shell": ({"serve_app.core", "serve_app.web", "serve_app.ray_shell"}, {"serve_app.model"}),
    "serve_app.batch": ({"serve_app.core", "serve_app.ray_shell", "serve_app.batch"}, {"serve_app.model"}),
    "excel_addin": ({"serve_app.core", "excel_addin"}, set()),
}
# Third-party packages a room must not import anywhere.
FORBIDDEN = {
    "serve_app.core": {"torch", "transformers", "ray", "starlette"},
    "serve_app.web": {"torch", "transformers", "ray"},
    "excel_addin": {"torch", "transformers", "ray", "starlette"},
}


def imports_of(path: Path):
    """(imported module, inside a function?) for every import statement in a file."""
    found = []

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((alias.name, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module, in_function))
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return found


def room_of(module: str) -> str | None:
    return next((room for room in RULES if module == room or module.startswith(room + ".")), None)


def test_every_module_lives_in_a_room():
    loose = [p.name for p in (ROOT / "serve_app").glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert loose == [], f"modules outside the rooms: {loose}"


def test_rooms_import_only_downwards():
    broken = []
    files = [*(ROOT / "serve_app").rglob("*.py"), *(ROOT / "excel_addin").rglob("*.py")]
    for path in files:
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        room = room_of(module)
        if room is None:
            continue  # serve_app/__init__.py and __main__.py: the entry points
        at_top, in_functions = RULES[room]
        for imported, in_function in imports_of(path):
            target = room_of(imported) or ("serve_app" if imported == "serve_app" else None)
            top_level = imported.split(".")[0]
            if top_level in FORBIDDEN.get(room, ()):
                broken.append(f"{module} imports {imported}")
            if target is None or target in at_top or (in_function and target in in_functions):
                continue
            broken.append(f"{module} imports {imported}" + ("" if in_function else " at module level"))
    assert broken == [], "\n".join(broken)
