"""Routing, TTFT estimates, admission (400/429/503) and reservation bookkeeping of Scheduler."""

import math
import random

import pytest

from scheduler import (
    DecodeInstanceState,
    PrefillInstanceState,
    Queued,
    Rejection,
    RequestSpec,
    RouteDecision,
    Scheduler,
    SchedulerConfig,
    UnknownInstanceError,
    block_hashes,
)

BS = 64  # block and page size


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(num_prefill=2, num_decode=1, total_pages=1000, clock=None, **config_kw) -> Scheduler:
    config = SchedulerConfig(**{"default_prefill_tokens_per_s": 10_000.0, **config_kw})
    s = Scheduler(config, clock=clock or Clock())
    for i in range(num_prefill):
        s.add_instance(f"p{i}", "prefill")
    for i in range(num_decode):
        s.add_instance(f"d{i}", "decode")
        s.update_decode(DecodeInstanceState(f"d{i}", total_pages, total_pages))
    return s


def prompt(seed: int, n: int) -> list[int]:
    return [(seed * 7919 + i) % 50_000 for i in range(n)]


def spec(rid: str, ids: list[int], max_tokens: int = 64) -> RequestSpec:
    return RequestSpec.from_token_ids(rid, ids, max_tokens, BS)


def test_prefers_the_instance_holding_the_prefix():
    s = make()
    shared = prompt(1, 1024)
    cached = frozenset(block_hashes(shared, BS))
    s.update_prefill(PrefillInstanceState("p1", 0, None, cached))
    d = s.route(spec("r1", shared + prompt(2, 500)))
    assert isinstance(d, RouteDecision)
    assert d.prefill_instance_id == "p1" and d.num_cached_tokens == 1024
    assert s.stats().num_prefix_hit_tokens == 1024


def test_prefers_the_shorter_queue_and_counts_its_own_routes_as_queue():
    s = make()
    s.update_prefill(PrefillInstanceState("p0", num_queued_tokens=50_000))
    first = s.route(spec("r1", prompt(1, 2000)))
    assert first.prefill_instance_id == "p1"
    assert s.pending_prefill_tokens("p1") == 2000
    # No report came in between, yet the second prompt sees r1 queued on p1: p1 has 2000
    # queued tokens against p0's 50,000, so p1 again; a third sees 4000 on p1.
    second = s.route(spec("r2", prompt(2, 2000)))
    assert second.prefill_instance_id == "p1"
    assert s.on_prefill_done("r1") and s.pending_prefill_tokens("p1") == 2000
    assert not s.on_prefill_done("r1")  # idempotent


def test_blocks_being_prefilled_count_as_hits_for_the_next_request():
    s = make()
    s.update_prefill(PrefillInstanceState("p1", num_queued_tokens=1000))
    system = prompt(3, 4096)
    a = s.route(spec("a", system + prompt(4, 300)))
    assert a.prefill_instance_id == "p0"
    # On p0, b waits for a's 4396 tokens but then computes only 300 (0.47 s); on p1 it would
    # compute all 4396 behind 1000 queued (0.54 s).
    b = s.route(spec("b", system + prompt(5, 300)))
    assert b.prefill_instance_id == "p0" and b.num_cached_tokens == 4096


def test_finished_prefills_count_as_hits_until_a_later_report_shows_them():
    clock = Clock()
    s = make(clock=clock)
    s.update_prefill(PrefillInstanceState("p1", num_queued_tokens=1000))
    system = prompt(3, 4096)
    a = s.route(spec("a", system + prompt(4, 300)))
    assert a.prefill_instance_id == "p0" and s.on_prefill_done("a") and s.on_finished("a")
    # p0's report was taken before a's blocks entered its prefix cache
    s.update_prefill(PrefillInstanceState("p0"))
    b = s.route(spec("b", system + prompt(5, 300)))
    assert b.prefill_instance_id == "p0" and b.num_cached_tokens == 4096
    assert s.on_finished("b")
    # a report taken well after the prefill is the truth: here, the blocks were evicted
    clock.now += s.config.report_lag_s + 0.1
    s.update_prefill(PrefillInstanceState("p0"))
    c = s.route(spec("c", system + prompt(6, 300)))
    assert c.num_cached_tokens == 0


