"""Expert-parallel instances behind the OpenAI API: two ranks per instance over gloo.

Disaggregated, in order: 1P(EP2)+1D(EP2) gives the offline single-rank engine's greedy tokens
(every prompt through a prefill rank, a rank-to-rank KV transfer and a decode rank); the decode
pool grows to two EP2 instances; one rank of a decode instance is killed mid-stream: every
stream completes with the offline tokens (resumed), the instance is replaced as a whole, and the
pages return to their idle values. Then colocated EP2 gives the same tokens.
"""

import threading

import httpx
import pytest
import ray

from cluster.cli import main as cli_main
from tests.e2e.conftest import (
    ADMIN,
    assert_idle_pages,
    deployed,
    http_complete_all,
    http_stream,
    make_prompt,
    pool_handle,
    pools,
    wait_for,
)

APP = "ep"
# a loose TTFT SLO: these tests check tokens under load (a rebalance under traffic), not admission
EP = {"cpus_per_rank": 0.2, "decode_local_threshold": 0, "num_pages": 160, "ttft_slo_s": 30.0}
# one redundant expert slot per rank: 8 experts in 10 slots per MoE layer (EPLB replicas)
EPLB = {"redundant_experts": 1}


def _serving(url: str, role: str) -> list[dict]:
    return [i for i in pools(url)["instances"] if i["state"] == "serving" and i["role"] == role]


