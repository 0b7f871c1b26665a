"""``lora_siblings``: several LoRA'd projections of the same input (q/k/v, gate/up) as one op.

    y = x·Wᵀ + b  with W = [W_1; …; W_n] stacked (one GEMM),   S_i = drop_i(x)·A_iᵀ,
    y[:, slice_i] += s_i · S_i·B_iᵀ

x is read once by the base GEMM and once by one stacked shrink (the members without dropout share it; a member
with dropout has its own mask, as PEFT's separate layers have). Backward: ``dx = dy·W`` (one GEMM) ``+ Σ_i mask_i ⊙
(s_i·dy_i·B_i)·A_i`` (the members without dropout as one stacked GEMM), ``dA_i``, ``dB_i`` per member; masks
regenerated from their seeds.

Members with dropout on CPU (fp32, the C++ extension built) run as a group in the C++ kernels
(``lora_dropout_shrink_group``/``lora_dropout_bwd_group``): each row tile of x is read from memory once and masked
for every member in cache, and dx's tile takes every member's masked term while in cache, so dx is written once
(separate layers read x and write a dx per member, and add them). Each member keeps its own mask and its results
equal the one-member kernels' bit for bit. Elsewhere each member with dropout is its own masked pass.

Under ``torch.autocast`` the inputs are cast like the separate layers' ``F.linear``'s (``ops/_amp.py``).

The reference is ``reference.lora_linear_ref`` per member (the separate projections).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from .. import _ext
from . import _amp, _torch_dropout
from ._autograd import unviewed
from .lora import _use_ext, differentiable_lora_grads, scaled_mm, shrink, shrink_backward


class SiblingCall(NamedTuple):
    """Non-tensor arguments of one call: each member's output width, scaling, dropout p and seed."""
    widths: tuple
    scalings: tuple
    ps: tuple
    seeds: tuple  # int64 [1] tensors, or None where p = 0


def _shrinks(x, As, call: SiblingCall):
    """(S, stacked): S_i = drop_i(x)·A_iᵀ (without the inverted-dropout scale: see ``shrink``), each in A_i's dtype;
    ``stacked`` is (the members of the one stacked shrink, their A's concatenated) when it stacked more than one, else
    None (backward reuses the concat)."""
    S: List[Optional[Tensor]] = [None] * len(As)
    stacked = None
    plain = [i for i, p in enumerate(call.ps) if p == 0]
    if plain:
        cdt = As[plain[0]].dtype
        same = [i for i in plain if As[i].dtype == cdt]
        cat = torch.cat([As[i] for i in same]) if len(same) > 1 else As[same[0]]
        if len(same) > 1:
            stacked = (tuple(same), cat)
        for i, s in zip(same, torch.mm(x.to(cdt), cat.t()).split([As[i].shape[0] for i in same], dim=1)):
            S[i] = s
    group = _dropout_group(x, As, call, [i for i in range(len(As)) if S[i] is None])
    if group:  # members with dropout on the C++ kernels: x read once for all of them, each its own mask
        for i, s in zip(group, _ext.ops().lora_dropout_shrink_group(x, [As[i] for i in group], _keys(call, group))):
            S[i] = s
    for i, p in enumerate(call.ps):  # other members with dropout (each its own mask) or another adapter dtype
        if S[i] is None:
            S[i] = shrink(x, As[i], p, call.seeds[i])
    return S, stacked


def _dropout_group(x, As, call: SiblingCall, members) -> list:
    """The ``members`` with dropout that the C++ group kernels take (fp32 on CPU, built), when there are at least
    two of them (one runs as a separate layer does); else []."""
    group = [i for i in members if call.ps[i] > 0 and _use_ext(x, As[i], call.ps[i])]
    return group if len(group) > 1 else []


def _keys(call: SiblingCall, members) -> list:
    return [int(k) for i in members for k in _torch_dropout.keys(call.seeds[i], call.ps[i])]


def _forward(x, W, b, As, Bs, call: SiblingCall):
    y = torch.addmm(b, x, W.t()) if b is not None else torch.mm(x, W.t())
    S, stacked = _shrinks(x, As, call)
    off = 0
    for i, n in enumerate(call.widths):
        ys = y[:, off:off + n]
        alpha = call.scalings[i] * _torch_dropout.keep_scale(call.ps[i])
        if Bs[i].dtype == y.dtype:
            ys.addmm_(S[i], Bs[i].t(), alpha=alpha)
        else:  # fp32 adapters on a half base: the branch in fp32, added once rounded
            ys += scaled_mm(S[i], Bs[i].t(), alpha).to(y.dtype)
        off += n
    return y, S, stacked


