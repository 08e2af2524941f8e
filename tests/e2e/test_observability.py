"""Observability end to end: a real Prometheus (Debian's ``prometheus``) scraping a running
tidal with deploy/prometheus/prometheus.yml, the planner in auto mode following a replayed ramp,
and every query of every dashboard panel answered with data.

One deployment of 3 ``k2-tiny`` instances (1 prefill + 2 decode), planner ``auto`` with short
windows. The replay: a prompt-heavy phase (long prompts, 2 output tokens; half share a prefix)
until the planner moves a decode instance to prefill, then a decode-heavy phase (short prompts,
48 output tokens) until it moves one back. Every request must succeed (no request lost), and
each phase change may cost at most one move. Then each panel query of deploy/grafana/ is run
through Prometheus's HTTP API: each returns a finite value, and the ratio panel's "actual"
series equals the serving pool sizes. The dashboard's "Add prefill or add decode?" values over
the replay are printed (``-s`` shows them) and written to ``$TIDAL_OBS_OUT`` when set.

Skipped when the ``prometheus`` binary is absent (.ci/run installs it). Ray's agent exports
about every 10 s, so everything polls.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from cluster import dashboards
from cluster.cli import main
from tests.e2e.conftest import (
    ADMIN,
    ADMIN_TOKEN,
    MODEL_NAME,
    deployed,
    make_prompt,
    pools,
    wait_for,
)

APP = "obs"
PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary (apt install)")
REPO = Path(__file__).resolve().parents[2]
SHARED_PREFIX = make_prompt(640, 77)  # 10 pages: prefix-cache hits for half the long prompts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """A real Prometheus with deploy/prometheus/prometheus.yml; only the file_sd target list
    is the test's own (loopback addresses of the Ray nodes' metrics ports) and the scrape
    interval is shorter."""

    def __init__(self, workdir: Path) -> None:
        import ray

        config = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
        targets = sorted(
            f"127.0.0.1:{n['MetricsExportPort']}"
            for n in ray.nodes()
            if n.get("Alive") and n.get("MetricsExportPort")
        )
        sd = workdir / "ray_targets.json"
        sd.write_text(json.dumps([{"targets": targets, "labels": {}}]))
        config["global"]["scrape_interval"] = "2s"
        config["global"]["evaluation_interval"] = "2s"
        (job,) = config["scrape_configs"]
        job["file_sd_configs"] = [{"files": [str(sd)], "refresh_interval": "5s"}]
        path = workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.log = (workdir / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={path}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_for(self._is_ready, timeout_s=60, interval_s=0.5, what="prometheus ready")

    def _is_ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        expr = expr.replace("$__rate_interval", "1m")
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=30)
        r.raise_for_status()
        return r.json()["data"]["result"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def url(serve_url, tiny_model_dir):
    settings = {
        "prefill": 1,
        "decode": 2,
        "max_batch_size": 4,
        "ttft_slo_s": 60.0,  # a shared 2-core box: admission must not turn the replay into 429s
        "planner": "auto",
        "planner_window_s": 4.0,
        "planner_cooldown_s": 8.0,
        "planner_confirm_rounds": 2,
        "planner_hysteresis": 0.05,
        "planner_warmup_s": 4.0,
    }
    with deployed(serve_url, tiny_model_dir, APP, **settings) as u:
        yield u


@pytest.fixture(scope="module")
def prometheus(url, tmp_path_factory):
    prom = Prometheus(tmp_path_factory.mktemp("prometheus"))
    yield prom
    prom.stop()


def _complete(url: str, prompt: list[int], max_tokens: int) -> int:
    r = httpx.post(
        f"{url}/v1/completions",
        json={
            "model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True,
        },
        timeout=180,
    )  # fmt: skip
    assert r.status_code == 200, r.text
    return len(r.json()["choices"][0]["token_ids"])


class Load:
    """Closed-loop clients sending one phase's requests until stopped; every failure kept."""

    def __init__(self, url: str, num_clients: int, make: Any) -> None:
        self.failures: list[str] = []
        self.num_done = 0
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(url, k, make), daemon=True)
            for k in range(num_clients)
        ]
        for t in self._threads:
            t.start()

    def _run(self, url: str, k: int, make: Any) -> None:
        i = 0
        while not self._stop.is_set():
            prompt, max_tokens = make(k, i)
            try:
                n = _complete(url, prompt, max_tokens)
                if n != max_tokens:
                    self.failures.append(f"{n} tokens instead of {max_tokens}")
                self.num_done += 1
            except Exception as e:  # noqa: BLE001 - every failure is a lost request
                self.failures.append(repr(e))
            i += 1

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=240)


