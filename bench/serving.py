"""Serving benchmark: the Mooncake conversation trace against disaggregated and colocated tidal.

    python bench/serving.py [--quick] --json PATH [--num-requests N] [--rate-scale R] ...

Replays ``<repo>/../shared/data/mooncake_conversation_trace.jsonl`` (``--trace``), scaled to
this machine by ``bench/trace.py`` (prompt and output lengths, arrival rate; hash ids become
fixed token blocks, so requests that share hash ids share prompt prefixes), against two
deployments of the ``k2-tiny`` preset on one local Ray cluster, one after the other, each a
fresh Serve application receiving the same requests at the same times:

* ``disagg``: 1 prefill + 1 decode instance (every prompt through the prefill instance and a
  gRPC KV transfer unless ``--decode-local-threshold`` says otherwise);
* ``colocated``: 2 mixed instances (chunked prefill interleaved with decode steps).

Both get the same Ray CPUs (``--ray-cpus``, default 2: this box) and one torch thread per
worker. Requests are greedy ``/v1/completions`` streams of token ids with ``ignore_eos`` (so
every request produces exactly its ``max_tokens``), sent by an httpx async client.

Figures per mode: TTFT (request sent -> first token chunk) p50/p99; inter-token latency
p50/p99, per token: a chunk carrying k tokens after a gap g counts as k gaps of g/k (the
ingress coalesces whatever the decode instance produced since the last read); the raw chunk
gaps are reported too (``chunk_gap_*``); output throughput (output tokens / makespan, the time
from the first arrival to the last finish); prefix-hit rate (usage
``prompt_tokens_details.cached_tokens`` / prompt tokens); goodput (requests per second of
makespan that finished with TTFT <= ``--slo-ttft`` and mean per-token ITL (TPOT) <=
``--slo-itl``). ``itl_p99_ratio`` and ``goodput_ratio`` are disagg / colocated.

``--sweep 0.25,0.5,1,2`` measures goodput as DistServe defines it instead: for each layout
(``--layouts``, default 1P+1D, 2 colocated and the P:D splits the planner may choose on 3
instances: 2P+1D, 1P+2D) the trace is replayed at each rate scale, lowest first, and the
layout's ``goodput_rps`` is the highest offered rate (requests / arrival span) at which >= 90%
of requests meet both the TTFT and the TPOT SLO (a failed request meets neither); a layout stops
at its first rate below 90%. ``goodput_ratio`` is the best disaggregated layout's over the best
colocated one's, and the attainment curves are drawn to ``--plot`` (PNG).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.trace import BenchRequest, TraceScale, build_requests, load_trace  # noqa: E402
from scheduler.sim.report import percentile  # noqa: E402

DEFAULT_TRACE = REPO.parent / "shared" / "data" / "mooncake_conversation_trace.jsonl"
MODEL_NAME = "k2-tiny"
# The benchmark's own cluster: a fresh admin token for /admin/pools (read when an app is built).
ADMIN_TOKEN = os.environ.setdefault("TIDAL_ADMIN_TOKEN", secrets.token_hex(16))
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# Layouts of the goodput sweep: name -> pool keys of ServeSettings.
LAYOUTS = {
    "1P+1D": {"prefill": 1, "decode": 1},
    "colocated-2": {"colocated": 2},
    "2P+1D": {"prefill": 2, "decode": 1},
    "1P+2D": {"prefill": 1, "decode": 2},
}
GOODPUT_ATTAINMENT = 0.9  # DistServe: >= 90% of requests meet both SLOs


# ---- one request, measured ---------------------------------------------------------------------
@dataclass
class Outcome:
    """What the client saw of one request (times in seconds, relative to the run start)."""

    index: int
    sent_s: float
    ok: bool = False
    error: str | None = None
    ttft_s: float | None = None
    end_s: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    token_gaps_s: list[float] = field(default_factory=list)  # per token (chunk gap / k)
    chunk_gaps_s: list[float] = field(default_factory=list)

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (None for one-token outputs)."""
        if self.ttft_s is None or self.end_s is None or self.output_tokens < 2:
            return None
        return (self.end_s - self.sent_s - self.ttft_s) / (self.output_tokens - 1)


