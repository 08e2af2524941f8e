"""The pool manager: creates instances, checks their health, heals, resizes, and moves them.

It keeps a target size per pool (``prefill``, ``decode``, ``mixed``) and reconciles the live
instances towards it, one membership change at a time:
- grow: place a new instance (placement group + rank actors), wait for its engine, register it
  with the scheduler, switch on its state reports;
- shrink: take the newest instance out of the scheduler (no new routes), let it finish its
  in-flight work (``drain``), then stop it;
- heal: a health loop pings every instance; a dead one (actor gone, or silent past
  ``health_timeout_s``) is removed from the scheduler and stopped, and reconciling starts a
  replacement. The ingress reports a failed call with ``report_failure`` so this happens at once;
- orphans: every health round, the requests of ingress replicas whose lease lapsed (dead
  replicas: ``Scheduler.expire_owners``) are cancelled on the ranks that hold them, so a request
  queued, prefilling or waiting for its transfer gives its pages back within seconds;
- move: an instance changes pool without reloading weights (out of the scheduler, the worker
  drains and rebuilds its stage, back into the scheduler under the new role); the targets
  follow the move;
- plan: every ``planner_window_s`` the P:D planner (cluster/planning.py) recommends a split;
  in auto mode ``scheduler.pool_policy.PoolPolicy`` turns it into at most ``max_moves`` role
  moves (cooldown, confirmation, hysteresis; instances younger than ``warmup_s`` neither move
  nor feed the speed estimates); manual mode only recommends.
The ingress re-routes its own requests that lost an instance; the pool manager only fixes the
pools. It runs as a Serve deployment (one replica, no CPU); the scheduler actor and the
instances are its children, so deleting the application stops everything.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, replace
from typing import Any

import ray
from ray.exceptions import RayActorError

from cluster.config import ROLES, ClusterConfig
from cluster.instance import (
    DEAD,
    DRAINING,
    MOVING,
    SERVING,
    STARTING,
    Instance,
    start_instance,
    stop_instance,
)
from cluster.metrics import PoolMetrics
from cluster.placement import cluster_has_gpus
from cluster.planning import PlannerFeed
from cluster.rebalance import rebalance_instance
from decode.jobs import choice_id
from scheduler.actor import make_scheduler_actor
from scheduler.planner import SLO
from scheduler.pool_policy import PoolDecision, PoolPolicy
from scheduler.state import SchedulerError

log = logging.getLogger(__name__)

SCHEDULER_TIMEOUT_S = 10.0  # a scheduler that does not answer its stats in this long is restarted


class PoolManager:
    """Owns the scheduler actor and every instance of one tidal deployment."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.scheduler = make_scheduler_actor(config.scheduler)
        self._instances: dict[str, Instance] = {}
        self._targets = {role: config.pool(role).num_instances for role in ROLES}
        self._next_id = 0
        self._has_gpus = cluster_has_gpus()
        self._metrics = PoolMetrics()
        self._lock: asyncio.Lock | None = None
        self._startup: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._last_error: str | None = None
        self._num_replaced = 0
        self._num_scheduler_restarts = 0
        self._eplb_version = 0  # placement versions handed out (one sequence per deployment)
        self._last_rebalance = (
            time.monotonic()
        )  # dead instances removed (each one replaced by reconciling)
        self._planner = PlannerFeed(
            SLO(ttft_s=config.scheduler.ttft_slo_s, itl_s=config.itl_slo_s),
            config.decode_stage.max_batch_size,
            config.planner_window_s,
        )
        self._policy = PoolPolicy(config.planner)
        self._decision: PoolDecision | None = None
        self._warm_since: dict[str, float] = {}  # instance -> when it started or last moved
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop yet: the first call starts the pools
        self._ensure_started()

    # ---- queries (ingress, admin) -----------------------------------------------------------
    async def health(self) -> dict[str, Any]:
        """``is_ready``: the initial pools are up and some instance can decode; counts by
        role of serving instances; the last pool change error."""
        startup = self._ensure_started()
        counts = {role: 0 for role in ROLES}
        for inst in self._instances.values():
            if inst.state == SERVING:
                counts[inst.role] += 1
        is_ready = startup.done() and counts["decode"] + counts["mixed"] > 0
        return {"is_ready": is_ready, "serving": counts, "last_error": self._last_error}

    async def scheduler_handle(self, is_suspect: bool = False) -> Any:
        """The scheduler actor; ``is_suspect``: a caller's call to it failed, so check it first
        and restart it if it is gone."""
        self._ensure_started()
        if is_suspect:
            await self._scheduler_stats()
        return self.scheduler

    async def handles(self) -> dict[str, Any]:
        """scheduler unit id (a rank) -> its actor handle, for every instance that may hold
        requests."""
        self._ensure_started()
        return {
            uid: handle
            for i in self._instances.values()
            if i.state in (SERVING, MOVING, DRAINING) and i.ranks
            for uid, handle in i.units().items()
        }

    async def snapshot(self) -> dict[str, Any]:
        """Instances with their live stats, targets and scheduler stats (GET /admin/pools)."""
        self._ensure_started()
        instances = [i for i in self._instances.values() if i.state != DEAD]

        async def stats(inst: Instance) -> list[Any]:
            if not inst.ranks or inst.state == STARTING:
                return []
            answers = await asyncio.gather(
                *(asyncio.wait_for(r.stats.remote(), 5.0) for r in inst.ranks),
                return_exceptions=True,
            )
            return [None if isinstance(a, BaseException) else a for a in answers]

        all_stats = await asyncio.gather(*(stats(i) for i in instances))
        sched = await self._scheduler_stats()
        return {
            "targets": dict(self._targets),
            "instances": [i.view(s).to_dict() for i, s in zip(instances, all_stats, strict=True)],
            "scheduler": {**asdict(sched), "prefix_hit_rate": sched.prefix_hit_rate},
            "num_replaced": self._num_replaced,
            "num_scheduler_restarts": self._num_scheduler_restarts,
            "recommendation": asdict(rec) if (rec := self._planner.recommendation) else None,
            "planner": self.planner_state(),
            "last_error": self._last_error,
        }

    def planner_state(self) -> dict[str, Any]:
        """The planner's mode, its last decision and the measured window behind it."""
        feed = self._planner
        return {
            "mode": "auto" if self._policy.config.is_auto else "manual",
            "decision": asdict(self._decision) if self._decision else None,
            "workload": asdict(feed.workload) if feed.workload else None,
            "perf": asdict(feed.perf) if feed.perf else None,
            "config": asdict(self._policy.config),
        }

    async def set_planner_mode(self, mode: str) -> dict[str, Any]:
        """``auto``: apply the planner's recommendations through role moves; ``manual``:
        recommend only."""
        if mode not in ("auto", "manual"):
            raise ValueError(f"planner mode {mode!r}: use auto or manual")
        self._policy.config = replace(self._policy.config, is_auto=mode == "auto")
        log.info("planner mode: %s", mode)
        return self.planner_state()

    # ---- changes ----------------------------------------------------------------------------
    async def resize(self, sizes: dict[str, int]) -> dict[str, Any]:
        """Set pool sizes (roles not named keep theirs) and wait until the pools match."""
        for role, n in sizes.items():
            if role not in ROLES or n < 0:
                raise ValueError(f"bad pool size {role}={n}; roles are {ROLES}, sizes >= 0")
        targets = {**self._targets, **sizes}
        if targets["decode"] + targets["mixed"] < 1:
            raise ValueError("at least one decode or mixed instance must remain")
        await self._ensure_started()
        async with self._get_lock():
            self._targets = targets
            await self._reconcile()
        self._policy.last_move_s = time.monotonic()  # the planner leaves a resize alone a while
        return await self.snapshot()

    async def move(self, instance_id: str, role: str, source: str = "admin") -> dict[str, Any]:
        """Move a serving instance to another pool, keeping its weights loaded."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; use one of {ROLES}")
        await self._ensure_started()
        async with self._get_lock():
            inst = self._instances.get(instance_id)
            if inst is None or inst.state != SERVING:
                raise ValueError(
                    f"instance {instance_id!r} is not serving; pick one from GET /admin/pools"
                )
            if inst.role != role and self.config.pool(role).num_ranks != inst.num_ranks:
                raise ValueError(
                    f"{instance_id} has {inst.num_ranks} ranks and {role} instances have "
                    f"{self.config.pool(role).num_ranks}; an instance keeps its ranks when it moves"
                )
            if inst.role != role:
                old = inst.role
                remaining = sum(
                    1
                    for i in self._instances.values()
                    if i is not inst and i.state == SERVING and i.role in ("decode", "mixed")
                )
                if old in ("decode", "mixed") and role == "prefill" and remaining == 0:
                    raise ValueError(f"{instance_id} is the last decode instance; add one first")
                inst.state = MOVING
                await self._unregister(inst)
                try:  # every rank at once: their step loops stay in lockstep
                    answers = await asyncio.gather(*(r.set_role.remote(role) for r in inst.ranks))
                except Exception as e:  # a worker that failed half-way is replaced, not reused
                    inst.state = SERVING
                    await self._heal(inst)
                    raise RuntimeError(f"{instance_id}: role change failed: {e}") from e
                inst.role, inst.infos = role, list(answers)
                await self._register(inst)
                self._targets[old] -= 1
                self._targets[role] += 1
                self._warm_since[instance_id] = time.monotonic()
                self._policy.last_move_s = time.monotonic()  # an operator's move counts too
                self._metrics.pool_changed("move", source)
                log.info("%s moved %s -> %s (%s)", instance_id, old, role, source)
        return await self.snapshot()

    async def rebalance(self, instance_id: str | None = None) -> list[dict[str, Any]]:
        """One EPLB round on ``instance_id``, or on every serving expert-parallel instance."""
        await self._ensure_started()
        insts = [
            i
            for i in self._instances.values()
            if i.state == SERVING and i.num_ranks > 1
            and (instance_id is None or i.instance_id == instance_id)
        ]  # fmt: skip
        if instance_id is not None and not insts:
            raise ValueError(
                f"{instance_id!r} is not a serving expert-parallel instance; pick one with "
                "num_ranks > 1 from GET /admin/pools"
            )
        results = []
        for inst in insts:
            self._eplb_version += 1
            result = await rebalance_instance(
                inst.instance_id,
                inst.ranks,
                self.config.pool(inst.role).num_nodes,
                self._eplb_version,
                self.config.eplb_max_moved_fraction,
            )
            self._metrics.rebalanced(result)
            results.append(asdict(result))
        self._last_rebalance = time.monotonic()
        return results

    async def report_failure(self, unit_id: str) -> None:
        """The ingress saw a call to a rank (scheduler unit ``unit_id``) fail: check its
        instance now."""
        inst = next((i for i in self._instances.values() if unit_id in i.unit_ids), None)
        if inst is not None and inst.state in (SERVING, DRAINING):
            if not await self._is_alive(inst):
                await self._heal(inst)

    # ---- internals --------------------------------------------------------------------------
    def _get_lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def _ensure_started(self) -> asyncio.Task[None]:
        if self._startup is None:
            loop = asyncio.get_running_loop()
            self._startup = loop.create_task(self._start())
        return self._startup

    async def _start(self) -> None:
        async with self._get_lock():
            await self._reconcile()
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _reconcile(self) -> None:
        """Start or drain instances until each pool has its target (caller holds the lock)."""
        grow: list[str] = []
        shrink: list[Instance] = []
        for role in ROLES:
            live = [i for i in self._instances.values() if i.role == role and i.state == SERVING]
            n = self._targets[role] - len(live)
            grow += [role] * max(n, 0)
            shrink += live[::-1][: max(-n, 0)]  # newest first
        results = await asyncio.gather(
            *(self._grow(role) for role in grow),
            *(self._shrink(inst) for inst in shrink),
            return_exceptions=True,
        )
        for r in results:
            if isinstance(r, BaseException):
                self._last_error = f"{type(r).__name__}: {r}"
                log.error("pool change failed: %s", self._last_error)

    async def _grow(self, role: str) -> None:
        instance_id = f"i{self._next_id}"
        self._next_id += 1
        self._instances[instance_id] = Instance(instance_id, role)
        try:
            inst = await start_instance(
                instance_id, role, self.config, self.scheduler, self._has_gpus
            )
        except BaseException:
            del self._instances[instance_id]
            raise
        self._instances[instance_id] = inst
        await self._register(inst)
        self._warm_since[instance_id] = time.monotonic()
        self._metrics.pool_changed("grow", "pools")
        log.info("%s started as %s on %s", instance_id, role, inst.infos[0].node_id)

    async def _register(self, inst: Instance) -> None:
        """Every rank into the scheduler (each is a unit), then their reports on."""
        for uid in inst.unit_ids:
            error = await self.scheduler.add_instance.remote(uid, inst.role)
            if isinstance(error, SchedulerError):
                raise RuntimeError(f"scheduler refused {uid}: {error.message}")
        await asyncio.gather(*(r.set_reporting.remote(True) for r in inst.ranks))
        inst.state = SERVING

    async def _unregister(self, inst: Instance) -> None:
        """Reports off and every rank out of the scheduler (no new routes)."""
        await asyncio.gather(*(r.set_reporting.remote(False) for r in inst.ranks))
        for uid in inst.unit_ids:
            await self.scheduler.remove_instance.remote(uid)

    async def _shrink(self, inst: Instance) -> None:
        inst.state = DRAINING
        try:
            await self._unregister(inst)
            await asyncio.gather(*(r.drain.remote() for r in inst.ranks))
            # ranks of one instance stop together (a lone rank's collectives would wait)
            await asyncio.wait_for(
                asyncio.gather(*(r.shutdown.remote() for r in inst.ranks)),
                self.config.ep_timeout_s,
            )
        except Exception as e:  # dead already: nothing left to drain
            log.warning("%s: drain failed: %s", inst.instance_id, e)
        stop_instance(inst)
        self._instances.pop(inst.instance_id, None)
        self._warm_since.pop(inst.instance_id, None)
        self._metrics.pool_changed("shrink", "pools")

    async def _is_alive(self, inst: Instance) -> bool:
        try:
            await asyncio.wait_for(
                asyncio.gather(*(r.ping.remote() for r in inst.ranks)),
                self.config.health_timeout_s,
            )
            return True
        except Exception:  # RayActorError, timeout, or a dead step loop
            return False

    async def _heal(self, inst: Instance) -> None:
        """Remove a dead instance and start its replacement."""
        if inst.state == DEAD:
            return
        log.warning("%s (%s) is dead; replacing it", inst.instance_id, inst.role)
        inst.state = DEAD
        self._num_replaced += 1
        self._metrics.instance_died(inst.role)
        self._metrics.pool_changed("heal", "health")
        self._warm_since.pop(inst.instance_id, None)
        for uid in inst.unit_ids:
            await self.scheduler.remove_instance.remote(uid)
        stop_instance(inst)
        self._instances.pop(inst.instance_id, None)
        task = asyncio.get_running_loop().create_task(self._reconcile_locked())
        self._background.add(task)  # asyncio keeps only weak references to tasks
        task.add_done_callback(self._background.discard)

    async def _reconcile_locked(self) -> None:
        async with self._get_lock():
            await self._reconcile()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            try:
                await self._check_all()
            except Exception:  # the watcher must outlive any one failure
                log.exception("health check round failed")

    async def _check_all(self) -> None:
        watched = [i for i in self._instances.values() if i.state in (SERVING, DRAINING)]
        alive = await asyncio.gather(*(self._is_alive(i) for i in watched))
        for inst, is_alive in zip(watched, alive, strict=True):
            if not is_alive and inst.state in (SERVING, DRAINING):
                await self._heal(inst)
        counts: dict[tuple[str, str], int] = {}
        ranks = {role: 0 for role in ROLES}
        for i in self._instances.values():
            counts[(i.role, i.state)] = counts.get((i.role, i.state), 0) + 1
            if i.state == SERVING:
                ranks[i.role] += i.num_ranks
        sched = await self._scheduler_stats()
        await self._cancel_orphans()
        now = time.monotonic()
        self._metrics.update(counts, ranks, self._targets, sched)
        self._metrics.planner(self._planner.recommendation, self._policy.config.is_auto)
        interval = self.config.eplb_interval_s
        if interval and now - self._last_rebalance >= interval:
            await self.rebalance()
        if self._planner.is_due(now):
            await self._plan(now, sched)

    async def _cancel_orphans(self) -> None:
        """Cancel, on their ranks, the requests of ingress replicas that died."""
        orphans = await self.scheduler.expire_owners.remote()
        if isinstance(orphans, SchedulerError):
            log.error("expiring leases failed: %s", orphans.message)
            return
        if not orphans:
            return
        handles = await self.handles()
        for o in orphans:
            for uid in o.instance_ids:
                if uid in handles:  # a rank gone meanwhile took its requests with it
                    for i in range(o.num_choices):  # a prefill knows only choice 0's id
                        handles[uid].cancel.remote(choice_id(o.request_id, i))
        log.warning("cancelled %d requests of dead ingress replicas", len(orphans))

    async def _scheduler_stats(self) -> Any:
        """The scheduler's stats; a dead scheduler actor is restarted first (``_restart``)."""
        asked = self.scheduler
        try:
            return await asyncio.wait_for(asked.stats.remote(), SCHEDULER_TIMEOUT_S)
        except (RayActorError, asyncio.TimeoutError) as e:
            if self.scheduler is asked:  # not already restarted by a concurrent caller
                log.warning("the scheduler is gone (%s): restarting it", type(e).__name__)
                await self._restart_scheduler()
        return await self.scheduler.stats.remote()

    async def _restart_scheduler(self) -> None:
        """A new scheduler actor, rebuilt from the workers: every serving rank is added again
        and reports to it (free pages, reserved-but-unfilled pages, queues, cached prefixes),
        which are the books it routes by. Requests already placed finish on their workers;
        the ingress fetches the new handle on its next route."""
        old, self.scheduler = self.scheduler, make_scheduler_actor(self.config.scheduler)
        ray.kill(old, no_restart=True)  # a hung one must not come back
        live = [i for i in self._instances.values() if i.ranks and i.state != DEAD]
        await asyncio.gather(
            *(r.set_scheduler.remote(self.scheduler) for i in live for r in i.ranks),
            return_exceptions=True,  # a dead rank is the health check's business
        )
        for inst in live:
            if inst.state == SERVING:
                await self._register(inst)
        self._num_scheduler_restarts += 1
        self._metrics.pool_changed("scheduler_restart", "health")

    async def _plan(self, now: float, sched: Any) -> None:
        """One planner round: measure the window, recommend, and in auto mode move."""
        serving = [i for i in self._instances.values() if i.state == SERVING]
        answers = await asyncio.gather(
            *(r.stats.remote() for i in serving for r in i.ranks), return_exceptions=True
        )
        owners = [i for i in serving for _ in i.ranks]
        warmup_s = self._policy.config.warmup_s
        is_warm = {
            i.instance_id: now - self._warm_since.get(i.instance_id, now) >= warmup_s
            for i in serving
        }
        workers, warm = [], []
        for inst, s in zip(owners, answers, strict=True):
            if isinstance(s, BaseException):
                continue
            workers.append(s)
            if is_warm[inst.instance_id]:
                warm.append(s)
        pd = [i for i in serving if i.role in ("prefill", "decode")]
        if not pd:  # colocated: nothing to split
            return
        rec = self._planner.observe(now, sched, workers, len(pd), warm or None)
        if rec is None:
            return
        self._metrics.planner(rec, self._policy.config.is_auto)
        num_p = sum(1 for i in pd if i.role == "prefill")
        movable = {
            role: sum(1 for i in pd if i.role == role and is_warm[i.instance_id])
            for role in ("prefill", "decode")
        }
        decision = self._policy.decide(
            now, rec, num_p, len(pd) - num_p, movable, self._planner.workload, self._planner.perf
        )
        self._decision = decision
        self._metrics.planner_acted(decision.action)
        if decision.action != "hold":
            log.info("planner: %s (%s)", decision.action, decision.reason)
        for src, dst in decision.moves:
            candidates = [i for i in pd if i.role == src and is_warm[i.instance_id]]
            inst = min(candidates, key=lambda i: self._load(i, owners, answers))
            pd.remove(inst)
            task = asyncio.get_running_loop().create_task(self._planner_move(inst, dst))
            self._background.add(task)  # asyncio keeps only weak references to tasks
            task.add_done_callback(self._background.discard)

    @staticmethod
    def _load(inst: Instance, owners: list[Instance], answers: list[Any]) -> int:
        """Requests an instance holds now (the planner moves the least busy one)."""
        return sum(
            s.num_running + s.num_waiting + s.num_queued
            for o, s in zip(owners, answers, strict=True)
            if o is inst and not isinstance(s, BaseException)
        )

    async def _planner_move(self, inst: Instance, role: str) -> None:
        try:
            await self.move(inst.instance_id, role, source="planner")
        except Exception as e:  # the instance died or changed meanwhile: next round decides
            self._last_error = f"planner move of {inst.instance_id} failed: {e}"
            log.warning(self._last_error)
