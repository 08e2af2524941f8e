"""kvtransfer: stream the compressed MLA latent KV from a prefill instance to a decode instance.

One transfer is one gRPC bidi stream of msgpack frames (wire format: kvtransfer/README.md):
open, chunks of (layer, token range, raw records, xxh3-64 checksum), close with an overall
checksum; the receiver answers each frame with a status and how far it has got. Every failure ends both sides
with a ``Status`` within seconds, and the receiver frees the reserved pages.

How to use (decode side, in the worker process)::

    from kvtransfer import KVReceiver, model_fingerprint
    receiver = KVReceiver(engine.cache, model_fingerprint(cfg, engine.cache.fmt)).start()
    address = receiver.address                   # give it to the scheduler / prefill side
    res = receiver.reserve(request_id, num_tokens=prompt_len + max_tokens, lease_s=30)
    ...                                          # tell prefill to send request_id to address
    res.wait(timeout)                            # TransferResult, or raises TransferError
    # pages now belong to seq_id=request_id; take receiver.cache_lock around allocator changes
    receiver.stop()

Prefill side (the one sending path: the prefill stage and the benchmark both use it)::

    from kvtransfer import KVOutbox
    outbox = KVOutbox(cfg, cache, TransferConfig())   # one per instance: a channel per address
    kv = outbox.open(seq_id, request_id, address, num_tokens, wire_fmt="bf16")
    engine.prefill(seq_id, ids, on_layer=kv.send_layer)  # each layer's records leave at once
    kv.close()                                   # SendResult, or raises TransferError

``send_layer`` copies the records out of the sequence's pages run by run
(``export_records``, memcpy speed); ``KVSender`` underneath is the single-stream protocol.

FP8 on the wire from a bf16 cache: ``open(..., wire_fmt="fp8")``; the receiver must accept it with
``wire_fingerprints=accepted_fingerprints(cfg, ["fp8"])`` and stores fp8 or dequantises to its
cache format. Deadlines and sizes: ``TransferConfig``.
"""

import importlib
from typing import Any

# Imported lazily, name by name: ``kvtransfer.config`` (and so the cluster's config, which the
# torch-free ingress reads) must not pull torch in through this package.
_HOMES = {
    "KVLayout": "kvtransfer.codec",
    "KVOutbox": "kvtransfer.outbound",
    "KVReceiver": "kvtransfer.receiver",
    "KVSender": "kvtransfer.sender",
    "OutboundKV": "kvtransfer.outbound",
    "Reservation": "kvtransfer.inbound",
    "SendResult": "kvtransfer.sender",
    "Status": "kvtransfer.errors",
    "TransferConfig": "kvtransfer.config",
    "TransferError": "kvtransfer.errors",
    "TransferResult": "kvtransfer.inbound",
    "accepted_fingerprints": "model.fingerprint",
    "convert_records": "kvtransfer.codec",
    "export_records": "kvtransfer.paging",
    "import_records": "kvtransfer.paging",
    "model_fingerprint": "model.fingerprint",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'kvtransfer' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)


__all__ = [
    "KVLayout",
    "KVOutbox",
    "KVReceiver",
    "KVSender",
    "OutboundKV",
    "Reservation",
    "SendResult",
    "Status",
    "TransferConfig",
    "TransferError",
    "TransferResult",
    "accepted_fingerprints",
    "convert_records",
    "export_records",
    "import_records",
    "model_fingerprint",
]
