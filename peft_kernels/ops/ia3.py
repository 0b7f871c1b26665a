"""``ia3_linear``: (IA)³ (Liu et al. 2022) on a frozen linear layer, HF PEFT ``IA3Config`` semantics.

- output scaling (attention k/v; PEFT's default): ``y = (x·Wᵀ + b) ⊙ l``, l [N];
- input scaling (``feedforward=True``, PEFT's ``feedforward_modules``): ``y = (x ⊙ l)·Wᵀ + b``, l [K].

Differentiable in x and l (and W / b when they require grad). Backends: ``torch`` (the reference math
as plain ops: autograd keeps x for input scaling, x·Wᵀ + b for output scaling, as PEFT does) and
``triton`` (``peft_kernels/kernels/ia3.py``: the scaling in the GEMM prologue/epilogue, one launch
per direction; it keeps the same tensors).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import dispatch
from . import _amp
from ._autograd import first_order_only, own_shape

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SUPPORTED = ("torch", "triton")


def validate(x, weight, bias, ia3_l, feedforward) -> None:
    for name, t in (("x", x), ("weight", weight), ("ia3_l", ia3_l)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if not isinstance(feedforward, bool):
        raise TypeError(f"feedforward must be a bool, got {feedforward!r}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    N, K = weight.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x must have last dim in_features={K} (weight is {tuple(weight.shape)}), got {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    want = K if feedforward else N
    if ia3_l.numel() != want or ia3_l.dim() > 2:
        what = "in_features (input scaling, feedforward=True)" if feedforward else "out_features (output scaling)"
        raise ValueError(f"ia3_l must hold {want} = {what} values ([{want}], or PEFT's "
                         f"{'[1, ' + str(want) + ']' if feedforward else '[' + str(want) + ', 1]'}), got shape "
                         f"{tuple(ia3_l.shape)}")
    for name, t in (("x", x), ("weight", weight), ("ia3_l", ia3_l), ("bias", bias)):
        if t is not None and t.dtype not in _FLOATS:
            raise TypeError(f"{name} must be a floating-point tensor (float32/16, bfloat16, float64), got {t.dtype}")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"weight/bias dtype must match x dtype {x.dtype}, got {weight.dtype}"
                        + (f"/{bias.dtype}" if bias is not None else ""))
    for name, t in (("weight", weight), ("bias", bias), ("ia3_l", ia3_l)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: all tensors must be on one device")


def _op_reason(x):
    def reason(name):
        if name == "triton" and x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"the Triton kernels take float32/float16/bfloat16, got {x.dtype}"
        return None
    return reason


class _IA3Triton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, l, feedforward: bool):
        from ..kernels import ia3 as K

        x2 = x.reshape(-1, x.shape[-1])  # any strides: the kernel reads x through them (no copy)
        lv = l.reshape(-1)
        y, raw = K.ia3_forward(x2, weight, bias, lv, feedforward, need_raw=l.requires_grad)
        ctx.feedforward = feedforward
        ctx.x_shape = x.shape
        ctx.l_shape, ctx.l_dtype = l.shape, l.dtype
        ctx.has_bias = bias is not None
        # the input for dl (input scaling) or dW; the unscaled output for dl (output scaling)
        keep_x = (feedforward and l.requires_grad) or weight.requires_grad
        ctx.save_for_backward(x2 if keep_x else None, weight, lv, raw)
        return y  # 2-D: viewed outside (own_shape)

    @staticmethod
    @first_order_only("ia3_linear")
    def backward(ctx, dy):
        from ..kernels import ia3 as K

        x2, weight, lv, raw = ctx.saved_tensors
        N = weight.shape[0]
        dy2 = dy.reshape(-1, N)
        need_dx, need_dw, need_db, need_dl = ctx.needs_input_grad[:4]
        dx, dl = K.ia3_backward(dy2, x2, weight, lv, raw, ctx.feedforward, need_dx, need_dl)
        dw = db = None
        if need_dw or need_db:  # a trainable base: plain torch (not the PEFT case)
            g = dy2 if ctx.feedforward else dy2 * lv.to(dy2.dtype)
            if need_dw:
                xin = x2 * lv.to(x2.dtype) if ctx.feedforward else x2
                dw = g.t() @ xin
            if need_db:
                db = g.sum(0)
        if dx is not None:
            dx = dx.view(ctx.x_shape)
        if dl is not None:
            dl = dl.to(ctx.l_dtype).view(ctx.l_shape)
        return dx, dw, db, dl, None


def ia3_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], ia3_l: torch.Tensor, *,
               feedforward: bool = False, backend: str = "auto") -> torch.Tensor:
    """(IA)³ linear (see the module docstring). ``ia3_l``: [N] ([N, 1] as PEFT stores it) for output
    scaling, [K] ([1, K]) for input scaling. Under ``torch.autocast`` x and the base are cast like
    ``F.linear``'s inputs (the scaling vector keeps its dtype, as PEFT's ``ia3_l`` does)."""
    amp = _amp.autocast_dtype(x)
    if amp is not None:
        with _amp.disabled(x):
            return ia3_linear(*_amp.cast(amp, x, weight, bias), ia3_l, feedforward=feedforward, backend=backend)
    validate(x, weight, bias, ia3_l, feedforward)
    name = dispatch.resolve(backend, x.device, _op_reason(x), supported=SUPPORTED, tune=lambda: dispatch.op_tune(
        "ia3_linear", (x, weight, bias, ia3_l), (f"feedforward={bool(feedforward)}",),
        lambda t, be: ia3_linear(*t, feedforward=feedforward, backend=be)))
    if name == "triton" and x.numel() > 0:
        return own_shape(_IA3Triton.apply(x, weight, bias, ia3_l, feedforward), x)
    lv = ia3_l.reshape(-1)
    if feedforward:
        return F.linear((x * lv).to(x.dtype), weight, bias)
    return (F.linear(x, weight, bias) * lv).to(x.dtype)
