"""Bottleneck adapters fused with their surroundings, with autograd.

    bottleneck_adapter(h)   = [h +] s · (act(h·Dᵀ + b_d)·Uᵀ + b_u)                    (Houlsby / Pfeiffer)
    adapter_linear(x), sequential: y = x·Wᵀ + b;  y + s · up(act(down(y)))
    adapter_linear(x), parallel:   x·Wᵀ + b + s · up(act(down(x)))                   (He et al. 2022)

``s`` is a float, a learned scalar, or a learned per-channel vector ``[H_out]``.

The up-projection and its bias land in the same GEMM as the residual / base output: the scale is
folded into the small ``[H_out, b]`` up weight, the up bias rides along as one extra column of the
activation, and the result GEMM takes the residual (or the base output) as its C. No M×N
elementwise pass in forward.

Saved-tensor policy (the one place it is written down): the adapter's input (``h``; ``x`` for the
parallel mode; for the sequential mode the base output ``y``, which is the adapter's input) and the
pre-activation ``P = down(input)`` (M×b). The activation is recomputed from ``P`` in backward. Never
a second M×N (or M×K) tensor. The frozen weights and the adapter parameters are parameters, not
activations.

Backends: ``"torch"`` (any device, float64 too) and ``"triton"`` for all three (``kernels/bottleneck.py``:
2 launches forward; backward 2 for ``bottleneck_adapter``, 3 for ``adapter_linear``). The Triton path
saves P in fp32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F

from .. import dispatch
from . import _amp
from ._autograd import first_order_only, own_shape
from ..reference import ACTIVATIONS, activation_ref
from .lora import _FLOATS, _name_dtypes, _op_reason

MODES = ("sequential", "parallel")
Scaling = Union[float, torch.Tensor]


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
def _check_scaling(scaling, n_out: int, device):
    if isinstance(scaling, torch.Tensor):
        if not scaling.is_floating_point():
            raise TypeError(f"scaling must be a float or a floating-point tensor, got {scaling.dtype}")
        if scaling.numel() != 1 and tuple(scaling.shape) != (n_out,):
            raise ValueError(f"scaling must be a scalar or a per-channel vector of shape [{n_out}] (out features), "
                             f"got shape {tuple(scaling.shape)}")
        if scaling.device != device:
            raise ValueError(f"scaling is on {scaling.device} but the input is on {device}")
        return
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(float(scaling)):
        raise TypeError(f"scaling must be a finite float or a tensor, got {scaling!r}")


def validate_adapter(h, down_w, down_b, up_w, up_b, scaling, activation: str, name_in: str = "h") -> None:
    """The adapter half of every op: down ``[b, H_in]``, up ``[H_out, b]``, biases, scaling, activation."""
    for nm, t in ((name_in, h), ("down_w", down_w), ("up_w", up_w)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{nm} must be a torch.Tensor, got {type(t).__name__}")
    for nm, t in (("down_b", down_b), ("up_b", up_b)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{nm} must be a torch.Tensor or None, got {type(t).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if h.dim() < 1:
        raise ValueError(f"{name_in} must have at least 1 dim, got a scalar")
    H_in = h.shape[-1]
    if down_w.dim() != 2 or down_w.shape[1] != H_in or down_w.shape[0] < 1:
        raise ValueError(f"down_w must have shape [bottleneck ≥ 1, {H_in}] ({name_in}'s last dim), "
                         f"got {tuple(down_w.shape)}")
    b = down_w.shape[0]
    if up_w.dim() != 2 or up_w.shape[1] != b:
        raise ValueError(f"up_w must have shape [out_features, bottleneck={b}], got {tuple(up_w.shape)}")
    if down_b is not None and tuple(down_b.shape) != (b,):
        raise ValueError(f"down_b must have shape ({b},), got {tuple(down_b.shape)}")
    if up_b is not None and tuple(up_b.shape) != (up_w.shape[0],):
        raise ValueError(f"up_b must have shape ({up_w.shape[0]},), got {tuple(up_b.shape)}")
    for nm, t in ((name_in, h), ("down_w", down_w), ("down_b", down_b), ("up_w", up_w), ("up_b", up_b)):
        if t is None:
            continue
        if t.dtype not in _FLOATS:
            raise TypeError(f"{nm} must be {_name_dtypes()}, got {t.dtype}")
        if t.dtype != h.dtype:
            raise TypeError(f"{nm} dtype {t.dtype} must match {name_in}'s dtype {h.dtype}")
        if t.device != h.device:
            raise ValueError(f"{nm} is on {t.device} but {name_in} is on {h.device}: all tensors must be on one device")
    _check_scaling(scaling, up_w.shape[0], h.device)


def _resolve(backend: str, x: torch.Tensor, op: str, tensors: tuple, extra: tuple, call) -> str:
    """dispatch.resolve with the op's measured-dispatch Tune; ``call(tensors, scaling, name)`` reruns the op
    (a tensor ``scaling`` is measured as one more input)."""
    def tune():
        scaling = tensors[-1]
        if isinstance(scaling, torch.Tensor):
            return dispatch.op_tune(op, tensors, extra, lambda t, be: call(t[:-1], t[-1], be))
        return dispatch.op_tune(op, tensors[:-1], extra, lambda t, be: call(t, scaling, be))
    return dispatch.resolve(backend, x.device, _op_reason(x), tune=tune)


# --------------------------------------------------------------------------------------------
# shared pieces of the forward / backward math (torch backend)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdapterCall:
    activation: str
    scale: float            # used when the scaling is a Python float
    residual: bool = True   # the adapter's input is added to its output (bottleneck_adapter, sequential mode)
    backend: str = "torch"


def _scale_views(scaling_t: torch.Tensor, dtype):
    """(per-row view for [H_out, b] weights, per-element view for [H_out] vectors) of a scalar or vector scale."""
    s = scaling_t.to(dtype)
    if s.numel() > 1:
        return s.reshape(-1, 1), s.reshape(-1)
    return s.reshape(()), s.reshape(())


def _scaled_up(up_w, up_b, scaling_t, scale: float):
    """(s ⊙ U [H_out, b], s ⊙ b_u or None): the scale folded into the small up-projection."""
    if scaling_t is None:
        return up_w * scale, (None if up_b is None else up_b * scale)
    col, vec = _scale_views(scaling_t, up_w.dtype)
    return up_w * col, (None if up_b is None else up_b * vec)


def _up_gemm(c, H, U_s, b_s):
    """``c + H·U_sᵀ (+ b_s)`` in one GEMM: the bias rides as an extra column of ones in H."""
    if b_s is not None:
        H = torch.cat([H, H.new_ones((H.shape[0], 1))], dim=1)
        U_s = torch.cat([U_s, b_s.reshape(-1, 1)], dim=1)
    if c is None:
        return torch.mm(H, U_s.t())
    return torch.addmm(c, H, U_s.t())


def _up_grads(gtH, colsum, up_w, up_b, scaling_t, call: AdapterCall, needs):
    """(dU, db_u, ds) from gtH = dYᵀ·act(P) [H_out, b] and colsum = Σ_m dY (fp32): parameter-sized work."""
    need_uw, need_ub, need_s = needs
    if scaling_t is None:
        col = vec = call.scale
    else:
        col, vec = _scale_views(scaling_t, gtH.dtype)
    dU = (gtH * col).to(up_w.dtype) if need_uw else None
    db_u = (colsum * vec).to(up_w.dtype) if need_ub else None
    ds = None
    if need_s and scaling_t is not None:
        # The scale's gradient: N×b terms that largely cancel (Σ|terms| is often ~100× the result), so
        # this parameter-sized sum runs in fp64 (fp32 on MPS, which has no fp64).
        acc = torch.float32 if gtH.device.type == "mps" else torch.float64
        per_channel = (gtH.to(acc) * up_w.to(acc)).sum(1)
        if up_b is not None:
            per_channel = per_channel + colsum.to(acc) * up_b.to(acc)
        ds = per_channel if scaling_t.numel() > 1 else per_channel.sum()
        ds = ds.reshape(scaling_t.shape).to(scaling_t.dtype)
    return dU, db_u, ds


def _act_backward(dH, P, H, activation: str):
    """dP = dH ⊙ act'(P) with the aten backward kernels autograd itself uses (traceable by torch.compile)."""
    aten = torch.ops.aten
    if activation == "relu":
        return aten.threshold_backward(dH, H, 0)
    if activation in ("gelu", "gelu_tanh"):
        return aten.gelu_backward(dH, P, approximate="none" if activation == "gelu" else "tanh")
    if activation in ("silu", "swish"):
        return aten.silu_backward(dH, P)
    return aten.tanh_backward(dH, H)


