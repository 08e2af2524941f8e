"""Long-context benchmark: 8K to 256K-token prompts through a real 1 prefill + 1 decode cluster.

    python bench/longctx.py [--quick] --json PATH [--lengths 8192,32768,...] [--ratio-long N]

Deploys the ``k2-tiny`` preset (256K context) on a local Ray cluster (``--ray-cpus``, default 2:
this box), one torch thread per worker, KV sized per role for the longest request, and sends
greedy streaming ``/v1/completions`` of random token ids (distinct per request: no prefix hits).

Per prompt length (full: 8K, 32K, 128K, 256K; ``--quick``: 8K, 32K):
* ``ttft_s``: request sent -> first token chunk, on an otherwise idle cluster;
* ``prefill_tok_s``: prompt tokens / TTFT (everything the request waited for included);
* ``prefill_peak_mb``: the prefill worker's peak resident memory during the request minus its
  resident memory just before it (``/proc/<pid>/status`` sampled every 10 ms), against
  ``kv_mb``, the request's KV bytes (all layers, the cache's format); the target is
  ``prefill_peak_mb <= 2 * kv_mb + 256``;
* ``transfer_tail_s``: the exposed transfer time: last prefill chunk computed -> the decode
  side holds the verified KV (the ``transfer_tail`` part of ``tidal_ttft_part_seconds``, read
  from the ingress's ``GET /metrics`` before and after).

Head-of-line blocking: ``--num-short`` requests of ``--short-len`` tokens (2K: above the
decode-local threshold, so they go through the prefill pool), one per second, first on the idle
cluster, then while a ``--ratio-long``-token prompt (full: 128K; quick: 32K) is being prefilled.
``short_ttft_ratio`` = median loaded TTFT / median idle TTFT (target <= 3).

On this CPU box k2-tiny prefills about 300-500 tokens/s at 32K (attention is quadratic), so the
full run (128K and 256K) takes hours; ``--quick`` takes a few minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL_NAME = "k2-tiny"
FULL_LENGTHS = (8192, 32768, 131072, 262144)
QUICK_LENGTHS = (8192, 32768)
PEAK_CONSTANT_MB = 256  # the "+ a constant" of the memory target: sender window, torch arenas


# ---- one request ----------------------------------------------------------------------------------
def make_prompt(n: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(1, 500) for _ in range(n)]


async def ttft_of(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int) -> float:
    """Seconds from sending a streaming completion to its first token chunk (then drained)."""
    body = {
        "model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, "stream": True,
    }  # fmt: skip
    t0 = time.perf_counter()
    ttft = None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if ttft is None and line.startswith("data: {") and '"text"' in line:
                ttft = time.perf_counter() - t0
    if ttft is None:
        raise RuntimeError("stream ended without a token")
    return ttft


def ttft_sync(url: str, prompt: list[int], max_tokens: int = 2) -> float:
    async def go() -> float:
        async with httpx.AsyncClient(timeout=None) as client:
            return await ttft_of(client, url, prompt, max_tokens)

    return asyncio.run(go())


# ---- the prefill worker's memory -------------------------------------------------------------------
class RssSampler:
    """Peak resident memory (MB) of one process, sampled on a thread."""

    def __init__(self, pid: int, interval_s: float = 0.01) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss_mb(self) -> float:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError(f"no VmRSS for pid {self.pid}")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self.rss_mb())
            time.sleep(self.interval_s)

    def __enter__(self) -> RssSampler:
        self.peak_mb = self.rss_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def prefill_pid(app: str) -> int:
    """The pid of the application's prefill rank actor."""
    import ray
    from ray import serve

    handles = serve.get_deployment_handle("PoolManager", app).handles.remote().result()
    for handle in handles.values():
        if ray.get(handle.ping.remote(), timeout=30) == "prefill":
            return ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
    raise RuntimeError("no prefill worker")


# ---- the exposed transfer time, from the ingress's metrics -----------------------------------------
_TAIL = re.compile(r'^tidal_ttft_part_seconds_(sum|count)\{[^}]*part="transfer_tail"[^}]*\} (\S+)')


def transfer_tail(url: str) -> tuple[float, float]:
    """(sum of seconds, count) of the transfer_tail TTFT part over every series."""
    total = {"sum": 0.0, "count": 0.0}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        m = _TAIL.match(line)
        if m:
            total[m.group(1)] += float(m.group(2))
    return total["sum"], total["count"]


