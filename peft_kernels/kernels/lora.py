"""Fused LoRA linear: Triton kernels and their launchers.

Forward, 2 launches:
  1. ``_shrink_kernel``   S = drop(x)·Aᵀ / (1-p), fp32 [M, R]      (dropout mask drawn in-kernel and written
                          packed, 1 bit per element); split-K at small M (``shrink_splits``): one fp32 partial
                          of S per K span, so decode fills the machine instead of running one program over K
  2. ``_fwd_gemm_kernel`` Y = x·Wᵀ + s·S·Bᵀ + b, with S·Bᵀ accumulated into the base GEMM's tile (it sums
                          the split-K partials of S in a fixed order and column block 0 stores S)
Backward, at most 3 launches:
  1. ``_bwd_dy_kernel``   reads each dY tile once for dS = s·dY·B (fp32 [M, R]) and for
                          per-M-block partials of dB = s·dYᵀ·S; with fewer row programs than the machine's it
                          also splits N (``dy_splits``): one fp32 partial of dS per N span
  2. ``_bwd_dx_kernel``   dX = dY·W + mask ⊙ (dS·A)/(1-p) in one GEMM (skipped if x needs no grad); it sums the
                          dS partials in a fixed order and column block 0 stores the sum for dA
  3. ``_bwd_da_kernel``   dA = dSᵀ·drop(x)/(1-p), plus the deterministic fixed-order reduction of the dB
                          partials in extra programs
Decode (``fused_decode``: M ≤ 64, 16-bit x and adapters, rank ≤ the GEMM's rank tile), 1 forward and 2
backward launches: the forward GEMM computes S = x·Aᵀ from its own x tiles (column block 0 stores it; with
dropout the shrink still runs, since it draws the mask), dX computes dS = s·dY·B from its own dY tiles, and
the dA launch's extra programs compute dB = s·dYᵀ·S from dY and S walking M (``DB_DIRECT``). There one row
block would have left the shrink and the dY launch a single program each (the dY one streaming all of B
alone: 12-99 µs in the launch model against ~2 µs). Every launch fills the machine at the Llama-3-8B shapes
(``python -m peft_kernels.bench --model h200``): the decode GEMM tiles narrow to 16 columns where 32 would
leave programs short (``_fill_cols``), and the dA launch's K tile narrows likewise (``_fill_da``).
sm_90 past the decode bucket (``tma_gemm``: 16-bit x, W and adapters of one dtype, TMA-aligned strides): the
forward GEMM and dX are persistent TMA kernels (``_fwd_gemm_tma_kernel``, ``_bwd_dx_tma_kernel``): at most one
program per SM walks output tiles in grouped order, x/dY and W tiles arrive by TMA (host-side tensor
descriptors, so no global allocator is set; out-of-range rows read as 0) into 4 shared-memory stages feeding
async wgmma; the LoRA tile and the epilogue are the same code as the cp.async kernels'. That is what the
supported triton versions (3.6-3.8) offer on Hopper without changing a user's global state: device-side
descriptors need ``triton.set_allocator``; ``tl.range(flatten=True)`` compiles to the same kernel (the LoRA
tile's loops keep the nest from flattening); warp specialization was not tried (no GPU to measure it). The
H200 measured the cp.async GEMM at 0.57-0.73 of ``torch.mm``; the launch model says fusion ties our cuBLAS
path at prefill only at 1.00-1.04 of cuBLAS's rate (``bench --model``), so the measured dispatch keeps
prefill on the torch path until gpu-check measures the TMA kernels there. ``PEFT_KERNELS_TMA=0`` turns them off.
Dropout: the shrink draws the mask once, a byte (8 elements) per two Philox calls using all 4 outputs of
each (``_common.dropout_bytes``), unpacks it in registers for its own x tile, and writes it packed (uint8
[M, ⌈K/8⌉], M·K/8 bytes); dX and dA read those bits. Before, all three kernels regenerated the mask, one
Philox call per element each (dX grew from 840 to 4096 SASS instructions on sm_90, and dropout cost 1.47×
the p=0 forward+backward on an H200 against HF PEFT's 1.09×). The trade-off: M·K/8 bytes kept for backward
beside x's 2·M·K (+6 % of what x costs) and 3·M·K/8 bytes of traffic (6 MiB at M=K=4096, about 1.5 µs at
4.3 TB/s), against 11/12 of the Philox work (3 calls per element → 1/4: 50.3M → 4.2M calls at that shape).
The seed is an int64 the shrink loads from a device tensor (``_common.draw_seed``), so it never changes a
compiled variant and CUDA-graph replays draw a fresh one.
All dots accumulate in fp32. The LoRA dots run in the adapter's dtype (fp32 adapters on a half
base compute the branch in fp32, as HF PEFT does, on tensor cores: see ``_common.f32_precision``).

Addresses are 64-bit: every ``row × stride`` (and every index × runtime stride) is formed from int64
indices, so any tensor torch can allocate is addressed correctly (``aot.offset_problems`` checks the
compiled IR); sizes are 32-bit arguments, bounded by ``_common.check_dims``.

dB is reduced deterministically without an M-sized buffer: the dY launch has at most
``program_budget`` (≈ the SM count) row programs, each walking row blocks ``pid, pid + P, ...`` and
accumulating its dB partial in place, in that order; the dA launch sums the P partials in a fixed
order. The partial buffer is P·N·R fp32, bounded by the machine, not by M.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (ACT_NONE, INTERPRETED, TensorDescriptor, acc_chunk, acc_flush, act, act_grad, check_dims,
                      dropout_bytes, expand_bytes, f32_precision, load_keep, mma, mma_acc, next_pow2, program_budget,
                      tma_available, upcast_needed)


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(row-block, col-block) of program ``pid`` in grouped order: GROUP_M row-blocks share the
    second operand's tiles in L2."""
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    gsize = min(num_m - first_m, GROUP_M)
    return first_m + (pid % gsize), (pid % (GROUP_M * num_n)) // gsize


@triton.jit
def _low_rank_tile(s_ptr, rm, m_ok, R, w_ptr, rc, c_ok, stride_wr, stride_wc,
                   UPCAST: tl.constexpr, F32_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_C: tl.constexpr, num_parts=1, part_stride=0, s_out_ptr=None, store_s=False,
                   STORE_S: tl.constexpr = False):
    """fp32 [BM, BC] tile of ``S[rm, :R] · W[:R, rc]`` with S an fp32 [M, R] row-major buffer and
    W read through (stride_wr, stride_wc); S is cast to W's dtype for the dot, as in PyTorch.
    ``rm``/``rc`` are int64 (64-bit addresses).

    Split-K shrink: S is the sum of ``num_parts`` fp32 partials ``part_stride`` apart, added here in a fixed
    order (deterministic); with STORE_S, programs where ``store_s`` holds also write that sum to
    ``s_out_ptr`` (the S that backward reads)."""
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    rr0 = tl.arange(0, BLOCK_R)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + rr0
        s_msk = m_ok[:, None] & (rr[None, :] < R)
        s_off = rm[:, None] * R + rr[None, :]
        st = tl.load(s_ptr + s_off, mask=s_msk, other=0.0)
        for j in range(1, num_parts):  # partial j is j·M·R floats in: a 64-bit product
            st += tl.load(s_ptr + tl.cast(j, tl.int64) * part_stride + s_off, mask=s_msk, other=0.0)
        if STORE_S:
            tl.store(s_out_ptr + s_off, st, mask=s_msk & store_s)
        wt = tl.load(w_ptr + rr.to(tl.int64)[:, None] * stride_wr + rc[None, :] * stride_wc,
                     mask=(rr[:, None] < R) & c_ok[None, :], other=0.0)
        acc = mma(st.to(wt.dtype), wt, acc, UPCAST, F32_PREC)
    return acc


@triton.jit
def _wq_tile(q_ptr, row_e, n, n_ok, k, k_ok, code_ptr, scale_ptr, zero_ptr, WQ: tl.constexpr, WQ_SHIFT: tl.constexpr,
             WQ_ROW: tl.constexpr, WQ_ALIGNED: tl.constexpr, code2_ptr=None, absmax2_ptr=None, offset=0.0,
             WQ_DQ: tl.constexpr = False, WQ_SHIFT2: tl.constexpr = 8):
    """W[n, k] of a row-major [N, K] quantized weight (``QuantOperand``), dequantized to fp32 as the quantizers
    compute it (one fp32 product), as an [n, k] tile. ``row_e`` = n·K (int64, per row); ``k`` int32 columns.

    WQ=1: 4-bit codes, two per byte in bitsandbytes' order (even element in the high nibble), through the
    16-entry fp32 ``code`` table, times the fp32 absmax of the element's block of 2^WQ_SHIFT elements; WQ=2:
    int8 times the scale of its block (WQ_ROW: one scale per row); WQ=3: (int8 - zero point) times the scale.
    WQ_DQ (bitsandbytes' double quantization): the absmax is itself a uint8 code, dequantized here as
    bitsandbytes does, ``code2[q] · absmax2[block >> WQ_SHIFT2] + offset`` (on a GPU ptxas may fuse that into one
    FMA: the absmax then differs from bitsandbytes' by at most an fp32 rounding).

    WQ_ALIGNED (K a multiple of the block, so even): rows start on a byte and a block, and the addresses are a
    per-row base plus 32-bit column offsets; otherwise each element's flat index e = n·K + k is formed in 64 bits.
    Each element loads its byte (the neighbour's load hits the same cache line): loading a [n, KW/2] byte tile and
    interleaving the nibbles in registers (``tl.join``) took a third of the byte loads but spilled 8-20 bytes in 7
    of the matrix's variants (decode tiles and fp32 dX, triton 3.8), so it is not used."""
    msk = n_ok[:, None] & k_ok[None, :]
    if WQ_ALIGNED:
        if WQ == 1:
            byte = tl.load(q_ptr + (row_e >> 1)[:, None] + (k >> 1)[None, :], mask=msk, other=0).to(tl.int32)
            odd = (k & 1)[None, :]
        else:
            qv = tl.load(q_ptr + row_e[:, None] + k[None, :], mask=msk, other=0)
        blk = (row_e >> WQ_SHIFT)[:, None] + (k >> WQ_SHIFT)[None, :]
    else:
        e = row_e[:, None] + k[None, :]
        if WQ == 1:
            byte = tl.load(q_ptr + (e >> 1), mask=msk, other=0).to(tl.int32)
            odd = (e & 1).to(tl.int32)
        else:
            qv = tl.load(q_ptr + e, mask=msk, other=0)
        blk = e >> WQ_SHIFT
    if WQ_ROW:
        sc = tl.load(scale_ptr + n, mask=n_ok, other=0.0)[:, None]
    elif WQ_DQ:
        q8 = tl.load(scale_ptr + blk, mask=msk, other=0).to(tl.int32)
        sc = tl.load(code2_ptr + q8, mask=msk, other=0.0) * tl.load(absmax2_ptr + (blk >> WQ_SHIFT2), mask=msk,
                                                                     other=0.0) + offset
    else:
        sc = tl.load(scale_ptr + blk, mask=msk, other=0.0)
    if WQ == 1:
        v = tl.load(code_ptr + ((byte >> (4 - 4 * odd)) & 15), mask=msk, other=0.0)
    elif WQ == 2:
        v = qv.to(tl.float32)
    else:
        zp = tl.load(zero_ptr + blk, mask=msk, other=0).to(tl.int32)
        v = (qv.to(tl.int32) - zp).to(tl.float32)
    return v * sc


