"""The cluster simulator: it drives the real scheduler, replays deterministically, loses no
request, and never beats the trace's own prefix-cache bound. Pure Python, fast."""

import json
import subprocess
import sys
from collections import Counter
from dataclasses import replace

import pytest

import scheduler.policy
from scheduler.sim import CostProfile, SimCluster, SimConfig, TraceRow, TraceScale, build_requests
from scheduler.sim.cluster import scheduler_config_for
from scheduler.sim.profile import load_profile
from scheduler.sim.report import SLOSpec, summarize, weighted_percentile
from scheduler.sim.run import Deployment, replay
from scheduler.sim.trace import infinite_cache_hit_rate

# A CPU-sized profile: ~2k prefill tokens/s, 20 ms decode steps.
TINY = CostProfile.from_dict(
    {
        "name": "test-tiny",
        "prefill": {
            "tokens_per_s": [[256, 3000.0], [4096, 1500.0]],
            "step_overhead_s": 0.002,
            "token_budget": 512,
            "prefix_cache_tokens": 16_384,
        },
        "decode": {
            "base_s": 0.02,
            "per_seq_s": 0.001,
            "per_kv_token_s": 1e-6,
            "max_batch_size": 16,
            "kv_tokens": 32_768,
            "prefill_token_budget": 256,
        },
        "transfer": {"kv_bytes_per_token": 4096, "bytes_per_s": 5e8, "latency_s": 0.001},
        "cluster": {"rpc_s": 0.001, "report_interval_s": 0.1},
    }
)


def _rows(n: int = 120, seed_groups: int = 6) -> list[TraceRow]:
    """Conversations: request i continues conversation i % groups, so prefixes are shared."""
    rows, history = [], {g: [] for g in range(seed_groups)}
    next_id = 0
    for i in range(n):
        g = i % seed_groups
        new = [next_id, next_id + 1]
        next_id += 2
        history[g] = history[g] + new
        ids = tuple(history[g][-12:]) if len(history[g]) <= 12 else tuple(history[g][:12])
        rows.append(TraceRow(i * 150, 512 * len(ids) - 100, 8 + (i * 7) % 40, ids))
    return rows


def _requests(rate_scale: float = 1.0, block_size: int = 64):
    scale = TraceScale(rate_scale=rate_scale, length_scale=1 / 8)
    return build_requests(_rows(), scale, block_size)


def _run(requests, dep=Deployment(1, 2), profile=TINY):
    return replay(requests, profile, dep)


def test_the_simulator_drives_the_real_scheduler(monkeypatch):
    cluster = SimCluster(TINY, SimConfig(1, 2, scheduler_config_for(TINY)))
    assert type(cluster.scheduler) is scheduler.policy.Scheduler
    requests = _requests()
    before = _decode_placement(requests)
    # Flip the real scheduler's decode preference (its routing weight): placements must follow.
    real = scheduler.policy.decode_score
    monkeypatch.setattr(scheduler.policy, "decode_score", lambda *a: -real(*a))
    after = _decode_placement(requests)
    assert before != after


def _decode_placement(requests) -> list[str]:
    result = _run(requests, Deployment(1, 2))
    return [o.decode_instance_id for o in result.outcomes]


def test_a_scheduler_knob_changes_the_outcome():
    requests = _requests()
    remote = summarize(_run(requests, Deployment(1, 1, decode_local_threshold=0)), SLOSpec())
    local = summarize(_run(requests, Deployment(1, 1, decode_local_threshold=10**6)), SLOSpec())
    assert remote["prefix_hit_rate"] > 0  # the prefill instance's cache was used
    assert local["prefix_hit_rate"] == 0  # everything prefilled on the decode instance
    assert remote["ttft_p50_s"] != local["ttft_p50_s"]


def test_replay_is_deterministic():
    requests = _requests(rate_scale=3.0)
    a, b = _run(requests), _run(requests)
    assert [vars(o) for o in a.outcomes] == [vars(o) for o in b.outcomes]
    assert a.token_gaps == b.token_gaps


