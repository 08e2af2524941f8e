"""The built-in model presets: config.json contents of seeded random checkpoints (no torch).

``model.checkpoint.make_model`` writes them; the CLI lists them without loading torch.
"""

from __future__ import annotations

import json
from typing import Any

from model.tokenizer_files import BOS, EOS, IM_END, VOCAB_SIZE

SPECIAL_IDS = {name: VOCAB_SIZE - 16 + i for i, name in enumerate((BOS, EOS, IM_END))}

_COMMON: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": SPECIAL_IDS[BOS],
    "eos_token_id": SPECIAL_IDS[EOS],
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "moe_layer_freq": 1,
    "num_nextn_predict_layers": 0,
    "rms_norm_eps": 1e-6,
    "scoring_func": "sigmoid",
    "tie_word_embeddings": False,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": VOCAB_SIZE,
}

# Like Kimi-K2-Instruct-0905: a 256K context, YaRN stretching the original window to it.
MAX_CONTEXT = 262_144


def _yarn(original_max_position_embeddings: int) -> dict[str, Any]:
    """K2's YaRN settings with the factor that stretches ``original`` to ``MAX_CONTEXT``."""
    return {
        "type": "yarn",
        "factor": MAX_CONTEXT / original_max_position_embeddings,
        "original_max_position_embeddings": original_max_position_embeddings,
        "beta_fast": 1.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    }


_K2_TINY: dict[str, Any] = {
    **_COMMON,
    "model_type": "kimi_k2",
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "first_k_dense_replace": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 48,
    "kv_lora_rank": 128,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_group": 1,
    "topk_group": 1,
    "n_shared_experts": 1,
    "routed_scaling_factor": 2.827,
    "norm_topk_prob": True,
    "rope_theta": 50000.0,
    "max_position_embeddings": MAX_CONTEXT,
    "rope_scaling": _yarn(2048),
}

PRESETS: dict[str, dict[str, Any]] = {
    "k2-tiny": _K2_TINY,
    # Benchmark-sized with K2's MLA dims (so KV bytes per token per layer match K2). Sized for a
    # 2-core CPU: fp32 weights ~240 MB, a batch-32 x 1K-context decode step in tens of ms; 4 heads
    # because CPU absorbed-MLA decode is compute-bound (2 x heads FLOPs per cached value).
    "k2-small": {
        **_K2_TINY,
        "hidden_size": 1024,
        "intermediate_size": 2048,
        "moe_intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 384,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "n_routed_experts": 32,
        "num_experts_per_tok": 6,
        "rope_scaling": _yarn(4096),
    },
    # DeepSeek-V3-style grouped routing: 4 groups of 4 experts, best 2 groups, top-4.
    "dsv3-tiny": {
        **_K2_TINY,
        "model_type": "deepseek_v3",
        "n_routed_experts": 16,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 2.5,
    },
}


def preset_config(preset: str) -> dict[str, Any]:
    """A copy of one preset's ``config.json`` dict; ``ValueError`` naming the presets if unknown."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return json.loads(json.dumps(PRESETS[preset]))