def _backward(dys, x, W, As, Bs, S, call: SiblingCall, need_dx: bool, need_da, need_db, stacked=None):
    """``dys``: each member's dY (None where its output got no gradient), or the stacked dY [T, Σ out]; ``stacked``:
    the forward's (members, concatenated A's), reused when the same members stack here.

    dx is built without a pass of its own: the masked ``dS_i·A_i`` of the members with dropout (the group kernel's
    dx, or the first one's, as in a separate layer) is its buffer, and the stacked ``dS·A`` of the members without
    dropout and the base's ``dY_i·W_i`` are GEMMs accumulating into it; only a member with dropout outside the group
    kernels (not on CPU fp32) after the first adds its masked term with an add."""
    n = len(As)
    dy_all = None
    if isinstance(dys, Tensor):  # stacked: the base's dx in one GEMM, each member's dY a column block
        dy_all = dys
        dys = list(dys.split(list(call.widths), dim=1))
    dA: List[Optional[Tensor]] = [None] * n
    dB: List[Optional[Tensor]] = [None] * n
    dS: List[Optional[Tensor]] = [None] * n
    has_ds = [dys[i] is not None and (need_dx or need_da[i]) for i in range(n)]
    plain = [i for i in range(n) if call.ps[i] == 0 and has_ds[i]]
    same = [i for i in plain if As[i].dtype == As[plain[0]].dtype] if plain else []
    # the members without dropout write their dS straight into the columns of the stacked dS (no cat)
    dS_cat, cols = None, {}
    if len(same) > 1:
        dS_cat = x.new_empty((x.shape[0], sum(As[i].shape[0] for i in same)), dtype=As[same[0]].dtype)
        cols = dict(zip(same, dS_cat.split([As[i].shape[0] for i in same], dim=1)))
    for i in range(n):
        if dys[i] is None:
            continue
        cdt = As[i].dtype
        dyc = dys[i].to(cdt) if dys[i].dtype != cdt else dys[i]
        alpha = call.scalings[i] * _torch_dropout.keep_scale(call.ps[i])  # (1 without dropout)
        if need_db[i]:
            dB[i] = scaled_mm(dyc.t(), S[i].to(cdt), alpha)
        if has_ds[i]:
            dS[i] = scaled_mm(dyc, Bs[i], alpha, out=cols.get(i))
    dx: Optional[Tensor] = None
    # members with dropout on the C++ kernels: one pass over x and dx's tiles for all of them (dx's buffer)
    group = _dropout_group(x, As, call, [i for i in range(n) if dS[i] is not None])
    if group and (need_dx or any(need_da[i] for i in group)):
        gdx, gdA = _ext.ops().lora_dropout_bwd_group([dS[i] for i in group], x, [As[i] for i in group],
                                                     _keys(call, group), need_dx, [int(need_da[i]) for i in group])
        dx = gdx if need_dx else None
        for i, g in zip(group, gdA):
            dA[i] = g if need_da[i] else None
    # other members with dropout (each its own mask) or another adapter dtype: masked dS_i·A_i, the first one dx's
    # buffer if the group gave none
    for i in [i for i in plain if i not in same] + [i for i in range(n) if call.ps[i] > 0 and dS[i] is not None
                                                    and i not in group]:
        ddx, dA[i] = shrink_backward(dS[i], x, As[i], call.ps[i], call.seeds[i], need_dx, need_da[i])
        if need_dx:
            ddx = ddx.to(x.dtype) if ddx.dtype != x.dtype else ddx
            dx = ddx if dx is None else dx.add_(ddx)
    if same:  # the members without dropout: one stacked dS·A, a GEMM into dx
        if dS_cat is None:  # one member (more write into the stacked dS above)
            dS_cat = dS[same[0]]
        if stacked is not None and stacked[0] == tuple(same):
            A_cat = stacked[1]
        else:
            A_cat = torch.cat([As[i] for i in same]) if len(same) > 1 else As[same[0]]
        if need_dx:
            if dx is None:
                dx = torch.mm(dS_cat, A_cat)
                dx = dx.to(x.dtype) if dx.dtype != x.dtype else dx
            elif A_cat.dtype == dx.dtype:
                dx.addmm_(dS_cat, A_cat)
            else:
                dx += torch.mm(dS_cat, A_cat).to(dx.dtype)
        if any(need_da[i] for i in same):
            dA_cat = torch.mm(dS_cat.t(), x.to(A_cat.dtype))
            for i, g in zip(same, dA_cat.split([As[i].shape[0] for i in same])):
                dA[i] = g if need_da[i] else None
    if need_dx:  # the frozen base: dY·W (stacked) or Σ_i dY_i·W_i, GEMMs accumulating into dx
        if dy_all is not None:
            dx = torch.mm(dy_all, W) if dx is None else dx.addmm_(dy_all, W)
        else:
            off = 0
            for w, d in zip(call.widths, dys):
                if d is not None:
                    Wi = W[off:off + w]
                    dx = torch.mm(d, Wi) if dx is None else dx.addmm_(d, Wi)
                off += w
        if dx is None:
            dx = torch.zeros_like(x)
    for i in range(n):  # a member whose output got no gradient: zero gradients for its factors
        if dys[i] is None:
            dA[i] = torch.zeros_like(As[i]) if need_da[i] else None
            dB[i] = torch.zeros_like(Bs[i]) if need_db[i] else None
    return dx, dA, dB


