"""TokenStreams: coalesced reads, blocking polls, finish, garbage collection (no engine)."""

import threading
import time

import pytest

from decode.streams import TokenStreams


def test_poll_returns_everything_since_cursor_in_one_batch():
    streams = TokenStreams()
    streams.open("r")
    for t in (5, 6, 7):
        streams.push("r", t)
    batch = streams.poll("r", 0, timeout_s=0)
    assert (batch.token_ids, batch.cursor, batch.finished) == ([5, 6, 7], 3, False)
    assert streams.num_unread("r") == 0
    streams.push("r", 8)
    streams.finish("r", "length")
    streams.push("r", 9)  # after finish: dropped
    batch = streams.poll("r", 3, timeout_s=0)
    assert (batch.token_ids, batch.cursor, batch.finish_reason) == ([8], 4, "length")
    assert not streams.finish("r", "abort")  # the first reason stands
    with pytest.raises(ValueError, match="cursor"):
        streams.poll("r", 7, timeout_s=0)


def test_blocked_poll_wakes_on_push_and_times_out_empty():
    streams = TokenStreams()
    streams.open("r")
    assert streams.poll("r", 0, timeout_s=0.01).token_ids == []
    got = []
    reader = threading.Thread(target=lambda: got.append(streams.poll("r", 0, timeout_s=30)))
    reader.start()
    time.sleep(0.05)
    streams.push("r", 1)
    reader.join(30)
    assert got[0].token_ids == [1]


def test_finished_streams_are_collected_after_ttl():
    streams = TokenStreams(finished_ttl_s=0.0)
    streams.open("r")
    streams.finish("r", "abort", "boom")
    assert streams.poll("r", 0, 0).error == "boom"
    time.sleep(0.01)
    assert streams.collect_garbage() == 1
    assert "unknown request" in streams.poll("r", 0, 0).error
    streams.open("r")  # the id can be reused once finished
