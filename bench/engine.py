"""Engine benchmark: tidal's prefill and decode beside HF transformers on the same weights.

    python bench/engine.py [--quick] --json PATH [--model-dir .models/k2-small]
    python bench/engine.py --ep 2 [--quick] --json PATH   # expert parallelism, bench/engine_ep.py

Runs on the ``k2-small`` preset (generated into ``--model-dir`` if absent), bf16 latent KV
cache, weights and activations in ``--dtype`` for both sides: ``auto`` (default) measures fp32
and bf16 GEMMs first and takes the faster (bf16 on CPUs with bf16 units, fp32 on those without,
where bf16 GEMMs are emulated and several times slower). Parts:

1. machine: GEMM FLOP/s in each dtype on model-like shapes (best of them) and memcpy bandwidth
   (bytes copied per second, one direction, 256 MiB);
2. prefill tokens/s at 1K/4K/16K prompt tokens (--quick: 1K/4K), tidal (chunks of
   ``--chunk-size``, default 4096) vs HF (one shot; skipped at 16K: its [heads, T, T] score
   matrices take minutes and gigabytes);
3. decode tokens/s at batch 1/8/32 with 1K tokens of context per sequence (the context is
   written straight into the caches, the same for both), tidal (absorbed MLA over pages) vs
   HF (DynamicCache of latents, decompressed every step; only a couple of steps timed);
4. KV bytes per token (all layers) for tidal bf16 / fp8 and HF's cache.

Every timing is the best of its repetitions (prefill: 2 runs up to 4K; decode: the best step),
since a shared box disturbs some runs; HF is timed with eager and sdpa attention and the faster
one is the baseline (``hf_attention_implementation`` in the JSON). Default one torch thread
(``--threads``), for both sides.

Derived: ``prefill_flops_fraction`` = useful model FLOP/s (linear layers with the active
experts + causal attention) / measured GEMM FLOP/s in the run's dtype; ``decode_roofline_fraction`` = (bytes one
step must touch: weights actually read, counting only the experts the step routed to, plus the
KV of every sequence) / memcpy bandwidth / measured step time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.checkpoint import make_model  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.engine import Engine  # noqa: E402
from model.kv_cache import bytes_per_token  # noqa: E402
from model.weights import resident_bytes  # noqa: E402

CONTEXT = 1024
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
HF_ATTENTION = ("eager", "sdpa")  # HF is timed with both; the faster one is the baseline


# ---- machine ------------------------------------------------------------------------------------
def _timeit(fn, reps: int, warmup: int = 1) -> float:
    """Best of ``reps`` timings (the box may be shared: the minimum is the least disturbed)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def gemm_flops(config: ModelConfig, dtype: torch.dtype = torch.float32) -> float:
    """Best FLOP/s of torch GEMMs shaped like the model's prefill projections."""
    h = config.hidden_size
    n = config.num_attention_heads
    shapes = [
        (2048, h, config.intermediate_size * 2),
        (2048, config.kv_lora_rank, n * (config.qk_nope_head_dim + config.v_head_dim)),
        (2048, n * config.v_head_dim, h),
        (512, h, 2 * config.moe_intermediate_size),
    ]
    best = 0.0
    for m, k, out in shapes:
        a, w = torch.randn(m, k, dtype=dtype), torch.randn(out, k, dtype=dtype)
        dt = _timeit(lambda a=a, w=w: F.linear(a, w), reps=3)
        best = max(best, 2 * m * k * out / dt)
    return best


def copy_bandwidth(nbytes: int = 256 << 20) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    return nbytes / _timeit(lambda: dst.copy_(src), reps=5)


# ---- FLOP and byte models -----------------------------------------------------------------------
def _attn_weight_params(c: ModelConfig) -> int:
    n, h = c.num_attention_heads, c.hidden_size
    q = n * c.qk_head_dim * (c.q_lora_rank or h) + (c.q_lora_rank or 0) * h
    return (
        q
        + (c.kv_lora_rank + c.qk_rope_head_dim) * h
        + c.kv_lora_rank * n * (c.qk_nope_head_dim + c.v_head_dim)
        + n * c.v_head_dim * h
    )


