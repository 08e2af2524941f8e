"""Step durations around a rebalance (``StepWindow``)."""

from common.meter import StepWindow


def test_steps_during_an_event_against_the_median_before_it():
    w = StepWindow(num_recent=4)
    for s in (0.5, 0.010, 0.012, 0.011, 0.013):  # the oldest falls out of the recent steps
        w.add(s)
    w.open()
    for s in (0.011, 0.020, 0.012):
        w.add(s)
    stats = w.close()
    assert stats.num_steps == 3 and stats.longest_s == 0.020
    assert stats.median_before_s == 0.0115
    w.add(0.5)  # after close: a normal step again
    assert w.close().num_steps == 0


def test_an_event_without_steps():
    stats = StepWindow().close()
    assert stats.num_steps == 0 and stats.longest_s == 0.0 and stats.median_before_s is None
