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

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.layers import MLP, linear
from model.parallel import ExpertParallel
from model.weights import Fp8Weight, Weight, cat_weights, stack_weights


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
        self.ep = ep
        self.prefix = prefix
        self.router = Router(
            config, state[f"{prefix}.gate.weight"], state[f"{prefix}.gate.e_score_correction_bias"]
        )
        dev = self.router.weight.device
        self.inter = config.moe_intermediate_size
        if ep is not None:  # this rank's slots of the instance's placement
            placement = ep.initial_placement()
            self.install(placement, *expert_stacks(state, prefix, self._slot_experts(placement)))
        else:
            self.expert_ids = list(range(n)) if expert_ids is None else sorted(expert_ids)
            # global expert id -> local slot (-1: not held here)
            self.slot_of = torch.full((n,), -1, dtype=torch.long, device=dev)
            ids = torch.tensor(self.expert_ids, dtype=torch.long, device=dev)
            self.slot_of[ids] = torch.arange(len(self.expert_ids), device=dev)
            self.gate_up, self.down = expert_stacks(state, prefix, self.expert_ids)
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

    # ---- expert parallelism: slots and placement ------------------------------------------------
    def _slot_experts(self, placement: list[int]) -> list[int]:
        """The logical experts of this rank's slots, in slot order."""
        assert self.ep is not None
        return [placement[s] for s in self.ep.local_slots]

    def install(self, placement: list[int], gate_up: Weight, down: Weight) -> None:
        """Serve ``placement`` (global slot -> logical expert, [num_slots]) with this rank's
        slots' weights ``gate_up`` [slots, 2I, H] and ``down`` [slots, H, I]. Called on the step
        thread between forwards, on every rank at the same tick."""
        ep = self.ep
        assert ep is not None and len(placement) == ep.num_slots
        dev = self.router.weight.device
        n = ep.num_experts
        replicas: list[list[int]] = [[] for _ in range(n)]
        for slot, e in enumerate(placement):
            replicas[e].append(slot)
        missing = [e for e in range(n) if not replicas[e]]
        assert not missing, f"placement leaves experts {missing[:8]} without a replica"
        width = max(len(r) for r in replicas)
        local_slot_of = torch.full((n,), -1, dtype=torch.long, device=dev)
        for slot in reversed(ep.local_slots):
            local_slot_of[placement[slot]] = slot
        self.placement = list(placement)
        self.expert_ids = self._slot_experts(placement)
        # logical expert -> its replicas' global slots (padded by repeating) and how many
        self.replica_slots = torch.tensor(
            [r + r[:1] * (width - len(r)) for r in replicas], dtype=torch.long, device=dev
        )
        self.num_replicas = torch.tensor([len(r) for r in replicas], device=dev)
        self.local_slot_of = local_slot_of  # logical expert -> a slot on this rank, or -1
        self.gate_up, self.down = gate_up, down

    def stage(
        self,
        placement: list[int],
        load: Callable[[list[int]], dict[str, Weight]],
        pause: Callable[[], None] = lambda: None,
    ) -> tuple[Weight, Weight]:
        """New slot weights for ``placement`` (off the step thread), as ``install`` takes them:
        experts this rank already holds are copied, the others come from ``load(expert_ids)``
        (HF-named tensors, or an expert's fused ``<expert>.gate_up`` / ``.down``). The new
        stacks are filled one expert weight at a time with ``pause()`` after each copy, so
        that staging never takes a long stretch of the cores or memory bandwidth from the
        steps. A rank whose slots keep their experts gets its served stacks back (no copy)."""
        wanted = self._slot_experts(placement)
        if wanted == self.expert_ids:
            return self.gate_up, self.down
        held = {e: i for i, e in enumerate(self.expert_ids)}
        state = load(sorted({e for e in wanted if e not in held}))
        gate_up, down = _empty_like(self.gate_up), _empty_like(self.down)
        for slot, e in enumerate(wanted):
            if e in held:
                parts = self.gate_up[held[e]], self.down[held[e]]
            else:
                parts = fused_expert(state, self.prefix, e)
            for stack, w in zip((gate_up, down), parts, strict=True):
                _copy_into(stack, slot, w)
                pause()
        return gate_up, down

    def _pick_slots(self, expert: torch.Tensor) -> torch.Tensor:
        """One replica per assignment: the local one if this rank has it, else the replicas in
        turn (assignment index modulo their count); expert [A] -> global slots [A]."""
        local = self.local_slot_of[expert]
        turn = torch.arange(expert.numel(), device=expert.device) % self.num_replicas[expert]
        return torch.where(local >= 0, local, self.replica_slots[expert, turn])

    def dispatched(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The expert-parallel ``routed``: every rank calls it once per MoE layer per tick, with
        its own tokens (possibly none); x [T, H] -> [T, H]."""
        assert self.ep is not None
        t, k = ids.shape
        slot = self._pick_slots(ids.reshape(-1))  # [T*k] global slots
        token = torch.arange(t, device=x.device).repeat_interleave(k)  # [T*k]
        w = weights.reshape(-1)
        dest = self.ep.owner(slot)
        order = torch.argsort(dest, stable=True)  # rows grouped by the rank they go to
        slot, token, w, dest = slot[order], token[order], w[order], dest[order]
        send_counts = torch.bincount(dest, minlength=self.ep.num_ranks)  # [R]
        rows, recv_slot, recv_counts = self.ep.dispatch(x.index_select(0, token), slot, send_counts)
        results = self._experts(rows, recv_slot - self.ep.local_slots.start)  # [A', H]
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


def fused_expert(state: dict[str, Weight], prefix: str, e: int) -> tuple[Weight, Weight]:
    """Expert ``e``'s gate_up [2I, H] (gate and up fused into one matmul) and down [H, I] from
    ``state``: HF names, or the expert's already fused ``<expert>.gate_up`` / ``.down``."""
    q = f"{prefix}.experts.{e}"
    if f"{q}.gate_up" in state:
        return state[f"{q}.gate_up"], state[f"{q}.down"]
    gate_up = cat_weights([state[f"{q}.gate_proj.weight"], state[f"{q}.up_proj.weight"]])
    return gate_up, state[f"{q}.down_proj.weight"]


def expert_stacks(
    state: dict[str, Weight], prefix: str, expert_ids: list[int]
) -> tuple[Weight, Weight]:
    """The experts' weights (``fused_expert``) stacked in ``expert_ids`` order: gate_up
    [E, 2I, H] and down [E, H, I]."""
    gate_up, down = [], []
    for e in expert_ids:
        g, d = fused_expert(state, prefix, e)
        gate_up.append(g)
        down.append(d)
    return stack_weights(gate_up), stack_weights(down)


def _empty_like(stack: Weight) -> Weight:
    if isinstance(stack, Fp8Weight):
        return Fp8Weight(torch.empty_like(stack.q), torch.empty_like(stack.scale_inv), stack.block)
    return torch.empty_like(stack)


def _copy_into(stack: Weight, i: int, w: Weight) -> None:
    """``stack[i] = w`` (one expert's weight into a stack of the same kind)."""
    if isinstance(stack, Fp8Weight):
        assert isinstance(w, Fp8Weight) and w.block == stack.block, (
            f"cannot copy {type(w).__name__} into an FP8 stack of block {stack.block}"
        )
        stack.q[i].copy_(w.q)
        stack.scale_inv[i].copy_(w.scale_inv)
    else:
        stack[i].copy_(w)
