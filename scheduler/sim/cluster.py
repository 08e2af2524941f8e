"""A simulated tidal cluster: the real ``Scheduler`` on a simulated clock, simulated instances,
and the ingress's request flow (``cluster/flow.py``) with one actor-call latency per hop.

One request (disaggregated), as the ingress drives it:
0. the ingress's own serial work (``cluster.ingress_s`` per request, one request at a time);
1. route (``Scheduler.route``): ``RouteDecision``, ``Rejection`` (recorded), or ``Queued``
   (answered later by ``drain_queue``, which runs after decode reports and finishes and every
   ``drain_interval_s`` while anyone waits, as the scheduler actor does);
2. ``reserve`` pages on the decode instance (refused when the books were stale: ``on_cancel``
   and route again, up to ``max_attempts``), ``prefill`` on the prefill instance;
3. when the KV is at the decode instance: ``on_prefill_done``, ``start`` (first token out);
4. decode steps until max_tokens; ``on_finished``.
Decode-local and mixed routes skip 2-3: ``start`` with the prompt, prefilled there.
Every instance reports its state to the scheduler every ``report_interval_s`` (staggered).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scheduler.config import SchedulerConfig
from scheduler.policy import Scheduler
from scheduler.sim.events import EventLoop
from scheduler.sim.instances import SimDecode, SimPrefill, SimSeq
from scheduler.sim.profile import CostProfile
from scheduler.sim.trace import SimRequest
from scheduler.state import Queued, Rejection, RequestSpec, Role, RouteDecision


@dataclass(frozen=True)
class SimConfig:
    """The simulated deployment: pool sizes and the scheduler's config."""

    num_prefill: int
    num_decode: int
    scheduler: SchedulerConfig
    num_mixed: int = 0
    max_attempts: int = 3  # routes per request, as ClusterConfig.max_attempts
    drain_interval_s: float = 0.25  # the scheduler actor's queue ticker
    # False: the scheduler sees no prefix hashes (load-only routing); caches still work.
    is_prefix_aware: bool = True


