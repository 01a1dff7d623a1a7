"""`build_app`: the Serve application from typed settings (`serve run serve_app:build_app`).

No `from __future__ import annotations` here: Ray Serve reads build_app's annotation
at run time to turn `key=value` arguments into AppArgs.
"""

from dataclasses import asdict

import click
from ray.serve import Application

from serve_app.core.config import AppArgs
from serve_app.core.errors import ModelLoadError
from serve_app.core.modelinfo import resolve_model
from serve_app.ray_shell.deployments import _LOGGING, Embedder, Ingress
from serve_app.ray_shell.resources import resolve_gpu_fraction, resolve_max_replicas
from serve_app.ray_shell.warmstart import py_executable, warm_start_enabled
from serve_app.web.auth import key_digests_from_env


class StartupError(ModelLoadError, click.ClickException):
    """A model that cannot be loaded; Ray's CLI prints it as one line, no traceback."""

    def __init__(self, message: str) -> None:
        ModelLoadError.__init__(self, message)
        click.ClickException.__init__(self, message)


def build_app(args: AppArgs) -> Application:
    """The Serve application for `serve run serve_app:build_app` and serve_config.yaml."""
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args or {})
    try:
        spec = resolve_model(args.model, args.model_revision)
    except ModelLoadError as exc:
        raise StartupError(str(exc)) from None
    gpu = resolve_gpu_fraction(args.gpu_fraction)
    autoscaling = {
        "min_replicas": args.min_replicas,
        "max_replicas": resolve_max_replicas(args.max_replicas, gpu,
                                             max(args.min_replicas, args.initial_replicas or 0)),
        "initial_replicas": args.initial_replicas,
        "target_ongoing_requests": args.target_ongoing_requests,
        "upscale_delay_s": args.upscale_delay_s,
        "downscale_delay_s": args.downscale_delay_s,
        "downscale_to_zero_delay_s": args.idle_timeout_s,
        "look_back_period_s": args.autoscaling_look_back_s,
        "metrics_interval_s": args.autoscaling_metrics_interval_s,
    }
    actor_options: dict = {"num_cpus": args.replica_cpus, "num_gpus": gpu}
    warm = warm_start_enabled(args.warm_start, gpu)
    if warm:
        actor_options["runtime_env"] = {"py_executable": py_executable(spec.model_type)}
    embedder = Embedder.options(
        ray_actor_options=actor_options,
        autoscaling_config=autoscaling,
        max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests,
        user_config={
            "max_batch_texts": args.max_batch_texts,
            "batch_wait_timeout_s": args.batch_wait_timeout_s,
        },
        health_check_period_s=args.health_check_period_s,
        graceful_shutdown_timeout_s=30,
        logging_config=_LOGGING,
    ).bind(args.model_dump(), asdict(spec), gpu)
    return Ingress.options(
        num_replicas=args.ingress_replicas,
        ray_actor_options={"num_cpus": 0},
        # The ingress only awaits; let it hold many requests while the model works.
        max_ongoing_requests=max(256, args.max_ongoing_requests * 4),
        logging_config=_LOGGING,
    ).bind(embedder, args.model_dump(), asdict(spec), warm, key_digests_from_env())
