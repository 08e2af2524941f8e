"""The one way KV leaves an instance: ``KVOutbox`` opens transfers out of a paged cache.

The prefill stage, the colocated/decode side when it hands KV on, and ``bench/kvtransfer.py``
all send through this class, so the served path is the measured path. A transfer reads its
records straight from the sequence's pages, run of pages by run of pages
(``kvtransfer.paging.export_records``, memcpy speed), and rides a gRPC channel from one pool:
one channel per receiver address, shared by every transfer to it, opened with the HTTP/2 frame
and window options of ``TransferConfig.channel_options``.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Hashable

import grpc

from kvtransfer.codec import KVLayout
from kvtransfer.config import TransferConfig
from kvtransfer.paging import export_records
from kvtransfer.sender import KVSender, SendResult
from model.config import ModelConfig
from model.fingerprint import model_fingerprint
from model.kv_cache import KVFormat, PagedLatentCache


class OutboundKV:
    """One open transfer of one sequence's KV. Every method raises ``TransferError`` on a failed
    transfer; ``send_layer``/``close`` come from one thread, ``abort`` from any."""

    def __init__(
        self, sender: KVSender, cache: PagedLatentCache, seq_id: Hashable, piece_bytes: int
    ) -> None:
        self._sender = sender
        self._cache = cache
        self._seq_id = seq_id
        self._piece_bytes = piece_bytes

    def send_layer(self, layer: int, start: int, end: int) -> None:
        """Send tokens [start, end) of ``layer`` as they sit in the sequence's pages now (the
        records are copied out before this returns: the pages may be freed afterwards)."""
        records = export_records(self._cache, self._seq_id, layer, start, end)
        self._sender.send_layer(layer, start, end, records)

    def send_prefix(self, end: int) -> None:
        """Send tokens [0, end) of every layer (a cached prefix), ``piece_bytes`` of a layer at a
        time, piece by piece: memory held for it stays bounded however long the prefix is."""
        rows = max(1, self._piece_bytes // self._cache.bytes_per_token)
        for lo in range(0, end, rows):
            for layer in range(self._cache.num_layers):
                self.send_layer(layer, lo, min(lo + rows, end))

    def close(self) -> SendResult:
        """Block until the receiver holds the whole KV, verified."""
        return self._sender.end()

    def abort(self, reason: str) -> None:
        """Give up; the receiver frees its pages."""
        self._sender.abort(reason)


class KVOutbox:
    """Opens KV transfers out of ``cache``; keeps one gRPC channel per receiver address."""

    def __init__(
        self,
        model_config: ModelConfig,
        cache: PagedLatentCache,
        config: TransferConfig = TransferConfig(),
    ) -> None:
        self.config = config
        self._model_config = model_config
        self._cache = cache
        self._layout = KVLayout.of(cache)
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._fingerprints: dict[KVFormat, str] = {}

    def open(
        self,
        seq_id: Hashable,
        request_id: str,
        address: str,
        num_tokens: int,
        wire_fmt: KVFormat | str | None = None,
    ) -> OutboundKV:
        """Begin the transfer of ``num_tokens`` tokens of ``seq_id``'s KV to the receiver at
        ``address`` (which reserved them under ``request_id``), in ``wire_fmt`` (default: the
        cache's format). Raises ``TransferError`` if the receiver refuses or does not answer."""
        fmt = KVFormat(wire_fmt or self._cache.fmt)
        sender = KVSender(address, self._fingerprint(fmt), self.config, self._channel(address))
        sender.begin(
            transfer_id=f"{request_id}/{uuid.uuid4().hex[:12]}",
            request_id=request_id,
            num_tokens=num_tokens,
            num_layers=self._cache.num_layers,
            layout=self._layout,
            wire_fmt=fmt,
            page_size=self._cache.page_size,
        )
        return OutboundKV(sender, self._cache, seq_id, self.config.piece_bytes)

    @property
    def num_channels(self) -> int:
        """Open channels: one per receiver address this outbox has sent to."""
        with self._lock:
            return len(self._channels)

    def close(self) -> None:
        """Close every channel (after the transfers on them ended)."""
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()

    def _fingerprint(self, fmt: KVFormat) -> str:
        with self._lock:
            if fmt not in self._fingerprints:
                self._fingerprints[fmt] = model_fingerprint(self._model_config, fmt)
            return self._fingerprints[fmt]

    def _channel(self, address: str) -> grpc.Channel:
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = self._channels[address] = self.config.open_channel(address)
            return channel