def test_local_prefills_promise_no_cached_blocks():
    s = make(num_prefill=1, decode_local_threshold=10_000)
    system = prompt(3, 1024)
    a = s.route(spec("a", system + prompt(4, 100)))
    assert a.prefill_instance_id is None  # decode-local: the decode instance caches nothing
    assert s.on_prefill_done("a") and s.on_finished("a")
    b = s.route(spec("b", system + prompt(5, 100)))
    assert b.num_cached_tokens == 0 and s.on_finished("b")


def test_ttft_estimate_is_queue_plus_uncached_prefill_plus_transfer():
    s = make(num_prefill=1, ttft_slo_s=10.0, transfer_bytes_per_s=1e9, kv_bytes_per_token=1000)
    ids = prompt(6, 1000)
    cached = frozenset(block_hashes(ids, BS)[:4])  # 256 tokens cached
    s.update_prefill(PrefillInstanceState("p0", 2000, 1000.0, cached))
    d = s.route(spec("r", ids))
    expected = 2000 / 1000 + (1000 - 256) / 1000 + 1000 * 1000 / 1e9
    assert d.num_cached_tokens == 256
    assert d.estimated_ttft_s == pytest.approx(expected)


def test_reservations_prevent_overbooking_and_are_released():
    s = make(num_prefill=1, total_pages=100, ttft_slo_s=10.0)
    for rid in ("r1", "r2"):  # 2560 + 64 tokens = 41 pages each
        assert isinstance(s.route(spec(rid, prompt(7, 2560))), RouteDecision)
    assert s.reserved_pages("d0") == 82
    # The decode instance has not reported yet: 100 free says its report, but only 18 are.
    third = s.route(spec("r3", prompt(8, 2560)))
    assert isinstance(third, Queued) and s.num_queued == 1
    assert s.drain_queue() == [] and s.reserved_pages("d0") == 82
    assert s.on_finished("r1") and not s.on_finished("r1")
    assert s.reserved_pages("d0") == 41
    [placed] = s.drain_queue()
    assert isinstance(placed, RouteDecision) and placed.request_id == "r3"
    assert s.reserved_pages("d0") == 82 and s.num_queued == 0
    assert s.on_cancel("r2") and s.on_cancel("r3")
    assert s.reserved_pages("d0") == 0 and s.num_active == 0
    assert s.pending_prefill_tokens("p0") == 0


def test_reported_free_pages_are_respected_when_lower_than_the_books():
    s = make(num_prefill=1, total_pages=100)
    s.update_decode(DecodeInstanceState("d0", num_free_pages=10, num_total_pages=100))
    assert isinstance(s.route(spec("r", prompt(9, 1000))), Rejection | Queued)  # 17 pages
    assert s.reserved_pages("d0") == 0


def test_removing_an_instance_returns_its_requests_and_frees_their_pages():
    s = make(num_prefill=2, num_decode=2)
    decisions = [s.route(spec(f"r{i}", prompt(i, 3000))) for i in range(6)]
    on_p0 = {d.request_id for d in decisions if d.prefill_instance_id == "p0"}
    assert on_p0 and len(on_p0) < 6
    done = sorted(on_p0)[0]
    s.on_prefill_done(done)  # its KV already reached the decode instance: unaffected
    lost = {r.request_id for r in s.remove_instance("p0")}
    assert lost == on_p0 - {done}
    assert s.num_active == 6 - len(lost)
    reserved = sum(s.reserved_pages(d) for d in ("d0", "d1"))
    assert reserved == sum(d.num_reserved_pages for d in decisions if d.request_id not in lost)
    on_d0 = {d.request_id for d in decisions if d.decode_instance_id == "d0"} - lost
    assert {r.request_id for r in s.remove_instance("d0")} == on_d0
    assert s.reserved_pages("d1") == sum(
        d.num_reserved_pages
        for d in decisions
        if d.decode_instance_id == "d1" and d.request_id not in lost
    )
    assert s.remove_instance("d0") == []
    with pytest.raises(UnknownInstanceError, match="add_instance"):
        s.update_decode(DecodeInstanceState("d0", 1, 1))


