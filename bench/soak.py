"""Soak and overload: a 1P+1D k2-tiny cluster under mixed traffic, then ten times too much.

    python bench/soak.py [--minutes N] --json PATH [--rate R] [--overload-s S]

Steps (one local Ray cluster, ``--ray-cpus`` CPUs, one Serve application):
1. Calibrate: a closed loop of ``--concurrency`` clients sends valid requests of the mix for
   ``--calibrate-s``; the sustainable rate is half the throughput it reached (``--rate``
   overrides). A probe (a short non-streaming completion, alone) sets the probe latency.
2. Warm up for ``--warmup-s`` at that rate; then every tidal process's RSS is read
   (``/proc/PID/status`` VmRSS of the ingress replicas, pool manager, scheduler actor, rank
   workers, and Serve's proxy and controller).
3. Soak: ``--minutes`` of Poisson arrivals at the sustainable rate. The mix: streamed
   completions of token ids, non-streamed chat completions, streams the client drops after a
   few chunks, non-streamed requests the client abandons mid-way, and bad inputs (malformed
   JSON, wrong types, empty prompt, max_tokens out of range, invalid UTF-8, an unknown model,
   a prompt past max_model_len). Every request gets an outcome: ``completed``, a clear error
   (``http_4xx`` with an OpenAI error body, ``http_429`` with Retry-After, ``http_503`` with a
   reason, ``stream_error`` an SSE error event) or ``client_disconnect`` (ours, on purpose);
   anything else (another 5xx, a 429 without Retry-After, a stream cut without a finish, a
   timeout, a dropped connection, a bad input answered 200) is ``lost``.
4. Settle: wait until no request is active and no decode page is held; ``pages_leaked`` is
   what is still held after ``--settle-s`` (decode pages; prefill pages beyond the prefix cache).
   RSS is read again: ``rss_growth_mb`` per process is the difference with step 2.
5. Overload: ``--overload-s`` of arrivals at ``--overload-factor`` (10) times the sustainable
   rate. Outcomes are counted apart; a 5xx other than a 503 with a reason, or a 429 without
   Retry-After, is a failure of the overload check.
6. Recovery: probes at the sustainable rate from the end of the overload; ``recovery_s`` is
   the send time (after the overload's last arrival) of the first probe from which every
   probe of the next ``--recovery-window-s`` completed, with a median latency within 1.5x the
   p90 latency the probe had during the warm-up (at the sustainable rate: "full speed").

The deployment's TTFT SLO (``--ttft-slo-s``, 2 s: the setting's default, what an interactive
user sets; the probe alone takes about 0.1 s here) is what bounds recovery: the scheduler admits
a request only if it is estimated to be decoding within the SLO (its prefill queue, its prefill,
the transfer, and a slot in the decode batch), and rejects the rest early with a 429. So at the
end of the overload at most about one SLO of admitted work is waiting, and the probes are back
to full speed once it has drained. (A deployment that admitted by free KV pages alone let the
decode queue grow to what the pages hold: 15-20 s of backlog here.)

Prints a table; ``--json`` gets ``requests_by_outcome``, ``lost_requests``, ``pages_leaked``,
``rss_growth_mb``, ``recovery_s``, the overload's outcomes and the configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL_NAME = "k2-tiny"
APP = "soak"
ADMIN_TOKEN = os.environ.setdefault("TIDAL_ADMIN_TOKEN", secrets.token_hex(16))
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CLEAR = ("completed", "client_disconnect", "http_4xx", "http_429", "http_503", "stream_error")
CLIENT_TIMEOUT_S = 120.0  # a request unanswered this long is lost


# ---- one request of the mix ---------------------------------------------------------------------
@dataclass(frozen=True)
class Req:
    """One request: its kind (the mix's name for it), body bytes, whether it streams, and when
    the client walks away (after ``drop_after_chunks`` SSE chunks, or ``abandon_after_s``)."""

    kind: str
    path: str
    body: bytes
    stream: bool = False
    is_bad: bool = False
    drop_after_chunks: int | None = None
    abandon_after_s: float | None = None


def _json(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def make_req(rng: random.Random, valid_only: bool = False) -> Req:
    """A request drawn from the mix (``valid_only``: no bad inputs, no disconnects)."""
    kinds = ["stream", "chat", "stream_drop", "abandon", "bad"]
    weights = [40, 30, 10, 5, 15] if not valid_only else [55, 45, 0, 0, 0]
    kind = rng.choices(kinds, weights)[0]
    prompt = [rng.randrange(1, 500) for _ in range(rng.randint(16, 300))]
    max_tokens = rng.randint(8, 48)
    completion = {
        "model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True,
    }  # fmt: skip
    if kind == "stream":
        return Req(kind, "/v1/completions", _json({**completion, "stream": True}), stream=True)
    if kind == "chat":
        words = " ".join(rng.choice(["tide", "moon", "sea", "wave", "kv"]) for _ in range(40))
        body = {
            "model": MODEL_NAME, "messages": [{"role": "user", "content": words}],
            "max_tokens": max_tokens, "temperature": 0.7, "seed": rng.randrange(1 << 30),
        }  # fmt: skip
        return Req(kind, "/v1/chat/completions", _json(body))
    if kind == "stream_drop":
        body = _json({**completion, "max_tokens": 64, "stream": True})
        return Req(kind, "/v1/completions", body, stream=True, drop_after_chunks=rng.randint(1, 4))
    if kind == "abandon":
        return Req(kind, "/v1/completions", _json(completion), abandon_after_s=rng.uniform(0.05, 1))
    bad = rng.choice(
        [
            b'{"model": "k2-tiny", "prompt": [1, 2',  # malformed JSON
            _json({**completion, "max_tokens": "many"}),  # wrong type
            _json({**completion, "prompt": ""}),  # empty prompt
            _json({**completion, "max_tokens": -3}),  # out of range
            _json({**completion, "max_tokens": 10**7}),  # past max_model_len
            b'{"model": "k2-tiny", "prompt": "\xff\xfe"}',  # invalid UTF-8
            _json({**completion, "model": "gpt-5"}),  # unknown model
            _json([1, 2, 3]),  # not an object
        ]
    )
    return Req("bad", "/v1/completions", bad, is_bad=True)


def probe_req() -> Req:
    body = {"model": MODEL_NAME, "prompt": list(range(1, 33)), "max_tokens": 8, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    return Req("probe", "/v1/completions", _json(body))


@dataclass
class Result:
    kind: str
    outcome: str
    sent_s: float  # relative to the phase start
    latency_s: float
    detail: str = ""


async def send(client: httpx.AsyncClient, url: str, req: Req, t0: float) -> Result:
    sent = time.monotonic()

    def done(outcome: str, detail: str = "") -> Result:
        return Result(req.kind, outcome, sent - t0, time.monotonic() - sent, detail[:200])

    headers = {"Content-Type": "application/json"}
    try:
        if req.abandon_after_s is not None:
            try:
                r = await asyncio.wait_for(
                    client.post(url + req.path, content=req.body, headers=headers),
                    req.abandon_after_s,
                )
            except TimeoutError:
                return done("client_disconnect")
            if r.status_code != 200:
                return done(_error_outcome(r, r.text), f"{r.status_code} {r.text}")
            ok = (r.json().get("choices") or [{}])[0].get("finish_reason")
            return done("completed" if ok else "lost", "" if ok else r.text)
        async with client.stream("POST", url + req.path, content=req.body, headers=headers) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                return done(_error_outcome(r, text), f"{r.status_code} {text}")
            if req.is_bad:
                await r.aread()
                return done("lost", "a bad input was answered 200")
            if not req.stream:
                body = json.loads(await r.aread())
                ok = body.get("choices") and body["choices"][0].get("finish_reason")
                return done("completed" if ok else "lost", "" if ok else str(body))
            chunks, finish, error = 0, None, None
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    if error is not None:
                        return done("stream_error", str(error))
                    return done("completed" if finish else "lost", "" if finish else "no finish")
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"]
                    continue
                chunks += 1
                for c in chunk.get("choices") or []:
                    finish = c.get("finish_reason") or finish
                if req.drop_after_chunks is not None and chunks >= req.drop_after_chunks:
                    return done("client_disconnect")
            if error is not None:
                return done("stream_error", str(error))
            return done("lost", "the stream ended without [DONE]")
    except httpx.TimeoutException as e:
        return done("lost", f"timeout: {e!r}")
    except httpx.HTTPError as e:
        return done("lost", f"connection: {e!r}")


def _error_outcome(r: httpx.Response, text: str) -> str:
    """The outcome of a non-200 answer: a clear error, or lost."""
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return "lost"  # not an OpenAI error body
    if r.status_code == 429:
        return "http_429" if r.headers.get("retry-after") else "lost"
    if r.status_code == 503:
        return "http_503" if message else "lost"
    if 400 <= r.status_code < 500:
        return "http_4xx"
    return "lost"


async def open_loop(
    url: str, rate: float, duration_s: float, rng: random.Random, make: Any
) -> list[Result]:
    """Poisson arrivals at ``rate`` for ``duration_s``; waits for every request to end."""
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S, limits=limits) as client:
        t0 = time.monotonic()
        tasks = []
        at = rng.expovariate(rate)
        while at < duration_s:
            await asyncio.sleep(max(t0 + at - time.monotonic(), 0))
            tasks.append(asyncio.create_task(send(client, url, make(rng), t0)))
            at += rng.expovariate(rate)
        return list(await asyncio.gather(*tasks))


async def closed_loop(url: str, concurrency: int, duration_s: float, seed: int) -> list[Result]:
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S) as client:
        t0 = time.monotonic()

        async def worker(k: int) -> list[Result]:
            rng, out = random.Random(seed + k), []
            while time.monotonic() - t0 < duration_s:
                out.append(await send(client, url, make_req(rng, valid_only=True), t0))
            return out

        parts = await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return [r for p in parts for r in p]


async def probe_latency(url: str, n: int = 10) -> float:
    """Median latency of the probe, sent alone, one at a time."""
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S) as client:
        t0 = time.monotonic()
        lat = [(await send(client, url, probe_req(), t0)) for _ in range(n)]
    bad = [r for r in lat if r.outcome != "completed"]
    if bad:
        raise RuntimeError(f"probe failed: {bad[0]}")
    return sorted(r.latency_s for r in lat)[n // 2]


# ---- the cluster ----------------------------------------------------------------------------
def deploy(port: int, args: argparse.Namespace) -> str:
    from ray import serve

    from cluster.app import build_app_from_config
    from cluster.serve import wait_healthy
    from cluster.settings import ServeSettings, ensure_preset

    model_dir = ensure_preset("k2-tiny", Path(args.models_dir))
    settings = ServeSettings(**settings_of(args, model_dir))
    serve.run(build_app_from_config(settings.to_config()), name=APP, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, 300.0)
    return url


def settings_of(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    return {
        "model": str(model_dir),
        "model_name": MODEL_NAME,
        "name": APP,
        "prefill": 1,
        "decode": 1,
        "num_threads": 1,
        "cpus_per_rank": args.ray_cpus / 2,
        "num_pages": 256,
        "decode_local_threshold": 64,  # short prompts prefill on decode: both paths run
        "max_batch_size": args.max_batch_size,
        "max_queue_len": args.max_queue_len,
        "ttft_slo_s": args.ttft_slo_s,
        "num_ingress_replicas": args.ingress_replicas,
        "health_interval_s": 1.0,
        "report_interval_s": 0.2,
    }


def snapshot(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/admin/pools", headers=ADMIN, timeout=30).json()


def held_pages(snap: dict[str, Any]) -> tuple[int, int]:
    """(pages held beyond the prefix cache over every rank, requests active in the scheduler)."""
    held = 0
    for inst in snap["instances"]:
        for s in inst.get("rank_stats") or []:
            if s is None:
                continue
            cached = 0 if inst["role"] == "decode" else s["num_cached_blocks"]
            held += max(s["num_used_pages"] - cached, 0)
    return held, snap["scheduler"]["num_active"]


def settle(url: str, timeout_s: float) -> tuple[int, int, float]:
    """Wait for no page held and no request active; (pages held, active, seconds waited)."""
    t0 = time.monotonic()
    while True:
        held, active = held_pages(snapshot(url))
        if (held == 0 and active == 0) or time.monotonic() - t0 > timeout_s:
            return held, active, time.monotonic() - t0
        time.sleep(0.5)


def process_rss_mb() -> dict[str, float]:
    """RSS (MB) of each live process of the application, by role name."""
    from ray._private.state import actors  # the GCS actor table (pids); no dashboard needed

    out: dict[str, float] = {}
    for actor_id, a in actors(actor_state_name="ALIVE").items():
        cls, actor_name = a.get("ActorClassName") or "", a.get("Name") or actor_id[:6]
        if cls == f"ServeReplica:{APP}:Ingress":
            name = f"ingress:{actor_name.rsplit('#', 1)[-1]}"
        elif cls == f"ServeReplica:{APP}:PoolManager":
            name = "pool_manager"
        elif "Scheduler" in cls:
            name = "scheduler"
        elif "RankWorker" in cls:
            name = f"worker:{actor_name}"
        elif cls in ("ProxyActor", "ServeController"):
            name = f"serve:{cls}"
        else:
            continue
        rss = _rss_mb(a.get("Pid"))
        if rss is not None:
            out[name] = rss
    return out


def _rss_mb(pid: int | None) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


# ---- the phases ---------------------------------------------------------------------------------
def recovery_s(results: list[Result], limit_s: float, window_s: float) -> float | None:
    """Send time of the first probe from which every probe of the next ``window_s`` completed
    and their median latency is within ``limit_s`` (a median: this box's other tenants make
    single probes jitter); None if that never happened."""
    probes = sorted(results, key=lambda r: r.sent_s)
    for i, r in enumerate(probes):
        window = [p for p in probes[i:] if p.sent_s <= r.sent_s + window_s]
        if probes[-1].sent_s < r.sent_s + window_s:
            return None  # not enough probes after it to tell
        latencies = sorted(p.latency_s for p in window)
        if all(p.outcome == "completed" for p in window) and (
            latencies[len(latencies) // 2] <= limit_s
        ):
            return r.sent_s
    return None


def summarize(results: list[Result]) -> dict[str, Any]:
    outcomes = Counter(r.outcome for r in results)
    lost = [r for r in results if r.outcome == "lost"]
    return {
        "num_requests": len(results),
        "requests_by_outcome": dict(sorted(outcomes.items())),
        "by_kind": {
            k: dict(Counter(r.outcome for r in results if r.kind == k))
            for k in sorted({r.kind for r in results})
        },
        "lost_examples": [f"{r.kind}: {r.detail}" for r in lost[:5]],
    }


def run(args: argparse.Namespace, url: str) -> dict[str, Any]:
    rng = random.Random(args.seed)
    report: dict[str, Any] = {}
    # 1. calibrate
    probe_s = asyncio.run(probe_latency(url))
    cal = asyncio.run(closed_loop(url, args.concurrency, args.calibrate_s, args.seed))
    ok = [r for r in cal if r.outcome == "completed"]
    measured = len(ok) / args.calibrate_s
    rate = args.rate or max(measured * 0.5, 0.2)
    print(f"calibrated: {measured:.2f} req/s closed-loop; soak rate {rate:.2f} req/s; "
          f"probe {probe_s * 1000:.0f} ms", flush=True)  # fmt: skip
    report["calibration"] = {"closed_loop_rps": measured, "soak_rps": rate, "probe_s": probe_s}
    # 2. warm up (with probes: their latency at the sustainable rate is "full speed"), then RSS

    async def warm_up() -> list[Result]:
        probes = asyncio.create_task(
            open_loop(url, 1.0, args.warmup_s, random.Random(args.seed + 3), lambda _: probe_req())
        )
        await open_loop(url, rate, args.warmup_s, rng, make_req)
        return await probes

    loaded = sorted(r.latency_s for r in asyncio.run(warm_up()) if r.outcome == "completed")
    limit_s = 1.5 * loaded[int(0.9 * (len(loaded) - 1))] if loaded else 2 * probe_s
    report["calibration"]["probe_p90_at_soak_rate_s"] = limit_s / 1.5
    settle(url, args.settle_s)
    rss_before = process_rss_mb()
    # 3. soak
    print(f"soak: {args.minutes:g} min at {rate:.2f} req/s", flush=True)
    soak = asyncio.run(open_loop(url, rate, args.minutes * 60, rng, make_req))
    report.update(summarize(soak))
    # 4. settle, leaks, RSS
    held, active, waited = settle(url, args.settle_s)
    report["pages_leaked"] = held
    report["requests_active_after_settle"] = active
    report["settle_s"] = round(waited, 1)
    rss_after = process_rss_mb()
    report["rss_mb"] = {k: [round(rss_before[k], 1), round(v, 1)] for k, v in rss_after.items()
                        if k in rss_before}  # fmt: skip
    report["rss_growth_mb"] = {k: round(v[1] - v[0], 1) for k, v in report["rss_mb"].items()}
    report["lost_requests"] = report["requests_by_outcome"].get("lost", 0)
    # 5 + 6. overload, then probes at the soak rate
    over_rate = rate * args.overload_factor
    print(f"overload: {args.overload_s:g} s at {over_rate:.1f} req/s", flush=True)

    async def overload_then_probe() -> tuple[list[Result], list[Result]]:
        over = asyncio.create_task(
            open_loop(url, over_rate, args.overload_s, random.Random(args.seed + 1), make_req)
        )
        await asyncio.sleep(args.overload_s)
        probes = await open_loop(
            url, rate, max(30.0, 3 * args.recovery_window_s), random.Random(args.seed + 2),
            lambda _: probe_req(),
        )  # fmt: skip
        return await over, probes

    over, probes = asyncio.run(overload_then_probe())
    o = summarize(over)
    bad_5xx = [r for r in over if r.outcome == "lost"]
    report["overload"] = {
        "rate_rps": over_rate,
        "duration_s": args.overload_s,
        **o,
        "kept_answering": not bad_5xx,
    }
    report["recovery_limit_s"] = limit_s
    report["recovery_s"] = recovery_s(probes, limit_s, args.recovery_window_s)
    report["probes"] = summarize(probes)["requests_by_outcome"]
    report["probe_latency_s"] = [  # (sent after the overload's end, latency), for the curve
        (round(r.sent_s, 2), round(r.latency_s, 3)) for r in sorted(probes, key=lambda r: r.sent_s)
    ]
    held, active, _ = settle(url, args.settle_s)
    report["pages_leaked_after_overload"] = held
    report["lost_requests"] += o["requests_by_outcome"].get("lost", 0)
    return report


def table(r: dict[str, Any]) -> str:
    rows = [
        ("requests (soak)", r["num_requests"]),
        *((f"  {k}", v) for k, v in r["requests_by_outcome"].items()),
        ("lost_requests (soak + overload)", r["lost_requests"]),
        ("pages_leaked (soak / overload)",
         f"{r['pages_leaked']} / {r['pages_leaked_after_overload']}"),
        *((f"rss_growth_mb {k}", v) for k, v in sorted(r["rss_growth_mb"].items())),
        ("overload requests", r["overload"]["num_requests"]),
        *((f"  {k}", v) for k, v in r["overload"]["requests_by_outcome"].items()),
        ("overload kept answering", r["overload"]["kept_answering"]),
        ("recovery_s (limit: probe <= "
         f"{r['recovery_limit_s'] * 1000:.0f} ms)", r["recovery_s"]),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="soak length (default 10)")
    p.add_argument("--json", required=True, help="write the report here")
    p.add_argument("--rate", type=float, help="soak rate (req/s); default: half the calibrated")
    p.add_argument("--concurrency", type=int, default=4, help="calibration clients")
    p.add_argument("--calibrate-s", type=float, default=20.0)
    p.add_argument("--warmup-s", type=float, default=30.0)
    p.add_argument("--settle-s", type=float, default=90.0, help="longest wait for idle pages")
    p.add_argument("--overload-s", type=float, default=60.0)
    p.add_argument("--overload-factor", type=float, default=10.0)
    p.add_argument("--recovery-window-s", type=float, default=5.0)
    p.add_argument("--ingress-replicas", type=int, default=1)
    p.add_argument(
        "--max-batch-size", type=int, default=16, help="decode batch (sized for 2 CPU cores)"
    )
    p.add_argument(
        "--max-queue-len", type=int, default=256, help="scheduler queue (the setting's default)"
    )
    p.add_argument(
        "--ttft-slo-s", type=float, default=2.0, help="the deployment's TTFT SLO (admission)"
    )
    p.add_argument("--ray-cpus", type=float, default=2.0)
    p.add_argument("--models-dir", default=str(REPO / ".models"))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray
    from ray import serve

    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False)  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    t0 = time.monotonic()
    try:
        url = deploy(port, args)
        print(f"deployed in {time.monotonic() - t0:.0f}s", flush=True)
        report = run(args, url)
    finally:
        serve.shutdown()
        ray.shutdown()
    report["config"] = {
        "command": " ".join(["python", "bench/soak.py", *(argv or sys.argv[1:])]),
        "minutes": args.minutes,
        "overload_s": args.overload_s,
        "overload_factor": args.overload_factor,
        "ray_cpus": args.ray_cpus,
        "deployment": settings_of(args, Path(args.models_dir) / "k2-tiny"),
    }
    checks = {
        "lost_requests == 0": report["lost_requests"] == 0,
        "pages_leaked == 0": report["pages_leaked"] == 0
        and report["pages_leaked_after_overload"] == 0,
        "rss_growth_mb < 50 per process": all(v < 50 for v in report["rss_growth_mb"].values()),
        "recovery_s <= 10": report["recovery_s"] is not None and report["recovery_s"] <= 10,
        "overload kept answering": report["overload"]["kept_answering"],
    }
    report["checks"] = checks
    print(table(report))
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
