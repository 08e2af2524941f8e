"""HF transformers' ``DeepseekV3ForCausalLM`` on a tidal checkpoint: the independent reference.

Used by the parity tests and the engine benchmark only (transformers is a test-time dependency).
HF keeps routed experts stacked (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]) while
checkpoints hold one tensor per expert, and it does not map ``model_type`` ``kimi_k2``, so the
model is built from the config and the loaded tensors are stacked here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from model.config import ModelConfig
from model.weights import load_state_dict


def hf_reference(
    model_dir: str | Path, dtype: torch.dtype = torch.float32, attn_implementation: str = "eager"
) -> Any:
    """An eval-mode ``DeepseekV3ForCausalLM`` holding ``model_dir``'s weights in ``dtype``."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    model_dir = Path(model_dir)
    raw = json.loads((model_dir / "config.json").read_text())
    raw.pop("model_type", None)
    raw.pop("quantization_config", None)  # weights arrive dequantised
    hf_config = DeepseekV3Config(**raw)
    hf_config._attn_implementation = attn_implementation
    with torch.device("meta"):
        hf = DeepseekV3ForCausalLM(hf_config)
    config = ModelConfig.from_json(model_dir)
    state = load_state_dict(model_dir, config, dtype=dtype)
    out = {k: v for k, v in state.items() if ".experts." not in k}
    for i in config.moe_layer_ids:
        p = f"model.layers.{i}.mlp.experts"
        experts = range(config.n_routed_experts)
        out[f"{p}.gate_up_proj"] = torch.stack(
            [
                torch.cat(
                    [state.pop(f"{p}.{e}.gate_proj.weight"), state.pop(f"{p}.{e}.up_proj.weight")]
                )
                for e in experts
            ]
        )
        out[f"{p}.down_proj"] = torch.stack(
            [state.pop(f"{p}.{e}.down_proj.weight") for e in experts]
        )
    missing, unexpected = hf.load_state_dict(out, strict=False, assign=True)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise ValueError(f"HF reference: missing {missing}, unexpected {unexpected}")
    # buffers created on meta (rotary inv_freq) must be rebuilt on the CPU
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_config)
    return hf.eval()
