"""The batch job's table handling without Ray: cells, inputs, atomic output, top-k."""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv  # noqa: F401  (pa.csv)
import pyarrow.parquet  # noqa: F401  (pa.parquet)
import pytest
import ray

from serve_app.batch.__main__ import main
from serve_app.batch.csvfiles import csv_schema
from serve_app.batch.errors import STOPPED, JobInputError, JobStopped
from serve_app.batch.job import _arrow_safe
from serve_app.batch.output import atomic_output, write_table
from serve_app.batch.search import search_clashes, top_k
from serve_app.batch.sheets import read_xlsx, refuse_unsaved_formulas, sheet_header
from serve_app.batch.tables import (
    common_schema,
    conform,
    file_rows,
    input_files,
    output_format,
    require_columns,
    text_or_none,
)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("Refund policy", "Refund policy"),
        ("", None),
        ("  \t", None),
        (None, None),
        (math.nan, None),
        (pd.NA, None),
        (pd.NaT, None),
        (1024, "1024"),
        (1024.0, "1024"),
        (np.int64(7), "7"),
        (0.5, "0.5"),
        (True, "TRUE"),
        (dt.datetime(2024, 3, 1), "2024-03-01"),
        (pd.Timestamp("2024-03-01 14:30"), "2024-03-01 14:30:00"),
        ("合同", "合同"),
    ],
)
def test_cells_become_the_text_a_sheet_shows(value, text):
    assert text_or_none(value) == text


def test_input_files_from_a_folder_of_one_format(tmp_path):
    for name in ("b.csv", "a.csv", ".hidden.csv", "notes.txt"):
        (tmp_path / name).write_text("x\n1\n")
    files, fmt = input_files(tmp_path)
    assert [f.name for f in files] == ["a.csv", "b.csv"] and fmt == "csv"

    # A job writing into its input folder, run again, does not read its own output.
    (tmp_path / "scored.xlsx").write_bytes(b"")
    files, fmt = input_files(tmp_path, output=tmp_path / "scored.xlsx")
    assert [f.name for f in files] == ["a.csv", "b.csv"] and fmt == "csv"
    (tmp_path / "scored.xlsx").unlink()
    files, _ = input_files(tmp_path, output=tmp_path / "b.csv")
    assert [f.name for f in files] == ["a.csv"]

    (tmp_path / "c.parquet").write_bytes(b"")
    with pytest.raises(JobInputError, match="mixes formats"):
        input_files(tmp_path)
    with pytest.raises(JobInputError, match="does not exist"):
        input_files(tmp_path / "missing.csv")
    with pytest.raises(JobInputError, match=r"\.csv, \.xlsx, \.xlsm or \.parquet"):
        input_files(tmp_path / "notes.txt")


def test_a_csv_column_takes_the_type_its_whole_file_gives_it(tmp_path):
    # Ray Data's reader takes a file's types from its first megabyte; "A7" after that
    # failed the whole job.
    rows = tmp_path / "rows.csv"
    rows.write_text("id,text,amount\n" + "".join(f"{i},t{i},{i}\n" for i in range(200_000)) + "A7,last,\n")
    schema = csv_schema(rows, ["text"])
    assert schema.names == ["id", "text", "amount"]
    assert schema.types == [pa.string(), pa.string(), pa.int64()]


def test_a_csv_column_of_numbers_a_number_would_not_write_back_stays_text(tmp_path):
    # pyarrow read case numbers `00123` as 123 and a 20-digit account number as a float
    # with its last digits gone; a job's output held those in place of what the file had.
    rows = tmp_path / "rows.csv"
    rows.write_text(
        "case,account,amount,tiny,count,hex,signed,text\n"
        + "".join(f"{i:05d},{10**19 + i},{i}.50,{i}e-05,{i},{i},{i},t{i}\n" for i in range(1, 40_000))
        + "99999,1,NA,1.5E-3, 7 ,0x10,+5,last\n")
    assert rows.stat().st_size > 1 << 20  # past the first block, which alone is inferred first
    schema = csv_schema(rows, ["text"])
    assert dict(zip(schema.names, schema.types, strict=True)) == {
        "case": pa.string(), "account": pa.string(),
        "amount": pa.float64(), "tiny": pa.float64(), "count": pa.int64(),  # as numbers write them
        "hex": pa.string(), "signed": pa.string(), "text": pa.string()}
    # A leading zero after 200,000 plain numbers is found too; 15 digits still fit a number.
    rows.write_text("n,m,text\n" + "".join(f"{i},{10**14 + i},t\n" for i in range(200_000)) + "0042,1,t\n")
    assert csv_schema(rows, ["text"]).types == [pa.string(), pa.int64(), pa.string()]


def test_files_that_disagree_on_a_column_type_share_one_schema():
    first = pa.schema([("id", pa.int64()), ("notes", pa.null()), ("score", pa.int64()),
                       ("when", pa.date32())])
    second = pa.schema([("when", pa.string()), ("score", pa.float64()), ("id", pa.string()),
                        ("notes", pa.string()), ("extra", pa.null())])
    schema = common_schema([first, second])
    assert schema.names == ["id", "notes", "score", "when", "extra"]
    assert schema.types == [pa.string(), pa.string(), pa.float64(), pa.string(), pa.string()]
    agreeing = pa.schema([("id", pa.int64()), ("when", pa.date32())])
    assert common_schema([agreeing, agreeing]) == agreeing  # files that agree keep their types

    # Each file's rows are then laid out as that schema: its order, its types, nulls
    # for a column the file lacks.
    table = pa.table({"score": [2], "id": [7], "notes": pa.nulls(1), "when": [dt.date(2024, 3, 1)]})
    laid_out = conform(table, schema)
    assert laid_out.schema == schema
    assert laid_out.to_pylist() == [{"id": "7", "notes": None, "score": 2.0, "when": "2024-03-01",
                                     "extra": None}]


def test_output_format_by_extension():
    assert output_format("/x/out.XLSX", ("csv", "xlsx")) == "xlsx"
    with pytest.raises(JobInputError, match=r"must end in \.parquet"):
        output_format("/x/out.csv", ("parquet",))


def macro_workbook(path: Path, frame: pd.DataFrame) -> Path:
    """An .xlsm as Excel saves one: the workbook part of the macro-enabled content type."""
    import zipfile

    plain = path.with_suffix(".xlsx")
    frame.to_excel(plain, index=False)
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "[Content_Types].xml":
                data = data.replace(b"application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml",
                                    b"application/vnd.ms-excel.sheet.macroEnabled.main+xml")
                assert b"macroEnabled" in data
            target.writestr(item, data)
    plain.unlink()
    return path


def test_a_macro_enabled_workbook_is_read_and_an_xlsm_output_refused(tmp_path, monkeypatch, capsys):
    # xlwings users keep their workbooks as .xlsm: "input files must end in .csv, .xlsx or .parquet".
    book = macro_workbook(tmp_path / "cases.xlsm", pd.DataFrame({"question": ["合同终止", "007"], "doc": ["a", "b"]}))
    files, fmt = input_files(book)
    assert (files, fmt) == ([book], "xlsx")
    assert require_columns(files, fmt, ["question"]) == ["question", "doc"]
    assert read_xlsx(book, None)["question"].tolist() == ["合同终止", "007"]
    assert input_files(tmp_path) == ([book], "xlsx")  # and in a folder
    assert refused_before_ray(similarity(book, tmp_path / "scored.xlsm"), monkeypatch, capsys) == (
        f"The output {tmp_path / 'scored.xlsm'} must end in .csv, .xlsx, .parquet (the output holds no macros).")


