"""Metrics through Ray's metrics export (Prometheus format on each node's metrics port).

Every name starts with ``tidal_`` (Ray's exporter adds its own ``ray_`` prefix in front). Three
producers:
- ``IngressMetrics`` (ingress replicas): TTFT and its parts, inter-token latency, end-to-end
  latency, requests by outcome, tokens in and out, prefix-cache hit tokens, admission rejects.
- ``WorkerMetrics`` (every rank): KV pages used/free, batch and queue sizes, prompt/cached/
  generated tokens, KV transfer bytes and seconds, step-loop busy seconds; per rank and role.
- ``PoolMetrics`` (pool manager): instances and ranks per role and state, deaths, pool changes,
  scheduler queue length, active requests, prefix hit rate, the planner's recommendation and
  the reason for it, EPLB rounds.

Label rules (the dashboards rely on them):
- A rank is ``tidal_instance`` (its scheduler unit id, ``i3`` or ``i3.r1``), never ``instance``:
  Prometheus sets ``instance`` to the scrape target on every series and, without
  ``honor_labels``, renames a clashing label to ``exported_instance``. deploy/prometheus keeps
  ``honor_labels: false`` so ``instance`` stays the Ray node's metrics endpoint.
- ``role`` is ``prefill``, ``decode`` or ``mixed``; ``state`` is ``starting``, ``serving``,
  ``moving`` or ``draining`` (``cluster.instance``). Every role x state series is always
  exported (0 when empty), so ratio panels never divide by a missing series.
- Ray's metrics API cannot delete a series, and a gauge keeps its last value while the process
  lives. So when a rank changes role its old-role gauges are set to 0 once (sums by role stay
  right; its old-role counters simply stop growing), and a rank that shuts down zeroes its
  gauges; a process that dies stops exporting and Ray drops its gauges after two export
  intervals. Sum by role; count instances with ``tidal_instances``, not by counting series.
"""

from __future__ import annotations

from typing import Any

from ray.util.metrics import Counter, Gauge, Histogram

_LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
_ITL_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5]
_PART_S = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]

# Where a request's time to first token went, in order (cluster/flow.py measures them).
TTFT_PARTS = (
    "scheduler_queue",  # route(): admission and waiting in the scheduler's queue
    "prefill_queue",  # on the prefill instance, behind other prompts
    "prefill_compute",  # first chunk to last chunk computed
    "transfer_tail",  # last chunk computed to the decode side holding the verified KV
    "decode_admission",  # decode start to the first token at the ingress
)
STATES = ("starting", "serving", "moving", "draining")
ROLE_NAMES = ("prefill", "decode", "mixed")
# Why the planner recommends its split (``scheduler.planner.PDRecommendation.why``).
PLANNER_REASONS = ("prefill_bound", "decode_bound", "over_budget", "idle")


class IngressMetrics:
    """Per-request latencies and outcomes, recorded by the ingress."""

    def __init__(self) -> None:
        tags = ("model",)
        self.ttft = Histogram("tidal_ttft_seconds", "time to first token", _LATENCY_S, tags)
        self.ttft_part = Histogram(
            "tidal_ttft_part_seconds",
            "time to first token by part (scheduler_queue, prefill_queue, prefill_compute, "
            "transfer_tail, decode_admission); the queue parts are the queue wait per pool",
            _PART_S,
            ("model", "part"),
        )
        self.itl = Histogram("tidal_itl_seconds", "inter-token latency", _ITL_S, tags)
        self.e2e = Histogram("tidal_e2e_seconds", "request latency, end to end", _LATENCY_S, tags)
        self.requests = Counter(
            "tidal_requests_total", "finished requests by outcome", ("model", "outcome")
        )
        self.rejects = Counter(
            "tidal_admission_rejects_total", "requests rejected by the scheduler", ("reason",)
        )
        self.prompt_tokens = Counter("tidal_prompt_tokens_total", "prompt tokens served", tags)
        self.cached_tokens = Counter(
            "tidal_prefix_hit_tokens_total", "prompt tokens served from the prefix cache", tags
        )
        self.output_tokens = Counter(
            "tidal_generation_tokens_total", "generated tokens streamed out", tags
        )
        self.reroutes = Counter(
            "tidal_reroutes_total", "requests re-routed after a worker failure", ("stage",)
        )

    def observe_ttft_parts(self, parts: dict[str, float], tags: dict[str, str]) -> None:
        """One request's TTFT parts (names from ``TTFT_PARTS``; a part it skipped is absent)."""
        for part, seconds in parts.items():
            self.ttft_part.observe(max(seconds, 0.0), {**tags, "part": part})


