"""Memory planning (``tidal plan``): bytes per rank for a model, a GPU size and a layout.

An instance is ``num_ranks`` rank actors, one GPU each. Attention is data-parallel: every rank
holds the attention, the dense layers, the shared experts, the router, the embeddings and
lm_head (replicated), and its own latent KV cache. Routed experts are partitioned: a rank holds
``n_routed_experts / num_ranks`` of them per MoE layer, plus ``num_redundant_experts`` extra
slots per MoE layer that EPLB fills with replicas of hot experts.

Weights are counted as the engine holds them (``model.Engine.weight_bytes``), with the
vocabulary of ``Engine.load``: ``weight_format`` auto keeps a block-FP8 checkpoint's linears FP8
(e4m3 + one fp32 scale per block; a fused linear's scales restated on its finer row grid), fp8
insists on that, dequantize widens them to ``dtype``. Always in ``dtype``: embeddings, lm_head,
norms and kv_b_proj (dequantised at load: the absorbed decode slices it per head); always fp32:
the router's gate and bias.

Per rank: ``kv_bytes = gpu_bytes - weight_bytes - reserve_bytes``; the KV tokens that fit are
``kv_bytes // kv_bytes_per_token`` and, since a sequence lives on one rank, the longest context
a rank can hold is ``min(kv_tokens, max_position_embeddings)``.

Sizes are in decimal GB (10^9 bytes). The parameter count is what tidal loads
(``model.weights.expected_shapes``): a DeepSeek-V3 checkpoint's MTP layer is not counted.
Plain Python (no torch, no Ray) so the CLI and the serve-time check share it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from model.config import ModelConfig

if TYPE_CHECKING:
    from cluster.settings import ServeSettings

GB = 10**9
DEFAULT_RESERVE_FRACTION = 0.10  # activations, MoE dispatch buffers, NCCL, CUDA graphs
FP8_SCALE_BYTES = 4  # one fp32 scale_inv per weight block
KV_FP8_GROUP = 128  # latent values per fp32 scale in the fp8 KV format
WEIGHT_FORMATS = ("auto", "fp8", "dequantize")  # Engine.load's (model.weights.WeightFormat)
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
KV_FORMATS = ("bf16", "fp8", "fp32")
_DTYPE_KV_FORMATS = {"bfloat16": "bf16", "float32": "fp32"}  # kv_format auto (model.kv_cache)
_STORED_BYTES = 2  # a checkpoint's 16-bit tensors (HF K2 / DeepSeek-V3: bf16)


class PlanError(ValueError):
    """A layout that cannot be served; the message says what to change."""


class TensorKind(str, Enum):
    """How a tensor is stored in the checkpoint and held in memory."""

    LINEAR = "linear"  # block-FP8 in an fp8 checkpoint; held FP8 unless dequantised
    DEQUANTIZED = "dequantized"  # kv_b_proj: block-FP8 in the checkpoint, held in the dtype
    PLAIN = "plain"  # embeddings, lm_head, norms: 16-bit stored, held in the dtype
    ROUTER = "router"  # the router gate: 16-bit stored, held fp32 (model.moe.Router)
    FP32 = "fp32"  # the router's e_score_correction_bias, fp32 everywhere


@dataclass(frozen=True)
class HeldWeights:
    """How an engine holds the weights: its ``dtype`` and whether block-FP8 linears stay FP8."""

    dtype: str
    is_fp8: bool

    @property
    def element_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def name(self) -> str:
        return f"fp8+{self.dtype}" if self.is_fp8 else self.dtype


def held_weights(config: ModelConfig, weight_format: str, dtype: str) -> HeldWeights:
    """``Engine.load``'s rule (``model.weights.load_weights``), without torch: ``auto`` keeps a
    block-FP8 checkpoint FP8, ``fp8`` insists on one, ``dequantize`` widens to ``dtype``."""
    if weight_format not in WEIGHT_FORMATS:
        raise PlanError(f"weight_format {weight_format!r}; use one of {', '.join(WEIGHT_FORMATS)}")
    if dtype not in DTYPE_BYTES:
        raise PlanError(f"dtype {dtype!r}; use one of {', '.join(DTYPE_BYTES)}")
    if weight_format == "fp8" and not config.is_fp8_checkpoint:
        raise PlanError(
            "weight_format fp8 needs a block-FP8 checkpoint (config.json quantization_config "
            "quant_method fp8) and this one is not: use weight_format auto or dequantize"
        )
    return HeldWeights(dtype, config.is_fp8_checkpoint and weight_format != "dequantize")


@dataclass(frozen=True)
class Tensors:
    """``count`` tensors of one ``shape`` and ``kind``. ``row_block``: rows per FP8 scale when
    held fused (``model.weights.cat_weights`` restates scales on gcd(128, part sizes) rows)."""

    shape: tuple[int, ...]
    count: int
    kind: TensorKind
    row_block: int | None = None

    @property
    def numel(self) -> int:
        return self.count * math.prod(self.shape)

    def _fp8_bytes(self, block: tuple[int, int]) -> int:
        rows, cols = self.shape
        num_blocks = math.ceil(rows / block[0]) * math.ceil(cols / block[1])
        return self.numel + self.count * num_blocks * FP8_SCALE_BYTES

    def held_bytes(self, held: HeldWeights, block: tuple[int, int]) -> int:
        """Bytes in memory as the engine holds them."""
        if self.kind in (TensorKind.FP32, TensorKind.ROUTER):
            return 4 * self.numel
        if self.kind is TensorKind.LINEAR and held.is_fp8:
            return self._fp8_bytes((self.row_block or block[0], block[1]))
        return held.element_bytes * self.numel

    def stored_bytes(self, is_fp8: bool, block: tuple[int, int]) -> int:
        """Bytes in the checkpoint's safetensors files."""
        if self.kind is TensorKind.FP32:
            return 4 * self.numel
        if is_fp8 and self.kind in (TensorKind.LINEAR, TensorKind.DEQUANTIZED):
            return self._fp8_bytes(block)
        return _STORED_BYTES * self.numel