def test_missing_column_lists_the_columns_and_unreadable_file_is_named(tmp_path):
    pd.DataFrame({"Frage": ["a"], "Antwort": ["b"]}).to_excel(tmp_path / "s.xlsx", index=False)
    with pytest.raises(JobInputError) as err:
        require_columns([tmp_path / "s.xlsx"], "xlsx", ["question"])
    assert str(err.value) == ("s.xlsx has no column 'question' on its sheet 'Sheet1'. "
                              "Its columns are: 'Frage', 'Antwort'.")
    with pytest.raises(JobInputError, match="no sheet 'Other'. Its sheets are: 'Sheet1'"):
        require_columns([tmp_path / "s.xlsx"], "xlsx", ["Frage"], sheet="Other")

    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(JobInputError, match=r"Cannot read .*broken\.parquet as PARQUET"):
        require_columns([broken], "parquet", ["x"])


def test_atomic_output_renames_on_success_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.csv"
    with pytest.raises(RuntimeError), atomic_output(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []

    target.write_text("old")
    with atomic_output(target) as temporary:
        assert temporary.parent == tmp_path and temporary.suffix == ".csv"
        temporary.write_text("new")
        assert target.read_text() == "old"  # untouched until the block succeeds
    assert target.read_text() == "new"
    assert list(tmp_path.iterdir()) == [target]


def test_sigterm_removes_the_temporary_file_and_says_so_before_anything_unwinds(tmp_path, capfd):
    # Ray sends SIGKILL 3 s after SIGTERM; unwinding a Ray Data pipeline may take longer,
    # so the file must be gone, and the sentence printed, when the signal arrives.
    target = tmp_path / "out.parquet"
    before = signal.getsignal(signal.SIGTERM)  # the default, or Ray's where a test started Ray here
    with pytest.raises(JobStopped), atomic_output(target) as temporary:
        open_writer = temporary.open("wb")
        open_writer.write(b"half")
        try:
            signal.raise_signal(signal.SIGTERM)
        except JobStopped:
            assert list(tmp_path.iterdir()) == []  # before any finally ran
            assert f"error: {STOPPED}" in capfd.readouterr().err
            raise
        finally:
            open_writer.close()
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back


def test_top_k_orders_matches_and_keeps_blank_queries():
    unit = np.eye(3, dtype=np.float32)
    corpus = pa.table({"doc": ["x", "blank", "y", "z"], "embedding": [[1.0], [2.0], [3.0], [4.0]]})  # an embed job's
    corpus_vectors = pa.array([unit[0], None, unit[1], (unit[0] + unit[1]) / np.sqrt(2)],
                              type=pa.list_(pa.float32()))
    queries = pa.table({"q": ["near x", "empty"]})
    out = top_k(queries, pa.array([unit[0], None], type=pa.list_(pa.float32())), corpus, corpus_vectors,
                k=2).to_pydict()
    assert list(out) == ["q", "rank", "score", "corpus_row", "corpus_doc", "corpus_embedding"]
    assert out["corpus_embedding"] == [[1.0], [4.0], None]  # passed through, not the search's vectors
    assert out["q"] == ["near x", "near x", "empty"]
    assert out["corpus_doc"] == ["x", "z", None]
    assert out["corpus_row"] == [0, 3, None]
    assert out["rank"] == [1, 2, None]
    assert out["score"][0] == pytest.approx(1.0) and out["score"][1] == pytest.approx(0.7071, abs=1e-4)


def test_a_searchs_vectors_become_one_matrix_without_their_nulls_however_arrow_holds_them():
    from serve_app.batch.search import as_matrix

    kind = pa.list_(pa.float32())
    vectors = pa.array([[1, 2], None, [3, 4], [5, 6]], type=kind)
    rows, matrix = as_matrix(vectors)
    assert rows.tolist() == [0, 2, 3] and matrix.tolist() == [[1, 2], [3, 4], [5, 6]]
    rows, matrix = as_matrix(vectors.slice(1, 2))  # a slice: its offset counts
    assert rows.tolist() == [1] and matrix.tolist() == [[3, 4]]
    rows, matrix = as_matrix(pa.chunked_array([vectors.slice(0, 2), vectors.slice(2)]))
    assert rows.tolist() == [0, 2, 3] and matrix.dtype == np.float32 and matrix.shape == (3, 2)
    # A null may hold values behind it in another writer's file; they are not a vector.
    backed = pa.ListArray.from_arrays(pa.array([0, 2, 4, 6], pa.int32()), pa.array([1, 2, 9, 9, 3, 4], pa.float32()),
                                      mask=pa.array([False, True, False]))
    rows, matrix = as_matrix(backed)
    assert rows.tolist() == [0, 2] and matrix.tolist() == [[1, 2], [3, 4]]
    rows, matrix = as_matrix(pa.array([None, None], type=kind))
    assert rows.tolist() == [] and matrix.shape == (0, 1)
    # Two files' vectors of 4 and 8 numbers: flattened, they folded into two rows of 6.
    with pytest.raises(ValueError, match=r"vectors of two lengths \(4 and 8\)"):
        as_matrix(pa.chunked_array([pa.array([[1, 2, 3, 4]], type=kind), pa.array([list(range(5, 13))], type=kind)]))


def test_command_line_errors_are_sentences_not_tracebacks(tmp_path, capsys):
    pd.DataFrame({"text": ["a"]}).to_csv(tmp_path / "in.csv", index=False)
    code = main(["embed", "--input", str(tmp_path / "in.csv"), "--column", "text",
                 "--output", str(tmp_path / "out.csv"), "--model", "bundled:minilm"])
    assert code == 2
    assert capsys.readouterr().err.strip().endswith("must end in .parquet.")

    code = main(["embed", "--input", str(tmp_path / "in.csv"), "--column", "text",
                 "--output", str(tmp_path / "o.parquet"), "--model", "/nowhere/model"])
    err = capsys.readouterr().err
    assert code == 2 and "/nowhere/model" in err and "bundled:minilm" in err
    assert list(tmp_path.iterdir()) == [tmp_path / "in.csv"]


def test_a_hub_model_whose_weights_cannot_be_got_stops_the_job_before_ray(
        tmp_path, monkeypatch, capsys, hub_cache, tiny_qwen3_dir):
    hub_cache("acme/tiny-qwen3", "f" * 40, tiny_qwen3_dir, skip=["*.safetensors"])
    pd.DataFrame({"text": ["a"]}).to_csv(tmp_path / "in.csv", index=False)
    err = refused_before_ray(["embed", "--input", str(tmp_path / "in.csv"), "--column", "text",
                              "--output", str(tmp_path / "o.parquet"), "--model", "acme/tiny-qwen3"],
                             monkeypatch, capsys)
    assert "Cannot load model 'acme/tiny-qwen3' at revision ffffffffffff" in err
    assert "lacks its weights (model.safetensors)" in err
    assert sorted(tmp_path.iterdir()) == [tmp_path / "hub", tmp_path / "in.csv"]


def test_a_job_fetches_a_hub_model_under_the_users_umask_and_starts_ray_under_077(
        tmp_path, hub_cache, fake_hub, tiny_qwen3_dir):
    # A hub cache may be shared (HF_HOME for a team, a service account): the files a job
    # fetches keep the user's umask; only what the job starts for Ray is this user's alone.
    import stat
    import subprocess
    import sys

    fake_hub.serve("acme/tiny-qwen3", "f" * 40, tiny_qwen3_dir)
    pd.DataFrame({"text": ["a"]}).to_csv(tmp_path / "in.csv", index=False)
    code = (
        "import os, sys\n"
        "import serve_app.batch.__main__ as batch\n"
        "def on_ray(opts, output, job):\n"
        "    umask = os.umask(0o077)\n"
        "    print(f'Ray part under umask {umask:o}')\n"
        "    return 0, output, {'ray_start_s': 0.0, 'work_s': 1.0}\n"
        "batch._on_ray = on_ray\n"
        "sys.exit(batch.main(sys.argv[1:]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "embed", "--input", str(tmp_path / "in.csv"), "--column", "text",
         "--output", str(tmp_path / "o.parquet"), "--model", "acme/tiny-qwen3"],
        env=hub_cache.env(fake_hub), capture_output=True, text=True, timeout=120,
        preexec_fn=lambda: os.umask(0o022),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Ray part under umask 77" in done.stdout
    fetched = list(hub_cache.root.rglob("*"))  # snapshots' links to blobs, the blobs, the folders
    assert any(p.name == "model.safetensors" for p in fetched)
    # (huggingface_hub writes its own tree listings 0600, whatever the umask.)
    private = [str(p) for p in fetched if not stat.S_IMODE(p.stat().st_mode) & 0o044 and "trees" not in p.parts]
    assert private == [], private[:5]


def test_a_model_named_on_the_command_line_drops_the_configs_revision(tmp_path):
    from serve_app.batch.__main__ import parser, settings

    config = tmp_path / "serve_config.yaml"
    config.write_text('applications: [{args: {model: acme/x, model_revision: "%s"}}]\n' % ("a" * 40))
    job = ["embed", "--input", "in.csv", "--column", "t", "--output", "o.parquet",
           "--config", str(config)]
    assert settings(parser().parse_args(job)).model_revision == "a" * 40
    assert settings(parser().parse_args([*job, "--model", "acme/y"])).model_revision is None
    named = [*job, "--model", "acme/y", "--model-revision", "b" * 40]
    assert settings(parser().parse_args(named)).model_revision == "b" * 40


def test_actors_the_cluster_cannot_hold_are_said_with_how_many_start(monkeypatch, caplog):
    import logging

    import ray

    from serve_app.batch import actors
    from serve_app.batch.actors import _say_if_the_actors_do_not_fit

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})  # no GPU node yet
    monkeypatch.setattr(actors, "_ray_of_its_own", lambda: False)  # a cluster: nodes may join
    with caplog.at_level(logging.WARNING, logger="serve_app.batch.actors"):
        _say_if_the_actors_do_not_fit(2, 1.0, 0.0)  # fits: nothing said
        assert caplog.text == ""
        _say_if_the_actors_do_not_fit(4, 1.0, 0.25)
        _say_if_the_actors_do_not_fit(1, 1.0, 0.25)  # a pool that grows starts at one
    assert caplog.messages == [
        "4 actors need 4 CPUs (1 each), and this cluster has 2 now; 1 GPU (0.25 each), and this "
        "cluster has 0 now. None can start until nodes join: on a cluster that adds none, stop "
        "the job (Ctrl-C or ray job stop).",
        "1 actor needs 0.25 GPUs (0.25 each), and this cluster has 0 now. None can start until "
        "nodes join: on a cluster that adds none, stop the job (Ctrl-C or ray job stop)."]


