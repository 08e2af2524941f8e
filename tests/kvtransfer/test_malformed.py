"""Malformed frames on a live receiver get an error status; the server never crashes or wedges."""

from __future__ import annotations

import random
import threading

import grpc
import msgpack
import pytest
import torch
from kvt_helpers import FAST, fill, open_frame, raw_exchange, send_all

from kvtransfer import Status, TransferError, export_records, wire


def _statuses(receiver, frames: list[bytes]) -> list[Status]:
    return [a.code for a in raw_exchange(receiver.address, frames)]


def _still_serves(receiver, sender, source) -> None:
    fill(source, "ok", 20)
    res = receiver.reserve("after", 20)
    send_all(sender, source, "ok", "after", 20)
    res.wait(2.0)
    assert torch.equal(
        export_records(receiver.cache, "after", 0, 0, 20), export_records(source, "ok", 0, 0, 20)
    )


def test_garbage_before_open(config, receiver, sender, source) -> None:
    rng = random.Random(1)
    bad = [
        rng.randbytes(64),  # random bytes
        b"",  # empty message
        wire.encode(wire.PingMsg())[:-1],  # truncated msgpack
        msgpack.packb({"v": 1, "t": "open", "transfer_id": 7}),  # wrong type
        msgpack.packb(["not", "a", "map"]),
        msgpack.packb({"v": 2, "t": "ping"}),  # another protocol version
        b"\xdf\xff\xff\xff\xff",  # a map declaring 4 billion entries
    ]
    for frame in bad:
        assert _statuses(receiver, [frame]) == [Status.BAD_FRAME]
    assert _statuses(receiver, [wire.encode(wire.PingMsg())]) == [Status.BAD_REQUEST]  # not open
    assert receiver.stats[Status.BAD_FRAME.value] == len(bad)
    _still_serves(receiver, sender, source)


def test_absurd_declared_sizes(config, receiver, sender, source) -> None:
    free = receiver.cache.allocator.num_free_pages
    huge = 10**15
    cases = [
        (open_frame(config, "r1", huge, total_bytes=huge), Status.TOO_LARGE),
        (open_frame(config, "r2", 8, total_bytes=huge), Status.BAD_REQUEST),
        (open_frame(config, "r3", 8, bytes_per_token=1 << 24), Status.BAD_REQUEST),
        (open_frame(config, "r4", 8, num_layers=1 << 20), Status.BAD_REQUEST),
    ]
    for i, (frame, status) in enumerate(cases):
        res = receiver.reserve(f"r{i + 1}", 8)
        assert _statuses(receiver, [frame]) == [status]
        with pytest.raises(TransferError):
            res.wait(2.0)
    # a chunk whose token range runs past the transfer, and one whose bytes disagree with it
    for chunk_header in (
        {"seq": 0, "layer": 0, "start": 0, "end": 1 << 40, "checksum": 0},
        {"seq": 0, "layer": 99, "start": 0, "end": 1, "checksum": 0},
        {"seq": 0, "layer": 0, "start": 0, "end": 8, "checksum": 0},  # 8 tokens, 3 bytes
    ):
        res = receiver.reserve("rc", 8)
        chunk = msgpack.packb({"v": 1, "t": "chunk", **chunk_header}) + b"\xc4\x03abc"
        codes = _statuses(receiver, [open_frame(config, "rc", 8), chunk])
        assert codes[0] is Status.ACCEPTED and codes[1] in (Status.OUT_OF_ORDER, Status.BAD_FRAME)
        with pytest.raises(TransferError):
            res.wait(2.0)
    assert receiver.cache.allocator.num_free_pages == free
    _still_serves(receiver, sender, source)


def test_malformed_frame_mid_transfer_frees_pages(config, receiver, sender, source) -> None:
    free = receiver.cache.allocator.num_free_pages
    res = receiver.reserve("req", 8)
    codes = _statuses(receiver, [open_frame(config, "req", 8), b"\x93\x01"])
    assert codes == [Status.ACCEPTED, Status.BAD_FRAME]
    with pytest.raises(TransferError) as e:
        res.wait(2.0)
    assert e.value.status is Status.BAD_FRAME
    assert receiver.cache.allocator.num_free_pages == free
    _still_serves(receiver, sender, source)


def test_oversized_message_is_rejected_by_grpc(config, receiver, sender, source) -> None:
    big = b"\x00" * (FAST.max_message_bytes + 1)
    with pytest.raises(grpc.RpcError) as e:
        raw_exchange(receiver.address, [big])
    assert e.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    _still_serves(receiver, sender, source)


def test_silent_streams_do_not_hold_threads(config, receiver, sender, source) -> None:
    """Streams that never send a frame are cut after the idle deadline, freeing the workers."""
    hang_up = threading.Event()

    def silent():  # a client that opens a stream and never writes to it
        hang_up.wait(10.0)
        yield from ()

    with grpc.insecure_channel(receiver.address) as channel:
        method = channel.stream_stream(wire.FULL_METHOD)
        never = [method(silent(), timeout=10.0) for _ in range(FAST.max_workers)]
        for call in never:
            with pytest.raises(grpc.RpcError) as e:
                list(call)
            assert e.value.code() is grpc.StatusCode.CANCELLED
        hang_up.set()
    assert receiver.stats["silent_streams"] == FAST.max_workers
    _still_serves(receiver, sender, source)
