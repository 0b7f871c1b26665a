"""``lora_linear``: frozen linear + one LoRA update, fused, with autograd.

    y = x·Wᵀ + b + s · (drop(x)·Aᵀ)·Bᵀ

Saved-tensor policy (the one place it is written down): ``x`` as given (never a dropped copy),
``S = drop(x)·Aᵀ`` (M×r), the frozen ``weight`` and the LoRA parameters (parameters, not
activations), and the dropout seed (an int64 [1] tensor on x's device, drawn by torch's generator). The
mask is regenerated in backward.

Under ``torch.autocast`` the inputs are cast like ``F.linear``'s (``ops/_amp.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .. import _ext, dispatch
from . import _amp, _torch_dropout
from ._autograd import own_shape, torch_backend_double_backward

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_KERNEL_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
def _name_dtypes() -> str:
    return "float32, float16 or bfloat16 (float64 on the torch backend only)"


def _op_reason(x: torch.Tensor):
    def reason(name: str):
        if name == "triton" and x.dtype not in _KERNEL_FLOATS:
            return f"the Triton kernels take float32/float16/bfloat16, got {x.dtype}"
        return None
    return reason


def check_base(x, weight, bias, lora_A, lora_B):
    """Types of every tensor argument, and the frozen base's shapes; returns (N, K)."""
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    N, K = weight.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x must have last dim in_features={K} (weight is {tuple(weight.shape)}), "
                         f"got x of shape {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must have shape ({N},) = (out_features,), got {tuple(bias.shape)}")
    return N, K


