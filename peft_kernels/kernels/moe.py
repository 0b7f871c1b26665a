"""MoE experts with LoRA: the grouped GEMM with each expert's low-rank update in its accumulator (SGMV-style),
forward and backward, for ``ops.moe.grouped_lora_linear``.

Rows of x are sorted by expert (expert e owns rows ``starts[e]:starts[e+1]``). The launch grid is the flattened
table of (expert, first row) row blocks that hold rows (``row_blocks``): Σ⌈count_e/BLOCK_M⌉ programs per column
block, never E × ⌈max count/BLOCK_M⌉, and an expert with no tokens launches nothing.

``_grouped_gemm_kernel`` (one kernel, two uses):
    forward  y_e  = x_e·W_eᵀ + s·(x_e·A_eᵀ)·B_eᵀ     reduction over K, output columns N
    dX       dx_e = dy_e·W_e + s·(dy_e·B_e)·A_e      reduction over N, output columns K
Each program walks its reduction once: every step loads the a-tile (x or dY), the frozen weight's tile and the
expert's low-rank factor's tile, and adds both dots (the base into the output accumulator, the side product
S = a·factor into a [BLOCK_M, BLOCK_R] fp32 tile). So x (or dY) is read once for the base GEMM and the shrink,
and the expand s·S·(B or A) joins the accumulator in the epilogue: the LoRA costs no extra launch and no pass over
x. The programs of column block 0 store the side product (S, or dY·B unscaled) for backward. Each column block
recomputes its rows' side product: r / BLOCK_N of the base GEMM's FLOPs (12 % at r 16, 128 columns), against a
launch and a round trip of S through memory.

dA and dB are per-expert reductions over the expert's rows, written straight into ``[E, …]`` gradients:
multi-adapter LoRA's ``_seg_outer_kernel`` with the expert as the slot (the identity permutation), one program per
output tile walking its expert's rows in order: deterministic, no atomics, an expert without tokens keeps zeros.

fp32 inputs compute the side product in a launch of its own (``split_side``): the fused tile spilled there.

fp32 operands sum the base GEMM in two levels (``_common.mma_acc``). Addresses are 64-bit: rows, experts and
columns are widened before they meet a stride. The rank is one tile (≤ ``MAX_RANK``); above it the op runs on
torch (``ops.moe`` says why).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Sequence

import torch
import triton
import triton.language as tl

from ._common import (INTERPRETED, acc_chunk, acc_flush, check_dims, f32_precision, mma, mma_acc, next_pow2,
                      upcast_needed)
from . import multi_lora as ML

MAX_RANK = 128  # one rank tile; past it ops.moe takes the torch path


@triton.jit
def _grouped_gemm_kernel(
    x_ptr, w_ptr, a_ptr, b_ptr, out_ptr, side_ptr, blk_e_ptr, blk_row0_ptr, starts_ptr,
    C, KD, R, scaling,
    stride_xm, stride_xk, stride_we, stride_wk, stride_wc, stride_ae, stride_ak, stride_ar,
    stride_be, stride_br, stride_bc, stride_om, stride_oc,
    LORA: tl.constexpr, UPCAST: tl.constexpr, F32_PREC: tl.constexpr, LORA_PREC: tl.constexpr,
    ACC_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """out[rows of e, c] = Σ_k x[row, k]·W[e, k, c] + scaling·Σ_r side[row, r]·B[e, r, c] with
    side = Σ_k x[row, k]·A[e, k, r]; every operand is read through its strides (forward: x, W as Wᵀ, A as Aᵀ, B as
    Bᵀ; dX: x = dY, W, A = B, B = A: the names are the forward's). LORA: 0 none; 1 the side product computed in the mainloop, column block
    0 storing it (fp32 [M, R]) to ``side_ptr`` (R ≤ BLOCK_R); 2 ``side`` read from ``side_ptr`` (computed by a launch
    before), BLOCK_R ranks at a time."""
    b = tl.program_id(0)
    pid_c = tl.program_id(1)
    e = tl.load(blk_e_ptr + b).to(tl.int64)
    end = tl.load(starts_ptr + e + 1)
    rm = tl.load(blk_row0_ptr + b) + tl.arange(0, BLOCK_M)
    m_ok = rm < end
    rm64 = rm.to(tl.int64)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    rc64 = rc.to(tl.int64)
    rk0 = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    x_row = x_ptr + rm64[:, None] * stride_xm
    w_col = w_ptr + e * stride_we + rc64[None, :] * stride_wc
    a_col = a_ptr + e * stride_ae + rr.to(tl.int64)[None, :] * stride_ar
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    part = tl.zeros_like(acc) if ACC_CHUNK > 0 else 0.0
    side = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, KD, BLOCK_K):
        rk = k0 + rk0
        k_ok = rk < KD
        rk64 = rk.to(tl.int64)
        at = tl.load(x_row + rk64[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_col + rk64[:, None] * stride_wk, mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        acc, part = mma_acc(at, wt, acc, part, k0 // BLOCK_K, UPCAST, F32_PREC, ACC_CHUNK)
        if LORA == 1:
            ft = tl.load(a_col + rk64[:, None] * stride_ak, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            side = mma(at.to(ft.dtype), ft, side, UPCAST, LORA_PREC)
    acc = acc_flush(acc, part, ACC_CHUNK)
    if LORA == 1:
        tl.store(side_ptr + rm64[:, None] * R + rr[None, :], side, mask=m_ok[:, None] & r_ok[None, :] & (pid_c == 0))
        gt = tl.load(b_ptr + e * stride_be + rr.to(tl.int64)[:, None] * stride_br + rc64[None, :] * stride_bc,
                     mask=r_ok[:, None] & c_ok[None, :], other=0.0)
        acc += mma(side.to(gt.dtype), gt, tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32), UPCAST, LORA_PREC) * scaling
    elif LORA == 2:  # the side product from memory, BLOCK_R ranks at a time
        for r0 in range(0, R, BLOCK_R):
            rq = r0 + rr
            q_ok = rq < R
            st = tl.load(side_ptr + rm64[:, None] * R + rq[None, :], mask=m_ok[:, None] & q_ok[None, :], other=0.0)
            gt = tl.load(b_ptr + e * stride_be + rq.to(tl.int64)[:, None] * stride_br + rc64[None, :] * stride_bc,
                         mask=q_ok[:, None] & c_ok[None, :], other=0.0)
            acc += mma(st.to(gt.dtype), gt, tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32), UPCAST,
                       LORA_PREC) * scaling
    tl.store(out_ptr + rm64[:, None] * stride_om + rc64[None, :] * stride_oc, acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & c_ok[None, :])


# --------------------------------------------------------------------------------------------
# launch configurations (by rule; the AOT test compiles every one for sm_80/sm_90 with 0 spills)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tile:
    m: int
    c: int
    k: int
    num_warps: int = 4
    num_stages: int = 2


def config(dtype: torch.dtype, adapter_dtype: torch.dtype, R: int, interpreted: bool = INTERPRETED) -> Tile:
    """The grouped GEMM's tile for operands of ``dtype``, adapters of ``adapter_dtype`` and rank ``R``.
    A routed expert holds few rows (tokens·top-k / E: 256 at 4096 tokens, top-8, 128 experts), so the row tile
    is 64. Rank tiles above 32 take narrower tiles: the side tile [BLOCK_M, BLOCK_R] and the factor's
    [BLOCK_K, BLOCK_R] live beside the accumulator; fp32 operands a 16-deep K step (their side product takes its
    own launch, ``split_side``). (``adapter_dtype`` does not change the tile today: fp32
    adapters on a 16-bit base compile without spills at the 16-bit tiles.)"""
    if interpreted:
        return Tile(16, 32, 32)
    br = next_pow2(R)
    f32 = dtype == torch.float32
    if f32:  # the split path (``split_side``): this tile holds no side product
        return Tile(64, 64, 16, num_warps=8, num_stages=3)
    if br > 32:  # (64, 128, 32) spilled 64 bytes at rank tile 64 on sm_80
        return Tile(64, 64, 32, num_warps=8, num_stages=3 if br == 64 else 2)
    # a 32-deep K step: (64, 128, 64) spilled 128 bytes at rank tile 32 (triton 3.8) and 192 at 16 (3.6) on sm_80
    return Tile(64, 128, 32, num_warps=8, num_stages=3)


def split_side(dtype: torch.dtype, R: int) -> bool:
    """Whether the side product (S = x·Aᵀ, or dY·B) takes its own launch before the grouped GEMM (the grouped
    kernel with the factor as the weight) instead of the GEMM's mainloop: fp32 operands, where the fp32 side tile
    beside the accumulator and the two-level sum's partial spilled with IEEE dots (8–28 bytes at rank tiles 16/32 on
    triton 3.6 and 3.8, 204–4684 bytes at 64/128, on sm_80/sm_90, at every row tile tried from 16 to 64)."""
    return dtype == torch.float32


def row_blocks(starts: Sequence[int], block_m: int, device) -> tuple:
    """(expert of each row block, its first row) as int32 tensors on ``device``: only blocks that hold rows."""
    es, r0 = [], []
    for e, (a, b) in enumerate(zip(starts, starts[1:])):
        for r in range(a, b, block_m):
            es.append(e)
            r0.append(r)
    t = torch.tensor([es, r0], dtype=torch.int32).to(device, non_blocking=True)
    return t[0], t[1]


def _flags(dtype: torch.dtype, adapter_dtype: torch.dtype) -> dict:
    lora = f32_precision(adapter_dtype, dtype)
    return {"UPCAST": upcast_needed(dtype, adapter_dtype), "F32_PREC": f32_precision(),
            "LORA_PREC": "tf32" if lora == "tf32x3" else lora}


def _gemm(a, w3, f3, g3, out, side, starts, starts_t, scaling, R, adapter_dtype):
    """Launch ``_grouped_gemm_kernel``; ``w3``/``f3``/``g3``: (tensor, stride_e, stride over the reduction or rank,
    stride over the output columns / rank). With ``split_side`` the side product is a grouped GEMM of its own
    (the factor as the weight, fp32 out, the same tile and row blocks) and the main launch reads it."""
    lora = 0 if f3 is None else (2 if split_side(a.dtype, R) else 1)
    t = config(a.dtype, adapter_dtype, R)
    blk_e, blk_r0 = row_blocks(starts, t.m, a.device)
    if blk_e.numel() == 0:
        return
    if lora == 2:  # (an fp32 tile: the same for every adapter dtype and rank)
        _launch(a, f3, None, None, side, None, blk_e, blk_r0, starts_t, 1.0, R, a.dtype, t, 0)
    _launch(a, w3, f3, g3, out, side, blk_e, blk_r0, starts_t, scaling, R, adapter_dtype, t, lora)


def _launch(a, w3, f3, g3, out, side, blk_e, blk_r0, starts_t, scaling, R, adapter_dtype, t: Tile, lora: int):
    C, KD = out.shape[1], a.shape[1]
    f3 = f3 or (w3[0], 0, 0, 0)
    g3 = g3 or (w3[0], 0, 0, 0)
    _grouped_gemm_kernel[(blk_e.numel(), triton.cdiv(C, t.c))](
        a, w3[0], f3[0], g3[0], out, side if side is not None else out, blk_e, blk_r0, starts_t,
        C, KD, R, float(scaling), a.stride(0), a.stride(1), *w3[1:], *f3[1:], *g3[1:], out.stride(0), out.stride(1),
        LORA=lora, ACC_CHUNK=acc_chunk(a.dtype, t.k), BLOCK_M=t.m, BLOCK_C=t.c, BLOCK_K=t.k,
        BLOCK_R=min(next_pow2(max(R, 1)), 32) if lora == 2 else next_pow2(max(R, 1)), num_warps=t.num_warps,
        num_stages=t.num_stages, **_flags(a.dtype, adapter_dtype))


def _starts_tensor(starts, device):
    return torch.tensor(list(starts), dtype=torch.int32).to(device, non_blocking=True)


def grouped_forward(x, starts, W, A, B, scaling: float):
    """(y [M, N] (rows past starts[-1] unwritten), S fp32 [M, R] or None)."""
    M, N = x.shape[0], W.shape[1]
    check_dims(M=M, K=x.shape[1], N=N, experts=W.shape[0])
    y = x.new_empty((M, N))
    R = A.shape[1] if A is not None else 0
    S = torch.zeros((M, R), dtype=torch.float32, device=x.device) if A is not None else None
    st = _starts_tensor(starts, x.device)
    lora = (A, A.stride(0), A.stride(2), A.stride(1)) if A is not None else None       # Aᵀ: [k, r]
    expand = (B, B.stride(0), B.stride(2), B.stride(1)) if A is not None else None     # Bᵀ: [r, n]
    _gemm(x, (W, W.stride(0), W.stride(2), W.stride(1)), lora, expand, y, S, starts, st, scaling, R,
          A.dtype if A is not None else x.dtype)
    return y, S


def grouped_backward(dy, x, starts, W, A, B, S, scaling: float, need_x: bool, need_a: bool, need_b: bool):
    """(dx or None, dA or None, dB or None): dX by the grouped GEMM (dY·B fused into it), dA/dB per expert."""
    M, K = x.shape
    E = W.shape[0]
    check_dims(M=M, K=K, N=dy.shape[1], experts=E)
    lora = A is not None
    R = A.shape[1] if lora else 0
    st = _starts_tensor(starts, x.device)
    dx = dS = None
    if need_x or (lora and need_a):
        dx = torch.empty_like(x)
        dS = torch.zeros((M, R), dtype=torch.float32, device=x.device) if lora else None
        _gemm(dy, (W, W.stride(0), W.stride(1), W.stride(2)),
              (B, B.stride(0), B.stride(1), B.stride(2)) if lora else None,   # B: [n, r]
              (A, A.stride(0), A.stride(1), A.stride(2)) if lora else None,   # A: [r, k]
              dx, dS, starts, st, scaling, R, A.dtype if lora else x.dtype)
        if starts[-1] < M:  # rows past the last expert get no gradient
            dx[starts[-1]:].zero_()
    dA = torch.zeros_like(A) if lora and need_a else None
    dB = torch.zeros_like(B) if lora and need_b else None
    if dA is not None or dB is not None:
        live = [(e, a, b) for e, (a, b) in enumerate(zip(starts, starts[1:])) if a < b]
        if live:
            # experts with rows are contiguous in the sorted order: segment g ends where g + 1 starts
            segs = SimpleNamespace(
                num_segments=len(live), _perm=torch.arange(M, dtype=torch.int32, device=x.device),
                _seg_slots=torch.tensor([e for e, _, _ in live], dtype=torch.int32).to(x.device),
                _seg_starts=torch.tensor([a for _, a, _ in live] + [live[-1][2]], dtype=torch.int32).to(x.device))
            scal = torch.full((E,), float(scaling), dtype=torch.float32, device=x.device)
            ranks = torch.full((E,), R, dtype=torch.int32, device=x.device)
            cfg = ML.configs(A.dtype, R)
            if dA is not None:  # dA[e] = s·(dY·B)ᵀ·x over e's rows
                ML._outer(cfg, dS, False, x, False, dA, scal, segs, ranks, True, True)
            if dB is not None:  # dB[e] = s·dYᵀ·S over e's rows
                ML._outer(cfg, dy, False, S, False, dB, scal, segs, ranks, False, True)
    return (dx if need_x else None), dA, dB
