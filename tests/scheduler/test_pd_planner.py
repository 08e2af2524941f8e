"""P:D planner: minimum pool sizes grow with load, splits follow the work, budgets are honest."""

import math

import pytest

from scheduler.planner import (
    SLO,
    InstancePerf,
    Workload,
    decode_utilization,
    min_decode_instances,
    min_prefill_instances,
    prefill_ttft_s,
    prefill_utilization,
    recommend,
)

PERF = InstancePerf(prefill_tokens_per_s=8000, decode_step_s=0.03, decode_batch_size=64)
SLO_ = SLO(ttft_s=2.0, itl_s=0.05)


def conversation(rate: float, prompt: float = 7000, uncached: float = 4400, out: float = 350):
    return Workload(rate, prompt, uncached, out)


def test_prefill_ttft_is_md1_wait_plus_service_plus_transfer():
    perf = InstancePerf(1000, 0.03, 64, transfer_s_per_token=1e-4)
    w = Workload(arrival_rate=0.5, mean_prompt_len=2000, mean_uncached_len=1000, mean_output_len=1)
    # S = 1 s, rho = 0.5 on one instance: wait = 0.5 * 1 / (2 * 0.5) = 0.5 s; transfer 0.2 s.
    assert prefill_ttft_s(w, perf, 1) == pytest.approx(0.5 + 1.0 + 0.2)
    assert prefill_ttft_s(w, perf, 2) == pytest.approx(0.25 * 1 / 1.5 + 1.0 + 0.2)
    assert math.isinf(prefill_ttft_s(Workload(1.0, 2000, 1000, 1), perf, 1))


def test_decode_utilization_is_littles_law_over_batch_slots_or_kv():
    w = Workload(10, 1000, 1000, 200)  # 10 req/s * 200 tokens * 0.03 s = 60 sequences at once
    assert decode_utilization(w, PERF, 1) == pytest.approx(60 / 64)
    tight = InstancePerf(8000, 0.03, 64, kv_tokens_per_decode_instance=30_000)
    assert decode_utilization(w, tight, 2) == pytest.approx(60 * 1100 / 60_000)


def test_minimum_pool_sizes_are_monotonic_in_load():
    prev_p = prev_d = 0
    for rate in (0.1, 0.5, 1, 2, 4, 8, 16, 32):
        w = conversation(rate)
        need_p, need_d = min_prefill_instances(w, PERF, SLO_), min_decode_instances(w, PERF, SLO_)
        assert need_p >= prev_p and need_d >= prev_d
        prev_p, prev_d = need_p, need_d
    assert prev_p > 1 and prev_d > 1
    assert min_prefill_instances(conversation(32), PERF, SLO_) > min_prefill_instances(
        conversation(32, uncached=1000), PERF, SLO_
    )  # prefix hits shrink the prefill pool


def test_split_follows_where_the_work_is():
    long_prompts = recommend(
        conversation(8, prompt=20_000, uncached=16_000, out=100), PERF, SLO_, 10
    )
    long_outputs = recommend(conversation(8, prompt=1000, uncached=600, out=2000), PERF, SLO_, 10)
    assert long_prompts.num_prefill + long_prompts.num_decode == 10
    assert long_prompts.num_prefill > long_outputs.num_prefill
    assert long_outputs.num_decode > long_prompts.num_decode
    assert long_outputs.is_feasible and long_outputs.reason == ""


def test_spare_instances_balance_utilisation():
    rec = recommend(conversation(4), PERF, SLO_, 12)
    assert rec.num_prefill + rec.num_decode == 12 and rec.is_feasible
    assert rec.estimated_ttft_s <= SLO_.ttft_s
    w = conversation(4)
    need_p, need_d = min_prefill_instances(w, PERF, SLO_), min_decode_instances(w, PERF, SLO_)

    def busiest(num_p: int) -> float:
        return max(prefill_utilization(w, PERF, num_p), decode_utilization(w, PERF, 12 - num_p))

    # Among splits that meet both minimums, the recommendation has the least-loaded busiest pool.
    assert busiest(rec.num_prefill) == min(busiest(n) for n in range(need_p, 12 - need_d + 1))


def test_over_budget_and_itl_violations_are_reported_not_hidden():
    rec = recommend(conversation(40), PERF, SLO_, 4)
    assert not rec.is_feasible and "budget is 4" in rec.reason
    assert rec.num_prefill + rec.num_decode == 4 and rec.num_prefill >= 1 and rec.num_decode >= 1
    slow = InstancePerf(8000, decode_step_s=0.08, decode_batch_size=256)
    rec = recommend(conversation(1), slow, SLO_, 8)
    assert not rec.is_feasible and "ITL" in rec.reason
