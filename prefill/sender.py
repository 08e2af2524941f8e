"""The seam between the prefill stage and the KV transfer: one ``KVSink`` per job.

``KVSinks.open(job, num_tokens)`` starts a ``kvtransfer.KVSender`` transfer to the job's decode
receiver (one gRPC channel per receiver address, shared by the jobs that go there) and returns
it behind the three calls the stage makes: ``send_layer`` as each layer's KV is written,
``close`` to wait for the receiver's verified completion, ``abort`` on failure or cancel.
"""

from __future__ import annotations

import threading
import uuid
from typing import Protocol

import grpc
import torch

from kvtransfer import KVLayout, KVSender, TransferConfig, model_fingerprint
from prefill.jobs import PrefillJob


class KVSink(Protocol):
    """Where one job's KV goes. Every method raises on a failed transfer."""

    def send_layer(self, layer: int, start: int, end: int, records: torch.Tensor) -> None:
        """records: uint8 [end - start, bytes_per_token] in the cache's format."""

    def close(self) -> None:
        """Block until the receiver holds the whole KV, verified."""

    def abort(self, reason: str) -> None:
        """Give up; the receiver frees its pages."""


class _TransferSink:
    """A ``KVSender`` transfer seen as a ``KVSink``."""

    def __init__(self, sender: KVSender) -> None:
        self._sender = sender

    def send_layer(self, layer: int, start: int, end: int, records: torch.Tensor) -> None:
        self._sender.send_layer(layer, start, end, records)

    def close(self) -> None:
        self._sender.end()

    def abort(self, reason: str) -> None:
        self._sender.abort(reason)


class KVSinks:
    """Opens KV transfers for prefill jobs; keeps one gRPC channel per decode address."""

    def __init__(self, engine, config: TransferConfig = TransferConfig()) -> None:
        self.config = config
        self._model_config = engine.config
        self._cache = engine.cache
        self._layout = KVLayout.of(engine.cache)
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._fingerprints: dict[str, str] = {}

    def open(self, job: PrefillJob, num_tokens: int) -> KVSink:
        """Begin the transfer of ``num_tokens`` prompt tokens of KV; raises ``TransferError``
        if the receiver refuses it or does not answer."""
        assert job.kv_address is not None, "a job without kv_address sends nothing"
        sender = KVSender(
            job.kv_address, self._fingerprint(job.kv_format), self.config, self._channel(job)
        )
        sender.begin(
            transfer_id=f"{job.request_id}/{uuid.uuid4().hex[:12]}",
            request_id=job.request_id,
            num_tokens=num_tokens,
            num_layers=self._cache.num_layers,
            layout=self._layout,
            wire_fmt=job.kv_format,
            page_size=self._cache.page_size,
        )
        return _TransferSink(sender)

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()

    def _fingerprint(self, wire_fmt: str) -> str:
        with self._lock:
            if wire_fmt not in self._fingerprints:
                self._fingerprints[wire_fmt] = model_fingerprint(self._model_config, wire_fmt)
            return self._fingerprints[wire_fmt]

    def _channel(self, job: PrefillJob) -> grpc.Channel:
        address = job.kv_address
        assert address is not None
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = grpc.insecure_channel(
                    address,
                    options=[
                        ("grpc.max_send_message_length", self.config.max_message_bytes),
                        ("grpc.max_receive_message_length", self.config.max_message_bytes),
                        ("grpc.initial_reconnect_backoff_ms", 100),
                        ("grpc.max_reconnect_backoff_ms", 1000),
                    ],
                )
                self._channels[address] = channel
            return channel
