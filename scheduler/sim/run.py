"""``tidal sim``: replay a trace on a simulated cluster, sweep P:D splits, write report and plots.

    tidal sim --trace PATH --profile k2-h200 --prefill 3 --decode 5 --out DIR
    tidal sim --trace PATH --profile k2-h200 --prefill 3 --decode 5 --sweep --out DIR

One replay reports latency percentiles, SLO attainment, prefix hits, rejects and utilisation at
the given rate. ``--sweep`` tries every split of the same instance count (1..N-1 prefill) and
searches each for its goodput (DistServe: the highest rate with >= 90% of requests meeting both
SLOs), and asks the P:D planner (``scheduler.planner.recommend``) for its split on the same
workload. ``DIR/report.json`` holds the figures, ``DIR/*.png`` the plots.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from scheduler.planner import SLO, InstancePerf, Workload, recommend
from scheduler.sim.autoscale import PlannerLoop
from scheduler.sim.cluster import SimCluster, SimConfig, SimResult, scheduler_config_for
from scheduler.sim.profile import CostProfile, load_profile
from scheduler.sim.report import SLOSpec, summarize
from scheduler.sim.trace import (
    SimRequest,
    TraceRow,
    TraceScale,
    build_requests,
    infinite_cache_hit_rate,
    load_trace,
)

ROUTINGS = ("cache-aware", "load-only")


@dataclass(frozen=True)
class Deployment:
    """Pool sizes, the scheduler knobs that differ from the profile's defaults, and routing."""

    num_prefill: int
    num_decode: int
    num_mixed: int = 0
    block_size: int = 64
    ttft_slo_s: float = 2.0  # the scheduler's admission budget
    decode_local_threshold: int = 256
    max_queue_len: int = 256
    routing: str = "cache-aware"  # load-only: the scheduler sees no prefix hashes
    planner: str = "off"  # auto: the planner's auto mode moves instances between the pools
    planner_window_s: float = 10.0

    @property
    def num_instances(self) -> int:
        return self.num_prefill + self.num_decode + self.num_mixed


def replay(
    requests: list[SimRequest], profile: CostProfile, dep: Deployment, slo: SLOSpec = SLOSpec()
) -> SimResult:
    """One simulated run of ``requests`` on ``dep`` (``slo`` feeds the planner's auto mode)."""
    sched = scheduler_config_for(
        profile,
        block_size=dep.block_size,
        ttft_slo_s=dep.ttft_slo_s,
        decode_local_threshold=dep.decode_local_threshold,
        max_queue_len=dep.max_queue_len,
    )
    config = SimConfig(
        dep.num_prefill, dep.num_decode, sched, num_mixed=dep.num_mixed,
        is_prefix_aware=dep.routing == "cache-aware",
    )  # fmt: skip
    cluster = SimCluster(profile, config)
    planner = None
    if dep.planner == "auto":
        planner = PlannerLoop(cluster, SLO(slo.ttft_s, slo.tpot_s), window_s=dep.planner_window_s)
        planner.start()
    result = cluster.run(requests)
    if planner is not None:
        result.planner_history = planner.history
    return result


def run_once(
    rows: list[TraceRow], scale: TraceScale, profile: CostProfile, dep: Deployment, slo: SLOSpec
) -> tuple[dict[str, Any], SimResult]:
    """Replay at ``scale``; the report (with ``sim_seconds``, wall time on this machine)."""
    requests = build_requests(rows, scale, dep.block_size)
    t0 = time.perf_counter()
    result = replay(requests, profile, dep, slo)
    report = summarize(result, slo)
    report["sim_seconds"] = round(time.perf_counter() - t0, 3)
    report["infinite_cache_hit_rate"] = round(infinite_cache_hit_rate(requests, dep.block_size), 4)
    return report, result


