"""Fixtures of the kvtransfer tests: a model config, a live receiver on loopback, a sender."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# pytest runs with --import-mode=importlib, which leaves sys.path alone: make this folder's
# helper modules (kvt_helpers, kvt_proxy; uniquely named) importable by the test modules
sys.path.insert(0, str(Path(__file__).parent))
from kvt_helpers import FAST, make_cache, make_config  # noqa: E402

from kvtransfer import KVReceiver, KVSender, model_fingerprint  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.kv_cache import PagedLatentCache  # noqa: E402


@pytest.fixture
def config() -> ModelConfig:
    return make_config()


@pytest.fixture
def receiver(config: ModelConfig):
    """A bf16 decode cache behind a live gRPC receiver on 127.0.0.1:<ephemeral>."""
    cache = make_cache("bf16")
    rx = KVReceiver(cache, model_fingerprint(config, "bf16"), config=FAST).start()
    yield rx
    rx.stop()


@pytest.fixture
def source(config: ModelConfig) -> PagedLatentCache:
    return make_cache("bf16")


@pytest.fixture
def sender(receiver: KVReceiver, config: ModelConfig):
    s = KVSender(receiver.address, model_fingerprint(config, "bf16"), FAST)
    yield s
    s.close()
