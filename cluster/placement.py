"""Placement: one Ray placement group per instance, one bundle per rank.

An instance's ranks exchange experts every MoE layer, so they are packed onto one node
(``STRICT_PACK``); each bundle is what one rank asks for (CPUs, a GPU where the cluster has
them, custom resources such as a node label). Ray only places the group when every bundle fits,
so an instance is never half-started.
"""

from __future__ import annotations

import asyncio
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import PoolConfig


class PlacementError(RuntimeError):
    """The cluster cannot fit an instance; the message says what was asked and what is free."""


def instance_bundles(pool: PoolConfig, has_gpus: bool) -> list[dict[str, float]]:
    """One bundle per rank of an instance of ``pool``."""
    bundle = pool.resources.bundle(has_gpus)
    assert bundle, "a rank must ask for some resource (cpus_per_rank > 0)"
    return [dict(bundle) for _ in range(pool.num_ranks)]


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


async def create_instance_group(
    name: str, bundles: list[dict[str, float]], timeout_s: float
) -> PlacementGroup:
    """Reserve the bundles of one instance on one node; raises ``PlacementError`` if Ray cannot
    place them within ``timeout_s`` (the group is removed again)."""
    pg = placement_group(bundles, strategy="STRICT_PACK", name=name)
    try:
        await asyncio.wait_for(pg.ready(), timeout_s)
    except asyncio.TimeoutError:
        remove_placement_group(pg)
        raise PlacementError(
            f"cannot place instance {name!r}: it needs {bundles} on one node, the cluster has "
            f"{ray.available_resources()} free; add nodes, lower --cpus-per-rank, or run fewer "
            "instances"
        ) from None
    return pg


def rank_options(pg: PlacementGroup, rank: int, bundle: dict[str, float]) -> dict[str, Any]:
    """Actor options that put rank ``rank`` into its bundle with exactly the bundle's resources."""
    custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
    return {
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=rank
        ),
        "num_cpus": bundle.get("CPU", 0),
        "num_gpus": bundle.get("GPU", 0),
        "resources": custom,
    }


def remove_group(pg: PlacementGroup) -> None:
    try:
        remove_placement_group(pg)
    except Exception:  # already gone with its node
        pass
