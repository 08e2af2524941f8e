"""User-facing deployment settings: the ``args:`` of a Serve config and the ``tidal serve`` flags.

``ServeSettings`` validates them (pydantic, unknown keys refused with the list of known ones)
and ``to_config()`` turns them into the frozen ``ClusterConfig``, reading the model's
config.json for ``max_model_len``, the KV size and the experts each pool's ranks split.
``check_memory()`` runs ``tidal plan``'s check on the layout before anything starts.
docs/configuration.md lists every key.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.config import ClusterConfig, EngineSpec, PoolConfig, RankResources
from cluster.memory_plan import (
    GB,
    ClusterPlan,
    PlanError,
    check_layout,
    held_weights,
    plan_from_settings,
    settings_layouts,
)
from decode.jobs import DecodeConfig
from kvtransfer.config import TransferConfig
from prefill.jobs import PrefillConfig
from scheduler.config import SchedulerConfig
from scheduler.pool_policy import PoolPolicyConfig

if TYPE_CHECKING:
    from model.config import ModelConfig

log = logging.getLogger(__name__)

KVFormatName = Literal["bf16", "fp8", "fp32"]
CacheFormatName = Literal["auto", "bf16", "fp8", "fp32"]


class ServeSettings(BaseModel):
    """Every knob of one tidal deployment (defaults: built-in tiny model, 1 prefill + 1 decode)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # ---- the model
    model: str | None = Field(None, description="HF checkpoint directory; None -> the preset")
    preset: str = Field("k2-tiny", description="built-in random model generated when no --model")
    models_dir: str = Field(".models", description="where presets are generated")
    model_name: str | None = Field(None, description="name clients send; default: dir name")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    weight_format: Literal["auto", "fp8", "dequantize"] = Field(
        "auto",
        description="block-FP8 linears in memory: auto keeps an FP8 checkpoint FP8, fp8 insists "
        "on one, dequantize widens them to dtype (Engine.load's weight_format)",
    )
    device: Literal["cpu", "cuda"] | None = Field(None, description="None -> cuda if GPUs")
    kv_format: CacheFormatName = Field(
        "auto", description="KV cache format of every worker; auto = the model dtype"
    )
    wire_format: KVFormatName | None = Field(None, description="KV on the wire; None -> kv_format")
    num_pages: int | None = Field(
        None, gt=0, description="KV pages per rank of every role; None -> max_model_len tokens"
    )
    prefill_kv_tokens: int | None = Field(
        None, gt=0, description="KV tokens per prefill rank (prompt, prefix cache); else num_pages"
    )
    decode_kv_tokens: int | None = Field(
        None, gt=0, description="KV tokens per decode/mixed rank; None -> num_pages"
    )
    page_size: int = Field(64, gt=0)
    chunk_size: int = Field(512, gt=0, description="prefill chunk (tokens)")
    num_threads: int = Field(1, gt=0, description="torch threads per rank")
    # ---- the pools
    prefill: int = Field(1, ge=0, description="prefill instances")
    decode: int = Field(1, ge=0, description="decode instances")
    colocated: int | None = Field(None, ge=1, description="mixed instances; replaces P/D pools")
    prefill_ranks: int = Field(1, ge=1, description="ranks (GPUs) per prefill instance")
    decode_ranks: int = Field(1, ge=1, description="ranks (GPUs) per decode instance")
    colocated_ranks: int = Field(1, ge=1, description="ranks (GPUs) per mixed instance")
    ranks_per_node: int = Field(
        8, ge=1, description="GPUs per node: an instance of R ranks spans ceil(R / this) nodes"
    )
    cpus_per_rank: float = Field(1.0, ge=0)
    gpus_per_rank: float | None = Field(None, ge=0, description="None -> 1 if GPUs, else 0")
    prefill_resources: dict[str, float] = Field({}, description="custom Ray resources per rank")
    decode_resources: dict[str, float] = {}
    mixed_resources: dict[str, float] = {}
    # ---- the memory plan (tidal plan's check, run before serving)
    gpu_mem_gb: float | None = Field(
        None, gt=0, description="GPU memory per rank (GB); None: measured on cuda, no check on cpu"
    )
    reserve_gb: float | None = Field(
        None, ge=0, description="activations/workspace per rank (GB); None: 10% of gpu_mem_gb"
    )
    redundant_experts: int = Field(
        0, ge=0, description="extra expert slots per rank per MoE layer (EPLB replicas)"
    )
    eplb_interval_s: float = Field(
        0.0, ge=0, description="rebalance expert-parallel instances this often; 0: on request"
    )
    eplb_max_moved_fraction: float = Field(
        0.2, gt=0, le=1, description="largest share of a layer's slots one rebalance may move"
    )
    eplb_window_s: float = Field(
        0.0, ge=0, description="plan from this many seconds of expert loads; 0: since last round"
    )
    # ---- scheduling and stages
    ttft_slo_s: float = Field(2.0, gt=0)
    max_queue_len: int = Field(256, ge=0)
    decode_local_threshold: int = Field(256, ge=0, description="shorter prompts prefill on decode")
    max_batch_size: int = Field(64, ge=1)
    prefill_token_budget: int = Field(2048, ge=1, description="prompt tokens per prefill step")
    prefill_attention_tokens: int = Field(
        8192,
        ge=1,
        description="prefill step cost model: the context at which a token's attention costs "
        "as much as the rest of its layer (deeper chunks of a long prompt get fewer tokens)",
    )
    prefill_max_skipped_steps: int = Field(
        8, ge=1, description="a prompt passed over this many prefill steps in a row goes first"
    )
    mixed_token_budget: int = Field(512, ge=1, description="prompt tokens per mixed step")
    max_unread_tokens: int = Field(256, ge=1)
    prefix_cache: bool = True
    # ---- cluster behaviour
    name: str = Field("tidal", pattern=r"^[A-Za-z0-9_.-]+$")
    health_interval_s: float = Field(1.0, gt=0)
    report_interval_s: float = Field(0.2, gt=0)
    drain_timeout_s: float = Field(120.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    max_body_bytes: int = Field(8 << 20, gt=0)
    num_ingress_replicas: int = Field(
        1, ge=1, description="HTTP ingress replicas (Serve); one dying ends only its own streams"
    )
    reader_timeout_s: float = Field(
        60.0,
        gt=2.0,
        description="a decode request nobody polled for this long is cancelled (dead ingress)",
    )
    transfer_progress_lease_s: float = Field(
        60.0, gt=0, description="a KV transfer that receives no bytes for this long is cut"
    )
    transfer_piece_mb: float = Field(
        16.0, gt=0, description="a cached prefix is sent this many MiB of a layer at a time"
    )
    transfer_idle_timeout_s: float = Field(10.0, gt=0)
    # ---- the admin API and the P:D planner
    admin_token_env: str = Field(
        "TIDAL_ADMIN_TOKEN", description="environment variable holding the admin bearer token"
    )
    insecure_admin: bool = Field(False, description="admin routes without a token")
    planner: Literal["manual", "auto"] = Field(
        "manual", description="auto applies the P:D planner's split through role moves"
    )
    planner_window_s: float = Field(10.0, gt=0, description="traffic window of one estimate")
    planner_cooldown_s: float = Field(60.0, ge=0, description="no move sooner after a move")
    planner_confirm_rounds: int = Field(2, ge=1, description="windows a move must be wanted")
    planner_hysteresis: float = Field(0.1, ge=0, description="utilisation a move must win by")
    planner_max_moves: int = Field(1, ge=1, description="moves per planner round")
    planner_warmup_s: float = Field(30.0, ge=0, description="new/moved instances left alone")

    @model_validator(mode="after")
    def _has_decode(self) -> ServeSettings:
        if self.colocated is None and self.decode < 1:
            raise ValueError("no decode instance: use --decode M >= 1, or --colocated N")
        return self

    @model_validator(mode="after")
    def _kv_format_has_a_dtype(self) -> ServeSettings:
        if self.kv_format == "auto" and self.dtype == "float16":
            raise ValueError(
                "kv_format auto keeps the KV in the model dtype, and float16 has no KV format: "
                "set kv_format to bf16, fp8 or fp32, or dtype to float32 or bfloat16"
            )
        return self

    @model_validator(mode="after")
    def _ranks_name_a_pool(self) -> ServeSettings:
        if self.colocated is not None:
            unused = [k for k in ("prefill_ranks", "decode_ranks") if getattr(self, k) != 1]
            if unused:
                raise ValueError(
                    f"{' and '.join(unused)} size prefill/decode instances, but colocated runs "
                    "mixed ones: use colocated_ranks, or drop colocated"
                )
        elif self.colocated_ranks != 1:
            raise ValueError(
                "colocated_ranks sizes mixed instances, which run only with colocated N: "
                "set colocated, or use prefill_ranks / decode_ranks"
            )
        return self

    @model_validator(mode="after")
    def _reserve_below_gpu(self) -> ServeSettings:
        if None not in (self.gpu_mem_gb, self.reserve_gb) and self.reserve_gb >= self.gpu_mem_gb:
            raise ValueError(
                f"reserve_gb {self.reserve_gb:g} leaves nothing of gpu_mem_gb "
                f"{self.gpu_mem_gb:g}: use a reserve below the GPU memory"
            )
        return self

    def model_dir(self) -> Path:
        """The checkpoint directory, generating the preset first when it is missing."""
        if self.model is not None:
            path = Path(self.model).expanduser()
            if not (path / "config.json").is_file():
                raise FileNotFoundError(
                    f"--model {path}: no config.json there; point it at an HF checkpoint "
                    "directory, or drop --model to use --preset"
                )
            return path.resolve()
        return ensure_preset(self.preset, Path(self.models_dir))

    def checkpoint_config(self) -> ModelConfig:
        """The model's config.json (a preset's without generating it)."""
        from model.config import ModelConfig

        if self.model is not None:
            return ModelConfig.from_json(self.model_dir() / "config.json")
        from model.presets import preset_config

        return ModelConfig.from_dict(preset_config(self.preset), source=f"preset {self.preset}")

    def resolve_device(self) -> str:
        """``device``, or cuda when the (initialised) Ray cluster has GPUs, else cpu."""
        return self.device or ("cuda" if _cluster_has_gpus() else "cpu")

    def check_pools(self, mc: ModelConfig) -> None:
        """``PlanError`` unless every pool's ranks split the routed experts evenly and the
        weight format suits the checkpoint."""
        held_weights(mc, self.weight_format, self.dtype)
        for layout in settings_layouts(self):
            check_layout(mc, layout)

    def check_memory(self, device: str) -> ClusterPlan | None:
        """``tidal plan``'s check of this deployment on ``device``, before anything starts.

        Raises ``PlanError`` (a ``ValueError``) with the plan's message when a pool's ranks do
        not split the experts or a layout cannot fit. Without ``gpu_mem_gb``: on cpu the check is skipped (None, logged); on cuda the
        memory of this process's first GPU is used, and with no GPU here it is refused.
        """
        self.check_pools(self.checkpoint_config())
        gpu_mem_gb = self.gpu_mem_gb
        if gpu_mem_gb is None and device == "cpu":
            log.info("memory plan skipped: device cpu and no gpu_mem_gb to plan GPUs with")
            return None
        if gpu_mem_gb is None:
            gpu_mem_gb = _local_gpu_mem_gb()
            if gpu_mem_gb is None:
                raise PlanError(
                    "device cuda, but gpu_mem_gb is not set and this process sees no GPU to "
                    "measure: set gpu_mem_gb (GB per GPU, e.g. 141 for an H200) so the layout "
                    "can be checked before serving"
                )
        plan = plan_from_settings(self, self.checkpoint_config(), gpu_mem_gb)
        log.info("memory plan (per rank):\n%s", plan.table())
        return plan

    def kv_pages(self, role: str, mc: ModelConfig) -> int:
        """KV pages per rank of ``role`` ("prefill", or "decode" for decode and mixed): its
        ``*_kv_tokens``, else ``num_pages``, else one ``max_model_len`` context, so the default
        decode rank holds the longest request and the default prefill rank the longest prompt."""
        tokens = self.prefill_kv_tokens if role == "prefill" else self.decode_kv_tokens
        if tokens is None:
            return self.num_pages or -(-mc.max_model_len // self.page_size)
        return -(-tokens // self.page_size)

    def to_config(self) -> ClusterConfig:
        from model.config import ModelConfig
        from model.kv_cache import bytes_per_token, resolve_kv_format

        model_dir = self.model_dir()
        mc = ModelConfig.from_json(model_dir / "config.json")
        self.check_pools(mc)
        kv_format = resolve_kv_format(self.kv_format, self.dtype).value
        wire = self.wire_format or kv_format
        engine = EngineSpec(
            model_dir=str(model_dir),
            dtype=self.dtype,
            device=self.resolve_device(),
            weight_format=self.weight_format,
            kv_format=kv_format,
            num_pages=self.num_pages,
            prefill_num_pages=self.kv_pages("prefill", mc),
            decode_num_pages=self.kv_pages("decode", mc),
            page_size=self.page_size,
            chunk_size=self.chunk_size,
            num_threads=self.num_threads,
        )

        def pool(n: int, num_ranks: int, custom: dict[str, float]) -> PoolConfig:
            res = RankResources(
                self.cpus_per_rank, self.gpus_per_rank, tuple(sorted(custom.items()))
            )
            return PoolConfig(n, num_ranks, res, self.ranks_per_node)

        if self.colocated is not None:
            pools = {"mixed": pool(self.colocated, self.colocated_ranks, self.mixed_resources)}
        else:
            pools = {
                "prefill": pool(self.prefill, self.prefill_ranks, self.prefill_resources),
                "decode": pool(self.decode, self.decode_ranks, self.decode_resources),
            }
        scheduler = SchedulerConfig(
            ttft_slo_s=self.ttft_slo_s,
            max_queue_len=self.max_queue_len,
            decode_local_threshold=self.decode_local_threshold,
            page_size=self.page_size,
            block_size=self.page_size,
            max_model_len=mc.max_model_len,
            kv_bytes_per_token=bytes_per_token(wire, mc.kv_lora_rank, mc.qk_rope_head_dim)
            * mc.num_hidden_layers,
        )
        stage = {
            "max_batch_size": self.max_batch_size,
            "max_unread_tokens": self.max_unread_tokens,
            "reader_timeout_s": self.reader_timeout_s,
        }
        return ClusterConfig(
            engine=engine,
            name=self.name,
            model_name=self.model_name or model_dir.name,
            pools=pools,
            scheduler=scheduler,
            prefill_stage=PrefillConfig(
                token_budget=self.prefill_token_budget,
                attention_tokens=self.prefill_attention_tokens,
                max_skipped_steps=self.prefill_max_skipped_steps,
                enable_prefix_cache=self.prefix_cache,
            ),
            decode_stage=DecodeConfig(**stage, prefill_token_budget=self.mixed_token_budget),
            mixed_stage=DecodeConfig(
                **stage,
                prefill_token_budget=self.mixed_token_budget,
                enable_prefix_cache=self.prefix_cache,
            ),
            transfer=TransferConfig(
                progress_lease_s=self.transfer_progress_lease_s,
                piece_bytes=int(self.transfer_piece_mb * (1 << 20)),
                idle_timeout_s=self.transfer_idle_timeout_s,
            ),
            wire_format=wire,
            health_interval_s=self.health_interval_s,
            report_interval_s=self.report_interval_s,
            drain_timeout_s=self.drain_timeout_s,
            max_attempts=self.max_attempts,
            max_body_bytes=self.max_body_bytes,
            num_ingress_replicas=self.num_ingress_replicas,
            redundant_experts=self.redundant_experts,
            eplb_interval_s=self.eplb_interval_s,
            eplb_max_moved_fraction=self.eplb_max_moved_fraction,
            eplb_window_s=self.eplb_window_s,
            planner=PoolPolicyConfig(
                is_auto=self.planner == "auto",
                cooldown_s=self.planner_cooldown_s,
                confirm_rounds=self.planner_confirm_rounds,
                hysteresis=self.planner_hysteresis,
                max_moves=self.planner_max_moves,
                warmup_s=self.planner_warmup_s,
            ),
            planner_window_s=self.planner_window_s,
            admin_token_sha256=self.admin_token_sha256(),
            insecure_admin=self.insecure_admin,
        )

    def admin_token_sha256(self) -> str | None:
        """sha256 hex of the admin token in ``admin_token_env`` (None when unset or empty);
        read where the application is built (``tidal serve``, or the Serve controller for a
        Serve config: set it there, e.g. from a Kubernetes Secret)."""
        token = os.environ.get(self.admin_token_env, "")
        return hashlib.sha256(token.encode()).hexdigest() if token else None


def ensure_preset(preset: str, models_dir: Path) -> Path:
    """``models_dir/preset``, generated by ``model.checkpoint.make_model`` if it is missing."""
    path = (models_dir / preset).resolve()
    if not (path / "config.json").is_file():
        from model.checkpoint import make_model

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{preset}.tmp-{os.getpid()}")
        make_model(preset, tmp)
        try:
            tmp.rename(path)
        except OSError:  # another process generated it meanwhile
            if not (path / "config.json").is_file():
                raise
    return path


def _cluster_has_gpus() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def _local_gpu_mem_gb() -> float | None:
    """GB of this process's first CUDA device, or None when it sees none."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / GB
