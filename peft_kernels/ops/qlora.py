"""``qlora_linear``: a quantized frozen base (``quant.QuantBase``) + one LoRA update, with autograd.

    y = x·deq(W)ᵀ + b + s · (drop(x)·Aᵀ)·Bᵀ        (in the base's compute dtype, cast back to x's)

Saved-tensor policy (the one place it is written down): ``x`` in the compute dtype, ``S = drop(x)·Aᵀ``
(M×r), the LoRA parameters and the dropout seed; the quantized weight is read from its layer again in
backward. No dequantized weight outlives a GEMM: forward and the dX GEMM dequantize W in row chunks of a
few MiB (``quant.base_mm``), each multiplied while it is in cache, and the LoRA part is the same code as
``lora_linear``'s torch backend (the expand is the base GEMM's accumulator; the C++ dropout passes).

Backends:
- ``torch`` (any device; CPU "auto"): ``quant.base_mm`` around ``lora_linear``'s torch backend. On the CPU,
  16-bit inputs run their GEMMs in fp32 (``quant.work_dtype``).
- ``triton`` (GPU "auto"): ``lora_linear``'s kernels, launch for launch (forward 2, backward ≤ 3), with the
  forward GEMM and dX reading the packed weight and dequantizing each tile in registers inside the mainloop
  (``kernels.lora._wq_tile``: NF4/FP4 codes through their 16-entry table times the block absmax, int8 times
  its scale): W is read at 0.5-1 byte per weight and never written back dequantized. Not the TMA or fused
  decode variants (their W tiles arrive by TMA / are shared with the side product).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .. import dispatch
from ..quant import QuantBase, base_grad_input, base_linear, work_dtype
from . import _amp
from ._autograd import first_order_only, own_shape
from .lora import _draw_seed, _torch_backward, _torch_forward

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


SUPPORTED = ("torch", "triton")


def _op_reason(x: torch.Tensor, qbase: QuantBase):
    def reason(name: str) -> Optional[str]:
        if name == "triton" and x.dtype == torch.float64:
            return "the Triton kernels take float32/float16/bfloat16, got torch.float64"
        return qbase.triton_reason() if name == "triton" else None
    return reason


def check_quant_base(x, qbase, bias, lora_A, lora_B):
    """Types, x's last dim, the bias shape and the devices against a quantized base; returns (N, K)."""
    if not isinstance(qbase, QuantBase):
        raise TypeError(f"qbase must be a peft_kernels.quant.QuantBase, got {type(qbase).__name__}")
    for name, t in (("x", x), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    N, K = qbase.out_features, qbase.in_features
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x must have last dim in_features={K} (the quantized base is [{N}, {K}]), got x of shape "
                         f"{tuple(x.shape)}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must have shape ({N},) = (out_features,), got {tuple(bias.shape)}")
    dev = qbase.device
    for name, t in (("x", x), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t is not None and t.device != dev:
            raise ValueError(f"{name} is on {t.device} but the quantized weight is on {dev}: all on one device")
    return N, K


def validate(x, qbase, bias, lora_A, lora_B, scaling, dropout_p) -> torch.dtype:
    """Raise ValueError/TypeError naming the bad argument; returns the compute dtype."""
    N, K = check_quant_base(x, qbase, bias, lora_A, lora_B)
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(float(scaling)):
        raise TypeError(f"scaling must be a finite Python float, got {scaling!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if lora_A.dim() != 2 or lora_A.shape[1] != K or lora_A.shape[0] < 1:
        raise ValueError(f"lora_A must have shape [r >= 1, in_features={K}], got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (N, r):
        raise ValueError(f"lora_B must have shape [out_features={N}, r={r}] (r from lora_A), got {tuple(lora_B.shape)}")
    cdt = qbase.compute_dtype(x.dtype)
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"lora_A ({lora_A.dtype}) and lora_B ({lora_B.dtype}) must have the same dtype")
    if lora_A.dtype not in (cdt, torch.float32):
        raise TypeError(f"lora_A/lora_B must be the compute dtype ({cdt}) or float32, got {lora_A.dtype}")
    return cdt


@dataclass(frozen=True)
class QLoRACall:
    qbase: QuantBase
    scaling: float
    dropout_p: float
    seed: Optional[torch.Tensor]
    backend: str


def _torch_fwd(x, call: QLoRACall, bias, A, B):
    """(y in x's dtype, S, None): the chunked dequantize-and-multiply of ``quant.base_mm`` around
    ``lora_linear``'s torch backend."""
    wdt = work_dtype(x)
    b = bias if bias is None else bias.to(wdt)
    y, S = _torch_forward(x.to(wdt), call.qbase, b, A, B, call.scaling, call.dropout_p, call.seed)
    return y.to(x.dtype), S, None


def _torch_bwd(dy, x, call: QLoRACall, A, B, S, bits, need_dx, need_da, need_db):
    wdt = work_dtype(x)
    dx, dA, dB = _torch_backward(dy.to(wdt), x.to(wdt), call.qbase, A, B, S, call.scaling, call.dropout_p,
                                 call.seed, need_dx=need_dx, need_da=need_da, need_db=need_db)
    return (dx.to(x.dtype) if dx is not None else None), dA, dB


def _triton_fwd(x, call: QLoRACall, bias, A, B):
    """(y, S, packed dropout mask): LoRA's kernels with the weight dequantized in the GEMM's mainloop."""
    from ..kernels import lora as K

    p = call.dropout_p
    bits = K.dropout_mask_buffer(x.shape[0], x.shape[1], x.device) if p > 0 else None
    y, S = K.lora_forward(x, call.qbase.kernel_operand(), bias, A, B, call.scaling, p, call.seed, bits_out=bits)
    return y, S, bits


def _triton_bwd(dy, x, call: QLoRACall, A, B, S, bits, need_dx, need_da, need_db):
    from ..kernels import lora as K

    return K.lora_backward(dy, x, call.qbase.kernel_operand(), A, B, S, call.scaling, call.dropout_p, bits,
                           need_dx=need_dx, need_da=need_da, need_db=need_db)


_BACKENDS = {"torch": (_torch_fwd, _torch_bwd), "triton": (_triton_fwd, _triton_bwd)}


class QLoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, lora_A, lora_B, call: QLoRACall):
        x2d = x.reshape(-1, x.shape[-1])
        fwd, _ = _BACKENDS[call.backend]
        y, S, bits = fwd(x2d, call, bias, lora_A, lora_B)
        ctx.save_for_backward(x, S, lora_A, lora_B)  # x in the compute dtype, as given
        ctx.call, ctx.has_bias, ctx.dropout_bits = call, bias is not None, bits
        return y  # 2-D: viewed outside (own_shape)

    @staticmethod
    @first_order_only("qlora_linear")
    def backward(ctx, dy):
        x, S, A, B = ctx.saved_tensors
        call: QLoRACall = ctx.call
        need_x, need_b, need_a, need_bb, _ = ctx.needs_input_grad
        x2d = x.reshape(-1, x.shape[-1])
        dy2d = dy.reshape(-1, dy.shape[-1])
        db = dy2d.sum(0) if need_b and ctx.has_bias else None
        _, bwd = _BACKENDS[call.backend]
        dx, dA, dB = bwd(dy2d, x2d, call, A, B, S, ctx.dropout_bits, need_x, need_a, need_bb)
        return (dx.view(x.shape) if dx is not None else None), db, dA, dB, None


def qlora_linear(x: torch.Tensor, qbase: QuantBase, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                 lora_B: torch.Tensor, scaling: float, *, dropout_p: float = 0.0, training: bool = False,
                 backend: str = "auto") -> torch.Tensor:
    """``x·deq(W)ᵀ + b + scaling·(dropout(x)·lora_Aᵀ)·lora_Bᵀ`` on a quantized frozen base, with autograd.

    The base runs in ``qbase.compute_dtype(x.dtype)`` (bitsandbytes 4-bit's ``compute_dtype``, else x's):
    x (and the bias) are cast to it, and the result is cast back to x's dtype, as bitsandbytes' layers do.
    lora_A/lora_B: the compute dtype or float32 (PEFT keeps QLoRA adapters in float32).
    """
    amp = _amp.autocast_dtype(x)
    if amp is not None:
        with _amp.disabled(x):
            x = x.to(amp)
            return qlora_linear(x, qbase, bias, lora_A, lora_B, scaling, dropout_p=dropout_p, training=training,
                                backend=backend)
    cdt = validate(x, qbase, bias, lora_A, lora_B, scaling, dropout_p)
    name = dispatch.resolve(backend, x.device, _op_reason(x, qbase), supported=SUPPORTED)
    p = float(dropout_p) if training else 0.0
    xc = x if x.dtype == cdt else x.to(cdt)
    bc = bias if bias is None or bias.dtype == cdt else bias.to(cdt)
    seed = _draw_seed(x.device) if p > 0 else None
    y = own_shape(QLoRALinearFunction.apply(xc, bc, lora_A, lora_B, QLoRACall(qbase, float(scaling), p, seed, name)),
                  x)
    return y if y.dtype == x.dtype else y.to(x.dtype)


# --------------------------------------------------------------------------------------------
# the quantized base alone, and the compositions on it ((IA)³, DoRA)
# --------------------------------------------------------------------------------------------
class QBaseLinearFunction(torch.autograd.Function):
    """``y = x·deq(W)ᵀ + b`` with the chunked dequantize-and-multiply of ``quant.base_mm``; backward dX the same
    way (nothing saved but x's shape: W is frozen)."""

    @staticmethod
    def forward(ctx, x, bias, qbase: QuantBase):
        ctx.qbase, ctx.x_shape, ctx.has_bias = qbase, x.shape, bias is not None
        return base_linear(x.reshape(-1, x.shape[-1]), qbase, bias)  # 2-D: viewed outside (own_shape)

    @staticmethod
    @first_order_only("qbase_linear")
    def backward(ctx, dy):
        need_x, need_b, _ = ctx.needs_input_grad
        dy2d = dy.reshape(-1, dy.shape[-1])
        dx = base_grad_input(dy2d, ctx.qbase).view(ctx.x_shape) if need_x else None
        db = dy2d.sum(0) if need_b and ctx.has_bias else None
        return dx, db, None


def qbase_linear(x: torch.Tensor, qbase: QuantBase, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x·deq(W)ᵀ + b`` on a quantized base, differentiable in x and the bias (in the compute dtype, the result in
    x's, as ``qlora_linear``)."""
    amp = _amp.autocast_dtype(x)
    if amp is not None:
        with _amp.disabled(x):
            return qbase_linear(x.to(amp), qbase, bias)
    A = torch.empty(1, qbase.in_features, device=qbase.device)
    cdt = validate(x, qbase, bias, A, torch.empty(qbase.out_features, 1, device=qbase.device), 1.0, 0.0)
    xc = x if x.dtype == cdt else x.to(cdt)
    y = own_shape(QBaseLinearFunction.apply(xc, bias if bias is None or bias.dtype == cdt else bias.to(cdt), qbase), x)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def qia3_linear(x: torch.Tensor, qbase: QuantBase, bias: Optional[torch.Tensor], ia3_l: torch.Tensor,
                feedforward: bool = False) -> torch.Tensor:
    """(IA)³ on a quantized base, PEFT's math: ``(x·deq(W)ᵀ + b) ⊙ l`` or ``(x ⊙ l)·deq(W)ᵀ + b`` (feedforward)."""
    want = (1, qbase.in_features) if feedforward else (qbase.out_features, 1)
    if not isinstance(ia3_l, torch.Tensor) or ia3_l.numel() != want[0] * want[1]:
        raise ValueError(f"ia3_l must hold {want[0] * want[1]} values ({list(want)}), got "
                         f"{tuple(ia3_l.shape) if isinstance(ia3_l, torch.Tensor) else type(ia3_l).__name__}")
    l = ia3_l.reshape(-1)
    if feedforward:
        return qbase_linear(x * l.to(x.dtype), qbase, bias)
    y = qbase_linear(x, qbase, bias)
    return y * l.to(y.dtype)


def qdora_linear(x: torch.Tensor, qbase: QuantBase, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                 lora_B: torch.Tensor, scaling: float, magnitude: torch.Tensor, *, dropout_p: float = 0.0,
                 training: bool = False, backend: str = "auto",
                 weight_norm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DoRA on a quantized base with ``ops.dora``'s (PEFT's) math: ``g ⊙ (x·deq(W)ᵀ + s·B·A·x) + b``,
    ``g = m / ‖deq(W) + s·B·A‖`` (detached, computed from the weight in row chunks: ``dora_weight_norm`` takes
    the ``QuantBase``); with dropout in training the dropped input also goes through the base, as PEFT does."""
    from .dora import check_magnitude, dora_weight_norm

    check_magnitude(magnitude, qbase.out_features)
    if weight_norm is None:
        weight_norm = dora_weight_norm(qbase, lora_A, lora_B, scaling)
    p = float(dropout_p) if training else 0.0
    g = magnitude / weight_norm
    if p > 0:
        xd = F.dropout(x, p, True)
        z = qlora_linear(xd, qbase, None, lora_A, lora_B, scaling, backend=backend)
        return qbase_linear(x, qbase, bias) - qbase_linear(xd, qbase, None) + z * g.to(z.dtype)
    z = qlora_linear(x, qbase, None, lora_A, lora_B, scaling, backend=backend)
    if bias is None:
        return z * g.to(z.dtype)
    return torch.addcmul(bias.to(z.dtype), z, g.to(z.dtype))
