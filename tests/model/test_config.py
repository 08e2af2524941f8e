"""ModelConfig: parsing, derived values, clear errors."""

import json
import math

import pytest

from model.config import ConfigError, ModelConfig

K2 = {
    "model_type": "kimi_k2",
    "vocab_size": 163840,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 64,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "n_routed_experts": 384,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "n_group": 1,
    "topk_group": 1,
    "routed_scaling_factor": 2.827,
    "norm_topk_prob": True,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "rope_theta": 50000.0,
    "max_position_embeddings": 262144,
    "rope_scaling": {
        "type": "yarn",
        "factor": 64.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 1.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]},
}


def test_k2_numbers_and_derived_values():
    c = ModelConfig.from_dict(K2)
    assert c.qk_head_dim == 192 and c.kv_cache_dim == 576
    assert c.max_model_len == 262144
    assert c.moe_layer_ids == list(range(1, 61)) and not c.is_moe_layer(0)
    mscale = 0.1 * math.log(64.0) + 1.0
    assert c.softmax_scale == pytest.approx(192**-0.5 * mscale * mscale)
    assert c.is_fp8_checkpoint and c.fp8_block_size == (128, 128)


def test_from_json_reads_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(K2))
    assert ModelConfig.from_json(tmp_path).num_hidden_layers == 61


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"model_type": "llama"}, "model_type 'llama' is not supported"),
        ({"scoring_func": "softmax"}, "scoring_func"),
        ({"n_group": 5}, "not divisible by n_group"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling type"),
    ],
)
def test_unsupported_configs_are_refused(patch, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({**K2, **patch})


def test_missing_keys_and_bad_files(tmp_path):
    raw = dict(K2)
    del raw["kv_lora_rank"]
    with pytest.raises(ConfigError, match="kv_lora_rank"):
        ModelConfig.from_dict(raw)
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path)
