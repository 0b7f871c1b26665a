"""``qlora_linear``: a quantized frozen base (``quant.QuantBase``) + one LoRA update, with autograd.

    y = x·deq(W)ᵀ + b + s · (drop(x)·Aᵀ)·Bᵀ        (in the base's compute dtype, cast back to x's)

Saved-tensor policy (the one place it is written down): ``x`` in the compute dtype, ``S = drop(x)·Aᵀ``
(M×r), the LoRA parameters and the dropout seed; the quantized weight is read from its layer again in
backward. No dequantized weight outlives a GEMM: forward and the dX GEMM dequantize W in row chunks of a
few MiB (``quant.base_mm``), each multiplied while it is in cache, and the LoRA part is the same code as
``lora_linear``'s torch backend (the expand is the base GEMM's accumulator; the C++ dropout passes).

Backends: ``torch`` (any device). A Triton GEMM that dequantizes inside its mainloop is not written yet, so
``backend="triton"`` raises with that reason and ``"auto"`` runs torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .. import dispatch
from ..quant import QuantBase
from . import _amp
from ._autograd import first_order_only
from .lora import _draw_seed, _torch_backward, _torch_forward

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _op_reason(name: str) -> Optional[str]:
    if name == "triton":
        return "quantized bases run on the torch backend: the Triton dequantize-in-the-mainloop GEMM is not written yet"
    return None


def validate(x, qbase, bias, lora_A, lora_B, scaling, dropout_p) -> torch.dtype:
    """Raise ValueError/TypeError naming the bad argument; returns the compute dtype."""
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
    dev = qbase.device
    for name, t in (("x", x), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t is not None and t.device != dev:
            raise ValueError(f"{name} is on {t.device} but the quantized weight is on {dev}: all on one device")
    return cdt


@dataclass(frozen=True)
class QLoRACall:
    qbase: QuantBase
    scaling: float
    dropout_p: float
    seed: Optional[torch.Tensor]
    backend: str


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    """The GEMMs' dtype: on the CPU, half-precision inputs run in float32 (CPU bf16/fp16 GEMMs without
    AVX512-BF16/AMX are several times slower than fp32 ones, and fp32 is the more exact); x and the output stay
    in the compute dtype."""
    return torch.float32 if t.device.type == "cpu" and t.dtype in (torch.float16, torch.bfloat16) else t.dtype


class QLoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, lora_A, lora_B, call: QLoRACall):
        wdt = _work_dtype(x)
        x2d = x.reshape(-1, x.shape[-1]).to(wdt)
        b = bias if bias is None else bias.to(wdt)
        y, S = _torch_forward(x2d, call.qbase, b, lora_A, lora_B, call.scaling, call.dropout_p, call.seed)
        ctx.save_for_backward(x, S, lora_A, lora_B)  # x in the compute dtype, as given
        ctx.call, ctx.has_bias = call, bias is not None
        return y.to(x.dtype).view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @first_order_only("qlora_linear")
    def backward(ctx, dy):
        x, S, A, B = ctx.saved_tensors
        call: QLoRACall = ctx.call
        need_x, need_b, need_a, need_bb, _ = ctx.needs_input_grad
        wdt = _work_dtype(x)
        x2d = x.reshape(-1, x.shape[-1]).to(wdt)
        dy2d = dy.reshape(-1, dy.shape[-1])
        db = dy2d.sum(0) if need_b and ctx.has_bias else None
        dx, dA, dB = _torch_backward(dy2d.to(wdt), x2d, call.qbase, A, B, S, call.scaling, call.dropout_p, call.seed,
                                     need_dx=need_x, need_da=need_a, need_db=need_bb)
        return (dx.to(x.dtype).view(x.shape) if dx is not None else None), db, dA, dB, None


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
    dispatch.resolve(backend, x.device, _op_reason)
    p = float(dropout_p) if training else 0.0
    xc = x if x.dtype == cdt else x.to(cdt)
    bc = bias if bias is None or bias.dtype == cdt else bias.to(cdt)
    seed = _draw_seed(x.device) if p > 0 else None
    y = QLoRALinearFunction.apply(xc, bc, lora_A, lora_B, QLoRACall(qbase, float(scaling), p, seed, "torch"))
    return y if y.dtype == x.dtype else y.to(x.dtype)
