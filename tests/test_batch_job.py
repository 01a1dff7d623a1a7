"""`python -m serve_app.batch` submitted as a Ray job to a local head, as a user submits it."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import openpyxl
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import BUNDLED, command_lines, early_zygotes, wait_for, zygotes_of
from rayhead import REPO, RayHead, processes_of

pytestmark = [pytest.mark.ray, pytest.mark.slow]

@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    head = RayHead(tmp_path_factory.mktemp("rh"))  # short: Unix socket paths have a length limit
    yield head
    head.stop()


def rows_frame() -> pd.DataFrame:
    """A sheet as analysts have them: blanks, whitespace, numbers, dates, Chinese, repeats."""
    return pd.DataFrame({
        "id": list(range(8)),
        "question": [
            "How do I reset my password?", "", "   ", "合同终止的条件是什么？", "1024",
            "How do I reset my password?", "The tenant must pay the monthly rent.", "007",
        ],
        "doc": [
            "Steps to reset a forgotten password", "unused", "unused", "任何一方可提前三十天书面通知终止本合同。",
            "a number", "Quarterly tax filing deadline", "Rent is due on the first day of each month.", "James Bond",
        ],
    })


def direct(bundled_embedder, texts: list[str]) -> np.ndarray:
    return bundled_embedder.encode(texts).vectors


def test_embed_csv_job_with_working_dir_matches_direct_computation(ray_head, tmp_path, bundled_embedder):
    frame = rows_frame()
    frame.to_csv(tmp_path / "rows.csv", index=False)
    output = tmp_path / "out" / "embedded.parquet"
    job = ray_head.submit("embed", "--input", str(tmp_path / "rows.csv"), "--column", "question",
                          "--output", str(output), working_dir=True)
    assert ray_head.wait(job) == "SUCCEEDED", ray_head.logs(job)[-3000:]
    logs = ray_head.logs(job)
    assert "MapBatches(EmbedRows)" in logs  # Ray Data's execution plan is in the job log
    assert "Wrote 8 rows" in logs
    # The actor was forked from the job's warm-start zygote, which ends with the job.
    assert "loaded in" in logs and "(forked from the warm-start process)" in logs, logs[-3000:]
    # The actor's line says what it turned on (float32: no packing, so no fusing) in
    # sentences, each ended.
    said = re.search(r"Model bundled:minilm loaded in .*", logs).group(0)
    assert "(only bfloat16 ones are packed). Elementwise work not fused: it needs the packed " \
           "linear weights. Short texts share rows of a pass" in said, said
    assert said.endswith(").")
    assert_zygotes_gone(ray_head)
    # ... and which the driver started before ray.init, to import torch meanwhile.
    ready = [line for line in zygote_log(ray_head).splitlines() if " ready in " in line]
    assert ready and "before its job was known" in ready[-1], ready

    table = pq.read_table(output)
    assert table.column_names == ["id", "question", "doc", "embedding"]
    assert table["id"].to_pylist() == list(range(8))  # order kept
    # Text columns are read verbatim: "007" stays "007", it is not the number 7.
    assert table["question"].to_pylist()[7] == "007"
    embeddings = table["embedding"].to_pylist()
    assert embeddings[1] is None and embeddings[2] is None  # blank and whitespace rows
    wanted = [i for i in range(8) if i not in (1, 2)]
    expected = direct(bundled_embedder, [frame["question"][i] for i in wanted])
    for row, vector in zip(wanted, expected, strict=True):
        got = np.asarray(embeddings[row], dtype=np.float32)
        assert got.shape == (384,)
        assert float(got @ vector) >= 0.9999, row

    # Rerunning gives the same file.
    first = hashlib.sha256(output.read_bytes()).hexdigest()
    again = ray_head.submit("embed", "--input", str(tmp_path / "rows.csv"), "--column", "question",
                            "--output", str(output))
    assert ray_head.wait(again) == "SUCCEEDED", ray_head.logs(again)[-3000:]
    # A second job on the same cluster gets a zygote of its own (one started for the
    # first job would fork workers that Ray refuses: they carry the first job's id).
    assert "(forked from the warm-start process)" in ray_head.logs(again), ray_head.logs(again)[-3000:]
    assert_zygotes_gone(ray_head)
    assert hashlib.sha256(output.read_bytes()).hexdigest() == first
    assert sorted(p.name for p in output.parent.iterdir()) == ["embedded.parquet"]


def raylets(head) -> list[int]:
    return [pid for pid, args in command_lines().items()
            if args[0].endswith("raylet") and any(str(head.temp_dir) in a for a in args)]


def zygote_log(head) -> str:
    from serve_app.ray_shell.warmstart import _log_path

    return "".join(Path(_log_path(raylet)).read_text() for raylet in raylets(head))


def assert_zygotes_gone(head, timeout_s: float = 15) -> None:
    """No warm-start zygote of this cluster outlives the job that started it."""

    def zygotes() -> list[int]:
        # One a driver started before Ray names no raylet, only its driver.
        early = [pid for pid, (driver, _) in early_zygotes().items() if not Path(f"/proc/{driver}").exists()]
        return [z for raylet in raylets(head) for z in zygotes_of(raylet)] + early

    wait_for(lambda: not zygotes(), timeout_s, "the job's zygote to exit with the job")


def test_similarity_xlsx_round_trip_below_a_title(ray_head, tmp_path, bundled_embedder):
    frame = rows_frame()
    frame["question"] = frame["question"].astype(object)
    frame.loc[4, "question"] = 1024  # a number cell
    frame["when"] = [dt.datetime(2024, 1, d + 1) for d in range(8)]
    frame["note"] = ["NA", "None", "null", "N/A", "nan", "NULL", "", "ok"]  # text, not blanks
    frame["zip"] = [2134, 90210, 501, 10001, 2134, 60601, 94105, 1001]
    frame.loc[6, "doc"] = "Rent is due on the first day of each month. " * 60  # past 256 tokens
    frame.to_excel(tmp_path / "pairs.xlsx", index=False, sheet_name="Pairs")
    book = openpyxl.load_workbook(tmp_path / "pairs.xlsx")
    for (cell,) in book["Pairs"].iter_rows(min_row=2, min_col=6, max_col=6):
        cell.number_format = "00000"  # Excel's Zip Code: 2134 shows 02134
    book["Pairs"].insert_rows(1, 2)  # a report's title and a blank row above the table
    book["Pairs"]["A1"] = "Pairs to score, March"
    book.save(tmp_path / "pairs.xlsx")
    output = tmp_path / "scored.xlsx"
    job = ray_head.submit("similarity", "--input", str(tmp_path / "pairs.xlsx"), "--left", "question",
                          "--right", "doc", "--output", str(output))
    assert ray_head.wait(job) == "SUCCEEDED", ray_head.logs(job)[-3000:]
    logs = ray_head.logs(job)

    scored = pd.read_excel(output)
    assert list(scored.columns) == ["id", "question", "doc", "when", "note", "zip", "similarity"]
    written = [row[0].value for row in openpyxl.load_workbook(output).active.iter_rows(min_row=2, min_col=6, max_col=6)]
    assert written == ["02134", "90210", "00501", "10001", "02134", "60601", "94105", "01001"]  # as shown
    notes = pd.read_excel(output, keep_default_na=False, na_values=[""])["note"]
    assert notes.tolist()[:6] == ["NA", "None", "null", "N/A", "nan", "NULL"] and pd.isna(notes[6])
    assert scored["id"].tolist() == list(range(8))
    assert scored["similarity"].isna().tolist() == [False, True, True, False, False, False, False, False]
    left = [str(frame["question"][i]) for i in range(8) if i not in (1, 2)]
    right = [frame["doc"][i] for i in range(8) if i not in (1, 2)]
    expected = np.sum(direct(bundled_embedder, left) * direct(bundled_embedder, right), axis=1)
    got = scored["similarity"].dropna().to_numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert got[0] > got[4]  # password question vs reset steps beats it vs tax deadline
    # The long text was embedded from its start, as the model reads it, and the job says so.
    assert ("Wrote 8 rows to " in logs and logs.rstrip().endswith(
        "1 text was longer than the model reads (256 tokens): only its start was embedded.")), logs[-2000:]
    assert "Split long texts (into paragraphs, say) to have all of them read." in logs
    assert "pairs.xlsx, sheet 'Pairs': the header is row 3, the first to name 'question' and 'doc'" in logs
    # A workbook is read whole before any work, and the job says so (a sheet of a million
    # rows had been 90 s of silence).
    assert re.search(r"INFO Reading pairs.xlsx \(8 rows\): a workbook is read whole before its rows are "
                     r"embedded.\n.*INFO Read 8 rows in \d+\.\d s.\n", logs), logs[-3000:]


def test_case_numbers_and_account_numbers_of_a_csv_reach_the_xlsx_output_as_written(ray_head, tmp_path):
    # They came out as 123 and 1.2345678901234567e+19: read as numbers, written as numbers.
    (tmp_path / "rows.csv").write_text(
        "case,account,fee,question,doc\n"
        "00123,12345678901234567890,1.50,How do I reset my password?,Steps to reset a forgotten password\n"
        "04567,98765432109876543210,2,when is rent due,Rent is due on the first day.\n")
    output = tmp_path / "scored.xlsx"
    job = ray_head.submit("similarity", "--input", str(tmp_path / "rows.csv"), "--left", "question",
                          "--right", "doc", "--output", str(output))
    assert ray_head.wait(job) == "SUCCEEDED", ray_head.logs(job)[-3000:]
    sheet = openpyxl.load_workbook(output).active
    assert [[cell.value for cell in row[:3]] for row in sheet.iter_rows(min_row=2)] == [
        ["00123", "12345678901234567890", 1.5], ["04567", "98765432109876543210", 2]]


def test_a_semicolon_csv_with_line_breaks_in_cells_is_scored_and_its_csv_output_read_back(
        ray_head, tmp_path, bundled_embedder):
    # Excel's "CSV UTF-8" where the decimal mark is a comma: a byte-order mark, semicolons,
    # and Alt+Enter line breaks in cells, in a file past the reader's 1 MB blocks (which
    # were cut inside the quotes: "Expected 3 columns, got 1").
    questions = ["How do I reset\nmy password?", "Wann ist die Miete fällig?", "合同\n终止的条件"]
    docs = ["Steps to reset\na forgotten password", "Die Miete ist am Ersten fällig; danach 5 % Zinsen.",
            "任何一方可提前三十天\n书面通知终止本合同。"]
    rows = 30_000
    lines = "".join(f'{i};"{questions[i % 3]}";"{docs[i % 3]}"\n' for i in range(rows))
    (tmp_path / "rows.csv").write_bytes(b"\xef\xbb\xbf" + f"id;question;doc\n{lines}".encode())
    assert (tmp_path / "rows.csv").stat().st_size > 2 << 20
    scored = tmp_path / "scored.csv"
    job = ray_head.submit("similarity", "--input", str(tmp_path / "rows.csv"), "--left", "question",
                          "--right", "doc", "--output", str(scored))
    assert ray_head.wait(job) == "SUCCEEDED", ray_head.logs(job)[-3000:]
    assert scored.read_bytes().startswith(b'\xef\xbb\xbf"id","question","doc","similarity"\n')  # for Excel
    table = pd.read_csv(scored, encoding="utf-8-sig")
    assert table["id"].tolist() == list(range(rows))
    assert table["question"].tolist()[:3] == questions and table["doc"].tolist()[:3] == docs
    expected = np.sum(direct(bundled_embedder, questions) * direct(bundled_embedder, docs), axis=1)
    np.testing.assert_allclose(table["similarity"][:3], expected, atol=1e-4)

    # The output, mark and all, is the next job's input.
    embedded = tmp_path / "embedded.parquet"
    job = ray_head.submit("embed", "--input", str(scored), "--column", "doc", "--output", str(embedded))
    assert ray_head.wait(job) == "SUCCEEDED", ray_head.logs(job)[-3000:]
    table = pq.read_table(embedded)
    assert table.column_names == ["id", "question", "doc", "similarity", "embedding"]
    assert table["id"].to_pylist() == list(range(rows)) and table["doc"].to_pylist()[:3] == docs


def test_search_of_an_embed_jobs_output_uses_its_vectors_and_returns_the_best_rows_first(
        ray_head, tmp_path, bundled_embedder):
    # Embed a corpus once, search it often. The search refused an embed job's output ("already
    # has a column 'embedding'"), a CSV output could not hold the vectors, and the corpus was
    # embedded again by every search.
    rows_frame()[["id", "doc"]].to_csv(tmp_path / "corpus.csv", index=False)
    job = ray_head.submit("embed", "--input", str(tmp_path / "corpus.csv"), "--column", "doc",
                          "--output", str(tmp_path / "corpus.parquet"))
    assert ray_head.wait(job) == "SUCCEEDED", ray_head.logs(job)[-3000:]
    pd.DataFrame({"q": ["forgot my password", "", "when is rent due"]}).to_csv(tmp_path / "q.csv", index=False)
    output = tmp_path / "hits.csv"
    job = ray_head.submit("search", "--queries", str(tmp_path / "q.csv"), "--query-column", "q",
                          "--corpus", str(tmp_path / "corpus.parquet"), "--corpus-column", "doc",
                          "--k", "2", "--output", str(output))
    assert ray_head.wait(job) == "SUCCEEDED", ray_head.logs(job)[-3000:]
    logs = ray_head.logs(job)
    # Its speed is of the rows it embedded (the 3 queries), not of the rows it wrote (5).
    summary = re.search(r"Wrote 5 rows to \S+ \(the 2 best of 8 corpus rows, by the vectors its file holds, "
                        r"for each of 3 queries\), without 'corpus_embedding' \(lists, which it cannot hold\): "
                        r".*, embedding and searching ([\d.]+) s \(3 rows embedded, ([\d.]+) rows/s\)", logs)
    assert summary, logs[-3000:]
    # Both figures are printed to 0.1: about 0.5 rows/s here, so an absolute bound (5 rows would be 0.75).
    assert float(summary[2]) == pytest.approx(3 / float(summary[1]), abs=0.06)
    assert ("The output leaves out 'embedding' of corpus.parquet: a .csv cannot hold a column of lists "
            "(vectors). Write the output as .parquet to keep it.") in logs
    assert "The corpus's own vectors are used (an embed job's, of the column 'doc'" in logs

    hits = pd.read_csv(output)
    assert list(hits.columns) == ["q", "rank", "score", "corpus_row", "corpus_id", "corpus_doc"]
    assert len(hits) == 2 + 1 + 2  # a blank query keeps one row, with no match
    assert hits["corpus_doc"][0] == "Steps to reset a forgotten password"
    assert hits["corpus_doc"][3] == "Rent is due on the first day of each month."
    assert hits["rank"].tolist()[:2] == [1, 2] and hits["score"][0] >= hits["score"][1]
    assert pd.isna(hits["rank"][2])
    docs = rows_frame()["doc"].tolist()
    expected = direct(bundled_embedder, ["forgot my password"]) @ direct(bundled_embedder, docs).T
    np.testing.assert_allclose(hits["score"][:2], np.sort(expected[0])[::-1][:2], atol=1e-5)


def test_search_embeds_both_sides_in_one_actor_with_the_query_prompt_on_queries_only(
        ray_head, tmp_path, small_standin_dir):
    from serve_app.core.config import AppArgs
    from serve_app.core.modelinfo import resolve_model
    from serve_app.core.prompts import prompt_prefix
    from serve_app.model.embedder import TextEmbedder

    docs = ["Steps to reset a forgotten password", "   ", "租金应于每月第一天支付。", "Tax filing deadline"]
    queries = ["forgot my password", "when is rent due", ""]
    pd.DataFrame({"doc": docs}).to_csv(tmp_path / "corpus.csv", index=False)
    pd.DataFrame({"q": queries}).to_csv(tmp_path / "q.csv", index=False)
    output = tmp_path / "hits.parquet"
    job = ray_head.submit("search", "--queries", str(tmp_path / "q.csv"), "--query-column", "q",
                          "--corpus", str(tmp_path / "corpus.csv"), "--corpus-column", "doc",
                          "--k", "3", "--output", str(output), model=str(small_standin_dir))
    assert ray_head.wait(job) == "SUCCEEDED", ray_head.logs(job)[-3000:]
    # One pool of actors for the corpus and the queries: the model is loaded once.
    assert ray_head.logs(job).count(" loaded in ") == 1, ray_head.logs(job)[-3000:]

    spec = resolve_model(str(small_standin_dir))
    prefix = prompt_prefix(spec, AppArgs(), prompt_name="query")
    assert prefix.startswith("Instruct: ")  # Qwen3's query instruction, as the service adds it
    model = TextEmbedder(spec, dtype="float32")
    corpus = {row: model.encode([docs[row]]).vectors[0] for row in (0, 2, 3)}  # the blank has none
    hits = pq.read_table(output).to_pandas()
    assert hits["q"].tolist() == ["forgot my password"] * 3 + ["when is rent due"] * 3 + [""]
    for query in queries[:2]:
        vector = model.encode([prefix + query]).vectors[0]
        mine = hits[hits["q"] == query]
        expected = sorted(((float(vector @ v), row) for row, v in corpus.items()), reverse=True)
        assert mine["corpus_row"].tolist() == [row for _, row in expected]
        np.testing.assert_allclose(mine["score"].to_numpy(), [score for score, _ in expected], atol=1e-4)


def test_a_folder_whose_files_disagree_on_types_is_scored_and_rerun_into_itself(ray_head, tmp_path):
    # Exports of one table: an all-blank column in one file, an id column that holds
    # text in another, the columns in another order. The job failed on both commands
    # ("Field id has incompatible types: int64 vs string").
    folder = tmp_path / "exports"
    folder.mkdir()
    (folder / "a.csv").write_text("id,notes,question,doc\n1,,How do I reset my password?,Steps to reset a forgotten password\n")
    (folder / "b.csv").write_text("doc,question,id,notes\nRent is due on the first day.,when is rent due,A7,urgent\n")
    output = folder / "scored.csv"  # inside the input folder
    for _ in range(2):  # the second run must not read the first one's output as input
        job = ray_head.submit("similarity", "--input", str(folder), "--left", "question",
                              "--right", "doc", "--output", str(output))
        assert ray_head.wait(job) == "SUCCEEDED", ray_head.logs(job)[-3000:]
        scored = pd.read_csv(output, dtype=str, keep_default_na=False)
        assert list(scored.columns) == ["id", "notes", "question", "doc", "similarity"]
        assert scored["id"].tolist() == ["1", "A7"] and scored["notes"].tolist() == ["", "urgent"]
        assert all(float(s) > 0.5 for s in scored["similarity"])


def test_a_parquet_folder_keeps_a_column_its_first_file_lacks_when_its_vectors_are_left_out(ray_head, tmp_path):
    # Asking Ray Data's reader for the columns left after the vectors kept only those of the
    # folder's first file: `notes` came out blank in every row.
    folder = tmp_path / "parts"
    folder.mkdir()
    pq.write_table(pa.table({"question": ["How do I reset my password?"],
                             "doc": ["Steps to reset a forgotten password"]}), folder / "a.parquet")
    pq.write_table(pa.table({"question": ["when is rent due"], "doc": ["Rent is due on the first day."],
                             "notes": ["urgent"], "embedding": pa.array([[0.5, 0.5]], type=pa.list_(pa.float32()))}),
                   folder / "b.parquet")
    output = tmp_path / "scored.csv"
    job = ray_head.submit("similarity", "--input", str(folder), "--left", "question", "--right", "doc",
                          "--output", str(output))
    assert ray_head.wait(job) == "SUCCEEDED", ray_head.logs(job)[-3000:]
    scored = pd.read_csv(output, dtype=str, keep_default_na=False)
    assert list(scored.columns) == ["question", "doc", "notes", "similarity"]
    assert scored["notes"].tolist() == ["", "urgent"]


def test_empty_inputs_give_every_column(ray_head, tmp_path):
    # A corpus with no rows: every query keeps a row with no match (it failed with
    # KeyError: 'Field "embedding" does not exist').
    (tmp_path / "corpus.csv").write_text("id,doc\n")
    (tmp_path / "q.csv").write_text("q\nforgot my password\n")
    output = tmp_path / "hits.csv"
    job = ray_head.submit("search", "--queries", str(tmp_path / "q.csv"), "--query-column", "q",
                          "--corpus", str(tmp_path / "corpus.csv"), "--corpus-column", "doc",
                          "--output", str(output))
    assert ray_head.wait(job) == "SUCCEEDED", ray_head.logs(job)[-3000:]
    hits = pd.read_csv(output)
    assert list(hits.columns) == ["q", "rank", "score", "corpus_row", "corpus_id", "corpus_doc"]
    assert hits["q"].tolist() == ["forgot my password"] and pd.isna(hits["rank"][0])

    # An embed of a table with no rows keeps its columns (it wrote `embedding` alone).
    embedded = tmp_path / "embedded.parquet"
    job = ray_head.submit("embed", "--input", str(tmp_path / "corpus.csv"), "--column", "doc",
                          "--output", str(embedded))
    assert ray_head.wait(job) == "SUCCEEDED", ray_head.logs(job)[-3000:]
    table = pq.read_table(embedded)
    assert table.column_names == ["id", "doc", "embedding"] and table.num_rows == 0


def test_missing_column_fails_with_the_columns_it_has_and_writes_nothing(ray_head, tmp_path):
    rows_frame().to_csv(tmp_path / "rows.csv", index=False)
    output = tmp_path / "never.parquet"
    job = ray_head.submit("embed", "--input", str(tmp_path / "rows.csv"), "--column", "Question",
                          "--output", str(output))
    assert ray_head.wait(job, timeout_s=120) == "FAILED"
    logs = ray_head.logs(job)
    assert "rows.csv has no column 'Question'. Its columns are: 'id', 'question', 'doc'." in logs
    assert "Traceback" not in logs
    assert list(tmp_path.iterdir()) == [tmp_path / "rows.csv"]


def test_a_model_that_overflows_in_float16_fails_the_job_with_the_sentence_and_writes_nothing(
    ray_head, tmp_path, overflowing_standin_dir,
):
    rows_frame().to_csv(tmp_path / "rows.csv", index=False)
    output = tmp_path / "out" / "embedded.parquet"
    job = ray_head.submit("embed", "--input", str(tmp_path / "rows.csv"), "--column", "question",
                          "--output", str(output), model=str(overflowing_standin_dir),
                          dtype="float16")
    assert ray_head.wait(job, timeout_s=180) == "FAILED"
    logs = ray_head.logs(job)
    assert "error: The model gave inf or NaN values for 5 texts, running in float16 on cpu:" in logs, (
        logs[-3000:])
    assert not output.exists() and not list(output.parent.glob("*"))


def test_an_actors_batch_goes_to_both_forward_workers_in_one_call_and_keeps_its_order(bundled_spec):
    # On a CPU, as in the replica: one pass on both cores left them idle at every thread
    # barrier (15-17% fewer rows a second than two workers of one core each).
    from dataclasses import asdict

    from serve_app.batch.actors import CUT_COLUMN, EmbedRows
    from serve_app.core.config import AppArgs

    sys.path.insert(0, str(REPO / "bench"))
    from corpus import sentences

    args = AppArgs(cpu_threads=2, dtype="float32").model_dump()
    actor = EmbedRows(args, asdict(bundled_spec), gpu_fraction=0.0)
    texts = sentences(64, seed=9)
    vectors = asyncio.run(actor.encode(texts))
    assert actor.scheduler.passes_by_worker == [1, 1]
    alone = np.stack([asyncio.run(actor.encode([text]))[0] for text in texts[:8]])
    np.testing.assert_allclose(vectors[:8], alone, atol=1e-4)  # row i is text i's
    assert actor.scheduler.passes_by_worker == [9, 1]  # one text: worker 0 alone
    # A similarity's two columns go in one call, so one pass for each worker.
    pairs = pa.table({"q": texts[:16], "d": texts[16:32]})
    scores = asyncio.run(actor(pairs, "similarity", ["q", "d"], ["", ""]))["similarity"].to_numpy()
    assert actor.scheduler.passes_by_worker == [10, 2]
    np.testing.assert_allclose(scores, np.sum(vectors[:16] * vectors[16:32], axis=1), atol=1e-5)
    # Each row says how many of its texts were longer than the model reads (the driver counts them).
    long = "Rent is due on the first day of each month. " * 60
    pairs = pa.table({"q": [long, "short", None, long], "d": [long, "short", long, "short"]})
    cut = asyncio.run(actor(pairs, "similarity", ["q", "d"], ["", ""]))[CUT_COLUMN].to_pylist()
    assert cut == [2, 0, 1, 1]
    actor.scheduler.shutdown()


COUNTING_ACTOR = """
import json
from dataclasses import asdict

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy

