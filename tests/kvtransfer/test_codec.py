"""FP8 latent codec and the model fingerprint (pure torch, no gRPC)."""

from __future__ import annotations

import torch
from kvt_helpers import KV_LORA_RANK, ROPE_DIM, make_config

from kvtransfer import KVLayout, convert_records, model_fingerprint
from model.kv_cache import KVFormat, PagedLatentCache


def _records(fmt: str, n: int = 40, seed: int = 0) -> tuple[PagedLatentCache, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cache = PagedLatentCache(1, KV_LORA_RANK, ROPE_DIM, 8, 16, fmt)
    c_kv = torch.randn(n, KV_LORA_RANK, generator=g) * torch.logspace(-3, 2, n).unsqueeze(1)
    k_pe = torch.randn(n, ROPE_DIM, generator=g)
    return cache, cache.pack(c_kv, k_pe)


def test_same_format_is_the_same_tensor() -> None:
    cache, rec = _records("bf16")
    assert convert_records(rec, KVLayout.of(cache), "bf16") is rec


def test_bf16_to_fp32_and_back_is_exact() -> None:
    cache, rec = _records("bf16")
    layout = KVLayout.of(cache)
    wide = convert_records(rec, layout, "fp32")
    assert wide.shape == (40, layout.with_format("fp32").bytes_per_token)
    assert torch.equal(convert_records(wide, layout.with_format("fp32"), "bf16"), rec)


def test_fp8_matches_the_cache_packing_and_keeps_k_pe_bits() -> None:
    bf16, rec = _records("bf16")
    fp8 = PagedLatentCache(1, KV_LORA_RANK, ROPE_DIM, 8, 16, "fp8")
    q = convert_records(rec, KVLayout.of(bf16), "fp8")
    c_kv, k_pe = bf16.unpack(rec)
    assert torch.equal(q, fp8.pack(c_kv, k_pe))  # same bytes as an fp8 cache would store
    back = convert_records(q, KVLayout.of(fp8), "bf16")
    c_back, pe_back = bf16.unpack(back)
    assert torch.equal(pe_back, k_pe)  # k_pe untouched
    # per-group bound: e4m3 relative step 2^-3, half of it by rounding, of the group absmax
    # (bf16 rounding on the way back adds 2^-8 relative)
    bound = c_kv.abs().amax(dim=-1, keepdim=True) * (1 / 16 + 1 / 256)
    assert ((c_back - c_kv).abs() <= bound).all()
    assert (c_back - c_kv).abs().max() > 0  # it is lossy: the tolerance is what is tested


def test_fingerprint_is_stable_and_sensitive() -> None:
    cfg = make_config()
    fp = model_fingerprint(cfg, "bf16")
    assert fp == model_fingerprint(make_config(), KVFormat.BF16)
    others = {
        model_fingerprint(cfg, "fp8"),
        model_fingerprint(cfg, "fp32"),
        model_fingerprint(make_config(rope_theta=20000.0), "bf16"),
        model_fingerprint(make_config(num_hidden_layers=4), "bf16"),
        model_fingerprint(make_config(model_type="deepseek_v3"), "bf16"),
    }
    assert fp not in others and len(others) == 5
