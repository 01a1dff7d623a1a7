"""How many model replicas the app allows by default, checked against Ray's own config rules."""

from __future__ import annotations

import pytest
from ray.serve.config import AutoscalingConfig

from serve_app.ray_shell.resources import resolve_max_replicas


@pytest.mark.parametrize(("fraction", "ceiling"), [(0.25, 4), (0.3, 3), (0.35, 2), (0.6, 1), (1.0, 1), (0.0, 1)])
def test_the_default_ceiling_is_the_whole_shares_one_gpu_holds(fraction, ceiling):
    # round(1/fraction) gave 3 at 0.35 (1.05 GPUs) and 2 at 0.6 (1.2): the last replica
    # waited for ever on a one-GPU machine, or booted a second GPU node.
    assert resolve_max_replicas(None, fraction) == ceiling


def test_the_default_ceiling_is_never_below_the_replicas_asked_for():
    # min_replicas=2 on a CPU with no max_replicas: Ray refused min 2 > max 1 inside build_app.
    ceiling = resolve_max_replicas(None, 0.0, floor=2)
    assert ceiling == 2
    AutoscalingConfig(min_replicas=2, max_replicas=ceiling, initial_replicas=2)
    assert resolve_max_replicas(3, 0.0, floor=2) == 3  # an explicit one is kept
