"""Split-KV (flash-decoding) Triton kernel for absorbed-MLA decode over the paged latent cache.

Grid ``(B, cdiv(H, BLOCK_H), num_splits)``: each program takes one sequence, a block of heads and
one contiguous share of that sequence's tokens, walks it ``BLOCK_N`` tokens at a time (looking up
each token's page in the block table) with an online softmax, and writes a partial output and
its log-sum-exp. A second kernel merges the splits. The latent tile serves as key (scores) and
value (output), which is what makes the absorbed form read each cached value once.

Cache formats, all read through typed views of the same uint8 pool and upcast to fp32:
- fp32: the fp32 record view.
- bf16: the record view reinterpreted as int16; values rebuilt as ``bits << 16`` in fp32,
  which is exact and sidesteps the interpreter's bf16 handling.
- fp8: e4m3 bytes bitcast to ``float8e4nv`` and upcast, times the per-128 fp32 scale; k_pe is
  bf16 bits as above.

Imported lazily by ``model.kernels.mla_decode`` (only when Triton runs).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from model.kv_cache import FP8_GROUP, KVFormat, PagedLatentCache

_FMT_CODE = {KVFormat.FP32: 0, KVFormat.BF16: 1, KVFormat.FP8: 2}
_LOG2E = 1.4426950408889634


@triton.jit
def _load_kv_tile(ptr, row_off, offs_d, mask_t, FMT: tl.constexpr):
    """[BLOCK_N, D] tile of one record part as fp32 (FMT 0: fp32, 1: bf16 bits as int16)."""
    x = tl.load(ptr + row_off[:, None] + offs_d[None, :], mask=mask_t[:, None], other=0)
    if FMT == 1:
        x = ((x.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def _mla_decode_split_kernel(
    q_ptr,  # [B, H, R]
    qpe_ptr,  # [B, H, ROPE]
    lat_ptr,  # fp32 / int16(bf16) record view [P, S, R + ROPE], or uint8 e4m3 [P, S, R]
    scale_ptr,  # fp32 [P, S, R/128] (fp8 only; otherwise unused)
    kpe_ptr,  # k_pe part [P, S, ROPE]: record view offset by R, or int16(bf16) for fp8
    bt_ptr,  # int32 [B, max_pages]
    lens_ptr,  # int32 [B]
    part_out_ptr,  # fp32 [B, H, NUM_SPLITS, R]
    part_lse_ptr,  # fp32 [B, H, NUM_SPLITS] (base 2)
    sm_scale_log2,
    num_heads,
    stride_qb,
    stride_qh,
    stride_peb,
    stride_peh,
    stride_lat_p,
    stride_lat_t,
    stride_sc_p,
    stride_sc_t,
    stride_kpe_p,
    stride_kpe_t,
    stride_bt_b,
    PAGE_SIZE: tl.constexpr,
    R: tl.constexpr,
    ROPE: tl.constexpr,
    GROUP: tl.constexpr,
    FMT: tl.constexpr,  # 0 fp32, 1 bf16, 2 fp8
    NUM_SPLITS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    pid_h = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(lens_ptr + b)
    # Step 1: this program's token range [start, end), split sizes rounded to BLOCK_N.
    per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)

    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < num_heads
    offs_r = tl.arange(0, R)
    offs_pe = tl.arange(0, ROPE)
    q = tl.load(
        q_ptr + b * stride_qb + offs_h[:, None] * stride_qh + offs_r[None, :],
        mask=mask_h[:, None],
        other=0.0,
    ).to(tl.float32)  # [BLOCK_H, R]
    q_pe = tl.load(
        qpe_ptr + b * stride_peb + offs_h[:, None] * stride_peh + offs_pe[None, :],
        mask=mask_h[:, None],
        other=0.0,
    ).to(tl.float32)  # [BLOCK_H, ROPE]

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, R], tl.float32)
    # Step 2: online softmax over BLOCK_N-token tiles, each token located through its page.
    for t0 in range(start, end, BLOCK_N):
        offs_t = t0 + tl.arange(0, BLOCK_N)
        mask_t = offs_t < end
        page = tl.load(bt_ptr + b * stride_bt_b + offs_t // PAGE_SIZE, mask=mask_t, other=0)
        page = page.to(tl.int64)
        in_page = (offs_t % PAGE_SIZE).to(tl.int64)
        lat_row = page * stride_lat_p + in_page * stride_lat_t
        kpe_row = page * stride_kpe_p + in_page * stride_kpe_t
        if FMT == 2:
            code = tl.load(
                lat_ptr + lat_row[:, None] + offs_r[None, :], mask=mask_t[:, None], other=0
            )
            c_kv = code.to(tl.float8e4nv, bitcast=True).to(tl.float32)
            sc_row = page * stride_sc_p + in_page * stride_sc_t
            scale = tl.load(
                scale_ptr + sc_row[:, None] + (offs_r // GROUP)[None, :],
                mask=mask_t[:, None],
                other=0.0,
            )
            c_kv = c_kv * scale  # [BLOCK_N, R]
            k_pe = _load_kv_tile(kpe_ptr, kpe_row, offs_pe, mask_t, 1)
        else:
            c_kv = _load_kv_tile(lat_ptr, lat_row, offs_r, mask_t, FMT)
            k_pe = _load_kv_tile(kpe_ptr, kpe_row, offs_pe, mask_t, FMT)
        s = tl.dot(q, tl.trans(c_kv), input_precision=DOT_PRECISION)
        s += tl.dot(q_pe, tl.trans(k_pe), input_precision=DOT_PRECISION)
        s = tl.where(mask_t[None, :], s * sm_scale_log2, float("-inf"))  # [BLOCK_H, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, c_kv, input_precision=DOT_PRECISION)
        m_i = m_new

    # Step 3: partial output and base-2 log-sum-exp (-inf for an empty split).
    has_tokens = l_i > 0
    out = acc / tl.where(has_tokens, l_i, 1.0)[:, None]
    lse = tl.where(has_tokens, m_i + tl.log2(tl.where(has_tokens, l_i, 1.0)), float("-inf"))
    row = (b * num_heads + offs_h) * NUM_SPLITS + split
    tl.store(part_out_ptr + row[:, None] * R + offs_r[None, :], out, mask=mask_h[:, None])
    tl.store(part_lse_ptr + row, lse, mask=mask_h)


@triton.jit
def _combine_splits_kernel(
    part_out_ptr,  # fp32 [B, H, NUM_SPLITS, R]
    part_lse_ptr,  # fp32 [B, H, NUM_SPLITS]
    out_ptr,  # [B, H, R] in q's dtype
    num_heads,
    stride_ob,
    stride_oh,
    R: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_P2: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_P2)
    offs_r = tl.arange(0, R)
    mask_s = offs_s < NUM_SPLITS
    row = (b * num_heads + h) * NUM_SPLITS
    lse = tl.load(part_lse_ptr + row + offs_s, mask=mask_s, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, axis=0))  # split 0 always has tokens, so the max is finite
    part = tl.load(
        part_out_ptr + (row + offs_s)[:, None] * R + offs_r[None, :],
        mask=mask_s[:, None],
        other=0.0,
    )
    out = tl.sum(part * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_r, out.to(out_ptr.dtype.element_ty))


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: keep the grid small
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_num_splits(batch: int, head_blocks: int, max_tokens: int, device: torch.device) -> int:
    """Enough programs to fill the GPU about twice, each with at least 256 tokens."""
    num_sms = _num_sms(device)
    want = triton.cdiv(2 * num_sms, max(1, batch * head_blocks))
    return max(1, min(want, triton.cdiv(max_tokens, 256), 64))


def paged_mla_decode_triton(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    cache: PagedLatentCache,
    layer: int,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
    num_splits: int | None = None,
    block_h: int = 16,
    block_n: int = 16,
) -> torch.Tensor:
    """Launch the split and combine kernels (inputs already checked by ``paged_mla_decode``)."""
    b, h, r = q_latent.shape
    rope = cache.rope_dim
    assert triton.next_power_of_2(r) == r and triton.next_power_of_2(rope) == rope, (
        f"the Triton kernel needs power-of-two kv_lora_rank and rope dims, got {r}, {rope}"
    )
    head_blocks = triton.cdiv(h, block_h)
    if num_splits is None:
        max_tokens = block_tables.shape[1] * cache.page_size
        num_splits = default_num_splits(b, head_blocks, max_tokens, q_latent.device)
    fmt = cache.fmt
    if fmt is KVFormat.FP8:
        q8, scale, k_pe = cache.fp8_views(layer)
        lat, k_pe = q8.view(torch.uint8), k_pe.view(torch.int16)
    else:
        rec = cache.latent_view(layer)
        lat = rec.view(torch.int16) if fmt is KVFormat.BF16 else rec
        scale, k_pe = lat, lat[..., r:]  # scale unused outside fp8
    part_out = torch.empty(b, h, num_splits, r, dtype=torch.float32, device=q_latent.device)
    part_lse = torch.empty(b, h, num_splits, dtype=torch.float32, device=q_latent.device)
    out = torch.empty_like(q_latent)
    if b == 0:
        return out
    precision = "ieee" if q_latent.dtype == torch.float32 else "tf32"
    _mla_decode_split_kernel[(b, head_blocks, num_splits)](
        q_latent,
        q_pe,
        lat,
        scale,
        k_pe,
        block_tables,
        seq_lens,
        part_out,
        part_lse,
        softmax_scale * _LOG2E,
        h,
        q_latent.stride(0),
        q_latent.stride(1),
        q_pe.stride(0),
        q_pe.stride(1),
        lat.stride(0),
        lat.stride(1),
        scale.stride(0),
        scale.stride(1),
        k_pe.stride(0),
        k_pe.stride(1),
        block_tables.stride(0),
        PAGE_SIZE=cache.page_size,
        R=r,
        ROPE=rope,
        GROUP=FP8_GROUP,
        FMT=_FMT_CODE[fmt],
        NUM_SPLITS=num_splits,
        BLOCK_H=block_h,
        BLOCK_N=block_n,
        DOT_PRECISION=precision,
        num_warps=8,
        num_stages=2,
    )
    _combine_splits_kernel[(b, h)](
        part_out,
        part_lse,
        out,
        h,
        out.stride(0),
        out.stride(1),
        R=r,
        NUM_SPLITS=num_splits,
        SPLITS_P2=triton.next_power_of_2(num_splits),
    )
    return out
