"""Prefill side: stream one request's latent KV, layer by layer, to a decode instance.

``begin`` opens the stream and waits until the receiver accepts (fingerprint, reservation,
sizes); ``send_layer`` is called as each layer (or token range of a layer) is computed and
returns once the chunk is queued, blocking only when ``max_inflight_bytes`` are unacknowledged;
``end`` waits for the receiver to hold the whole KV, verified. Any failure raises
``TransferError`` with a status: when chunks stay unacknowledged for ``idle_timeout_s``
(there is no fixed total deadline; see ``TransferConfig``). A broken stream is
resumed once, from the receiver's last acknowledged chunk (the sender keeps unacknowledged
frames, so nothing is recomputed).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, replace

import grpc
import torch

from kvtransfer import wire
from kvtransfer.codec import KVLayout, convert_records
from kvtransfer.config import TransferConfig
from kvtransfer.errors import Status, TransferError
from model.kv_cache import KVFormat

_PING = wire.encode(wire.PingMsg())


@dataclass(frozen=True)
class SendResult:
    """What a completed send moved."""

    transfer_id: str
    wire_bytes: int  # tensor bytes on the wire (frames add ~60 B per chunk)
    num_chunks: int
    num_resumes: int
    seconds: float  # begin() to verified completion


class _Stream:
    """One gRPC bidi call: a queue of outgoing frames and the call's response iterator."""

    def __init__(self, channel: grpc.Channel, keepalive_s: float) -> None:
        self.frames: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.keepalive_s = keepalive_s
        method = channel.stream_stream(wire.FULL_METHOD)
        # no call deadline: the transfer lives while it progresses (TransferConfig)
        self.call = method(self._requests(), wait_for_ready=False)

    def _requests(self) -> Iterator[bytes]:
        while True:
            try:
                frame = self.frames.get(timeout=self.keepalive_s)
            except queue.Empty:
                yield _PING  # tells the receiver we are alive while the producer computes
                continue
            if frame is None:
                return
            yield frame

    def end(self) -> None:
        self.frames.put(None)


