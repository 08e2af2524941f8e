"""The weights loader: round trips, expert subsets, block-FP8, and every error it reports."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.checkpoint import init_tensor, make_model
from model.config import ModelConfig
from model.weights import (
    INDEX_FILE,
    SCALE_SUFFIX,
    WeightsError,
    dequantize_block_fp8,
    e4m3_to_float,
    expected_shapes,
    is_fp8_linear,
    load_model_dir,
    load_state_dict,
    quantize_block_fp8,
)

# e4m3 keeps 3 mantissa bits: rounding to nearest is off by at most half a step, 2^-4 of the
# value for normal numbers. Values below 2^-6 (in units of the block scale) are subnormal, with
# a fixed step of 2^-9, so half a step is 2^-10 of the block scale.
FP8_REL_TOL = 2.0**-4
FP8_SUBNORMAL_ABS = 2.0**-10


@pytest.fixture
def model_copy(tmp_path, tiny_model_dir):
    """A private copy of the k2-tiny checkpoint that a test may damage."""
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def _config(model_dir) -> ModelConfig:
    return ModelConfig.from_json(model_dir)


def _index(model_dir) -> dict:
    return json.loads((model_dir / INDEX_FILE).read_text())


def _write_index(model_dir, index: dict) -> None:
    (model_dir / INDEX_FILE).write_text(json.dumps(index))


def test_round_trip_returns_the_generated_weights(tiny_model_dir):
    cfg = _config(tiny_model_dir)
    state = load_state_dict(tiny_model_dir, cfg)
    shapes = expected_shapes(cfg)
    assert list(state) == list(shapes)
    for name, t in state.items():
        assert t.dtype == torch.float32 and tuple(t.shape) == shapes[name]
        want = init_tensor(name, shapes[name], seed=0)
        if not name.endswith("e_score_correction_bias"):
            want = want.to(torch.bfloat16).float()
        assert torch.equal(t, want), name


def test_single_file_checkpoint_loads_the_same_tensors(tmp_path, tiny_model_dir):
    single = make_model("k2-tiny", tmp_path / "single", seed=0, sharded=False)
    assert (single / "model.safetensors").exists() and not (single / INDEX_FILE).exists()
    cfg, state = load_model_dir(single)
    sharded = load_state_dict(tiny_model_dir, cfg)
    assert state.keys() == sharded.keys()
    assert all(torch.equal(state[k], sharded[k]) for k in state)


def test_dtype_argument_keeps_the_router_bias_fp32(tiny_model_dir):
    state = load_state_dict(tiny_model_dir, _config(tiny_model_dir), dtype=torch.bfloat16)
    assert state["model.layers.1.self_attn.o_proj.weight"].dtype == torch.bfloat16
    assert state["model.layers.2.mlp.gate.e_score_correction_bias"].dtype == torch.float32


def test_expert_subset_loads_only_those_experts(tiny_model_dir):
    cfg = _config(tiny_model_dir)
    full = load_state_dict(tiny_model_dir, cfg)
    part = load_state_dict(tiny_model_dir, cfg, expert_ids=[5, 1])
    experts = {int(k.split(".")[5]) for k in part if ".mlp.experts." in k}
    assert experts == {1, 5}
    assert "model.layers.1.mlp.shared_experts.up_proj.weight" in part
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in part
    assert all(torch.equal(part[k], full[k]) for k in part)
    assert len(full) - len(part) == 2 * 3 * (cfg.n_routed_experts - 2)  # 2 MoE layers x 3 mats


def test_expert_subset_never_reads_other_experts(model_copy):
    # Point every tensor of experts 4..7 at a shard that does not exist: a loader that touched
    # them (even just to open their file) would fail.
    index = _index(model_copy)
    for name in index["weight_map"]:
        if ".mlp.experts." in name and int(name.split(".")[5]) >= 4:
            index["weight_map"][name] = "model-other-rank.safetensors"
    _write_index(model_copy, index)
    cfg = _config(model_copy)
    part = load_state_dict(model_copy, cfg, expert_ids=[0, 1, 2, 3])
    assert "model.layers.2.mlp.experts.3.down_proj.weight" in part
    with pytest.raises(WeightsError, match="model-other-rank.safetensors.*does not exist"):
        load_state_dict(model_copy, cfg)


def test_expert_ids_out_of_range_are_rejected(tiny_model_dir):
    with pytest.raises(WeightsError, match=r"expert_ids \[8\] out of range.*8 routed experts"):
        load_state_dict(tiny_model_dir, _config(tiny_model_dir), expert_ids=[0, 8])


def test_layers_past_num_hidden_layers_are_ignored(model_copy):
    # Real checkpoints carry an MTP layer at index num_hidden_layers; its tensors are not read.
    mtp = {
        "model.layers.3.eh_proj.weight": torch.zeros(3, 5),
        "model.layers.3.enorm.weight": torch.ones(7),
    }
    save_file(mtp, str(model_copy / "model-mtp.safetensors"))
    index = _index(model_copy)
    index["weight_map"].update(dict.fromkeys(mtp, "model-mtp.safetensors"))
    index["weight_map"]["model.layers.3.self_attn.o_proj.weight"] = "missing.safetensors"
    _write_index(model_copy, index)
    state = load_state_dict(model_copy, _config(model_copy))
    assert not any(k.startswith("model.layers.3.") for k in state)


def test_fp8_dequantisation_is_within_e4m3_rounding_of_bf16(tiny_model_dir, tiny_fp8_model_dir):
    ref = load_state_dict(tiny_model_dir, _config(tiny_model_dir))
    cfg8 = _config(tiny_fp8_model_dir)
    deq = load_state_dict(tiny_fp8_model_dir, cfg8)
    raw = load_state_dict(tiny_fp8_model_dir, cfg8, keep_fp8=True)
    assert deq.keys() == ref.keys()
    for name, w in ref.items():
        if not is_fp8_linear(name):
            assert torch.equal(deq[name], w), name  # embeddings, norms, router: untouched
            continue
        scale = raw[name + SCALE_SUFFIX]
        step = FP8_SUBNORMAL_ABS * scale.repeat_interleave(128, 0).repeat_interleave(128, 1)
        step = step[: w.shape[0], : w.shape[1]]
        err = (deq[name] - w).abs()
        assert (err <= FP8_REL_TOL * w.abs() + step).all(), name
        assert err.mean() / w.abs().mean() < 0.04, name  # typical error ~2^-5, not the bound


def test_keep_fp8_returns_the_stored_pair(tiny_fp8_model_dir):
    cfg = _config(tiny_fp8_model_dir)
    raw = load_state_dict(tiny_fp8_model_dir, cfg, keep_fp8=True)
    deq = load_state_dict(tiny_fp8_model_dir, cfg)
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    assert raw[name].dtype == torch.float8_e4m3fn
    assert raw[name + SCALE_SUFFIX].dtype == torch.float32
    assert raw[name + SCALE_SUFFIX].shape == (2, 1)  # [256, 128] -> 2 x 1 blocks
    assert torch.equal(dequantize_block_fp8(raw[name], raw[name + SCALE_SUFFIX]), deq[name])
    assert raw["lm_head.weight"].dtype == torch.float32


@pytest.mark.parametrize("shape", [(256, 384), (200, 72), (64, 300)])
def test_block_fp8_codec_bound_on_partial_blocks(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    q, scale = quantize_block_fp8(w)
    assert scale.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    d = dequantize_block_fp8(q, scale)
    step = FP8_SUBNORMAL_ABS * scale.max()
    assert ((d - w).abs() <= FP8_REL_TOL * w.abs() + step).all()
    # each block's largest magnitude maps to the e4m3 maximum
    assert q.float().abs().amax() == 448.0


# ---- errors: each names the file, the tensor, and what was expected --------------------------------
def test_missing_tensor_in_index(model_copy):
    index = _index(model_copy)
    del index["weight_map"]["model.layers.2.self_attn.kv_a_layernorm.weight"]
    _write_index(model_copy, index)
    with pytest.raises(WeightsError) as e:
        load_state_dict(model_copy, _config(model_copy))
    assert INDEX_FILE in str(e.value)
    assert "missing tensor 'model.layers.2.self_attn.kv_a_layernorm.weight'" in str(e.value)


def test_tensor_missing_from_the_shard_its_index_names(model_copy):
    index = _index(model_copy)
    name = "model.layers.2.self_attn.o_proj.weight"
    index["weight_map"][name] = "model-00001-of-00003.safetensors"
    _write_index(model_copy, index)
    with pytest.raises(WeightsError) as e:
        load_state_dict(model_copy, _config(model_copy))
    assert "model-00001-of-00003.safetensors" in str(e.value)
    assert f"missing tensor {name!r}" in str(e.value)


def test_wrong_shape_names_tensor_and_both_shapes(model_copy):
    shard = model_copy / "model-00002-of-00003.safetensors"
    with safe_open(str(shard), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    assert tensors[name].shape == (4 * (32 + 32), 128)
    tensors[name] = torch.zeros(4 * (32 + 32), 64, dtype=torch.bfloat16)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(WeightsError) as e:
        load_state_dict(model_copy, _config(model_copy))
    msg = str(e.value)
    assert shard.name in msg and name in msg
    assert "shape [256, 64], expected [256, 128]" in msg


def test_unknown_model_type(model_copy):
    raw = json.loads((model_copy / "config.json").read_text())
    raw["model_type"] = "llama"
    (model_copy / "config.json").write_text(json.dumps(raw))
    with pytest.raises(WeightsError, match=r"config.json: model_type 'llama' is not supported"):
        load_model_dir(model_copy)


def test_truncated_shard(model_copy):
    shard = model_copy / "model-00003-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        WeightsError, match=r"model-00003-of-00003.safetensors.*truncated or corrupt"
    ):
        load_state_dict(model_copy, _config(model_copy))


def test_corrupt_header(model_copy):
    shard = model_copy / "model-00001-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:40] = b"\x00not json at all\xff" * 2
    shard.write_bytes(bytes(data))
    with pytest.raises(
        WeightsError, match=r"model-00001-of-00003.safetensors.*truncated or corrupt"
    ):
        load_state_dict(model_copy, _config(model_copy))


def test_missing_shard_named_in_the_index(model_copy):
    (model_copy / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(WeightsError) as e:
        load_state_dict(model_copy, _config(model_copy))
    msg = str(e.value)
    assert INDEX_FILE in msg and "'model-00002-of-00003.safetensors'" in msg
    assert "does not exist" in msg


def test_index_pointing_at_a_file_that_is_not_there(model_copy):
    index = _index(model_copy)
    index["weight_map"]["model.norm.weight"] = "model-00004-of-00003.safetensors"
    _write_index(model_copy, index)
    with pytest.raises(WeightsError, match=r"'model-00004-of-00003.safetensors'.*does not exist"):
        load_state_dict(model_copy, _config(model_copy))


def test_invalid_index_json(model_copy):
    (model_copy / INDEX_FILE).write_text("{ not json")
    with pytest.raises(WeightsError, match=f"{INDEX_FILE}: not a valid safetensors index"):
        load_state_dict(model_copy, _config(model_copy))


def test_directory_without_weights(model_copy):
    for p in model_copy.glob("model*"):
        p.unlink()
    with pytest.raises(WeightsError, match=r"no weights found; expected model.safetensors"):
        load_state_dict(model_copy, _config(model_copy))


def test_fp8_checkpoint_missing_a_scale(tmp_path, tiny_fp8_model_dir):
    model = shutil.copytree(tiny_fp8_model_dir, tmp_path / "fp8")
    index = _index(model)
    name = "model.layers.0.mlp.up_proj.weight" + SCALE_SUFFIX
    del index["weight_map"][name]
    _write_index(model, index)
    with pytest.raises(WeightsError, match=f"missing tensor '{name}'"):
        load_state_dict(model, _config(model))


def test_fp8_config_over_bf16_weights_is_rejected(model_copy, tiny_fp8_model_dir):
    # config.json says block-FP8 but the shards hold bf16 weights (a mixed-up download).
    shutil.copy(tiny_fp8_model_dir / "config.json", model_copy / "config.json")
    index = _index(model_copy)
    for name in list(index["weight_map"]):
        if is_fp8_linear(name):
            index["weight_map"][name + SCALE_SUFFIX] = index["weight_map"][name]
    _write_index(model_copy, index)
    with pytest.raises(WeightsError, match=r"is torch.bfloat16, expected float8_e4m3fn"):
        load_state_dict(model_copy, _config(model_copy))


def test_e4m3_table_lookup_is_exact_for_every_code():
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(16, 16)
    want = codes.float()
    got = e4m3_to_float(codes)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan) and torch.equal(got[~nan], want[~nan])


def test_git_lfs_pointer_instead_of_a_shard(model_copy):
    shard = model_copy / "model-00002-of-00003.safetensors"
    shard.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 123\n")
    with pytest.raises(
        WeightsError, match=r"model-00002-of-00003.safetensors: is a git-lfs pointer"
    ):
        load_state_dict(model_copy, _config(model_copy))


def test_expected_shapes_without_q_lora_use_q_proj(tiny_model_dir):
    raw = json.loads((tiny_model_dir / "config.json").read_text())
    raw["q_lora_rank"] = None
    shapes = expected_shapes(ModelConfig.from_dict(raw))
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (4 * (32 + 16), 64)
    assert not any("q_a_proj" in n or "q_b_proj" in n or "q_a_layernorm" in n for n in shapes)


def test_expected_shapes_match_the_hf_names(tiny_model_dir):
    shapes = expected_shapes(_config(tiny_model_dir))
    assert shapes["model.layers.1.self_attn.q_b_proj.weight"] == (4 * 48, 48)
    assert shapes["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"] == (128 + 16, 64)
    assert shapes["model.layers.1.self_attn.o_proj.weight"] == (64, 4 * 32)
    assert shapes["model.layers.1.mlp.shared_experts.down_proj.weight"] == (64, 32)
    assert shapes["model.layers.0.mlp.gate_proj.weight"] == (128, 64)
    assert shapes["model.layers.2.mlp.gate.weight"] == (8, 64)
    assert shapes["lm_head.weight"] == (512, 64)


def test_tied_embeddings_reuse_the_embedding_matrix(model_copy):
    raw = json.loads((model_copy / "config.json").read_text())
    raw["tie_word_embeddings"] = True
    (model_copy / "config.json").write_text(json.dumps(raw))
    index = _index(model_copy)
    del index["weight_map"]["lm_head.weight"]
    _write_index(model_copy, index)
    cfg, state = load_model_dir(model_copy)
    assert "lm_head.weight" not in expected_shapes(cfg)
    assert state["lm_head.weight"] is state["model.embed_tokens.weight"]