def _adapter_backward(g2, inp2, P, down_w, up_w, up_b, scaling_t, call: AdapterCall, needs):
    """Gradients of ``[inp +] s·up(act(down(inp)))`` given the output grad ``g2`` (M×H_out).

    Returns (d_in, dD, db_d, dU, db_u, ds) with None where not needed; d_in (M×H_in) is the gradient
    that reaches the adapter's input, the residual's ``g2`` included when ``call.residual``.
    """
    need_in, need_dw, need_db, need_uw, need_ub, need_s = needs
    need_up = need_uw or need_ub or need_s
    U_s, _ = _scaled_up(up_w, None, scaling_t, call.scale)
    if call.backend == "triton":
        from ..kernels import bottleneck as K

        d_in, dD, db_d, gtH, colsum = K.adapter_backward(g2, inp2, down_w, U_s, P, call.activation, call.residual,
                                                         need_in, need_dw, need_db, need_up)
    else:
        H = activation_ref(P, call.activation)  # recomputed on the small P (M×b)
        dP = _act_backward(torch.mm(g2, U_s), P, H, call.activation) if (need_in or need_dw or need_db) else None
        d_in = None
        if need_in:
            d_in = torch.addmm(g2, dP, down_w) if call.residual else torch.mm(dP, down_w)
        dD = torch.mm(dP.t(), inp2) if need_dw else None
        db_d = dP.sum(0) if need_db else None
        gtH = None
        if need_up:  # [H_out, b]; fp32 for the half dtypes when it feeds the scale's N·b-term sum
            half = need_s and g2.element_size() == 2
            gtH = torch.mm(g2.t().float(), H.float()) if half else torch.mm(g2.t(), H)
        # fp32 accumulation for the half dtypes; fp64 stays fp64
        colsum = g2.sum(0, dtype=torch.promote_types(g2.dtype, torch.float32)) if need_up else None
    dU = db_u = ds = None
    if need_up:
        dU, db_u, ds = _up_grads(gtH, colsum, up_w, up_b, scaling_t, call, (need_uw, need_ub, need_s))
    return d_in, (dD if need_dw else None), (db_d if need_db else None), dU, db_u, ds


