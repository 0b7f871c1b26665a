"""Bottleneck adapters: Triton kernels and launchers for all three placements.

    bottleneck_adapter(h)       out = [h +] s·(act(h·Dᵀ + b_d)·Uᵀ + b_u)
    adapter_linear, sequential  y = x·Wᵀ + b;  out = y + s·(act(y·Dᵀ + b_d)·Uᵀ + b_u)
    adapter_linear, parallel    out = x·Wᵀ + b + s·(act(x·Dᵀ + b_d)·Uᵀ + b_u)

The scale is folded into the small up weight by the caller (``U_s = s⊙U``, ``b_s = s⊙b_u``). Every
path saves only its adapter input (h, y or x) and the fp32 pre-activation P [M, b]. Forward also
writes H = act(P) (fp32 [M, b], transient) for the up GEMM; backward recomputes act and act' from P.

Forward (2 launches each):
  standalone  ``_adapter_shrink_kernel`` P = h·Dᵀ + b_d, H;  ``_expand_kernel`` out = [h +] H·U_sᵀ + b_s
  sequential  ``_seq_fwd_kernel`` y tile = x·Wᵀ + b (stored), then its partial y_tile·D_tileᵀ; the last
              tile of each row block to finish sums the partials in a fixed order into P and H (a
              self-resetting arrival counter per row block: deterministic, no float atomics);
              ``_expand_kernel`` out = y + H·U_sᵀ + b_s
  parallel    ``_adapter_shrink_kernel`` P = x·Dᵀ + b_d, H;  LoRA's ``_fwd_gemm_kernel`` out = x·Wᵀ + H·U_sᵀ
              + (b + b_s), the low-rank product as the base GEMM's initial accumulator
(The activation is not applied inside the GEMMs' operand loads: the AOT check found erf/sigmoid there
spilling registers at the 16-bit GEMM tiles.)
Backward:
  1. LoRA's ``_bwd_dy_kernel`` (ACT set) reads each dY tile once: dP = (dY·U_s)⊙act'(P) fp32, per-M-block
     partials of dYᵀ·act(P) (for dU and the scale) and of Σ_m dY (for b_u and the scale)
  2. ``_adapter_bwd_kernel``, one launch of two program kinds: tiles of d_in = [dY +] dP·D (the adapter
     input's gradient; skipped for the parallel mode), and LoRA's dA programs: dD = dPᵀ·input with
     Σ_m dP (b_d), plus the fixed-order reduction of the dU partials
  standalone: 2 launches. sequential: + ``d_in·W`` for dX (one GEMM) = 3. parallel: + LoRA's
  ``_bwd_dx_kernel`` dX = dY·W + dP·D (one GEMM, before step 2) = 3.
Filling the machine where row programs are few (decode; M below ~8k rows): at bottleneck tiles ≤ 32 (larger
ones spilled registers in these variants) the shrink splits K (LoRA's ``shrink_splits``) and the dY launch
splits N (``dy_splits``); the activation needs the whole sum, so in each
the last split of a (row block, rank chunk) to arrive (a self-resetting arrival counter, as the sequential
kernel's) adds the partials in split order: deterministic, no extra launch, and P, H and dP are what the
unsplit kernels write. Above the decode bucket the parallel mode's dX sums the dP partials itself instead.
At decode the splits stop at 16 (``MAX_SHRINK_SPLITS``/``MAX_DY_SPLITS``): 16 programs (the launch model's
waves show 0.12), because the last program reads every partial (splits·M·b fp32) alone: at M = 64, b = 16
that is 64 KiB at 16 splits, against the 640 KiB of x (or dY) and D the unsplit launch streamed through one
program; at 132 splits it would be 528 KiB, about as much as the whole work the splits spread.
GEMM tiles follow LoRA's M buckets (``configs(M=...)``), narrowed at decode to fill the machine.
The O(N·b) parameter-side work (s⊙U, s⊙b_u, the scale's gradient, the column-sum reduction) is torch
on tensors of parameter size.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import lora as L
from ._common import ACT_CODES, act, check_dims, mma

__all__ = ["ACT_CODES", "bottleneck_forward", "sequential_forward", "parallel_forward", "adapter_backward",
           "parallel_backward"]


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _adapter_shrink_kernel(
    x_ptr, d_ptr, db_ptr, p_ptr, h_ptr, M, K, R,
    stride_xm, stride_xk, stride_dr, stride_dk,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, UPCAST: tl.constexpr, F32_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    k_per_split=0, part_ptr=None, cnt_ptr=None, part_stride=0, SPLIT_K: tl.constexpr = False,
):
    """P = x·Dᵀ + b_d and H = act(P), fp32 [M, R].

    SPLIT_K (grid axis 2; fewer row programs than the machine, ``shrink_splits``): split j reduces K in
    [j·k_per_split, (j+1)·k_per_split) into its fp32 partial j of x·Dᵀ (part_stride = M·R apart). The activation
    needs the whole sum, so the last split of each (row block, rank chunk) to arrive (a self-resetting arrival
    counter, as in ``_seq_fwd_kernel``) adds the partials in split order, then b_d, and stores P and H:
    deterministic, still one launch, and P/H are what the unsplit kernel writes."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_ok = rm < M
    r_ok = rr < R
    rm64 = rm.to(tl.int64)
    msk = m_ok[:, None] & r_ok[None, :]
    offs = rm64[:, None] * R + rr[None, :]
    if SPLIT_K:
        split = tl.program_id(2)
        num_splits = tl.num_programs(2)
        k_lo = split.to(tl.int64) * k_per_split  # the base pointers step once (64-bit); loop offsets stay local
        k_span = tl.minimum(K - k_lo, k_per_split).to(tl.int32)
        acc = L._gemm_mainloop(tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), x_ptr + k_lo * stride_xk, rm64, m_ok,
                               stride_xm, stride_xk, d_ptr + k_lo * stride_dk, rr.to(tl.int64), r_ok, stride_dk,
                               stride_dr, k_span, UPCAST, F32_PREC, BLOCK_K)
        tl.store(part_ptr + split.to(tl.int64) * part_stride + offs, acc, mask=msk)
        # every thread's partial stores precede the release; the acquire makes the others' visible
        tl.debug_barrier()
        cid = pid_m.to(tl.int64) * tl.num_programs(1) + pid_r  # 64-bit: a product of runtime values
        last = tl.atomic_add(cnt_ptr + cid, 1, sem="acq_rel") == num_splits - 1
        if last:
            acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            ptrs = part_ptr + offs
            for _ in range(0, num_splits):  # split order: deterministic; pointer steps are 64-bit
                acc += tl.load(ptrs, mask=msk, other=0.0, cache_modifier=".cg")
                ptrs += part_stride
            tl.atomic_xchg(cnt_ptr + cid, 0)  # leave the counter at 0 for the next launch
    else:
        last = True
        acc = L._gemm_mainloop(tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), x_ptr, rm64, m_ok, stride_xm,
                               stride_xk, d_ptr, rr.to(tl.int64), r_ok, stride_dk, stride_dr, K, UPCAST, F32_PREC,
                               BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(db_ptr + rr, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(p_ptr + offs, acc, mask=msk & last)
    tl.store(h_ptr + offs, act(acc, ACT), mask=msk & last)


@triton.jit
def _expand_tile(
    pid, c_ptr, h_ptr, u_ptr, bias_ptr, out_ptr, M, N, R,
    stride_cm, stride_cn, stride_un, stride_ur, stride_om, stride_on,
    HAS_C: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, F32_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of ``out = [C +] H·Uᵀ [+ bias]`` (H fp32 [M, R], U [N, R] via strides)."""
    pid_m, pid_n = L._grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    acc = L._low_rank_tile(h_ptr, rm64, m_ok, R, u_ptr, rn64, n_ok, stride_ur, stride_un,
                           UPCAST, F32_PREC, BLOCK_M, BLOCK_R, BLOCK_N)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    msk = m_ok[:, None] & n_ok[None, :]
    if HAS_C:
        acc += tl.load(c_ptr + rm64[:, None] * stride_cm + rn64[None, :] * stride_cn, mask=msk,
                       other=0.0).to(tl.float32)
    tl.store(out_ptr + rm64[:, None] * stride_om + rn64[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=msk)


@triton.jit
def _expand_kernel(
    c_ptr, h_ptr, u_ptr, bias_ptr, out_ptr, M, N, R,
    stride_cm, stride_cn, stride_un, stride_ur, stride_om, stride_on,
    HAS_C: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, F32_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    _expand_tile(tl.program_id(0), c_ptr, h_ptr, u_ptr, bias_ptr, out_ptr, M, N, R,
                 stride_cm, stride_cn, stride_un, stride_ur, stride_om, stride_on,
                 HAS_C, HAS_BIAS, UPCAST, F32_PREC, BLOCK_M, BLOCK_N, BLOCK_R, GROUP_M)


@triton.jit
def _seq_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, d_ptr, db_ptr, y_ptr, part_ptr, cnt_ptr, p_ptr, h_ptr, M, N, K, R, part_stride,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_dr, stride_dn, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, HAS_DBIAS: tl.constexpr, ACT: tl.constexpr, UPCAST: tl.constexpr,
    F32_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, RED: tl.constexpr,
):
    """y = x·Wᵀ + b, and the down projection P = y·Dᵀ + b_d (and H = act(P)) from the y tiles in registers."""
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = L._grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), num_n, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    acc = L._gemm_mainloop(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), x_ptr, rm64, m_ok, stride_xm, stride_xk,
                           w_ptr, rn64, n_ok, stride_wk, stride_wn, K, UPCAST, F32_PREC, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    yt = acc.to(y_ptr.dtype.element_ty)  # the adapter reads y as stored (rounded), as unfused code does
    tl.store(y_ptr + rm64[:, None] * stride_ym + rn64[None, :] * stride_yn, yt, mask=m_ok[:, None] & n_ok[None, :])
    # this tile's share of the down projection: part[pid_n, rm, :] = y[rm, rn]·D[:, rn]ᵀ (columns past N are 0)
    rr0 = tl.arange(0, BLOCK_R)
    part_rows = pid_n.to(tl.int64) * M + rm64  # rows of part viewed as [num_n·M, R]
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + rr0
        r_ok = rr < R
        dt = tl.load(d_ptr + rn64[:, None] * stride_dn + rr.to(tl.int64)[None, :] * stride_dr,
                     mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        part = mma(yt, dt, tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), UPCAST, F32_PREC)
        tl.store(part_ptr + part_rows[:, None] * R + rr[None, :], part, mask=m_ok[:, None] & r_ok[None, :])
    # The last tile of this row block to arrive sums the partials in tile order (deterministic). The
    # barrier makes every thread's partial stores precede the release; the acquire makes them visible.
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr + pid_m, 1, sem="acq_rel")
    if arrived == num_n - 1:
        # This row block's partials, P and H are each one contiguous run of rows·R floats: reduce them as
        # flat 1-D chunks (a 2-D tile here made ptxas spill in this cold path). Offsets are 64-bit: the
        # row block starts at pid_m·BLOCK_M·R and the partials are part_stride = M·R (a launch argument,
        # typed i64 by the JIT when ≥ 2³¹) apart.
        base = pid_m.to(tl.int64) * BLOCK_M * R
        n_el = tl.minimum(BLOCK_M, M - pid_m * BLOCK_M).to(tl.int64) * R
        for o in range(0, n_el, RED):
            e = o + tl.arange(0, RED)
            e_ok = e < n_el
            pacc = tl.zeros((RED,), dtype=tl.float32)
            ptrs = part_ptr + base + e
            for _ in range(0, num_n):  # tile order: deterministic; pointer steps are 64-bit
                pacc += tl.load(ptrs, mask=e_ok, other=0.0, cache_modifier=".cg")
                ptrs += part_stride
            if HAS_DBIAS:
                pacc += tl.load(db_ptr + e % R, mask=e_ok, other=0.0).to(tl.float32)
            tl.store(p_ptr + base + e, pacc, mask=e_ok)
            tl.store(h_ptr + base + e, act(pacc, ACT), mask=e_ok)
        tl.atomic_xchg(cnt_ptr + pid_m, 0)  # leave the counter at 0 for the next launch


@triton.jit
def _adapter_bwd_kernel(
    g_ptr, dp_ptr, d_ptr, din_ptr, inp_ptr, dd_ptr, gthp_ptr, gth_ptr, dbd_ptr, M, N, K, R, Pm, part_stride,
    num_tiles,
    stride_gm, stride_gn, stride_dr, stride_dk, stride_im, stride_ik, stride_om, stride_ok,
    stride_ddr, stride_ddk,
    COMPUTE_DIN: tl.constexpr, RESIDUAL: tl.constexpr, COMPUTE_DD: tl.constexpr, DSUM: tl.constexpr,
    UPCAST: tl.constexpr, F32_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    DA_BLOCK_M: tl.constexpr, DA_BLOCK_K: tl.constexpr, DA_BLOCK_R: tl.constexpr, DA_BLOCK_N: tl.constexpr,
):
    """Adapter [M, K] → [M, N]: programs [0, num_tiles) write d_in = [g +] dP·D; the rest are LoRA's dA
    programs (dD = dPᵀ·input, Σ_m dP, and the dU partial reduction), R-blocks innermost."""
    pid = tl.program_id(0)
    q = pid
    if COMPUTE_DIN:  # programs [0, num_tiles) are d_in tiles (num_tiles = cdiv(M, BLOCK_M)·cdiv(K, BLOCK_K))
        q = pid - num_tiles
        if pid < num_tiles:
            _expand_tile(pid, g_ptr, dp_ptr, d_ptr, g_ptr, din_ptr, M, K, R,
                         stride_gm, stride_gn, stride_dk, stride_dr, stride_om, stride_ok,
                         RESIDUAL, False, UPCAST, F32_PREC, BLOCK_M, BLOCK_K, BLOCK_R, GROUP_M)
    if q >= 0:
        nr = tl.cdiv(R, DA_BLOCK_R)
        L._da_tile(q // nr, q % nr, dp_ptr, inp_ptr, dd_ptr, gthp_ptr, gth_ptr, dbd_ptr, dp_ptr, M, N, K, R, Pm,
                   part_stride, stride_im, stride_ik, stride_ddr, stride_ddk, R, 1, 0.0, 1.0,
                   False, COMPUTE_DD, DSUM, UPCAST, F32_PREC, DA_BLOCK_M, DA_BLOCK_K, DA_BLOCK_R, DA_BLOCK_N)


# --------------------------------------------------------------------------------------------
# launch configurations: LoRA's, with smaller fp32 tiles where the activation adds live registers
# (the AOT check found LoRA's fp32 tiles spilling there)
# --------------------------------------------------------------------------------------------
def configs(dtype: torch.dtype, R: int, aligned: bool, M=None, N: int = 0, K: int = 0, device=None) -> dict:
    """LoRA's configs for the same dtype, bottleneck ``R`` and alignment, with the bottleneck's own entries.
    ``M`` picks the GEMM tiles by LoRA's M bucket; a 16-bit decode launch (M ≤ 64) then narrows the GEMM tile
    to fill the machine over N output columns (forward GEMM, expand, sequential GEMM) or K (dX), as LoRA's
    launchers do (``lora._fill_cols``)."""
    cfg = dict(L.configs(dtype, R, aligned, M=M))
    if M is not None and dtype != torch.float32:
        dev = device if device is not None else torch.device("cpu")
        cfg["gemm"] = L._fill_cols(cfg["gemm"], M, N, dev)
        cfg["dx"] = L._fill_cols(cfg["dx"], M, K, dev)
    cfg["adapter_block_r"] = cfg["block_r"]
    cfg["expand"] = cfg["gemm"]
    # the sequential kernel adds the down-projection partials to the GEMM: unaligned 16-bit tiles (no
    # vector loads) need a shorter K step to stay within 255 registers on sm_80
    cfg["seq"] = cfg["gemm"] if aligned or dtype == torch.float32 else L.Config(64, 128, 32, num_warps=8, num_stages=3)
    cfg["seq_block_r"] = cfg["gemm_block_r"]
    cfg["da_block_r"] = cfg["block_r"]
    if dtype == torch.float32 and not L.INTERPRETED:
        cfg["adapter_block_r"] = min(cfg["block_r"], 32)
        cfg["shrink"] = L.Config(32, 0, 32, num_warps=8, num_stages=2)
        cfg["dy"] = L.Config(32, 32, 0, num_warps=4, num_stages=2)  # 8 warps spilled 8-24 B on sm_80 (in-place partials)
        cfg["da_block_r"] = min(cfg["block_r"], 64)
    return cfg


_COUNTERS: dict = {}


def _arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """int32 zeros [≥ n] for ``_seq_fwd_kernel``, one buffer per (device, stream): the kernel leaves
    them at 0, so no memset launch is needed per call."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 64), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def _flags(x, D) -> dict:
    """LoRA's flags without LORA_PREC: the adapter's weights always have its input's dtype."""
    return L._only(L._flags(x, D), "UPCAST", "F32_PREC")


def _down(x, D, db, activation, cfg, fl):
    """Launch the shrink: (P = x·Dᵀ + b_d, H = act(P)), fp32 [M, b]."""
    M, K = x.shape
    R = D.shape[0]
    check_dims(M=M, K=K, bottleneck=R)
    P = torch.empty((M, R), dtype=torch.float32, device=x.device)
    H = torch.empty_like(P)
    c, br = cfg["shrink"], cfg["adapter_block_r"]
    rows, chunks = triton.cdiv(M, c.block_m), triton.cdiv(R, br)
    # split K where the row programs leave SMs idle (decode: 1 program), as LoRA's shrink does (an fp32 input
    # keeps one split, as there), at rank tiles ≤ 32: at 128 the SPLIT_K variant spilled 8 bytes on sm_90 (triton 3.6)
    splits, k_per = L.shrink_splits(x.device, M, K, R, c.block_m, c.block_k, br, x.dtype) if br <= 32 else (1, K)
    part = torch.empty((splits, M, R), dtype=torch.float32, device=x.device) if splits > 1 else None
    _adapter_shrink_kernel[(rows, chunks, splits)](
        x, D, db if db is not None else P, P, H, M, K, R, x.stride(0), x.stride(1), D.stride(0), D.stride(1),
        HAS_BIAS=db is not None, ACT=ACT_CODES[activation], BLOCK_M=c.block_m, BLOCK_K=c.block_k, BLOCK_R=br,
        num_warps=c.num_warps, num_stages=c.num_stages, k_per_split=k_per, part_ptr=part,
        cnt_ptr=_arrival_counters(x.device, rows * chunks) if splits > 1 else None, part_stride=M * R,
        SPLIT_K=splits > 1, **fl)
    return P, H


def _up(c, H, U_s, b_s, out, cfg, fl):
    """Launch the expand: out = [c +] H·U_sᵀ + b_s."""
    M, R = H.shape
    N = U_s.shape[0]
    check_dims(M=M, N=N, bottleneck=R)
    cc = cfg["expand"]
    _expand_kernel[(triton.cdiv(M, cc.block_m) * triton.cdiv(N, cc.block_n),)](
        c if c is not None else out, H, U_s, b_s if b_s is not None else out, out, M, N, R,
        c.stride(0) if c is not None else 0, c.stride(1) if c is not None else 0, U_s.stride(0), U_s.stride(1),
        out.stride(0), out.stride(1),
        HAS_C=c is not None, HAS_BIAS=b_s is not None, BLOCK_M=cc.block_m,
        BLOCK_N=cc.block_n, BLOCK_R=cfg["gemm_block_r"], GROUP_M=8, num_warps=cc.num_warps,
        num_stages=cc.num_stages, **fl)
    return out


# --------------------------------------------------------------------------------------------
# launchers (2-D tensors; ops/bottleneck.py validates and does the parameter-side work)
# --------------------------------------------------------------------------------------------
def bottleneck_forward(h, D, db, U_s, b_s, activation: str, residual: bool):
    """Returns (out [M, H_out] in h.dtype, P fp32 [M, b])."""
    cfg = configs(h.dtype, D.shape[0], L._aligned(h, D, U_s), h.shape[0], U_s.shape[0], h.shape[1], h.device)
    fl = _flags(h, D)
    P, H = _down(h, D, db, activation, cfg, fl)
    out = torch.empty((h.shape[0], U_s.shape[0]), dtype=h.dtype, device=h.device)
    return _up(h if residual else None, H, U_s, b_s, out, cfg, fl), P


def sequential_forward(x, weight, bias, D, db, U_s, b_s, activation: str):
    """Returns (out, y = x·Wᵀ + b, P fp32 [M, b]); y is the adapter's input, saved for backward."""
    M, K = x.shape
    N, R = weight.shape[0], D.shape[0]
    check_dims(M=M, K=K, N=N, bottleneck=R)
    cfg = configs(x.dtype, R, L._aligned(x, weight, D, U_s), M, N, K, x.device)
    fl = _flags(x, D)
    c, br = cfg["seq"], cfg["seq_block_r"]
    num_m, num_n = triton.cdiv(M, c.block_m), triton.cdiv(N, c.block_n)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    P = torch.empty((M, R), dtype=torch.float32, device=x.device)
    H = torch.empty_like(P)
    part = torch.empty((num_n, M, R), dtype=torch.float32, device=x.device)  # transient, fp32
    _seq_fwd_kernel[(num_m * num_n,)](
        x, weight, bias if bias is not None else y, D, db if db is not None else P, y, part,
        _arrival_counters(x.device, num_m), P, H, M, N, K, R, M * R,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), D.stride(0), D.stride(1),
        y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, HAS_DBIAS=db is not None, ACT=ACT_CODES[activation], BLOCK_M=c.block_m,
        BLOCK_N=c.block_n,
        BLOCK_K=c.block_k, BLOCK_R=br, GROUP_M=8, RED=4 * 32 * c.num_warps, num_warps=c.num_warps,
        num_stages=c.num_stages, **fl)
    out = torch.empty_like(y)
    return _up(y, H, U_s, b_s, out, cfg, fl), y, P


def parallel_forward(x, weight, bias_c, D, db, U_s, activation: str):
    """Returns (y [M, N] in x.dtype, P fp32 [M, b]). ``bias_c`` = b + s⊙b_u (or None)."""
    M, K = x.shape
    N, R = weight.shape[0], D.shape[0]
    check_dims(M=M, K=K, N=N, bottleneck=R)
    cfg = configs(x.dtype, R, L._aligned(x, weight, D, U_s), M, N, K, x.device)
    fl = _flags(x, D)
    P, H = _down(x, D, db, activation, cfg, fl)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    c = cfg["gemm"]
    L._fwd_gemm_kernel[(triton.cdiv(M, c.block_m) * triton.cdiv(N, c.block_n),)](
        x, weight, bias_c if bias_c is not None else y, H, U_s, y, M, N, K, R,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), U_s.stride(0), U_s.stride(1),
        y.stride(0), y.stride(1), 1.0,
        HAS_BIAS=bias_c is not None, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
        BLOCK_R=cfg["gemm_block_r"], GROUP_M=8, num_warps=c.num_warps, num_stages=c.num_stages,
        LORA_PREC=fl["F32_PREC"], **fl)
    return y, P


