"""The EPLB load window of a rank: tokens per expert over the last seconds of its role."""

import torch

from cluster.rebalance import LoadWindow


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _counts(totals: dict[int, torch.Tensor]):
    return lambda: totals


def test_window_zero_counts_since_the_last_take():
    totals = {1: torch.zeros(4, dtype=torch.long)}
    w = LoadWindow(_counts(totals), 0.0, clock=Clock())
    totals[1] += torch.tensor([3, 0, 1, 0])
    assert w.take() == {1: [3, 0, 1, 0]}
    totals[1] += torch.tensor([0, 2, 0, 0])
    assert w.take() == {1: [0, 2, 0, 0]}  # only what came since
    assert w.take() == {1: [0, 0, 0, 0]}


def test_sliding_window_forgets_older_traffic_and_take_does_not_reset_it():
    clock = Clock()
    totals = {1: torch.zeros(2, dtype=torch.long), 2: torch.zeros(2, dtype=torch.long)}
    w = LoadWindow(_counts(totals), 16.0, clock=clock)  # a snapshot every second at most
    for second in range(40):  # expert 0 hot for 20 s, then expert 1
        clock.t = float(second)
        hot = 0 if second < 20 else 1
        totals[1][hot] += 10
        totals[2][hot] += 1
        w.snapshot()
    load = w.take()
    assert load[1][0] == 0 and 160 <= load[1][1] <= 180, load  # the last ~16 s only
    assert w.take() == load  # a window, not "since the last take"


def test_reset_starts_a_new_window_for_a_new_role():
    clock = Clock()
    totals = {1: torch.zeros(2, dtype=torch.long)}
    w = LoadWindow(_counts(totals), 60.0, clock=clock)
    totals[1] += torch.tensor([50, 0])
    clock.t = 5.0
    w.snapshot()
    w.reset()  # prefill -> decode: the prefill pool's routing is not the decode pool's
    totals[1] += torch.tensor([0, 7])
    assert w.take() == {1: [0, 7]}
