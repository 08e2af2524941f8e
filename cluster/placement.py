"""Placement: one Ray placement group per instance, one bundle per node of the instance.

An instance of R ranks spans ceil(R / ranks_per_node) nodes, filled node by node (the ranks
that exchange experts most often share a node's fast links). Each node's share is one bundle
holding its ranks' resources (CPUs, GPUs where the cluster has them, custom resources such as
a node label); the bundles go to distinct nodes (``STRICT_SPREAD``; one bundle is
``STRICT_PACK``), and each rank actor takes its own slice of its node's bundle. Ray only places
the group when every bundle fits, so an instance is never half-started.
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


def ranks_per_bundle(pool: PoolConfig) -> list[int]:
    """How many of an instance's ranks each node (bundle) holds, node by node."""
    full, rest = divmod(pool.num_ranks, pool.ranks_per_node)
    return [pool.ranks_per_node] * full + ([rest] if rest else [])


def instance_bundles(pool: PoolConfig, has_gpus: bool) -> list[dict[str, float]]:
    """One bundle per node of an instance of ``pool``: its ranks' resources together."""
    rank = pool.resources.bundle(has_gpus)
    assert rank, "a rank must ask for some resource (cpus_per_rank > 0)"
    return [{k: v * n for k, v in rank.items()} for n in ranks_per_bundle(pool)]


def rank_bundle_index(pool: PoolConfig, rank: int) -> int:
    return rank // pool.ranks_per_node


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


async def create_instance_group(
    name: str, bundles: list[dict[str, float]], timeout_s: float
) -> PlacementGroup:
    """Reserve the bundles of one instance, one node each; raises ``PlacementError`` if Ray
    cannot place them within ``timeout_s`` (the group is removed again)."""
    strategy = "STRICT_PACK" if len(bundles) == 1 else "STRICT_SPREAD"
    pg = placement_group(bundles, strategy=strategy, name=name)
    try:
        await asyncio.wait_for(pg.ready(), timeout_s)
    except asyncio.TimeoutError:
        remove_placement_group(pg)
        raise PlacementError(
            f"cannot place instance {name!r}: it needs {bundles} (one bundle per node), the "
            "cluster has "
            f"{ray.available_resources()} free; add nodes, lower --cpus-per-rank, or run fewer "
            "instances"
        ) from None
    return pg


def rank_options(pg: PlacementGroup, pool: PoolConfig, rank: int, has_gpus: bool) -> dict[str, Any]:
    """Actor options that put ``rank`` into its node's bundle with one rank's resources."""
    resources = pool.resources.bundle(has_gpus)
    custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU")}
    return {
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=rank_bundle_index(pool, rank)
        ),
        "num_cpus": resources.get("CPU", 0),
        "num_gpus": resources.get("GPU", 0),
        "resources": custom,
    }


def remove_group(pg: PlacementGroup) -> None:
    try:
        remove_placement_group(pg)
    except Exception:  # already gone with its node
        pass
