"""``tidal pools show|set|move|planner``: the admin HTTP API of a running tidal from a shell.

Talks to ``--url`` (default ``$TIDAL_URL`` or http://127.0.0.1:8000) with the bearer token from
``$TIDAL_ADMIN_TOKEN`` (or the variable ``--token-env`` names). Standard library only (urllib),
so the command stays light. ``AdminClient`` is the programmatic form.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"


class AdminError(Exception):
    """The server refused or could not be reached; the message says what it answered."""


class AdminClient:
    """GET/POST the admin routes of one tidal deployment."""

    def __init__(self, url: str, token: str | None, timeout_s: float = 600.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    def get(self, path: str) -> dict[str, Any]:
        return self._call("GET", path, None)

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", path, body)

    def _call(self, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = e.reason
            raise AdminError(f"{method} {path}: {e.code} {message}") from None
        except urllib.error.URLError as e:
            raise AdminError(f"cannot reach tidal at {self.url}: {e.reason}") from None


def add_pools_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pools",
        help="show or change the pools of a running tidal (admin API)",
        description="Pool sizes, live role moves and the P:D planner's mode of a running tidal, "
        "through its admin HTTP API (token from $TIDAL_ADMIN_TOKEN).",
    )
    p.add_argument("--url", default=os.environ.get("TIDAL_URL", DEFAULT_URL), help="tidal URL")
    p.add_argument(
        "--token-env", default="TIDAL_ADMIN_TOKEN", help="variable holding the admin token"
    )
    p.add_argument("--json", action="store_true", help="print the server's JSON answer")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("show", help="instances, targets and the planner's recommendation")
    s = actions.add_parser("set", help="set pool sizes, e.g. tidal pools set --prefill 2")
    s.add_argument("--prefill", type=int, help="prefill instances")
    s.add_argument("--decode", type=int, help="decode instances")
    s.add_argument("--mixed", type=int, help="mixed (colocated) instances")
    m = actions.add_parser("move", help="move an instance to another pool (no weight reload)")
    m.add_argument("instance", help="instance id, e.g. i2 (see tidal pools show)")
    m.add_argument("role", choices=("prefill", "decode", "mixed"))
    pl = actions.add_parser("planner", help="show or set the planner's mode")
    pl.add_argument("mode", nargs="?", choices=("auto", "manual"), help="omit to show it")
    p.set_defaults(func=run_pools, parser=p)


def run_pools(args: argparse.Namespace) -> int:
    client = AdminClient(args.url, os.environ.get(args.token_env))
    try:
        answer = _act(client, args)
    except AdminError as e:
        print(f"tidal pools: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(answer, indent=2))
    elif args.action == "planner":
        print(format_planner(answer))
    else:
        print(format_pools(answer))
    return 0


def _act(client: AdminClient, args: argparse.Namespace) -> dict[str, Any]:
    if args.action == "show":
        return client.get("/admin/pools")
    if args.action == "set":
        sizes = {r: getattr(args, r) for r in ("prefill", "decode", "mixed")}
        sizes = {r: n for r, n in sizes.items() if n is not None}
        if not sizes:
            args.parser.error("tidal pools set: give --prefill N, --decode N and/or --mixed N")
        return client.post("/admin/pools", sizes)
    if args.action == "move":
        return client.post("/admin/move", {"instance": args.instance, "role": args.role})
    if args.mode is None:
        return client.get("/admin/planner")
    return client.post("/admin/planner", {"mode": args.mode})


def format_pools(snap: dict[str, Any]) -> str:
    """``GET /admin/pools`` as a table: instances, then targets and the planner."""
    rows = [("instance", "role", "state", "ranks", "pages used/free", "running", "queued")]
    for inst in snap["instances"]:
        s = inst.get("stats") or {}
        pages = f"{s.get('num_used_pages', '-')}/{s.get('num_free_pages', '-')}"
        rows.append(
            (
                inst["instance_id"],
                inst["role"],
                inst["state"],
                str(inst["num_ranks"]),
                pages,
                str(s.get("num_running", "-")),
                str(s.get("num_queued", "-")),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    targets = ", ".join(f"{role} {n}" for role, n in snap["targets"].items() if n)
    lines.append(f"targets: {targets}")
    if "planner" in snap:
        lines.append(format_planner(snap["planner"], snap.get("recommendation")))
    if snap.get("last_error"):
        lines.append(f"last error: {snap['last_error']}")
    return "\n".join(lines)


def format_planner(state: dict[str, Any], rec: dict[str, Any] | None = None) -> str:
    line = f"planner: {state['mode']}"
    if rec is not None:
        line += (
            f"; recommends {rec['num_prefill']}P:{rec['num_decode']}D ({rec['why']}, "
            f"utilisation P {rec['prefill_utilization']:.2f} D {rec['decode_utilization']:.2f})"
        )
    decision = state.get("decision")
    if decision:
        line += f"; last round: {decision['action']} ({decision['reason']})"
    return line
