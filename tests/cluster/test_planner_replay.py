"""The planner's auto mode on a replayed ramp: the real ``PlannerFeed`` (measured windows ->
recommendation) and ``PoolPolicy`` (recommendation -> role moves) driving a 3-instance pool.

Phases as the issue states them: prompt-heavy, then decode-heavy. The pools must follow the
phases with at most one move per phase change, never move a warming instance, never flap on a
steady or noisy workload, and only recommend in manual mode.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from cluster.messages import WorkerStats
from cluster.planning import PlannerFeed
from scheduler.planner import SLO
from scheduler.pool_policy import PoolPolicy, PoolPolicyConfig
from scheduler.state import SchedulerStats

WINDOW_S = 10.0
SLO_ = SLO(ttft_s=2.0, itl_s=0.1)
BATCH = 8
PREFILL_TPS = 4000.0  # prompt tokens/s of one warm prefill instance
DECODE_STEP_S = 0.02
# (name, seconds, requests/s, prompt tokens, output tokens)
PROMPT_HEAVY = ("prompt-heavy", 120.0, 2.0, 2000, 2)
DECODE_HEAVY = ("decode-heavy", 120.0, 2.0, 50, 200)


@dataclass
class FakePool:
    """Instances with roles and warm-up clocks; counters as the scheduler and workers keep them."""

    roles: dict[str, str]
    policy: PoolPolicy
    feed: PlannerFeed = field(default_factory=lambda: PlannerFeed(SLO_, BATCH, WINDOW_S))
    warm_since: dict[str, float] = field(default_factory=dict)
    routed: int = 0
    prompt_tokens: int = 0
    generated: int = 0
    moves: list[tuple[float, str, str, str]] = field(default_factory=list)

    def count(self, role: str) -> int:
        return sum(1 for r in self.roles.values() if r == role)

    def traffic(self, seconds: float, rate: float, prompt: int, output: int) -> None:
        n = round(rate * seconds)
        self.routed += n
        self.prompt_tokens += n * prompt
        self.generated += n * output

    def worker(self, iid: str, now: float) -> WorkerStats:
        cold = now - self.warm_since.get(iid, -1e9) < self.policy.config.warmup_s
        slow = 20.0 if cold else 1.0  # a cold worker's first steps are much slower
        role = self.roles[iid]
        return WorkerStats(
            iid, role, False, 100, 0, 100,
            num_generated_tokens=self.generated if role == "decode" else 0,
            prefill_tokens_per_s=PREFILL_TPS / slow if role == "prefill" else None,
            decode_step_s=DECODE_STEP_S * slow if role == "decode" else None,
        )  # fmt: skip

    def round(self, now: float) -> None:
        """What ``PoolManager._plan`` does once per window."""
        sched = SchedulerStats(0, 0, self.routed, 0, {}, self.prompt_tokens, 0, {}, 0, 0, 0)
        workers = [self.worker(i, now) for i in self.roles]
        is_warm = {
            i: now - self.warm_since.get(i, -1e9) >= self.policy.config.warmup_s for i in self.roles
        }
        warm = [w for w, i in zip(workers, self.roles, strict=True) if is_warm[i]]
        rec = self.feed.observe(now, sched, workers, len(self.roles), warm or None)
        if rec is None:
            return
        movable = {r: sum(1 for i, ri in self.roles.items() if ri == r and is_warm[i]) for r in
                   ("prefill", "decode")}  # fmt: skip
        decision = self.policy.decide(
            now,
            rec,
            self.count("prefill"),
            self.count("decode"),
            movable,
            self.feed.workload,
            self.feed.perf,
        )
        for src, dst in decision.moves:
            iid = next(i for i, r in self.roles.items() if r == src and is_warm[i])
            self.roles[iid] = dst
            self.warm_since[iid] = now
            self.moves.append((now, iid, src, dst))


def replay(pool: FakePool, phases, start_s: float = 0.0, noise: float = 0.0) -> dict[str, tuple]:
    """Run the phases window by window; the split at the end of each phase."""
    rng = random.Random(0)
    now = start_s
    pool.round(now)  # the feed's baseline
    ends = {}
    for name, seconds, rate, prompt, output in phases:
        for _ in range(int(seconds / WINDOW_S)):
            jitter = 1.0 + noise * (2 * rng.random() - 1)
            pool.traffic(WINDOW_S, rate * jitter, prompt, output)
            now += WINDOW_S
            pool.round(now)
        ends[name] = (pool.count("prefill"), pool.count("decode"))
    return ends


def _auto(**kw) -> PoolPolicy:
    cfg = {"is_auto": True, "cooldown_s": 30.0, "confirm_rounds": 2, "warmup_s": 20.0, **kw}
    return PoolPolicy(PoolPolicyConfig(**cfg))


def test_pools_follow_the_phases_with_one_move_per_phase_change():
    pool = FakePool({"i0": "prefill", "i1": "decode", "i2": "decode"}, _auto())
    ends = replay(pool, [PROMPT_HEAVY, DECODE_HEAVY])
    assert ends == {"prompt-heavy": (2, 1), "decode-heavy": (1, 2)}
    assert [(src, dst) for _, _, src, dst in pool.moves] == [
        ("decode", "prefill"),
        ("prefill", "decode"),
    ]
    # each move within the first few windows of its phase (confirmation, no waiting forever)
    assert pool.moves[0][0] <= 4 * WINDOW_S
    assert PROMPT_HEAVY[1] < pool.moves[1][0] <= PROMPT_HEAVY[1] + 5 * WINDOW_S


def test_a_steady_noisy_workload_does_not_flap():
    pool = FakePool({"i0": "prefill", "i1": "decode", "i2": "decode"}, _auto())
    long_phase = ("prompt-heavy", 600.0, 2.0, 2000, 2)
    replay(pool, [long_phase], noise=0.3)
    assert len(pool.moves) == 1  # one move to 2P+1D, then it stays


def test_manual_mode_only_recommends():
    policy = PoolPolicy(PoolPolicyConfig(is_auto=False))
    pool = FakePool({"i0": "prefill", "i1": "decode", "i2": "decode"}, policy)
    replay(pool, [PROMPT_HEAVY])
    assert pool.moves == []
    assert pool.feed.recommendation.num_prefill == 2
    assert {d.action for d in policy.history} == {"manual"}


def test_warming_instances_neither_move_nor_poison_the_estimates():
    # every instance just started: nothing may move, and the cold samples are not used
    pool = FakePool({"i0": "prefill", "i1": "decode", "i2": "decode"}, _auto(warmup_s=1e9))
    pool.warm_since = {i: 0.0 for i in pool.roles}
    replay(pool, [PROMPT_HEAVY])
    assert pool.moves == []
    assert "warming" in {d.action for d in pool.policy.history}
    # cold samples only (no warm worker): the estimate falls back to them rather than nothing
    assert pool.feed.perf is not None


def test_cooldown_bounds_the_rate_of_moves():
    # 5 instances, a decode-heavy phase wanting 1P+4D from 3P+2D: one move per round at most,
    # and none within the cooldown of the previous one
    roles = {"i0": "prefill", "i1": "prefill", "i2": "prefill", "i3": "decode", "i4": "decode"}
    pool = FakePool(roles, _auto(cooldown_s=40.0, confirm_rounds=1))
    replay(pool, [("decode-heavy", 300.0, 4.0, 50, 200)])
    times = [t for t, *_ in pool.moves]
    assert len(times) >= 2
    assert all(b - a >= 40.0 for a, b in zip(times, times[1:], strict=False))
    assert pool.count("prefill") >= 1
