"""A transfer lives while its bytes keep arriving (progress lease), not for a fixed total: a
stalled one is cut within its lease, a slow but progressing one completes however long it
takes; a cached prefix leaves in bounded pieces."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
from kvt_helpers import FAST, fill, make_cache, new_id

import kvtransfer.outbound as outbound
from kvtransfer import (
    KVLayout,
    KVOutbox,
    KVReceiver,
    KVSender,
    Status,
    TransferError,
    export_records,
    model_fingerprint,
)

LEASE = dataclasses.replace(FAST, progress_lease_s=1.0, idle_timeout_s=0.8)


@pytest.fixture
def leased(config):
    """(receiver, sender) with a 1 s progress lease; pings every 0.2 s keep the stream open."""
    cache = make_cache("bf16")
    rx = KVReceiver(cache, model_fingerprint(config, "bf16"), config=LEASE).start()
    tx = KVSender(rx.address, model_fingerprint(config, "bf16"), LEASE)
    yield rx, tx
    tx.close()
    rx.stop()


def test_stalled_transfer_is_cut_within_its_lease(leased, source) -> None:
    rx, tx = leased
    free = rx.cache.allocator.num_free_pages
    fill(source, "p", 64)
    res = rx.reserve("stall", 64)
    tx.begin(new_id(), "stall", 64, source.num_layers, KVLayout.of(source))
    tx.send_layer(0, 0, 16, export_records(source, "p", 0, 0, 16))
    t0 = time.monotonic()
    with pytest.raises(TransferError) as e:
        res.wait(5.0)  # the producer stalls; its sender keeps pinging
    waited = time.monotonic() - t0
    assert e.value.status is Status.DEADLINE_EXCEEDED and "progress lease" in e.value.detail
    assert LEASE.progress_lease_s * 0.8 <= waited <= LEASE.progress_lease_s + 1.0
    assert rx.cache.allocator.num_free_pages == free  # the pages came back
    with pytest.raises(TransferError):
        for layer in range(source.num_layers):
            tx.send_layer(layer, 16, 64, export_records(source, "p", layer, 16, 64))
        tx.end()


def test_slow_but_progressing_transfer_completes(leased, source) -> None:
    """Eight pieces 0.4 s apart: 3 s in all, three times the lease, and it completes."""
    rx, tx = leased
    n, piece = 64, 8
    fill(source, "p", n)
    res = rx.reserve("slow", n)
    t0 = time.monotonic()
    tx.begin(new_id(), "slow", n, source.num_layers, KVLayout.of(source))
    for start in range(0, n, piece):
        time.sleep(0.4)  # a slow producer: a long prefill's next chunk
        for layer in range(source.num_layers):
            tx.send_layer(
                layer,
                start,
                start + piece,
                export_records(source, "p", layer, start, start + piece),
            )
    tx.end()
    assert res.wait(5.0).num_tokens == n
    assert time.monotonic() - t0 > 3 * LEASE.progress_lease_s
    for layer in range(source.num_layers):
        assert torch.equal(
            export_records(rx.cache, "slow", layer, 0, n), export_records(source, "p", layer, 0, n)
        )


def test_cached_prefix_leaves_in_bounded_pieces(config, receiver, source, monkeypatch) -> None:
    n = 200
    rows = 24  # tokens of one layer per piece
    fill(source, "p", n, seed=3)
    exported: list[int] = []
    export = outbound.export_records

    def spy(cache, seq_id, layer, start, end):
        exported.append(end - start)
        return export(cache, seq_id, layer, start, end)

    monkeypatch.setattr(outbound, "export_records", spy)
    cfg = dataclasses.replace(FAST, piece_bytes=rows * source.bytes_per_token)
    outbox = KVOutbox(config, source, cfg)
    try:
        reservation = receiver.reserve("pre", n)
        kv = outbox.open("p", "pre", receiver.address, n)
        kv.send_prefix(n)
        kv.close()
        assert reservation.wait(10).num_tokens == n
    finally:
        outbox.close()
    assert max(exported) == rows and sum(exported) == n * source.num_layers
    for layer in range(source.num_layers):
        assert torch.equal(
            export_records(receiver.cache, "pre", layer, 0, n),
            export_records(source, "p", layer, 0, n),
        )
