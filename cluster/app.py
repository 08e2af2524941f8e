"""The Serve application: ``build_app(args)`` for ``serve run`` / ``serve deploy`` and the CLI.

    serve run deploy/serve-local.yaml          # args: see docs/configuration.md
    serve run cluster.app:build_app preset=k2-tiny prefill=1 decode=1

Two deployments, neither asking for a CPU: ``PoolManager`` (one replica; owns the scheduler
actor and every instance, so deleting the application stops them all) and ``Ingress`` (the
FastAPI app; talks to the pool manager through a deployment handle).
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from cluster.config import ClusterConfig
from cluster.ingress import Ingress
from cluster.pool import PoolManager
from cluster.settings import ServeSettings


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Validate ``args`` (``ServeSettings`` keys), run ``tidal plan``'s check on the layout
    (``PlanError`` when it cannot fit) and build the application."""
    settings = ServeSettings(**(args or {}))
    settings.check_memory(settings.resolve_device())
    return build_app_from_config(settings.to_config())


def build_app_from_config(config: ClusterConfig) -> Application:
    pool = serve.deployment(
        PoolManager,
        name="PoolManager",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=10_000,
        graceful_shutdown_timeout_s=5,
    ).bind(config)
    ingress = serve.deployment(
        Ingress,
        name="Ingress",
        num_replicas=config.num_ingress_replicas,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=10_000,
        graceful_shutdown_timeout_s=5,
    )
    return ingress.bind(config, pool)
