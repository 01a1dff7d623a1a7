"""The formulas against the real Ray Serve app, called with arguments shaped as xlwings passes
them: `ndim=2` ranges are lists of rows, error cells arrive as text (`err_to_str=True`), blank
cells as None, numbers as float and dates as datetime."""

import datetime as dt
import math

import numpy as np
import pytest
from conftest import EXCEL_KEY

from excel_addin import udfs
from excel_addin.client import get_client
from excel_addin.settings import load_settings

pytestmark = [pytest.mark.ray, pytest.mark.slow]

Q = "How much notice is needed to terminate the lease?"
RELATED = "Either party may terminate this lease with thirty days' written notice."
UNRELATED = "The football match ended two to one after extra time."


def column(*values):
    return [[v] for v in values]


def test_identical_texts_score_one(sheet_env):
    assert udfs.embed_sim([["合同终止"]], [["合同终止"]]) == pytest.approx(1.0, abs=1e-5)


def test_a_related_pair_scores_above_an_unrelated_one(sheet_env):
    related = udfs.embed_sim([[Q]], [[RELATED]])
    unrelated = udfs.embed_sim([[Q]], [[UNRELATED]])
    assert isinstance(related, float) and related > unrelated + 0.2


def test_ranges_are_compared_cell_by_cell_and_spill(sheet_env):
    a = column(Q, "reset my password", "refund policy")
    b = column(RELATED, "How to change a forgotten password", UNRELATED)
    result = udfs.embed_sim(a, b)
    assert len(result) == 3 and all(len(row) == 1 for row in result)
    singles = [udfs.embed_sim([[x[0]]], [[y[0]]]) for x, y in zip(a, b, strict=True)]
    assert [row[0] for row in result] == pytest.approx(singles, abs=1e-6)


def test_one_cell_against_a_range_compares_it_with_each(sheet_env):
    result = udfs.embed_sim([[Q]], column(RELATED, UNRELATED, Q))
    scores = [row[0] for row in result]
    assert scores[2] == pytest.approx(1.0, abs=1e-5) and scores[0] > scores[1]


def test_blanks_numbers_dates_and_errors(sheet_env):
    a = column("Termination", None, 1024.0, dt.datetime(2024, 3, 1), "#N/A", True, "   ")
    b = column("Termination", "anything", "1024", "2024-03-01", "anything", "TRUE", "x")
    result = [row[0] for row in udfs.embed_sim(a, b)]
    assert result[0] == pytest.approx(1.0, abs=1e-5)
    assert result[1] is None  # blank gives blank
    assert result[2] == pytest.approx(1.0, abs=1e-5)  # 1024.0 is embedded as "1024"
    assert result[3] == pytest.approx(1.0, abs=1e-5)  # dates as ISO dates
    assert result[4] == "#N/A"  # an error input gives #N/A there, the rest still computes
    assert result[5] == pytest.approx(1.0, abs=1e-5)
    assert result[6] is None  # whitespace only is blank


def test_a_blank_result_is_an_empty_text_never_none(sheet_env):
    # xlwings' threading mode caches a formula's result and takes None for "not computed
    # yet": a formula returning None started itself again on every recalculation, for ever.
    assert udfs.embed_sim([[None]], [["anything"]]) == ""
    assert udfs.embed_sim("   ", "anything") == ""
    assert udfs.semantic_search(None, column(RELATED)) == ""
    # An error cell as the query, k or instruction: #N/A or a sentence, not a blank.
    assert udfs.semantic_search("#REF!", column(RELATED)) == "#N/A"
    assert udfs.semantic_search(Q, column(RELATED), "#REF!").startswith("SEMANTIC_SEARCH: k must be")
    assert udfs.embed_sim(Q, RELATED, "#REF!") == "EMBED_SIM: the instruction cell holds #REF!."


def test_shape_mismatch_is_a_sentence(sheet_env):
    message = udfs.embed_sim(column("a", "b"), column("a", "b", "c"))
    assert message.startswith("EMBED_SIM: a and b must have the same shape")


def test_sim_matrix_matches_pairwise_scores(sheet_env):
    rows = column(Q, "refund policy")
    cols = [[RELATED, UNRELATED, "Refunds are paid within 14 days."]]
    matrix = udfs.sim_matrix(rows, cols)
    assert np.array(matrix).shape == (2, 3)
    assert matrix[1][2] == pytest.approx(udfs.embed_sim([["refund policy"]], [[cols[0][2]]]), abs=1e-6)
    assert matrix[0][0] > matrix[0][1]