def _mlp(hidden: int, inter: int, count: int, block_rows: int) -> list[Tensors]:
    """gate_proj, up_proj [inter, hidden] (held fused) and down_proj [hidden, inter]."""
    return [
        Tensors((inter, hidden), 2 * count, TensorKind.LINEAR, math.gcd(block_rows, inter)),
        Tensors((hidden, inter), count, TensorKind.LINEAR),
    ]


def _attention(cfg: ModelConfig, count: int) -> list[Tensors]:
    """MLA projections and their norms (mirrors ``model.weights._attention_shapes``)."""
    h, n, r = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank
    kv_a_shape = (r + cfg.qk_rope_head_dim, h)
    if cfg.q_lora_rank is None:
        q = [Tensors((n * cfg.qk_head_dim, h), count, TensorKind.LINEAR)]
        kv_a = Tensors(kv_a_shape, count, TensorKind.LINEAR)
    else:  # q_a and kv_a held fused (one GEMM for one input)
        fused_rows = math.gcd(cfg.fp8_block_size[0], cfg.q_lora_rank)
        q = [
            Tensors((cfg.q_lora_rank, h), count, TensorKind.LINEAR, fused_rows),
            Tensors((cfg.q_lora_rank,), count, TensorKind.PLAIN),
            Tensors((n * cfg.qk_head_dim, cfg.q_lora_rank), count, TensorKind.LINEAR),
        ]
        kv_a = Tensors(kv_a_shape, count, TensorKind.LINEAR, fused_rows)
    return [
        *q,
        kv_a,
        Tensors((r,), count, TensorKind.PLAIN),
        Tensors((n * (cfg.qk_nope_head_dim + cfg.v_head_dim), r), count, TensorKind.DEQUANTIZED),
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
        num_layers, num_moe, rows = cfg.num_hidden_layers, self.num_moe_layers, self.block[0]
        shared_inter = cfg.moe_intermediate_size * cfg.n_shared_experts
        return {
            "embeddings": [Tensors((v, h), 1 if cfg.tie_word_embeddings else 2, TensorKind.PLAIN)],
            "norms": [Tensors((h,), 2 * num_layers + 1, TensorKind.PLAIN)],
            "attention": _attention(cfg, num_layers),
            "dense_mlp": _mlp(h, cfg.intermediate_size, self.num_dense_layers, rows),
            "router": [
                Tensors((cfg.n_routed_experts, h), num_moe, TensorKind.ROUTER),
                Tensors((cfg.n_routed_experts,), num_moe, TensorKind.FP32),
            ],
            "shared_experts": _mlp(h, shared_inter, num_moe if shared_inter else 0, rows),
        }

    @property
    def expert_slot(self) -> list[Tensors]:
        """One routed-expert slot in every MoE layer (a rank's slot holds one expert per layer)."""
        cfg = self.config
        return _mlp(cfg.hidden_size, cfg.moe_intermediate_size, self.num_moe_layers, self.block[0])

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

    def replicated_bytes(self, held: HeldWeights) -> int:
        return sum(t.held_bytes(held, self.block) for ts in self.replicated.values() for t in ts)

    def expert_slot_bytes(self, held: HeldWeights) -> int:
        return sum(t.held_bytes(held, self.block) for t in self.expert_slot)

    def total_bytes(self, held: HeldWeights) -> int:
        """The whole model held as ``held`` (one rank, every expert)."""
        num_experts = self.config.n_routed_experts
        return self.replicated_bytes(held) + num_experts * self.expert_slot_bytes(held)

    def stored_bytes(self) -> int:
        """The checkpoint's tensor bytes (block-FP8 linears if it is an fp8 checkpoint)."""
        fp8, block = self.config.is_fp8_checkpoint, self.block
        tensors = [t for ts in self.replicated.values() for t in ts]
        experts = sum(t.stored_bytes(fp8, block) for t in self.expert_slot)
        return sum(t.stored_bytes(fp8, block) for t in tensors) + (
            self.config.n_routed_experts * experts
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
    """The GPUs ranks run on (one rank per GPU, ``ranks_per_node`` GPUs per node)."""

    gpu_mem_gb: float
    ranks_per_node: int = 8
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
    """How weights and KV are held (``Engine.load``'s vocabulary), and what every rank must be
    able to hold."""

    weight_format: str = "auto"
    dtype: str = "bfloat16"
    kv_format: str = "bf16"
    num_redundant_experts: int = 0  # extra expert slots per rank per MoE layer (EPLB)
    require_context_len: int | None = None
    num_cache_tokens: int | None = None  # the KV cache each rank allocates (num_pages x page)


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
        """Nodes per instance (ranks packed node by node)."""
        return math.ceil(self.layout.num_ranks / self.hardware.ranks_per_node)

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
    held: HeldWeights
    hardware: Hardware
    ranks: tuple[RankPlan, ...]

    def table(self) -> str:
        """The plan as a fixed-width table (sizes in GB)."""
        o, hw = self.options, self.hardware
        kv_per_token = self.ranks[0].kv_bytes_per_token if self.ranks else 0
        cache = "" if o.num_cache_tokens is None else f"; cache {o.num_cache_tokens:,} tokens/rank"
        lines = [
            f"model {self.config.model_type}: {self.weights.num_params:,} params, "
            f"{self.weights.total_bytes(self.held) / GB:,.1f} GB as {self.held.name} "
            f"(weight_format {o.weight_format}); "
            f"max_position_embeddings {self.config.max_position_embeddings:,}",
            f"GPU {hw.gpu_mem_gb:g} GB ({hw.ranks_per_node}/node), reserve "
            f"{hw.reserve_bytes / GB:.1f} GB/rank; KV {o.kv_format} "
            f"{kv_per_token:,} B/token; redundant experts {o.num_redundant_experts}/rank{cache}",
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


def check_layout(cfg: ModelConfig, layout: RoleLayout) -> None:
    """``PlanError`` unless the routed experts split evenly over the layout's ranks."""
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
    weights: ModelWeights,
    layout: RoleLayout,
    hardware: Hardware,
    options: PlanOptions,
    held: HeldWeights,
) -> RankPlan:
    """The memory of one rank of ``layout`` (no fit check; see ``check_fits``)."""
    cfg = weights.config
    check_layout(cfg, layout)
    num_slots = cfg.n_routed_experts // layout.num_ranks
    if cfg.n_routed_experts:
        num_slots += options.num_redundant_experts
    kv_per_layer = kv_bytes_per_token_per_layer(
        options.kv_format, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    )
    return RankPlan(
        layout=layout,
        hardware=hardware,
        num_expert_slots=num_slots,
        weight_bytes=weights.replicated_bytes(held) + num_slots * weights.expert_slot_bytes(held),
        kv_bytes_per_token=kv_per_layer * cfg.num_hidden_layers,
        max_position_embeddings=cfg.max_position_embeddings,
    )


def _min_fitting_ranks(
    weights: ModelWeights, plan: RankPlan, options: PlanOptions, held: HeldWeights
) -> int | None:
    """The smallest rank count dividing the experts whose rank holds weights and >= 1 token."""
    num_experts = weights.config.n_routed_experts
    for num_ranks in range(1, max(num_experts, 1) + 1):
        if num_experts and num_experts % num_ranks:
            continue
        layout = RoleLayout(plan.layout.role, num_ranks)
        if plan_rank(weights, layout, plan.hardware, options, held).num_kv_tokens > 0:
            return num_ranks
    return None


def _remedies(weights: ModelWeights, options: PlanOptions, *first: str) -> str:
    """The changes that free KV memory, leaving out those already made."""
    fixes = list(first)
    if weights.config.is_fp8_checkpoint and options.weight_format == "dequantize":
        fixes.append("fp8 weights (weight_format auto)")
    elif not weights.config.is_fp8_checkpoint:
        fixes.append("a block-FP8 checkpoint (held FP8 with weight_format auto)")
    if options.dtype == "float32":
        fixes.append("dtype bfloat16")
    if options.num_redundant_experts:
        fixes.append("fewer redundant experts")
    fixes.append("a smaller reserve_gb")
    return ", ".join(fixes[:-1]) + " or " + fixes[-1]


def check_fits(
    weights: ModelWeights, plan: RankPlan, options: PlanOptions, held: HeldWeights
) -> None:
    """``PlanError`` with the numbers and a fix when ``plan`` cannot serve."""
    role, hw, num_ranks = plan.layout.role, plan.hardware, plan.layout.num_ranks
    if plan.num_kv_tokens < 1:
        need = _min_fitting_ranks(weights, plan, options, held)
        more = f"at least {need} ranks per {role} instance" if need else "GPUs with more memory"
        raise PlanError(
            f"{role}: with {num_ranks} rank(s) per instance each rank holds "
            f"{plan.weight_bytes / GB:,.1f} GB of {held.name} weights, but a "
            f"{hw.gpu_mem_gb:g} GB GPU less the {hw.reserve_bytes / GB:.1f} GB reserve leaves "
            f"{(hw.gpu_bytes - hw.reserve_bytes) / GB:,.1f} GB and no room for KV; use "
            + _remedies(weights, options, more)
        )
    kv_fixes = [f"more {role} ranks (fewer experts per rank)"]
    if options.kv_format != "fp8":
        kv_fixes.append("fp8 KV (kv_format fp8)")
    need_len = options.require_context_len
    if need_len is not None and plan.max_context_len < need_len:
        raise PlanError(
            f"{role}: with {num_ranks} rank(s) per instance a rank holds "
            f"{plan.num_kv_tokens:,} KV tokens ({plan.kv_bytes / GB:.1f} GB at "
            f"{plan.kv_bytes_per_token:,} B/token), fewer than the required {need_len:,}; use "
            + _remedies(weights, options, *kv_fixes)
        )
    cache = options.num_cache_tokens
    if cache is not None and plan.num_kv_tokens < cache:
        raise PlanError(
            f"{role}: the KV cache of {cache:,} tokens per rank (num_pages x page_size) needs "
            f"{cache * plan.kv_bytes_per_token / GB:.1f} GB, but with {num_ranks} rank(s) per "
            f"instance a rank has {max(plan.kv_bytes, 0) / GB:.1f} GB ({plan.num_kv_tokens:,} "
            "tokens) left; use fewer num_pages, " + _remedies(weights, options, *kv_fixes)
        )


def _check_options(cfg: ModelConfig, options: PlanOptions) -> None:
    if options.kv_format not in KV_FORMATS:
        raise PlanError(f"kv_format {options.kv_format!r}; use one of {', '.join(KV_FORMATS)}")
    if options.num_redundant_experts < 0:
        raise PlanError(f"{options.num_redundant_experts} redundant experts; use 0 or more")
    need_len = options.require_context_len
    if need_len is not None and need_len > cfg.max_position_embeddings:
        raise PlanError(
            f"required context {need_len:,} exceeds the model's max_position_embeddings "
            f"{cfg.max_position_embeddings:,}; ask for at most that"
        )
    if options.num_cache_tokens is not None and options.num_cache_tokens < 1:
        raise PlanError(f"a KV cache of {options.num_cache_tokens} tokens; use at least 1")


def plan_cluster(
    config: ModelConfig,
    layouts: list[RoleLayout],
    hardware: Hardware,
    options: PlanOptions,
) -> ClusterPlan:
    """Plan every role; ``PlanError`` naming the first role that cannot serve."""
    held = held_weights(config, options.weight_format, options.dtype)
    _check_options(config, options)
    if hardware.gpu_mem_gb <= 0 or hardware.ranks_per_node < 1:
        raise PlanError("give a positive GPU memory (GB) and at least 1 rank (GPU) per node")
    weights = ModelWeights(config)
    ranks = tuple(plan_rank(weights, layout, hardware, options, held) for layout in layouts)
    for plan in ranks:
        check_fits(weights, plan, options, held)
    return ClusterPlan(config, weights, options, held, hardware, ranks)


def load_config(path: str | Path) -> ModelConfig:
    """A model directory or its ``config.json``."""
    return ModelConfig.from_json(path)


# ---- deploy settings ------------------------------------------------------------------------
def settings_layouts(settings: ServeSettings) -> list[RoleLayout]:
    """The pools a deployment starts: mixed instances, or prefill (if any) and decode."""
    s = settings
    if s.colocated is not None:
        return [RoleLayout("mixed", s.colocated_ranks, s.colocated)]
    pools = [("prefill", s.prefill_ranks, s.prefill), ("decode", s.decode_ranks, s.decode)]
    return [RoleLayout(role, ranks, num) for role, ranks, num in pools if num > 0]


def plan_from_settings(
    settings: ServeSettings, config: ModelConfig, gpu_mem_gb: float
) -> ClusterPlan:
    """The plan of a deployment on GPUs of ``gpu_mem_gb`` GB: the check ``tidal serve`` and
    ``build_app`` run before starting anything. Its cache is the larger per-role KV size
    (``ServeSettings.kv_pages``) x page_size tokens per rank."""
    s = settings
    kv_format = _DTYPE_KV_FORMATS.get(s.dtype) if s.kv_format == "auto" else s.kv_format
    if kv_format is None:
        raise PlanError(f"kv_format auto has no KV format for dtype {s.dtype}; name one")
    # one size for every role: the larger of the two, so the check is never optimistic
    num_pages = max(s.kv_pages(layout.role, config) for layout in settings_layouts(s))
    options = PlanOptions(
        weight_format=s.weight_format,
        dtype=s.dtype,
        kv_format=kv_format,
        num_redundant_experts=s.redundant_experts,
        num_cache_tokens=num_pages * s.page_size,
    )
    hardware = Hardware(gpu_mem_gb, s.ranks_per_node, s.reserve_gb)
    return plan_cluster(config, settings_layouts(s), hardware, options)