def test_429_when_ttft_slo_cannot_be_met():
    s = make(num_prefill=1, ttft_slo_s=1.0)
    s.update_prefill(PrefillInstanceState("p0", num_queued_tokens=100_000))  # 10 s of work
    r = s.route(spec("r", prompt(1, 1000)))
    assert isinstance(r, Rejection) and r.status == 429 and r.reason == "slo"
    assert r.retry_after_s == pytest.approx(10.0 + 0.1 + 1000 * 70_272 / 5e9 - 1.0)
    assert s.stats().num_rejected == {"slo": 1} and s.num_active == 0


def test_long_prompt_gets_a_budget_proportional_to_its_own_work():
    s = make(num_prefill=1, ttft_slo_s=1.0, total_pages=2000)
    r = s.route(spec("r", prompt(1, 100_000)))  # 10 s of prefill on an idle instance
    assert isinstance(r, RouteDecision) and r.estimated_ttft_s > 10


def test_429_when_queue_full_and_queue_timeout():
    clock = Clock()
    s = make(num_prefill=1, total_pages=50, clock=clock, max_queue_len=1, ttft_slo_s=10.0)
    assert isinstance(s.route(spec("big", prompt(1, 2000), max_tokens=40)), RouteDecision)
    q = s.route(spec("q", prompt(2, 2000), max_tokens=40))
    assert isinstance(q, Queued) and q.estimated_wait_s > 0
    full = s.route(spec("f", prompt(3, 2000), max_tokens=40))
    assert isinstance(full, Rejection) and full.status == 429 and full.reason == "queue_full"
    assert full.retry_after_s >= 1.0
    clock.now = q.deadline_s + 0.01
    [timeout] = s.drain_queue()
    assert timeout.reason == "queue_timeout" and timeout.status == 429
    assert s.num_queued == 0 and s.reserved_pages("d0") == 32


def test_429_no_pages_when_running_requests_free_too_late():
    s = make(num_prefill=1, total_pages=200)
    s.route(spec("long", prompt(1, 1000), max_tokens=10_000))  # ~ 500 s of decode
    r = s.route(spec("r", prompt(2, 1000), max_tokens=1000))
    assert isinstance(r, Rejection) and r.reason == "no_pages" and r.retry_after_s > 400


def full_batch(clock: Clock, max_tokens: int, **config_kw) -> Scheduler:
    """One prefill and one decode instance (batch of 2, 0.1 s steps) whose two slots are
    taken by requests that decode ``max_tokens`` tokens from now."""
    s = make(num_prefill=1, clock=clock, **{"decode_local_threshold": 0, **config_kw})
    s.update_decode(DecodeInstanceState("d0", 1000, 1000, max_batch_size=2, decode_step_s=0.1))
    for rid in ("a", "b"):
        assert isinstance(s.route(spec(rid, prompt(1, 100), max_tokens)), RouteDecision)
        assert s.on_prefill_done(rid)  # decoding from now
    return s


def test_429_when_the_decode_batch_stays_full_past_the_slo():
    clock = Clock()
    s = full_batch(clock, max_tokens=100, ttft_slo_s=2.0)  # both decode for 10 s
    r = s.route(spec("c", prompt(2, 100)))
    # Pages are plentiful and the prefill idle: only the full batch stands in the way.
    assert isinstance(r, Rejection) and r.status == 429 and r.reason == "slo"
    assert r.retry_after_s == pytest.approx(10.0 - 2.0)
    assert s.num_active == 2 and s.reserved_pages("d0") == 2 * 4
    clock.now += 9.0  # a slot frees in 1 s: admitted, decoding once it does
    d = s.route(spec("d", prompt(3, 100)))
    assert isinstance(d, RouteDecision) and d.estimated_ttft_s == pytest.approx(1.0)


