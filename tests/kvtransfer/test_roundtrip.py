"""Real gRPC on loopback: the decode cache ends up holding exactly the prefill cache's bytes."""

from __future__ import annotations

import threading

import pytest
import torch
from kvt_helpers import (
    FAST,
    NUM_LAYERS,
    fill,
    make_cache,
    send_all,
)

from kvtransfer import (
    KVLayout,
    KVReceiver,
    KVSender,
    accepted_fingerprints,
    export_records,
    model_fingerprint,
)
from model.kv_cache import PagedLatentCache


def _layers(cache: PagedLatentCache, seq_id: object, n: int) -> list[torch.Tensor]:
    return [export_records(cache, seq_id, layer, 0, n) for layer in range(cache.num_layers)]


@pytest.mark.parametrize("fmt", ["fp32", "bf16"])
@pytest.mark.parametrize("num_tokens", [1, 37, 2000])  # one token, not a page multiple, long
def test_round_trip_is_byte_identical(config, fmt: str, num_tokens: int) -> None:
    src, dst = make_cache(fmt), make_cache(fmt)
    fill(src, "p", num_tokens, seed=num_tokens)
    fp = model_fingerprint(config, fmt)
    with KVReceiver(dst, fp, config=FAST) as rx, KVSender(rx.address, fp, FAST) as tx:
        res = rx.reserve("req", num_tokens + 5)  # decode reserves prompt + max_tokens
        sent = send_all(tx, src, "p", "req", num_tokens)
        got = res.wait(2.0)
        assert got.num_tokens == num_tokens and got.num_layers == NUM_LAYERS
        assert got.wire_bytes == sent.wire_bytes == NUM_LAYERS * num_tokens * src.bytes_per_token
        assert sent.num_chunks > NUM_LAYERS or num_tokens < 100  # long layers split into chunks
        for a, b in zip(
            _layers(src, "p", num_tokens), _layers(dst, "req", num_tokens), strict=True
        ):
            assert torch.equal(a, b)
        assert rx.num_pending == 0 and dst.allocator.has("req")  # pages handed to decode


def test_chunked_prefill_order_chunk_by_layer(config, receiver, sender, source) -> None:
    fill(source, "p", 300)
    res = receiver.reserve("req", 300)
    send_all(sender, source, "p", "req", 300, tokens_per_call=128)  # [0,128) x layers, ...
    res.wait(2.0)
    for a, b in zip(_layers(source, "p", 300), _layers(receiver.cache, "req", 300), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("decode_fmt", ["bf16", "fp8"])
def test_fp8_wire_from_bf16_cache(config, decode_fmt: str) -> None:
    src, dst = make_cache("bf16"), make_cache(decode_fmt)
    fill(src, "p", 100, seed=3)
    rx = KVReceiver(
        dst,
        model_fingerprint(config, decode_fmt),
        config=FAST,
        wire_fingerprints=accepted_fingerprints(config, ["fp8"]),
    )
    with rx, KVSender(rx.address, model_fingerprint(config, "fp8"), FAST) as tx:
        res = rx.reserve("req", 100)
        sent = send_all(tx, src, "p", "req", 100, wire_fmt="fp8")
        res.wait(2.0)
        assert sent.wire_bytes == NUM_LAYERS * 100 * make_cache("fp8").bytes_per_token
        for layer in range(NUM_LAYERS):
            c_src, pe_src = src.read("p", layer, 100)
            c_dst, pe_dst = dst.read("req", layer, 100)
            # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 per value of a 128-value group
            # scaled to its absmax, so |err| <= absmax(group) / 16
            bound = c_src.abs().amax(dim=-1, keepdim=True) / 16
            assert ((c_dst - c_src).abs() <= bound).all()
            assert torch.equal(pe_dst, pe_src)  # k_pe is never quantised


def test_sixteen_concurrent_transfers_never_mix(config) -> None:
    n_streams, num_tokens = 20, 150
    src, dst = make_cache("bf16", num_pages=512), make_cache("bf16", num_pages=512)
    for i in range(n_streams):
        fill(src, f"p{i}", num_tokens, seed=100 + i)
    fp = model_fingerprint(config, "bf16")
    errors: list[BaseException] = []
    with KVReceiver(dst, fp, config=FAST) as rx:
        reservations = [rx.reserve(f"r{i}", num_tokens) for i in range(n_streams)]
        all_open = threading.Barrier(n_streams, timeout=10.0)

        def run(i: int) -> None:
            try:
                with KVSender(rx.address, fp, FAST) as tx:
                    tx.begin(f"t{i}", f"r{i}", num_tokens, NUM_LAYERS, KVLayout.of(src))
                    all_open.wait()  # every stream is open at once before any data moves
                    for start in range(0, num_tokens, 64):
                        end = min(start + 64, num_tokens)
                        for layer in range(NUM_LAYERS):
                            tx.send_layer(
                                layer, start, end, export_records(src, f"p{i}", layer, start, end)
                            )
                    tx.end()
            except BaseException as e:  # surfaced below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(n_streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10.0)
        assert not errors, errors
        for i, res in enumerate(reservations):
            res.wait(2.0)
            for a, b in zip(
                _layers(src, f"p{i}", num_tokens), _layers(dst, f"r{i}", num_tokens), strict=True
            ):
                assert torch.equal(a, b)


def test_one_sender_many_transfers(config, receiver, sender, source) -> None:
    fill(source, "p", 90)
    for i in range(3):
        res = receiver.reserve(f"req{i}", 90)
        send_all(sender, source, "p", f"req{i}", 90)
        assert res.wait(2.0).num_tokens == 90
