"""The cluster simulator: the real scheduler and P:D planner on simulated instances, driven by a
Mooncake-format trace and a cost profile. Plain Python (no torch, no Ray); see README.md here.
"""

from scheduler.sim.cluster import Outcome, SimCluster, SimConfig, SimResult, scheduler_config_for
from scheduler.sim.events import EventLoop
from scheduler.sim.profile import CostProfile, load_profile
from scheduler.sim.report import SLOSpec, summarize
from scheduler.sim.trace import SimRequest, TraceRow, TraceScale, build_requests, load_trace

__all__ = [
    "CostProfile",
    "EventLoop",
    "Outcome",
    "SLOSpec",
    "SimCluster",
    "SimConfig",
    "SimRequest",
    "SimResult",
    "TraceRow",
    "TraceScale",
    "build_requests",
    "load_profile",
    "load_trace",
    "scheduler_config_for",
    "summarize",
]
