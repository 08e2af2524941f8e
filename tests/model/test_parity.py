"""Parity of tidal's forward pass with HF transformers' DeepseekV3ForCausalLM (same weights).

HF runs in fp32 with eager attention; tidal is loaded with ``dtype=torch.float32`` and nothing
else, so its KV cache is fp32 by default (``kv_format="auto"``). The generated
presets have YaRN active (factor > 1, mscale_all_dim set), so rope and softmax scale are covered.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import shutil  # noqa: E402

from model.engine import Engine  # noqa: E402
from model.hf_reference import hf_reference  # noqa: E402
from model.rope import RotaryEmbedding, yarn_inv_freq  # noqa: E402

PRESET_FIXTURES = ["tiny_model_dir", "dsv3_tiny_model_dir"]


@pytest.fixture(scope="module", params=PRESET_FIXTURES)
def pair(request):
    model_dir = request.getfixturevalue(request.param)
    engine = Engine.load(model_dir, dtype=torch.float32)  # the defaults are what is tested
    assert engine.cache.fmt.value == "fp32"
    return engine, hf_reference(model_dir)


def _prompts(n: int, lengths: list[int], vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(n)
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for length in lengths]


def test_yarn_is_active_and_inv_freq_matches_hf(pair):
    engine, hf = pair
    assert engine.config.rope_scaling is not None and engine.config.rope_scaling.is_yarn
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_inv_freq, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](hf.config, "cpu")
    inv_freq, factor = yarn_inv_freq(engine.config)
    assert torch.equal(inv_freq, hf_inv_freq)
    assert factor == hf_factor
    # cos/sin bit-identical to HF's rotary embedding at a few positions, incl. past the original ctx
    pos = torch.tensor([0, 1, 17, 2047, 2048, 5000])
    hf_cos, hf_sin = hf.model.rotary_emb(torch.zeros(1, dtype=torch.float32), pos[None])
    cos, sin = RotaryEmbedding(engine.config).cos_sin(pos)
    half = hf_cos.shape[-1] // 2
    assert torch.equal(cos, hf_cos[0, :, :half]) and torch.equal(sin, hf_sin[0, :, :half])
    assert engine.config.softmax_scale == pytest.approx(hf.model.layers[0].self_attn.scaling)


def test_prefill_logits_match_hf(pair):
    engine, hf = pair
    for prompt in _prompts(1, [5, 41, 97], engine.config.vocab_size):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0]
        ours = engine.prefill_logits(prompt)
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() <= 1e-4


def test_greedy_tokens_match_hf(pair):
    engine, hf = pair
    prompts = _prompts(2, [3, 12, 30], engine.config.vocab_size)
    ours = engine.generate(prompts, max_new_tokens=32)  # batched decode, different lengths
    for prompt, got in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False
            )
        assert got == out[0, len(prompt) :].tolist()


def test_checkpoint_written_by_hf_loads_with_parity(tiny_model_dir, tmp_path):
    """HF's own save_pretrained layout (its shard names, its index) loads with the defaults and
    matches HF within 1e-4."""
    hf = hf_reference(tiny_model_dir)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    for f in tiny_model_dir.iterdir():  # HF writes no tokenizer for a bare model
        if "token" in f.name and not (tmp_path / f.name).exists():
            shutil.copy(f, tmp_path / f.name)
    engine = Engine.load(tmp_path, dtype=torch.float32)
    for prompt in _prompts(3, [7, 60], engine.config.vocab_size):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0]
        assert (engine.prefill_logits(prompt) - ref).abs().max().item() <= 1e-4
    prompt = _prompts(4, [9], engine.config.vocab_size)[0]
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False
        )
    assert engine.generate([prompt], max_new_tokens=16)[0] == out[0, len(prompt) :].tolist()
