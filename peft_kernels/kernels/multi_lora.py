"""Multi-adapter LoRA (one adapter per token): Triton gather kernels and their launchers.

Tokens are grouped by adapter once (``ops.multi_lora.AdapterMapping``: ``perm`` = token indices in
adapter-sorted order, ``seg_slots``/``seg_starts`` = the segments, ``pos_slots`` = each sorted
position's slot). Kernels read x/dY rows through ``perm`` (no gathered copy) and keep the small
rank-space buffers (S, dS: fp32 ``[T_active, R]``) in sorted order.

Two kernel shapes for the shrink and the expand (the same kernels serve forward and backward):
  BGMV (per token)   one program per sorted token: a GEMV against its adapter. No padding when
                     every token has its own adapter.
  SGMV (per segment) one program per (segment, row block) that holds rows, from the flattened
                     table of ``AdapterMapping.row_blocks`` (a skewed batch launches Σ⌈count/BLOCK_M⌉
                     programs, not segments × ⌈max_count/BLOCK_M⌉): a tile GEMM against the
                     segment's adapter with ``tl.dot``. Best when tokens share adapters.
    shrink  out[p, r] = s? · Σ_k in[perm[p], k] · W[slot, r, k]     (x→S; dY→dS with W = Bᵀ)
    expand  out[perm[p], n] += s? · Σ_r buf[p, r] · W[slot, n, r]   (S→y with W = B; dS→dX with W = Aᵀ)
Backward's dA and dB come from ``_seg_outer_kernel``: per (segment, tile) a fixed-order reduction
over the segment's tokens, so each slot's gradient is deterministic and only from its own tokens.

Work follows each adapter's true rank: rank blocks at or past ``ranks[slot]`` exit at once and
loops over rank stop at it, so no padding is read. A rank is clamped to [0, R] in the kernel (as the
CUDA kernels do), so a ``ranks`` buffer holding a value past R never reads or writes past row R of a slot,
whatever the caller checked. Per-adapter scaling is applied in the kernels.
Tokens with id -1 are not in ``perm``: no program touches their rows. Addresses are 64-bit (token rows,
slots and positions are widened before they meet a stride).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from ._common import (INTERPRETED, check_dims, f32_precision, hash_keep, mma, next_pow2, program_budget,
                      upcast_needed)


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _rank_of(ranks_ptr, slot, R):
    """The slot's true rank, clamped to [0, R]: never a read or write past row R of a slot."""
    return tl.minimum(tl.maximum(tl.load(ranks_ptr + slot), 0), R)


@triton.jit
def _segment_rows(blk_seg_ptr, blk_row0_ptr, seg_slots_ptr, seg_starts_ptr, ranks_ptr, perm_ptr, R,
                  BLOCK_M: tl.constexpr):
    """For program b of the flattened grid (AdapterMapping.row_blocks: segment g, first sorted position):
    its slot, the slot's true rank (clamped), the block's sorted positions (int64), which of them lie in
    the segment, and the tokens they are (int64 row indices)."""
    b = tl.program_id(0)
    g = tl.load(blk_seg_ptr + b)
    slot = tl.load(seg_slots_ptr + g)
    end = tl.load(seg_starts_ptr + g + 1)
    pos = tl.load(blk_row0_ptr + b) + tl.arange(0, BLOCK_M)
    p_ok = pos < end
    tok = tl.load(perm_ptr + pos, mask=p_ok, other=0).to(tl.int64)
    return slot, _rank_of(ranks_ptr, slot, R), pos.to(tl.int64), p_ok, tok


