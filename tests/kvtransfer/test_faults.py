"""Faults end with a clear status on both sides, within the deadlines, and free the pages."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from kvt_helpers import (
    FAST,
    NUM_LAYERS,
    fill,
    make_cache,
    make_config,
    open_frame,
    raw_exchange,
    send_all,
)
from kvt_proxy import CuttableProxy

from kvtransfer import (
    KVLayout,
    KVReceiver,
    KVSender,
    Status,
    TransferError,
    export_records,
    model_fingerprint,
    wire,
)

WAIT = FAST.idle_timeout_s + 5.0  # every failure must resolve well within this (no hang)


def _failed_with(res, status: Status) -> None:
    with pytest.raises(TransferError) as e:
        res.wait(WAIT)
    assert e.value.status is status, e.value


def _chunk(
    seq: int, layer: int, start: int, end: int, fill_byte: int = 7, bad_checksum: int | None = None
):
    data = bytes([fill_byte]) * ((end - start) * make_cache().bytes_per_token)
    return wire.encode_chunk(
        seq,
        layer,
        start,
        end,
        wire.checksum(data) if bad_checksum is None else bad_checksum,
        memoryview(data),
    )


def test_sender_killed_mid_stream(config, receiver) -> None:
    free = receiver.cache.allocator.num_free_pages
    res = receiver.reserve("req", 200, lease_s=120.0)  # the child may take a while to start
    here = Path(__file__).parent
    proc = subprocess.Popen(
        [
            sys.executable,
            str(here / "sender_to_kill.py"),
            receiver.address,
            model_fingerprint(config, "bf16"),
            "req",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=here,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parents[1]), str(here)])},
    )
    try:
        line = proc.stdout.readline().strip()
        if line != "sent":
            proc.wait(10)
            raise AssertionError(f"sender exited {proc.returncode}: {proc.stderr.read()}")
        os.kill(proc.pid, signal.SIGKILL)
        _failed_with(res, Status.DEADLINE_EXCEEDED)  # idle deadline: nothing more arrives
    finally:
        proc.kill()
        proc.wait()
    assert receiver.cache.allocator.num_free_pages == free
    assert receiver.stats["streams_broken"] == 1


def test_corrupted_chunk(config, receiver) -> None:
    free = receiver.cache.allocator.num_free_pages
    res = receiver.reserve("req", 4)
    answers = raw_exchange(
        receiver.address, [open_frame(config, "req", 4), _chunk(0, 0, 0, 4, bad_checksum=12345)]
    )
    assert [a.code for a in answers] == [Status.ACCEPTED, Status.CHECKSUM_MISMATCH]
    _failed_with(res, Status.CHECKSUM_MISMATCH)
    assert receiver.cache.allocator.num_free_pages == free


def test_corrupted_bytes_detected_through_the_sender(config, receiver, sender, source) -> None:
    """A bit flipped after the sender computed the checksum (on the wire) is refused."""
    fill(source, "p", 50)
    res = receiver.reserve("req", 50)
    sender.begin("t-flip", "req", 50, NUM_LAYERS, KVLayout.of(source))
    real = wire.encode_chunk

    def flip(*args):
        frame = bytearray(real(*args))
        frame[-1] ^= 0x01
        return bytes(frame)

    wire.encode_chunk = flip
    try:
        sender.send_layer(0, 0, 50, export_records(source, "p", 0, 0, 50))
        with pytest.raises(TransferError) as e:
            sender.end()
    finally:
        wire.encode_chunk = real
    assert e.value.status is Status.CHECKSUM_MISMATCH
    _failed_with(res, Status.CHECKSUM_MISMATCH)


def test_unknown_transfer(config, receiver) -> None:
    free = receiver.cache.allocator.num_free_pages
    res = receiver.reserve("req", 4)
    answers = raw_exchange(receiver.address, [open_frame(config, "req", 4, resume=True)])
    assert [a.code for a in answers] == [Status.UNKNOWN_TRANSFER]
    assert receiver.stats[Status.UNKNOWN_TRANSFER.value] == 1
    assert not res.done()  # a stray resume does not disturb the real reservation
    receiver.cancel("req")
    assert receiver.cache.allocator.num_free_pages == free


def test_no_reservation(receiver, sender, source) -> None:
    free = receiver.cache.allocator.num_free_pages
    fill(source, "p", 10)
    with pytest.raises(TransferError) as e:
        send_all(sender, source, "p", "never-reserved", 10)
    assert e.value.status is Status.NO_RESERVATION
    assert "reserve()" in str(e.value)
    assert receiver.stats[Status.NO_RESERVATION.value] == 1
    assert receiver.cache.allocator.num_free_pages == free
    res = receiver.reserve("later", 10)  # the refused sender is free for the next transfer
    send_all(sender, source, "p", "later", 10)
    assert res.wait(WAIT).num_tokens == 10


@pytest.mark.parametrize(
    "sender_fp",
    [
        model_fingerprint(make_config(rope_theta=20000.0), "bf16"),  # another config
        model_fingerprint(make_config(), "fp32"),  # the right model, another format
    ],
)
def test_wrong_fingerprint_is_refused(receiver, source, sender_fp: str) -> None:
    free = receiver.cache.allocator.num_free_pages
    fill(source, "p", 10)
    res = receiver.reserve("req", 10)
    with KVSender(receiver.address, sender_fp, FAST) as tx, pytest.raises(TransferError) as e:
        send_all(tx, source, "p", "req", 10)
    assert e.value.status is Status.FINGERPRINT_MISMATCH
    _failed_with(res, Status.FINGERPRINT_MISMATCH)
    assert receiver.cache.allocator.num_free_pages == free


def test_format_not_accepted(config, receiver) -> None:
    """fp32 on the wire to a bf16 receiver that did not opt in to converting fp32."""
    src = make_cache("fp32")
    fill(src, "p", 10)
    res = receiver.reserve("req", 10)
    with KVSender(receiver.address, model_fingerprint(config, "fp32"), FAST) as tx:
        with pytest.raises(TransferError, match="not accepted") as e:
            send_all(tx, src, "p", "req", 10)
    assert e.value.status is Status.FINGERPRINT_MISMATCH
    _failed_with(res, Status.FINGERPRINT_MISMATCH)


def test_receiver_down_before_begin(config, source) -> None:
    with KVReceiver(make_cache(), model_fingerprint(config, "bf16"), config=FAST) as rx:
        address = rx.address
    fill(source, "p", 10)
    with KVSender(address, model_fingerprint(config, "bf16"), FAST) as tx:
        with pytest.raises(TransferError) as e:
            send_all(tx, source, "p", "req", 10)
    assert e.value.status is Status.RECEIVER_UNAVAILABLE


def test_receiver_stops_mid_stream(config, source) -> None:
    cache = make_cache()
    free = cache.allocator.num_free_pages
    fill(source, "p", 100)
    rx = KVReceiver(cache, model_fingerprint(config, "bf16"), config=FAST).start()
    res = rx.reserve("req", 100)
    with KVSender(rx.address, model_fingerprint(config, "bf16"), FAST) as tx:
        tx.begin("t-stop", "req", 100, NUM_LAYERS, KVLayout.of(source))
        tx.send_layer(0, 0, 100, export_records(source, "p", 0, 0, 100))
        rx.stop()
        _failed_with(res, Status.SHUTDOWN)
        assert cache.allocator.num_free_pages == free
        with pytest.raises(TransferError) as e:
            for layer in range(1, NUM_LAYERS):
                tx.send_layer(layer, 0, 100, export_records(source, "p", layer, 0, 100))
            tx.end()
    assert e.value.status in (Status.SHUTDOWN, Status.RECEIVER_UNAVAILABLE)


def test_lease_expiry(config, receiver, sender, source) -> None:
    free = receiver.cache.allocator.num_free_pages
    res = receiver.reserve("req", 64, lease_s=0.2)
    assert receiver.cache.allocator.num_free_pages < free
    _failed_with(res, Status.LEASE_EXPIRED)
    assert receiver.cache.allocator.num_free_pages == free
    fill(source, "p", 64)
    with pytest.raises(TransferError) as e:  # a late sender finds nothing reserved
        send_all(sender, source, "p", "req", 64)
    assert e.value.status is Status.NO_RESERVATION


def test_duplicated_chunk_is_ignored_when_identical(config, receiver) -> None:
    res = receiver.reserve("req", 2)
    frames = [open_frame(config, "req", 2)]
    digest = wire.TransferDigest()
    for layer in range(NUM_LAYERS):
        frames.append(_chunk(layer, layer, 0, 2, fill_byte=layer))
        data = bytes([layer]) * (2 * receiver.cache.bytes_per_token)
        digest.add(layer, layer, 0, 2, wire.checksum(data))
        if layer == 1:
            frames.append(_chunk(layer, layer, 0, 2, fill_byte=layer))  # sent twice
    frames.append(wire.encode(wire.CloseMsg(NUM_LAYERS, digest.value)))
    answers = raw_exchange(receiver.address, frames)
    assert answers[-1].code is Status.COMPLETE and answers[3].message == "duplicate ignored"
    assert res.wait(WAIT).num_duplicates == 1
    assert torch.all(export_records(receiver.cache, "req", 2, 0, 2) == 2)


def test_duplicated_chunk_with_other_bytes_fails(config, receiver) -> None:
    free = receiver.cache.allocator.num_free_pages
    res = receiver.reserve("req", 2)
    frames = [open_frame(config, "req", 2), _chunk(0, 0, 0, 2, 1), _chunk(0, 0, 0, 2, 9)]
    answers = raw_exchange(receiver.address, frames)
    assert answers[-1].code is Status.DUPLICATE_CONFLICT
    _failed_with(res, Status.DUPLICATE_CONFLICT)
    assert receiver.cache.allocator.num_free_pages == free


def test_out_of_order_chunk_fails(config, receiver) -> None:
    res = receiver.reserve("req", 4)
    answers = raw_exchange(receiver.address, [open_frame(config, "req", 4), _chunk(1, 0, 0, 4)])
    assert answers[-1].code is Status.OUT_OF_ORDER
    _failed_with(res, Status.OUT_OF_ORDER)


def test_sender_abort_frees_pages(config, receiver, sender, source) -> None:
    free = receiver.cache.allocator.num_free_pages
    fill(source, "p", 30)
    res = receiver.reserve("req", 30)
    sender.begin("t-abort", "req", 30, NUM_LAYERS, KVLayout.of(source))
    sender.send_layer(0, 0, 30, export_records(source, "p", 0, 0, 30))
    sender.abort("prefill failed")
    _failed_with(res, Status.ABORTED)
    assert receiver.cache.allocator.num_free_pages == free


def test_decode_side_cancel_reaches_the_sender(config, receiver, sender, source) -> None:
    fill(source, "p", 30)
    res = receiver.reserve("req", 30)
    sender.begin("t-cancel", "req", 30, NUM_LAYERS, KVLayout.of(source))
    assert receiver.cancel("req")
    _failed_with(res, Status.CANCELLED)
    with pytest.raises(TransferError) as e:
        for layer in range(NUM_LAYERS):
            sender.send_layer(layer, 0, 30, export_records(source, "p", layer, 0, 30))
        sender.end()
    assert e.value.status is Status.CANCELLED


def test_broken_stream_resumes_once(config, receiver, source) -> None:
    fill(source, "p", 400)
    res = receiver.reserve("req", 400)
    proxy = CuttableProxy(receiver.address)
    with KVSender(proxy.address, model_fingerprint(config, "bf16"), FAST) as tx:
        tx.begin("t-resume", "req", 400, NUM_LAYERS, KVLayout.of(source))
        tx.send_layer(0, 0, 400, export_records(source, "p", 0, 0, 400))
        proxy.cut()
        for layer in range(1, NUM_LAYERS):
            tx.send_layer(layer, 0, 400, export_records(source, "p", layer, 0, 400))
        sent = tx.end()
    got = res.wait(WAIT)
    assert sent.num_resumes == 1 and got.num_resumes == 1
    for layer in range(NUM_LAYERS):
        assert torch.equal(
            export_records(source, "p", layer, 0, 400),
            export_records(receiver.cache, "req", layer, 0, 400),
        )
    proxy.close()


def test_second_break_is_a_clear_failure(config, receiver, source) -> None:
    free = receiver.cache.allocator.num_free_pages
    fill(source, "p", 400)
    res = receiver.reserve("req", 400)
    proxy = CuttableProxy(receiver.address)
    with KVSender(proxy.address, model_fingerprint(config, "bf16"), FAST) as tx:
        tx.begin("t-break", "req", 400, NUM_LAYERS, KVLayout.of(source))
        tx.send_layer(0, 0, 400, export_records(source, "p", 0, 0, 400))
        proxy.close()  # the connection drops and the receiver stays unreachable
        t0 = time.monotonic()
        with pytest.raises(TransferError) as e:
            for layer in range(1, NUM_LAYERS):
                tx.send_layer(layer, 0, 400, export_records(source, "p", layer, 0, 400))
            tx.end()
        assert time.monotonic() - t0 < WAIT
    assert e.value.status in (Status.RECEIVER_UNAVAILABLE, Status.STREAM_BROKEN)
    _failed_with(res, Status.DEADLINE_EXCEEDED)  # receiver: idle deadline after the break
    assert receiver.cache.allocator.num_free_pages == free