@pytest.mark.parametrize("rate_scale", [1.0, 20.0])
def test_every_request_completes_or_is_rejected_and_nothing_leaks(rate_scale):
    requests = _requests(rate_scale)
    sched = scheduler_config_for(TINY, ttft_slo_s=1.0, max_queue_len=4)
    cluster = SimCluster(TINY, SimConfig(1, 1, sched))
    result = cluster.run(requests)
    for o in result.outcomes:
        assert (o.finish_s is None) == (o.reject_reason is not None)
        if o.finish_s is not None:
            assert o.arrival_s < o.first_token_s <= o.finish_s
    # let the last on_finished calls land, then every book is empty
    end = cluster.loop.now
    cluster.loop.run(lambda: cluster.loop.now > end + 1.0)
    assert cluster.scheduler.num_active == 0 and cluster.scheduler.num_queued == 0
    for d in cluster.decodes.values():
        assert d.num_free_pages == d.num_total_pages and d.num_unfilled_pages == 0
    if rate_scale > 1:
        assert Counter(o.reject_reason for o in result.outcomes if o.reject_reason)


def test_prefix_hits_stay_under_the_infinite_cache_bound():
    requests = _requests()
    bound = infinite_cache_hit_rate(requests, 64)
    big = replace(TINY, prefill=replace(TINY.prefill, prefix_cache_tokens=10**7))
    for profile, dep in [
        (TINY, Deployment(1, 1)),
        (big, Deployment(1, 1)),
        (big, Deployment(2, 1)),
    ]:
        report = summarize(_run(requests, dep, profile), SLOSpec())
        assert 0 < report["prefix_hit_rate"] <= bound + 1e-9


def test_trace_hashes_share_exactly_the_common_trace_blocks():
    rows = [TraceRow(0, 1536, 4, (1, 2, 3)), TraceRow(1, 1500, 4, (1, 2, 9))]
    a, b = build_requests(rows, TraceScale(), 64)
    assert len(a.block_hashes) == 24 and len(b.block_hashes) == 1500 // 64
    assert a.block_hashes[:16] == b.block_hashes[:16]  # two 512-token blocks = 16 of 64
    assert not set(a.block_hashes[16:]) & set(b.block_hashes)


def test_profile_curves_and_builtin():
    assert TINY.prefill.rate_at(100) == 3000.0 and TINY.prefill.rate_at(10**6) == 1500.0
    assert TINY.prefill.chunk_s(0, 256) == pytest.approx(256 / TINY.prefill.rate_at(256))
    k2 = load_profile("k2-h200")
    assert k2.transfer.kv_bytes_per_token == 70_272
    assert k2.prefill.rate_at(4096) == pytest.approx(112_000)
    with pytest.raises(ValueError, match="no profile"):
        load_profile("no-such-profile")


def test_weighted_percentile():
    assert weighted_percentile([(0.1, 9), (1.0, 1)], 50) == 0.1
    assert weighted_percentile([(0.1, 1), (1.0, 9)], 50) == 1.0
    assert weighted_percentile([], 50) is None


def test_tidal_sim_writes_report_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    trace = tmp_path / "trace.jsonl"
    trace.write_text(
        "".join(
            json.dumps(
                {
                    "timestamp": r.timestamp_ms,
                    "input_length": r.input_length,
                    "output_length": r.output_length,
                    "hash_ids": list(r.hash_ids),
                }
            )
            + "\n"
            for r in _rows(40)
        )
    )
    profile = tmp_path / "tiny.json"
    profile.write_text(json.dumps(TINY.to_dict()))
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-c", "from cluster.cli import main; raise SystemExit(main())",
        "sim", "--trace", str(trace), "--profile", str(profile), "--prefill", "1",
        "--decode", "2", "--length-scale", "0.125", "--sweep", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["num_requests"] == 40
    assert {s["num_prefill"] for s in report["sweep"]["splits"]} == {1, 2}
    assert report["planner"]["recommendation"]["num_prefill"] in (1, 2)
    for png in report["plots"].values():
        assert (out / png).stat().st_size > 1000