def _adapter_forward(inp2, down_w, down_b, up_w, up_b, scaling_t, call: AdapterCall):
    """(out = [inp +] s·up(act(down(inp))), P) for a 2-D adapter input, on the call's backend."""
    U_s, b_s = _scaled_up(up_w, up_b, scaling_t, call.scale)
    if call.backend == "triton":
        from ..kernels import bottleneck as K

        return K.bottleneck_forward(inp2, down_w, down_b, U_s, b_s, call.activation, call.residual)
    P = F.linear(inp2, down_w, down_b)
    H = activation_ref(P, call.activation)
    return _up_gemm(inp2 if call.residual else None, H, U_s, b_s), P  # the residual is the GEMM's C


def _base_grads(ctx, g2, x2, weight, need_x, need_w, need_b):
    """The frozen base's input gradient g2·W, and its own grads when someone unfroze it; dx keeps x's shape."""
    dx = torch.mm(g2, weight).view(ctx.x_shape) if need_x else None
    dW = torch.mm(g2.t(), x2) if need_w else None
    db = g2.sum(0) if (need_b and ctx.has_bias) else None
    return dx, dW, db


# --------------------------------------------------------------------------------------------
# bottleneck_adapter: [h +] s · up(act(down(h)))
# --------------------------------------------------------------------------------------------
class BottleneckFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, down_w, down_b, up_w, up_b, scaling_t, call: AdapterCall):
        h2 = h.reshape(-1, h.shape[-1])
        out, P = _adapter_forward(h2, down_w, down_b, up_w, up_b, scaling_t, call)
        ctx.save_for_backward(h2, P, down_w, up_w, up_b, scaling_t)
        ctx.call = call
        ctx.h_shape = h.shape
        return out  # 2-D: viewed outside (own_shape)

    @staticmethod
    @first_order_only("bottleneck_adapter")
    def backward(ctx, g):
        h2, P, down_w, up_w, up_b, scaling_t = ctx.saved_tensors
        call: AdapterCall = ctx.call
        g2 = g.reshape(-1, up_w.shape[0])
        d_in, dD, db_d, dU, db_u, ds = _adapter_backward(g2, h2, P, down_w, up_w, up_b, scaling_t, call,
                                                          ctx.needs_input_grad[:6])
        dh = d_in.view(ctx.h_shape) if d_in is not None else None
        return dh, dD, db_d, dU, db_u, ds, None


