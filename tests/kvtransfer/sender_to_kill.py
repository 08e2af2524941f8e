"""Subprocess for test_faults: opens a transfer, sends one layer, then waits to be SIGKILLed."""

from __future__ import annotations

import sys
import time

from kvt_helpers import FAST, fill, make_cache

from kvtransfer import KVLayout, KVSender, export_records

address, fingerprint, request_id = sys.argv[1:4]
cache = make_cache("bf16")
fill(cache, "p", 200)
sender = KVSender(address, fingerprint, FAST)
sender.begin("killed-transfer", request_id, 200, cache.num_layers, KVLayout.of(cache))
sender.send_layer(0, 0, 200, export_records(cache, "p", 0, 0, 200))
sender._wait(lambda: sender._acked > 0, "test: first chunk acknowledged")
print("sent", flush=True)
time.sleep(60)
