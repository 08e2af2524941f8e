"""Helpers of the kvtransfer tests: a small latent cache, a model config, raw frames."""

from __future__ import annotations

import itertools

import torch

from kvtransfer import KVLayout, KVSender, TransferConfig, export_records, model_fingerprint
from model.config import ModelConfig
from model.kv_cache import PagedLatentCache

NUM_LAYERS = 3
KV_LORA_RANK = 128  # one fp8 scale group per token
ROPE_DIM = 16
PAGE_SIZE = 16
NUM_PAGES = 256

# short deadlines so every fault resolves in about a second
FAST = TransferConfig(
    chunk_bytes=64 * 1024,
    max_inflight_bytes=256 * 1024,
    idle_timeout_s=2.0,
    progress_lease_s=5.0,
    connect_timeout_s=2.0,
    lease_s=5.0,
    max_workers=40,
)

_ids = itertools.count()


def make_config(**overrides: object) -> ModelConfig:
    raw = {
        "model_type": "kimi_k2",
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": 2,
        "q_lora_rank": 32,
        "kv_lora_rank": KV_LORA_RANK,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": ROPE_DIM,
        "v_head_dim": 16,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 4096,
    }
    raw.update(overrides)
    return ModelConfig.from_dict(raw)


def make_cache(fmt: str = "bf16", num_pages: int = NUM_PAGES) -> PagedLatentCache:
    return PagedLatentCache(NUM_LAYERS, KV_LORA_RANK, ROPE_DIM, num_pages, PAGE_SIZE, fmt)


def fill(cache: PagedLatentCache, seq_id: object, num_tokens: int, seed: int = 0) -> None:
    """Allocate and write random latent KV for every layer of a sequence."""
    g = torch.Generator().manual_seed(seed)
    cache.allocator.allocate(seq_id, num_tokens)
    for layer in range(cache.num_layers):
        c_kv = torch.randn(num_tokens, KV_LORA_RANK, generator=g)
        k_pe = torch.randn(num_tokens, ROPE_DIM, generator=g)
        cache.write(seq_id, layer, 0, c_kv, k_pe)


def new_id(prefix: str = "t") -> str:
    return f"{prefix}-{next(_ids)}"


def send_all(
    sender: KVSender,
    cache: PagedLatentCache,
    seq_id: object,
    request_id: object,
    num_tokens: int,
    wire_fmt: str | None = None,
    tokens_per_call: int | None = None,
):
    """begin / send_layer per layer (optionally per token range) / end."""
    sender.begin(new_id(), request_id, num_tokens, cache.num_layers, KVLayout.of(cache), wire_fmt)
    step = tokens_per_call or num_tokens
    for start in range(0, num_tokens, step):  # chunked prefill order: chunk x layer
        end = min(start + step, num_tokens)
        for layer in range(cache.num_layers):
            sender.send_layer(layer, start, end, export_records(cache, seq_id, layer, start, end))
    return sender.end()


def raw_exchange(address: str, frames: list[bytes], timeout_s: float = 5.0) -> list:
    """Send hand-made frames on one stream; returns the receiver's decoded status frames."""
    import grpc

    from kvtransfer import wire

    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream(wire.FULL_METHOD)(iter(frames), timeout=timeout_s)
        return [wire.decode(raw) for raw in call]


def open_frame(
    config: ModelConfig, request_id: object, num_tokens: int, **overrides: object
) -> bytes:
    """A valid bf16 open frame for the conftest cache shape, with fields overridden."""
    from kvtransfer import wire
    from model.kv_cache import bytes_per_token

    bpt = bytes_per_token("bf16", KV_LORA_RANK, ROPE_DIM)
    fields = dict(
        transfer_id=new_id("raw"),
        request_id=request_id,
        fingerprint=model_fingerprint(config, "bf16"),
        fmt="bf16",
        num_layers=NUM_LAYERS,
        num_tokens=num_tokens,
        bytes_per_token=bpt,
        page_size=PAGE_SIZE,
        total_bytes=NUM_LAYERS * num_tokens * bpt,
    )
    fields.update(overrides)
    return wire.encode(wire.OpenMsg(**fields))
