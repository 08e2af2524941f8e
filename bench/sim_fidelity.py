"""Simulator fidelity: the same trace slice on the real 1P+1D k2-tiny cluster and in the simulator.

    python bench/sim_fidelity.py [--quick] --json PATH
    python bench/sim_fidelity.py --profile-only --profile-out FILE   # measure a profile only

1. Profile: the real engine (``model.Engine``, loaded exactly as the cluster's workers load it:
   same dtype, pages, chunk size, one torch thread) on ``k2-tiny`` here: prefill seconds for
   prompts of 64..4096 tokens from scratch (-> the tokens/s curve), decode step seconds at
   batches 1..64 x contexts 128..1024 (-> least-squares base / per-sequence / per-KV-token
   costs), and one Ray actor call's round trip. Transfer bandwidth is the served-path figure of
   ``bench/results/kvtransfer.json`` when present (else 0.67 GB/s, the last one measured).
2. Real: ``bench/serving.py``'s disaggregated deployment (1 prefill + 1 decode instance, same
   settings) replays the first ``--num-requests`` rows of the Mooncake conversation trace,
   scaled by ``bench/trace.py`` (lengths 1/8, outputs 1/8 capped at 64, rate x0.25 unless
   ``--rate-scale`` says otherwise; any other ``bench/serving.py`` flag passes through).
3. Sim: ``scheduler/sim`` replays the same rows with the same scaling, the measured profile and
   the scheduler config the real cluster ran (``ServeSettings.to_config().scheduler``).
Ratios are simulated over measured: ``ttft_p50_ratio``, ``ttft_p90_ratio``, ``tbt_p50_ratio``
(per-token gaps), and ``rejected_share_diff`` (simulated minus measured share of requests that
did not complete). Targets: ratios within 25%, rejected share within 0.05. As a diagnostic,
``in_situ`` repeats the simulation with the speeds the workers' own meters showed during the
real run (sampled every 2 s): on a shared box the offline profile and the run see different
loads, and this separates that from the simulator's own error.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from dataclasses import asdict
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
    """Best of ``reps`` prefills of a ``length``-token prompt (pages allocated and freed)."""
    import torch

    ids = torch.randint(1, 400, (length,)).tolist()
    best = float("inf")
    for _ in range(reps):
        engine.cache.allocator.allocate("fid-prefill", length)
        try:
            t0 = time.perf_counter()
            engine.prefill("fid-prefill", ids)
            best = min(best, time.perf_counter() - t0)
        finally:
            engine.cache.allocator.free("fid-prefill")
    return best


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


def measure_profile(settings: dict[str, Any], quick: bool, rpc_s: float) -> dict[str, Any]:
    engine = load_engine(settings)
    reps = 1 if quick else 2
    curve = [[n, n / time_prefill(engine, n, reps)] for n in PREFILL_LENGTHS]
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
    return {
        "name": "k2-tiny-measured",
        "sources": [
            f"measured here by bench/sim_fidelity.py on {time.strftime('%Y-%m-%d %H:%M')}: "
            "k2-tiny, real Engine, one torch thread",
            f"decode samples (batch, context, step_s): {[[b, c, round(s, 5)] for b, c, s in samples]}",
            f"transfer bandwidth: {'bench/results/kvtransfer.json served_path_gbps' if gbps else 'default'}",
        ],
        "assumptions": [f"one actor call = {rpc_s * 1e3:.2f} ms (assumed; not measured)"],
        "page_size": page_size,
        "block_size": page_size,
        "prefill": {
            "tokens_per_s": curve,
            "step_overhead_s": 0.0,
            "token_budget": settings["prefill_token_budget"],
            "prefix_cache_tokens": num_pages * page_size,
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


def real_run(args, port: int, model_dir: Path, reqs) -> dict[str, Any]:
    import asyncio

    from ray import serve

    settings = serving.mode_settings("disagg", args, model_dir)
    url = serving.deploy(port, settings)
    samples: list[dict] = []
    stop = threading.Event()
    try:
        serving.warm_up(url)
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
    }


def slowdown(profile: dict[str, Any], samples: list[dict], reqs) -> dict[str, Any]:
    """How much slower the workers' own meters ran during the replay than the profile says:
    decode = median of measured step / profile step at the sampled batch (mean context of the
    requests); prefill = median of profile tokens/s at the mean prompt / measured tokens/s."""
    cost = CostProfile.from_dict(profile)
    prompt = statistics.mean(len(r.prompt_ids) for r in reqs)
    ctx = prompt + statistics.mean(r.max_tokens for r in reqs) / 2
    dec = [
        x["decode_step_s"] / cost.decode.step_s(x["num_running"], int(x["num_running"] * ctx))
        for x in samples
        if x["role"] == "decode" and x["num_running"] and x["decode_step_s"]
    ]
    pre = [
        cost.prefill.rate_at(prompt) / x["prefill_tokens_per_s"]
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
    """The profile with every cost scaled by the slowdown the workers measured in the run."""
    out = json.loads(json.dumps(profile))
    if slow["prefill"]:
        curve = profile["prefill"]["tokens_per_s"]
        out["prefill"]["tokens_per_s"] = [[n, r / slow["prefill"]] for n, r in curve]
    if slow["decode"]:
        for k in ("base_s", "per_seq_s", "per_kv_token_s"):
            out["decode"][k] = profile["decode"][k] * slow["decode"]
    out["name"] = profile["name"] + "-in-situ"
    return out


def sim_run(profile: CostProfile, rows, scale: TraceScale, settings: dict[str, Any]):
    from cluster.settings import ServeSettings

    sched = ServeSettings(**settings).to_config().scheduler
    requests = build_requests(rows, scale, sched.block_size)
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
    p.add_argument("--profile-only", action="store_true", help="measure and write the profile")
    p.add_argument("--profile-out", help="write the measured profile (JSON) here")
    p.add_argument("--profile-in", help="use this profile instead of measuring one")
    args, rest = p.parse_known_args(argv)
    if not args.profile_only and not args.json:
        p.error("give --json PATH (or --profile-only --profile-out FILE)")
    n = args.num_requests or (100 if args.quick else 300)
    # bench/serving.py's settings, so the real run is its disaggregated mode
    # the rate this 2-core box serves without saturating (at 0.5 TTFTs are queueing-bound)
    defaults = ["--json", "unused", "--num-requests", str(n), "--rate-scale", "0.25"]
    args.serving = serving.parse_args([*defaults, *rest])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sargs = args.serving
    import socket

    import ray
    from ray import serve

    from cluster.settings import ensure_preset

    model_dir = ensure_preset("k2-tiny", Path(sargs.models_dir))
    settings = serving.mode_settings("disagg", sargs, model_dir)
    if args.profile_in:
        profile_dict = json.loads(Path(args.profile_in).read_text())
    else:  # before Ray starts: the engine has the CPUs to itself
        t0 = time.perf_counter()
        profile_dict = measure_profile(settings, args.quick, DEFAULT_RPC_S)
        print(f"[profile] measured in {time.perf_counter() - t0:.0f}s", flush=True)
    if args.profile_only:
        Path(args.profile_out).write_text(json.dumps(profile_dict, indent=2) + "\n")
        return 0
    ray.init(
        num_cpus=sargs.ray_cpus, include_dashboard=False, log_to_driver=False,
        configure_logging=False,
    )  # fmt: skip
    try:
        if not args.profile_in:
            rpc_s = ray_call_s()
            profile_dict["cluster"]["rpc_s"] = profile_dict["transfer"]["latency_s"] = rpc_s
            profile_dict["assumptions"] = [f"one actor call = {rpc_s * 1e3:.2f} ms, a Ray echo"]
        if args.profile_out:
            Path(args.profile_out).write_text(json.dumps(profile_dict, indent=2) + "\n")
        bscale = BenchScale(
            length_scale=sargs.length_scale, output_scale=sargs.output_scale,
            rate_scale=sargs.rate_scale, max_output=sargs.max_output, max_input=sargs.max_input,
        )  # fmt: skip
        rows = bench_trace(sargs.trace, sargs.num_requests)
        reqs = bench_requests(rows, bscale)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            real = real_run(sargs, port, model_dir, reqs)
        finally:
            serve.shutdown()
    finally:
        ray.shutdown()
    scale = TraceScale(
        rate_scale=bscale.rate_scale, length_scale=bscale.length_scale,
        output_scale=bscale.output_scale, max_input=bscale.max_input,
        min_output=bscale.min_output, max_output=bscale.max_output,
    )  # fmt: skip
    sim_rows = [TraceRow(r.timestamp_ms, r.input_length, r.output_length, r.hash_ids) for r in rows]
    sim = sim_run(CostProfile.from_dict(profile_dict), sim_rows, scale, settings)
    report = figures(real, sim, len(rows))
    # diagnostic: the same replay with the speeds the workers measured during the real run
    slow = slowdown(profile_dict, real["worker_samples"], reqs)
    sim2 = sim_run(CostProfile.from_dict(calibrated(profile_dict, slow)), sim_rows, scale, settings)
    report["in_situ"] = {"slowdown": slow, **figures(real, sim2, len(rows))}
    report |= {
        "targets": {"ratio_within": 0.25, "rejected_share_diff_within": 0.05},
        "met": {
            k: report[k] is not None and abs(report[k] - 1) <= 0.25
            for k in ("ttft_p50_ratio", "ttft_p90_ratio", "tbt_p50_ratio")
        }
        | {"rejected_share_diff": abs(report["rejected_share_diff"]) <= 0.05},
        "real_errors": real["errors"],
        "sim_rejects_by_reason": sim["rejects_by_reason"],
        "sim_seconds": round(sim["sim_seconds"], 3),
        "profile": profile_dict,
        "config": {
            "command": " ".join(["python", "bench/sim_fidelity.py", *(argv or sys.argv[1:])]),
            "num_requests": len(rows),
            "scale": asdict(bscale),
            "deployment": settings,
        },
    }
    print(table(report))
    print(f"in-situ speeds (the workers' meters during the run; slowdown {slow}):")
    print(table(report["in_situ"]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
