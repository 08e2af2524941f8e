"""Faults on the served path: a TCP fault proxy between prefill and decode, and the death of
one of two ingress replicas.

One deployment (1P+1D, two ingress replicas, short transfer and reader leases). The decode
rank advertises a ``FaultProxy`` in front of its KV receiver, so every transfer crosses it:
- delay, a cut connection, a corrupted byte: the request completes with the offline greedy
  tokens (the sender resumes, or the request is re-routed);
- a black hole: the request ends with a 503 that says why, within the leases, and the next
  one is served once the path is back;
- an ingress replica killed while it streams and while long prompts wait for their prefill:
  its streams end with an error (none hangs), the other replica's streams finish, new requests
  are served, and the dead replica's requests, wherever they were (queued, prefilling, waiting
  for their transfer, decoding), leave the scheduler's books and give their pages back within
  seconds (its owner lease lapses), not after the decode reservation lease.
After each, no page is held and no request is active.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import ray

from tests.e2e.conftest import (
    LONG_PROMPT_LEN,
    MODEL_NAME,
    assert_idle_pages,
    deployed,
    http_complete,
    make_prompt,
    pool_handle,
    pools,
    wait_for,
)
from tests.e2e.fault_proxy import Fault, FaultProxy

APP = "faults"
READER_TIMEOUT_S = 5.0
OWNER_LEASE_S = 5.0  # SchedulerConfig.owner_lease_s; the pool manager checks every second
SETTINGS = {
    "prefill": 1,
    "decode": 1,
    "num_ingress_replicas": 2,
    "reader_timeout_s": READER_TIMEOUT_S,
    "transfer_idle_timeout_s": 2.0,
    "transfer_progress_lease_s": 5.0,
    "ttft_slo_s": 3600.0,  # faults, not admission: long prompts queue behind each other
}
# fp32 latent KV of k2-tiny: 3 layers x (128 + 16) x 4 B = 1,728 B per token; the 4,200-token
# prompt sends about 7 MB, so these offsets fall inside its transfer
CUT_AFTER = 1 << 20
CORRUPT_AT = 2 << 20


@pytest.fixture(scope="module")
def url(serve_url, tiny_model_dir):
    with deployed(serve_url, tiny_model_dir, APP, **SETTINGS) as u:
        yield u


@pytest.fixture(scope="module")
def proxy(url):
    """The decode rank's KV receiver behind a fault proxy (its advertised address)."""
    (decode_id,) = [i["instance_id"] for i in pools(url)["instances"] if i["role"] == "decode"]
    worker = pool_handle(APP).handles.remote().result()[decode_id]
    p = FaultProxy(ray.get(worker.kv_address.remote()))
    ray.get(worker.advertise_kv_address.remote(p.address))
    yield p
    ray.get(worker.advertise_kv_address.remote(None))
    p.close()


def _complete_all(url: str, cases: list[tuple[list[int], list[int]]]) -> list[object]:
    """Each case's completion, all at once: the token ids, or the exception it raised."""
    outs: list[object] = [None] * len(cases)

    def run(i: int, prompt: list[int], n: int) -> None:
        try:
            outs[i] = http_complete(url, prompt, n)
        except Exception as e:  # noqa: BLE001 - reported by the assertion
            outs[i] = e

    threads = [threading.Thread(target=run, args=(i, p, len(e))) for i, (p, e) in enumerate(cases)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not any(t.is_alive() for t in threads), "a request hung"
    return outs


@pytest.mark.parametrize(
    "fault",
    [
        Fault("delay", delay_s=0.01),
        Fault("cut", after_bytes=CUT_AFTER),
        Fault("corrupt", after_bytes=CORRUPT_AT),
        Fault("cut", after_bytes=CUT_AFTER, times=3),  # the resume is cut too: re-routed
    ],
    ids=["delay", "cut", "corrupt", "cut-thrice"],
)
def test_kv_path_fault_completes(url, proxy, greedy_cases, fault):
    cases = [greedy_cases[-1], greedy_cases[2]]  # the 4,200-token prompt and a short one
    assert len(cases[0][0]) == LONG_PROMPT_LEN
    num_faults = proxy.num_faults
    proxy.set(fault)
    try:
        outs = _complete_all(url, cases)
    finally:
        proxy.set(Fault())
    assert outs == [e for _, e in cases]
    assert proxy.num_faults > num_faults, "the fault never fired: the transfer is too short"
    assert_idle_pages(url, timeout_s=30)


def test_black_hole_ends_with_a_clear_error(url, proxy):
    prompt = make_prompt(64, 900)
    proxy.set(Fault("drop"))
    try:
        r = httpx.post(
            f"{url}/v1/completions",
            json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": 4, "temperature": 0},
            timeout=120,  # the leases end it long before
        )
    finally:
        proxy.set(Fault())
    assert r.status_code == 503, r.text
    assert "attempts" in r.json()["error"]["message"], r.text
    assert r.headers.get("retry-after")
    assert proxy.num_faults >= 1
    assert len(http_complete(url, prompt, 4)) == 4  # the path is back
    assert_idle_pages(url, timeout_s=30)


# ---- an ingress replica dies ----------------------------------------------------------------
def _replicas() -> list[object]:
    """The ingress replicas' actors (Serve names them ``SERVE_REPLICA::APP#Ingress#id``)."""
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and f"::{APP}#Ingress#" in a["name"]
    ]
    return [ray.get_actor(name, namespace="serve") for name in names]