def test_the_planner_moves_instances_with_their_delays():
    from scheduler.planner import SLO
    from scheduler.pool_policy import PoolPolicyConfig
    from scheduler.sim.autoscale import PlannerLoop

    # prompt-heavy traffic on a decode-heavy split: the planner wants more prefill
    rows = [TraceRow(i * 400, 4000, 4, (i,)) for i in range(240)]
    requests = build_requests(rows, TraceScale(length_scale=1 / 8), 64)
    profile = replace(TINY, cluster=replace(TINY.cluster, role_move_s=3.0))
    cluster = SimCluster(profile, SimConfig(1, 3, scheduler_config_for(profile)))
    policy = PoolPolicyConfig(is_auto=True, cooldown_s=10, confirm_rounds=1, warmup_s=5)
    planner = PlannerLoop(cluster, SLO(2.0, 0.1), policy, window_s=5.0)
    planner.start()
    result = cluster.run(requests)
    assert result.moves and result.moves[0]["to"] == "prefill"
    assert len(cluster.prefills) > 1
    assert any(h["action"] == "move" for h in planner.history)
    assert all(o.finish_s is not None or o.reject_reason for o in result.outcomes)
    # a moved instance serves in its new role only after the drain and role_move_s
    first = result.moves[0]
    assert cluster.serving_since(first["instance"]) >= first["time_s"] + 3.0


def test_trace_hashes_share_what_real_prompts_share():
    """bench/trace.py builds real token prompts from the same rows; hashed by the scheduler's
    own function, two prompts share as many blocks as their simulated hashes do."""
    import importlib.util
    from pathlib import Path

    from common.prefix import block_hashes

    path = Path(__file__).resolve().parents[2] / "bench" / "trace.py"
    spec = importlib.util.spec_from_file_location("bench_trace", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    rows = _rows(30)
    real = bench.build_requests(
        [bench.TraceRow(*vars(r).values()) for r in rows],
        bench.TraceScale(length_scale=1 / 8, max_input=10**6),
    )
    sim = build_requests(rows, TraceScale(length_scale=1 / 8), 64)

    def shared(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    real_hashes = [block_hashes(r.prompt_ids, 64) for r in real]
    for i in range(len(rows)):
        assert len(real_hashes[i]) == len(sim[i].block_hashes)
        for j in range(i):
            assert shared(real_hashes[i], real_hashes[j]) == shared(
                sim[i].block_hashes, sim[j].block_hashes
            )


def test_prefill_serves_least_left_first_and_finishes_a_prompt_after_its_own_chunk():
    """As ``PrefillStage``: of prompts waiting together, the shortest is prefilled first, and a
    short prompt sharing a step with a long one is done after its own chunk, not the step."""
    from scheduler.sim.events import EventLoop
    from scheduler.sim.instances import SimPrefill, SimSeq

    loop = EventLoop()
    prefill = SimPrefill("p0", loop, TINY, 64)
    done: dict[str, float] = {}

    def seq(rid: str, n: int) -> SimSeq:
        return SimSeq(rid, n, 8, tuple(range(len(rid) * 1000, len(rid) * 1000 + n // 64 + 1)),
                      lambda s: None, lambda s: None)  # fmt: skip

    for rid, n in (("long", 2000), ("mid", 300), ("s", 100)):
        prefill.submit(seq(rid, n), lambda s: done.setdefault(s.request_id, loop.now))
    loop.run(lambda: len(done) == 3)
    assert list(done) == ["s", "mid", "long"]
    # "s" and "mid" share the first step with a chunk of "long": each leaves after its chunk
    p = TINY.prefill
    assert done["s"] == pytest.approx(
        p.step_overhead_s + p.chunk_s(0, 100) + TINY.transfer.latency_s, abs=1e-3
    )
    assert done["s"] < done["mid"] < done["long"]


def test_one_host_instances_slow_each_other():
    """``contended_slowdown``: prefill and decode on one machine's CPUs slow each other's steps;
    at 1.0 (separate machines) the replay is unchanged."""
    requests = _requests(rate_scale=2.0)
    alone = _run(requests, Deployment(1, 1))
    same = replace(TINY, prefill=replace(TINY.prefill, contended_slowdown=1.0))
    assert [o.ttft_s for o in _run(requests, Deployment(1, 1), same).outcomes] == [
        o.ttft_s for o in alone.outcomes
    ]
    shared = replace(
        TINY,
        prefill=replace(TINY.prefill, contended_slowdown=2.0),
        decode=replace(TINY.decode, contended_slowdown=2.0),
    )
    slowed = _run(requests, Deployment(1, 1), shared)
    assert slowed.busy_s["prefill"] > alone.busy_s["prefill"]

    def mean_tpot(result):
        tpots = [o.tpot_s for o in result.outcomes if o.tpot_s is not None]
        return sum(tpots) / len(tpots)

    assert mean_tpot(slowed) > mean_tpot(alone)
