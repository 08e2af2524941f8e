"""Expert parallelism across two processes over gloo: the same logits and tokens as one rank.

Each rank is a subprocess (``ep_rank.py``) holding half of the routed experts; attention and
the shared expert run on each rank's own tokens. The single-rank engine in this process is the
reference: fp32 logits within 1e-4, greedy and seeded tokens identical.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.engine import Engine
from model.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[2]
RANK_SCRIPT = Path(__file__).with_name("ep_rank.py")
NUM_RANKS = 2


def _prompt(n: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(model_dir: Path, tmp_path: Path, num_slots: int = 0) -> list[dict]:
    address = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    outs = [tmp_path / f"rank{r}.pt" for r in range(NUM_RANKS)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(RANK_SCRIPT),
                str(r),
                str(NUM_RANKS),
                address,
                str(model_dir),
                str(outs[r]),
                str(num_slots),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for r in range(NUM_RANKS)
    ]
    try:
        for p in procs:
            output, _ = p.communicate(timeout=240)
            assert p.returncode == 0, output[-3000:]
    finally:  # a rank left waiting on a collective must not outlive the test
        for p in procs:
            p.kill()
    return [torch.load(o) for o in outs]


@pytest.mark.parametrize("preset_dir", ["tiny_model_dir", "dsv3_tiny_model_dir"])
def test_two_ranks_match_one_rank(preset_dir, request, tmp_path):
    model_dir = request.getfixturevalue(preset_dir)
    ranks = run_ranks(model_dir, tmp_path)
    ref = Engine.load(model_dir, dtype=torch.float32, max_num_tokens=2048, chunk_size=16)
    vocab = ref.config.vocab_size
    num_experts = ref.config.n_routed_experts
    # the experts are split in contiguous halves, nothing held twice
    assert ranks[0]["experts"] + ranks[1]["experts"] == list(range(num_experts))

    def close(got: torch.Tensor, want: torch.Tensor) -> None:
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-4

    same = ref.prefill_logits(_prompt(40, 1, vocab))
    for r in ranks:
        close(r["same"], same)
    close(ranks[0]["alone"], ref.prefill_logits(_prompt(37, 2, vocab)))
    assert "alone" not in ranks[1]
    for rank, r in enumerate(ranks):
        close(r["own"], ref.prefill_logits(_prompt(10 + 30 * rank, 3 + rank, vocab)))
        prompts = [_prompt(5 + rank, 10 + rank, vocab), _prompt(12, 20 + rank, vocab)]
        assert r["greedy"] == ref.generate(prompts, 6)
        assert r["seeded"] == ref.generate(prompts, 6, SamplingParams(temperature=0.8, seed=3))
    # each rank counts the routing of its own tokens, over every global expert
    for r in ranks:
        assert all(c.numel() == num_experts and c.sum() > 0 for c in r["counts"].values())
    # the collectives' timers ran (seconds in all-to-alls, in tick all-reduces)
    assert all(comm > 0 and tick > 0 for comm, tick in (r["timers"] for r in ranks))


def test_rebalance_moves_experts_between_ranks_without_changing_tokens(tiny_model_dir, tmp_path):
    """8 experts in 10 slots over 2 ranks (one redundant slot each). A placement staged from a
    broken checkpoint fails and leaves the old one serving; a placement that moves every expert
    to the other rank is swapped in layer by layer during a generate: greedy tokens are the
    same before, during and after."""
    ranks = run_ranks(tiny_model_dir, tmp_path, num_slots=10)
    ref = Engine.load(tiny_model_dir, dtype=torch.float32, max_num_tokens=2048, chunk_size=16)
    vocab = ref.config.vocab_size
    for rank, r in enumerate(ranks):
        prompts = [_prompt(5 + rank, 10 + rank, vocab), _prompt(12, 20 + rank, vocab)]
        expected = ref.generate(prompts, 6)
        assert r["greedy"] == expected  # with redundant replicas from the start
        assert "broken_staged" not in r and "WeightsError" in r["broken_error"]
        assert r["after_failure"] == r["placement_before"]
        assert r["during"] == expected and r["after"] == expected
        before, after = r["placement_before"], r["placement_after"]
        assert after != before and all(sorted(after[i]) == sorted(before[i]) for i in before)
        assert r["bytes_read"] > 0  # experts new to the rank came from the checkpoint
    assert ranks[0]["placement_after"] == ranks[1]["placement_after"]
