"""Metrics through Ray's metrics export (Prometheus format on each node's metrics port).

Every name starts with ``tidal_`` (Ray's exporter may add its own ``ray_`` prefix in front).
Three producers:
- ``IngressMetrics`` (ingress replicas): TTFT, inter-token latency, end-to-end latency, routing
  wait, requests by outcome, tokens in and out, prefix-cache hit tokens, admission rejects.
- ``WorkerMetrics`` (every rank): KV pages used/free, batch and queue sizes, prompt/cached/
  generated tokens, KV transfer bytes, per instance and role.
- ``PoolMetrics`` (pool manager): instances per role and state, deaths, scheduler queue length,
  active requests, prefix hit rate, and the planner's recommended prefill share.
"""

from __future__ import annotations

from typing import Any

from ray.util.metrics import Counter, Gauge, Histogram

_LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
_ITL_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5]


class IngressMetrics:
    """Per-request latencies and outcomes, recorded by the ingress."""

    def __init__(self) -> None:
        tags = ("model",)
        self.ttft = Histogram("tidal_ttft_seconds", "time to first token", _LATENCY_S, tags)
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


class WorkerMetrics:
    """Gauges and counters of one rank, refreshed from its ``WorkerStats``."""

    def __init__(self, instance_id: str) -> None:
        self._instance_id = instance_id
        tags = ("instance", "role")
        self._gauges = {
            "num_used_pages": Gauge("tidal_kv_pages_used", "KV pages in use", tags),
            "num_free_pages": Gauge("tidal_kv_pages_free", "KV pages free", tags),
            "num_running": Gauge("tidal_decode_batch_seqs", "sequences decoding", tags),
            "num_waiting": Gauge("tidal_decode_waiting_seqs", "sequences waiting", tags),
            "num_queued": Gauge("tidal_prefill_queue_len", "prefill jobs queued", tags),
            "num_queued_tokens": Gauge("tidal_prefill_queue_tokens", "prompt tokens queued", tags),
            "num_cached_blocks": Gauge("tidal_prefix_cache_blocks", "prefix cache blocks", tags),
        }
        self._counters = {
            "num_prompt_tokens": Counter("tidal_worker_prompt_tokens_total", "prefilled", tags),
            "num_cached_tokens": Counter(
                "tidal_worker_prefix_hit_tokens_total", "prompt tokens from the prefix cache", tags
            ),
            "num_generated_tokens": Counter("tidal_worker_generated_tokens_total", "", tags),
            "num_transfer_bytes": Counter("tidal_kv_transfer_bytes_total", "KV bytes sent", tags),
        }
        self._last: dict[str, int] = {}

    def update(self, stats: Any) -> None:
        tags = {"instance": self._instance_id, "role": stats.role}
        for field, gauge in self._gauges.items():
            gauge.set(float(getattr(stats, field)), tags)
        for field, counter in self._counters.items():
            value = getattr(stats, field)
            delta = value - self._last.get(field, 0)
            if delta > 0:
                counter.inc(float(delta), tags)
            self._last[field] = value  # a new stage restarts its totals at 0


class PoolMetrics:
    """Pool sizes and scheduler state, refreshed by the pool manager's health loop."""

    def __init__(self) -> None:
        self.instances = Gauge("tidal_instances", "instances by role and state", ("role", "state"))
        self.deaths = Counter("tidal_instance_deaths_total", "instances found dead", ("role",))
        self.queue_len = Gauge("tidal_scheduler_queue_len", "requests waiting for decode pages")
        self.active = Gauge("tidal_scheduler_active_requests", "requests holding a reservation")
        self.hit_rate = Gauge("tidal_prefix_hit_rate", "expected prefix-cache hit rate")
        self.rejects = Gauge("tidal_scheduler_rejects", "rejects since start", ("reason",))
        self.pd_ratio = Gauge(
            "tidal_planner_prefill_fraction", "planner's recommended prefill share of instances"
        )
        self.balancedness = Gauge(
            "tidal_eplb_balancedness",
            "mean / max rank load per MoE layer over the last window (EPLB)",
            ("instance_id", "layer"),
        )
        self.rebalances = Counter(
            "tidal_eplb_rebalances_total", "EPLB rounds by outcome", ("outcome",)
        )
        self.moved_slots = Counter("tidal_eplb_moved_slots_total", "expert slots re-pointed")
        self.moved_bytes = Counter("tidal_eplb_bytes_read_total", "expert weight bytes staged")
        self.rebalance_s = Gauge("tidal_eplb_rebalance_seconds", "duration of the last round")
        self._seen: set[tuple[str, str]] = set()

    def rebalanced(self, result: Any) -> None:
        """One EPLB round (``cluster.rebalance.RebalanceResult``)."""
        outcome = "failed" if result.error else ("moved" if result.num_moved_slots else "kept")
        self.rebalances.inc(1.0, {"outcome": outcome})
        for layer, b in enumerate(result.balancedness_after):
            self.balancedness.set(b, {"instance_id": result.instance_id, "layer": str(layer)})
        if result.num_moved_slots:
            self.moved_slots.inc(float(result.num_moved_slots))
            self.moved_bytes.inc(float(result.bytes_read))
            self.rebalance_s.set(result.seconds)

    def instance_died(self, role: str) -> None:
        self.deaths.inc(1.0, {"role": role})

    def update(self, counts: dict[tuple[str, str], int], sched: Any, now: float) -> None:
        for key in self._seen - set(counts):
            self.instances.set(0.0, {"role": key[0], "state": key[1]})
        for (role, state), n in counts.items():
            self.instances.set(float(n), {"role": role, "state": state})
        self._seen = set(counts)
        self.queue_len.set(float(sched.num_queued))
        self.active.set(float(sched.num_active))
        self.hit_rate.set(float(sched.prefix_hit_rate))
        for reason, n in sched.num_rejected.items():
            self.rejects.set(float(n), {"reason": reason})

    def set_recommendation(self, prefill_fraction: float) -> None:
        self.pd_ratio.set(prefill_fraction)


async def scrape_tidal_metrics(timeout_s: float = 5.0) -> str:
    """Every ``tidal_*`` series of every alive node's Ray metrics exporter, in Prometheus text
    format, with the exporter's ``ray_`` prefix removed (``GET /metrics`` on the ingress).
    Prometheus in production scrapes the node exporters directly (deploy/prometheus.yml)."""
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