async def send_one(client: httpx.AsyncClient, url: str, req: BenchRequest, t0: float) -> Outcome:
    """Wait for the request's arrival time, stream it, record every chunk's arrival."""
    await asyncio.sleep(max(0.0, t0 + req.arrival_s - time.perf_counter()))
    sent = time.perf_counter()
    out = Outcome(req.index, sent - t0)
    body = {
        "model": MODEL_NAME,
        "prompt": req.prompt_ids,
        "max_tokens": req.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "return_token_ids": True,
    }
    last: float | None = None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                out.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                msg = json.loads(data)
                if "error" in msg:
                    out.error = str(msg["error"])[:200]
                    return out
                now = time.perf_counter()
                k = sum(len(c.get("token_ids") or []) for c in msg.get("choices") or [])
                if k:
                    if last is None:
                        out.ttft_s = now - sent
                    else:
                        gap = now - last
                        out.chunk_gaps_s.append(gap)
                        out.token_gaps_s += [gap / k] * k
                    last = now
                    out.output_tokens += k
                if msg.get("usage"):
                    u = msg["usage"]
                    out.prompt_tokens = u["prompt_tokens"]
                    out.cached_tokens = (u.get("prompt_tokens_details") or {}).get(
                        "cached_tokens"
                    ) or 0
        out.end_s = time.perf_counter() - t0
        out.ok = out.ttft_s is not None and out.output_tokens == req.max_tokens
        if not out.ok:
            out.error = f"{out.output_tokens}/{req.max_tokens} tokens"
    except httpx.HTTPError as e:
        out.error = repr(e)[:200]
    return out


