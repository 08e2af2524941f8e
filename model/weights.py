"""Load the weights of an HF DeepSeek-V3 / Kimi-K2 checkpoint directory.

Reads ``model.safetensors`` or the shards named by ``model.safetensors.index.json``, memory-mapped
(``safetensors.safe_open``), and only the tensors this process needs: with ``expert_ids`` only
those routed experts are read (expert parallelism: other ranks' experts are never touched, their
shards are not even opened unless they hold something else we need). Tensors of layers past
``num_hidden_layers`` (the MTP layer real checkpoints carry) are never read.

Block-FP8 checkpoints (DeepSeek-V3 / Kimi-K2 as shipped) store every linear layer of the decoder
as e4m3 with an fp32 ``<name>_scale_inv`` per 128x128 block,
``w[i, j] = q[i, j] * scale_inv[i // 128, j // 128]``; they are dequantised at load unless
``keep_fp8`` asks for the raw pair (for an FP8 GEMM). ``load_weights`` folds each pair into an
``Fp8Weight``, which the model's linears hand to the block-FP8 GEMM (``model.kernels.fp8_gemm``),
so an FP8 checkpoint stays FP8 in memory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from model.config import ConfigError, ModelConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
FP8_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_SUFFIX = "_scale_inv"
_ATTN_LINEARS = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


class WeightsError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file and tensor."""


# ---- the names and shapes of a checkpoint ------------------------------------------------------
def _mlp_shapes(prefix: str, hidden: int, inter: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.gate_proj.weight": (inter, hidden),
        f"{prefix}.up_proj.weight": (inter, hidden),
        f"{prefix}.down_proj.weight": (hidden, inter),
    }


def _attention_shapes(cfg: ModelConfig, p: str) -> dict[str, tuple[int, ...]]:
    h, n = cfg.hidden_size, cfg.num_attention_heads
    r = cfg.kv_lora_rank
    shapes: dict[str, tuple[int, ...]] = {}
    if cfg.q_lora_rank is None:
        shapes[f"{p}.q_proj.weight"] = (n * cfg.qk_head_dim, h)
    else:
        shapes[f"{p}.q_a_proj.weight"] = (cfg.q_lora_rank, h)
        shapes[f"{p}.q_a_layernorm.weight"] = (cfg.q_lora_rank,)
        shapes[f"{p}.q_b_proj.weight"] = (n * cfg.qk_head_dim, cfg.q_lora_rank)
    shapes[f"{p}.kv_a_proj_with_mqa.weight"] = (r + cfg.qk_rope_head_dim, h)
    shapes[f"{p}.kv_a_layernorm.weight"] = (r,)
    shapes[f"{p}.kv_b_proj.weight"] = (n * (cfg.qk_nope_head_dim + cfg.v_head_dim), r)
    shapes[f"{p}.o_proj.weight"] = (h, n * cfg.v_head_dim)
    return shapes


def _check_expert_ids(cfg: ModelConfig, expert_ids: list[int] | None) -> list[int]:
    if expert_ids is None:
        return list(range(cfg.n_routed_experts))
    ids = sorted(set(int(e) for e in expert_ids))
    bad = [e for e in ids if not 0 <= e < cfg.n_routed_experts]
    if bad:
        raise WeightsError(
            f"expert_ids {bad} out of range: the model has {cfg.n_routed_experts} routed experts"
        )
    return ids


def expected_shapes(
    config: ModelConfig, expert_ids: list[int] | None = None
) -> dict[str, tuple[int, ...]]:
    """Every tensor name a forward pass needs -> its logical (dequantised) shape, in file order.

    With ``expert_ids`` the routed experts are restricted to those ids (router, bias and shared
    experts are always included). ``lm_head.weight`` is left out when embeddings are tied.
    """
    cfg, h = config, config.hidden_size
    experts = _check_expert_ids(cfg, expert_ids)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (h,)
        shapes.update(_attention_shapes(cfg, f"{p}.self_attn"))
        shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
        if not cfg.is_moe_layer(i):
            shapes.update(_mlp_shapes(f"{p}.mlp", h, cfg.intermediate_size))
            continue
        shapes[f"{p}.mlp.gate.weight"] = (cfg.n_routed_experts, h)
        shapes[f"{p}.mlp.gate.e_score_correction_bias"] = (cfg.n_routed_experts,)
        for e in experts:
            shapes.update(_mlp_shapes(f"{p}.mlp.experts.{e}", h, cfg.moe_intermediate_size))
        if cfg.n_shared_experts:
            inter = cfg.moe_intermediate_size * cfg.n_shared_experts
            shapes.update(_mlp_shapes(f"{p}.mlp.shared_experts", h, inter))
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def is_fp8_linear(name: str) -> bool:
    """Whether a block-FP8 checkpoint stores this tensor as e4m3 + ``_scale_inv``.

    All decoder linear layers (attention, dense MLP, routed and shared experts); never the
    embeddings, lm_head, norms, the router gate or its bias.
    """
    if not name.startswith("model.layers.") or not name.endswith(".weight"):
        return False
    module = name.rsplit(".", 2)[-2]
    if module in _ATTN_LINEARS:
        return True
    return module in ("gate_proj", "up_proj", "down_proj")


