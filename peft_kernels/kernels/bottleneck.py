"""Parallel bottleneck adapter (``x·Wᵀ + b + s·up(act(down(x)))``): Triton kernels and launchers.

The structure is LoRA's, with a bias and an activation between the two low-rank GEMMs, so the
LoRA kernels do most of the work:

Forward, 2 launches:
  1. ``_adapter_shrink_kernel``  P = x·Dᵀ + b_d (fp32 [M, b], saved) and H = act(P) (transient)
  2. LoRA's ``_fwd_gemm_kernel``  Y = x·Wᵀ + H·(s⊙U)ᵀ + (b + s⊙b_u), H·Uᵀ in the base GEMM's accumulator
Backward, at most 3 launches:
  1. ``_adapter_dy_kernel``       reads each dY tile once: dH = dY·(s⊙U), dP = dH ⊙ act'(P) (fp32),
                                  per-M-block partials of dYᵀ·act(P) (for dU) and of Σ dY (for b_u, s)
  2. LoRA's ``_bwd_dx_kernel``    dX = dY·W + dP·D in one GEMM
  3. LoRA's ``_bwd_da_kernel``    dD = dPᵀ·x, plus the fixed-order reduction of the dU partials
The O(N·b) parameter-side work (s⊙U, s⊙b_u, the scale's gradient, the column-sum reduction) is
torch on tensors of parameter size. The activation is recomputed from P; only x and P are saved.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import lora as L
from ._common import mma

ACT_CODES = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3, "swish": 3, "tanh": 4}


@triton.jit
def _tanh(z):
    return 2.0 * tl.sigmoid(2.0 * z) - 1.0


@triton.jit
def _act(p, ACT: tl.constexpr):
    """The activation on fp32 ``p`` (0 relu, 1 gelu, 2 gelu_tanh, 3 silu, 4 tanh); act(0) = 0 for all."""
    if ACT == 0:
        out = tl.maximum(p, 0.0)
    elif ACT == 1:
        out = 0.5 * p * (1.0 + tl.math.erf(p * 0.7071067811865476))
    elif ACT == 2:
        out = 0.5 * p * (1.0 + _tanh(0.7978845608028654 * (p + 0.044715 * p * p * p)))
    elif ACT == 3:
        out = p * tl.sigmoid(p)
    else:
        out = _tanh(p)
    return out


@triton.jit
def _act_grad(p, ACT: tl.constexpr):
    """d act / d p at fp32 ``p``."""
    if ACT == 0:
        out = tl.where(p > 0.0, 1.0, 0.0)
    elif ACT == 1:
        out = 0.5 * (1.0 + tl.math.erf(p * 0.7071067811865476)) + p * tl.exp(-0.5 * p * p) * 0.3989422804014327
    elif ACT == 2:
        t = _tanh(0.7978845608028654 * (p + 0.044715 * p * p * p))
        out = 0.5 * (1.0 + t) + 0.5 * p * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * p * p)
    elif ACT == 3:
        sg = tl.sigmoid(p)
        out = sg * (1.0 + p * (1.0 - sg))
    else:
        t = _tanh(p)
        out = 1.0 - t * t
    return out


@triton.jit
def _adapter_shrink_kernel(
    x_ptr, d_ptr, db_ptr, p_ptr, h_ptr, M, K, R,
    stride_xm, stride_xk, stride_dr, stride_dk,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, UPCAST: tl.constexpr, F32_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_ok = rm < M
    r_ok = rr < R
    acc = L._gemm_mainloop(tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), x_ptr, rm, m_ok, stride_xm, stride_xk,
                           d_ptr, rr, r_ok, stride_dk, stride_dr, K, UPCAST, F32_PREC, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(db_ptr + rr, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    msk = m_ok[:, None] & r_ok[None, :]
    offs = rm[:, None] * R + rr[None, :]
    tl.store(p_ptr + offs, acc, mask=msk)
    tl.store(h_ptr + offs, _act(acc, ACT), mask=msk)


@triton.jit
def _adapter_dy_kernel(
    dy_ptr, u_ptr, p_ptr, dp_ptr, gthp_ptr, csp_ptr, M, N, R,
    stride_dym, stride_dyn, stride_un, stride_ur,
    COMPUTE_DU: tl.constexpr, ACT: tl.constexpr, UPCAST: tl.constexpr, F32_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rn0 = tl.arange(0, BLOCK_N)
    m_ok = rm < M
    r_ok = rr < R
    pt = tl.load(p_ptr + rm[:, None] * R + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    ht = _act(pt, ACT)  # rows past M load P = 0 and act(0) = 0: they add nothing below
    dh = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + rn0
        n_ok = rn < N
        dyt = tl.load(dy_ptr + rm[:, None] * stride_dym + rn[None, :] * stride_dyn,
                      mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        ut = tl.load(u_ptr + rn[:, None] * stride_un + rr[None, :] * stride_ur,
                     mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        dyc = dyt.to(ut.dtype)
        dh = mma(dyc, ut, dh, UPCAST, F32_PREC)
        if COMPUTE_DU:
            part = mma(tl.trans(dyc), ht.to(ut.dtype), tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32),
                       UPCAST, F32_PREC)
            tl.store(gthp_ptr + (pid_m * N + rn[:, None]) * R + rr[None, :], part, mask=n_ok[:, None] & r_ok[None, :])
            if pid_r == 0:
                tl.store(csp_ptr + pid_m * N + rn, tl.sum(dyt.to(tl.float32), axis=0), mask=n_ok)
    dp = dh * _act_grad(pt, ACT)
    tl.store(dp_ptr + rm[:, None] * R + rr[None, :], dp, mask=m_ok[:, None] & r_ok[None, :])


# --------------------------------------------------------------------------------------------
# launch configurations: LoRA's, with smaller fp32 tiles for the two adapter kernels (they hold the
# activation and its derivative too; the AOT check found LoRA's fp32 tiles spilling here)
# --------------------------------------------------------------------------------------------
def configs(dtype: torch.dtype, R: int, aligned: bool) -> dict:
    cfg = dict(L.configs(dtype, R, aligned))
    cfg["adapter_block_r"] = cfg["block_r"]
    if dtype == torch.float32 and not L.INTERPRETED:
        cfg["adapter_block_r"] = min(cfg["block_r"], 32)
        cfg["shrink"] = L.Config(32, 0, 32, num_warps=8, num_stages=2)
        cfg["dy"] = L.Config(32, 32, 0, num_warps=4, num_stages=2)
    return cfg


# --------------------------------------------------------------------------------------------
# launchers (2-D x; ops/bottleneck.py validates and handles the parameter-side work)
# --------------------------------------------------------------------------------------------
def parallel_forward(x, weight, bias_c, D, db, U_s, activation: str):
    """Returns (y [M, N] in x.dtype, P fp32 [M, b]). ``U_s`` = s⊙U, ``bias_c`` = b + s⊙b_u (or None)."""
    M, K = x.shape
    N, R = weight.shape[0], D.shape[0]
    cfg = configs(x.dtype, R, L._aligned(x, weight, D, U_s))
    fl = L._flags(x, D)
    P = torch.empty((M, R), dtype=torch.float32, device=x.device)
    H = torch.empty_like(P)
    c, br = cfg["shrink"], cfg["adapter_block_r"]
    _adapter_shrink_kernel[(triton.cdiv(M, c.block_m), triton.cdiv(R, br))](
        x, D, db if db is not None else P, P, H, M, K, R, x.stride(0), x.stride(1), D.stride(0), D.stride(1),
        HAS_BIAS=db is not None, ACT=ACT_CODES[activation], BLOCK_M=c.block_m, BLOCK_K=c.block_k, BLOCK_R=br,
        num_warps=c.num_warps, num_stages=c.num_stages, **fl)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    c = cfg["gemm"]
    L._fwd_gemm_kernel[(triton.cdiv(M, c.block_m) * triton.cdiv(N, c.block_n),)](
        x, weight, bias_c if bias_c is not None else y, H, U_s, y, M, N, K, R,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), U_s.stride(0), U_s.stride(1),
        y.stride(0), y.stride(1), 1.0,
        HAS_BIAS=bias_c is not None, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
        BLOCK_R=cfg["gemm_block_r"], GROUP_M=8, num_warps=c.num_warps, num_stages=c.num_stages, **fl)
    return y, P


def parallel_backward(dy, x, weight, D, U_s, P, activation: str, need_dx: bool, need_dd: bool, need_up: bool):
    """Returns (dx or None, dD or None, dP fp32, gtH = dYᵀ·act(P) fp32 or None, Σ_m dY fp32 or None)."""
    M, K = x.shape
    N, R = weight.shape[0], D.shape[0]
    cfg = configs(x.dtype, R, L._aligned(x, weight, D, U_s, dy))
    fl = L._flags(x, D)
    c, abr = cfg["dy"], cfg["adapter_block_r"]
    Pm = triton.cdiv(M, c.block_m)
    dP = torch.empty((M, R), dtype=torch.float32, device=x.device)
    gthp = torch.empty((Pm, N, R), dtype=torch.float32, device=x.device) if need_up else dP
    csp = torch.empty((Pm, N), dtype=torch.float32, device=x.device) if need_up else dP
    _adapter_dy_kernel[(Pm, triton.cdiv(R, abr))](
        dy, U_s, P, dP, gthp, csp, M, N, R, dy.stride(0), dy.stride(1), U_s.stride(0), U_s.stride(1),
        COMPUTE_DU=need_up, ACT=ACT_CODES[activation], BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_R=abr,
        num_warps=c.num_warps, num_stages=c.num_stages, **fl)
    dx = None
    if need_dx:  # dX = dY·W + dP·D
        c = cfg["dx"]
        dx = torch.empty((M, K), dtype=x.dtype, device=x.device)
        L._bwd_dx_kernel[(triton.cdiv(M, c.block_m) * triton.cdiv(K, c.block_n),)](
            dy, weight, dP, D, x, dx, M, N, K, R,
            dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), D.stride(0), D.stride(1),
            dx.stride(0), dx.stride(1), 0, 0.0, 1.0,
            HAS_DROPOUT=False, BLOCK_M=c.block_m, BLOCK_K=c.block_n, BLOCK_N=c.block_k,
            BLOCK_R=cfg["gemm_block_r"], GROUP_M=8, num_warps=c.num_warps, num_stages=c.num_stages, **fl)
    dD = gtH = colsum = None
    if need_dd or need_up:  # dD = dPᵀ·x, and the fixed-order reduction of the dYᵀ·H partials
        c = cfg["da"]
        dD = torch.empty_like(D) if need_dd else None
        gtH = torch.empty((N, R), dtype=torch.float32, device=x.device) if need_up else None
        num_k = triton.cdiv(K, c.block_k) if need_dd else 0
        num_n = triton.cdiv(N, c.block_n) if need_up else 0
        da_t = dD if dD is not None else D
        db_t = gtH if gtH is not None else dP
        br = cfg["block_r"]
        L._bwd_da_kernel[(num_k + num_n, triton.cdiv(R, br))](
            dP, x, da_t, gthp, db_t, M, N, K, R, Pm,
            x.stride(0), x.stride(1), da_t.stride(0), da_t.stride(1), db_t.stride(0), db_t.stride(1),
            0, 0.0, 1.0, HAS_DROPOUT=False, COMPUTE_DA=need_dd,
            BLOCK_M=c.block_m, BLOCK_K=c.block_k, BLOCK_R=br, BLOCK_N=c.block_n,
            num_warps=c.num_warps, num_stages=c.num_stages, **fl)
        if need_up:
            colsum = csp.sum(0)  # [Pm, N] partials: parameter-sized
    return dx, dD, dP, gtH, colsum
