"""Cluster configuration: frozen dataclasses built once from the CLI or the Serve YAML.

User input (``tidal serve`` flags, the ``args:`` of a Serve config) is validated at the edge by
``cluster.settings.ServeSettings`` and converted to a ``ClusterConfig``; everything inside the
cluster (pool manager, workers, ingress) reads only these frozen objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from decode.jobs import DecodeConfig
from kvtransfer.config import TransferConfig
from prefill.jobs import PrefillConfig
from scheduler.config import SchedulerConfig
from scheduler.pool_policy import PoolPolicyConfig
from scheduler.state import Role

ROLES = tuple(r.value for r in Role)


@dataclass(frozen=True)
class RankResources:
    """What one rank actor asks Ray for. ``num_gpus`` None means "1 if the cluster has GPUs,
    else 0". ``resources`` are custom Ray resources (e.g. ``{"h200": 1}``) as sorted pairs so
    the dataclass stays hashable."""

    num_cpus: float = 1.0
    num_gpus: float | None = None
    resources: tuple[tuple[str, float], ...] = ()

    def bundle(self, has_gpus: bool) -> dict[str, float]:
        """The placement-group bundle of one rank."""
        num_gpus = self.num_gpus if self.num_gpus is not None else (1.0 if has_gpus else 0.0)
        bundle = {"CPU": self.num_cpus, **dict(self.resources)}
        if num_gpus > 0:
            bundle["GPU"] = num_gpus
        return {k: v for k, v in bundle.items() if v > 0}


@dataclass(frozen=True)
class PoolConfig:
    """One pool: how many instances, ranks per instance, and what each rank asks for.

    An instance's ranks (one GPU each) are bundles packed node by node, ``ranks_per_node`` to a
    node: an instance of R ranks spans ``num_nodes`` = ceil(R / ranks_per_node) nodes.
    """

    num_instances: int = 0
    num_ranks: int = 1  # ranks (GPUs) per instance; > 1 is expert-parallel
    resources: RankResources = RankResources()
    ranks_per_node: int = 8  # GPUs per node

    def __post_init__(self) -> None:
        if self.num_instances < 0:
            raise ValueError(f"a pool cannot have {self.num_instances} instances; use >= 0")
        if self.num_ranks < 1:
            raise ValueError(f"an instance cannot have {self.num_ranks} ranks; use >= 1")
        if self.ranks_per_node < 1:
            raise ValueError(f"ranks_per_node={self.ranks_per_node}; a node holds >= 1 rank")

    @property
    def num_nodes(self) -> int:
        """Nodes one instance spans."""
        return -(-self.num_ranks // self.ranks_per_node)


@dataclass(frozen=True)
class EngineSpec:
    """How every rank loads its engine (``model.Engine.load`` arguments)."""

    model_dir: str
    dtype: str = "float32"
    device: str = "cpu"  # "cuda" on GPU nodes; each rank sees its own GPU
    weight_format: str = "auto"  # auto | fp8 | dequantize: block-FP8 linears kept FP8 or not
    kv_format: str = "auto"  # KV cache format of every worker; auto = the model dtype
    num_pages: int | None = None  # None: the engine sizes it
    # KV pages per rank by role (a decode rank holds whole contexts, a prefill rank a prompt and
    # its prefix cache); None: num_pages. A moved instance keeps the cache it was built with.
    prefill_num_pages: int | None = None
    decode_num_pages: int | None = None  # also mixed ranks
    page_size: int = 64
    chunk_size: int = 512
    num_threads: int = 1  # torch intra-op threads per rank (CPU)

    def num_pages_for(self, role: str) -> int | None:
        """KV pages of a rank built for ``role`` (None: the engine's default)."""
        by_role = self.prefill_num_pages if role == "prefill" else self.decode_num_pages
        return by_role or self.num_pages


@dataclass(frozen=True)
class ClusterConfig:
    """Everything the pool manager, the workers and the ingress need."""

    engine: EngineSpec
    name: str = "tidal"  # prefix of named actors; one per Serve application
    model_name: str = "k2-tiny"  # the "model" clients send and /v1/models lists
    pools: dict[str, PoolConfig] = field(
        default_factory=lambda: {"prefill": PoolConfig(1), "decode": PoolConfig(1)}
    )
    scheduler: SchedulerConfig = SchedulerConfig()
    prefill_stage: PrefillConfig = PrefillConfig()
    decode_stage: DecodeConfig = DecodeConfig()
    mixed_stage: DecodeConfig = DecodeConfig(enable_prefix_cache=True)
    transfer: TransferConfig = TransferConfig()
    wire_format: str = "bf16"  # KV format on the wire (prefill -> decode)
    health_interval_s: float = 1.0  # pool manager pings every instance this often
    health_timeout_s: float = 10.0  # a ping slower than this marks the instance dead
    report_interval_s: float = 0.2  # workers report their state to the scheduler this often
    drain_timeout_s: float = 120.0  # role change: wait this long for in-flight work
    max_attempts: int = 3  # routes per request (re-routes after a worker failure)
    itl_slo_s: float = 0.1  # inter-token latency target (the planner's decode SLO)
    poll_timeout_s: float = 2.0  # one long-poll of a decode worker
    max_body_bytes: int = 8 << 20  # HTTP request body limit (413 beyond)
    num_ingress_replicas: int = 1  # Serve replicas of the HTTP ingress
    max_concurrency: int = 256  # actor threads per worker (one per concurrent long-poll)
    ep_timeout_s: float = 30.0  # an expert-parallel collective waiting longer fails (dead peer)
    redundant_experts: int = 0  # EPLB: extra expert slots per rank per MoE layer
    eplb_interval_s: float = 0.0  # EPLB: rebalance this often (0: only on request)
    eplb_max_moved_fraction: float = 0.2  # EPLB: share of a layer's slots one rebalance may move
    eplb_window_s: float = 0.0  # EPLB: expert loads over this many seconds (0: since the last round)
    planner: PoolPolicyConfig = PoolPolicyConfig()  # auto or manual, cooldown, hysteresis...
    planner_window_s: float = 10.0  # the planner measures traffic over windows this long
    # sha256 hex of the admin bearer token (the token itself never enters the config); None:
    # admin routes are off unless insecure_admin
    admin_token_sha256: str | None = field(default=None, repr=False)
    insecure_admin: bool = False  # admin routes without a token (a trusted network only)

    def __post_init__(self) -> None:
        unknown = set(self.pools) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown pool roles {sorted(unknown)}; use {ROLES}")
        if not any(self.pools.get(r, PoolConfig()).num_instances for r in ("decode", "mixed")):
            raise ValueError(
                "no decode capacity: ask for --decode M (with --prefill N) or --colocated N"
            )

    def pool(self, role: str) -> PoolConfig:
        return self.pools.get(role, PoolConfig())
