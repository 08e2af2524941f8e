"""Hypothesis fuzzing of kvtransfer frames: the decoder and a live receiver.

``wire.decode`` takes any bytes and answers a message or a ``WireError``, nothing else. A live
receiver given a valid transfer whose frames were cut, flipped, dropped, repeated, reordered or
replaced answers every frame with a status, ends the stream (never waits past its deadline),
frees the reservation's pages whatever the outcome, and serves the next transfer.
"""

from __future__ import annotations

import dataclasses
import itertools
import time

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvt_helpers import FAST, NUM_LAYERS, fill, make_cache, make_config, raw_exchange

from kvtransfer import KVLayout, KVReceiver, Status, TransferError, export_records, wire
from model.kv_cache import bytes_per_token

NUM_TOKENS = 24
TOKENS_PER_CHUNK = 8
_ids = itertools.count()


def _new_id(prefix: str) -> str:
    """Ids of one width: frame sizes (and so Hypothesis's draws) must not vary by example."""
    return f"{prefix}-{next(_ids):08d}"


# msgpack values a hostile peer could put in a header
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=40)
    | st.binary(max_size=40)
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_FIELDS = [
    "v", "t", "transfer_id", "request_id", "fingerprint", "fmt", "num_layers", "num_tokens",
    "bytes_per_token", "page_size", "total_bytes", "resume", "seq", "layer", "start", "end",
    "checksum", "num_chunks", "reason", "code", "message", "acked_seq", "last_layer",
]  # fmt: skip
_headers = st.fixed_dictionaries(
    {
        "v": st.sampled_from([1, 1, 1, 0, 2, "1"]),
        "t": st.sampled_from(["open", "chunk", "close", "ping", "abort", "status", "nope", 3]),
    },
    optional={k: _values for k in _FIELDS if k not in ("v", "t")},
)


def _tail(data: st.DataObject) -> bytes:
    """What may follow a header: nothing, a msgpack bin of any declared length, or noise."""
    kind = data.draw(st.sampled_from(["none", "bin", "noise"]))
    if kind == "none":
        return b""
    if kind == "noise":
        return data.draw(st.binary(max_size=64))
    payload = data.draw(st.binary(max_size=300))
    declared = data.draw(
        st.sampled_from([len(payload), len(payload) + 1, max(len(payload) - 1, 0)])
    )
    return wire._bin_marker(declared) + payload


@settings(max_examples=400, deadline=None)
@given(frame=st.binary(max_size=512))
def test_decode_of_any_bytes_is_a_message_or_wire_error(frame: bytes) -> None:
    try:
        wire.decode(frame)
    except wire.WireError:
        pass


@settings(max_examples=400, deadline=None)
@given(header=_headers, data=st.data())
def test_decode_of_hostile_headers_is_a_message_or_wire_error(header, data) -> None:
    frame = msgpack.packb(header, use_bin_type=True) + _tail(data)
    try:
        msg = wire.decode(frame)
    except wire.WireError:
        return
    if isinstance(msg, wire.ChunkMsg):  # whatever passed is what a receiver checks next
        assert 0 <= msg.start < msg.end and msg.data.nbytes <= len(frame)


# ---- a live receiver ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live():
    """(receiver, the frames of one valid transfer for request "victim" minus the open's ids)."""
    config = make_config()
    cache = make_cache("bf16")
    from kvtransfer import model_fingerprint

    cfg = dataclasses.replace(FAST, idle_timeout_s=1.0, lease_s=3.0)
    rx = KVReceiver(cache, model_fingerprint(config, "bf16"), config=cfg).start()
    source = make_cache("bf16")
    fill(source, "src", NUM_TOKENS, seed=3)
    yield rx, config, source
    rx.stop()


