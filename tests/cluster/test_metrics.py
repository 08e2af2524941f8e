"""The metric rules the dashboards rely on, with Ray's metric classes replaced by recorders:
label names, a moved rank's old gauges at 0, every role x state exported, one planner reason."""

from __future__ import annotations

import pytest

from cluster import metrics
from cluster.messages import WorkerStats
from scheduler.planner import PDRecommendation
from scheduler.state import SchedulerStats


class _Recorder:
    def __init__(self, name, description="", *args) -> None:
        self.name = name
        self.tag_keys = args[-1] if args and isinstance(args[-1], tuple) else ()
        self.values: dict[tuple, float] = {}

    def set(self, value, tags=None):
        self.values[tuple(sorted((tags or {}).items()))] = value

    def inc(self, value=1.0, tags=None):
        key = tuple(sorted((tags or {}).items()))
        self.values[key] = self.values.get(key, 0.0) + value

    def observe(self, value, tags=None):
        self.values.setdefault(tuple(sorted((tags or {}).items())), []).append(value)


@pytest.fixture(autouse=True)
def recorders(monkeypatch):
    for cls in ("Gauge", "Counter", "Histogram"):
        monkeypatch.setattr(metrics, cls, _Recorder)


def _stats(role: str, used: int, prompt: int = 0, busy: float = 0.0) -> WorkerStats:
    return WorkerStats(
        "i1", role, False, 64 - used, used, 64, num_prompt_tokens=prompt, busy_s=busy
    )


def test_a_moved_rank_zeroes_its_old_role_gauges_and_counts_on():
    w = metrics.WorkerMetrics("i1")
    w.update(_stats("prefill", used=10, prompt=100, busy=1.5))
    w.update(_stats("decode", used=7, busy=2.0))  # moved: a new stage restarts its totals
    used = w._gauges["num_used_pages"].values
    assert used == {
        (("role", "prefill"), ("tidal_instance", "i1")): 0.0,
        (("role", "decode"), ("tidal_instance", "i1")): 7.0,
    }
    assert all("instance" not in dict(k) for k in used)  # Prometheus owns `instance`
    prompt = w._counters["num_prompt_tokens"].values
    assert prompt == {(("role", "prefill"), ("tidal_instance", "i1")): 100.0}
    busy = w._counters["busy_s"].values
    assert sum(busy.values()) == pytest.approx(2.0)  # worker-lifetime seconds, never twice
    w.close()
    assert set(used.values()) == {0.0}


def test_pool_metrics_export_every_role_and_state_and_one_planner_reason():
    p = metrics.PoolMetrics()
    sched = SchedulerStats(0, 0, 5, 0, {"slo": 2}, 100, 10, {}, 1, 2, 0)
    p.update({("prefill", "serving"): 1, ("decode", "serving"): 2}, {"prefill": 1}, {}, sched)
    assert len(p.instances.values) == len(metrics.ROLE_NAMES) * len(metrics.STATES)
    assert p.instances.values[(("role", "decode"), ("state", "serving"))] == 2.0
    assert p.instances.values[(("role", "decode"), ("state", "moving"))] == 0.0
    p.planner(None, is_auto=True)
    assert {k[0][1]: v for k, v in p.reason.values.items()}["idle"] == 1.0
    rec = PDRecommendation(2, 1, 0.6, 0.1, 0.5, True, "", "prefill_bound")
    p.planner(rec, is_auto=True)
    reasons = {k[0][1]: v for k, v in p.reason.values.items()}
    assert reasons == {"prefill_bound": 1.0, "decode_bound": 0.0, "over_budget": 0.0, "idle": 0.0}
    assert p.recommended.values[(("role", "prefill"),)] == 2.0


def test_ttft_parts_are_observed_by_name():
    i = metrics.IngressMetrics()
    i.observe_ttft_parts({"scheduler_queue": 0.01, "decode_admission": -0.001}, {"model": "m"})
    assert i.ttft_part.values[(("model", "m"), ("part", "decode_admission"))] == [0.0]
    assert set(metrics.TTFT_PARTS) >= {"scheduler_queue", "transfer_tail"}