def goodput(
    rows: list[TraceRow],
    scale: TraceScale,
    profile: CostProfile,
    dep: Deployment,
    slo: SLOSpec,
    num_bisect: int = 5,
) -> dict[str, Any]:
    """Highest ``rate_scale`` (found by doubling/halving, then bisection) at which the replay
    still meets the goodput bar; in requests/s of the scaled trace."""

    def ok(rate: float) -> bool:
        report, _ = run_once(rows, replace(scale, rate_scale=rate), profile, dep, slo)
        print(
            f"  {dep.num_prefill}P:{dep.num_decode}D rate x{rate:.3g}: "
            f"SLO attainment {report['slo_attainment']:.3f} ({report['sim_seconds']:.1f}s)",
            flush=True,
        )
        return report["meets_goodput_bar"]

    rate = scale.rate_scale
    if ok(rate):
        good, bad = rate, None
        for _ in range(12):
            if not ok(good * 2):
                bad = good * 2
                break
            good *= 2
    else:
        good, bad = None, rate
        for _ in range(12):
            if ok(bad / 2):
                good = bad / 2
                break
            bad /= 2
    if good is not None and bad is not None:
        for _ in range(num_bisect):
            mid = math.sqrt(good * bad)
            good, bad = (mid, bad) if ok(mid) else (good, mid)
    base_rps = _base_rate(rows)
    return {
        "num_prefill": dep.num_prefill,
        "num_decode": dep.num_decode,
        "goodput_rate_scale": None if good is None else round(good, 4),
        "goodput_rps": None if good is None else round(good * base_rps, 4),
    }


def _base_rate(rows: list[TraceRow]) -> float:
    span_s = (rows[-1].timestamp_ms - rows[0].timestamp_ms) / 1000.0 if rows else 0.0
    return len(rows) / span_s if span_s > 0 else 0.0