def test_a_slot_wait_overlaps_the_prefill():
    clock = Clock()
    s = full_batch(clock, max_tokens=10)  # a slot frees in 1 s
    fast = s.route(spec("c", prompt(2, 1000)))  # 0.1 s of prefill: then waits for the slot
    assert fast.estimated_ttft_s == pytest.approx(1.0)
    s.on_cancel("c")
    s.update_prefill(PrefillInstanceState("p0", num_queued_tokens=15_000))  # 1.5 s of queue
    slow = s.route(spec("e", prompt(3, 1000)))  # the slot is free by its first token
    assert slow.estimated_ttft_s == pytest.approx(1.5 + 0.1 + 1000 * 70_272 / 5e9)


def test_local_prefill_takes_its_slot_before_it_starts():
    clock = Clock()
    s = full_batch(clock, max_tokens=10, decode_local_threshold=256)
    s.update_decode(
        DecodeInstanceState(
            "d0", 1000, 1000, max_batch_size=2, decode_step_s=0.1, prefill_tokens_per_s=1000.0
        )
    )
    d = s.route(spec("c", prompt(2, 200)))
    assert d.is_local_prefill
    # slot in 1 s, then one decode step, then 200 tokens at 1000 tokens/s
    assert d.estimated_ttft_s == pytest.approx(1.0 + 0.1 + 0.2)


def test_requests_take_batch_slots_in_turn():
    clock = Clock()
    s = full_batch(clock, max_tokens=10, ttft_slo_s=10.0)  # slots free at 1 s and 1 s
    waits = [s.route(spec(f"w{i}", prompt(i + 2, 100), 10)).estimated_ttft_s for i in range(4)]
    assert waits == pytest.approx([1.0, 1.0, 2.0, 2.0])  # each runs 1 s once in a slot
    ends, slot_free = s._books.decode_timeline("d0", 0.1, 2)
    assert sorted(end - clock.now for end, _ in ends) == pytest.approx([1, 1, 2, 2, 3, 3])
    assert slot_free - clock.now == pytest.approx(3.0)
    for rid in ("a", "b", "w0", "w1", "w2", "w3"):
        assert s.on_finished(rid)
    assert s._books.decode_timeline("d0", 0.1, 2) == ([], -math.inf)


def test_each_choice_of_a_request_takes_a_batch_slot():
    clock = Clock()
    s = make(num_prefill=1, clock=clock, decode_local_threshold=0, ttft_slo_s=10.0)
    s.update_decode(DecodeInstanceState("d0", 1000, 1000, max_batch_size=2, decode_step_s=0.1))
    pair = RequestSpec.from_token_ids("pair", prompt(1, 100), 10, BS, num_choices=2)
    assert isinstance(s.route(pair), RouteDecision) and s.on_prefill_done("pair")
    assert s.route(spec("next", prompt(2, 100), 10)).estimated_ttft_s == pytest.approx(1.0)


def test_page_wait_counts_the_wait_for_a_batch_slot():
    clock = Clock()
    s = full_batch(clock, max_tokens=10, ttft_slo_s=30.0)
    s.update_decode(DecodeInstanceState("d0", 10, 10, max_batch_size=2, decode_step_s=0.1))
    # 10 pages: a and b hold 2 each and end at 1 s; w holds 5 and decodes from 1 s to 11 s.
    w = s.route(spec("w", prompt(2, 220), max_tokens=100))
    assert isinstance(w, RouteDecision) and w.num_reserved_pages == 5
    q = s.route(spec("q", prompt(3, 200), max_tokens=8))  # 4 pages: a's and b's at 1 s
    assert isinstance(q, Queued) and q.estimated_wait_s == pytest.approx(1.0)
    q2 = s.route(spec("q2", prompt(4, 300), max_tokens=84))  # 6 pages: w's too, at 11 s
    assert isinstance(q2, Queued) and q2.estimated_wait_s == pytest.approx(11.0)


