"""Excel number formats that pad a whole number with zeros: a ZIP code's `00000`, a case
number's `000000`, with separators between digit groups (`000-00-0000`) or literal text
(`"No. "0000`). Pure, no I/O.

A workbook holds such a cell as the number (123); Excel shows `00123`, and the number is
an identifier. Only formats that can be rendered exactly are taken: anything with decimals,
thousands separators, percent, exponents, fractions, dates, conditions, locales or fills is
left to General, as are formats that cannot pad (`$0`, `0" kg"`): their numbers are amounts.
"""

from __future__ import annotations

import functools

# Characters a format shows as they are without quotes (Excel's list, less those that mean
# something here; "/" between digit placeholders is a fraction's bar, so it is left out).
_PLAIN = frozenset(" $-+():!^&'~{}<>=")
_COLOURS = frozenset({"black", "blue", "cyan", "green", "magenta", "red", "white", "yellow"})

Section = tuple[tuple[str, str], ...]  # ("0" | "#" | "text", what it shows)


def shown_integer(value: float, code: str | None) -> str | None:
    """The text a cell holding the whole number `value` shows in format `code`, where that
    format is one this module renders and the text differs from General's; else None."""
    if (code is None or isinstance(value, bool) or not isinstance(value, int | float)
            or value != value or abs(value) >= 1e15 or value != int(value)):
        return None
    sections = integer_format(code)
    if sections is None:
        return None
    number = int(value)
    if number < 0:
        text = _fill(sections[1], -number) if len(sections) > 1 else "-" + _fill(sections[0], -number)
    elif number == 0 and len(sections) > 2:
        text = _fill(sections[2], 0)
    else:
        text = _fill(sections[0], number)
    return text if text and text != str(number) else None


@functools.lru_cache(maxsize=512)
def integer_format(code: str) -> tuple[Section, ...] | None:
    """`code`'s sections for positive, negative and zero numbers (a text section is left
    out), each a whole number's digit placeholders among literal text, the first with two
    zeros or more (it pads); None for any other format."""
    sections = []
    for raw in _split_sections(code)[:3]:
        section = _parse_section(raw)
        if section is None:
            return None
        sections.append(section)
    if not sections or sum(kind == "0" for kind, _ in sections[0]) < 2:
        return None
    return tuple(sections)


def integer_formats_among(codes: list[str]) -> bool:
    """Whether any of a workbook's number formats is one `shown_integer` renders."""
    return any(integer_format(code) is not None for code in codes)


def _split_sections(code: str) -> list[str]:
    sections, current, quoted, escaped = [], [], False, False
    for ch in code:
        if escaped:
            escaped = False
        elif ch == "\\" and not quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ";" and not quoted:
            sections.append("".join(current))
            current = []
            continue
        current.append(ch)
    sections.append("".join(current))
    return sections


def _parse_section(raw: str) -> Section | None:
    tokens: list[tuple[str, str]] = []
    i = 0
    while i < len(raw):
        ch = raw[i]
        if ch in "0#":
            tokens.append((ch, ch))
        elif ch == '"':
            end = raw.find('"', i + 1)
            if end < 0:
                return None
            tokens.append(("text", raw[i + 1:end]))
            i = end
        elif ch == "\\" and i + 1 < len(raw):
            i += 1
            tokens.append(("text", raw[i]))
        elif ch == "[":
            end = raw.find("]", i)
            if end < 0 or raw[i + 1:end].lower() not in _COLOURS:  # conditions, locales, elapsed time
                return None
            i = end
        elif ch in _PLAIN:
            tokens.append(("text", ch))
        else:  # decimals, thousands, %, exponents, ?, @, fills, dates, General
            return None
        i += 1
    return tuple(tokens) if tokens else None


def _fill(section: Section, number: int) -> str:
    """`number`'s digits in `section`'s placeholders, from the right: a `0` left over shows
    0, a `#` nothing; digits beyond the placeholders go into the first."""
    digits = str(number).lstrip("0")
    out = [shown for _, shown in section]
    places = [i for i, (kind, _) in enumerate(section) if kind != "text"]
    left = len(digits)
    for place in reversed(places):
        if left:
            left -= 1
            out[place] = digits[left]
        else:
            out[place] = "0" if section[place][0] == "0" else ""
    if places and left:
        out[places[0]] = digits[:left] + out[places[0]]
    return "".join(out)