class KVSender:
    """Streams one transfer at a time to the receiver at ``address``.

    ``begin``/``send_layer``/``end`` come from one producer thread; ``abort`` may come from any.

    ``fingerprint`` is ``model_fingerprint(config, wire format)``: the receiver refuses KV from
    another model, config or format. Pass ``channel`` to share one gRPC channel among senders.
    """

    def __init__(
        self,
        address: str,
        fingerprint: str,
        config: TransferConfig = TransferConfig(),
        channel: grpc.Channel | None = None,
    ) -> None:
        self.address = address
        self.fingerprint = fingerprint
        self.config = config
        self._own_channel = channel is None
        self._channel = channel or config.open_channel(address)
        self._cond = threading.Condition()
        self._active = False
        self._generation = 0  # transfers begun; a reader thread serves one generation

    # ---- public API -------------------------------------------------------------------------
    def begin(
        self,
        transfer_id: str,
        request_id: Hashable,
        num_tokens: int,
        num_layers: int,
        layout: KVLayout,
        wire_fmt: KVFormat | str | None = None,
        page_size: int = 0,
    ) -> None:
        """Open the transfer; returns once the receiver accepted it, else raises TransferError.

        ``layout`` describes the records given to ``send_layer`` (``KVLayout.of(cache)``);
        ``wire_fmt`` (default: the same) is what travels, e.g. fp8 from a bf16 cache.
        """
        assert not self._active, "a transfer is already in progress on this sender; end() it"
        assert num_tokens > 0 and num_layers > 0, "a transfer moves at least one token and layer"
        assert isinstance(request_id, (str, int)), "request ids travel as str or int"
        self._layout = layout
        self._wire = layout.with_format(wire_fmt or layout.fmt)
        bpt = self._wire.bytes_per_token
        self._open = wire.OpenMsg(
            transfer_id=transfer_id,
            request_id=request_id,  # type: ignore[arg-type]
            fingerprint=self.fingerprint,
            fmt=self._wire.fmt.value,
            num_layers=num_layers,
            num_tokens=num_tokens,
            bytes_per_token=bpt,
            page_size=page_size,
            total_bytes=num_layers * num_tokens * bpt,
        )
        now = time.monotonic()
        self._started = now
        self._seq = 0
        self._digest = wire.TransferDigest()
        self._unacked: deque[tuple[int, bytes]] = deque()
        self._inflight = 0
        self._acked = 0
        self._last_progress = now
        self._accepted = False
        self._complete = False
        self._error: TransferError | None = None
        self._resumes = 0
        self._wire_bytes = 0
        self._active = True
        self._generation += 1
        with self._cond:
            self._stream = self._new_stream([wire.encode(self._open)])
        self._reader = threading.Thread(
            target=self._read, args=(self._generation,), name=f"kvsend-{transfer_id}", daemon=True
        )
        self._reader.start()
        try:
            self._wait(
                lambda: self._accepted,
                "waiting for the receiver to accept",
                self.config.connect_timeout_s,
            )
        except TransferError:
            self._shutdown()  # the sender can begin another transfer
            raise

    def send_layer(self, layer: int, start: int, end: int, records: torch.Tensor) -> None:
        """Queue tokens [start, end) of ``layer``; records: uint8 [end - start, bytes_per_token].

        Token ranges of a layer must arrive in order (chunked prefill sends chunk x layer).
        """
        o = self._open
        assert self._active, "send_layer() outside begin()/end()"
        assert 0 <= layer < o.num_layers and 0 <= start < end <= o.num_tokens, (
            f"layer {layer} tokens [{start}, {end}) outside {o.num_layers} layers x {o.num_tokens} tokens"
        )
        assert records.shape[0] == end - start, (
            f"{records.shape[0]} records for {end - start} tokens"
        )
        rec = convert_records(records.detach().cpu(), self._layout, self._wire.fmt).contiguous()
        bpt = o.bytes_per_token
        flat = memoryview(rec.numpy()).cast("B")  # no copy: the tensor's own buffer
        rows = max(1, self.config.chunk_bytes // bpt)
        for a in range(0, end - start, rows):
            b = min(a + rows, end - start)
            data = flat[a * bpt : b * bpt]
            checksum = wire.checksum(data)
            seq = self._seq
            frame = wire.encode_chunk(seq, layer, start + a, start + b, checksum, data)
            self._wait(
                lambda n=len(frame): (
                    not self._unacked or self._inflight + n <= self.config.max_inflight_bytes
                ),
                f"sending layer {layer}",
            )
            self._seq += 1
            self._digest.add(seq, layer, start + a, start + b, checksum)
            self._wire_bytes += b * bpt - a * bpt
            self._push(seq, frame)

    def end(self) -> SendResult:
        """Close the transfer and wait until the receiver holds it all, verified."""
        assert self._active, "end() without begin()"
        try:
            close = wire.encode(wire.CloseMsg(self._seq, self._digest.value))
            self._push(self._seq, close)  # kept with the unacknowledged chunks for a resume
            self._wait(lambda: self._complete, "waiting for the receiver to verify the transfer")
        finally:
            self._shutdown()
        return SendResult(
            self._open.transfer_id,
            self._wire_bytes,
            self._seq,
            self._resumes,
            time.monotonic() - self._started,
        )

    def abort(self, reason: str) -> None:
        """Give up on the transfer; the receiver frees the pages at once."""
        if not self._active:
            return
        with self._cond:
            if self._error is None:
                self._error = TransferError(Status.ABORTED, reason)
            self._stream.frames.put(wire.encode(wire.AbortMsg(reason)))
            self._stream.end()
            self._cond.notify_all()  # a send_layer blocked in another thread raises now
        # let the abort reach the receiver (it answers and closes), then drop the call
        self._reader.join(min(1.0, self.config.idle_timeout_s))
        self._shutdown()

    def close(self) -> None:
        """Abort any transfer in progress and close the channel this sender created."""
        if self._active:
            self.abort("sender closed")
        if self._own_channel:
            self._channel.close()

    def __enter__(self) -> KVSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals ----------------------------------------------------------------------------
    def _new_stream(self, frames: list[bytes]) -> _Stream:
        stream = _Stream(self._channel, self.config.keepalive_s)
        for f in frames:
            stream.frames.put(f)
        return stream

    def _push(self, seq: int, frame: bytes) -> None:
        with self._cond:
            if self._error is not None:
                raise self._error
            if not self._unacked:
                self._last_progress = time.monotonic()  # the idle clock starts with this frame
            self._unacked.append((seq, frame))
            self._inflight += len(frame)
            self._stream.frames.put(frame)

    def _wait(self, ready: Callable[[], bool], what: str, timeout_s: float | None = None) -> None:
        """Block until ``ready()``; raise on error, or when nothing was acknowledged for the
        idle timeout (``timeout_s`` overrides it)."""
        idle = self.config.idle_timeout_s if timeout_s is None else timeout_s
        with self._cond:
            while True:
                if self._error is not None:
                    raise self._error
                if ready():
                    return
                now = time.monotonic()
                if now > self._last_progress + idle:
                    self._fail(
                        Status.DEADLINE_EXCEEDED, f"no acknowledgement for {idle:g} s while {what}"
                    )
                else:
                    self._cond.wait(self._last_progress + idle - now + 0.001)

    def _fail(self, code: Status, message: str) -> None:
        """Record the first failure and drop the stream (caller holds the lock)."""
        if self._error is None:
            self._error = TransferError(code, message)
        self._stream.call.cancel()
        self._cond.notify_all()

    def _shutdown(self) -> None:
        with self._cond:
            self._active = False
            self._stream.end()
            if not self._complete:
                self._stream.call.cancel()
            self._cond.notify_all()
        if threading.current_thread() is not self._reader:
            self._reader.join(self.config.idle_timeout_s)

    def _on_status(self, st: wire.StatusMsg) -> None:
        with self._cond:
            self._last_progress = time.monotonic()
            if st.code.is_error:
                if self._error is None:
                    self._error = TransferError(st.code, f"receiver {self.address}: {st.message}")
            else:
                self._accepted = True
                if st.acked_seq > self._acked:
                    self._acked = st.acked_seq
                    while self._unacked and self._unacked[0][0] < st.acked_seq:
                        self._inflight -= len(self._unacked.popleft()[1])
                if st.code is Status.COMPLETE:
                    self._complete = True
                    self._unacked.clear()
                    self._inflight = 0
            self._cond.notify_all()

    def _read(self, generation: int) -> None:
        """Reader thread of one transfer: acknowledgements in, one resume on a broken stream."""
        while True:
            stream = self._stream
            code, details = grpc.StatusCode.OK, "stream ended without a final status"
            try:
                for raw in stream.call:
                    self._on_status(_decode_status(raw))
            except grpc.RpcError as e:
                code, details = e.code(), e.details() or ""
            with self._cond:
                if generation != self._generation:
                    return  # a later transfer owns the sender now
                if self._complete or self._error is not None or not self._active:
                    return
                if (
                    self._accepted
                    and self.config.resume
                    and self._resumes == 0
                    and code != grpc.StatusCode.DEADLINE_EXCEEDED
                ):
                    self._resumes += 1
                    stream.end()
                    resume = wire.encode(_replace_resume(self._open))
                    self._stream = self._new_stream([resume] + [f for _, f in self._unacked])
                    self._last_progress = time.monotonic()
                    continue
                status = {
                    grpc.StatusCode.UNAVAILABLE: Status.RECEIVER_UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED: Status.DEADLINE_EXCEEDED,
                }.get(code, Status.STREAM_BROKEN)
                if status is Status.STREAM_BROKEN and self._resumes:
                    details += " (after one resume)"
                self._error = TransferError(status, f"{self.address}: {code.name}: {details}")
                self._cond.notify_all()
                return


def _decode_status(raw: bytes) -> wire.StatusMsg:
    try:
        msg = wire.decode(raw)
    except wire.WireError as e:
        return wire.StatusMsg(Status.BAD_FRAME, f"undecodable answer from the receiver: {e}")
    if not isinstance(msg, wire.StatusMsg):
        return wire.StatusMsg(Status.BAD_FRAME, f"receiver answered {type(msg).__name__}")
    return msg


def _replace_resume(o: wire.OpenMsg) -> wire.OpenMsg:
    return replace(o, resume=True)
