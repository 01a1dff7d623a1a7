"""How much of a machine each model replica asks Ray for."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

DEFAULT_GPU_FRACTION = 0.25


def resolve_gpu_fraction(requested: float | None) -> float:
    """The GPU share per replica: as configured, else 0.25 where there are GPUs, else none.

    A CPU-only cluster gets 0 so replicas start instead of waiting forever for a GPU.
    """
    gpus = visible_gpus()
    if requested is None:
        return DEFAULT_GPU_FRACTION if gpus else 0.0
    if requested > 0 and gpus == 0:
        logger.warning(
            "gpu_fraction=%s but no GPU is visible now; model replicas will wait until a "
            "GPU node joins the cluster.", requested,
        )
    return requested


def resolve_max_replicas(requested: int | None, gpu_fraction: float, floor: int = 0) -> int:
    """Default ceiling: as many replicas as fit on one GPU (whole shares only: at 0.3, three,
    not the four that would ask for 1.2 GPUs), or one on a CPU; never below `floor` (the
    min_replicas or initial_replicas asked for, which Ray would otherwise refuse)."""
    if requested is not None:
        return requested
    fits = int(1 / gpu_fraction + 1e-9) if gpu_fraction > 0 else 1
    return max(1, fits, floor)


def visible_gpus() -> float:
    """GPUs in the connected Ray cluster, or on this machine before Ray is started."""
    import ray

    if ray.is_initialized():
        return float(ray.cluster_resources().get("GPU", 0))
    try:
        from ray._private.accelerators import get_accelerator_manager_for_resource

        manager = get_accelerator_manager_for_resource("GPU")
        return float(manager.get_current_node_num_accelerators() or 0)
    except Exception:  # detection is best effort; no GPU is the safe answer
        return 0.0
