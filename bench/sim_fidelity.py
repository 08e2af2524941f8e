"""Simulator fidelity: the same trace slice on the real 1P+1D k2-tiny cluster and in the simulator.

    python bench/sim_fidelity.py [--quick] --json PATH [--utilization 0.6[,0.4,0.8]]
    python bench/sim_fidelity.py --profile-only --profile-out FILE   # measure a profile only

For each operating point (``--utilization``, default 0.6; a comma list sweeps, the first point
gives the headline figures):
1. Engine profile, right before the replay (Ray up, nothing deployed): the real engine
   (``model.Engine``, loaded exactly as the cluster's workers load it: same dtype, pages, chunk
   size, one torch thread) on ``k2-tiny``: prefill of 64..4096-token prompts from scratch
   (median of 3; the tokens/s curve), decode steps at batches 1..64 x contexts 128..1024
   (least-squares base / per-sequence / per-KV-token costs), one Ray actor call's round trip,
   the prefill stage's chunking config. Transfer bandwidth is the served-path figure of
   ``bench/results/kvtransfer.json`` when present (else 0.67 GB/s).
2. Served costs, on the deployed cluster before the replay, with prompts outside the trace:
   prompts of 256..4096 tokens one at a time (TTFT less a 32-token prompt's: the served
   prefill curve, which replaces the engine's); bursts of 1, 4, 8, 16, 32 tiny prompts sent at
   once with 64 output tokens (the per-token gap while all stream: the served decode step's
   base and per-sequence cost; how far apart the first tokens of the burst nearest the trace's
   own (rows per timestamp) come beyond what the simulator spreads them: the ingress's serial
   work per request, ``cluster.ingress_s``); a prompt prefilled alone and again while tiny
   streams decode (how much the two instances slow each other on this shared machine:
   ``contended_slowdown`` of each role, which puts them on one host in the simulator).
   These are the costs the engine alone does not show (the stage's loop and chunking, KV
   sends, token streaming, long-polls, the ingress sharing the CPUs).
   Operating point: the simulator prices the slice's prefill work with this profile (a replay
   slow enough that nothing queues); the arrival rate is scaled so that this work fills
   ``utilization`` of the arrival span (prefill is this layout's bottleneck). Near 1, TTFT is
   queueing-bound and hypersensitive to speed; the trace also arrives in bursts (many rows
   share a timestamp), so some queueing happens at any rate.
3. Real: ``bench/serving.py``'s disaggregated deployment (1 prefill + 1 decode instance, same
   settings, deployed fresh: an empty prefix cache) replays the first ``--num-requests`` rows
   of the Mooncake conversation trace, scaled by ``bench/trace.py`` (lengths 1/8, outputs 1/8
   capped at 64; an explicit ``--rate-scale`` replaces the utilisation target; any other
   ``bench/serving.py`` flag passes through).
4. Sim: ``scheduler/sim`` replays the same rows with the same scaling, the served profile and
   the scheduler config the real cluster ran (``ServeSettings.to_config().scheduler``); each
   request arrives when the real client sent it (the trace's ties broken the same way).
Ratios are simulated over measured: ``ttft_p50_ratio``, ``ttft_p90_ratio``, ``tbt_p50_ratio``
(per-token gaps), and ``rejected_share_diff`` (simulated minus measured share of requests that
did not complete). Targets: ratios within 25%, rejected share within 0.05. ``points`` holds
every operating point's figures, ``per_request`` the headline point's request by request (real
and simulated TTFT / TPOT, cached tokens). As a diagnostic, ``in_situ`` repeats the simulation
with the prefill speed the prefill worker's own meter showed during the real run (sampled every
2 s; the decode meter's slowdown is reported, not applied: it times the engine call alone), and
``bracketed`` with the prefill speed scaled by half the drift the engine showed between its
measurements before and after the replay (``prefill_drift``, after / before): on a shared box
the profile and the run see different loads, and these separate that from the simulator's own
error.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import serving  # noqa: E402
from bench.trace import TraceScale as BenchScale  # noqa: E402
from bench.trace import build_requests as bench_requests  # noqa: E402
from bench.trace import load_trace as bench_trace  # noqa: E402
from scheduler.sim import CostProfile, SimCluster, SimConfig  # noqa: E402
from scheduler.sim.report import percentile, weighted_percentile  # noqa: E402
from scheduler.sim.trace import TraceRow, TraceScale, build_requests  # noqa: E402

PREFILL_LENGTHS = (64, 256, 512, 1024, 2048, 4096)
DECODE_BATCHES = (1, 4, 16, 32, 64)
DECODE_CONTEXTS = (128, 512, 1024)
DEFAULT_TRANSFER_BYTES_PER_S = 0.67e9
SERVED_BATCHES = (1, 4, 8, 16, 32)  # tiny prompts sent at once (a trace burst: 8-9 rows)
SERVED_PROMPT, SERVED_OUTPUT = 32, 64
SERVED_PREFILL_LENGTHS = (256, 1024, 2048, 4096)
# the contention measurement: a prompt sent this long after a few tiny streams (decode batches
# in a replay are small: the bursts' prompts are prefilled one after another)
CONTENTION_PROMPT, CONTENTION_STREAMS, CONTENTION_DELAY_S = 1024, 2, 0.2
DEFAULT_RPC_S = 0.002  # one actor call, until measured (--profile-only does not start Ray)


# ---- 1. the profile ---------------------------------------------------------------------------------
def load_engine(settings: dict[str, Any]):
    import torch

    from cluster.settings import ServeSettings
    from model.engine import Engine

    spec = ServeSettings(**settings).to_config().engine
    torch.set_num_threads(1)
    kwargs = {"num_pages": spec.num_pages} if spec.num_pages else {}
    return Engine.load(
        spec.model_dir, dtype=getattr(torch, spec.dtype), device=spec.device,
        kv_format=spec.kv_format, weight_format=spec.weight_format,
        page_size=spec.page_size, chunk_size=spec.chunk_size, **kwargs,
    )  # fmt: skip


def time_prefill(engine, length: int, reps: int) -> float:
    """Median of ``reps`` prefills of a ``length``-token prompt (pages allocated and freed): on
    a shared machine the best of a few is the engine alone, the median what a run sees."""
    import torch

    ids = torch.randint(1, 400, (length,)).tolist()
    times = []
    for _ in range(reps):
        engine.cache.allocator.allocate("fid-prefill", length)
        try:
            t0 = time.perf_counter()
            engine.prefill("fid-prefill", ids)
            times.append(time.perf_counter() - t0)
        finally:
            engine.cache.allocator.free("fid-prefill")
    return statistics.median(times)


def time_decode(engine, batch: int, context: int, steps: int) -> float:
    """Median decode step of ``batch`` sequences at ``context`` tokens (random latent KV)."""
    import torch

    c = engine.config
    seqs = [f"fid-decode-{i}" for i in range(batch)]
    g = torch.Generator().manual_seed(0)
    c_kv = torch.randn(context, c.kv_lora_rank, generator=g)
    k_pe = torch.randn(context, c.qk_rope_head_dim, generator=g)
    for sid in seqs:
        engine.cache.allocator.allocate(sid, context + steps + 2)
        for layer in range(c.num_hidden_layers):
            engine.cache.write(sid, layer, 0, c_kv, k_pe)
    tokens = [7] * batch
    try:
        engine.decode(seqs, tokens, [context] * batch)  # warm-up
        times = []
        for s in range(steps):
            t0 = time.perf_counter()
            engine.decode(seqs, tokens, [context + 1 + s] * batch)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    finally:
        for sid in seqs:
            engine.cache.allocator.free(sid)


def fit_decode(samples: list[tuple[int, int, float]]) -> tuple[float, float, float]:
    """Least squares of step_s = base + per_seq * batch + per_kv * (batch * context)."""
    import numpy as np

    a = np.array([[1.0, b, b * c] for b, c, _ in samples])
    y = np.array([s for _, _, s in samples])
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    base, per_seq, per_kv = (max(float(x), 0.0) for x in coef)
    return base, per_seq, per_kv


def ray_call_s() -> float:
    """Median round trip of a trivial async actor call (Ray must be initialised)."""
    import ray

    @ray.remote(num_cpus=0)
    class Echo:
        async def ping(self, x: int) -> int:
            return x

    echo = Echo.remote()
    ray.get(echo.ping.remote(0))
    times = []
    for i in range(50):
        t0 = time.perf_counter()
        ray.get(echo.ping.remote(i))
        times.append(time.perf_counter() - t0)
    ray.kill(echo)
    return statistics.median(times)


def prefill_curve(engine, quick: bool) -> list[list[float]]:
    """(prompt length, tokens/s from scratch) at ``PREFILL_LENGTHS``."""
    reps = 2 if quick else 3
    return [[n, n / time_prefill(engine, n, reps)] for n in PREFILL_LENGTHS]


def measure_profile(settings: dict[str, Any], quick: bool, rpc_s: float) -> dict[str, Any]:
    from cluster.settings import ServeSettings

    engine = load_engine(settings)
    curve = prefill_curve(engine, quick)
    steps = 4 if quick else 8
    alloc = engine.cache.allocator
    samples = [
        (b, c, time_decode(engine, b, c, steps))
        for b in DECODE_BATCHES
        for c in DECODE_CONTEXTS
        if b * alloc.pages_needed(c + steps + 2) <= alloc.num_pages
    ]
    base, per_seq, per_kv = fit_decode(samples)
    kvt = REPO / "bench" / "results" / "kvtransfer.json"
    gbps = json.loads(kvt.read_text()).get("served_path_gbps") if kvt.is_file() else None
    bw = gbps * 1e9 if gbps else DEFAULT_TRANSFER_BYTES_PER_S
    page_size = engine.cache.allocator.page_size
    num_pages = engine.cache.allocator.num_pages
    stage = ServeSettings(**settings).to_config().prefill_stage
    return {
        "name": "k2-tiny-measured",
        "sources": [
            f"measured here by bench/sim_fidelity.py on {time.strftime('%Y-%m-%d %H:%M')}: "
            "k2-tiny, real Engine, one torch thread",
            f"decode samples (batch, context, step_s): {[[b, c, round(s, 5)] for b, c, s in samples]}",
            f"transfer bandwidth: {'bench/results/kvtransfer.json served_path_gbps' if gbps else 'default'}",
        ],
        "assumptions": [
            f"one actor call = {rpc_s * 1e3:.2f} ms"
            + (" (assumed; not measured)" if rpc_s == DEFAULT_RPC_S else ", a Ray echo")
        ],
        "page_size": page_size,
        "block_size": page_size,
        "prefill": {
            "tokens_per_s": curve,
            "step_overhead_s": 0.0,
            "token_budget": stage.token_budget,
            "prefix_cache_tokens": num_pages * page_size,
            "attention_tokens": stage.attention_tokens,
            "min_chunk_tokens": stage.min_chunk_tokens,
            "max_skipped_steps": stage.max_skipped_steps,
        },
        "decode": {
            "base_s": base,
            "per_seq_s": per_seq,
            "per_kv_token_s": per_kv,
            "max_batch_size": settings["max_batch_size"],
            "kv_tokens": num_pages * page_size,
            "prefill_token_budget": settings["mixed_token_budget"],
        },
        "transfer": {
            "kv_bytes_per_token": engine.cache.bytes_per_token * engine.config.num_hidden_layers,
            "bytes_per_s": bw,
            "latency_s": rpc_s,
        },
        "cluster": {
            "startup_s": 30.0,
            "role_move_s": 2.0,
            "rpc_s": rpc_s,
            "report_interval_s": settings["report_interval_s"],
        },
    }


# ---- 2./3. real and simulated replays ---------------------------------------------------------------
def sample_workers(workers: dict[str, Any], stop: threading.Event, out: list[dict]) -> None:
    """Every 2 s: each worker's own meters (what it reports to the scheduler)."""
    import ray

    while not stop.wait(2.0):
        for w in workers.values():
            try:
                st = ray.get(w.stats.remote(), timeout=5)
            except Exception:  # noqa: BLE001 - a slow answer is a missing sample
                continue
            out.append(
                {
                    "role": st.role,
                    "num_running": st.num_running,
                    "decode_step_s": st.decode_step_s,
                    "prefill_tokens_per_s": st.prefill_tokens_per_s,
                }
            )


