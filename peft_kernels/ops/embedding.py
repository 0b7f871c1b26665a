"""``lora_embedding``: a frozen embedding lookup plus a LoRA update, fused, with autograd.

    y_t = W[i_t] + s · B·A[:, i_t]            (i_t = ids[t]; PEFT's ``lora_embedding_A`` [r, V], ``_B`` [D, r])

One lookup of the table, one gather of A's columns (r numbers per token) and one GEMM [T, r]·[r, D] added in
place. Saved-tensor policy: the ids only (plus the parameters); the r-wide S = Aᵀ[ids] is gathered again in
backward (r numbers per token, cheaper to recompute than to keep). Rows of ``padding_idx`` get no gradient,
and ``scale_grad_by_freq`` divides each token's gradient by its id's count in the batch, as ``F.embedding``.

Backends: torch only, on every device. The traffic model (README, "LoRA on embeddings"): the lookup moves
T·D values in and out; a fused Triton kernel would save the one extra read and write of y that ``addmm_``
makes (2·T·D of 4·T·D). For a training step that is under 0.1% of the bytes the linear layers move (a 4096-wide
model with T = 4096 tokens: 64 MiB of 29 GiB), so a kernel would not pay for its maintenance.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import dispatch

SUPPORTED = ("torch",)
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def validate(ids, weight, lora_A, lora_B, scaling, padding_idx):
    for name, t in (("ids", ids), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"ids must be an int32/int64 tensor of token ids, got {ids.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be the 2-D table [num_embeddings, embedding_dim], got {tuple(weight.shape)}")
    V, D = weight.shape
    if lora_A.dim() != 2 or lora_A.shape[1] != V or lora_A.shape[0] < 1:
        raise ValueError(f"lora_A must have shape [r, num_embeddings={V}], got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if tuple(lora_B.shape) != (D, r):
        raise ValueError(f"lora_B must have shape [embedding_dim={D}, r={r}], got {tuple(lora_B.shape)}")
    for name, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name} must be float32/float16/bfloat16/float64, got {t.dtype}")
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"lora_A and lora_B must have one dtype, got {lora_A.dtype} and {lora_B.dtype}")
    devs = {t.device for t in (ids, weight, lora_A, lora_B)}
    if len(devs) > 1:
        raise ValueError(f"ids, weight, lora_A and lora_B must be on one device, got {sorted(map(str, devs))}")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling must be a float, got {scaling!r}")
    if padding_idx is not None and (isinstance(padding_idx, bool) or not isinstance(padding_idx, int)
                                    or not -V <= padding_idx < V):
        raise ValueError(f"padding_idx must be None or an int in [-{V}, {V}), got {padding_idx!r}")
    if ids.numel() and not torch.compiler.is_compiling():  # (a graph: index_select checks on the CPU)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= V:
            raise ValueError(f"ids must be in [0, num_embeddings={V}), got min {lo}, max {hi}")
    return (padding_idx + V) if padding_idx is not None and padding_idx < 0 else padding_idx


def _row_weights(ids: torch.Tensor, padding_idx: Optional[int], by_freq: bool, V: int, dtype):
    """Per-token gradient factor: 0 on padding rows, 1/count(id) with scale_grad_by_freq; None if all ones."""
    w = None
    if by_freq:
        counts = torch.bincount(ids, minlength=V)
        w = 1.0 / counts.index_select(0, ids).to(dtype)
    if padding_idx is not None:
        keep = (ids != padding_idx).to(dtype)
        w = keep if w is None else w * keep
    return w


class LoRAEmbeddingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, lora_A, lora_B, scaling, padding_idx, by_freq):
        flat = ids.reshape(-1)
        y = weight.index_select(0, flat)  # [T, D], the table's dtype
        S = lora_A.index_select(1, flat).t()  # [T, r], the adapter's dtype
        if y.dtype == lora_A.dtype:
            y.addmm_(S, lora_B.t(), alpha=scaling)
        else:  # PEFT: the sum in the adapter's dtype, cast back to the table's
            y = torch.addmm(y.to(lora_A.dtype), S, lora_B.t(), alpha=scaling).to(weight.dtype)
        ctx.save_for_backward(flat, lora_A, lora_B)
        ctx.scaling, ctx.padding_idx, ctx.by_freq = scaling, padding_idx, by_freq
        ctx.V, ctx.wdtype = weight.shape[0], weight.dtype
        return y  # [T, D]: viewed with ids' shape outside (a view made inside a Function could not be modified in place)

    @staticmethod
    def backward(ctx, dy):
        flat, A, B = ctx.saved_tensors
        need_w, need_a, need_b = ctx.needs_input_grad[1:4]
        dy2 = dy.reshape(flat.numel(), B.shape[0])  # (not -1: no ids is a valid batch, as for nn.Embedding)
        rw = _row_weights(flat, ctx.padding_idx, ctx.by_freq, ctx.V, dy2.dtype)
        dyw = dy2 if rw is None else dy2 * rw[:, None]
        dW = dA = dB = None
        if need_w:
            dW = torch.zeros((ctx.V, dy2.shape[1]), dtype=ctx.wdtype, device=dy.device).index_add_(
                0, flat, dyw.to(ctx.wdtype))
        if need_a or need_b:
            dyc = dy2.to(A.dtype)
            if need_b:
                S = A.index_select(1, flat).t()
                dB = torch.mm(dyc.t(), S).mul_(ctx.scaling)
            if need_a:
                dS = torch.mm(dyw.to(A.dtype), B).mul_(ctx.scaling)  # [T, r]
                dA = torch.zeros_like(A).index_add_(1, flat, dS.t())
        return None, dW, dA, dB, None, None, None


def lora_embedding(ids: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                   scaling: float, *, padding_idx: Optional[int] = None, scale_grad_by_freq: bool = False,
                   backend: str = "auto") -> torch.Tensor:
    """``W[ids] + scaling · (Aᵀ[ids])·Bᵀ`` with autograd for lora_A, lora_B (and the table if it requires grad).

    ``ids`` int32/int64, any shape, each in [0, V); ``weight`` [V, D]; ``lora_A`` [r, V]; ``lora_B`` [D, r]
    (one dtype, float32 on a half table as PEFT keeps it). Returns ``[*ids.shape, D]`` in the table's dtype.
    ``backend``: "auto" | "torch" (the only one: see the module doc for why there is no kernel)."""
    pad = validate(ids, weight, lora_A, lora_B, scaling, padding_idx)
    dispatch.resolve(backend, weight.device, None, SUPPORTED)
    if not isinstance(scale_grad_by_freq, bool):
        raise TypeError(f"scale_grad_by_freq must be a bool, got {scale_grad_by_freq!r}")
    if ids.dtype != torch.int64:
        ids = ids.long()
    if not (torch.is_grad_enabled() and (weight.requires_grad or lora_A.requires_grad or lora_B.requires_grad)):
        with torch.no_grad():
            y = LoRAEmbeddingFunction.forward(_NoCtx(), ids, weight, lora_A, lora_B, float(scaling), pad,
                                              scale_grad_by_freq)
    else:
        y = LoRAEmbeddingFunction.apply(ids, weight, lora_A, lora_B, float(scaling), pad, scale_grad_by_freq)
    return y.view(*ids.shape, weight.shape[1])


class _NoCtx:
    def save_for_backward(self, *a):
        pass


def embedding_base(ids, weight, padding_idx=None):
    return F.embedding(ids, weight, padding_idx=padding_idx)


def multi_lora_embedding(ids: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                         scalings, adapter_ids, *, ranks: Optional[torch.Tensor] = None,
                         padding_idx: Optional[int] = None, check_ids: bool = True) -> torch.Tensor:
    """Many embedding LoRAs, one chosen per token: ``y_t = W[i_t] + s_a · B_a[:, :r_a]·A_a[:r_a, i_t]``,
    ``a = adapter_ids[t]`` (-1: the table only).

    ``lora_A`` [S, R, V] and ``lora_B`` [S, D, R] are the slot stacks (slot ``a`` holds PEFT's
    ``lora_embedding_A`` [r, V] in ``lora_A[a, :r]`` and ``lora_embedding_B`` [D, r] in ``lora_B[a, :, :r]``),
    ``scalings``/``ranks`` [S]. ``adapter_ids``: one id per token of ``ids`` (or per row of a 2-D ``ids``), or an
    ``AdapterMapping`` built for ``ids.numel()`` tokens. Tokens are grouped by adapter once (``build_mapping``)
    and each adapter's tokens take one gather of A's columns and one GEMM; autograd gives dA and dB (the gather's
    gradient follows ``F.embedding``'s rules for ``padding_idx``). Torch ops on every device (see
    :func:`lora_embedding` for why there is no kernel)."""
    from ..ops.multi_lora import AdapterMapping, _as_float_vector, _build_mapping
    from ..reference import expand_adapter_ids

    for name, t in (("ids", ids), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be the 2-D table [num_embeddings, embedding_dim], got {tuple(weight.shape)}")
    V, D = weight.shape
    if lora_A.dim() != 3 or lora_A.shape[2] != V:
        raise ValueError(f"lora_A must have shape [slots, max_rank, num_embeddings={V}], got {tuple(lora_A.shape)}")
    S, R = lora_A.shape[:2]
    if tuple(lora_B.shape) != (S, D, R):
        raise ValueError(f"lora_B must have shape [slots={S}, embedding_dim={D}, max_rank={R}], got {tuple(lora_B.shape)}")
    pad = validate(ids, weight, lora_A[0], lora_B[0], 1.0, padding_idx)
    scal = _as_float_vector(scalings, "scalings", S, weight.device, torch.float64)
    flat = ids.reshape(-1).long()
    T = flat.numel()
    if isinstance(adapter_ids, AdapterMapping):
        m = adapter_ids
        if m.num_tokens != T or m.num_slots != S:
            raise ValueError(f"adapter_ids (an AdapterMapping) is for {m.num_tokens} tokens and {m.num_slots} slots; "
                             f"ids has {T} tokens and lora_A {S} slots")
    else:
        a_ids = expand_adapter_ids(adapter_ids, (*ids.shape, 1))
        m, _ = _build_mapping(a_ids, T, S, weight.device, check_ids)
    y = F.embedding(flat, weight, padding_idx=pad)
    parts, rows = [], []
    for a, r, seg_rows, toks in _token_segments(flat, m, ranks, R):
        Sa = F.embedding(toks, lora_A[a, :r].t(), padding_idx=pad)  # [n, r]
        parts.append((Sa @ lora_B[a, :, :r].t()) * float(scal[a]))
        rows.append(seg_rows)
    if not parts:
        return y.view(*ids.shape, D)
    Z = torch.cat(parts)
    out = y.to(Z.dtype).index_add(0, torch.cat(rows), Z)
    return out.to(weight.dtype).view(*ids.shape, D)


def _token_segments(flat, m, ranks, R: int):
    """(slot, rank, rows, token ids) of each adapter's tokens in the grouping ``m``, ranks clamped to [0, R] and
    rank-0 slots skipped (``ops.multi_lora._segments``)."""
    from .multi_lora import _segments

    perm = m._perm.long()
    for a, s, e, r in _segments(m, [R] * m.num_slots if ranks is None else ranks.tolist(), R):
        rows = perm[s:e]
        yield a, r, rows, flat.index_select(0, rows)


def multi_lora_embedding_grads(dy, ids, lora_A, lora_B, scalings, ranks, adapter_ids, padding_idx=None):
    """(dA, dB) of :func:`multi_lora_embedding` for the output gradient ``dy`` (what its autograd computes: the
    compiled path's backward). Per adapter a with rank r: S = Aᵀ[ids] (its tokens), dB = s·dYᵀ·S, dA[:, ids] +=
    (s·dY·B)ᵀ, padding tokens giving A no gradient."""
    from ..ops.multi_lora import _build_mapping
    from ..reference import expand_adapter_ids

    S, R = lora_A.shape[:2]
    flat = ids.reshape(-1).long()
    T = flat.numel()
    m, _ = _build_mapping(expand_adapter_ids(adapter_ids, (*ids.shape, 1)), T, S, lora_A.device, False)
    scal_h = [float(v) for v in scalings.tolist()]
    dy2 = dy.reshape(T, -1).to(lora_A.dtype)
    dA, dB = torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    for a, r, rows, toks in _token_segments(flat, m, ranks, R):
        dz = dy2.index_select(0, rows) * scal_h[a]
        dB[a, :, :r] = dz.t() @ lora_A[a, :r].index_select(1, toks).t()
        dS = dz @ lora_B[a, :, :r]
        if padding_idx is not None:
            dS = dS * (toks != padding_idx).to(dS.dtype)[:, None]
        dA[a, :r].index_add_(1, toks, dS.t())
    return dA, dB
