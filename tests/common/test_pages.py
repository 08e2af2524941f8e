"""Page accounting: reservations, growth, sharing and freeing never leak a page."""

import pytest

from common.pages import OutOfPagesError, PageAllocator, num_fork_pages, pages_for_choices


def test_allocate_and_free_return_every_page():
    a = PageAllocator(num_pages=10, page_size=64)
    assert a.pages_needed(1) == 1 and a.pages_needed(64) == 1 and a.pages_needed(65) == 2
    t1 = a.allocate("r1", 130)
    t2 = a.allocate("r2", 64)
    assert len(t1) == 3 and len(t2) == 1 and not set(t1) & set(t2)
    assert a.num_free_pages == 6 and a.capacity("r1") == 192
    assert a.free("r1") == 3 and a.free("r2") == 1
    assert a.num_free_pages == 10 and a.free("r1") == 0


def test_out_of_pages_is_an_error_and_changes_nothing():
    a = PageAllocator(num_pages=4, page_size=16)
    a.allocate("r1", 40)
    assert not a.can_allocate(40)
    with pytest.raises(OutOfPagesError, match="need 3 free pages"):
        a.allocate("r2", 40)
    assert a.num_free_pages == 1 and not a.has("r2")
    with pytest.raises(ValueError, match="already holds"):
        a.allocate("r1", 1)


def test_append_grows_reservation():
    a = PageAllocator(num_pages=4, page_size=16)
    a.allocate("r", 10)
    assert a.can_append("r", 33) and len(a.append("r", 33)) == 2
    assert a.append("r", 40) == []  # still fits
    assert not a.can_append("r", 80)
    with pytest.raises(OutOfPagesError):
        a.append("r", 80)
    assert a.free("r") == 3 and a.num_free_pages == 4


def test_shared_pages_are_reference_counted():
    a = PageAllocator(num_pages=6, page_size=8)
    prefix = a.allocate("first", 16)  # two full pages
    a.retain(prefix)  # the prefix cache keeps them
    t = a.allocate("second", 20, shared_pages=prefix)
    assert t[:2] == prefix and a.ref_count(prefix[0]) == 3
    assert a.num_free_pages == 6 - 2 - 1
    a.free("first")
    a.free("second")
    assert a.num_free_pages == 4  # the cache still holds the prefix
    assert a.release(prefix) == 2 and a.num_free_pages == 6


def test_freed_runs_come_back_as_ascending_runs():
    # decode attention reads a run of consecutive pages as one view of the pool; churn must not
    # turn every later reservation into descending single pages
    a = PageAllocator(num_pages=12, page_size=16)
    first = [a.allocate(i, 64) for i in range(3)]
    assert first == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    for i in range(3):
        a.free(i)
    again = [a.allocate(i, 64) for i in range(3)]
    assert all(t == list(range(t[0], t[0] + 4)) for t in again)
    assert sorted(p for t in again for p in t) == list(range(12))


def test_fork_shares_full_prompt_pages_and_frees_them_with_the_last_holder():
    a = PageAllocator(num_pages=20, page_size=16)
    parent = a.allocate("c0", 40 + 20)  # prompt of 40 tokens (2 full pages + 8) + 20 output
    children = [a.fork("c0", f"c{i}", 60, prompt_len=40) for i in (1, 2)]
    for table in children:
        assert table[:2] == parent[:2]  # the full prompt pages are shared
        assert not set(table[2:]) & set(parent) and len(table) == len(parent)
    assert not set(children[0][2:]) & set(children[1][2:])
    assert [a.ref_count(p) for p in parent[:2]] == [3, 3]
    assert a.num_used_pages == len(parent) + 2 * (len(parent) - 2)
    assert a.free("c0") == len(parent) - 2  # the parent's tail only: its siblings share the rest
    assert a.free("c1") == len(parent) - 2
    assert a.free("c2") == len(parent)  # the last holder returns the shared pages too
    assert a.num_free_pages == 20


@pytest.mark.parametrize(
    ("prompt_len", "num_tokens", "num_choices", "expected"),
    [(40, 60, 1, 4), (40, 60, 3, 4 + 2 * 2), (32, 33, 3, 3 + 2 * 1), (10, 20, 2, 2 + 2)],
)
def test_pages_for_choices_matches_what_forks_take(prompt_len, num_tokens, num_choices, expected):
    assert pages_for_choices(prompt_len, num_tokens, num_choices, 16) == expected
    a = PageAllocator(num_pages=64, page_size=16)
    a.allocate(0, num_tokens)
    for i in range(1, num_choices):
        a.fork(0, i, num_tokens, prompt_len)
    assert a.num_used_pages == expected
    assert num_fork_pages(prompt_len, num_tokens, 16) * (num_choices - 1) == expected - (
        a.pages_needed(num_tokens)
    )