def prefill_flops(c: ModelConfig, t: int) -> float:
    """Useful FLOPs of a t-token prefill: linear layers (active experts) + causal attention."""
    h = c.hidden_size
    per_token = 0
    for i in range(c.num_hidden_layers):
        per_token += _attn_weight_params(c)
        if c.is_moe_layer(i):
            active = c.num_experts_per_tok + c.n_shared_experts
            per_token += 3 * h * c.moe_intermediate_size * active + c.n_routed_experts * h
        else:
            per_token += 3 * h * c.intermediate_size
    per_token += c.vocab_size * h
    n = c.num_attention_heads
    attn = c.num_hidden_layers * 2 * n * (c.qk_head_dim + c.v_head_dim) * t * (t + 1) / 2
    return 2 * per_token * t + attn


def decode_bytes(engine: Engine, experts_hit: dict[int, int], kv_tokens: int) -> int:
    """Bytes one decode step reads: the weights it uses (hit experts only) + the KV it attends.

    The weights as held (``engine.weight_bytes``: FP8 linears at 1 B/value + block scales) less
    the embedding table (a step reads one row per token) and the routed experts, plus the bytes
    of the experts the step routed to.
    """
    c = engine.config
    m = engine.model
    routed = [w for moe in m.moe_layers.values() for w in (moe.gate_up, moe.down)]
    total = engine.weight_bytes - resident_bytes([m.embed, *routed])
    if m.embed is m.lm_head:  # tied: the LM head reads the whole table
        total += resident_bytes([m.embed])
    for i, moe in m.moe_layers.items():
        total += experts_hit[i] * (moe.gate_up[0].nbytes + moe.down[0].nbytes)
    return total + kv_tokens * engine.cache.bytes_per_token * c.num_hidden_layers


# ---- tidal --------------------------------------------------------------------------------------
def ours_prefill(engine: Engine, t: int, reps: int = 1) -> float:
    """Best of ``reps`` prefills of a random t-token prompt (pages allocated and freed)."""
    ids = torch.randint(0, engine.config.vocab_size, (t,)).tolist()
    alloc = engine.cache.allocator
    best = float("inf")
    for _ in range(reps):
        alloc.allocate("bench-prefill", t)
        try:
            start = time.perf_counter()
            engine.prefill("bench-prefill", ids)
            best = min(best, time.perf_counter() - start)
        finally:
            alloc.free("bench-prefill")
    return best