def layer_of(name: str) -> int | None:
    """The decoder layer index a tensor belongs to (None for embeddings, final norm, lm_head)."""
    if not name.startswith("model.layers."):
        return None
    return int(name.split(".", 3)[2])


# ---- block FP8 -----------------------------------------------------------------------------------
def scale_shape(shape: tuple[int, ...], block: tuple[int, int] = (128, 128)) -> tuple[int, int]:
    """``[ceil(out / 128), ceil(in / 128)]``: one fp32 scale per weight block."""
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def _blocks(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """[out, in] -> [rows, bo, cols, bi], zero-padding a partial last block row/column."""
    rows, cols = scale_shape(tuple(x.shape), block)
    pad_in, pad_out = cols * block[1] - x.shape[1], rows * block[0] - x.shape[0]
    if pad_in or pad_out:
        x = torch.nn.functional.pad(x, (0, pad_in, 0, pad_out))
    return x.reshape(rows, block[0], cols, block[1])


def _unblock(b: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    rows, bo, cols, bi = b.shape
    return b.reshape(rows * bo, cols * bi)[: shape[0], : shape[1]].contiguous()


def quantize_block_fp8(
    w: torch.Tensor, block: tuple[int, int] = (128, 128)
) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (e4m3 [out, in], fp32 scale_inv [ceil(out/bo), ceil(in/bi)]).

    Each block is scaled so its largest magnitude maps to 448, the e4m3 maximum.
    """
    b = _blocks(w.float(), block)  # [rows, bo, cols, bi]
    amax = b.abs().amax(dim=(1, 3))  # [rows, cols]
    scale_inv = (amax / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    q = (b / scale_inv[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return _unblock(q, tuple(w.shape)), scale_inv


def e4m3_to_float(q: torch.Tensor) -> torch.Tensor:
    """Exact e4m3 -> fp32. On CPU a 256-entry table lookup, ~3x faster than torch's cast."""
    if q.device.type != "cpu":
        return q.float()
    table = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    codes = q.contiguous().view(torch.uint8).flatten().int()
    return table.index_select(0, codes).view(q.shape)


def dequantize_block_fp8(
    q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)
) -> torch.Tensor:
    """(e4m3 [out, in], fp32 [ceil(out/bo), ceil(in/bi)]) -> fp32 [out, in]."""
    b = _blocks(e4m3_to_float(q), block)
    return _unblock(b * scale_inv.float()[:, None, :, None], tuple(q.shape))


# ---- block-FP8 weights kept in memory ------------------------------------------------------------
class WeightFormat(str, Enum):
    """How a checkpoint's linear weights live in memory.

    AUTO: as stored (a block-FP8 checkpoint stays FP8, others load in the model dtype); FP8:
    block-FP8, refused for a checkpoint that is not; DEQUANTIZE: widened to the model dtype.
    """

    AUTO = "auto"
    FP8 = "fp8"
    DEQUANTIZE = "dequantize"


@dataclass(frozen=True, eq=False)
class Fp8Weight:
    """A block-FP8 linear weight kept as stored: ``w[..., i, j] = q[..., i, j] * s[..., i // bo, j // bi]``.

    ``q``: float8_e4m3fn [..., out, in]; ``scale_inv`` (``s``): fp32 [..., ceil(out/bo), ceil(in/bi)];
    ``block``: (bo, bi). Leading dims stack experts: ``w[e]`` is expert e's [out, in] weight.
    """

    q: torch.Tensor
    scale_inv: torch.Tensor
    block: tuple[int, int] = (128, 128)

    def __post_init__(self) -> None:
        want = (*self.q.shape[:-2], *scale_shape(tuple(self.q.shape[-2:]), self.block))
        assert self.q.dtype == torch.float8_e4m3fn, f"Fp8Weight.q must be e4m3, got {self.q.dtype}"
        assert self.scale_inv.dtype == torch.float32 and tuple(self.scale_inv.shape) == want, (
            f"Fp8Weight.scale_inv must be fp32 {list(want)} for q {list(self.q.shape)} and block "
            f"{self.block}, got {self.scale_inv.dtype} {list(self.scale_inv.shape)}"
        )

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def nbytes(self) -> int:
        """1 B per e4m3 value + 4 B per block scale."""
        return self.q.numel() * self.q.element_size() + self.scale_inv.numel() * 4

    def __getitem__(self, i: int) -> Fp8Weight:
        return Fp8Weight(self.q[i], self.scale_inv[i], self.block)

    def contiguous(self) -> Fp8Weight:
        return Fp8Weight(self.q.contiguous(), self.scale_inv.contiguous(), self.block)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense [out, in] weight in ``dtype`` (computed in fp32)."""
        return dequantize_block_fp8(self.q, self.scale_inv, self.block).to(dtype)

    def with_row_block(self, rows: int) -> Fp8Weight:
        """The same weight with its scales restated per ``rows`` output rows (bo % rows == 0).

        Exact (each scale is repeated), so differently sized weights can be concatenated.
        """
        bo, bi = self.block
        assert bo % rows == 0, f"row block {rows} must divide the weight's block {bo}"
        n = math.ceil(self.q.shape[-2] / rows)
        scale = self.scale_inv.repeat_interleave(bo // rows, dim=-2)[..., :n, :]
        return Fp8Weight(self.q, scale.contiguous(), (rows, bi))


Weight = torch.Tensor | Fp8Weight  # a linear weight [..., out, in]: dense, or block-FP8


def cat_weights(parts: Sequence[Weight]) -> Weight:
    """Concatenate [out_i, in] linear weights along the output dim (one GEMM for one input).

    FP8 parts keep their codes; where a part ends inside a scale block (the q_a/kv_a fusion, or
    gate/up of a small expert), scales are restated on the finer row grid gcd(bo, sizes).
    """
    if not any(isinstance(p, Fp8Weight) for p in parts):
        return torch.cat(list(parts)).contiguous()
    assert all(isinstance(p, Fp8Weight) for p in parts), "cannot mix FP8 and dense weights"
    rows = math.gcd(parts[0].block[0], *(p.shape[-2] for p in parts[:-1]))
    fine = [p.with_row_block(rows) for p in parts]
    assert len({p.block for p in fine}) == 1, f"blocks differ: {[p.block for p in parts]}"
    q = torch.cat([p.q for p in fine], dim=-2).contiguous()
    return Fp8Weight(q, torch.cat([p.scale_inv for p in fine], dim=-2).contiguous(), fine[0].block)


def stack_weights(parts: Sequence[Weight]) -> Weight:
    """Stack same-shaped [out, in] weights (the experts of a layer) into [E, out, in]."""
    if not any(isinstance(p, Fp8Weight) for p in parts):
        return torch.stack(list(parts)).contiguous()
    assert all(isinstance(p, Fp8Weight) for p in parts), "cannot mix FP8 and dense weights"
    assert len({p.block for p in parts}) == 1, f"blocks differ: {[p.block for p in parts]}"
    q = torch.stack([p.q for p in parts])
    return Fp8Weight(q, torch.stack([p.scale_inv for p in parts]), parts[0].block)


def dense_weight(w: Weight, dtype: torch.dtype) -> torch.Tensor:
    """``w`` as a plain tensor in ``dtype`` (dequantised if FP8)."""
    return w.dequantize(dtype) if isinstance(w, Fp8Weight) else w.to(dtype)


def resident_bytes(weights: Iterable[Weight]) -> int:
    """Bytes of the distinct storages behind ``weights``: views and tied weights count once."""
    storages: dict[int, int] = {}
    for w in weights:
        for t in (w.q, w.scale_inv) if isinstance(w, Fp8Weight) else (w,):
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def fold_fp8_pairs(state: dict[str, torch.Tensor], block: tuple[int, int]) -> dict[str, Weight]:
    """``load_state_dict(..., keep_fp8=True)`` output with each (e4m3, ``_scale_inv``) pair as one
    ``Fp8Weight`` under the weight's name."""
    out: dict[str, Weight] = {}
    for name, t in state.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        scale = state.get(name + SCALE_SUFFIX)
        out[name] = t if scale is None else Fp8Weight(t, scale, block)
    return out


# ---- reading files -----------------------------------------------------------------------------
def weight_map(model_dir: str | Path) -> dict[str, str]:
    """Tensor name -> file name, from the index, or from the keys of a single-file checkpoint."""
    model_dir = Path(model_dir)
    index_path = model_dir / INDEX_FILE
    if index_path.exists():
        try:
            index = json.loads(index_path.read_text())
            mapping = index["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(
                f"{index_path}: not a valid safetensors index (needs a 'weight_map' object): {e}"
            ) from e
        if not isinstance(mapping, dict):
            raise WeightsError(f"{index_path}: 'weight_map' must map tensor names to file names")
        return {str(k): str(v) for k, v in mapping.items()}
    single = model_dir / SINGLE_FILE
    if single.exists():
        with _open(single) as f:
            return {name: SINGLE_FILE for name in f.keys()}
    raise WeightsError(
        f"{model_dir}: no weights found; expected {SINGLE_FILE} or {INDEX_FILE} with its shards"
    )


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        if _is_lfs_pointer(path):
            raise WeightsError(
                f"{path}: is a git-lfs pointer, not the weights; run `git lfs pull` in "
                f"{path.parent} (or download the real files)"
            ) from e
        raise WeightsError(
            f"{path}: cannot read safetensors file (truncated or corrupt?): {e}; "
            "re-download or regenerate this file"
        ) from e


def _is_lfs_pointer(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(40).startswith(b"version https://git-lfs")
    except OSError:
        return False


def _group_by_file(
    model_dir: Path, names: list[str], mapping: dict[str, str]
) -> dict[str, list[str]]:
    by_file: dict[str, list[str]] = {}
    for name in names:
        file = mapping.get(name)
        if file is None:
            where = INDEX_FILE if (model_dir / INDEX_FILE).exists() else SINGLE_FILE
            raise WeightsError(
                f"{model_dir / where}: missing tensor {name!r}; the checkpoint does not match "
                "config.json (wrong model directory or an incomplete download?)"
            )
        by_file.setdefault(file, []).append(name)
    for file in by_file:
        if not (model_dir / file).exists():
            raise WeightsError(
                f"{model_dir / INDEX_FILE}: names shard {file!r}, which does not exist in "
                f"{model_dir}; the download is incomplete"
            )
    return by_file


def _read(f, path: Path, name: str, shape: tuple[int, ...] | None) -> torch.Tensor:
    if name not in f.keys():
        raise WeightsError(
            f"{path}: missing tensor {name!r} (the index says it is in this file); "
            "the shard does not match its index"
        )
    try:
        actual = tuple(f.get_slice(name).get_shape())
        if shape is not None and actual != tuple(shape):
            raise WeightsError(
                f"{path}: tensor {name!r} has shape {list(actual)}, expected {list(shape)} "
                "from config.json; the checkpoint and config do not match"
            )
        return f.get_tensor(name)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise WeightsError(
            f"{path}: cannot read tensor {name!r} (truncated or corrupt?): {e}"
        ) from e


def _iter_tensors(
    model_dir: Path,
    by_file: dict[str, list[str]],
    shapes: dict[str, tuple[int, ...]],
    fp8_names: set[str],
    block: tuple[int, int],
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor as stored) for every requested name, one file open at a time."""
    for file, names in by_file.items():
        path = model_dir / file
        with _open(path) as f:
            for name in names:
                if name.endswith(SCALE_SUFFIX):
                    weight_shape = shapes[name.removesuffix(SCALE_SUFFIX)]
                    yield name, _read(f, path, name, scale_shape(weight_shape, block))
                    continue
                t = _read(f, path, name, shapes[name])
                if name in fp8_names and t.dtype != torch.float8_e4m3fn:
                    raise WeightsError(
                        f"{path}: tensor {name!r} is {t.dtype}, expected float8_e4m3fn "
                        "(config.json declares a block-FP8 checkpoint)"
                    )
                yield name, t


def load_state_dict(
    model_dir: str | Path,
    config: ModelConfig,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    expert_ids: list[int] | None = None,
    keep_fp8: bool = False,
    prefix: str = "",
    mapping: dict[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Read the tensors ``expected_shapes(config, expert_ids)`` names, in ``dtype`` on ``device``.

    ``e_score_correction_bias`` is always fp32. For a block-FP8 checkpoint the linear weights
    are dequantised (``q * scale_inv`` per block) unless ``keep_fp8``, which returns the e4m3
    weight and its fp32 ``<name>_scale_inv`` as stored. Raises ``WeightsError`` naming the file
    and tensor for a missing tensor or shard, a wrong shape or dtype, or an unreadable file.
    ``prefix`` reads only the names that start with it (e.g. one layer's experts). ``mapping``
    is the directory's ``weight_map``, for a caller reading it piece by piece (a large index
    takes long to parse).
    """
    model_dir = Path(model_dir)
    shapes = expected_shapes(config, expert_ids)
    if prefix:
        shapes = {n: s for n, s in shapes.items() if n.startswith(prefix)}
    block = config.fp8_block_size
    fp8_names = {n for n in shapes if config.is_fp8_checkpoint and is_fp8_linear(n)}
    names = [*shapes, *(n + SCALE_SUFFIX for n in fp8_names)]
    if mapping is None:
        mapping = weight_map(model_dir)
    by_file = _group_by_file(model_dir, names, mapping)
    out: dict[str, torch.Tensor] = {}
    stored: dict[str, torch.Tensor] = {}  # fp8 halves waiting for their partner
    for name, t in _iter_tensors(model_dir, by_file, shapes, fp8_names, block):
        weight = name.removesuffix(SCALE_SUFFIX)
        if weight not in fp8_names:
            bias = name.endswith("e_score_correction_bias")
            out[name] = t.to(device=device, dtype=torch.float32 if bias else dtype)
            continue
        stored[name] = t
        if weight not in stored or weight + SCALE_SUFFIX not in stored:
            continue
        q = stored.pop(weight).to(device)
        scale = stored.pop(weight + SCALE_SUFFIX).to(device=device, dtype=torch.float32)
        if keep_fp8:
            out[weight], out[weight + SCALE_SUFFIX] = q, scale
        else:  # dequantised where the weight will live (the GPU, if any)
            out[weight] = dequantize_block_fp8(q, scale, block).to(dtype)
    tied = config.tie_word_embeddings and "model.embed_tokens.weight" in out
    if tied:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    order = [*shapes, *(["lm_head.weight"] if tied else [])]
    if keep_fp8:
        order = [m for n in order for m in ((n, n + SCALE_SUFFIX) if n in fp8_names else (n,))]
    return {n: out[n] for n in order}


def load_model_dir(
    model_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    expert_ids: list[int] | None = None,
    keep_fp8: bool = False,
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """``config.json`` + weights of a model directory; config problems become ``WeightsError``."""
    try:
        config = ModelConfig.from_json(Path(model_dir) / "config.json")
    except ConfigError as e:
        raise WeightsError(str(e)) from e
    state = load_state_dict(
        model_dir,
        config,
        dtype=dtype,
        device=device,
        expert_ids=expert_ids,
        keep_fp8=keep_fp8,
    )
    return config, state


def load_weights(
    model_dir: str | Path,
    config: ModelConfig,
    *,
    weight_format: WeightFormat | str = WeightFormat.AUTO,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    expert_ids: list[int] | None = None,
    prefix: str = "",
    mapping: dict[str, str] | None = None,
) -> dict[str, Weight]:
    """``load_state_dict``, with block-FP8 linears as ``Fp8Weight`` unless ``weight_format`` says
    ``dequantize`` (see ``WeightFormat``); everything else in ``dtype``. ``prefix`` reads only
    the names that start with it; ``mapping`` is the directory's ``weight_map`` if known."""
    try:
        fmt = WeightFormat(weight_format)
    except ValueError:
        choices = ", ".join(f.value for f in WeightFormat)
        raise ValueError(f"weight_format must be one of {choices}; got {weight_format!r}") from None
    if fmt is WeightFormat.FP8 and not config.is_fp8_checkpoint:
        raise WeightsError(
            f"{model_dir}: weight_format='fp8' needs a block-FP8 checkpoint (config.json "
            "quantization_config.quant_method 'fp8'); use 'auto' or 'dequantize' for this one"
        )
    keep_fp8 = config.is_fp8_checkpoint and fmt is not WeightFormat.DEQUANTIZE
    state = load_state_dict(
        model_dir,
        config,
        dtype=dtype,
        device=device,
        expert_ids=expert_ids,
        keep_fp8=keep_fp8,
        prefix=prefix,
        mapping=mapping,
    )
    return fold_fp8_pairs(state, config.fp8_block_size) if keep_fp8 else dict(state)