class WorkerMetrics:
    """Gauges and counters of one rank, refreshed from its ``WorkerStats``."""

    _GAUGES = {
        "num_used_pages": ("tidal_kv_pages_used", "KV pages in use"),
        "num_free_pages": ("tidal_kv_pages_free", "KV pages free"),
        "num_running": ("tidal_decode_batch_seqs", "sequences decoding"),
        "num_waiting": ("tidal_decode_waiting_seqs", "sequences waiting for KV or pages"),
        "num_queued": ("tidal_prefill_queue_len", "prefill jobs queued or sending"),
        "num_queued_tokens": ("tidal_prefill_queue_tokens", "prompt tokens queued"),
        "num_cached_blocks": ("tidal_prefix_cache_blocks", "prefix cache blocks"),
    }
    _COUNTERS = {
        "num_prompt_tokens": ("tidal_worker_prompt_tokens_total", "prompt tokens prefilled"),
        "num_cached_tokens": (
            "tidal_worker_prefix_hit_tokens_total",
            "prompt tokens from the prefix cache",
        ),
        "num_generated_tokens": ("tidal_worker_generated_tokens_total", "tokens generated"),
        "num_transfer_bytes": (
            "tidal_kv_transfer_bytes_total",
            "KV bytes sent and verified by the receiver (measured on the wire)",
        ),
        "transfer_s": (
            "tidal_kv_transfer_seconds_total",
            "seconds KV transfers took, open to verified close (measured by the sender)",
        ),
        "busy_s": (
            "tidal_worker_busy_seconds_total",
            "seconds the step loop spent in steps that did work; rate() is the utilisation",
        ),
    }

    def __init__(self, unit_id: str) -> None:
        self._unit_id = unit_id
        tags = ("tidal_instance", "role")
        self._gauges = {f: Gauge(n, d, tags) for f, (n, d) in self._GAUGES.items()}
        self._counters = {f: Counter(n, d, tags) for f, (n, d) in self._COUNTERS.items()}
        self._last: dict[str, float] = {}
        self._role: str | None = None

    def update(self, stats: Any) -> None:
        if self._role is not None and stats.role != self._role:
            self._zero(self._role)  # the old role's series stop counting in sums by role
        self._role = stats.role
        tags = {"tidal_instance": self._unit_id, "role": stats.role}
        for field, gauge in self._gauges.items():
            gauge.set(float(getattr(stats, field)), tags)
        for field, counter in self._counters.items():
            value = float(getattr(stats, field))
            last = self._last.get(field, 0.0)
            if value < last:  # a new stage restarts its totals at 0
                last = 0.0
            if value > last:
                counter.inc(value - last, tags)
            self._last[field] = value

    def close(self) -> None:
        """Zero the gauges (the rank is shutting down)."""
        if self._role is not None:
            self._zero(self._role)

    def _zero(self, role: str) -> None:
        tags = {"tidal_instance": self._unit_id, "role": role}
        for gauge in self._gauges.values():
            gauge.set(0.0, tags)


