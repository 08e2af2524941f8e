"""Admin API security (bearer token by digest, off without one unless insecure) and the
``tidal pools`` command against a stand-in server speaking the admin routes."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from cluster.admin_auth import admin_refusal
from cluster.cli import main
from cluster.config import ClusterConfig, EngineSpec
from cluster.settings import ServeSettings

TOKEN = "s3cret"


def _config(monkeypatch, token: str | None, insecure: bool = False) -> ClusterConfig:
    if token is None:
        monkeypatch.delenv("TIDAL_ADMIN_TOKEN", raising=False)
    else:
        monkeypatch.setenv("TIDAL_ADMIN_TOKEN", token)
    digest = ServeSettings(insecure_admin=insecure).admin_token_sha256()
    return ClusterConfig(EngineSpec("/m"), admin_token_sha256=digest, insecure_admin=insecure)


def test_the_token_is_required_and_only_its_digest_is_kept(monkeypatch):
    config = _config(monkeypatch, TOKEN)
    assert TOKEN not in repr(config) and config.admin_token_sha256 != TOKEN
    assert admin_refusal(config, f"Bearer {TOKEN}") is None
    assert admin_refusal(config, f"bearer {TOKEN}") is None
    for bad in (None, "", "Bearer", "Bearer wrong", f"Basic {TOKEN}", TOKEN):
        refusal = admin_refusal(config, bad)
        assert refusal is not None and refusal.status == 401, bad
        assert refusal.headers() == {"WWW-Authenticate": "Bearer"}


def test_no_token_turns_admin_off_unless_insecure(monkeypatch):
    off = admin_refusal(_config(monkeypatch, None), f"Bearer {TOKEN}")
    assert off is not None and off.status == 403 and "insecure-admin" in off.message
    assert admin_refusal(_config(monkeypatch, None, insecure=True), None) is None


class _Admin(BaseHTTPRequestHandler):
    """Answers like the ingress's admin routes; records what it was sent."""

    seen: list[tuple[str, str, dict | None, str | None]] = []
    snapshot = {
        "targets": {"prefill": 1, "decode": 2, "mixed": 0},
        "instances": [
            {
                "instance_id": "i0",
                "role": "prefill",
                "state": "serving",
                "num_ranks": 1,
                "stats": {
                    "num_used_pages": 3,
                    "num_free_pages": 61,
                    "num_running": 0,
                    "num_queued": 1,
                },
            },
        ],  # fmt: skip
        "recommendation": {
            "num_prefill": 2,
            "num_decode": 1,
            "why": "prefill_bound",
            "prefill_utilization": 0.8,
            "decode_utilization": 0.1,
        },  # fmt: skip
        "planner": {"mode": "manual", "decision": {"action": "manual", "reason": "one"}},
        "last_error": None,
    }

    def _answer(self, body: dict | None) -> None:
        auth = self.headers.get("Authorization")
        _Admin.seen.append((self.command, self.path, body, auth))
        status, answer = 200, self.snapshot
        if auth != f"Bearer {TOKEN}":
            status, answer = 401, {"error": {"message": "admin routes need a token"}}
        elif self.path == "/admin/planner":
            answer = {"mode": (body or {}).get("mode", "manual"), "decision": None}
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._answer(None)

    def do_POST(self) -> None:  # noqa: N802
        n = int(self.headers.get("Content-Length", 0))
        self._answer(json.loads(self.rfile.read(n)))

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def server():
    httpd = HTTPServer(("127.0.0.1", 0), _Admin)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    _Admin.seen.clear()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()


def test_pools_commands_send_the_token_and_the_right_calls(server, monkeypatch, capsys):
    monkeypatch.setenv("TIDAL_ADMIN_TOKEN", TOKEN)
    base = ["pools", "--url", server]
    assert main([*base, "show"]) == 0
    out = capsys.readouterr().out
    assert "i0" in out and "recommends 2P:1D (prefill_bound" in out and "planner: manual" in out
    assert main([*base, "set", "--prefill", "2"]) == 0
    assert main([*base, "move", "i0", "decode"]) == 0
    assert main([*base, "planner", "auto"]) == 0
    assert "planner: auto" in capsys.readouterr().out
    assert main([*base, "planner"]) == 0
    calls = [(m, p, b) for m, p, b, _ in _Admin.seen]
    assert calls == [
        ("GET", "/admin/pools", None),
        ("POST", "/admin/pools", {"prefill": 2}),
        ("POST", "/admin/move", {"instance": "i0", "role": "decode"}),
        ("POST", "/admin/planner", {"mode": "auto"}),
        ("GET", "/admin/planner", None),
    ]
    assert {a for *_, a in _Admin.seen} == {f"Bearer {TOKEN}"}


def test_pools_without_the_token_fails_with_the_server_message(server, monkeypatch, capsys):
    monkeypatch.delenv("TIDAL_ADMIN_TOKEN", raising=False)
    assert main(["pools", "--url", server, "show"]) == 1
    assert "401 admin routes need a token" in capsys.readouterr().err
