"""Model configuration, read once from an HF ``config.json``.

Supports the DeepSeek-V3 architecture as shipped by Kimi-K2 (``model_type`` ``kimi_k2``) and
DeepSeek-V3 (``deepseek_v3``). Everything derived (head dims, softmax scale with the YaRN
mscale, which layers are dense) is a property, so the dataclass stays the single source of truth.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("kimi_k2", "deepseek_v3")


class ConfigError(ValueError):
    """A config.json that tidal cannot serve; the message says what to fix."""


@dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters (``rope_scaling`` in config.json); ``factor == 1`` means plain RoPE."""

    type: str = "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    @property
    def is_yarn(self) -> bool:
        return self.type == "yarn" and self.factor > 1.0


def yarn_get_mscale(scale: float, mscale: float) -> float:
    """YaRN's attention temperature correction (0.1 * mscale * ln(scale) + 1)."""
    if scale <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class ModelConfig:
    """The numbers of one DeepSeek-V3-architecture model."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    first_k_dense_replace: int
    moe_layer_freq: int
    topk_method: str
    scoring_func: str
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str = "bfloat16"
    # Block-FP8 checkpoints: {"quant_method": "fp8", "weight_block_size": [128, 128], ...}
    quantization_config: dict[str, Any] | None = field(default=None, compare=False, hash=False)

    # ---- derived values -------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values cached per token per layer: the latent c_kv plus the rotated k_pe."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs is not None and rs.is_yarn and rs.mscale_all_dim:
            m = yarn_get_mscale(rs.factor, rs.mscale_all_dim)
            scale = scale * m * m
        return scale

    @property
    def max_model_len(self) -> int:
        return self.max_position_embeddings

    @property
    def is_fp8_checkpoint(self) -> bool:
        q = self.quantization_config or {}
        return q.get("quant_method") == "fp8"

    @property
    def fp8_block_size(self) -> tuple[int, int]:
        q = self.quantization_config or {}
        b = q.get("weight_block_size") or [128, 128]
        return int(b[0]), int(b[1])

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    def fingerprint_fields(self) -> dict[str, Any]:
        """The fields that decide the meaning of a KV cache (used by the transfer fingerprint)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "quantization_config"}
        if self.rope_scaling is not None:
            d["rope_scaling"] = self.rope_scaling.__dict__
        return d

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported; "
                f"tidal serves {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        topk_method = raw.get("topk_method", "noaux_tc")
        if topk_method != "noaux_tc":
            raise ConfigError(f"{source}: topk_method {topk_method!r} unsupported; use 'noaux_tc'")
        scoring = raw.get("scoring_func", "sigmoid")
        if scoring != "sigmoid":
            raise ConfigError(f"{source}: scoring_func {scoring!r} unsupported; use 'sigmoid'")
        # Newer transformers write ``rope_parameters`` (rope_theta and the scaling in one dict,
        # "default" when there is none) where older ones and the shipped K2/V3 configs write
        # ``rope_scaling`` and ``rope_theta``: read both.
        rope_params = raw.get("rope_parameters") or {}
        rs_raw = raw.get("rope_scaling")
        if rs_raw is None and rope_params.get("rope_type", "default") != "default":
            rs_raw = rope_params
        rope_theta = float(raw.get("rope_theta", rope_params.get("rope_theta", 10000.0)))
        rope_scaling = None
        if rs_raw:
            rs_type = rs_raw.get("type", rs_raw.get("rope_type"))
            if rs_type != "yarn":
                raise ConfigError(
                    f"{source}: rope_scaling type {rs_type!r} unsupported; use 'yarn'"
                )
            rope_scaling = RopeScaling(
                type="yarn",
                factor=float(rs_raw.get("factor", 1.0)),
                original_max_position_embeddings=int(
                    rs_raw.get("original_max_position_embeddings", 4096)
                ),
                beta_fast=float(rs_raw.get("beta_fast", 32.0)),
                beta_slow=float(rs_raw.get("beta_slow", 1.0)),
                mscale=float(rs_raw.get("mscale", 1.0)),
                mscale_all_dim=float(rs_raw.get("mscale_all_dim", 0.0)),
            )
        required = (
            "vocab_size hidden_size intermediate_size moe_intermediate_size num_hidden_layers "
            "num_attention_heads kv_lora_rank qk_nope_head_dim qk_rope_head_dim v_head_dim "
            "n_routed_experts num_experts_per_tok max_position_embeddings"
        ).split()
        missing = [k for k in required if k not in raw]
        if missing:
            raise ConfigError(f"{source}: missing required keys {missing}")
        cfg = cls(
            model_type=model_type,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            moe_intermediate_size=int(raw["moe_intermediate_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=int(raw["num_attention_heads"]),
            q_lora_rank=None if raw.get("q_lora_rank") is None else int(raw["q_lora_rank"]),
            kv_lora_rank=int(raw["kv_lora_rank"]),
            qk_nope_head_dim=int(raw["qk_nope_head_dim"]),
            qk_rope_head_dim=int(raw["qk_rope_head_dim"]),
            v_head_dim=int(raw["v_head_dim"]),
            n_routed_experts=int(raw["n_routed_experts"]),
            n_shared_experts=int(raw.get("n_shared_experts") or 0),
            num_experts_per_tok=int(raw["num_experts_per_tok"]),
            n_group=int(raw.get("n_group") or 1),
            topk_group=int(raw.get("topk_group") or 1),
            routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
            first_k_dense_replace=int(raw.get("first_k_dense_replace", 0)),
            moe_layer_freq=int(raw.get("moe_layer_freq", 1)),
            topk_method=topk_method,
            scoring_func=scoring,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            max_position_embeddings=int(raw["max_position_embeddings"]),
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=raw.get("eos_token_id"),
            torch_dtype=str(raw.get("torch_dtype", raw.get("dtype", "bfloat16"))),
            quantization_config=raw.get("quantization_config"),
        )
        cfg._validate(source)
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"{path}: not found; a model directory needs an HF config.json")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(raw, source=str(path))

    def _validate(self, source: str) -> None:
        if self.n_routed_experts % self.n_group:
            raise ConfigError(
                f"{source}: n_routed_experts={self.n_routed_experts} not divisible by "
                f"n_group={self.n_group}"
            )
        if not 1 <= self.topk_group <= self.n_group:
            raise ConfigError(f"{source}: topk_group={self.topk_group} must be in [1, n_group]")
        if self.n_routed_experts and self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(f"{source}: num_experts_per_tok exceeds n_routed_experts")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"{source}: qk_rope_head_dim must be even")
        if self.is_fp8_checkpoint and self.quantization_config.get("fmt", "e4m3") != "e4m3":
            raise ConfigError(f"{source}: only e4m3 block-FP8 checkpoints are supported")
