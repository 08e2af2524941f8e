"""Transfer tuning: one frozen dataclass shared by sender and receiver."""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20


@dataclass(frozen=True)
class TransferConfig:
    """Sizes and deadlines of the KV transfer; every default is in seconds or bytes.

    A transfer has no fixed total deadline: it holds a *progress lease*. The receiver cuts it
    when no KV bytes arrived for ``progress_lease_s`` (pings keep the stream open but do not
    renew the lease), and when no frame at all arrived for ``idle_timeout_s``; the sender cuts
    it when chunks stay unacknowledged for ``idle_timeout_s``. So a 256K prompt whose prefill
    streams for minutes lives as long as it makes progress, and a stalled one is cut within
    its lease whatever its size. A cached prefix goes out in pieces of ``piece_bytes`` per
    layer (``OutboundKV.send_prefix``), never a whole layer of a long context at once.
    """

    chunk_bytes: int = 16 * MiB  # largest tensor payload of one chunk frame
    max_inflight_bytes: int = 64 * MiB  # sender: unacknowledged bytes before send_layer blocks
    idle_timeout_s: float = 5.0  # no acknowledgement (sender) / no frame (receiver) for this long
    progress_lease_s: float = 60.0  # receiver: no KV bytes for this long cuts the transfer
    piece_bytes: int = 16 * MiB  # largest slice of one layer exported at once (cached prefix)
    connect_timeout_s: float = 3.0  # sender: wait for the open to be accepted
    lease_s: float = 30.0  # receiver: a reservation with no transfer open expires after this
    max_message_bytes: int = 64 * MiB + 64 * 1024  # gRPC limit, both directions
    max_workers: int = 64  # receiver: server threads = concurrent streams
    resume: bool = True  # sender: reopen once from the last acknowledged chunk

    def __post_init__(self) -> None:
        assert self.chunk_bytes > 0 and self.max_inflight_bytes > 0, "sizes must be positive"
        assert self.chunk_bytes + 4096 <= self.max_message_bytes, (
            "chunk_bytes must leave 4 KiB of header room under max_message_bytes"
        )
        assert self.idle_timeout_s > 0 and self.progress_lease_s > 0 and self.lease_s > 0
        assert self.piece_bytes > 0, "piece_bytes must be positive"

    def grpc_options(self) -> list[tuple[str, int]]:
        """Channel/server options: message limits, and large HTTP/2 frames and windows so a
        multi-megabyte chunk is not cut into 16 KiB frames behind a 64 KiB window."""
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.http2.max_frame_size", 16 * MiB - 1),
            ("grpc.http2.lookahead_bytes", self.max_inflight_bytes),
        ]

    def open_channel(self, address: str):
        """A gRPC channel to a receiver with ``grpc_options`` and a quick reconnect (a restarted
        decode worker is back within a second). Returns ``grpc.Channel``."""
        import grpc  # here, so the config itself stays importable without grpc

        return grpc.insecure_channel(
            address,
            options=[
                *self.grpc_options(),
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ],
        )

    @property
    def keepalive_s(self) -> float:
        """Sender pings this often when it has nothing to send, so the receiver's idle clock
        measures a dead peer, not a slow producer."""
        return self.idle_timeout_s / 4
