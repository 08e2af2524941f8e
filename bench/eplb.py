"""EPLB benchmark: tidal's incremental planner beside a from-scratch DeepSeek-style planner.

    python bench/eplb.py [--quick] --json PATH

Part 1, synthetic (no torch, no Ray): Kimi-K2's shape, 60 MoE layers x 384 experts, top-8
routing, ``TOKENS`` tokens per window (8 assignments each). Expert popularity per layer is Zipf
or log-normal over a random order of the experts, and drifts between windows (the log
popularity takes an AR(1) step), so a plan made on window t is judged on window t+1, as a
serving system would use it. Layouts: 384+32 and 384+64 slots on 4 nodes x 8 ranks, 384+32 on
2 nodes x 8 ranks.

For each window t both planners see window t's counts and their own placement from t-1:
- ours: ``scheduler.eplb.rebalance(..., previous, max_moved=20% of slots)``;
- baseline: the from-scratch planner DeepSeek describes for EPLB, written here from that
  description: replicate the expert with the highest load per replica until the slots are full,
  then pack replicas heaviest first onto the least loaded rank with a free slot; hierarchical
  (expert groups packed onto nodes first) when the groups divide evenly over the nodes, else
  global. K2 has one expert group (``n_group=1``), so the global form applies. Its output is
  given the benefit of slot alignment: an expert that stays on a rank keeps its old slot, so
  only real weight loads count as moved.

Figures: balancedness (mean / max rank load, even split over replicas) on window t+1, the
fraction of slots whose expert changed per rebalance, plan time.

Part 2, live (``part2_live``, skipped with ``--skip-live``; ``--live-only`` runs it alone): an
EP2 ``k2-small`` instance (two rank processes over gloo, 32+8 slots per MoE layer, each rank
pinned to its own core unless ``--no-pin``) with a router bias that makes 4 experts of rank 0
hot (rank balancedness ~0.6 without EPLB). Rank 0 plans a new placement with
``scheduler.eplb.rebalance`` from an EPLB-off window, and every rank stages and swaps it in live
while decoding (``live``). Then rounds of three blocks, EPLB off (the default placement), on (the
new one) and the ideal (the bias removed), in an order rotated each round, each block decoding
at batch 32 (the headline) and 128 and 256 (``decode_batch_sweep``) and prefilling 1024 tokens
per rank; a second live rebalance goes back (``live_back``). Figures: tokens/s and median steps
per layout; the off-to-ideal gap and what EPLB on recovers of it as means of within-round
differences (so a drift of the box's speed cancels), the share recovered reported only where
the gap exceeds twice its standard error (elsewhere null, with the reason in ``gap_note``); per
rank, the median step less its seconds in the collectives (``rank_busy_ms``: its own work);
the longest step of a live rebalance against the median EPLB-off step, beside the same ratio
for the runs without one (the noise floor); greedy tokens of every skewed run against EPLB
off. See ``bench/eplb_ep.py`` for what a rank runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from statistics import median

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scheduler.eplb import balancedness, moved_slots, rebalance  # noqa: E402

NUM_LAYERS, NUM_EXPERTS, TOP_K = 60, 384, 8
TOKENS = 8192  # per window; TOKENS * TOP_K expert assignments per layer
LAYOUTS = {  # name: (num_slots, num_nodes, num_ranks)
    "384+32 slots, 4x8 ranks": (416, 4, 32),
    "384+64 slots, 4x8 ranks": (448, 4, 32),
    "384+32 slots, 2x8 ranks": (416, 2, 16),
}
DISTRIBUTIONS = ("zipf", "lognormal")
ZIPF_S, LOGNORMAL_SIGMA = 0.8, 1.0
DRIFT_RHO, DRIFT_SIGMA = 0.9, 0.5  # AR(1) on log popularity: ~0.22 std change per window
MOVED_TARGET = 0.2


# ---- synthetic loads ----------------------------------------------------------------------------
def expert_loads(dist: str, seed: int, num_windows: int):
    """Token counts per window, each [NUM_LAYERS, NUM_EXPERTS], drifting between windows."""
    rng = np.random.default_rng(seed)
    if dist == "zipf":
        ranks = np.argsort(rng.random((NUM_LAYERS, NUM_EXPERTS)), axis=1) + 1
        base = -ZIPF_S * np.log(ranks)
    else:
        base = rng.normal(0.0, LOGNORMAL_SIGMA, (NUM_LAYERS, NUM_EXPERTS))
    drift = np.zeros_like(base)
    for _ in range(num_windows):
        step = rng.normal(0.0, DRIFT_SIGMA * np.sqrt(1 - DRIFT_RHO**2), base.shape)
        drift = DRIFT_RHO * drift + step
        popularity = np.exp(base + drift)
        # An expert can take at most one of a token's TOP_K picks.
        share = np.minimum(popularity / popularity.sum(axis=1, keepdims=True), 1 / TOP_K)
        share /= share.sum(axis=1, keepdims=True)
        yield rng.multinomial(TOKENS * TOP_K, share).astype(np.float64)


# ---- baseline: from-scratch replicate-then-pack -------------------------------------------------
def _replicate(load: np.ndarray, num_slots: int) -> np.ndarray:
    """Replicas per expert, [L, E]: each extra slot to the highest load per replica."""
    counts = np.ones(load.shape, dtype=np.int64)
    layers = np.arange(load.shape[0])
    for _ in range(num_slots - load.shape[1]):
        counts[layers, np.argmax(load / counts, axis=1)] += 1
    return counts


def _balanced_pack(weight: np.ndarray, num_packs: int) -> np.ndarray:
    """Pack index per item, [L, n]: heaviest first to the least loaded pack that has room
    (every pack takes n / num_packs items)."""
    num_layers, num_items = weight.shape
    capacity = num_items // num_packs
    layers = np.arange(num_layers)
    pack_load = np.zeros((num_layers, num_packs))
    pack_used = np.zeros((num_layers, num_packs), dtype=np.int64)
    out = np.empty((num_layers, num_items), dtype=np.int64)
    for item in np.argsort(-weight, axis=1, kind="stable").T:
        choice = np.argmin(np.where(pack_used < capacity, pack_load, np.inf), axis=1)
        out[layers, item] = choice
        pack_load[layers, choice] += weight[layers, item]
        pack_used[layers, choice] += 1
    return out


def _replicate_and_pack(load: np.ndarray, num_slots: int, num_ranks: int) -> np.ndarray:
    """Global policy: placement [L, num_slots], rank by rank."""
    counts = _replicate(load, num_slots)
    replicas = np.stack([np.repeat(np.arange(load.shape[1]), c) for c in counts])  # [L, S]
    rank = _balanced_pack(np.take_along_axis(load / counts, replicas, axis=1), num_ranks)
    return np.take_along_axis(replicas, np.argsort(rank, axis=1, kind="stable"), axis=1)


def baseline_plan(load, num_slots, num_nodes, num_ranks, num_groups: int = 1) -> np.ndarray:
    """From-scratch placement [L, num_slots]; hierarchical when groups divide over nodes."""
    num_layers, num_experts = load.shape
    if num_nodes == 1 or num_groups % num_nodes:
        return _replicate_and_pack(load, num_slots, num_ranks)
    # Groups (contiguous experts) onto nodes, balancing group load; then per node: replicate
    # its experts into the node's slots and pack them onto the node's ranks.
    group_size = num_experts // num_groups
    group_load = load.reshape(num_layers, num_groups, group_size).sum(axis=2)
    node_of_group = _balanced_pack(group_load, num_nodes)
    placement = np.empty((num_layers, num_slots), dtype=np.int64)
    per_node = num_slots // num_nodes
    for layer in range(num_layers):
        for node in range(num_nodes):
            groups = np.flatnonzero(node_of_group[layer] == node)
            experts = (groups[:, None] * group_size + np.arange(group_size)).ravel()
            local = _replicate_and_pack(
                load[layer : layer + 1, experts], per_node, num_ranks // num_nodes
            )
            placement[layer, node * per_node : (node + 1) * per_node] = experts[local[0]]
    return placement


def align_slots(previous: np.ndarray, placement: np.ndarray, num_ranks: int) -> np.ndarray:
    """``placement`` with each rank's slots reordered so an expert it already held keeps its
    slot: the same experts per rank, only slot indices change."""
    num_layers, num_slots = placement.shape
    per_rank = num_slots // num_ranks
    out = placement.copy()
    for layer in range(num_layers):
        for rank in range(num_ranks):
            old = list(previous[layer, rank * per_rank : (rank + 1) * per_rank])
            new = list(placement[layer, rank * per_rank : (rank + 1) * per_rank])
            slots: list[int | None] = [None] * per_rank
            for i, expert in enumerate(old):
                if expert in new:
                    new.remove(expert)
                    slots[i] = expert
            rest = iter(new)
            out[layer, rank * per_rank : (rank + 1) * per_rank] = [
                e if e is not None else next(rest) for e in slots
            ]
    return out


# ---- part 1: synthetic windows ------------------------------------------------------------------
def run_case(layout: tuple[int, int, int], dist: str, seed: int, num_windows: int) -> dict:
    """Both planners over one drifting load sequence; figures averaged over its rebalances."""
    num_slots, num_nodes, num_ranks = layout
    max_moved = int(MOVED_TARGET * num_slots)
    loads = list(expert_loads(dist, seed, num_windows))
    figures = {k: {"ours": [], "baseline": []} for k in ("next", "same", "moved", "ms")}
    figures["next"]["static"] = []
    ours = base = first = None
    for now, upcoming in zip(loads, loads[1:], strict=False):
        start = time.perf_counter()
        plan = rebalance(
            now, num_slots, num_nodes, num_ranks, ours, None if ours is None else max_moved
        )
        figures["ms"]["ours"].append(1e3 * (time.perf_counter() - start))
        start = time.perf_counter()
        base_plan = baseline_plan(now, num_slots, num_nodes, num_ranks)
        figures["ms"]["baseline"].append(1e3 * (time.perf_counter() - start))
        if base is not None:
            base_plan = align_slots(base, base_plan, num_ranks)
            figures["moved"]["ours"].append(moved_slots(ours, plan).mean() / num_slots)
            figures["moved"]["baseline"].append(moved_slots(base, base_plan).mean() / num_slots)
        first = plan if first is None else first
        ours, base = plan, base_plan
        for name, placement in (("ours", ours), ("baseline", base)):
            figures["next"][name].append(balancedness(upcoming, placement, num_ranks).mean())
            figures["same"][name].append(balancedness(now, placement, num_ranks).mean())
        figures["next"]["static"].append(balancedness(upcoming, first, num_ranks).mean())
    return {k: {n: float(np.mean(v)) for n, v in d.items()} for k, d in figures.items()}


def _mean(cases: list[dict], key: str, name: str) -> float:
    return float(np.mean([c[key][name] for c in cases]))


def part1_synthetic(quick: bool) -> dict:
    num_windows, seeds = (5, (0,)) if quick else (12, (0, 1, 2))
    rows, by_layout, all_cases = [], {}, []
    for layout_name, layout in LAYOUTS.items():
        by_layout[layout_name] = {}
        for dist in DISTRIBUTIONS:
            cases = [run_case(layout, dist, seed, num_windows) for seed in seeds]
            all_cases += cases
            summary = {
                "next_window_balancedness": {
                    n: _mean(cases, "next", n) for n in ("ours", "baseline", "static")
                },
                "same_window_balancedness": {
                    n: _mean(cases, "same", n) for n in ("ours", "baseline")
                },
                "moved_fraction": {n: _mean(cases, "moved", n) for n in ("ours", "baseline")},
                "plan_ms": {n: _mean(cases, "ms", n) for n in ("ours", "baseline")},
            }
            by_layout[layout_name][dist] = summary
            rows.append((layout_name, dist, summary))
    _print_table(rows)
    result = {
        "next_window_balancedness": {n: _mean(all_cases, "next", n) for n in ("ours", "baseline")},
        "moved_fraction": {n: _mean(all_cases, "moved", n) for n in ("ours", "baseline")},
        "plan_ms": {n: _mean(all_cases, "ms", n) for n in ("ours", "baseline")},
        "by_layout": by_layout,
        "setup": {
            "layers": NUM_LAYERS,
            "experts": NUM_EXPERTS,
            "top_k": TOP_K,
            "tokens_per_window": TOKENS,
            "windows": num_windows,
            "seeds": list(seeds),
            "zipf_s": ZIPF_S,
            "lognormal_sigma": LOGNORMAL_SIGMA,
            "drift_rho": DRIFT_RHO,
            "drift_sigma": DRIFT_SIGMA,
            "max_moved_fraction": MOVED_TARGET,
            "layouts": {
                k: dict(zip(("num_slots", "num_nodes", "num_ranks"), v, strict=True))
                for k, v in LAYOUTS.items()
            },
        },
    }
    result["targets_met"] = {
        "balancedness_ge_baseline": result["next_window_balancedness"]["ours"]
        >= result["next_window_balancedness"]["baseline"],
        "moved_fraction_le_0.2": result["moved_fraction"]["ours"] <= MOVED_TARGET,
    }
    result["targets_met"]["all"] = all(result["targets_met"].values())
    return result


def _print_table(rows) -> None:
    head = f"{'layout':<24} {'dist':<9} {'bal next ours/base':>19} {'ratio':>6} {'static':>7} {'moved ours/base':>16} {'plan ms ours/base':>18}"
    print(head)
    print("-" * len(head))
    for layout_name, dist, s in rows:
        nb, mv, ms = s["next_window_balancedness"], s["moved_fraction"], s["plan_ms"]
        print(
            f"{layout_name:<24} {dist:<9} {nb['ours']:>9.4f}/{nb['baseline']:.4f} "
            f"{nb['ours'] / nb['baseline']:>6.3f} {nb['static']:>7.4f} "
            f"{mv['ours']:>7.3f}/{mv['baseline']:.3f} {ms['ours']:>9.0f}/{ms['baseline']:.0f}"
        )


# ---- part 2: a live expert-parallel instance ----------------------------------------------------
LIVE_RANKS = 2
LIVE_REDUNDANT = 4  # extra slots per rank
GAP_TARGET, STEP_RATIO_TARGET = 0.8, 1.25


PHASES_LIVE = ("ideal", "off", "live", "live_back")  # the runs outside the rounds
LAYOUTS_LIVE = {"eplb_off": "off", "eplb_on": "on", "ideal": "ideal"}  # figure key: block name


def _part(run: dict, part: str) -> dict:
    """One rank's run of a block's ``part`` ("": decode at BATCH; "prefill": its prefills;
    "sweep/B": decode at batch B)."""
    for key in part.split("/") if part else ():
        run = run[key]
    return run


def _lockstep(runs: list[dict]) -> list[float]:
    """Per lockstep step of the ranks' ``runs``, the slowest rank's seconds."""
    return [max(row) for row in zip(*(x["seconds"] for x in runs), strict=True)]


def _blocks(records: list[dict], name: str, part: str) -> list[list[dict]]:
    """Per round, every rank's run of block ``name``'s ``part``."""
    num_rounds = len(records[0]["phases"]["rounds"])
    return [
        [_part(r["phases"]["rounds"][i][name], part) for r in records] for i in range(num_rounds)
    ]


def _phase_steps(records: list[dict], phase: str) -> list[float]:
    return _lockstep([r["phases"][phase] for r in records])


def _three_ways(records: list[dict], part: str, tokens_per_step: int) -> dict:
    """EPLB off / on / ideal for decode steps or prefills, from the interleaved rounds: median
    step, tokens/s, rank balancedness, per-rank busy time, speedup (on over off) and the share
    of the off-to-ideal gap recovered.

    The gap and what EPLB recovers of it are means over the rounds of within-round differences
    (each round measures the three layouts back to back, so a drift of the box's speed cancels);
    the noise is the standard error of that mean. The share recovered is defined only where the
    gap exceeds twice the noise; elsewhere ``gap_recovered`` is None and ``gap_note`` says why."""
    blocks = {key: _blocks(records, name, part) for key, name in LAYOUTS_LIVE.items()}
    steps = {key: [_lockstep(runs) for runs in b] for key, b in blocks.items()}
    t = {key: median(x for block in s for x in block) for key, s in steps.items()}
    per_round = {key: [median(block) for block in s] for key, s in steps.items()}
    d_ideal = [o - i for o, i in zip(per_round["eplb_off"], per_round["ideal"], strict=True)]
    d_on = [o - n for o, n in zip(per_round["eplb_off"], per_round["eplb_on"], strict=True)]
    gap = float(np.mean(d_ideal))
    noise = float(np.std(d_ideal, ddof=1) / len(d_ideal) ** 0.5)  # part2_live runs >= 3 rounds
    note = None
    if gap <= 2 * noise:
        note = (
            f"undefined: off - ideal = {gap * 1e3:.2f} ms per step (mean of {len(d_ideal)} "
            f"rounds) is not above twice its standard error ({noise * 1e3:.2f} ms)"
        )
    rows = {
        key: np.sum([[x["rows"] for x in runs] for runs in b], axis=0) for key, b in blocks.items()
    }
    figures = {
        "tokens_per_s": {k: tokens_per_step / v for k, v in t.items()},
        "median_step_ms": {k: v * 1e3 for k, v in t.items()},
        "rank_balancedness": {k: float(np.mean(r) / np.max(r)) for k, r in rows.items()},
        "speedup": t["eplb_off"] / t["eplb_on"],
        "gap_ms": gap * 1e3,
        "noise_ms": noise * 1e3,
        "gap_ms_per_round": [round(x * 1e3, 2) for x in d_ideal],
        "recovered_ms_per_round": [round(x * 1e3, 2) for x in d_on],
        "gap_recovered": None if note else float(np.mean(d_on)) / gap,
        "gap_note": note,
    }
    if part != "prefill":  # per rank: its step less its seconds in the collectives
        figures["rank_busy_ms"] = {
            k: [
                median(
                    s - c
                    for runs in b
                    for s, c in zip(runs[rank]["seconds"], runs[rank]["comm"], strict=True)
                )
                * 1e3
                for rank in range(len(records))
            ]
            for k, b in blocks.items()
        }
    return figures


def _skewed_runs(records: list[dict], part: str) -> list[tuple[int, dict]]:
    """(rank, run) of every run on the skewed routing after the plan's window: the live
    rebalances and the rounds' off and on blocks."""
    out = []
    for rank, r in enumerate(records):
        ph = r["phases"]
        if not part:
            out += [(rank, ph["live"]), (rank, ph["live_back"])]
        for block in ph["rounds"]:
            out += [(rank, _part(block[name], part)) for name in ("off", "on")]
    return out


def _identical(records: list[dict], part: str) -> bool:
    """Every skewed run's tokens equal EPLB off's (decode at BATCH: the plan's window; other
    parts: the first round's off block) over the steps they share."""
    ref = [
        r["phases"]["off"] if not part else _part(r["phases"]["rounds"][0]["off"], part)
        for r in records
    ]
    return all(
        run["tokens"][:n] == ref[rank]["tokens"][:n]
        for rank, run in _skewed_runs(records, part)
        for n in [min(len(run["tokens"]), len(ref[rank]["tokens"]))]
    )


def _changed_sequences(records: list[dict]) -> int:
    """Decode sequences (batch BATCH) whose greedy tokens in any run on the skewed routing
    (during or after a rebalance) differ from EPLB off's."""
    changed: set[tuple[int, int]] = set()
    for rank, run in _skewed_runs(records, ""):
        ref = records[rank]["phases"]["off"]["tokens"]
        for step, tokens in enumerate(run["tokens"][: len(ref)]):
            changed |= {(rank, q) for q, x in enumerate(tokens) if x != ref[step][q]}
    return len(changed)


def _live_rebalance(records: list[dict], name: str, t_off: float) -> dict:
    """The steps of one live rebalance against the median EPLB-off step."""
    phases = [r["phases"][name] for r in records]
    step = _phase_steps(records, name)
    pending = [any(p["pending"][s] for p in phases) for s in range(len(step))]
    return {
        "longest_step_ms": max(step) * 1e3,
        "median_step_ms": median(step) * 1e3,
        "rebalance_step_ratio": max(step) / t_off,
        "steps_with_staged_placement": int(sum(pending)),
        "stage_s": max(p.get("stage_s", 0.0) for p in phases),
        "bytes_staged": int(sum(p.get("bytes", 0) for p in phases)),
        "extra_idle_ticks": max(p["extra_ticks"] for p in phases),
        "errors": [p["error"] for p in phases if "error" in p],
    }


def part2_live(model_dir: Path, quick: bool, pin: bool = True) -> dict:
    """EP2 k2-small, skewed routing: EPLB off, on (after a live rebalance), and the balanced
    ideal, in one run (``bench/eplb_ep.py`` runs the ranks; see its docstring)."""
    from bench.engine_ep import launch
    from bench.eplb_ep import BATCH, CONTEXT, PREFILL_LEN, SWEEP
    from model.checkpoint import make_model

    if not (model_dir / "config.json").exists():
        print(f"generating k2-small into {model_dir} ...", flush=True)
        make_model("k2-small", model_dir, seed=0)
    steps, live_steps, prefill_reps = (24, 40, 1) if quick else (48, 80, 2)
    rounds, block_steps = (3, 12) if quick else (8, 16)
    sweep_steps = [6 if quick else 8 for _ in SWEEP]
    common = ["--model-dir", str(model_dir), "--redundant", str(LIVE_REDUNDANT)]
    common += ["--max-moved-fraction", str(MOVED_TARGET), "--steps", str(steps)]
    common += ["--live-steps", str(live_steps), "--prefill-reps", str(prefill_reps)]
    common += ["--rounds", str(rounds), "--block-steps", str(block_steps)]
    common += ["--sweep-steps", *map(str, sweep_steps)]
    common += ["--pin"] if pin else []
    script = str(Path(__file__).with_name("eplb_ep.py"))
    records = launch(LIVE_RANKS, 1, common, 1800, script=script)

    decode = _three_ways(records, "", BATCH)
    sweep = {BATCH: decode} | {b: _three_ways(records, f"sweep/{b}", b) for b in SWEEP}
    prefill = _three_ways(records, "prefill", LIVE_RANKS * PREFILL_LEN)
    t_off = decode["median_step_ms"]["eplb_off"] / 1e3
    live = {name: _live_rebalance(records, name, t_off) for name in ("live", "live_back")}
    # the same ratio for the runs without a rebalance: how long a step gets from noise alone
    quiet_steps = _phase_steps(records, "off") + [
        x
        for key in ("eplb_off", "eplb_on")
        for runs in _blocks(records, LAYOUTS_LIVE[key], "")
        for x in _lockstep(runs)
    ]
    quiet = max(quiet_steps) / t_off
    prefill_identical = _identical(records, "prefill")
    per_name = [(name, _blocks(records, name, "")) for name in LAYOUTS_LIVE.values()]
    first = records[0]
    moved = sum(
        a != b
        for layer, new in first["placement"].items()
        for a, b in zip(new, first["default_placement"][layer], strict=True)
    )
    result = {
        "setup": {
            "preset": "k2-small",
            "ranks": LIVE_RANKS,
            "slots": first["num_slots"],
            "redundant_per_rank": LIVE_REDUNDANT,
            "decode_batch": BATCH,
            "context": CONTEXT,
            "prefill_tokens_per_rank": PREFILL_LEN,
            "plan_window_steps": steps,
            "rounds": rounds,
            "order": "off, on, ideal rotated by one each round",
            "decode_steps_per_block": block_steps,
            "sweep_batches": list(SWEEP),
            "sweep_steps_per_block": sweep_steps,
            "live_steps": live_steps,
            "prefills_per_block": prefill_reps,
            "hot_experts": first["hot_experts"],
            "max_moved_per_layer": first["max_moved"],
            "plan_from": "the EPLB-off decode window's counts summed over the ranks (the same "
            "placement then serves the prefills)",
            "dtype": "float32",
            "transport": "gloo over 127.0.0.1, one torch thread per rank",
            "pinned": pin,
        },
        "decode_tokens_per_s": decode["tokens_per_s"],
        "median_step_ms": decode["median_step_ms"],
        "rank_balancedness": decode["rank_balancedness"],
        "eplb_decode_speedup": decode["speedup"],
        "eplb_gap_recovered": decode["gap_recovered"],
        "eplb_gap_note": decode["gap_note"],
        "rank_busy_ms": decode["rank_busy_ms"],
        "decode_batch_sweep": {
            str(b): {
                k: v[k]
                for k in (
                    "tokens_per_s",
                    "median_step_ms",
                    "rank_busy_ms",
                    "rank_balancedness",
                    "speedup",
                    "gap_ms",
                    "noise_ms",
                    "gap_ms_per_round",
                    "recovered_ms_per_round",
                    "gap_recovered",
                    "gap_note",
                )
            }
            for b, v in sweep.items()
        },
        "prefill": {**prefill, "first_tokens_identical": prefill_identical},
        "rebalance_step_ratio": max(v["rebalance_step_ratio"] for v in live.values()),
        "longest_step_ratio_without_rebalance": quiet,
        "live_rebalances": live,
        "moved_slots": int(moved),
        "moved_fraction": moved / (len(first["placement"]) * first["num_slots"]),
        "plan_ms": first["plan_s"] * 1e3,
        "greedy_tokens_identical_to_off": _identical(records, ""),
        "sweep_tokens_identical_to_off": {str(b): _identical(records, f"sweep/{b}") for b in SWEEP},
        "sequences_with_changed_tokens": _changed_sequences(records),
        "failed_rebalances": sum(len(v["errors"]) for v in live.values()),
        "step_ms": {
            **{p: [round(x * 1e3, 2) for x in _phase_steps(records, p)] for p in PHASES_LIVE},
            "rounds": [
                {name: [round(x * 1e3, 2) for x in _lockstep(runs[i])] for name, runs in per_name}
                for i in range(rounds)
            ],
        },
    }
    gap = result["eplb_gap_recovered"]
    result["targets_met"] = {
        "gap_recovered_ge_0.8": gap is not None and gap >= GAP_TARGET,
        "rebalance_step_ratio_le_1.25": result["rebalance_step_ratio"] <= STEP_RATIO_TARGET,
        "no_failure": result["sequences_with_changed_tokens"] == 0
        and result["greedy_tokens_identical_to_off"]
        and result["failed_rebalances"] == 0
        and prefill_identical
        and all(result["sweep_tokens_identical_to_off"].values()),
    }
    _print_live(result)
    return result


def _fmt_gap(x: float | None) -> str:
    return "undefined" if x is None else f"{x:.2f}"


def _print_live(r: dict) -> None:
    print(f"\npart 2: EP{LIVE_RANKS} k2-small, skewed routing (rank balancedness: mean/max rows)")
    head = f"{'part':<24} {'layout':<9} {'tok/s':>8} {'step ms':>8} {'vs off':>7} {'rank bal':>9}"
    print(f"{head} {'busy ms r0/r1':>15}")
    p = r["prefill"]
    parts = {
        f"decode b={b}": (v["tokens_per_s"], v["median_step_ms"], v["rank_balancedness"], v)
        for b, v in r["decode_batch_sweep"].items()
    }
    parts[f"prefill {r['setup']['prefill_tokens_per_rank']} tok/rank"] = (
        p["tokens_per_s"],
        p["median_step_ms"],
        p["rank_balancedness"],
        p,
    )
    for part, (tps, ms, bal, v) in parts.items():
        for name in ("eplb_off", "eplb_on", "ideal"):
            busy = v.get("rank_busy_ms", {}).get(name)
            busy_s = "/".join(f"{x:.1f}" for x in busy) if busy else ""
            print(
                f"{part:<24} {name:<9} {tps[name]:>8.1f} {ms[name]:>8.2f} "
                f"{tps[name] / tps['eplb_off']:>7.3f} {bal[name]:>9.3f} {busy_s:>15}"
            )
    for part, (_, _, _, v) in parts.items():
        print(
            f"{part}: speedup {v['speedup']:.3f}, gap recovered {_fmt_gap(v['gap_recovered'])}"
            + (f" ({v['gap_note']})" if v["gap_note"] else "")
        )
    for name, v in r["live_rebalances"].items():
        print(
            f"{name}: longest step {v['longest_step_ms']:.1f} ms = "
            f"{v['rebalance_step_ratio']:.2f}x the median EPLB-off step; staging "
            f"{v['stage_s']:.2f} s, swap pending over {v['steps_with_staged_placement']} steps, "
            f"{v['bytes_staged'] / 1e6:.1f} MB read; errors {v['errors'] or 'none'}"
        )
    print(
        f"eplb_decode_speedup {r['eplb_decode_speedup']:.3f}, eplb_gap_recovered "
        f"{_fmt_gap(r['eplb_gap_recovered'])} (target >= {GAP_TARGET}, decode b="
        f"{r['setup']['decode_batch']})"
    )
    print(
        f"rebalance_step_ratio {r['rebalance_step_ratio']:.2f} (target <= {STEP_RATIO_TARGET}; "
        f"without a rebalance {r['longest_step_ratio_without_rebalance']:.2f}), moved "
        f"{r['moved_slots']} slots ({r['moved_fraction']:.1%}), plan {r['plan_ms']:.1f} ms, "
        f"greedy identical {r['greedy_tokens_identical_to_off']}, sweep "
        f"{r['sweep_tokens_identical_to_off']}; targets met {r['targets_met']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 5 windows")
    parser.add_argument("--json", type=Path, required=True, help="where to write the figures")
    parser.add_argument("--model-dir", type=Path, default=Path(".models/k2-small"))
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--skip-live", action="store_true", help="part 1 only")
    only.add_argument("--live-only", action="store_true", help="part 2 only")
    parser.add_argument("--no-pin", action="store_true", help="let the ranks share the cores")
    args = parser.parse_args()
    result = {} if args.live_only else {"part1_synthetic": part1_synthetic(args.quick)}
    if not args.skip_live:
        result["part2_live"] = part2_live(args.model_dir, args.quick, pin=not args.no_pin)
    if "part1_synthetic" in result:
        s = result["part1_synthetic"]
        print(
            f"\nmean next-window balancedness ours {s['next_window_balancedness']['ours']:.4f} vs "
            f"baseline {s['next_window_balancedness']['baseline']:.4f}; moved ours "
            f"{s['moved_fraction']['ours']:.3f} vs baseline "
            f"{s['moved_fraction']['baseline']:.3f}; targets met: {s['targets_met']}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
