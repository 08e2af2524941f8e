"""Feeds the P:D planner (scheduler/planner.py) with what the cluster measured.

Every ``window_s`` the pool manager hands in the scheduler's counters and the workers' stats;
the difference to the previous window gives the workload (arrival rate, prompt, uncached and
output lengths) and the workers give the speed (prefill tokens/s, decode step time). The
recommendation is exported as a metric and shown in ``GET /admin/pools``; the pool manager's
auto mode applies it through role moves (scheduler/pool_policy.py), manual mode leaves it to an
operator (``tidal pools move``). Speed samples come only from warm workers (``observe``'s
``perf_workers``): a worker that just started or changed role measures cold steps.
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
        self.workload: Workload | None = None  # of the last window with traffic
        self.perf: InstancePerf | None = None

    def is_due(self, now_s: float) -> bool:
        return self._last is None or now_s - self._last.time_s >= self.window_s

    def observe(
        self,
        now_s: float,
        sched: SchedulerStats,
        workers: list[WorkerStats],
        num_instances: int | None = None,
        perf_workers: list[WorkerStats] | None = None,
    ) -> PDRecommendation | None:
        """A new recommendation when a window with traffic has passed, else None.
        ``workers``: every serving rank (tokens generated); ``num_instances``: the P + D budget
        (default: one per worker); ``perf_workers``: the warm ones whose speed counts."""
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
        perf = _perf(workers if perf_workers is None else perf_workers, self.max_batch_size)
        if perf is None:
            return None
        budget = max(num_instances if num_instances is not None else len(workers), 2)
        self.workload, self.perf = workload, perf
        self.recommendation = recommend(workload, perf, self.slo, budget)
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