def _dp(g, U_s, P, activation, need_up, cfg, fl, dx_sums: bool = False):
    """Launch LoRA's dY kernel with the activation: (dP fp32, dU partials, column-sum partials, Pm, dP
    partials, their count). The launch splits N as LoRA's does when its row programs leave SMs idle; each split
    applies act' to its own partial (dP is linear in them). With ``dx_sums`` (the parallel mode's dX above the
    decode bucket: its GEMM sums the partials in a fixed order and stores dP) the partials are left to it;
    otherwise the last split to arrive sums them into dP (``REDUCE``), so every dP reader takes one tensor."""
    M, R = P.shape
    N = g.shape[1]
    c, abr = cfg["dy"], cfg["adapter_block_r"]
    r_chunks = triton.cdiv(R, abr)
    Pm = L.dy_programs(g.device, M, c.block_m, r_chunks)  # the partials are bounded by the machine, not by M
    # the REDUCE variants take rank tiles ≤ 32: at 64 and 128 they spilled 8-16 bytes (sm_80 and sm_90, triton 3.6
    # and 3.8); larger bottlenecks split only where dX sums the partials
    splits, n_per = L.dy_splits(g.device, M, N, Pm, c.block_n, r_chunks, g.dtype) if dx_sums or abr <= 32 else (1, N)
    reduce = splits > 1 and not dx_sums
    dP = torch.empty((M, R), dtype=torch.float32, device=g.device)
    dPp = dP if splits == 1 else torch.empty((splits, M, R), dtype=torch.float32, device=g.device)
    gthp = torch.empty((Pm, N, R), dtype=torch.float32, device=g.device) if need_up else dP
    csp = torch.empty((Pm, N), dtype=torch.float32, device=g.device) if need_up else dP
    L._bwd_dy_kernel[(Pm, r_chunks, splits)](
        g, U_s, P, dPp, gthp, csp, M, N, R, g.stride(0), g.stride(1), U_s.stride(0), U_s.stride(1), 1.0,
        COMPUTE_DB=need_up, COLSUM=need_up, ACT=ACT_CODES[activation], BLOCK_M=c.block_m, BLOCK_N=c.block_n,
        BLOCK_R=abr, num_warps=c.num_warps, num_stages=c.num_stages, n_per_split=n_per, ds_part_stride=M * R,
        N_SPLIT=splits > 1, ds_sum_ptr=dP if reduce else None,
        cnt_ptr=_arrival_counters(g.device, Pm) if reduce else None, REDUCE=reduce, RED=4 * 32 * c.num_warps, **fl)
    return (dP, gthp, csp, Pm, dP, 1) if reduce else (dP, gthp, csp, Pm, dPp, splits)


