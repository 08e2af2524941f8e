"""EPLB planner: which logical expert each physical expert slot holds, per MoE layer.

Pure numpy on token counts, so the runtime, the simulator and the tests share it unchanged.

Vocabulary (shapes): ``load[L, E]`` tokens routed to each logical expert in a window;
``placement[L, S]`` int64 logical expert id of each of the ``S = num_slots`` slots. Slot ``s``
lives on rank ``s // (S // num_ranks)``; ranks are numbered node by node, so rank ``r`` is on
node ``r // (num_ranks // num_nodes)``. Planning assumes an expert's load splits evenly over its
replicas (at run time a token prefers a local replica; the even split is the planning model).

``rebalance`` without ``previous`` plans from scratch: (1) replicate the hottest experts, (2)
pack replicas (onto nodes, then) onto ranks, heaviest first, (4) even out ranks
by swapping slots. With ``previous`` it starts from the previous placement: (3) move replicas
from experts that can spare one to the hottest per replica (up to half the budget), then (4),
changing at most ``max_moved`` slots per layer, so ranks reload few expert weights.
"""

from __future__ import annotations

import numpy as np

_REL_TOL = 1e-9
# Step 4 leaves a layer alone once its busiest rank is within this fraction of the mean: a
# closer fit chases the window's sampling noise (the next window differs by far more) and
# costs weight loads (measured by bench/eplb.py: the moves fall from ~17% to ~8% of the slots
# per rebalance while next-window balancedness holds).
_GOOD_ENOUGH = 0.01


def rank_loads(load: np.ndarray, placement: np.ndarray, num_ranks: int) -> np.ndarray:
    """Tokens each rank serves, [L, num_ranks], with each expert's load split evenly over replicas."""
    load = np.asarray(load, dtype=np.float64)
    per_replica = load / _replica_counts(placement, load.shape[1])
    per_slot = np.take_along_axis(per_replica, placement, axis=1)
    return per_slot.reshape(placement.shape[0], num_ranks, -1).sum(axis=2)


def balancedness(load: np.ndarray, placement: np.ndarray, num_ranks: int) -> np.ndarray:
    """Mean rank load / max rank load per layer, [L], in (0, 1]; 1 for a layer with no load."""
    loads = rank_loads(load, placement, num_ranks)
    peak = loads.max(axis=1)
    return np.where(peak > 0, loads.mean(axis=1) / np.where(peak > 0, peak, 1.0), 1.0)


def moved_slots(previous: np.ndarray, placement: np.ndarray) -> np.ndarray:
    """Slots per layer whose logical expert changed, [L] int64 (each means one weight load)."""
    return (np.asarray(previous) != np.asarray(placement)).sum(axis=1)


def rebalance(
    load: np.ndarray,
    num_slots: int,
    num_nodes: int,
    num_ranks: int,
    previous: np.ndarray | None = None,
    max_moved: int | None = None,
    *,
    num_groups: int = 1,
) -> np.ndarray:
    """Placement [L, num_slots] (int64 logical expert ids) balancing ``load`` [L, E] over ranks.

    Every expert keeps at least one replica. With ``previous`` [L, num_slots], start from it and
    change at most ``max_moved`` slots per layer (None: no limit); a placement no single move
    improves is returned unchanged. From scratch, replicas are packed onto nodes and then onto
    each node's ranks when the model routes by expert groups (``num_groups``, the config's
    ``n_group``) that split evenly over the nodes, as group-limited routing keeps a token's
    experts on few nodes; otherwise (Kimi-K2: one group) straight onto ranks, since a node
    level only constrains the rank packing. Raises ValueError on shapes that cannot be served.
    """
    load = np.asarray(load, dtype=np.float64)
    _check_shape(load, num_slots, num_nodes, num_ranks, max_moved)
    slots_per_rank = num_slots // num_ranks
    if previous is None:
        if max_moved is not None:
            raise ValueError("max_moved limits changes to a previous placement: pass previous")
        is_hierarchical = num_nodes > 1 and num_groups > 1 and num_groups % num_nodes == 0
        nodes = num_nodes if is_hierarchical else 1
        placement = _plan_from_scratch(load, num_slots, nodes, num_ranks)
        return _improve(load, placement, placement.copy(), slots_per_rank, budget=num_slots)
    previous = _check_previous(previous, load, num_slots)
    budget = num_slots if max_moved is None else max_moved
    return _improve(load, previous.copy(), previous, slots_per_rank, budget)


