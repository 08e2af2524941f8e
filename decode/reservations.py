"""KV reservations made in the receiver for requests that have not been started yet.

``reserve`` sets pages aside in the ``KVReceiver`` (which fills them from a prefill instance);
``start`` takes the reservation over. One nobody takes within its lease plus a grace period
(counted from when its KV arrived, for a transfer that outlived the lease) is released (the
ingress gave up on it), so an abandoned request never pins pages. A transfer still arriving is
bounded by the receiver's own leases (reservation lease, idle deadline, progress lease).

A request with ``n`` choices reserves its further choices' pages here too (``fork``: the
prompt's full pages shared, a private tail each), so the pages its decode needs are all set
aside before its prefill starts; they are freed with the reservation unless ``start`` takes
them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from common.pages import PageAllocator
from decode.jobs import choice_id


class Reservations:
    """request_id -> (receiver ``Reservation``, deadline to be started by, fork ids)."""

    def __init__(
        self,
        receiver,
        allocator: PageAllocator,
        grace_s: float,
        on_done: Callable[[], None],
    ) -> None:
        self.receiver = receiver
        self.allocator = allocator
        self.grace_s = grace_s
        self._on_done = on_done  # wakes the decode loop when a transfer ends
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[object, float, list[str]]] = {}

    def __contains__(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._entries

    def request_ids(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def add(
        self,
        request_id: str,
        num_tokens: int,
        lease_s: float,
        num_choices: int = 1,
        prompt_len: int = 0,
    ) -> str:
        """Reserve pages for ``num_tokens`` tokens (and ``num_choices - 1`` forks of a
        ``prompt_len``-token prompt); returns the receiver address. Raises ``OutOfPagesError``,
        or ValueError for an id with a live reservation."""
        with self._lock:
            old = self._entries.get(request_id)
            if old is not None:
                if not (old[0].done() and old[0].future.exception() is not None):
                    raise ValueError(f"request {request_id!r} is already reserved here")
                del self._entries[request_id]  # a failed attempt's leftover
                self._free_forks(old[2])
            reservation = self.receiver.reserve(request_id, num_tokens, lease_s)
            fork_ids = [choice_id(request_id, i) for i in range(1, num_choices)]
            try:
                with self.receiver.cache_lock:
                    for i, fork_id in enumerate(fork_ids):
                        try:
                            self.allocator.fork(request_id, fork_id, num_tokens, prompt_len)
                        except Exception:
                            self._free_forks(fork_ids[:i])
                            raise
            except Exception:
                self.receiver.cancel(request_id, "no pages for the request's other choices")
                raise
            deadline = time.monotonic() + lease_s + self.grace_s
            self._entries[request_id] = (reservation, deadline, fork_ids)
        reservation.future.add_done_callback(lambda _: self._arrived(request_id))
        return self.receiver.address

    def _arrived(self, request_id: str) -> None:
        """The KV arrived (or failed): ``start`` has a grace period from now at least."""
        with self._lock:
            entry = self._entries.get(request_id)
            if entry is not None:
                self._entries[request_id] = (
                    entry[0],
                    max(entry[1], time.monotonic() + self.grace_s),
                    entry[2],
                )
        self._on_done()

    def take(self, request_id: str) -> tuple[object, list[str]] | None:
        """The reservation of a request being started and the ids of its forks' pages (None if
        there is none); they are the sequences' from now on."""
        with self._lock:
            entry = self._entries.pop(request_id, None)
        return (entry[0], entry[2]) if entry is not None else None

    def drop(self, request_id: str) -> bool:
        """Release a reservation nobody will start; False if there was none."""
        with self._lock:
            entry = self._entries.pop(request_id, None)
        if entry is not None:
            self.release(request_id, entry[2])
        return entry is not None

    def release(self, request_id: str, fork_ids: Sequence[str] = ()) -> None:
        """Give a request's reserved pages back: the receiver frees them while the KV is still
        arriving; once complete they are ours to free. ``fork_ids``: its forks' pages."""
        self.receiver.cancel(request_id, "reservation released by the decode worker")
        with self.receiver.cache_lock:
            self.allocator.free(request_id)
        self._free_forks(fork_ids)

    def _free_forks(self, fork_ids: Sequence[str]) -> None:
        with self.receiver.cache_lock:
            for fork_id in fork_ids:
                self.allocator.free(fork_id)

    def expire(self) -> list[str]:
        """Release reservations not started by their deadline; returns their ids."""
        now = time.monotonic()
        with self._lock:
            expired = [
                rid
                for rid, (r, deadline, _) in self._entries.items()
                if now > deadline and r.done()
            ]
        return [rid for rid in expired if self.drop(rid)]

    def pending(self) -> list:
        """Reservations whose KV is still arriving."""
        with self._lock:
            return [r for r, _, _ in self._entries.values() if not r.done()]
