"""Excel number formats that show a whole number as other text than General does."""

from __future__ import annotations

import pytest

from serve_app.core.numformat import integer_format, integer_formats_among, shown_integer


@pytest.mark.parametrize(("value", "code", "shown"), [
    (2134, "00000", "02134"),  # Excel's Special > Zip Code
    (2134.0, "00000", "02134"),  # as a workbook stores it
    (90210, "00000", None),  # shown as General shows it: nothing to change
    (21341234, "00000-0000", "02134-1234"),  # Zip Code + 4
    (123, "000-00-0000", "000-00-0123"),  # Social Security Number
    (12, '"No. "0000', "No. 0012"),
    (12, "\\A0000", "A0012"),
    (12, "[Red]000000", "000012"),
    (123456, "000-000", "123-456"),
    (1234567, "000-000", "1234-567"),  # more digits than places: the rest in the first
    (123456, "000", None),  # all of them, as General
    (-12, "00000", "-00012"),
    (-12, "00000;(00000)", "(00012)"),
    (0, '00000;-00000;"none"', "none"),
    (1234, "##-00", "12-34"),
    (5, "##00", "05"),
    (12, "##00", None),  # as General
])
def test_a_whole_number_shows_as_excel_shows_it_in_its_format(value, code, shown):
    assert shown_integer(value, code) == shown


@pytest.mark.parametrize("code", [
    "General", "0", "#", "0.00", "#,##0", "0%", "0.00E+00", "# ?/?", "@", "yyyy-mm-dd", "hh:mm",
    "[<=9999999]###-####;(###) ###-####",  # Excel's Phone Number: a condition
    "[$€-407]00000", "_(00000_)", "00000*-", '"unterminated', "00000;;0", "",
    "00/00/0000", "0/000",  # a "/" between placeholders is a fraction's bar: 12252012/1
    "$0", '0" kg"', "+0;-0;0", "#-###",  # cannot pad: amounts, not identifiers
])
def test_formats_it_cannot_render_exactly_are_left_to_general(code):
    assert integer_format(code) is None
    assert shown_integer(2134, code) is None


@pytest.mark.parametrize("value", [2.5, float("nan"), 1e16, True, None, "02134"])
def test_only_whole_numbers_a_cell_can_hold_exactly_are_rendered(value):
    assert shown_integer(value, "00000") is None


def test_a_workbooks_formats_are_looked_through_for_one_it_renders():
    assert not integer_formats_among(["yyyy-mm-dd", "#,##0.00 €", "0%"])
    assert integer_formats_among(["yyyy-mm-dd", "00000"])
