"""A rank worker actor: serves a role, changes role in place (same process, same engine)."""

import pytest


@pytest.fixture(scope="module")
def worker(ray_session, tiny_model_dir):
    from cluster.settings import ServeSettings
    from cluster.worker import make_rank_worker
    from scheduler.actor import make_scheduler_actor

    config = ServeSettings(model=str(tiny_model_dir), cpus_per_rank=0.25, num_pages=64).to_config()
    scheduler = make_scheduler_actor(config.scheduler)
    w = make_rank_worker("w0", 0, 1, "prefill", config, scheduler, num_cpus=0.25)
    ray_session.get(w.launch.remote(None))
    yield w
    ray_session.get(w.shutdown.remote())
    ray_session.kill(w)
    ray_session.kill(scheduler)


def _run_to_end(ray, worker, request_id):
    ids, cursor = [], 0
    while True:
        batch = ray.get(worker.poll.remote(request_id, cursor, 5.0))
        ids += batch.token_ids
        cursor = batch.cursor
        if batch.finished:
            return ids, batch


def test_role_change_keeps_the_engine(ray_session, worker, tiny_model_dir):
    from cluster.messages import WorkerError
    from decode.jobs import DecodeJob
    from model import Engine

    ray = ray_session
    before = ray.get(worker.ready.remote())
    assert before.role == "prefill" and before.kv_address is None
    # a prefill worker refuses decode work, as a value
    refused = ray.get(worker.start.remote(DecodeJob("r0", [1, 2, 3], None, max_tokens=2)))
    assert isinstance(refused, WorkerError) and "prefill" in refused.message

    after = ray.get(worker.set_role.remote("mixed"))
    assert after.role == "mixed" and after.pid == before.pid  # same process: no reload
    prompt = [5, 9, 14, 200, 31, 7]
    job = DecodeJob("r1", prompt, None, max_tokens=6, ignore_eos=True)
    assert ray.get(worker.start.remote(job)) is None
    ids, batch = _run_to_end(ray, worker, "r1")
    assert batch.finish_reason == "length"
    assert ids == Engine.load(tiny_model_dir).generate([prompt], 6)[0]

    decode = ray.get(worker.set_role.remote("decode"))
    assert decode.role == "decode" and decode.kv_address and decode.pid == before.pid
    stats = ray.get(worker.stats.remote())
    assert stats.num_free_pages == stats.num_total_pages  # the mixed stage's pages came back
