"""Rows per second of the `embed` job against raw in-process forward passes, one run.

    python bench/batch_bench.py
    python bench/batch_bench.py --rows 20000 --json bench/results/batch.json

Raw is `TextEmbedder.encode` in this process over the same texts, in the job's
batch size, run two ways: one pass on every core, and each batch split between two
threads of one core each (what the job's actors do on a CPU, as the service's replicas
do). Raw runs before, between and after the two jobs; each job is compared with the
faster way's two runs beside it (this machine's speed drifts). The job
is `python -m serve_app.batch embed`, reading a Parquet file and writing one, run
both ways a user runs it: as a process that starts a Ray of its own, and submitted
with the job API to a `ray start --head` cluster (`--working-dir .`, as the README
shows). Ray's start-up is reported apart from the job's work, which includes the
model actor's start (the actor's own report of it is printed too).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from corpus import sentences  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--model", default="bundled:minilm")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--json", type=Path)
    opts = parser.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = sentences(opts.rows, seed=11)
    folder = Path(tempfile.mkdtemp(prefix="batch-bench-"))
    source, target = folder / "rows.parquet", folder / "embedded.parquet"
    pq.write_table(pa.table({"row": list(range(len(texts))), "text": texts}), source)

    # This machine's speed drifts over minutes: raw runs before, between and after the
    # jobs, and each job is compared with the two raw runs beside it.
    raw = [run_raw(texts, opts)]
    job = run_job(source, target, opts)
    check(target, texts)
    raw.append(run_raw(texts, opts))
    submitted = run_submitted(source, target, opts)
    check(target, texts)
    raw.append(run_raw(texts, opts))
    rows = len(texts)

    ways = raw[0].keys()
    best = min(ways, key=lambda way: sum(run[way] for run in raw))  # the fewer seconds
    results = {
        "rows": rows,
        "raw_rows_per_s_runs": {way: [rows / run[way] for run in raw] for way in ways},
        "raw_best": best,
        "raw_rows_per_s": rows / (sum(run[best] for run in raw) / len(raw)),
        "job_rows_per_s": rows / job["work_s"],
        "job_work_s": job["work_s"],
        "job_model_load": job["model_load"],
        "ray_start_s": job["ray_start_s"],
        "process_s": job["process_s"],
        "submitted_rows_per_s": rows / submitted["work_s"],
        "submitted_work_s": submitted["work_s"],
        "submitted_model_load": submitted["model_load"],
        "cluster_start_s": submitted["cluster_start_s"],
        "submitted_total_s": submitted["total_s"],
    }
    results["ratio"] = results["job_rows_per_s"] / (rows / ((raw[0][best] + raw[1][best]) / 2))
    results["submitted_ratio"] = results["submitted_rows_per_s"] / (rows / ((raw[1][best] + raw[2][best]) / 2))
    report(results)
    if opts.json:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(results, indent=2))


def job_command(source: Path, target: Path, opts, python: str = sys.executable) -> list[str]:
    return [
        python, "-m", "serve_app.batch", "embed", "--input", str(source),
        "--column", "text", "--output", str(target), "--model", opts.model,
        "--batch-size", str(opts.batch_size),
    ]


def job_timing(log: str) -> tuple[float, float]:
    found = re.search(r"Ray start-up ([\d.]+) s, embedding and writing ([\d.]+) s", log)
    return float(found[1]), float(found[2])


def model_load(log: str) -> str:
    """What the job's actor said about loading the model: how long, and whether forked warm."""
    found = re.search(r"loaded in ([\d.]+ s \([^)]*\))", log)
    return found[1] if found else "not reported"


def run_job(source: Path, target: Path, opts) -> dict:
    started = time.perf_counter()
    done = subprocess.run(job_command(source, target, opts), capture_output=True, text=True)
    process_s = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"the job failed:\n{done.stderr[-3000:]}")
    ray_start_s, work_s = job_timing(done.stdout)
    return {"ray_start_s": ray_start_s, "work_s": work_s, "process_s": process_s,
            "model_load": model_load(done.stdout + done.stderr)}