def test_semantic_search_ranks_best_first(sheet_env):
    candidates = column(UNRELATED, "Refunds are paid within 14 days.", RELATED, None, "#REF!", RELATED)
    result = udfs.semantic_search(Q, candidates, 2)
    assert [row[0] for row in result] == [RELATED, "Refunds are paid within 14 days."]
    assert result[0][1] > result[1][1]
    assert udfs.semantic_search(Q, candidates, 0).startswith("SEMANTIC_SEARCH: k must be")
    assert udfs.semantic_search(None, candidates) == ""  # a blank query: a blank cell
    assert len(udfs.semantic_search(Q, candidates, None)) == 3  # an empty k cell: up to 5


def test_semantic_search_instruction_changes_the_query(sheet_env):
    plain = udfs.semantic_search(Q, column(RELATED, UNRELATED), 1)
    guided = udfs.semantic_search(Q, column(RELATED, UNRELATED), 1, "Find the lease clause")
    assert plain[0][0] == guided[0][0] == RELATED
    assert plain[0][1] != pytest.approx(guided[0][1], abs=1e-6)


def test_embed_gives_rows_of_numbers(sheet_env):
    vector = udfs.embed([["Termination"]])
    assert len(vector) == 384 and math.isclose(np.linalg.norm(vector), 1.0, rel_tol=1e-5)
    short = udfs.embed([["Termination"]], 64)
    assert len(short) == 64 and math.isclose(np.linalg.norm(short), 1.0, rel_tol=1e-5)
    rows = udfs.embed(column("a", None, "#N/A"), 32)
    assert len(rows) == 3 and rows[1] == [None] * 32 and rows[2] == ["#N/A"] * 32
    assert udfs.embed([["x"]], "many").startswith("EMBED: dimensions must be a whole number")
    # As the API checks it: wider than the model (it gave the full 384 silently) or below
    # the server's min_dimensions.
    assert udfs.embed([["x"]], 2048) == "EMBED: dimensions must be between 32 and 384 for bundled:minilm, not 2048."
    assert udfs.embed([["x"]], 8) == "EMBED: dimensions must be between 32 and 384 for bundled:minilm, not 8."


def test_embed_info_names_server_model_and_width(sheet_env):
    info = udfs.embed_info()
    assert sheet_env["open"] in info and "bundled:minilm" in info and "384 dimensions" in info
    assert info.endswith(" · reads 256 tokens of a cell")  # longer cells are embedded from their start


def test_server_down_is_a_readable_sentence(monkeypatch, sheet_env):
    from conftest import free_port

    monkeypatch.setenv("EMBED_SERVER_URL", f"http://127.0.0.1:{free_port()}")
    for message in (udfs.embed_sim([["a"]], [["b"]]), udfs.embed_info()):
        assert message.startswith("Cannot reach the embedding server at http://127.0.0.1:")
        assert "EMBED_SERVER_URL" in message and "Traceback" not in message


def test_wrong_or_missing_key_is_a_readable_sentence(monkeypatch, sheet_env):
    monkeypatch.setenv("EMBED_SERVER_URL", sheet_env["keyed"])
    monkeypatch.setenv("EMBED_API_KEY", "not-the-key")
    assert "refused the API key. Check EMBED_API_KEY." in udfs.embed_sim([["a"]], [["b"]])
    monkeypatch.delenv("EMBED_API_KEY")
    assert "needs an API key. Set EMBED_API_KEY" in udfs.embed_info()
    monkeypatch.setenv("EMBED_API_KEY", EXCEL_KEY)
    assert udfs.embed_sim([["a"]], [["a"]]) == pytest.approx(1.0, abs=1e-5)


def test_a_column_costs_few_requests_and_recalculation_none(sheet_env):
    client = get_client(load_settings())
    unique = [f"clause {i} of the supply agreement" for i in range(900)]
    a = column(*[unique[i % 900] for i in range(2000)])  # 2,000 rows, repeats included
    b = column(*[unique[(i * 7) % 900] for i in range(2000)])
    before = client.requests
    first = udfs.embed_sim(a, b)
    sent = client.requests - before
    assert sent <= math.ceil(900 / client.settings.chunk_size)  # each distinct text once
    assert len(first) == 2000
    again = udfs.embed_sim(a, b)
    assert client.requests - before == sent  # recalculation: zero requests
    assert again == first


def test_timeout_is_a_readable_sentence(monkeypatch, sheet_env):
    import socket

    # A server that takes the connection and never answers (a hung or starting one).
    with socket.create_server(("127.0.0.1", 0)) as hung:
        monkeypatch.setenv("EMBED_SERVER_URL", f"http://127.0.0.1:{hung.getsockname()[1]}")
        monkeypatch.setenv("EMBED_TIMEOUT_S", "0.5")
        message = udfs.embed_sim([["a"]], [["b"]])
    assert "did not answer within 0.5 s" in message
    assert "EMBED_TIMEOUT_S" in message

