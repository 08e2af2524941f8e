"""Frames: every message round-trips; malformed input raises WireError, never anything else."""

from __future__ import annotations

import random

import msgpack
import pytest

from kvtransfer import Status, wire


def test_messages_round_trip() -> None:
    msgs = [
        wire.OpenMsg("t1", "req", "ab" * 16, "bf16", 61, 5, 1152, 64, 61 * 5 * 1152, resume=True),
        wire.OpenMsg("t2", 42, "cd" * 16, "fp8", 2, 1, 656, 16, 2 * 656),
        wire.CloseMsg(7, 0xDEADBEEF),
        wire.PingMsg(),
        wire.AbortMsg("prefill failed"),
        wire.StatusMsg(Status.OK, "", 3, 1),
    ]
    for m in msgs:
        assert wire.decode(wire.encode(m)) == m


@pytest.mark.parametrize("n", [1, 255, 256, 70_000])  # every msgpack bin length width
def test_chunk_round_trip_slices_without_copy(n: int) -> None:
    data = bytes(random.Random(n).randbytes(n))
    frame = wire.encode_chunk(3, 2, 10, 11, wire.checksum(data), memoryview(data))
    msg = wire.decode(frame)
    assert isinstance(msg, wire.ChunkMsg)
    assert (msg.seq, msg.layer, msg.start, msg.end, msg.checksum) == (
        3,
        2,
        10,
        11,
        wire.checksum(data),
    )
    assert bytes(msg.data) == data
    assert msg.data.obj is frame  # a view into the received buffer, not a copy


def _raises(frame: bytes, match: str) -> None:
    with pytest.raises(wire.WireError, match=match):
        wire.decode(frame)


def test_random_bytes_and_truncation_raise_wire_error() -> None:
    rng = random.Random(0)
    for _ in range(300):
        junk = rng.randbytes(rng.randrange(0, 200))
        try:
            wire.decode(junk)
        except wire.WireError:
            pass
    good = wire.encode(wire.OpenMsg("t", "r", "f" * 32, "bf16", 1, 1, 8, 1, 8))
    for cut in range(len(good)):
        with pytest.raises(wire.WireError):
            wire.decode(good[:cut])
    chunk = wire.encode_chunk(0, 0, 0, 1, 0, memoryview(b"x" * 300))
    _raises(chunk[:-1], "declares 300 data bytes")
    _raises(chunk + b"y", "declares 300 data bytes")


def test_wrong_types_and_ranges_are_named() -> None:
    def frame(**h: object) -> bytes:
        return msgpack.packb({"v": wire.PROTOCOL_VERSION, **h})

    _raises(msgpack.packb([1, 2]), "must be a map")
    _raises(msgpack.packb({"v": 99, "t": "ping"}), "protocol version 99")
    _raises(frame(t="bogus"), "unknown frame type")
    _raises(frame(t="close", num_chunks="3", checksum=1), "'num_chunks' must be int")
    _raises(frame(t="close", num_chunks=True, checksum=1), "'num_chunks' must be int")
    _raises(frame(t="close", num_chunks=-1, checksum=1), "out of range")
    _raises(frame(t="close", num_chunks=1), "lacks field 'checksum'")
    _raises(frame(t="status", code="nope", message="", acked_seq=0, last_layer=0), "unknown status")
    _raises(frame(t="chunk", seq=0, layer=0, start=5, end=5, checksum=0), "empty")
    _raises(
        frame(t="chunk", seq=0, layer=0, start=0, end=1, checksum=0) + b"\x01",
        "must be a msgpack bin",
    )
    long_id = wire.OpenMsg("x" * 1000, "r", "f" * 32, "bf16", 1, 1, 8, 1, 8)
    _raises(wire.encode(long_id), "'transfer_id' longer than")
    # absurd declared sizes: a huge bin length in a small frame
    header = frame(t="chunk", seq=0, layer=0, start=0, end=1, checksum=0)
    _raises(header + b"\xc6\xff\xff\xff\xff" + b"abc", "declares 4294967295 data bytes")
    _raises(frame(t="close", num_chunks=1 << 63, checksum=0), "out of range")
    _raises(b"\xdf\xff\xff\xff\xff", "frame header")  # map claiming 4 billion entries
