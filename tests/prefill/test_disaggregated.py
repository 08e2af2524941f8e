"""PrefillStage -> kvtransfer (real gRPC on 127.0.0.1) -> DecodeStage on the real k2-tiny engine.

Greedy tokens must equal ``engine.generate``; failures must end with a clear error and leave
every page free on both instances.
"""

import random
import threading
import time
from concurrent import futures

import pytest

from common.pages import OutOfPagesError, pages_for_choices
from common.sampling import SamplingParams
from decode.jobs import DecodeConfig, DecodeJob, Fork, choice_id
from decode.mixed import MixedStage
from decode.stage import DecodeStage
from kvtransfer import KVReceiver, TransferConfig, accepted_fingerprints, model_fingerprint
from prefill.jobs import PrefillConfig, PrefillJob
from prefill.stage import PrefillStage


def make_prompts(vocab_size: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab_size) for _ in range(n)] for n in lengths]


def step_until_done(stage, future, max_steps: int = 10_000):
    """Step until the job's future resolves (its transfer drains on the stage's closer thread,
    so an idle step waits a little for it)."""
    for _ in range(max_steps):
        if future.done():
            return future.result()
        if not stage.step():
            futures.wait([future], timeout=0.01)
    raise AssertionError(f"prefill not done after {max_steps} steps")


def drain(stage, max_steps: int = 10_000) -> None:
    for _ in range(max_steps):
        if not stage.step():
            return
    raise AssertionError(f"decode stage still busy after {max_steps} steps")


MAX_TOKENS = 6


@pytest.fixture
def pair(prefill_engine, decode_engine):
    """(prefill stage, decode stage, receiver); checks that no page leaks."""
    fingerprint = model_fingerprint(decode_engine.config, decode_engine.cache.fmt)
    receiver = KVReceiver(
        decode_engine.cache,
        fingerprint,
        config=TransferConfig(lease_s=5.0),
        wire_fingerprints=accepted_fingerprints(decode_engine.config, ["fp8"]),
    )
    receiver.start()
    # plain token budgets: a chunk's attention is free here (attention_tokens), no chunk floor
    config = PrefillConfig(token_budget=40, attention_tokens=10**9, min_chunk_tokens=1)
    prefill = PrefillStage(prefill_engine, config)
    decode = DecodeStage(decode_engine, DecodeConfig(), receiver)
    decode_free = decode_engine.cache.allocator.num_free_pages
    prefill_free = prefill_engine.cache.allocator.num_free_pages
    yield prefill, decode, receiver
    prefill.close()
    decode.close()
    receiver.stop()
    assert decode_engine.cache.allocator.num_free_pages == decode_free, "decode pages leaked"
    assert prefill_engine.cache.allocator.num_free_pages == prefill_free, "prefill pages leaked"


def serve_one(prefill, decode, rid, prompt, max_tokens=MAX_TOKENS, kv_format="bf16", sampling=None):
    """The ingress's sequence for one request, with both stages stepped on this thread."""
    sampling = sampling or SamplingParams()
    address = decode.reserve(rid, len(prompt) + max_tokens, 5.0)
    job = PrefillJob(rid, prompt, sampling, kv_address=address, kv_format=kv_format)
    result = step_until_done(prefill, prefill.submit(job))
    if result.error is None:
        decode.start(
            DecodeJob(rid, prompt, result.first_token_id, sampling, max_tokens, ignore_eos=True)
        )
    return result


def test_disaggregated_matches_generate(pair, prefill_engine):
    prefill, decode, _ = pair
    # 150 tokens: 10 engine chunks of 16, four 40-token prefill steps
    prompts = make_prompts(prefill_engine.config.vocab_size, [3, 37, 150], seed=21)
    expected = prefill_engine.generate(prompts, MAX_TOKENS)
    for i, p in enumerate(prompts):
        result = serve_one(prefill, decode, f"d{i}", p)
        assert result.error is None and result.num_prompt_tokens == len(p)
        assert result.first_token_id == expected[i][0]
        decode.step()  # the earlier requests keep decoding while the next one is prefilled
    drain(decode)
    for i, want in enumerate(expected):
        out = decode.poll(f"d{i}", 0, timeout_s=0)
        assert (out.token_ids, out.finish_reason, out.error) == (want, "length", None)