def column_blocks(y: Tensor, widths) -> tuple:
    """y's column blocks as tensors of their own over y's storage (``_autograd.unviewed``), not views of y: autograd
    forbids modifying in place the views a custom Function returns (or ``split``'s), and a member's output may be
    modified in place (as a separate layer's may). The blocks are disjoint, and the op saves none of them."""
    return tuple(unviewed(b) for b in y.split(list(widths), dim=1))


class _Siblings(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W, b, call, split, *ab):
        n = len(call.widths)
        As, Bs = ab[:n], ab[n:]
        y, S, stacked = _forward(x, W, b, As, Bs, call)
        # (the A's themselves too: their version is checked; the stacked A's too, reused by backward: every tensor
        # backward reads goes through saved-tensor hooks, e.g. CPU offload, and activation-memory accounting)
        ctx.save_for_backward(x, W, *As, *Bs, *S, *(() if stacked is None else (stacked[1],)))
        ctx.stacked_members = None if stacked is None else stacked[0]
        ctx.call, ctx.split, ctx.has_bias = call, split, b is not None
        if split:  # each member's output a column block: backward gets each one's dY, never concatenated
            return column_blocks(y, call.widths)
        return y

    @staticmethod
    def backward(ctx, *dys):
        if torch.is_grad_enabled():  # create_graph=True: gradients autograd can differentiate again
            return _differentiable_backward(ctx, dys)
        call = ctx.call
        n = len(call.widths)
        saved = ctx.saved_tensors
        x, W, As, Bs, S = saved[0], saved[1], saved[2:2 + n], saved[2 + n:2 + 2 * n], saved[2 + 2 * n:2 + 3 * n]
        stacked = None if ctx.stacked_members is None else (ctx.stacked_members, saved[2 + 3 * n])
        need = ctx.needs_input_grad
        dy = [None if d is None else d.contiguous() for d in dys] if ctx.split else dys[0].contiguous()
        dx, dA, dB = _backward(dy, x, W, As, Bs, S, call, need[0], need[5:5 + n], need[5 + n:5 + 2 * n], stacked)
        dW = db = None
        if need[1] or (need[2] and ctx.has_bias):  # an unfrozen base (correct, not fused)
            dy_full = torch.cat([d if d is not None else x.new_zeros(x.shape[0], w) for d, w in zip(dy, call.widths)],
                                dim=1) if ctx.split else dy
            dW = torch.mm(dy_full.t(), x) if need[1] else None
            db = dy_full.sum(0) if need[2] and ctx.has_bias else None
        return (dx, dW, db, None, None, *dA, *dB)


