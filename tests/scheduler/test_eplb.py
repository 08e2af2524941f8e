"""EPLB planner: placements are valid, respect the move budget, and balance better."""

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.eplb import balancedness, moved_slots, rank_loads, rebalance


@st.composite
def shapes(draw):
    """(load [L, E], num_slots, num_nodes, num_ranks) with a valid layout."""
    num_nodes = draw(st.integers(1, 3))
    num_ranks = num_nodes * draw(st.integers(1, 3))
    num_experts = draw(st.integers(1, 24))
    per_rank = -(-num_experts // num_ranks) + draw(st.integers(0, 3))
    num_layers = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    skew = draw(st.floats(0.0, 3.0))
    rng = np.random.default_rng(seed)
    popularity = np.exp(skew * rng.normal(size=(num_layers, num_experts)))
    load = rng.poisson(50 * popularity).astype(np.float64)
    return load, per_rank * num_ranks, num_nodes, num_ranks


def _assert_valid(placement, load, num_slots):
    assert placement.dtype == np.int64
    assert placement.shape == (load.shape[0], num_slots)
    for layer in placement:
        assert set(layer.tolist()) == set(range(load.shape[1])), "every expert keeps a replica"


@settings(max_examples=60, deadline=None)
@given(shapes())
def test_from_scratch_places_every_expert_on_full_ranks(case):
    load, num_slots, num_nodes, num_ranks = case
    placement = rebalance(load, num_slots, num_nodes, num_ranks)
    _assert_valid(placement, load, num_slots)
    loads = rank_loads(load, placement, num_ranks)
    assert loads.shape == (load.shape[0], num_ranks)
    np.testing.assert_allclose(loads.sum(axis=1), load.sum(axis=1))


@settings(max_examples=60, deadline=None)
@given(shapes(), st.integers(0, 2**32 - 1), st.integers(0, 6))
def test_incremental_respects_the_move_budget_and_never_worsens(case, seed, max_moved):
    load, num_slots, num_nodes, num_ranks = case
    previous = rebalance(load, num_slots, num_nodes, num_ranks)
    rng = np.random.default_rng(seed)
    new_load = rng.poisson(load * rng.uniform(0.2, 3.0, size=load.shape) + 1).astype(np.float64)
    placement = rebalance(new_load, num_slots, num_nodes, num_ranks, previous, max_moved)
    _assert_valid(placement, new_load, num_slots)
    assert (moved_slots(previous, placement) <= max_moved).all()
    before = rank_loads(new_load, previous, num_ranks).max(axis=1)
    after = rank_loads(new_load, placement, num_ranks).max(axis=1)
    assert (after <= before * (1 + 1e-12)).all()


@settings(max_examples=40, deadline=None)
@given(shapes(), st.integers(0, 8))
def test_previous_placement_kept_when_loads_do_not_change(case, max_moved):
    load, num_slots, num_nodes, num_ranks = case
    previous = rebalance(load, num_slots, num_nodes, num_ranks)
    again = rebalance(load, num_slots, num_nodes, num_ranks, previous, max_moved)
    np.testing.assert_array_equal(again, previous)


def _doubles_on_a_rank(placement, num_ranks):
    per_rank = placement.reshape(placement.shape[0], num_ranks, -1)
    return sum(len(r) - len(set(r.tolist())) for layer in per_rank for r in layer)


@settings(max_examples=60, deadline=None)
@given(shapes(), st.integers(0, 2**32 - 1), st.integers(0, 6))
def test_no_rank_gets_a_second_replica_of_an_expert(case, seed, max_moved):
    """A second replica on the rank that holds one splits no load: neither a plan from scratch
    nor a move or swap makes one (when there are more ranks than any expert's replicas)."""
    load, num_slots, num_nodes, num_ranks = case
    previous = rebalance(load, num_slots, num_nodes, num_ranks)
    counts = np.stack([np.bincount(layer, minlength=load.shape[1]) for layer in previous])
    if counts.max() > num_ranks or num_slots - load.shape[1] >= num_ranks:
        return  # replicas forced to share a rank (more replicas than ranks)
    assert _doubles_on_a_rank(previous, num_ranks) == 0
    rng = np.random.default_rng(seed)
    new_load = rng.poisson(load * rng.uniform(0.2, 3.0, size=load.shape) + 1).astype(np.float64)
    placement = rebalance(new_load, num_slots, num_nodes, num_ranks, previous, max_moved)
    assert _doubles_on_a_rank(placement, num_ranks) == 0


def test_skewed_load_gets_better_balanced():
    rng = np.random.default_rng(0)
    num_layers, num_experts, num_slots, num_ranks = 4, 64, 80, 8
    uniform = np.full((num_layers, num_experts), 100.0)
    previous = rebalance(uniform, num_slots, 2, num_ranks)
    skewed = rng.poisson(100 * rng.lognormal(0, 1.5, (num_layers, num_experts))).astype(float)
    placement = rebalance(skewed, num_slots, 2, num_ranks, previous, max_moved=16)
    before = balancedness(skewed, previous, num_ranks)
    after = balancedness(skewed, placement, num_ranks)
    assert (after > before).all() and after.mean() > 0.9, (before, after)
    assert (moved_slots(previous, placement) <= 16).all()
    scratch = balancedness(skewed, rebalance(skewed, num_slots, 2, num_ranks), num_ranks)
    assert scratch.mean() > 0.9


def test_nodes_first_only_for_grouped_routing():
    """One expert group (Kimi-K2): replicas go straight onto ranks, whatever the node count;
    groups that split over the nodes: onto nodes first, each node's load balanced."""
    rng = np.random.default_rng(1)
    load = rng.poisson(100 * rng.lognormal(0, 1.0, (3, 32))).astype(float)
    flat = rebalance(load, 40, 1, 8)
    np.testing.assert_array_equal(rebalance(load, 40, 2, 8), flat)
    grouped = rebalance(load, 40, 2, 8, num_groups=4)
    node_loads = rank_loads(load, grouped, 8).reshape(3, 2, 4).sum(axis=2)
    assert (node_loads.min(axis=1) / node_loads.max(axis=1) > 0.95).all(), node_loads
    assert balancedness(load, grouped, 8).mean() > 0.9


def test_hot_expert_gets_the_extra_replicas():
    load = np.array([[1000.0, 10, 10, 10, 10, 10]])
    placement = rebalance(load, num_slots=8, num_nodes=1, num_ranks=4)
    assert (placement == 0).sum() == 3


def test_helpers_on_a_hand_made_placement():
    load = np.array([[6.0, 2.0, 4.0]])
    placement = np.array([[0, 1, 0, 2]])  # expert 0 on both ranks
    np.testing.assert_allclose(rank_loads(load, placement, 2), [[5.0, 7.0]])
    np.testing.assert_allclose(balancedness(load, placement, 2), [6.0 / 7.0])
    np.testing.assert_array_equal(moved_slots(placement, np.array([[0, 1, 2, 0]])), [2])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_slots": 6}, "every expert needs a slot"),
        ({"num_slots": 9}, "multiple of num_ranks"),
        ({"num_ranks": 3, "num_nodes": 2}, "multiple of num_nodes"),
        ({"load": np.ones(8)}, "layers, experts"),
        ({"load": -np.ones((2, 8))}, "non-negative"),
        ({"previous": np.zeros((2, 12), dtype=np.int64)}, "shape"),
        ({"previous": np.zeros((2, 16), dtype=np.int64)}, "without a replica"),
        ({"previous": np.full((2, 16), 9, dtype=np.int64)}, "outside"),
        ({"max_moved": 3}, "pass previous"),
    ],
)
def test_bad_input_raises_with_a_fix(kwargs, message):
    args = {"load": np.ones((2, 8)), "num_slots": 16, "num_nodes": 2, "num_ranks": 4}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        rebalance(**args)


def test_negative_budget_raises():
    load = np.ones((1, 8))
    previous = rebalance(load, 8, 1, 2)
    with pytest.raises(ValueError, match="max_moved"):
        rebalance(load, 8, 1, 2, previous, max_moved=-1)


def test_planner_imports_neither_torch_nor_ray():
    code = (
        "import json, sys; import scheduler.eplb; "
        "print(json.dumps(sorted(m for m in ('torch', 'ray') if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