def run_submitted(source: Path, target: Path, opts) -> dict:
    """`ray start --head`, then `ray job submit --working-dir .` through the job API."""
    import signal

    env = {**os.environ, "RAY_AUTH_MODE": "token"}  # as the README starts a local cluster
    dashboard = free_port()
    ray_cli = str(Path(sys.executable).with_name("ray"))
    # `ray start` checks a token only where one exists: make one where none does.
    subprocess.run([ray_cli, "get-auth-token", "--generate"], env=env, check=True, capture_output=True,
                   umask=0o077)
    started = time.perf_counter()
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block",
         f"--port={free_port()}", f"--dashboard-port={dashboard}", "--disable-usage-stats",
         f"--temp-dir={tempfile.mkdtemp(prefix='bb', dir='/tmp')}"],
        env=env, start_new_session=True, umask=0o077, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        from ray.job_submission import JobStatus, JobSubmissionClient

        token_file = Path.home() / ".ray" / "auth_token"  # `ray start` writes it if missing
        while True:
            try:
                client = JobSubmissionClient(
                    f"http://127.0.0.1:{dashboard}",
                    headers={"Authorization": f"Bearer {token_file.read_text().strip()}"},
                )
                break
            except Exception:
                if head.poll() is not None or time.perf_counter() - started > 120:
                    raise
                time.sleep(0.5)
        cluster_start_s = time.perf_counter() - started
        submitted = time.perf_counter()
        job = client.submit_job(
            entrypoint=" ".join(job_command(source, target, opts, python="python")),
            runtime_env={"working_dir": str(Path(__file__).resolve().parents[1]),
                         "env_vars": {"HF_HUB_OFFLINE": "1"}},
        )
        while (status := client.get_job_status(job)) not in (
            JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED
        ):
            time.sleep(0.5)
        total_s = time.perf_counter() - submitted
        log = client.get_job_logs(job)
        if status != JobStatus.SUCCEEDED:
            sys.exit(f"the submitted job ended {status}:\n{log[-3000:]}")
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):  # the cluster's processes, all of them
            os.killpg(head.pid, sig)
            try:
                head.wait(15)
                break
            except subprocess.TimeoutExpired:
                continue
    return {"cluster_start_s": cluster_start_s, "work_s": job_timing(log)[1], "total_s": total_s,
            "model_load": model_load(log)}


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def check(target: Path, texts: list[str]) -> None:
    import pyarrow.parquet as pq

    out = pq.read_table(target)
    assert out.num_rows == len(texts) and out["row"].to_pylist() == list(range(len(texts)))
    target.unlink()


_RAW = None


def run_raw(texts: list[str], opts) -> dict[str, float]:
    """Seconds for the texts, batch by batch: one pass on every core, and each batch split
    between two workers of half the cores (forward_sweep's split, as the replica's)."""
    from forward_sweep import run as split_run

    from serve_app.core.modelinfo import resolve_model
    from serve_app.model.embedder import TextEmbedder
    from serve_app.model.hardware import default_cpu_threads

    global _RAW
    cpus = default_cpu_threads()
    if _RAW is None:
        _RAW = TextEmbedder(resolve_model(opts.model), cpu_threads=cpus)
        _RAW.speed_up()  # the fast paths the job's actors turn on (job.py)
        _RAW.encode(["warm up"])
    batches = [texts[i : i + opts.batch_size] for i in range(0, len(texts), opts.batch_size)]
    ways = {"one pass on every core": (1, cpus)}
    if cpus >= 2:
        ways["two workers"] = (2, cpus // 2)
    return {way: sum(len(batch) / split_run(_RAW, batch, workers, threads) for batch in batches)
            for way, (workers, threads) in ways.items()}


def report(r: dict) -> None:
    print(f"\nembed job over {r['rows']} rows (Parquet in, Parquet out)")
    for way, rates in r["raw_rows_per_s_runs"].items():
        runs = ", ".join(f"{x:.1f}" for x in rates)
        print(f"  raw, {way + ':':26}{sum(rates) / len(rates):8.1f} rows/s  (before, between, after the jobs: {runs})"
              + ("  <- the faster" if way == r["raw_best"] else ""))
    print(f"  job{'':28}{r['job_rows_per_s']:8.1f} rows/s  ({r['ratio']:.2f} x the raw runs beside it; "
          f"{r['job_work_s']:.1f} s incl. model load {r['job_model_load']})")
    print(f"  Ray start-up{'':20}{r['ray_start_s']:7.1f} s  (whole process {r['process_s']:.1f} s)")
    print(f"  submitted job{'':18}{r['submitted_rows_per_s']:8.1f} rows/s  ({r['submitted_ratio']:.2f} x the raw runs "
          f"beside it; {r['submitted_work_s']:.1f} s incl. model load {r['submitted_model_load']}; "
          f"{r['submitted_total_s']:.1f} s from submit to done)")
    print(f"  ray start --head{'':16}{r['cluster_start_s']:7.1f} s")


if __name__ == "__main__":
    main()