from serve_app.batch.actors import EmbedRows
from serve_app.core.config import AppArgs
from serve_app.core.modelinfo import resolve_model


class Counting(EmbedRows):
    in_flight = most = 0

    async def __call__(self, batch, *args, **kwargs):
        Counting.in_flight += 1
        Counting.most = max(Counting.most, Counting.in_flight)
        try:
            out = await super().__call__(batch, *args, **kwargs)
        finally:
            Counting.in_flight -= 1
        return out.append_column("most", pa.array([Counting.most] * out.num_rows))


texts = json.load(open("texts.json"))
embedded = ray.data.from_arrow(pa.table({"row": list(range(len(texts))), "text": texts})).map_batches(
    Counting,
    fn_constructor_kwargs={"args": AppArgs(dtype="float32").model_dump(),
                           "spec": asdict(resolve_model("bundled:minilm", None)), "gpu_fraction": 0.0},
    fn_kwargs={"task": "embed", "columns": ["text"], "prefixes": [""]},
    batch_size=8, batch_format="pyarrow", compute=ActorPoolStrategy(size=1), num_cpus=1,
)
table = pa.concat_tables(ray.get(embedded.to_arrow_refs()))
print("RESULT " + json.dumps({"rows": table["row"].to_pylist(), "most": max(table["most"].to_pylist()),
                              "embedding": table["embedding"].to_pylist()}))
