"""When the planner's auto mode moves an instance between the prefill and decode pools.

``recommend`` (scheduler/planner.py) says what split the last window's traffic wants; acting on
every recommendation would flap on noise and ramps (Dynamo's SLA planner oscillates on ramps).
``PoolPolicy.decide`` turns recommendations into at most ``max_moves`` role moves per round:
1. manual mode, no recommendation, or the split already matches: nothing to do;
2. cooldown: no move within ``cooldown_s`` of the last one (a moved instance needs a window of
   traffic before its new pool's load shows the effect);
3. confirmation: the recommendation must point the same way ``confirm_rounds`` rounds in a row;
4. hysteresis: the pool that receives the instance must be busier now than the donor pool will
   be after giving it up, by ``hysteresis`` (utilisation); moving back would need the opposite
   inequality, so a steady workload cannot make it flap;
5. a pool never drops below one instance, and never more than ``max_moves`` moves per round.
Warming instances (started or moved less than ``warmup_s`` ago) are not movable and their
speed samples are left out of the estimates (cluster/planning.py does that part).
Plain Python, no Ray: the pool manager, the tests and the simulator run it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scheduler.planner import (
    InstancePerf,
    PDRecommendation,
    Workload,
    decode_utilization,
    prefill_utilization,
)


@dataclass(frozen=True)
class PoolPolicyConfig:
    is_auto: bool = False  # manual: recommend only
    cooldown_s: float = 60.0
    confirm_rounds: int = 2
    hysteresis: float = 0.1  # utilisation margin a move must win by
    max_moves: int = 1  # per round
    warmup_s: float = 30.0  # a new or moved instance is left alone this long


@dataclass(frozen=True)
class PoolDecision:
    """One round's outcome: ``action`` is move, hold, cooldown, confirming, warming or manual;
    ``moves`` lists (from_role, to_role), at most ``max_moves``; ``reason`` says why."""

    action: str
    moves: tuple[tuple[str, str], ...] = ()
    reason: str = ""


@dataclass
class PoolPolicy:
    """The auto mode's memory between rounds (last move time, the direction being confirmed)."""

    config: PoolPolicyConfig
    last_move_s: float = float("-inf")
    _direction: str = ""
    _num_confirmed: int = 0
    history: list[PoolDecision] = field(default_factory=list)

    def decide(
        self,
        now_s: float,
        rec: PDRecommendation | None,
        num_prefill: int,
        num_decode: int,
        num_movable: dict[str, int],
        workload: Workload | None = None,
        perf: InstancePerf | None = None,
    ) -> PoolDecision:
        """What to do this round. ``num_prefill``/``num_decode``: serving instances now;
        ``num_movable``: of those, per role, the ones past their warm-up."""
        decision = self._decide(now_s, rec, num_prefill, num_decode, num_movable, workload, perf)
        if decision.moves:
            self.last_move_s = now_s
            self._direction, self._num_confirmed = "", 0
        self.history.append(decision)
        return decision

    def _decide(self, now_s, rec, num_p, num_d, num_movable, workload, perf) -> PoolDecision:
        cfg = self.config
        if rec is None:
            return PoolDecision("hold", reason="no recommendation yet (no traffic)")
        want = rec.num_prefill - num_p
        if want == 0:
            self._direction, self._num_confirmed = "", 0
            return PoolDecision("hold", reason=f"split {num_p}P:{num_d}D matches the planner")
        src, dst = ("decode", "prefill") if want > 0 else ("prefill", "decode")
        if not cfg.is_auto:
            return PoolDecision("manual", reason=f"planner recommends one {src} -> {dst}")
        if now_s - self.last_move_s < cfg.cooldown_s:
            return PoolDecision("cooldown", reason=f"last move {now_s - self.last_move_s:.0f}s ago")
        direction = f"{src}->{dst}"
        num_src = num_d if src == "decode" else num_p
        if num_src <= 1:
            return PoolDecision("hold", reason=f"the last {src} instance stays")
        self._num_confirmed = self._num_confirmed + 1 if direction == self._direction else 1
        self._direction = direction
        if self._num_confirmed < cfg.confirm_rounds:
            return PoolDecision(
                "confirming", reason=f"{direction} {self._num_confirmed}/{cfg.confirm_rounds}"
            )
        if workload is not None and perf is not None:
            gain = _gain(src, num_p, num_d, workload, perf)
            if gain < cfg.hysteresis:
                return PoolDecision("hold", reason=f"{direction} gains {gain:.2f} < hysteresis")
        steps = min(abs(want), cfg.max_moves, num_src - 1, num_movable.get(src, 0))
        if steps <= 0:
            return PoolDecision("warming", reason=f"no {src} instance can move now")
        return PoolDecision("move", ((src, dst),) * steps, reason=f"{direction}: {rec.why}")


def _gain(src: str, num_p: int, num_d: int, workload: Workload, perf: InstancePerf) -> float:
    """How much busier the receiving pool is now than the donor pool would be after the move."""
    if src == "decode":
        return prefill_utilization(workload, perf, num_p) - decode_utilization(
            workload, perf, num_d - 1
        )
    return decode_utilization(workload, perf, num_d) - prefill_utilization(
        workload, perf, num_p - 1
    )