class TestDisaggregatedEP2:
    @pytest.fixture(scope="class")
    def url(self, serve_url, tiny_model_dir):
        with deployed(
            serve_url, tiny_model_dir, APP, prefill=1, decode=1, prefill_ranks=2, decode_ranks=2,
            **EP, **EPLB,
        ) as u:  # fmt: skip
            yield u

    def test_every_rank_is_a_unit_and_greedy_tokens_match_offline(self, url, greedy_cases):
        snap = pools(url)
        assert sorted((i["role"], i["num_ranks"]) for i in snap["instances"]) == [
            ("decode", 2),
            ("prefill", 2),
        ]
        units = pool_handle(APP).handles.remote().result()
        assert len(units) == 4  # the scheduler routes to ranks
        outs = http_complete_all(url, greedy_cases)  # all at once: several ranks work
        assert outs == [e for _, e in greedy_cases]
        work = {
            (i["role"], r): s["num_prompt_tokens"] + s["num_generated_tokens"]
            for i in pools(url)["instances"]
            for r, s in enumerate(i["rank_stats"])
        }
        assert sum(n > 0 for n in work.values()) >= 3, work  # requests landed on several ranks
        assert_idle_pages(url)

    def test_rebalance_moves_experts_live_and_tokens_stay(self, url, greedy_cases, capsys):
        skewed = [(p, e) for p, e in greedy_cases[:2]] * 3  # the same prompts: hot experts
        assert http_complete_all(url, skewed) == [e for _, e in skewed]
        done, served = threading.Event(), []

        def traffic() -> None:  # requests in flight while the placement is staged and swapped
            while not done.is_set():
                served.append(http_complete_all(url, greedy_cases) == [e for _, e in greedy_cases])

        thread = threading.Thread(target=traffic)
        thread.start()
        try:
            r = httpx.post(f"{url}/admin/eplb/rebalance", json={}, headers=ADMIN, timeout=300)
        finally:
            done.set()
            thread.join()
        assert r.status_code == 200, r.text
        assert served and all(served), served  # every request during the round: offline tokens
        rounds = r.json()["rebalances"]
        assert len(rounds) == 2 and all(x["error"] is None for x in rounds), rounds
        assert sum(x["num_moved_slots"] for x in rounds) > 0, rounds
        stepped = [x for x in rounds if x["num_steps"]]  # the rounds' steps were measured
        assert stepped and all(x["longest_step_s"] > 0 for x in stepped), rounds
        for x in rounds:  # the planner's answer is at least as balanced on the window it saw
            assert min(x["balancedness_after"]) >= min(x["balancedness_before"]) - 1e-9
        outs = http_complete_all(url, greedy_cases)  # served by the new placement
        assert outs == [e for _, e in greedy_cases]
        prefill_id = _serving(url, "prefill")[0]["instance_id"]  # the same round from the CLI
        assert cli_main(["eplb", "rebalance", "--url", url, "--instance", prefill_id]) == 0
        printed = capsys.readouterr().out
        assert printed.startswith(f"{prefill_id}: moved ") and "balancedness" in printed, printed
        bad = httpx.post(
            f"{url}/admin/eplb/rebalance", json={"instance": "nope"}, headers=ADMIN, timeout=30
        )
        assert bad.status_code == 400 and "expert-parallel" in bad.text
        wait_for(  # Ray exports metrics every few seconds
            lambda: all(
                name in httpx.get(f"{url}/metrics", timeout=30).text
                for name in (
                    "tidal_eplb_rebalances_total",
                    "tidal_eplb_balancedness",
                    "tidal_eplb_rebalance_longest_step_seconds",
                )
            ),
            timeout_s=60,
            interval_s=1.0,
            what="the EPLB metrics on /metrics",
        )
        assert_idle_pages(url)

    def test_a_rank_without_the_checkpoint_file_stages_from_its_peers(self, url, greedy_cases):
        """Both decode ranks lose their checkpoint path; a placement that swaps the ranks'
        slots is staged through the workers anyway (each expert comes from the peer holding
        it) and swapped in under traffic: greedy tokens stay the offline ones."""
        inst = _serving(url, "decode")[0]["instance_id"]
        handles = pool_handle(APP).handles.remote().result()
        ranks = [handles[f"{inst}.r{r}"] for r in range(2)]

        def lose_the_file(worker, path):
            source, worker.engine._source = worker.engine._source, (path, worker.engine._source[1])
            return source, worker.engine.placement, worker.engine.num_peer_bytes

        answers = ray.get([r.__ray_call__.remote(lose_the_file, "/nonexistent") for r in ranks])
        source, before, peer_bytes_before = answers[0]
        try:
            per_rank = len(next(iter(before.values()))) // 2
            swapped = {i: p[per_rank:] + p[:per_rank] for i, p in before.items()}
            staged = ray.get([r.stage_placement.remote(10_000, swapped, ranks) for r in ranks])
            assert all(n > 0 for n in staged), staged
            outs = http_complete_all(url, greedy_cases)  # the swap happens at these ticks
            assert outs == [e for _, e in greedy_cases]
            wait_for(
                lambda: not any(ray.get([r.is_resharding.remote() for r in ranks])),
                what="the swap",
            )
            ray.get([r.rebalance_steps.remote() for r in ranks])
            after = ray.get([r.__ray_call__.remote(lose_the_file, source[0]) for r in ranks])
            for (_, placement, peer_bytes), (_, _, was) in zip(after, answers, strict=True):
                assert placement == swapped and peer_bytes > was  # every new expert from a peer
        finally:
            ray.get([r.__ray_call__.remote(lose_the_file, source[0]) for r in ranks])
        assert http_complete_all(url, greedy_cases) == [e for _, e in greedy_cases]
        assert_idle_pages(url)

    def test_grow_then_kill_a_decode_rank_mid_stream(self, url, reference_engine):
        r = httpx.post(f"{url}/admin/pools", json={"decode": 2}, headers=ADMIN, timeout=300)
        assert r.status_code == 200, r.text
        assert len(_serving(url, "decode")) == 2
        n = 200
        prompts = [make_prompt(9, 500 + k) for k in range(3)]
        expected = [reference_engine.generate([p], n)[0] for p in prompts]
        outs = [{} for _ in prompts]
        threads = [
            threading.Thread(target=http_stream, args=(url, p, n, o))
            for p, o in zip(prompts, outs, strict=True)
        ]
        for t in threads:
            t.start()
        wait_for(lambda: all(len(o.get("ids", [])) >= 5 for o in outs), what="every stream started")
        victim = next(
            (i["instance_id"], r)
            for i in _serving(url, "decode")
            for r, s in enumerate(i["rank_stats"])
            if s and s["num_running"]
        )
        handles = pool_handle(APP).handles.remote().result()
        ray.kill(handles[f"{victim[0]}.r{victim[1]}"], no_restart=True)
        for t in threads:
            t.join()
        for o, e in zip(outs, expected, strict=True):
            assert "error" not in o, o.get("error")
            assert o["ids"] == e and o["finish"] == "length"
        healed = wait_for(
            lambda: (
                (s := _serving(url, "decode"))
                and len(s) == 2
                and victim[0] not in [i["instance_id"] for i in s]
                and s
            ),
            timeout_s=180,
            what="a replacement decode instance",
        )
        assert all(i["num_ranks"] == 2 for i in healed)
        assert pools(url)["num_replaced"] >= 1
        assert_idle_pages(url)


class TestColocatedEP2:
    @pytest.fixture(scope="class")
    def url(self, serve_url, tiny_model_dir):
        with deployed(
            serve_url, tiny_model_dir, APP + "-mixed", colocated=1, colocated_ranks=2, **EP
        ) as u:
            yield u

    def test_greedy_tokens_match_offline(self, url, greedy_cases):
        outs = http_complete_all(url, greedy_cases)  # all at once: several ranks work
        assert outs == [e for _, e in greedy_cases]
        assert_idle_pages(url)
