"""The actor shell: queued routes resolve when pages free up, errors come back as values."""

import asyncio

import pytest

from scheduler import (
    DecodeInstanceState,
    Rejection,
    RequestSpec,
    RouteDecision,
    SchedulerConfig,
    SchedulerError,
)
from scheduler.actor import SchedulerActor, make_scheduler_actor

CONFIG = SchedulerConfig(ttft_slo_s=10.0, decode_local_threshold=0)


def spec(rid: str, prompt_len: int = 2000, max_tokens: int = 40) -> RequestSpec:
    return RequestSpec(rid, prompt_len, max_tokens)


def test_queued_route_waits_for_pages_and_cancel_answers_499():
    async def scenario():
        actor = SchedulerActor(CONFIG, drain_interval_s=0.01)
        assert await actor.add_instance("p0", "prefill") is None
        assert await actor.add_instance("d0", "decode") is None
        await actor.update_decode(DecodeInstanceState("d0", 50, 50))  # room for one request
        first = await actor.route(spec("a"))
        assert isinstance(first, RouteDecision)
        waiting = asyncio.ensure_future(actor.route(spec("b")))
        cancelled = asyncio.ensure_future(actor.route(spec("c")))
        await asyncio.sleep(0.05)
        assert not waiting.done() and (await actor.stats()).num_queued == 2
        assert await actor.on_cancel("c") is True
        assert (await cancelled).status == 499
        assert await actor.on_finished("a") is True
        second = await asyncio.wait_for(waiting, timeout=5)
        assert isinstance(second, RouteDecision) and second.request_id == "b"
        stats = await actor.stats()
        assert stats.num_queued == 0 and stats.num_reserved_pages == {"d0": 32}

        error = await actor.update_decode(DecodeInstanceState("nope", 1, 1))
        assert isinstance(error, SchedulerError) and "add_instance" in error.message
        assert isinstance(await actor.route(spec("dup", 100, 10)), RouteDecision)
        dup = await actor.route(spec("dup", 100, 10))
        assert isinstance(dup, Rejection) and dup.status == 500 and "unique" in dup.message

    asyncio.run(scenario())


def test_an_expired_owner_s_queued_route_answers_499():
    async def scenario():
        actor = SchedulerActor(
            SchedulerConfig(ttft_slo_s=10.0, decode_local_threshold=0, owner_lease_s=0.05),
            drain_interval_s=0.01,
        )
        await actor.add_instance("p0", "prefill")
        await actor.add_instance("d0", "decode")
        await actor.update_decode(DecodeInstanceState("d0", 50, 50))  # room for one request
        assert isinstance(await actor.route(spec("a"), "dead"), RouteDecision)
        waiting = asyncio.ensure_future(actor.route(spec("b"), "dead"))
        await asyncio.sleep(0.1)
        orphans = await actor.expire_owners()
        assert sorted((o.request_id, o.instance_ids) for o in orphans) == [
            ("a", ("p0", "d0")),
            ("b", ()),
        ]
        answer = await asyncio.wait_for(waiting, timeout=5)
        assert answer.status == 499 and "lease" in answer.message
        stats = await actor.stats()
        assert stats.num_queued == 0 and stats.num_active == 0
        assert stats.num_reserved_pages == {"d0": 0}

    asyncio.run(scenario())


@pytest.mark.timeout(120)
def test_ray_actor_routes_and_releases(ray_session):
    ray = ray_session
    actor = make_scheduler_actor(CONFIG)
    ray.get([actor.add_instance.remote("p0", "prefill"), actor.add_instance.remote("d0", "decode")])
    ray.get(actor.update_decode.remote(DecodeInstanceState("d0", 100, 100)))
    decision = ray.get(actor.route.remote(spec("r1")))
    assert isinstance(decision, RouteDecision) and decision.prefill_instance_id == "p0"
    assert ray.get(actor.stats.remote()).num_reserved_pages == {"d0": 32}
    assert ray.get(actor.on_finished.remote("r1")) is True
    assert ray.get(actor.stats.remote()).num_reserved_pages == {"d0": 0}
    ray.kill(actor)
