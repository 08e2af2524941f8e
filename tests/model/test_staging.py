"""Staging a new expert placement piece by piece (``MoE.stage``) and pacing it (``_Pacer``)."""

from __future__ import annotations

import pytest
import torch

import model.engine as engine_module
from model.config import ModelConfig
from model.moe import MoE, expert_stacks
from model.parallel import ExpertParallel
from model.weights import Fp8Weight, load_weights


def _parts(w) -> list[torch.Tensor]:
    return [w.q.float(), w.scale_inv] if isinstance(w, Fp8Weight) else [w]


@pytest.mark.parametrize("fp8", [False, True])
def test_stage_fills_the_new_stacks_one_weight_at_a_time(fp8, tiny_model_dir, tiny_fp8_model_dir):
    """Rank 0 of 2 (one redundant slot each) stages a placement that gives it other experts:
    the new stacks hold exactly the wanted experts' weights (held ones copied, others loaded),
    the served stacks are untouched, and ``pause`` follows every copy. A placement that keeps
    the rank's slots returns the served stacks themselves."""
    model_dir = tiny_fp8_model_dir if fp8 else tiny_model_dir
    config = ModelConfig.from_json(model_dir / "config.json")
    n = config.n_routed_experts
    state = load_weights(model_dir, config)
    layer = config.first_k_dense_replace
    prefix = f"model.layers.{layer}.mlp"
    ep = ExpertParallel(rank=0, num_ranks=2, num_experts=n, num_slots=n + 2)
    moe = MoE(config, state, prefix, ep=ep)
    served = moe.gate_up, moe.down
    before = [t.clone() for w in served for t in _parts(w)]
    assert isinstance(moe.gate_up, Fp8Weight) == fp8

    placement = moe.placement[ep.slots_per_rank :] + moe.placement[: ep.slots_per_rank]
    asked: list[list[int]] = []

    def load(expert_ids: list[int]):
        asked.append(expert_ids)
        return state

    pauses = []
    gate_up, down = moe.stage(placement, load, lambda: pauses.append(1))
    wanted = placement[: ep.slots_per_rank]
    assert asked == [sorted(set(wanted) - set(moe.expert_ids))]
    assert len(pauses) == 2 * len(wanted)
    for got, want in zip((gate_up, down), expert_stacks(state, prefix, wanted), strict=True):
        for a, b in zip(_parts(got), _parts(want), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    after = [t for w in served for t in _parts(w)]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))

    same = moe.stage(list(moe.placement), load, lambda: pauses.append(1))
    assert same[0] is served[0] and same[1] is served[1]


def test_pacer_sleeps_so_that_work_takes_its_duty_of_the_time(monkeypatch):
    """After a piece of 0.5 CPU seconds, a pacer at duty 0.1 sleeps 4.5 s; at duty 1, never."""

    class Clock:
        now = 0.0
        slept: list[float] = []

        def thread_time(self) -> float:
            return self.now

        def sleep(self, s: float) -> None:
            self.slept.append(s)  # a sleeping thread uses no CPU time

    clock = Clock()
    monkeypatch.setattr(engine_module, "time", clock)
    for duty, want in ((0.1, [4.5]), (1.0, [])):
        clock.slept.clear()
        clock.now = 0.0  # a fresh thread
        pace = engine_module._Pacer(duty)
        clock.now += 0.5  # a piece of work
        pace()
        assert clock.slept == pytest.approx(want)
