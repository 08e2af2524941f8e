"""Decode side: a gRPC server thread that writes incoming latent KV into reserved pages.

Lifecycle of one request's KV (see README.md for the frames):
1. ``reserve(request_id, num_tokens)`` allocates pages in the cache (seq_id = request_id) and
   returns a ``Reservation`` whose ``future`` completes when the KV is whole and verified.
2. A sender opens a stream naming the request; the receiver checks the fingerprint and the
   sizes, then writes each chunk straight into the reserved pages after checking its checksum.
3. On close (all layers, all tokens, overall checksum) the future resolves; the pages now
   belong to the decode loop, which frees them with the rest of the sequence.
4. On any failure (bad chunk, abort, cancel, idle deadline, progress lease, unused
   reservation lease, shutdown)
   the pages are freed and the future raises ``TransferError`` with the status.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections import Counter, OrderedDict
from collections.abc import Hashable, Iterator, Mapping
from concurrent import futures

import grpc
import numpy as np
import torch

from kvtransfer import wire
from kvtransfer.codec import KVLayout, convert_records
from kvtransfer.config import TransferConfig
from kvtransfer.errors import Status, TransferError
from kvtransfer.inbound import InboundTransfer, Reservation, TransferResult, check_open
from kvtransfer.paging import import_records
from model.kv_cache import KVFormat, PagedLatentCache, bytes_per_token

log = logging.getLogger(__name__)

_TOMBSTONES = 4096  # finished transfer ids remembered, so a late resume gets the real outcome


class KVReceiver:
    """gRPC server (background threads of the decode worker) that fills reserved cache pages.

    ``fingerprint`` is ``model_fingerprint(config, cache.fmt)``. ``wire_fingerprints`` adds
    other wire formats this receiver converts on arrival, as ``{fmt: model_fingerprint(config,
    fmt)}`` (see ``accepted_fingerprints``). KV with any other fingerprint is refused.

    The decode loop must take ``cache_lock`` around its own allocator changes
    (``cache.allocator.allocate/append/free``): the receiver allocates and frees under it.
    """

    def __init__(
        self,
        cache: PagedLatentCache,
        fingerprint: str,
        host: str = "127.0.0.1",
        port: int = 0,
        config: TransferConfig = TransferConfig(),
        wire_fingerprints: Mapping[str, str] | None = None,
        cache_lock: threading.RLock | None = None,
    ) -> None:
        self.cache = cache
        self.config = config
        self.host = host
        self.cache_lock = cache_lock or threading.RLock()
        self._fingerprints = {KVFormat(f).value: fp for f, fp in (wire_fingerprints or {}).items()}
        self._fingerprints[cache.fmt.value] = fingerprint
        self._layout = KVLayout.of(cache)
        self._lock = threading.Lock()  # guards the dicts below; taken before cache_lock
        self._by_request: dict[Hashable, InboundTransfer] = {}
        self._by_transfer: dict[str, InboundTransfer] = {}
        self._tombstones: OrderedDict[str, wire.StatusMsg] = OrderedDict()
        # streams that have not opened a transfer yet: id -> (context, deadline)
        self._unopened: dict[int, tuple[grpc.ServicerContext, float]] = {}
        self.stats: Counter[str] = Counter()  # outcomes by status value, plus frame counts
        self._stats_lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: grpc.Server | None = None
        self._reaper: threading.Thread | None = None
        self._port = port

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> KVReceiver:
        """Bind (port 0 = ephemeral) and serve on background threads; returns self."""
        cfg = self.config
        server = grpc.server(
            futures.ThreadPoolExecutor(cfg.max_workers, thread_name_prefix="kvrecv"),
            options=[
                *cfg.grpc_options(),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=cfg.max_workers,
        )
        handler = grpc.method_handlers_generic_handler(
            wire.SERVICE, {wire.METHOD: grpc.stream_stream_rpc_method_handler(self._serve)}
        )
        server.add_generic_rpc_handlers((handler,))
        self._port = server.add_insecure_port(f"{self.host}:{self._port}")
        if self._port == 0:
            raise OSError(f"kvtransfer: cannot bind {self.host}:{self._port}")
        server.start()
        self._server = server
        self._reaper = threading.Thread(target=self._reap, name="kvrecv-reaper", daemon=True)
        self._reaper.start()
        return self

    @property
    def address(self) -> str:
        return f"{self.host}:{self._port}"

    def stop(self, grace_s: float = 0.5) -> None:
        """Fail every pending reservation (SHUTDOWN, pages freed) and stop serving."""
        self._stopping.set()
        with self._lock:
            entries = list(self._by_request.values())
        for e in entries:
            self._finish(e, e.status(Status.SHUTDOWN, "receiver stopped"))
        if self._server is not None:
            self._server.stop(grace_s).wait()
        if self._reaper is not None:
            self._reaper.join()

    def __enter__(self) -> KVReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _count(self, key: str) -> None:
        with self._stats_lock:
            self.stats[key] += 1

    # ---- reservations (called by the decode worker) -------------------------------------------
    def reserve(
        self, request_id: Hashable, num_tokens: int, lease_s: float | None = None
    ) -> Reservation:
        """Allocate pages for ``num_tokens`` tokens under seq_id ``request_id``.

        Raises ``OutOfPagesError`` when the cache is full. The reservation expires (pages freed,
        future raises LEASE_EXPIRED) if no transfer opens within ``lease_s``.
        """
        assert num_tokens > 0, "reserve at least one token"
        lease_s = self.config.lease_s if lease_s is None else lease_s
        with self._lock:
            if request_id in self._by_request:
                raise ValueError(f"request {request_id!r} already has a pending reservation")
            with self.cache_lock:
                table = list(self.cache.allocator.allocate(request_id, num_tokens))
            res = Reservation(request_id, num_tokens, lease_s)
            self._by_request[request_id] = InboundTransfer(res, table, time.monotonic() + lease_s)
        return res

    def cancel(self, request_id: Hashable, reason: str = "cancelled by the decode worker") -> bool:
        """Fail a pending reservation (pages freed). False if none is pending."""
        with self._lock:
            entry = self._by_request.get(request_id)
        if entry is None:
            return False
        return self._finish(entry, entry.status(Status.CANCELLED, reason))

    @property
    def num_pending(self) -> int:
        with self._lock:
            return len(self._by_request)

    # ---- ending a reservation -------------------------------------------------------------------
    def _finish(self, entry: InboundTransfer, status: wire.StatusMsg) -> bool:
        """Complete or fail a reservation exactly once; frees its pages on failure."""
        with entry.lock:
            if entry.finished is not None:
                return False
            entry.finished = status.code
            res = entry.reservation
            with self._lock:
                self._by_request.pop(res.request_id, None)
                if entry.open is not None:
                    tid = entry.open.transfer_id
                    self._by_transfer.pop(tid, None)
                    self._tombstones[tid] = status
                    while len(self._tombstones) > _TOMBSTONES:
                        self._tombstones.popitem(last=False)
            if status.code.is_error:
                with self.cache_lock:
                    self.cache.allocator.free(res.request_id)
            context = entry.context
            entry.context = None
        self._count(status.code.value)
        if status.code is Status.COMPLETE:
            o = entry.open
            assert o is not None
            res.future.set_result(
                TransferResult(
                    request_id=res.request_id,
                    transfer_id=o.transfer_id,
                    num_tokens=o.num_tokens,
                    num_layers=o.num_layers,
                    wire_bytes=entry.wire_bytes,
                    num_chunks=entry.next_seq,
                    num_duplicates=entry.num_duplicates,
                    num_resumes=entry.num_resumes,
                    seconds=time.monotonic() - entry.opened_at,
                )
            )
        else:
            log.info(
                "kv transfer for %r failed: %s %s", res.request_id, status.code, status.message
            )
            res.future.set_exception(TransferError(status.code, status.message))
            if context is not None and status.code in _CANCEL_STREAM_ON:
                context.cancel()  # unblocks a handler waiting on a silent stream
        return True

    def _reap(self) -> None:
        """Expire reservation leases, idle deadlines and progress leases; runs until stop()."""
        tick = min(0.05, self.config.idle_timeout_s / 10, self.config.lease_s / 10)
        while not self._stopping.wait(tick):
            now = time.monotonic()
            with self._lock:
                entries = list(self._by_request.values())
                late = [k for k, (_, t) in self._unopened.items() if now > t]
                silent = [self._unopened.pop(k)[0] for k in late]
            for context in silent:  # a stream that never sends an open must not hold a thread
                self._count("silent_streams")
                context.cancel()
            for e in entries:
                if e.open is None and now > e.lease_deadline:
                    msg = f"no transfer opened within the {e.reservation.lease_s:g} s lease"
                    self._finish(e, e.status(Status.LEASE_EXPIRED, msg))
                elif e.open is not None and now > e.last_frame_at + self.config.idle_timeout_s:
                    msg = f"no frame for {self.config.idle_timeout_s:g} s (idle deadline)"
                    self._finish(e, e.status(Status.DEADLINE_EXCEEDED, msg))
                elif e.open is not None and now > e.last_data_at + self.config.progress_lease_s:
                    msg = (
                        f"no KV bytes for {self.config.progress_lease_s:g} s (progress lease; "
                        f"{e.wire_bytes} of {e.open.total_bytes} B arrived)"
                    )
                    self._finish(e, e.status(Status.DEADLINE_EXCEEDED, msg))

    # ---- the stream handler -----------------------------------------------------------------
    def _serve(self, frames: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        """One stream = one transfer (or its resume). Every refusal is a status frame."""
        entry: InboundTransfer | None = None
        key = id(context)
        with self._lock:
            self._unopened[key] = (context, time.monotonic() + self.config.idle_timeout_s)
        try:
            for frame in frames:
                self._count("frames")
                try:
                    msg = wire.decode(frame)
                except wire.WireError as e:
                    status = wire.StatusMsg(Status.BAD_FRAME, str(e))
                    if entry is not None:
                        status = entry.status(Status.BAD_FRAME, str(e))
                        self._finish(entry, status)
                    else:
                        self._count(Status.BAD_FRAME.value)
                    yield wire.encode(status)
                    return
                try:
                    if entry is None:
                        entry, status = self._open(msg, context)
                        with self._lock:
                            self._unopened.pop(key, None)
                    else:
                        status = self._apply(entry, msg)
                except Exception as e:  # a bug must cost one transfer, never the server
                    log.exception("kv receiver: unexpected error on a %s", type(msg).__name__)
                    status = wire.StatusMsg(Status.BAD_REQUEST, f"receiver error: {e!r}")
                    if entry is not None:
                        status = entry.status(Status.BAD_REQUEST, status.message)
                        self._finish(entry, status)
                if status is not None:
                    yield wire.encode(status)
                    if status.code.is_error or status.code is Status.COMPLETE:
                        return
        finally:
            with self._lock:
                self._unopened.pop(key, None)
            if entry is not None:
                with entry.lock:
                    if entry.context is context:
                        entry.context = None  # stream gone; the idle deadline now runs
                        if entry.finished is None:
                            self._count("streams_broken")

    def _refuse(self, code: Status, message: str) -> tuple[None, wire.StatusMsg]:
        self._count(code.value)
        return None, wire.StatusMsg(code, message)

    def _open(
        self, msg: wire.Msg, context: grpc.ServicerContext
    ) -> tuple[InboundTransfer | None, wire.StatusMsg]:
        if not isinstance(msg, wire.OpenMsg):
            return self._refuse(
                Status.BAD_REQUEST, f"first frame must be open, got {type(msg).__name__}"
            )
        if self._stopping.is_set():
            return self._refuse(Status.SHUTDOWN, "receiver is stopping")
        with self._lock:
            entry = self._by_transfer.get(msg.transfer_id)
            tomb = self._tombstones.get(msg.transfer_id)
            pending = self._by_request.get(msg.request_id)
        if msg.resume:
            if entry is not None:
                return self._resume(entry, msg, context)
            if tomb is not None:  # finished meanwhile: tell the sender how
                return None, tomb
            return self._refuse(
                Status.UNKNOWN_TRANSFER, f"no transfer {msg.transfer_id!r} to resume"
            )
        if entry is not None or tomb is not None:
            return self._refuse(Status.BAD_REQUEST, f"transfer id {msg.transfer_id!r} already used")
        if pending is None:
            return self._refuse(
                Status.NO_RESERVATION,
                f"request {msg.request_id!r} has no pages reserved here; reserve() before sending",
            )
        refusal = check_open(
            msg,
            self._fingerprints,
            self.cache.num_layers,
            lambda fmt: bytes_per_token(fmt, self.cache.kv_lora_rank, self.cache.rope_dim),
            pending.reservation.num_tokens,
        )
        with pending.lock:
            busy = pending.finished is not None or pending.open is not None
            if refusal is None and not busy:
                now = time.monotonic()
                pending.open = msg
                pending.opened_at = pending.last_frame_at = pending.last_data_at = now
                pending.layer_next = [0] * msg.num_layers
                pending.context = context
                with self._lock:
                    self._by_transfer[msg.transfer_id] = pending
                return pending, pending.status(Status.ACCEPTED)
        if busy:
            return self._refuse(
                Status.BAD_REQUEST, f"request {msg.request_id!r} already has a transfer"
            )
        assert refusal is not None
        self._finish(pending, refusal)  # this request's KV cannot come from this sender
        return None, refusal

    def _resume(
        self, entry: InboundTransfer, msg: wire.OpenMsg, context: grpc.ServicerContext
    ) -> tuple[InboundTransfer | None, wire.StatusMsg]:
        old = None
        with entry.lock:
            o = entry.open
            if entry.finished is not None:
                return None, entry.status(entry.finished, "transfer already finished")
            if o is None or (msg.request_id, msg.fingerprint) != (o.request_id, o.fingerprint):
                return self._refuse(Status.BAD_REQUEST, "resume does not match the open transfer")
            old, entry.context = entry.context, context
            entry.last_frame_at = time.monotonic()
            entry.num_resumes += 1
            status = entry.status(Status.ACCEPTED, "resumed")
        if old is not None:
            old.cancel()
        self._count("resumes")
        return entry, status

    # ---- frames of an open transfer -----------------------------------------------------------
    def _apply(self, entry: InboundTransfer, msg: wire.Msg) -> wire.StatusMsg | None:
        with entry.lock:
            if entry.finished is not None:
                return entry.status(entry.finished, "transfer already finished")
            entry.last_frame_at = time.monotonic()
            if isinstance(msg, wire.ChunkMsg):
                status = entry.apply_chunk(msg, self._write)
            elif isinstance(msg, wire.CloseMsg):
                status = entry.apply_close(msg)
            elif isinstance(msg, wire.PingMsg):
                return None
            elif isinstance(msg, wire.AbortMsg):
                status = entry.status(Status.ABORTED, f"sender aborted: {msg.reason}")
            else:
                status = entry.status(Status.BAD_REQUEST, f"unexpected {type(msg).__name__}")
        if status.code.is_error or status.code is Status.COMPLETE:
            self._finish(entry, status)
        return status

    def _write(
        self,
        entry: InboundTransfer,
        layer: int,
        start: int,
        end: int,
        data: memoryview,
        fmt: KVFormat,
    ) -> None:
        with warnings.catch_warnings():  # the gRPC buffer is read-only; we only read it
            warnings.simplefilter("ignore", UserWarning)
            src = torch.from_numpy(np.frombuffer(data, dtype=np.uint8)).view(end - start, -1)
        src = convert_records(src, self._layout.with_format(fmt), self.cache.fmt)
        import_records(self.cache, entry.block_table, layer, start, src.to(self.cache.device))


_CANCEL_STREAM_ON = frozenset(
    {Status.DEADLINE_EXCEEDED, Status.CANCELLED, Status.SHUTDOWN, Status.LEASE_EXPIRED}
)
