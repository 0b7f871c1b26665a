"""DoRA (weight-decomposed LoRA, Liu et al. 2024) with HF PEFT's ``lora_magnitude_vector`` math.

``y = g ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b`` with ``g = m / ‖W + s·B·A‖_row`` per output feature; the norm is
detached (PEFT: "weight_norm.detach()", so m gets the only gradient through g). With dropout in
training PEFT feeds the dropped input to the adapter path only:
``y = x·Wᵀ + b + (g − 1) ⊙ (x_d·Wᵀ) + g ⊙ s·(x_d·Aᵀ)·Bᵀ``.

The row norms never materialise B·A ([N, K]):
``‖W_n + s·(B·A)_n‖² = ‖W_n‖² + 2s·(W·Aᵀ)_n·B_n + s²·B_n·(A·Aᵀ)·B_nᵀ`` — an [N, r] GEMM and an
[r, r] Gram matrix instead of an [N, K] product, summed in fp64 (the terms can cancel), never cached.

Without dropout, backend ``triton``: one fused forward — LoRA's two kernels with DoRA's rescale in the
GEMM epilogue (``y = g ⊙ (x·Wᵀ + s·S·Bᵀ) + b``; the unscaled z is stored only when m needs a gradient).
Backward: dZ = dY ⊙ g, LoRA's backward kernels on dZ, dm = Σ dY ⊙ z / ‖·‖. Backend ``torch``: the fused
LoRA op on x with no bias, then the rescale plus bias as one pass (``addcmul``, differentiated in m).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import dispatch
from . import _amp
from ._autograd import first_order_only, own_shape
from .lora import (_op_reason, finish_lora_backward, lora_linear, save_for_lora_backward, saved_lora_tensors,
                   validate)

_NORM_ROWS = 1024  # rows of W per fp64 block in dora_weight_norm: the fp64 copy stays ≤ 1024·K·8 bytes


def dora_weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``‖W + scaling·B·A‖`` per output row (fp32, or fp64 for fp64 weights; detached), without forming B·A.

    ``‖W_n‖² + 2s·(W·Aᵀ)_n·B_n + s²·B_n·(A·Aᵀ)·B_nᵀ``: an [N, r] product and an [r, r] Gram matrix instead of
    the [N, K] update. The three terms cancel when the update nearly cancels a row of W (the norm is then far
    smaller than its terms: in fp32 that was seen 27% off), so they are formed and summed in fp64, W taken in
    row blocks (a bounded fp64 copy); fp32 only where the device has no fp64 (MPS). Nothing is cached: each
    call reads the current W, A and B, so no update (in place, through ``.data``, a reload) leaves a stale norm.
    """
    from ..quant import QuantBase

    quantized = isinstance(weight, QuantBase)  # a quantized base: dequantized row block by row block
    if (not quantized and weight.dim() != 2) or lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError("weight, lora_A and lora_B must be 2-D ([N, K], [r, K], [N, r])")
    N, K = (weight.out_features, weight.in_features) if quantized else weight.shape
    r = lora_A.shape[0]
    if tuple(lora_A.shape) != (r, K) or tuple(lora_B.shape) != (N, r):
        raise ValueError(f"lora_A must be [r, {K}] and lora_B [{N}, r] for a [{N}, {K}] weight, got "
                         f"{tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
    acc = torch.float32 if weight.device.type == "mps" else torch.float64
    s = float(scaling)
    with torch.no_grad():
        A, B = lora_A.detach().to(acc), lora_B.detach().to(acc)
        quad = (s * s) * ((B @ (A @ A.t())) * B).sum(1)                  # s²·B_n(AAᵀ)B_nᵀ
        n2 = torch.empty(N, dtype=acc, device=weight.device)
        if quantized:  # the quantizer's fp32 values, exact in fp64; blocks start at multiples of row_align()
            rd, a = weight.reader(torch.float32), weight.row_align()
            step = max(a, _NORM_ROWS // a * a)
        else:
            step = _NORM_ROWS
        for i in range(0, N, step):
            w = (rd.rows(i, min(N, i + step)) if quantized else weight.detach()[i:i + step]).to(acc)
            n2[i:i + step] = (w * w).sum(1) + (2.0 * s) * ((w @ A.t()) * B[i:i + step]).sum(1) + quad[i:i + step]
        out = torch.float64 if not quantized and weight.dtype == torch.float64 else torch.float32
        return n2.clamp_min_(0).sqrt_().to(out)


def check_magnitude(magnitude, N: int) -> None:
    if not isinstance(magnitude, torch.Tensor) or tuple(magnitude.shape) != (N,):
        raise ValueError(f"magnitude must be a [{N}] tensor (one per output feature), got "
                         f"{tuple(magnitude.shape) if isinstance(magnitude, torch.Tensor) else type(magnitude).__name__}")


def dora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                lora_B: torch.Tensor, scaling: float, magnitude: torch.Tensor, *, dropout_p: float = 0.0,
                training: bool = False, backend: str = "auto", weight_norm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DoRA linear (see the module docstring); differentiable in x, A, B and ``magnitude`` [N].
    ``weight_norm``: a precomputed (cached) :func:`dora_weight_norm`, else computed here. Under
    ``torch.autocast`` x, the base and the adapter are cast like ``F.linear``'s inputs; the magnitude and
    the norm keep fp32."""
    amp = _amp.autocast_dtype(x)
    if amp is not None:
        if weight_norm is None:  # from the weights as stored, as the module computes it
            weight_norm = dora_weight_norm(weight, lora_A, lora_B, scaling)
        with _amp.disabled(x):
            return dora_linear(*_amp.cast(amp, x, weight, bias, lora_A, lora_B), scaling, magnitude,
                               dropout_p=dropout_p, training=training, backend=backend, weight_norm=weight_norm)
    validate(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    check_magnitude(magnitude, weight.shape[0])
    if weight_norm is None:
        weight_norm = dora_weight_norm(weight, lora_A, lora_B, scaling)
    p = float(dropout_p) if training else 0.0
    if p == 0 and x.numel() > 0 and not torch.compiler.is_compiling() and dispatch.resolve(
            backend, x.device, _op_reason(x), tune=lambda: dispatch.op_tune(
                "dora_linear", (x, weight, bias, lora_A, lora_B, magnitude, weight_norm), (),
                lambda t, be: dora_linear(*t[:5], scaling, t[5], backend=be, weight_norm=t[6]))) == "triton":
        return own_shape(_DoRATriton.apply(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, float(scaling)), x)
    g = (magnitude / weight_norm).to(x.dtype)
    if p > 0:
        xd = F.dropout(x, p, True)
        z = lora_linear(xd, weight, None, lora_A, lora_B, scaling, backend=backend)
        return F.linear(x, weight, bias) - F.linear(xd, weight) + z * g
    z = lora_linear(x, weight, None, lora_A, lora_B, scaling, backend=backend)
    if bias is None:
        return z * g
    return torch.addcmul(bias.to(z.dtype), z, g)


class _DoRATriton(torch.autograd.Function):
    """DoRA on the Triton LoRA kernels, the magnitude rescale in the forward GEMM's epilogue."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling: float):
        from ..kernels import lora as K

        x2d = x.reshape(-1, x.shape[-1])
        g = (magnitude.float() / weight_norm).contiguous()
        need_z = magnitude.requires_grad
        out = K.lora_forward(x2d, weight, bias, lora_A, lora_B, scaling, 0.0, None, col_scale=g, store_z=need_z)
        y, S = out[0], out[1]
        ctx.z = out[2] if need_z else None
        ctx.g, ctx.norm, ctx.mag_dtype = g, weight_norm, magnitude.dtype
        return save_for_lora_backward(ctx, x, x2d, S, weight, bias, lora_A, lora_B, scaling, y)

    @staticmethod
    @first_order_only("dora_linear")
    def backward(ctx, dy):
        from ..kernels import lora as K

        x2d, S, weight, A, B = saved_lora_tensors(ctx)
        need_x, _, _, need_a, need_b, need_m = ctx.needs_input_grad[:6]
        dy2d = dy.reshape(-1, weight.shape[0])
        dz = (dy2d.float() * ctx.g).to(dy2d.dtype)  # the rescale's backward: one pass
        scaling = ctx.call  # save_for_lora_backward keeps the non-tensor argument (here: the scaling) as ctx.call
        dx, dA, dB = K.lora_backward(dz, x2d, weight, A, B, S, scaling, 0.0, None, need_x, need_a, need_b)
        dm = None
        if need_m:
            dm = ((dy2d.float() * ctx.z.float()).sum(0) / ctx.norm).to(ctx.mag_dtype)
        dx, dW, db, dA, dB, _ = finish_lora_backward(ctx, dy2d, x2d, dx, dA, dB, dz2d=dz)
        return dx, dW, db, dA, dB, dm, None, None
