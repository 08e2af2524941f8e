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

Prefill side::

    from kvtransfer import KVSender, KVLayout, export_records, model_fingerprint
    sender = KVSender(address, model_fingerprint(cfg, "bf16"))    # fingerprint of the wire fmt
    sender.begin(transfer_id, request_id, num_tokens, num_layers, KVLayout.of(cache))
    engine.prefill(seq_id, ids, on_layer=lambda layer, start, end: sender.send_layer(
        layer, start, end, export_records(cache, seq_id, layer, start, end)))
    sender.end()                                 # SendResult, or raises TransferError

``export_records`` returns what ``cache.export_layer`` does, copying runs of pages at memcpy
speed instead of row by row (~10x faster on CPU).

FP8 on the wire from a bf16 cache: ``begin(..., wire_fmt="fp8")`` with
``model_fingerprint(cfg, "fp8")``; the receiver must accept it with
``wire_fingerprints=accepted_fingerprints(cfg, ["fp8"])`` and stores fp8 or dequantises to its
cache format. Deadlines and sizes: ``TransferConfig``.
"""

from kvtransfer.codec import KVLayout, convert_records
from kvtransfer.config import TransferConfig
from kvtransfer.errors import Status, TransferError
from model.fingerprint import accepted_fingerprints, model_fingerprint
from kvtransfer.inbound import Reservation, TransferResult
from kvtransfer.paging import export_records, import_records
from kvtransfer.receiver import KVReceiver
from kvtransfer.sender import KVSender, SendResult

__all__ = [
    "KVLayout",
    "KVReceiver",
    "KVSender",
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
