"""KVOutbox, the served sending path: records from scattered pages arrive byte-identical, in
chunk x layer order, and every transfer to one address shares one channel."""

from __future__ import annotations

import torch
from kvt_helpers import FAST, fill

from kvtransfer import KVOutbox, KVReceiver, export_records


def test_outbox_sends_scattered_pages_byte_identical_over_one_channel(
    config, receiver: KVReceiver, source
) -> None:
    for i in range(4):  # interleave sequences so each one's pages are scattered
        source.allocator.allocate(f"pad{i}", 20)
        if i % 2:
            source.allocator.free(f"pad{i - 1}")
    outbox = KVOutbox(config, source, FAST)
    try:
        for rid, n, chunk in [("a", 150, 150), ("b", 97, 40)]:
            fill(source, f"seq-{rid}", n, seed=len(rid) + n)
            reservation = receiver.reserve(rid, n)
            kv = outbox.open(f"seq-{rid}", rid, receiver.address, n)
            for start in range(0, n, chunk):  # chunked prefill order: chunk x layer
                end = min(start + chunk, n)
                for layer in range(source.num_layers):
                    kv.send_layer(layer, start, end)
            sent = kv.close()
            assert reservation.wait(10).num_tokens == n
            assert sent.wire_bytes == n * source.num_layers * source.bytes_per_token
            for layer in range(source.num_layers):
                assert torch.equal(
                    export_records(receiver.cache, rid, layer, 0, n),
                    export_records(source, f"seq-{rid}", layer, 0, n),
                )
        assert outbox.num_channels == 1  # both transfers rode the pooled channel
    finally:
        outbox.close()