def _valid_frames(config, source, request_id: str) -> list[bytes]:
    """open, chunks (token chunks x layers, prefill order), close: one correct transfer."""
    from kvtransfer import model_fingerprint

    bpt = bytes_per_token("bf16", source.kv_lora_rank, source.rope_dim)
    frames = [
        wire.encode(
            wire.OpenMsg(
                _new_id("fz"), request_id, model_fingerprint(config, "bf16"), "bf16", NUM_LAYERS,
                NUM_TOKENS, bpt, source.allocator.page_size, NUM_LAYERS * NUM_TOKENS * bpt,
            )
        )
    ]  # fmt: skip
    digest = wire.TransferDigest()
    seq = 0
    for start in range(0, NUM_TOKENS, TOKENS_PER_CHUNK):
        end = start + TOKENS_PER_CHUNK
        for layer in range(NUM_LAYERS):
            data = memoryview(export_records(source, "src", layer, start, end).numpy().tobytes())
            c = wire.checksum(data)
            frames.append(wire.encode_chunk(seq, layer, start, end, c, data))
            digest.add(seq, layer, start, end, c)
            seq += 1
    frames.append(wire.encode(wire.CloseMsg(seq, digest.value)))
    return frames


def _mutate(frames: list[bytes], data: st.DataObject) -> list[bytes]:
    frames = list(frames)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        i = data.draw(st.integers(0, len(frames) - 1), label="frame")
        f = frames[i]
        op = data.draw(
            st.sampled_from(["flip", "truncate", "extend", "replace", "drop", "repeat", "swap"]),
            label="op",
        )
        if op == "flip" and f:
            pos = data.draw(st.integers(0, len(f) - 1))
            frames[i] = f[:pos] + bytes([f[pos] ^ data.draw(st.integers(1, 255))]) + f[pos + 1 :]
        elif op == "truncate":
            frames[i] = f[: data.draw(st.integers(0, max(len(f) - 1, 0)))]
        elif op == "extend":
            frames[i] = f + data.draw(st.binary(min_size=1, max_size=16))
        elif op == "replace":
            frames[i] = data.draw(st.binary(max_size=64))
        elif op == "drop" and len(frames) > 1:
            del frames[i]
        elif op == "repeat":
            frames.insert(i, f)
        elif op == "swap":
            j = data.draw(st.integers(0, len(frames) - 1))
            frames[i], frames[j] = frames[j], frames[i]
    return frames


def _settle(rx: KVReceiver) -> None:
    deadline = time.monotonic() + rx.config.lease_s + rx.config.idle_timeout_s + 2.0
    while rx.num_pending and time.monotonic() < deadline:
        time.sleep(0.05)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_receiver_survives_mutated_transfers(live, data) -> None:
    rx, config, source = live
    _settle(rx)  # an earlier failing example (while Hypothesis shrinks) may have left one
    free = rx.cache.allocator.num_free_pages
    rid = _new_id("victim")
    res = rx.reserve(rid, NUM_TOKENS)
    frames = _mutate(_valid_frames(config, source, rid), data)
    # a hang would show as the call's own deadline (a grpc error), failing the example
    statuses = raw_exchange(rx.address, frames, timeout_s=10.0)
    assert len(statuses) <= len(frames)
    assert all(isinstance(s, wire.StatusMsg) for s in statuses)
    last = statuses[-1].code if statuses else None
    if last is Status.COMPLETE:  # the mutations cancelled out (e.g. a repeated chunk)
        res.wait(1.0)
        assert torch.equal(
            export_records(rx.cache, rid, 0, 0, NUM_TOKENS),
            export_records(source, "src", 0, 0, NUM_TOKENS),
        )
        with rx.cache_lock:
            rx.cache.allocator.free(rid)  # the decode loop's job once the KV is complete
    else:  # failed, or left open: the receiver's deadlines end it and free the pages
        try:
            res.wait(FAST.idle_timeout_s + rx.config.lease_s + 2.0)
        except TransferError:
            pass
        else:
            with rx.cache_lock:
                rx.cache.allocator.free(rid)
    assert rx.cache.allocator.num_free_pages == free
    assert rx.num_pending == 0


def test_receiver_serves_after_the_fuzzing(live) -> None:
    rx, config, source = live
    rid = _new_id("after")
    res = rx.reserve(rid, NUM_TOKENS)
    statuses = raw_exchange(rx.address, _valid_frames(config, source, rid))
    assert statuses[-1].code is Status.COMPLETE
    assert res.wait(1.0).num_tokens == NUM_TOKENS
    assert KVLayout.of(rx.cache).bytes_per_token == KVLayout.of(source).bytes_per_token
