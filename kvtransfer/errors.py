"""Status codes of a KV transfer and the exception that carries a failure to the caller."""

from __future__ import annotations

from enum import Enum


class Status(str, Enum):
    """What the receiver answers (on the wire) and what either side reports to its caller."""

    # progress
    ACCEPTED = "accepted"  # open (or resume) accepted
    OK = "ok"  # chunk applied (or duplicate of an applied chunk)
    COMPLETE = "complete"  # every layer and token held, overall checksum verified
    # refusals / failures (terminal)
    BAD_FRAME = "bad_frame"  # undecodable or ill-typed frame
    BAD_REQUEST = "bad_request"  # well-formed frame that breaks the protocol
    UNKNOWN_TRANSFER = "unknown_transfer"  # resume of a transfer the receiver never saw
    NO_RESERVATION = "no_reservation"  # no pages reserved for the request
    FINGERPRINT_MISMATCH = "fingerprint_mismatch"  # KV from another model, config or format
    TOO_LARGE = "too_large"  # more tokens than the reservation holds
    CHECKSUM_MISMATCH = "checksum_mismatch"
    OUT_OF_ORDER = "out_of_order"  # chunk sequence gap or token range not contiguous
    DUPLICATE_CONFLICT = "duplicate_conflict"  # a re-sent chunk whose bytes differ
    LEASE_EXPIRED = "lease_expired"  # reservation unused for its lease
    DEADLINE_EXCEEDED = "deadline_exceeded"  # idle deadline or progress lease passed
    ABORTED = "aborted"  # the sender gave up (KVSender.abort)
    CANCELLED = "cancelled"  # the receiver's owner cancelled the request
    SHUTDOWN = "shutdown"  # the receiver stopped
    STREAM_BROKEN = "stream_broken"  # stream lost and the one resume also failed
    RECEIVER_UNAVAILABLE = "receiver_unavailable"  # nothing answers at the address

    @property
    def is_error(self) -> bool:
        return self not in (Status.ACCEPTED, Status.OK, Status.COMPLETE)


class TransferError(RuntimeError):
    """A transfer failed; ``status`` says why, the message says what to check."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(f"{status.value}: {message}")
        self.status = status
        self.detail = message