def planner_choice(
    requests: list[SimRequest],
    profile: CostProfile,
    dep: Deployment,
    slo: SLOSpec,
    hit_rate: float,
) -> dict[str, Any]:
    """What ``scheduler.planner.recommend`` chooses for this workload and profile. The decode
    batch is the largest that fits the KV and keeps a step within the TPOT SLO."""
    n = len(requests)
    span = max(r.arrival_s for r in requests) - min(r.arrival_s for r in requests)
    prompt = sum(r.prompt_len for r in requests) / n
    output = sum(r.max_tokens for r in requests) / n
    ctx = prompt + output / 2
    dc = profile.decode
    batch = max(1, min(dc.max_batch_size, int(dc.kv_tokens // ctx)))
    while batch > 1 and dc.step_s(batch, int(batch * ctx)) > slo.tpot_s:
        batch -= max(1, batch // 16)
    workload = Workload(n / max(span, 1e-9), prompt, prompt * (1 - hit_rate), output)
    perf = InstancePerf(
        prefill_tokens_per_s=profile.prefill.rate_at(prompt),
        decode_step_s=dc.step_s(batch, int(batch * ctx)),
        decode_batch_size=batch,
        kv_tokens_per_decode_instance=dc.kv_tokens,
        transfer_s_per_token=profile.transfer.seconds(1),
    )
    rec = recommend(workload, perf, SLO(slo.ttft_s, slo.tpot_s), dep.num_instances)
    return {"workload": asdict(workload), "perf": asdict(perf), "recommendation": asdict(rec)}


def sweep(
    rows: list[TraceRow], scale: TraceScale, profile: CostProfile, dep: Deployment, slo: SLOSpec
) -> dict[str, Any]:
    """Goodput of every disaggregated split of ``dep.num_instances``, best first in ``best``."""
    n = dep.num_instances
    splits = [
        goodput(
            rows, scale, profile, replace(dep, num_prefill=p, num_decode=n - p, num_mixed=0), slo
        )
        for p in range(1, n)
    ]
    best = max(splits, key=lambda s: s["goodput_rps"] or 0.0)
    return {"splits": splits, "best": best}


# ---- plots -----------------------------------------------------------------------------------------
def plot_cdfs(results: dict[str, SimResult], path: Path) -> None:
    """TTFT and TBT CDFs, one line per labelled run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, result in results.items():
        ttfts = sorted(o.ttft_s for o in result.outcomes if o.ttft_s is not None)
        if ttfts:
            ax1.plot(ttfts, [(i + 1) / len(ttfts) for i in range(len(ttfts))], label=label)
        gaps = sorted(result.token_gaps)
        total = sum(n for _, n in gaps)
        xs, ys, seen = [], [], 0
        for g, k in gaps:
            seen += k
            xs.append(g)
            ys.append(seen / total)
        if xs:
            ax2.plot(xs, ys, label=label)
    ax1.set(xscale="log", xlabel="TTFT (s)", ylabel="fraction of requests", title="TTFT CDF")
    ax2.set(xscale="log", xlabel="time between tokens (s)", ylabel="fraction of tokens",
            title="TBT CDF")  # fmt: skip
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_goodput(splits: list[dict[str, Any]], planner_p: int | None, path: Path) -> None:
    """Goodput against the number of prefill instances (the planner's choice marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [f"{s['num_prefill']}P:{s['num_decode']}D" for s in splits]
    values = [s["goodput_rps"] or 0.0 for s in splits]
    bars = ax.bar(labels, values, color="tab:blue")
    for s, bar in zip(splits, bars, strict=True):
        if s["num_prefill"] == planner_p:
            bar.set_color("tab:orange")
            bar.set_label("planner's choice")
    ax.set(xlabel="prefill : decode instances", ylabel="goodput (requests/s)",
           title="goodput by P:D split")  # fmt: skip
    if planner_p is not None:
        ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- command line ----------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", required=True, help="Mooncake-format JSONL trace")
    p.add_argument("--profile", required=True, help="profile name (k2-h200) or JSON file")
    p.add_argument("--prefill", type=int, default=0, help="prefill instances")
    p.add_argument("--decode", type=int, default=0, help="decode instances")
    p.add_argument("--colocated", type=int, default=0, help="mixed (colocated) instances")
    p.add_argument("--rate-scale", type=float, default=1.0, help="arrival rate factor")
    p.add_argument("--length-scale", type=float, default=1.0, help="prompt length factor")
    p.add_argument("--output-scale", type=float, default=1.0, help="output length factor")
    p.add_argument("--max-input", type=int, help="cap prompts at this many tokens")
    p.add_argument("--max-output", type=int, help="cap outputs at this many tokens")
    p.add_argument("--num-requests", type=int, help="first N rows of the trace")
    p.add_argument("--sweep", action="store_true", help="goodput of every P:D split")
    p.add_argument("--slo-ttft", type=float, default=2.0, help="TTFT SLO (s)")
    p.add_argument("--slo-tpot", type=float, default=0.1, help="TPOT SLO (s per token)")
    p.add_argument("--admission-ttft", type=float, help="scheduler's ttft_slo_s (default SLO)")
    p.add_argument("--block-size", type=int, help="prefix-hash block (default: the profile's)")
    p.add_argument("--decode-local-threshold", type=int, default=256)
    p.add_argument("--max-queue-len", type=int, default=256)
    p.add_argument("--routing", choices=ROUTINGS, default="cache-aware")
    p.add_argument(
        "--prefix-cache-tokens", type=int,
        help="prefix-cache capacity per prefill instance (default: the profile's)",
    )  # fmt: skip
    p.add_argument(
        "--planner", choices=("off", "auto"), default="off",
        help="auto: the planner moves instances between the pools while the trace runs",
    )  # fmt: skip
    p.add_argument("--planner-window", type=float, default=10.0, help="seconds per round")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    p.add_argument("--out", required=True, help="output folder (report.json, PNGs)")


def run_from_args(args: argparse.Namespace) -> int:
    if args.colocated and (args.prefill or args.decode):
        raise ValueError(
            "--colocated N runs mixed instances; do not combine with --prefill/--decode"
        )
    if not args.colocated and (args.prefill < 1 or args.decode < 1):
        raise ValueError("give --prefill N and --decode M (both >= 1), or --colocated N")
    profile = load_profile(args.profile)
    if args.prefix_cache_tokens is not None:
        cache = replace(profile.prefill, prefix_cache_tokens=args.prefix_cache_tokens)
        profile = replace(profile, prefill=cache)
    rows = load_trace(args.trace, args.num_requests)
    if not rows:
        raise ValueError(f"trace {args.trace} has no rows")
    scale = TraceScale(
        rate_scale=args.rate_scale, length_scale=args.length_scale,
        output_scale=args.output_scale, max_input=args.max_input, max_output=args.max_output,
    )  # fmt: skip
    dep = Deployment(
        args.prefill, args.decode, args.colocated, args.block_size or profile.block_size,
        args.admission_ttft or args.slo_ttft, args.decode_local_threshold, args.max_queue_len,
        args.routing, args.planner, args.planner_window,
    )  # fmt: skip
    slo = SLOSpec(args.slo_ttft, args.slo_tpot)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = simulate(rows, scale, profile, dep, slo, out, args.sweep, not args.no_plots)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(summary_table(report))
    print(f"wrote {out / 'report.json'}")
    return 0


def simulate(
    rows: list[TraceRow],
    scale: TraceScale,
    profile: CostProfile,
    dep: Deployment,
    slo: SLOSpec,
    out: Path,
    do_sweep: bool = False,
    do_plots: bool = True,
) -> dict[str, Any]:
    """The whole command: one replay (+ sweep), the planner's view, plots; the report."""
    run, result = run_once(rows, scale, profile, dep, slo)
    report: dict[str, Any] = {
        "profile": profile.name,
        "deployment": asdict(dep),
        "scale": asdict(scale),
        "run": run,
        "sim_seconds": run["sim_seconds"],
        "profile_notes": list(profile.notes),
    }
    plots = {"ttft_tbt_cdf": "ttft_tbt_cdf.png"}
    curves = {f"{dep.num_prefill}P:{dep.num_decode}D" if not dep.num_mixed else
              f"{dep.num_mixed} mixed": result}  # fmt: skip
    if do_sweep or not dep.num_mixed:
        requests = build_requests(rows, scale, dep.block_size)
        report["planner"] = planner_choice(requests, profile, dep, slo, run["prefix_hit_rate"])
    if do_sweep:
        t0 = time.perf_counter()
        report["sweep"] = sweep(rows, scale, profile, dep, slo)
        report["sweep"]["sweep_seconds"] = round(time.perf_counter() - t0, 1)
        best = report["sweep"]["best"]
        if (best["num_prefill"], best["num_decode"]) != (dep.num_prefill, dep.num_decode):
            best_dep = replace(dep, num_prefill=best["num_prefill"],
                               num_decode=best["num_decode"], num_mixed=0)  # fmt: skip
            _, curves[f"best {best['num_prefill']}P:{best['num_decode']}D"] = run_once(
                rows, scale, profile, best_dep, slo
            )
        plots["goodput_by_split"] = "goodput_by_split.png"
    if do_plots:
        plot_cdfs(curves, out / plots["ttft_tbt_cdf"])
        if do_sweep:
            planner_p = report["planner"]["recommendation"]["num_prefill"]
            plot_goodput(report["sweep"]["splits"], planner_p, out / plots["goodput_by_split"])
        report["plots"] = plots
    return report


def summary_table(report: dict[str, Any]) -> str:
    run = report["run"]
    keys = [
        "num_requests", "num_completed", "rejected_share", "ttft_p50_s", "ttft_p90_s",
        "ttft_p99_s", "tbt_p50_s", "tbt_p99_s", "slo_attainment", "prefix_hit_rate",
        "infinite_cache_hit_rate", "sim_seconds",
    ]  # fmt: skip
    lines = [f"{'metric':<26}{'value':>14}"]
    lines += [f"{k:<26}{_fmt(run.get(k)):>14}" for k in keys]
    lines.append(f"{'rejects':<26}{json.dumps(run['rejects_by_reason']):>14}")
    lines.append(f"{'utilization':<26}{json.dumps(run['utilization']):>14}")
    if "planner" in report:
        rec = report["planner"]["recommendation"]
        lines.append(f"{'planner split':<26}{rec['num_prefill']}P:{rec['num_decode']}D"
                     f" (feasible {rec['is_feasible']})")  # fmt: skip
    if "sweep" in report:
        lines.append("split      goodput (req/s)")
        for s in report["sweep"]["splits"]:
            lines.append(f"{s['num_prefill']}P:{s['num_decode']}D{'':<6}{_fmt(s['goodput_rps'])}")
        b = report["sweep"]["best"]
        lines.append(f"best split {b['num_prefill']}P:{b['num_decode']}D")
    return "\n".join(lines)


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tidal sim", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run_from_args(p.parse_args(argv))
