"""One expert-parallel rank for tests/model/test_expert_parallel.py (run as a subprocess).

    python ep_rank.py RANK NUM_RANKS ADDRESS MODEL_DIR OUT.pt [NUM_SLOTS]

Joins the gloo group at ADDRESS, loads its block of the experts, and runs the scenario below;
writes the logits it computed to OUT.pt. Each part ends with both ranks draining idle ticks, so
ranks with different amounts of work (different chunk counts, none at all) stay in lockstep.
"""

from __future__ import annotations

import sys

import torch

from model.engine import Engine
from model.parallel import ExpertParallel
from model.sampling import SamplingParams


def prompt(n: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def drain(engine: Engine) -> None:
    """Idle ticks until no rank runs a forward."""
    while engine.idle_tick():
        pass


def main() -> None:
    rank, num_ranks, address, model_dir, out = sys.argv[1:6]
    rank, num_ranks = int(rank), int(num_ranks)
    num_slots = int(sys.argv[6]) if len(sys.argv) > 6 else 0
    torch.set_num_threads(1)
    config_experts = Engine.load(model_dir, max_num_tokens=16).config.n_routed_experts
    ep = ExpertParallel.join(
        address, rank, num_ranks, config_experts, timeout_s=60, num_slots=num_slots
    )
    engine = Engine.load(model_dir, dtype=torch.float32, max_num_tokens=2048, chunk_size=16, ep=ep)
    vocab = engine.config.vocab_size
    results: dict[str, object] = {"experts": ep.local_experts}
    # 1. the same prompt on every rank
    results["same"] = engine.prefill_logits(prompt(40, 1, vocab))
    drain(engine)
    # 2. only rank 0 works (3 chunks); the others run empty forwards
    if rank == 0:
        results["alone"] = engine.prefill_logits(prompt(37, 2, vocab))
    drain(engine)
    # 3. different prompts, different chunk counts per rank
    results["own"] = engine.prefill_logits(prompt(10 + 30 * rank, 3 + rank, vocab))
    drain(engine)
    # 4. batched decode of rank-specific prompts (greedy and seeded)
    prompts = [prompt(5 + rank, 10 + rank, vocab), prompt(12, 20 + rank, vocab)]
    results["greedy"] = engine.generate(prompts, 6)
    drain(engine)
    results["seeded"] = engine.generate(prompts, 6, SamplingParams(temperature=0.8, seed=3))
    drain(engine)
    results["counts"] = {i: c.clone() for i, c in engine.expert_counts.items()}
    if num_slots:
        rebalance(engine, results, prompts, model_dir)
    results["timers"] = (ep.comm_seconds, ep.tick_seconds)
    torch.save(results, out)


def rebalance(engine: Engine, results: dict, prompts: list[list[int]], model_dir: str) -> None:
    """5. a staged placement whose weight source fails: nothing changes; 6. a placement that
    moves every expert to the other rank, with redundant replicas, swapped in one layer per tick
    while a generate runs; then generate again."""
    import shutil
    import tempfile

    ep = engine.ep
    before = engine.placement
    results["placement_before"] = before
    broken = tempfile.mkdtemp()  # a checkpoint without its weight files
    shutil.copy(f"{model_dir}/config.json", broken)
    source = engine._source
    engine._source = (type(source[0])(broken), source[1])
    try:
        engine.stage_placement(1, {i: list(reversed(p)) for i, p in before.items()})
        results["broken_staged"] = True
    except Exception as e:
        results["broken_error"] = f"{type(e).__name__}: {e}"
    engine._source = source
    results["after_failure"] = engine.placement
    drain(engine)
    # every slot of rank r now holds what rank 1 - r held (experts move between ranks)
    spr = ep.slots_per_rank
    moved = {i: p[spr:] + p[:spr] for i, p in before.items()}
    results["bytes_read"] = engine.stage_placement(2, moved)
    results["during"] = engine.generate(prompts, 6)  # the swap happens at its ticks
    drain(engine)
    results["placement_after"] = engine.placement
    results["after"] = engine.generate(prompts, 6)
    drain(engine)


if __name__ == "__main__":
    main()
