"""KV transfer benchmark: loopback throughput vs memcpy, bf16 vs FP8, and streaming overlap.

    python bench/kvtransfer.py [--quick] --json PATH

The receiver runs in a child process (as a decode worker would), the sender in this one; both
speak real gRPC over 127.0.0.1. Parts:

1. throughput: 64 MB and 1 GB of K2-sized latent KV (61 layers x 576 values/token), bf16 and
   fp8 on the wire, beside a torch memcpy of the same bytes in the same run. ``served`` is the
   path a request takes: ``KVOutbox`` (the prefill stage's own sending code: pooled channel,
   records exported from scattered pages run by run inside the timing); ``bf16`` and ``fp8``
   are the transfer protocol alone (``KVSender`` fed records exported before the clock starts),
   the baseline ``served`` is held to (served_path_gbps >= 0.9 x loopback_gbps);
2. overlap (synthetic): a producer emits one layer of a 16K-token K2 latent every t ms, t = one
   layer's transfer time; exposed time = last layer produced -> receiver holds all, verified;
   streamed layer by layer vs sent after the last layer;
3. overlap with the real k2-small prefill (model.Engine), if the engine is available.
Prints a table and writes JSON (keys in the module's ``main``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvtransfer import (  # noqa: E402
    KVLayout,
    KVOutbox,
    KVReceiver,
    KVSender,
    TransferConfig,
    accepted_fingerprints,
    export_records,
    model_fingerprint,
)
from model.checkpoint import make_model  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.engine import Engine  # noqa: E402
from model.kv_cache import PagedLatentCache, bytes_per_token  # noqa: E402

K2_LAYERS, K2_RANK, K2_ROPE, PAGE = 61, 512, 64, 64
MB = 1e6
# deadlines out of the way: a CPU prefill of 16K tokens paces its stream for minutes
BENCH_CONFIG = TransferConfig(idle_timeout_s=60.0, progress_lease_s=3600.0, lease_s=3600.0)


def k2_config(num_layers: int = K2_LAYERS) -> ModelConfig:
    """Kimi-K2's numbers (only the KV-relevant ones matter for the fingerprint)."""
    return ModelConfig.from_dict(
        {
            "model_type": "kimi_k2",
            "vocab_size": 163840,
            "hidden_size": 7168,
            "intermediate_size": 18432,
            "moe_intermediate_size": 2048,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 64,
            "q_lora_rank": 1536,
            "kv_lora_rank": K2_RANK,
            "qk_nope_head_dim": 128,
            "qk_rope_head_dim": K2_ROPE,
            "v_head_dim": 128,
            "n_routed_experts": 384,
            "num_experts_per_tok": 8,
            "max_position_embeddings": 262144,
        }
    )


