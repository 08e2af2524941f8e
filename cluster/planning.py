"""Feeds the P:D planner (scheduler/planner.py) with what the cluster measured.

Every ``window_s`` the pool manager hands in the scheduler's counters and the workers' stats;
the difference to the previous window gives the workload (arrival rate, prompt, uncached and
output lengths) and the workers give the speed (prefill tokens/s, decode step time). The
recommendation is exported as a metric and shown in ``GET /admin/pools``; applying it is an
operator's (or an autoscaler's) ``POST /admin/pools``.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.messages import WorkerStats
from scheduler.planner import SLO, InstancePerf, PDRecommendation, Workload, recommend
from scheduler.state import SchedulerStats


@dataclass(frozen=True)
class _Sample:
    time_s: float
    num_routed: int
    num_prompt_tokens: int
    num_hit_tokens: int
    num_generated_tokens: int


class PlannerFeed:
    """Turns successive measurements into ``PDRecommendation``s (plain Python)."""

    def __init__(self, slo: SLO, max_batch_size: int, window_s: float = 10.0) -> None:
        self.slo = slo
        self.max_batch_size = max_batch_size
        self.window_s = window_s
        self._last: _Sample | None = None
        self.recommendation: PDRecommendation | None = None

    def is_due(self, now_s: float) -> bool:
        return self._last is None or now_s - self._last.time_s >= self.window_s

    def observe(
        self, now_s: float, sched: SchedulerStats, workers: list[WorkerStats]
    ) -> PDRecommendation | None:
        """A new recommendation when a window with traffic has passed, else None."""
        sample = _Sample(
            now_s,
            sched.num_routed,
            sched.num_prompt_tokens,
            sched.num_prefix_hit_tokens,
            sum(w.num_generated_tokens for w in workers),
        )
        last = self._last
        if last is not None and now_s - last.time_s < self.window_s:
            return None
        self._last = sample
        if last is None or sample.num_routed <= last.num_routed:
            return None
        n = sample.num_routed - last.num_routed
        prompt = (sample.num_prompt_tokens - last.num_prompt_tokens) / n
        hits = (sample.num_hit_tokens - last.num_hit_tokens) / n
        output = max(sample.num_generated_tokens - last.num_generated_tokens, 0) / n
        workload = Workload(
            n / (now_s - last.time_s), prompt, max(prompt - hits, 1.0), max(output, 1.0)
        )
        perf = _perf(workers, self.max_batch_size)
        num_instances = max(len(workers), 2)
        if perf is None:
            return None
        self.recommendation = recommend(workload, perf, self.slo, num_instances)
        return self.recommendation


def _perf(workers: list[WorkerStats], max_batch_size: int) -> InstancePerf | None:
    prefill = [w.prefill_tokens_per_s for w in workers if w.prefill_tokens_per_s]
    decode = [w.decode_step_s for w in workers if w.decode_step_s]
    if not prefill or not decode:
        return None
    return InstancePerf(
        prefill_tokens_per_s=sum(prefill) / len(prefill),
        decode_step_s=sum(decode) / len(decode),
        decode_batch_size=max_batch_size,
    )
