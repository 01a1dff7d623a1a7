"""Write a demo workbook: `python -m excel_addin.demo [embeddings_demo.xlsx]`.

English and Chinese legal and support rows with example formulas. Open it in
Windows desktop Excel with the xlwings add-in installed and `excel_addin.udfs`
imported (see README), and the formulas compute.
"""

from __future__ import annotations

import sys
from pathlib import Path

from openpyxl import Workbook
from openpyxl.styles import Font
from openpyxl.worksheet.formula import ArrayFormula

PAIRS = [
    ("How much notice do I need to end the lease?",
     "Either party may terminate this lease by giving thirty days' written notice."),
    ("租户可以提前解除租赁合同吗？",
     "任何一方提前三十天书面通知对方，即可解除本租赁合同。"),
    ("Who pays for repairs to the heating?",
     "The landlord shall maintain the heating system at its own expense."),
    ("我的押金什么时候退还？",
     "押金应在租赁期满且房屋交还后十四日内退还。"),
    ("How do I reset my password?",
     "Click 'Forgot password' on the sign-in page and follow the link we email you."),
    ("Can I get a refund for an annual plan?",
     "The football match ended two to one after extra time."),  # an unrelated answer
]
CLAUSES = [
    "Either party may terminate this lease by giving thirty days' written notice.",
    "The landlord shall maintain the heating system at its own expense.",
    "押金应在租赁期满且房屋交还后十四日内退还。",
    "Annual plans are refundable within 30 days of purchase.",
    "The tenant may not sublet without the landlord's written consent.",
    "租户应于每月第一天支付租金。",
]
INSTRUCTION = "Given a question, retrieve the contract clause or article that answers it"


def build(path: Path) -> Path:
    """Write the workbook to `path` and return it."""
    book = Workbook()
    bold = Font(bold=True)

    pairs = book.active
    pairs.title = "Similarity"
    pairs.append(["Question", "Answer", "EMBED_SIM", "with instruction"])
    pairs["F1"], pairs["G1"] = "Instruction:", INSTRUCTION
    for row, (question, answer) in enumerate(PAIRS, start=2):
        pairs.append([question, answer, f"=EMBED_SIM(A{row},B{row})", f"=EMBED_SIM(A{row},B{row},$G$1)"])
    last = len(PAIRS) + 1
    pairs[f"A{last + 2}"] = "A whole column in one formula (spills):"
    pairs[f"C{last + 2}"] = f"=EMBED_SIM(A2:A{last},B2:B{last},$G$1)"

    search = book.create_sheet("Search")
    search.append(["Question", "Clauses", "", "Best matches (text, score)"])
    search["A2"] = "我想提前退租，需要提前多久通知？"
    for row, clause in enumerate(CLAUSES, start=2):
        search[f"B{row}"] = clause
    search["D2"] = f'=SEMANTIC_SEARCH(A2,B2:B{len(CLAUSES) + 1},3,"{INSTRUCTION}")'

    matrix = book.create_sheet("Matrix")
    matrix["A1"] = "Questions x clauses"
    for col, clause in enumerate(CLAUSES[:4], start=2):
        matrix.cell(row=1, column=col, value=clause)
    for row, (question, _) in enumerate(PAIRS[:4], start=2):
        matrix.cell(row=row, column=1, value=question)
    matrix["A7"] = ArrayFormula("A7:D10", "=SIM_MATRIX(A2:A5,B1:E1)")

    info = book.create_sheet("Info")
    info["A1"], info["B1"] = "Server, model, dimensions:", "=EMBED_INFO()"
    info["A2"], info["B2"] = "One vector (first 8 dimensions):", '=EMBED("合同终止",8)'

    for sheet in book.worksheets:
        for cell in sheet[1]:
            cell.font = bold
        sheet.column_dimensions["A"].width = 48
        sheet.column_dimensions["B"].width = 60
    book.save(path)
    return path


def main(argv: list[str]) -> None:
    target = Path(argv[0] if argv else "embeddings_demo.xlsx")
    print(f"Wrote {build(target)}")


if __name__ == "__main__":
    main(sys.argv[1:])
