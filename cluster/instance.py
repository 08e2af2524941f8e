"""An instance: one model replica, a placement group of rank actors (one per GPU).

Every rank holds attention, the dense layers and the shared expert, and its block of the routed
experts; it owns its sequences, KV pages and KV receiver, so the scheduler routes to ranks
(each rank is one scheduler unit, ``unit_id``). Rank 0 is the leader for the pool manager and
hosts the rendezvous of the instance's process group. A rank that dies takes its instance down:
the others' collectives fail, and the pool manager replaces the whole instance.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup

from cluster.config import ClusterConfig
from cluster.messages import InstanceView, WorkerInfo, WorkerStats, unit_id
from cluster.placement import create_instance_group, instance_bundles, rank_options, remove_group
from cluster.worker import make_rank_worker

STARTING, SERVING, MOVING, DRAINING, DEAD = "starting", "serving", "moving", "draining", "dead"


@dataclass
class Instance:
    """The pool manager's record of one instance."""

    instance_id: str
    role: str
    pg: PlacementGroup | None = None
    ranks: list[Any] = field(default_factory=list)  # rank actor handles, rank 0 first
    infos: list[WorkerInfo] = field(default_factory=list)
    state: str = STARTING

    num_ranks: int = 1

    @property
    def leader(self) -> Any:
        return self.ranks[0]

    @property
    def unit_ids(self) -> list[str]:
        """The scheduler's ids of this instance's ranks, rank 0 first."""
        return [unit_id(self.instance_id, r, self.num_ranks) for r in range(self.num_ranks)]

    def units(self) -> dict[str, Any]:
        """scheduler unit id -> rank actor handle."""
        return dict(zip(self.unit_ids, self.ranks, strict=True))

    def view(self, rank_stats: list[WorkerStats | None]) -> InstanceView:
        return InstanceView(
            instance_id=self.instance_id,
            role=self.role,
            state=self.state,
            num_ranks=self.num_ranks,
            node_ids=tuple(i.node_id for i in self.infos),
            stats=rank_stats[0] if rank_stats else None,
            rank_stats=tuple(rank_stats),
        )


async def start_instance(
    instance_id: str,
    role: str,
    config: ClusterConfig,
    scheduler: Any,
    has_gpus: bool,
    timeout_s: float = 300.0,
) -> Instance:
    """Place and start every rank of a new instance and wait until their engines are loaded.
    On failure nothing is left behind (actors killed, group removed) and the error is raised."""
    pool = config.pool(role)
    inst = Instance(instance_id, role, num_ranks=pool.num_ranks)
    try:
        bundles = instance_bundles(pool, has_gpus)
        inst.pg = await create_instance_group(f"{config.name}/{instance_id}", bundles, timeout_s)
        for rank in range(pool.num_ranks):
            inst.ranks.append(
                make_rank_worker(
                    instance_id,
                    rank,
                    pool.num_ranks,
                    role,
                    config,
                    scheduler,
                    name=f"{config.name}/{instance_id}/r{rank}",
                    namespace="tidal",
                    **rank_options(inst.pg, pool, rank, has_gpus),
                )
            )
        address = None
        if pool.num_ranks > 1:  # the group meets at rank 0, on its node
            address = await asyncio.wait_for(inst.leader.rendezvous_address.remote(), timeout_s)
        inst.infos = list(
            await asyncio.wait_for(
                asyncio.gather(*(r.launch.remote(address) for r in inst.ranks)), timeout_s
            )
        )
    except BaseException:
        stop_instance(inst)
        raise
    return inst


def stop_instance(inst: Instance) -> None:
    """Kill the ranks and release the placement group (pages die with the process)."""
    for rank in inst.ranks:
        try:
            ray.kill(rank, no_restart=True)
        except Exception:  # already dead
            pass
    if inst.pg is not None:
        remove_group(inst.pg)
    inst.state = DEAD
