"""Receiver-side state of one request's KV: the reservation, and the transfer filling it.

Plain bookkeeping and checks (which chunk comes next, which layers are whole, the overall
digest); the gRPC server around it is ``receiver.py``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from kvtransfer import wire
from kvtransfer.errors import Status
from model.kv_cache import KVFormat


@dataclass(frozen=True)
class TransferResult:
    """What a completed transfer delivered."""

    request_id: Hashable
    transfer_id: str
    num_tokens: int
    num_layers: int
    wire_bytes: int
    num_chunks: int
    num_duplicates: int
    num_resumes: int
    seconds: float  # open to verified close


class Reservation:
    """Pages held for one request's incoming KV, with a lease and a completion future.

    ``future`` resolves to a ``TransferResult`` or raises ``TransferError``. Wait on it from the
    decode loop (``wait(timeout)``) or add a callback.
    """

    def __init__(self, request_id: Hashable, num_tokens: int, lease_s: float) -> None:
        self.request_id = request_id
        self.num_tokens = num_tokens
        self.lease_s = lease_s
        self.future: futures.Future[TransferResult] = futures.Future()

    def wait(self, timeout: float | None = None) -> TransferResult:
        return self.future.result(timeout)

    def done(self) -> bool:
        return self.future.done()

    def __repr__(self) -> str:
        return f"Reservation({self.request_id!r}, {self.num_tokens} tokens, done={self.done()})"


@dataclass
class InboundTransfer:
    """Receiver state of one reservation and, once opened, its transfer.

    ``lock`` guards every field and the writes into the reserved pages: the pages are freed
    only under it, so a chunk never lands in pages that went to another request."""

    reservation: Reservation
    block_table: list[int]  # the reserved pages (fixed for the reservation's life)
    lease_deadline: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    open: wire.OpenMsg | None = None
    opened_at: float = 0.0
    last_frame_at: float = 0.0  # any frame, pings included (the idle deadline)
    last_data_at: float = 0.0  # the last applied chunk (the progress lease)
    next_seq: int = 0
    chunk_sums: list[int] = field(default_factory=list)  # by seq
    layer_next: list[int] = field(default_factory=list)  # next token expected per layer
    digest: wire.TransferDigest = field(default_factory=wire.TransferDigest)  # applied chunks
    wire_bytes: int = 0
    num_duplicates: int = 0
    num_resumes: int = 0
    context: grpc.ServicerContext | None = None
    finished: Status | None = None

    def last_layer(self) -> int:
        n = self.open.num_tokens if self.open else 0
        full = 0
        while full < len(self.layer_next) and self.layer_next[full] == n:
            full += 1
        return full - 1

    def status(self, code: Status, message: str = "") -> wire.StatusMsg:
        return wire.StatusMsg(code, message, self.next_seq, self.last_layer())

    def apply_chunk(self, c: wire.ChunkMsg, write: Writer) -> wire.StatusMsg:
        """Verify one chunk and ``write`` it into the pages; the status to answer."""
        o = self.open
        assert o is not None
        if c.seq < self.next_seq:  # re-sent after a resume; harmless if identical
            if self.chunk_sums[c.seq] != c.checksum:
                return self.status(
                    Status.DUPLICATE_CONFLICT, f"chunk {c.seq} re-sent with other bytes"
                )
            self.num_duplicates += 1
            return self.status(Status.OK, "duplicate ignored")
        if c.seq > self.next_seq:
            return self.status(
                Status.OUT_OF_ORDER, f"chunk {c.seq} arrived, expected {self.next_seq}"
            )
        if c.layer >= o.num_layers or c.end > o.num_tokens or c.start != self.layer_next[c.layer]:
            want = self.layer_next[c.layer] if c.layer < o.num_layers else None
            return self.status(
                Status.OUT_OF_ORDER,
                f"chunk layer {c.layer} tokens [{c.start}, {c.end}): expected a layer < "
                f"{o.num_layers} starting at token {want}, ending <= {o.num_tokens}",
            )
        n = c.end - c.start
        if c.data.nbytes != n * o.bytes_per_token:
            return self.status(
                Status.BAD_FRAME,
                f"chunk carries {c.data.nbytes} B for {n} tokens x {o.bytes_per_token} B",
            )
        if wire.checksum(c.data) != c.checksum:
            return self.status(
                Status.CHECKSUM_MISMATCH, f"chunk {c.seq} (layer {c.layer}) is corrupt"
            )
        write(self, c.layer, c.start, c.end, c.data, KVFormat(o.fmt))
        self.chunk_sums.append(c.checksum)
        self.digest.add(c.seq, c.layer, c.start, c.end, c.checksum)
        self.next_seq += 1
        self.layer_next[c.layer] = c.end
        self.wire_bytes += c.data.nbytes
        self.last_data_at = self.last_frame_at
        return self.status(Status.OK)

    def apply_close(self, c: wire.CloseMsg) -> wire.StatusMsg:
        """COMPLETE if every layer holds every token and the overall checksum agrees."""
        o = self.open
        assert o is not None
        if c.num_chunks != self.next_seq or any(t != o.num_tokens for t in self.layer_next):
            return self.status(
                Status.BAD_REQUEST,
                f"close after {self.next_seq} chunks (sender says {c.num_chunks}); "
                f"layers complete: {self.last_layer() + 1}/{o.num_layers}",
            )
        if c.checksum != self.digest.value:
            return self.status(Status.CHECKSUM_MISMATCH, "overall checksum differs")
        if self.wire_bytes != o.total_bytes:
            return self.status(
                Status.BAD_REQUEST, f"{self.wire_bytes} B received, {o.total_bytes} declared"
            )
        return self.status(Status.COMPLETE)


# write(transfer, layer, start, end, data uint8 bytes [end - start, bytes_per_token], wire fmt)
Writer = Callable[["InboundTransfer", int, int, int, memoryview, KVFormat], None]


def check_open(
    msg: wire.OpenMsg,
    fingerprints: dict[str, str],
    num_layers: int,
    bytes_per_token_of: Callable[[str], int],
    reserved_tokens: int,
) -> wire.StatusMsg | None:
    """The refusal of an open against what the receiver accepts, or None to accept it."""
    expected = fingerprints.get(msg.fmt)
    if expected is None:
        return wire.StatusMsg(
            Status.FINGERPRINT_MISMATCH,
            f"format {msg.fmt!r} not accepted; this receiver takes {sorted(fingerprints)}",
        )
    if msg.fingerprint != expected:
        return wire.StatusMsg(
            Status.FINGERPRINT_MISMATCH,
            f"KV fingerprint {msg.fingerprint} is not this model's ({expected}) for format "
            f"{msg.fmt}: prefill and decode must load the same model and config",
        )
    bpt = bytes_per_token_of(msg.fmt)
    if msg.num_layers != num_layers or msg.bytes_per_token != bpt:
        return wire.StatusMsg(
            Status.BAD_REQUEST,
            f"open declares {msg.num_layers} layers x {msg.bytes_per_token} B/token, "
            f"cache has {num_layers} x {bpt} B/token in {msg.fmt}",
        )
    if not 0 < msg.num_tokens <= reserved_tokens:
        return wire.StatusMsg(
            Status.TOO_LARGE,
            f"{msg.num_tokens} tokens declared, {reserved_tokens} reserved",
        )
    if msg.total_bytes != msg.num_layers * msg.num_tokens * msg.bytes_per_token:
        return wire.StatusMsg(
            Status.BAD_REQUEST, f"total_bytes {msg.total_bytes} != layers x tokens x B/token"
        )
    return None
