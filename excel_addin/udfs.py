"""The Excel formulas: =EMBED_SIM, =SIM_MATRIX, =SEMANTIC_SEARCH, =EMBED, =EMBED_INFO.

Each is a few lines over client.py (HTTP, cache) and cells.py (what a cell is).
Ranges arrive as lists of rows (`ndim=2`), error cells as their text
(`err_to_str=True`); a range's trailing blank rows and columns are left out, so a
whole-column reference (B:B) costs its used rows only. An argument of one value (a
query, an instruction, k) given a range is a sentence, not the range's text (Office
refuses such a range itself). A blank input gives a blank output (an empty text: xlwings'
threading mode takes a formula that returned None for one not yet computed, and
would start it again for ever), an error input gives #N/A in its place, and any
failure is one readable sentence in the cell.
Formulas that call the server run in xlwings' threading async mode, so Excel
stays responsive while a long column computes.
"""

from __future__ import annotations

import functools
import re
import sys
from typing import Any

import numpy as np
import xlwings as xw

from excel_addin.client import get_client
from excel_addin.settings import ServiceError, load_settings
from serve_app.core.cells import BLANK, Blank, CellError, as_grid, cell_text, flatten, shape
from serve_app.core.vectors import cosine, cosine_matrix

CATEGORY = "Embeddings"


def not_available() -> Any:
    """Excel's #N/A. On Windows a real error value; elsewhere (tests) its text."""
    if sys.platform == "win32":
        try:
            import pythoncom
            from win32com.client import VARIANT

            return VARIANT(pythoncom.VT_ERROR, -2146826246)  # xlErrNA
        except ImportError:
            pass
    return "#N/A"


