"""Figures of one simulated replay: latency percentiles, SLO attainment, prefix hits, rejects,
utilisation; and DistServe goodput over a rate search.

TTFT is arrival -> first token at the client; TBT (inter-token latency) is every gap between
two tokens of a request, so a decode step's gap counts once per sequence in its batch; TPOT is a
request's mean gap. A request meets the SLO when it completes with TTFT <= ``ttft_s`` and TPOT
<= ``tpot_s``. Goodput (DistServe) is the highest arrival rate at which at least
``attainment`` (90%) of the requests meet the SLO.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from scheduler.sim.cluster import Outcome, SimResult

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class SLOSpec:
    ttft_s: float = 2.0
    tpot_s: float = 0.1
    attainment: float = 0.9  # DistServe's 90%


def percentile(xs: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear interpolation; None for no samples."""
    if not xs:
        return None
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def weighted_percentile(samples: Sequence[tuple[float, int]], q: float) -> float | None:
    """The q-th percentile of values given as (value, count) pairs (lower value at a tie)."""
    total = sum(n for _, n in samples)
    if total == 0:
        return None
    target = total * q / 100.0
    seen = 0
    for value, n in sorted(samples):
        seen += n
        if seen >= target:
            return value
    return max(v for v, _ in samples)


def meets_slo(o: Outcome, slo: SLOSpec) -> bool:
    if o.finish_s is None or o.ttft_s is None or o.ttft_s > slo.ttft_s:
        return False
    tpot = o.tpot_s
    return tpot is None or tpot <= slo.tpot_s


def summarize(result: SimResult, slo: SLOSpec) -> dict[str, Any]:
    """The report of one replay (times in seconds)."""
    outs = result.outcomes
    done = [o for o in outs if o.finish_s is not None]
    ttfts = [o.ttft_s for o in done if o.ttft_s is not None]
    tpots = [t for o in done if (t := o.tpot_s) is not None]
    prompt = sum(o.prompt_len for o in done)
    num_good = sum(meets_slo(o, slo) for o in outs)
    span = max((o.arrival_s for o in outs), default=0.0) - min(
        (o.arrival_s for o in outs), default=0.0
    )
    report: dict[str, Any] = {
        "num_requests": len(outs),
        "num_completed": len(done),
        "num_rejected": len(outs) - len(done),
        "rejected_share": round((len(outs) - len(done)) / max(len(outs), 1), 4),
        "rejects_by_reason": dict(Counter(o.reject_reason for o in outs if o.reject_reason)),
        "arrival_rate_rps": round(len(outs) / span, 4) if span > 0 else None,
        "makespan_s": round(result.makespan_s, 3),
    }
    for q in PERCENTILES:
        report[f"ttft_p{q}_s"] = _round(percentile(ttfts, q))
    for q in PERCENTILES:
        report[f"tbt_p{q}_s"] = _round(weighted_percentile(result.token_gaps, q))
    report["tpot_p50_s"] = _round(percentile(tpots, 50))
    report |= {
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
        "num_good": num_good,
        "slo_attainment": round(num_good / max(len(outs), 1), 4),
        "meets_goodput_bar": num_good >= slo.attainment * len(outs),
        "good_rps": round(num_good / result.makespan_s, 4),
        "output_tokens_per_s": round(sum(o.max_tokens for o in done) / result.makespan_s, 2),
        "prefix_hit_rate": round(sum(o.num_cached_tokens for o in done) / prompt, 4)
        if prompt
        else 0.0,
        "scheduler_expected_hit_rate": round(result.scheduler_hit_rate, 4),
        "utilization": utilization(result),  # busy fraction (a decode step loop is busy
        # whenever any sequence runs, however small the batch)
        "decode_mean_batch": round(result.decode_mean_batch, 2),
        "num_events": result.num_events,
        "role_moves": result.moves,
    }
    if result.planner_history:
        report["planner_rounds"] = result.planner_history
    return report


def utilization(result: SimResult) -> dict[str, float]:
    """Busy fraction of each pool: its instances' busy seconds over their seconds in it."""
    return {
        role: round(busy / result.role_time_s[role], 4)
        for role, busy in result.busy_s.items()
        if result.role_time_s.get(role)
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 5)
