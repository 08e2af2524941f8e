"""The ``tidal`` command line.

``tidal make-model --preset k2-tiny --out DIR`` writes a seeded random checkpoint;
``tidal serve ...`` starts a cluster (``cluster.serve.run_from_args``, imported only when used so
``make-model`` never pays for Ray).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

KV_FORMATS = ("bf16", "fp8", "fp32")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; use 0 or more")
    return value


def _add_make_model(sub: argparse._SubParsersAction) -> None:
    from model.checkpoint import PRESETS

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
    p.add_argument("--kv-format", choices=KV_FORMATS, default="bf16", help="latent KV format")
    p.set_defaults(func=_serve, parser=p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tidal", description="Disaggregated prefill/decode serving for Kimi-K2-class models."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_make_model(sub)
    _add_serve(sub)
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
