"""A loopback TCP proxy with switchable faults, put between a prefill and a decode rank.

The decode rank advertises the proxy's address for its KV receiver
(``RankWorker.advertise_kv_address``), so every transfer to it crosses the proxy. Faults act on
the sender -> receiver direction of new connections; ``times`` connections get the fault, then
the proxy passes bytes again:

- ``pass``: forward.
- ``delay``: wait ``delay_s`` before forwarding every read (at most 64 KiB).
- ``drop``: a black hole: connections are accepted and never answered (no upstream).
- ``cut``: close the connection once ``after_bytes`` bytes went through.
- ``corrupt``: flip the byte at offset ``after_bytes`` of the connection's stream.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

READ_BYTES = 64 * 1024


@dataclass(frozen=True)
class Fault:
    kind: str = "pass"  # pass | delay | drop | cut | corrupt
    delay_s: float = 0.0
    after_bytes: int = 0
    times: int = 1  # connections that get it (drop and delay: every connection while set)


class FaultProxy:
    """Forwards 127.0.0.1:<port> to ``target`` ("host:port"), with ``set(Fault(...))``."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._fault = Fault()
        self._left = 0  # connections the current cut/corrupt fault still applies to
        self._socks: list[socket.socket] = []
        self.num_connections = 0
        self.num_faults = (
            0  # faults that fired: a cut, a flipped byte, a held or delayed connection
        )
        threading.Thread(target=self._accept, daemon=True).start()

    def set(self, fault: Fault) -> None:
        """``fault`` for the connections from now on. Every live connection is closed first
        (call it between requests): the sender's pooled channel reconnects, so the next
        transfer meets the fault, and one held by a black hole is let go at once."""
        with self._lock:
            self._fault, self._left = fault, fault.times
            socks, self._socks = self._socks, []
        _close(socks)

    def _take_fault(self) -> Fault:
        """The fault of a new connection."""
        with self._lock:
            f = self._fault
            if f.kind in ("cut", "corrupt"):
                if self._left <= 0:
                    return Fault()
                self._left -= 1
            return f

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            fault = self._take_fault()
            with self._lock:
                self.num_connections += 1
                self._socks.append(client)
            if fault.kind == "drop":
                with self._lock:
                    self.num_faults += 1
                continue  # held open, never read: the sender's own deadlines must end it
            try:
                upstream = socket.create_connection(self._target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks.append(upstream)
            threading.Thread(target=self._pump, args=(client, upstream, fault), daemon=True).start()
            threading.Thread(
                target=self._pump, args=(upstream, client, Fault()), daemon=True
            ).start()

    def _pump(self, src: socket.socket, dst: socket.socket, fault: Fault) -> None:
        sent = 0
        try:
            while data := src.recv(READ_BYTES):
                if fault.kind == "delay":
                    if sent == 0:
                        self._fired()  # once per connection
                    time.sleep(fault.delay_s)
                elif fault.kind == "corrupt" and sent <= fault.after_bytes < sent + len(data):
                    i = fault.after_bytes - sent
                    data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
                    self._fired()
                elif fault.kind == "cut" and sent + len(data) >= fault.after_bytes:
                    dst.sendall(data[: max(fault.after_bytes - sent, 0)])
                    self._fired()
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _fired(self) -> None:
        with self._lock:
            self.num_faults += 1

    def close(self) -> None:
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            socks, self._socks = self._socks, []
        _close(socks)


def _close(socks: list[socket.socket]) -> None:
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()
