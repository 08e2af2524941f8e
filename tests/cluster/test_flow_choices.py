"""``Flow.generate_choices`` with fake actors: n choices are routed, placed and prefilled once
(forked on the decode instance); a choice whose decode fails later resumes alone; the scheduler
releases the request when the last choice leaves."""

import asyncio
import time

from cluster.config import ClusterConfig, EngineSpec
from cluster.flow import Finished, Flow, Generation, Started, Tokens
from common.sampling import SamplingParams
from decode.jobs import TokenBatch
from scheduler.state import RouteDecision


class _Done:
    """What ``.remote()`` of a fake actor method returns: already answered, awaitable."""

    def __init__(self, value):
        self.value = value

    def __await__(self):
        yield from ()
        return self.value


class _Method:
    def __init__(self, fn, calls):
        self.fn, self.calls = fn, calls

    def remote(self, *args):
        self.calls.append(args)
        return _Done(self.fn(*args))


class FakeActor:
    """Any method name: records its calls, answers with ``answers[name](*args)``."""

    def __init__(self, **answers):
        self.answers, self.calls = answers, {}

    def __getattr__(self, name):
        fn = self.answers.get(name, lambda *a: None)
        return _Method(fn, self.calls.setdefault(name, []))


class Directory:
    def __init__(self, handles):
        self.handles = handles

    async def get(self, instance_id):
        return self.handles[instance_id]

    async def report_failure(self, instance_id):
        pass


def poll(rid, cursor, timeout_s):
    if rid == "r.1.c1":  # choice 1's decode fails after one token
        return TokenBatch([7], 1, True, "abort", "decode died")
    if rid == "r.c1.2":  # its resume: the one token left
        return TokenBatch([9], 1, True, "length")
    return TokenBatch([7, 8], 2, True, "length")


def route(spec, owner_id=None):
    return RouteDecision(spec.request_id, None, "d0", 0, spec.num_pages(16), 0.01)


async def collect(stream):
    return [event async for event in stream]


def test_choices_place_once_and_a_failed_choice_resumes_alone():
    scheduler, decode = FakeActor(route=route), FakeActor(poll=poll)
    flow = Flow(ClusterConfig(EngineSpec("/m")), scheduler, Directory({"d0": decode}))
    gens = [
        Generation(f"r.c{i}", [1, 2, 3], 2, SamplingParams(temperature=1.0, seed=5 + i))
        for i in range(3)
    ]

    async def run():
        streams = flow.generate_choices("r", gens)
        first = await streams[0].__anext__()  # choice 0 places the group
        rest = await asyncio.gather(*(s.__anext__() for s in streams[1:]))
        assert all(isinstance(e, Started) for e in [first, *rest])
        return await asyncio.gather(*map(collect, streams))

    events = asyncio.run(run())
    for choice in events:
        assert isinstance(choice[-1], Finished) and choice[-1].finish_reason == "length"
    tokens = [[t for e in c if isinstance(e, Tokens) for t in e.token_ids] for c in events]
    assert tokens == [[7, 8], [7, 9], [7, 8]]  # choice 1: its token, then its resume's

    specs = [args[0] for args in scheduler.calls["route"]]
    assert [(s.request_id, s.num_choices) for s in specs] == [("r.1", 3), ("r.c1.2", 1)]
    assert specs[1].prompt_len == 4 and specs[1].max_tokens == 1  # resumed after one token
    (group_job,), resumed_job = decode.calls["start"][0], decode.calls["start"][1][0]
    assert [f.sampling.seed for f in group_job.forks] == [6, 7] and group_job.request_id == "r.1"
    assert resumed_job.request_id == "r.c1.2" and resumed_job.sampling.seed == 6
    assert not resumed_job.forks

    deadline = time.monotonic() + 5  # cleanup runs on the flow's own thread
    while time.monotonic() < deadline and len(scheduler.calls.get("on_finished", [])) < 2:
        time.sleep(0.01)
    assert sorted(a[0] for a in scheduler.calls["on_finished"]) == ["r.1", "r.c1.2"]
    assert ("r.1.c1",) in decode.calls["cancel"]  # the failed choice only
    assert ("r.1",) not in decode.calls["cancel"]