def _scaling_args(scaling):
    if isinstance(scaling, torch.Tensor):
        return scaling, 1.0
    return None, float(scaling)


def bottleneck_adapter(h: torch.Tensor, down_w: torch.Tensor, down_b: Optional[torch.Tensor], up_w: torch.Tensor,
                       up_b: Optional[torch.Tensor], scaling: Scaling = 1.0, *, activation: str = "relu",
                       residual: bool = True, backend: str = "auto") -> torch.Tensor:
    """``[h +] scaling · (act(h·down_wᵀ + down_b)·up_wᵀ + up_b)`` with autograd for every tensor argument.

    Args:
        h: ``[..., H]``. down_w ``[b, H]``, down_b ``[b]`` or None, up_w ``[H_out, b]``, up_b ``[H_out]`` or None
            (``H_out = H`` when ``residual``).
        scaling: a float, a learned scalar tensor, or a learned per-channel vector ``[H_out]``.
        activation: one of relu, gelu, gelu_tanh, silu/swish, tanh.
        backend: "auto", "torch" or "triton".

    Under ``torch.autocast`` the adapter runs in the autocast dtype (its projections are linears) and the
    residual is added in h's own dtype, as the unfused module would (a residual stream is not downcast).
    """
    amp = _amp.autocast_dtype(h)
    if amp is not None:
        with _amp.disabled(h):
            branch = bottleneck_adapter(*_amp.cast(amp, h, down_w, down_b, up_w, up_b, scaling), activation=activation,
                                        residual=False, backend=backend)
        if residual and up_w.shape[0] != h.shape[-1]:
            raise ValueError(f"residual=True needs up_w's out features ({up_w.shape[0]}) == h's last dim "
                             f"({h.shape[-1]})")
        return h + branch if residual else branch
    validate_adapter(h, down_w, down_b, up_w, up_b, scaling, activation)
    if residual and up_w.shape[0] != h.shape[-1]:
        raise ValueError(f"residual=True needs up_w's out features ({up_w.shape[0]}) == h's last dim ({h.shape[-1]})")
    name = _resolve(backend, h, "bottleneck_adapter", (h, down_w, down_b, up_w, up_b, scaling),
                    (activation, f"residual={bool(residual)}"),
                    lambda t, sc, be: bottleneck_adapter(*t, sc, activation=activation, residual=residual, backend=be))
    scaling_t, scale = _scaling_args(scaling)
    return own_shape(BottleneckFunction.apply(h, down_w, down_b, up_w, up_b, scaling_t,
                                              AdapterCall(activation, scale, bool(residual), name)), h)


