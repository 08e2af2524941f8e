"""Prefill:decode ratio planner: how to split an instance budget between the two pools.

Pure functions on measured rates. The model:
- Prefill: requests arrive at ``arrival_rate`` and spread evenly over ``n`` instances; each
  needs ``S = mean_uncached_len / prefill_tokens_per_s`` seconds of compute, so an instance is an
  M/D/1 queue with utilisation ``rho = arrival_rate * S / n`` and mean wait
  ``rho * S / (2 * (1 - rho))``. TTFT = wait + S + KV transfer of the whole prompt.
- Decode: a request occupies a batch slot for ``mean_output_len * decode_step_s`` seconds
  (step time measured at ``decode_batch_size``), so by Little's law the pool must hold
  ``arrival_rate * mean_output_len * decode_step_s`` sequences at once, each holding about
  ``mean_prompt_len + mean_output_len / 2`` tokens of KV. Utilisation = the larger of the slot
  and KV fractions.
- A pool meets its SLO when its utilisation is at most ``slo.max_utilization`` and (prefill) the
  TTFT is within ``slo.ttft_s``; decode meets the inter-token SLO iff ``decode_step_s <= itl_s``
  (batch size is the knob for that, not the instance count).
``recommend`` takes the smallest counts meeting the SLOs, then hands spare instances one at a
time to the busier pool; over budget, it splits the budget in proportion to the minimum counts
and says it is infeasible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

_MAX_INSTANCES = 100_000


@dataclass(frozen=True)
class Workload:
    """Measured traffic (e.g. over the last few minutes)."""

    arrival_rate: float  # requests/s
    mean_prompt_len: float  # tokens
    mean_uncached_len: float  # prompt tokens that miss the prefix cache
    mean_output_len: float  # generated tokens


@dataclass(frozen=True)
class InstancePerf:
    """Measured speed of one instance."""

    prefill_tokens_per_s: float
    decode_step_s: float  # step time at decode_batch_size
    decode_batch_size: int
    kv_tokens_per_decode_instance: int | None = None  # KV capacity; None = not the limit
    transfer_s_per_token: float = 0.0  # KV transfer time per prompt token (bytes / bandwidth)


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    itl_s: float  # inter-token latency
    max_utilization: float = 0.9  # headroom for bursts


@dataclass(frozen=True)
class PDRecommendation:
    """A recommended pool split, with the estimates behind it."""

    num_prefill: int
    num_decode: int
    prefill_utilization: float
    decode_utilization: float
    estimated_ttft_s: float  # inf when the prefill pool is overloaded
    is_feasible: bool  # both SLOs met within the budget
    reason: str  # why not feasible ("" when feasible)
    why: str = "prefill_bound"  # prefill_bound | decode_bound | over_budget: what set the split

    @property
    def prefill_fraction(self) -> float:
        return self.num_prefill / (self.num_prefill + self.num_decode)


def prefill_utilization(workload: Workload, perf: InstancePerf, num_prefill: int) -> float:
    service_s = workload.mean_uncached_len / perf.prefill_tokens_per_s
    return workload.arrival_rate * service_s / num_prefill


def prefill_ttft_s(workload: Workload, perf: InstancePerf, num_prefill: int) -> float:
    """Mean TTFT with ``num_prefill`` instances (M/D/1 each); inf when overloaded."""
    service_s = workload.mean_uncached_len / perf.prefill_tokens_per_s
    rho = prefill_utilization(workload, perf, num_prefill)
    if rho >= 1.0:
        return math.inf
    wait_s = rho * service_s / (2.0 * (1.0 - rho))
    return wait_s + service_s + workload.mean_prompt_len * perf.transfer_s_per_token


def decode_utilization(workload: Workload, perf: InstancePerf, num_decode: int) -> float:
    """Fraction of the decode pool's batch slots (or KV, if tighter) the traffic occupies."""
    concurrent = workload.arrival_rate * workload.mean_output_len * perf.decode_step_s
    util = concurrent / (num_decode * perf.decode_batch_size)
    if perf.kv_tokens_per_decode_instance is not None:
        kv_tokens = concurrent * (workload.mean_prompt_len + workload.mean_output_len / 2)
        util = max(util, kv_tokens / (num_decode * perf.kv_tokens_per_decode_instance))
    return util


def min_prefill_instances(workload: Workload, perf: InstancePerf, slo: SLO) -> int:
    """Fewest prefill instances meeting the TTFT SLO and utilisation cap. A prompt too long to
    meet ``ttft_s`` even alone only gets the utilisation cap."""
    idle_ttft = prefill_ttft_s(replace(workload, arrival_rate=0.0), perf, 1)
    ttft_target = max(slo.ttft_s, idle_ttft)
    for n in range(1, _MAX_INSTANCES):
        if prefill_utilization(workload, perf, n) <= slo.max_utilization and prefill_ttft_s(
            workload, perf, n
        ) <= ttft_target * (1 + 1e-9):
            return n
    return _MAX_INSTANCES


def min_decode_instances(workload: Workload, perf: InstancePerf, slo: SLO) -> int:
    """Fewest decode instances keeping utilisation under the cap."""
    util_one = decode_utilization(workload, perf, 1)
    return max(1, math.ceil(util_one / slo.max_utilization - 1e-9))


def recommend(
    workload: Workload, perf: InstancePerf, slo: SLO, num_instances: int
) -> PDRecommendation:
    """Split ``num_instances`` (>= 2) into prefill and decode pools (see module doc)."""
    assert num_instances >= 2, "a disaggregated deployment needs at least 2 instances"
    need_p = min_prefill_instances(workload, perf, slo)
    need_d = min_decode_instances(workload, perf, slo)
    reasons = []
    if perf.decode_step_s > slo.itl_s:
        reasons.append(
            f"decode step {perf.decode_step_s * 1e3:.1f} ms at batch {perf.decode_batch_size} "
            f"exceeds the ITL SLO {slo.itl_s * 1e3:.1f} ms; lower the decode batch size"
        )
    if need_p + need_d <= num_instances:
        num_p, num_d = need_p, need_d
        for _ in range(num_instances - need_p - need_d):
            if prefill_utilization(workload, perf, num_p) >= decode_utilization(
                workload, perf, num_d
            ):
                num_p += 1
            else:
                num_d += 1
    else:
        num_p = round(num_instances * need_p / (need_p + need_d))
        num_p = min(max(num_p, 1), num_instances - 1)
        num_d = num_instances - num_p
        reasons.append(
            f"needs {need_p} prefill + {need_d} decode instances, budget is {num_instances}"
        )
    util_p = prefill_utilization(workload, perf, num_p)
    util_d = decode_utilization(workload, perf, num_d)
    if need_p + need_d > num_instances:
        why = "over_budget"
    else:
        why = "prefill_bound" if util_p >= util_d else "decode_bound"
    return PDRecommendation(
        num_prefill=num_p,
        num_decode=num_d,
        prefill_utilization=util_p,
        decode_utilization=util_d,
        estimated_ttft_s=prefill_ttft_s(workload, perf, num_p),
        is_feasible=not reasons,
        reason="; ".join(reasons),
        why=why,
    )
