"""The planner's auto mode on a simulated cluster: every ``window_s`` the measured workload and
speeds go to the real P:D planner (``scheduler.planner.recommend``), and the real pool policy
(``scheduler.pool_policy.PoolPolicy``: cooldown, confirmation, hysteresis, warm-up) decides role
moves, which ``SimCluster.move`` carries out with the profile's drain and ``role_move_s`` delays.

The window's workload is computed as ``cluster/planning.py``'s ``PlannerFeed`` does: routed
requests, prompt and prefix-hit tokens from the scheduler's counters, generated tokens from the
decode instances; speeds are the means of the warm instances' meters, at ``max_batch_size``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from scheduler.planner import SLO, InstancePerf, Workload, recommend
from scheduler.pool_policy import PoolPolicy, PoolPolicyConfig
from scheduler.sim.cluster import SimCluster
from scheduler.state import Role


@dataclass(frozen=True)
class _Sample:
    time_s: float
    num_routed: int
    num_prompt_tokens: int
    num_hit_tokens: int
    num_generated: int


class PlannerLoop:
    """Planner rounds on ``cluster``; ``history`` keeps one entry per round with traffic."""

    def __init__(
        self,
        cluster: SimCluster,
        slo: SLO,
        policy: PoolPolicyConfig = PoolPolicyConfig(is_auto=True),
        window_s: float = 10.0,
    ) -> None:
        self.cluster = cluster
        self.slo = slo
        self.policy = PoolPolicy(policy)
        self.window_s = window_s
        self.history: list[dict[str, Any]] = []
        self._last: _Sample | None = None

    def start(self) -> None:
        self.cluster.loop.after(self.window_s, self._round)

    def _round(self) -> None:
        self._plan()
        self.cluster.loop.after(self.window_s, self._round)

    def _plan(self) -> None:
        c = self.cluster
        now = c.loop.now
        stats = c.scheduler.stats()
        sample = _Sample(
            now, stats.num_routed, stats.num_prompt_tokens, stats.num_prefix_hit_tokens,
            c.num_generated(),
        )  # fmt: skip
        last, self._last = self._last, sample
        if last is None or sample.num_routed <= last.num_routed:
            return
        workload = _workload(last, sample)
        perf = self._perf()
        if perf is None:
            return
        num_p, num_d = len(c.prefills), len(c.decodes)
        rec = recommend(
            workload, perf, self.slo, max(c.config.num_prefill + c.config.num_decode, 2)
        )
        decision = self.policy.decide(now, rec, num_p, num_d, self._movable(), workload, perf)
        for src, dst in decision.moves:
            c.move(self._pick(src), Role(dst))
        self.history.append(
            {
                "time_s": round(now, 1),
                "split": f"{num_p}P:{num_d}D",
                "recommended": f"{rec.num_prefill}P:{rec.num_decode}D",
                "action": decision.action,
                "reason": decision.reason,
            }
        )

    def _perf(self) -> InstancePerf | None:
        c, warm = self.cluster, self._warm_ids()
        prefill = [r for i, p in c.prefills.items() if i in warm and (r := p.tokens_per_s)]
        decode = [s for i, d in c.decodes.items() if i in warm and (s := d.decode_step_s)]
        if not prefill or not decode:
            return None
        return InstancePerf(
            prefill_tokens_per_s=sum(prefill) / len(prefill),
            decode_step_s=sum(decode) / len(decode),
            decode_batch_size=c.profile.decode.max_batch_size,
        )

    def _warm_ids(self) -> set[str]:
        c, cutoff = self.cluster, self.cluster.loop.now - self.policy.config.warmup_s
        return {i for i in [*c.prefills, *c.decodes] if c.serving_since(i) <= cutoff}

    def _movable(self) -> dict[str, int]:
        warm = self._warm_ids()
        return {
            "prefill": sum(i in warm for i in self.cluster.prefills),
            "decode": sum(i in warm for i in self.cluster.decodes),
        }

    def _pick(self, role: str) -> str:
        """The least loaded warm instance of ``role`` (it drains soonest)."""
        pool = self.cluster.prefills if role == "prefill" else self.cluster.decodes
        warm = self._warm_ids()
        return min((i for i in pool if i in warm), key=lambda i: (pool[i].load, i))


def _workload(last: _Sample, now: _Sample) -> Workload:
    n = now.num_routed - last.num_routed
    prompt = (now.num_prompt_tokens - last.num_prompt_tokens) / n
    hits = (now.num_hit_tokens - last.num_hit_tokens) / n
    output = max(now.num_generated - last.num_generated, 0) / n
    return Workload(
        n / (now.time_s - last.time_s), prompt, max(prompt - hits, 1.0), max(output, 1.0)
    )