def test_prefix_cache_hit_gives_identical_output(pair, prefill_engine):
    prefill, decode, _ = pair
    vocab = prefill_engine.config.vocab_size
    system = make_prompts(vocab, [50], seed=22)[0]  # 3 full 16-token pages + 2 tokens
    prompts = [system + tail for tail in make_prompts(vocab, [9, 4], seed=23)]
    expected = prefill_engine.generate(prompts, MAX_TOKENS)
    first = serve_one(prefill, decode, "p0", prompts[0])
    second = serve_one(prefill, decode, "p1", prompts[1])
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 48
    stats = prefill.stats()
    assert stats.num_cached_tokens >= 48 and stats.num_cached_blocks >= 3
    drain(decode)
    for rid, want in zip(["p0", "p1"], expected, strict=True):
        assert decode.poll(rid, 0, timeout_s=0).token_ids == want


def test_stages_on_loop_threads(pair, prefill_engine):
    """The worker's threading: each stage stepped by its own loop thread, requests arriving
    concurrently from other threads, the receiver writing from gRPC threads."""
    prefill, decode, _ = pair
    prompts = make_prompts(prefill_engine.config.vocab_size, [20, 64, 90, 5], seed=24)
    expected = prefill_engine.generate(prompts, MAX_TOKENS)
    stop = threading.Event()

    def loop(stage):
        while not stop.is_set():
            if not stage.step():
                time.sleep(0.001)

    loops = [threading.Thread(target=loop, args=(s,), daemon=True) for s in (prefill, decode)]
    for t in loops:
        t.start()
    outputs: dict[str, list[int]] = {}

    def client(i, prompt):
        rid = f"t{i}"
        address = decode.reserve(rid, len(prompt) + MAX_TOKENS, 5.0)
        result = prefill.submit(PrefillJob(rid, prompt, kv_address=address)).result(60)
        assert result.error is None, result.error
        decode.start(
            DecodeJob(rid, prompt, result.first_token_id, max_tokens=MAX_TOKENS, ignore_eos=True)
        )
        tokens, cursor = [], 0
        while True:
            batch = decode.poll(rid, cursor, timeout_s=30)
            tokens += batch.token_ids
            cursor = batch.cursor
            if batch.finished:
                break
        outputs[rid] = tokens

    clients = [threading.Thread(target=client, args=(i, p)) for i, p in enumerate(prompts)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(120)
    stop.set()
    for t in loops:
        t.join(10)
    assert outputs == {f"t{i}": want for i, want in enumerate(expected)}


def test_dead_receiver_is_an_error_without_leak(pair, prefill_engine):
    prefill, _, _ = pair
    job = PrefillJob("dead", [5, 6, 7, 8], kv_address="127.0.0.1:1")
    result = step_until_done(prefill, prefill.submit(job))
    assert result.first_token_id == -1
    assert "KV transfer to 127.0.0.1:1 failed" in result.error
    assert prefill.stats().num_failed == 1


def test_expired_reservation_fails_both_sides(pair, prefill_engine, decode_engine):
    prefill, decode, _ = pair
    free_before = decode_engine.cache.allocator.num_free_pages
    prompt = make_prompts(prefill_engine.config.vocab_size, [30], seed=25)[0]
    address = decode.reserve("late", len(prompt) + MAX_TOKENS, lease_s=0.1)
    assert decode_engine.cache.allocator.num_free_pages < free_before
    deadline = time.monotonic() + 10
    while decode_engine.cache.allocator.num_free_pages < free_before:
        assert time.monotonic() < deadline, "the lease never expired"
        time.sleep(0.02)
    result = step_until_done(
        prefill, prefill.submit(PrefillJob("late", prompt, kv_address=address))
    )
    assert "no_reservation" in result.error
    decode.start(DecodeJob("late", prompt, 1, max_tokens=MAX_TOKENS))
    out = decode.poll("late", 0, timeout_s=0)
    assert out.finished and out.token_ids == [] and "lease_expired" in out.error


def test_cancel_during_transfer_aborts_it(pair, prefill_engine, decode_engine):
    prefill, decode, receiver = pair
    prompt = make_prompts(prefill_engine.config.vocab_size, [120], seed=26)[0]
    address = decode.reserve("c", len(prompt) + MAX_TOKENS, 5.0)
    future = prefill.submit(PrefillJob("c", prompt, kv_address=address))
    prefill.step()  # 40 of 120 tokens computed and sent
    assert not future.done() and receiver.num_pending == 1
    decode.cancel("c")  # the client went away: decode drops the reservation
    result = step_until_done(prefill, future)
    assert result.error is not None and "cancelled" in result.error
    assert receiver.num_pending == 0


def test_prefill_cancel_frees_pages(pair, prefill_engine):
    prefill, _, _ = pair
    prompts = make_prompts(prefill_engine.config.vocab_size, [100, 10], seed=27)
    running = prefill.submit(PrefillJob("run", prompts[0]))
    prefill.step()  # "run" holds pages, 40 of 100 tokens done
    queued = prefill.submit(PrefillJob("queued", prompts[1]))
    assert prefill.stats().num_queued_tokens == 60 + 10
    prefill.cancel("queued")
    prefill.cancel("run")
    prefill.cancel("run")
    assert running.result(0).error == "cancelled" and queued.result(0).error == "cancelled"
    assert not prefill.step()


def test_fp8_wire_format(pair, prefill_engine):
    """bf16 cache -> fp8 on the wire -> dequantised into the decode cache."""
    prefill, decode, _ = pair
    (prompt,) = make_prompts(prefill_engine.config.vocab_size, [45], seed=28)
    (expected,) = prefill_engine.generate([prompt], MAX_TOKENS)
    result = serve_one(prefill, decode, "f8", prompt, kv_format="fp8")
    assert result.error is None and result.first_token_id == expected[0]
    drain(decode)
    out = decode.poll("f8", 0, timeout_s=0)
    assert out.finish_reason == "length" and len(out.token_ids) == MAX_TOKENS


def test_seeded_sampling_matches_colocated(pair, decode_engine, prefill_engine):
    """Output token i is drawn with seed (seed, i) wherever it is sampled, so a seeded request
    gives the same tokens disaggregated and colocated."""
    prefill, decode, _ = pair
    prompts = make_prompts(prefill_engine.config.vocab_size, [11, 30], seed=29)
    sampling = [SamplingParams(temperature=1.5, top_k=50, seed=s) for s in (1, 2)]
    for i, (p, sp) in enumerate(zip(prompts, sampling, strict=True)):
        assert serve_one(prefill, decode, f"s{i}", p, max_tokens=8, sampling=sp).error is None
    drain(decode)
    disaggregated = [decode.poll(f"s{i}", 0, timeout_s=0).token_ids for i in range(2)]
    mixed = MixedStage(decode_engine, DecodeConfig(prefill_token_budget=16))
    for i, (p, sp) in enumerate(zip(prompts, sampling, strict=True)):
        mixed.start(DecodeJob(f"s{i}", p, None, sp, max_tokens=8, ignore_eos=True))
    drain(mixed)
    colocated = [mixed.poll(f"s{i}", 0, timeout_s=0).token_ids for i in range(2)]
    assert disaggregated == colocated
    assert all(len(t) == 8 for t in colocated)
    greedy = prefill_engine.generate(prompts, 8)
    assert colocated != greedy  # the sampler really sampled


def test_short_prompts_share_one_step(pair, prefill_engine):
    prefill, _, _ = pair
    prompts = make_prompts(prefill_engine.config.vocab_size, [10, 12, 9, 30], seed=30)
    pending = [prefill.submit(PrefillJob(f"q{i}", p)) for i, p in enumerate(prompts)]
    assert prefill.stats().num_queued_tokens == 61
    assert prefill.step()  # budget 40: the first three (31 tokens) and 9 tokens of the fourth
    assert [f.done() for f in pending] == [True, True, True, False]
    assert prefill.stats().num_queued_tokens == 21
    firsts = [f.result(0).first_token_id for f in pending[:3]]
    assert firsts == [out[0] for out in prefill_engine.generate(prompts[:3], 1)]
    step_until_done(prefill, pending[3])


def test_reserved_request_prefilled_locally_after_all(pair, decode_engine):
    """The ingress reserved pages, then chose decode-local prefill: the reservation goes back."""
    _, decode, receiver = pair
    (prompt,) = make_prompts(decode_engine.config.vocab_size, [25], seed=31)
    (expected,) = decode_engine.generate([prompt], MAX_TOKENS)
    decode.reserve("loc", len(prompt) + MAX_TOKENS, 5.0)
    decode.start(DecodeJob("loc", prompt, None, max_tokens=MAX_TOKENS, ignore_eos=True))
    assert receiver.num_pending == 0
    drain(decode)
    assert decode.poll("loc", 0, timeout_s=0).token_ids == expected


def test_reserve_again_after_a_failed_reservation(pair, decode_engine):
    _, decode, _ = pair
    free_before = decode_engine.cache.allocator.num_free_pages
    decode.reserve("again", 40, lease_s=0.05)
    with pytest.raises(ValueError, match="already reserved"):
        decode.reserve("again", 40, lease_s=5.0)  # still pending: a real duplicate
    deadline = time.monotonic() + 10
    while decode_engine.cache.allocator.num_free_pages < free_before:
        assert time.monotonic() < deadline, "the lease never expired"
        time.sleep(0.02)
    decode.reserve("again", 40, lease_s=5.0)  # the expired one is replaced
    assert decode.stats().num_transferring == 1
    decode.cancel("again")
    assert decode.stats().num_transferring == 0


def test_start_beyond_the_reservation_is_an_error(pair, decode_engine):
    _, decode, _ = pair
    decode.reserve("short", 10, 5.0)
    decode.start(DecodeJob("short", [1, 2, 3, 4, 5, 6], first_token_id=7, max_tokens=8))
    out = decode.poll("short", 0, timeout_s=0)
    assert out.finished and "reservation holds 10 tokens" in out.error


def test_n_choices_share_one_prefill_one_transfer_and_the_prompt_pages(pair, prefill_engine):
    """Three seeded choices: one prefill samples all three first tokens, one transfer fills
    choice 0's pages, the others fork on the decode instance; each matches ``generate``."""
    prefill, decode, receiver = pair
    alloc = decode.allocator
    (prompt,) = make_prompts(prefill_engine.config.vocab_size, [37], seed=31)
    samplings = [SamplingParams(temperature=1.0, seed=7 + i, num_logprobs=1) for i in range(3)]
    num_tokens = len(prompt) + MAX_TOKENS
    used_before = alloc.num_used_pages
    address = decode.reserve("n", num_tokens, 5.0, num_choices=3, prompt_len=len(prompt))
    held = alloc.num_used_pages - used_before
    assert held == pages_for_choices(len(prompt), num_tokens, 3, alloc.page_size)
    job = PrefillJob("n", prompt, samplings[0], address, fork_sampling=tuple(samplings[1:]))
    result = step_until_done(prefill, prefill.submit(job))
    assert result.error is None and len(result.fork_first_token_ids) == 2
    assert prefill.stats().num_prompt_tokens == len(prompt) and receiver.stats["complete"] == 1
    forks = tuple(
        Fork(s, t, lp)
        for s, t, lp in zip(
            samplings[1:], result.fork_first_token_ids, result.fork_first_logprobs, strict=True
        )
    )
    decode.start(
        DecodeJob(
            "n", prompt, result.first_token_id, samplings[0], MAX_TOKENS, ignore_eos=True,
            first_logprob=result.first_logprob, forks=forks,
        )
    )  # fmt: skip
    drain(decode)
    for i, sampling in enumerate(samplings):
        out = decode.poll(choice_id("n", i), 0, timeout_s=0)
        assert out.token_ids == prefill_engine.generate([prompt], MAX_TOKENS, sampling)[0]
        assert len(out.logprobs) == MAX_TOKENS
    assert alloc.num_used_pages == used_before


def test_an_unstarted_n_choice_reservation_frees_every_choice(pair):
    _, decode, _ = pair
    used_before = decode.allocator.num_used_pages
    decode.reserve("u", 100, 5.0, num_choices=4, prompt_len=60)
    assert decode.allocator.num_used_pages > used_before
    decode.cancel("u")
    assert decode.allocator.num_used_pages == used_before


def test_n_choices_that_do_not_fit_reserve_nothing(pair):
    _, decode, _ = pair
    used_before = decode.allocator.num_used_pages
    with pytest.raises(OutOfPagesError):  # 30 pages, then 29 for each further choice: 117 > 96
        decode.reserve("big", 16 * 30, 5.0, num_choices=4, prompt_len=16)
    assert decode.allocator.num_used_pages == used_before
    decode.reserve("big", 16 * 30, 5.0, num_choices=2, prompt_len=16)  # the id is free again
    decode.cancel("big")
    assert decode.allocator.num_used_pages == used_before