def _random_context(c: ModelConfig, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(t, c.kv_lora_rank, generator=g), torch.randn(
        t, c.qk_rope_head_dim, generator=g
    )


def decode_context(engine: Engine, batch: int, steps: int) -> list[str]:
    """``batch`` sequences holding CONTEXT tokens of random latent KV, with pages for ``steps``
    more tokens; their ids."""
    c = engine.config
    seqs = [f"bench-decode-{i}" for i in range(batch)]
    c_kv, k_pe = _random_context(c, CONTEXT)
    for sid in seqs:
        engine.cache.allocator.allocate(sid, CONTEXT + steps + 1)
        for layer in range(c.num_hidden_layers):
            engine.cache.write(sid, layer, 0, c_kv, k_pe)
    return seqs


def ours_decode(engine: Engine, batch: int, steps: int) -> tuple[float, int]:
    """(seconds per step, experts hit summed over layers of the last step) at CONTEXT tokens."""
    c = engine.config
    alloc = engine.cache.allocator
    seqs = decode_context(engine, batch, steps)
    tokens = torch.randint(0, c.vocab_size, (batch,)).tolist()
    try:
        engine.decode(seqs, tokens, [CONTEXT] * batch)  # warm-up
        dt = float("inf")  # best step: the box may be shared
        for s in range(steps):
            before = {i: moe.counts.clone() for i, moe in engine.model.moe_layers.items()}
            start = time.perf_counter()
            engine.decode(seqs, tokens, [CONTEXT + 1 + s] * batch)
            dt = min(dt, time.perf_counter() - start)
        hit = {
            i: int((moe.counts - before[i]).gt(0).sum())
            for i, moe in engine.model.moe_layers.items()
        }
        return dt, hit
    finally:
        for sid in seqs:
            alloc.free(sid)


# ---- HF -----------------------------------------------------------------------------------------
def hf_prefill(hf, c: ModelConfig, t: int) -> float:
    ids = torch.randint(0, c.vocab_size, (1, t))
    with torch.inference_mode():
        start = time.perf_counter()
        hf(ids, use_cache=False, logits_to_keep=1)
        return time.perf_counter() - start


def hf_prefill_best(hf, c: ModelConfig, t: int) -> tuple[float, str]:
    """HF's faster attention implementation at this length: (seconds, "eager" | "sdpa")."""
    best = (float("inf"), "")
    for impl in HF_ATTENTION:
        hf.set_attn_implementation(impl)
        best = min(best, (hf_prefill(hf, c, t), impl))
    hf.set_attn_implementation(best[1])
    return best


def hf_decode_best(hf, c: ModelConfig, batch: int, steps: int) -> tuple[float, int, str]:
    """HF's faster attention implementation: (seconds per step, cache bytes/token, impl)."""
    best = None
    for impl in HF_ATTENTION:
        hf.set_attn_implementation(impl)
        dt, nbytes = hf_decode(hf, c, batch, steps)
        if best is None or dt < best[0]:
            best = (dt, nbytes, impl)
    return best


def hf_decode(hf, c: ModelConfig, batch: int, steps: int) -> tuple[float, int]:
    """(seconds per step, HF cache bytes per token over all layers)."""
    from transformers import DynamicCache

    c_kv, k_pe = _random_context(c, CONTEXT)
    cache = DynamicCache(config=hf.config)
    for layer in range(c.num_hidden_layers):
        cache.update(
            c_kv.expand(batch, 1, -1, -1).to(hf.dtype, copy=True),
            k_pe.expand(batch, 1, -1, -1).to(hf.dtype, copy=True),
            layer,
        )
    hf_bytes = 0
    for layer in cache.layers:
        hf_bytes += (layer.keys.nbytes + layer.values.nbytes) // (batch * CONTEXT)
    tokens = torch.randint(0, c.vocab_size, (batch, 1))
    times = []
    with torch.inference_mode():
        for s in range(steps + 1):
            pos = torch.full((batch, 1), CONTEXT + s)
            start = time.perf_counter()
            hf(tokens, past_key_values=cache, position_ids=pos, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - start)
    return min(times[1:]), hf_bytes


# ---- main ---------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="1K/4K prefill, fewer decode steps")
    ap.add_argument("--json", type=Path, required=True, help="where to write the results")
    ap.add_argument("--model-dir", type=Path, default=Path(".models/k2-small"))
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared 2-core box OpenMP barriers with 2 threads "
        "cost up to 100x when the other core is busy; use all cores on an idle machine)",
    )
    ap.add_argument("--chunk-size", type=int, default=4096)
    ap.add_argument(
        "--ep",
        type=int,
        default=0,
        help="instead: N expert-parallel rank processes (1 thread each) beside one process of "
        "N threads, decode b=32 and 4K prefill (bench/engine_ep.py)",
    )
    ap.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="weights and activations, both sides (auto: the dtype with the faster GEMM here)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.model_dir / "config.json").exists():
        print(f"generating k2-small into {args.model_dir} ...", flush=True)
        make_model("k2-small", args.model_dir, seed=0)

    prefill_lengths = [1024, 4096] if args.quick else [1024, 4096, 16384]
    batches = [1, 8, 32]
    steps = 5 if args.quick else 10
    page = 64
    max_tokens = max(max(prefill_lengths), 32 * page * -(-(CONTEXT + steps + 1) // page))
    c = ModelConfig.from_json(args.model_dir / "config.json")
    flops_by_dtype = {name: gemm_flops(c, dt) for name, dt in DTYPES.items()}
    name = max(flops_by_dtype, key=flops_by_dtype.get) if args.dtype == "auto" else args.dtype
    dtype, flops = DTYPES[name], flops_by_dtype[name]
    if args.ep:
        from bench.engine_ep import compare_ep

        compare_ep(args.model_dir, args.ep, name, args.chunk_size, args.quick, args.json)
        return
    bw = copy_bandwidth()
    print(
        "machine: GEMM "
        + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in flops_by_dtype.items())
        + f" GFLOP/s, memcpy {bw / 1e9:.2f} GB/s, threads {torch.get_num_threads()}; "
        f"running in {name}",
        flush=True,
    )
    engine = Engine.load(
        args.model_dir,
        dtype=dtype,
        kv_format="bf16",
        chunk_size=args.chunk_size,
        max_num_tokens=max_tokens,
    )
    from model.hf_reference import hf_reference

    hf = hf_reference(args.model_dir, dtype=dtype)

    ours_prefill(engine, 256)  # warm-up
    hf_prefill(hf, c, 64)
    prefill = {}
    hf_impl = {}
    for t in prefill_lengths:
        ours = ours_prefill(engine, t, reps=2 if t <= 4096 else 1)
        theirs = None
        if t <= 4096:
            theirs, hf_impl[t] = hf_prefill_best(hf, c, t)
        prefill[t] = (ours, theirs)
        print(
            f"prefill {t}: ours {ours:.2f}s"
            + (f", hf {theirs:.2f}s ({hf_impl[t]})" if theirs else ", hf skipped"),
            flush=True,
        )

    decode = {}
    hf_kv = 0
    for b in batches:
        ours, hit = ours_decode(engine, b, steps)
        theirs, hf_kv, hf_impl[f"decode {b}"] = hf_decode_best(hf, c, b, 2)
        nbytes = decode_bytes(engine, hit, b * (CONTEXT + 1))
        decode[b] = (ours, theirs, nbytes)
        print(
            f"decode batch {b}: ours {ours * 1e3:.1f} ms/step, hf {theirs * 1e3:.1f} ms/step",
            flush=True,
        )

    layers = c.num_hidden_layers
    kv = {
        "ours_bf16": bytes_per_token("bf16", c.kv_lora_rank, c.qk_rope_head_dim) * layers,
        "ours_fp8": bytes_per_token("fp8", c.kv_lora_rank, c.qk_rope_head_dim) * layers,
        "hf": hf_kv,
    }
    results = {
        "model": str(args.model_dir),
        "quick": args.quick,
        "threads": torch.get_num_threads(),
        "dtype": name,
        "gemm_flops": flops,
        "gemm_flops_by_dtype": flops_by_dtype,
        "copy_bandwidth": bw,
        "prefill_tokens_per_s": {
            str(t): {"ours": t / o, "hf": (t / h if h else None)} for t, (o, h) in prefill.items()
        },
        "prefill_speedup_vs_hf": {str(t): (h / o if h else None) for t, (o, h) in prefill.items()},
        "prefill_flops_fraction": {
            str(t): prefill_flops(c, t) / o / flops for t, (o, _) in prefill.items()
        },
        "decode_tokens_per_s": {
            str(b): {"ours": b / o, "hf": b / h} for b, (o, h, _) in decode.items()
        },
        "decode_step_ms": {
            str(b): {"ours": o * 1e3, "hf": h * 1e3} for b, (o, h, _) in decode.items()
        },
        "decode_speedup_vs_hf": {str(b): h / o for b, (o, h, _) in decode.items()},
        "decode_bytes_per_step": {str(b): n for b, (_, _, n) in decode.items()},
        "decode_roofline_fraction": {str(b): n / bw / o for b, (o, _, n) in decode.items()},
        "kv_bytes_per_token": kv,
        "hf_attention_implementation": {str(k): v for k, v in hf_impl.items()},
        "chunk_size": args.chunk_size,
    }
    print()
    print(f"{'part':<24}{'ours':>12}{'hf':>12}{'speedup':>10}{'fraction':>10}")
    for t, (o, h) in prefill.items():
        print(
            f"{f'prefill {t} tok/s':<24}{t / o:>12.0f}{(t / h if h else float('nan')):>12.0f}"
            f"{(h / o if h else float('nan')):>10.2f}"
            f"{results['prefill_flops_fraction'][str(t)]:>10.2f}"
        )
    for b, (o, h, _) in decode.items():
        print(
            f"{f'decode b={b} tok/s':<24}{b / o:>12.1f}{b / h:>12.1f}{h / o:>10.2f}"
            f"{results['decode_roofline_fraction'][str(b)]:>10.2f}"
        )
    print(
        f"KV bytes/token (all layers): ours bf16 {kv['ours_bf16']}, fp8 {kv['ours_fp8']}, hf {kv['hf']}"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