def readable(function):
    """Turn any failure into one sentence for the cell; never a traceback, and never None."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            result = function(*args, **kwargs)
        except ServiceError as exc:
            return str(exc)
        except ValueError as exc:
            return f"{function.__name__.upper()}: {exc}"
        except Exception as exc:  # noqa: BLE001 - a cell must never show a traceback
            return f"{function.__name__.upper()} failed unexpectedly ({type(exc).__name__}: {exc})."
        return "" if result is None else result  # None: see the module's docstring

    return wrapper


@xw.func(category=CATEGORY, async_mode="threading")
@xw.arg("a", ndim=2, err_to_str=True, doc="A text cell, or a range of texts (e.g. questions).")
@xw.arg("b", ndim=2, err_to_str=True, doc="A text cell, or a range of the same shape as a.")
@xw.arg("instruction", err_to_str=True,
        doc="Optional task for the texts in a, e.g. 'Find the clause that answers the question'.")
@readable
def embed_sim(a, b, instruction=None):
    """Cosine similarity of a and b; ranges give one score per cell pair, and one cell compares with each."""
    left, right = _used_pair(as_grid(a), as_grid(b))
    rows, cols = _paired_shape(shape(left), shape(right))
    lefts = [[cell_text(c) for c in row] for row in _broadcast(left, rows, cols)]
    rights = [[cell_text(c) for c in row] for row in _broadcast(right, rows, cols)]
    task = _instruction(instruction)
    if task is None:  # both sides plain: one set of distinct texts, one round of requests
        queries = documents = _vectors_of(flatten(lefts) + flatten(rights), None)
    else:
        queries = _vectors_of(flatten(lefts), task)
        documents = _vectors_of(flatten(rights), None)
    result = [
        [_score(lefts[i][j], rights[i][j], queries, documents) for j in range(cols)]
        for i in range(rows)
    ]
    return _single_or_grid(result)


@xw.func(category=CATEGORY, async_mode="threading")
@xw.arg("range1", ndim=2, err_to_str=True, doc="Texts for the rows (e.g. questions).")
@xw.arg("range2", ndim=2, err_to_str=True, doc="Texts for the columns (e.g. clauses).")
@xw.arg("instruction", err_to_str=True, doc="Optional task for the texts in range1.")
@readable
def sim_matrix(range1, range2, instruction=None):
    """All-pairs cosine similarity: one row per text of range1, one column per text of range2."""
    rows = [cell_text(c) for c in flatten(_used(as_grid(range1)))]
    cols = [cell_text(c) for c in flatten(_used(as_grid(range2)))]
    task = _instruction(instruction)
    if task is None:
        row_vectors = col_vectors = _vectors_of(rows + cols, None)
    else:
        row_vectors = _vectors_of(rows, task)
        col_vectors = _vectors_of(cols, None)
    return [[_score(r, c, row_vectors, col_vectors) for c in cols] for r in rows]


@xw.func(category=CATEGORY, async_mode="threading")
@xw.arg("query", err_to_str=True, doc="The question to search for.")
@xw.arg("candidates", ndim=2, err_to_str=True, doc="The range of texts to search.")
@xw.arg("k", err_to_str=True, doc="How many results (default 5).")
@xw.arg("instruction", err_to_str=True,
        doc="Optional task for the query, e.g. 'Find the support article that resolves it' "
            "(default: the default instruction if set, else the model's own query prompt).")
@readable
def semantic_search(query, candidates, k=5, instruction=None):
    """The k candidates most similar to query, best first, as rows of (text, score)."""
    top = _whole_number(k, "k", low=1, high=10_000) or 5  # a blank k cell: 5
    question = cell_text(_one_cell(query, "query"))
    if isinstance(question, Blank):
        return None
    if isinstance(question, CellError):
        return not_available()
    texts = [t for t in dict.fromkeys(cell_text(c) for c in flatten(_used(as_grid(candidates)))) if isinstance(t, str)]
    if not texts:
        raise ValueError("the candidates range holds no text.")
    # Without an instruction, the query takes the model's own query prompt, as the batch
    # job's search does (Qwen3's; none for models without one, such as the bundled model).
    query_vector = _vectors_of([question], _instruction(instruction), prompt_name="query")[question]
    documents = _vectors_of(texts, None)
    scores = cosine_matrix(query_vector, np.stack([documents[t] for t in texts]))[0]
    order = np.argsort(-scores, kind="stable")[:top]
    return [[texts[i], float(scores[i])] for i in order]


@xw.func(category=CATEGORY, async_mode="threading")
@xw.arg("text", ndim=2, err_to_str=True, doc="A text cell, or a column of texts (one vector row each).")
@xw.arg("dimensions", err_to_str=True, doc="Optional: keep the first N dimensions (Matryoshka), re-normalised.")
@xw.arg("instruction", err_to_str=True, doc="Optional task, for query embeddings.")
@readable
def embed(text, dimensions=None, instruction=None):
    """The embedding vector of each text, as a row of numbers."""
    width = _whole_number(dimensions, "dimensions", 1, 100_000)
    cells = [cell_text(c) for c in flatten(_used(as_grid(text)))]
    vectors = _vectors_of(cells, _instruction(instruction), width)
    sample = next((v for v in vectors.values()), None)
    size = len(sample) if sample is not None else 1
    rows = []
    for cell in cells:
        if isinstance(cell, Blank):
            rows.append([None] * size)
        elif isinstance(cell, CellError):
            rows.append([not_available()] * size)
        else:
            rows.append([float(x) for x in vectors[cell]])
    return rows[0] if len(rows) == 1 else rows


@xw.func(category=CATEGORY, async_mode="threading")  # Excel stays usable while it connects
@readable
def embed_info():
    """The embedding server, model, dimension and how much of a cell it reads, or why the server cannot be reached."""
    client = get_client()
    info = client.info()
    reads = f" · reads {info['max_input_tokens']:,} tokens of a cell" if info.get("max_input_tokens") else ""
    return f"{client.settings.server_url} · {info['model']} · {info['dimensions']} dimensions{reads}"


# --- helpers --------------------------------------------------------------------------


def _one_cell(value, name: str):
    """The value of an argument that takes one cell: xlwings hands a range given to it as a
    list, whose text ("['a', 'b']") must not be embedded. A one-cell range is that cell."""
    if not isinstance(value, (list, tuple)):
        return value
    cells = flatten(as_grid(value))
    if len(cells) != 1:
        raise ValueError(f"{name} must be one cell, not a range.")
    return cells[0]


def _used(grid: list[list]) -> list[list]:
    """`grid` without its trailing blank rows and columns (one cell at least): a whole
    column (B:B) arrives as 1,048,576 rows. Blanks inside the used part keep their place."""
    rows, cols = _extent(grid)
    return [row[:cols] for row in grid[:rows]]


def _used_pair(a: list[list], b: list[list]) -> tuple[list[list], list[list]]:
    """EMBED_SIM's two ranges without the trailing rows and columns blank in both; a single
    cell against a range, the range as `_used` leaves it. Ranges of two other shapes stay as
    they are, for `_paired_shape` to refuse (trimmed, a mostly blank one could pass for a cell)."""
    if shape(a) != shape(b):
        if (1, 1) in (shape(a), shape(b)):
            return _used(a), _used(b)
        return a, b
    (ra, ca), (rb, cb) = _extent(a), _extent(b)
    rows, cols = max(ra, rb), max(ca, cb)
    return [row[:cols] for row in a[:rows]], [row[:cols] for row in b[:rows]]


def _extent(grid: list[list]) -> tuple[int, int]:
    """How many rows and columns of `grid` reach its last non-blank cell (1 x 1 at least)."""
    rows = cols = 1
    for i in range(len(grid) - 1, -1, -1):  # from the end: a whole column is mostly blank
        if not all(map(_blank, grid[i])):
            rows = i + 1
            break
    for row in grid[:rows]:
        for j in range(len(row) - 1, cols - 1, -1):
            if not _blank(row[j]):
                cols = j + 1
                break
    return rows, cols


def _blank(value) -> bool:
    return value is None or isinstance(cell_text(value), Blank)


def _instruction(instruction) -> str | None:
    """The formula's instruction, else EMBED_INSTRUCTION, else none."""
    instruction = _one_cell(instruction, "instruction")
    text = cell_text(instruction) if instruction is not None else BLANK
    if isinstance(text, CellError):  # not silently dropped: the scores would differ
        raise ValueError(f"the instruction cell holds {text.text}.")
    if isinstance(text, str):
        return text
    return load_settings().instruction


