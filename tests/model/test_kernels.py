"""Kernels: paged MLA decode attention and the FP8 latent codec.

Three layers of checks:
1. the torch reference of the paged decode against dense attention on unpacked tensors;
2. the wrappers' input checks and the fp8 record helpers (plain torch, in this process);
3. the Triton kernels against the torch references under Triton's CPU interpreter. The
   interpreter must be switched on before Triton is imported, so ``test_triton_interpreter``
   re-runs this file's ``interp`` tests in a subprocess with ``TRITON_INTERPRET=1`` and
   ``TIDAL_FORCE_TRITON=1``; in the normal run those tests are skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import kv_cache
from model.kernels import mla_decode_reference
from model.kernels.fp8 import (
    dequantize_latent_fp8,
    pack_fp8_records,
    quantize_latent_fp8,
    unpack_fp8_records,
)
from model.kernels.mla_decode import (
    make_block_tables,
    paged_mla_decode,
    paged_mla_decode_reference,
)
from model.kv_cache import PagedLatentCache

IN_INTERPRETER = (
    os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("TIDAL_FORCE_TRITON") == "1"
)
interp = pytest.mark.skipif(not IN_INTERPRETER, reason="runs in test_triton_interpreter")
REPO = Path(__file__).resolve().parents[2]


def make_cache(fmt: str, seq_lens: list[int], *, r=128, rope=32, page_size=16, layer=1, seed=0):
    """A 2-layer cache holding random KV for each sequence on interleaved (scattered) pages.

    Returns (cache, block_tables int32 [B, max_pages] padded with -1, seq_lens int32 [B]).
    """
    g = torch.Generator().manual_seed(seed)
    num_pages = sum(-(-n // page_size) for n in seq_lens) + 3
    cache = PagedLatentCache(2, r, rope, num_pages, page_size, fmt)
    for i in range(len(seq_lens)):
        cache.allocator.allocate(i, 1)
    grown = [1] * len(seq_lens)
    while grown != seq_lens:  # grow one page at a time, round robin, so pages interleave
        for i, n in enumerate(seq_lens):
            grown[i] = min(n, grown[i] + page_size)
            cache.allocator.append(i, grown[i])
    for i, n in enumerate(seq_lens):
        c_kv = torch.randn(n, r, generator=g) * 2
        k_pe = torch.randn(n, rope, generator=g)
        cache.write(i, layer, 0, c_kv, k_pe)
    max_pages = max(len(cache.allocator.block_table(i)) for i in range(len(seq_lens))) + 1
    block_tables = torch.full((len(seq_lens), max_pages), -1, dtype=torch.int32)
    for i in range(len(seq_lens)):
        table = cache.allocator.block_table(i)
        block_tables[i, : len(table)] = torch.tensor(table, dtype=torch.int32)
    return cache, block_tables, torch.tensor(seq_lens, dtype=torch.int32)


def dense_attention(q_latent, q_pe, cache, layer, seq_lens, scale) -> torch.Tensor:
    """Naive per-sequence attention over the unpacked fp32 cache: [B, H, R] fp32."""
    outs = []
    for i, n in enumerate(seq_lens.tolist()):
        c_kv, k_pe = cache.read(i, layer, n)  # [n, R], [n, rope]
        scores = scale * (q_latent[i].float() @ c_kv.T + q_pe[i].float() @ k_pe.T)  # [H, n]
        outs.append(torch.softmax(scores, dim=-1) @ c_kv)
    return torch.stack(outs)


def random_queries(b, h, r, rope, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, h, r, generator=g).to(dtype),
        torch.randn(b, h, rope, generator=g).to(dtype),
    )


# ---- 1. torch reference vs dense attention ----------------------------------------------------
@pytest.mark.parametrize("fmt", ["fp32", "bf16", "fp8"])
def test_reference_matches_dense_attention(fmt):
    lens = [1, 17, 50, 64, 5]
    cache, tables, seq_lens = make_cache(fmt, lens)
    q, q_pe = random_queries(len(lens), 4, 128, 32, torch.float32)
    out = paged_mla_decode(q, q_pe, cache, 1, tables, seq_lens, 0.1)
    assert out.shape == (5, 4, 128) and out.dtype == torch.float32
    torch.testing.assert_close(
        out, dense_attention(q, q_pe, cache, 1, seq_lens, 0.1), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("strategy", ["batched", "per_sequence"])
def test_bf16_queries_on_a_bf16_cache_track_fp32(monkeypatch, strategy):
    # bf16 q on a bf16 cache: the matmuls take the bf16 records in place (scores and output
    # lifted to fp32 at once, P rounded to bf16), as a GPU kernel does. Stated tolerance: every
    # output within 2% of the output's largest magnitude of the fp32 computation on the same
    # bf16-rounded records and queries.
    min_pages = 10**9 if strategy == "batched" else 0
    monkeypatch.setattr(mla_decode_reference, "_PER_SEQUENCE_MIN_PAGES", min_pages)
    lens = [1, 17, 50, 64, 130]
    cache, tables, seq_lens = make_cache("bf16", lens)
    q, q_pe = random_queries(len(lens), 4, 128, 32, torch.bfloat16)
    out = paged_mla_decode(q, q_pe, cache, 1, tables, seq_lens, 0.1)
    assert out.dtype == torch.bfloat16
    ref = dense_attention(q.float(), q_pe.float(), cache, 1, seq_lens, 0.1)
    err = (out.float() - ref).abs().amax(dim=(1, 2)) / ref.abs().amax(dim=(1, 2))
    assert err.max().item() <= 0.02, err
    # and it is not the fp32 path in disguise: the bf16 rounding of P leaves a trace
    exact = paged_mla_decode(q.float(), q_pe.float(), cache, 1, tables, seq_lens, 0.1)
    assert not torch.equal(out, exact.to(torch.bfloat16))


def test_make_block_tables_feeds_the_decode():
    lens = [40, 3, 17]
    cache, tables, seq_lens = make_cache("fp32", lens)
    built = make_block_tables(cache, [0, 1, 2])
    assert built.dtype == torch.int32 and built.shape == (3, tables.shape[1] - 1)
    assert torch.equal(torch.where(tables[:, :-1] < 0, 0, tables[:, :-1]), built)
    q, q_pe = random_queries(3, 2, 128, 32, torch.float32)
    torch.testing.assert_close(
        paged_mla_decode(q, q_pe, cache, 1, built, seq_lens, 0.2),
        paged_mla_decode(q, q_pe, cache, 1, tables, seq_lens, 0.2),
    )


@pytest.mark.parametrize("strategy", ["batched", "per_sequence"])
@pytest.mark.parametrize("chunk_bytes", [1, 20 << 20])  # 1: one page per chunk
@pytest.mark.parametrize("fragmented", [False, True])
def test_reference_strategies_match_dense(monkeypatch, strategy, chunk_bytes, fragmented):
    # Both strategies, with and without the chunked online-softmax walk (where sequences also
    # drop out early), on contiguous pages (views) and interleaved ones (gathers).
    monkeypatch.setattr(mla_decode_reference, "_CHUNK_BYTES", chunk_bytes)
    min_pages = 10**9 if strategy == "batched" else 0
    monkeypatch.setattr(mla_decode_reference, "_PER_SEQUENCE_MIN_PAGES", min_pages)
    lens = [70, 1, 33, 16, 130]
    if fragmented:
        cache, tables, seq_lens = make_cache("bf16", lens)
    else:  # each sequence allocated at once: runs of consecutive pages
        cache = PagedLatentCache(2, 128, 32, 20, 16, "bf16")
        for i, n in enumerate(lens):
            cache.allocator.allocate(i, n)
            cache.write(i, 1, 0, torch.randn(n, 128), torch.randn(n, 32))
        tables = make_block_tables(cache, range(len(lens)))
        seq_lens = torch.tensor(lens, dtype=torch.int32)
    q, q_pe = random_queries(len(lens), 3, 128, 32, torch.float32)
    out = paged_mla_decode_reference(q, q_pe, cache, 1, tables, seq_lens, 0.3)
    torch.testing.assert_close(
        out, dense_attention(q, q_pe, cache, 1, seq_lens, 0.3), rtol=1e-5, atol=1e-5
    )


def test_reference_returns_q_dtype_and_reads_only_its_layer():
    lens = [20, 3]
    cache, tables, seq_lens = make_cache("fp32", lens)
    q, q_pe = random_queries(2, 2, 128, 32, torch.bfloat16)
    out = paged_mla_decode(q, q_pe, cache, 1, tables, seq_lens, 0.2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(
        out.float(), dense_attention(q, q_pe, cache, 1, seq_lens, 0.2), rtol=1e-2, atol=1e-2
    )
    cache.pages[0].fill_(7)  # garbage in another layer changes nothing
    assert torch.equal(paged_mla_decode(q, q_pe, cache, 1, tables, seq_lens, 0.2), out)


# ---- 2. input checks and fp8 helpers ------------------------------------------------------------
def test_decode_wrapper_rejects_bad_inputs():
    cache, tables, seq_lens = make_cache("fp32", [10, 20])
    q, q_pe = random_queries(2, 2, 128, 32, torch.float32)

    def call(**kw):
        args = dict(
            q_latent=q, q_pe=q_pe, cache=cache, layer=1, block_tables=tables, seq_lens=seq_lens,
            softmax_scale=0.1,
        )  # fmt: skip
        args.update(kw)
        return paged_mla_decode(**args)

    cases = [
        (dict(q_latent=q[..., :64]), "q_latent must be"),
        (dict(q_pe=q_pe[:, :1]), "q_pe must be"),
        (dict(q_pe=q_pe.half()), "share one dtype"),
        (dict(q_latent=q.transpose(1, 2).contiguous().transpose(1, 2)), "unit stride"),
        (dict(layer=2), "layer 2 out of range"),
        (dict(block_tables=tables.long()), "block_tables must be int32"),
        (dict(seq_lens=seq_lens.long()), "seq_lens must be int32"),
        (dict(seq_lens=torch.tensor([10, 0], dtype=torch.int32)), r"seq_lens must lie in \[1"),
        (dict(seq_lens=torch.tensor([10, 200], dtype=torch.int32)), "seq_lens must lie in"),
        (dict(seq_lens=torch.tensor([10, 33], dtype=torch.int32)), "is not a page id"),
        (dict(softmax_scale=0.0), "softmax_scale must be positive"),
        (dict(num_splits=0), "num_splits"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            call(**kwargs)


def test_fp8_wrappers_reject_bad_inputs():
    x = torch.randn(4, 256)
    q, s = quantize_latent_fp8(x)
    with pytest.raises(ValueError, match="multiple of 128"):
        quantize_latent_fp8(torch.randn(4, 100))
    with pytest.raises(ValueError, match="c_kv must be one of"):
        quantize_latent_fp8(x.double())
    with pytest.raises(ValueError, match="unit stride"):
        quantize_latent_fp8(torch.randn(256, 4).T)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        dequantize_latent_fp8(q.view(torch.uint8), s)
    with pytest.raises(ValueError, match=r"scale must be float32 \[4, 2\]"):
        dequantize_latent_fp8(q, s[:, :1])
    with pytest.raises(ValueError, match="out_dtype"):
        dequantize_latent_fp8(q, s, torch.int32)
    with pytest.raises(ValueError, match="records must be uint8"):
        unpack_fp8_records(torch.zeros(2, 100, dtype=torch.uint8), 128)


def test_fp8_records_match_the_cache_format():
    g = torch.Generator().manual_seed(3)
    c_kv, k_pe = torch.randn(9, 256, generator=g), torch.randn(9, 64, generator=g)
    cache = PagedLatentCache(1, 256, 64, 1, 16, "fp8")
    records = pack_fp8_records(c_kv.bfloat16(), k_pe)
    assert records.dtype == torch.uint8 and records.shape == (9, cache.bytes_per_token)
    assert torch.equal(records, cache.pack(c_kv.bfloat16(), k_pe))
    c_back, pe_back = unpack_fp8_records(records, 256)
    ref_c, ref_pe = cache.unpack(records)
    assert torch.equal(c_back, ref_c) and torch.equal(pe_back, ref_pe)
    # e4m3 keeps 3 mantissa bits: per-group relative error below 2^-4 of the group's amax
    err = (c_back - c_kv).abs().view(9, 2, 128).amax(-1)
    assert bool((err <= c_kv.abs().view(9, 2, 128).amax(-1) / 16).all())
    assert torch.equal(pe_back, k_pe.bfloat16().float())


# ---- 3. Triton kernels under the interpreter (run through the subprocess below) ----------------
@pytest.mark.skipif(IN_INTERPRETER, reason="this is the subprocess")
def test_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", TIDAL_FORCE_TRITON="1")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        __file__,
        "-k",
        "test_interp_",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


@interp
@pytest.mark.parametrize("fmt", ["fp32", "bf16", "fp8"])
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.float16])
def test_interp_decode_kernel_matches_reference(fmt, q_dtype):
    lens = [1, 17, 50, 64]  # one token, partial page, several pages, exact pages
    cache, tables, seq_lens = make_cache(fmt, lens)
    # (heads, splits): fewer heads than one block with 1 and 3 splits (3 splits leave the
    # short sequences with empty splits); two head blocks with 2 splits (fp16: that one only).
    combos = ((3, 1), (3, 3), (20, 2)) if q_dtype == torch.float32 else ((20, 2),)
    for num_heads, num_splits in combos:
        q, q_pe = random_queries(len(lens), num_heads, 128, 32, q_dtype)
        ref = paged_mla_decode_reference(q, q_pe, cache, 1, tables, seq_lens, 0.15)
        out = paged_mla_decode(q, q_pe, cache, 1, tables, seq_lens, 0.15, num_splits=num_splits)
        assert out.dtype == q_dtype and out.shape == ref.shape
        tol = 1e-5 if q_dtype == torch.float32 else 2e-3
        torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


@interp
def test_interp_decode_kernel_k2_shapes():
    # kv_lora_rank 512, rope 64, page 64: the real layout, with strided (sliced) queries.
    lens = [1, 100, 129]
    cache, tables, seq_lens = make_cache("fp8", lens, r=512, rope=64, page_size=64)
    q_full, pe_full = random_queries(3, 16, 512, 128, torch.float32)
    q, q_pe = q_full[:, ::2], pe_full[:, ::2, :64]  # head and row strides differ from contiguous
    ref = paged_mla_decode_reference(q, q_pe, cache, 1, tables, seq_lens, 0.07)
    for num_splits in (2, None):
        out = paged_mla_decode(q, q_pe, cache, 1, tables, seq_lens, 0.07, num_splits=num_splits)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interp_fp8_quantize_is_bitwise_equal(dtype):
    g = torch.Generator().manual_seed(5)
    wide = torch.randn(40, 384, generator=g) * torch.logspace(-5, 4, 40)[:, None]
    wide[0] = 0.0  # all-zero group: scale clamps to 1e-12
    wide[1, :128] = -wide[1, :128].abs()
    x = wide.to(dtype)[:, :256]  # row stride 384: strided input
    q, scale = quantize_latent_fp8(x)
    q_ref, scale_ref = kv_cache.quantize_latent_fp8(x.contiguous())
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@interp
def test_interp_fp8_encoding_rounds_ties_to_even_everywhere():
    # With one value at 448 in each group the scale is exactly 1, so the kernel must encode the
    # other values as torch does: every code, every midpoint between codes, and their neighbours.
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]  # drop the two NaN codes
    vals = codes.view(torch.float8_e4m3fn).float().sort().values
    mids = (vals[1:] + vals[:-1]) / 2
    probes = torch.cat([vals, mids, mids.nextafter(mids + 1), mids.nextafter(mids - 1)])
    rows = -(-probes.numel() // 127)
    x = torch.zeros(rows * 127)
    x[: probes.numel()] = probes
    x = torch.cat([torch.full((rows, 1), 448.0), x.view(rows, 127)], dim=1)  # [rows, 128]
    q, scale = quantize_latent_fp8(x)
    assert bool((scale == 1.0).all())
    assert torch.equal(q.view(torch.uint8), x.to(torch.float8_e4m3fn).view(torch.uint8))


@interp
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_interp_fp8_dequantize_matches_reference(out_dtype):
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]  # NaN codes decode as +-480 in the interpreter
    q = codes[torch.randperm(254, generator=torch.Generator().manual_seed(2))]
    q = torch.cat([q, q[:2]]).view(2, 128).repeat(3, 2).view(torch.float8_e4m3fn)  # [6, 256]
    scale = torch.rand(6, 2, generator=torch.Generator().manual_seed(4)) + 0.01
    out = dequantize_latent_fp8(q, scale, out_dtype)
    ref = kv_cache.dequantize_latent_fp8(q, scale).to(out_dtype)
    assert out.dtype == out_dtype and torch.equal(out, ref)
    records = pack_fp8_records(torch.randn(5, 256), torch.randn(5, 64))  # codec round trip
    c_kv, _ = unpack_fp8_records(records, 256)
    ref_c, _ = PagedLatentCache(1, 256, 64, 1, 16, "fp8").unpack(records)
    assert torch.equal(c_kv, ref_c)
