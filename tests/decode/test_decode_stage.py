"""DecodeStage on the real k2-tiny engine: decode-local prefill, continuous batching, stop
conditions, cancel, streaming and backpressure. Greedy outputs are compared token for token
with ``engine.generate``."""

import random
import threading
import time

import pytest

from decode.jobs import DecodeConfig, DecodeJob, TokenBatch
from decode.stage import DecodeStage


def make_prompts(vocab_size: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab_size) for _ in range(n)] for n in lengths]


def run_until_idle(stage, max_steps: int = 10_000) -> int:
    """Step until a step does nothing; returns the number of steps."""
    for n in range(max_steps):
        if not stage.step():
            return n
    raise AssertionError(f"stage still busy after {max_steps} steps")


def read_all(stage, request_id: str) -> TokenBatch:
    """Everything the stream holds (the request must have finished)."""
    batch = stage.poll(request_id, 0, timeout_s=0)
    assert batch.finished, f"{request_id} has not finished: {batch}"
    return batch


@pytest.fixture
def stage(decode_engine):
    stage = DecodeStage(decode_engine, DecodeConfig(prefill_token_budget=24, max_batch_size=8))
    free_before = decode_engine.cache.allocator.num_free_pages
    yield stage
    assert decode_engine.cache.allocator.num_free_pages == free_before, "pages leaked"


def local_job(rid, prompt, max_tokens, **kw):
    return DecodeJob(rid, prompt, None, max_tokens=max_tokens, ignore_eos=True, **kw)


def test_local_prefill_matches_generate(stage, decode_engine):
    prompts = make_prompts(decode_engine.config.vocab_size, [5, 40, 70], seed=1)
    expected = decode_engine.generate(prompts, 6)
    for i, p in enumerate(prompts):
        stage.start(local_job(f"r{i}", p, 6))
    run_until_idle(stage)
    for i, want in enumerate(expected):
        out = read_all(stage, f"r{i}")
        assert out.token_ids == want
        assert out.finish_reason == "length" and out.error is None
    stats = stage.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.num_prefill_tokens == 115 and stats.num_generated_tokens == 18


def test_requests_joining_mid_flight_match_generate(stage, decode_engine):
    prompts = make_prompts(decode_engine.config.vocab_size, [12, 33, 7, 50], seed=2)
    expected = decode_engine.generate(prompts, 8)
    stage.start(local_job("r0", prompts[0], 8))
    for _ in range(4):
        stage.step()
    stage.start(local_job("r1", prompts[1], 8))
    stage.step()
    assert stage.stats().batch_size >= 1  # r0 keeps decoding while r1 prefills
    stage.start(local_job("r2", prompts[2], 8))
    stage.start(local_job("r3", prompts[3], 8))
    sizes = []
    while stage.step():
        sizes.append(stage.stats().batch_size)
    assert max(sizes) >= 3, f"requests never shared a decode step: {sizes}"
    for i, want in enumerate(expected):
        assert read_all(stage, f"r{i}").token_ids == want


def test_stop_token_ends_with_stop_and_is_not_returned(stage, decode_engine):
    (prompt,) = make_prompts(decode_engine.config.vocab_size, [9], seed=3)
    (full,) = decode_engine.generate([prompt], 6)
    stop = full[3]
    cut = full.index(stop)
    stage.start(local_job("s", prompt, 6, stop_token_ids=(stop,)))
    run_until_idle(stage)
    out = read_all(stage, "s")
    assert out.finish_reason == "stop"
    assert out.token_ids == full[:cut]


def test_max_tokens_one_finishes_after_prefill(stage, decode_engine):
    (prompt,) = make_prompts(decode_engine.config.vocab_size, [20], seed=4)
    (full,) = decode_engine.generate([prompt], 1)
    stage.start(local_job("one", prompt, 1))
    run_until_idle(stage)
    out = read_all(stage, "one")
    assert (out.token_ids, out.finish_reason) == (full, "length")
    assert stage.stats().num_steps == 0  # never entered a decode step


