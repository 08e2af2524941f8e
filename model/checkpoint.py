"""Write seeded random checkpoints in the exact HF layout of Kimi-K2 / DeepSeek-V3.

``make_model("k2-tiny", out_dir)`` writes ``config.json``, ``generation_config.json``, the
tokenizer files, and the weights as safetensors shards split by layer with
``model.safetensors.index.json`` (or one ``model.safetensors``), bf16 except the fp32 router
bias; with ``fp8=True`` the decoder's linear layers are block-FP8 exactly as the real
checkpoints ship them. Same preset + seed -> byte-identical files.

Every tensor draws from its own generator seeded by (seed, name), so a tensor's values do not
depend on which other tensors exist or in what order they are written.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.config import ModelConfig
from model.presets import SPECIAL_IDS, preset_config
from model.tokenizer_files import BOS, EOS, IM_END, write_tokenizer_files
from model.weights import (
    INDEX_FILE,
    SCALE_SUFFIX,
    SINGLE_FILE,
    expected_shapes,
    is_fp8_linear,
    layer_of,
    quantize_block_fp8,
)


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def init_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The seeded initial value of one tensor, in fp32 (the caller picks the stored dtype).

    Linear layers ~ N(0, 1/fan_in) so activations keep unit scale and logits are not flat;
    norms ~ 1 + N(0, 0.05^2) so they matter; the router bias ~ N(0, 0.05^2), comparable to the
    spread of sigmoid scores, so it changes which experts win.
    """
    g = _generator(seed, name)
    x = torch.randn(shape, generator=g, dtype=torch.float32)
    if name.endswith("e_score_correction_bias"):
        return x * 0.05
    if name.endswith("norm.weight"):
        return 1.0 + 0.05 * x
    if name == "model.embed_tokens.weight":
        return x
    return x / math.sqrt(shape[-1])


def _shard_of(name: str, num_layers: int) -> int:
    """Shards split by layer: embeddings join layer 0, the final norm and lm_head the last."""
    layer = layer_of(name)
    if layer is None:
        return 0 if name == "model.embed_tokens.weight" else num_layers - 1
    return layer


def _stored_tensors(
    name: str, shape: tuple[int, ...], seed: int, fp8: bool
) -> dict[str, torch.Tensor]:
    w = init_tensor(name, shape, seed)
    if name.endswith("e_score_correction_bias"):
        return {name: w}
    w = w.to(torch.bfloat16)
    if fp8 and is_fp8_linear(name):
        q, scale_inv = quantize_block_fp8(w.float())
        return {name: q, name + SCALE_SUFFIX: scale_inv}
    return {name: w}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_weights(
    out_dir: Path, config: ModelConfig, *, fp8: bool, seed: int, sharded: bool
) -> None:
    """The safetensors files (+ index when sharded) for ``config``."""
    shapes = expected_shapes(config)
    num_shards = config.num_hidden_layers if sharded else 1
    groups: list[list[str]] = [[] for _ in range(num_shards)]
    for name in shapes:
        groups[_shard_of(name, config.num_hidden_layers) if sharded else 0].append(name)
    weight_map: dict[str, str] = {}
    total_size = 0
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" if sharded else SINGLE_FILE
        tensors: dict[str, torch.Tensor] = {}
        for name in names:
            tensors.update(_stored_tensors(name, shapes[name], seed, fp8))
        save_file(tensors, str(out_dir / file), metadata={"format": "pt"})
        total_size += sum(_nbytes(t) for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, file))
    if sharded:
        index = {
            "metadata": {"total_size": total_size},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def make_model(
    preset: str, out_dir: str | Path, *, fp8: bool = False, seed: int = 0, sharded: bool = True
) -> Path:
    """Write a random ``preset`` checkpoint to ``out_dir`` (created if needed); returns the path."""
    raw = preset_config(preset)
    if fp8:
        raw["quantization_config"] = {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [128, 128],
        }
    config = ModelConfig.from_dict(raw, source=f"preset {preset}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A previous checkpoint here (other sharding, a Kimi tiktoken.model) would shadow this one.
    for stale in [*out.glob("model*.safetensors"), out / INDEX_FILE, out / "tiktoken.model"]:
        stale.unlink(missing_ok=True)
    (out / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    generation = {
        "bos_token_id": raw["bos_token_id"],
        "eos_token_id": SPECIAL_IDS[IM_END],
        "do_sample": False,
        "max_length": raw["max_position_embeddings"],
    }
    (out / "generation_config.json").write_text(
        json.dumps(generation, indent=2, sort_keys=True) + "\n"
    )
    specials = write_tokenizer_files(out, raw["vocab_size"])
    assert {specials[n] for n in (BOS, EOS, IM_END)} == set(SPECIAL_IDS.values())
    # Generation is many small elementwise ops: intra-op threads buy little here, and on a
    # busy 2-core box their spin-waits made it 10-20x slower (measured). Values do not depend
    # on the thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        write_weights(out, config, fp8=fp8, seed=seed, sharded=sharded)
    finally:
        torch.set_num_threads(threads)
    return out
