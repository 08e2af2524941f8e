"""The ``tidal`` command line.

``tidal make-model --preset k2-tiny --out DIR`` writes a seeded random checkpoint;
``tidal serve ...`` starts a cluster (``cluster.serve.run_from_args``, imported only when used so
``make-model`` never pays for Ray); ``tidal plan ...`` sizes weights and KV per rank for a layout
(``cluster.memory_plan``, no torch or Ray) and exits 2 when the layout cannot fit;
``tidal pools show|set|move|planner`` talks to a running tidal's admin API
(``cluster.pools_cli``); ``tidal eplb rebalance`` runs one EPLB round (``cluster.eplb_cli``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from cluster.eplb_cli import add_eplb_parser
from cluster.pools_cli import add_pools_parser

if TYPE_CHECKING:
    from cluster.memory_plan import RoleLayout

KV_FORMATS = ("auto", "bf16", "fp8", "fp32")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; use 0 or more")
    return value


def _add_make_model(sub: argparse._SubParsersAction) -> None:
    from model.presets import PRESETS

    p = sub.add_parser(
        "make-model",
        help="write a seeded random checkpoint in the HF Kimi-K2 / DeepSeek-V3 layout",
        description="Write config.json, tokenizer files and sharded safetensors weights.",
    )
    p.add_argument("--preset", required=True, choices=sorted(PRESETS), help="model size")
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--fp8", action="store_true", help="store linear layers as block-FP8 (e4m3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--single-file", action="store_true", help="one model.safetensors instead of shards"
    )
    p.set_defaults(func=_make_model)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from cluster import memory_plan as mp

    p = sub.add_parser(
        "serve",
        help="serve a model with an OpenAI-compatible HTTP API on Ray",
        description="Start prefill and decode pools (or a colocated pool) and the HTTP ingress.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="model directory (HF layout)")
    src.add_argument("--preset", help="generate a random checkpoint of this preset and serve it")
    p.add_argument("--prefill", type=_positive_int, help="number of prefill instances")
    p.add_argument("--decode", type=_positive_int, help="number of decode instances")
    p.add_argument("--colocated", type=_positive_int, help="number of mixed (colocated) instances")
    p.add_argument("--address", default="auto", help="Ray cluster address (default auto)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument(
        "--num-ingress-replicas", type=_positive_int, help="HTTP ingress replicas (default 1)"
    )
    p.add_argument(
        "--kv-format",
        choices=KV_FORMATS,
        default="auto",
        help="latent KV cache format (default auto: the model dtype)",
    )
    p.add_argument("--dtype", choices=tuple(mp.DTYPE_BYTES), help="model dtype (default float32)")
    p.add_argument(
        "--weight-format",
        choices=mp.WEIGHT_FORMATS,
        help="block-FP8 linears in memory (default auto: an FP8 checkpoint stays FP8)",
    )
    ep = p.add_argument_group("expert-parallel instances and the memory plan")
    ep.add_argument("--prefill-ranks", type=int, help="ranks (GPUs) per prefill instance")
    ep.add_argument("--decode-ranks", type=int, help="ranks (GPUs) per decode instance")
    ep.add_argument("--colocated-ranks", type=int, help="ranks (GPUs) per mixed instance")
    ep.add_argument("--ranks-per-node", type=int, help="GPUs per node (default 8)")
    ep.add_argument(
        "--gpu-mem-gb",
        type=float,
        help="GPU memory per rank for the plan check (default: measured on cuda, none on cpu)",
    )
    ep.add_argument("--reserve-gb", type=float, help="activations per rank (default 10%% of GPU)")
    ep.add_argument(
        "--redundant-experts", type=_positive_int, help="EPLB expert slots per rank (planned)"
    )
    adm = p.add_argument_group("the admin API and the P:D planner")
    adm.add_argument(
        "--insecure-admin",
        action="store_true",
        default=None,
        help="serve the admin routes without a token (default: they need $TIDAL_ADMIN_TOKEN "
        "and are off without it)",
    )
    adm.add_argument(
        "--planner",
        choices=("manual", "auto"),
        help="auto applies the planner's P:D split through role moves (default manual)",
    )
    p.set_defaults(func=_serve, parser=p)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    from cluster import memory_plan as mp

    p = sub.add_parser(
        "plan",
        help="memory per rank (weights, KV, longest context) for a layout; exit 2 if it cannot fit",
        description="Size one rank of each role: weights (replicated part + its share of the "
        "routed experts + redundant slots), the KV cache left, and the longest context. "
        "Sizes in GB (10^9 bytes).",
    )
    p.add_argument("--model", required=True, help="model directory or its config.json")
    p.add_argument("--gpu-mem-gb", type=float, required=True, help="memory per GPU (H200: 141)")
    p.add_argument("--ranks-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--prefill-ranks", type=int, help="ranks (GPUs) per prefill instance")
    p.add_argument("--decode-ranks", type=int, help="ranks (GPUs) per decode instance")
    p.add_argument("--colocated-ranks", type=int, help="ranks per mixed instance (instead of P/D)")
    p.add_argument(
        "--weight-format",
        choices=mp.WEIGHT_FORMATS,
        default="auto",
        help="block-FP8 linears in memory, as Engine.load (default auto: FP8 if the checkpoint "
        "is block-FP8; dequantize: the model dtype)",
    )
    p.add_argument(
        "--dtype",
        choices=tuple(mp.DTYPE_BYTES),
        default="bfloat16",
        help="model dtype: embeddings, norms, kv_b and dequantised linears (default bfloat16)",
    )
    p.add_argument(
        "--kv-format", choices=mp.KV_FORMATS, default="bf16", help="KV cache format (default bf16)"
    )
    p.add_argument(
        "--redundant-experts",
        type=_positive_int,
        default=0,
        help="extra EPLB expert slots per rank per MoE layer (default 0)",
    )
    p.add_argument(
        "--reserve-gb",
        type=float,
        help=f"activations/workspace per rank (default {mp.DEFAULT_RESERVE_FRACTION:.0%}% of GPU)",
    )
    p.add_argument(
        "--require-context",
        type=int,
        metavar="TOKENS",
        help="refuse unless every rank can hold one context of this many tokens",
    )
    p.set_defaults(func=_plan, parser=p)


def _add_sim(sub: argparse._SubParsersAction) -> None:
    from scheduler.sim.run import add_arguments

    p = sub.add_parser(
        "sim",
        help="replay a trace on a simulated cluster (the real scheduler, simulated instances)",
        description="Discrete-event simulation of a tidal cluster from a cost profile; writes "
        "DIR/report.json and PNG plots (scheduler/sim, no torch or Ray).",
    )
    add_arguments(p)
    p.set_defaults(func=_sim)


def _sim(args: argparse.Namespace) -> int:
    from scheduler.sim.run import run_from_args

    return run_from_args(args)


def _add_profile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile",
        help="measure a simulator cost profile (k2-tiny, the real engine, this machine)",
        description="Time prefill and decode of the real Engine on k2-tiny and write a profile "
        "for tidal sim (runs bench/sim_fidelity.py --profile-only; needs a source checkout).",
    )
    p.add_argument("--out", required=True, help="profile JSON to write")
    p.add_argument("--quick", action="store_true", help="fewer timing repetitions")
    p.set_defaults(func=_profile)


def _profile(args: argparse.Namespace) -> int:
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "sim_fidelity.py"
    if not script.is_file():
        print(f"tidal profile needs a source checkout: {script} not found", file=sys.stderr)
        return 2
    cmd = [sys.executable, str(script), "--profile-only", "--profile-out", args.out]
    return subprocess.call(cmd + (["--quick"] if args.quick else []))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tidal", description="Disaggregated prefill/decode serving for Kimi-K2-class models."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_make_model(sub)
    _add_serve(sub)
    _add_plan(sub)
    _add_sim(sub)
    _add_profile(sub)
    add_pools_parser(sub)
    add_eplb_parser(sub)
    return parser


def _make_model(args: argparse.Namespace) -> int:
    from model.checkpoint import make_model

    start = time.perf_counter()
    out = make_model(
        args.preset, args.out, fp8=args.fp8, seed=args.seed, sharded=not args.single_file
    )
    kind = "block-FP8" if args.fp8 else "bf16"
    took = time.perf_counter() - start
    print(f"wrote {args.preset} ({kind}, seed {args.seed}) to {out} in {took:.1f}s")
    return 0


def _serve(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.parser
    if args.model is None and args.preset is None:
        parser.error("give --model DIR or --preset NAME")
    if args.colocated is not None and (args.prefill is not None or args.decode is not None):
        parser.error(
            "--colocated N runs mixed instances; do not combine it with --prefill/--decode"
        )
    if (args.prefill is None) != (args.decode is None):
        parser.error("disaggregated serving needs both --prefill N and --decode M")
    try:
        from cluster.serve import run_from_args
    except ImportError as e:
        print(
            f"tidal serve is unavailable: cluster.serve could not be imported ({e})",
            file=sys.stderr,
        )
        return 2
    result = run_from_args(args)
    return int(result or 0)


def _plan_layouts(args: argparse.Namespace) -> list[RoleLayout]:
    from cluster.memory_plan import RoleLayout

    parser: argparse.ArgumentParser = args.parser
    ranks = {"prefill": args.prefill_ranks, "decode": args.decode_ranks}
    given = {role: n for role, n in ranks.items() if n is not None}
    if args.colocated_ranks is not None:
        if given:
            parser.error("--colocated-ranks plans mixed instances; drop --prefill/--decode-ranks")
        return [RoleLayout("mixed", args.colocated_ranks)]
    if not given:
        parser.error("give --prefill-ranks R and/or --decode-ranks R (or --colocated-ranks R)")
    return [RoleLayout(role, n) for role, n in given.items()]


def _plan(args: argparse.Namespace) -> int:
    from cluster.memory_plan import Hardware, PlanOptions, load_config, plan_cluster

    config = load_config(args.model)
    options = PlanOptions(
        weight_format=args.weight_format,
        dtype=args.dtype,
        kv_format=args.kv_format,
        num_redundant_experts=args.redundant_experts,
        require_context_len=args.require_context,
    )
    hardware = Hardware(args.gpu_mem_gb, args.ranks_per_node, args.reserve_gb)
    print(plan_cluster(config, _plan_layouts(args), hardware, options).table())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tidal`` console script; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # user input a component rejected (bad preset, bad model dir)
        print(f"tidal {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