def _check_shape(load, num_slots, num_nodes, num_ranks, max_moved) -> None:
    if load.ndim != 2 or load.shape[1] == 0:
        raise ValueError(f"load must be [layers, experts] token counts, got shape {load.shape}")
    if not np.isfinite(load).all() or (load < 0).any():
        raise ValueError("load must hold finite, non-negative token counts")
    num_experts = load.shape[1]
    if num_ranks < 1 or num_nodes < 1 or num_ranks % num_nodes:
        raise ValueError(
            f"num_ranks ({num_ranks}) must be a positive multiple of num_nodes ({num_nodes}): "
            "every node holds the same number of ranks"
        )
    if num_slots < num_experts:
        raise ValueError(
            f"num_slots ({num_slots}) < experts ({num_experts}): every expert needs a slot; "
            f"use at least {num_experts} slots"
        )
    if num_slots % num_ranks:
        raise ValueError(
            f"num_slots ({num_slots}) is not a multiple of num_ranks ({num_ranks}): every rank "
            f"holds the same number of slots, e.g. {-(-num_slots // num_ranks) * num_ranks}"
        )
    if max_moved is not None and max_moved < 0:
        raise ValueError(f"max_moved must be >= 0 slots per layer, got {max_moved}")


def _check_previous(previous, load: np.ndarray, num_slots: int) -> np.ndarray:
    previous = np.asarray(previous)
    num_layers, num_experts = load.shape
    if previous.shape != (num_layers, num_slots):
        raise ValueError(
            f"previous placement has shape {previous.shape}, expected [layers, num_slots] = "
            f"{(num_layers, num_slots)}: pass the placement returned for this model and layout"
        )
    if not np.issubdtype(previous.dtype, np.integer):
        raise ValueError(f"previous placement must hold integer expert ids, got {previous.dtype}")
    if previous.min() < 0 or previous.max() >= num_experts:
        raise ValueError(f"previous placement has expert ids outside [0, {num_experts})")
    missing = (_replica_counts(previous, num_experts) == 0).any(axis=1)
    if missing.any():
        raise ValueError(
            f"previous placement leaves some experts without a replica in layers "
            f"{np.flatnonzero(missing)[:8].tolist()}: every expert needs a slot"
        )
    return previous.astype(np.int64)


def _replica_counts(placement: np.ndarray, num_experts: int) -> np.ndarray:
    """Replicas per logical expert, [L, E] int64."""
    num_layers = placement.shape[0]
    flat = placement + num_experts * np.arange(num_layers)[:, None]
    return np.bincount(flat.ravel(), minlength=num_layers * num_experts).reshape(num_layers, -1)


