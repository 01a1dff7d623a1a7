"""bench/gpu_check.py's GPU memory verdicts, which only a machine with a GPU would otherwise run.

Device time is lent in minutes, so the parts of the check that read nvidia-smi and judge each
replica against its share are tested here on made-up readings (pure logic; the rest of the
script runs end to end with --cpu-dry-run). nvidia-smi is a fake on PATH (conftest.py).
"""

from __future__ import annotations

from bench import gpu_check


def test_nvidia_smi_readings_are_summed_per_pid_and_unreadable_lines_skipped(fake_nvidia_smi):
    # A process on two GPUs is listed twice; "[N/A]" is what some drivers and containers give.
    fake_nvidia_smi("123, 500\n123, 20\n456, [N/A]\n789, 300\n")
    assert gpu_check.gpu_memory_by_pid() == {123: 520.0, 789: 300.0}


def test_no_nvidia_smi_gives_no_readings_instead_of_failing_the_run(fake_nvidia_smi):
    fake_nvidia_smi(None)
    assert gpu_check.gpu_memory_by_pid() == {}


def _result(peaks: dict, **extra) -> dict:
    return {"plan": {"device": "cuda"}, "total_mib": 16000.0, "context_mib": 500.0,
            "served": {"replicas": [{"pid": 11}, {"pid": 12}], "peak_mib": peaks, **extra}}


def test_each_replica_is_judged_against_its_share_with_the_cuda_context_counted():
    rows = gpu_check.memory_rows(_result({11: 3900.0, 12: 4100.0}))
    by_name = {name: (measured, target, met) for name, measured, target, met in rows}
    # A quarter of a 16,000 MiB card is 4,000 MiB, the context included.
    assert by_name["replica 11 peak, context incl."] == ("3900 MiB (3400 beyond it)", "<= 4000 MiB", "yes")
    assert by_name["replica 12 peak, context incl."] == ("4100 MiB (3600 beyond it)", "<= 4000 MiB", "NO")
    assert by_name["CUDA context alone"][0] == "500 MiB"


def test_a_replica_nvidia_smi_did_not_list_is_unknown_not_passed():
    rows = gpu_check.memory_rows(_result({11: 3900.0}))
    assert ("replica 12 peak, context incl.", "not measured", "<= 4000 MiB", "unknown") in rows


def test_without_per_process_readings_the_cards_growth_is_shared_out():
    # In a container nvidia-smi may list no pids at all: the whole card's use is all there is.
    within = gpu_check.memory_rows(_result({"device": 9000.0}, card_before_mib=1000.0))
    assert ("card's growth / replicas", "4000 MiB", "<= 4000 MiB", "yes") in within
    over = gpu_check.memory_rows(_result({"device": 9200.0}, card_before_mib=1000.0))
    assert ("card's growth / replicas", "4100 MiB", "<= 4000 MiB", "NO") in over


def test_the_dry_run_reports_resident_memory_and_skips_the_gpu_share():
    result = _result({11: 700.0, 12: 650.0})
    result["plan"]["device"] = "cpu"
    rows = gpu_check.memory_rows(result)
    assert rows == [("replica 11 peak RSS (not GPU)", "700 MiB", "GPU share: skipped", "skipped"),
                    ("replica 12 peak RSS (not GPU)", "650 MiB", "GPU share: skipped", "skipped")]


def test_a_card_that_admits_one_process_is_named_as_refusing_shared_replicas(fake_nvidia_smi):
    fake_nvidia_smi(None)
    assert gpu_check.compute_mode() is None and gpu_check.sharing_refused(None) is None
    fake_nvidia_smi("Exclusive_Process\n")
    assert gpu_check.compute_mode() == "Exclusive_Process"
    reason = gpu_check.sharing_refused(gpu_check.compute_mode())
    assert "Exclusive_Process" in reason and "4 replicas cannot share it" in reason
    fake_nvidia_smi("Default\n")
    assert gpu_check.sharing_refused(gpu_check.compute_mode()) is None


def test_a_dtype_whose_vectors_overflow_is_a_failed_parity_row_and_the_run_goes_on(
    overflowing_standin_dir,
):
    import dataclasses
    import time

    # float16 on this CPU, as the GPU run compares it; float32 of the same weights is finite.
    plan = dataclasses.replace(gpu_check.DRY_RUN, compared=("float16",), texts=40, singles=3,
                               batch_tokens=(1024,))
    raw: dict = {}
    gpu_check.raw_phase(raw, str(overflowing_standin_dir), plan, time.monotonic() + 60)
    assert "texts_per_s" in raw["float32"] and "inf or NaN" in raw["float16"]["not_finite"]
    table = gpu_check.rows({"raw": raw, "served": {}, "plan": dataclasses.asdict(plan)})
    assert ("parity float16 vs float32", "inf or NaN on bench texts (refused)", "min >= 0.999",
            "NO") in table
    assert [name for name, *_ in table if name.startswith("raw ")] == [
        "raw float32 texts/s @ batch tokens", "raw float32 single p50 / p95"]


def test_a_refused_float32_reference_is_a_failed_row_not_a_silent_gap():
    raw = {"float32": {"not_finite": "The model gave inf or NaN values for 3 texts"},
           "bfloat16": {"texts_per_s": {1024: 10.0}, "p50_ms": 1.0, "p95_ms": 2.0, "singles": 3}}
    table = gpu_check.rows({"raw": raw, "served": {}, "plan": {"device": "cpu"}})
    assert ("float32, the reference", "inf or NaN on bench texts (refused)", "finite", "NO") in table


def test_each_replicas_own_cap_counts_its_context_against_the_share():
    replicas = [{"pid": 11, "gpu_share": {"share_mib": 4000.0, "outside_mib": 450.0, "cap_mib": 3550.0}},
                {"pid": 12, "gpu_share": {"share_mib": 4000.0, "outside_mib": None, "cap_mib": 4000.0}}]
    rows = gpu_check.memory_rows(_result({11: 1900.0, 12: 2000.0}, replicas=replicas))
    assert ("replica 11 cap: context + allocator", "450 + 3550 MiB", "<= 4000 MiB", "yes") in rows
    assert ("replica 12 cap: context + allocator", "unread + 4000 MiB", "<= 4000 MiB", "unknown") in rows


def test_the_cap_tried_in_process_must_hold_the_process_to_its_share_and_refuse_beyond_it():
    held = {"share_mib": 20000.0, "outside_mib": 520.0, "cap_mib": 19480.0, "process_mib": 19950.0,
            "within": "allowed", "beyond": "refused"}
    assert [row[3] for row in gpu_check.cap_rows(held)] == ["yes", "yes", "yes"]
    # A cap that lets an allocation past it, or a process above its share when full, fails.
    leaky = {**held, "beyond": "allowed", "process_mib": 20400.0}
    assert [row[3] for row in gpu_check.cap_rows(leaky)] == ["yes", "NO", "NO"]
