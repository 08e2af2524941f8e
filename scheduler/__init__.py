"""Routing, admission control, prefix hashing and the P:D planner. Plain Python except actor.py.

Public API (see scheduler/README.md): ``SchedulerConfig``, ``Scheduler``, the messages in
``scheduler.state``, ``block_hashes`` / ``BlockLRU`` in ``common.prefix``, the planner in
``scheduler.planner``, and ``make_scheduler_actor`` in ``scheduler.actor`` (imports Ray: import
it from its module, not from here).
"""

from common.prefix import BlockLRU, InsertResult, block_hashes
from scheduler.config import SchedulerConfig
from scheduler.ledger import Orphan, UnknownInstanceError
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

__all__ = [
    "BlockLRU",
    "DecodeInstanceState",
    "InsertResult",
    "Orphan",
    "PrefillInstanceState",
    "Queued",
    "Rejection",
    "RequestSpec",
    "Role",
    "RouteDecision",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerError",
    "SchedulerStats",
    "UnknownInstanceError",
    "block_hashes",
]