def test_cancel_mid_generation_frees_pages_and_slot(stage, decode_engine):
    allocator = decode_engine.cache.allocator
    free_before = allocator.num_free_pages
    prompts = make_prompts(decode_engine.config.vocab_size, [30, 30], seed=5)
    stage.start(local_job("keep", prompts[0], 10))
    stage.start(local_job("drop", prompts[1], 200))
    for _ in range(6):
        stage.step()
    assert stage.stats().num_running == 2
    assert allocator.num_free_pages < free_before
    stage.cancel("drop")
    stage.cancel("drop")  # idempotent
    out = stage.poll("drop", 0, timeout_s=0)
    assert out.finished and out.finish_reason == "abort"
    assert stage.stats().num_running == 1
    run_until_idle(stage)
    assert read_all(stage, "keep").finish_reason == "length"
    assert allocator.num_free_pages == free_before
    stage.cancel("never-seen")  # unknown ids are ignored


def test_request_without_a_reader_is_cancelled(decode_engine, monkeypatch):
    # its ingress replica died: nobody polls, and backpressure holds it out of every step, so
    # only the reader timeout gives its pages back
    import decode.stage

    monkeypatch.setattr(decode.stage, "_MAINTENANCE_INTERVAL_S", 0.0)
    config = DecodeConfig(max_batch_size=8, max_unread_tokens=4, reader_timeout_s=0.3)
    stage = DecodeStage(decode_engine, config)
    allocator = decode_engine.cache.allocator
    free_before = allocator.num_free_pages
    prompts = make_prompts(decode_engine.config.vocab_size, [20, 20], seed=9)
    stage.start(local_job("gone", prompts[0], 500))
    stage.start(local_job("read", prompts[1], 40))
    cursor, start = 0, time.monotonic()
    while time.monotonic() - start < 1.0:  # "gone" is never polled in here
        stage.step()
        cursor = stage.poll("read", cursor, timeout_s=0).cursor  # this reader keeps up
    out = stage.poll("gone", 0, timeout_s=0)
    assert out.finish_reason == "abort" and "no reader polled for 0.3s" in out.error
    assert len(out.token_ids) < 500
    assert stage.take_abandoned() == ["gone"]  # for the scheduler's books
    assert stage.take_abandoned() == []
    run_until_idle(stage)
    assert read_all(stage, "read").finish_reason == "length"  # its reader kept up
    assert allocator.num_free_pages == free_before


def test_cancel_during_local_prefill(stage, decode_engine):
    (prompt,) = make_prompts(decode_engine.config.vocab_size, [100], seed=6)
    stage.start(local_job("long", prompt, 4))
    stage.step()  # 24 of 100 prompt tokens
    stats = stage.stats()
    assert stats.num_waiting == 1 and stats.num_queued_prefill_tokens == 76
    stage.cancel("long")
    assert stage.poll("long", 0, 0).finish_reason == "abort"
    assert not stage.step()


def test_poll_coalesces_tokens_of_many_steps(stage, decode_engine):
    (prompt,) = make_prompts(decode_engine.config.vocab_size, [10], seed=7)
    stage.start(local_job("c", prompt, 12))
    for _ in range(5):
        stage.step()
    first = stage.poll("c", 0, timeout_s=0)
    assert len(first.token_ids) >= 5 and first.cursor == len(first.token_ids)
    assert not first.finished
    run_until_idle(stage)
    rest = stage.poll("c", first.cursor, timeout_s=0)
    assert first.token_ids + rest.token_ids == read_all(stage, "c").token_ids
    assert rest.finished and len(first.token_ids + rest.token_ids) == 12


def test_blocking_poll_wakes_on_new_tokens(stage, decode_engine):
    (prompt,) = make_prompts(decode_engine.config.vocab_size, [10], seed=8)
    stage.start(local_job("w", prompt, 3))
    got = []
    reader = threading.Thread(target=lambda: got.append(stage.poll("w", 0, timeout_s=30)))
    reader.start()
    run_until_idle(stage)
    reader.join(30)
    assert got and got[0].token_ids, "poll did not return the produced tokens"


def test_slow_reader_is_held_back(decode_engine):
    config = DecodeConfig(prefill_token_budget=64, max_unread_tokens=3)
    stage = DecodeStage(decode_engine, config)
    prompts = make_prompts(decode_engine.config.vocab_size, [8], seed=9)
    (expected,) = decode_engine.generate(prompts, 10)
    stage.start(local_job("slow", prompts[0], 10))
    for _ in range(20):
        stage.step()
    held = stage.poll("slow", 0, timeout_s=0)
    assert len(held.token_ids) == 3 and not held.finished  # waited for the reader
    run_until_idle(stage)
    tokens = held.token_ids
    while True:
        batch = stage.poll("slow", len(tokens), timeout_s=0)
        tokens += batch.token_ids
        if batch.finished:
            break
        run_until_idle(stage)
    assert tokens == expected


