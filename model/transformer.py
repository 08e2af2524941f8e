"""The decoder stack: embeddings, MLA + (dense MLP | MoE) layers, final norm, LM head.

Built from a dict of HF-named weights (``model.weights.load_weights``: tensors, and ``Fp8Weight``
for the linears of a block-FP8 checkpoint kept in FP8). Two entry points
mirror the two attention paths: ``prefill`` runs a chunk of one sequence, ``decode`` one token
for each sequence of a batch. Both write the layer's latent KV before attending.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator

import torch

from model.config import ModelConfig
from model.kv_cache import PagedLatentCache
from model.layers import MLP, linear, rms_norm
from model.mla import MLA
from model.moe import MoE
from model.parallel import ExpertParallel
from model.rope import RotaryEmbedding
from model.weights import Weight


class DecoderLayer:
    """Pre-norm residual block: x + attn(norm(x)), then h + ffn(norm(h))."""

    def __init__(
        self,
        config: ModelConfig,
        state: dict[str, Weight],
        idx: int,
        rope: RotaryEmbedding,
        expert_ids: list[int] | None,
        ep: ExpertParallel | None,
    ) -> None:
        p = f"model.layers.{idx}"
        self.eps = config.rms_norm_eps
        self.input_norm = state[f"{p}.input_layernorm.weight"]
        self.post_attn_norm = state[f"{p}.post_attention_layernorm.weight"]
        self.attn = MLA(config, state, f"{p}.self_attn", rope)
        self.ffn: MLP | MoE = (
            MoE(config, state, f"{p}.mlp", expert_ids, ep)
            if config.is_moe_layer(idx)
            else MLP.from_state(state, f"{p}.mlp")
        )

    def weights(self) -> Iterator[Weight]:
        yield from (self.input_norm, self.post_attn_norm)
        yield from self.attn.weights()
        yield from self.ffn.weights()

    def _ffn(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.ffn(rms_norm(h, self.post_attn_norm, self.eps))


class Transformer:
    """The whole model as plain tensors (no nn.Module): forward passes over the paged cache."""

    def __init__(
        self,
        config: ModelConfig,
        state: dict[str, Weight],
        device: torch.device | str = "cpu",
        expert_ids: list[int] | None = None,
        ep: ExpertParallel | None = None,
    ) -> None:
        self.config = config
        self.rope = RotaryEmbedding(config, device)
        self.embed = state["model.embed_tokens.weight"]  # [V, H]
        self.layers = [
            DecoderLayer(config, state, i, self.rope, expert_ids, ep)
            for i in range(config.num_hidden_layers)
        ]
        self.norm = state["model.norm.weight"]
        self.lm_head = state["lm_head.weight"]  # [V, H]
        self.device = torch.device(device)

    def weights(self) -> Iterator[Weight]:
        """Every weight the model holds (views and tied weights may repeat a storage)."""
        yield from (self.embed, self.norm, self.lm_head)
        for layer in self.layers:
            yield from layer.weights()

    @property
    def moe_layers(self) -> dict[int, MoE]:
        return {i: layer.ffn for i, layer in enumerate(self.layers) if isinstance(layer.ffn, MoE)}

    def empty_forward(self, dtype: torch.dtype) -> None:
        """An expert-parallel rank's share of a tick it has no tokens for: every MoE layer's
        collectives, in layer order, with zero tokens (attention and dense layers are local)."""
        empty = torch.zeros(0, self.config.hidden_size, dtype=dtype, device=self.device)
        for moe in self.moe_layers.values():
            moe(empty)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head; h [T, H] -> fp32 [T, V]."""
        return linear(rms_norm(h, self.norm, self.config.rms_norm_eps), self.lm_head).float()

    def prefill(
        self,
        token_ids: torch.Tensor,
        cache: PagedLatentCache,
        seq_id: Hashable,
        start: int,
        on_layer: Callable[[int, int, int], None] | None = None,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """One chunk token_ids [T] at positions [start, start+T) -> logits [T, V] or [1, V]."""
        t = token_ids.shape[0]
        positions = torch.arange(start, start + t, device=self.device)
        h = self.embed[token_ids]  # [T, H]
        for i, layer in enumerate(self.layers):
            x = rms_norm(h, layer.input_norm, layer.eps)
            h = h + layer.attn.prefill(x, positions, cache, i, seq_id, start)
            if on_layer is not None:
                on_layer(i, start, start + t)
            h = layer._ffn(h)
        return self.logits(h if all_logits else h[-1:])

    def decode(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: PagedLatentCache,
        slots: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
    ) -> torch.Tensor:
        """One token per sequence: token_ids/positions/slots [B] -> logits fp32 [B, V]."""
        h = self.embed[token_ids]  # [B, H]
        for i, layer in enumerate(self.layers):
            x = rms_norm(h, layer.input_norm, layer.eps)
            h = h + layer.attn.decode(x, positions, cache, i, slots, block_tables, seq_lens)
            h = layer._ffn(h)
        return self.logits(h)
