"""A replica's cap on a shared GPU, CUDA context counted (pure logic: no GPU here; the GPU run
of bench/gpu_check.py tries the cap for real). nvidia-smi is a fake on PATH (conftest.py)."""

from __future__ import annotations

import os

from serve_app.model.gpushare import allocator_share, process_gpu_mib


def test_the_allocator_gets_the_share_less_what_the_process_holds_outside_it():
    # An RTX 3060 (12,288 MiB) shared by four: 3,072 MiB each. Capping the allocator at the
    # whole 3,072 let each process hold its context on top, 4 x ~400 MiB more than the card.
    share = allocator_share(0.25, 12288.0, 400.0)
    assert (share.share_mib, share.outside_mib, share.cap_mib) == (3072.0, 400.0, 2672.0)
    assert "capped at 2672 MiB" in share.sentence


def test_an_unread_context_keeps_the_whole_share_and_says_so():
    share = allocator_share(0.25, 12288.0, None)
    assert share.cap_mib == 3072.0 and share.outside_mib is None
    assert "could not be read from nvidia-smi" in share.sentence


def test_a_share_smaller_than_the_context_asks_for_a_larger_fraction():
    share = allocator_share(0.02, 12288.0, 400.0)
    assert share.cap_mib == share.share_mib and "raise gpu_fraction" in share.sentence


def test_this_process_is_found_in_nvidia_smis_listing(fake_nvidia_smi):
    fake_nvidia_smi(f"{os.getpid()}, 610\n999999, 20\n")
    assert process_gpu_mib(os.getpid()) == 610.0
    fake_nvidia_smi("999999, 20\n")  # a container's pids: not found
    assert process_gpu_mib(os.getpid()) is None
    fake_nvidia_smi(None)
    assert process_gpu_mib(os.getpid()) is None


def test_a_replica_lowers_its_cap_by_its_context_after_its_first_pass(monkeypatch, fake_nvidia_smi):
    # Only the driver calls are faked (no GPU here): torch's own set_per_process_memory_fraction
    # runs, with its checks. A 12,288 MiB card, the allocator holding 1,300 MiB, nvidia-smi
    # showing the process at 1,700 MiB: 400 MiB outside the allocator.
    import torch

    from serve_app.model.gpushare import settle_gpu_share

    capped = []
    monkeypatch.setattr(torch.cuda.memory, "_lazy_init", lambda: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_setMemoryFraction",
                        lambda fraction, index: capped.append((fraction, index)), raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: type("Card", (), {"total_memory": 12288 * 2**20})())
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 1300 * 2**20)
    fake_nvidia_smi(f"{os.getpid()}, 1700\n")
    share = settle_gpu_share(0.25, torch.device("cuda", 0))
    assert (share.outside_mib, share.cap_mib) == (400.0, 2672.0)
    assert capped == [(2672.0 / 12288.0, 0)]


def test_a_gpu_replica_caps_its_allocator_through_torchs_own_argument_checks(monkeypatch):
    import torch

    from serve_app.model.gpushare import hold_to_gpu_share

    # Only the driver calls are faked: torch's own set_per_process_memory_fraction runs,
    # with its device checks, which refused the plain "cuda" device a replica picks.
    capped = []
    monkeypatch.setattr(torch.cuda.memory, "_lazy_init", lambda: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_setMemoryFraction",
                        lambda fraction, index: capped.append((fraction, index)), raising=False)
    hold_to_gpu_share(0.25, torch.device("cuda"))
    hold_to_gpu_share(0.5, torch.device("cuda", 1))
    assert capped == [(0.25, 0), (0.5, 1)]


def test_a_cap_that_would_leave_no_room_beside_the_weights_keeps_the_share():
    # Lowered below what the model already holds, every pass needing new memory would fail
    # after the replica said it was ready.
    share = allocator_share(0.25, 12288.0, 400.0, in_use_mib=2600.0)
    assert share.cap_mib == 3072.0 and "raise gpu_fraction" in share.sentence
    assert allocator_share(0.25, 12288.0, 400.0, in_use_mib=1200.0).cap_mib == 2672.0