@triton.jit
def _sgmv_shrink_kernel(
    in_ptr, w_ptr, out_ptr, scal_ptr, perm_ptr, seg_slots_ptr, seg_starts_ptr, blk_seg_ptr, blk_row0_ptr, ranks_ptr,
    seed_ptr, thr_ptr, dscale_ptr,
    KD, R, stride_it, stride_ik, stride_ws, stride_wr, stride_wk,
    HAS_SCALE: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, F32_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    slot, rank, pos, p_ok, tok = _segment_rows(blk_seg_ptr, blk_row0_ptr, seg_slots_ptr, seg_starts_ptr, ranks_ptr,
                                               perm_ptr, R, BLOCK_M)
    r0 = tl.program_id(1) * BLOCK_R
    if (tl.max(p_ok.to(tl.int32), 0) > 0) & (r0 < rank):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_ok = rr < rank
        w_base = w_ptr + slot.to(tl.int64) * stride_ws
        rk0 = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        thr = tl.load(thr_ptr + slot) if DROPOUT else 0
        for k0 in range(0, KD, BLOCK_K):
            rk = k0 + rk0
            k_ok = rk < KD
            rk64 = rk.to(tl.int64)
            xt = tl.load(in_ptr + tok[:, None] * stride_it + rk64[None, :] * stride_ik,
                         mask=p_ok[:, None] & k_ok[None, :], other=0.0)
            if DROPOUT:  # the slot's dropout on x (forward's shrink): the hash of (token, column)
                xt = tl.where(hash_keep(seed_ptr, tok[:, None] * KD + rk64[None, :], thr), xt, 0.0)
            wt = tl.load(w_base + rr.to(tl.int64)[None, :] * stride_wr + rk64[:, None] * stride_wk,
                         mask=r_ok[None, :] & k_ok[:, None], other=0.0)
            acc = mma(xt.to(wt.dtype), wt, acc, UPCAST, F32_PREC)
        if HAS_SCALE:
            acc = acc * tl.load(scal_ptr + slot)
        if DROPOUT:
            acc = acc * tl.load(dscale_ptr + slot)
        tl.store(out_ptr + pos[:, None] * R + rr[None, :], acc, mask=p_ok[:, None] & r_ok[None, :])


@triton.jit
def _sgmv_expand_kernel(
    buf_ptr, w_ptr, out_ptr, scal_ptr, perm_ptr, seg_slots_ptr, seg_starts_ptr, blk_seg_ptr, blk_row0_ptr, ranks_ptr,
    seed_ptr, thr_ptr, dscale_ptr,
    ND, R, stride_ws, stride_wn, stride_wr, stride_ot, stride_on,
    HAS_SCALE: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, F32_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    slot, rank, pos, p_ok, tok = _segment_rows(blk_seg_ptr, blk_row0_ptr, seg_slots_ptr, seg_starts_ptr, ranks_ptr,
                                               perm_ptr, R, BLOCK_M)
    if (tl.max(p_ok.to(tl.int32), 0) > 0) & (rank > 0):
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < ND
        rn64 = rn.to(tl.int64)
        w_base = w_ptr + slot.to(tl.int64) * stride_ws
        rr0 = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            rr = r0 + rr0
            r_ok = rr < rank
            st = tl.load(buf_ptr + pos[:, None] * R + rr[None, :], mask=p_ok[:, None] & r_ok[None, :], other=0.0)
            wt = tl.load(w_base + rr.to(tl.int64)[:, None] * stride_wr + rn64[None, :] * stride_wn,
                         mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            acc = mma(st.to(wt.dtype), wt, acc, UPCAST, F32_PREC)
        if HAS_SCALE:
            acc = acc * tl.load(scal_ptr + slot)
        if DROPOUT:  # dX through the slot's dropout (backward's expand): forward's mask, regenerated
            keep = hash_keep(seed_ptr, tok[:, None] * ND + rn64[None, :], tl.load(thr_ptr + slot))
            acc = tl.where(keep, acc * tl.load(dscale_ptr + slot), 0.0)
        optr = out_ptr + tok[:, None] * stride_ot + rn64[None, :] * stride_on
        msk = p_ok[:, None] & n_ok[None, :]
        o = tl.load(optr, mask=msk, other=0.0)
        tl.store(optr, (o.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _bgmv_shrink_kernel(
    in_ptr, w_ptr, out_ptr, scal_ptr, perm_ptr, pos_slots_ptr, ranks_ptr, seed_ptr, thr_ptr, dscale_ptr,
    KD, R, stride_it, stride_ik, stride_ws, stride_wr, stride_wk,
    HAS_SCALE: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pos = tl.program_id(0)
    slot = tl.load(pos_slots_ptr + pos)
    rank = _rank_of(ranks_ptr, slot, R)
    r0 = tl.program_id(1) * BLOCK_R
    if r0 < rank:
        tok = tl.load(perm_ptr + pos).to(tl.int64)
        rr = r0 + tl.arange(0, BLOCK_R)
        r_ok = rr < rank
        w_base = w_ptr + slot.to(tl.int64) * stride_ws
        rk0 = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        thr = tl.load(thr_ptr + slot) if DROPOUT else 0
        for k0 in range(0, KD, BLOCK_K):
            rk = k0 + rk0
            k_ok = rk < KD
            rk64 = rk.to(tl.int64)
            xt = tl.load(in_ptr + tok * stride_it + rk64 * stride_ik, mask=k_ok, other=0.0)
            if DROPOUT:
                xt = tl.where(hash_keep(seed_ptr, tok * KD + rk64, thr), xt, 0.0)
            wt = tl.load(w_base + rr.to(tl.int64)[:, None] * stride_wr + rk64[None, :] * stride_wk,
                         mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            # products of the operands in W's dtype, summed in fp32 (what an fp32-accumulating dot does)
            acc += tl.sum(wt.to(tl.float32) * xt.to(wt.dtype).to(tl.float32)[None, :], axis=1)
        if HAS_SCALE:
            acc = acc * tl.load(scal_ptr + slot)
        if DROPOUT:
            acc = acc * tl.load(dscale_ptr + slot)
        tl.store(out_ptr + pos.to(tl.int64) * R + rr, acc, mask=r_ok)


@triton.jit
def _bgmv_expand_kernel(
    buf_ptr, w_ptr, out_ptr, scal_ptr, perm_ptr, pos_slots_ptr, ranks_ptr, seed_ptr, thr_ptr, dscale_ptr,
    ND, R, stride_ws, stride_wn, stride_wr, stride_ot, stride_on,
    HAS_SCALE: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pos = tl.program_id(0)
    slot = tl.load(pos_slots_ptr + pos)
    rank = _rank_of(ranks_ptr, slot, R)
    if rank > 0:
        tok = tl.load(perm_ptr + pos).to(tl.int64)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < ND
        rn64 = rn.to(tl.int64)
        w_base = w_ptr + slot.to(tl.int64) * stride_ws
        rr0 = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            rr = r0 + rr0
            r_ok = rr < rank
            st = tl.load(buf_ptr + pos.to(tl.int64) * R + rr, mask=r_ok, other=0.0)
            wt = tl.load(w_base + rn64[:, None] * stride_wn + rr.to(tl.int64)[None, :] * stride_wr,
                         mask=n_ok[:, None] & r_ok[None, :], other=0.0)
            acc += tl.sum(wt.to(tl.float32) * st.to(wt.dtype).to(tl.float32)[None, :], axis=1)
        if HAS_SCALE:
            acc = acc * tl.load(scal_ptr + slot)
        if DROPOUT:
            keep = hash_keep(seed_ptr, tok * ND + rn64, tl.load(thr_ptr + slot))
            acc = tl.where(keep, acc * tl.load(dscale_ptr + slot), 0.0)
        optr = (out_ptr + tok * stride_ot) + rn64 * stride_on  # the token's row (scalar), then its columns
        o = tl.load(optr, mask=n_ok, other=0.0)
        tl.store(optr, (o.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _seg_outer_kernel(
    p_ptr, q_ptr, out_ptr, scal_ptr, perm_ptr, seg_slots_ptr, seg_starts_ptr, ranks_ptr, seed_ptr, thr_ptr, dscale_ptr,
    I, J, R, stride_pt, stride_pi, stride_qt, stride_qj, stride_os, stride_oi, stride_oj,
    P_GATHER: tl.constexpr, Q_GATHER: tl.constexpr, RANK_ON_I: tl.constexpr, HAS_SCALE: tl.constexpr,
    DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, F32_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """out[slot, i, j] = s? · Σ_{p in segment} P[row(p), i] · Q[row(p), j], rows gathered through
    perm or taken in sorted order; the rank bounds i (dA) or j (dB). One program owns one output
    tile and walks its segment in order: deterministic, no atomics."""
    g = tl.program_id(0)
    slot = tl.load(seg_slots_ptr + g)
    start = tl.load(seg_starts_ptr + g)
    end = tl.load(seg_starts_ptr + g + 1)
    rank = _rank_of(ranks_ptr, slot, R)
    ri = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    rj = tl.program_id(2) * BLOCK_J + tl.arange(0, BLOCK_J)
    if RANK_ON_I:
        i_ok = ri < rank
        j_ok = rj < J
        live = tl.program_id(1) * BLOCK_I < rank
    else:
        i_ok = ri < I
        j_ok = rj < rank
        live = tl.program_id(2) * BLOCK_J < rank
    if live:
        rm0 = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
        for m0 in range(start, end, BLOCK_M):
            pos = m0 + rm0
            p_ok = pos < end
            tok = tl.load(perm_ptr + pos, mask=p_ok, other=0).to(tl.int64)
            if P_GATHER:
                prow = tok
            else:
                prow = pos.to(tl.int64)
            if Q_GATHER:
                qrow = tok
            else:
                qrow = pos.to(tl.int64)
            pt = tl.load(p_ptr + prow[:, None] * stride_pt + ri.to(tl.int64)[None, :] * stride_pi,
                         mask=p_ok[:, None] & i_ok[None, :], other=0.0)
            qt = tl.load(q_ptr + qrow[:, None] * stride_qt + rj.to(tl.int64)[None, :] * stride_qj,
                         mask=p_ok[:, None] & j_ok[None, :], other=0.0)
            if DROPOUT:  # dA = dSᵀ·drop(x): Q is x (gathered), J its columns
                qt = tl.where(hash_keep(seed_ptr, qrow[:, None] * J + rj.to(tl.int64)[None, :],
                                        tl.load(thr_ptr + slot)), qt, 0.0)
            cd = out_ptr.dtype.element_ty
            acc = mma(tl.trans(pt.to(cd)), qt.to(cd), acc, UPCAST, F32_PREC)
        if HAS_SCALE:
            acc = acc * tl.load(scal_ptr + slot)
        if DROPOUT:
            acc = acc * tl.load(dscale_ptr + slot)
        tl.store(out_ptr + slot.to(tl.int64) * stride_os + ri.to(tl.int64)[:, None] * stride_oi
                 + rj.to(tl.int64)[None, :] * stride_oj,
                 acc.to(out_ptr.dtype.element_ty), mask=i_ok[:, None] & j_ok[None, :])


# --------------------------------------------------------------------------------------------
# launch configurations (by rule; the AOT test compiles every one for sm_80/sm_90, 0 spills)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tile:
    m: int = 0   # tokens per SGMV program / per reduction step
    k: int = 0   # reduction tile (shrink: K; seg_outer: the J side)
    n: int = 0   # output-column tile (expand)
    r: int = 16  # rank tile
    num_warps: int = 4
    num_stages: int = 2


def configs(dtype: torch.dtype, R: int, interpreted: bool = INTERPRETED) -> dict:
    """Tiles for every kernel, for inputs of ``dtype`` and max rank ``R``.

    Rank tiles are at most 64 (a rank above that takes more rank blocks, or loops); fp32 operands
    get half the 16-bit tiles. Under the interpreter small tiles keep tests multi-block and fast.
    """
    if interpreted:
        br = min(next_pow2(R), 32)
        return {"sgmv_shrink": Tile(m=16, k=32, r=br), "sgmv_expand": Tile(m=16, n=32, r=br),
                "bgmv_shrink": Tile(k=32, r=br), "bgmv_expand": Tile(n=32, r=br),
                "outer": Tile(m=16, k=32, r=br)}
    br = min(next_pow2(R), 64)
    f32 = dtype == torch.float32
    br32 = min(br, 32) if f32 else br  # fp32 tiles take twice the registers: cap the rank tile
    return {
        "sgmv_shrink": Tile(m=32, k=32 if f32 else 64, r=br, num_warps=4, num_stages=3),
        "sgmv_expand": Tile(m=32, n=64 if f32 or br > 32 else 128, r=br32, num_warps=8 if f32 else 4, num_stages=2),
        "bgmv_shrink": Tile(k=256 if br <= 16 else (128 if br <= 32 else 64), r=br, num_warps=4, num_stages=2),
        "bgmv_expand": Tile(n=64 if br > 32 else 128, r=br, num_warps=8, num_stages=2),
        "outer": Tile(m=32, k=32 if f32 else 64, r=br32, num_warps=4, num_stages=2),
    }


def _flags(base_dtype, adapter_dtype, *dtypes) -> dict:
    """Every dot here is a LoRA dot: its fp32 precision is the adapter's (``_common.f32_precision``)."""
    return {"UPCAST": upcast_needed(base_dtype, adapter_dtype, *dtypes),
            "F32_PREC": f32_precision(adapter_dtype, base_dtype)}


def fill_shrink(path: str, c: "Tile", m, R: int, device) -> "Tile":
    """The shrink's tile, narrowed while its launch has fewer programs than the machine (a shrink is a
    weight-streaming GEMV per token or segment: idle SMs leave bandwidth unused). SGMV halves its rows per
    program (down to 16, a dot's minimum): 32 adapters × 128 tokens give 128 programs at 32 rows, 256 at 16.
    BGMV (no dot) halves its rank tile (down to 2) and doubles its K step (up to 2048) to keep the tile's size:
    a decode step of 32 tokens at rank 16 gives 32 programs at rank tile 16, 256 at 2."""
    budget = program_budget(device)
    if path == "sgmv":
        while c.m > 16 and m.num_row_blocks(c.m) * triton.cdiv(R, c.r) < budget:
            c = replace(c, m=c.m // 2)
    else:
        while c.r > 2 and m.num_active * triton.cdiv(R, c.r) < budget:
            c = replace(c, r=c.r // 2, k=min(c.k * 2, 2048))
    return c


def _drop_args(drop, ranks):
    """(seed, thresholds, scales) pointers and the DROPOUT flag; unused placeholders (never read) without."""
    if drop is None:
        return (ranks, ranks, ranks), False
    return (drop.seed, drop.thr, drop.scale), True


def _shrink(path, cfg, inp, w, wstrides, out, scal, m, ranks, has_scale, drop=None):
    """out[p, :rank] = s? · drop?(inp[perm[p]]) · W[slot]ᵀ with W read as [S, R, KD] through ``wstrides``."""
    KD, R = inp.shape[1], out.shape[1]
    dptrs, dropout = _drop_args(drop, ranks)
    if path == "sgmv":
        c = fill_shrink(path, cfg["sgmv_shrink"], m, R, inp.device)
        blk_seg, blk_row0 = m.row_blocks(c.m)
        _sgmv_shrink_kernel[(m.num_row_blocks(c.m), triton.cdiv(R, c.r))](
            inp, w, out, scal, m._perm, m._seg_slots, m._seg_starts, blk_seg, blk_row0, ranks, *dptrs, KD, R,
            inp.stride(0), inp.stride(1), *wstrides, HAS_SCALE=has_scale, DROPOUT=dropout,
            BLOCK_M=c.m, BLOCK_K=c.k, BLOCK_R=c.r, num_warps=c.num_warps, num_stages=c.num_stages,
            **_flags(inp.dtype, w.dtype))
    else:
        c = fill_shrink(path, cfg["bgmv_shrink"], m, R, inp.device)
        _bgmv_shrink_kernel[(m.num_active, triton.cdiv(R, c.r))](
            inp, w, out, scal, m._perm, m._pos_slots, ranks, *dptrs, KD, R,
            inp.stride(0), inp.stride(1), *wstrides, HAS_SCALE=has_scale, DROPOUT=dropout,
            BLOCK_K=c.k, BLOCK_R=c.r, num_warps=c.num_warps, num_stages=c.num_stages)


def _expand(path, cfg, buf, w, wstrides, out, scal, m, ranks, has_scale, drop=None):
    """out[perm[p]] += drop?(s? · buf[p, :rank] · W[slot, :, :rank]ᵀ) with W read as [S, ND, R]."""
    ND, R = out.shape[1], buf.shape[1]
    dptrs, dropout = _drop_args(drop, ranks)
    if path == "sgmv":
        c = cfg["sgmv_expand"]
        blk_seg, blk_row0 = m.row_blocks(c.m)
        _sgmv_expand_kernel[(m.num_row_blocks(c.m), triton.cdiv(ND, c.n))](
            buf, w, out, scal, m._perm, m._seg_slots, m._seg_starts, blk_seg, blk_row0, ranks, *dptrs, ND, R,
            *wstrides, out.stride(0), out.stride(1), HAS_SCALE=has_scale, DROPOUT=dropout,
            BLOCK_M=c.m, BLOCK_N=c.n, BLOCK_R=c.r, num_warps=c.num_warps, num_stages=c.num_stages,
            **_flags(out.dtype, w.dtype))
    else:
        c = cfg["bgmv_expand"]
        _bgmv_expand_kernel[(m.num_active, triton.cdiv(ND, c.n))](
            buf, w, out, scal, m._perm, m._pos_slots, ranks, *dptrs, ND, R,
            *wstrides, out.stride(0), out.stride(1), HAS_SCALE=has_scale, DROPOUT=dropout,
            BLOCK_N=c.n, BLOCK_R=c.r, num_warps=c.num_warps, num_stages=c.num_stages)


def _outer(cfg, P, p_gather, Q, q_gather, out, scal, m, ranks, rank_on_i, has_scale, drop=None):
    """out[slot] (viewed [S, I, J]) = s? · Σ over the slot's tokens of P[row]ᵀ drop?(Q[row])."""
    c = cfg["outer"]
    dptrs, dropout = _drop_args(drop, ranks)
    if dropout:  # the hash of a [BLOCK_M, BLOCK_J] tile takes registers: 8 warps share them (triton 3.6 spilled at 4)
        c = replace(c, num_warps=8)
    I, J = out.shape[1], out.shape[2]
    bi, bj = (c.r, c.k) if rank_on_i else (c.k, c.r)
    _seg_outer_kernel[(m.num_segments, triton.cdiv(I, bi), triton.cdiv(J, bj))](
        P, Q, out, scal, m._perm, m._seg_slots, m._seg_starts, ranks, *dptrs, I, J, I if rank_on_i else J,
        P.stride(0), P.stride(1), Q.stride(0), Q.stride(1), out.stride(0), out.stride(1), out.stride(2),
        P_GATHER=p_gather, Q_GATHER=q_gather, RANK_ON_I=rank_on_i, HAS_SCALE=has_scale, DROPOUT=dropout,
        BLOCK_M=c.m, BLOCK_I=bi, BLOCK_J=bj, num_warps=c.num_warps, num_stages=c.num_stages,
        **_flags(Q.dtype if P.dtype == torch.float32 else P.dtype, out.dtype, P.dtype, Q.dtype))


# --------------------------------------------------------------------------------------------
# launchers (2-D x/y; ops/multi_lora.py validates, builds the mapping and computes the base GEMM)
# --------------------------------------------------------------------------------------------
def _b_as_rank_major(B):   # B [S, N, R] read as [S, R, N]
    return B.stride(0), B.stride(2), B.stride(1)


def _a_as_col_major(A):    # A [S, R, K] read as [S, K, R]
    return A.stride(0), A.stride(2), A.stride(1)


def multi_lora_forward(y, x, A, B, m, scal, ranks, path: str, drop=None):
    """Adds the LoRA updates into ``y`` (the base output, [T, N]) in place; returns (y, S fp32 [T_active, R]).
    ``drop``: per-adapter dropout (``ops._torch_dropout.SlotDropout``) on x inside the shrink, or None."""
    R = A.shape[1]
    S = torch.zeros((m.num_active, R), dtype=torch.float32, device=x.device)
    if m.num_active == 0:
        return y, S
    check_dims(T=x.shape[0], K=x.shape[1], N=y.shape[1], max_rank=R, slots=A.shape[0])
    cfg = configs(A.dtype, R)  # the dots' operands are in the adapter dtype (fp32 slot stacks: fp32 tiles)
    _shrink(path, cfg, x, A, (A.stride(0), A.stride(1), A.stride(2)), S, scal, m, ranks, False, drop)
    _expand(path, cfg, S, B, (B.stride(0), B.stride(1), B.stride(2)), y, scal, m, ranks, True)
    return y, S


def multi_lora_backward(dy, x, dx, A, B, S, m, scal, ranks, path: str, need_da: bool, need_db: bool, drop=None):
    """Adds the LoRA part of dX into ``dx`` (the base dY·W, or None); returns (dA or None, dB or None)."""
    dA = torch.zeros_like(A) if need_da else None
    dB = torch.zeros_like(B) if need_db else None
    if m.num_active == 0:
        return dA, dB
    R = A.shape[1]
    check_dims(T=x.shape[0], K=x.shape[1], N=dy.shape[1], max_rank=R, slots=A.shape[0])
    cfg = configs(A.dtype, R)
    if dx is not None or need_da:
        dS = torch.zeros((m.num_active, R), dtype=torch.float32, device=x.device)
        _shrink(path, cfg, dy, B, _b_as_rank_major(B), dS, scal, m, ranks, True)       # dS = s·dY·B
        if dx is not None:
            _expand(path, cfg, dS, A, _a_as_col_major(A), dx, scal, m, ranks, False, drop)  # dX += drop(dS·A)
        if need_da:
            _outer(cfg, dS, False, x, True, dA, scal, m, ranks, True, False, drop)      # dA = dSᵀ·drop(x)
    if need_db:
        _outer(cfg, dy, True, S, False, dB, scal, m, ranks, False, True)                # dB = s·dYᵀ·S
    return dA, dB
