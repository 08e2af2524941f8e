"""Per-request output buffers that readers long-poll.

The decode loop appends each step's tokens; a reader's ``poll`` blocks until there is something
past its cursor and then takes all of it in one message, so a slow reader costs one message per
poll rather than one per token. One lock guards every stream; each stream has its own Condition
on that lock so a step wakes only the readers of the streams it touched.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from common.sampling import TokenLogprob
from decode.jobs import TokenBatch


@dataclass
class _Stream:
    cond: threading.Condition
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # one per token, for requests that ask
    num_read: int = 0  # the furthest cursor a reader asked from
    finish_reason: str | None = None
    error: str | None = None
    finished_at: float | None = None
    last_read_at: float = field(default_factory=time.monotonic)  # opened, or a poll began/ended
    num_readers: int = 0  # polls in progress

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None


class TokenStreams:
    """request_id -> output buffer, with blocking coalesced reads."""

    def __init__(self, finished_ttl_s: float = 60.0) -> None:
        self._lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self._finished_ttl_s = finished_ttl_s

    def open(self, request_id: str) -> None:
        """New empty stream; replaces a finished one of the same id (a re-routed retry)."""
        with self._lock:
            old = self._streams.get(request_id)
            if old is not None and not old.is_finished:
                raise ValueError(f"request {request_id!r} already has an output stream")
            self._streams[request_id] = _Stream(threading.Condition(self._lock))

    def has(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._streams

    def push(self, request_id: str, token_id: int, logprob: TokenLogprob | None = None) -> None:
        """Append a token (and its logprob, for a request that asked); dropped if the stream
        already finished (cancelled meanwhile)."""
        with self._lock:
            s = self._streams[request_id]
            if not s.is_finished:
                s.token_ids.append(token_id)
                if logprob is not None:
                    s.logprobs = s.logprobs if s.logprobs is not None else []
                    s.logprobs.append(logprob)
                s.cond.notify_all()

    def finish(self, request_id: str, reason: str, error: str | None = None) -> bool:
        """Mark the stream finished; False if it already was (first reason wins)."""
        with self._lock:
            s = self._streams.get(request_id)
            if s is None or s.is_finished:
                return False
            s.finish_reason, s.error, s.finished_at = reason, error, time.monotonic()
            s.cond.notify_all()
            return True

    def num_unread(self, request_id: str) -> int:
        with self._lock:
            s = self._streams[request_id]
            return len(s.token_ids) - s.num_read

    def num_tokens(self, request_id: str) -> int:
        with self._lock:
            return len(self._streams[request_id].token_ids)

    def poll(self, request_id: str, cursor: int, timeout_s: float) -> TokenBatch:
        """Tokens past ``cursor``; blocks up to ``timeout_s`` until there are some or the stream
        finished. An empty, unfinished batch means the timeout passed."""
        deadline = time.monotonic() + max(timeout_s, 0.0)
        with self._lock:
            s = self._streams.get(request_id)
            if s is None:
                return TokenBatch(
                    [],
                    cursor,
                    True,
                    "abort",
                    f"unknown request {request_id!r} (never started, "
                    "or finished more than finished_ttl_s ago)",
                )
            if cursor < 0 or cursor > len(s.token_ids):
                raise ValueError(
                    f"cursor {cursor} out of range for {request_id!r} ({len(s.token_ids)} tokens)"
                )
            s.num_read = max(s.num_read, cursor)
            s.num_readers += 1
            try:
                while len(s.token_ids) <= cursor and not s.is_finished:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    s.cond.wait(left)
            finally:
                s.num_readers -= 1
                s.last_read_at = time.monotonic()
            new = s.token_ids[cursor:]
            end = cursor + len(new)
            s.num_read = max(s.num_read, end)
            logprobs = s.logprobs[cursor:end] if s.logprobs is not None else None
            return TokenBatch(new, end, s.is_finished, s.finish_reason, s.error, logprobs)

    def unread_since(self, before: float) -> list[str]:
        """Unfinished streams nobody is polling and nobody polled since ``before``."""
        with self._lock:
            return [
                rid
                for rid, s in self._streams.items()
                if not s.is_finished and s.num_readers == 0 and s.last_read_at < before
            ]

    def collect_garbage(self) -> int:
        """Drop streams finished more than finished_ttl_s ago; returns how many."""
        now = time.monotonic()
        with self._lock:
            old = [
                rid
                for rid, s in self._streams.items()
                if s.finished_at is not None and now - s.finished_at > self._finished_ttl_s
            ]
            for rid in old:
                del self._streams[rid]
            return len(old)
