"""One expert-parallel rank for tests/model/test_expert_parallel.py (run as a subprocess).

    python ep_rank.py RANK NUM_RANKS ADDRESS MODEL_DIR OUT.pt

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
    torch.set_num_threads(1)
    config_experts = Engine.load(model_dir, max_num_tokens=16).config.n_routed_experts
    ep = ExpertParallel.join(address, rank, num_ranks, config_experts, timeout_s=60)
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
    results["timers"] = (ep.comm_seconds, ep.tick_seconds)
    torch.save(results, out)


if __name__ == "__main__":
    main()
