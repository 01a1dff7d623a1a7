"""What a spreadsheet cell becomes: the text Excel shows, a blank, or an error marker."""

import datetime as dt

import pytest

from serve_app.core.cells import BLANK, CellError, as_grid, cell_text, flatten, number_text, shape


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1024.0, "1024"),
        (1024, "1024"),
        (-3.0, "-3"),
        (0.5, "0.5"),
        (1 / 3, "0.333333333333333"),
        (1234567890123456789.0, "1.23457E+18"),
        (True, "TRUE"),
        (False, "FALSE"),
        (dt.datetime(2024, 3, 1), "2024-03-01"),
        (dt.datetime(2024, 3, 1, 14, 30, 5), "2024-03-01 14:30:05"),
        (dt.datetime(1899, 12, 30, 14, 24), "14:24:00"),  # a time-only cell, as xlwings reads it
        (dt.date(2025, 12, 31), "2025-12-31"),
        ("Termination clause", "Termination clause"),
        ("  合同终止  ", "  合同终止  "),
    ],
)
def test_values_become_the_text_excel_shows(value, text):
    assert cell_text(value) == text


@pytest.mark.parametrize("value", [None, "", "   ", "\t\n"])
def test_blank_cells_are_blank(value):
    assert cell_text(value) is BLANK


@pytest.mark.parametrize("value", ["#N/A", "#DIV/0!", "#VALUE!", "#REF!", "#NAME?", "#SPILL!", -2146826246, -2146826281])
def test_error_cells_are_errors_whether_read_as_text_or_com_codes(value):
    assert isinstance(cell_text(value), CellError)


def test_an_ordinary_integer_is_not_mistaken_for_an_error_code():
    assert cell_text(-2146826247) == "-2146826247"


def test_number_text_for_non_finite():
    assert number_text(float("nan")) == "#NUM!"


@pytest.mark.parametrize(
    ("value", "grid", "size"),
    [
        ("one cell", [["one cell"]], (1, 1)),
        ([["a"], ["b"], ["c"]], [["a"], ["b"], ["c"]], (3, 1)),  # a column, ndim=2
        ([["a", "b", "c"]], [["a", "b", "c"]], (1, 3)),  # a row, ndim=2
        (["a", "b"], [["a", "b"]], (1, 2)),  # a 1-D list, as without ndim=2
    ],
)
def test_argument_shapes(value, grid, size):
    assert as_grid(value) == grid
    assert shape(as_grid(value)) == size
    assert flatten(as_grid(value)) == [c for row in grid for c in row]
