"""Pools changing under traffic: grow, move an instance between roles, worker deaths.

One deployment for the module, in this order: 1P+1D -> 2P+1D -> one prefill instance moved to
decode (1P+2D) while requests flow, none failing; then a decode worker killed mid-stream (its
request resumes elsewhere with identical greedy output, the other stream is unaffected, the pool
heals, no page leaks); then a prefill worker killed mid-prefill (the request is re-routed).
"""

import threading

import httpx
import pytest
import ray

from tests.e2e.conftest import (
    ADMIN,
    LONG_PROMPT_LEN,
    assert_idle_pages,
    deployed,
    http_complete,
    http_stream,
    make_prompt,
    pool_handle,
    pools,
    wait_for,
)

APP = "live"


@pytest.fixture(scope="module")
def url(serve_url, tiny_model_dir):
    with deployed(serve_url, tiny_model_dir, APP, prefill=1, decode=1) as u:
        yield u


def _serving(url: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"prefill": [], "decode": [], "mixed": []}
    for inst in pools(url)["instances"]:
        if inst["state"] == "serving":
            out[inst["role"]].append(inst["instance_id"])
    return out


def _kill(instance_id: str) -> None:
    handles = pool_handle(APP).handles.remote().result()
    ray.kill(handles[instance_id], no_restart=True)


def test_grow_and_move_while_requests_flow(url, reference_engine):
    prompts = [make_prompt(n, 300 + n) for n in (6, 21, 50, 75)]
    expected = [reference_engine.generate([p], 6)[0] for p in prompts]
    failures: list[str] = []
    done = [0]
    stop = threading.Event()

    def traffic(k: int) -> None:
        i = k
        while not stop.is_set():
            try:
                got = http_complete(url, prompts[i % len(prompts)], 6)
                if got != expected[i % len(prompts)]:
                    failures.append(f"wrong tokens for prompt {i % len(prompts)}")
                done[0] += 1
            except Exception as e:  # noqa: BLE001 - every failure is a test failure
                failures.append(repr(e))
            i += 1

    threads = [threading.Thread(target=traffic, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: done[0] >= 2, what="traffic flowing")
        r = httpx.post(f"{url}/admin/pools", json={"prefill": 2}, headers=ADMIN, timeout=300)
        assert r.status_code == 200, r.text
        assert len(_serving(url)["prefill"]) == 2
        n_before_move = done[0]
        moved = _serving(url)["prefill"][0]
        r = httpx.post(
            f"{url}/admin/move",
            json={"instance": moved, "role": "decode"},
            headers=ADMIN,
            timeout=300,
        )
        assert r.status_code == 200, r.text
        wait_for(lambda: done[0] >= n_before_move + 4, timeout_s=120, what="traffic after the move")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures[:5]
    serving = _serving(url)
    assert moved in serving["decode"] and len(serving["prefill"]) == 1
    assert len(serving["decode"]) == 2
    assert pools(url)["targets"] == {"prefill": 1, "decode": 2, "mixed": 0}
    assert_idle_pages(url, timeout_s=30)


def test_decode_killed_mid_stream_resumes(url, reference_engine):
    assert len(_serving(url)["decode"]) == 2
    n = 300
    prompts = [make_prompt(9, 400), make_prompt(13, 401)]
    expected = [reference_engine.generate([p], n)[0] for p in prompts]
    outs = [{}, {}]
    threads = [
        threading.Thread(target=http_stream, args=(url, p, n, o))
        for p, o in zip(prompts, outs, strict=True)
    ]
    threads[0].start()
    wait_for(lambda: len(outs[0].get("ids", [])) >= 5, what="first tokens of the victim")
    victim = next(
        i["instance_id"]
        for i in pools(url)["instances"]
        if i["role"] == "decode" and i["stats"] and i["stats"]["num_running"]
    )
    threads[1].start()
    wait_for(lambda: len(outs[1].get("ids", [])) >= 5, what="first tokens of the bystander")
    num_before_kill = len(outs[0]["ids"])
    _kill(victim)
    for t in threads:
        t.join()
    assert num_before_kill < n, "the victim finished before the kill; make it longer"
    assert outs[0]["ids"] == expected[0] and outs[0]["finish"] == "length"
    assert outs[1]["ids"] == expected[1] and outs[1]["finish"] == "length"
    assert "error" not in outs[0] and "error" not in outs[1]
    healed = wait_for(
        lambda: (s := _serving(url)) and len(s["decode"]) == 2 and victim not in s["decode"] and s,
        timeout_s=120,
        what="a replacement decode instance",
    )
    assert victim not in healed["decode"]
    assert pools(url)["num_replaced"] >= 1
    assert_idle_pages(url, timeout_s=30)


def test_prefill_killed_mid_prefill_is_rerouted(url, greedy_cases):
    prompt, expected = greedy_cases[-1]
    assert len(prompt) == LONG_PROMPT_LEN
    (victim,) = _serving(url)["prefill"]
    out: dict = {}
    t = threading.Thread(
        target=lambda: out.update(ids=http_complete(url, prompt, len(expected))), daemon=True
    )
    t.start()
    wait_for(
        lambda: any(
            i["instance_id"] == victim and i["stats"] and i["stats"]["num_queued"]
            for i in pools(url)["instances"]
        ),
        interval_s=0.05,
        what="the long prompt in prefill",
    )
    _kill(victim)
    t.join(timeout=180)
    assert out.get("ids") == expected
    wait_for(
        lambda: (s := _serving(url)) and len(s["prefill"]) == 1 and victim not in s["prefill"],
        timeout_s=120,
        what="a replacement prefill instance",
    )
    assert_idle_pages(url, timeout_s=30)
    assert pools(url)["num_replaced"] >= 2


def test_scheduler_killed_mid_stream_is_restarted(url, reference_engine, greedy_cases):
    """The scheduler actor dies while streams run: they finish with the offline tokens (they
    were placed already), a request sent right after is routed by the replacement, which the
    pool manager rebuilt from the workers' reports; no page is left behind."""
    n = 120
    prompts = [make_prompt(7, 700 + k) for k in range(2)]
    expected = [reference_engine.generate([p], n)[0] for p in prompts]
    outs: list[dict] = [{} for _ in prompts]
    threads = [
        threading.Thread(target=http_stream, args=(url, p, n, o))
        for p, o in zip(prompts, outs, strict=True)
    ]
    for t in threads:
        t.start()
    wait_for(lambda: all(len(o.get("ids", [])) >= 3 for o in outs), what="every stream started")
    restarts = pools(url)["num_scheduler_restarts"]
    ray.kill(pool_handle(APP).scheduler_handle.remote().result(), no_restart=True)
    prompt, want = greedy_cases[0]
    assert http_complete(url, prompt, len(want)) == want  # routed by the new scheduler
    for t in threads:
        t.join(timeout=180)
    for o, e in zip(outs, expected, strict=True):
        assert "error" not in o, o.get("error")
        assert o["ids"] == e and o["finish"] == "length"
    assert pools(url)["num_scheduler_restarts"] == restarts + 1
    assert [http_complete(url, p, len(e)) for p, e in greedy_cases] == [e for _, e in greedy_cases]
    assert_idle_pages(url, timeout_s=30)