@pytest.mark.parametrize(("gpu_fraction", "given", "own_ray", "pool"), [
    (0.25, None, False, (1, 157)),  # a cluster: those that fit now, then up to one a block (of 128 rows)
    (0.25, 2, False, (2, 2)),       # --actors: as given
    (0.25, None, True, (1, 1)),     # a Ray the job started for itself: no node joins
    (0.0, None, False, (1, 1)),     # CPUs: one a node, each on every core of it
])
def test_a_gpu_jobs_actors_grow_on_a_cluster_unless_given(monkeypatch, gpu_fraction, given, own_ray, pool):
    # One actor fits now; the dataset is a stand-in that keeps what the pool was asked for.
    from conftest import MapBatchesRecorder

    from serve_app.batch import actors
    from serve_app.core.config import AppArgs
    from serve_app.core.modelinfo import resolve_model

    monkeypatch.setattr(actors, "_ray_of_its_own", lambda: own_ray)
    monkeypatch.setattr(actors, "_default_actors", lambda fraction: 1)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "GPU": 1.0})
    job = actors.JobOptions(args=AppArgs(), spec=resolve_model("bundled:minilm"), actors=given, batch_size=32)
    job._placement = (gpu_fraction, None)
    compute = actors.embed_rows(MapBatchesRecorder(), job, "embed", ["text"], [""], rows=20_000).kwargs["compute"]
    assert (compute.min_size, compute.max_size) == pool


def test_actors_that_cannot_start_on_a_ray_the_job_started_for_itself_fail_it_with_the_fix(monkeypatch, caplog):
    # No node joins such a Ray: the job waited for ever, with a line saying to stop it.
    import logging

    import ray

    from serve_app.batch import actors

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})  # a laptop, no GPU
    monkeypatch.setattr(actors, "_ray_of_its_own", lambda: True)
    with pytest.raises(JobInputError) as gpu:
        actors._say_if_the_actors_do_not_fit(1, 1.0, 0.5)  # --gpu-fraction 0.5
    assert str(gpu.value) == (
        "1 actor needs 0.5 GPUs (0.5 each), and this machine has 0 now, so none can start on the "
        "Ray this job started for itself: run it with --gpu-fraction 0 to embed on this machine's "
        "CPU, or submit it to a cluster with GPUs (ray job submit).")
    with pytest.raises(JobInputError, match=r"^2 actors need 16 CPUs \(8 each\), and this machine has 2 now, "
                                            r"so none .*: set replica_cpus \(in --config\) to 2 or fewer\.$"):
        actors._say_if_the_actors_do_not_fit(2, 8.0, 0.0)
    with caplog.at_level(logging.WARNING, logger="serve_app.batch.actors"):
        actors._say_if_the_actors_do_not_fit(3, 1.0, 0.0)  # 2 of 3 fit: the job runs on them
    assert caplog.messages == ["3 actors need 3 CPUs (1 each), and this cluster has 2 now. The job "
                               "runs on the 2 that fit."]  # no "more start if nodes join": none join


def test_a_value_error_inside_a_ray_task_keeps_its_traceback_and_ours_are_sentences():
    from ray.exceptions import RayTaskError

    from serve_app.batch.__main__ import _a_bug_in_a_task
    from serve_app.core.errors import ModelOutputError

    def from_an_actor(error):
        return RayTaskError("EmbedRows.__call__", "Traceback ...", error).as_instanceof_cause()

    assert _a_bug_in_a_task(from_an_actor(ValueError("a bug")))
    assert not _a_bug_in_a_task(from_an_actor(ModelOutputError.not_finite([0], "float16", "cpu")))
    assert not _a_bug_in_a_task(ValueError("--dimensions must be between 32 and 384"))


def test_the_last_line_groups_the_thousands_as_the_progress_lines_do():
    # The progress said "Scored 6,000 of 20,000 rows" and the last line "Wrote 20000 rows".
    from serve_app.batch.__main__ import parser, summary

    timing = {"work_s": 1012.4, "ray_start_s": 0.0, "left_out": [], "texts_cut": 1234, "max_tokens": 8192}
    embed = parser().parse_args(["embed", "--input", "q.csv", "--column", "q", "--output", "/h/q.parquet"])
    assert summary(embed, 200_000, "/h/q.parquet", timing) == (
        "Wrote 200,000 rows to /h/q.parquet: Ray start-up 0.0 s, embedding and writing 1012.4 s (197.6 rows/s). "
        "1,234 texts were longer than the model reads (8,192 tokens): only the start of each was embedded.")
    search = parser().parse_args(["search", "--queries", "q.csv", "--query-column", "q", "--corpus", "c.csv",
                                  "--corpus-column", "d", "--k", "3", "--output", "/h/hits.csv"])
    timing.update(work_s=34.3, texts_cut=0, queries=5_000, corpus=120_000, corpus_embedded=120_000)
    assert summary(search, 15_000, "/h/hits.csv", timing) == (
        "Wrote 15,000 rows to /h/hits.csv (the 3 best of 120,000 corpus rows for each of 5,000 queries): "
        "Ray start-up 0.0 s, embedding and searching 34.3 s (125,000 rows embedded, 3,644.3 rows/s).")