def _vectors_of(cells: list, task: str | None, dimensions: int | None = None,
                prompt_name: str | None = None) -> dict[str, np.ndarray]:
    """Vectors for the text cells among `cells` (blanks and errors cost nothing); `task`,
    else the server's prompt `prompt_name`, goes before each."""
    wanted = [c for c in cells if isinstance(c, str)]
    if not wanted:
        return {}
    return get_client().vectors(wanted, task, dimensions, prompt_name=prompt_name)


def _score(a, b, left: dict, right: dict):
    if isinstance(a, CellError) or isinstance(b, CellError):
        return not_available()
    if isinstance(a, Blank) or isinstance(b, Blank):
        return None
    return cosine(left[a], right[b])


def _paired_shape(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    if a == b or b == (1, 1):
        return a
    if a == (1, 1):
        return b
    raise ValueError(
        f"a and b must have the same shape, or one must be a single cell; got {a[0]}x{a[1]} and {b[0]}x{b[1]}."
    )


def _broadcast(grid, rows: int, cols: int):
    return grid if shape(grid) == (rows, cols) else [[grid[0][0]] * cols for _ in range(rows)]


def _single_or_grid(grid):
    return grid[0][0] if shape(grid) == (1, 1) else grid


# A number as a cell shows it or one may type it: ASCII digits (Python's float() would also
# read "1_000", "nan" and other scripts' digits, which functions.js's Number() does not).
NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def _whole_number(value, name: str, low: int, high: int) -> int | None:
    """A count argument (k, dimensions) read from the text its cell shows, as functions.js
    reads it: None where the cell is blank, else a whole number from `low` to `high`."""
    cell = cell_text(_one_cell(value, name))
    if isinstance(cell, Blank):
        return None
    if isinstance(cell, CellError):
        raise ValueError(f"{name} must be a whole number, not {cell.text}.")
    text = cell.strip()
    if not NUMBER.fullmatch(text):  # TRUE, a date, a word
        raise ValueError(f"{name} must be a whole number, not '{text}'.")
    number = float(text)
    if not (number.is_integer() and low <= number <= high):
        raise ValueError(f"{name} must be a whole number from {low} to {high}, not {text}.")
    return int(number)
