"""The Ray shell's model replica without Ray: what it answers when its start failed part way.
(What only Ray does, scaling and replacing replicas, is in test_serve.py.)"""

from __future__ import annotations

import asyncio
from dataclasses import asdict

from serve_app.core.config import AppArgs
from serve_app.model.scheduler import ForwardScheduler
from serve_app.ray_shell.deployments import Embedder
from serve_app.ray_shell.transport import Failure


def test_a_replica_whose_warm_up_failed_answers_as_failed_not_through_its_model(monkeypatch, bundled_spec):
    # The scheduler exists before the warm-up pass; a warm-up that failed otherwise than by
    # inf/NaN (a CUDA out-of-memory under a small gpu_fraction, say) marked the replica
    # unhealthy, but its requests still ran into the broken model and came back as 500s.
    def broken(self, texts):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(ForwardScheduler, "warm_up", broken)
    args = AppArgs(model="bundled:minilm", cpu_threads=1).model_dump()
    replica = Embedder.func_or_class(args, asdict(bundled_spec), 0.0)
    answer = asyncio.run(replica.embed(["a lease"]))
    assert isinstance(answer, Failure) and "failed to load" in answer.message