def _input_and_param_grads(g, inp, D, dP, gthp, csp, Pm, residual, need_din, need_dd, need_db, need_up, cfg, fl):
    """One launch of ``_adapter_bwd_kernel``: (d_in or None, dD, db_d, gtH fp32, colsum fp32)."""
    M, K = inp.shape
    R = D.shape[0]
    N = g.shape[1]
    want_dd = need_dd
    need_dd = need_dd or need_db  # Σ dP rides on the dD programs
    if not (need_din or need_dd or need_up):
        return None, None, None, None, None
    ce, br = cfg["expand"], cfg["da_block_r"]
    ca = cfg["da"] if need_din else L._fill_da(cfg["da"], K, N, need_dd, need_up, triton.cdiv(R, br), g.device)
    d_in = torch.empty((M, K), dtype=g.dtype, device=g.device) if need_din else None
    dD = torch.empty_like(D) if need_dd else None
    db_d = torch.empty((R,), dtype=D.dtype, device=g.device) if need_db else None
    gtH = torch.empty((N, R), dtype=torch.float32, device=g.device) if need_up else None
    tiles = triton.cdiv(M, ce.block_m) * triton.cdiv(K, ce.block_n) if need_din else 0
    da_progs = (triton.cdiv(K, ca.block_k) if need_dd else 0) + (triton.cdiv(N, ca.block_n) if need_up else 0)
    dd_t = dD if dD is not None else D
    dummy = dP
    _adapter_bwd_kernel[(tiles + da_progs * triton.cdiv(R, br),)](
        g, dP, D, d_in if d_in is not None else dummy, inp, dd_t, gthp, gtH if gtH is not None else dummy,
        db_d if db_d is not None else dummy, M, N, K, R, Pm, N * R, tiles,
        g.stride(0), g.stride(1), D.stride(0), D.stride(1), inp.stride(0), inp.stride(1),
        d_in.stride(0) if d_in is not None else 0, d_in.stride(1) if d_in is not None else 0,
        dd_t.stride(0), dd_t.stride(1),
        COMPUTE_DIN=need_din, RESIDUAL=residual, COMPUTE_DD=need_dd, DSUM=need_db,
        BLOCK_M=ce.block_m, BLOCK_K=ce.block_n, BLOCK_R=cfg["gemm_block_r"], GROUP_M=8,
        DA_BLOCK_M=ca.block_m, DA_BLOCK_K=ca.block_k, DA_BLOCK_R=br, DA_BLOCK_N=ca.block_n,
        num_warps=8, num_stages=2, **fl)
    colsum = csp.sum(0) if need_up else None  # [Pm, N] partials: parameter-sized
    return d_in, (dD if want_dd else None), db_d, gtH, colsum


