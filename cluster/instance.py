"""An instance: one model replica, a placement group of rank actors (one per GPU).

Rank 0 is the leader: the ingress and the pool manager talk to it. With one rank (all that
runs today) the leader is the instance; an expert-parallel instance adds ranks that the leader
drives through torch.distributed, with the same placement group and the same API outside.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup

from cluster.config import ClusterConfig
from cluster.messages import InstanceView, WorkerInfo, WorkerStats
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

    @property
    def leader(self) -> Any:
        return self.ranks[0]

    def view(self, stats: WorkerStats | None) -> InstanceView:
        return InstanceView(
            instance_id=self.instance_id,
            role=self.role,
            state=self.state,
            num_ranks=len(self.ranks),
            node_ids=tuple(i.node_id for i in self.infos),
            stats=stats,
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
    bundles = instance_bundles(pool, has_gpus)
    inst = Instance(instance_id, role)
    try:
        inst.pg = await create_instance_group(f"{config.name}/{instance_id}", bundles, timeout_s)
        for rank, bundle in enumerate(bundles):
            inst.ranks.append(
                make_rank_worker(
                    instance_id,
                    rank,
                    role,
                    config,
                    scheduler,
                    name=f"{config.name}/{instance_id}/r{rank}",
                    namespace="tidal",
                    **rank_options(inst.pg, rank, bundle),
                )
            )
        inst.infos = list(
            await asyncio.wait_for(
                asyncio.gather(*(r.ready.remote() for r in inst.ranks)), timeout_s
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