"""


def test_an_actor_is_given_several_batches_at_once_and_keeps_them_in_order(ray_head, tmp_path, bundled_embedder):
    # Its __call__ is a coroutine, so Ray Data hands it several batches at once on one event
    # loop and a worker goes on to the next batch instead of waiting at each batch's end.
    # A counting subclass, run as a job's driver (this process stays without Ray).
    texts = [f"clause {i}: the tenant pays the rent by the {i % 28 + 1}th" for i in range(64)]
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    (tmp_path / "counting.py").write_text(COUNTING_ACTOR)
    job = ray_head.client.submit_job(
        entrypoint="python counting.py",
        runtime_env={"working_dir": str(tmp_path), "env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}})
    assert ray_head.wait(job) == "SUCCEEDED", ray_head.logs(job)[-3000:]
    result = json.loads(next(line for line in ray_head.logs(job).splitlines()
                             if line.startswith("RESULT "))[len("RESULT "):])
    assert result["rows"] == list(range(64))
    assert result["most"] >= 2
    np.testing.assert_allclose(np.array(result["embedding"]), direct(bundled_embedder, texts), atol=1e-4)


def test_rows_keep_their_order_when_a_later_batch_finishes_first(ray_head, tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    from corpus import sentences

    # Two actors: the first block (four batches of 128: 512 distinct texts) takes seconds,
    # the next ones (one text repeated) a moment, so the second actor's blocks are done
    # first; their rows must still come after the first block's.
    texts = sentences(512, seed=5) + ["the same short text"] * 1024
    pd.DataFrame({"id": range(len(texts)), "text": texts}).to_csv(tmp_path / "rows.csv", index=False)
    output = tmp_path / "embedded.parquet"
    # Two actors of half a CPU each leave the 2-CPU head a CPU for the read tasks.
    config = tmp_path / "serve_config.yaml"
    config.write_text("applications:\n- args:\n    replica_cpus: 0.5\n    cpu_threads: 1\n")
    # Ray Data starts its actors without waiting for them; on a busy machine the first could
    # take every batch before the second is up, and the job would test nothing. Here the
    # pool waits for both before the first batch.
    job = ray_head.submit("embed", "--input", str(tmp_path / "rows.csv"), "--column", "text",
                          "--output", str(output), "--batch-size", "128", "--actors", "2",
                          "--config", str(config), env={"RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "120"})
    assert ray_head.wait(job) == "SUCCEEDED", ray_head.logs(job)[-3000:]
    logs = ray_head.logs(job)
    assert logs.count("Model bundled:minilm loaded in") == 2, logs[-3000:]  # both actors ran
    ids = pq.read_table(output, columns=["id"])["id"].to_pylist()
    assert ids == list(range(len(texts))), f"{len(ids)} rows, first out of place: {next((i for i, v in enumerate(ids) if v != i), None)}"


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_actors_holding_every_cpu_still_get_their_rows(ray_head, tmp_path, kind):
    # Two actors of one CPU each hold both of the head's CPUs; reading the input must not
    # wait for a CPU for ever (it did, for both), and a third actor that cannot start is
    # said, not waited for.
    rows = tmp_path / f"rows.{kind}"
    rows_frame().to_csv(rows, index=False) if kind == "csv" else rows_frame().to_parquet(rows)
    output = tmp_path / "embedded.parquet"
    job = ray_head.submit("embed", "--input", str(rows), "--column", "question",
                          "--output", str(output), "--actors", "3")
    assert ray_head.wait(job, timeout_s=120) == "SUCCEEDED", ray_head.logs(job)[-3000:]
    assert pq.read_table(output)["id"].to_pylist() == list(range(8))
    assert ("3 actors need 3 CPUs (1 each), and this cluster has 2 now. The job runs on the 2 "
            "that fit, and more start if nodes join.") in ray_head.logs(job)


@pytest.mark.parametrize("command", ["embed-csv", "similarity-parquet", "search-csv"])
def test_a_job_goes_in_blocks_of_four_batches_and_says_how_far_it_has_got_in_lines_of_its_own(
        ray_head, tmp_path, command):
    # Ray Data chose a file's blocks by their bytes (four of 100 rows here, four of 5,000
    # rows for a 20,000-row file of short texts), so a long job's progress moved in steps of
    # 5,000 rows. 400 rows in batches of 4: blocks of 16 rows at most, each said
    # (--progress-every 0) but the last. The embed reads a folder of 300 rows and 100: Ray
    # Data cuts every file into as many blocks as the others, so the longer file sets their
    # number (it had cut the 300 rows into blocks of 23).
    from serve_app.batch.actors import block_rows

    command, kind = command.split("-")
    n = 400 if command != "search" else 40
    frame = pd.DataFrame({"id": range(n), "text": [f"clause {i}: the tenant pays the rent" for i in range(n)],
                          "doc": [f"rent is due on day {i % 28 + 1}" for i in range(n)]})
    rows = tmp_path / f"rows.{kind}"
    if command == "embed":
        rows.mkdir()
        frame[:300].to_csv(rows / "a.csv", index=False)
        frame[300:].to_csv(rows / "b.csv", index=False)
    else:
        frame.to_csv(rows, index=False) if kind == "csv" else frame.to_parquet(rows)
    output = tmp_path / ("out.parquet" if command == "embed" else "out.csv")
    sides = {"embed": ["--input", str(rows), "--column", "text"],
             "similarity": ["--input", str(rows), "--left", "text", "--right", "doc"],
             "search": ["--queries", str(rows), "--query-column", "text", "--corpus", str(rows),
                        "--corpus-column", "doc", "--k", "1"]}[command]
    job = ray_head.submit(command, *sides, "--output", str(output), "--batch-size", "4", "--progress-every", "0")
    assert ray_head.wait(job) == "SUCCEEDED", ray_head.logs(job)[-3000:]
    said = re.findall(r"INFO (Embedded|Scored) ([\d,]+) of ([\d,]+) (\w+) \(\d+%\)", ray_head.logs(job))
    # The search embeds the corpus's 40 texts and the queries' 40 in one dataset.
    word, total, unit = {"embed": ("Embedded", 400, "rows"), "similarity": ("Scored", 400, "rows"),
                         "search": ("Embedded", 80, "texts")}[command]
    assert {(w, int(t), u) for w, _, t, u in said} == {(word, total, unit)}, said
    done = [0] + [int(n) for _, n, _, _ in said] + [total]
    block = block_rows(total, 4, 1)  # 16
    assert len(done) - 1 >= total // block, said
    assert all(0 < after - before <= block for before, after in itertools.pairwise(done)), said
    # Ray Data's own progress (nine lines every 10 s where the output is not a terminal, as
    # here) buried those lines, and so would its notice that it is off.
    logs = ray_head.logs(job)
    assert "Total Progress" not in logs and "Progress bars disabled" not in logs, logs[-3000:]
    if command != "search":
        written = pd.read_parquet(output) if command == "embed" else pd.read_csv(output)
        assert written["id"].tolist() == list(range(n))


def test_a_gpu_job_on_a_cluster_that_adds_gpu_nodes_grows_its_actors_as_they_join(tmp_path, tmp_path_factory):
    # cluster.yaml scales its GPU nodes from zero: a job submitted then found no GPU, sized
    # its pool at one actor, and kept it on a quarter of one GPU for the whole job. Here
    # Ray's fake autoscaler adds up to two nodes of one CPU and one (fake) GPU, each room
    # for one actor; the model runs on the CPU. The job is stopped once a second is up.
    head = RayHead(tmp_path_factory.mktemp("rg"), gpu_nodes=2)  # short: Unix socket paths have a limit
    try:
        rows = tmp_path / "rows.csv"
        pd.DataFrame({"text": [f"clause {i}: the tenant pays the rent on day {i % 28 + 1}"
                               for i in range(200_000)]}).to_csv(rows, index=False)  # never done first
        job = head.submit("embed", "--input", str(rows), "--column", "text", "--output",
                          str(tmp_path / "embedded.parquet"), "--gpu-fraction", "0.25", "--batch-size", "32",
                          # Ray Data asks the autoscaler for nodes every 10 s at most: every 1 s here.
                          # Ray may hold back a worker's line like one of the last 5 s (the
                          # other actor's "loaded") until another comes: every line is shown here.
                          env={"RAY_DATA_MIN_GAP_BETWEEN_AUTOSCALING_REQUESTS": "1", "RAY_DEDUP_LOGS": "0"})

        def actors_loaded() -> set[str]:
            logs = head.logs(job)
            assert head.status(job) in ("PENDING", "RUNNING"), logs[-3000:]
            loaded = set(re.findall(r"pid=(\d+)[^)]*\)\S* Model bundled:minilm loaded in", logs))
            return loaded if len(loaded) >= 2 else set()

        wait_for(actors_loaded, 240, "a second actor, on a GPU node that joined for the job", interval_s=1)
        logs = head.logs(job)
        assert ("Embedding with 1 actor to start, and more as the cluster's GPUs allow (up to 1,563), "
                "0.25 GPU each, 32 rows a batch") in logs, logs[-3000:]
        assert "1 actor needs 0.25 GPUs (0.25 each), and this cluster has 0 now. None can start" in logs
        head.client.stop_job(job)
    finally:
        head.stop()


def test_stopped_job_leaves_no_output(ray_head, tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    from corpus import sentences

    # A folder of sheets: Ray Data makes each one a block and hands them on in order, so
    # the small first sheet is written while the others are still being embedded.
    sheets = tmp_path / "sheets"
    sheets.mkdir()
    texts = sentences(40 + 9 * 1000, seed=3)
    parts = [texts[:40]] + [texts[40 + 1000 * i : 40 + 1000 * (i + 1)] for i in range(9)]
    for i, part in enumerate(parts):
        pd.DataFrame({"text": part}).to_excel(sheets / f"part-{i}.xlsx", index=False)
    output = tmp_path / "out" / "embedded.parquet"
    job = ray_head.submit("embed", "--input", str(sheets), "--column", "text",
                          "--output", str(output), "--batch-size", "32")

    def written() -> list[str]:
        assert ray_head.status(job) in ("PENDING", "RUNNING"), ray_head.logs(job)[-2000:]
        return sorted(p.name for p in output.parent.glob("*"))

    # The writer opens its temporary file when the first embedded rows come back.
    names = wait_for(written, 180, "the job to start writing its output")
    assert len(names) == 1 and names[0].startswith(".embedded.partial-"), names
    ray_head.client.stop_job(job)  # mid-way: part of the output written, the rest in flight
    assert ray_head.wait(job, timeout_s=60) == "STOPPED"
    # The driver removes its temporary file as it stops: nothing is left under any name.
    wait_for(lambda: list(output.parent.iterdir()) == [], 10, "the output folder to be left empty")
    assert "The job was stopped before it finished; no output was written." in ray_head.logs(job)


def test_a_job_on_a_ray_of_its_own_runs_with_rays_token_and_leaves_its_files_to_its_user(tmp_path):
    # Run as a user runs it on an office server: no RAY_AUTH_MODE (Ray 2.60 then turns its
    # token on; the actors' zygote, started before Ray, must carry it, or they are refused
    # and the job waits for them forever) and the usual umask 022. The job starts Ray's
    # daemons, which write the cluster token (with it anyone could run code as this
    # user), the session's files and the logs (which hold the texts of any error).
    home = tmp_path / "home"
    home.mkdir()
    source = tmp_path / "questions.csv"
    pd.DataFrame({"question": ["How do I reset my password?", "合同终止的条件是什么？"]}).to_csv(source, index=False)
    output = tmp_path / "out" / "embedded.parquet"  # in a folder the job makes
    with ray_of_its_own(home) as (env, ray_tmp):
        done = subprocess.run(
            [sys.executable, "-m", "serve_app.batch", "embed", "--model", BUNDLED, "--input", str(source),
             "--column", "question", "--output", str(output)],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=240,
            preexec_fn=lambda: os.umask(0o022),
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert pq.read_table(output).num_rows == 2
        # ... its actor forked from the zygote started before Ray, not started cold.
        assert "(forked from the warm-start process)" in done.stdout + done.stderr, done.stderr[-2000:]
        # The output, and the folder made for it, are the user's to share, as the umask says.
        assert stat.S_IMODE(output.stat().st_mode) == 0o644
        assert stat.S_IMODE(output.parent.stat().st_mode) == 0o755
        token = home / ".ray" / "auth_token"
        assert stat.S_IMODE(token.stat().st_mode) == 0o600
        readable = [
            str(path) for path in ray_tmp.rglob("*")
            if path.is_file() and not path.is_symlink() and path.stat().st_mode & 0o077
        ]
        assert readable == [], readable[:10]


def test_actors_that_cannot_start_on_a_ray_of_its_own_fail_the_job_with_the_fix_and_write_nothing(tmp_path):
    # The job waited for nodes to join, which never join the Ray it started itself.
    rows = tmp_path / "rows.csv"
    rows_frame().to_csv(rows, index=False)
    config = tmp_path / "serve_config.yaml"
    config.write_text("applications:\n- args:\n    replica_cpus: 4096\n")  # a server's setting, here
    output = tmp_path / "out" / "embedded.parquet"
    with ray_of_its_own(tmp_path) as (env, _):
        done = subprocess.run(
            [sys.executable, "-m", "serve_app.batch", "embed", "--model", BUNDLED, "--input", str(rows),
             "--column", "question", "--output", str(output), "--config", str(config)],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=180,
        )
    assert done.returncode == 2, done.stderr[-2000:]
    assert re.search(r"error: 1 actor needs 4096 CPUs \(4096 each\), and this machine has \d+ now, so none can "
                     r"start on the Ray this job started for itself: set replica_cpus \(in --config\) to \d+ or "
                     r"fewer\.\n", done.stderr), done.stderr[-2000:]
    assert not output.parent.exists()


@contextlib.contextmanager
def ray_of_its_own(home: Path):
    """The environment of a job run as a user runs it, with no cluster to join: it starts a
    Ray of its own, in a temp folder of its own; afterwards, whatever of that Ray is left
    (by a job that timed out: its processes name the folder; the zygote ends with the
    job's driver) is killed. Yields (environment, temp folder)."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Unix socket paths
    env = {**os.environ, "HOME": str(home), "RAY_TMPDIR": str(ray_tmp), "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_MODE", None)
    try:
        yield env, ray_tmp
    finally:
        for pid in processes_of(ray_tmp):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