async def replay(url: str, requests: list[BenchRequest]) -> list[Outcome]:
    """Send every request at its arrival time (open loop); the outcomes in request order."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(600.0, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        t0 = time.perf_counter() + 0.5
        return list(await asyncio.gather(*(send_one(client, url, r, t0) for r in requests)))


# ---- figures ------------------------------------------------------------------------------------
def summarize(outcomes: list[Outcome], slo_ttft_s: float, slo_itl_s: float) -> dict[str, Any]:
    """The report of one mode (latencies in ms)."""
    done = [o for o in outcomes if o.ok]
    ttfts = [o.ttft_s for o in done if o.ttft_s is not None]
    itls = [g for o in done for g in o.token_gaps_s]
    chunk_gaps = [g for o in done for g in o.chunk_gaps_s]
    first = min(o.sent_s for o in outcomes)
    last = max((o.end_s for o in done if o.end_s is not None), default=first)
    makespan = max(last - first, 1e-9)
    good = [
        o
        for o in done
        if o.ttft_s is not None
        and o.ttft_s <= slo_ttft_s
        and (o.tpot_s is None or o.tpot_s <= slo_itl_s)
    ]
    prompt = sum(o.prompt_tokens for o in done)

    def ms(x: float | None) -> float | None:
        return None if x is None else round(x * 1000.0, 2)

    errors = sorted({o.error for o in outcomes if not o.ok and o.error})
    return {
        "num_requests": len(outcomes),
        "num_ok": len(done),
        "num_failed": len(outcomes) - len(done),
        "errors": errors[:5],
        "ttft_p50_ms": ms(percentile(ttfts, 50)),
        "ttft_p99_ms": ms(percentile(ttfts, 99)),
        "itl_p50_ms": ms(percentile(itls, 50)),
        "itl_p99_ms": ms(percentile(itls, 99)),
        "chunk_gap_p50_ms": ms(percentile(chunk_gaps, 50)),
        "chunk_gap_p99_ms": ms(percentile(chunk_gaps, 99)),
        "tpot_p50_ms": ms(percentile([o.tpot_s for o in done if o.tpot_s is not None], 50)),
        "e2e_p50_ms": ms(percentile([o.end_s - o.sent_s for o in done if o.end_s], 50)),
        "makespan_s": round(makespan, 2),
        "throughput_tok_s": round(sum(o.output_tokens for o in done) / makespan, 2),
        "request_throughput_rps": round(len(done) / makespan, 4),
        "prefix_hit_rate": round(sum(o.cached_tokens for o in done) / prompt, 4) if prompt else 0,
        "num_good": len(good),
        "slo_attainment": round(len(good) / len(outcomes), 4),
        "goodput_rps": round(len(good) / makespan, 4),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 4)


# ---- deployments --------------------------------------------------------------------------------
def mode_settings(mode: str, args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    """``ServeSettings`` keys of one mode (``disagg``, ``colocated`` or a ``LAYOUTS`` name);
    everything but the pools is the same in all."""
    pools = LAYOUTS.get(mode) or (
        {"prefill": 1, "decode": 1} if mode == "disagg" else {"colocated": 2}
    )
    num_instances = sum(pools.values())
    common: dict[str, Any] = {
        "model": str(model_dir),
        "model_name": MODEL_NAME,
        "name": f"bench-{mode.replace('+', '-')}",
        "num_threads": 1,
        "cpus_per_rank": args.ray_cpus / num_instances,
        "num_pages": args.num_pages,
        "chunk_size": args.chunk_size,
        "mixed_token_budget": args.mixed_token_budget,
        "prefill_token_budget": args.prefill_token_budget,
        "max_batch_size": args.max_batch_size,
        "ttft_slo_s": args.admission_ttft_s,
        "max_queue_len": 4096,
        "decode_local_threshold": args.decode_local_threshold,
        "health_interval_s": 1.0,
        "report_interval_s": 0.1,
    }
    return {**common, **pools}


def deploy(port: int, settings: dict[str, Any]) -> str:
    """Run the application (name = settings['name']) on the running Serve; wait for /health."""
    from ray import serve

    from cluster.app import build_app_from_config
    from cluster.serve import wait_healthy
    from cluster.settings import ServeSettings

    config = ServeSettings(**settings).to_config()
    serve.run(build_app_from_config(config), name=settings["name"], route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, 300.0)
    return url


def undeploy(name: str) -> None:
    """Delete the application and wait until its workers are gone (next mode starts clean)."""
    import ray
    from ray import serve

    try:
        handle = serve.get_deployment_handle("PoolManager", name)
        workers = list(handle.handles.remote().result().values())
    except Exception:  # noqa: BLE001 - best effort: the app may be half dead already
        workers = []
    serve.delete(name)
    deadline = time.monotonic() + 60.0
    for w in workers:
        while time.monotonic() < deadline:
            try:
                ray.get(w.ping.remote(), timeout=5)
            except Exception:  # noqa: BLE001 - dead, which is what we wait for
                break
            time.sleep(0.2)


def warm_up(url: str, n: int = 4) -> None:
    """A few short requests with prompts outside the trace, so first-call costs are not timed."""
    from bench.trace import block_ids

    reqs = [BenchRequest(i, 0.0, block_ids(-10_000 - i, 300), 8) for i in range(n)]
    outs = asyncio.run(replay(url, reqs))
    bad = [o.error for o in outs if not o.ok]
    if bad:
        raise RuntimeError(f"warm-up failed: {bad}")


def run_mode(
    mode: str, args: argparse.Namespace, port: int, model_dir: Path, reqs: list[BenchRequest]
) -> dict[str, Any]:
    settings = mode_settings(mode, args, model_dir)
    t = time.perf_counter()
    url = deploy(port, settings)
    print(f"[{mode}] deployed in {time.perf_counter() - t:.0f}s; warming up", flush=True)
    try:
        warm_up(url)
        print(f"[{mode}] replaying {len(reqs)} requests", flush=True)
        t = time.perf_counter()
        outcomes = asyncio.run(replay(url, reqs))
        print(f"[{mode}] done in {time.perf_counter() - t:.0f}s", flush=True)
        pools = httpx.get(f"{url}/admin/pools", headers=ADMIN, timeout=30).json()
    finally:
        undeploy(settings["name"])
    report = summarize(outcomes, args.slo_ttft_ms / 1000.0, args.slo_itl_ms / 1000.0)
    report["scheduler"] = {
        k: v for k, v in (pools.get("scheduler") or {}).items() if isinstance(v, int | float)
    }
    return report


# ---- goodput sweep (DistServe) ------------------------------------------------------------------
def attainment(outcomes: list[Outcome], slo_ttft_s: float, slo_tpot_s: float) -> float:
    """Share of all requests (failed ones included) meeting both the TTFT and TPOT SLO."""
    good = [
        o
        for o in outcomes
        if o.ok
        and o.ttft_s is not None
        and o.ttft_s <= slo_ttft_s
        and (o.tpot_s is None or o.tpot_s <= slo_tpot_s)
    ]
    return len(good) / max(len(outcomes), 1)


def sweep(args: argparse.Namespace, port: int, model_dir: Path, trace: list[Any]) -> dict[str, Any]:
    """Every layout at every rate scale (lowest first, stopping below 90%): the curves and the
    goodput of each layout."""
    curves: dict[str, list[dict[str, Any]]] = {}
    goodput: dict[str, float] = {}
    for layout in args.layouts.split(","):
        settings = mode_settings(layout, args, model_dir)
        url = deploy(port, settings)
        curves[layout] = []
        goodput[layout] = 0.0
        try:
            warm_up(url)
            for rate_scale in sorted(float(r) for r in args.sweep.split(",")):
                scale = TraceScale(
                    length_scale=args.length_scale,
                    output_scale=args.output_scale,
                    rate_scale=rate_scale,
                    max_output=args.max_output,
                    max_input=args.max_input,
                )
                reqs = build_requests(trace, scale)
                rate = len(reqs) / max(reqs[-1].arrival_s, 1e-9)
                outcomes = asyncio.run(replay(url, reqs))
                share = attainment(outcomes, args.slo_ttft_ms / 1e3, args.slo_itl_ms / 1e3)
                point = {
                    "rate_scale": rate_scale,
                    "rate_rps": round(rate, 4),
                    "attainment": round(share, 4),
                    **summarize(outcomes, args.slo_ttft_ms / 1e3, args.slo_itl_ms / 1e3),
                }
                curves[layout].append(point)
                print(f"[{layout}] {rate:.3f} req/s: {share:.0%} meet both SLOs", flush=True)
                if share < GOODPUT_ATTAINMENT:
                    break
                goodput[layout] = round(rate, 4)
        finally:
            undeploy(settings["name"])
    disagg = [v for k, v in goodput.items() if "colocated" not in k]
    colo = [v for k, v in goodput.items() if "colocated" in k]
    best = max(goodput, key=goodput.get) if goodput else None
    return {
        "goodput_rps": goodput,
        # a layout that met the SLOs at every rate tried: its goodput is only a lower bound
        "goodput_is_lower_bound": {
            k: bool(v) and all(p["attainment"] >= GOODPUT_ATTAINMENT for p in curves[k])
            for k, v in goodput.items()
        },
        "goodput_ratio": ratio(max(disagg, default=None), max(colo, default=None)),
        "best_layout": best,
        "curves": curves,
        "attainment_target": GOODPUT_ATTAINMENT,
    }


def plot_sweep(result: dict[str, Any], path: str, slo: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for layout, points in result["curves"].items():
        xs = [p["rate_rps"] for p in points]
        ys = [p["attainment"] for p in points]
        ax.plot(xs, ys, marker="o", label=f"{layout} (goodput {result['goodput_rps'][layout]})")
    ax.axhline(GOODPUT_ATTAINMENT, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("offered rate (requests/s)")
    ax.set_ylabel("requests meeting TTFT and TPOT SLOs")
    ax.set_title(f"tidal goodput, k2-tiny (TTFT <= {slo['ttft_ms']:.0f} ms, "
                 f"TPOT <= {slo['tpot_ms']:.0f} ms)")  # fmt: skip
    ax.set_ylim(0, 1.05)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


# ---- output -------------------------------------------------------------------------------------
ROWS = [
    ("TTFT p50 (ms)", "ttft_p50_ms"),
    ("TTFT p99 (ms)", "ttft_p99_ms"),
    ("ITL p50 (ms/token)", "itl_p50_ms"),
    ("ITL p99 (ms/token)", "itl_p99_ms"),
    ("chunk gap p50 (ms)", "chunk_gap_p50_ms"),
    ("chunk gap p99 (ms)", "chunk_gap_p99_ms"),
    ("TPOT p50 (ms)", "tpot_p50_ms"),
    ("e2e p50 (ms)", "e2e_p50_ms"),
    ("throughput (out tok/s)", "throughput_tok_s"),
    ("requests/s", "request_throughput_rps"),
    ("prefix-hit rate", "prefix_hit_rate"),
    ("SLO attainment", "slo_attainment"),
    ("goodput (req/s)", "goodput_rps"),
    ("failed requests", "num_failed"),
]


def table(disagg: dict[str, Any], colo: dict[str, Any]) -> str:
    def f(x: Any) -> str:
        return "-" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)

    lines = [f"{'metric':<24}{'disagg 1P+1D':>14}{'colocated 2x':>14}{'ratio':>10}"]
    for label, key in ROWS:
        a, b = disagg.get(key), colo.get(key)
        r = ratio(a, b) if isinstance(a, int | float) and isinstance(b, int | float) else None
        lines.append(f"{label:<24}{f(a):>14}{f(b):>14}{f(r):>10}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer requests (~1 minute per mode)")
    p.add_argument("--json", required=True, help="write the report here")
    p.add_argument("--trace", default=str(DEFAULT_TRACE))
    p.add_argument("--models-dir", default=str(REPO / ".models"))
    p.add_argument("--num-requests", type=int, default=None, help="first N rows (default 160)")
    p.add_argument("--length-scale", type=float, default=1 / 8, help="prompt length factor")
    p.add_argument("--output-scale", type=float, default=1 / 8, help="output length factor")
    p.add_argument("--max-output", type=int, default=64, help="output length cap (tokens)")
    p.add_argument("--max-input", type=int, default=4096, help="prompt length cap (tokens)")
    p.add_argument("--rate-scale", type=float, default=0.5, help="arrival rate factor")
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-itl-ms", type=float, default=100.0, help="bound on a request's TPOT")
    p.add_argument("--ray-cpus", type=float, default=2.0, help="CPUs Ray gets (both modes)")
    p.add_argument("--num-pages", type=int, default=1024, help="KV pages per worker (64 tokens)")
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--prefill-token-budget", type=int, default=2048)
    p.add_argument("--mixed-token-budget", type=int, default=512)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--decode-local-threshold", type=int, default=0)
    p.add_argument("--admission-ttft-s", type=float, default=60.0, help="scheduler's SLO")
    p.add_argument("--modes", default="disagg,colocated")
    p.add_argument("--sweep", help="rate scales of a goodput sweep, e.g. 0.25,0.5,1,2")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="layouts the sweep measures")
    p.add_argument("--plot", default="bench/results/goodput.png", help="the sweep's PNG")
    args = p.parse_args(argv)
    if args.num_requests is None:
        args.num_requests = 60 if args.quick else 160
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import socket

    import ray
    from ray import serve

    from cluster.settings import ensure_preset

    scale = TraceScale(
        length_scale=args.length_scale,
        output_scale=args.output_scale,
        rate_scale=args.rate_scale,
        max_output=args.max_output,
        max_input=args.max_input,
    )
    trace = load_trace(args.trace, args.num_requests)
    reqs = build_requests(trace, scale)
    n_in = sum(len(r.prompt_ids) for r in reqs)
    n_out = sum(r.max_tokens for r in reqs)
    span = reqs[-1].arrival_s if reqs else 0.0
    print(
        f"{len(reqs)} requests over {span:.1f}s: {n_in} prompt tokens "
        f"(mean {n_in / max(len(reqs), 1):.0f}), {n_out} output tokens "
        f"(mean {n_out / max(len(reqs), 1):.1f})",
        flush=True,
    )
    model_dir = ensure_preset("k2-tiny", Path(args.models_dir))
    ray.init(
        num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False,
        configure_logging=False,
    )  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    results: dict[str, Any] = {}
    try:
        if args.sweep:
            result = sweep(args, port, model_dir, trace)
        else:
            for mode in args.modes.split(","):
                results[mode] = run_mode(mode, args, port, model_dir, reqs)
    finally:
        serve.shutdown()
        ray.shutdown()
    if args.sweep:
        slo = {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_itl_ms}
        plot_sweep(result, args.plot, slo)
        report = {**result, "slo": slo, "plot": args.plot, "config": {
            "command": " ".join(["python", "bench/serving.py", *(argv or sys.argv[1:])]),
            "num_requests": len(reqs), "ray_cpus": args.ray_cpus,
            "deployments": {m: mode_settings(m, args, model_dir) for m in args.layouts.split(",")},
        }}  # fmt: skip
        print(json.dumps({k: report[k] for k in ("goodput_rps", "goodput_ratio", "best_layout")}))
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        return 0
    disagg, colo = results.get("disagg", {}), results.get("colocated", {})
    report = {
        "disagg": disagg,
        "colocated": colo,
        "itl_p99_ratio": ratio(disagg.get("itl_p99_ms"), colo.get("itl_p99_ms")),
        "goodput_ratio": ratio(disagg.get("goodput_rps"), colo.get("goodput_rps")),
        "targets": {"itl_p99_ratio_max": 0.5, "goodput_ratio_min": 1.0},
        "slo": {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_itl_ms},
        "config": {
            "command": " ".join(["python", "bench/serving.py", *(argv or sys.argv[1:])]),
            "trace": args.trace,
            "num_requests": len(reqs),
            "arrival_span_s": round(span, 2),
            "prompt_tokens": n_in,
            "output_tokens": n_out,
            "scale": asdict(scale),
            "block_tokens": scale.block_tokens,
            "ray_cpus": args.ray_cpus,
            "deployments": {m: mode_settings(m, args, model_dir) for m in args.modes.split(",")},
            "itl_definition": "per token: a chunk of k tokens after gap g gives k samples g/k",
            "goodput_definition": "requests/s of makespan with TTFT <= slo.ttft_ms and "
            "TPOT (mean ITL after the first token) <= slo.tpot_ms",
        },
    }
    print(table(disagg, colo))
    print(f"itl_p99_ratio {report['itl_p99_ratio']}  goodput_ratio {report['goodput_ratio']}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