def test_requests_of_an_owner_whose_lease_lapsed_are_let_go():
    clock = Clock()
    s = make(num_prefill=1, total_pages=100, clock=clock, ttft_slo_s=10.0, owner_lease_s=5.0)
    placed = s.route(spec("a", prompt(1, 2560)), owner="ingress-1")  # 41 pages
    assert isinstance(s.route(spec("b", prompt(2, 2560)), owner="ingress-2"), RouteDecision)
    local = s.route(spec("c", prompt(3, 100)), owner="ingress-1")  # decode-local
    assert local.prefill_instance_id is None
    queued = s.route(spec("q", prompt(4, 2560)), owner="ingress-1")  # no pages left
    assert isinstance(queued, Queued)
    kept = s.route(spec("k", prompt(5, 500)))  # no owner: never expires
    clock.now += 4.0
    s.renew("ingress-2")
    assert s.expire_owners() == []  # nobody silent for 5 s yet
    clock.now += 1.5
    orphans = {o.request_id: o.instance_ids for o in s.expire_owners()}
    assert orphans == {
        "a": (placed.prefill_instance_id, "d0"),
        "c": ("d0",),
        "q": (),
    }
    assert s.num_queued == 0 and s.num_active == 2 and kept.request_id == "k"
    assert s.reserved_pages("d0") == 41 + kept.num_reserved_pages
    assert s.pending_prefill_tokens("p0") == 2560 + 500
    assert s.expire_owners() == []  # once
    pair = RequestSpec.from_token_ids("pair", prompt(7, 100), 8, BS, num_choices=3)
    assert isinstance(s.route(pair, owner="ingress-3"), RouteDecision)
    clock.now += 3.0
    s.renew("ingress-2")
    clock.now += 2.5
    assert [(o.request_id, o.num_choices) for o in s.expire_owners()] == [("pair", 3)]
    # a replica that comes back starts a new lease with its next route
    assert isinstance(s.route(spec("a2", prompt(6, 100)), owner="ingress-1"), RouteDecision)
    clock.now += 6.0
    assert {o.request_id for o in s.expire_owners()} == {"a2", "b"}
    assert s.on_finished("k") and s.num_active == 0 and s.reserved_pages("d0") == 0


def test_cancel_while_queued_leaves_nothing_behind():
    s = make(num_prefill=1, total_pages=50, ttft_slo_s=10.0)
    s.route(spec("a", prompt(1, 2000), max_tokens=40))
    assert isinstance(s.route(spec("b", prompt(2, 2000), max_tokens=40)), Queued)
    assert s.on_cancel("b") and s.num_queued == 0
    s.on_finished("a")
    assert s.drain_queue() == [] and s.reserved_pages("d0") == 0


def test_400_with_both_numbers_when_too_long():
    s = make(max_model_len=4096)
    r = s.route(spec("r", prompt(1, 4000), max_tokens=200))
    assert isinstance(r, Rejection) and r.status == 400 and r.reason == "too_long"
    assert "4000" in r.message and "200" in r.message and "4096" in r.message


def test_503_without_instances_or_capacity():
    s = Scheduler(SchedulerConfig())
    r = s.route(spec("r", prompt(1, 100)))
    assert r.status == 503 and r.reason == "no_instances"
    s = make(total_pages=10)
    r = s.route(spec("r", prompt(1, 1000)))  # needs 17 pages, instance has 10 in all
    assert r.status == 503 and r.reason == "no_capacity" and "17" in r.message


def test_short_prompts_prefill_on_the_decode_instance():
    s = make(decode_local_threshold=256)
    short = s.route(spec("short", prompt(1, 200)))
    assert short.prefill_instance_id is None and short.is_local_prefill
    long = s.route(spec("long", prompt(2, 300)))
    assert long.prefill_instance_id in ("p0", "p1") and not long.is_local_prefill
    assert s.stats().num_decode_local == 1


def test_mixed_instances_take_prefill_and_decode_together():
    s = Scheduler(SchedulerConfig(), clock=Clock())
    for m in ("m0", "m1"):
        s.add_instance(m, "mixed")
        s.update_decode(DecodeInstanceState(m, 1000, 1000))
    s.update_prefill(PrefillInstanceState("m0", num_queued_tokens=40_000))
    d = s.route(spec("r", prompt(1, 3000)))
    assert d.prefill_instance_id == d.decode_instance_id == "m1" and d.is_local_prefill
    assert s.reserved_pages("m1") == d.num_reserved_pages and s.reserved_pages("m0") == 0
    assert s.pending_prefill_tokens("m1") == 3000
    s.on_finished("r")
    assert s.reserved_pages("m1") == 0 and s.pending_prefill_tokens("m1") == 0
    stats = s.stats()
    assert stats.num_mixed_instances == 2 and stats.num_routed == 1


