"""Fixtures of the end-to-end tests: a tidal deployment on the session's Ray, real HTTP.

One Serve instance (HTTP on a free port) for the session; each test module deploys its own
application with ``deploy(settings)`` (module-scoped fixture) and deletes it at the end, so
modules never share pool state. Offline greedy references come from an engine in the test
process with the workers' engine settings.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

MODEL_NAME = "k2-tiny"
# Small enough for two cores: fractional CPUs so 4 instances fit, small chunks and budgets.
BASE_SETTINGS: dict[str, Any] = {
    "model_name": MODEL_NAME,
    "cpus_per_rank": 0.25,
    "num_pages": 256,  # 16,384 tokens of KV per worker
    "decode_local_threshold": 0,  # every prompt through the prefill pool in 1P+1D tests
    "health_interval_s": 0.5,
    "report_interval_s": 0.1,
    "drain_timeout_s": 60.0,
}


# The admin routes need a bearer token: deployed() builds every app with this one, and the
# helpers (pools(), ADMIN headers) send it.
ADMIN_TOKEN = "e2e-admin-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def serve_url(ray_session) -> Iterator[str]:
    from ray import serve

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@contextmanager
def deployed(serve_url: str, model_dir: Any, name: str, **overrides: Any) -> Iterator[str]:
    """Deploy an application with ``BASE_SETTINGS | overrides``, wait for /health, delete it
    afterwards; yields the base URL."""
    from ray import serve

    from cluster.app import build_app_from_config
    from cluster.serve import wait_healthy
    from cluster.settings import ServeSettings

    settings = ServeSettings(
        **{**BASE_SETTINGS, "model": str(model_dir), "name": name, **overrides}
    )
    os.environ[settings.admin_token_env] = ADMIN_TOKEN  # read by to_config()
    serve.run(build_app_from_config(settings.to_config()), name=name, route_prefix="/")
    try:
        wait_healthy(serve_url, 240.0)
        yield serve_url
    finally:
        workers = list(pool_handle(name).handles.remote().result().values())
        serve.delete(name)
        _wait_dead(workers)


def pool_handle(app_name: str) -> Any:
    """The application's pool manager (a Serve deployment handle)."""
    from ray import serve

    return serve.get_deployment_handle("PoolManager", app_name)


def _wait_dead(workers: list[Any], timeout_s: float = 30.0) -> None:
    """Deleting the app kills its workers; wait so the next module starts on a clean cluster."""
    import ray

    deadline = time.monotonic() + timeout_s
    for w in workers:
        while time.monotonic() < deadline:
            try:
                ray.get(w.ping.remote(), timeout=5)
            except Exception:
                break
            time.sleep(0.2)


@pytest.fixture(scope="session")
def reference_engine(tiny_model_dir):
    """The offline engine the served output must match token for token."""
    from model import Engine

    return Engine.load(tiny_model_dir)


def assert_idle_pages(url: str, timeout_s: float = 60.0) -> None:
    """Idle: decode ranks hold no pages; prefill and mixed ranks only prefix-cache pages; no
    request active in the scheduler (every rank of every instance checked)."""

    def settled():
        snap = pools(url)
        for inst in snap["instances"]:
            if len(inst["rank_stats"]) != inst["num_ranks"]:
                return None
            for s in inst["rank_stats"]:
                if s is None:
                    return None
                held = 0 if inst["role"] == "decode" else s["num_cached_blocks"]
                if s["num_used_pages"] != held or s["num_running"] or s["num_queued"]:
                    return None
        return snap["scheduler"]["num_active"] == 0 and snap

    wait_for(settled, timeout_s=timeout_s, what="every page back and no request active")


def offline_greedy(engine: Any, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    return engine.generate(prompts, max_tokens)


def pools(url: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/admin/pools", headers=ADMIN, timeout=30)
    r.raise_for_status()
    return r.json()


def wait_for(predicate, timeout_s: float = 30.0, interval_s: float = 0.2, what: str = "condition"):
    """Poll ``predicate()`` until it returns a truthy value; that value."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out waiting for {what}; last value {last!r}")


# ---- prompts shared by the disaggregated and colocated modules -------------------------------
LONG_PROMPT_LEN = 4200  # > 4K: prefilled in several chunks (engine chunk 512, stage budgets)
MAX_TOKENS = 8


def make_prompt(n: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(1, 500) for _ in range(n)]


@pytest.fixture(scope="session")
def greedy_cases(reference_engine) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, offline greedy output) for five prompts, one of them 4K+ tokens."""
    prompts = [make_prompt(n, seed) for seed, n in enumerate([5, 17, 64, 130, LONG_PROMPT_LEN])]
    outputs = [reference_engine.generate([p], MAX_TOKENS)[0] for p in prompts]
    return list(zip(prompts, outputs, strict=True))


def completion_ids(client: Any, prompt: list[int], max_tokens: int = MAX_TOKENS, **kw: Any) -> Any:
    """A greedy completion of token ids through the openai client; the response."""
    return client.completions.create(
        model=MODEL_NAME,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": True, **kw.pop("extra_body", {})},
        **kw,
    )


def stream_ids(
    client: Any, prompt: list[int], max_tokens: int = MAX_TOKENS
) -> tuple[list[int], str, Any]:
    """Stream a greedy completion; (token ids, text, the usage chunk)."""
    ids: list[int] = []
    text = ""
    usage = None
    finish = None
    stream = client.completions.create(
        model=MODEL_NAME,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            ids += choice.model_extra.get("token_ids") or []
            text += choice.text or ""
            finish = choice.finish_reason or finish
    assert finish == "length", finish
    return ids, text, usage


@pytest.fixture()
def client_factory():
    import openai

    def make(url: str) -> Any:
        return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)

    return make


# ---- raw HTTP helpers (no client library in the way) -----------------------------------------
def http_complete(url: str, prompt: list[int], max_tokens: int) -> list[int]:
    """A greedy completion of token ids over plain HTTP; the generated token ids."""
    r = httpx.post(
        f"{url}/v1/completions",
        json={
            "model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True,
        },
        timeout=180,
    )  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def http_complete_all(url: str, cases: list[tuple[list[int], list[int]]]) -> list[list[int]]:
    """Every (prompt, expected) case's greedy completion, all sent at once; outputs in order."""
    import threading

    outs: dict[int, list[int]] = {}
    threads = [
        threading.Thread(
            target=lambda i=i, p=p, n=len(e): outs.update({i: http_complete(url, p, n)})
        )
        for i, (p, e) in enumerate(cases)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [outs.get(i) for i in range(len(cases))]


def http_stream(url: str, prompt: list[int], max_tokens: int, out: dict) -> None:
    """Stream a greedy completion into ``out``: status, ids (as they arrive), finish, error."""
    import json

    body = {
        "model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, "return_token_ids": True, "stream": True,
    }  # fmt: skip
    ids: list[int] = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=240) as r:
        out["status"] = r.status_code
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                out["error"] = chunk["error"]
                continue
            for choice in chunk["choices"]:
                ids += choice.get("token_ids") or []
                out["finish"] = choice.get("finish_reason") or out.get("finish")
            out["ids"] = list(ids)
    out["ids"] = ids