def _differentiable_backward(ctx, dys):
    """The backward as differentiable torch ops (``create_graph=True``): per member, ``differentiable_lora_grads`` (S
    recomputed from x and A, each mask regenerated from its seed) plus the base's terms."""
    call = ctx.call
    n = len(call.widths)
    saved = ctx.saved_tensors
    x, W, As, Bs = saved[0], saved[1], saved[2:2 + n], saved[2 + n:2 + 2 * n]
    need = ctx.needs_input_grad
    dys = list(dys) if ctx.split else list(dys[0].split(list(call.widths), dim=1))
    dys = [d if d is not None else x.new_zeros(x.shape[0], w) for d, w in zip(dys, call.widths)]
    dx = dW = db = None
    dA: List[Optional[Tensor]] = [None] * n
    dB: List[Optional[Tensor]] = [None] * n
    off = 0
    for i, (w, dy) in enumerate(zip(call.widths, dys)):
        dxl, dA[i], dB[i] = differentiable_lora_grads(x, dy, As[i], Bs[i], call.scalings[i], call.ps[i], call.seeds[i],
                                                      need[0], need[5 + i], need[5 + n + i])
        if need[0]:
            term = dy @ W[off:off + w] + dxl
            dx = term if dx is None else dx + term
        off += w
    if need[1]:
        dW = torch.cat(dys, dim=1).t() @ x
    if need[2] and ctx.has_bias:
        db = torch.cat(dys, dim=1).sum(0)
    return (dx, dW, db, None, None, *dA, *dB)


def lora_siblings(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_As: Sequence[Tensor],
                  lora_Bs: Sequence[Tensor], scalings: Sequence[float], dropout_ps: Sequence[float] = (),
                  training: bool = False, split: bool = False):
    """``[y_1 | … | y_n]`` (``[..., Σ out_i]``), ``y_i = x·W_iᵀ + b_i + s_i·(drop_i(x)·A_iᵀ)·B_iᵀ``, for the stacked
    base ``weight`` ``[Σ out_i, in]`` (and ``bias`` ``[Σ out_i]`` or None). ``dropout_ps``: each member's p (applied
    when ``training``; default none). The members' outputs are the column blocks, in order; ``split=True`` returns
    them as a tuple (those blocks, each a tensor of its own over the one output buffer: modifiable in place, as a
    separate layer's output), and backward then takes each member's dY as it comes (dX = Σ dY_i·W_i) instead of
    concatenating them."""
    amp = _amp.autocast_dtype(x)
    if amp is not None:  # like the separate layers' F.linear under autocast: every input in the autocast dtype
        with _amp.disabled(x):
            return lora_siblings(*_amp.cast(amp, x, weight, bias), _amp.cast(amp, *lora_As), _amp.cast(amp, *lora_Bs),
                                 scalings, dropout_ps, training, split)
    n = len(lora_As)
    if n < 1 or len(lora_Bs) != n or len(scalings) != n:
        raise ValueError(f"lora_As, lora_Bs and scalings must have one entry per member, got {len(lora_As)}, "
                         f"{len(lora_Bs)}, {len(scalings)}")
    ps = tuple(float(p) for p in dropout_ps) if dropout_ps else (0.0,) * n
    if len(ps) != n or any(not 0.0 <= p < 1.0 for p in ps):
        raise ValueError(f"dropout_ps must hold one p in [0, 1) per member, got {dropout_ps!r}")
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise TypeError("x must be a torch.Tensor with at least 1 dim")
    K = x.shape[-1]
    widths = tuple(int(B.shape[0]) for B in lora_Bs)
    if weight.dim() != 2 or tuple(weight.shape) != (sum(widths), K):
        raise ValueError(f"weight must have shape [{sum(widths)}, {K}] (the members' outputs stacked), got "
                         f"{tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (sum(widths),):
        raise ValueError(f"bias must have shape [{sum(widths)}], got {tuple(bias.shape)}")
    for i, (A, B) in enumerate(zip(lora_As, lora_Bs)):
        if A.dim() != 2 or A.shape[1] != K or B.dim() != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(f"member {i}: lora_A must be [r, {K}] and lora_B [out, r], got {tuple(A.shape)} and "
                             f"{tuple(B.shape)}")
        if A.dtype not in (x.dtype, torch.float32) or B.dtype != A.dtype:
            raise TypeError(f"member {i}: lora_A/lora_B must both have x's dtype or float32, got {A.dtype}/{B.dtype}")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"weight and bias must have x's dtype {x.dtype}")
    if not training:
        ps = (0.0,) * n
    seeds = tuple(_torch_dropout.draw_seed(x.device) if p > 0 else None for p in ps)
    call = SiblingCall(widths, tuple(float(s) for s in scalings), ps, seeds)
    x2 = x.reshape(-1, K)
    if split:
        return tuple(y.view(*x.shape[:-1], w) for y, w in zip(_Siblings.apply(x2, weight, bias, call, True, *lora_As,
                                                                               *lora_Bs), widths))
    y = _Siblings.apply(x2, weight, bias, call, False, *lora_As, *lora_Bs)
    return y.view(*x.shape[:-1], sum(widths))