def test_decode_choice_prefers_free_pages_and_light_batches():
    s = make(num_decode=0)
    s.add_instance("d0", "decode")
    s.add_instance("d1", "decode")
    s.update_decode(DecodeInstanceState("d0", 300, 1000, num_running=10, max_batch_size=64))
    s.update_decode(DecodeInstanceState("d1", 900, 1000, num_running=10, max_batch_size=64))
    assert s.route(spec("a", prompt(1, 1000))).decode_instance_id == "d1"
    s.update_decode(DecodeInstanceState("d1", 900, 1000, num_running=64, max_batch_size=64))
    assert s.route(spec("b", prompt(2, 1000))).decode_instance_id == "d0"


def test_duplicate_request_id_is_a_usage_error():
    s = make()
    s.route(spec("r", prompt(1, 500)))
    with pytest.raises(ValueError, match="unique"):
        s.route(spec("r", prompt(1, 500)))


def test_random_lifecycles_never_overbook_or_leak():
    rng = random.Random(0)
    clock = Clock()
    s = make(num_prefill=2, num_decode=2, total_pages=300, clock=clock, ttft_slo_s=30.0)
    s.add_instance("m0", "mixed")
    s.update_decode(DecodeInstanceState("m0", 200, 200))
    totals = {"d0": 300, "d1": 300, "m0": 200}
    live: set[str] = set()
    for step in range(400):
        clock.now += rng.random()
        op = rng.random()
        if op < 0.45:
            rid = f"r{step}"
            n = rng.choice([100, 1000, 4000, 9000])
            answer = s.route(
                spec(rid, prompt(rng.randrange(4), n), max_tokens=rng.randrange(1, 2000))
            )
            if isinstance(answer, RouteDecision | Queued):
                live.add(rid)
        elif op < 0.6 and live:
            s.on_prefill_done(rng.choice(sorted(live)))
        elif op < 0.8 and live:
            rid = rng.choice(sorted(live))
            (s.on_finished if rng.random() < 0.5 else s.on_cancel)(rid)
            live.discard(rid)
        elif op < 0.83:
            victim = rng.choice(["p0", "d1"])
            for lost in s.remove_instance(victim):
                live.discard(lost.request_id)
            s.add_instance(victim, "prefill" if victim == "p0" else "decode")
            if victim == "d1":
                s.update_decode(DecodeInstanceState("d1", 300, 300))
        for answer in s.drain_queue():
            if isinstance(answer, Rejection):
                live.discard(answer.request_id)
        for inst, total in totals.items():
            assert 0 <= s.reserved_pages(inst) <= total
        assert s.num_active + s.num_queued == len(live)
    for rid in sorted(live):
        assert s.on_cancel(rid)
    assert s.num_active == 0 and s.num_queued == 0
    assert all(s.reserved_pages(i) == 0 for i in totals)
    assert all(s.pending_prefill_tokens(i) == 0 for i in ("p0", "p1", "d0", "d1", "m0"))
    assert s._books.instances["p1"].pending_hashes == {}


def test_decode_local_counts_the_decode_instances_own_prefix_cache():
    s = make(decode_local_threshold=256)
    ids = prompt(11, 2000)
    cached = tuple(block_hashes(ids, BS)[:30])  # 1920 tokens, reported as a tuple
    s.update_decode(DecodeInstanceState("d0", 1000, 1000, cached_block_hashes=cached))
    d = s.route(spec("r", ids))
    assert d.prefill_instance_id is None and d.num_cached_tokens == 1920
    assert s.pending_prefill_tokens("d0") == 80


def test_the_block_holding_the_last_prompt_token_is_never_a_hit():
    s = make(num_prefill=1, decode_local_threshold=0)
    ids = prompt(12, 128)
    s.update_prefill(PrefillInstanceState("p0", cached_block_hashes=block_hashes(ids, BS)))
    assert isinstance(s._books.get("p0").prefill.cached_block_hashes, frozenset)
    assert s.route(spec("r", ids)).num_cached_tokens == 64
