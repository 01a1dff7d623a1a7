"""Evaluate a real .xlsx with the `formulas` engine, calling the add-in's formulas.

The engine hands a formula its arguments as `Ranges` (2-D arrays with `empty`
for blanks and XlError for errors). The adapter gives the add-in exactly what
xlwings would under its declared conversions (`ndim=2`, `err_to_str=True`):
lists of rows, None, floats, error text.
"""

from __future__ import annotations

import functools

import numpy as np
import schedula as sh
from formulas.functions import Error
from formulas.tokens.operand import XlError

from excel_addin import udfs

FORMULAS = {
    "EMBED_SIM": udfs.embed_sim,
    "SIM_MATRIX": udfs.sim_matrix,
    "SEMANTIC_SEARCH": udfs.semantic_search,
    "EMBED": udfs.embed,
    "EMBED_INFO": udfs.embed_info,
}
GRID_ARGS = {"EMBED_SIM": {0, 1}, "SIM_MATRIX": {0, 1}, "SEMANTIC_SEARCH": {1}, "EMBED": {0}}


def _cell(value):
    if value is sh.EMPTY:
        return None
    if isinstance(value, XlError):
        return str(value)  # err_to_str=True
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.number)):
        return float(value)  # Excel numbers are doubles
    return value


def _grid(arg):
    values = getattr(arg, "value", arg)
    return [[_cell(v) for v in row] for row in np.atleast_2d(np.asarray(values, dtype=object))]


def _scalar(arg):
    values = np.asarray(getattr(arg, "value", arg), dtype=object)
    return _cell(values.ravel()[0]) if values.size else None


def _back(value):
    if isinstance(value, list):
        return np.array([[_back(v) for v in (row if isinstance(row, list) else [row])]
                         for row in value], dtype=object)
    if value == "#N/A":
        return Error.errors["#N/A"]
    return "" if value is None else value  # as xlwings writes None: an empty cell


def adapt(name: str):
    function = FORMULAS[name]

    @functools.wraps(function)
    def call(*args):
        shaped = [_grid(a) if i in GRID_ARGS.get(name, ()) else _scalar(a) for i, a in enumerate(args)]
        return _back(function(*shaped))

    return call


def evaluate(path) -> dict[str, object]:
    """Every cell's computed value, keyed like 'SIMILARITY!C2'."""
    import formulas

    functions = formulas.get_functions()
    for name in FORMULAS:
        functions[name] = adapt(name)
    solution = formulas.ExcelModel().loads(str(path)).finish().calculate()
    out = {}
    for key, ranges in solution.items():
        ref = key.split("]", 1)[-1].replace("'", "")
        value = np.asarray(ranges.value, dtype=object)
        out[ref] = value[0][0] if value.shape == (1, 1) else value
    return out
