"""``tidal serve``: start (or join) Ray, deploy the application, serve until Ctrl-C.

``run_from_args(args)`` takes the CLI's namespace (model, preset, prefill, decode, colocated,
their ranks, the memory-plan keys, address, host, port, kv_format) and any other
``ServeSettings`` key the namespace carries. ``tidal plan``'s check runs first.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from typing import Any

import httpx

from cluster.settings import ServeSettings

log = logging.getLogger(__name__)

APP_NAME = "tidal"


def settings_from_args(args: argparse.Namespace | dict[str, Any]) -> ServeSettings:
    """The ``ServeSettings`` named by a CLI namespace (unset options keep their defaults)."""
    raw = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    known = ServeSettings.model_fields
    values = {k: v for k, v in raw.items() if k in known and v is not None}
    if values.get("colocated"):
        values.pop("prefill", None)
        values.pop("decode", None)
    return ServeSettings(**values)


def start(
    settings: ServeSettings,
    address: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    ready_timeout_s: float = 600.0,
) -> str:
    """Check the memory plan, deploy on Ray (``address=None``: a local Ray) and wait until
    /health says ready. Returns the base URL. Rank counts that do not split the experts, and a
    layout that cannot fit, raise ``PlanError`` before Ray is touched; only when neither
    ``device`` nor ``gpu_mem_gb`` is set is the memory checked after connecting (the cluster's
    GPUs decide the device), still before anything starts."""
    import ray
    from ray import serve

    from cluster.app import build_app_from_config

    settings.check_pools(settings.checkpoint_config())  # rank counts, weight format
    if settings.device is None and settings.gpu_mem_gb is None and not ray.is_initialized():
        connect_ray(address)  # the check needs the device, which the cluster's GPUs decide
    settings.check_memory(settings.resolve_device())
    if not ray.is_initialized():
        connect_ray(address)
    config = settings.to_config()  # generates the preset model if needed
    if config.admin_token_sha256 is None and not config.insecure_admin:
        log.warning(
            "admin routes are off: set %s to a token (or pass --insecure-admin on a trusted "
            "network) to change pools with tidal pools / POST /admin/...",
            settings.admin_token_env,
        )
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app_from_config(config), name=APP_NAME, route_prefix="/")
    url = f"http://{host}:{port}"
    wait_healthy(url, ready_timeout_s)
    return url


def connect_ray(address: str | None) -> None:
    """Join the Ray cluster at ``address``; ``auto`` (or None) joins a running local cluster
    if there is one and otherwise starts a private one for this process."""
    import ray

    if address not in (None, "auto"):
        ray.init(address=address, configure_logging=False)
        return
    try:
        ray.init(address="auto", configure_logging=False)
    except ConnectionError:
        ray.init(include_dashboard=False, configure_logging=False)


def wait_healthy(url: str, timeout_s: float) -> None:
    """Poll ``GET /health`` until the pools are up; raise with the last answer otherwise."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/health", timeout=5.0)
            if r.status_code == 200:
                return
            last = r.text
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.5)
    raise TimeoutError(f"tidal at {url} not ready after {timeout_s:.0f}s: {last}")


def run_from_args(args: argparse.Namespace) -> int:
    """Entry point of ``tidal serve``: deploy, print the URL, block until Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = settings_from_args(args)
    host = getattr(args, "host", None) or "127.0.0.1"
    port = getattr(args, "port", None) or 8000
    url = start(settings, getattr(args, "address", None), host, port)
    pools = (
        f"{settings.colocated} colocated"
        if settings.colocated
        else f"{settings.prefill} prefill + {settings.decode} decode"
    )
    print(f"tidal: serving {settings.model or settings.preset} ({pools}) at {url}/v1", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    from ray import serve

    print("tidal: shutting down", file=sys.stderr, flush=True)
    serve.delete(APP_NAME)
    serve.shutdown()
    return 0
