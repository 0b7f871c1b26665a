"""(IA)³ fused into the linear GEMM: one Triton kernel, the scaling in its prologue or epilogue.

``_ia3_gemm_kernel`` computes ``C = (A ⊙ l_k)·B (+ bias)`` over the reduction dim k, optionally stores
the unscaled C, optionally writes per-row-block column sums of ``C ⊙ X`` (fp32 partials, summed in a
fixed order afterwards: deterministic), then scales the columns ``C ⊙ l_n`` in the epilogue.

Launches (M rows, K in, N out):
  output scaling  ``y = (x·Wᵀ + b) ⊙ l``   fwd 1 launch (epilogue l; y₀ = x·Wᵀ + b stored when l needs a
                                            grad); bwd 1 launch: dX = (dY ⊙ l)·W (prologue l); dl = Σ_m dY ⊙ y₀
  input scaling   ``y = (x ⊙ l)·Wᵀ + b``   fwd 1 launch (prologue l); bwd 1 launch: G = dY·W with
                                            dX = G ⊙ l (epilogue) and the partials of dl = Σ_m G ⊙ x
The scaled input/output is never materialised: no extra pass over x or y.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, check_dims, f32_precision, mma, upcast_needed
from .lora import _fill_cols, _gemm_config, _grouped_tile, m_bucket


@triton.jit
def _ia3_gemm_kernel(a_ptr, b_ptr, bias_ptr, lk_ptr, ln_ptr, out_ptr, raw_ptr, x_ptr, part_ptr,
                     M, N, K, s_am, s_ak, s_bk, s_bn, s_om, s_on, s_xm, s_xn,
                     HAS_BIAS: tl.constexpr, SCALE_K: tl.constexpr, SCALE_N: tl.constexpr,
                     STORE_RAW: tl.constexpr, COLSUM: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     UPCAST: tl.constexpr, F32_PREC: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _grouped_tile(pid, num_m, num_n, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    rm64 = rm.to(tl.int64)  # addresses are 64-bit: rows × strides can pass 2³¹
    rn64 = rn.to(tl.int64)
    a_row = a_ptr + rm64[:, None] * s_am
    b_col = b_ptr + rn64[None, :] * s_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        kk64 = kk.to(tl.int64)
        a = tl.load(a_row + kk64[None, :] * s_ak, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if SCALE_K:  # prologue: the scaled input tile, rounded to the input dtype as PEFT's x ⊙ l is
            lk = tl.load(lk_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * lk[None, :]).to(a.dtype)
        b = tl.load(b_col + kk64[:, None] * s_bk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = mma(a, b, acc, UPCAST, F32_PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if STORE_RAW:
        tl.store(raw_ptr + rm64[:, None] * s_om + rn64[None, :] * s_on, acc.to(raw_ptr.dtype.element_ty), mask=mask)
    if COLSUM:
        xv = tl.load(x_ptr + rm64[:, None] * s_xm + rn64[None, :] * s_xn, mask=mask, other=0.0).to(tl.float32)
        tl.store(part_ptr + pid_m.to(tl.int64) * N + rn64, tl.sum(acc * xv, axis=0), mask=n_ok)
    if SCALE_N:  # epilogue: the column scaling
        acc = acc * tl.load(ln_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm64[:, None] * s_om + rn64[None, :] * s_on, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _config(dtype: torch.dtype, colsum: bool, store_raw: bool = False, M: int = None, N: int = 0, device=None):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by rule; small tiles in the interpreter. The
    column-sum epilogue holds a second [BLOCK_M, BLOCK_N] tile (x), so it gets a quarter of the tile; storing
    the unscaled output too keeps a second tile of 64-bit addresses live, so it gets half. A 16-bit decode
    launch (M ≤ 64: ``lora.m_bucket``) takes LoRA's decode tile, 16×32 with a 128-deep K step, narrowed to 16
    columns where 32 leave fewer programs than the machine has SMs (the prefill tile gave 32-64 programs on
    132 SMs at the Llama-3-8B shapes). The AOT check (python -m peft_kernels.kernels.aot --op ia3) requires 0
    spills for every choice."""
    if INTERPRETED:
        return 32, 32, 32, 4, 1
    if dtype != torch.float32 and M is not None and m_bucket(M) == "decode":
        c = _fill_cols(_gemm_config("decode", False, True), M, N, device or torch.device("cpu"))
        return c.block_m, c.block_n, c.block_k, c.num_warps, c.num_stages
    if dtype == torch.float32:
        return 32, 64, 32, 8, 3
    if colsum:
        return 64, 64, 32, 8, 3
    return (128, 64, 32, 8, 3) if store_raw else (128, 128, 32, 8, 3)