@dataclass
class Outcome:
    """What a client would have seen of one request (seconds since the trace start)."""

    index: int
    arrival_s: float
    prompt_len: int
    max_tokens: int
    first_token_s: float | None = None
    finish_s: float | None = None
    reject_reason: str | None = None
    num_cached_tokens: int = 0  # prefix-cache hit at the prefill instance
    num_attempts: int = 0
    decode_instance_id: str | None = None  # of the last attempt

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (None for one-token outputs)."""
        if self.first_token_s is None or self.finish_s is None or self.max_tokens < 2:
            return None
        return (self.finish_s - self.first_token_s) / (self.max_tokens - 1)


@dataclass
class SimResult:
    outcomes: list[Outcome]
    token_gaps: list[tuple[float, int]]  # (inter-token gap s, tokens), every decode instance
    busy_s: dict[str, float]  # role -> seconds its instances were busy
    role_time_s: dict[str, float]  # role -> instance-seconds in that role
    makespan_s: float
    scheduler_hit_rate: float  # the scheduler's expected prefix hits / routed prompt tokens
    num_events: int
    decode_mean_batch: float = 0.0  # sequences per decode step, over every step taken
    moves: list[dict[str, object]] = field(default_factory=list)  # role moves, in time order
    planner_history: list[dict[str, object]] = field(default_factory=list)


def scheduler_config_for(profile: CostProfile, **overrides: object) -> SchedulerConfig:
    """The scheduler config a deployment with this profile would run (sizes and speeds agree)."""
    base: dict[str, object] = {
        "page_size": profile.page_size,
        "kv_bytes_per_token": profile.transfer.kv_bytes_per_token,
        "transfer_bytes_per_s": profile.transfer.bytes_per_s,
        "default_prefill_tokens_per_s": profile.prefill.rate_at(4096),
        "default_decode_step_s": profile.decode.base_s,
    }
    return SchedulerConfig(**{**base, **overrides})  # type: ignore[arg-type]


class SimCluster:
    """Replays requests through the real scheduler and simulated instances."""

    def __init__(self, profile: CostProfile, config: SimConfig) -> None:
        self.profile = profile
        self.config = config
        self.loop = EventLoop()
        self.scheduler = Scheduler(config.scheduler, clock=self.loop.clock)
        self.rpc_s = profile.cluster.rpc_s
        bs = config.scheduler.block_size
        assert config.scheduler.page_size == profile.page_size, "page sizes must agree"
        self.prefills = {
            f"p{i}": SimPrefill(f"p{i}", self.loop, profile, bs) for i in range(config.num_prefill)
        }
        self.decodes = {
            f"d{i}": SimDecode(f"d{i}", self.loop, profile, bs) for i in range(config.num_decode)
        }
        self.decodes |= {
            f"m{i}": SimDecode(f"m{i}", self.loop, profile, bs, is_mixed=True)
            for i in range(config.num_mixed)
        }
        self._link_host()
        self._retired: list[SimPrefill | SimDecode] = []  # incarnations before a role move
        self._since: dict[str, float] = dict.fromkeys([*self.prefills, *self.decodes], 0.0)
        self.role_time_s: dict[str, float] = {}  # role -> instance-seconds spent in it
        self.moves: list[dict[str, object]] = []
        self._outcomes: list[Outcome] = []
        self._requests: dict[str, tuple[SimRequest, int]] = {}  # attempt id -> (request, n)
        self._num_open = 0
        self._is_ticking = False

    # ---- running ------------------------------------------------------------------------------
    def run(self, requests: list[SimRequest]) -> SimResult:
        self._start_instances()
        self._outcomes = [
            Outcome(r.index, r.arrival_s, r.prompt_len, r.max_tokens) for r in requests
        ]
        self._num_open = len(requests)
        ingress_s, free_at = self.profile.cluster.ingress_s, 0.0
        for r in sorted(requests, key=lambda r: r.arrival_s):
            # one ingress: a request's serial work starts when the one before it is done
            free_at = max(r.arrival_s, free_at) + ingress_s
            self.loop.at(free_at + self.rpc_s, self._route, r, 1)
        self.loop.run(lambda: self._num_open == 0)
        return self._result()

    def instance(self, iid: str) -> SimPrefill | SimDecode | None:
        """The serving instance ``iid`` (None while it is moving)."""
        return self.prefills.get(iid) or self.decodes.get(iid)

    # ---- role moves (the pool manager's ``move``) -----------------------------------------------
    def move(self, iid: str, role: Role) -> None:
        """Out of the scheduler now, drain in-flight work, ``role_move_s``, back in as ``role``
        (a fresh stage around the same weights: the prefix cache is gone)."""
        old = self.prefills.pop(iid, None) or self.decodes.pop(iid)
        old.is_draining = True
        self.scheduler.remove_instance(iid)  # in-flight requests finish where they are
        self._retire(iid, old)
        self.moves.append({"time_s": round(self.loop.now, 3), "instance": iid, "to": role.value})
        self._wait_idle(iid, old, role)

    def _wait_idle(self, iid: str, old: SimPrefill | SimDecode, role: Role) -> None:
        if old.is_idle():
            self.loop.after(self.profile.cluster.role_move_s, self._rejoin, iid, role)
        else:
            self.loop.after(0.05, self._wait_idle, iid, old, role)

    def _rejoin(self, iid: str, role: Role) -> None:
        bs = self.config.scheduler.block_size
        if role is Role.PREFILL:
            self.prefills[iid] = SimPrefill(iid, self.loop, self.profile, bs)
        else:
            self.decodes[iid] = SimDecode(iid, self.loop, self.profile, bs)
        self._link_host()
        self._since[iid] = self.loop.now
        self.scheduler.add_instance(iid, role)
        self._report(iid)

    def _link_host(self) -> None:
        """One host (``CostProfile.is_one_host``): every prefill and decode instance slows the
        other role's steps while it works."""
        if self.profile.is_one_host:
            for p in self.prefills.values():
                p.host_peers = list(self.decodes.values())
            for d in self.decodes.values():
                d.host_peers = list(self.prefills.values())

    def _retire(self, iid: str, old: SimPrefill | SimDecode) -> None:
        role = _role_of(old)
        self.role_time_s[role] = self.role_time_s.get(role, 0.0) + self.loop.now - self._since[iid]
        self._retired.append(old)

    def num_generated(self) -> int:
        """Tokens generated so far, on every decode instance, moved ones included."""
        live = sum(d.num_generated for d in self.decodes.values())
        return live + sum(i.num_generated for i in self._retired if isinstance(i, SimDecode))

    def serving_since(self, iid: str) -> float:
        """When ``iid`` last started serving (0 or its last role move)."""
        return self._since[iid]

    def _start_instances(self) -> None:
        interval = self.profile.cluster.report_interval_s
        ids = list(self.prefills) + list(self.decodes)
        for i, iid in enumerate(ids):
            role = (
                Role.PREFILL
                if iid in self.prefills
                else Role.MIXED
                if self.decodes[iid].is_mixed
                else Role.DECODE
            )
            self.scheduler.add_instance(iid, role)
            self._report(iid)  # the first report comes when reporting is switched on
            self.loop.at(interval * (i + 1) / len(ids), self._report_forever, iid)

    def _report_forever(self, iid: str) -> None:
        self._report(iid)
        self.loop.after(self.profile.cluster.report_interval_s, self._report_forever, iid)

    def _report(self, iid: str) -> None:
        """Snapshot now, delivered one call later (as the worker's ``.remote`` is); none while
        the instance moves."""
        if iid in self.prefills:
            self.loop.after(self.rpc_s, self.scheduler.update_prefill, self.prefills[iid].state())
            return
        d = self.decodes.get(iid)
        if d is None:
            return
        if d.is_mixed:
            self.loop.after(self.rpc_s, self.scheduler.update_prefill, d.prefill_state())
        self.loop.after(self.rpc_s, self._deliver_decode_report, d.decode_state())

    def _deliver_decode_report(self, state) -> None:
        self.scheduler.update_decode(state)
        self._drain()

    # ---- one request --------------------------------------------------------------------------
    def _route(self, req: SimRequest, attempt: int) -> None:
        sid = f"{req.index}.{attempt}"
        self._outcomes[req.index].num_attempts = attempt
        self._requests[sid] = (req, attempt)
        hashes = req.block_hashes if self.config.is_prefix_aware else ()
        spec = RequestSpec(sid, req.prompt_len, req.max_tokens, hashes)
        self._answer(self.scheduler.route(spec))

    def _answer(self, answer: RouteDecision | Rejection | Queued) -> None:
        if isinstance(answer, Queued):
            self._start_ticker()
        elif isinstance(answer, Rejection):
            req, _ = self._requests.pop(answer.request_id)
            self._close(req, answer.reason)
        else:
            self.loop.after(self.rpc_s, self._place, answer)

    def _place(self, d: RouteDecision) -> None:
        req, _ = self._requests[d.request_id]
        self._outcomes[req.index].decode_instance_id = d.decode_instance_id
        seq = SimSeq(
            d.request_id, req.prompt_len, req.max_tokens, req.block_hashes,
            self._on_first_token, self._on_finished,
        )  # fmt: skip
        # the objects serving now: an id that moves later names another stage
        decode = self.decodes.get(d.decode_instance_id)
        prefill = self.prefills.get(d.prefill_instance_id or "")
        if decode is None or (prefill is None and not d.is_local_prefill):
            self.loop.after(self.rpc_s, self._retry, d.request_id, "instance_moved")
        elif d.is_local_prefill:
            self.loop.after(self.rpc_s, decode.start_local, seq)
        else:
            self.loop.after(self.rpc_s, self._reserve, decode, prefill, seq)

    def _reserve(self, decode: SimDecode, prefill: SimPrefill, seq: SimSeq) -> None:
        if not decode.reserve(seq.request_id, seq.prompt_len + seq.max_tokens):
            self.loop.after(self.rpc_s, self._retry, seq.request_id, "reserve_failed")
            return
        on_done = lambda s: self.loop.after(self.rpc_s, self._prefill_done, decode, s)  # noqa: E731
        self.loop.after(2 * self.rpc_s, prefill.submit, seq, on_done)

    def _prefill_done(self, decode: SimDecode, seq: SimSeq) -> None:
        req, _ = self._requests[seq.request_id]
        self._outcomes[req.index].num_cached_tokens = seq.num_cached
        self.loop.after(self.rpc_s, self.scheduler.on_prefill_done, seq.request_id)
        self.loop.after(self.rpc_s, decode.start, seq)

    def _retry(self, sid: str, reason: str) -> None:
        req, attempt = self._requests.pop(sid)
        self.scheduler.on_cancel(sid)
        self._drain()
        if attempt >= self.config.max_attempts:
            self._close(req, reason)
        else:
            self.loop.after(self.rpc_s, self._route, req, attempt + 1)

    def _on_first_token(self, seq: SimSeq) -> None:
        req, _ = self._requests[seq.request_id]
        # The client's long-poll returns one call after the token exists.
        self._outcomes[req.index].first_token_s = self.loop.now + self.rpc_s

    def _on_finished(self, seq: SimSeq) -> None:
        req, _ = self._requests.pop(seq.request_id)
        self._outcomes[req.index].finish_s = self.loop.now + self.rpc_s
        self._num_open -= 1
        self.loop.after(2 * self.rpc_s, self._finished_in_scheduler, seq.request_id)

    def _finished_in_scheduler(self, sid: str) -> None:
        self.scheduler.on_finished(sid)
        self._drain()

    def _close(self, req: SimRequest, reason: str) -> None:
        self._outcomes[req.index].reject_reason = reason
        self._num_open -= 1

    # ---- the scheduler actor's queue ----------------------------------------------------------
    def _drain(self) -> None:
        for answer in self.scheduler.drain_queue():
            self._answer(answer)

    def _start_ticker(self) -> None:
        if not self._is_ticking:
            self._is_ticking = True
            self.loop.after(self.config.drain_interval_s, self._tick)

    def _tick(self) -> None:
        self._drain()
        if self.scheduler.num_queued:
            self.loop.after(self.config.drain_interval_s, self._tick)
        else:
            self._is_ticking = False

    # ---- results ------------------------------------------------------------------------------
    def _result(self) -> SimResult:
        outcomes = self._outcomes
        first = min((o.arrival_s for o in outcomes), default=0.0)
        last = max((o.finish_s or o.arrival_s for o in outcomes), default=0.0)
        for iid, inst in [*self.prefills.items(), *self.decodes.items()]:
            self._retire(iid, inst)
        busy: dict[str, float] = {}
        for inst in self._retired:
            role = _role_of(inst)
            busy[role] = busy.get(role, 0.0) + inst.busy_s
        decodes = [i for i in self._retired if isinstance(i, SimDecode)]
        return SimResult(
            outcomes=outcomes,
            token_gaps=[g for d in decodes for g in d.token_gaps],
            busy_s=busy,
            role_time_s=dict(self.role_time_s),
            makespan_s=max(last - first, 1e-9),
            scheduler_hit_rate=self.scheduler.stats().prefix_hit_rate,
            num_events=self.loop.num_events,
            decode_mean_batch=sum(n for d in decodes for _, n in d.token_gaps)
            / max(sum(d.num_steps for d in decodes), 1),
            moves=self.moves,
        )


def _role_of(inst: SimPrefill | SimDecode) -> str:
    return "prefill" if isinstance(inst, SimPrefill) else "mixed" if inst.is_mixed else "decode"