class PoolMetrics:
    """Pool sizes, pool changes, scheduler state and the planner, refreshed by the pool
    manager's health loop (every ``health_interval_s``)."""

    def __init__(self) -> None:
        self.instances = Gauge("tidal_instances", "instances by role and state", ("role", "state"))
        self.ranks = Gauge("tidal_ranks", "ranks of serving instances by role", ("role",))
        self.targets = Gauge("tidal_pool_target", "target instances per pool", ("role",))
        self.deaths = Counter("tidal_instance_deaths_total", "instances found dead", ("role",))
        self.changes = Counter(
            "tidal_pool_changes_total",
            "pool membership changes (kind: grow, shrink, move, heal; source: pools for a "
            "resize or a replacement, admin or planner for a move, health for a dead instance)",
            ("kind", "source"),
        )
        self.queue_len = Gauge("tidal_scheduler_queue_len", "requests waiting for decode pages")
        self.active = Gauge("tidal_scheduler_active_requests", "requests holding a reservation")
        self.hit_rate = Gauge("tidal_prefix_hit_rate", "expected prefix-cache hit rate")
        self.rejects = Gauge("tidal_scheduler_rejects", "rejects since start", ("reason",))
        self.pd_ratio = Gauge(
            "tidal_planner_prefill_fraction", "planner's recommended prefill share of instances"
        )
        self.recommended = Gauge(
            "tidal_planner_recommended_instances", "planner's recommended instances", ("role",)
        )
        self.utilization = Gauge(
            "tidal_planner_utilization",
            "planner's estimated utilisation of each pool at the recommended split",
            ("role",),
        )
        self.reason = Gauge(
            "tidal_planner_reason",
            "1 for the reason behind the current recommendation (prefill_bound, decode_bound, "
            "over_budget, idle), 0 for the others",
            ("reason",),
        )
        self.auto = Gauge("tidal_planner_auto", "1 when the planner applies its recommendation")
        self.planner_actions = Counter(
            "tidal_planner_actions_total",
            "planner rounds by action (move, hold, cooldown, warming, manual)",
            ("action",),
        )
        self.balancedness = Gauge(
            "tidal_eplb_balancedness",
            "mean / max rank load per MoE layer over the last window (EPLB)",
            ("tidal_instance", "layer"),
        )
        self.rebalances = Counter(
            "tidal_eplb_rebalances_total", "EPLB rounds by outcome", ("outcome",)
        )
        self.moved_slots = Counter("tidal_eplb_moved_slots_total", "expert slots re-pointed")
        self.moved_bytes = Counter("tidal_eplb_bytes_read_total", "expert weight bytes staged")
        self.rebalance_s = Gauge("tidal_eplb_rebalance_seconds", "duration of the last round")
        self.rebalance_longest_step = Gauge(
            "tidal_eplb_rebalance_longest_step_seconds",
            "the longest rank step while the last round staged and swapped its placement",
        )
        self.rebalance_step_ratio = Gauge(
            "tidal_eplb_rebalance_step_ratio",
            "the last round's longest step over the median step before it (1: no stall)",
        )

    def rebalanced(self, result: Any) -> None:
        """One EPLB round (``cluster.rebalance.RebalanceResult``)."""
        outcome = "failed" if result.error else ("moved" if result.num_moved_slots else "kept")
        self.rebalances.inc(1.0, {"outcome": outcome})
        for layer, b in enumerate(result.balancedness_after):
            self.balancedness.set(b, {"tidal_instance": result.instance_id, "layer": str(layer)})
        if result.num_moved_slots:
            self.moved_slots.inc(float(result.num_moved_slots))
            if result.bytes_read:  # 0 when every moved slot took an expert the rank held
                self.moved_bytes.inc(float(result.bytes_read))
            self.rebalance_s.set(result.seconds)
            self.rebalance_longest_step.set(result.longest_step_s)
            if result.step_ratio is not None:
                self.rebalance_step_ratio.set(result.step_ratio)

    def instance_died(self, role: str) -> None:
        self.deaths.inc(1.0, {"role": role})

    def pool_changed(self, kind: str, source: str) -> None:
        self.changes.inc(1.0, {"kind": kind, "source": source})

    def update(
        self,
        counts: dict[tuple[str, str], int],
        ranks: dict[str, int],
        targets: dict[str, int],
        sched: Any,
    ) -> None:
        """Every role x state (0 when empty), serving ranks and targets per role, the
        scheduler's state."""
        for role in ROLE_NAMES:
            for state in STATES:
                self.instances.set(
                    float(counts.get((role, state), 0)), {"role": role, "state": state}
                )
            self.ranks.set(float(ranks.get(role, 0)), {"role": role})
            self.targets.set(float(targets.get(role, 0)), {"role": role})
        self.queue_len.set(float(sched.num_queued))
        self.active.set(float(sched.num_active))
        self.hit_rate.set(float(sched.prefix_hit_rate))
        for reason, n in sched.num_rejected.items():
            self.rejects.set(float(n), {"reason": reason})

    def planner(self, rec: Any, is_auto: bool) -> None:
        """The current recommendation (``scheduler.planner.PDRecommendation``; None before the
        first window with traffic: the reason is ``idle``) and the planner's mode."""
        self.auto.set(1.0 if is_auto else 0.0)
        why = rec.why if rec is not None else "idle"
        for reason in PLANNER_REASONS:
            self.reason.set(1.0 if reason == why else 0.0, {"reason": reason})
        if rec is None:
            return
        self.pd_ratio.set(rec.prefill_fraction)
        self.recommended.set(float(rec.num_prefill), {"role": "prefill"})
        self.recommended.set(float(rec.num_decode), {"role": "decode"})
        self.utilization.set(rec.prefill_utilization, {"role": "prefill"})
        self.utilization.set(rec.decode_utilization, {"role": "decode"})

    def planner_acted(self, action: str) -> None:
        self.planner_actions.inc(1.0, {"action": action})


async def scrape_tidal_metrics(timeout_s: float = 5.0) -> str:
    """Every ``tidal_*`` series of every alive node's Ray metrics exporter, in Prometheus text
    format, with the exporter's ``ray_`` prefix removed (``GET /metrics`` on the ingress).
    Prometheus in production scrapes the node exporters directly (deploy/prometheus/)."""
    import asyncio

    import httpx
    import ray

    nodes = await asyncio.to_thread(ray.nodes)
    urls = [
        f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
        for n in nodes
        if n.get("Alive") and n.get("MetricsExportPort")
    ]
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        answers = await asyncio.gather(*(client.get(u) for u in urls), return_exceptions=True)
    seen: set[str] = set()
    lines: list[str] = []
    for answer in answers:
        if isinstance(answer, BaseException) or answer.status_code != 200:
            continue
        for line in answer.text.splitlines():
            line = line.replace("ray_tidal_", "tidal_", 1)
            is_meta = line.startswith("# ")
            if "tidal_" not in line or (is_meta and not line.split()[2].startswith("tidal_")):
                continue
            if is_meta and line in seen:  # HELP/TYPE once across nodes
                continue
            seen.add(line)
            lines.append(line)
    return "\n".join(lines) + "\n"
