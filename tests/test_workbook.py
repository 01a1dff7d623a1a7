"""A real workbook: .xlsx files with =EMBED_SIM(...) formulas, evaluated by the `formulas`
engine calling the add-in against the served app; the values equal direct computation."""

import os

import numpy as np
import openai
import openpyxl
import pytest
from xlsx_engine import evaluate

from excel_addin import demo

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def direct(a: str, b: str, instruction: str | None = None) -> float:
    """The score from the service itself, through the official openai client: not through the
    add-in's own client, whose cache the formulas have just filled."""
    client = openai.OpenAI(base_url=f"{os.environ['EMBED_SERVER_URL']}/v1", api_key="unused")
    extra = {"instruction": instruction} if instruction else None
    left = client.embeddings.create(model="bundled:minilm", input=[a], extra_body=extra).data[0].embedding
    right = client.embeddings.create(model="bundled:minilm", input=[b]).data[0].embedding
    return float(np.dot(left, right))


def test_demo_workbook_formulas_compute_as_direct_calls(sheet_env, tmp_path):
    path = demo.build(tmp_path / "demo.xlsx")
    values = evaluate(path)
    for row, (question, answer) in enumerate(demo.PAIRS, start=2):
        assert values[f"SIMILARITY!C{row}"] == pytest.approx(direct(question, answer), abs=1e-6)
        assert values[f"SIMILARITY!D{row}"] == pytest.approx(
            direct(question, answer, demo.INSTRUCTION), abs=1e-6
        )
    # The deliberately unrelated answer scores lowest.
    scores = [values[f"SIMILARITY!C{row}"] for row in range(2, len(demo.PAIRS) + 2)]
    assert int(np.argmin(scores)) == len(demo.PAIRS) - 1
    assert "bundled:minilm" in values["INFO!B1"]


def test_blanks_numbers_and_error_cells_in_a_workbook(sheet_env, tmp_path):
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = "Data"
    rows = [("contract ends", "termination of the agreement"), (1024, "1024"), (None, "anything"),
            ("=NA()", "anything"), ("same text", "same text")]
    for i, (a, b) in enumerate(rows, start=1):
        sheet[f"A{i}"], sheet[f"B{i}"] = a, b
        sheet[f"C{i}"] = f"=EMBED_SIM(A{i},B{i})"
    path = tmp_path / "cells.xlsx"
    book.save(path)
    values = evaluate(path)
    assert values["DATA!C1"] == pytest.approx(direct("contract ends", "termination of the agreement"), abs=1e-6)
    assert values["DATA!C2"] == pytest.approx(1.0, abs=1e-5)  # the number is embedded as "1024"
    assert values["DATA!C3"] == ""  # blank stays blank
    assert str(values["DATA!C4"]) == "#N/A"  # the engine's own #N/A error
    assert values["DATA!C5"] == pytest.approx(1.0, abs=1e-5)
