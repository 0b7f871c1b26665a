"""LoRA on mixture-of-experts weights: every expert's frozen GEMM plus its own low-rank update, over the tokens
routed to it, as one grouped computation (forward and backward), with no ``[E, out, in]`` delta ever built.

``grouped_lora_linear(x, starts, W, A, B, s)``: ``x`` holds the routed tokens sorted by expert (expert ``e`` owns
rows ``starts[e]:starts[e+1]``), ``W`` ``[E, N, K]`` the frozen expert weights, ``A`` ``[E, r, K]`` / ``B``
``[E, N, r]`` the experts' LoRA factors:

    y[rows of e] = x_e·W_eᵀ + s·(x_e·A_eᵀ)·B_eᵀ

Backward per expert: ``dx_e = dy_e·W_e + s·(dy_e·B_e)·A_e``, ``dA_e = s·(dy_e·B_e)ᵀ·x_e``,
``dB_e = s·dy_eᵀ·(x_e·A_eᵀ)``, written into ``[E, …]`` gradients directly (an expert with no tokens gets zeros);
the order of every sum is fixed, so results are deterministic. HF PEFT's ``target_parameters`` LoRA instead adds
``s·B·A`` to the whole expert stack on every forward (a ``baddbmm`` the size of all experts' weights) and
differentiates through it.

Backends: "torch" (the per-expert GEMMs below, any device) and "triton" (``kernels/moe.py``: one grouped-GEMM launch
per projection with each expert's LoRA in its accumulator, forward and dX, and dA/dB as per-expert fixed-order
reductions; rank ≤ 128); "auto" is the measured choice on CUDA (``dispatch``), torch elsewhere.

``moe_experts_forward``: transformers' fused-expert MLP (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I],
``act(gate) * up``, routing weights, scatter-add) with the tokens grouped by expert once per layer
(``build_mapping``) and both projections through ``grouped_lora_linear``.
The reference is ``reference.moe_experts_ref``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _amp
from ._autograd import first_order_only


def _segments(starts):
    """(expert, first row, end row) of every expert that has rows."""
    return [(e, a, b) for e, (a, b) in enumerate(zip(starts, starts[1:])) if a < b]


def _weight_grad(dy, x, W, starts):
    """dW[e] = dY_eᵀ·x_e per expert (a trainable expert stack, never under LoRA; every backend, on torch)."""
    dW = torch.zeros_like(W)
    for e, a, b in _segments(starts):
        torch.mm(dy[a:b].t(), x[a:b], out=dW[e])
    return dW


class _GroupedLoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W, A, B, scaling, starts, backend="torch"):
        ctx.backend = backend
        if backend == "triton":
            from ..kernels.moe import grouped_forward

            y, S = grouped_forward(x, starts, W, A, B, scaling)
            ctx.save_for_backward(x, W, A, B, S)
            ctx.scaling, ctx.starts = scaling, starts
            return y
        M, N = x.shape[0], W.shape[1]
        y = x.new_empty((M, N))
        lora = A is not None
        S = x.new_empty((M, A.shape[1]), dtype=A.dtype) if lora else None
        for e, a, b in _segments(starts):
            xe = x[a:b]
            if lora:
                se = torch.mm(xe.to(A.dtype), A[e].t(), out=S[a:b])
                lo = torch.mm(se, B[e].t())
                if lo.dtype == y.dtype:
                    torch.addmm(lo, xe, W[e].t(), beta=scaling, out=y[a:b])
                else:
                    torch.mm(xe, W[e].t(), out=y[a:b])
                    y[a:b] += (lo * scaling).to(y.dtype)
            else:
                torch.mm(xe, W[e].t(), out=y[a:b])
        ctx.save_for_backward(x, W, A, B, S)
        ctx.scaling, ctx.starts = scaling, starts
        return y

    @staticmethod
    @first_order_only("grouped_lora_linear")  # (the saved S and the in-place dA/dB: first-order only)
    def backward(ctx, dy):
        x, W, A, B, S = ctx.saved_tensors
        s, starts = ctx.scaling, ctx.starts
        need_x, need_w, need_a, need_b = ctx.needs_input_grad[:4]
        lora = A is not None
        if ctx.backend == "triton":
            from ..kernels.moe import grouped_backward

            dx, dA, dB = grouped_backward(dy, x, starts, W, A, B, S, s, need_x, lora and need_a, lora and need_b)
            return dx, _weight_grad(dy, x, W, starts) if need_w else None, dA, dB, None, None, None
        dy = dy.contiguous()
        dx = torch.empty_like(x) if need_x else None
        dA = torch.zeros_like(A) if lora and need_a else None
        dB = torch.zeros_like(B) if lora and need_b else None
        for e, a, b in _segments(starts):
            dye = dy[a:b]
            if not lora:
                if need_x:
                    torch.mm(dye, W[e], out=dx[a:b])
                continue
            dyc = dye.to(A.dtype)
            if dB is not None:
                torch.mm(dyc.t(), S[a:b], out=dB[e]).mul_(s)
            if need_x or dA is not None:
                dS = torch.mm(dyc, B[e]).mul_(s)
                if dA is not None:
                    torch.mm(dS.t(), x[a:b].to(A.dtype), out=dA[e])
                if need_x:
                    lo = torch.mm(dS, A[e])
                    if lo.dtype == dx.dtype:
                        torch.addmm(lo, dye, W[e], out=dx[a:b])
                    else:
                        torch.mm(dye, W[e], out=dx[a:b])
                        dx[a:b] += lo.to(dx.dtype)
        if need_x and starts[-1] < x.shape[0]:  # rows past the last expert (none are built) get no gradient
            dx[starts[-1]:].zero_()
        return dx, _weight_grad(dy, x, W, starts) if need_w else None, dA, dB, None, None, None


def _check(x, W, A, B, starts):
    if W.dim() != 3 or W.shape[2] != x.shape[1]:
        raise ValueError(f"weight must be [E, N, {x.shape[1]}], got {tuple(W.shape)}")
    E = W.shape[0]
    if len(starts) != E + 1 or starts[0] != 0 or any(b < a for a, b in zip(starts, starts[1:])) \
            or starts[-1] > x.shape[0]:
        raise ValueError(f"starts must be {E + 1} non-decreasing offsets from 0 to at most {x.shape[0]}, got "
                         f"{list(starts)[:8]}")
    if (A is None) != (B is None):
        raise ValueError("lora_A and lora_B must be given together")
    if A is not None:
        if A.dim() != 3 or A.shape[0] != E or A.shape[2] != x.shape[1]:
            raise ValueError(f"lora_A must be [{E}, r, {x.shape[1]}], got {tuple(A.shape)}")
        if tuple(B.shape) != (E, W.shape[1], A.shape[1]):
            raise ValueError(f"lora_B must be [{E}, {W.shape[1]}, {A.shape[1]}], got {tuple(B.shape)}")
        if A.dtype not in (x.dtype, torch.float32) or B.dtype != A.dtype:
            raise TypeError(f"lora_A/lora_B must both have x's dtype or float32, got {A.dtype}/{B.dtype}")
    if W.dtype != x.dtype:
        raise TypeError(f"weight must have x's dtype {x.dtype}, got {W.dtype}")


def _op_reason(x: Tensor, A: Optional[Tensor]):
    def reason(name: str):
        if name != "triton":
            return None
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"the Triton kernels take float32/float16/bfloat16, got {x.dtype}"
        from ..kernels.moe import MAX_RANK

        if A is not None and A.shape[1] > MAX_RANK:
            return f"the Triton grouped GEMM holds the rank in one tile (at most {MAX_RANK}), got rank {A.shape[1]}"
        return None
    return reason


def grouped_lora_linear(x: Tensor, starts: Sequence[int], weight: Tensor, lora_A: Optional[Tensor] = None,
                        lora_B: Optional[Tensor] = None, scaling: float = 1.0, backend: str = "auto") -> Tensor:
    """Each expert's rows of ``x`` (sorted by expert; ``starts``: E + 1 host offsets) through its frozen weight
    and its LoRA (see the module docstring). Rows past ``starts[-1]`` are left uninitialised (callers never read
    them). ``backend``: "torch" (a GEMM per expert), "triton" (``kernels.moe``: one grouped launch with the LoRA
    in its accumulator) or "auto" (the measured choice on CUDA, see ``dispatch``; torch elsewhere)."""
    from .. import dispatch

    if not isinstance(x, Tensor) or not isinstance(weight, Tensor):
        raise TypeError(f"x and weight must be tensors, got {type(x).__name__} and {type(weight).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [rows, in_features], got shape {tuple(x.shape)}")
    starts = tuple(int(v) for v in starts)
    _check(x, weight, lora_A, lora_B, starts)
    name = dispatch.resolve(backend, x.device, _op_reason(x, lora_A), tune=lambda: dispatch.op_tune(
        "grouped_lora_linear", (x, weight, lora_A, lora_B), (),
        lambda t, be: grouped_lora_linear(t[0], starts, *t[1:], scaling, backend=be)))
    return _GroupedLoRA.apply(x, weight, lora_A, lora_B, float(scaling), starts, name)


def route(top_k_index: Tensor, num_experts: int):
    """(flat assignment indices sorted by expert, E + 1 host offsets): one stable sort and one host copy of the
    counts (``build_mapping``). Entries outside [0, E) (transformers' "no expert" sentinel E) are dropped."""
    from .multi_lora import build_mapping

    flat = top_k_index.reshape(-1)
    ids = torch.where((flat >= 0) & (flat < num_experts), flat, -1)
    m = build_mapping(ids, flat.numel(), num_experts, check_ids=False)
    starts = [0] * (num_experts + 1)
    for slot, a, b in zip(m.slots, m.starts[:-1], m.starts[1:]):
        starts[slot + 1] = b - a
    for e in range(num_experts):
        starts[e + 1] += starts[e]
    return m.perm.to(torch.int64), starts


def moe_experts_forward(hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor, gate_up_proj: Tensor,
                        down_proj: Tensor, act=None, gate_up_lora=None, down_lora=None, apply_gate=None,
                        backend: str = "auto", out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """transformers' fused experts with LoRA: ``hidden`` [T, H], ``top_k_index``/``top_k_weights`` [T, k],
    ``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]; ``act`` the activation (``act(gate) * up``) or
    ``apply_gate`` (the experts module's own ``[.., 2I] -> [.., I]`` gate); ``*_lora``: (A, B, scaling) or None.
    ``backend``: as in ``grouped_lora_linear``. Returns [T, H] in ``out_dtype`` (default hidden's), the routed
    outputs summed in it.

    Under ``torch.autocast`` it computes as transformers' experts do there: each projection in the autocast dtype
    (the casts of their ``F.linear``), the routed outputs summed into hidden's own dtype."""
    if (act is None) == (apply_gate is None):
        raise ValueError("give exactly one of act and apply_gate")
    amp = _amp.autocast_dtype(hidden)
    if amp is not None:
        with _amp.disabled(hidden):
            def lora(t):
                return None if t is None else (*_amp.cast(amp, t[0], t[1]), t[2])
            return moe_experts_forward(*_amp.cast(amp, hidden), top_k_index, top_k_weights,
                                       *_amp.cast(amp, gate_up_proj, down_proj), act, lora(gate_up_lora),
                                       lora(down_lora), apply_gate, backend, out_dtype or hidden.dtype)
    if hidden.dim() != 2 or top_k_index.shape != top_k_weights.shape or top_k_index.dim() != 2 \
            or top_k_index.shape[0] != hidden.shape[0]:
        raise ValueError(f"hidden must be [T, H] and top_k_index/top_k_weights [T, k], got {tuple(hidden.shape)}, "
                         f"{tuple(top_k_index.shape)}, {tuple(top_k_weights.shape)}")
    E, k = gate_up_proj.shape[0], top_k_index.shape[1]
    order, starts = route(top_k_index, E)
    tok = torch.div(order, k, rounding_mode="floor")
    xs = hidden[tok]
    gu = grouped_lora_linear(xs, starts, gate_up_proj, *(gate_up_lora or (None, None, 1.0)), backend=backend)
    if apply_gate is not None:
        h = apply_gate(gu)
    else:
        gate, up = gu.chunk(2, dim=-1)
        h = act(gate) * up
    out = grouped_lora_linear(h, starts, down_proj, *(down_lora or (None, None, 1.0)), backend=backend)
    w = top_k_weights.reshape(-1)[order]
    out = out * w[:, None].to(out.dtype)
    dt = out_dtype or hidden.dtype
    return torch.zeros_like(hidden, dtype=dt).index_add_(0, tok, out.to(dt))
