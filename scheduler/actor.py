"""The scheduler as one Ray actor: a thin async shell around ``Scheduler`` (the only Ray import
in scheduler/).

    from scheduler.actor import make_scheduler_actor
    sched = make_scheduler_actor(SchedulerConfig(...), name="tidal-scheduler")
    answer = await sched.route.remote(RequestSpec.from_token_ids(rid, ids, max_tokens), owner)
    # answer: RouteDecision | Rejection   (never Queued: the actor awaits the queue for you)
    sched.renew.remote(owner)  # every owner_lease_s / 5, while the owner lives

The actor is async, so every call runs on one event loop thread and the core needs no locks.
``route`` of a request that must wait for decode pages parks on a future that is resolved by a
later ``drain_queue`` (after any call that may free pages, and every ``drain_interval_s``), so
the caller simply awaits the final decision. Errors cross the boundary as values: ``route``
returns ``Rejection(status=500, reason="internal")``, other methods return ``SchedulerError``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import ray

from scheduler.config import SchedulerConfig
from scheduler.ledger import Orphan
from scheduler.policy import Scheduler
from scheduler.state import (
    DecodeInstanceState,
    PrefillInstanceState,
    Queued,
    Rejection,
    RequestSpec,
    Role,
    RouteDecision,
    SchedulerError,
    SchedulerStats,
)

T = TypeVar("T")


class SchedulerActor:
    """Ray actor body (``ray.remote`` is applied by ``make_scheduler_actor``); same methods as
    ``Scheduler`` minus ``drain_queue``, all async, with errors as values."""

    def __init__(self, config: SchedulerConfig, drain_interval_s: float = 0.25) -> None:
        self._core = Scheduler(config)
        self._drain_interval_s = drain_interval_s
        self._waiters: dict[str, asyncio.Future[RouteDecision | Rejection]] = {}
        self._ticker: asyncio.Task[None] | None = None

    async def route(self, spec: RequestSpec, owner: str | None = None) -> RouteDecision | Rejection:
        try:
            answer = self._core.route(spec, owner)
        except Exception as e:  # noqa: BLE001 - a bug must not kill the cluster's only scheduler
            return Rejection(spec.request_id, 500, "internal", f"{type(e).__name__}: {e}")
        if not isinstance(answer, Queued):
            return answer
        self._start_ticker()
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[spec.request_id] = waiter
        return await waiter

    async def add_instance(self, instance_id: str, role: Role | str) -> SchedulerError | None:
        return self._call(self._core.add_instance, instance_id, role)

    async def remove_instance(self, instance_id: str) -> list[RequestSpec] | SchedulerError:
        """Requests to re-route (their reservations are already released)."""
        return self._call(self._core.remove_instance, instance_id, drain=True)

    async def update_prefill(self, state: PrefillInstanceState) -> SchedulerError | None:
        return self._call(self._core.update_prefill, state)

    async def update_decode(self, state: DecodeInstanceState) -> SchedulerError | None:
        return self._call(self._core.update_decode, state, drain=True)

    async def on_prefill_done(self, request_id: str) -> bool | SchedulerError:
        return self._call(self._core.on_prefill_done, request_id)

    async def on_finished(self, request_id: str) -> bool | SchedulerError:
        return await self.on_cancel(request_id)

    async def on_cancel(self, request_id: str) -> bool | SchedulerError:
        """Release the request's reservations; a still-queued ``route`` returns 499."""
        waiter = self._waiters.pop(request_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(Rejection(request_id, 499, "cancelled", "cancelled while queued"))
        return self._call(self._core.on_cancel, request_id, drain=True)

    async def renew(self, owner: str) -> None:
        self._core.renew(owner)

    async def expire_owners(self) -> list[Orphan] | SchedulerError:
        """Let go of the requests of owners whose lease lapsed (a still-queued ``route`` of
        theirs returns 499); the caller cancels the rest on their instances."""
        orphans = self._call(self._core.expire_owners, drain=True)
        if isinstance(orphans, SchedulerError):
            return orphans
        for o in orphans:
            waiter = self._waiters.pop(o.request_id, None)
            if waiter is not None and not waiter.done():
                message = "cancelled while queued: its owner's lease lapsed"
                waiter.set_result(Rejection(o.request_id, 499, "cancelled", message))
        return orphans

    async def stats(self) -> SchedulerStats:
        return self._core.stats()

    # ---- internals -------------------------------------------------------------------------
    def _call(self, fn: Callable[..., T], *args: Any, drain: bool = False) -> T | SchedulerError:
        try:
            result = fn(*args)
        except Exception as e:  # noqa: BLE001 - errors are values across the actor boundary
            return SchedulerError(f"{fn.__name__}: {type(e).__name__}: {e}")
        if drain:
            self._drain()
        return result

    def _drain(self) -> None:
        for answer in self._core.drain_queue():
            waiter = self._waiters.pop(answer.request_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(answer)
            elif isinstance(answer, RouteDecision):
                # Nobody waits any more (caller gone): give the reservation back.
                self._core.on_cancel(answer.request_id)

    def _start_ticker(self) -> None:
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        # Queue deadlines pass without any call arriving; keep draining while anyone waits.
        while self._waiters or self._core.num_queued:
            await asyncio.sleep(self._drain_interval_s)
            self._drain()


def make_scheduler_actor(
    config: SchedulerConfig,
    *,
    name: str | None = None,
    drain_interval_s: float = 0.25,
    **options: Any,
) -> Any:
    """Start the scheduler actor; returns its handle. ``name`` makes it a detached-lookup-able
    named actor (``ray.get_actor(name)``); ``options`` go to ``.options()`` (namespace,
    lifetime, ...). It asks for no CPU: it is light and must not take a worker's slot."""
    opts: dict[str, Any] = {"num_cpus": 0, "max_concurrency": 1000, **options}
    if name is not None:
        opts["name"] = name
    return ray.remote(SchedulerActor).options(**opts).remote(config, drain_interval_s)