def test_repeated_or_clashing_column_names_are_refused_before_any_work(tmp_path):
    # Columns are matched by name across a folder's files: two with one name (trailing
    # commas make nameless ones) failed the job part way with KeyError.
    nameless = tmp_path / "nameless.csv"
    nameless.write_text("text,n,,\nhello,1,,\n")
    with pytest.raises(JobInputError, match="more than one column named one with no name"):
        require_columns([nameless], "csv", ["text"])
    twice = tmp_path / "twice.csv"
    twice.write_text("note,text,note\n1,hello,x\n")
    with pytest.raises(JobInputError, match="more than one column named 'note'"):
        require_columns([twice], "csv", ["text"])
    embedded = tmp_path / "embedded.parquet"
    pa.parquet.write_table(pa.table({"text": ["a"], "embedding": [[0.1, 0.2]]}), embedded)
    with pytest.raises(JobInputError, match="already has a column 'embedding', the one this job adds"):
        require_columns([embedded], "parquet", ["text"], adds="embedding")


def test_a_search_whose_output_would_repeat_a_column_name_is_refused_before_any_work(tmp_path, capsys):
    # A corpus column 'row' became a second 'corpus_row' beside the search's own, and a
    # query column 'score' a second 'score': a CSV with two headers of one name, which
    # pandas reads as score / score.1.
    (tmp_path / "corpus.csv").write_text("row,doc\n7,Steps to reset a password\n")
    (tmp_path / "q.csv").write_text("q,score\nforgot my password,3\n")
    search = ["search", "--query-column", "q", "--corpus", str(tmp_path / "corpus.csv"),
              "--corpus-column", "doc", "--output", str(tmp_path / "hits.csv"), "--model", "bundled:minilm"]
    assert main([*search, "--queries", str(tmp_path / "q.csv")]) == 2
    err = capsys.readouterr().err
    assert "two columns named 'score' (the queries' column and the search's own)" in err, err
    assert "two columns named 'corpus_row' (the search's own and the corpus's column 'row')" in err, err
    assert not (tmp_path / "hits.csv").exists()

    assert search_clashes(["q"], ["row", "doc"]) == [
        "two columns named 'corpus_row' (the search's own and the corpus's column 'row')"]
    assert search_clashes(["corpus_doc", "rank"], ["doc"]) == [
        "two columns named 'corpus_doc' (the queries' column and the corpus's column 'doc')",
        "two columns named 'rank' (the queries' column and the search's own)"]
    assert search_clashes(["q", "id"], ["id", "doc"]) == []  # corpus_id is not id


def test_whole_numbers_of_two_widths_keep_whole_numbers():
    # int32 in one Parquet file, int64 in another: float64 would not hold ids above 2**53.
    schema = common_schema([pa.schema([("id", pa.int32())]), pa.schema([("id", pa.int64())])])
    assert schema.types == [pa.int64()]


def test_a_column_that_is_text_from_the_start_is_not_read_through(tmp_path, monkeypatch):
    rows = tmp_path / "rows.csv"
    rows.write_text("body,n\n" + "".join(f"long text {i},{i}\n" for i in range(50)))
    converted, read_csv = [], pa.csv.read_csv
    monkeypatch.setattr(pa.csv, "read_csv", lambda *args, **kwargs: converted.append(
        kwargs["convert_options"].include_columns) or read_csv(*args, **kwargs))
    assert csv_schema(rows, ["title"]).types == [pa.string(), pa.int64()]
    # Only the column of numbers is read through the whole file (typed, then as written).
    assert converted == [["n"], ["n"]]


# --- what office files hold: line breaks in cells, encodings, separators, odd sheets -----


