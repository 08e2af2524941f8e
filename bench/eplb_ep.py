"""One rank of ``bench/eplb.py`` part 2: live EPLB on an expert-parallel instance.

    (started by bench/eplb.py: python bench/eplb_ep.py --rank R --num-ranks N ...)

Every rank holds ``BATCH / N`` sequences of ``CONTEXT`` tokens of random latent KV and decodes
them greedily (each step's argmax is the next step's input), in lockstep with the other ranks,
with the same ``Engine``, ``ExpertParallel`` and staging/swap code the rank workers run. Every
run replays the same decode steps from the same starting tokens (a step rewrites the KV at its
position before reading it, so a run's tokens do not depend on what ran before):

1. ``ideal``: the checkpoint's routing (no bias);
2. ``off``: a router bias on ``HOT`` experts of rank 0 that no other rank replicates, so that
   rank 0 computes most of the expert rows (the default placement, EPLB off). Its counts,
   summed over the ranks, are the window rank 0 plans a new placement from with
   ``scheduler.eplb.rebalance``;
3. ``live``: every rank stages the new slots' weights from its checkpoint on a background
   thread while the step loop keeps decoding, and the layers swap in at common ticks, one per
   tick;
4. ``rounds``: ``--rounds`` rounds of three blocks, EPLB ``off`` (the default placement, skewed
   routing), ``on`` (the new placement, skewed routing) and ``ideal`` (the default placement, no
   bias), in an order rotated by one each round, so that a drift of the box's speed falls on
   every layout alike. The rounds switch layouts by installing stacks kept from before and after
   the live rebalance (``use_layout``), not by resharding. A block decodes ``--block-steps``
   steps at batch ``BATCH``, the ``SWEEP`` batches and the prefills;
5. ``live_back``: a second live rebalance, back to the default placement.

With ``--pin`` rank R runs on core R (its staging thread too): a rank has its own compute, as
on a GPU, and the ranks do not take turns on both cores.

Per step each rank records its seconds, its seconds in the collectives (all-to-alls and the
tick, waiting for the slower rank included), whether a staged placement was pending, and the
tokens; per phase, the expert rows it computed (``ExpertParallel.num_rows_received``). Rank 0
gathers every rank's record and writes them as JSON for ``bench/eplb.py`` to summarise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import _random_context  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.engine import Engine  # noqa: E402
from model.parallel import ExpertParallel  # noqa: E402
from scheduler.eplb import rebalance  # noqa: E402

BATCH = 32  # decode sequences over the instance (the figure; the live rebalances run at it)
SWEEP = (128, 256)  # larger decode batches measured in every phase too (``sweep``)
CONTEXT = 256  # tokens of context per decode sequence
PREFILL_LEN = 1024  # tokens per rank per prefill step (one chunk)
HOT = 4  # experts made hot by the router bias
BIAS = 1.0  # added to the hot experts' selection scores (sigmoid scores are in (0, 1))
ORDER = ["off", "on", "ideal"]  # a round's blocks, rotated by one each round


def decode_context(engine: Engine, batch: int, steps: int) -> list[str]:
    """``batch`` sequences of CONTEXT tokens of random latent KV, with pages for ``steps`` more."""
    c = engine.config
    c_kv, k_pe = _random_context(c, CONTEXT)
    seqs = [f"eplb-{i}" for i in range(batch)]
    for sid in seqs:
        engine.cache.allocator.allocate(sid, CONTEXT + steps + 1)
        for layer in range(c.num_hidden_layers):
            engine.cache.write(sid, layer, 0, c_kv, k_pe)
    return seqs


def hot_experts(ep: ExpertParallel) -> list[int]:
    """The last ``HOT`` experts of rank 0's slots that have no replica elsewhere (so that with
    EPLB off, their load stays on rank 0)."""
    placement = ep.initial_placement()
    rank0 = [placement[s] for s in range(ep.slots_per_rank)]
    single = [e for e in rank0 if placement.count(e) == 1]
    return single[-HOT:]


def layout(engine: Engine) -> dict[int, tuple]:
    """The placement and expert stacks every MoE layer serves (for ``use_layout``)."""
    return {i: (moe.placement, moe.gate_up, moe.down) for i, moe in engine.model.moe_layers.items()}


def use_layout(engine: Engine, stacks: dict[int, tuple]) -> None:
    """Serve a layout kept by ``layout`` again (every rank at the same point of its loop)."""
    for i, moe in engine.model.moe_layers.items():
        moe.install(*stacks[i])


def set_skew(engine: Engine, base: dict[int, torch.Tensor], hot: list[int], on: bool) -> None:
    for i, moe in engine.model.moe_layers.items():
        bias = base[i].clone()
        if on:
            bias[hot] += BIAS
        moe.router.bias = bias


def run_phase(engine: Engine, seqs: list[str], first: list[int], steps: int) -> dict:
    """``steps`` greedy decode steps from ``first`` tokens at positions CONTEXT..; per step its
    seconds, the seconds this rank spent in the collectives (all-to-alls and the tick: waiting
    for the slower rank included, so the rest is this rank's own work), whether a staged
    placement was pending before it, and the chosen tokens."""
    ep = engine.ep
    assert ep is not None
    rows_before = ep.num_rows_received
    counts_before = {i: c.clone() for i, c in engine.expert_counts.items()}
    tokens, seconds, comm, pending, out = list(first), [], [], [], []
    for s in range(steps):
        pending.append(engine.is_resharding)
        ep.reset_timers()
        start = time.perf_counter()
        logits = engine.decode(seqs, tokens, [CONTEXT + s] * len(seqs))
        seconds.append(time.perf_counter() - start)
        comm.append(ep.comm_seconds + ep.tick_seconds)
        tokens = logits.argmax(dim=-1).tolist()
        out.append(tokens)
    return {
        "seconds": seconds,
        "comm": comm,
        "pending": pending,
        "tokens": out,
        "rows": ep.num_rows_received - rows_before,
        "counts": {i: (c - counts_before[i]).tolist() for i, c in engine.expert_counts.items()},
    }


def run_prefills(engine: Engine, prompt: list[int], reps: int) -> dict:
    """``reps`` prefills of ``prompt`` (pages allocated and freed each time), timed one by one;
    the argmax of each last-token logits stands in for the request's first token."""
    ep = engine.ep
    assert ep is not None
    rows_before = ep.num_rows_received
    alloc = engine.cache.allocator
    seconds, out = [], []
    for _ in range(reps):
        alloc.allocate("eplb-prefill", len(prompt))
        try:
            start = time.perf_counter()
            logits = engine.prefill("eplb-prefill", prompt)
            seconds.append(time.perf_counter() - start)
        finally:
            alloc.free("eplb-prefill")
        out.append([int(logits.argmax())])
    return {"seconds": seconds, "tokens": out, "rows": ep.num_rows_received - rows_before}


def live_phase(
    engine: Engine,
    version: int,
    placement: dict[int, list[int]],
    seqs: list[str],
    first: list[int],
    steps: int,
) -> dict:
    """``run_phase`` while a background thread stages ``placement``; the layers swap in at the
    ranks' common ticks. Idle ticks finish the swap if the phase ends first."""
    staged: dict[str, object] = {}

    def stage() -> None:
        start = time.perf_counter()
        try:
            staged["bytes"] = engine.stage_placement(version, placement)
        except Exception as e:  # noqa: BLE001 - reported, and every rank aborts
            staged["error"] = f"{type(e).__name__}: {e}"
        staged["stage_s"] = time.perf_counter() - start

    thread = threading.Thread(target=stage, name="eplb-stage")
    thread.start()
    record = run_phase(engine, seqs, first, steps)
    thread.join()
    failed = torch.tensor([int("error" in staged)])
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if failed.item():  # somebody could not stage: the old placement keeps serving everywhere
        engine.abort_placement(version)
    extra_ticks = 0
    while True:
        flag = torch.tensor([int(engine.is_resharding)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not flag.item():
            break
        engine.idle_tick()
        extra_ticks += 1
    return {**record, **staged, "extra_ticks": extra_ticks}


def plan(engine: Engine, ep: ExpertParallel, off: dict, max_moved: int) -> tuple[dict, float]:
    """Rank 0 plans from the window's counts summed over the ranks; every rank gets the plan."""
    layers = sorted(off["counts"])
    load = torch.tensor([off["counts"][i] for i in layers], dtype=torch.float64)
    dist.all_reduce(load)
    answer: list[object] = [None, 0.0]
    if ep.rank == 0:
        previous = torch.tensor([engine.placement[i] for i in layers]).numpy()
        start = time.perf_counter()
        new = rebalance(load.numpy(), ep.num_slots, 1, ep.num_ranks, previous, max_moved)
        answer = [{i: new[k].tolist() for k, i in enumerate(layers)}, time.perf_counter() - start]
    dist.broadcast_object_list(answer, src=0)
    return answer[0], answer[1]


def rank_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--num-ranks", type=int, required=True)
    ap.add_argument("--address", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--redundant", type=int, required=True, help="extra slots per rank")
    ap.add_argument("--max-moved-fraction", type=float, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--live-steps", type=int, required=True)
    ap.add_argument("--rounds", type=int, required=True, help="rounds of off, on and ideal")
    ap.add_argument("--block-steps", type=int, required=True, help="decode steps per block")
    ap.add_argument(
        "--sweep-steps", type=int, nargs=len(SWEEP), required=True, help="steps per SWEEP batch"
    )
    ap.add_argument("--prefill-reps", type=int, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--pin", action="store_true", help="pin rank R to core R (its own core)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.pin:
        os.sched_setaffinity(0, {args.rank % os.cpu_count()})
    config = ModelConfig.from_json(args.model_dir / "config.json")
    num_slots = config.n_routed_experts + args.redundant * args.num_ranks
    ep = ExpertParallel.join(
        args.address, args.rank, args.num_ranks, config.n_routed_experts, num_slots=num_slots
    )
    batch = BATCH // args.num_ranks
    sweep = {b // args.num_ranks: n for b, n in zip(SWEEP, args.sweep_steps, strict=True)}
    most = max(batch, *sweep)  # the batches share their sequences (each step rewrites its KV)
    steps = max(args.steps, args.live_steps, args.block_steps, *sweep.values())
    engine = Engine.load(
        args.model_dir,
        dtype=torch.float32,
        chunk_size=PREFILL_LEN,
        max_num_tokens=most * (CONTEXT + steps + 64) + PREFILL_LEN,
        ep=ep,
    )
    seqs = decode_context(engine, most, steps)
    g = torch.Generator().manual_seed(args.rank)
    first = torch.randint(0, config.vocab_size, (most,), generator=g).tolist()
    base = {i: moe.router.bias.clone() for i, moe in engine.model.moe_layers.items()}
    hot = hot_experts(ep)
    default = engine.placement
    max_moved = max(1, int(args.max_moved_fraction * num_slots))

    prompt = torch.randint(0, config.vocab_size, (PREFILL_LEN,), generator=g).tolist()

    def measure(steps: int) -> dict:
        return {
            **run_phase(engine, seqs[:batch], first[:batch], steps),
            "sweep": {
                str(b * args.num_ranks): run_phase(engine, seqs[:b], first[:b], n)
                for b, n in sweep.items()
            },
            "prefill": run_prefills(engine, prompt, args.prefill_reps),
        }

    for b in (batch, *sweep):
        run_phase(engine, seqs[:b], first[:b], 2)  # warm-up
    run_prefills(engine, prompt, 1)
    phases: dict[str, object] = {
        "ideal": run_phase(engine, seqs[:batch], first[:batch], args.steps)
    }
    set_skew(engine, base, hot, on=True)
    phases["off"] = run_phase(engine, seqs[:batch], first[:batch], args.steps)  # the plan's window
    placement, plan_s = plan(engine, ep, phases["off"], max_moved)
    stacks = {"off": layout(engine)}
    phases["live"] = live_phase(engine, 1, placement, seqs[:batch], first[:batch], args.live_steps)
    stacks["on"] = layout(engine)
    stacks["ideal"] = stacks["off"]
    rounds = []
    for r in range(args.rounds):  # interleaved, so that a drift of the box's speed cancels
        names = ORDER[r % len(ORDER) :] + ORDER[: r % len(ORDER)]
        blocks = {}
        for name in names:
            use_layout(engine, stacks[name])
            set_skew(engine, base, hot, on=name != "ideal")
            blocks[name] = measure(args.block_steps)
        rounds.append(blocks)
    phases["rounds"] = rounds
    use_layout(engine, stacks["on"])
    set_skew(engine, base, hot, on=True)
    phases["live_back"] = live_phase(
        engine, 2, default, seqs[:batch], first[:batch], args.live_steps
    )

    record = {
        "rank": args.rank,
        "phases": phases,
        "hot_experts": hot,
        "num_slots": num_slots,
        "max_moved": max_moved,
        "plan_s": plan_s,
        "default_placement": default,
        "placement": placement,
    }
    records: list[object] | None = [None] * args.num_ranks if args.rank == 0 else None
    dist.gather_object(record, records, dst=0)
    dist.destroy_process_group()
    if args.rank == 0:
        args.out.write_text(json.dumps(records))


if __name__ == "__main__":
    rank_main(sys.argv[1:])
