"""Model fingerprint: which model, config and KV format a block of latent KV belongs to."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from model.config import ModelConfig
from model.kv_cache import FP8_GROUP, KVFormat, bytes_per_token

KV_LAYOUT_VERSION = 1  # bump when the packed record layout in model/kv_cache.py changes


def model_fingerprint(config: ModelConfig, kv_format: KVFormat | str) -> str:
    """Stable hex digest of ``config.fingerprint_fields()`` plus the packed KV record layout.

    Two processes agree on the fingerprint iff their KV bytes mean the same thing: same model
    numbers, same record format (fp32 / bf16 / fp8 with 128-value scale groups).
    """
    fmt = KVFormat(kv_format)
    layout: dict[str, Any] = {
        "format": fmt.value,
        "layout_version": KV_LAYOUT_VERSION,
        "bytes_per_token": bytes_per_token(fmt, config.kv_lora_rank, config.qk_rope_head_dim),
        "fp8_group": FP8_GROUP if fmt is KVFormat.FP8 else 0,
    }
    blob = json.dumps(
        {"config": config.fingerprint_fields(), "kv": layout}, sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def accepted_fingerprints(config: ModelConfig, formats: Iterable[KVFormat | str]) -> dict[str, str]:
    """``{wire format: fingerprint}`` for a receiver that converts several formats on arrival."""
    return {KVFormat(f).value: model_fingerprint(config, f) for f in formats}