def prompt_heavy(k: int, i: int) -> tuple[list[int], int]:
    tail = make_prompt(900, 1000 * k + i)
    return (SHARED_PREFIX + tail if i % 2 else make_prompt(1500, 5000 + 1000 * k + i)), 2


def decode_heavy(k: int, i: int) -> tuple[list[int], int]:
    return make_prompt(20, 9000 + 1000 * k + i), 48


def _split(url: str) -> tuple[int, int]:
    serving = [i["role"] for i in pools(url)["instances"] if i["state"] == "serving"]
    return serving.count("prefill"), serving.count("decode")


ADD_WHICH = dashboards.ADD_WHICH.queries[0].expr


def test_admin_routes_need_the_token_and_tidal_pools_sends_it(url, monkeypatch, capsys):
    assert httpx.get(f"{url}/admin/pools", timeout=30).status_code == 401
    bad = {"Authorization": "Bearer nope"}
    assert httpx.post(f"{url}/admin/pools", json={"prefill": 5}, headers=bad).status_code == 401
    assert httpx.get(f"{url}/admin/pools", headers=ADMIN, timeout=30).status_code == 200
    assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 200  # user routes: no token
    monkeypatch.setenv("TIDAL_ADMIN_TOKEN", ADMIN_TOKEN)
    assert main(["pools", "--url", url, "show"]) == 0
    out = capsys.readouterr().out
    assert "planner: auto" in out and out.count(" serving ") == 3
    monkeypatch.delenv("TIDAL_ADMIN_TOKEN")
    assert main(["pools", "--url", url, "planner"]) == 1  # no token: the server's 401


def test_replay_pools_follow_the_phases_and_every_panel_has_data(url, prometheus, capsys):
    observed: list[dict[str, Any]] = []

    def watch(phase: str) -> None:
        rows = prometheus.query(ADD_WHICH)
        value = float(rows[0]["value"][1]) if rows else None
        observed.append({"t": round(time.monotonic() - t0, 1), "phase": phase,
                         "add_prefill_minus_serving": value, "split": _split(url)})  # fmt: skip

    def moves() -> dict[str, float]:
        rows = prometheus.query('sum by (source) (ray_tidal_pool_changes_total{kind="move"})')
        return {r["metric"]["source"]: float(r["value"][1]) for r in rows}

    # Earlier modules' pool managers (same Ray cluster) may still export their counters: count
    # this replay's moves as the increase from here, once Prometheus has scraped the agents.
    wait_for(
        lambda: prometheus.query('sum(ray_tidal_pool_changes_total{kind="grow"})'),
        timeout_s=60,
        interval_s=1.0,
        what="a first scrape of the pool manager's counters",
    )
    moves_before = moves()
    t0 = time.monotonic()
    assert _split(url) == (1, 2)
    splits: list[tuple[int, int]] = [(1, 2)]
    # ---- phase 1: prompt-heavy until the planner moves a decode instance to prefill
    load = Load(url, 3, prompt_heavy)
    try:
        deadline = time.monotonic() + 240
        while _split(url) != (2, 1) and time.monotonic() < deadline:
            watch("prompt-heavy")
            time.sleep(2.0)
        watch("prompt-heavy")
        splits.append(_split(url))
        time.sleep(10)  # the planner keeps 2P+1D while the phase lasts
        watch("prompt-heavy")
        splits.append(_split(url))
    finally:
        load.stop()
    assert splits[1:] == [(2, 1), (2, 1)], observed
    assert load.failures == [], load.failures[:3]
    # ---- phase 2: decode-heavy until it moves one back
    load = Load(url, 4, decode_heavy)
    try:
        deadline = time.monotonic() + 240
        while _split(url) != (1, 2) and time.monotonic() < deadline:
            watch("decode-heavy")
            time.sleep(2.0)
        watch("decode-heavy")
        splits.append(_split(url))
        time.sleep(10)
        watch("decode-heavy")
        splits.append(_split(url))
        # one over-long request: an admission reject the rejects panel must show
        r = httpx.post(
            f"{url}/v1/completions",
            json={"model": MODEL_NAME, "prompt": [1, 2, 3], "max_tokens": 10**7},
            timeout=60,
        )
        assert r.status_code == 400, r.text
        results = _evaluate_panels(url, prometheus)
    finally:
        load.stop()
    assert splits[3:] == [(1, 2), (1, 2)], observed
    assert load.failures == [], load.failures[:3]
    moved = {s: n - moves_before.get(s, 0.0) for s, n in moves().items()}
    moved = {s: n for s, n in moved.items() if n > 0}
    assert moved == {"planner": 2.0}, moved  # one move per phase change, both by the planner
    report = {"add_which": observed, "panels": results}
    if os.environ.get("TIDAL_OBS_OUT"):
        Path(os.environ["TIDAL_OBS_OUT"]).write_text(json.dumps(report, indent=2))
    with capsys.disabled():
        print("\n'Add prefill or add decode?' (recommended prefill - serving prefill):")
        for row in observed:
            print(f"  t={row['t']:6.1f}s {row['phase']:13s} value={row['add_prefill_minus_serving']}"
                  f" split={row['split']}")  # fmt: skip


