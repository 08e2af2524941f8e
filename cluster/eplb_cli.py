"""``tidal eplb rebalance [--instance ID]``: one EPLB round on a running tidal, from a shell.

The same round as ``POST /admin/eplb/rebalance`` (and the same admin token, from
``$TIDAL_ADMIN_TOKEN``); prints one line per instance: slots moved, bytes staged, balancedness
before and after on the window, and the longest step while the placement was swapped in.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from cluster.pools_cli import DEFAULT_URL, AdminClient, AdminError


def add_eplb_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eplb",
        help="rebalance the experts of a running tidal's expert-parallel instances (admin API)",
        description="Run one EPLB round now: plan from each instance's expert-load window, "
        "stage the moved experts' weights in the background, swap them in a layer per step.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    r = actions.add_parser("rebalance", help="one round on every expert-parallel instance")
    r.add_argument("--instance", help="only this instance (e.g. i2; see tidal pools show)")
    r.add_argument("--url", default=os.environ.get("TIDAL_URL", DEFAULT_URL), help="tidal URL")
    r.add_argument(
        "--token-env", default="TIDAL_ADMIN_TOKEN", help="variable holding the admin token"
    )
    r.add_argument("--json", action="store_true", help="print the server's JSON answer")
    p.set_defaults(func=run_eplb)


def run_eplb(args: argparse.Namespace) -> int:
    client = AdminClient(args.url, os.environ.get(args.token_env))
    body = {"instance": args.instance} if args.instance else {}
    try:
        answer = client.post("/admin/eplb/rebalance", body)
    except AdminError as e:
        print(f"tidal eplb: error: {e}", file=sys.stderr)
        return 1
    rounds = answer["rebalances"]
    print(json.dumps(answer, indent=2) if args.json else format_rounds(rounds))
    return 1 if any(r["error"] for r in rounds) else 0


def format_rounds(rounds: list[dict[str, Any]]) -> str:
    if not rounds:
        return "no serving expert-parallel instance to rebalance"
    lines = []
    for r in rounds:
        if r["error"]:
            lines.append(f"{r['instance_id']}: failed, the old placement serves: {r['error']}")
            continue
        before, after = r["balancedness_before"], r["balancedness_after"]
        line = (
            f"{r['instance_id']}: moved {r['num_moved_slots']} slots "
            f"({r['bytes_read'] / 1e6:.1f} MB staged) in {r['seconds']:.2f} s; "
            f"balancedness min {min(before, default=1):.3f} -> {min(after, default=1):.3f}"
        )
        if r["step_ratio"] is not None:
            line += (
                f"; longest step {r['longest_step_s'] * 1e3:.1f} ms "
                f"({r['step_ratio']:.2f}x the median before)"
            )
        lines.append(line)
    return "\n".join(lines)
