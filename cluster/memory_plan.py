"""Memory planning (``tidal plan``): bytes per rank for a model, a GPU size and a layout.

An instance is ``num_ranks`` rank actors, one GPU each. Attention is data-parallel: every rank
holds the attention, the dense layers, the shared experts, the router, the embeddings and
lm_head (replicated), and its own latent KV cache. Routed experts are partitioned: a rank holds
``n_routed_experts / num_ranks`` of them per MoE layer, plus ``num_redundant_experts`` extra
slots per MoE layer that EPLB fills with replicas of hot experts.

Per rank: ``kv_bytes = gpu_bytes - weight_bytes - reserve_bytes``; the KV tokens that fit are
``kv_bytes // kv_bytes_per_token`` and, since a sequence lives on one rank, the longest context
a rank can hold is ``min(kv_tokens, max_position_embeddings)``.

Sizes are in decimal GB (10^9 bytes). The parameter count is what tidal loads
(``model.weights.expected_shapes``): a DeepSeek-V3 checkpoint's MTP layer is not counted.
Plain Python (no torch, no Ray) so the CLI and the settings check share it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from model.config import ModelConfig

GB = 10**9
DEFAULT_RESERVE_FRACTION = 0.10  # activations, MoE dispatch buffers, NCCL, CUDA graphs
FP8_SCALE_BYTES = 4  # one fp32 scale_inv per weight block
KV_FP8_GROUP = 128  # latent values per fp32 scale in the fp8 KV format
WEIGHT_FORMATS = ("fp8", "bf16", "fp16", "fp32")
KV_FORMATS = ("bf16", "fp8", "fp32")
_ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
_DTYPE_FORMATS = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


class PlanError(ValueError):
    """A layout that cannot be served; the message says what to change."""


class TensorKind(str, Enum):
    """How a tensor is stored: which tensors a block-FP8 checkpoint quantises."""

    LINEAR = "linear"  # decoder linear layers: block-FP8 in fp8 checkpoints
    PLAIN = "plain"  # embeddings, lm_head, norms, router gate: always 16-bit (or fp32)
    FP32 = "fp32"  # the router's e_score_correction_bias, fp32 in every checkpoint


@dataclass(frozen=True)
class Tensors:
    """``count`` tensors of one ``shape`` and ``kind``."""

    shape: tuple[int, ...]
    count: int
    kind: TensorKind

    @property
    def numel(self) -> int:
        return self.count * math.prod(self.shape)

    def nbytes(self, weight_format: str, block: tuple[int, int]) -> int:
        """Bytes in memory when weights are held as ``weight_format``."""
        if self.kind is TensorKind.FP32:
            return 4 * self.numel
        if weight_format == "fp8" and self.kind is TensorKind.LINEAR:
            rows, cols = self.shape
            num_blocks = math.ceil(rows / block[0]) * math.ceil(cols / block[1])
            return self.numel + self.count * num_blocks * FP8_SCALE_BYTES
        element = _ELEMENT_BYTES["bf16" if weight_format == "fp8" else weight_format]
        return element * self.numel


def _mlp(hidden: int, inter: int, count: int) -> list[Tensors]:
    """gate_proj, up_proj [inter, hidden] and down_proj [hidden, inter]."""
    return [
        Tensors((inter, hidden), 2 * count, TensorKind.LINEAR),
        Tensors((hidden, inter), count, TensorKind.LINEAR),
    ]


def _attention(cfg: ModelConfig, count: int) -> list[Tensors]:
    """MLA projections and their norms (mirrors ``model.weights._attention_shapes``)."""
    h, n, r = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank
    if cfg.q_lora_rank is None:
        q = [Tensors((n * cfg.qk_head_dim, h), count, TensorKind.LINEAR)]
    else:
        q = [
            Tensors((cfg.q_lora_rank, h), count, TensorKind.LINEAR),
            Tensors((cfg.q_lora_rank,), count, TensorKind.PLAIN),
            Tensors((n * cfg.qk_head_dim, cfg.q_lora_rank), count, TensorKind.LINEAR),
        ]
    return [
        *q,
        Tensors((r + cfg.qk_rope_head_dim, h), count, TensorKind.LINEAR),
        Tensors((r,), count, TensorKind.PLAIN),
        Tensors((n * (cfg.qk_nope_head_dim + cfg.v_head_dim), r), count, TensorKind.LINEAR),
        Tensors((h, n * cfg.v_head_dim), count, TensorKind.LINEAR),
    ]


@dataclass(frozen=True)
class ModelWeights:
    """The tensors of one model, split into the replicated part and one routed expert."""

    config: ModelConfig

    @property
    def num_moe_layers(self) -> int:
        return len(self.config.moe_layer_ids)

    @property
    def num_dense_layers(self) -> int:
        return self.config.num_hidden_layers - self.num_moe_layers

    @property
    def block(self) -> tuple[int, int]:
        return self.config.fp8_block_size

    @property
    def replicated(self) -> dict[str, list[Tensors]]:
        """Component -> tensors every rank holds."""
        cfg, h, v = self.config, self.config.hidden_size, self.config.vocab_size
        num_layers, num_moe = cfg.num_hidden_layers, self.num_moe_layers
        shared_inter = cfg.moe_intermediate_size * cfg.n_shared_experts
        return {
            "embeddings": [Tensors((v, h), 1 if cfg.tie_word_embeddings else 2, TensorKind.PLAIN)],
            "norms": [Tensors((h,), 2 * num_layers + 1, TensorKind.PLAIN)],
            "attention": _attention(cfg, num_layers),
            "dense_mlp": _mlp(h, cfg.intermediate_size, self.num_dense_layers),
            "router": [
                Tensors((cfg.n_routed_experts, h), num_moe, TensorKind.PLAIN),
                Tensors((cfg.n_routed_experts,), num_moe, TensorKind.FP32),
            ],
            "shared_experts": _mlp(h, shared_inter, num_moe if shared_inter else 0),
        }

    @property
    def expert_slot(self) -> list[Tensors]:
        """One routed-expert slot in every MoE layer (a rank's slot holds one expert per layer)."""
        return _mlp(self.config.hidden_size, self.config.moe_intermediate_size, self.num_moe_layers)

    @property
    def num_replicated_params(self) -> int:
        return sum(t.numel for ts in self.replicated.values() for t in ts)

    @property
    def num_expert_slot_params(self) -> int:
        return sum(t.numel for t in self.expert_slot)

    @property
    def num_params(self) -> int:
        """Every parameter tidal loads: the replicated part plus all routed experts."""
        return self.num_replicated_params + self.config.n_routed_experts * (
            self.num_expert_slot_params
        )

    def replicated_bytes(self, weight_format: str) -> int:
        return sum(
            t.nbytes(weight_format, self.block) for ts in self.replicated.values() for t in ts
        )

    def expert_slot_bytes(self, weight_format: str) -> int:
        return sum(t.nbytes(weight_format, self.block) for t in self.expert_slot)

    def total_bytes(self, weight_format: str) -> int:
        """The whole model held as ``weight_format`` (one rank, every expert)."""
        num_experts = self.config.n_routed_experts
        return self.replicated_bytes(weight_format) + num_experts * self.expert_slot_bytes(
            weight_format
        )


def kv_bytes_per_token_per_layer(kv_format: str, kv_lora_rank: int, rope_dim: int) -> int:
    """Latent KV bytes of one token in one layer.

    The same arithmetic as ``model.kv_cache.bytes_per_token`` (which imports torch): bf16 is
    (512 + 64) x 2 = 1,152 B at K2 size, fp8 is 512 + 4 x 512/128 + 2 x 64 = 656 B.
    """
    if kv_format == "fp8":
        assert kv_lora_rank % KV_FP8_GROUP == 0, "fp8 latent needs kv_lora_rank % 128 == 0"
        return kv_lora_rank + 4 * (kv_lora_rank // KV_FP8_GROUP) + 2 * rope_dim
    return (kv_lora_rank + rope_dim) * (4 if kv_format == "fp32" else 2)


@dataclass(frozen=True)
class Hardware:
    """The GPUs ranks run on (one rank per GPU)."""

    gpu_mem_gb: float
    gpus_per_node: int = 8
    reserve_gb: float | None = None  # None -> DEFAULT_RESERVE_FRACTION of gpu_mem_gb

    @property
    def gpu_bytes(self) -> int:
        return int(self.gpu_mem_gb * GB)

    @property
    def reserve_bytes(self) -> int:
        reserve_gb = self.reserve_gb
        if reserve_gb is None:
            reserve_gb = DEFAULT_RESERVE_FRACTION * self.gpu_mem_gb
        return int(reserve_gb * GB)


@dataclass(frozen=True)
class RoleLayout:
    """One role's instances: how many, and how many ranks (GPUs) each."""

    role: str
    num_ranks: int
    num_instances: int = 1


@dataclass(frozen=True)
class PlanOptions:
    """How weights and KV are held, and what every rank must be able to hold."""

    weight_format: str = "fp8"
    kv_format: str = "bf16"
    num_redundant_experts: int = 0  # extra expert slots per rank per MoE layer (EPLB)
    require_context_len: int | None = None


@dataclass(frozen=True)
class RankPlan:
    """The memory of one rank of one role."""

    layout: RoleLayout
    hardware: Hardware
    num_expert_slots: int  # routed-expert slots per rank per MoE layer
    weight_bytes: int
    kv_bytes_per_token: int  # all layers
    max_position_embeddings: int

    @property
    def num_nodes(self) -> int:
        """Nodes per instance."""
        return math.ceil(self.layout.num_ranks / self.hardware.gpus_per_node)

    @property
    def kv_bytes(self) -> int:
        """Bytes left for the KV cache (negative when the weights do not fit)."""
        return self.hardware.gpu_bytes - self.weight_bytes - self.hardware.reserve_bytes

    @property
    def num_kv_tokens(self) -> int:
        return max(self.kv_bytes, 0) // self.kv_bytes_per_token

    @property
    def max_context_len(self) -> int:
        """The longest single sequence one rank can hold (attention is data-parallel)."""
        return min(self.num_kv_tokens, self.max_position_embeddings)


@dataclass(frozen=True)
class ClusterPlan:
    """Every role's rank plan for one model, hardware and options."""

    config: ModelConfig
    weights: ModelWeights
    options: PlanOptions
    hardware: Hardware
    ranks: tuple[RankPlan, ...]

    def table(self) -> str:
        """The plan as a fixed-width table (sizes in GB)."""
        o, hw = self.options, self.hardware
        kv_per_token = self.ranks[0].kv_bytes_per_token if self.ranks else 0
        lines = [
            f"model {self.config.model_type}: {self.weights.num_params:,} params, "
            f"{self.weights.total_bytes(o.weight_format) / GB:,.1f} GB as {o.weight_format}; "
            f"max_position_embeddings {self.config.max_position_embeddings:,}",
            f"GPU {hw.gpu_mem_gb:g} GB ({hw.gpus_per_node}/node), reserve "
            f"{hw.reserve_bytes / GB:.1f} GB/rank; KV {o.kv_format} "
            f"{kv_per_token:,} B/token; redundant experts {o.num_redundant_experts}/rank",
            f"{'role':<8}{'inst':>5}{'ranks':>7}{'nodes':>7}{'experts':>9}{'weights GB':>12}"
            f"{'KV GB':>9}{'KV tokens':>13}{'longest ctx':>13}",
        ]
        for r in self.ranks:
            lines.append(
                f"{r.layout.role:<8}{r.layout.num_instances:>5}{r.layout.num_ranks:>7}"
                f"{r.num_nodes:>7}{r.num_expert_slots:>9}{r.weight_bytes / GB:>12.1f}"
                f"{r.kv_bytes / GB:>9.1f}{r.num_kv_tokens:>13,}{r.max_context_len:>13,}"
            )
        lines.append("(per rank; ranks/nodes per instance; experts = routed slots per MoE layer)")
        return "\n".join(lines)


# ---- planning -------------------------------------------------------------------------------
def _divisors_near(n: int, target: int) -> str:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    below = [d for d in divisors if d < target]
    above = [d for d in divisors if d > target]
    near = ([below[-1]] if below else []) + ([above[0]] if above else [])
    return " or ".join(str(d) for d in near)


def _check_layout(cfg: ModelConfig, layout: RoleLayout) -> None:
    if layout.num_ranks < 1 or layout.num_instances < 1:
        raise PlanError(
            f"{layout.role}: {layout.num_instances} instances of {layout.num_ranks} ranks; "
            "use at least 1 of each"
        )
    num_experts = cfg.n_routed_experts
    if num_experts and num_experts % layout.num_ranks:
        raise PlanError(
            f"{layout.role}: {num_experts} routed experts do not split evenly over "
            f"{layout.num_ranks} ranks; use a rank count that divides {num_experts} "
            f"(e.g. {_divisors_near(num_experts, layout.num_ranks)})"
        )


def plan_rank(
    weights: ModelWeights, layout: RoleLayout, hardware: Hardware, options: PlanOptions
) -> RankPlan:
    """The memory of one rank of ``layout`` (no fit check; see ``check_fits``)."""
    cfg = weights.config
    _check_layout(cfg, layout)
    num_slots = cfg.n_routed_experts // layout.num_ranks
    if cfg.n_routed_experts:
        num_slots += options.num_redundant_experts
    fmt = options.weight_format
    kv_per_layer = kv_bytes_per_token_per_layer(
        options.kv_format, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    )
    return RankPlan(
        layout=layout,
        hardware=hardware,
        num_expert_slots=num_slots,
        weight_bytes=weights.replicated_bytes(fmt) + num_slots * weights.expert_slot_bytes(fmt),
        kv_bytes_per_token=kv_per_layer * cfg.num_hidden_layers,
        max_position_embeddings=cfg.max_position_embeddings,
    )


def _min_fitting_ranks(weights: ModelWeights, plan: RankPlan, options: PlanOptions) -> int | None:
    """The smallest rank count dividing the experts whose rank holds weights and >= 1 token."""
    num_experts = weights.config.n_routed_experts
    for num_ranks in range(1, max(num_experts, 1) + 1):
        if num_experts and num_experts % num_ranks:
            continue
        layout = RoleLayout(plan.layout.role, num_ranks)
        if plan_rank(weights, layout, plan.hardware, options).num_kv_tokens > 0:
            return num_ranks
    return None


def _remedies(options: PlanOptions, *first: str) -> str:
    """The changes that free KV memory, leaving out those already made."""
    fixes = list(first)
    if options.weight_format != "fp8":
        fixes.append("fp8 weights (--weights fp8, a block-FP8 checkpoint)")
    if options.num_redundant_experts:
        fixes.append("fewer redundant experts")
    fixes.append("a smaller --reserve-gb")
    return ", ".join(fixes[:-1]) + " or " + fixes[-1]


def check_fits(weights: ModelWeights, plan: RankPlan, options: PlanOptions) -> None:
    """``PlanError`` with the numbers and a fix when ``plan`` cannot serve."""
    role, hw, num_ranks = plan.layout.role, plan.hardware, plan.layout.num_ranks
    if plan.num_kv_tokens < 1:
        need = _min_fitting_ranks(weights, plan, options)
        more = f"at least {need} ranks per {role} instance" if need else "GPUs with more memory"
        raise PlanError(
            f"{role}: with {num_ranks} rank(s) per instance each rank holds "
            f"{plan.weight_bytes / GB:,.1f} GB of {options.weight_format} weights, but a "
            f"{hw.gpu_mem_gb:g} GB GPU less the {hw.reserve_bytes / GB:.1f} GB reserve leaves "
            f"{(hw.gpu_bytes - hw.reserve_bytes) / GB:,.1f} GB and no room for KV; use "
            + _remedies(options, more)
        )
    need_len = options.require_context_len
    if need_len is not None and plan.max_context_len < need_len:
        kv_fixes = [f"more {role} ranks (fewer experts per rank)"]
        if options.kv_format != "fp8":
            kv_fixes.append("fp8 KV (--kv-format fp8)")
        raise PlanError(
            f"{role}: with {num_ranks} rank(s) per instance a rank holds "
            f"{plan.num_kv_tokens:,} KV tokens ({plan.kv_bytes / GB:.1f} GB at "
            f"{plan.kv_bytes_per_token:,} B/token), fewer than the required {need_len:,}; use "
            + _remedies(options, *kv_fixes)
        )


def _check_options(cfg: ModelConfig, options: PlanOptions) -> None:
    if options.weight_format not in WEIGHT_FORMATS:
        raise PlanError(f"weight format {options.weight_format!r}; use one of {WEIGHT_FORMATS}")
    if options.kv_format not in KV_FORMATS:
        raise PlanError(f"KV format {options.kv_format!r}; use one of {KV_FORMATS}")
    if options.weight_format == "fp8" and not cfg.is_fp8_checkpoint:
        raise PlanError(
            "fp8 weights need a block-FP8 checkpoint (quantization_config quant_method fp8); "
            "this one is not: use bf16 weights"
        )
    if options.num_redundant_experts < 0:
        raise PlanError(f"{options.num_redundant_experts} redundant experts; use 0 or more")
    need_len = options.require_context_len
    if need_len is not None and need_len > cfg.max_position_embeddings:
        raise PlanError(
            f"required context {need_len:,} exceeds the model's max_position_embeddings "
            f"{cfg.max_position_embeddings:,}; ask for at most that"
        )


def plan_cluster(
    config: ModelConfig,
    layouts: list[RoleLayout],
    hardware: Hardware,
    options: PlanOptions,
) -> ClusterPlan:
    """Plan every role; ``PlanError`` naming the first role that cannot serve."""
    _check_options(config, options)
    if hardware.gpu_mem_gb <= 0 or hardware.gpus_per_node < 1:
        raise PlanError("give a positive GPU memory (GB) and at least 1 GPU per node")
    weights = ModelWeights(config)
    ranks = tuple(plan_rank(weights, layout, hardware, options) for layout in layouts)
    for plan in ranks:
        check_fits(weights, plan, options)
    return ClusterPlan(config, weights, options, hardware, ranks)


def load_config(path: str | Path) -> ModelConfig:
    """A model directory or its ``config.json``."""
    return ModelConfig.from_json(path)


# ---- deploy settings ------------------------------------------------------------------------
# Keys a Serve config's ``args:`` would need for a multi-rank plan; ServeSettings lacks them
# today, so each has the default that matches what tidal runs now (1 rank per instance, weights
# dequantised to ``dtype``).
SETTINGS_KEYS = {
    "prefill_ranks": 1,
    "decode_ranks": 1,
    "colocated_ranks": 1,
    "gpus_per_node": 8,
    "gpu_mem_gb": None,
    "reserve_gb": None,
    "weight_format": None,  # None -> from dtype
    "redundant_experts": 0,
    "require_context": None,
}


def _setting(args: Mapping[str, Any], key: str, kind: type) -> Any:
    value = args.get(key, SETTINGS_KEYS.get(key))
    if value is None:
        return None
    try:
        return kind(value)
    except (TypeError, ValueError) as e:
        raise PlanError(f"settings key {key}: {value!r} is not a {kind.__name__}") from e


def _settings_layouts(args: Mapping[str, Any]) -> list[RoleLayout]:
    colocated = _setting(args, "colocated", int)
    if colocated is not None:
        return [RoleLayout("mixed", _setting(args, "colocated_ranks", int), colocated)]
    instances = {role: _setting(args, role, int) for role in ("prefill", "decode")}
    return [
        RoleLayout(role, _setting(args, f"{role}_ranks", int), 1 if num is None else num)
        for role, num in instances.items()
        if num is None or num > 0  # ServeSettings defaults to 1 of each; 0 means no pool
    ]


def _settings_config(args: Mapping[str, Any]) -> ModelConfig:
    if args.get("model") is not None:
        return load_config(Path(str(args["model"])).expanduser())
    from model.checkpoint import preset_config  # imports torch; only for built-in presets

    preset = str(args.get("preset", "k2-tiny"))
    return ModelConfig.from_dict(preset_config(preset), source=f"preset {preset}")


def plan_from_settings(
    args: Mapping[str, Any],
    *,
    gpu_mem_gb: float | None = None,
    config: ModelConfig | None = None,
) -> ClusterPlan:
    """Plan the layout of a Serve config's ``args:`` (``ServeSettings`` keys plus
    ``SETTINGS_KEYS``). ``gpu_mem_gb`` (e.g. measured on a worker) overrides the key;
    ``config`` saves reading the model's config.json."""
    mem = gpu_mem_gb if gpu_mem_gb is not None else _setting(args, "gpu_mem_gb", float)
    if mem is None:
        raise PlanError("settings need gpu_mem_gb (GB per GPU, e.g. 141 for an H200)")
    cfg = config if config is not None else _settings_config(args)
    weight_format = _setting(args, "weight_format", str)
    if weight_format is None:
        weight_format = _DTYPE_FORMATS.get(str(args.get("dtype", "float32")))
        if weight_format is None:
            raise PlanError(f"settings dtype {args.get('dtype')!r}; use {sorted(_DTYPE_FORMATS)}")
    options = PlanOptions(
        weight_format=weight_format,
        kv_format=str(args.get("kv_format", "bf16")),
        num_redundant_experts=_setting(args, "redundant_experts", int),
        require_context_len=_setting(args, "require_context", int),
    )
    hardware = Hardware(
        gpu_mem_gb=mem,
        gpus_per_node=_setting(args, "gpus_per_node", int),
        reserve_gb=_setting(args, "reserve_gb", float),
    )
    return plan_cluster(cfg, _settings_layouts(args), hardware, options)