def _plan_from_scratch(load: np.ndarray, num_slots: int, num_nodes: int, num_ranks: int):
    num_layers, num_experts = load.shape
    layers = np.arange(num_layers)
    # Step 1: one replica each, then every extra replica to the highest load per replica.
    counts = np.ones_like(load, dtype=np.int64)
    for _ in range(num_slots - num_experts):
        counts[layers, np.argmax(load / counts, axis=1)] += 1
    replicas = np.stack([np.repeat(np.arange(num_experts), c) for c in counts])  # [L, S]
    weight = np.take_along_axis(load / counts, replicas, axis=1)
    order = np.argsort(-weight, axis=1, kind="stable")
    replicas = np.take_along_axis(replicas, order, axis=1)
    weight = np.take_along_axis(weight, order, axis=1)
    # Step 2: heaviest replica first to the least loaded node with a free slot, then within its
    # node to the least loaded rank with a free slot (one level when there is one node).
    node = _pack(weight, np.zeros_like(replicas), num_nodes, num_slots // num_nodes)
    rank = _pack(weight, node, num_ranks // num_nodes, num_slots // num_ranks, replicas)
    rank += node * (num_ranks // num_nodes)
    # Slots of a rank in packing order.
    slots_per_rank = num_slots // num_ranks
    by_rank = np.argsort(rank, axis=1, kind="stable")
    placement = np.empty_like(replicas)
    placement[layers[:, None], np.arange(num_slots)] = np.take_along_axis(replicas, by_rank, 1)
    assert (np.sort(rank, axis=1) == np.arange(num_slots) // slots_per_rank).all()
    return placement


def _pack(
    weight: np.ndarray,
    group: np.ndarray,
    num_bins: int,
    capacity: int,
    items: np.ndarray | None = None,
) -> np.ndarray:
    """Bin in [0, num_bins) within its group for each item, [L, S]: items in order, each to the
    least loaded bin of its group with room (``capacity`` items per bin). With ``items`` (the
    expert id of each item), a bin that already holds the same expert is taken only when no
    other bin has room: two replicas of an expert on one rank split no load."""
    num_layers, num_items = weight.shape
    layers = np.arange(num_layers)
    num_groups = num_items // (num_bins * capacity)
    bin_load = np.zeros((num_layers, num_groups, num_bins))
    bin_used = np.zeros((num_layers, num_groups, num_bins), dtype=np.int64)
    if items is not None:
        holds = np.zeros((num_layers, num_groups, num_bins, int(items.max()) + 1), dtype=bool)
    out = np.empty_like(group)
    for i in range(num_items):
        g = group[:, i]
        cost = np.where(bin_used[layers, g] < capacity, bin_load[layers, g], np.inf)
        if items is not None:
            cost = cost + np.where(holds[layers, g, :, items[:, i]], 1e300, 0.0)
        b = np.argmin(cost, axis=1)
        out[:, i] = b
        bin_load[layers, g, b] += weight[:, i]
        bin_used[layers, g, b] += 1
        if items is not None:
            holds[layers, g, b, items[:, i]] = True
    return out


def _improve(load, placement, previous, slots_per_rank: int, budget: int) -> np.ndarray:
    """Steps 3 and 4 from ``placement``, changing at most ``budget`` slots from ``previous``."""
    start = placement.copy()
    placement = _move_replicas(load, placement, previous, slots_per_rank, budget // 2)
    placement = _swap_slots(load, placement, previous, slots_per_rank, budget)
    # Step 3 may raise a layer's max rank load that Step 4 then cannot undo: swaps alone there.
    num_ranks = start.shape[1] // slots_per_rank
    worse = rank_loads(load, placement, num_ranks).max(1) > rank_loads(load, start, num_ranks).max(
        1
    )
    if worse.any():
        placement[worse] = _swap_slots(
            load[worse], start[worse], previous[worse], slots_per_rank, budget
        )
    return placement


def _move_replicas(load, placement, previous, slots_per_rank: int, budget: int) -> np.ndarray:
    """Step 3: re-point a replica of the expert that can best spare one (lowest load per replica
    after losing it) to the expert with the highest load per replica, while that lowers the
    highest load per replica (Step 1's criterion); the donor gives up its replica on its most
    loaded rank. All layers at once, one replica per layer per round."""
    num_layers, num_slots = placement.shape
    rows = np.arange(num_layers)
    slot_rank = np.arange(num_slots) // slots_per_rank
    num_changed = (placement != previous).sum(axis=1)
    for _ in range(num_slots):
        counts = _replica_counts(placement, load.shape[1])
        per_replica = load / counts
        hot = np.argmax(per_replica, axis=1)
        spare = np.where(counts >= 2, load / np.maximum(counts - 1, 1), np.inf)
        donor = np.argmin(spare, axis=1)
        runner_up = np.sort(per_replica, axis=1)[:, -2] if load.shape[1] > 1 else 0.0
        peak = per_replica[rows, hot]
        new_peak = np.maximum(
            np.maximum(peak * counts[rows, hot] / (counts[rows, hot] + 1), spare[rows, donor]),
            runner_up,
        )
        loads = (
            np.take_along_axis(per_replica, placement, 1)
            .reshape(num_layers, -1, slots_per_rank)
            .sum(2)
        )
        # The hot expert's new replica must land on a rank that holds none of it yet: a second
        # replica on one rank serves none of that rank's tokens it did not already serve.
        holds_hot = (placement == hot[:, None]).reshape(num_layers, -1, slots_per_rank).any(2)
        slot = np.argmax(
            np.where(
                (placement == donor[:, None]) & ~holds_hot[:, slot_rank],
                loads[:, slot_rank],
                -np.inf,
            ),
            axis=1,
        )
        changed = (
            num_changed
            - (placement[rows, slot] != previous[rows, slot])
            + (hot != previous[rows, slot])
        )
        ok = (
            (new_peak < peak * (1 - _REL_TOL))
            & (changed <= budget)
            & (donor != hot)
            & (placement[rows, slot] == donor)  # False: every donor slot is on a hot rank
        )
        if not ok.any():
            break
        placement[rows[ok], slot[ok]] = hot[ok]
        num_changed = np.where(ok, changed, num_changed)
    return placement


def _swap_slots(load, placement, previous, slots_per_rank: int, budget: int) -> np.ndarray:
    """Step 4: greedy local search, one swap per layer per round, all layers at once: a slot on
    the hottest rank trades experts with a slot on another rank (replica counts stay). Taken:
    the swap that most lowers the sum of squared rank loads without raising the max rank load
    and keeps at most ``budget`` slots different from ``previous``; a layer stops at its first
    round without one, or once its max rank load is within ``_GOOD_ENOUGH`` of the mean. (Squares rather than the max alone: the max stalls at a local optimum
    while the budget lasts; squares keep evening out the ranks below it.)"""
    num_slots = placement.shape[1]
    num_ranks = num_slots // slots_per_rank
    if num_ranks < 2:
        return placement
    active = np.arange(placement.shape[0])
    for _ in range(4 * num_slots):
        if active.size == 0:
            break
        sub = placement[active]
        is_better, i, j = _best_swaps(load[active], sub, previous[active], num_ranks, budget)
        rows = np.arange(active.size)
        a, b = sub[rows, i], sub[rows, j]
        ok = np.flatnonzero(is_better)
        placement[active[ok], i[ok]] = b[ok]
        placement[active[ok], j[ok]] = a[ok]
        active = active[ok]
    return placement


def _best_swaps(load, placement, previous, num_ranks: int, budget: int):
    """Best swap per layer: (is_improving [L] bool, slot i [L], slot j [L])."""
    num_layers, num_slots = placement.shape
    slots_per_rank = num_slots // num_ranks
    layers = np.arange(num_layers)[:, None]
    counts = _replica_counts(placement, load.shape[1])
    per_slot = np.take_along_axis(load / counts, placement, axis=1)  # [L, S]
    loads = per_slot.reshape(num_layers, num_ranks, slots_per_rank).sum(axis=2)  # [L, R]
    by_load = np.argsort(-loads, axis=1)
    hot = by_load[:, 0]
    peak = loads[layers[:, 0], hot]
    changed = placement != previous
    num_changed = changed.sum(axis=1)
    slot_rank = np.arange(num_slots) // slots_per_rank
    hot_slots = hot[:, None] * slots_per_rank + np.arange(slots_per_rank)  # [L, spr]

    # Swap slot i on the hottest rank with slot j on rank rj: only those two ranks change.
    a, b = placement[layers, hot_slots], placement  # [L, spr], [L, S]
    delta = per_slot[:, None, :] - per_slot[layers, hot_slots][:, :, None]  # [L, spr, S]
    new_hot = peak[:, None, None] + delta
    new_j = loads[:, slot_rank][:, None, :] - delta
    top = np.sort(loads, axis=1)[:, ::-1]
    third = top[:, 2] if num_ranks > 2 else np.full(num_layers, -np.inf)
    rest = np.where(slot_rank == by_load[:, 1:2], third[:, None], top[:, 1:2])  # [L, S]
    swap_val = np.maximum(np.maximum(new_hot, new_j), rest[:, None, :])
    swap_ssq = 2 * delta * (peak[:, None, None] - loads[:, slot_rank][:, None, :]) + 2 * delta**2
    prev_i = previous[layers, hot_slots][:, :, None]
    swap_changed = (
        num_changed[:, None, None]
        - changed[layers, hot_slots][:, :, None]
        - changed[:, None, :]
        + (b[:, None, :] != prev_i)
        + (a[:, :, None] != previous[:, None, :])
    )
    # Nor may a swap put a second replica of an expert on a rank (it would serve nothing).
    on_rank = np.zeros((num_layers, num_ranks, load.shape[1]), dtype=bool)
    on_rank[layers, slot_rank[None, :], placement] = True
    doubles = (
        on_rank[layers[:, :, None], slot_rank[None, None, :], a[:, :, None]]
        | on_rank[layers, hot[:, None], b][:, None, :]
    )
    bad = (slot_rank == hot[:, None, None]) | (a[:, :, None] == b[:, None, :]) | doubles
    swap_val[bad | (swap_changed > budget)] = np.inf

    # Largest drop in the sum of squared rank loads among swaps that do not raise the max.
    ssq = np.where(swap_val <= peak[:, None, None], swap_ssq, np.inf).reshape(num_layers, -1)
    pick = np.argmin(ssq, axis=1)
    is_better = (ssq[np.arange(num_layers), pick] < -_REL_TOL * peak**2) & (
        peak > loads.mean(axis=1) * (1 + _GOOD_ENOUGH)
    )
    i, j = np.unravel_index(pick, swap_val.shape[1:])
    return is_better, hot_slots[np.arange(num_layers), i], j