def tail_of_next(url: str, before: tuple[float, float], timeout_s: float = 45.0) -> float | None:
    """The transfer tail of the request finished since ``before`` (Ray exports every few s)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        s, n = transfer_tail(url)
        if n > before[1]:
            return round((s - before[0]) / (n - before[1]), 4)
        time.sleep(1.0)
    return None


# ---- the measurements -------------------------------------------------------------------------------
def measure_length(url: str, pid: int, n: int, kv_bytes_per_token: int, seed: int) -> dict:
    prompt = make_prompt(n, seed)
    before = transfer_tail(url)
    with RssSampler(pid) as rss:
        base = rss.peak_mb
        ttft = ttft_sync(url, prompt)
    kv_mb = n * kv_bytes_per_token / 2**20
    peak = rss.peak_mb - base
    row = {
        "prompt_tokens": n,
        "ttft_s": round(ttft, 3),
        "prefill_tok_s": round(n / ttft, 1),
        "prefill_peak_mb": round(peak, 1),
        "kv_mb": round(kv_mb, 1),
        "peak_within_target": peak <= 2 * kv_mb + PEAK_CONSTANT_MB,
        "transfer_tail_s": tail_of_next(url, before),
    }
    print(f"  {n:>7} tokens: {row}", flush=True)
    return row


def short_ttfts(url: str, num: int, short_len: int, seed: int, until: threading.Event | None):
    """TTFTs of ``num`` short requests sent one per second (stops early once ``until`` is set:
    only requests sent while the long prompt was still prefilling count)."""
    out: list[float] = []

    async def go() -> None:
        async with httpx.AsyncClient(timeout=None) as client:
            tasks = []
            for i in range(num):
                if until is not None and until.is_set():
                    break
                prompt = make_prompt(short_len, seed + i)
                tasks.append(asyncio.create_task(ttft_of(client, url, prompt, 2)))
                await asyncio.sleep(1.0)
            out.extend(await asyncio.gather(*tasks))

    asyncio.run(go())
    return out


def measure_hol(url: str, args: argparse.Namespace) -> dict:
    idle = short_ttfts(url, args.num_short, args.short_len, 10_000, None)
    print(f"  idle 2K TTFTs: {[round(x, 3) for x in idle]}", flush=True)
    done = threading.Event()
    long_ttft: list[float] = []

    def long_request() -> None:
        try:
            long_ttft.append(ttft_sync(url, make_prompt(args.ratio_long, 20_000)))
        finally:
            done.set()

    t = threading.Thread(target=long_request)
    t.start()
    time.sleep(args.long_head_start_s)  # the long prompt is routed and deep in its first chunks
    loaded = short_ttfts(url, args.num_short, args.short_len, 30_000, done)
    still_running = not done.is_set()
    t.join()
    print(f"  loaded 2K TTFTs: {[round(x, 3) for x in loaded]} (long TTFT {long_ttft})", flush=True)
    idle_p50 = statistics.median(idle)
    loaded_p50 = statistics.median(loaded) if loaded else None
    return {
        "long_prompt_tokens": args.ratio_long,
        "long_ttft_s": round(long_ttft[0], 3) if long_ttft else None,
        "short_prompt_tokens": args.short_len,
        "idle_ttft_s": [round(x, 3) for x in idle],
        "loaded_ttft_s": [round(x, 3) for x in loaded],
        "long_still_prefilling_after_shorts": still_running,
        "short_ttft_ratio": round(loaded_p50 / idle_p50, 3) if loaded_p50 else None,
        "short_ttft_ratio_max": round(max(loaded) / idle_p50, 3) if loaded else None,
    }


# ---- the cluster ------------------------------------------------------------------------------------
def settings(args: argparse.Namespace, model_dir: Path, kv_tokens: int) -> dict[str, Any]:
    return {
        "model": str(model_dir),
        "model_name": MODEL_NAME,
        "name": "bench-longctx",
        "prefill": 1,
        "decode": 1,
        "num_threads": 1,
        "cpus_per_rank": args.ray_cpus / 2,
        "prefill_kv_tokens": kv_tokens,
        "decode_kv_tokens": kv_tokens,
        "prefill_token_budget": args.token_budget,
        "prefill_attention_tokens": args.attention_tokens,
        "prefill_max_skipped_steps": args.max_skipped_steps,
        "decode_local_threshold": args.decode_local_threshold,
        "ttft_slo_s": 3600.0,  # measure, never shed: admission is not what is benchmarked
        "health_interval_s": 1.0,
        "report_interval_s": 0.2,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="8K and 32K; a 32K prompt for the ratio")
    p.add_argument("--json", required=True, help="write the report here")
    p.add_argument("--lengths", help="comma-separated prompt lengths (default by --quick)")
    p.add_argument("--ratio-long", type=int, help="long prompt of the HOL test (128K; quick 32K)")
    p.add_argument("--short-len", type=int, default=2048)
    p.add_argument("--num-short", type=int, default=6)
    p.add_argument("--long-head-start-s", type=float, default=3.0)
    p.add_argument("--decode-local-threshold", type=int, default=1024)
    p.add_argument("--token-budget", type=int, default=2048, help="prefill_token_budget")
    p.add_argument("--attention-tokens", type=int, default=1024, help="prefill_attention_tokens")
    p.add_argument("--max-skipped-steps", type=int, default=8, help="prefill_max_skipped_steps")
    p.add_argument("--ray-cpus", type=float, default=2.0)
    p.add_argument("--models-dir", default=str(REPO / ".models"))
    args = p.parse_args(argv)
    lengths = args.lengths or ",".join(map(str, QUICK_LENGTHS if args.quick else FULL_LENGTHS))
    args.lengths = [int(x) for x in lengths.split(",")]
    args.ratio_long = args.ratio_long or (32768 if args.quick else 131072)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray
    from ray import serve

    from cluster.app import build_app_from_config
    from cluster.serve import wait_healthy
    from cluster.settings import ServeSettings, ensure_preset

    model_dir = ensure_preset(MODEL_NAME, Path(args.models_dir))
    kv_tokens = max([*args.lengths, args.ratio_long]) + 4 * args.short_len
    conf = settings(args, model_dir, kv_tokens)
    cluster_config = ServeSettings(**conf).to_config()
    kv_bytes_per_token = cluster_config.scheduler.kv_bytes_per_token
    ray.init(
        num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False,
        configure_logging=False,
    )  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    t_start = time.perf_counter()
    try:
        serve.run(build_app_from_config(cluster_config), name=conf["name"], route_prefix="/")
        wait_healthy(url, 300.0)
        pid = prefill_pid(conf["name"])
        ttft_sync(url, make_prompt(600, 1))  # warm-up: first-call costs are not timed
        print("prompt lengths:", flush=True)
        rows = [
            measure_length(url, pid, n, kv_bytes_per_token, seed=100 + i)
            for i, n in enumerate(args.lengths)
        ]
        print(f"short requests vs a {args.ratio_long}-token prefill:", flush=True)
        hol = measure_hol(url, args)
    finally:
        serve.shutdown()
        ray.shutdown()
    report = {
        "lengths": rows,
        "hol": hol,
        "short_ttft_ratio": hol["short_ttft_ratio"],
        "targets": {
            "short_ttft_ratio_max": 3.0,
            "prefill_peak_mb": f"<= 2 x kv_mb + {PEAK_CONSTANT_MB}",
        },
        "config": {
            "command": " ".join(["python", "bench/longctx.py", *(argv or sys.argv[1:])]),
            "settings": conf,
            "kv_bytes_per_token": kv_bytes_per_token,
            "wall_s": round(time.perf_counter() - t_start, 1),
        },
    }
    print(table(rows, hol))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def table(rows: list[dict], hol: dict) -> str:
    head = f"{'tokens':>8} {'TTFT s':>8} {'tok/s':>8} {'peak MB':>8} {'KV MB':>8} {'tail s':>7}"
    lines = [head]
    for r in rows:
        tail = "-" if r["transfer_tail_s"] is None else f"{r['transfer_tail_s']:.3f}"
        lines.append(
            f"{r['prompt_tokens']:>8} {r['ttft_s']:>8.2f} {r['prefill_tok_s']:>8.0f} "
            f"{r['prefill_peak_mb']:>8.1f} {r['kv_mb']:>8.1f} {tail:>7}"
        )
    lines.append(
        f"short_ttft_ratio {hol['short_ttft_ratio']} (max {hol['short_ttft_ratio_max']}) with a "
        f"{hol['long_prompt_tokens']}-token prompt prefilling"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