def check_dtypes_devices(x, weight, bias, lora_A, lora_B) -> None:
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name} must be {_name_dtypes()}, got {t.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match x dtype {x.dtype}")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"bias dtype {bias.dtype} must match x dtype {x.dtype}")
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"lora_A ({lora_A.dtype}) and lora_B ({lora_B.dtype}) must have the same dtype")
    if lora_A.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"lora_A/lora_B must be x's dtype ({x.dtype}) or float32 (an fp32 adapter on a "
                        f"half-precision base, as HF PEFT keeps them), got {lora_A.dtype}")
    dev = x.device
    for name, t in (("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t is not None and t.device != dev:
            raise ValueError(f"{name} is on {t.device} but x is on {dev}: all tensors must be on one device")


def validate(x, weight, bias, lora_A, lora_B, scaling, dropout_p) -> None:
    """Raise ValueError/TypeError naming the bad argument and what was expected."""
    N, K = check_base(x, weight, bias, lora_A, lora_B)
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling must be a Python float, got {type(scaling).__name__}")
    if not math.isfinite(float(scaling)):
        raise ValueError(f"scaling must be finite, got {scaling}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if lora_A.dim() != 2 or lora_A.shape[1] != K:
        raise ValueError(f"lora_A must have shape [r, in_features={K}], got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if r <= 0:
        raise ValueError(f"LoRA rank r must be >= 1, got lora_A of shape {tuple(lora_A.shape)}")
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (N, r):
        raise ValueError(f"lora_B must have shape [out_features={N}, r={r}] (r from lora_A), "
                         f"got {tuple(lora_B.shape)}")
    check_dtypes_devices(x, weight, bias, lora_A, lora_B)


# --------------------------------------------------------------------------------------------
# torch backend (any device; the CPU hot path)
# --------------------------------------------------------------------------------------------
def _use_ext(x: torch.Tensor, A: torch.Tensor, p: float) -> bool:
    """The fused C++ CPU dropout passes (csrc/cpu) run for fp32 CPU tensors when built."""
    return p > 0 and x.device.type == "cpu" and x.dtype == torch.float32 and A.dtype == torch.float32 \
        and _ext.available()


def base_addmm_(out, a, weight, *, transpose: bool):
    """``out += a·Wᵀ`` (transpose) or ``out += a·W``: W a frozen float tensor, or a quantized base
    (``quant.QuantBase``: dequantized chunk by chunk, never whole)."""
    if isinstance(weight, torch.Tensor):
        return out.addmm_(a, weight.t() if transpose else weight)
    from .. import quant

    return quant.base_mm(out, a, weight, transpose=transpose)


def scaled_mm(a, b, alpha: float, out=None):
    """``alpha · a·b`` as one GEMM (``addmm`` with beta 0: the scale applied in the accumulator, no pass of its own;
    the unfilled 0-dim C is never read), into ``out`` when given (e.g. a column block of a wider matrix)."""
    return torch.addmm(a.new_empty(()), a, b, beta=0, alpha=alpha, out=out)


def shrink(x, A, p: float, seed):
    """``S = drop(x)·Aᵀ`` (2-D x), in A's dtype, without the inverted-dropout scale: the callers fold
    ``keep_scale(p)`` into the alpha of the GEMMs that read S (the expand, dB), so it costs no pass. With p > 0 the
    mask is the torch backend's for ``seed``: made, applied and consumed in one pass by the C++ kernel on CPU (never
    materialised), or built with ``keep_mask`` elsewhere."""
    if p <= 0:
        return torch.mm(x.to(A.dtype), A.t())
    if _use_ext(x, A, p):
        return _ext.ops().lora_dropout_shrink(x, A, *_torch_dropout.keys(seed, p))
    keep = _torch_dropout.keep_mask(seed, x.shape, p, x.device)
    return torch.mm(torch.where(keep, x, 0.0).to(A.dtype), A.t())


def shrink_backward(dS, x, A, p: float, seed, need_dx: bool, need_da: bool):
    """(dx, dA) of ``shrink`` for ``dS`` (in A's dtype, already carrying the inverted-dropout scale), each None when
    not asked for: ``dx = mask ⊙ (dS·A)`` (A's dtype, or fp32 from the C++ kernel), ``dA = dSᵀ·(mask ⊙ x)``; the mask
    regenerated from ``seed``."""
    dA = dx = None
    if _use_ext(x, A, p):
        if need_dx or need_da:
            dx, dA = _ext.ops().lora_dropout_bwd(dS, x, A, *_torch_dropout.keys(seed, p), need_dx, need_da)
            dx, dA = (dx if need_dx else None), (dA if need_da else None)
        return dx, dA
    keep = _torch_dropout.keep_mask(seed, x.shape, p, x.device) if p > 0 and (need_dx or need_da) else None
    if need_da:
        dA = torch.mm(dS.t(), (x if keep is None else torch.where(keep, x, 0.0)).to(A.dtype))
    if need_dx:
        dx = torch.mm(dS, A)
        if keep is not None:
            dx.mul_(keep)
    return dx, dA


def _torch_forward(x, weight, bias, A, B, scaling: float, p: float, seed):
    cdt = A.dtype
    S = shrink(x, A, p, seed)
    alpha = scaling * _torch_dropout.keep_scale(p)  # (1 without dropout)
    # addmm-style fusion: the small LoRA expand (plus bias) is the GEMM's C, the base GEMM adds into it
    if bias is not None:
        y = torch.addmm(bias.to(cdt), S, B.t(), alpha=alpha)
    else:
        y = scaled_mm(S, B.t(), alpha)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    base_addmm_(y, x, weight, transpose=True)
    return y, S


def _torch_backward(dy, x, weight, A, B, S, scaling: float, p: float, seed,
                    need_dx: bool, need_da: bool, need_db: bool):
    cdt = A.dtype
    dyc = dy.to(cdt) if dy.dtype != cdt else dy
    alpha = scaling * _torch_dropout.keep_scale(p)  # dX, dA and dB carry the inverted-dropout scale (S does not)
    dS = scaled_mm(dyc, B, alpha)  # M×r
    dB = scaled_mm(dyc.t(), S.to(cdt), alpha) if need_db else None
    dx, dA = shrink_backward(dS, x, A, p, seed, need_dx, need_da)
    if dx is not None:
        if dx.dtype != x.dtype:
            dx = dx.to(x.dtype)
        base_addmm_(dx, dy, weight, transpose=False)  # the base dX GEMM accumulates into the LoRA term
    return dx, dA, dB


def _triton_forward(x, weight, bias, A, B, scaling, p, seed):
    """(y, S, packed keep-mask or None): the shrink writes the mask once for backward to read."""
    from ..kernels import lora as K

    bits = K.dropout_mask_buffer(x.shape[0], x.shape[1], x.device) if p > 0 else None
    y, S = K.lora_forward(x, weight, bias, A, B, scaling, p, seed, bits_out=bits)
    return y, S, bits


def _triton_backward(*args, **kw):
    from ..kernels import lora as K

    return K.lora_backward(*args, **kw)


_BACKENDS = {"torch": (_torch_forward, _torch_backward), "triton": (_triton_forward, _triton_backward)}


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoRACall:
    """Non-tensor arguments of one lora_linear call."""

    scaling: float
    dropout_p: float
    seed: Optional[torch.Tensor]  # int64 [1] on x's device (None without dropout)
    backend: str


def save_for_lora_backward(ctx, x, x2d, S, weight, bias, lora_A, lora_B, call, y2d):
    """The saved-tensor policy shared by the LoRA Functions: x as given (so a double backward can reach it;
    :func:`saved_lora_tensors` views it as 2-D again), the small S, the frozen weight and the adapter tensors;
    returns y2d as it is: the caller views it with x's leading dims outside the Function (``own_shape``), so the
    output is not a view made inside a custom Function, which autograd would forbid modifying in place."""
    ctx.save_for_backward(x, S, weight, lora_A, lora_B)
    ctx.call = call
    ctx.x_shape = x.shape
    ctx.has_bias = bias is not None
    return y2d


def saved_lora_tensors(ctx):
    """(x2d, S, weight, lora_A, lora_B) as saved by :func:`save_for_lora_backward`."""
    x, S, weight, A, B = ctx.saved_tensors
    return x.reshape(-1, x.shape[-1]), S, weight, A, B


def finish_lora_backward(ctx, dy2d, x2d, dx, dA, dB, dz2d=None):
    """Adds the frozen base's grads (when someone unfroze it: correct, not fused) and reshapes dx.
    ``dz2d``: the gradient at the base GEMM's output when it differs from dY (DoRA's dY ⊙ g); the bias
    gradient stays Σ dY."""
    need_w, need_b = ctx.needs_input_grad[1:3]
    dW = torch.mm((dy2d if dz2d is None else dz2d).t(), x2d) if need_w else None
    db = dy2d.sum(0) if (need_b and ctx.has_bias) else None
    if dx is not None:
        dx = dx.view(ctx.x_shape)
    return dx, dW, db, dA, dB, None


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, call: LoRACall):
        K = x.shape[-1]
        x2d = x.reshape(-1, K)
        fwd, _ = _BACKENDS[call.backend]
        out = fwd(x2d, weight, bias, lora_A, lora_B, call.scaling, call.dropout_p, call.seed)
        y, S = out[0], out[1]
        # the Triton backend's packed dropout mask (an intermediate, not an input or output: kept on ctx)
        ctx.dropout_bits = out[2] if len(out) > 2 else None
        return save_for_lora_backward(ctx, x, x2d, S, weight, bias, lora_A, lora_B, call, y)

    @staticmethod
    @torch_backend_double_backward("lora_linear", lambda ctx, dy: _differentiable_backward(ctx, dy))
    def backward(ctx, dy):
        x2d, S, weight, A, B = saved_lora_tensors(ctx)
        call: LoRACall = ctx.call
        need_x, _, _, need_a, need_bb, _ = ctx.needs_input_grad
        dy2d = dy.reshape(-1, weight.shape[0])
        _, bwd = _BACKENDS[call.backend]
        mask_src = ctx.dropout_bits if ctx.dropout_bits is not None else call.seed  # triton: forward's bits
        dx, dA, dB = bwd(dy2d, x2d, weight, A, B, S, call.scaling, call.dropout_p, mask_src,
                         need_dx=need_x, need_da=need_a, need_db=need_bb)
        return finish_lora_backward(ctx, dy2d, x2d, dx, dA, dB)


def differentiable_lora_grads(x2d, dy2d, A, B, scaling: float, p: float, seed, need_x: bool, need_a: bool,
                              need_b: bool):
    """(dX's LoRA term in x's dtype, dA, dB), each None when not asked for, as differentiable torch ops: S recomputed
    from x and A (a saved S would be a constant to autograd) and the mask regenerated from ``seed``, so gradients of
    these gradients are exact (second-order MAML, gradient penalties). Shared by the Functions whose backward
    supports ``create_graph=True`` per LoRA (this op, sibling groups)."""
    cdt = A.dtype
    keep = _torch_dropout.keep_mask(seed, x2d.shape, p, x2d.device) if p > 0 else None
    xd = x2d if keep is None else torch.where(keep, x2d, 0.0) * _torch_dropout.keep_scale(p)
    xd = xd.to(cdt)
    dyc = dy2d.to(cdt)
    dS = (dyc @ B) * scaling
    dxl = dA = dB = None
    if need_x:
        dxl = dS @ A
        if keep is not None:
            dxl = torch.where(keep, dxl, 0.0) * _torch_dropout.keep_scale(p)
        dxl = dxl.to(x2d.dtype)
    if need_a:
        dA = dS.t() @ xd
    if need_b:
        dB = (dyc.t() @ (xd @ A.t())) * scaling
    return dxl, dA, dB


def _differentiable_backward(ctx, dy):
    """The torch backend's backward as differentiable torch ops (create_graph=True): the same math as
    ``_torch_backward`` (``differentiable_lora_grads``) plus the frozen base's terms."""
    x, _, weight, A, B = ctx.saved_tensors
    call: LoRACall = ctx.call
    need_x, need_w, need_b, need_a, need_bb, _ = ctx.needs_input_grad
    x2d = x.reshape(-1, x.shape[-1])
    dy2d = dy.reshape(-1, weight.shape[0])
    dxl, dA, dB = differentiable_lora_grads(x2d, dy2d, A, B, call.scaling, call.dropout_p, call.seed, need_x, need_a,
                                            need_bb)
    dx = dW = db = None
    if need_x:
        dx = (dy2d @ weight + dxl).view(ctx.x_shape)
    if need_w:
        dW = dy2d.t() @ x2d
    if need_b and ctx.has_bias:
        db = dy2d.sum(0)
    return dx, dW, db, dA, dB, None


def _draw_seed(device="cpu") -> torch.Tensor:
    """The dropout seed of one call: an int64 [1] tensor on ``device`` (``_torch_dropout.draw_seed``)."""
    return _torch_dropout.draw_seed(device)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    dropout_p: float = 0.0,
    training: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused ``x·Wᵀ + b + scaling·(dropout(x)·lora_Aᵀ)·lora_Bᵀ`` with autograd.

    Args:
        x: ``[..., in_features]``, float32/float16/bfloat16.
        weight: ``[out_features, in_features]`` (frozen base, same dtype as x). bias: ``[out]`` or None.
        lora_A: ``[r, in_features]``; lora_B: ``[out_features, r]``; x's dtype or float32.
        scaling: the LoRA scale (``lora_alpha / r``, or ``/ sqrt(r)`` for rsLoRA).
        dropout_p: dropout on the LoRA input, in [0, 1); applied only when ``training``.
        backend: "auto" | "torch" | "triton" (``PEFT_KERNELS_BACKEND`` overrides; see
            ``peft_kernels.dispatch.explain``).
    """
    amp = _amp.autocast_dtype(x)
    if amp is not None:  # like F.linear under autocast: every input in the autocast dtype
        with _amp.disabled(x):
            return lora_linear(*_amp.cast(amp, x, weight, bias, lora_A, lora_B), scaling, dropout_p=dropout_p,
                               training=training, backend=backend)
    validate(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    p = float(dropout_p) if training else 0.0
    name = dispatch.resolve(backend, x.device, _op_reason(x), tune=lambda: dispatch.op_tune(
        "lora_linear", (x, weight, bias, lora_A, lora_B), (f"dropout={p > 0}",),
        lambda t, be: lora_linear(*t, scaling, dropout_p=p, training=p > 0, backend=be)))
    if p > 0 and torch.compiler.is_compiling():
        # Under torch.compile the fused op runs as a custom op (ops/_compiled.py): the seed is drawn in the graph and
        # the mask regenerated in backward, as in eager (tracing the Python would read the seed on the host)
        from ._compiled import lora_linear_dropout

        y = lora_linear_dropout(x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B, scaling, p)
        return y.view(*x.shape[:-1], weight.shape[0])
    seed = _draw_seed(x.device) if p > 0 else None
    return own_shape(LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, LoRACall(float(scaling), p, seed, name)),
                     x)


def dropout_mask(backend: str, seed: torch.Tensor, shape2d, p: float, device) -> torch.Tensor:
    """The mask (0 or 1/(1-p) factors, fp32, [M, K]) that ``backend`` applies for ``seed`` (from ``_draw_seed``).

    The reference takes it as ``dropout_mask`` so every backend is checked with dropout on.
    """
    if backend == "torch":
        return _torch_dropout.dropout_mask(seed, tuple(shape2d), p, device)
    if backend == "triton":
        from ..kernels import _common

        return _common.dropout_mask(tuple(shape2d), p, torch.as_tensor(seed, dtype=torch.int64).reshape(1), device)
    raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