def _stream(url: str, prompt: list[int], max_tokens: int, out: dict) -> None:
    """Stream a greedy completion into ``out``: ids as they come, then finish or error."""
    body = {
        "model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, "return_token_ids": True, "stream": True,
    }  # fmt: skip
    ids: list[int] = []
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
            out["status"] = r.status_code
            if r.status_code != 200:
                out["body"] = r.read().decode(errors="replace")[:300]
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out["error"] = chunk["error"]
                    continue
                for choice in chunk["choices"]:
                    ids += choice.get("token_ids") or []
                    out["finish"] = choice.get("finish_reason") or out.get("finish")
                out["ids"] = list(ids)
    except httpx.HTTPError as e:  # the connection ended mid-body: the client sees an error
        out["error"] = repr(e)
    finally:
        out["done"] = True


def test_ingress_replica_killed_mid_stream(url, proxy, reference_engine):
    replicas = _replicas()
    assert len(replicas) == 2
    n = 400
    prompts = [make_prompt(11, 950 + k) for k in range(4)]
    expected = [reference_engine.generate([p], n)[0] for p in prompts]
    outs: list[dict] = [{} for _ in prompts]
    threads = [
        threading.Thread(target=_stream, args=(url, p, n, o), daemon=True)
        for p, o in zip(prompts, outs, strict=True)
    ]
    for t in threads:
        t.start()
    wait_for(lambda: all(len(o.get("ids", [])) >= 3 for o in outs), what="every stream started")
    # long prompts queue for the one prefill instance: the dying replica holds some before
    # their first token (in the prefill queue or mid-prefill, their decode pages reserved)
    long_outs: list[dict] = [{} for _ in range(4)]
    threads += [
        threading.Thread(
            target=_stream, args=(url, make_prompt(LONG_PROMPT_LEN, 960 + k), 4, o), daemon=True
        )
        for k, o in enumerate(long_outs)
    ]
    for t in threads[len(prompts) :]:
        t.start()
    time.sleep(1.0)
    ongoing = [ray.get(r.get_num_ongoing_requests.remote()) for r in replicas]
    victim = max(range(2), key=lambda i: ongoing[i])
    assert ongoing[victim] >= 1, ongoing
    ray.kill(replicas[victim], no_restart=True)
    killed_at = time.monotonic()

    def only_live_requests_held():
        # every request still in the books is one a client still waits for (the survivors'):
        # the dead replica's have left it, though nobody cancelled them
        sched = pools(url)["scheduler"]
        live = sum(1 for o in outs + long_outs if "done" not in o)
        return sched["num_active"] + sched["num_queued"] <= live and sched

    wait_for(only_live_requests_held, timeout_s=OWNER_LEASE_S + 10, what="the books let go")
    print(f"the dead replica's requests left the books {time.monotonic() - killed_at:.1f}s after")
    deadline = time.monotonic() + 180  # the client's own timeout is longer: a hang shows here
    for t in threads:
        t.join(timeout=max(deadline - time.monotonic(), 0))
    assert not any(t.is_alive() for t in threads), "a stream hung after its ingress died"
    # no page held, no request in the books: seconds after the last survivor ended (the
    # decode reservation lease alone would keep a dead replica's prefill's pages for a minute)
    assert_idle_pages(url, timeout_s=OWNER_LEASE_S + 5)
    print("long prompts:", [(o.get("status"), o.get("body"), o.get("error")) for o in long_outs])
    failed = [o for o in outs + long_outs if "error" in o or o.get("status") != 200]
    done = [(o, e) for o, e in zip(outs, expected, strict=True) if o not in failed]
    assert 1 <= len(failed) <= ongoing[victim], (ongoing, outs, long_outs)
    assert all(len(o["ids"]) == 4 for o in long_outs if o not in failed), long_outs
    print("requests of the dead replica ended with:", [o.get("error", o) for o in failed])
    for o, e in done:  # the other replica's streams are untouched
        assert o["ids"] == e and o["finish"] == "length"
    # the surviving replica (and Serve's replacement) keep serving
    prompt = make_prompt(20, 990)
    want = reference_engine.generate([prompt], 6)[0]
    assert wait_for(
        lambda: _try_complete(url, prompt, 6) == want, timeout_s=60, what="a request served"
    )
    assert [_try_complete(url, prompt, 6) for _ in range(4)] == [want] * 4
    assert_idle_pages(url, timeout_s=OWNER_LEASE_S + 5)


def _try_complete(url: str, prompt: list[int], n: int) -> list[int] | None:
    try:
        return http_complete(url, prompt, n)
    except (AssertionError, httpx.HTTPError):
        return None
