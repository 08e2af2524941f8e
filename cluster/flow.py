"""One request through the cluster, as the ingress drives it (docs/serving-contract.md).

``Flow.generate(gen)`` is an async generator of events: ``Started`` once the request is placed,
``Tokens`` for every batch a long-poll returns, ``Finished`` at the end. The steps:
1. route: the scheduler actor answers a ``RouteDecision`` or a ``Rejection`` (-> ``ApiError``
   400/429/503 before anything is sent).
2. place: decode-local or mixed -> ``decode.start(job without first token)``; disaggregated ->
   ``decode.reserve`` (pages + receiver address), ``prefill.prefill`` (chunked prefill, KV
   streamed per layer, first token back), ``decode.start(job with first token)``.
3. stream: ``decode.poll(id, cursor)`` returns every token since the cursor in one message.
4. end: ``scheduler.on_finished``; on any exit without a finish (client gone, stop string,
   error) the request is cancelled on every worker that holds it and in the scheduler, which
   frees its pages and batch slot.
Failures: a worker that refuses (draining, out of pages, wrong role after a move) or fails a
prefill sends the request back to step 1. A dead worker is reported to the pool manager (which
takes it out of the scheduler and starts a replacement) and the request is *resumed*: routed
again with the prompt plus the tokens generated so far as its prompt and the rest of its
``max_tokens``, so the client's stream continues where it stopped (greedy output is the same
tokens; a seeded sampled request continues with a fresh, still deterministic, draw sequence).
After ``max_attempts`` routes the request ends with a clear error (503 before the first token,
an error event in the stream after it). While a pool heals (no decode instance), re-routes wait
up to ``reroute_timeout_s`` for capacity instead of failing.
Every route names this ingress replica as its owner, and a thread renews the owner's lease in
the scheduler: when the replica dies, the pool manager cancels its requests wherever they are
(queued, prefilling, decoding) once the lease lapses (``owner_lease_s``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from cluster.config import ClusterConfig
from cluster.errors import ApiError, StreamError
from cluster.messages import WorkerError
from common.sampling import SamplingParams, TokenLogprob
from decode.jobs import DecodeJob, Fork, TokenBatch, choice_id
from prefill.jobs import PrefillJob
from scheduler.state import Rejection, RequestSpec, RouteDecision

T = TypeVar("T")
log = logging.getLogger(__name__)

REROUTE_TIMEOUT_S = 120.0  # a re-route waits this long for a healing pool


@dataclass(frozen=True)
class Generation:
    """A validated, tokenised request."""

    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class Started:
    """Placed: the response may begin. ``num_cached_tokens``: prompt tokens from the prefix
    cache (reported by the prefill instance, or the scheduler's estimate for local prefill)."""

    num_cached_tokens: int


@dataclass(frozen=True)
class Tokens:
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None  # one per token when the sampling asked


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" | "length"


Event = Started | Tokens | Finished


class _Retry(Exception):
    """This attempt failed in a way another route may fix."""

    def __init__(self, message: str, instance_id: str | None = None, is_dead: bool = False):
        super().__init__(message)
        self.message = message
        self.instance_id = instance_id
        self.is_dead = is_dead


class InstanceDirectory:
    """instance id -> leader actor handle, cached from the pool manager."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._handles: dict[str, Any] = {}

    async def get(self, instance_id: str) -> Any:
        if instance_id not in self._handles:
            self._handles = await self._pool.handles.remote()
        handle = self._handles.get(instance_id)
        if handle is None:
            raise _Retry(f"instance {instance_id} is gone", instance_id)
        return handle

    async def scheduler_after_failure(self) -> Any:
        """A call to the scheduler failed: the pool manager checks it (restarting a dead one,
        which the workers then report to) and hands out the live one."""
        return await self._pool.scheduler_handle.remote(is_suspect=True)

    async def report_failure(self, instance_id: str) -> None:
        """Tell the pool manager; returns once a dead instance is out of the scheduler."""
        self._handles.pop(instance_id, None)
        await self._pool.report_failure.remote(instance_id)


@dataclass
class _Attempt:
    """One route of a request: what must be undone if it does not finish."""

    sid: str  # request id on the workers and in the scheduler: "<request id>.<attempt>"
    decision: RouteDecision
    num_choices: int = 1  # choice i runs on the decode instance as choice_id(sid, i)
    decode: Any = None
    prefill: Any = None
    is_done: bool = False
    ttft_parts: dict[str, float] = field(default_factory=dict)  # measured by the prefill side

    def abandon(self, scheduler: Any, detached: Callable[[Callable[[], Any]], Any]) -> None:
        """Cancel everywhere, fire and forget, through ``detached`` (``Flow.detached``)."""
        if self.is_done:
            return
        self.is_done = True
        handles = [h for h in (self.decode, self.prefill) if h is not None]

        choice_ids = [choice_id(self.sid, i) for i in range(self.num_choices)]

        def send() -> None:
            for handle in handles:
                for rid in choice_ids:  # a prefill knows only choice 0's id
                    handle.cancel.remote(rid)
            scheduler.on_cancel.remote(self.sid)

        detached(send)


@dataclass
class _Placed:
    """Where a group of choices runs once placed."""

    run: _Attempt
    decode: Any  # the decode instance's leader handle
    num_cached: int
    route_s: float


class _Group:
    """The ``n`` choices of one prompt, placed once for all (``Flow.generate_choices``)."""

    def __init__(self, request_id: str, gens: list[Generation]) -> None:
        self.request_id = request_id
        self.gens = gens
        self.placement: asyncio.Future[_Placed] | None = None
        self.num_attempts = 0  # routes the placement took
        self.num_live = len(gens)  # choices still on the shared placement
        self.is_ttft_reported = False
        self.t0 = time.monotonic()


class Flow:
    """Drives requests through scheduler, prefill and decode workers (one per ingress replica)."""

    def __init__(
        self,
        config: ClusterConfig,
        scheduler: Any,
        directory: InstanceDirectory,
        on_reroute: Callable[[str], None] = lambda stage: None,
        on_ttft_parts: Callable[[dict[str, float]], None] = lambda parts: None,
    ):
        self.config = config
        self.scheduler = scheduler
        self.directory = directory
        self.on_reroute = on_reroute  # called with "prefill" or "decode" (metrics)
        self.on_ttft_parts = on_ttft_parts  # once per request, at its first token (metrics)
        self._cleanup = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tidal-cleanup")
        self.owner_id = f"ingress-{uuid.uuid4().hex[:12]}"  # this replica in the scheduler
        threading.Thread(target=self._renew_forever, name="tidal-lease", daemon=True).start()

    def _renew_forever(self) -> None:
        """Renew this replica's lease in the scheduler (on a thread: a busy event loop must not
        look like a dead replica). Fire and forget: a lost renewal only brings expiry closer."""
        interval_s = self.config.scheduler.owner_lease_s / 5
        while True:
            time.sleep(interval_s)
            try:
                self.scheduler.renew.remote(self.owner_id)
            except Exception:  # noqa: BLE001 - the scheduler restarting must not stop renewals
                log.exception("lease renewal failed")

    def detached(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` (actor calls that undo a request) on a thread outside the request's task.

        A client that disconnects makes Serve cancel the request's task with ``ray.cancel``,
        which is recursive: actor calls the task makes while it unwinds count as its children
        and are cancelled too, before they run, and the request's pages would never be freed.
        Calls made from a thread of its own (which does not inherit the task's context) are
        nobody's children.
        """
        self._cleanup.submit(fn)

    async def generate(
        self,
        gen: Generation,
        generated: list[int] | None = None,
        first_attempt: int = 1,
    ) -> AsyncIterator[Event]:
        """One request's events (module doc). ``generated``/``first_attempt``: resume a choice
        of ``generate_choices`` that already streamed these tokens (no ``Started`` then)."""
        is_resume = generated is not None
        generated = list(generated or [])
        is_started = is_resume
        last_error = "no attempt made"
        t0 = time.monotonic()
        for attempt in range(first_attempt, self.config.max_attempts + 1):
            remaining = gen.max_tokens - len(generated)
            if remaining <= 0:  # the tokens all arrived; only the finish was lost
                yield Finished("length")
                return
            prompt = gen.prompt_ids + generated
            sid = f"{gen.request_id}.{attempt}"
            t_route = time.monotonic()
            decision = await self._route(sid, prompt, remaining, is_retry=attempt > 1)
            route_s = time.monotonic() - t_route
            if isinstance(decision, Rejection):
                error = rejection_error(decision)
                if not is_started:
                    raise error
                raise StreamError(f"re-route after a worker failure rejected: {error.message}")
            run = _Attempt(sid, decision)
            try:
                decode, num_cached = await self._place(run, prompt, remaining, [gen])
                if not is_started:
                    is_started = True
                    yield Started(num_cached)
                cursor = 0
                while True:
                    batch = await self._poll(decision.decode_instance_id, decode, sid, cursor)
                    cursor = batch.cursor
                    if batch.token_ids:
                        if not generated and not is_resume:
                            self._report_ttft(time.monotonic() - t0, route_s, run.ttft_parts)
                        generated.extend(batch.token_ids)
                        yield Tokens(batch.token_ids, batch.logprobs)
                    if batch.finished:
                        _raise_if_aborted(batch, decision.decode_instance_id)
                        run.is_done = True
                        self.scheduler.on_finished.remote(sid)
                        yield Finished(batch.finish_reason or "stop")
                        return
            except _Retry as e:
                run.abandon(self.scheduler, self.detached)
                last_error = e.message
                await self._after_failure(e, decision)
            except BaseException:  # client gone (GeneratorExit, CancelledError), stop string, bug
                run.abandon(self.scheduler, self.detached)
                raise
        message = f"request failed after {self.config.max_attempts} attempts: {last_error}"
        if not is_started:
            raise ApiError(503, message, code="no_capacity", retry_after_s=1.0)
        raise StreamError(message)

    def generate_choices(
        self, request_id: str, gens: list[Generation]
    ) -> list[AsyncIterator[Event]]:
        """The events of each of ``gens``: the choices of one prompt (same prompt, max_tokens
        and stop conditions; each its own sampling), run as one request (module doc). Start
        choice 0's iterator first: it places the group, the others wait for that placement."""
        if len(gens) == 1:
            return [self.generate(gens[0])]
        group = _Group(request_id, gens)
        return [self._choice(group, i) for i in range(len(gens))]

    async def _choice(self, group: _Group, index: int) -> AsyncIterator[Event]:
        """Choice ``index`` of a group: its share of the placement, then its own stream; a
        failure after placement resumes it alone (``generate``)."""
        try:
            placed = await self._group_placement(group)
        except BaseException:  # gone while another choice placed the group: leave it
            if group.placement is not None and group.placement.done():
                if not group.placement.cancelled() and group.placement.exception() is None:
                    placed = group.placement.result()
                    self._leave(group, placed, choice_id(placed.run.sid, index), False)
            raise
        yield Started(placed.num_cached)
        decision = placed.run.decision
        cid = choice_id(placed.run.sid, index)
        generated: list[int] = []
        cursor, state = 0, "running"
        try:
            while True:
                batch = await self._poll(decision.decode_instance_id, placed.decode, cid, cursor)
                cursor = batch.cursor
                if batch.token_ids:
                    if not group.is_ttft_reported:
                        group.is_ttft_reported = True
                        ttft_s = time.monotonic() - group.t0
                        self._report_ttft(ttft_s, placed.route_s, placed.run.ttft_parts)
                    generated.extend(batch.token_ids)
                    yield Tokens(batch.token_ids, batch.logprobs)
                if batch.finished:
                    _raise_if_aborted(batch, decision.decode_instance_id)
                    state = "finished"
                    self._leave(group, placed, cid, is_finished=True)
                    yield Finished(batch.finish_reason or "stop")
                    return
        except _Retry as e:
            state = "failed"
            self._leave(group, placed, cid, is_finished=False)
            await self._after_failure(e, decision)
        finally:
            if state == "running":  # client gone, stop string, bug: this choice only
                self._leave(group, placed, cid, is_finished=False)
        resumed = self.generate(group.gens[index], generated, group.num_attempts + 1)
        try:
            async for event in resumed:
                yield event
        finally:
            await resumed.aclose()

    async def _group_placement(self, group: _Group) -> _Placed:
        """The group's placement: the first caller places it (``_place_group``), the others
        wait for that; a failure to place is every choice's."""
        if group.placement is None:
            group.placement = asyncio.get_running_loop().create_future()
            try:
                placed = await self._place_group(group)
            except Exception as e:
                group.placement.set_exception(e)
                raise
            except BaseException:
                group.placement.cancel()
                raise
            group.placement.set_result(placed)
            return placed
        return await asyncio.shield(group.placement)

    async def _place_group(self, group: _Group) -> _Placed:
        """Steps 1-2 for all choices at once, re-routed as a whole until a placement holds
        (no choice has a token yet)."""
        gen, n = group.gens[0], len(group.gens)
        last_error = "no attempt made"
        for attempt in range(1, self.config.max_attempts + 1):
            group.num_attempts = attempt
            sid = f"{group.request_id}.{attempt}"
            t_route = time.monotonic()
            decision = await self._route(
                sid, gen.prompt_ids, gen.max_tokens, is_retry=attempt > 1, num_choices=n
            )
            route_s = time.monotonic() - t_route
            if isinstance(decision, Rejection):
                raise rejection_error(decision)
            run = _Attempt(sid, decision, num_choices=n)
            try:
                decode, num_cached = await self._place(
                    run, gen.prompt_ids, gen.max_tokens, group.gens
                )
                return _Placed(run, decode, num_cached, route_s)
            except _Retry as e:
                run.abandon(self.scheduler, self.detached)
                last_error = e.message
                await self._after_failure(e, decision)
            except BaseException:
                run.abandon(self.scheduler, self.detached)
                raise
        message = f"request failed after {self.config.max_attempts} attempts: {last_error}"
        raise ApiError(503, message, code="no_capacity", retry_after_s=1.0)

    def _leave(self, group: _Group, placed: _Placed, cid: str, is_finished: bool) -> None:
        """A choice is done with the shared placement: cancel it on the decode instance unless
        it finished there; the last one out releases the request in the scheduler."""
        decode, scheduler_sid = placed.decode, placed.run.sid
        group.num_live -= 1
        is_last = group.num_live == 0
        if is_last:
            placed.run.is_done = True

        def send() -> None:
            if not is_finished:
                decode.cancel.remote(cid)
            if is_last:
                self.scheduler.on_finished.remote(scheduler_sid)

        self.detached(send)

    async def _after_failure(self, e: _Retry, decision: RouteDecision) -> None:
        """Count the re-route; a dead instance is reported (out of the scheduler on return)."""
        is_prefill = e.instance_id is not None and e.instance_id != decision.decode_instance_id
        self.on_reroute("prefill" if is_prefill else "decode")
        if e.is_dead and e.instance_id is not None:
            await self.directory.report_failure(e.instance_id)

    async def _poll(self, instance_id: str, decode: Any, rid: str, cursor: int) -> TokenBatch:
        """Step 3: every token of ``rid`` past ``cursor`` (a long-poll)."""
        return await self._call(
            instance_id, decode.poll.remote(rid, cursor, self.config.poll_timeout_s)
        )

    async def _route(
        self, sid: str, prompt: list[int], max_tokens: int, is_retry: bool, num_choices: int = 1
    ) -> RouteDecision | Rejection:
        block_size = self.config.scheduler.block_size
        spec = RequestSpec.from_token_ids(sid, prompt, max_tokens, block_size, num_choices)
        deadline = time.monotonic() + REROUTE_TIMEOUT_S
        while True:
            try:
                answer = await self.scheduler.route.remote(spec, self.owner_id)
            except RayActorError as e:  # the scheduler died: route on its replacement
                if time.monotonic() > deadline:
                    raise ApiError(503, f"scheduler unavailable: {e}", retry_after_s=1.0) from e
                self.scheduler = await self.directory.scheduler_after_failure()
                continue
            except BaseException:
                # Gone while routing (client disconnect): the scheduler may still place or queue
                # it; cancelling after the route (same caller, so in order) releases either.
                self.detached(lambda: self.scheduler.on_cancel.remote(sid))
                raise
            # A re-route while the pools heal (no decode instance yet) waits for the replacement.
            if not (is_retry and isinstance(answer, Rejection) and answer.status == 503):
                return answer
            if time.monotonic() > deadline:
                return answer
            await asyncio.sleep(0.5)

    async def _place(
        self, run: _Attempt, prompt: list[int], max_tokens: int, gens: list[Generation]
    ) -> tuple[Any, int]:
        """Step 2 of the contract for the choices ``gens`` of one prompt (choice 0 first: the
        others fork from it on the decode instance); returns the decode handle and the cached
        prompt tokens."""
        d, gen = run.decision, gens[0]
        run.decode = decode = await self.directory.get(d.decode_instance_id)
        if d.is_local_prefill:
            forks = tuple(Fork(g.sampling) for g in gens[1:])
            job = DecodeJob(
                run.sid, prompt, None, gen.sampling, max_tokens, gen.stop_token_ids,
                gen.ignore_eos, forks=forks,
            )  # fmt: skip
            refused = await self._call(d.decode_instance_id, decode.start.remote(job))
            _raise_if_refused(refused, d.decode_instance_id)
            return decode, d.num_cached_tokens
        assert d.prefill_instance_id is not None
        run.prefill = prefill = await self.directory.get(d.prefill_instance_id)
        lease_s = self.config.transfer.lease_s + 2 * d.estimated_ttft_s
        address = await self._call(
            d.decode_instance_id,
            decode.reserve.remote(
                run.sid, len(prompt) + max_tokens, lease_s, len(gens), len(prompt)
            ),
        )
        _raise_if_refused(address, d.decode_instance_id)
        job = PrefillJob(
            run.sid, prompt, gen.sampling, address, self.config.wire_format,
            fork_sampling=tuple(g.sampling for g in gens[1:]),
        )  # fmt: skip
        result = await self._call(d.prefill_instance_id, prefill.prefill.remote(job))
        run.prefill = None  # finished there: nothing left to cancel
        if result.error is not None:
            raise _Retry(f"prefill {d.prefill_instance_id}: {result.error}", d.prefill_instance_id)
        run.ttft_parts = {
            "prefill_queue": result.queue_s,
            "prefill_compute": result.compute_s,
            "transfer_tail": result.transfer_tail_s,
        }
        # only a prefill that succeeded put its blocks in that instance's prefix cache
        self.scheduler.on_prefill_done.remote(run.sid)
        forks = tuple(
            Fork(g.sampling, token_id, logprob)
            for g, token_id, logprob in zip(
                gens[1:], result.fork_first_token_ids, result.fork_first_logprobs, strict=True
            )
        )
        job = DecodeJob(
            run.sid,
            prompt,
            result.first_token_id,
            gen.sampling,
            max_tokens,
            gen.stop_token_ids,
            gen.ignore_eos,
            result.first_logprob,
            forks,
        )
        refused = await self._call(d.decode_instance_id, decode.start.remote(job))
        _raise_if_refused(refused, d.decode_instance_id)
        return decode, result.num_cached_tokens

    def _report_ttft(self, ttft_s: float, route_s: float, prefill_parts: dict[str, float]) -> None:
        """Split one request's TTFT into its parts (``cluster.metrics.TTFT_PARTS``), which add
        up to it: ``decode_admission`` is the rest (reserve and start calls, decode-local
        prefill, the first poll; earlier failed attempts count there too)."""
        parts = {"scheduler_queue": route_s, **prefill_parts}
        parts["decode_admission"] = max(ttft_s - sum(parts.values()), 0.0)
        self.on_ttft_parts(parts)

    @staticmethod
    async def _call(instance_id: str, ref: Awaitable[T]) -> T:
        """Await an actor call; a dead actor or a raised error becomes ``_Retry``."""
        try:
            return await ref
        except (ActorDiedError, ActorUnavailableError, RayActorError) as e:
            raise _Retry(f"instance {instance_id} died: {e}", instance_id, is_dead=True) from e
        except RayTaskError as e:
            raise _Retry(f"instance {instance_id} failed: {e}", instance_id) from e


def _raise_if_aborted(batch: TokenBatch, instance_id: str) -> None:
    if batch.finish_reason == "abort":
        raise _Retry(f"decode {instance_id}: {batch.error or 'aborted'}", instance_id)


def _raise_if_refused(answer: Any, instance_id: str) -> None:
    if isinstance(answer, WorkerError):
        raise _Retry(f"instance {instance_id}: {answer.message}", instance_id)


def rejection_error(r: Rejection) -> ApiError:
    """The HTTP error of a scheduler rejection (429s carry Retry-After)."""
    status = r.status if r.status in (400, 429, 503) else 500
    return ApiError(status, r.message, code=r.reason, retry_after_s=r.retry_after_s)
