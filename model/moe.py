"""Mixture of experts with DeepSeek-V3's sigmoid router (``noaux_tc``) and grouped execution.

Routing (fp32): ``s = sigmoid(x @ W_gate^T)``; selection ranks ``s + e_score_correction_bias``,
first keeping the ``topk_group`` best of ``n_group`` expert groups (a group scores the sum of its
two best biased scores), then the ``num_experts_per_tok`` best experts inside them. The weights
are the *unbiased* scores of the chosen experts, normalised to sum 1 if ``norm_topk_prob``,
times ``routed_scaling_factor``. The shared experts see every token.

Execution sorts the (token, expert) assignments by expert and runs each local expert once on
all its tokens, with the expert weights stacked into ``[E_local, ...]`` tensors. With expert
parallelism (``ep``, model/parallel.py) a rank holds a block of the routed experts: each
assignment travels to the rank owning its expert (``dispatch``), is computed there, and comes
back (``combine``) to be weighted and summed on the token's own rank. Without ``ep`` a subset
(``expert_ids``) leaves other experts' assignments out. ``counts`` accumulates how many of this
rank's tokens every (global) expert was chosen for, for EPLB.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.layers import MLP, linear
from model.parallel import ExpertParallel
from model.weights import Weight, cat_weights, stack_weights


class Router:
    """Sigmoid scores + bias-corrected group-limited top-k."""

    def __init__(self, config: ModelConfig, weight: torch.Tensor, bias: torch.Tensor) -> None:
        self.weight = weight.float()  # [E, H]
        self.bias = bias.float()  # [E]
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights fp32 [T, k], expert ids long [T, k])."""
        t, e = x.shape[0], self.weight.shape[0]
        scores = linear(x.float(), self.weight).sigmoid()  # [T, E]
        biased = scores + self.bias  # [T, E], used only to choose
        if self.n_group > 1 and self.topk_group < self.n_group:
            grouped = biased.view(t, self.n_group, e // self.n_group)  # [T, G, E/G]
            group_score = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
            keep_group = group_score.topk(self.topk_group, dim=-1).indices  # [T, topk_group]
            group_mask = torch.zeros_like(group_score, dtype=torch.bool)
            group_mask.scatter_(1, keep_group, True)
            expert_mask = group_mask.repeat_interleave(e // self.n_group, dim=1)  # [T, E]
            biased = biased.masked_fill(~expert_mask, float("-inf"))
        ids = biased.topk(self.top_k, dim=-1).indices  # [T, k]
        weights = scores.gather(1, ids)  # [T, k] unbiased
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, ids


class MoE:
    """Routed experts (local subset, grouped by expert) plus shared experts."""

    def __init__(
        self,
        config: ModelConfig,
        state: dict[str, Weight],
        prefix: str,
        expert_ids: list[int] | None = None,
        ep: ExpertParallel | None = None,
    ) -> None:
        n = config.n_routed_experts
        if ep is not None:
            expert_ids = ep.local_experts
        self.ep = ep
        self.expert_ids = list(range(n)) if expert_ids is None else sorted(expert_ids)
        self.router = Router(
            config, state[f"{prefix}.gate.weight"], state[f"{prefix}.gate.e_score_correction_bias"]
        )
        dev = self.router.weight.device
        # global expert id -> local slot (-1: another rank's expert)
        self.slot_of = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.slot_of[torch.tensor(self.expert_ids, dtype=torch.long, device=dev)] = torch.arange(
            len(self.expert_ids), device=dev
        )
        p = [f"{prefix}.experts.{e}" for e in self.expert_ids]
        self.inter = config.moe_intermediate_size
        gate_up = [
            cat_weights([state[f"{q}.gate_proj.weight"], state[f"{q}.up_proj.weight"]]) for q in p
        ]
        self.gate_up = stack_weights(gate_up)  # [E_local, 2I, H]
        self.down = stack_weights([state[f"{q}.down_proj.weight"] for q in p])  # [E_local, H, I]
        self.shared = (
            MLP.from_state(state, f"{prefix}.shared_experts") if config.n_shared_experts else None
        )
        self.counts = torch.zeros(
            n, dtype=torch.long, device=dev
        )  # tokens routed per global expert

    def routed(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Sum over the local chosen experts of weight * expert(x); x [T, H] -> [T, H]."""
        t, k = ids.shape
        slots = self.slot_of[ids].reshape(-1)  # [T*k]
        token = torch.arange(t, device=x.device).repeat_interleave(k)  # [T*k]
        w = weights.reshape(-1)
        if len(self.expert_ids) != self.slot_of.numel():  # drop other ranks' experts
            local = slots >= 0
            slots, token, w = slots[local], token[local], w[local]
        ys = self._experts(x.index_select(0, token), slots)  # [A, H]
        ys.mul_(w.to(ys.dtype).unsqueeze(-1))
        out = torch.zeros_like(x)
        out.index_add_(0, token, ys)
        return out

    def dispatched(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The expert-parallel ``routed``: every rank calls it once per MoE layer per tick, with
        its own tokens (possibly none); x [T, H] -> [T, H]."""
        assert self.ep is not None
        t, k = ids.shape
        expert = ids.reshape(-1)  # [T*k] global expert ids
        token = torch.arange(t, device=x.device).repeat_interleave(k)  # [T*k]
        w = weights.reshape(-1)
        dest = self.ep.owner(expert)
        order = torch.argsort(dest, stable=True)  # rows grouped by the rank they go to
        expert, token, w, dest = expert[order], token[order], w[order], dest[order]
        send_counts = torch.bincount(dest, minlength=self.ep.num_ranks)  # [R]
        rows, recv_expert, recv_counts = self.ep.dispatch(
            x.index_select(0, token), expert, send_counts
        )
        results = self._experts(rows, self.slot_of[recv_expert])  # [A', H]
        ys = self.ep.combine(results, recv_counts, send_counts)  # [T*k, H] in `order`
        ys.mul_(w.to(ys.dtype).unsqueeze(-1))
        out = torch.zeros_like(x)
        out.index_add_(0, token, ys)
        return out

    def _experts(self, xs: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Row i of xs [A, H] through local expert slots[i] [A] -> [A, H] (grouped by expert:
        each expert's weights are read once)."""
        order = torch.argsort(slots, stable=True)
        per_expert = torch.bincount(slots, minlength=len(self.expert_ids)).tolist()
        grouped = xs.index_select(0, order)
        ys = torch.empty_like(grouped)
        start = 0
        for slot, n in enumerate(per_expert):
            if n == 0:
                continue
            end = start + n
            gate_up = linear(grouped[start:end], self.gate_up[slot])  # [n, 2I]
            gate, up = gate_up.split(self.inter, dim=-1)
            act = F.silu(gate).mul_(up)  # [n, I]
            ys[start:end] = linear(act, self.down[slot])  # [n, H]
            start = end
        out = torch.empty_like(ys)
        out[order] = ys
        return out

    def weights(self) -> Iterator[Weight]:
        yield from (self.router.weight, self.router.bias, self.gate_up, self.down)
        if self.shared is not None:
            yield from self.shared.weights()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.router(x)
        self.counts += torch.bincount(ids.reshape(-1), minlength=self.counts.numel())
        route = self.routed if self.ep is None else self.dispatched
        out = route(x, weights, ids)
        if self.shared is not None:
            out = out + self.shared(x)
        return out
