"""One rank of an instance: a Ray actor that holds the engine and runs a stage by role.

The actor owns one ``Engine`` (weights and paged KV cache) for its whole life and one stage
built around it: ``PrefillStage`` (role prefill), ``DecodeStage`` with a ``KVReceiver`` (role
decode) or ``MixedStage`` (role mixed, the colocated baseline). A background thread runs
``stage.step()`` in a loop; actor methods (threads of a threaded actor) forward to the stage,
so a long-poll or a waiting prefill never blocks the loop. Another thread reports the stage's
state to the scheduler actor every ``report_interval_s`` and updates the metrics.

``set_role`` moves the instance to another pool without reloading weights: it refuses new work
(retryable ``WorkerError``), waits until in-flight work has finished, stops the loop, closes the
old stage (every page comes back) and builds the new stage around the same engine. Streams of
requests that finished on the old stage stay readable.

Errors are values: a call the worker cannot serve returns ``WorkerError`` (retryable ones send
the request elsewhere), and a failed request comes back as a ``TokenBatch``/``PrefillResult``
with ``error`` set.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import asdict
from typing import Any

import ray

from cluster.config import ClusterConfig
from cluster.messages import WorkerError, WorkerInfo, WorkerStats, unit_id
from cluster.metrics import WorkerMetrics
from cluster.rebalance import LoadWindow
from common.meter import StepWindow
from common.stage import Stage
from decode.jobs import DecodeJob, TokenBatch
from prefill.jobs import PrefillJob, PrefillResult
from scheduler.state import DecodeInstanceState, PrefillInstanceState, Role

log = logging.getLogger(__name__)

BLOCKING = "blocking"  # concurrency group of calls that wait (poll, prefill)


class RankWorker:
    """Ray actor body (``make_rank_worker`` applies ``ray.remote``); one per rank."""

    def __init__(
        self,
        instance_id: str,
        rank: int,
        num_ranks: int,
        role: str,
        config: ClusterConfig,
        scheduler: Any,
    ) -> None:
        self.instance_id = instance_id
        self.rank = rank
        self.num_ranks = num_ranks
        self.unit_id = unit_id(instance_id, rank, num_ranks)  # this rank in the scheduler
        self.config = config
        self._scheduler = scheduler
        self._node_id = ray.get_runtime_context().get_node_id()
        self._node_ip = ray.util.get_node_ip_address()
        self._lock = threading.Lock()  # role, stage, draining flag, owners
        self._role_lock = threading.Lock()  # one role change at a time
        self._is_draining = False
        self._is_reporting = False
        self._receiver = None
        self._kv_address: str | None = None  # advertised instead of the receiver's own
        self._owners: dict[str, Stage] = {}  # request -> the decode stage that streams it
        self._metrics = WorkerMetrics(self.unit_id)
        self._role = Role(role)
        self._closed = threading.Event()
        self._load_window: LoadWindow | None = None  # EPLB: expert loads, from launch()
        self._steps = StepWindow()  # step durations, and those while a placement is swapped in
        self._stage: Stage | None = None  # from launch()
        self._loop_thread: threading.Thread | None = None
        self._busy_s = 0.0  # seconds in steps that did work (the step loop's utilisation)

    # ---- lifecycle (pool manager) -----------------------------------------------------------
    def rendezvous_address(self) -> str:
        """Rank 0 of an expert-parallel instance: a free "host:port" on its node where the
        instance's process group meets (the pool manager hands it to every rank's ``launch``)."""
        assert self.rank == 0, "the group meets at rank 0"
        with socket.socket() as s:
            s.bind((self._node_ip, 0))
            return f"{self._node_ip}:{s.getsockname()[1]}"

    def launch(self, address: str | None = None) -> WorkerInfo:
        """Join the instance's expert-parallel group (``address``: rank 0's rendezvous; None
        for a one-rank instance), load this rank's engine, and start serving its role."""
        import torch

        from model import Engine

        spec = self.config.engine
        torch.set_num_threads(spec.num_threads)
        ep = None
        if self.num_ranks > 1:
            from model.config import ModelConfig
            from model.parallel import ExpertParallel

            assert address is not None, "an expert-parallel rank needs rank 0's address"
            num_experts = ModelConfig.from_json(f"{spec.model_dir}/config.json").n_routed_experts
            ep = ExpertParallel.join(
                address,
                self.rank,
                self.num_ranks,
                num_experts,
                backend="nccl" if spec.device == "cuda" else "gloo",
                timeout_s=self.config.ep_timeout_s,
                num_slots=num_experts + self.config.redundant_experts * self.num_ranks,
            )
        num_pages = spec.num_pages_for(self._role.value)
        kwargs: dict[str, Any] = {"num_pages": num_pages} if num_pages else {}
        self.engine = Engine.load(
            spec.model_dir,
            dtype=getattr(torch, spec.dtype),
            device=spec.device,
            kv_format=spec.kv_format,
            weight_format=spec.weight_format,
            page_size=spec.page_size,
            chunk_size=spec.chunk_size,
            ep=ep,
            **kwargs,
        )
        self._load_window = LoadWindow(lambda: self.engine.expert_counts, self.config.eplb_window_s)
        self._stage = self._make_stage(self._role)
        self._loop_stop = threading.Event()
        self._loop_thread = self._start_loop()
        threading.Thread(target=self._report_forever, name="tidal-report", daemon=True).start()
        return self.ready()

    def ready(self) -> WorkerInfo:
        """What and where this rank is (after ``launch``)."""
        cache = self.engine.cache
        return WorkerInfo(
            instance_id=self.instance_id,
            unit_id=self.unit_id,
            rank=self.rank,
            role=self._role.value,
            node_id=self._node_id,
            pid=os.getpid(),
            kv_address=self._receiver.address if self._receiver is not None else None,
            fingerprint=self.engine.fingerprint,
            num_total_pages=cache.allocator.num_pages,
            page_size=cache.allocator.page_size,
            max_model_len=self.engine.config.max_model_len,
        )

    def ping(self) -> str:
        """Health check: the role, if the step loop is alive."""
        if self._loop_thread is None:
            raise RuntimeError(f"{self.unit_id}: not started")
        if not self._loop_thread.is_alive() and not self._role_lock.locked():
            raise RuntimeError(f"{self.unit_id}: the step loop thread died")
        return self._role.value

    def set_scheduler(self, scheduler: Any) -> None:
        """Report to this scheduler actor from now on (the pool manager restarted it)."""
        self._scheduler = scheduler

    def set_reporting(self, is_on: bool) -> None:
        """Report to the scheduler (on once the scheduler knows this instance). Turning it on
        returns once the scheduler holds this rank's first report, so a request routed after
        the registration sees the rank's pages."""
        self._is_reporting = is_on
        if is_on:
            ray.get(self._report())

    def set_role(self, role: str) -> WorkerInfo:
        """Drain in-flight work, then serve ``role`` with the same engine (no weight reload)."""
        new_role = Role(role)
        with self._role_lock:
            with self._lock:
                self._is_draining = True
            deadline = time.monotonic() + self.config.drain_timeout_s
            while not self._is_idle() and time.monotonic() < deadline:
                time.sleep(0.02)
            self._stop_loop()
            with self._lock:
                old = self._stage
            old.close()  # anything left past the deadline is cancelled (the ingress re-routes)
            if new_role is not Role.DECODE and self._receiver is not None:
                self._receiver.stop()
                self._receiver = None
            stage = self._make_stage(new_role)
            with self._lock:
                self._role, self._stage = new_role, stage
                self._is_draining = False
            self._loop_thread = self._start_loop()
            self._load_window.reset()  # each pool routes differently: its own window
        log.info("%s: now %s", self.unit_id, new_role.value)
        return self.ready()

    def drain(self) -> bool:
        """Refuse new work and wait up to ``drain_timeout_s`` for in-flight work to finish
        (before the instance is removed); True if it is idle."""
        with self._lock:
            self._is_draining = True
        deadline = time.monotonic() + self.config.drain_timeout_s
        while not self._is_idle() and time.monotonic() < deadline:
            time.sleep(0.02)
        return self._is_idle()

    def shutdown(self) -> None:
        """Stop the loop, cancel everything, free every page, close the receiver."""
        self._closed.set()
        self._is_reporting = False
        self._metrics.close()
        if self._stage is None:  # never started
            return
        self._stop_loop()
        self._stage.close()
        if self._receiver is not None:
            self._receiver.stop()
            self._receiver = None

    # ---- prefill role -----------------------------------------------------------------------
    @ray.method(concurrency_group=BLOCKING)
    def prefill(self, job: PrefillJob) -> PrefillResult:
        """Chunked prefill of ``job`` with its KV streamed to ``job.kv_address``; waits for it."""
        with self._lock:
            stage, refusal = self._stage, self._refusal(Role.PREFILL)
            if refusal is None:
                future = stage.submit(job)
        if refusal is not None:
            return PrefillResult(job.request_id, -1, len(job.prompt_ids), 0, refusal.message)
        return future.result()

    # ---- decode and mixed roles -------------------------------------------------------------
    def reserve(
        self,
        request_id: str,
        num_tokens: int,
        lease_s: float,
        num_choices: int = 1,
        prompt_len: int = 0,
    ) -> str | WorkerError:
        """Reserve KV pages for an incoming transfer (and the pages of the request's further
        choices, which fork from its prompt: ``DecodeStage.reserve``); the receiver's address."""
        with self._lock:
            stage, refusal = self._stage, self._refusal(Role.DECODE)
        if refusal is not None:
            return refusal
        try:
            address = stage.reserve(request_id, num_tokens, lease_s, num_choices, prompt_len)
        except Exception as e:  # out of pages, duplicate id: the scheduler's books were stale
            return WorkerError(f"{self.unit_id}: reserve failed: {type(e).__name__}: {e}")
        return self._kv_address or address

    def advertise_kv_address(self, address: str | None) -> None:
        """Have senders reach this rank's KV receiver at ``address`` (a TCP proxy or NAT in
        front of it; the e2e fault proxy); None: the receiver's own address again."""
        self._kv_address = address

    def kv_address(self) -> str | None:
        """The KV receiver's own "host:port" (None: no receiver in this role)."""
        return self._receiver.address if self._receiver is not None else None

    def start(self, job: DecodeJob) -> WorkerError | None:
        """Start decoding ``job`` (``first_token_id=None``: prefill it here first); each of its
        choices is polled and cancelled by its own id (``job.choice_ids``)."""
        with self._lock:
            stage, refusal = self._stage, self._refusal(Role.DECODE, Role.MIXED)
            if refusal is None:
                for choice in job.choice_ids:
                    self._owners[choice] = stage
        if refusal is not None:
            return refusal
        try:
            stage.start(job)
        except Exception as e:
            with self._lock:
                for choice in job.choice_ids:
                    self._owners.pop(choice, None)
            return WorkerError(f"{self.unit_id}: start failed: {type(e).__name__}: {e}")
        return None

    @ray.method(concurrency_group=BLOCKING)
    def poll(self, request_id: str, cursor: int, timeout_s: float) -> TokenBatch:
        """Every token of ``request_id`` past ``cursor`` (waits up to ``timeout_s`` for one)."""
        with self._lock:
            stage = self._owners.get(request_id)
        if stage is None:
            return TokenBatch([], cursor, True, "abort", f"{self.unit_id}: unknown request")
        try:
            batch = stage.poll(request_id, cursor, timeout_s)
        except Exception as e:
            return TokenBatch([], cursor, True, "abort", f"poll failed: {e}")
        if batch.finished:
            with self._lock:
                self._owners.pop(request_id, None)
        return batch

    def cancel(self, request_id: str) -> None:
        """Stop a request here (any role) and free its pages and slot; idempotent."""
        with self._lock:
            stage = self._owners.pop(request_id, None) or self._stage
        stage.cancel(request_id)

    # ---- EPLB (pool manager) ----------------------------------------------------------------
    def expert_load(self) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
        """Tokens this rank routed to each logical expert per MoE layer over the EPLB window
        (``eplb_window_s`` in its current role; 0: since the last call), and the placement it
        serves (MoE layer -> slot -> logical expert)."""
        return self._load_window.take(), self.engine.placement

    @ray.method(concurrency_group=BLOCKING)
    def stage_placement(
        self, version: int, placement: dict[int, list[int]], peers: list[Any] | None = None
    ) -> int:
        """Read the new slots' weights (on an actor thread, never the step thread) from this
        host's checkpoint, or, for a layer whose file is not here, from the ``peers`` (the
        instance's rank actors, by rank) that hold the experts; the swap follows at the ranks'
        common ticks. Bytes staged; raises on failure. The steps from here to
        ``rebalance_steps`` are the rebalance's."""
        self._steps.open()
        fetch = self._peer_fetch(peers) if peers else None
        return self.engine.stage_placement(version, placement, fetch)

    def expert_weights(self, layer: int, expert_ids: list[int]) -> dict[str, Any]:
        """Weights of experts this rank holds (for a peer staging without the file)."""
        return self.engine.expert_weights(layer, expert_ids)

    def _peer_fetch(self, peers: list[Any]):
        def fetch(layer: int, expert_ids: list[int]) -> dict[str, Any]:
            placement = self.engine.placement[layer]  # what every rank serves now
            per_rank = len(placement) // self.num_ranks
            holders: dict[int, list[int]] = {}
            for e in expert_ids:
                rank = next(
                    s // per_rank
                    for s, x in enumerate(placement)
                    if x == e and s // per_rank != self.rank
                )  # each expert has a replica; one elsewhere, since this rank does not hold it
                holders.setdefault(rank, []).append(e)
            state: dict[str, Any] = {}
            for part in ray.get(
                [peers[r].expert_weights.remote(layer, es) for r, es in holders.items()]
            ):
                state.update(part)
            return state

        return fetch

    def rebalance_steps(self) -> dict[str, Any]:
        """The steps since ``stage_placement``: how many, the longest, and the median step
        before it (``common.meter.StepWindowStats`` as a dict)."""
        return asdict(self._steps.close())

    def abort_placement(self, version: int) -> bool:
        return self.engine.abort_placement(version)

    def is_resharding(self) -> bool:
        return self.engine.is_resharding

    # ---- state ------------------------------------------------------------------------------
    def stats(self) -> WorkerStats:
        with self._lock:
            role, stage, is_draining = self._role, self._stage, self._is_draining
        return WorkerStats(
            instance_id=self.unit_id,
            role=role.value,
            is_draining=is_draining,
            num_total_pages=self.engine.cache.allocator.num_pages,
            busy_s=self._busy_s,
            **asdict(stage.state()),
        )

    # ---- internals --------------------------------------------------------------------------
    def _make_stage(self, role: Role) -> Stage:
        """The stage of ``role`` around this rank's engine (imported here: the stage modules
        bring torch, which the pool manager, importing this module for the actor class, does
        not need)."""
        cfg = self.config
        if role is Role.PREFILL:
            from prefill.stage import PrefillStage

            return PrefillStage(self.engine, cfg.prefill_stage, cfg.transfer)
        if role is Role.MIXED:
            from decode.mixed import MixedStage

            return MixedStage(self.engine, cfg.mixed_stage)
        from decode.stage import DecodeStage

        if self._receiver is None:
            from kvtransfer import KVReceiver, accepted_fingerprints

            self._receiver = KVReceiver(
                self.engine.cache,
                self.engine.fingerprint,
                host=self._node_ip,
                config=cfg.transfer,
                wire_fingerprints=accepted_fingerprints(self.engine.config, [cfg.wire_format]),
            ).start()
        return DecodeStage(self.engine, cfg.decode_stage, self._receiver)

    def _stage_config(self):
        return self.config.mixed_stage if self._role is Role.MIXED else self.config.decode_stage

    def _refusal(self, *roles: Role) -> WorkerError | None:
        """Why this worker cannot take new work meant for ``roles`` now (caller holds _lock)."""
        if self._is_draining:
            return WorkerError(f"{self.unit_id} is draining (changing role); route elsewhere")
        if self._role not in roles:
            return WorkerError(f"{self.unit_id} is a {self._role.value} instance now")
        return None

    def _is_idle(self) -> bool:
        return self._stage.is_idle()

    def _start_loop(self) -> threading.Thread:
        self._loop_stop = threading.Event()
        thread = threading.Thread(
            target=self._step_forever, args=(self._stage, self._loop_stop), name="tidal-step"
        )
        thread.daemon = True
        thread.start()
        return thread

    def _stop_loop(self) -> None:
        self._loop_stop.set()
        if self._loop_thread.is_alive():
            self._loop_thread.join()

    def _step_forever(self, stage: Stage, stop: threading.Event) -> None:
        idle_wait_s = 0.01 if self.engine.ep is not None else 0.05
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                # an expert-parallel rank with nothing to run joins the busy ranks' ticks
                did_work = stage.step() or self.engine.idle_tick()
            except Exception:  # a bug in one step must not kill the instance; log it loudly
                log.exception("%s: step failed", self.unit_id)
                did_work = False
                time.sleep(0.05)
            if did_work:  # an idle tick counts: the rank waits on its busy peers' collectives
                dt = time.perf_counter() - t0
                self._busy_s += dt
                self._steps.add(dt)
            if not did_work:
                stage.wait_for_work(idle_wait_s)

    def _report_forever(self) -> None:
        while not self._closed.wait(self.config.report_interval_s):
            try:
                self._report()
            except Exception:  # the scheduler restarting must not kill the reporter
                log.exception("%s: report failed", self.unit_id)

    def _report(self) -> list[Any]:
        """Metrics, and the state reports to the scheduler; the reports' object refs."""
        if self._load_window is not None:
            self._load_window.snapshot()
        stats = self.stats()
        self._metrics.update(stats)
        if not self._is_reporting or stats.is_draining:
            return []
        refs = []
        if stats.role in ("prefill", "mixed"):
            refs.append(
                self._scheduler.update_prefill.remote(
                    PrefillInstanceState(
                        self.unit_id,
                        stats.num_queued_tokens,
                        stats.prefill_tokens_per_s,
                        frozenset(stats.cached_block_hashes),
                    )
                )
            )
        if stats.role in ("decode", "mixed"):
            for rid in self._stage.take_abandoned():  # its ingress died: release it there too
                self._scheduler.on_cancel.remote(rid)
            refs.append(
                self._scheduler.update_decode.remote(
                    DecodeInstanceState(
                        self.unit_id,
                        num_free_pages=stats.num_free_pages,
                        num_total_pages=stats.num_total_pages,
                        num_running=stats.num_running,
                        max_batch_size=self._stage_config().max_batch_size,
                        decode_step_s=stats.decode_step_s,
                        num_reserved_unfilled_pages=stats.num_reserved_unfilled_pages,
                        prefill_tokens_per_s=stats.prefill_tokens_per_s,
                    )
                )
            )
        return refs


def make_rank_worker(
    instance_id: str,
    rank: int,
    num_ranks: int,
    role: str,
    config: ClusterConfig,
    scheduler: Any,
    **options: Any,
) -> Any:
    """Start one rank actor; ``options`` go to ``.options()`` (placement, resources, name)."""
    cls = ray.remote(concurrency_groups={BLOCKING: config.max_concurrency})(RankWorker)
    opts = {"max_concurrency": 32, "max_restarts": 0, **options}
    return cls.options(**opts).remote(instance_id, rank, num_ranks, role, config, scheduler)