def _evaluate_panels(url: str, prometheus: Prometheus) -> dict[str, Any]:
    """Every query of every panel of every dashboard returns a finite value (polled: Ray
    exports every ~10 s, Prometheus scrapes every 2 s); the ratio panel's actual series is the
    serving split. Annotation queries run too; the pool-change one must fire."""
    queries = []
    for name in dashboards.DASHBOARDS:
        board = json.loads((dashboards.OUT_DIR / name).read_text())
        queries += [(name, title, expr) for title, expr in dashboards.panel_queries(board)]
        annotations = {a["name"]: a["expr"] for a in board["annotations"]["list"]}
    missing: dict[str, str] = {}
    results: dict[str, Any] = {}

    def has_data(expr: str) -> list[dict[str, Any]]:
        rows = prometheus.query(expr)
        return [r for r in rows if math.isfinite(float(r["value"][1]))]

    deadline = time.monotonic() + 120
    pending = list(queries)
    while pending and time.monotonic() < deadline:
        still = []
        for name, title, expr in pending:
            rows = has_data(expr)
            if rows:
                results[f"{title} | {expr}"] = [(r["metric"], r["value"][1]) for r in rows]
            else:
                still.append((name, title, expr))
        pending = still
        if pending:
            time.sleep(3)
    missing = {f"{name}: {title}": expr for name, title, expr in pending}
    assert not missing, f"panels without data: {json.dumps(missing, indent=1)}"
    # the ratio panel shows the actual pool sizes
    num_p, num_d = _split(url)
    ratio = dashboards.ROWS[2][1][1].queries[1].expr

    def ratio_is_actual() -> bool:
        (row,) = prometheus.query(ratio)
        serving = {
            r["metric"]["role"]: float(r["value"][1])
            for r in prometheus.query('sum by (role) (ray_tidal_instances{state="serving"})')
        }
        return float(row["value"][1]) == pytest.approx(num_p / (num_p + num_d)) and serving == {
            "prefill": num_p, "decode": num_d, "mixed": 0.0
        }  # fmt: skip

    wait_for(ratio_is_actual, timeout_s=60, interval_s=2, what="the ratio panel at the split")
    assert prometheus.query(annotations["Pool changes"].replace("[1m]", "[15m]"))
    return results