# --------------------------------------------------------------------------------------------
# adapter_linear: a frozen linear with a sequential or parallel adapter
# --------------------------------------------------------------------------------------------
def _save_linear(ctx, call: AdapterCall, x, bias, out2, *saved):
    """The adapter_linear Functions' bookkeeping; returns ``out2`` (2-D: viewed outside, ``own_shape``)."""
    ctx.save_for_backward(*saved)
    ctx.call = call
    ctx.x_shape = x.shape
    ctx.has_bias = bias is not None
    return out2


class SequentialAdapterLinearFunction(torch.autograd.Function):
    """y = x·Wᵀ + b; out = y + s·up(act(down(y))). Saves y (the adapter's input) and P; x only when W
    itself needs a gradient (as nn.Linear's autograd would)."""

    @staticmethod
    def forward(ctx, x, weight, bias, down_w, down_b, up_w, up_b, scaling_t, call: AdapterCall):
        x2 = x.reshape(-1, x.shape[-1])
        if call.backend == "triton":
            from ..kernels import bottleneck as K

            U_s, b_s = _scaled_up(up_w, up_b, scaling_t, call.scale)
            out, y, P = K.sequential_forward(x2, weight, bias, down_w, down_b, U_s, b_s, call.activation)
        else:
            y = F.linear(x2, weight, bias)
            out, P = _adapter_forward(y, down_w, down_b, up_w, up_b, scaling_t, call)
        return _save_linear(ctx, call, x, bias, out, x2 if weight.requires_grad else None, y, P, weight, down_w, up_w,
                            up_b, scaling_t)

    @staticmethod
    @first_order_only("adapter_linear")
    def backward(ctx, g):
        x2, y, P, weight, down_w, up_w, up_b, scaling_t = ctx.saved_tensors
        need_x, need_w, need_b, *adapter_needs, _ = ctx.needs_input_grad
        g2 = g.reshape(-1, weight.shape[0])
        need_gy = need_x or need_w or need_b
        g_y, dD, db_d, dU, db_u, ds = _adapter_backward(g2, y, P, down_w, up_w, up_b, scaling_t, ctx.call,
                                                         [need_gy] + adapter_needs)
        dx, dW, db = _base_grads(ctx, g_y, x2, weight, need_x, need_w, need_b)
        return dx, dW, db, dD, db_d, dU, db_u, ds, None


class ParallelAdapterLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, down_w, down_b, up_w, up_b, scaling_t, call: AdapterCall):
        x2 = x.reshape(-1, x.shape[-1])
        U_s, b_s = _scaled_up(up_w, up_b, scaling_t, call.scale)
        c = bias if b_s is None else (b_s if bias is None else bias + b_s)  # biases: one [N] vector
        if call.backend == "triton":
            from ..kernels import bottleneck as K

            y, P = K.parallel_forward(x2, weight, c, down_w, down_b, U_s, call.activation)
        else:
            P = F.linear(x2, down_w, down_b)
            H = activation_ref(P, call.activation)
            y = torch.addmm(c, x2, weight.t()) if c is not None else torch.mm(x2, weight.t())
            y.addmm_(H, U_s.t())  # the adapter's up GEMM accumulates into the base output
        return _save_linear(ctx, call, x, bias, y, x2, P, weight, down_w, up_w, up_b, scaling_t)

    @staticmethod
    @first_order_only("adapter_linear")
    def backward(ctx, g):
        x2, P, weight, down_w, up_w, up_b, scaling_t = ctx.saved_tensors
        need_x, need_w, need_b, need_dw, need_db, need_uw, need_ub, need_s, _ = ctx.needs_input_grad
        g2 = g.reshape(-1, weight.shape[0])
        call: AdapterCall = ctx.call
        if call.backend == "triton":
            from ..kernels import bottleneck as K

            U_s, _ = _scaled_up(up_w, None, scaling_t, call.scale)
            need_up = need_uw or need_ub or need_s
            dx, dD, db_d, gtH, colsum = K.parallel_backward(g2, x2, weight, down_w, U_s, P, call.activation, need_x,
                                                            need_dw, need_db, need_up)
            dU = db_u = ds = None
            if need_up:
                dU, db_u, ds = _up_grads(gtH, colsum, up_w, up_b, scaling_t, call, (need_uw, need_ub, need_s))
            dx = dx.view(ctx.x_shape) if dx is not None else None
        else:
            d_in, dD, db_d, dU, db_u, ds = _adapter_backward(g2, x2, P, down_w, up_w, up_b, scaling_t, call,
                                                              (need_x, need_dw, need_db, need_uw, need_ub, need_s))
            dx = d_in.addmm_(g2, weight).view(ctx.x_shape) if need_x else None  # base dX GEMM accumulates into it
        _, dW, db = _base_grads(ctx, g2, x2, weight, False, need_w, need_b)
        return dx, dW, db, dD, db_d, dU, db_u, ds, None