# ---- the receiver process ---------------------------------------------------------------------
def serve_receiver(fmt: str, num_layers: int, max_tokens: int, model_dir: str = "") -> None:
    """Child process: a decode-side receiver driven by lines on stdin (reserve/wait/cpu/quit).
    Fingerprints the K2 numbers, or the model in ``model_dir``."""
    torch.set_num_threads(1)
    cfg = ModelConfig.from_json(model_dir) if model_dir else k2_config(num_layers)
    pages = -(-max_tokens // PAGE)
    cache = PagedLatentCache(num_layers, cfg.kv_lora_rank, cfg.qk_rope_head_dim, pages, PAGE, fmt)
    for p in cache.pages:
        p.zero_()  # touch the pool: a serving decode cache is resident, not freshly mapped
    rx = KVReceiver(
        cache,
        model_fingerprint(cfg, fmt),
        config=BENCH_CONFIG,
        wire_fingerprints=accepted_fingerprints(cfg, ["bf16", "fp8"]),
    ).start()
    print(rx.address, flush=True)
    reservations = {}
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "reserve":
            reservations[args[0]] = rx.reserve(args[0], int(args[1]))
        elif cmd == "wait":
            r = reservations.pop(args[0]).wait(600)
            print(f"seconds {r.seconds}", flush=True)
            cache.allocator.free(args[0])
            continue
        elif cmd == "cpu":
            t = os.times()
            print(f"{t.user + t.system}", flush=True)
            continue
        elif cmd == "quit":
            break
        print("ok", flush=True)
    rx.stop()


class ReceiverProcess:
    """Handle on the child receiver."""

    def __init__(self, fmt: str, num_layers: int, max_tokens: int, model_dir: str = "") -> None:
        args = [fmt, str(num_layers), str(max_tokens)] + ([model_dir] if model_dir else [])
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve-receiver", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.address = self._line()

    def _line(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("receiver process died")
        return line.strip()

    def call(self, *words: object) -> str:
        self.proc.stdin.write(" ".join(map(str, words)) + "\n")
        self.proc.stdin.flush()
        return self._line()

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(30)
        except Exception:
            self.proc.kill()


# ---- helpers ----------------------------------------------------------------------------------
def source_cache(
    num_layers: int, num_tokens: int, fmt: str = "bf16", seq_id: str = "src"
) -> PagedLatentCache:
    """A prefill cache (bf16 or fp8) holding random latent KV for one sequence whose pages are
    scattered, as in a serving cache where sequences come and go: every other page."""
    num_pages = -(-num_tokens // PAGE)
    cache = PagedLatentCache(num_layers, K2_RANK, K2_ROPE, 2 * num_pages, PAGE, fmt)
    for i in range(num_pages):
        cache.allocator.allocate(("hole", i), PAGE)
        cache.allocator.allocate(("pad", i), PAGE)
    for i in range(num_pages):
        cache.allocator.free(("hole", i))
    cache.allocator.allocate(seq_id, num_tokens)
    g = torch.Generator().manual_seed(0)
    for layer in range(num_layers):
        c_kv = torch.randn(num_tokens, K2_RANK, generator=g)
        k_pe = torch.randn(num_tokens, K2_ROPE, generator=g)
        cache.write(seq_id, layer, 0, c_kv, k_pe)
    return cache


def memcpy_gbps(nbytes: int) -> float:
    """torch copy of ``nbytes`` between resident buffers (the transfer's ceiling)."""
    a = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    b = torch.empty_like(a)
    b.copy_(a)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def transfer(
    rx: ReceiverProcess,
    sender: KVSender,
    records: list[torch.Tensor],
    layout: KVLayout,
    rid: str,
    wire_fmt: str,
) -> tuple[float, int]:
    """The protocol alone: records exported before the clock starts, then send every layer and
    wait for the verified end; (seconds, wire bytes)."""
    n = records[0].shape[0]
    rx.call("reserve", rid, n)
    t = time.perf_counter()
    sender.begin(rid, rid, n, len(records), layout, wire_fmt, PAGE)
    for layer, layer_records in enumerate(records):
        sender.send_layer(layer, 0, n, layer_records)
    result = sender.end()
    seconds = time.perf_counter() - t
    rx.call("wait", rid)
    return seconds, result.wire_bytes


def served_transfer(
    rx: ReceiverProcess, outbox: KVOutbox, src: PagedLatentCache, rid: str
) -> tuple[float, int]:
    """The served path: what ``PrefillStage`` does for a request, through its ``KVOutbox``
    (records exported from the pages inside the timing); (seconds, wire bytes)."""
    n = src.allocator.capacity("src")
    rx.call("reserve", rid, n)
    t = time.perf_counter()
    kv = outbox.open("src", rid, rx.address, n)
    for layer in range(src.num_layers):
        kv.send_layer(layer, 0, n)
    result = kv.close()
    seconds = time.perf_counter() - t
    rx.call("wait", rid)
    return seconds, result.wire_bytes


# ---- part 1: throughput -------------------------------------------------------------------------
# (cache format at the prefill side, wire format, cache format at the decode side)
PATHS = {
    "served": ("bf16", "bf16", "bf16"),  # KVOutbox, as the prefill stage sends
    "bf16": ("bf16", "bf16", "bf16"),
    "fp8": ("fp8", "fp8", "fp8"),  # both caches hold fp8: records travel as they are
    "fp8_quantise_on_send": ("bf16", "fp8", "bf16"),  # CPU torch codec on both ends
}


def bench_throughput(sizes_mb: list[int], repeats: int) -> dict:
    """Every path and the bare-gRPC baseline take turns, repeat after repeat, so a change in
    the machine's load hits them alike; each reports its best run."""
    cfg = k2_config()
    rows = []
    bpt16 = bytes_per_token("bf16", K2_RANK, K2_ROPE)
    for size in sizes_mb:
        tokens = int(size * MB) // (K2_LAYERS * bpt16)
        nbytes = tokens * K2_LAYERS * bpt16
        paths = list(PATHS) if size == sizes_mb[0] else ["served", "bf16", "fp8"]
        sources = {f: source_cache(K2_LAYERS, tokens, f) for f in {PATHS[p][0] for p in paths}}
        exported = {
            f: [export_records(src, "src", layer, 0, tokens) for layer in range(K2_LAYERS)]
            for f, src in sources.items()
        }
        receivers = {p: ReceiverProcess(PATHS[p][2], K2_LAYERS, tokens) for p in paths}
        senders = {
            p: KVSender(receivers[p].address, model_fingerprint(cfg, PATHS[p][1]), BENCH_CONFIG)
            for p in paths
            if p != "served"
        }
        outbox = KVOutbox(cfg, sources["bf16"], BENCH_CONFIG)
        raw = RawGrpc()
        times: dict[str, list[float]] = {p: [] for p in [*paths, "raw"]}
        wire_bytes: dict[str, int] = {}
        for i in range(repeats):
            times["raw"].append(raw.send(nbytes, BENCH_CONFIG.chunk_bytes))
            for p in paths:
                src_fmt, wire_fmt, _ = PATHS[p]
                if p == "served":
                    seconds, wire_bytes[p] = served_transfer(
                        receivers[p], outbox, sources[src_fmt], f"{p}-{i}"
                    )
                else:
                    seconds, wire_bytes[p] = transfer(
                        receivers[p],
                        senders[p],
                        exported[src_fmt],
                        KVLayout.of(sources[src_fmt]),
                        f"{p}-{i}",
                        wire_fmt,
                    )
                times[p].append(seconds)
        raw.close()
        outbox.close()
        for p in paths:
            if p in senders:
                senders[p].close()
            receivers[p].close()
        memcpy = memcpy_gbps(nbytes)
        raw_gbps = nbytes / min(times["raw"]) / 1e9
        for p in paths:
            best = min(times[p])
            rows.append(
                {
                    "size_mb": size,
                    "path": p,
                    "formats": dict(
                        zip(("prefill_cache", "wire", "decode_cache"), PATHS[p], strict=True)
                    ),
                    "tokens": tokens,
                    "layers": K2_LAYERS,
                    "wire_bytes": wire_bytes[p],
                    "seconds_best": best,
                    "seconds_all": times[p],
                    "wire_gbps": wire_bytes[p] / best / 1e9,
                    "tokens_per_s": tokens / best,
                    "memcpy_gbps": memcpy,
                    "raw_grpc_gbps": raw_gbps,
                }
            )
            print(
                f"{size:6d} MB {p:22s} {wire_bytes[p] / best / 1e9:6.2f} GB/s on the wire "
                f"{tokens / best:9.0f} tokens/s | memcpy {memcpy:5.2f} GB/s, "
                f"bare gRPC {raw_gbps:4.2f} GB/s",
                flush=True,
            )
        del sources, exported
    return {"rows": rows}


class RawGrpc:
    """Bytes-only gRPC stream to a child process that answers each message (no checks, no
    cache): what Python gRPC itself moves on this machine."""

    def __init__(self) -> None:
        import grpc

        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve-raw"], stdout=subprocess.PIPE, text=True
        )
        address = self.proc.stdout.readline().strip()
        self.channel = grpc.insecure_channel(address, options=BENCH_CONFIG.grpc_options())
        self.method = self.channel.stream_stream("/bench.Raw/Sink")

    def send(self, nbytes: int, message_bytes: int) -> float:
        """Seconds to move ``nbytes`` as ``message_bytes`` messages (fresh bytes each, as the
        transfer builds each frame)."""
        count = max(1, nbytes // message_bytes)
        payload = os.urandom(message_bytes)
        t = time.perf_counter()
        frames = (payload[:-1] + b"x" for _ in range(count))  # one new bytes per message
        for _ in self.method(frames):
            pass
        return time.perf_counter() - t

    def close(self) -> None:
        self.channel.close()
        self.proc.kill()
        self.proc.wait()


def serve_raw() -> None:
    """Child process for raw_grpc_gbps: one tiny answer per message received."""
    from concurrent import futures

    import grpc

    def sink(frames, context):
        for _ in frames:
            yield b"k"

    server = grpc.server(futures.ThreadPoolExecutor(4), options=BENCH_CONFIG.grpc_options())
    handler = grpc.method_handlers_generic_handler(
        "bench.Raw", {"Sink": grpc.stream_stream_rpc_method_handler(sink)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


# ---- part 2: synthetic producer -----------------------------------------------------------------
def bench_overlap(tokens: int, trials: int) -> dict:
    """Each trial: an unpaced transfer gives one layer's transfer time t (bulk / layers); then
    a producer emits a layer every t, and the KV is streamed as produced, or sent after the
    last layer. Exposed = last layer produced -> receiver holds it all, verified. The box's
    load drifts, so every trial is measured against its own t and the median is reported."""
    cfg = k2_config()
    src = source_cache(K2_LAYERS, tokens)
    records = [export_records(src, "src", layer, 0, tokens) for layer in range(K2_LAYERS)]
    rx = ReceiverProcess("bf16", K2_LAYERS, tokens)
    runs = []
    with KVSender(rx.address, model_fingerprint(cfg, "bf16"), BENCH_CONFIG) as tx:

        def run(rid: str, period_s: float, streamed: bool) -> float:
            """Produce a layer every period_s; returns seconds from last layer to verified."""
            rx.call("reserve", rid, tokens)
            tx.begin(rid, rid, tokens, K2_LAYERS, KVLayout.of(src))
            start = time.perf_counter()
            for layer in range(K2_LAYERS):
                due = start + (layer + 1) * period_s  # the producer finishes `layer` here
                while time.perf_counter() < due:
                    time.sleep(min(0.001, max(due - time.perf_counter(), 0)))
                if streamed:
                    tx.send_layer(layer, 0, tokens, records[layer])
            last_produced = time.perf_counter()
            if not streamed:
                for layer in range(K2_LAYERS):
                    tx.send_layer(layer, 0, tokens, records[layer])
            tx.end()
            exposed = time.perf_counter() - last_produced
            rx.call("wait", rid)
            return exposed

        for i in range(trials):
            bulk = run(f"bulk{i}", 0.0, streamed=False)  # no producer: the whole transfer
            t_layer = bulk / K2_LAYERS
            streamed = run(f"streamed{i}", t_layer, streamed=True)
            after = run(f"after{i}", t_layer, streamed=False)
            runs.append(
                {
                    "bulk_transfer_s": bulk,
                    "layer_transfer_s": t_layer,
                    "exposed_s_streamed": streamed,
                    "exposed_s_after_last_layer": after,
                    "streamed_over_layer": streamed / t_layer,
                    "after_over_layer": after / t_layer,
                }
            )
            print(
                f"overlap trial {i}: one layer {t_layer * 1e3:6.1f} ms; exposed streamed "
                f"{streamed * 1e3:7.1f} ms = {streamed / t_layer:5.2f} layers, after the last "
                f"layer {after * 1e3:7.1f} ms = {after / t_layer:5.2f} layers",
                flush=True,
            )
    rx.close()
    ratios = sorted(r["streamed_over_layer"] for r in runs)
    return {
        "tokens": tokens,
        "layers": K2_LAYERS,
        "trials": runs,
        "exposed_over_layer_time": ratios[len(ratios) // 2],
    }


# ---- part 3: real k2-small prefill -----------------------------------------------------------
def bench_real_prefill(prompt_len: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        make_model("k2-small", tmp)
        engine = Engine.load(tmp, kv_format="bf16", page_size=PAGE)
        cfg, cache = engine.config, engine.cache
        ids = torch.randint(
            0, cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0)
        ).tolist()
        rx = ReceiverProcess("bf16", cache.num_layers, prompt_len, model_dir=tmp)
        outbox = KVOutbox(cfg, cache, BENCH_CONFIG)  # the prefill stage's sending path
        rx.call("reserve", "req", prompt_len)
        cache.allocator.allocate("seq", prompt_len)
        kv = outbox.open("seq", "req", rx.address, prompt_len)
        marks = {}

        def on_layer(layer: int, start: int, end: int) -> None:
            marks["last"] = time.perf_counter()  # this layer's KV for [start, end) exists
            kv.send_layer(layer, start, end)

        t = time.perf_counter()
        engine.prefill("seq", ids, on_layer=on_layer)
        prefill_s = time.perf_counter() - t
        kv.close()  # returns once the receiver holds the whole KV, verified
        exposed = time.perf_counter() - marks["last"]
        rx.call("wait", "req")
        outbox.close()
        rx.close()
        return {
            "prompt_len": prompt_len,
            "prefill_s": prefill_s,
            "exposed_s": exposed,
            "exposed_fraction": exposed / prefill_s,
            "model": f"k2-small ({cfg.num_hidden_layers} layers, K2 MLA dims), "
            f"{engine.dtype} weights, bf16 KV, chunk {engine.chunk_size}",
            "torch_threads": torch.get_num_threads(),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    ap.add_argument("--json", type=Path, help="write results here")
    ap.add_argument("--serve-raw", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument(
        "--serve-receiver",
        nargs="+",
        metavar="FMT LAYERS TOKENS [MODEL_DIR]",
        help=argparse.SUPPRESS,
    )
    args = ap.parse_args()
    if args.serve_raw:
        serve_raw()
        return
    if args.serve_receiver:
        fmt, layers, tokens, *model_dir = args.serve_receiver
        serve_receiver(fmt, int(layers), int(tokens), *model_dir)
        return
    default_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the transfer is one stream; compare with a one-thread memcpy
    quick = args.quick
    sizes = [64, 256] if quick else [64, 1024]
    tp = bench_throughput(sizes, repeats=2 if quick else 3)
    big = [r for r in tp["rows"] if r["size_mb"] == sizes[-1]]
    bf16 = next(r for r in big if r["path"] == "bf16")
    served = next(r for r in big if r["path"] == "served")
    fp8 = next(r for r in big if r["path"] == "fp8")
    ov = bench_overlap(4096 if quick else 16384, trials=3)
    real_len = 1024 if quick else 16384
    torch.set_num_threads(default_threads)  # the prefill computes with every core
    real = bench_real_prefill(real_len)
    print(
        f"k2-small prefill of {real_len} tokens: {real['prefill_s']:.1f} s, KV exposed after "
        f"the last layer {real['exposed_s'] * 1e3:.1f} ms = {real['exposed_fraction']:.2%}",
        flush=True,
    )
    results = {
        "quick": quick,
        "served_path_gbps": served["wire_gbps"],
        "loopback_gbps": bf16["wire_gbps"],
        "served_over_loopback": served["wire_gbps"] / bf16["wire_gbps"],
        "memcpy_gbps": bf16["memcpy_gbps"],
        "ratio_vs_memcpy": bf16["wire_gbps"] / bf16["memcpy_gbps"],
        "raw_grpc_gbps": bf16["raw_grpc_gbps"],
        "ratio_vs_raw_grpc": bf16["wire_gbps"] / bf16["raw_grpc_gbps"],
        "fp8_wire_bytes_ratio": fp8["wire_bytes"] / bf16["wire_bytes"],
        "fp8_tokens_per_s_ratio": fp8["tokens_per_s"] / bf16["tokens_per_s"],
        "exposed_over_layer_time": ov["exposed_over_layer_time"],
        "exposed_fraction_16k": real.get("exposed_fraction"),
        "targets_met": {
            "served_path_gbps>=0.9*loopback_gbps": served["wire_gbps"] >= 0.9 * bf16["wire_gbps"],
            "loopback_gbps>=1": bf16["wire_gbps"] >= 1.0,
            "ratio_vs_memcpy>=0.25": bf16["wire_gbps"] / bf16["memcpy_gbps"] >= 0.25,
            "exposed_over_layer_time<=2": ov["exposed_over_layer_time"] <= 2.0,
        },
        "notes": {
            "quick": "--quick: 256 MB instead of 1 GB, 4K-token overlap, 1K-token real prefill"
            if quick
            else "full sizes",
            "loopback_size_mb": sizes[-1],
            "overlap_tokens": ov["tokens"],
            "real_prefill_prompt_len": real_len,
            "real_prefill": real,
            "receiver": "child process, gRPC over 127.0.0.1; every timing includes the "
            "verified write into pages on the receiver",
            "served_path": "KVOutbox from a cache whose sequence holds every other page; the "
            "export from pages is inside the timing. loopback (bf16, fp8 rows) feeds KVSender "
            "records exported before the clock starts",
            "fp8_path": "fp8 rows move records from an fp8 prefill cache into an fp8 decode "
            "cache; fp8_quantise_on_send adds the CPU torch codec on both ends",
            "load_average": os.getloadavg(),
        },
        "throughput": tp["rows"],
        "overlap": ov,
    }
    print(
        json.dumps({k: v for k, v in results.items() if not isinstance(v, (dict, list))}, indent=1)
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
