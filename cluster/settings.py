"""User-facing deployment settings: the ``args:`` of a Serve config and the ``tidal serve`` flags.

``ServeSettings`` validates them (pydantic, unknown keys refused with the list of known ones)
and ``to_config()`` turns them into the frozen ``ClusterConfig``, reading the model's
config.json for ``max_model_len`` and the KV size. docs/configuration.md lists every key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.config import ClusterConfig, EngineSpec, PoolConfig, RankResources
from decode.jobs import DecodeConfig
from kvtransfer.config import TransferConfig
from prefill.jobs import PrefillConfig
from scheduler.config import SchedulerConfig

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
    device: Literal["cpu", "cuda"] | None = Field(None, description="None -> cuda if GPUs")
    kv_format: CacheFormatName = Field(
        "auto", description="KV cache format of every worker; auto = the model dtype"
    )
    wire_format: KVFormatName | None = Field(None, description="KV on the wire; None -> kv_format")
    num_pages: int | None = Field(None, gt=0, description="KV pages per worker; None -> engine")
    page_size: int = Field(64, gt=0)
    chunk_size: int = Field(512, gt=0, description="prefill chunk (tokens)")
    num_threads: int = Field(1, gt=0, description="torch threads per rank")
    # ---- the pools
    prefill: int = Field(1, ge=0, description="prefill instances")
    decode: int = Field(1, ge=0, description="decode instances")
    colocated: int | None = Field(None, ge=1, description="mixed instances; replaces P/D pools")
    cpus_per_rank: float = Field(1.0, ge=0)
    gpus_per_rank: float | None = Field(None, ge=0, description="None -> 1 if GPUs, else 0")
    prefill_resources: dict[str, float] = Field({}, description="custom Ray resources per rank")
    decode_resources: dict[str, float] = {}
    mixed_resources: dict[str, float] = {}
    # ---- scheduling and stages
    ttft_slo_s: float = Field(2.0, gt=0)
    max_queue_len: int = Field(256, ge=0)
    decode_local_threshold: int = Field(256, ge=0, description="shorter prompts prefill on decode")
    max_batch_size: int = Field(64, ge=1)
    prefill_token_budget: int = Field(2048, ge=1, description="prompt tokens per prefill step")
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
    transfer_deadline_base_s: float = Field(30.0, gt=0)
    transfer_idle_timeout_s: float = Field(10.0, gt=0)

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

    def to_config(self) -> ClusterConfig:
        from model.config import ModelConfig
        from model.kv_cache import bytes_per_token, resolve_kv_format

        model_dir = self.model_dir()
        mc = ModelConfig.from_json(model_dir / "config.json")
        kv_format = resolve_kv_format(self.kv_format, self.dtype).value
        wire = self.wire_format or kv_format
        has_gpus = self.device == "cuda" or (self.device is None and _cluster_has_gpus())
        device = self.device or ("cuda" if has_gpus else "cpu")
        engine = EngineSpec(
            model_dir=str(model_dir),
            dtype=self.dtype,
            device=device,
            kv_format=kv_format,
            num_pages=self.num_pages,
            page_size=self.page_size,
            chunk_size=self.chunk_size,
            num_threads=self.num_threads,
        )

        def pool(n: int, custom: dict[str, float]) -> PoolConfig:
            res = RankResources(
                self.cpus_per_rank, self.gpus_per_rank, tuple(sorted(custom.items()))
            )
            return PoolConfig(n, 1, res)

        if self.colocated is not None:
            pools = {"mixed": pool(self.colocated, self.mixed_resources)}
        else:
            pools = {
                "prefill": pool(self.prefill, self.prefill_resources),
                "decode": pool(self.decode, self.decode_resources),
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
        stage = {"max_batch_size": self.max_batch_size, "max_unread_tokens": self.max_unread_tokens}
        return ClusterConfig(
            engine=engine,
            name=self.name,
            model_name=self.model_name or model_dir.name,
            pools=pools,
            scheduler=scheduler,
            prefill_stage=PrefillConfig(
                token_budget=self.prefill_token_budget, enable_prefix_cache=self.prefix_cache
            ),
            decode_stage=DecodeConfig(**stage, prefill_token_budget=self.mixed_token_budget),
            mixed_stage=DecodeConfig(
                **stage,
                prefill_token_budget=self.mixed_token_budget,
                enable_prefix_cache=self.prefix_cache,
            ),
            transfer=TransferConfig(
                deadline_base_s=self.transfer_deadline_base_s,
                idle_timeout_s=self.transfer_idle_timeout_s,
            ),
            wire_format=wire,
            health_interval_s=self.health_interval_s,
            report_interval_s=self.report_interval_s,
            drain_timeout_s=self.drain_timeout_s,
            max_attempts=self.max_attempts,
            max_body_bytes=self.max_body_bytes,
        )


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