def refused_before_ray(argv: list[str], monkeypatch, capsys) -> str:
    """The sentence a command ends with, failing before Ray starts."""

    def no_ray(*_args, **_kwargs):
        raise AssertionError("Ray was started: the input should have been refused before")

    monkeypatch.setattr(ray, "init", no_ray)
    code = main(argv if "--model" in argv else [*argv, "--model", "bundled:minilm"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    return err.strip().removeprefix("error: ")


def similarity(rows, output) -> list[str]:
    return ["similarity", "--input", str(rows), "--left", "question", "--right", "doc", "--output", str(output)]


def test_a_csv_cell_with_line_breaks_is_read_past_the_first_megabyte(tmp_path):
    # Alt+Enter in an Excel cell: pyarrow cut its 1 MB blocks inside the quotes and failed
    # the file ("CSV parse error: Expected 2 columns, got 1").
    rows = tmp_path / "rows.csv"
    rows.write_text("id,question\n" + "".join(f'{i},"first line {i}\nsecond line"\n' for i in range(60_000)))
    assert rows.stat().st_size > 1 << 20
    assert require_columns([rows], "csv", ["question"]) == ["id", "question"]
    assert csv_schema(rows, ["question"]).types == [pa.int64(), pa.string()]


def test_a_csv_that_is_not_utf8_is_refused_before_ray_naming_the_byte_and_row(tmp_path, monkeypatch, capsys):
    # A Windows "ANSI" export passed the check and failed a Ray read task, or came out as bytes.
    rows = tmp_path / "rows.csv"
    rows.write_bytes(b"question,doc\n" + b"tea,leaves\n" * 3 + b"caf\xe9 au lait,milk\n")
    assert refused_before_ray(similarity(rows, tmp_path / "out.csv"), monkeypatch, capsys) == (
        "rows.csv is not UTF-8 text (byte 0xE9 in row 5, column 'question'): in Excel, save it as "
        "'CSV UTF-8 (Comma delimited)'; elsewhere, save it with the encoding UTF-8.")
    rows.write_bytes(b"question,caf\xe9\ntea,leaves\n")
    assert "rows.csv is not UTF-8 text (byte 0xE9 in its header)" in refused_before_ray(
        similarity(rows, tmp_path / "out.csv"), monkeypatch, capsys)
    assert list(tmp_path.iterdir()) == [rows]


def test_a_bad_row_far_down_a_text_only_csv_is_refused_before_ray_naming_its_row(tmp_path, monkeypatch, capsys):
    # Every column text: the check read only the first megabyte, and the job failed part way.
    rows = tmp_path / "rows.csv"
    rows.write_text("question,doc\n" + "q,d\n" * 300_000 + "q,d,a stray field\n")
    assert refused_before_ray(similarity(rows, tmp_path / "out.csv"), monkeypatch, capsys) == (
        "rows.csv has 3 fields in row 300002, where its header has 2 (the row begins 'q,d,a stray "
        "field'): put quotes around a value that holds a comma.")
    rows.write_text("question;doc\n" + "q;d\n" * 9 + "q\n")
    assert "rows.csv has 1 fields in row 11, where its header has 2 (the row begins 'q'): add the missing " \
        "fields" in refused_before_ray(similarity(rows, tmp_path / "out.csv"), monkeypatch, capsys)


def test_a_comma_csv_whose_header_holds_semicolons_is_read_with_commas(tmp_path):
    # The header alone would say semicolons (three against one); every row has one comma.
    rows = tmp_path / "rows.csv"
    rows.write_text("question,notes (a;b;c)\nhow do I reset,x; y\nrefunds,none\n")
    from serve_app.batch.csvfiles import csv_separator

    assert csv_separator(rows) == ","


def test_a_csvs_separator_is_found_once_for_all_the_checks_until_the_file_changes(tmp_path, monkeypatch):
    # The checks before Ray (columns, rows, every row's fields) and the schema each need it:
    # scanning the first 64 KB in Python four times per file added up over a folder.
    import serve_app.batch.csvfiles as csvfiles
    from serve_app.batch.tables import file_rows

    scans = []
    scan = csvfiles._separators_per_row
    monkeypatch.setattr(csvfiles, "_separators_per_row", lambda text: scans.append(1) or scan(text))
    rows = tmp_path / "rows.csv"
    rows.write_text("question;doc\n" + "how do I reset;x\n" * 50)
    assert require_columns([rows], "csv", ["question"]) == ["question", "doc"]
    assert file_rows([rows], "csv") == [50]
    assert csv_schema(rows, ["question"]).names == ["question", "doc"]
    assert len(scans) == 1
    rows.write_text("question,doc\n" + "how do I reset,x\n" * 50 + "refunds,y\n")  # saved again
    os.utime(rows, ns=(rows.stat().st_atime_ns, rows.stat().st_mtime_ns + 1_000_000))
    assert file_rows([rows], "csv") == [51]
    assert len(scans) == 2


@pytest.mark.parametrize(("separator", "name"), [(";", "semicolons"), ("\t", "tabs")])
def test_a_csv_separated_by_semicolons_or_tabs_is_read_with_them(tmp_path, separator, name):
    # Excel's exports where the decimal mark is a comma: "has no column 'question'. Its
    # columns are: 'question;doc'".
    rows = tmp_path / "rows.csv"
    rows.write_text(f'question{separator}doc{separator}"a, b"\nhow{separator}"x{separator} y"{separator}3,5\n')
    assert require_columns([rows], "csv", ["question", "doc"]) == ["question", "doc", "a, b"]
    assert csv_schema(rows, ["question"]).names == ["question", "doc", "a, b"]
    commas = tmp_path / "commas.csv"
    commas.write_text("question,doc;notes\nhow,x\n")  # a tie goes to the comma
    assert require_columns([commas], "csv", ["question"]) == ["question", "doc;notes"]

    from serve_app.batch.tables import file_rows

    with pytest.raises(JobInputError, match=f"separated differently \\(commas.csv by commas; rows.csv by {name}\\)"):
        file_rows([commas, rows], "csv")


def test_an_xlsx_keeps_text_that_pandas_would_make_blank(tmp_path):
    pd.DataFrame({"question": ["NA", "None", "null", "N/A", "nan", None], "n": [1, None, 3, 4, 5, 6]}).to_excel(
        tmp_path / "s.xlsx", index=False)
    frame = read_xlsx(tmp_path / "s.xlsx", None)
    assert frame["question"].tolist()[:5] == ["NA", "None", "null", "N/A", "nan"]
    assert pd.isna(frame["question"][5])  # an empty cell is still blank
    assert frame["n"].dtype == np.float64 and pd.isna(frame["n"][1])  # and numbers stay numbers


def test_an_xlsx_number_in_a_zero_padded_format_is_read_as_the_sheet_shows_it(tmp_path):
    # ZIP codes and case numbers are numbers formatted 00000: Excel shows 02134, the file
    # holds 2134, and the job read (and wrote back) 2134.
    import openpyxl

    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(["zip", "case", "n", "filed", "question", 7])
    sheet["F1"].number_format = "000"  # a header named as it shows: 007
    sheet.append([2134, 123, 1.5, dt.datetime(2024, 3, 1), "a", "x"])
    sheet.append([None, None, None, None, None])  # a blank row keeps its place
    sheet.append([90210, 4567, 2, dt.datetime(2024, 3, 2), "b"])
    sheet.append([501, "pending", 3, dt.datetime(2024, 3, 3), "c"])
    for cell in ("A2", "A5"):
        sheet[cell].number_format = "00000"
    sheet["B2"].number_format = "000-00-0000"
    sheet["D2"].number_format = "yyyy-mm-dd"
    book.save(tmp_path / "s.xlsx")

    frame = read_xlsx(tmp_path / "s.xlsx", None)
    assert list(frame.columns) == ["zip", "case", "n", "filed", "question", "007"]
    assert frame["zip"].tolist()[0] == "02134" and frame["zip"].tolist()[3] == "00501"
    assert pd.isna(frame["zip"][1]) and frame["zip"][2] == 90210  # General: the number
    assert frame["case"].tolist()[0] == "000-00-0123"
    assert frame["n"].dtype == np.float64  # other numbers stay numbers
    assert frame["filed"][0] == pd.Timestamp(2024, 3, 1)  # and dates dates
    table = pa.Table.from_pandas(_arrow_safe(frame, ["question"]), preserve_index=False)
    assert table["zip"].to_pylist() == ["02134", None, "90210", "00501"]  # a text column
    assert table["case"].to_pylist() == ["000-00-0123", None, "4567", "pending"]


def test_a_merged_xlsx_cell_is_read_into_every_row_it_covers(tmp_path, caplog):
    # A matter's name merged down the rows of its clauses shows in each of them, but the
    # file holds it in the top cell alone: the rows below were blank, with no score.
    import openpyxl

    book = openpyxl.Workbook()
    summary = book.active
    summary.title = "Summary"
    summary.append(["matter"])
    summary.merge_cells("A2:A9")  # another sheet's merges are not this one's
    sheet = book.create_sheet("Clauses")
    sheet.append(["matter", "clause", "standard", "notes", "fee"])
    sheet.append(["Lease 2024-17", "Tenant pays rent monthly", "Rent is due on the first", None, 250])
    sheet.append([None, "Tenant may end it on 30 days' notice", "Termination needs notice", "x", None])
    sheet.append([None, "Landlord repairs the roof", "Repairs are the landlord's", "y", 75])
    sheet.append(["Supply 88", "Goods arrive within 10 days", "Delivery deadline", "z", 90])
    sheet.append(["Section 2: penalties"])
    sheet.append([None, "Late delivery is penalised", "Penalties for delay", "w", 10])
    sheet.merge_cells("A2:A4")
    sheet.merge_cells("D1:D2")  # the header's: its data row stays blank
    sheet.merge_cells("E2:E3")  # a number, as a number
    sheet.merge_cells("A6:C6")  # across: a title over the columns stays in the first
    book.save(tmp_path / "s.xlsx")

    with caplog.at_level(logging.WARNING, logger="serve_app.batch.sheets"):
        frame = read_xlsx(tmp_path / "s.xlsx", "Clauses")
    assert frame["matter"].tolist()[:5] == ["Lease 2024-17"] * 3 + ["Supply 88", "Section 2: penalties"]
    assert pd.isna(frame["matter"][5]) and pd.isna(frame["clause"][4])  # not merged; across: the first only
    assert pd.isna(frame["notes"][0]) and frame["notes"].tolist()[1:4] == ["x", "y", "z"]
    assert frame["fee"].tolist()[:2] == [250, 250] and frame["fee"].dtype == np.float64
    assert caplog.messages == ["s.xlsx, sheet 'Clauses': the text of 2 merged cells (A2:A4, E2:E3) is read into "
                               "every row each one covers, as the sheet shows it."]
    assert read_xlsx(tmp_path / "s.xlsx", None)["matter"].isna().all()  # Summary's: no rows to fill


def saved_as_excel_would(path: Path, results: dict[str, bytes]) -> None:
    """`path`, rewritten with the results Excel saves beside formulas (`<v>...</v>`, text
    marked `t="str"`) for the cells `results` names; openpyxl saves none."""
    import re
    import zipfile

    with zipfile.ZipFile(path) as book:
        parts = {name: book.read(name) for name in book.namelist()}
    def saved(cell: re.Match) -> bytes:
        if (value := results.get(cell[1].decode())) is None:
            return cell[0]
        return b'<c r="%s" t="str"><f>%s</f><v>%s</v>' % (cell[1], cell[2], value)

    sheet = "xl/worksheets/sheet1.xml"
    parts[sheet] = re.sub(rb'<c r="([A-Z]+[0-9]+)"><f>(.*?)</f><v\s*/>', saved, parts[sheet])
    with zipfile.ZipFile(path, "w") as book:
        for name, data in parts.items():
            book.writestr(name, data)


def test_a_text_column_of_formulas_with_no_saved_result_is_refused_before_ray(tmp_path, monkeypatch, capsys,
                                                                               caplog):
    # A workbook written by a script (openpyxl) holds formulas but not what they give: the
    # job read those cells as blank, and embedded nothing for them without a word.
    import openpyxl

    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(["first", "last", "question", "doc", "n"])
    for i, (first, last) in enumerate([("Ana", "Silva"), ("Bo", "Li"), ("Cy", "Ho"), ("Di", "Wu"), ("Ed", "Ma")]):
        sheet.append([first, last, f'=A{i + 2}&" "&B{i + 2}', f'=IF(A{i + 2}="Bo","",B{i + 2})', f"=LEN(A{i + 2})"])
    book.save(tmp_path / "s.xlsx")
    argv = similarity(tmp_path / "s.xlsx", tmp_path / "out.csv")
    assert refused_before_ray(argv, monkeypatch, capsys) == (
        "s.xlsx, sheet 'Sheet': 5 cells of 'question' (C2, C3, C4 and 2 more); 5 cells of 'doc' (D2, D3, D4 and 2 "
        "more) hold a formula with no saved result: the workbook was last written by a program that does not "
        "calculate (Excel, LibreOffice and Google Sheets save results). Open it in Excel, save it, and run the job "
        "again.")

    # Saved by Excel, the results are beside the formulas, an empty text ("") one included.
    saved_as_excel_would(tmp_path / "s.xlsx", {**{f"C{r}": b"x" for r in range(2, 7)},
                                               **{f"D{r}": b"" if r == 3 else b"y" for r in range(2, 7)}})
    header = sheet_header(tmp_path / "s.xlsx", None)
    with caplog.at_level(logging.WARNING, logger="serve_app.batch.sheets"):
        refuse_unsaved_formulas(tmp_path / "s.xlsx", header, ["question", "doc"])
    # Only the number column's are left, not read as text: a warning, and the job goes on.
    assert caplog.messages == [
        "s.xlsx, sheet 'Sheet': 5 cells of 'n' (E2, E3, E4 and 2 more) hold a formula with no saved result: the "
        "workbook was last written by a program that does not calculate (Excel, LibreOffice and Google Sheets "
        "save results). The output has them blank."]
    assert read_xlsx(tmp_path / "s.xlsx", None)["question"].tolist() == ["x"] * 5
    # One cell holds; a cell right of the last name is in a column with no name.
    book = openpyxl.Workbook()
    book.active.append(["question"])
    book.active.append(["=1+1", "=2+2"])
    book.save(tmp_path / "one.xlsx")
    with pytest.raises(JobInputError, match=r"^one.xlsx, sheet 'Sheet': 1 cell of 'question' \(A2\) holds a formula"):
        require_columns([tmp_path / "one.xlsx"], "xlsx", ["question"])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="serve_app.batch.sheets"):
        refuse_unsaved_formulas(tmp_path / "one.xlsx", sheet_header(tmp_path / "one.xlsx", None), [])
    assert caplog.messages[0].startswith("one.xlsx, sheet 'Sheet': 1 cell of 'question' (A2); 1 cell of a column "
                                         "with no name (B2) hold a formula")


def test_unsaved_formulas_are_placed_as_the_xml_places_cells_however_it_is_written(tmp_path):
    # The schema lets a writer leave out a row's or a cell's r (it follows the one before),
    # quote with ' and prefix names; a cell with no r had failed the check with "invalid
    # literal for int()", and a result in <v xml:space="preserve"> was taken for none.
    import zipfile

    import openpyxl

    from serve_app.batch.sheetxml import scan_sheet

    openpyxl.Workbook().save(tmp_path / "s.xlsx")
    with zipfile.ZipFile(tmp_path / "s.xlsx") as book:
        parts = {name: book.read(name) for name in book.namelist()}
    parts["xl/worksheets/sheet1.xml"] = (
        b'<x:worksheet xmlns:x="http://schemas.openxmlformats.org/spreadsheetml/2006/main"><x:sheetData>'
        b'<x:row r="1"><x:c r="A1" t="inlineStr"><x:is><x:t>q</x:t></x:is></x:c></x:row>'
        b"<x:row><x:c><x:f>1+1</x:f></x:c><x:c t='str'><x:f>A1</x:f><x:v></x:v></x:c>"  # row 2: A2 unsaved
        b"<x:c><x:f>A1</x:f><x:v xml:space='preserve'> x</x:v></x:c></x:row>"
        b"<x:row r='5'><x:c r='C5'/><x:c><x:f t='shared' si='0'/><x:v/></x:c></x:row>"  # D5 unsaved
        b'</x:sheetData><x:mergeCells count="1"><x:mergeCell ref="A7:B9"/></x:mergeCells></x:worksheet>')
    with zipfile.ZipFile(tmp_path / "s.xlsx", "w") as book:
        for name, data in parts.items():
            book.writestr(name, data)
    assert scan_sheet(tmp_path / "s.xlsx", "Sheet") == ([(1, 7, 2, 9)], [(1, 2), (4, 5)])


def test_a_sheet_with_a_title_above_its_header_is_read_from_the_header_down(tmp_path, caplog):
    # A report's sheet: a title (merged across), a note, then the table. The job took the
    # title for the header and refused: "has no column 'question'. Its columns are: 'Client
    # questions'". Numbers shown padded and merged cells are matched to the rows below it.
    import openpyxl

    book = openpyxl.Workbook()
    sheet = book.active
    sheet["A1"] = "Client questions, updated 2026-03-01"
    sheet.merge_cells("A1:D1")
    sheet["A2"] = "Confidential"
    sheet["G2"] = "Draft"  # a note right of the table: no column (one made '', two refused the file)
    sheet.append(["matter", "question", "doc", "zip"])
    sheet.append(["Lease", "How do I reset it?", "Steps to reset", 2134])
    sheet.append([None, "When is rent due?", "Rent is due on the first", 501])
    sheet.append(["Supply", "Late goods?", "Penalties for delay", 90210])
    sheet.merge_cells("A4:A5")
    for row in (4, 5, 6):
        sheet[f"D{row}"].number_format = "00000"
    book.save(tmp_path / "s.xlsx")

    header = sheet_header(tmp_path / "s.xlsx", None, ["question", "doc"])
    assert (header.names, header.row, header.rows) == (["matter", "question", "doc", "zip"], 3, 3)
    with caplog.at_level(logging.WARNING, logger="serve_app.batch.sheets"):
        assert require_columns([tmp_path / "s.xlsx"], "xlsx", ["question", "doc"]) == header.names
    assert caplog.messages == ["s.xlsx, sheet 'Sheet': the header is row 3, the first to name 'question' and "
                               "'doc'; the 2 rows above it are not read."]
    frame = read_xlsx(tmp_path / "s.xlsx", None, ["question", "doc"])
    assert list(frame.columns) == header.names
    assert frame["question"].tolist() == ["How do I reset it?", "When is rent due?", "Late goods?"]
    assert frame["matter"].tolist() == ["Lease", "Lease", "Supply"]
    assert frame["zip"].tolist() == ["02134", "00501", 90210]  # shown as General shows it: text later
    assert file_rows([tmp_path / "s.xlsx"], "xlsx", wanted=["question"]) == [3]


def test_a_header_in_the_first_row_is_kept_though_a_later_row_holds_a_missing_name(tmp_path):
    # Below a table's own header, a data cell that happens to read "answer" is no header.
    import openpyxl

    book = openpyxl.Workbook()
    sheet = book.active
    for row in (["question", "doc"], ["How?", "Steps"], ["answer", "x"]):
        sheet.append(row)
    book.save(tmp_path / "s.xlsx")
    assert sheet_header(tmp_path / "s.xlsx", None, ["answer"]).row == 1
    with pytest.raises(JobInputError, match=r"^s.xlsx has no column 'answer' on its sheet 'Sheet'. Its columns "
                                            r"are: 'question', 'doc'.$"):
        require_columns([tmp_path / "s.xlsx"], "xlsx", ["answer"])


def test_a_one_column_table_takes_a_one_name_header_only_below_a_blank_row(tmp_path):
    # Every row of a one-column table is one cell, as a title is: a data cell that reads as
    # the column asked for had been taken for the header, and the rows above it dropped.
    import openpyxl

    for rows, header_row in (([["Term"], ["contract"], ["lease"], ["term"], ["tenant"]], 1),
                             ([["Glossary, 2026"], [None], ["term"], ["lease"]], 3)):
        book = openpyxl.Workbook()
        for row in rows:
            book.active.append(row)
        book.save(tmp_path / "s.xlsx")
        assert sheet_header(tmp_path / "s.xlsx", None, ["term"]).row == header_row


def test_a_csv_saved_from_a_sheet_with_a_title_is_refused_naming_its_header_row(tmp_path, monkeypatch, capsys):
    # Excel saves a titled sheet as CSV with the title's rows (padded with separators) on
    # top; the job said only that the CSV had no such columns, listing the title as one.
    rows = tmp_path / "rows.csv"
    rows.write_bytes(b"\xef\xbb\xbfClient questions;;\r\n;;\r\nid;question;doc\r\n1;How?;Steps\r\n")
    assert refused_before_ray(similarity(rows, tmp_path / "out.csv"), monkeypatch, capsys) == (
        "rows.csv has no columns 'question' and 'doc'. Its columns are: 'Client questions', '', ''. Its row 3 "
        "names them, below a title: a CSV is read from its first row, so delete the 2 rows above that one (or "
        "give the job the workbook it was saved from, where the header is found below a title), and run it again.")


def test_a_missing_column_below_a_title_names_what_the_header_there_holds(tmp_path):
    # "Question" asked, "question" below the title: the sentence had listed the title alone
    # as the columns, leaving the user to guess where the table was.
    import openpyxl

    book = openpyxl.Workbook()
    book.active.append(["Client questions"])
    book.active.append([])
    book.active.append(["id", "question", "doc"])
    book.save(tmp_path / "s.xlsx")
    with pytest.raises(JobInputError) as refused:
        require_columns([tmp_path / "s.xlsx"], "xlsx", ["Question"])
    assert str(refused.value) == ("s.xlsx has no column 'Question' on its sheet 'Sheet'. Its columns are: 'Client "
                                  "questions'. Its row 3, below a title, names: 'id', 'question', 'doc'.")
    (tmp_path / "s.csv").write_text("Client questions,,\n,,\nid,question,doc\n1,How?,Steps\n")
    with pytest.raises(JobInputError, match=r"^s.csv has no column 'Question'. Its columns are: 'Client questions', "
                                            r"'', ''. Its row 3, below a title, names: 'id', 'question', 'doc': a "
                                            r"CSV is read from its first row, so delete the 2 rows above"):
        require_columns([tmp_path / "s.csv"], "csv", ["Question"])
    # A one-column table saved by pandas with its index: a blank A1 is no title, and its
    # first data row no header below one (the hint had said to delete the real header).
    pd.DataFrame({"text": ["How do I reset it?", "Where is my invoice?"]}).to_csv(tmp_path / "index.csv")
    with pytest.raises(JobInputError) as refused:
        require_columns([tmp_path / "index.csv"], "csv", ["question"])
    assert str(refused.value) == "index.csv has no column 'question'. Its columns are: '', 'text'."


def test_two_missing_columns_are_said_as_two(tmp_path):
    (tmp_path / "s.csv").write_text("question,doc\nHow?,Steps\n")
    with pytest.raises(JobInputError, match=r"^s.csv has no columns 'answer' and 'note'. Its columns are"):
        require_columns([tmp_path / "s.csv"], "csv", ["answer", "note"])  # "no column 'answer', 'note'" before


def test_an_xlsx_with_repeated_or_blank_headers_is_refused_as_a_csv_is(tmp_path):
    # pandas renamed them ("note.1", "Unnamed: 2"), silently.
    import openpyxl

    def sheet(name, *rows):
        book = openpyxl.Workbook()
        for row in rows:
            book.active.append(row)
        book.save(tmp_path / name)
        return tmp_path / name

    twice = sheet("twice.xlsx", ["note", "question", "note"], [1, "how", 2])
    with pytest.raises(JobInputError, match="twice.xlsx has more than one column named 'note'"):
        require_columns([twice], "xlsx", ["question"])
    blanks = sheet("blanks.xlsx", ["question", None, "doc", None, "when"], ["how", 1, "x", 2, 3])
    with pytest.raises(JobInputError, match="more than one column named one with no name"):
        require_columns([blanks], "xlsx", ["question"])
    # Data right of the last header is a column with no name too.
    beyond = sheet("beyond.xlsx", ["question", None, "doc"], ["how", 1, "x", "stray"])
    assert require_columns([beyond], "xlsx", ["question"]) == ["question", "", "doc"]
    with pytest.raises(JobInputError, match="beyond.xlsx has more than one column named one with no name"):
        read_xlsx(beyond, None)
    one = sheet("one.xlsx", ["question", None, "doc", None], ["how", 1, "x"])
    assert list(read_xlsx(one, None).columns) == ["question", "", "doc"]  # as a CSV's ",," would be


def test_excels_lock_file_beside_an_open_workbook_is_not_input(tmp_path):
    pd.DataFrame({"question": ["a"]}).to_excel(tmp_path / "book.xlsx", index=False)
    (tmp_path / "~$book.xlsx").write_bytes(b"\x0bana" + bytes(150))  # "File is not a zip file"
    files, fmt = input_files(tmp_path)
    assert [f.name for f in files] == ["book.xlsx"] and fmt == "xlsx"


def test_a_column_missing_from_a_workbook_names_the_sheet_read_and_the_others(tmp_path):
    with pd.ExcelWriter(tmp_path / "multi.xlsx") as book:
        pd.DataFrame({"Quarterly report": ["Q1"]}).to_excel(book, sheet_name="Summary", index=False)
        pd.DataFrame({"question": ["how"]}).to_excel(book, sheet_name="Data", index=False)
    with pytest.raises(JobInputError) as err:
        require_columns([tmp_path / "multi.xlsx"], "xlsx", ["question"])
    assert str(err.value) == (
        "multi.xlsx has no column 'question' on its sheet 'Summary'. Its columns are: 'Quarterly report'. "
        "The workbook's sheets are: 'Summary', 'Data'; name the one to read with --sheet.")
    assert require_columns([tmp_path / "multi.xlsx"], "xlsx", ["question"], sheet="Data") == ["question"]


def test_an_output_the_job_could_not_write_is_refused_before_ray(tmp_path, monkeypatch, capsys):
    rows = tmp_path / "rows.csv"
    rows.write_text("question,doc\nhow,x\n")
    (tmp_path / "scored.csv").mkdir()
    assert refused_before_ray(similarity(rows, tmp_path / "scored.csv"), monkeypatch, capsys) == (
        f"The output {tmp_path / 'scored.csv'} is a folder: give the path of a file to write in it, "
        f"such as {tmp_path / 'scored.csv' / 'output.csv'}.")
    (tmp_path / "notes").write_text("a file")
    assert refused_before_ray(similarity(rows, tmp_path / "notes" / "new" / "out.csv"), monkeypatch, capsys) == (
        f"Cannot write {tmp_path / 'notes' / 'new' / 'out.csv'}: {tmp_path / 'notes'} is a file, not a folder. "
        "Choose another --output.")


@pytest.mark.parametrize("every", ["-1", "nan"])
def test_a_negative_progress_pause_is_refused_before_ray(tmp_path, monkeypatch, capsys, every):
    rows = tmp_path / "rows.csv"
    rows.write_text("question,doc\nhow,x\n")
    argv = [*similarity(rows, tmp_path / "out.csv"), "--progress-every", every]
    assert refused_before_ray(argv, monkeypatch, capsys) == (
        f"--progress-every must be 0 seconds or more, not {float(every):g}.")


def test_an_output_that_would_replace_the_input_is_refused_before_ray(tmp_path, monkeypatch, capsys):
    rows = tmp_path / "rows.csv"
    rows.write_text("question,doc\n00123,x\n")
    assert refused_before_ray(similarity(rows, rows), monkeypatch, capsys) == (
        f"--output {rows} is this job's input: give another file to write, and the input stays as it is.")
    assert rows.read_text() == "question,doc\n00123,x\n"


def test_a_sheet_too_long_for_excel_is_refused_before_ray_and_at_write_time(tmp_path, monkeypatch, capsys):
    rows = tmp_path / "rows.csv"
    rows.write_text("question,doc\n" + "q,d\n" * 1_048_576)
    assert refused_before_ray(similarity(rows, tmp_path / "scored.xlsx"), monkeypatch, capsys) == (
        "The output would have 1,048,576 rows, more than an Excel sheet holds (1,048,575 below its "
        "header): write it as .csv or .parquet instead.")
    target = tmp_path / "out" / "scored.xlsx"
    with pytest.raises(JobInputError, match="more than an Excel sheet holds"), atomic_output(target) as temporary:
        write_table(pa.table({"n": np.zeros(1_048_576)}), temporary, "xlsx")
    assert list(target.parent.iterdir()) == []


def test_an_xlsx_output_drops_what_a_sheet_cannot_hold(tmp_path):
    # openpyxl refused a vertical tab (IllegalCharacterError) and pandas a time zone, after
    # all the work and with a traceback.
    import openpyxl

    when = pa.array([dt.datetime(2024, 3, 1, 12, 0)], type=pa.timestamp("us", tz="UTC"))
    table = pa.table({"text": ["line\x0bbreak\ttab"], "when": when.cast(pa.timestamp("us", tz="Europe/Berlin"))})
    write_table(table, tmp_path / "out.xlsx", "xlsx")
    row = next(openpyxl.load_workbook(tmp_path / "out.xlsx").active.iter_rows(min_row=2, values_only=True))
    assert row == ("linebreak\ttab", dt.datetime(2024, 3, 1, 13, 0))  # Berlin's clock


def test_text_too_long_for_an_excel_cell_is_refused_not_cut(tmp_path):
    # openpyxl cut it to 32,767 characters with only a warning: the output lost text.
    import openpyxl

    target = tmp_path / "out" / "scored.xlsx"
    longest = "合同" * 16_384  # 32,768 characters
    table = pa.table({"question": ["short", longest, "x" * 40_000], "similarity": [0.5, 0.25, 0.125]})
    message = ("Row 3 of the output, column 'question', holds 32,768 characters, more than an Excel cell "
               "holds (32,767): write the output as .csv or .parquet instead, or shorten that text.")
    with pytest.raises(JobInputError) as refused, atomic_output(target) as temporary:
        write_table(table, temporary, "xlsx")
    assert str(refused.value) == message
    assert list(target.parent.iterdir()) == []
    fits = pa.table({"question": [longest[:-1]]})  # 32,767: what a cell holds, kept whole
    write_table(fits, tmp_path / "fits.xlsx", "xlsx")
    assert openpyxl.load_workbook(tmp_path / "fits.xlsx").active["A2"].value == longest[:-1]
    # Excel counts in UTF-16 units: an emoji beyond U+FFFF is two of them.
    emoji = pa.table({"question": ["😀" * 16_384]})  # 16,384 characters, 32,768 units
    with pytest.raises(JobInputError, match="Row 2 of the output, column 'question', holds 32,768 characters"):
        write_table(emoji, tmp_path / "emoji.xlsx", "xlsx")


def test_an_input_text_too_long_for_an_xlsx_output_is_refused_before_ray(tmp_path, monkeypatch, capsys):
    # It failed the job only as the workbook was written: after all of the job's work
    # (hours, for a folder of contracts).
    contract = "任何一方可提前三十天书面通知终止本合同。" * 1_700  # 34,000 characters, 102,000 bytes
    rows = tmp_path / "rows.csv"
    rows.write_text("question,doc\n" + "q,d\n" * 70_000 + f'q,"{contract}"\n')  # past pyarrow's first block
    assert refused_before_ray(similarity(rows, tmp_path / "scored.xlsx"), monkeypatch, capsys) == (
        "rows.csv row 70002, column 'doc', holds 34,000 characters, more than an Excel cell holds "
        "(32,767): write the output as .csv or .parquet instead, or shorten that text.")
    pa.parquet.write_table(pa.table({"question": ["q", "q"], "doc": ["d", "😀" * 16_384]}),
                           tmp_path / "rows.parquet", row_group_size=1)
    assert refused_before_ray(similarity(tmp_path / "rows.parquet", tmp_path / "scored.xlsx"),
                              monkeypatch, capsys).startswith(
        "rows.parquet row 2, column 'doc', holds 32,768 characters")  # UTF-16 units, as Excel counts
    # The same texts fit a cell's 32,767 (in bytes, far more) or a CSV output: no refusal.
    from serve_app.batch.tables import file_rows

    rows.write_text("question,doc\n" + "q,d\n" * 70_000 + f'q,"{contract[:32_767]}"\n')
    assert file_rows([rows], "csv", to_sheet=True) == [70_001]
    assert file_rows([tmp_path / "rows.parquet"], "parquet", to_sheet=False) == [2]  # its long text is no matter


def test_a_csv_output_opens_as_utf8_in_excel_and_reads_back_as_input(tmp_path):
    # Excel on Windows showed "cafÃ©" for a CSV without a byte-order mark.
    write_table(pa.table({"question": ["café", "合同"], "n": [1, None]}), tmp_path / "out.csv", "csv")
    assert (tmp_path / "out.csv").read_bytes().startswith(b"\xef\xbb\xbf\"question\",\"n\"\n")
    assert require_columns([tmp_path / "out.csv"], "csv", ["question"]) == ["question", "n"]
    assert pa.csv.read_csv(tmp_path / "out.csv").to_pylist() == [{"question": "café", "n": 1},
                                                                   {"question": "合同", "n": None}]


def test_a_sheet_is_cut_into_blocks_for_the_actors_to_share(tmp_path):
    # A sheet was one block: one actor embedded all of it and the progress sat at 0/1.
    from serve_app.batch.job import sheet_blocks

    pd.DataFrame({"text": [f"row {i}" for i in range(600)]}).to_excel(tmp_path / "a.xlsx", index=False)
    pd.DataFrame({"text": ["last"], "n": [1]}).to_excel(tmp_path / "b.xlsx", index=False)
    # 601 rows in batches of 64: three blocks' worth of four batches at most, 201 rows each.
    blocks, schema = sheet_blocks([tmp_path / "a.xlsx", tmp_path / "b.xlsx"], None, ["text"], 64, 1)
    assert [block.num_rows for block in blocks] == [201, 201, 198, 1]
    assert all(block.schema == schema for block in blocks) and schema.names == ["text", "n"]
    assert pa.concat_tables(blocks)["text"].to_pylist() == [f"row {i}" for i in range(600)] + ["last"]
