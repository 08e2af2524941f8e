"""PlannerFeed: measured windows -> a P:D recommendation (plain Python)."""

from cluster.messages import WorkerStats
from cluster.planning import PlannerFeed
from scheduler.planner import SLO
from scheduler.state import SchedulerStats


def _sched(routed: int, prompt: int, hits: int) -> SchedulerStats:
    return SchedulerStats(0, 0, routed, 0, {}, prompt, hits, {}, 1, 1, 0)


def _worker(role: str, generated: int, tps=None, step=None) -> WorkerStats:
    return WorkerStats(
        "w", role, False, 10, 0, 10,
        num_generated_tokens=generated, prefill_tokens_per_s=tps, decode_step_s=step,
    )  # fmt: skip


def test_prefill_heavy_traffic_gets_more_prefill():
    feed = PlannerFeed(SLO(ttft_s=1.0, itl_s=0.1), max_batch_size=64, window_s=10)
    workers = [_worker("prefill", 0, tps=1000.0), _worker("decode", 0, step=0.01)]
    assert feed.observe(0.0, _sched(0, 0, 0), workers) is None  # first window: no baseline
    assert not feed.is_due(5.0)
    # 2 req/s of 2,000-token prompts at 1,000 tokens/s per instance: ~4 prefill instances busy
    workers = [_worker("prefill", 0, tps=1000.0), _worker("decode", 200, step=0.01)]
    rec = feed.observe(10.0, _sched(20, 40_000, 0), workers + [workers[0]] * 6)
    assert rec is not None and rec.num_prefill + rec.num_decode == 8
    assert rec.num_prefill > rec.num_decode
    assert feed.recommendation is rec


def test_no_traffic_no_recommendation():
    feed = PlannerFeed(SLO(ttft_s=1.0, itl_s=0.1), max_batch_size=64, window_s=1)
    workers = [_worker("prefill", 0, tps=1000.0), _worker("decode", 0, step=0.01)]
    feed.observe(0.0, _sched(5, 100, 0), workers)
    assert feed.observe(2.0, _sched(5, 100, 0), workers) is None