def _gemm(a, b_kn_strides, b, M, N, K, out_dtype, *, bias=None, lk=None, ln=None, store_raw=False, colsum_x=None):
    """Launch: out[M, N] = (a ⊙ lk)·b (+bias) ⊙ ln; b is addressed as [K, N] through ``b_kn_strides``.
    Returns (out, raw or None, partials [num_m, N] fp32 or None)."""
    check_dims(M=M, N=N, K=K)
    bm, bn, bk, warps, stages = _config(a.dtype, colsum_x is not None, store_raw, M, N, a.device)
    dev = a.device
    out = torch.empty((M, N), dtype=out_dtype, device=dev)
    raw = torch.empty((M, N), dtype=out_dtype, device=dev) if store_raw else out
    num_m = triton.cdiv(M, bm)
    part = torch.empty((num_m, N), dtype=torch.float32, device=dev) if colsum_x is not None else out
    x = colsum_x if colsum_x is not None else out
    dummy = a
    _ia3_gemm_kernel[(num_m * triton.cdiv(N, bn),)](
        a, b, bias if bias is not None else dummy, lk if lk is not None else dummy, ln if ln is not None else dummy,
        out, raw, x, part, M, N, K, a.stride(0), a.stride(1), b_kn_strides[0], b_kn_strides[1],
        out.stride(0), out.stride(1), x.stride(0), x.stride(1),
        HAS_BIAS=bias is not None, SCALE_K=lk is not None, SCALE_N=ln is not None, STORE_RAW=store_raw,
        COLSUM=colsum_x is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
        UPCAST=upcast_needed(a.dtype, b.dtype), F32_PREC=f32_precision(), num_warps=warps, num_stages=stages)
    return out, (raw if store_raw else None), (part if colsum_x is not None else None)


def ia3_forward(x, weight, bias, l, feedforward: bool, need_raw: bool):
    """x [M, K], weight [N, K]; returns (y, y₀ or None). y₀ = x·Wᵀ + b (output scaling, for dl)."""
    M, K = x.shape
    N = weight.shape[0]
    wt = (weight.stride(1), weight.stride(0))  # Wᵀ as [K, N]
    if feedforward:
        y, _, _ = _gemm(x, wt, weight, M, N, K, x.dtype, bias=bias, lk=l)
        return y, None
    y, raw, _ = _gemm(x, wt, weight, M, N, K, x.dtype, bias=bias, ln=l, store_raw=need_raw)
    return y, raw


def ia3_backward(dy, x, weight, l, raw, feedforward: bool, need_dx: bool, need_dl: bool):
    """Returns (dx or None, dl [N or K] fp32 or None)."""
    M, N = dy.shape
    K = weight.shape[1]
    w_nk = (weight.stride(0), weight.stride(1))  # W as [N(reduction), K(out)]
    if feedforward:
        if not (need_dx or need_dl):
            return None, None
        dx, _, part = _gemm(dy, w_nk, weight, M, K, N, dy.dtype, ln=l, colsum_x=x if need_dl else None)
        return (dx if need_dx else None), (part.sum(0) if need_dl else None)
    dx = None
    if need_dx:
        dx, _, _ = _gemm(dy, w_nk, weight, M, K, N, dy.dtype, lk=l)
    dl = (dy.float() * raw.float()).sum(0) if need_dl else None
    return dx, dl
