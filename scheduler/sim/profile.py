"""Cost profiles: what one simulated instance costs in time, as data (a small JSON file).

A profile holds measured (or, for ``k2-h200``, derived and cited) curves:
- prefill: tokens/s of a prompt computed from scratch, as a curve over its length L. Per-token
  cost grows linearly with position (attention), so the mean cost over positions 0..L is the
  marginal cost at L/2; a chunk of positions [start, end) therefore costs
  ``(end - start) / tokens_per_s(start + end)`` seconds (a cached prefix shifts ``start``).
  Plus ``step_overhead_s`` per prefill step.
- decode: one step for a batch of ``b`` sequences holding ``ctx`` KV tokens in all costs
  ``base_s + per_seq_s * b + per_kv_token_s * ctx`` (weights read once per step, the KV of
  every sequence read once, a little per-sequence work).
- transfer: latent KV bytes per token, bytes/s from a prefill to a decode instance, latency.
- cluster: instance start-up, role move, the latency of one actor call, the ingress's serial
  work per request, report interval.
Built-in profiles live in ``scheduler/sim/profiles/NAME.json``; ``load_profile`` takes a name
or a path.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"


@dataclass(frozen=True)
class PrefillCost:
    """A prefill instance: speed curve, step shape and prefix-cache size."""

    tokens_per_s: tuple[tuple[int, float], ...]  # (prompt length L, tokens/s from scratch)
    step_overhead_s: float = 0.0
    token_budget: int = 2048  # one step's cost in prompt tokens at an empty prefix
    prefix_cache_tokens: int = 65_536  # latent KV the prefix cache can hold
    # The stage's chunk sizing and service order (``prefill.jobs.PrefillConfig``'s fields)
    attention_tokens: int = 8192
    min_chunk_tokens: int = 64
    max_skipped_steps: int = 8
    # Step time factor while a decode instance on the same host runs sequences (instances that
    # share a machine's CPUs, as on the fidelity benchmark's box; 1: separate machines)
    contended_slowdown: float = 1.0

    def rate_at(self, length: float) -> float:
        """tokens/s for a prompt of ``length`` tokens (piecewise linear, flat outside)."""
        xs = [p[0] for p in self.tokens_per_s]
        i = bisect.bisect_left(xs, length)
        if i == 0:
            return self.tokens_per_s[0][1]
        if i == len(xs):
            return self.tokens_per_s[-1][1]
        (x0, y0), (x1, y1) = self.tokens_per_s[i - 1], self.tokens_per_s[i]
        return y0 + (y1 - y0) * (length - x0) / (x1 - x0)

    def chunk_s(self, start: int, end: int) -> float:
        """Seconds to compute prompt positions [start, end) (see module doc)."""
        return (end - start) / self.rate_at(start + end)

    def chunk_cost(self, start: int, num_tokens: int) -> float:
        """Budget units of a chunk of ``num_tokens`` at prefix ``start`` (as the stage counts)."""
        return num_tokens * (1 + (start + num_tokens) / self.attention_tokens)

    def chunk_tokens(self, start: int, budget: float) -> int:
        """The most tokens a chunk at ``start`` may take within ``budget`` (at least
        ``min_chunk_tokens``), as ``PrefillConfig.chunk_tokens``."""
        a = self.attention_tokens
        b = 1 + start / a
        t = int((math.sqrt(b * b + 4 * budget / a) - b) * a / 2)
        if self.chunk_cost(start, t + 1) <= budget + 1e-3:
            t += 1
        return max(self.min_chunk_tokens, t)


@dataclass(frozen=True)
class DecodeCost:
    """A decode instance: linear step-time model, batch limit and KV pages."""

    base_s: float
    per_seq_s: float
    per_kv_token_s: float
    max_batch_size: int = 64
    kv_tokens: int = 65_536  # KV capacity (tokens); pages = kv_tokens // page_size
    prefill_token_budget: int = 512  # local prefill tokens per step (decode-local / mixed)
    contended_slowdown: float = 1.0  # step time factor while a same-host prefill computes

    def step_s(self, batch: int, context_tokens: int) -> float:
        return self.base_s + self.per_seq_s * batch + self.per_kv_token_s * context_tokens


@dataclass(frozen=True)
class TransferCost:
    kv_bytes_per_token: int = 70_272
    bytes_per_s: float = 5e9
    latency_s: float = 0.001

    def seconds(self, num_tokens: int) -> float:
        """Time to move ``num_tokens`` tokens of latent KV (latency excluded)."""
        return num_tokens * self.kv_bytes_per_token / self.bytes_per_s


@dataclass(frozen=True)
class ClusterCost:
    startup_s: float = 60.0  # a new instance: placement, weight load, warm-up
    role_move_s: float = 5.0  # drained instance -> the other pool (no weight reload)
    rpc_s: float = 0.001  # one actor call (route, reserve, prefill, start, poll)
    # The ingress's serial work per request before it routes (HTTP, proxy hop, validation):
    # a burst of arrivals reaches the scheduler this far apart. bench/sim_fidelity.py measures
    # it as the excess spread of a burst's first tokens, so it also holds any other per-request
    # serial cost on the path that the profile does not price (on a 2-core box, all CPU work).
    ingress_s: float = 0.0
    report_interval_s: float = 0.2


@dataclass(frozen=True)
class CostProfile:
    """Everything the simulator needs to know about the hardware and the engine."""

    name: str
    prefill: PrefillCost
    decode: DecodeCost
    transfer: TransferCost
    cluster: ClusterCost
    page_size: int = 64
    block_size: int = 64  # the deployment's prefix-hash block (SchedulerConfig.block_size)
    notes: tuple[str, ...] = ()  # sources and assumptions, carried into reports

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CostProfile:
        p = dict(d["prefill"])
        p["tokens_per_s"] = tuple((int(x), float(y)) for x, y in p["tokens_per_s"])
        assert p["tokens_per_s"], "prefill.tokens_per_s needs at least one point"
        assert all(y > 0 for _, y in p["tokens_per_s"]), "prefill rates must be positive"
        return cls(
            name=d["name"],
            prefill=PrefillCost(**p),
            decode=DecodeCost(**d["decode"]),
            transfer=TransferCost(**d.get("transfer", {})),
            cluster=ClusterCost(**d.get("cluster", {})),
            page_size=int(d.get("page_size", 64)),
            block_size=int(d.get("block_size", 64)),
            notes=tuple(d.get("sources", ())) + tuple(d.get("assumptions", ())),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["prefill"]["tokens_per_s"] = [list(p) for p in self.prefill.tokens_per_s]
        d["assumptions"] = list(d.pop("notes"))
        return d

    @property
    def is_one_host(self) -> bool:
        """The instances share one machine's CPUs: their steps slow each other down."""
        return self.prefill.contended_slowdown != 1.0 or self.decode.contended_slowdown != 1.0

    @property
    def num_decode_pages(self) -> int:
        return self.decode.kv_tokens // self.page_size


def load_profile(name_or_path: str | Path) -> CostProfile:
    """A built-in profile by name (``k2-h200``) or a JSON file written by ``tidal profile``."""
    path = Path(name_or_path)
    if not path.is_file():
        path = PROFILE_DIR / f"{name_or_path}.json"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.json"))
        raise ValueError(f"no profile {str(name_or_path)!r}: give a JSON file or one of {known}")
    d = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    return CostProfile.from_dict(d)