@triton.jit
def _gemm_mainloop(acc, a_ptr, rm, m_ok, stride_am, stride_ak, b_ptr, rc, c_ok, stride_bk, stride_bc, KD,
                   UPCAST: tl.constexpr, F32_PREC: tl.constexpr, BLOCK_K: tl.constexpr, ACC_CHUNK: tl.constexpr = 0,
                   WQ: tl.constexpr = 0, wq_code_ptr=None, wq_scale_ptr=None, wq_zero_ptr=None, wq_K=1,
                   WQ_SHIFT: tl.constexpr = 0, WQ_ROW: tl.constexpr = False, WQ_ALIGNED: tl.constexpr = False,
                   WQ_T: tl.constexpr = False, wq_code2_ptr=None, wq_absmax2_ptr=None, wq_offset=0.0,
                   WQ_DQ: tl.constexpr = False, WQ_SHIFT2: tl.constexpr = 8):
    """``acc + a[rm, :KD] · b[:KD, rc]``, both operands read through their strides (``rm``/``rc`` int64);
    summed in two levels with ACC_CHUNK > 0 (fp32 operands, see ``_common.mma_acc``). WQ > 0: b is a quantized
    weight W [N, K=wq_K] (``b_ptr`` its packed data; the strides are unused), dequantized tile by tile into a's
    dtype in registers (``_wq_tile``): nothing dequantized reaches memory. b = Wᵀ (the forward: the reduction runs
    over W's columns) or, with WQ_T, b = W (dX: over its rows)."""
    rk0 = tl.arange(0, BLOCK_K)
    a_row = a_ptr + rm[:, None] * stride_am
    b_col = b_ptr + rc[None, :] * stride_bc
    part = tl.zeros_like(acc) if ACC_CHUNK > 0 else 0.0
    if WQ > 0 and not WQ_T:
        row_e = rc * wq_K  # the output columns are W's rows: their flat offsets, once
    for k0 in range(0, KD, BLOCK_K):
        rk = k0 + rk0
        rk64 = rk.to(tl.int64)
        at = tl.load(a_row + rk64[None, :] * stride_ak, mask=m_ok[:, None] & (rk[None, :] < KD), other=0.0)
        if WQ > 0:
            if WQ_T:  # [n = rk, k = rc]
                bt = _wq_tile(b_ptr, rk64 * wq_K, rk64, rk < KD, rc.to(tl.int32), c_ok, wq_code_ptr, wq_scale_ptr,
                              wq_zero_ptr, WQ, WQ_SHIFT, WQ_ROW, WQ_ALIGNED, wq_code2_ptr, wq_absmax2_ptr, wq_offset,
                              WQ_DQ, WQ_SHIFT2)
            else:  # [n = rc, k = rk], transposed to [k, n]
                bt = tl.trans(_wq_tile(b_ptr, row_e, rc, c_ok, rk, rk < KD, wq_code_ptr, wq_scale_ptr, wq_zero_ptr,
                                       WQ, WQ_SHIFT, WQ_ROW, WQ_ALIGNED, wq_code2_ptr, wq_absmax2_ptr, wq_offset,
                                       WQ_DQ, WQ_SHIFT2))
            bt = bt.to(at.dtype)
        else:
            bt = tl.load(b_col + rk64[:, None] * stride_bk, mask=(rk[:, None] < KD) & c_ok[None, :], other=0.0)
        acc, part = mma_acc(at, bt, acc, part, k0 // BLOCK_K, UPCAST, F32_PREC, ACC_CHUNK)
    return acc_flush(acc, part, ACC_CHUNK)


@triton.jit
def _gemm_mainloop_side(acc, a_ptr, rm, m_ok, stride_am, stride_ak, b_ptr, rc, c_ok, stride_bk, stride_bc, KD,
                        c_ptr, R, stride_ck, stride_cr, UPCAST: tl.constexpr, F32_PREC: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """``_gemm_mainloop`` (16-bit operands: one-level sums) that also returns the low-rank side product
    ``a[rm, :KD] · c[:KD, :R]`` (fp32 [BLOCK_M, BLOCK_R], R ≤ BLOCK_R) from the same ``a`` tiles: the decode
    shrink S = x·Aᵀ fused into the forward GEMM (c = Aᵀ), and dS = dY·B fused into dX (c = B). c's tile is
    [BLOCK_K, BLOCK_R], read through (stride_ck, stride_cr)."""
    rk0 = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    a_row = a_ptr + rm[:, None] * stride_am
    b_col = b_ptr + rc[None, :] * stride_bc
    c_col = c_ptr + rr.to(tl.int64)[None, :] * stride_cr
    side = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, KD, BLOCK_K):
        rk = k0 + rk0
        rk64 = rk.to(tl.int64)
        k_ok = rk < KD
        at = tl.load(a_row + rk64[None, :] * stride_ak, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        bt = tl.load(b_col + rk64[:, None] * stride_bk, mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        ct = tl.load(c_col + rk64[:, None] * stride_ck, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = mma(at, bt, acc, UPCAST, F32_PREC)
        side = mma(at.to(ct.dtype), ct, side, UPCAST, F32_PREC)
    return acc, side


@triton.jit
def _side_expand(side, rm, m_ok, R, w_ptr, rc, c_ok, stride_wr, stride_wc, out_ptr, store,
                 UPCAST: tl.constexpr, F32_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    """The fused epilogue's low-rank term: stores the fp32 ``side`` [BLOCK_M, BLOCK_R] (S or dS) to
    ``out_ptr`` [M, R] where ``store`` holds (one column block), and returns ``side · W[:R, rc]`` (fp32
    [BLOCK_M, BLOCK_C]) with side cast to W's dtype, as ``_low_rank_tile`` does."""
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    tl.store(out_ptr + rm[:, None] * R + rr[None, :], side, mask=m_ok[:, None] & r_ok[None, :] & store)
    wt = tl.load(w_ptr + rr.to(tl.int64)[:, None] * stride_wr + rc[None, :] * stride_wc,
                 mask=r_ok[:, None] & c_ok[None, :], other=0.0)
    return mma(side.to(wt.dtype), wt, tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32), UPCAST, F32_PREC)


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, s_ptr, seed_ptr, bits_ptr, M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak,
    p, keep_scale, k_per_split, part_stride,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, F32_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, ACC_CHUNK: tl.constexpr = 0,
):
    # grid (row blocks, rank chunks, K splits): split j reduces K in [j·k_per_split, (j+1)·k_per_split) into
    # its own fp32 partial S_j (part_stride = M·R apart); the forward GEMM adds the partials in order.
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    split = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rm64 = rm.to(tl.int64)
    rr64 = rr.to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        K8 = tl.cdiv(K, 8)
        rb0 = tl.arange(0, BLOCK_K // 8)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    # this split's K span [k_lo, k_lo + k_span): the base pointers step by k_lo once (64-bit), the loop
    # indices stay 32-bit local offsets (no 32-bit product reaches an address, no 64-bit tiles)
    k_lo = split.to(tl.int64) * k_per_split
    k_span = tl.minimum(K - k_lo, k_per_split).to(tl.int32)
    x_base = x_ptr + k_lo * stride_xk
    a_base = a_ptr + k_lo * stride_ak
    part = tl.zeros_like(acc) if ACC_CHUNK > 0 else 0.0
    for k0 in range(0, k_span, BLOCK_K):
        kk = k0 + rk
        kk64 = kk.to(tl.int64)
        xt = tl.load(x_base + rm64[:, None] * stride_xm + kk64[None, :] * stride_xk,
                     mask=(rm[:, None] < M) & (kk[None, :] < k_span), other=0.0)
        if HAS_DROPOUT:
            # the mask bytes of this tile (a quarter of a Philox call per element), stored once for
            # backward (by the first rank chunk; split tiles start at multiples of BLOCK_K, so of 8)
            rb = (k_lo + k0) // 8 + rb0
            byte = dropout_bytes(seed, rm[:, None], rb[None, :], K8, p)
            tl.store(bits_ptr + rm64[:, None] * K8 + rb[None, :], byte.to(tl.uint8),
                     mask=(rm[:, None] < M) & (rb[None, :] < K8) & (pid_r == 0))
            xt = tl.where(expand_bytes(byte.to(tl.uint8), BLOCK_M, BLOCK_K) != 0, xt, 0.0)
        at = tl.load(a_base + rr64[None, :] * stride_ar + kk64[:, None] * stride_ak,
                     mask=(rr[None, :] < R) & (kk[:, None] < k_span), other=0.0)
        acc, part = mma_acc(xt.to(at.dtype), at, acc, part, k0 // BLOCK_K, UPCAST, F32_PREC, ACC_CHUNK)
    acc = acc_flush(acc, part, ACC_CHUNK)
    if HAS_DROPOUT:
        acc = acc * keep_scale
    out = s_ptr + split.to(tl.int64) * part_stride
    tl.store(out + rm64[:, None] * R + rr[None, :], acc, mask=(rm[:, None] < M) & (rr[None, :] < R))


@triton.jit
def _fwd_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, s_ptr, b_ptr, y_ptr, M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_bn, stride_br, stride_ym, stride_yn,
    scaling,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, F32_PREC: tl.constexpr, LORA_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, g_ptr=None, z_ptr=None, COL_SCALE: tl.constexpr = False, STORE_Z: tl.constexpr = False,
    num_parts=1, part_stride=0, s_out_ptr=None, STORE_S: tl.constexpr = False, ACC_CHUNK: tl.constexpr = 0,
    a_ptr=None, stride_ar=0, stride_ak=0, FUSE_SHRINK: tl.constexpr = False,
    WQ: tl.constexpr = 0, wq_code_ptr=None, wq_scale_ptr=None, wq_zero_ptr=None, WQ_SHIFT: tl.constexpr = 0,
    WQ_ROW: tl.constexpr = False, WQ_ALIGNED: tl.constexpr = False, wq_code2_ptr=None, wq_absmax2_ptr=None,
    wq_offset=0.0, WQ_DQ: tl.constexpr = False, WQ_SHIFT2: tl.constexpr = 8,
):
    # WQ > 0: w_ptr is a quantized weight's packed data (``QuantOperand``), dequantized in the mainloop (never
    # with FUSE_SHRINK).
    # Split-K shrink (STORE_S): s_ptr holds num_parts partials of S; the programs of column block 0 write
    # their sum to s_out_ptr for backward.
    # COL_SCALE (DoRA's epilogue): z = x·Wᵀ + s·S·Bᵀ is scaled per output column by g before the bias,
    # y = g ⊙ z + b; STORE_Z also writes z (in y's dtype) for the magnitude's gradient.
    # F32_PREC: the base GEMM's fp32 dots; LORA_PREC: the low-rank tile's (differs for fp32 adapters on a
    # 16-bit base, where the base dots are 16-bit).
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    if FUSE_SHRINK:
        # decode (no shrink launch): S = x·Aᵀ from the mainloop's own x tiles, stored by column block 0 to
        # s_out_ptr; the expand s · S·Bᵀ joins in the epilogue
        acc, st = _gemm_mainloop_side(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), x_ptr, rm64, m_ok, stride_xm,
                                      stride_xk, w_ptr, rn64, n_ok, stride_wk, stride_wn, K, a_ptr, R, stride_ak,
                                      stride_ar, UPCAST, F32_PREC, BLOCK_M, BLOCK_K, BLOCK_R)
        acc += _side_expand(st, rm64, m_ok, R, b_ptr, rn64, n_ok, stride_br, stride_bn, s_out_ptr, pid_n == 0,
                            UPCAST, LORA_PREC, BLOCK_M, BLOCK_R, BLOCK_N) * scaling
    else:
        # LoRA expand first, so its tile becomes the base GEMM's accumulator: s · S[BM, R] · Bᵀ[R, BN]
        acc = _low_rank_tile(s_ptr, rm64, m_ok, R, b_ptr, rn64, n_ok, stride_br, stride_bn,
                             UPCAST, LORA_PREC, BLOCK_M, BLOCK_R, BLOCK_N, num_parts, part_stride, s_out_ptr,
                             pid_n == 0, STORE_S) * scaling
        acc = _gemm_mainloop(acc, x_ptr, rm64, m_ok, stride_xm, stride_xk, w_ptr, rn64, n_ok, stride_wk, stride_wn,
                             K, UPCAST, F32_PREC, BLOCK_K, ACC_CHUNK, WQ, wq_code_ptr, wq_scale_ptr, wq_zero_ptr, K,
                             WQ_SHIFT, WQ_ROW, WQ_ALIGNED, False, wq_code2_ptr, wq_absmax2_ptr, wq_offset, WQ_DQ,
                             WQ_SHIFT2)
    _fwd_epilogue(acc, rm64, m_ok, rn, rn64, n_ok, y_ptr, stride_ym, stride_yn, bias_ptr, HAS_BIAS, g_ptr, z_ptr,
                  COL_SCALE, STORE_Z)


@triton.jit
def _fwd_epilogue(acc, rm64, m_ok, rn, rn64, n_ok, y_ptr, stride_ym, stride_yn, bias_ptr, HAS_BIAS: tl.constexpr,
                  g_ptr, z_ptr, COL_SCALE: tl.constexpr, STORE_Z: tl.constexpr):
    """The forward GEMM's epilogue: DoRA's column scale (storing z first with STORE_Z), the bias, the store."""
    if COL_SCALE:
        if STORE_Z:
            tl.store(z_ptr + rm64[:, None] * stride_ym + rn64[None, :] * stride_yn, acc.to(z_ptr.dtype.element_ty),
                     mask=m_ok[:, None] & n_ok[None, :])
        acc = acc * tl.load(g_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm64[:, None] * stride_ym + rn64[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _tma_mainloop(acc, a_desc, off_m, b_desc, off_c, KD, UPCAST: tl.constexpr, F32_PREC: tl.constexpr,
                  BLOCK_K: tl.constexpr, B_TRANS: tl.constexpr):
    """``acc + a[off_m : off_m + BM, :KD] · b``, both tiles loaded by TMA from their descriptors (rows and
    columns past the tensor's end read as 0, so no masks). ``b_desc`` describes W [N, K]. With B_TRANS (the
    forward GEMM: output columns are W's rows) the [BC, BLOCK_K] tile at [off_c, k] is used transposed, as
    wgmma reads it from shared memory; otherwise (dX: W's rows are the reduction) the [BLOCK_K, BC] tile at
    [k, off_c] is used as it is."""
    for k0 in range(0, KD, BLOCK_K):
        a = a_desc.load([off_m, k0])
        if B_TRANS:
            b = b_desc.load([off_c, k0]).T
        else:
            b = b_desc.load([k0, off_c])
        acc = mma(a, b, acc, UPCAST, F32_PREC)
    return acc


@triton.jit
def _tile_index(tile, num_m, num_c, M, C, GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Output tile ``tile`` of a persistent GEMM in grouped order: (row block, column block, int64 rows, row
    mask, columns, int64 columns, column mask)."""
    pid_m, pid_c = _grouped_tile(tile, num_m, num_c, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    return pid_m, pid_c, rm.to(tl.int64), rm < M, rc, rc.to(tl.int64), rc < C


@triton.jit
def _fwd_gemm_tma_kernel(
    x_desc, w_desc, bias_ptr, s_ptr, b_ptr, y_ptr, M, N, K, R,
    stride_bn, stride_br, stride_ym, stride_yn, scaling, num_progs,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, F32_PREC: tl.constexpr, LORA_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, g_ptr=None, z_ptr=None, COL_SCALE: tl.constexpr = False, STORE_Z: tl.constexpr = False,
    num_parts=1, part_stride=0, s_out_ptr=None, STORE_S: tl.constexpr = False,
):
    # ``_fwd_gemm_kernel`` for sm_90 at M > 64 (16-bit x, W and adapters): persistent (``num_progs`` programs,
    # at most one per SM, each walking output tiles pid, pid + num_progs, ... in grouped order) with x and W
    # tiles loaded by TMA (``_tma_mainloop``). The LoRA expand and the epilogue are the same code.
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    for tile in range(tl.program_id(0), num_m * num_n, num_progs):
        pid_m, pid_n, rm64, m_ok, rn, rn64, n_ok = _tile_index(tile, num_m, num_n, M, N, GROUP_M, BLOCK_M, BLOCK_N)
        acc = _low_rank_tile(s_ptr, rm64, m_ok, R, b_ptr, rn64, n_ok, stride_br, stride_bn,
                             UPCAST, LORA_PREC, BLOCK_M, BLOCK_R, BLOCK_N, num_parts, part_stride, s_out_ptr,
                             pid_n == 0, STORE_S) * scaling
        acc = _tma_mainloop(acc, x_desc, pid_m * BLOCK_M, w_desc, pid_n * BLOCK_N, K, UPCAST, F32_PREC, BLOCK_K, True)
        _fwd_epilogue(acc, rm64, m_ok, rn, rn64, n_ok, y_ptr, stride_ym, stride_yn, bias_ptr, HAS_BIAS, g_ptr, z_ptr,
                      COL_SCALE, STORE_Z)


@triton.jit
def _bwd_dy_kernel(
    dy_ptr, b_ptr, s_ptr, ds_ptr, dbp_ptr, csp_ptr, M, N, R,
    stride_dym, stride_dyn, stride_bn, stride_br,
    scaling,
    COMPUTE_DB: tl.constexpr, COLSUM: tl.constexpr, ACT: tl.constexpr, UPCAST: tl.constexpr,
    F32_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ACC_CHUNK: tl.constexpr = 0, n_per_split=0, ds_part_stride=0, N_SPLIT: tl.constexpr = False,
    ds_sum_ptr=None, cnt_ptr=None, REDUCE: tl.constexpr = False, RED: tl.constexpr = 512,
):
    # Grid (P, R-chunks, splits). N split (``dy_splits``): split j covers the columns [j·n_per_split,
    # (j+1)·n_per_split) and writes its own fp32 partial of dS, ds_part_stride = M·R apart (dX adds the partials
    # in a fixed order); the dB partials and column sums of the splits are disjoint column ranges of the same
    # buffers. N_SPLIT=False (one split; the bottleneck adapter) compiles none of this.
    # P = num_programs(0) row programs (≈ the SM count) × R-chunks. Program p walks row blocks p, p + P, ...;
    # R ≤ BLOCK_R (the usual case) reads dY exactly once. The dB partial of program p, dbp[p] = Σ over its
    # row blocks of s·dYᵀ·S, is accumulated in place in that fixed order: deterministic, and the buffer is
    # P·N·R fp32 whatever M is.
    # LoRA: S is the shrink output, ACT = ACT_NONE. Bottleneck adapter: S is the pre-activation P,
    # dS becomes dP = (dY·U)⊙act'(P), the dB partials use act(P), and COLSUM adds the per-program
    # column sums of dY (for the up bias and the scale).
    # REDUCE (with N_SPLIT; the bottleneck adapter, whose dP readers take one dS): the last program of each row
    # program's splits × rank chunks to arrive (a self-resetting arrival counter per row program, as in the
    # adapter's shrink) adds the partials in split order into ds_sum_ptr. A split launch has one row block per
    # row program (it splits only when the row programs, one per row block, are fewer than the machine's).
    ds_base = ds_ptr
    pid_p = tl.program_id(0)
    num_p = tl.num_programs(0)
    pid_r = tl.program_id(1)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rn0 = tl.arange(0, BLOCK_N)
    r_ok = rr < R
    part_row = pid_p.to(tl.int64) * N  # this program's partial: rows [pid_p·N, pid_p·N + N) of [P·N, R]
    # this split's N span [n_lo, n_lo + n_span): the base pointers step by n_lo once (64-bit), the loop indices
    # stay 32-bit local offsets (as in the shrink's split K)
    n_span = N
    if N_SPLIT:
        split = tl.program_id(2)
        n_lo = split.to(tl.int64) * n_per_split
        n_span = tl.minimum(N - n_lo, n_per_split).to(tl.int32)
        dy_ptr += n_lo * stride_dyn
        b_ptr += n_lo * stride_bn
        dbp_ptr += n_lo * R
        csp_ptr += n_lo
        ds_ptr += split.to(tl.int64) * ds_part_stride
    for mb in range(pid_p, tl.cdiv(M, BLOCK_M), num_p):
        rm = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = rm < M
        rm64 = rm.to(tl.int64)
        st = tl.load(s_ptr + rm64[:, None] * R + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        ht = act(st, ACT)  # rows past M load 0 and act(0) = 0: they add nothing to the partials
        ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        ds_part = tl.zeros_like(ds) if ACC_CHUNK > 0 else 0.0
        more = mb != pid_p  # not this program's first row block: add to its partial
        for n0 in range(0, n_span, BLOCK_N):
            rn = n0 + rn0
            n_ok = rn < n_span
            rn64 = rn.to(tl.int64)
            dyt = tl.load(dy_ptr + rm64[:, None] * stride_dym + rn64[None, :] * stride_dyn,
                          mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            bt = tl.load(b_ptr + rn64[:, None] * stride_bn + rr.to(tl.int64)[None, :] * stride_br,
                         mask=n_ok[:, None] & r_ok[None, :], other=0.0)
            dyc = dyt.to(bt.dtype)
            ds, ds_part = mma_acc(dyc, bt, ds, ds_part, n0 // BLOCK_N, UPCAST, F32_PREC, ACC_CHUNK)
            if COMPUTE_DB:
                # this block's dB[n, r] (rows past M load as zero), added to the program's partial
                dbt = mma(tl.trans(dyc), ht.to(bt.dtype), tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32),
                          UPCAST, F32_PREC)
                msk = n_ok[:, None] & r_ok[None, :]
                dptr = (dbp_ptr + part_row * R) + rn64[:, None] * R + rr[None, :]
                dbt = dbt * scaling
                if more:
                    dbt += tl.load(dptr, mask=msk, other=0.0)
                tl.store(dptr, dbt, mask=msk)
                if COLSUM:
                    if pid_r == 0:
                        cptr = (csp_ptr + part_row) + rn64
                        cs = tl.sum(dyt.to(tl.float32), axis=0)
                        if more:
                            cs += tl.load(cptr, mask=n_ok, other=0.0)
                        tl.store(cptr, cs, mask=n_ok)
        ds = acc_flush(ds, ds_part, ACC_CHUNK)
        if ACT >= 0:
            ds = ds * act_grad(st, ACT)
        tl.store(ds_ptr + rm64[:, None] * R + rr[None, :], ds * scaling, mask=m_ok[:, None] & r_ok[None, :])
        if COMPUTE_DB:
            # the next row block re-reads the partial: every thread's stores must precede its loads
            tl.debug_barrier()
    if REDUCE:
        tl.debug_barrier()  # this split's dS stores precede the release
        # the last of the row block's splits × rank chunks to arrive sums its rows: one contiguous run of
        # rows·R floats per partial, reduced as flat 1-D chunks (a 2-D tile here spilled 8 bytes on sm_90)
        if tl.atomic_add(cnt_ptr + pid_p, 1, sem="acq_rel") == tl.num_programs(2) * tl.num_programs(1) - 1:
            base = pid_p.to(tl.int64) * BLOCK_M * R
            n_el = tl.minimum(BLOCK_M, M - pid_p * BLOCK_M).to(tl.int64) * R
            for o in range(0, n_el, RED):
                e = o + tl.arange(0, RED)
                e_ok = e < n_el
                tot = tl.zeros((RED,), dtype=tl.float32)
                ptrs = ds_base + base + e
                for _ in range(0, tl.num_programs(2)):  # split order: deterministic; 64-bit pointer steps
                    tot += tl.load(ptrs, mask=e_ok, other=0.0, cache_modifier=".cg")
                    ptrs += ds_part_stride
                tl.store(ds_sum_ptr + base + e, tot, mask=e_ok)
            tl.atomic_xchg(cnt_ptr + pid_p, 0)  # leave the counter at 0 for the next launch


@triton.jit
def _bwd_dx_kernel(
    dy_ptr, w_ptr, ds_ptr, a_ptr, x_ptr, dx_ptr, bits_ptr, M, N, K, R,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_ar, stride_ak, stride_dxm, stride_dxk,
    p, keep_scale,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, F32_PREC: tl.constexpr, LORA_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, ACC_CHUNK: tl.constexpr = 0,
    num_parts=1, part_stride=0, ds_out_ptr=None, STORE_S: tl.constexpr = False,
    b_ptr=None, stride_bn=0, stride_br=0, scaling=1.0, FUSE_DS: tl.constexpr = False,
    WQ: tl.constexpr = 0, wq_code_ptr=None, wq_scale_ptr=None, wq_zero_ptr=None, WQ_SHIFT: tl.constexpr = 0,
    WQ_ROW: tl.constexpr = False, WQ_ALIGNED: tl.constexpr = False, wq_code2_ptr=None, wq_absmax2_ptr=None,
    wq_offset=0.0, WQ_DQ: tl.constexpr = False, WQ_SHIFT2: tl.constexpr = 8,
):
    # WQ > 0: a quantized W dequantized in the mainloop, as in the forward GEMM (never with FUSE_DS).
    # num_parts > 1 (the dY launch split N): ds_ptr holds that many fp32 partials of dS, part_stride apart,
    # added in a fixed order; with STORE_S the programs of column block 0 write the sum to ds_out_ptr (for dA).
    # FUSE_DS (decode, no dY launch): dS = s·dY·B from the mainloop's own dY tiles, stored by column block 0
    # to ds_out_ptr; its term joins in the epilogue.
    pid_m, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_ok = rm < M
    k_ok = rk < K
    rm64 = rm.to(tl.int64)
    rk64 = rk.to(tl.int64)
    if FUSE_DS:
        acc, dst = _gemm_mainloop_side(tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), dy_ptr, rm64, m_ok,
                                       stride_dym, stride_dyn, w_ptr, rk64, k_ok, stride_wn, stride_wk, N, b_ptr, R,
                                       stride_bn, stride_br, UPCAST, F32_PREC, BLOCK_M, BLOCK_N, BLOCK_R)
        lr = _side_expand(dst * scaling, rm64, m_ok, R, a_ptr, rk64, k_ok, stride_ar, stride_ak, ds_out_ptr,
                          pid_k == 0, UPCAST, LORA_PREC, BLOCK_M, BLOCK_R, BLOCK_K)
        if HAS_DROPOUT:
            keep = load_keep(bits_ptr, rm64, m_ok, pid_k * BLOCK_K, tl.cdiv(K, 8), BLOCK_M, BLOCK_K)
            lr = tl.where(keep != 0, lr * keep_scale, 0.0)
        acc += lr
    else:
        # LoRA term first (masked), then the base GEMM accumulates into it: fewer live registers
        acc = _low_rank_tile(ds_ptr, rm64, m_ok, R, a_ptr, rk64, k_ok, stride_ar, stride_ak,
                             UPCAST, LORA_PREC, BLOCK_M, BLOCK_R, BLOCK_K, num_parts, part_stride, ds_out_ptr,
                             pid_k == 0, STORE_S)
        if HAS_DROPOUT:
            keep = load_keep(bits_ptr, rm64, m_ok, pid_k * BLOCK_K, tl.cdiv(K, 8), BLOCK_M, BLOCK_K)
            acc = tl.where(keep != 0, acc * keep_scale, 0.0)
        acc = _gemm_mainloop(acc, dy_ptr, rm64, m_ok, stride_dym, stride_dyn, w_ptr, rk64, k_ok, stride_wn, stride_wk,
                             N, UPCAST, F32_PREC, BLOCK_N, ACC_CHUNK, WQ, wq_code_ptr, wq_scale_ptr, wq_zero_ptr, K,
                             WQ_SHIFT, WQ_ROW, WQ_ALIGNED, True, wq_code2_ptr, wq_absmax2_ptr, wq_offset, WQ_DQ,
                             WQ_SHIFT2)
    tl.store(dx_ptr + rm64[:, None] * stride_dxm + rk64[None, :] * stride_dxk, acc.to(dx_ptr.dtype.element_ty),
             mask=m_ok[:, None] & k_ok[None, :])


@triton.jit
def _bwd_dx_tma_kernel(
    dy_desc, w_desc, ds_ptr, a_ptr, dx_ptr, bits_ptr, M, N, K, R,
    stride_ar, stride_ak, stride_dxm, stride_dxk, p, keep_scale, num_progs,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, F32_PREC: tl.constexpr, LORA_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, num_parts=1, part_stride=0, ds_out_ptr=None, STORE_S: tl.constexpr = False,
):
    # ``_bwd_dx_kernel`` (unfused) for sm_90 at M > 64: persistent, with dY and W tiles loaded by TMA. The LoRA
    # term (dS partials summed, column block 0 storing the sum, the dropout mask) is the same code.
    num_m = tl.cdiv(M, BLOCK_M)
    num_k = tl.cdiv(K, BLOCK_K)
    for tile in range(tl.program_id(0), num_m * num_k, num_progs):
        pid_m, pid_k, rm64, m_ok, _, rk64, k_ok = _tile_index(tile, num_m, num_k, M, K, GROUP_M, BLOCK_M, BLOCK_K)
        acc = _low_rank_tile(ds_ptr, rm64, m_ok, R, a_ptr, rk64, k_ok, stride_ar, stride_ak,
                             UPCAST, LORA_PREC, BLOCK_M, BLOCK_R, BLOCK_K, num_parts, part_stride, ds_out_ptr,
                             pid_k == 0, STORE_S)
        if HAS_DROPOUT:
            keep = load_keep(bits_ptr, rm64, m_ok, pid_k * BLOCK_K, tl.cdiv(K, 8), BLOCK_M, BLOCK_K)
            acc = tl.where(keep != 0, acc * keep_scale, 0.0)
        acc = _tma_mainloop(acc, dy_desc, pid_m * BLOCK_M, w_desc, pid_k * BLOCK_K, N, UPCAST, F32_PREC, BLOCK_N, False)
        tl.store(dx_ptr + rm64[:, None] * stride_dxm + rk64[None, :] * stride_dxk, acc.to(dx_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & k_ok[None, :])


@triton.jit
def _da_tile(
    pid, pid_r, ds_ptr, x_ptr, da_ptr, dbp_ptr, db_ptr, dsum_ptr, bits_ptr, M, N, K, R, P, part_stride,
    stride_xm, stride_xk, stride_dar, stride_dak, stride_dbn, stride_dbr,
    p, keep_scale,
    HAS_DROPOUT: tl.constexpr, COMPUTE_DA: tl.constexpr, DSUM: tl.constexpr, UPCAST: tl.constexpr,
    F32_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, ACC_CHUNK: tl.constexpr = 0,
    dy_ptr=None, s_ptr=None, stride_dym=0, stride_dyn=0, scaling=1.0, DB_DIRECT: tl.constexpr = False,
):
    """One program of the dA launch: programs below cdiv(K, BLOCK_K) compute a [BLOCK_R, BLOCK_K] tile
    of dA = dSᵀ·drop(x) (the first one also Σ_m dS when DSUM: a bottleneck adapter's down bias); the rest
    reduce the P dB partials in a fixed order, or with DB_DIRECT (no dY launch ran: decode) compute
    dB = s·dYᵀ·S themselves, walking M."""
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rr < R
    num_k = tl.cdiv(K, BLOCK_K) if COMPUTE_DA else 0
    if pid < num_k:
        # dA[r, k] = Σ_m dS[m, r] · drop(x)[m, k] / (1-p)
        rk = pid * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        rk64 = rk.to(tl.int64)
        rm0 = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        dsum = tl.zeros((BLOCK_R,), dtype=tl.float32)
        part = tl.zeros_like(acc) if ACC_CHUNK > 0 else 0.0
        for m0 in range(0, M, BLOCK_M):
            rm = m0 + rm0
            m_ok = rm < M
            rm64 = rm.to(tl.int64)
            dst = tl.load(ds_ptr + rm64[:, None] * R + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            xt = tl.load(x_ptr + rm64[:, None] * stride_xm + rk64[None, :] * stride_xk,
                         mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if HAS_DROPOUT:
                keep = load_keep(bits_ptr, rm64, m_ok, pid * BLOCK_K, tl.cdiv(K, 8), BLOCK_M, BLOCK_K)
                xt = tl.where(keep != 0, xt, 0.0)
            xc = xt.to(da_ptr.dtype.element_ty)
            acc, part = mma_acc(tl.trans(dst.to(xc.dtype)), xc, acc, part, m0 // BLOCK_M, UPCAST, F32_PREC, ACC_CHUNK)
            if DSUM:
                dsum += tl.sum(dst, axis=0)
        acc = acc_flush(acc, part, ACC_CHUNK)
        if HAS_DROPOUT:
            acc = acc * keep_scale
        if DSUM:
            if pid == 0:
                tl.store(dsum_ptr + rr, dsum.to(dsum_ptr.dtype.element_ty), mask=r_ok)
        tl.store(da_ptr + rr.to(tl.int64)[:, None] * stride_dar + rk64[None, :] * stride_dak,
                 acc.to(da_ptr.dtype.element_ty), mask=r_ok[:, None] & k_ok[None, :])
    else:
        rn = (pid - num_k) * BLOCK_N + tl.arange(0, BLOCK_N)
        rn64 = rn.to(tl.int64)
        n_ok = rn < N
        msk = n_ok[:, None] & r_ok[None, :]
        db_acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        if DB_DIRECT:
            # dB[n, r] = s · Σ_m dY[m, n] · S[m, r] in M order, operands in dB's dtype as in the dY kernel
            rm0 = tl.arange(0, BLOCK_M)
            part = tl.zeros_like(db_acc) if ACC_CHUNK > 0 else 0.0
            for m0 in range(0, M, BLOCK_M):
                rm = m0 + rm0
                m_ok = rm < M
                rm64 = rm.to(tl.int64)
                dyt = tl.load(dy_ptr + rm64[:, None] * stride_dym + rn64[None, :] * stride_dyn,
                              mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(db_ptr.dtype.element_ty)
                st = tl.load(s_ptr + rm64[:, None] * R + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
                db_acc, part = mma_acc(tl.trans(dyt), st.to(dyt.dtype), db_acc, part, m0 // BLOCK_M, UPCAST, F32_PREC,
                                       ACC_CHUNK)
            db_acc = acc_flush(db_acc, part, ACC_CHUNK) * scaling
        else:
            # dB: fixed-order sum of the P per-program partials (deterministic, no atomics)
            ptrs = dbp_ptr + rn64[:, None] * R + rr[None, :]
            for _ in range(0, P):
                db_acc += tl.load(ptrs, mask=msk, other=0.0)
                ptrs += part_stride  # N·R, a launch argument (typed i64 by the JIT when ≥ 2³¹): 64-bit pointer steps
        tl.store(db_ptr + rn64[:, None] * stride_dbn + rr.to(tl.int64)[None, :] * stride_dbr,
                 db_acc.to(db_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _bwd_da_kernel(
    ds_ptr, x_ptr, da_ptr, dbp_ptr, db_ptr, dsum_ptr, bits_ptr, M, N, K, R, P, part_stride,
    stride_xm, stride_xk, stride_dar, stride_dak, stride_dbn, stride_dbr,
    p, keep_scale,
    HAS_DROPOUT: tl.constexpr, COMPUTE_DA: tl.constexpr, DSUM: tl.constexpr, UPCAST: tl.constexpr,
    F32_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, ACC_CHUNK: tl.constexpr = 0,
    dy_ptr=None, s_ptr=None, stride_dym=0, stride_dyn=0, scaling=1.0, DB_DIRECT: tl.constexpr = False,
):
    _da_tile(tl.program_id(0), tl.program_id(1), ds_ptr, x_ptr, da_ptr, dbp_ptr, db_ptr, dsum_ptr, bits_ptr,
             M, N, K, R, P, part_stride, stride_xm, stride_xk, stride_dar, stride_dak, stride_dbn, stride_dbr, p, keep_scale,
             HAS_DROPOUT, COMPUTE_DA, DSUM, UPCAST, F32_PREC, BLOCK_M, BLOCK_K, BLOCK_R, BLOCK_N, ACC_CHUNK,
             dy_ptr, s_ptr, stride_dym, stride_dyn, scaling, DB_DIRECT)


# --------------------------------------------------------------------------------------------
# launch configurations (one per kernel and shape class; no autotuning, no per-GPU tables)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int = 0  # the GEMM's second output dim (N for forward, K for dX)
    block_k: int = 0  # the reduction dim
    num_warps: int = 4
    num_stages: int = 2


def block_r(R: int, cap: int = 128) -> int:
    """Rank tile: the next power of two ≥ max(R, 16), capped (larger ranks loop or tile)."""
    return min(next_pow2(R), cap)


# M buckets: decode (≤ 64 rows), mid (≤ 1024), prefill. The launch model (bench --model) showed the
# prefill GEMM tile (128×128) giving a decode GEMM 32 programs at N = 4096 on 132 SMs: decode takes a
# 16×32 output tile (448 programs at N = 14336; at N = 4096 its 128 programs are narrowed to 16×16, 256
# programs, by ``_fill_cols``) with a deep K step, since a decode GEMM is a weight-streaming GEMV. mid keeps
# the prefill tiles until gpu-check measures a better choice; the table is the same for sm_80 and sm_90 for
# the same reason.
M_BUCKETS = (("decode", 64), ("mid", 1024), ("prefill", None))


def m_bucket(M: Optional[int]) -> str:
    """The config bucket of a launch with M rows (None: prefill, the largest tiles)."""
    if M is None:
        return "prefill"
    return next(name for name, hi in M_BUCKETS if hi is None or M <= hi)


def _gemm_config(bucket: str, f32: bool, aligned: bool) -> "Config":
    """The base GEMM's tile for (M bucket, fp32 operands, 16-byte alignment): the documented table (one
    for sm_80 and sm_90 until gpu-check measures a reason to differ)."""
    if bucket == "decode" and not f32:
        # 2 warps (with 4, the ptxas of triton 3.6 and 3.8 spills 8 bytes in the split-K STORE_S variant) keep 3
        # stages, two W tiles in flight, for a weight-streaming GEMV. fp32 keeps the prefill tile below: every
        # 16-row fp32 tile tried (16×32×16/32, 16×64×32; 2 or 4 warps; 2 or 3 stages) spilled 8–76 bytes in
        # some DoRA/split-K variant on one of the two ptxas versions.
        return Config(16, 32, 128, num_warps=2, num_stages=3)
    if f32:  # fp32 operands take twice the registers of 16-bit ones; a 16-deep K step is the one 64×64 choice
        # whose every variant (DoRA epilogue included) compiles without spills on triton 3.6, 3.7 and 3.8's ptxas
        return Config(64, 64, 16, num_warps=8, num_stages=3) if aligned else Config(64, 64, 16, num_warps=8, num_stages=2)
    if aligned:
        return Config(128, 128, 64, num_warps=8, num_stages=3)
    return Config(64, 128, 64, num_warps=8, num_stages=3)


def configs(dtype: torch.dtype, R: int, aligned: bool = True, interpreted: bool = INTERPRETED,
            adapter_dtype: Optional[torch.dtype] = None, M: Optional[int] = None) -> dict:
    """The launch config of every kernel for inputs of ``dtype``, adapters of ``adapter_dtype`` (default:
    ``dtype``), rank ``R``, and whether all sizes and strides are 16-byte aligned (vectorized loads need
    fewer registers).

    fp32 adapters on a 16-bit base are their own case: the base GEMMs keep the 16-bit tiles, while the
    kernels whose dots are all LoRA dots (shrink, dY, dA) and the low-rank tile inside the GEMMs take the
    fp32 shapes (their operands are fp32 there).

    ``M`` picks the base GEMMs' tile by bucket (``m_bucket``; None: prefill). Chosen by rule, not by a
    per-GPU table. The AOT test compiles every combination for sm_80 and sm_90 and requires 0 spills.
    Under the interpreter small tiles keep tests multi-block and fast.
    """
    br = block_r(R)
    if interpreted:
        g = Config(32, 32, 32)
        return {"shrink": g, "gemm": g, "dy": g, "dx": g, "da": g, "block_r": br, "gemm_block_r": min(br, 64)}
    f32 = dtype == torch.float32
    lf32 = (adapter_dtype or dtype) == torch.float32  # the LoRA dots' operands are fp32
    mixed = lf32 and not f32  # fp32 adapters on a 16-bit base: 3×TF32 LoRA dots (three MMAs and split operands)
    small_r = br <= 32
    gemm = _gemm_config(m_bucket(M), f32, aligned)
    if not lf32:  # rank tile 128: a 16-wide N step (32 spilled 12 bytes on sm_80 with the N split's pointer steps)
        dy = Config(64, 64, num_warps=4) if small_r else Config(32, 16 if br > 64 else 32, num_warps=8)
    elif mixed:  # a 16-wide N step above rank tile 32: 32 spilled 12-24 bytes (tf32x3, rank 64) on sm_80 with the N split
        dy = Config(64, 64, num_warps=8) if small_r else Config(32, 16, num_warps=8)
    else:  # fp32: the in-place dB partial adds a tile of live registers
        dy = Config(64, 64, num_warps=4) if small_r else Config(16 if br > 64 else 32, 16, num_warps=8)
    return {
        # fp32 adapters on a 16-bit base take 2 stages: 3 spill 12 bytes (tf32x3, rank tile 16) on sm_80 with
        # triton 3.6's ptxas since the split-K loop bounds
        "shrink": Config(64 if small_r else 32, 0, (16 if br > 64 else 32) if lf32 else 64,
                         num_warps=4 if small_r else 8, num_stages=2 if mixed or (lf32 and br > 64) else 3),
        "gemm": gemm,
        "dy": dy,
        "dx": gemm,
        "da": Config(32, 64, 64 if small_r else 32, num_warps=8, num_stages=2),
        "block_r": br,
        "gemm_block_r": min(br, 16 if f32 else (32 if lf32 else 64)),
    }


@dataclass(frozen=True)
class QuantOperand:
    """A quantized frozen weight [N, K] as the GEMM kernels read it (``quant.QuantBase.kernel_operand``):
    element e = n·K + k of the row-major weight is ``_wq_tile``'s dequantization of ``data`` with the fp32
    ``scale`` of its block of ``block`` elements (a power of two), or of its row (``row_scale``)
    (WQ=1: 4-bit codes through ``code``; 2: int8; 3: int8 − ``zero``, per block)."""

    wq: int
    data: torch.Tensor                    # uint8 packed 4-bit codes (WQ=1) or int8 values, flat
    scale: torch.Tensor                   # fp32, one per block (or per row)
    block: int                            # elements per scale block: a power of two (ignored with row_scale)
    N: int
    K: int
    code: Optional[torch.Tensor] = None   # fp32 [16] (WQ=1)
    zero: Optional[torch.Tensor] = None   # int8 zero points, one per block (WQ=3)
    row_scale: bool = False
    # bitsandbytes' double quantization (WQ=1): ``scale`` holds uint8 codes of the absmax, each block's absmax is
    # absmax_code[q] · absmax2[block // block2] + absmax_offset
    absmax_code: Optional[torch.Tensor] = None  # fp32 [256]
    absmax2: Optional[torch.Tensor] = None      # fp32, one per block2 blocks
    absmax_offset: float = 0.0
    block2: int = 256

    def __post_init__(self):
        for name, b in (("block", self.block), ("block2", self.block2)):
            if not (self.row_scale and name == "block") and (b < 2 or b & (b - 1)):
                raise ValueError(f"QuantOperand: {name} must be a power of two >= 2, got {b}")

    @property
    def shape(self):
        return (self.N, self.K)

    def kernel_args(self) -> dict:
        shift = 0 if self.row_scale else self.block.bit_length() - 1
        aligned = (self.K % 2 == 0) if self.row_scale else (self.K % self.block == 0)
        dq = self.absmax_code is not None
        return dict(WQ=self.wq, wq_code_ptr=self.code, wq_scale_ptr=self.scale, wq_zero_ptr=self.zero,
                    WQ_SHIFT=shift, WQ_ROW=self.row_scale, WQ_ALIGNED=aligned, WQ_DQ=dq,
                    WQ_SHIFT2=self.block2.bit_length() - 1, wq_code2_ptr=self.absmax_code,
                    wq_absmax2_ptr=self.absmax2, wq_offset=float(self.absmax_offset))


WQ_ELEMS_PER_THREAD = 16


def quant_config(c: "Config", wq: "QuantOperand", dtype: torch.dtype, dx: bool = False) -> "Config":
    """The tile of a GEMM that dequantizes W (``QuantOperand``): its W tile (block_n × block_k, in either GEMM)
    is held as packed codes, table values and scales beside the accumulator, so at most WQ_ELEMS_PER_THREAD
    dequantized elements per thread, half that where rows do not start on a block (each element's index is then
    64-bit), and half again in dX (which also holds the LoRA tile's dS and the dropout bits): the reduction tile
    halves (not below 16), then the warps double (up to 8), then the output tile halves (not below 16). dX takes at
    least 4 warps (its 2-warp decode tile with fp32 adapters spilled 8 bytes on sm_80 with triton 3.8, at 56
    registers; at 4 warps and 2 stages still 8 with 4-bit codes on sm_80 and sm_90, triton 3.8: the decode dX tile
    takes 1 stage). fp32 x and dX take 2 stages, unaligned rows 1 (no software pipelining: the odd-size case). Measured in the AOT
    matrix (``--op qlora``, sm_80 and sm_90, triton 3.6 and 3.8): the 128×128×64 prefill tile at 32 per thread
    spilled 12-164 bytes; at 16 per thread dX still spilled 8-64 with triton 3.6, and int8 dX at 8 per thread
    and 3 stages 20 (ptxas held it to 128 registers); an unaligned tile at 16 per thread 92, at 8 per thread 20
    with 3 or 2 stages; the fp32 dX tile at 3 stages 8. These are 0."""
    aligned = wq.kernel_args()["WQ_ALIGNED"]
    cap = (WQ_ELEMS_PER_THREAD if aligned else WQ_ELEMS_PER_THREAD // 2) // (2 if dx else 1)
    bn, bk, warps = c.block_n, c.block_k, max(c.num_warps, 4) if dx else c.num_warps
    while bn * bk > cap * warps * 32 and bk > 16:
        bk //= 2
    while bn * bk > cap * warps * 32 and warps < 8:
        warps *= 2
    while bn * bk > cap * warps * 32 and bn > 16:
        bn //= 2
    stages = 1 if not aligned or (dx and c.block_m <= 16) else min(c.num_stages, 2) if dtype == torch.float32 or dx \
        else c.num_stages
    return Config(c.block_m, bn, bk, num_warps=warps, num_stages=stages)


def _weight_args(weight):
    """(tensor, stride_n, stride_k, extra kernel kwargs) of a float weight or a ``QuantOperand``."""
    if isinstance(weight, QuantOperand):
        return weight.data, weight.K, 1, weight.kernel_args()
    return weight, weight.stride(0), weight.stride(1), {}


def _aligned(*tensors) -> bool:
    """All strides and sizes 16-byte aligned (what the JIT's divisibility hints will see)."""
    for t in tensors:
        if t is None:
            continue
        e = t.element_size()
        if t.data_ptr() % 16 or any((st * e) % 16 for st in t.stride() if st != 1):
            return False
        if (t.shape[-1] * e) % 16:
            return False
    return True


# --------------------------------------------------------------------------------------------
# launchers (2-D inputs; the autograd Function in ops/lora.py reshapes and validates)
# --------------------------------------------------------------------------------------------
def _flags(x: torch.Tensor, A: torch.Tensor) -> dict:
    """UPCAST (interpreter bf16), F32_PREC (the kernels' fp32 dots: the base GEMM's when x is fp32, the LoRA
    dots' otherwise) and LORA_PREC (the low-rank tile inside the base GEMM kernels)."""
    base = f32_precision()
    lora = f32_precision(A.dtype, x.dtype)
    # The low-rank tile inside a 16-bit GEMM feeds a 16-bit output (y, dX): TF32 products (relative error
    # 2⁻¹¹ of the LoRA term) are far below that output's rounding (2⁻⁸ bf16, 2⁻¹¹ fp16, of the whole value),
    # so they need not pay 3×TF32's three MMAs and register-hungry split operands there.
    tile = "tf32" if lora == "tf32x3" else lora
    return {"UPCAST": upcast_needed(x.dtype, A.dtype), "F32_PREC": base if x.dtype == torch.float32 else lora,
            "LORA_PREC": tile}


def _only(fl: dict, *names) -> dict:
    return {k: v for k, v in fl.items() if k in names}


def dy_programs(device: torch.device, M: int, block_m: int, r_chunks: int) -> int:
    """Row programs of the dY launch, hence dB partials: enough to fill the machine (program_budget over the
    rank chunks), never more than there are row blocks (0 for an empty batch: nothing to launch, and the
    dB reduction over no partials is 0). The partial buffer is this × N × R fp32."""
    return min(triton.cdiv(M, block_m), max(1, program_budget(device) // r_chunks))


MAX_SHRINK_SPLITS = 16  # the forward GEMM reads every partial of S once per program
MAX_DY_SPLITS = 16  # dX (or dA) reads every partial of dS once per program


def dy_splits(device: torch.device, M: int, N: int, P: int, block_n: int, r_chunks: int,
              dtype: Optional[torch.dtype] = None):
    """(splits, N per split) of the dY launch (its third grid axis): when its P row programs × rank chunks are
    fewer than the machine's programs (M below ≈ SMs·BLOCK_M rows: 64 programs at M = 4096 on 132 SMs),
    enough splits to fill it, at most one per column block and MAX_DY_SPLITS, in equal spans of whole column
    blocks (no empty split). Each split writes its own fp32 partial of dS, summed in a fixed order by dX's
    programs (column block 0 stores the sum for dA): deterministic, and the backward stays 3 launches.
    Without dX (x needs no grad) the launcher does not split (dA summing the partials inside its M loop
    spilled 8 bytes on sm_80). An fp32 base never splits (its dX STORE_S variant would be the forward GEMM's,
    which spilled on sm_80 with triton 3.6's ptxas)."""
    budget = program_budget(device)
    if dtype == torch.float32 or P == 0 or N == 0 or P * r_chunks >= budget:
        return 1, N
    nb = triton.cdiv(N, block_n)
    splits = max(1, min(nb, triton.cdiv(budget, P * r_chunks), MAX_DY_SPLITS))
    n_per = triton.cdiv(nb, splits) * block_n
    return triton.cdiv(N, n_per), n_per


def fused_decode(M: int, x: torch.Tensor, A: torch.Tensor, R: int, cfg: dict) -> bool:
    """Whether this launch takes the fused decode path: the decode bucket (M ≤ 64), 16-bit x with adapters of
    its dtype, and a rank that fits one rank tile of the GEMM. The forward then computes S inside its GEMM
    (no shrink launch; with dropout it keeps the shrink, which draws the mask) and the backward computes dS
    inside dX and dB inside the dA launch (no dY launch): 1 forward and 2 backward launches. At decode the
    extra reads are A (or B) once per program, from L2 (R·K·2 bytes, 128 KiB at r = 16, K = 4096), beside
    the W tiles every program streams from memory; the single-program dY launch (M ≤ 64 rows are one row
    block) and the shrink's few programs are gone."""
    return (m_bucket(M) == "decode" and M > 0 and x.dtype in (torch.float16, torch.bfloat16) and A.dtype == x.dtype
            and R <= cfg["gemm_block_r"])


def _fill_cols(c: "Config", M: int, cols: int, device: torch.device) -> "Config":
    """The decode bucket's 16-bit GEMM tile, its column width halved (down to 16) while the launch has fewer
    programs than the machine: at N = 4096 the 16×32 tile gives 128 programs on 132 SMs, 16×16 gives 256.
    (The launchers keep fp32 tiles as they are.)"""
    while (m_bucket(M) == "decode" and c.block_n > 16
           and triton.cdiv(M, c.block_m) * triton.cdiv(cols, c.block_n) < program_budget(device)):
        c = Config(c.block_m, c.block_n // 2, c.block_k, c.num_warps, c.num_stages)
    return c


def _fill_da(c: "Config", K: int, N: int, need_da: bool, need_db: bool, r_chunks: int, device: torch.device) -> "Config":
    """The dA launch's K tile, halved (down to 16) while its dA and dB programs are fewer than the machine's
    (q_proj: 64 + 64 = 128 programs at a 64-wide tile on 132 SMs, 192 at 32)."""
    def programs(cc):
        return ((triton.cdiv(K, cc.block_k) if need_da else 0) + (triton.cdiv(N, cc.block_n) if need_db else 0)) * r_chunks

    while need_da and c.block_k > 16 and programs(c) < program_budget(device):
        c = Config(c.block_m, c.block_n, c.block_k // 2, c.num_warps, c.num_stages)
    return c


# The persistent TMA GEMM's tile (sm_90, M > 64): 128×128×64 in 8 warps, 4 stages of x and W tiles in shared
# memory (4 × 32 KiB), one CTA per SM (the grid is at most the SM count). Under the interpreter the small tiles
# of ``configs`` keep tests multi-tile.
TMA_GEMM = Config(128, 128, 64, num_warps=8, num_stages=4)


def _tma_config() -> "Config":
    return Config(32, 32, 32) if INTERPRETED else TMA_GEMM


def tma_gemm(M: int, *tensors, a: Optional[torch.Tensor] = None) -> bool:
    """Whether a base GEMM over ``tensors`` (x and W; dY and W) takes the persistent TMA kernel: an sm_90 GPU
    (``_common.tma_unavailable_reason``), M past the decode bucket (a decode GEMM is a GEMV, whose narrow
    tiles TMA's box would not help), 16-bit operands of one dtype with adapters ``a`` of that dtype, and what
    a TMA descriptor requires: unit inner stride, 16-byte aligned base and row stride, no empty dimension."""
    x = tensors[0]
    if not tma_available(x.device) or m_bucket(M) == "decode" or x.dtype not in (torch.float16, torch.bfloat16):
        return False
    if a is not None and a.dtype != x.dtype:
        return False
    for t in tensors:
        if (t.dtype != x.dtype or t.dim() != 2 or 0 in t.shape or t.stride(1) != 1 or t.data_ptr() % 16
                or (t.stride(0) * t.element_size()) % 16):
            return False
    return True


def _desc(t: torch.Tensor, block) -> "TensorDescriptor":
    """A TMA descriptor of the 2-D, unit-inner-stride ``t`` with tiles ``block`` (out-of-range reads are 0)."""
    return TensorDescriptor(t, list(t.shape), [t.stride(0), 1], list(block))


def _persistent_grid(tiles: int, device: torch.device) -> int:
    """Programs of a persistent launch: one per SM at most, none idle."""
    return max(1, min(tiles, program_budget(device)))


def shrink_splits(device: torch.device, M: int, K: int, R: int, block_m: int, block_k: int, block_r: int,
                  dtype: Optional[torch.dtype] = None):
    """(splits, K per split) of the shrink launch. Split-K when its row blocks × rank chunks are fewer than
    the machine's programs (decode and small M: one program per row block would walk all of K alone):
    enough splits to fill the machine, at most one per K block and MAX_SHRINK_SPLITS. Each split writes
    its own fp32 partial of S and the forward GEMM sums them in a fixed order, so the result is
    deterministic and the forward stays 2 launches. An fp32 base (``dtype``) never splits: its GEMM's STORE_S
    variant spills 16 bytes on sm_80 with triton 3.6's ptxas."""
    if dtype == torch.float32:
        return 1, K
    programs = triton.cdiv(M, block_m) * triton.cdiv(R, block_r)
    k_blocks = triton.cdiv(K, block_k)
    budget = program_budget(device)
    splits = 1 if programs >= budget or M == 0 else min(k_blocks, triton.cdiv(budget, programs), MAX_SHRINK_SPLITS)
    splits = max(1, splits)
    k_per = triton.cdiv(k_blocks, splits) * block_k
    return triton.cdiv(K, k_per) if K else 1, k_per  # no empty split


def lora_forward(x, weight, bias, A, B, scaling: float, p: float, seed, col_scale=None, store_z: bool = False,
                 bits_out: Optional[torch.Tensor] = None):
    """Returns (y [M, N] in x.dtype, S [M, R] fp32 with the 1/(1-p) scale folded in), plus z when
    ``store_z``. ``seed``: the int64 [1] device tensor from ``_common.draw_seed`` (read only when p > 0).
    With p > 0 the shrink writes the packed keep-mask (``dropout_mask_buffer``) to ``bits_out`` (a scratch
    buffer when None): backward reads it instead of drawing the mask again.
    ``col_scale`` [N] fp32 (DoRA): y = col_scale ⊙ (x·Wᵀ + s·S·Bᵀ) + b in the GEMM epilogue,
    z = x·Wᵀ + s·S·Bᵀ (x's dtype)."""
    M, K = x.shape
    N, R = weight.shape[0], A.shape[0]
    check_dims(M=M, K=K, N=N, r=R)
    quantized = isinstance(weight, QuantOperand)  # dequantized in the GEMM's mainloop: not the TMA or decode paths
    cfg = configs(x.dtype, R, _aligned(x, A, B) if quantized else _aligned(x, weight, A, B), adapter_dtype=A.dtype,
                  M=M)
    fl = _flags(x, A)
    keep_scale = 1.0 / (1.0 - p)
    S = torch.empty((M, R), dtype=torch.float32, device=x.device)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    z = torch.empty_like(y) if store_z else None
    fused = p == 0 and not quantized and fused_decode(M, x, A, R, cfg)  # decode: S inside the GEMM, no shrink
    splits, parts = 1, S
    if not fused:
        seed_t = seed if p > 0 else S  # never read without dropout
        bits = (bits_out if bits_out is not None else dropout_mask_buffer(M, K, x.device)) if p > 0 else S
        c, br = cfg["shrink"], cfg["block_r"]
        if p > 0 and c.block_k > 32 and not _aligned(x, A):
            # unpacking the mask bytes of a 64-wide tile of unaligned (unvectorised) x took 255 registers and
            # spilled 2.4 KB with triton 3.6's ptxas; a 32-wide tile on 8 warps takes 128 and none
            c = Config(c.block_m, 0, 32, num_warps=8, num_stages=c.num_stages)
        splits, k_per_split = shrink_splits(x.device, M, K, R, c.block_m, c.block_k, br, x.dtype)
        parts = S if splits == 1 else torch.empty((splits, M, R), dtype=torch.float32, device=x.device)
        _shrink_kernel[(triton.cdiv(M, c.block_m), triton.cdiv(R, br), splits)](
            x, A, parts, seed_t, bits, M, K, R, x.stride(0), x.stride(1), A.stride(0), A.stride(1),
            p, keep_scale, k_per_split, M * R, HAS_DROPOUT=p > 0, BLOCK_M=c.block_m, BLOCK_K=c.block_k, BLOCK_R=br,
            ACC_CHUNK=acc_chunk(A.dtype, c.block_k), num_warps=c.num_warps, num_stages=c.num_stages,
            **_only(fl, "UPCAST", "F32_PREC"))
    # Narrowed to fill the machine (``_fill_cols``) where every variant compiles without spills at 16 columns: not
    # for fp32 adapters on a 16-bit base (their DoRA split-K variants spilled 8 bytes on sm_90 with triton 3.8),
    # nor for the split-K GEMM at rank tile 64 (12 bytes on sm_90 with triton 3.6)
    if not quantized and tma_gemm(M, x, weight, a=A) and B.dtype == A.dtype:
        c = _tma_config()
        progs = _persistent_grid(triton.cdiv(M, c.block_m) * triton.cdiv(N, c.block_n), x.device)
        _fwd_gemm_tma_kernel[(progs,)](
            _desc(x, (c.block_m, c.block_k)), _desc(weight, (c.block_n, c.block_k)), bias if bias is not None else y,
            parts, B, y, M, N, K, R, B.stride(0), B.stride(1), y.stride(0), y.stride(1), scaling, progs,
            HAS_BIAS=bias is not None, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
            BLOCK_R=cfg["gemm_block_r"], GROUP_M=8, num_warps=c.num_warps, num_stages=c.num_stages,
            g_ptr=col_scale, z_ptr=z, COL_SCALE=col_scale is not None, STORE_Z=z is not None,
            num_parts=splits, part_stride=M * R, s_out_ptr=S if splits > 1 else None, STORE_S=splits > 1, **fl)
        return (y, S, z) if store_z else (y, S)
    narrow = A.dtype == x.dtype != torch.float32 and (fused or cfg["gemm_block_r"] <= 32)
    c = _fill_cols(cfg["gemm"], M, N, x.device) if narrow else cfg["gemm"]
    c = quant_config(c, weight, x.dtype) if quantized else c
    w, swn, swk, wq = _weight_args(weight)
    _fwd_gemm_kernel[(triton.cdiv(M, c.block_m) * triton.cdiv(N, c.block_n),)](
        x, w, bias if bias is not None else y, parts, B, y, M, N, K, R,
        x.stride(0), x.stride(1), swn, swk, B.stride(0), B.stride(1),
        y.stride(0), y.stride(1), scaling,
        HAS_BIAS=bias is not None, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
        BLOCK_R=cfg["gemm_block_r"], GROUP_M=8, num_warps=c.num_warps, num_stages=c.num_stages,
        g_ptr=col_scale, z_ptr=z, COL_SCALE=col_scale is not None, STORE_Z=z is not None,
        num_parts=splits, part_stride=M * R, s_out_ptr=S if splits > 1 or fused else None, STORE_S=splits > 1,
        ACC_CHUNK=acc_chunk(x.dtype, c.block_k), a_ptr=A if fused else None, stride_ar=A.stride(0),
        stride_ak=A.stride(1), FUSE_SHRINK=fused, **wq, **fl)
    return (y, S, z) if store_z else (y, S)


def dropout_mask_buffer(M: int, K: int, device) -> torch.Tensor:
    """The packed keep-mask of an M×K input: uint8 [M, ⌈K/8⌉], bit j of byte (m, b) keeps element (m, 8b + j)
    (``_common.dropout_bytes``). M·K/8 bytes, kept for backward beside x's 2·M·K (16-bit)."""
    return torch.empty((M, triton.cdiv(K, 8)), dtype=torch.uint8, device=device)


def lora_backward(dy, x, weight, A, B, S, scaling: float, p: float, bits,
                  need_dx: bool, need_da: bool, need_db: bool):
    """Returns (dx or None, dA or None, dB or None). ``S`` is the fp32 tensor from forward; ``bits`` the
    packed keep-mask forward's shrink wrote (``lora_forward(bits_out=...)``; read only when p > 0)."""
    M, K = x.shape
    N, R = weight.shape[0], A.shape[0]
    check_dims(M=M, K=K, N=N, r=R)
    quantized = isinstance(weight, QuantOperand)
    cfg = configs(x.dtype, R, _aligned(x, A, B, dy) if quantized else _aligned(x, weight, A, B, dy),
                  adapter_dtype=A.dtype, M=M)
    fl = _flags(x, A)
    lora_fl = _only(fl, "UPCAST", "F32_PREC")
    keep_scale = 1.0 / (1.0 - p)
    br = cfg["block_r"]
    r_chunks = triton.cdiv(R, br)
    fused = need_dx and not quantized and fused_decode(M, x, A, R, cfg)
    dS = torch.empty((M, R), dtype=torch.float32, device=x.device)
    ds_parts, P, dbp, dSp = 1, 0, dS, dS
    if not fused:
        # 1. dS (fp32; split N: one partial per split) and the dB partials, reading dY once
        c = cfg["dy"]
        P = dy_programs(x.device, M, c.block_m, r_chunks)
        ds_parts, n_per = dy_splits(x.device, M, N, P, c.block_n, r_chunks, x.dtype) if need_dx else (1, N)
        dSp = dS if ds_parts == 1 else torch.empty((ds_parts, M, R), dtype=torch.float32, device=x.device)
        dbp = torch.empty((P, N, R), dtype=torch.float32, device=x.device) if need_db else dS
        _bwd_dy_kernel[(P, r_chunks, ds_parts)](
            dy, B, S, dSp, dbp, dS, M, N, R, dy.stride(0), dy.stride(1), B.stride(0), B.stride(1), scaling,
            COMPUTE_DB=need_db, COLSUM=False, ACT=ACT_NONE, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_R=br,
            ACC_CHUNK=acc_chunk(B.dtype, c.block_n), num_warps=c.num_warps, num_stages=c.num_stages,
            n_per_split=n_per, ds_part_stride=M * R, N_SPLIT=ds_parts > 1, **lora_fl)
    seed_t = bits if p > 0 else dS
    dx = None
    if need_dx:
        # 2. dX = dY·W + mask ⊙ (dS·A)/(1-p); fused: dS = s·dY·B inside it. Column block 0 stores dS (the sum of
        #    the partials, or the fused one) for dA
        # narrowed as the forward GEMM is (not for fp32 adapters on a 16-bit base: 8 bytes spilled on sm_80 with
        # triton 3.6). The 16-bit decode tile takes 2 stages where it adds a rank-space tile to the GEMV: the
        # fused dS at rank tile 64, or the sum of dS partials (3 spilled 4-16 bytes on sm_80 with triton 3.6)
        c = _fill_cols(cfg["dx"], M, K, x.device) if A.dtype == x.dtype != torch.float32 else cfg["dx"]
        if c.block_m == 16 and ((fused and cfg["gemm_block_r"] > 32) or ds_parts > 1):
            c = Config(c.block_m, c.block_n, c.block_k, c.num_warps, min(c.num_stages, 2))
        dx = torch.empty((M, K), dtype=x.dtype, device=x.device)
        if not fused and not quantized and tma_gemm(M, dy, weight, a=A):
            c = _tma_config()  # block_n: dX's output columns (K), block_k: its reduction (N)
            progs = _persistent_grid(triton.cdiv(M, c.block_m) * triton.cdiv(K, c.block_n), x.device)
            _bwd_dx_tma_kernel[(progs,)](
                _desc(dy, (c.block_m, c.block_k)), _desc(weight, (c.block_k, c.block_n)), dSp, A, dx, seed_t,
                M, N, K, R, A.stride(0), A.stride(1), dx.stride(0), dx.stride(1), p, keep_scale, progs,
                HAS_DROPOUT=p > 0, BLOCK_M=c.block_m, BLOCK_K=c.block_n, BLOCK_N=c.block_k,
                BLOCK_R=cfg["gemm_block_r"], GROUP_M=8, num_warps=c.num_warps, num_stages=c.num_stages,
                num_parts=ds_parts, part_stride=M * R, ds_out_ptr=dS if ds_parts > 1 else None,
                STORE_S=ds_parts > 1, **fl)
        else:
            c = quant_config(c, weight, x.dtype, dx=True) if quantized else c
            w, swn, swk, wq = _weight_args(weight)
            _bwd_dx_kernel[(triton.cdiv(M, c.block_m) * triton.cdiv(K, c.block_n),)](
                dy, w, dSp, A, x, dx, seed_t, M, N, K, R,
                dy.stride(0), dy.stride(1), swn, swk, A.stride(0), A.stride(1),
                dx.stride(0), dx.stride(1), p, keep_scale,
                HAS_DROPOUT=p > 0, BLOCK_M=c.block_m, BLOCK_K=c.block_n, BLOCK_N=c.block_k,
                BLOCK_R=cfg["gemm_block_r"], GROUP_M=8, ACC_CHUNK=acc_chunk(x.dtype, c.block_k), num_warps=c.num_warps,
                num_stages=c.num_stages, num_parts=ds_parts, part_stride=M * R,
                ds_out_ptr=dS if fused or ds_parts > 1 else None, STORE_S=ds_parts > 1,
                b_ptr=B if fused else None, stride_bn=B.stride(0), stride_br=B.stride(1), scaling=scaling,
                FUSE_DS=fused, **wq, **fl)
        # dX left the summed (or fused) dS in dS for dA
    dA = dB = None
    if need_da or need_db:
        # 3. dA, and in extra programs of the same launch the dB reduction (fused: dB = s·dYᵀ·S itself)
        c = _fill_da(cfg["da"], K, N, need_da, need_db, r_chunks, x.device)
        dA = torch.empty_like(A) if need_da else None
        dB = torch.empty_like(B) if need_db else None
        num_k = triton.cdiv(K, c.block_k) if need_da else 0
        num_n = triton.cdiv(N, c.block_n) if need_db else 0
        da_t = dA if dA is not None else A
        db_t = dB if dB is not None else B
        _bwd_da_kernel[(num_k + num_n, r_chunks)](
            dS, x, da_t, dbp, db_t, dS, seed_t, M, N, K, R, P, N * R,
            x.stride(0), x.stride(1), da_t.stride(0), da_t.stride(1), db_t.stride(0), db_t.stride(1),
            p, keep_scale, HAS_DROPOUT=p > 0, COMPUTE_DA=need_da, DSUM=False,
            BLOCK_M=c.block_m, BLOCK_K=c.block_k, BLOCK_R=br, BLOCK_N=c.block_n, ACC_CHUNK=acc_chunk(A.dtype, c.block_m),
            num_warps=c.num_warps, num_stages=c.num_stages, dy_ptr=dy if fused else None, s_ptr=S if fused else None,
            stride_dym=dy.stride(0), stride_dyn=dy.stride(1), scaling=scaling, DB_DIRECT=fused, **lora_fl)
    return dx, dA, dB