def test_unknown_request_and_duplicate_start(stage, decode_engine):
    out = stage.poll("nobody", 0, timeout_s=0)
    assert out.finished and out.finish_reason == "abort" and "unknown request" in out.error
    (prompt,) = make_prompts(decode_engine.config.vocab_size, [4], seed=10)
    stage.start(local_job("dup", prompt, 2))
    with pytest.raises(ValueError, match="already running"):
        stage.start(local_job("dup", prompt, 2))
    run_until_idle(stage)


def test_start_with_first_token_but_no_reservation_is_an_error(stage):
    stage.start(DecodeJob("orphan", [1, 2, 3], first_token_id=5, max_tokens=4))
    out = stage.poll("orphan", 0, timeout_s=0)
    assert out.finished and out.finish_reason == "abort" and "reserve()" in out.error


def test_engine_error_ends_only_that_request(stage, decode_engine):
    vocab = decode_engine.config.vocab_size
    (prompt,) = make_prompts(vocab, [10], seed=11)
    (expected,) = decode_engine.generate([prompt], 4)
    stage.start(local_job("bad", [1, vocab + 5, 2], 4))  # an id the embedding does not have
    stage.start(local_job("good", prompt, 4))
    run_until_idle(stage)
    bad = stage.poll("bad", 0, timeout_s=0)
    assert bad.finish_reason == "abort" and "prefill failed" in bad.error
    assert read_all(stage, "good").token_ids == expected


def test_wait_for_work(stage, decode_engine):
    assert not stage.wait_for_work(0.01)
    (prompt,) = make_prompts(decode_engine.config.vocab_size, [4], seed=12)
    stage.start(local_job("w", prompt, 2))
    assert stage.wait_for_work(0.01)
    run_until_idle(stage)
    assert not stage.wait_for_work(0)


def test_max_batch_size_bounds_the_batch(decode_engine):
    stage = DecodeStage(decode_engine, DecodeConfig(max_batch_size=2, prefill_token_budget=64))
    prompts = make_prompts(decode_engine.config.vocab_size, [6, 9, 12], seed=13)
    expected = decode_engine.generate(prompts, 5)
    for i, p in enumerate(prompts):
        stage.start(local_job(f"b{i}", p, 5))
    sizes = []
    while stage.step():
        stats = stage.stats()
        sizes.append(stats.batch_size)
        assert stats.num_running <= 2
    assert max(sizes) == 2
    assert [read_all(stage, f"b{i}").token_ids for i in range(3)] == expected


def test_cancels_racing_the_loop_thread_leak_nothing(decode_engine):
    """Cancels arrive from another thread while the loop thread prefills and decodes: every
    request ends, and every page comes back."""
    allocator = decode_engine.cache.allocator
    free_before = allocator.num_free_pages
    stage = DecodeStage(decode_engine, DecodeConfig(prefill_token_budget=16, max_batch_size=4))
    prompts = make_prompts(decode_engine.config.vocab_size, [5, 40, 20, 33, 8, 60], seed=14)
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            if not stage.step():
                stage.wait_for_work(0.01)

    looper = threading.Thread(target=loop, daemon=True)
    looper.start()
    try:
        for i, p in enumerate(prompts):
            stage.start(local_job(f"x{i}", p, 30))
        for i in range(0, len(prompts), 2):  # every other request, at staggered moments
            stage.poll(f"x{i}", 0, timeout_s=10)
            stage.cancel(f"x{i}")
        outs = {}
        for i in range(len(prompts)):
            cursor, batch = 0, None
            while batch is None or not batch.finished:
                batch = stage.poll(f"x{i}", cursor, timeout_s=10)
                cursor = batch.cursor
            outs[i] = batch.finish_reason
    finally:
        stop.set()
        looper.join(10)
    assert [outs[i] for i in range(len(prompts))] == ["abort", "length"] * 3
    assert allocator.num_free_pages == free_before
