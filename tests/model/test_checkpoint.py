"""The checkpoint generator writes the exact HF layout, deterministically."""

import json

import pytest
import torch
from safetensors import safe_open

from model.checkpoint import init_tensor, make_model
from model.config import ModelConfig
from model.kv_cache import bytes_per_token
from model.presets import PRESETS, preset_config
from model.tokenizer import Tokenizer
from model.weights import SCALE_SUFFIX, expected_shapes, is_fp8_linear, load_state_dict


def _stored(model_dir) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_k2_tiny_has_the_hf_layout(tiny_model_dir):
    names = sorted(p.name for p in tiny_model_dir.iterdir())
    shards = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert names == sorted(
        [
            "config.json",
            "generation_config.json",
            "model.safetensors.index.json",
            "tokenizer.json",
            "tokenizer_config.json",
            *shards,
        ]
    )
    raw = json.loads((tiny_model_dir / "config.json").read_text())
    assert raw["model_type"] == "kimi_k2"
    assert raw["architectures"] == ["DeepseekV3ForCausalLM"]
    assert "quantization_config" not in raw
    index = json.loads((tiny_model_dir / "model.safetensors.index.json").read_text())
    located = {}
    for shard in shards:
        with safe_open(str(tiny_model_dir / shard), framework="pt") as f:
            located.update(dict.fromkeys(f.keys(), shard))
    assert index["weight_map"] == located
    stored = _stored(tiny_model_dir)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in stored.values()
    )


def test_k2_tiny_config_is_served_as_specified(tiny_model_dir):
    cfg = ModelConfig.from_json(tiny_model_dir)
    tok = Tokenizer.load(tiny_model_dir)
    assert cfg.vocab_size == tok.vocab_size
    assert cfg.rope_scaling is not None and cfg.rope_scaling.is_yarn
    assert cfg.max_model_len >= 8192
    assert cfg.kv_lora_rank % 128 == 0  # the FP8 latent format needs whole groups
    assert cfg.moe_layer_ids == [1, 2] and not cfg.tie_word_embeddings
    assert cfg.bos_token_id == tok.bos_token_id
    assert set(cfg.eos_token_ids) <= set(tok.eos_token_ids)


def test_stored_dtypes_are_bf16_except_the_router_bias(tiny_model_dir):
    for name, t in _stored(tiny_model_dir).items():
        want = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
        assert t.dtype == want, name


def test_stored_values_are_the_seeded_init(tiny_model_dir):
    stored = _stored(tiny_model_dir)
    cfg = ModelConfig.from_json(tiny_model_dir)
    shapes = expected_shapes(cfg)
    assert set(stored) == set(shapes)
    for name in ("model.layers.1.mlp.experts.3.up_proj.weight", "model.norm.weight"):
        want = init_tensor(name, shapes[name], seed=0).to(torch.bfloat16)
        assert torch.equal(stored[name], want)
    norm = stored["model.layers.0.input_layernorm.weight"].float()
    assert 0.8 < norm.mean() < 1.2 and norm.std() > 0.01  # around 1, but not all ones


def test_same_seed_writes_identical_bytes_and_another_seed_differs(tmp_path, tiny_model_dir):
    again = make_model("k2-tiny", tmp_path / "again", seed=0)
    for path in tiny_model_dir.iterdir():
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name
    other = make_model("k2-tiny", tmp_path / "other", seed=1)
    a, b = _stored(tiny_model_dir), _stored(other)
    assert not torch.equal(a["lm_head.weight"], b["lm_head.weight"])


def test_fp8_checkpoint_matches_the_shipped_format(tiny_fp8_model_dir):
    raw = json.loads((tiny_fp8_model_dir / "config.json").read_text())
    assert raw["quantization_config"] == {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }
    stored = _stored(tiny_fp8_model_dir)
    cfg = ModelConfig.from_json(tiny_fp8_model_dir)
    shapes = expected_shapes(cfg)
    quantised = [n for n in shapes if is_fp8_linear(n)]
    assert "model.layers.1.self_attn.kv_b_proj.weight" in quantised
    assert "model.layers.0.mlp.down_proj.weight" in quantised
    assert "model.layers.2.mlp.shared_experts.gate_proj.weight" in quantised
    for name in quantised:
        out_dim, in_dim = shapes[name]
        assert stored[name].dtype == torch.float8_e4m3fn
        scale = stored[name + SCALE_SUFFIX]
        assert scale.dtype == torch.float32
        assert tuple(scale.shape) == (-(-out_dim // 128), -(-in_dim // 128))
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight"):
        assert stored[name].dtype == torch.bfloat16 and name + SCALE_SUFFIX not in stored
    assert stored["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert set(stored) == set(shapes) | {n + SCALE_SUFFIX for n in quantised}


def test_dsv3_tiny_has_grouped_routing(dsv3_tiny_model_dir):
    cfg = ModelConfig.from_json(dsv3_tiny_model_dir)
    assert cfg.model_type == "deepseek_v3"
    assert (cfg.n_routed_experts, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok) == (
        16,
        4,
        2,
        4,
    )
    state = load_state_dict(dsv3_tiny_model_dir, cfg)
    assert state["model.layers.1.mlp.experts.15.down_proj.weight"].shape == (64, 32)


def test_router_bias_changes_expert_selection(tiny_model_dir):
    cfg = ModelConfig.from_json(tiny_model_dir)
    state = load_state_dict(tiny_model_dir, cfg)
    x = torch.randn(256, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    scores = torch.sigmoid(x @ state["model.layers.1.mlp.gate.weight"].T)
    bias = state["model.layers.1.mlp.gate.e_score_correction_bias"]
    k = cfg.num_experts_per_tok
    plain = scores.topk(k).indices.sort().values
    biased = (scores + bias).topk(k).indices.sort().values
    changed = (plain != biased).any(dim=-1).float().mean()
    assert 0.02 < changed < 0.9


def test_k2_small_preset_has_k2_kv_bytes():
    cfg = ModelConfig.from_dict(preset_config("k2-small"))
    k2_bf16_bytes_per_token_layer = 1152  # DESIGN.md: 576 values in bf16
    assert bytes_per_token("bf16", cfg.kv_lora_rank, cfg.qk_rope_head_dim) == 1152
    assert bytes_per_token("bf16", 512, 64) == k2_bf16_bytes_per_token_layer
    assert cfg.max_model_len >= 32768 and cfg.rope_scaling.is_yarn
    assert set(PRESETS) == {"k2-tiny", "k2-small", "dsv3-tiny"}


def test_unknown_preset_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match="k2-tiny"):
        make_model("k3-huge", tmp_path)


def test_hf_transformers_loads_the_checkpoint_without_missing_keys(tiny_model_dir):
    transformers = pytest.importorskip("transformers")
    raw = json.loads((tiny_model_dir / "config.json").read_text())
    raw.pop("model_type")
    hf_cfg = transformers.DeepseekV3Config(**raw)
    model, info = transformers.DeepseekV3ForCausalLM.from_pretrained(
        tiny_model_dir, config=hf_cfg, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    ids = torch.arange(0, 480, 7).unsqueeze(0)
    with torch.no_grad():
        logits = model(ids).logits[0]
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.3  # not degenerate: the argmax is well defined