def adapter_backward(g, inp, D, U_s, P, activation: str, residual: bool, need_din: bool, need_dd: bool,
                     need_db: bool, need_up: bool):
    """Backward of ``[inp +] act(inp·Dᵀ + b_d)·U_sᵀ + b_s`` (standalone, and the sequential mode with
    inp = y): 2 launches. Returns (d_in, dD, db_d, gtH = gᵀ·act(P) fp32, colsum = Σ_m g fp32), None where
    not needed."""
    check_dims(M=inp.shape[0], K=inp.shape[1], N=g.shape[1], bottleneck=D.shape[0])
    cfg = configs(inp.dtype, D.shape[0], L._aligned(inp, D, U_s, g), inp.shape[0], g.shape[1], inp.shape[1], inp.device)
    fl = _flags(inp, D)
    dP, gthp, csp, Pm, _, _ = _dp(g, U_s, P, activation, need_up, cfg, fl)
    return _input_and_param_grads(g, inp, D, dP, gthp, csp, Pm, residual, need_din, need_dd, need_db, need_up,
                                  cfg, fl)


def parallel_backward(dy, x, weight, D, U_s, P, activation: str, need_dx: bool, need_dd: bool, need_db: bool,
                      need_up: bool):
    """Returns (dx, dD, db_d, gtH fp32, colsum fp32), None where not needed: 3 launches."""
    M, K = x.shape
    N, R = weight.shape[0], D.shape[0]
    check_dims(M=M, K=K, N=N, bottleneck=R)
    cfg = configs(x.dtype, R, L._aligned(x, weight, D, U_s, dy), M, N, K, x.device)
    fl = _flags(x, D)
    # dX sums the dP partials above the decode bucket only (in the decode tile's dX that spilled 4-8 bytes with
    # triton 3.6, 2 or 4 warps, 2 or 3 stages): at decode, and without dX, the dY launch reduces them itself
    dP, gthp, csp, Pm, dPp, splits = _dp(dy, U_s, P, activation, need_up, cfg, fl,
                                         dx_sums=need_dx and L.m_bucket(M) != "decode")
    dx = None
    if need_dx:  # dX = dY·W + dP·D in one GEMM (it sums the dP partials and stores dP for the dD programs)
        c = cfg["dx"]
        dx = torch.empty((M, K), dtype=x.dtype, device=x.device)
        L._bwd_dx_kernel[(triton.cdiv(M, c.block_m) * triton.cdiv(K, c.block_n),)](
            dy, weight, dPp, D, x, dx, dP, M, N, K, R,
            dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), D.stride(0), D.stride(1),
            dx.stride(0), dx.stride(1), 0.0, 1.0,
            HAS_DROPOUT=False, BLOCK_M=c.block_m, BLOCK_K=c.block_n, BLOCK_N=c.block_k,
            BLOCK_R=cfg["gemm_block_r"], GROUP_M=8, num_warps=c.num_warps, num_stages=c.num_stages,
            LORA_PREC=fl["F32_PREC"], num_parts=splits, part_stride=M * R,
            ds_out_ptr=dP if splits > 1 else None, STORE_S=splits > 1, **fl)
    _, dD, db_d, gtH, colsum = _input_and_param_grads(dy, x, D, dP, gthp, csp, Pm, False, False, need_dd, need_db,
                                                      need_up, cfg, fl)
    return dx, dD, db_d, gtH, colsum