def served_burst(url: str, batch: int) -> dict[str, float]:
    """``batch`` tiny prompts (outside the trace) sent at once, ``SERVED_OUTPUT`` tokens each.
    ``step_s``: the decode step as served, the median per-token gap the client saw while all of
    them were in the batch (unlike the engine alone: the worker's loop, sampling, token
    streaming and the ingress's long-polls, which share the GIL and the CPUs with the step);
    ``kv_tokens``: the batch's KV at mid-run; ``ttft_s``: the median TTFT; ``first_spread_s``:
    first token of the last request minus that of the first."""
    import asyncio

    from bench.trace import BenchRequest, block_ids

    reqs = [
        BenchRequest(i, 0.0, block_ids(-20_000 - 100 * batch - i, SERVED_PROMPT), SERVED_OUTPUT)
        for i in range(batch)
    ]
    outs = [o for o in asyncio.run(serving.replay(url, reqs)) if o.ok]
    firsts = [o.sent_s + o.ttft_s for o in outs]
    lo, hi = max(firsts), min(o.end_s for o in outs)
    gaps, every = [], []
    for o, t in zip(outs, firsts, strict=True):
        for g in o.token_gaps_s:
            t += g
            every.append(g)
            if lo < t <= hi:
                gaps.append(g)
    return {
        "batch": batch,
        "kv_tokens": batch * (SERVED_PROMPT + SERVED_OUTPUT // 2),
        "step_s": round(statistics.median(gaps or every), 5),
        "ttft_s": round(statistics.median(o.ttft_s for o in outs), 4),
        "first_spread_s": round(max(firsts) - min(firsts), 4),
    }


def served_prefill(url: str, engine_curve: list[list[float]], reps: int) -> list[list[float]]:
    """tokens/s of prompts of ``SERVED_PREFILL_LENGTHS`` as served, one at a time (fresh
    prompts outside the trace: no prefix hits): the median TTFT less that of a
    ``SERVED_PROMPT``-token prompt (the fixed path: ingress, actor calls, transfer set-up,
    first poll), plus that prompt's own compute by the engine's curve. Unlike the engine alone
    this includes the stage's chunking, the per-layer KV sends and the worker's other threads."""
    import asyncio

    from bench.trace import BenchRequest, block_ids

    def ttft(n: int) -> float:
        times = []
        for _ in range(reps):
            k = len(times) + 10 * n
            req = BenchRequest(0, 0.0, block_ids(-30_000_000 - k, n), 2)
            (out,) = asyncio.run(serving.replay(url, [req]))
            assert out.ok, f"served prefill of {n} tokens failed: {out.error}"
            times.append(out.ttft_s)
        return statistics.median(times)

    small = SERVED_PROMPT / engine_curve[0][1]  # the small prompt's own compute
    fixed = ttft(SERVED_PROMPT) - small
    return [[n, n / max(ttft(n) - fixed, small)] for n in SERVED_PREFILL_LENGTHS]


def served_contention(url: str, fixed_s: float, reps: int) -> dict[str, float]:
    """How much the two instances slow each other on this shared machine: a fresh
    ``CONTENTION_PROMPT``-token prompt alone, then another sent while ``CONTENTION_STREAMS`` tiny
    streams decode. ``prefill``: its prefill time (TTFT less ``fixed_s``, the path's fixed
    part) with / without the streams; ``decode``: the streams' per-token gap while the prompt
    computes / while it does not. Medians over ``reps``."""
    import asyncio

    from bench.trace import BenchRequest, block_ids

    def prompt(k: int) -> list[int]:
        return block_ids(-40_000_000 - k, CONTENTION_PROMPT)

    pre, dec = [], []
    for rep in range(reps):
        (alone,) = asyncio.run(serving.replay(url, [BenchRequest(0, 0.0, prompt(2 * rep), 2)]))
        streams = [
            BenchRequest(i, 0.0, block_ids(-41_000_000 - 100 * rep - i, SERVED_PROMPT), 64)
            for i in range(CONTENTION_STREAMS)
        ]
        late = BenchRequest(len(streams), CONTENTION_DELAY_S, prompt(2 * rep + 1), 2)
        *outs, long = asyncio.run(serving.replay(url, [*streams, late]))
        if not (alone.ok and long.ok and all(o.ok for o in outs)):
            continue
        pre.append((long.ttft_s - fixed_s) / max(alone.ttft_s - fixed_s, 1e-3))
        lo = max(o.sent_s + o.ttft_s for o in outs)  # every stream in the batch
        busy = (long.sent_s + fixed_s, long.sent_s + long.ttft_s)
        inside, outside = [], []
        for o in outs:
            t = o.sent_s + o.ttft_s
            for g in o.token_gaps_s:
                t += g
                if t > lo:
                    (inside if busy[0] < t <= busy[1] else outside).append(g)
        if inside and outside:
            dec.append(statistics.median(inside) / statistics.median(outside))
    return {
        "prefill": round(max(statistics.median(pre), 1.0), 3) if pre else 1.0,
        "decode": round(max(statistics.median(dec), 1.0), 3) if dec else 1.0,
        "prefill_samples": [round(x, 3) for x in pre],
        "decode_samples": [round(x, 3) for x in dec],
    }


def ingress_serial_s(profile: dict[str, Any], burst: dict[str, float], settings) -> float:
    """The ingress's serial work per request: how much further apart the burst's first tokens
    were than the simulator spreads them without it, per request."""
    from cluster.settings import ServeSettings
    from scheduler.sim.trace import SimRequest

    sched = ServeSettings(**settings).to_config().scheduler
    n = int(burst["batch"])
    reqs = [SimRequest(i, 0.0, SERVED_PROMPT, SERVED_OUTPUT, ((1 << 40) + i,)) for i in range(n)]
    p = json.loads(json.dumps(profile))
    p["cluster"]["ingress_s"] = 0.0
    result = SimCluster(CostProfile.from_dict(p), SimConfig(1, 1, sched)).run(reqs)
    firsts = [o.first_token_s for o in result.outcomes if o.first_token_s is not None]
    return max(0.0, (burst["first_spread_s"] - (max(firsts) - min(firsts))) / max(n - 1, 1))


def served_profile(
    profile: dict[str, Any], served: dict[str, Any], settings: dict[str, Any], burst_size: float
) -> dict[str, Any]:
    """The engine's profile with the costs measured on the deployed cluster: the served prefill
    curve; the decode step's base and per-sequence cost refitted to the served steps by least
    squares (the per-KV-token cost, the engine's attention, which tiny prompts do not exercise,
    kept from the engine's fit); the ingress's serial work per request, from the burst nearest
    ``burst_size`` (the trace's rows per timestamp); how much prefill and decode slow each
    other on this machine (``contended_slowdown``: the simulator then puts them on one host)."""
    import numpy as np

    out = json.loads(json.dumps(profile))
    out["prefill"]["tokens_per_s"] = served["prefill"]
    out["sources"].append(
        f"prefill: served, one prompt at a time (served_prefill); engine alone: "
        f"{[[n, round(r)] for n, r in profile['prefill']['tokens_per_s']]}"
    )
    bursts = served["bursts"]
    per_kv = profile["decode"]["per_kv_token_s"]
    # least squares in relative error: a step at batch 1 weighs as much as one at batch 48
    a = np.array([[1.0, b["batch"]] for b in bursts])
    y = np.array([b["step_s"] for b in bursts])
    kv = np.array([per_kv * b["kv_tokens"] for b in bursts])
    (base, per_seq), *_ = np.linalg.lstsq(a / y[:, None], (y - kv) / y, rcond=None)
    out["decode"] |= {"base_s": max(float(base), 0.0), "per_seq_s": max(float(per_seq), 0.0)}
    out["prefill"]["contended_slowdown"] = served["contention"]["prefill"]
    out["decode"]["contended_slowdown"] = served["contention"]["decode"]
    # the burst nearest the trace's own (larger ones also carry their earlier streams' load)
    burst = min(bursts[1:], key=lambda b: abs(b["batch"] - burst_size))
    out["cluster"]["ingress_s"] = ingress_serial_s(out, burst, settings)
    out["name"] = profile["name"] + "-served"
    out["sources"].append(
        "decode base and per-sequence cost, ingress serial work: served bursts of tiny prompts "
        f"(bench/sim_fidelity.py served_burst): {bursts}; engine alone: base "
        f"{profile['decode']['base_s']:.5f} s, per_seq {profile['decode']['per_seq_s']:.6f} s"
    )
    return out


def real_run(args, port: int, model_dir: Path, engine_curve, choose) -> dict[str, Any]:
    """Deploy, measure the served costs, ``choose(served)`` the requests, replay them."""
    import asyncio

    from ray import serve

    settings = serving.mode_settings("disagg", args, model_dir)
    url = serving.deploy(port, settings)
    samples: list[dict] = []
    stop = threading.Event()
    try:
        serving.warm_up(url)
        served = {
            "bursts": [served_burst(url, b) for b in SERVED_BATCHES],
            "prefill": served_prefill(url, engine_curve, 2 if args.quick else 3),
        }
        fixed_s = served["bursts"][0]["ttft_s"]  # a lone tiny prompt: the path's fixed part
        served["contention"] = served_contention(url, fixed_s, 2 if args.quick else 3)
        print(f"[real] served costs: {served}", flush=True)
        reqs = choose(served)
        pool = serve.get_deployment_handle("PoolManager", settings["name"])
        workers = pool.handles.remote().result()
        threading.Thread(target=sample_workers, args=(workers, stop, samples)).start()
        t0 = time.perf_counter()
        outcomes = asyncio.run(serving.replay(url, reqs))
        took = time.perf_counter() - t0
        print(f"[real] replayed {len(reqs)} requests in {took:.0f}s", flush=True)
    finally:
        stop.set()
        serving.undeploy(settings["name"])
    done = [o for o in outcomes if o.ok]
    return {
        "ttfts": [o.ttft_s for o in done if o.ttft_s is not None],
        "tbts": [g for o in done for g in o.token_gaps_s],
        "rejected": [o.index for o in outcomes if not o.ok],
        "errors": sorted({o.error for o in outcomes if o.error})[:5],
        "prefix_hit_rate": sum(o.cached_tokens for o in done)
        / max(sum(o.prompt_tokens for o in done), 1),
        "worker_samples": samples,
        "served": served,
        "requests": reqs,
        "per_request": {
            o.index: {
                "sent_s": round(o.sent_s, 4),
                "ttft_s": o.ttft_s and round(o.ttft_s, 4),
                "tpot_s": o.tpot_s and round(o.tpot_s, 5),
                "prompt_len": o.prompt_tokens,
                "cached": o.cached_tokens,
                "error": o.error,
            }
            for o in outcomes
        },
    }


def slowdown(profile: dict[str, Any], engine: dict[str, Any], samples: list[dict], reqs):
    """How much slower the workers' own meters ran during the replay than the profiles say:
    decode = median of measured step / the engine's step at the sampled batch (mean context of
    the requests; the meter times the engine call); prefill = median of the served profile's
    tokens/s over the requests' prompts (time-weighted, as the meter is) / measured tokens/s
    (the meter times whole steps)."""
    cost = CostProfile.from_dict(profile)
    engine_cost = CostProfile.from_dict(engine)
    prompt = statistics.mean(len(r.prompt_ids) for r in reqs)
    ctx = prompt + statistics.mean(r.max_tokens for r in reqs) / 2
    dec = [
        x["decode_step_s"]
        / engine_cost.decode.step_s(x["num_running"], int(x["num_running"] * ctx))
        for x in samples
        if x["role"] == "decode" and x["num_running"] and x["decode_step_s"]
    ]
    # the meter weighs by time, so long (slow) prompts weigh more: the profile's rate alike
    lengths = [len(r.prompt_ids) for r in reqs]
    expected = sum(lengths) / sum(n / cost.prefill.rate_at(n) for n in lengths)
    pre = [
        expected / x["prefill_tokens_per_s"]
        for x in samples
        if x["role"] == "prefill" and x["prefill_tokens_per_s"]
    ]
    return {
        "decode": statistics.median(dec) if dec else None,
        "prefill": statistics.median(pre) if pre else None,
        "num_decode_samples": len(dec),
        "num_prefill_samples": len(pre),
    }


def calibrated(profile: dict[str, Any], slow: dict[str, Any]) -> dict[str, Any]:
    """The served profile with the prefill curve divided by the prefill slowdown the worker
    measured in the run. The decode costs stay as served: the decode meter times the engine
    call alone, not the served step (streaming, polls), so its slowdown is reported only."""
    out = json.loads(json.dumps(profile))
    if slow["prefill"]:
        curve = profile["prefill"]["tokens_per_s"]
        out["prefill"]["tokens_per_s"] = [[n, r / slow["prefill"]] for n, r in curve]
        out["prefill"]["contended_slowdown"] = 1.0  # the meter ran under that contention
    out["name"] = profile["name"] + "-in-situ"
    return out


def sim_run(
    profile: CostProfile,
    rows,
    scale: TraceScale,
    settings: dict[str, Any],
    sent_s: dict[int, float] | None = None,
):
    """The simulated replay; ``sent_s`` (request index -> when the real client sent it)
    replaces the trace's arrival times: the trace gives many rows the same timestamp, and the
    order in which the client's event loop sends such a burst (a few ms apart) decides which
    prompt an idle prefill instance starts first."""
    from cluster.settings import ServeSettings

    sched = ServeSettings(**settings).to_config().scheduler
    requests = build_requests(rows, scale, sched.block_size)
    if sent_s:
        requests = [replace(r, arrival_s=sent_s.get(r.index, r.arrival_s)) for r in requests]
    t0 = time.perf_counter()
    result = SimCluster(profile, SimConfig(1, 1, sched)).run(requests)
    done = [o for o in result.outcomes if o.finish_s is not None]
    prompt = sum(o.prompt_len for o in done)
    return {
        "ttfts": [o.ttft_s for o in done],
        "tbt_samples": result.token_gaps,
        "rejected": [o.index for o in result.outcomes if o.finish_s is None],
        "rejects_by_reason": {
            r: sum(o.reject_reason == r for o in result.outcomes)
            for r in {o.reject_reason for o in result.outcomes if o.reject_reason}
        },
        "prefix_hit_rate": sum(o.num_cached_tokens for o in done) / max(prompt, 1),
        "sim_seconds": time.perf_counter() - t0,
        "busy_share": {
            role: round(busy / result.makespan_s, 3) for role, busy in result.busy_s.items()
        },
        "per_request": {
            o.index: {
                "arrival_s": round(o.arrival_s, 4),
                "ttft_s": o.ttft_s and round(o.ttft_s, 4),
                "tpot_s": o.tpot_s and round(o.tpot_s, 5),
                "prompt_len": o.prompt_len,
                "cached": o.num_cached_tokens,
                "reject": o.reject_reason,
            }
            for o in result.outcomes
        },
    }


def figures(real: dict[str, Any], sim: dict[str, Any], n: int) -> dict[str, Any]:
    def r(a, b):
        return None if a is None or not b else round(a / b, 4)

    m = {
        "ttft_p50_s": percentile(real["ttfts"], 50),
        "ttft_p90_s": percentile(real["ttfts"], 90),
        "tbt_p50_s": percentile(real["tbts"], 50),
        "rejected_share": len(real["rejected"]) / n,
        "prefix_hit_rate": real["prefix_hit_rate"],
    }
    s = {
        "ttft_p50_s": percentile(sim["ttfts"], 50),
        "ttft_p90_s": percentile(sim["ttfts"], 90),
        "tbt_p50_s": weighted_percentile(sim["tbt_samples"], 50),
        "rejected_share": len(sim["rejected"]) / n,
        "prefix_hit_rate": sim["prefix_hit_rate"],
    }
    same = len(set(real["rejected"]) ^ set(sim["rejected"]))
    return {
        "measured": m,
        "simulated": s,
        "ttft_p50_ratio": r(s["ttft_p50_s"], m["ttft_p50_s"]),
        "ttft_p90_ratio": r(s["ttft_p90_s"], m["ttft_p90_s"]),
        "tbt_p50_ratio": r(s["tbt_p50_s"], m["tbt_p50_s"]),
        "rejected_share_diff": round(s["rejected_share"] - m["rejected_share"], 4),
        "rejected_disagreement_share": round(same / n, 4),
    }


def table(report: dict[str, Any]) -> str:
    def f(x):
        return "-" if x is None else f"{x:.4g}"

    m, s = report["measured"], report["simulated"]
    lines = [f"{'metric':<20}{'measured':>12}{'simulated':>12}{'sim/meas':>10}"]
    for key, ratio in [
        ("ttft_p50_s", "ttft_p50_ratio"),
        ("ttft_p90_s", "ttft_p90_ratio"),
        ("tbt_p50_s", "tbt_p50_ratio"),
        ("rejected_share", None),
        ("prefix_hit_rate", None),
    ]:
        lines.append(
            f"{key:<20}{f(m[key]):>12}{f(s[key]):>12}{f(report.get(ratio) if ratio else None):>10}"
        )
    lines.append(f"rejected_share_diff {report['rejected_share_diff']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="100 requests, fewer timing repetitions")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--num-requests", type=int, help="trace rows (default 300; --quick 100)")
    p.add_argument(
        "--utilization", default="0.6",
        help="offered load as a share of the prefill instance's capacity (from the profile); "
        "a comma list sweeps, the first point gives the headline ratios",
    )  # fmt: skip
    p.add_argument("--profile-only", action="store_true", help="measure and write the profile")
    p.add_argument("--profile-out", help="write the measured profile (JSON) here")
    p.add_argument("--profile-in", help="use this profile instead of measuring one")
    args, rest = p.parse_known_args(argv)
    if not args.profile_only and not args.json:
        p.error("give --json PATH (or --profile-only --profile-out FILE)")
    n = args.num_requests or (100 if args.quick else 300)
    args.utilizations = [float(u) for u in args.utilization.split(",")]
    # bench/serving.py's settings, so the real run is its disaggregated mode; an explicit
    # --rate-scale replaces the utilisation target (one point)
    args.is_rate_given = any(a.startswith("--rate-scale") for a in rest)
    defaults = ["--json", "unused", "--num-requests", str(n), "--rate-scale", "1"]
    args.serving = serving.parse_args([*defaults, *rest])
    return args


def prefill_work_s(profile: CostProfile, rows, scale: TraceScale, settings: dict[str, Any]):
    """Prefill-busy seconds the slice costs by the profile (a simulated replay slow enough
    that nothing queues), and the arrival span at ``scale``."""
    from cluster.settings import ServeSettings

    sched = ServeSettings(**settings).to_config().scheduler
    slow = replace(scale, rate_scale=scale.rate_scale / 50)
    requests = build_requests(rows, slow, sched.block_size)
    result = SimCluster(profile, SimConfig(1, 1, sched)).run(requests)
    span = (requests[-1].arrival_s - requests[0].arrival_s) / 50
    return result.busy_s.get("prefill", 0.0), span


def one_point(args, port: int, model_dir: Path, rows, base: BenchScale, engine_profile, u):
    """One operating point: deploy, measure the served costs, choose the rate for utilisation
    ``u`` (None: ``base``'s rate), replay for real, simulate, the figures."""
    sargs = args.serving
    settings = serving.mode_settings("disagg", sargs, model_dir)
    sim_rows = [TraceRow(r.timestamp_ms, r.input_length, r.output_length, r.hash_ids) for r in rows]
    point: dict[str, Any] = {}
    burst_size = statistics.median(Counter(r.timestamp_ms for r in rows).values())

    def choose(served: dict[str, Any]) -> list:
        profile = served_profile(engine_profile, served, settings, burst_size)
        # utilisation = the prefill work the profile prices / the arrival span
        work_s, span_s = prefill_work_s(
            CostProfile.from_dict(profile), sim_rows, sim_scale(base), settings
        )
        rate = base.rate_scale if u is None else u * span_s / work_s
        util = work_s * rate / base.rate_scale / span_s
        print(f"[real] prefill utilisation {util:.2f} (rate x{rate:.3g})", flush=True)
        point.update(profile=profile, bscale=replace(base, rate_scale=rate), util=util)
        return bench_requests(rows, point["bscale"])

    engine_curve = engine_profile["prefill"]["tokens_per_s"]
    real = real_run(sargs, port, model_dir, engine_curve, choose)
    reqs, profile_dict, bscale = real["requests"], point["profile"], point["bscale"]
    scale = sim_scale(bscale)
    sent = {i: o["sent_s"] for i, o in real["per_request"].items()}
    # the engine's prefill speed again, right after the replay: how far the machine drifted
    after = prefill_curve(load_engine(settings), args.quick)
    sim = sim_run(CostProfile.from_dict(profile_dict), sim_rows, scale, settings, sent)
    report = figures(real, sim, len(rows))
    # diagnostic: the same replay with the speeds the workers measured during the real run
    slow = slowdown(profile_dict, engine_profile, real["worker_samples"], reqs)
    sim2 = sim_run(
        CostProfile.from_dict(calibrated(profile_dict, slow)), sim_rows, scale, settings, sent
    )
    report["in_situ"] = {"slowdown": slow, **figures(real, sim2, len(rows))}
    # diagnostic: the served prefill speed scaled by the mean of the drift (1 before, after)
    prompt = statistics.mean(len(r.prompt_ids) for r in reqs)
    engine_after = {
        **engine_profile,
        "prefill": {**engine_profile["prefill"], "tokens_per_s": after},
    }
    drift = CostProfile.from_dict(engine_after).prefill.rate_at(prompt) / CostProfile.from_dict(
        engine_profile
    ).prefill.rate_at(prompt)
    bracket = json.loads(json.dumps(profile_dict))
    bracket["prefill"]["tokens_per_s"] = [
        [n, r * (1 + drift) / 2] for n, r in profile_dict["prefill"]["tokens_per_s"]
    ]
    sim3 = sim_run(CostProfile.from_dict(bracket), sim_rows, scale, settings, sent)
    report["bracketed"] = {
        "engine_prefill_tokens_per_s_after": after,
        "prefill_drift": round(drift, 3),  # engine alone, after / before, at the mean prompt
        **figures(real, sim3, len(rows)),
    }
    report |= {
        "prefill_utilization": round(point["util"], 3),
        "rate_scale": round(bscale.rate_scale, 4),
        "rate_rps": round(len(reqs) / max(reqs[-1].arrival_s, 1e-9), 4),
        "sim_busy_share": sim["busy_share"],
        "served": real["served"],
        "profile": profile_dict,
        "engine_profile": engine_profile,
        "real_errors": real["errors"],
        "sim_rejects_by_reason": sim["rejects_by_reason"],
        "sim_seconds": round(sim["sim_seconds"], 3),
        "per_request": {
            i: {"real": real["per_request"].get(i), "sim": sim["per_request"].get(i)}
            for i in range(len(rows))
        },
    }
    return report


def sim_scale(b: BenchScale) -> TraceScale:
    return TraceScale(
        rate_scale=b.rate_scale, length_scale=b.length_scale, output_scale=b.output_scale,
        max_input=b.max_input, min_output=b.min_output, max_output=b.max_output,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sargs = args.serving
    import socket

    import ray
    from ray import serve

    from cluster.settings import ensure_preset

    model_dir = ensure_preset("k2-tiny", Path(sargs.models_dir))
    settings = serving.mode_settings("disagg", sargs, model_dir)
    profile_dict = json.loads(Path(args.profile_in).read_text()) if args.profile_in else None
    if args.profile_only:  # Ray not started: the engine has the CPUs to itself
        profile_dict = measure_profile(settings, args.quick, DEFAULT_RPC_S)
        Path(args.profile_out).write_text(json.dumps(profile_dict, indent=2) + "\n")
        return 0
    rows = bench_trace(sargs.trace, sargs.num_requests)
    base = BenchScale(
        length_scale=sargs.length_scale, output_scale=sargs.output_scale,
        rate_scale=sargs.rate_scale, max_output=sargs.max_output, max_input=sargs.max_input,
    )  # fmt: skip
    ray.init(
        num_cpus=sargs.ray_cpus, include_dashboard=False, log_to_driver=False,
        configure_logging=False,
    )  # fmt: skip
    points: list[dict[str, Any]] = []
    try:
        rpc_s = ray_call_s()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            for u in [None] if args.is_rate_given else args.utilizations:
                if profile_dict is None:  # right before this replay, nothing deployed
                    engine_profile = measure_profile(settings, args.quick, rpc_s)
                    if args.profile_out:
                        Path(args.profile_out).write_text(json.dumps(engine_profile, indent=2))
                else:
                    engine_profile = profile_dict
                point = one_point(args, port, model_dir, rows, base, engine_profile, u)
                points.append(point)
                print(table(point), flush=True)
        finally:
            serve.shutdown()
    finally:
        ray.shutdown()
    report = {k: v for k, v in points[0].items() if k != "per_request"}
    report |= {
        "points": [
            {k: v for k, v in p.items() if k not in ("per_request", "profile")} for p in points
        ],
        "targets": {"ratio_within": 0.25, "rejected_share_diff_within": 0.05},
        "met": {
            k: report[k] is not None and abs(report[k] - 1) <= 0.25
            for k in ("ttft_p50_ratio", "ttft_p90_ratio", "tbt_p50_ratio")
        }
        | {"rejected_share_diff": abs(report["rejected_share_diff"]) <= 0.05},
        "profiles": [p["profile"] for p in points],
        "config": {
            "command": " ".join(["python", "bench/sim_fidelity.py", *(argv or sys.argv[1:])]),
            "num_requests": len(rows),
            "scale": asdict(replace(base, rate_scale=points[0]["rate_scale"])),
            "deployment": settings,
        },
        "per_request": points[0]["per_request"],
    }
    print(f"headline (prefill utilisation {report['prefill_utilization']}):")
    print(table(report))
    slow = report["in_situ"]["slowdown"]
    print(f"in-situ prefill speed (the worker's meter during the run; slowdown {slow}):")
    print(table(report["in_situ"]))
    drift = report["bracketed"]["prefill_drift"]
    print(f"prefill speed: the mean of before and after the replay (after / before {drift}):")
    print(table(report["bracketed"]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