def adapter_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], down_w: torch.Tensor,
                   down_b: Optional[torch.Tensor], up_w: torch.Tensor, up_b: Optional[torch.Tensor],
                   scaling: Scaling = 1.0, *, activation: str = "relu", mode: str = "sequential",
                   backend: str = "auto") -> torch.Tensor:
    """A frozen ``nn.Linear`` (weight ``[N, K]``, bias ``[N]``) with a bottleneck adapter.

    ``mode="sequential"``: ``y = x·Wᵀ + b; y + s·up(act(down(y)))`` (down ``[b, N]``, up ``[N, b]``).
    ``mode="parallel"``: ``x·Wᵀ + b + s·up(act(down(x)))`` (down ``[b, K]``, up ``[N, b]``).
    Under ``torch.autocast`` every input is cast like ``F.linear``'s (the base output is then in that dtype).
    """
    amp = _amp.autocast_dtype(x)
    if amp is not None:
        with _amp.disabled(x):
            return adapter_linear(*_amp.cast(amp, x, weight, bias, down_w, down_b, up_w, up_b, scaling),
                                  activation=activation, mode=mode, backend=backend)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for nm, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{nm} must be a torch.Tensor, got {type(t).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    N, K = weight.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x must have last dim in_features={K}, got x of shape {tuple(x.shape)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (N,)):
        raise ValueError(f"bias must be None or a tensor of shape ({N},)")
    for nm, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise TypeError(f"{nm} must have x's dtype and device ({x.dtype}, {x.device}), got ({t.dtype}, {t.device})")
    if up_w.dim() == 2 and up_w.shape[0] != N:
        raise ValueError(f"up_w must have shape [out_features={N}, bottleneck], got {tuple(up_w.shape)}")
    if mode == "sequential":  # the adapter reads the base output y [.., N]
        validate_adapter(x.new_empty((0, N)), down_w, down_b, up_w, up_b, scaling, activation,
                         name_in="the base output")
        fn = SequentialAdapterLinearFunction
    else:
        validate_adapter(x, down_w, down_b, up_w, up_b, scaling, activation, name_in="x")
        fn = ParallelAdapterLinearFunction
    name = _resolve(backend, x, "adapter_linear", (x, weight, bias, down_w, down_b, up_w, up_b, scaling),
                    (activation, mode), lambda t, sc, be: adapter_linear(*t, sc, activation=activation, mode=mode,
                                                                         backend=be))
    scaling_t, scale = _scaling_args(scaling)
    return own_shape(fn.apply(x, weight, bias, down_w, down_b, up_w, up_b, scaling_t,
                              AdapterCall(activation, scale, mode == "sequential", name)), x)
